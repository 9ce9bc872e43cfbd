//! Gradient statistics and the fused optimizer updates: one pass over master weights, gradients and state
//! that also writes the working copy (rounded to its dtype), so a mixed-precision update reads and writes
//! each vector once.
//!
//! The per-element arithmetic is the reference's, operation for operation (correctly rounded `sqrt` and `/`,
//! no FMA), so the updates are bit-exact with it.

use mantissa_core::backend::{AdamWStep, SgdStep};

use super::convert::{load, store};
use super::{multiversion, CH};
use crate::gemm::Elem;

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
    while i < n {
        let len = CH.min(n - i);
        // SAFETY: i + len <= n.
        unsafe { load::<G, V>(g.add(i), &mut buf[..len]) };
        // A short chunk (only the last) is padded with zeros, which add nothing.
        buf[len..len.next_multiple_of(8)].fill(0.0);
        for c in buf[..len.next_multiple_of(8)].chunks_exact(8) {
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
