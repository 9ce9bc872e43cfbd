//! Convolution and pooling data movement, bit-exact with the reference: im2col (copies and converts), col2im
//! (the same f32 sums in the same order), max-pooling and its backward (the same comparisons and roundings).
//! Every op works image by image, so the backend splits images over threads.
//!
//! im2col: `x: [images, C, H, W]` -> `cols: [images, C*K*K, OH*OW]`, zero padding. For each row `(c, ki, kj)`
//! of `cols` and output row `oh`, the valid output columns form one range, read from one input row: with
//! stride 1 a contiguous run (a vectorised load and store), otherwise every `stride`-th element.

use mantissa_core::backend::{ConvGeom, PoolGeom};

use super::convert::{load, store};
use super::{multiversion, CH};
use crate::gemm::{Elem, ElemKind};

/// # Safety
/// `x` readable for `images * g.in_len()` elements, `cols` writable for `images * g.col_rows() * g.col_cols()`,
/// not overlapping; the CPU has the features of `V`. Any geometry is safe: input rows and columns outside the
/// image are never read (they are the zero padding), as in the reference.
#[inline(always)]
unsafe fn im2col_body<X: Elem, C: Elem, const V: u8>(x: *const X, g: &ConvGeom, images: usize, cols: *mut C) {
    let (k, s, pad) = (g.kernel, g.stride, g.padding);
    let (ow_n, per) = (g.out_width, g.col_rows() * g.col_cols());
    if s == 1 && X::KIND == C::KIND {
        // SAFETY: forwarded; X and C are the same type.
        unsafe { im2col_same::<X>(x, g, images, cols as *mut X) };
        return;
    }
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

/// [`im2col_body`] with stride 1 and `cols` in the dtype of `x`: runs are copied as bits, not widened to f32
/// and rounded back (~40% of a bf16 CNN step went to that round trip on 28-element rows). The round trip is
/// the identity except on NaN, which the reference's f32 step quiets: [`copy_quieted`] sets the same bit.
///
/// # Safety
/// As [`im2col_body`], with `s == 1`.
#[inline(always)]
unsafe fn im2col_same<T: Elem>(x: *const T, g: &ConvGeom, images: usize, cols: *mut T) {
    let (k, pad, ow_n, w) = (g.kernel, g.padding, g.out_width, g.width);
    let per = g.col_rows() * g.col_cols();
    // Opaque to the optimiser, so that the short zero runs below stay inline stores instead of becoming
    // `memset` calls.
    let zero = core::hint::black_box(T::from_f32(0.0));
    for n in 0..images {
        let (xb, cb) = (n * g.in_len(), n * per);
        for c in 0..g.channels {
            for ki in 0..k {
                for kj in 0..k {
                    let r = (c * k + ki) * k + kj;
                    // Output columns whose input column `ow + kj - pad` lies in [0, W).
                    let lo = pad.saturating_sub(kj).min(ow_n);
                    let hi = (w + pad).saturating_sub(kj).clamp(lo, ow_n);
                    for oh in 0..g.out_height {
                        let ih = (oh + ki) as isize - pad as isize;
                        let dst = cb + r * g.col_cols() + oh * ow_n;
                        // SAFETY: dst + ow_n <= images * per; the copied run reads input columns
                        // lo + kj - pad .. hi + kj - pad of row ih, inside the image.
                        unsafe {
                            let d = cols.add(dst);
                            if ih < 0 || ih as usize >= g.height {
                                core::ptr::write_bytes(d, 0, ow_n);
                                continue;
                            }
                            // The padding columns (a few) as plain stores: a `memset` call per run cost
                            // more than the run.
                            (0..lo).for_each(|i| d.add(i).write(zero));
                            if lo < hi {
                                let src = x.add(xb + (c * g.height + ih as usize) * w + lo + kj - pad);
                                copy_quieted::<T>(src, d.add(lo), hi - lo);
                            }
                            (hi..ow_n).for_each(|i| d.add(i).write(zero));
                        }
                    }
                }
            }
        }
    }
}

/// Copies `n` elements of `T` as the reference's load-to-f32-and-store would: f32 as is, 16-bit values as
/// is except NaN, which gets its quiet bit (bf16 `0x0040`, f16 `0x0200`).
///
/// # Safety
/// `src` readable and `dst` writable for `n` elements, not overlapping.
#[inline(always)]
unsafe fn copy_quieted<T: Elem>(src: *const T, dst: *mut T, n: usize) {
    let (inf, quiet) = match T::KIND {
        ElemKind::F32 => {
            // SAFETY: forwarded.
            unsafe { core::ptr::copy_nonoverlapping(src, dst, n) };
            return;
        }
        ElemKind::Bf16 => (0x7f80u16, 0x0040u16),
        ElemKind::F16 => (0x7c00, 0x0200),
    };
    let (s, d) = (src as *const u16, dst as *mut u16);
    // Blocks of 16 (or 8) through fixed-size arrays, which LLVM turns into vector code (a plain loop stays
    // scalar: it cannot see that the raw source and destination do not overlap). The last block ends at n and
    // may overlap the one before: it rewrites the same values.
    // SAFETY (all blocks): T is a 16-bit type here; each block lies in 0..n (caller: readable / writable,
    // not overlapping).
    unsafe {
        match n {
            16.. => {
                (0..n - 15).step_by(16).for_each(|i| quiet_block::<16>(s.add(i), d.add(i), inf, quiet));
                quiet_block::<16>(s.add(n - 16), d.add(n - 16), inf, quiet);
            }
            8..=15 => {
                quiet_block::<8>(s, d, inf, quiet);
                quiet_block::<8>(s.add(n - 8), d.add(n - 8), inf, quiet);
            }
            _ => {
                for j in 0..n {
                    let h = s.add(j).read();
                    d.add(j).write(if h & 0x7fff > inf { h | quiet } else { h });
                }
            }
        }
    }
}

/// `L` 16-bit values from `s` to `d`, NaN (magnitude above `inf`) with `quiet` set.
///
/// # Safety
/// `s` readable and `d` writable for `L` u16, not overlapping.
#[inline(always)]
unsafe fn quiet_block<const L: usize>(s: *const u16, d: *mut u16, inf: u16, quiet: u16) {
    // SAFETY: L u16 each (caller).
    let v = unsafe { s.cast::<[u16; L]>().read_unaligned() };
    let v = v.map(|h| if h & 0x7fff > inf { h | quiet } else { h });
    // SAFETY: as above.
    unsafe { d.cast::<[u16; L]>().write_unaligned(v) };
}

/// col2im, the adjoint of im2col: `dx[c, ih, iw] = sum of cols[(c, ki, kj), oh, ow]` over the taps that read
/// that pixel, for `images` images, overwriting `dx`.
///
/// The reference sums each pixel in f32 from 0, over `ki` then `kj` (outer to inner), and stores it once. With
/// stride 1 the taps of one `(ki, kj)` read one contiguous run of a `cols` row for a run of pixels of an input
/// row, so an f32 row accumulator takes them as vector adds, in the same order per pixel; other strides run
/// the reference's per-pixel loop.
///
/// # Safety
/// `cols` readable for `images * g.col_rows() * g.col_cols()` elements, `dx` writable for
/// `images * g.in_len()`, not overlapping; `g.stride > 0`; the CPU has the features of `V`.
#[inline(always)]
unsafe fn col2im_body<C: Elem, X: Elem, const V: u8>(cols: *const C, g: &ConvGeom, images: usize, dx: *mut X) {
    let (k, s, pad) = (g.kernel, g.stride, g.padding);
    let (oh_n, ow_n, w) = (g.out_height, g.out_width, g.width);
    let per = g.col_rows() * g.col_cols();
    let (mut acc, mut buf) = ([0.0f32; CH], [0.0f32; CH]);
    for n in 0..images {
        let (xb, cb) = (n * g.in_len(), n * per);
        for c in 0..g.channels {
            for ih in 0..g.height {
                let dst = xb + (c * g.height + ih) * w;
                if s != 1 {
                    for iw in 0..w {
                        let mut sum = 0.0f32;
                        for ki in 0..k {
                            let oh_num = ih as isize + pad as isize - ki as isize;
                            if oh_num < 0 || !(oh_num as usize).is_multiple_of(s) || oh_num as usize / s >= oh_n {
                                continue;
                            }
                            let oh = oh_num as usize / s;
                            for kj in 0..k {
                                let ow_num = iw as isize + pad as isize - kj as isize;
                                if ow_num < 0 || !(ow_num as usize).is_multiple_of(s) || ow_num as usize / s >= ow_n {
                                    continue;
                                }
                                let r = (c * k + ki) * k + kj;
                                let mut v = 0.0f32;
                                // SAFETY: r < col_rows, oh < OH, ow < OW: inside image n's cols.
                                unsafe {
                                    let at = cb + r * g.col_cols() + oh * ow_n + ow_num as usize / s;
                                    load::<C, V>(cols.add(at), core::slice::from_mut(&mut v));
                                }
                                sum += v;
                            }
                        }
                        // SAFETY: dst + iw < images * in_len.
                        unsafe { store::<X, V>(&[sum], dx.add(dst + iw)) };
                    }
                    continue;
                }
                // Stride 1: pixel iw reads output column ow = iw + pad - kj for tap (ki, kj), oh = ih + pad - ki.
                let mut w0 = 0;
                while w0 < w {
                    let w1 = (w0 + CH).min(w);
                    let a = &mut acc[..w1 - w0];
                    a.fill(0.0);
                    for ki in 0..k {
                        let Some(oh) = (ih + pad).checked_sub(ki).filter(|&oh| oh < oh_n) else { continue };
                        for kj in 0..k {
                            // Pixels with 0 <= iw + pad - kj < OW, clipped to this chunk.
                            let lo = kj.saturating_sub(pad).clamp(w0, w1);
                            let hi = (ow_n + kj).saturating_sub(pad).clamp(lo, w1);
                            if lo == hi {
                                continue;
                            }
                            let r = (c * k + ki) * k + kj;
                            let src = cb + r * g.col_cols() + oh * ow_n + (lo + pad - kj);
                            let b = &mut buf[..hi - lo];
                            // SAFETY: output columns lo + pad - kj .. hi + pad - kj lie in [0, OW) of row oh.
                            unsafe { load::<C, V>(cols.add(src), b) };
                            for (s, v) in a[lo - w0..hi - w0].iter_mut().zip(b.iter()) {
                                *s += *v;
                            }
                        }
                    }
                    // SAFETY: dst + w1 <= images * in_len.
                    unsafe { store::<X, V>(a, dx.add(dst + w0)) };
                    w0 = w1;
                }
            }
        }
    }
}

/// Max-pooling of `images` images (`x: [images, C, H, W]` -> `y: [images, C, OH, OW]`), each maximum's index
/// within its image in `argmax`; the reference's comparisons (ties keep the first, NaN propagates), output
/// rows stored through one chunk.
///
/// # Safety
/// `x` readable for `images * g.in_len()`, `y` and `argmax` writable for `images * g.out_len()`, none
/// overlapping; every window lies inside the input (the backend checks); the CPU has the features of `V`.
#[inline(always)]
unsafe fn maxpool_body<X: Elem, Y: Elem, const V: u8>(
    x: *const X,
    g: &PoolGeom,
    images: usize,
    y: *mut Y,
    argmax: *mut i32,
) {
    let (k, s, w, ow_n) = (g.kernel, g.stride, g.width, g.out_width);
    // Output columns per block: their windows' input columns fit one chunk of each input row.
    let per_block = if k <= CH { ((CH - k) / s + 1).min(CH) } else { 0 };
    if per_block == 0 {
        // SAFETY: forwarded.
        unsafe { maxpool_scalar::<X, Y, V>(x, g, images, y, argmax) };
        return;
    }
    let (mut r, mut best, mut besti) = ([0.0f32; CH], [0.0f32; CH], [0i32; CH]);
    for n in 0..images {
        let xi = n * g.in_len();
        for c in 0..g.channels {
            for oh in 0..g.out_height {
                let o_row = n * g.out_len() + (c * g.out_height + oh) * ow_n;
                let mut o0 = 0;
                while o0 < ow_n {
                    let o1 = (o0 + per_block).min(ow_n);
                    let (m, col0) = (o1 - o0, o0 * s);
                    let span = (m - 1) * s + k;
                    best[..m].fill(f32::NEG_INFINITY);
                    for (o, bi) in besti[..m].iter_mut().enumerate() {
                        *bi = ((c * g.height + oh * s) * w + col0 + o * s) as i32;
                    }
                    for ki in 0..k {
                        let row = (c * g.height + oh * s + ki) * w;
                        let r = &mut r[..span];
                        // SAFETY: input columns col0..col0 + span of row oh * s + ki lie inside image n (windows
                        // inside the input, caller).
                        unsafe { load::<X, V>(x.add(xi + row + col0), r) };
                        // The reference's order: taps (ki, kj) in turn; strictly greater or NaN replaces the
                        // best unless it is NaN already (ties keep the first, NaN propagates).
                        for kj in 0..k {
                            let base = (row + col0 + kj) as i32;
                            for o in 0..m {
                                let v = r[o * s + kj];
                                let b = best[o];
                                let take = (v > b || v.is_nan()) && !b.is_nan();
                                best[o] = if take { v } else { b };
                                besti[o] = if take { base + (o * s) as i32 } else { besti[o] };
                            }
                        }
                    }
                    // SAFETY: o_row + o1 <= images * out_len.
                    unsafe {
                        store::<Y, V>(&best[..m], y.add(o_row + o0));
                        core::ptr::copy_nonoverlapping(besti.as_ptr(), argmax.add(o_row + o0), m);
                    }
                    o0 = o1;
                }
            }
        }
    }
}

/// The reference's loop for windows wider than a chunk.
///
/// # Safety
/// As [`maxpool_body`].
#[inline(always)]
unsafe fn maxpool_scalar<X: Elem, Y: Elem, const V: u8>(
    x: *const X,
    g: &PoolGeom,
    images: usize,
    y: *mut Y,
    argmax: *mut i32,
) {
    let (k, s, w, ow_n) = (g.kernel, g.stride, g.width, g.out_width);
    for n in 0..images {
        let xi = n * g.in_len();
        for c in 0..g.channels {
            for oh in 0..g.out_height {
                for ow in 0..ow_n {
                    let mut b = f32::NEG_INFINITY;
                    let mut bi = (c * g.height + oh * s) * w + ow * s;
                    for ki in 0..k {
                        let row = (c * g.height + oh * s + ki) * w + ow * s;
                        for kj in 0..k {
                            let mut v = 0.0f32;
                            // SAFETY: the window lies inside image n (caller).
                            unsafe { load::<X, V>(x.add(xi + row + kj), core::slice::from_mut(&mut v)) };
                            if (v > b || v.is_nan()) && !b.is_nan() {
                                b = v;
                                bi = row + kj;
                            }
                        }
                    }
                    let o = n * g.out_len() + (c * g.out_height + oh) * ow_n + ow;
                    // SAFETY: o < images * out_len.
                    unsafe {
                        store::<Y, V>(&[b], y.add(o));
                        argmax.add(o).write(bi as i32);
                    }
                }
            }
        }
    }
}

/// The backward of max-pooling for `images` images: `dx` (overwritten) is zero except at the recorded
/// positions, which receive their outputs' gradients in output order, each addition rounded to `X` as the
/// reference does.
///
/// # Safety
/// `dy` and `argmax` readable for `images * g.out_len()`, `dx` writable for `images * g.in_len()`, none
/// overlapping; every `argmax` entry is in `0..g.in_len()` (the backend checks); the CPU has the features of
/// `V`.
#[inline(always)]
unsafe fn maxpool_backward_body<D: Elem, X: Elem, const V: u8>(
    dy: *const D,
    argmax: *const i32,
    g: &PoolGeom,
    images: usize,
    dx: *mut X,
) {
    let zeros = [0.0f32; CH];
    let mut d = [0.0f32; CH];
    let (in_len, out_len) = (g.in_len(), g.out_len());
    for n in 0..images {
        let xi = n * in_len;
        let mut i = 0;
        while i < in_len {
            let len = CH.min(in_len - i);
            // SAFETY: xi + i + len <= images * in_len.
            unsafe { store::<X, V>(&zeros[..len], dx.add(xi + i)) };
            i += len;
        }
        let mut o0 = 0;
        while o0 < out_len {
            let len = CH.min(out_len - o0);
            // SAFETY: n * out_len + o0 + len <= images * out_len.
            unsafe { load::<D, V>(dy.add(n * out_len + o0), &mut d[..len]) };
            for (j, dv) in d[..len].iter().enumerate() {
                // SAFETY: the index is in 0..in_len (caller), so the element is inside image n.
                unsafe {
                    let at = dx.add(xi + argmax.add(n * out_len + o0 + j).read() as usize);
                    let mut v = 0.0f32;
                    load::<X, V>(at, core::slice::from_mut(&mut v));
                    store::<X, V>(&[v + *dv], at);
                }
            }
            o0 += len;
        }
    }
}

multiversion!(
    /// # Safety
    /// As `col2im_body`.
    unsafe fn col2im<C: Elem, X: Elem>(cols: *const C, g: &ConvGeom, images: usize, dx: *mut X) => col2im_body
);
multiversion!(
    /// # Safety
    /// As `maxpool_body`.
    unsafe fn maxpool<X: Elem, Y: Elem>(x: *const X, g: &PoolGeom, images: usize, y: *mut Y, argmax: *mut i32)
        => maxpool_body
);
multiversion!(
    /// # Safety
    /// As `maxpool_backward_body`.
    unsafe fn maxpool_backward<D: Elem, X: Elem>(
        dy: *const D, argmax: *const i32, g: &PoolGeom, images: usize, dx: *mut X,
    ) => maxpool_backward_body
);
multiversion!(
    /// # Safety
    /// As `im2col_body`.
    unsafe fn im2col<X: Elem, C: Elem>(x: *const X, g: &ConvGeom, images: usize, cols: *mut C) => im2col_body
);
