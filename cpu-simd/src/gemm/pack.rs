//! Packing of A and B into the micro-kernels' panel layouts.
//!
//! A panel holds `R` rows of A (or `R` columns of B) for one k-block, k-major:
//! f32 panels are `dst[p * R + i]` (p < kc, i < R); bf16 pair panels, for
//! `vdpbf16ps`, are `dst[(p2 * R + i) * 2 + q]` with `p = 2 * p2 + q`, so each
//! 32-bit lane holds two consecutive k of one row or column. Rows/columns past
//! `valid` and the odd k of a pair past `kc` are zero, so micro-kernels always run
//! full tiles. Source strides are arbitrary; `rs` steps across the panel (rows of A,
//! columns of B), `ks` steps along k. Layouts contiguous in either direction take a
//! loop LLVM can vectorize.

use super::f16c::{load_f32, run_to_f32};
use super::Elem;
#[cfg(target_arch = "x86_64")]
use super::ElemKind;

/// Packs one f32 panel: `dst[p * R + i] = src[i * rs + p * ks]`.
///
/// # Safety
/// `src[i * rs + p * ks]` is readable for `i < valid <= R`, `p < kc`; `dst` is
/// writable for `kc * R` f32. With `F16C`, the CPU supports F16C.
#[inline(always)]
pub(crate) unsafe fn pack_f32<T: Elem, const R: usize, const F16C: bool>(
    kc: usize,
    valid: usize,
    src: *const T,
    rs: isize,
    ks: isize,
    dst: *mut f32,
) {
    debug_assert!(valid <= R);
    if valid == R && rs == 1 {
        // Contiguous across the panel (B row-major, A column-major): runs of R.
        for p in 0..kc {
            // SAFETY: row p of the panel is readable (caller); dst has kc * R slots.
            unsafe { run_to_f32::<T, R, F16C>(src.offset(p as isize * ks), dst.add(p * R)) };
        }
        return;
    }
    if ks == 1 {
        // Contiguous along k (A row-major, B column-major): read rows, write strided.
        for i in 0..valid {
            // SAFETY: element (i, p) is readable for i < valid, p < kc (caller).
            let s = unsafe { src.offset(i as isize * rs) };
            for p in 0..kc {
                // SAFETY: as above; p * R + i < kc * R.
                unsafe { *dst.add(p * R + i) = load_f32::<T, F16C>(s.add(p)) };
            }
        }
    } else {
        for p in 0..kc {
            for i in 0..valid {
                // SAFETY: element (i, p) is readable (caller); p * R + i < kc * R.
                unsafe {
                    let s = src.offset(i as isize * rs + p as isize * ks);
                    *dst.add(p * R + i) = load_f32::<T, F16C>(s);
                }
            }
        }
    }
    if valid < R {
        for p in 0..kc {
            for i in valid..R {
                // SAFETY: p * R + i < kc * R.
                unsafe { *dst.add(p * R + i) = 0.0 };
            }
        }
    }
}

/// bf16 bits of one source element: bf16 as is, anything else rounded to nearest even.
///
/// # Safety
/// `p` is readable.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn load_bf16_bits<T: Elem>(p: *const T) -> u16 {
    if matches!(T::KIND, ElemKind::Bf16) {
        // SAFETY: T is bf16, a 16-bit value; p is readable (caller).
        unsafe { *(p as *const u16) }
    } else {
        // SAFETY: p is readable (caller).
        half::bf16::from_f32(unsafe { *p }.to_f32()).to_bits()
    }
}

/// Packs one bf16 pair panel: `dst[(p2 * R + i) * 2 + q] = src[i * rs + (2 * p2 + q) * ks]`,
/// `ceil(kc / 2) * R * 2` u16 in all.
///
/// # Safety
/// `src[i * rs + p * ks]` is readable for `i < valid <= R`, `p < kc`; `dst` is
/// writable for `kc.div_ceil(2) * R * 2` u16.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn pack_bf16_pairs<T: Elem, const R: usize>(
    kc: usize,
    valid: usize,
    src: *const T,
    rs: isize,
    ks: isize,
    dst: *mut u16,
) {
    debug_assert!(valid <= R);
    let kp = kc.div_ceil(2);
    for p2 in 0..kp {
        let p = 2 * p2;
        let has_odd = p + 1 < kc;
        // SAFETY: row p < kc of the panel is readable and pair p2 < kp has
        // R * 2 slots in dst (caller).
        let (r0, d) = unsafe { (src.offset(p as isize * ks), dst.add(p2 * R * 2)) };
        if valid == R && rs == 1 && has_odd {
            // SAFETY: rows p and p + 1 are readable, R contiguous elements each;
            // d has R * 2 slots.
            unsafe {
                let r1 = r0.offset(ks);
                for i in 0..R {
                    *d.add(2 * i) = load_bf16_bits(r0.add(i));
                    *d.add(2 * i + 1) = load_bf16_bits(r1.add(i));
                }
            }
            continue;
        }
        for i in 0..R {
            let (lo, hi) = if i < valid {
                // SAFETY: element (i, p) is readable, and (i, p + 1) when p + 1 < kc.
                unsafe {
                    let s = r0.offset(i as isize * rs);
                    let lo = load_bf16_bits(s);
                    let hi = if has_odd { load_bf16_bits(s.offset(ks)) } else { 0 };
                    (lo, hi)
                }
            } else {
                (0, 0)
            };
            // SAFETY: 2 * i + 1 < R * 2.
            unsafe {
                *d.add(2 * i) = lo;
                *d.add(2 * i + 1) = hi;
            }
        }
    }
}
