//! Convolution data movement: im2col (bit-exact with the reference: it only copies and converts).
//!
//! `x: [images, C, H, W]` -> `cols: [images, C*K*K, OH*OW]`, zero padding. For each row `(c, ki, kj)` of
//! `cols` and output row `oh`, the valid output columns form one range, read from one input row: with stride 1
//! a contiguous run (a vectorised load and store), otherwise every `stride`-th element.

use mantissa_core::backend::ConvGeom;

use super::convert::{load, store};
use super::{multiversion, CH};
use crate::gemm::Elem;

/// # Safety
/// `x` readable for `images * g.in_len()` elements, `cols` writable for `images * g.col_rows() * g.col_cols()`,
/// not overlapping; the CPU has the features of `V`. Any geometry is safe: input rows and columns outside the
/// image are never read (they are the zero padding), as in the reference.
#[inline(always)]
unsafe fn im2col_body<X: Elem, C: Elem, const V: u8>(x: *const X, g: &ConvGeom, images: usize, cols: *mut C) {
    let (k, s, pad) = (g.kernel, g.stride, g.padding);
    let (ow_n, per) = (g.out_width, g.col_rows() * g.col_cols());
    let mut buf = [0.0f32; CH];
    for n in 0..images {
        let (xb, cb) = (n * g.in_len(), n * per);
        for c in 0..g.channels {
            for ki in 0..k {
                for kj in 0..k {
                    let r = (c * k + ki) * k + kj;
                    // Output columns whose input column `ow * s + kj - pad` lies in [0, W).
                    let lo = pad.saturating_sub(kj).div_ceil(s).min(ow_n);
                    let hi = (g.width + pad).saturating_sub(kj).div_ceil(s).clamp(lo, ow_n);
                    for oh in 0..g.out_height {
                        let ih = (oh * s + ki) as isize - pad as isize;
                        let inside_row = ih >= 0 && (ih as usize) < g.height;
                        let dst = cb + r * g.col_cols() + oh * ow_n;
                        let src_row = xb + (c * g.height + ih.max(0) as usize) * g.width;
                        let mut o0 = 0;
                        while o0 < ow_n {
                            let o1 = (o0 + CH).min(ow_n);
                            let chunk = &mut buf[..o1 - o0];
                            chunk.fill(0.0);
                            let (a, b) = (lo.clamp(o0, o1), hi.clamp(o0, o1));
                            if inside_row && a < b {
                                let iw0 = a * s + kj - pad;
                                if s == 1 {
                                    // SAFETY: input columns iw0..iw0 + (b - a) lie in row ih of image n.
                                    unsafe { load::<X, V>(x.add(src_row + iw0), &mut chunk[a - o0..b - o0]) };
                                } else {
                                    for (j, v) in chunk[a - o0..b - o0].iter_mut().enumerate() {
                                        // SAFETY: column iw0 + j * s < W (j < b - a).
                                        unsafe { load::<X, V>(x.add(src_row + iw0 + j * s), core::slice::from_mut(v)) };
                                    }
                                }
                            }
                            // SAFETY: dst + o1 <= images * per.
                            unsafe { store::<C, V>(chunk, cols.add(dst + o0)) };
                            o0 = o1;
                        }
                    }
                }
            }
        }
    }
}

multiversion!(
    /// # Safety
    /// As `im2col_body`.
    unsafe fn im2col<X: Elem, C: Elem>(x: *const X, g: &ConvGeom, images: usize, cols: *mut C) => im2col_body
);
