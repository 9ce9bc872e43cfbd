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
use super::{Elem, ElemKind};

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
        if matches!(T::KIND, ElemKind::F32) {
            // A plain copy of R f32 per k; a constant-size copy becomes vector moves (the generic
            // element loop below stays scalar, since LLVM cannot rule out overlap).
            for p in 0..kc {
                // SAFETY: as below; T is f32, so the source run is R f32.
                unsafe {
                    core::ptr::copy_nonoverlapping(
                        src.offset(p as isize * ks) as *const [f32; R],
                        dst.add(p * R) as *mut [f32; R],
                        1,
                    )
                };
            }
            return;
        }
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

/// Packs a whole f32 block whose rows are contiguous across the panels (`src[p * ks + i]`,
/// i.e. B row-major or A column-major), `len` rows/columns in panels of `R`:
/// `dst[s * kc * R + p * R + r] = src[p * ks + s * R + r]`, the last panel zero-padded.
/// Row by row: each source row is read once, front to back, which the hardware prefetcher
/// follows; packing panel by panel instead reads `R` elements of every row per panel, a
/// stride it does not follow (measured: ~7% of the training-step GEMMs went to those copies).
///
/// # Safety
/// `src[p * ks + i]` readable for `p < kc`, `i < len`; `dst` writable for
/// `len.div_ceil(R) * kc * R` f32.
#[inline(always)]
pub(crate) unsafe fn pack_f32_rows<const R: usize>(kc: usize, len: usize, src: *const f32, ks: isize, dst: *mut f32) {
    let (full, rest) = (len / R, len % R);
    let panel = kc * R;
    for p in 0..kc {
        // SAFETY: row p holds len readable f32 (caller); panel s, row p lies inside dst.
        unsafe {
            let row = src.offset(p as isize * ks);
            for s in 0..full {
                core::ptr::copy_nonoverlapping(
                    row.add(s * R) as *const [f32; R],
                    dst.add(s * panel + p * R) as *mut [f32; R],
                    1,
                );
            }
            if rest > 0 {
                let d = dst.add(full * panel + p * R);
                core::ptr::copy_nonoverlapping(row.add(full * R), d, rest);
                core::ptr::write_bytes(d.add(rest), 0, R - rest);
            }
        }
    }
}

/// bf16 bits of one source element: bf16 as is, anything else rounded to nearest even.
///
/// # Safety
/// `p` is readable.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
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
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
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

/// Packs one AMX A panel: `R` rows in steps of 32 k, each step `R` rows of 32 bf16 (64 bytes, one tile row):
/// `dst[(s * R + i) * 32 + kk] = src[i * rs + (32 * s + kk) * ks]`, `kc.div_ceil(32) * R * 32` u16 in all.
/// Rows past `valid` and k past `kc` are zero.
///
/// # Safety
/// `src[i * rs + p * ks]` is readable for `i < valid <= R`, `p < kc`; `dst` is writable for
/// `kc.div_ceil(32) * R * 32` u16.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn pack_amx_a<T: Elem, const R: usize>(
    kc: usize,
    valid: usize,
    src: *const T,
    rs: isize,
    ks: isize,
    dst: *mut u16,
) {
    debug_assert!(valid <= R);
    let steps = kc.div_ceil(32);
    // SAFETY (whole body): reads are (i < valid, p < kc) of the source and writes stay below
    // steps * R * 32 (caller).
    unsafe {
        if ks == 1 && matches!(T::KIND, ElemKind::Bf16) {
            // A row-major: each tile row is a 64-byte copy.
            for i in 0..valid {
                let row = src.offset(i as isize * rs) as *const u16;
                for s in 0..kc / 32 {
                    // A constant 64-byte copy: one vector move, not a memcpy call.
                    core::ptr::copy_nonoverlapping(
                        row.add(32 * s) as *const [u16; 32],
                        dst.add((s * R + i) * 32) as *mut [u16; 32],
                        1,
                    );
                }
                if !kc.is_multiple_of(32) {
                    let (s, len) = (kc / 32, kc % 32);
                    let d = dst.add((s * R + i) * 32);
                    core::ptr::copy_nonoverlapping(row.add(32 * s), d, len);
                    core::ptr::write_bytes(d.add(len), 0, 32 - len);
                }
            }
        } else {
            for s in 0..steps {
                let len = 32.min(kc - 32 * s);
                for kk in 0..32 {
                    let p = (32 * s + kk) as isize;
                    for i in 0..valid {
                        *dst.add((s * R + i) * 32 + kk) =
                            if kk < len { load_bf16_bits(src.offset(i as isize * rs + p * ks)) } else { 0 };
                    }
                }
            }
        }
        for s in 0..steps {
            core::ptr::write_bytes(dst.add((s * R + valid) * 32), 0, (R - valid) * 32);
        }
    }
}

/// Packs one AMX B panel in VNNI layout: pairs of k interleaved per column, as [`pack_bf16_pairs`]
/// (`dst[(p2 * R + j) * 2 + q] = src[j * rs + (2 * p2 + q) * ks]`), with k zero-padded to a multiple of 32:
/// `kc.div_ceil(32) * 16 * R * 2` u16 in all. A B tile (16 pair rows x 16 columns) is 64 bytes of each
/// `R * 4`-byte pair row.
///
/// # Safety
/// `src[j * rs + p * ks]` is readable for `j < valid <= R`, `p < kc`; `dst` is writable for
/// `kc.div_ceil(32) * 32 * R` u16; the CPU supports AVX-512BW and the caller enables it.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn pack_amx_b<T: Elem, const R: usize>(
    kc: usize,
    valid: usize,
    src: *const T,
    rs: isize,
    ks: isize,
    dst: *mut u16,
) {
    debug_assert!(valid <= R);
    let pairs = kc / 2;
    let padded = kc.div_ceil(32) * 16;
    // SAFETY (whole body): reads are (j < valid, p < kc) of the source; writes stay below padded * R * 2
    // u16 (caller).
    unsafe {
        if ks == 1 && matches!(T::KIND, ElemKind::Bf16) {
            // B column-major (k contiguous per column): each (k, k + 1) pair is one u32 of the source.
            let d = dst as *mut u32;
            for j in 0..valid {
                let col = src.offset(j as isize * rs) as *const u32;
                for p2 in 0..pairs {
                    *d.add(p2 * R + j) = col.add(p2).read_unaligned();
                }
            }
            for j in valid..R {
                for p2 in 0..pairs {
                    *d.add(p2 * R + j) = 0;
                }
            }
            if kc % 2 == 1 {
                for j in 0..R {
                    let lo =
                        if j < valid { load_bf16_bits(src.offset(j as isize * rs + (kc - 1) as isize)) } else { 0 };
                    *d.add(pairs * R + j) = u32::from(lo);
                }
            }
        } else if R == 32 && valid == R && rs == 1 && matches!(T::KIND, ElemKind::Bf16) {
            // B row-major: interleave two rows of 32 bf16 into one 128-byte pair row (two `vpermt2w`).
            use core::arch::x86_64::*;
            let lo: [u16; 32] = core::array::from_fn(|x| (x / 2 + (x % 2) * 32) as u16);
            let hi: [u16; 32] = core::array::from_fn(|x| (16 + x / 2 + (x % 2) * 32) as u16);
            let (lo, hi) = (_mm512_loadu_si512(lo.as_ptr() as *const _), _mm512_loadu_si512(hi.as_ptr() as *const _));
            for p2 in 0..kc.div_ceil(2) {
                let r0 = _mm512_loadu_si512(src.offset(2 * p2 as isize * ks) as *const _);
                let r1 = if 2 * p2 + 1 < kc {
                    _mm512_loadu_si512(src.offset((2 * p2 + 1) as isize * ks) as *const _)
                } else {
                    _mm512_setzero_si512()
                };
                let d = dst.add(p2 * 64);
                _mm512_storeu_si512(d as *mut _, _mm512_permutex2var_epi16(r0, lo, r1));
                _mm512_storeu_si512(d.add(32) as *mut _, _mm512_permutex2var_epi16(r0, hi, r1));
            }
        } else {
            pack_bf16_pairs::<T, R>(kc, valid, src, rs, ks, dst);
        }
        let done = kc.div_ceil(2);
        core::ptr::write_bytes(dst.add(done * R * 2), 0, (padded - done) * R * 2);
    }
}
