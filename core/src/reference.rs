//! The scalar reference backend: plain loops over a caller-provided byte buffer, the same results on a
//! Cortex-M4 and an x86 server (no FMA contraction, fixed summation order). Every other backend is tested
//! against it, and it is the fallback where nothing faster exists.

use core::marker::PhantomData;

use half::{bf16, f16};

use crate::arena::{Buf, ALIGN};
use crate::backend::{
    validate_softmax_cross_entropy, Activation, AdamWStep, Backend, Capabilities, ConvGeom, Gemm, GradStats, ParamBufs,
    PoolGeom, SgdStep,
};
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};

/// Runs `$body` with `$T` bound to the element type of float dtype `$dt`.
macro_rules! with_float {
    ($dt:expr, $what:expr, $T:ident => $body:expr) => {
        match $dt {
            DType::F32 => {
                type $T = f32;
                $body
            }
            DType::F16 => {
                type $T = f16;
                $body
            }
            DType::BF16 => {
                type $T = bf16;
                $body
            }
            DType::I32 => return Err(Error::UnsupportedDType { what: $what, dtype: DType::I32 }),
        }
    };
}

/// The scalar reference backend over a borrowed buffer.
#[derive(Debug)]
pub struct Reference<'a> {
    base: *mut u8,
    capacity: usize,
    device: &'static str,
    _buf: PhantomData<&'a mut [u8]>,
}

// SAFETY: `Reference` is the unique owner of the borrowed buffer for `'a` (it holds the `&mut`'s lifetime);
// moving it to another thread moves that exclusive access with it.
unsafe impl Send for Reference<'_> {}

impl<'a> Reference<'a> {
    /// Takes the whole buffer as the arena. Its start is rounded up to a 64-byte boundary; the bytes before
    /// that are not used (none when the buffer is aligned, as [`crate`]'s `HostBuffer` and a
    /// `#[repr(align(64))]` static are).
    pub fn new(buf: &'a mut [u8]) -> Self {
        let pad = buf.as_ptr().align_offset(ALIGN).min(buf.len());
        let capacity = buf.len() - pad;
        // SAFETY: `pad <= buf.len()`, so the pointer stays within (or one past the end of) the buffer.
        let base = unsafe { buf.as_mut_ptr().add(pad) };
        Reference { base, capacity, device: "CPU (scalar)", _buf: PhantomData }
    }

    /// Names the hardware in [`Capabilities::device`] (for reports).
    pub fn with_device_name(mut self, device: &'static str) -> Self {
        self.device = device;
        self
    }

    fn check(&self, b: Buf, what: &'static str) -> Result<()> {
        b.check_in(self.capacity, what)
    }

    fn check_len(b: Buf, len: usize, what: &'static str) -> Result<()> {
        b.check_len(len, what)
    }

    fn ptr<T>(&self, b: Buf) -> *mut T {
        // SAFETY (of the callers' later dereferences): `check` has verified `b` lies within the arena and is
        // aligned for its element size, and the arena start is 64-byte aligned.
        unsafe { self.base.add(b.offset) as *mut T }
    }

    /// Read-only typed view of a checked buffer.
    fn view<T: Element>(&self, b: Buf) -> Src<T> {
        Src(self.ptr::<T>(b))
    }

    fn view_mut<T: Element>(&self, b: Buf) -> Dst<T> {
        Dst(self.ptr::<T>(b))
    }
}

/// Raw element access. Raw pointers (not slices) because some ops work in place, where a `&[T]` and a
/// `&mut [T]` over the same bytes would be undefined behaviour.
#[derive(Clone, Copy)]
struct Src<T>(*const T);
#[derive(Clone, Copy)]
struct Dst<T>(*mut T);

impl<T: Element> Src<T> {
    /// # Safety
    /// `i` is within the buffer the view was made from (validated by the op before the loop).
    #[inline(always)]
    unsafe fn get(self, i: usize) -> f32 {
        unsafe { self.0.add(i).read().to_f32() }
    }
}

impl<T: Element> Dst<T> {
    /// # Safety
    /// As for [`Src::get`].
    #[inline(always)]
    unsafe fn get(self, i: usize) -> f32 {
        unsafe { self.0.add(i).read().to_f32() }
    }
    /// # Safety
    /// As for [`Src::get`].
    #[inline(always)]
    unsafe fn set(self, i: usize, v: f32) {
        unsafe { self.0.add(i).write(T::from_f32(v)) }
    }
}

impl Backend for Reference<'_> {
    fn capabilities(&self) -> Capabilities {
        Capabilities { backend: "reference", device: self.device, fast_f16: false, fast_bf16: false }
    }

    fn capacity(&self) -> usize {
        self.capacity
    }

    fn upload(&mut self, dst: Buf, src: &[f32]) -> Result<()> {
        self.check(dst, "upload")?;
        if src.len() != dst.len {
            return Err(Error::ShapeMismatch { what: "upload", expected: dst.len, got: src.len() });
        }
        with_float!(dst.dtype, "upload", T => {
            let d = self.view_mut::<T>(dst);
            for (i, &x) in src.iter().enumerate() {
                // SAFETY: i < dst.len, checked above.
                unsafe { d.set(i, x) };
            }
        });
        Ok(())
    }

    fn upload_i32(&mut self, dst: Buf, src: &[i32]) -> Result<()> {
        self.check(dst, "upload_i32")?;
        if dst.dtype != DType::I32 {
            return Err(Error::UnsupportedDType { what: "upload_i32", dtype: dst.dtype });
        }
        if src.len() != dst.len {
            return Err(Error::ShapeMismatch { what: "upload_i32", expected: dst.len, got: src.len() });
        }
        let d = self.ptr::<i32>(dst);
        for (i, &x) in src.iter().enumerate() {
            // SAFETY: i < dst.len, checked above.
            unsafe { d.add(i).write(x) };
        }
        Ok(())
    }

    fn download(&mut self, src: Buf, dst: &mut [f32]) -> Result<()> {
        self.check(src, "download")?;
        if dst.len() != src.len {
            return Err(Error::ShapeMismatch { what: "download", expected: src.len, got: dst.len() });
        }
        if src.dtype == DType::I32 {
            let s = self.ptr::<i32>(src);
            for (i, d) in dst.iter_mut().enumerate() {
                // SAFETY: i < src.len.
                *d = unsafe { s.add(i).read() } as f32;
            }
            return Ok(());
        }
        with_float!(src.dtype, "download", T => {
            let s = self.view::<T>(src);
            for (i, d) in dst.iter_mut().enumerate() {
                // SAFETY: i < src.len.
                *d = unsafe { s.get(i) };
            }
        });
        Ok(())
    }

    fn download_bytes(&mut self, src: Buf, dst: &mut [u8]) -> Result<()> {
        self.check(src, "download_bytes")?;
        if dst.len() != src.bytes() {
            return Err(Error::ShapeMismatch { what: "download_bytes", expected: src.bytes(), got: dst.len() });
        }
        let s = self.ptr::<u8>(src);
        // SAFETY: `src` is checked to lie in the arena; `dst` is a distinct Rust slice of the same length.
        unsafe { core::ptr::copy_nonoverlapping(s, dst.as_mut_ptr(), dst.len()) };
        if cfg!(target_endian = "big") {
            swap_bytes(dst, src.dtype.size());
        }
        Ok(())
    }

    fn upload_bytes(&mut self, dst: Buf, src: &[u8]) -> Result<()> {
        self.check(dst, "upload_bytes")?;
        if src.len() != dst.bytes() {
            return Err(Error::ShapeMismatch { what: "upload_bytes", expected: dst.bytes(), got: src.len() });
        }
        let d = self.ptr::<u8>(dst);
        // SAFETY: as in `download_bytes`.
        unsafe { core::ptr::copy_nonoverlapping(src.as_ptr(), d, src.len()) };
        if cfg!(target_endian = "big") {
            // SAFETY: `d` covers exactly `src.len()` bytes of the arena, exclusively ours.
            swap_bytes(unsafe { core::slice::from_raw_parts_mut(d, src.len()) }, dst.dtype.size());
        }
        Ok(())
    }

    fn fill(&mut self, dst: Buf, value: f32) -> Result<()> {
        self.check(dst, "fill")?;
        if dst.dtype == DType::I32 {
            let d = self.ptr::<i32>(dst);
            for i in 0..dst.len {
                // SAFETY: i < dst.len.
                unsafe { d.add(i).write(value as i32) };
            }
            return Ok(());
        }
        with_float!(dst.dtype, "fill", T => {
            let d = self.view_mut::<T>(dst);
            for i in 0..dst.len {
                // SAFETY: i < dst.len.
                unsafe { d.set(i, value) };
            }
        });
        Ok(())
    }

    fn cast(&mut self, src: Buf, dst: Buf) -> Result<()> {
        self.check(src, "cast")?;
        self.check(dst, "cast")?;
        Self::check_len(dst, src.len, "cast")?;
        with_float!(src.dtype, "cast", S => with_float!(dst.dtype, "cast", D => {
            let s = self.view::<S>(src);
            let d = self.view_mut::<D>(dst);
            for i in 0..src.len {
                // SAFETY: i < src.len <= dst.len.
                unsafe { d.set(i, s.get(i)) };
            }
        }));
        Ok(())
    }

    fn gemm(&mut self, g: &Gemm) -> Result<()> {
        g.validate(self.capacity)?;
        with_float!(g.a.dtype, "gemm A", A => with_float!(g.c.dtype, "gemm C", C => {
            let (a, b, c) = (self.view::<A>(g.a), self.view::<A>(g.b), self.view_mut::<C>(g.c));
            // SAFETY: the extents of all three operands were checked against their buffers above.
            unsafe { gemm_typed(g, a, b, c) };
        }));
        Ok(())
    }

    fn add_bias(&mut self, y: Buf, bias: Buf, outer: usize, channels: usize, inner: usize) -> Result<()> {
        self.check(y, "add_bias y")?;
        self.check(bias, "add_bias bias")?;
        Self::check_len(y, outer * channels * inner, "add_bias y")?;
        Self::check_len(bias, channels, "add_bias bias")?;
        with_float!(y.dtype, "add_bias", Y => with_float!(bias.dtype, "add_bias", B => {
            let (yv, bv) = (self.view_mut::<Y>(y), self.view::<B>(bias));
            for o in 0..outer {
                for c in 0..channels {
                    // SAFETY: c < channels <= bias.len; indices below < outer*channels*inner <= y.len.
                    let bc = unsafe { bv.get(c) };
                    let row = (o * channels + c) * inner;
                    for i in row..row + inner {
                        unsafe { yv.set(i, yv.get(i) + bc) };
                    }
                }
            }
        }));
        Ok(())
    }

    fn bias_grad(&mut self, dy: Buf, dbias: Buf, outer: usize, channels: usize, inner: usize) -> Result<()> {
        self.check(dy, "bias_grad dy")?;
        self.check(dbias, "bias_grad dbias")?;
        Self::check_len(dy, outer * channels * inner, "bias_grad dy")?;
        Self::check_len(dbias, channels, "bias_grad dbias")?;
        with_float!(dy.dtype, "bias_grad", Y => with_float!(dbias.dtype, "bias_grad", B => {
            let (dyv, dbv) = (self.view::<Y>(dy), self.view_mut::<B>(dbias));
            for c in 0..channels {
                let mut acc = 0.0f32;
                for o in 0..outer {
                    let row = (o * channels + c) * inner;
                    for i in row..row + inner {
                        // SAFETY: i < outer*channels*inner <= dy.len.
                        acc += unsafe { dyv.get(i) };
                    }
                }
                // SAFETY: c < channels <= dbias.len.
                unsafe { dbv.set(c, acc) };
            }
        }));
        Ok(())
    }

    fn activation(&mut self, act: Activation, x: Buf, y: Buf) -> Result<()> {
        self.check(x, "activation x")?;
        self.check(y, "activation y")?;
        Self::check_len(y, x.len, "activation y")?;
        with_float!(x.dtype, "activation", X => with_float!(y.dtype, "activation", Y => {
            let (xv, yv) = (self.view::<X>(x), self.view_mut::<Y>(y));
            for i in 0..x.len {
                // SAFETY: i < x.len <= y.len; element i is read before it is written (in-place safe).
                unsafe { yv.set(i, act_forward(act, xv.get(i))) };
            }
        }));
        Ok(())
    }

    fn activation_backward(&mut self, act: Activation, x: Buf, dy: Buf, dx: Buf) -> Result<()> {
        self.check(x, "activation_backward x")?;
        self.check(dy, "activation_backward dy")?;
        self.check(dx, "activation_backward dx")?;
        Self::check_len(dy, x.len, "activation_backward dy")?;
        Self::check_len(dx, x.len, "activation_backward dx")?;
        if dx.dtype != dy.dtype {
            // dx is written with dy's element type below.
            return Err(Error::UnsupportedDType { what: "activation_backward dx (must match dy)", dtype: dx.dtype });
        }
        with_float!(x.dtype, "activation_backward", X => with_float!(dy.dtype, "activation_backward", D => {
            let (xv, dyv, dxv) = (self.view::<X>(x), self.view::<D>(dy), self.view_mut::<D>(dx));
            for i in 0..x.len {
                // SAFETY: i < x.len <= dy.len, dx.len; element i is read before it is written.
                unsafe { dxv.set(i, dyv.get(i) * act_derivative(act, xv.get(i))) };
            }
        }));
        Ok(())
    }

    fn softmax_cross_entropy(
        &mut self,
        logits: Buf,
        labels: Buf,
        rows: usize,
        classes: usize,
        loss: Buf,
        dlogits: Buf,
        grad_scale: f32,
    ) -> Result<()> {
        validate_softmax_cross_entropy(self.capacity, logits, labels, rows, classes, loss, dlogits)?;
        let lab = self.ptr::<i32>(labels);
        for r in 0..rows {
            // SAFETY: r < rows <= labels.len.
            let l = unsafe { lab.add(r).read() };
            if l < 0 || l as usize >= classes {
                return Err(Error::LabelOutOfRange { label: l, classes });
            }
        }
        let inv_rows = 1.0 / rows.max(1) as f32;
        let mut total = 0.0f32;
        with_float!(logits.dtype, "softmax_cross_entropy", L => with_float!(dlogits.dtype, "softmax_cross_entropy", D => {
            let (lv, dv) = (self.view::<L>(logits), self.view_mut::<D>(dlogits));
            for r in 0..rows {
                let row = r * classes;
                // SAFETY (all accesses in this loop): indices are < rows*classes, checked above.
                let label = unsafe { lab.add(r).read() } as usize;
                let mut max = f32::NEG_INFINITY;
                for j in 0..classes {
                    max = max.max(unsafe { lv.get(row + j) });
                }
                let mut sum = 0.0f32;
                for j in 0..classes {
                    sum += libm::expf(unsafe { lv.get(row + j) } - max);
                }
                let log_sum = libm::logf(sum);
                total += log_sum + max - unsafe { lv.get(row + label) };
                let g = grad_scale * inv_rows;
                for j in 0..classes {
                    let p = libm::expf(unsafe { lv.get(row + j) } - max) / sum;
                    let onehot = if j == label { 1.0 } else { 0.0 };
                    unsafe { dv.set(row + j, (p - onehot) * g) };
                }
            }
        }));
        // SAFETY: loss is a checked F32 buffer of at least one element.
        unsafe { self.ptr::<f32>(loss).write(total * inv_rows) };
        Ok(())
    }

    fn im2col(&mut self, x: Buf, g: &ConvGeom, images: usize, cols: Buf) -> Result<()> {
        self.check(x, "im2col x")?;
        self.check(cols, "im2col cols")?;
        Self::check_len(x, images * g.in_len(), "im2col x")?;
        let per = g.col_rows() * g.col_cols();
        Self::check_len(cols, images * per, "im2col cols")?;
        with_float!(x.dtype, "im2col", X => with_float!(cols.dtype, "im2col", C => {
            let (xv, cv) = (self.view::<X>(x), self.view_mut::<C>(cols));
            for n in 0..images {
                let (xb, cb) = (n * g.in_len(), n * per);
                for c in 0..g.channels {
                    for ki in 0..g.kernel {
                        for kj in 0..g.kernel {
                            let r = (c * g.kernel + ki) * g.kernel + kj;
                            for oh in 0..g.out_height {
                                for ow in 0..g.out_width {
                                    let ih = (oh * g.stride + ki) as isize - g.padding as isize;
                                    let iw = (ow * g.stride + kj) as isize - g.padding as isize;
                                    let inside = ih >= 0 && iw >= 0 && (ih as usize) < g.height && (iw as usize) < g.width;
                                    // SAFETY: source index < images*in_len, destination < images*per (checked).
                                    let v = if inside {
                                        unsafe { xv.get(xb + (c * g.height + ih as usize) * g.width + iw as usize) }
                                    } else {
                                        0.0
                                    };
                                    unsafe { cv.set(cb + r * g.col_cols() + oh * g.out_width + ow, v) };
                                }
                            }
                        }
                    }
                }
            }
        }));
        Ok(())
    }

    fn col2im(&mut self, cols: Buf, g: &ConvGeom, images: usize, dx: Buf) -> Result<()> {
        self.check(cols, "col2im cols")?;
        self.check(dx, "col2im dx")?;
        let per = g.col_rows() * g.col_cols();
        Self::check_len(cols, images * per, "col2im cols")?;
        Self::check_len(dx, images * g.in_len(), "col2im dx")?;
        if cols.overlaps(&dx) {
            return Err(Error::InvalidConfig("col2im: dx overlaps cols"));
        }
        with_float!(cols.dtype, "col2im", C => with_float!(dx.dtype, "col2im", X => {
            let (cv, xv) = (self.view::<C>(cols), self.view_mut::<X>(dx));
            for n in 0..images {
                let (xb, cb) = (n * g.in_len(), n * per);
                // Accumulate each input pixel in f32 over every (kernel tap, output) that read it, in a fixed
                // order, then store once: storing partial sums in a 16-bit dtype would round repeatedly.
                for c in 0..g.channels {
                    for ih in 0..g.height {
                        for iw in 0..g.width {
                            let mut acc = 0.0f32;
                            for ki in 0..g.kernel {
                                let oh_num = ih as isize + g.padding as isize - ki as isize;
                                if oh_num < 0 || oh_num as usize % g.stride != 0 {
                                    continue;
                                }
                                let oh = oh_num as usize / g.stride;
                                if oh >= g.out_height {
                                    continue;
                                }
                                for kj in 0..g.kernel {
                                    let ow_num = iw as isize + g.padding as isize - kj as isize;
                                    if ow_num < 0 || ow_num as usize % g.stride != 0 {
                                        continue;
                                    }
                                    let ow = ow_num as usize / g.stride;
                                    if ow >= g.out_width {
                                        continue;
                                    }
                                    let r = (c * g.kernel + ki) * g.kernel + kj;
                                    // SAFETY: index < images*per (checked).
                                    acc += unsafe { cv.get(cb + r * g.col_cols() + oh * g.out_width + ow) };
                                }
                            }
                            // SAFETY: index < images*in_len (checked).
                            unsafe { xv.set(xb + (c * g.height + ih) * g.width + iw, acc) };
                        }
                    }
                }
            }
        }));
        Ok(())
    }

    fn maxpool(&mut self, x: Buf, g: &PoolGeom, images: usize, y: Buf, argmax: Buf) -> Result<()> {
        // Every window lies inside the image: the loop below indexes by the geometry alone.
        g.validate_forward(self.capacity, x, y, argmax, images)?;
        let am = self.ptr::<i32>(argmax);
        with_float!(x.dtype, "maxpool", X => with_float!(y.dtype, "maxpool", Y => {
            let (xv, yv) = (self.view::<X>(x), self.view_mut::<Y>(y));
            for n in 0..images {
                for c in 0..g.channels {
                    for oh in 0..g.out_height {
                        for ow in 0..g.out_width {
                            let mut best = f32::NEG_INFINITY;
                            let mut best_i = (c * g.height + oh * g.stride) * g.width + ow * g.stride;
                            for ki in 0..g.kernel {
                                for kj in 0..g.kernel {
                                    let i = (c * g.height + oh * g.stride + ki) * g.width + ow * g.stride + kj;
                                    // SAFETY: i < in_len for a valid geometry (checked by the layer).
                                    let v = unsafe { xv.get(n * g.in_len() + i) };
                                    // Strictly greater, or NaN (propagated like PyTorch); ties keep the first.
                                    if (v > best || v.is_nan()) && !best.is_nan() {
                                        best = v;
                                        best_i = i;
                                    }
                                }
                            }
                            let o = n * g.out_len() + (c * g.out_height + oh) * g.out_width + ow;
                            // SAFETY: o < images*out_len (checked).
                            unsafe {
                                yv.set(o, best);
                                am.add(o).write(best_i as i32);
                            }
                        }
                    }
                }
            }
        }));
        Ok(())
    }

    fn maxpool_backward(&mut self, dy: Buf, argmax: Buf, g: &PoolGeom, images: usize, dx: Buf) -> Result<()> {
        g.validate_backward(self.capacity, dy, argmax, dx, images)?;
        self.fill(dx.prefix(images * g.in_len()), 0.0)?;
        let am = self.ptr::<i32>(argmax);
        with_float!(dy.dtype, "maxpool_backward", D => with_float!(dx.dtype, "maxpool_backward", X => {
            let (dyv, dxv) = (self.view::<D>(dy), self.view_mut::<X>(dx));
            for n in 0..images {
                for o in 0..g.out_len() {
                    // SAFETY: o-indices < images*out_len; the recorded index is < in_len (written by maxpool,
                    // and clamped here so a corrupted argmax cannot write outside the image).
                    let src = unsafe { am.add(n * g.out_len() + o).read() } as usize;
                    if src >= g.in_len() {
                        return Err(Error::InvalidConfig("maxpool_backward: argmax outside the image"));
                    }
                    let i = n * g.in_len() + src;
                    unsafe { dxv.set(i, dxv.get(i) + dyv.get(n * g.out_len() + o)) };
                }
            }
        }));
        Ok(())
    }

    fn grad_stats(&mut self, grad: Buf, scale: f32) -> Result<GradStats> {
        self.check(grad, "grad_stats")?;
        let mut stats = GradStats::default();
        with_float!(grad.dtype, "grad_stats", G => {
            let gv = self.view::<G>(grad);
            for i in 0..grad.len {
                // SAFETY: i < grad.len.
                let v = unsafe { gv.get(i) } * scale;
                if v.is_finite() {
                    stats.sum_sq += (v as f64) * (v as f64);
                } else {
                    stats.non_finite += 1;
                }
            }
        });
        Ok(stats)
    }

    fn sgd_step(&mut self, p: &ParamBufs, s: &SgdStep) -> Result<()> {
        let n = p.validate(self.capacity, s.momentum != 0.0, false)?;
        let (w, g, m) = (self.ptr::<f32>(p.master), self.ptr::<f32>(p.grad), self.ptr::<f32>(p.state1));
        for i in 0..n {
            // SAFETY: every buffer holds at least n elements (ParamBufs::validate).
            unsafe {
                let wi = w.add(i).read();
                let mut gi = g.add(i).read() * s.grad_scale + s.weight_decay * wi;
                if s.momentum != 0.0 {
                    let b = s.momentum * m.add(i).read() + gi;
                    m.add(i).write(b);
                    gi = if s.nesterov { gi + s.momentum * b } else { b };
                }
                w.add(i).write(wi - s.lr * gi);
            }
        }
        self.write_working(p, n)
    }

    fn adamw_step(&mut self, p: &ParamBufs, s: &AdamWStep) -> Result<()> {
        let n = p.validate(self.capacity, true, true)?;
        let (w, g) = (self.ptr::<f32>(p.master), self.ptr::<f32>(p.grad));
        let (m, v) = (self.ptr::<f32>(p.state1), self.ptr::<f32>(p.state2));
        let step_size = s.lr / s.bias_correction1;
        let bc2_sqrt = libm::sqrtf(s.bias_correction2);
        let decay = 1.0 - s.lr * s.weight_decay;
        for i in 0..n {
            // SAFETY: every buffer holds at least n elements (ParamBufs::validate).
            unsafe {
                let gi = g.add(i).read() * s.grad_scale;
                let mi = s.beta1 * m.add(i).read() + (1.0 - s.beta1) * gi;
                let vi = s.beta2 * v.add(i).read() + (1.0 - s.beta2) * gi * gi;
                m.add(i).write(mi);
                v.add(i).write(vi);
                let denom = libm::sqrtf(vi) / bc2_sqrt + s.eps;
                let wi = w.add(i).read() * decay;
                w.add(i).write(wi - step_size * (mi / denom));
            }
        }
        self.write_working(p, n)
    }
}

impl Reference<'_> {
    fn write_working(&mut self, p: &ParamBufs, n: usize) -> Result<()> {
        if p.working.offset == p.master.offset {
            return Ok(());
        }
        self.cast(p.master.prefix(n), p.working.prefix(n))
    }
}

#[inline(always)]
fn act_forward(act: Activation, x: f32) -> f32 {
    match act {
        // NaN passes through (`x > 0` is false for NaN, so test it explicitly).
        Activation::Relu => {
            if x > 0.0 || x.is_nan() {
                x
            } else {
                0.0
            }
        }
        Activation::GeluTanh => {
            let u = GELU_S * (x + GELU_C * x * x * x);
            0.5 * x * (1.0 + libm::tanhf(u))
        }
    }
}

#[inline(always)]
fn act_derivative(act: Activation, x: f32) -> f32 {
    match act {
        Activation::Relu => {
            if x > 0.0 {
                1.0
            } else {
                0.0
            }
        }
        Activation::GeluTanh => {
            let x2 = x * x;
            let u = GELU_S * (x + GELU_C * x2 * x);
            let t = libm::tanhf(u);
            0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * GELU_S * (1.0 + 3.0 * GELU_C * x2)
        }
    }
}

/// sqrt(2 / pi)
const GELU_S: f32 = 0.797_884_6;
const GELU_C: f32 = 0.044_715;

/// Matrix product with f32 accumulation in a fixed order (see [`Gemm`]).
///
/// # Safety
/// Every element the problem addresses (per [`Gemm::extents`]) lies inside the three views, and C does not
/// overlap A or B.
unsafe fn gemm_typed<A: Element, C: Element>(g: &Gemm, a: Src<A>, b: Src<A>, c: Dst<C>) {
    const NB: usize = 64;
    for t in 0..g.batch {
        let (a0, b0, c0) = (t * g.stride_a, t * g.stride_b, t * g.stride_c);
        // Element (i, p) of op(A) and (p, j) of op(B).
        let ai = |i: usize, p: usize| if g.trans_a { a0 + p * g.lda + i } else { a0 + i * g.lda + p };
        let bi = |p: usize, j: usize| if g.trans_b { b0 + j * g.ldb + p } else { b0 + p * g.ldb + j };
        let store = |i: usize, j: usize, acc: f32| {
            let ci = c0 + i * g.ldc + j;
            let v = if g.beta == 0.0 { g.alpha * acc } else { g.alpha * acc + g.beta * unsafe { c.get(ci) } };
            unsafe { c.set(ci, v) };
        };
        if !g.trans_b {
            // Rows of B are contiguous over j: accumulate a block of C's row (axpy form).
            for i in 0..g.m {
                let mut j0 = 0;
                while j0 < g.n {
                    let jn = NB.min(g.n - j0);
                    let mut acc = [0.0f32; NB];
                    for p in 0..g.k {
                        let av = unsafe { a.get(ai(i, p)) };
                        let brow = bi(p, j0);
                        for (jj, s) in acc[..jn].iter_mut().enumerate() {
                            *s += av * unsafe { b.get(brow + jj) };
                        }
                    }
                    for (jj, &s) in acc[..jn].iter().enumerate() {
                        store(i, j0 + jj, s);
                    }
                    j0 += jn;
                }
            }
        } else if !g.trans_a {
            // A's rows and B's columns (stored as rows) are both contiguous over p: dot products with
            // 8 partial sums, combined pairwise.
            for i in 0..g.m {
                let arow = ai(i, 0);
                for j in 0..g.n {
                    let brow = bi(0, j);
                    let mut lanes = [0.0f32; 8];
                    let full = g.k / 8 * 8;
                    let mut p = 0;
                    while p < full {
                        for (l, s) in lanes.iter_mut().enumerate() {
                            *s += unsafe { a.get(arow + p + l) * b.get(brow + p + l) };
                        }
                        p += 8;
                    }
                    let mut acc = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3]))
                        + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
                    while p < g.k {
                        acc += unsafe { a.get(arow + p) * b.get(brow + p) };
                        p += 1;
                    }
                    store(i, j, acc);
                }
            }
        } else {
            for i in 0..g.m {
                for j in 0..g.n {
                    let mut acc = 0.0f32;
                    for p in 0..g.k {
                        acc += unsafe { a.get(ai(i, p)) * b.get(bi(p, j)) };
                    }
                    store(i, j, acc);
                }
            }
        }
    }
}

fn swap_bytes(bytes: &mut [u8], size: usize) {
    for chunk in bytes.chunks_exact_mut(size) {
        chunk.reverse();
    }
}
