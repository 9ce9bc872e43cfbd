//! Gradient statistics and the fused optimizer updates: one pass over master weights, gradients and state
//! that also writes the working copy (rounded to its dtype), so a mixed-precision update reads and writes
//! each vector once.
//!
//! The per-element arithmetic is the reference's, operation for operation (correctly rounded `sqrt` and `/`,
//! no FMA), so the updates are bit-exact with it.

use mantissa_core::backend::{AdamWStep, SgdStep};

use super::convert::{load, store};
use super::{multiversion, CH};
use crate::gemm::{Elem, ElemKind};

/// `(non-finite count, sum of (g * scale)^2 over the finite ones)`, squares accumulated in f64 in 8
/// interleaved partial sums (the reference sums in order: equal up to f64 rounding).
///
/// # Safety
/// `g` readable for `n` elements; the CPU has the features of `V`.
#[inline(always)]
unsafe fn grad_stats_body<G: Elem, const V: u8>(g: *const G, n: usize, scale: f32) -> (usize, f64) {
    let mut buf = [0.0f32; CH];
    let mut sq = [0.0f64; 8];
    let mut bad = [0u32; 8];
    let mut i = 0;
    if matches!(G::KIND, ElemKind::F32) {
        // f32 gradients are read in place (no copy into the chunk buffer) up to the last multiple of 16.
        let whole = n / 16 * 16;
        // SAFETY: G is f32 and `whole <= n` elements are readable (caller).
        let x = unsafe { core::slice::from_raw_parts(g as *const f32, whole) };
        // SAFETY: the CPU has the features of `V` (caller).
        i = unsafe { squares_simd::<V>(x, scale, &mut sq, &mut bad) };
    }
    while i < n {
        let len = CH.min(n - i);
        // SAFETY: i + len <= n.
        unsafe { load::<G, V>(g.add(i), &mut buf[..len]) };
        // A short chunk (only the last) is padded with zeros, which add nothing.
        let full = len.next_multiple_of(16);
        buf[len..full].fill(0.0);
        // SAFETY: `full <= CH` elements of `buf` are initialised; the CPU has the features of `V` (caller).
        let done = unsafe { squares_simd::<V>(&buf[..full], scale, &mut sq, &mut bad) };
        for c in buf[done..full].chunks_exact(8) {
            for l in 0..8 {
                let v = c[l] * scale;
                let finite = v.is_finite();
                sq[l] += if finite { v as f64 * v as f64 } else { 0.0 };
                bad[l] += u32::from(!finite);
            }
        }
        i += len;
    }
    let sum = ((sq[0] + sq[1]) + (sq[2] + sq[3])) + ((sq[4] + sq[5]) + (sq[6] + sq[7]));
    (bad.iter().map(|&b| b as usize).sum(), sum)
}

/// Adds the squares of the finite `x * scale` (exact in f64: a square of an f32 has 48 significant bits) to
/// `sq` and counts the others in `bad`, with explicit AVX-512 / AVX2 code (LLVM's vectoriser splits the f32
/// to f64 widening into 128-bit pieces here). Returns how many elements it did (a multiple of 16; 0 on the
/// plain path).
///
/// # Safety
/// The CPU has the features of `V`.
#[inline(always)]
unsafe fn squares_simd<const V: u8>(x: &[f32], scale: f32, sq: &mut [f64; 8], bad: &mut [u32; 8]) -> usize {
    #[cfg(target_arch = "x86_64")]
    {
        use core::arch::x86_64::*;
        let n = x.len() / 16 * 16;
        if V == super::V_AVX512 {
            // SAFETY: AVX-512F (caller); loads stay within x[..n]; sq holds 8 f64.
            unsafe {
                let (s, inf) = (_mm512_set1_ps(scale), _mm512_set1_ps(f32::INFINITY));
                let mut acc = _mm512_loadu_pd(sq.as_ptr());
                let mut nbad = 0u32;
                for i in (0..n).step_by(16) {
                    let v = _mm512_mul_ps(_mm512_loadu_ps(x.as_ptr().add(i)), s);
                    let finite = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(_mm512_abs_ps(v), inf);
                    nbad += 16 - finite.count_ones();
                    let v = _mm512_maskz_mov_ps(finite, v);
                    let lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
                    let hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v))));
                    acc = _mm512_add_pd(acc, _mm512_add_pd(_mm512_mul_pd(lo, lo), _mm512_mul_pd(hi, hi)));
                }
                _mm512_storeu_pd(sq.as_mut_ptr(), acc);
                bad[0] += nbad;
            }
            return n;
        }
        if V == super::V_AVX2 {
            // SAFETY: AVX2 (caller); loads stay within x[..n]; sq holds 8 f64.
            unsafe {
                let (s, inf) = (_mm256_set1_ps(scale), _mm256_set1_ps(f32::INFINITY));
                let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
                let (mut a0, mut a1) = (_mm256_loadu_pd(sq.as_ptr()), _mm256_loadu_pd(sq.as_ptr().add(4)));
                let mut nbad = 0u32;
                for i in (0..n).step_by(8) {
                    let v = _mm256_mul_ps(_mm256_loadu_ps(x.as_ptr().add(i)), s);
                    let finite = _mm256_cmp_ps::<_CMP_LT_OQ>(_mm256_and_ps(v, abs_mask), inf);
                    nbad += 8 - (_mm256_movemask_ps(finite) as u32).count_ones();
                    let v = _mm256_and_ps(v, finite);
                    let lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
                    let hi = _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(v));
                    a0 = _mm256_add_pd(a0, _mm256_mul_pd(lo, lo));
                    a1 = _mm256_add_pd(a1, _mm256_mul_pd(hi, hi));
                }
                _mm256_storeu_pd(sq.as_mut_ptr(), a0);
                _mm256_storeu_pd(sq.as_mut_ptr().add(4), a1);
                bad[0] += nbad;
            }
            return n;
        }
    }
    let _ = (x, scale, sq, bad);
    0
}

/// One SGD step over `w.len()` parameters; `working` (if not null) receives the new weights rounded to `W`.
///
/// # Safety
/// `working`, if not null, is writable for `w.len()` elements and overlaps none of the slices; `m` is empty
/// when `s.momentum == 0`; the CPU has the features of `V`.
#[inline(always)]
unsafe fn sgd_body<W: Elem, const V: u8>(w: &mut [f32], g: &[f32], m: &mut [f32], working: *mut W, s: &SgdStep) {
    let n = w.len();
    let mut i = 0;
    while i < n {
        let len = CH.min(n - i);
        let (wc, gc) = (&mut w[i..i + len], &g[i..i + len]);
        if s.momentum == 0.0 {
            for (wi, gi) in wc.iter_mut().zip(gc) {
                let gv = *gi * s.grad_scale + s.weight_decay * *wi;
                *wi -= s.lr * gv;
            }
        } else {
            let mc = &mut m[i..i + len];
            for ((wi, gi), mi) in wc.iter_mut().zip(gc).zip(mc.iter_mut()) {
                let gv = *gi * s.grad_scale + s.weight_decay * *wi;
                let b = s.momentum * *mi + gv;
                *mi = b;
                let step = if s.nesterov { gv + s.momentum * b } else { b };
                *wi -= s.lr * step;
            }
        }
        if !working.is_null() {
            // SAFETY: i + len <= n; working does not overlap w (caller).
            unsafe { store::<W, V>(wc, working.add(i)) };
        }
        i += len;
    }
}

/// One AdamW step (see [`AdamWStep`]); `working` as for [`sgd_body`].
///
/// # Safety
/// As [`sgd_body`]; `m` and `v` hold `w.len()` elements.
#[inline(always)]
unsafe fn adamw_body<W: Elem, const V: u8>(
    w: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    working: *mut W,
    s: &AdamWStep,
) {
    let n = w.len();
    let step_size = s.lr / s.bias_correction1;
    let bc2_sqrt = s.bias_correction2.sqrt();
    let decay = 1.0 - s.lr * s.weight_decay;
    let (b1, b2) = (s.beta1, s.beta2);
    let (c1, c2) = (1.0 - s.beta1, 1.0 - s.beta2);
    let mut i = 0;
    while i < n {
        let len = CH.min(n - i);
        let (wc, gc, mc, vc) = (&mut w[i..i + len], &g[i..i + len], &mut m[i..i + len], &mut v[i..i + len]);
        for (((wi, gi), mi), vi) in wc.iter_mut().zip(gc).zip(mc.iter_mut()).zip(vc.iter_mut()) {
            let gv = *gi * s.grad_scale;
            let mn = b1 * *mi + c1 * gv;
            let vn = b2 * *vi + c2 * gv * gv;
            *mi = mn;
            *vi = vn;
            let denom = vn.sqrt() / bc2_sqrt + s.eps;
            *wi = *wi * decay - step_size * (mn / denom);
        }
        if !working.is_null() {
            // SAFETY: i + len <= n; working does not overlap w (caller).
            unsafe { store::<W, V>(wc, working.add(i)) };
        }
        i += len;
    }
}

multiversion!(
    /// # Safety
    /// As `grad_stats_body`.
    unsafe fn grad_stats<G: Elem>(g: *const G, n: usize, scale: f32) -> (usize, f64) => grad_stats_body
);
multiversion!(
    /// # Safety
    /// As `sgd_body`.
    unsafe fn sgd<W: Elem>(w: &mut [f32], g: &[f32], m: &mut [f32], working: *mut W, s: &SgdStep) => sgd_body
);
multiversion!(
    /// # Safety
    /// As `adamw_body`.
    unsafe fn adamw<W: Elem>(w: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], working: *mut W, s: &AdamWStep)
        => adamw_body
);
