//! Loads (16-bit or f32 to f32), stores (f32 to the buffer's dtype, round to nearest even) and the ops made
//! of nothing else: `upload`, `download`, `cast`. Bit-exact with the reference backend, NaN payloads included.
//!
//! bf16 is the top half of an f32, so both directions are integer shifts and an add that LLVM vectorises.
//! `vcvtneps2bf16` (AVX512_BF16) is not used: it treats subnormal inputs as zero, which the reference does not.
//! f16 loads are integer code as well (F16C's `vcvtph2ps` would quiet signalling NaNs); f16 stores use F16C
//! (`vcvtps2ph`, round to nearest even), which rounds subnormals and quiets NaNs exactly as the reference's
//! integer conversion does.

#[cfg(target_arch = "x86_64")]
use core::arch::x86_64::*;

use mantissa_core::dtype::f32_to_f16_bits;

use super::multiversion;
#[cfg(target_arch = "x86_64")]
use super::V_AVX2;
use crate::gemm::{Elem, ElemKind};

/// f32 to bf16 bits, round to nearest even; NaN stays NaN with the quiet bit set (as the `half` crate).
#[inline(always)]
pub(crate) fn f32_to_bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16;
    let nan = (b >> 16) | 0x0040;
    (if b & 0x7fff_ffff > 0x7f80_0000 { nan } else { rounded }) as u16
}

/// `x` stored as `T`.
#[inline(always)]
pub(crate) fn to_bits<T: Elem>(x: f32) -> T {
    let mut out = [T::from_f32(0.0)];
    // SAFETY: one element read from a one-element array, one written to another.
    unsafe { store::<T, { super::V_PLAIN }>(&[x], out.as_mut_ptr()) };
    out[0]
}

/// `dst[i] = src[i]` widened to f32, for `i < dst.len()`.
///
/// # Safety
/// `src` is readable for `dst.len()` elements and does not overlap `dst`.
#[inline(always)]
pub(crate) unsafe fn load<T: Elem, const V: u8>(src: *const T, dst: &mut [f32]) {
    let n = dst.len();
    match T::KIND {
        // SAFETY: T is f32; n elements readable (caller), dst distinct.
        ElemKind::F32 => unsafe { core::ptr::copy_nonoverlapping(src as *const f32, dst.as_mut_ptr(), n) },
        ElemKind::Bf16 => {
            let s = src as *const u16;
            for (i, d) in dst.iter_mut().enumerate() {
                // SAFETY: i < n.
                *d = f32::from_bits((unsafe { s.add(i).read() } as u32) << 16);
            }
        }
        ElemKind::F16 => {
            let s = src as *const u16;
            for (i, d) in dst.iter_mut().enumerate() {
                // SAFETY: i < n.
                *d = f16_to_f32(unsafe { s.add(i).read() });
            }
        }
    }
}

/// f16 bits to f32, exactly, without branches (so it vectorises). Not F16C's `vcvtph2ps`: that quiets
/// signalling NaNs, while the reference keeps their bits.
#[inline(always)]
fn f16_to_f32(h: u16) -> f32 {
    let h = h as u32;
    let sign = (h & 0x8000) << 16;
    let exp = (h >> 10) & 0x1f;
    let man = h & 0x3ff;
    let normal = sign | ((exp + 112) << 23) | (man << 13);
    let special = sign | 0x7f80_0000 | (man << 13);
    // Zero or subnormal: man * 2^-24, exact in f32.
    let small = sign | (man as f32 * (1.0 / 16_777_216.0)).to_bits();
    f32::from_bits(if exp == 0 {
        small
    } else if exp == 31 {
        special
    } else {
        normal
    })
}

/// `dst[i] = src[i]` rounded to `T` (nearest even), for `i < src.len()`.
///
/// # Safety
/// `dst` is writable for `src.len()` elements and does not overlap `src`; with `V >= V_AVX2` the CPU has F16C.
#[inline(always)]
pub(crate) unsafe fn store<T: Elem, const V: u8>(src: &[f32], dst: *mut T) {
    let n = src.len();
    match T::KIND {
        // SAFETY: T is f32; n elements writable (caller), src distinct.
        ElemKind::F32 => unsafe { core::ptr::copy_nonoverlapping(src.as_ptr(), dst as *mut f32, n) },
        ElemKind::Bf16 => {
            let d = dst as *mut u16;
            for (i, &x) in src.iter().enumerate() {
                // SAFETY: i < n.
                unsafe { d.add(i).write(f32_to_bf16_bits(x)) };
            }
        }
        ElemKind::F16 => {
            let d = dst as *mut u16;
            let mut i = 0;
            #[cfg(target_arch = "x86_64")]
            if V >= V_AVX2 {
                while i + 8 <= n {
                    // SAFETY: 8 f32 readable at src[i..], 8 f16 writable at d + i, i + 8 <= n; F16C (caller).
                    unsafe {
                        let x = _mm256_loadu_ps(src.as_ptr().add(i));
                        let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(x);
                        _mm_storeu_si128(d.add(i) as *mut __m128i, h);
                    }
                    i += 8;
                }
            }
            while i < n {
                // SAFETY: i < n.
                unsafe { d.add(i).write(f32_to_f16_bits(src[i])) };
                i += 1;
            }
        }
    }
}

/// # Safety
/// `dst` writable for `src.len()` elements; the CPU has the features of `V`.
#[inline(always)]
unsafe fn upload_body<T: Elem, const V: u8>(src: &[f32], dst: *mut T) {
    // SAFETY: forwarded.
    unsafe { store::<T, V>(src, dst) }
}

/// # Safety
/// `src` readable for `dst.len()` elements; the CPU has the features of `V`.
#[inline(always)]
unsafe fn download_body<T: Elem, const V: u8>(src: *const T, dst: &mut [f32]) {
    // SAFETY: forwarded.
    unsafe { load::<T, V>(src, dst) }
}

/// # Safety
/// `src` readable and `dst` writable for `n` elements, equal or disjoint; the CPU has the features of `V`.
#[inline(always)]
unsafe fn cast_body<S: Elem, D: Elem, const V: u8>(src: *const S, dst: *mut D, n: usize) {
    // Same dtypes too go through f32, as in the reference: a signalling NaN comes out quiet.
    let mut buf = [0.0f32; super::CH];
    let mut i = 0;
    while i < n {
        let len = super::CH.min(n - i);
        // SAFETY: i + len <= n; the chunk buffer is local.
        unsafe {
            load::<S, V>(src.add(i), &mut buf[..len]);
            store::<D, V>(&buf[..len], dst.add(i));
        }
        i += len;
    }
}

multiversion!(
    /// `dst = src` rounded to `T`.
    ///
    /// # Safety
    /// `dst` writable for `src.len()` elements.
    unsafe fn upload<T: Elem>(src: &[f32], dst: *mut T) => upload_body
);

multiversion!(
    /// `dst = src` widened to f32.
    ///
    /// # Safety
    /// `src` readable for `dst.len()` elements.
    unsafe fn download<T: Elem>(src: *const T, dst: &mut [f32]) => download_body
);

multiversion!(
    /// `dst[..n] = src[..n]`, converting.
    ///
    /// # Safety
    /// As `cast_body`.
    unsafe fn cast<S: Elem, D: Elem>(src: *const S, dst: *mut D, n: usize) => cast_body
);
