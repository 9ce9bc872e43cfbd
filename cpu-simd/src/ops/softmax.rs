//! The loss head: softmax cross-entropy over `logits: [rows, classes]`, computed in f32.
//!
//! Per row, in the reference's order: the max, the sum of `exp(l - max)` (summed left to right), the loss
//! term `log(sum) + max - l[label]`, then `dlogits = (exp(l - max) / sum - onehot) * grad_scale / rows`. Only
//! `exp` differs from the reference (the vector [`exp`], within 2 ulp of `libm::expf`).

use super::convert::{load, store};
use super::elementwise::exp;
use super::{multiversion, CH};
use crate::gemm::Elem;

/// Returns the sum over rows of the loss terms (the caller divides by `rows`).
///
/// # Safety
/// `logits` readable and `dlogits` writable for `rows * classes` elements, not overlapping; `labels` readable
/// for `rows` and each in `0..classes`; the CPU has the features of `V`.
#[inline(always)]
unsafe fn softmax_xent_body<L: Elem, D: Elem, const V: u8>(
    logits: *const L,
    labels: *const i32,
    rows: usize,
    classes: usize,
    dlogits: *mut D,
    grad_scale: f32,
) -> f32 {
    let inv_rows = 1.0 / rows.max(1) as f32;
    let g = grad_scale * inv_rows;
    let (mut lb, mut eb) = ([0.0f32; CH], [0.0f32; CH]);
    let mut total = 0.0f32;
    for r in 0..rows {
        let row = r * classes;
        // SAFETY: r < rows; the label was validated by the caller.
        let label = unsafe { labels.add(r).read() } as usize;
        // Rows of up to CH classes (every model here) are loaded once; longer rows are re-read per pass.
        let mut max = f32::NEG_INFINITY;
        let mut j = 0;
        while j < classes {
            let len = CH.min(classes - j);
            // SAFETY (all loads and stores of this row): row + j + len <= rows * classes.
            unsafe { load::<L, V>(logits.add(row + j), &mut lb[..len]) };
            max = lb[..len].iter().fold(max, |m, &v| m.max(v));
            j += len;
        }
        let mut sum = 0.0f32;
        j = 0;
        while j < classes {
            let len = CH.min(classes - j);
            if classes > CH {
                unsafe { load::<L, V>(logits.add(row + j), &mut lb[..len]) };
            }
            for (e, &v) in eb[..len].iter_mut().zip(&lb[..len]) {
                *e = exp(v - max);
            }
            sum = eb[..len].iter().fold(sum, |s, &e| s + e);
            j += len;
        }
        let mut at_label = [0.0f32];
        unsafe { load::<L, V>(logits.add(row + label), &mut at_label) };
        total += libm::logf(sum) + max - at_label[0];
        j = 0;
        while j < classes {
            let len = CH.min(classes - j);
            if classes > CH {
                unsafe { load::<L, V>(logits.add(row + j), &mut lb[..len]) };
                for (e, &v) in eb[..len].iter_mut().zip(&lb[..len]) {
                    *e = exp(v - max);
                }
            }
            for e in &mut eb[..len] {
                *e = *e / sum * g;
            }
            // (p - 1) * g, not p * g - g: the reference's rounding.
            if (j..j + len).contains(&label) {
                let p = exp(lb[label - j] - max) / sum;
                eb[label - j] = (p - 1.0) * g;
            }
            unsafe { store::<D, V>(&eb[..len], dlogits.add(row + j)) };
            j += len;
        }
    }
    total
}

multiversion!(
    /// # Safety
    /// As `softmax_xent_body`.
    unsafe fn softmax_xent<L: Elem, D: Elem>(
        logits: *const L,
        labels: *const i32,
        rows: usize,
        classes: usize,
        dlogits: *mut D,
        grad_scale: f32,
    ) -> f32 => softmax_xent_body
);
