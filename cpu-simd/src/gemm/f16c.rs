//! Widening of 16-bit inputs to f32 during packing; F16C (`vcvtph2ps`) for f16
//! where the kernel has it, `half`'s portable conversion otherwise.

use super::Elem;
#[cfg(target_arch = "x86_64")]
use super::ElemKind;

#[cfg(target_arch = "x86_64")]
use core::arch::x86_64::*;

/// One element as f32.
///
/// # Safety
/// `p` is readable; with `F16C` the CPU supports F16C.
#[inline(always)]
pub(crate) unsafe fn load_f32<T: Elem, const F16C: bool>(p: *const T) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if F16C && matches!(T::KIND, ElemKind::F16) {
        // SAFETY: T is f16 (16 bits) and readable; F16C is supported (caller).
        return unsafe {
            let bits = *(p as *const u16);
            _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
        };
    }
    // SAFETY: p is readable (caller).
    unsafe { *p }.to_f32()
}

/// `dst[i] = src[i] as f32` for `i < R`.
///
/// # Safety
/// `src` readable and `dst` writable for `R` elements; with `F16C` the CPU supports F16C.
#[inline(always)]
pub(crate) unsafe fn run_to_f32<T: Elem, const R: usize, const F16C: bool>(src: *const T, dst: *mut f32) {
    #[cfg(target_arch = "x86_64")]
    if F16C && matches!(T::KIND, ElemKind::F16) && R.is_multiple_of(8) {
        for i in (0..R).step_by(8) {
            // SAFETY: 8 f16 (16 bytes) readable at src + i and 8 f32 writable at
            // dst + i, since i + 8 <= R; F16C supported (caller).
            unsafe {
                let h = _mm_loadu_si128(src.add(i) as *const __m128i);
                _mm256_storeu_ps(dst.add(i), _mm256_cvtph_ps(h));
            }
        }
        return;
    }
    for i in 0..R {
        // SAFETY: i < R (caller).
        unsafe { *dst.add(i) = (*src.add(i)).to_f32() };
    }
}
