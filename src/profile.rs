//! Where a step's time goes, op by op: [`Profiled`] wraps any backend, forwards every call (provided methods
//! included, so a device backend's own versions still run) and, while timing is on, waits for the backend
//! before and after each op and adds the wall time to that op's row.
//!
//! Each op is timed alone between two synchronisations, so a device op's row includes one launch and one
//! wait (a few microseconds); [`Profiled::sync_overhead`] measures that on an idle backend so reports can
//! state it. Recording is refused while timing (a recorded step runs nothing until it is replayed).
//!
//! ```text
//! let mut t = Trainer::new(Profiled::new(backend), ...)?;
//! t.stage(&x, &y)?;  t.step_staged(rows)?;           // warm up
//! t.backend_mut().start();  for _ in 0..20 { t.step_staged(rows)?; }  t.backend_mut().stop();
//! for row in t.backend().rows() { ... }              // op, calls, total seconds, FLOPs
//! ```

use std::collections::HashMap;
use std::time::Instant;

use mantissa_core::backend::{
    Activation, AdamWStep, Backend, Capabilities, ConvGeom, Epilogue, Gemm, GradStats, LinearActBackward,
    LinearActForward, LossTo, ParamBufs, PoolGeom, SgdStep,
};
use mantissa_core::control::StepRule;
use mantissa_core::{Buf, DType, Result};

/// One op's accumulated time.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    /// The op and, for matrix products, its shape and dtypes (`gemm 8192x4096x784 bf16->bf16`).
    pub op: String,
    pub calls: u64,
    pub seconds: f64,
    /// Floating-point operations of the matrix products in this row (0 for other ops).
    pub flops: u64,
}

/// A backend that can time its ops; see the module documentation.
#[derive(Debug)]
pub struct Profiled<B: Backend> {
    inner: B,
    timing: bool,
    rows: HashMap<String, Row>,
}

impl<B: Backend> Profiled<B> {
    pub fn new(inner: B) -> Self {
        Profiled { inner, timing: false, rows: HashMap::new() }
    }

    /// Starts timing (clearing earlier rows).
    pub fn start(&mut self) -> Result<()> {
        self.inner.synchronize()?;
        self.rows.clear();
        self.timing = true;
        Ok(())
    }

    /// Stops timing; the rows stay until the next [`Profiled::start`].
    pub fn stop(&mut self) {
        self.timing = false;
    }

    /// The rows, largest total first.
    pub fn rows(&self) -> Vec<Row> {
        let mut v: Vec<Row> = self.rows.values().cloned().collect();
        v.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
        v
    }

    /// Mean seconds of a synchronisation of the idle backend (what each timed op carries on top of its work).
    pub fn sync_overhead(&mut self) -> Result<f64> {
        self.inner.synchronize()?;
        let n = 200;
        let t = Instant::now();
        for _ in 0..n {
            self.inner.synchronize()?;
        }
        Ok(t.elapsed().as_secs_f64() / n as f64)
    }

    pub fn inner(&self) -> &B {
        &self.inner
    }

    pub fn inner_mut(&mut self) -> &mut B {
        &mut self.inner
    }

    pub fn into_inner(self) -> B {
        self.inner
    }

    fn time<R>(&mut self, op: impl FnOnce() -> String, flops: u64, f: impl FnOnce(&mut B) -> Result<R>) -> Result<R> {
        if !self.timing {
            return f(&mut self.inner);
        }
        self.inner.synchronize()?;
        let t = Instant::now();
        let r = f(&mut self.inner)?;
        self.inner.synchronize()?;
        let dt = t.elapsed().as_secs_f64();
        let name = op();
        let row = self.rows.entry(name.clone()).or_insert(Row { op: name, calls: 0, seconds: 0.0, flops: 0 });
        row.calls += 1;
        row.seconds += dt;
        row.flops += flops;
        Ok(r)
    }
}

fn gemm_name(what: &str, g: &Gemm) -> String {
    let t = |b: bool| if b { "T" } else { "N" };
    let batch = if g.batch > 1 { format!(" x{}", g.batch) } else { String::new() };
    format!("{what} {}x{}x{} {}{} {}->{}{batch}", g.m, g.n, g.k, t(g.trans_a), t(g.trans_b), g.a.dtype, g.c.dtype)
}

fn epilogue_name(ep: &Epilogue) -> String {
    match ep {
        Epilogue::Bias { .. } => "bias".into(),
        Epilogue::BiasAct { act, .. } => format!("bias+{act:?}"),
        Epilogue::ActGrad { act, dbias, .. } => format!("d{act:?}{}", if dbias.is_some() { "+dbias" } else { "" }),
    }
}

impl<B: Backend> Backend for Profiled<B> {
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    fn capacity(&self) -> usize {
        self.inner.capacity()
    }
    fn upload(&mut self, dst: Buf, src: &[f32]) -> Result<()> {
        self.time(|| "upload".into(), 0, |b| b.upload(dst, src))
    }
    fn upload_i32(&mut self, dst: Buf, src: &[i32]) -> Result<()> {
        self.time(|| "upload_i32".into(), 0, |b| b.upload_i32(dst, src))
    }
    fn download(&mut self, src: Buf, dst: &mut [f32]) -> Result<()> {
        self.time(|| "download".into(), 0, |b| b.download(src, dst))
    }
    fn download_bytes(&mut self, src: Buf, dst: &mut [u8]) -> Result<()> {
        self.time(|| "download_bytes".into(), 0, |b| b.download_bytes(src, dst))
    }
    fn upload_bytes(&mut self, dst: Buf, src: &[u8]) -> Result<()> {
        self.time(|| "upload_bytes".into(), 0, |b| b.upload_bytes(dst, src))
    }
    fn fill(&mut self, dst: Buf, value: f32) -> Result<()> {
        self.time(|| format!("fill {}", dst.dtype), 0, |b| b.fill(dst, value))
    }
    fn cast(&mut self, src: Buf, dst: Buf) -> Result<()> {
        self.time(|| format!("cast {}->{} x{}", src.dtype, dst.dtype, src.len), 0, |b| b.cast(src, dst))
    }
    fn gemm(&mut self, g: &Gemm) -> Result<()> {
        self.time(|| gemm_name("gemm", g), g.flops(), |b| b.gemm(g))
    }
    fn add_bias(&mut self, y: Buf, bias: Buf, outer: usize, channels: usize, inner: usize) -> Result<()> {
        self.time(
            || format!("add_bias {outer}x{channels}x{inner} {}", y.dtype),
            0,
            |b| b.add_bias(y, bias, outer, channels, inner),
        )
    }
    fn bias_grad(&mut self, dy: Buf, dbias: Buf, outer: usize, channels: usize, inner: usize) -> Result<()> {
        self.time(
            || format!("bias_grad {outer}x{channels}x{inner} {}", dy.dtype),
            0,
            |b| b.bias_grad(dy, dbias, outer, channels, inner),
        )
    }
    fn activation(&mut self, act: Activation, x: Buf, y: Buf) -> Result<()> {
        self.time(|| format!("{act:?} x{} {}", x.len, x.dtype), 0, |b| b.activation(act, x, y))
    }
    fn activation_backward(&mut self, act: Activation, x: Buf, dy: Buf, dx: Buf) -> Result<()> {
        self.time(|| format!("{act:?} backward x{} {}", x.len, x.dtype), 0, |b| b.activation_backward(act, x, dy, dx))
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
        self.time(
            || format!("softmax_cross_entropy {rows}x{classes}"),
            0,
            |b| b.softmax_cross_entropy(logits, labels, rows, classes, loss, dlogits, grad_scale),
        )
    }
    fn im2col(&mut self, x: Buf, g: &ConvGeom, images: usize, cols: Buf) -> Result<()> {
        self.time(|| format!("im2col {images} images"), 0, |b| b.im2col(x, g, images, cols))
    }
    fn col2im(&mut self, cols: Buf, g: &ConvGeom, images: usize, dx: Buf) -> Result<()> {
        self.time(|| format!("col2im {images} images"), 0, |b| b.col2im(cols, g, images, dx))
    }
    fn maxpool(&mut self, x: Buf, g: &PoolGeom, images: usize, y: Buf, argmax: Buf) -> Result<()> {
        self.time(|| format!("maxpool {images} images"), 0, |b| b.maxpool(x, g, images, y, argmax))
    }
    fn maxpool_backward(&mut self, dy: Buf, argmax: Buf, g: &PoolGeom, images: usize, dx: Buf) -> Result<()> {
        self.time(|| format!("maxpool_backward {images} images"), 0, |b| b.maxpool_backward(dy, argmax, g, images, dx))
    }
    fn grad_stats(&mut self, grad: Buf, scale: f32) -> Result<GradStats> {
        self.time(|| format!("grad_stats x{}", grad.len), 0, |b| b.grad_stats(grad, scale))
    }
    fn sgd_step(&mut self, p: &ParamBufs, s: &SgdStep) -> Result<()> {
        self.time(|| format!("sgd_step x{}", p.master.len), 0, |b| b.sgd_step(p, s))
    }
    fn adamw_step(&mut self, p: &ParamBufs, s: &AdamWStep) -> Result<()> {
        self.time(|| format!("adamw_step x{}", p.master.len), 0, |b| b.adamw_step(p, s))
    }
    fn count_underflow(&mut self, src: Buf, dtype: DType) -> Result<(usize, usize)> {
        self.time(|| "count_underflow".into(), 0, |b| b.count_underflow(src, dtype))
    }
    fn argmax(&mut self, logits: Buf, rows: usize, classes: usize, out: &mut [u32]) -> Result<()> {
        self.time(|| "argmax".into(), 0, |b| b.argmax(logits, rows, classes, out))
    }
    fn count_correct(&mut self, logits: Buf, labels: Buf, rows: usize, classes: usize) -> Result<usize> {
        self.time(|| "count_correct".into(), 0, |b| b.count_correct(logits, labels, rows, classes))
    }
    fn synchronize(&mut self) -> Result<()> {
        self.inner.synchronize()
    }
    fn gemm_fused(&mut self, g: &Gemm, ep: &Epilogue) -> Result<()> {
        self.time(|| gemm_name(&format!("gemm_fused[{}]", epilogue_name(ep)), g), g.flops(), |b| b.gemm_fused(g, ep))
    }
    fn linear_act_forward(&mut self, op: &LinearActForward) -> Result<bool> {
        let flops = 2 * (op.rows as u64) * (op.i as u64) * (op.o as u64);
        self.time(
            || format!("linear_act_forward[{:?}] {}x{}x{} {}", op.act, op.rows, op.i, op.o, op.pre.dtype.name()),
            flops,
            |b| b.linear_act_forward(op),
        )
    }
    fn linear_act_backward(&mut self, op: &LinearActBackward) -> Result<()> {
        let flops = 2 * (op.rows as u64) * (op.i as u64) * (op.o as u64) * if op.dw.is_some() { 2 } else { 1 };
        self.time(
            || format!("linear_act_backward[d{:?}] {}x{}x{} {}", op.act, op.rows, op.i, op.o, op.dy.dtype.name()),
            flops,
            |b| b.linear_act_backward(op),
        )
    }
    fn softmax_cross_entropy_scaled(
        &mut self,
        logits: Buf,
        labels: Buf,
        rows: usize,
        classes: usize,
        loss: Buf,
        dlogits: Buf,
        grad_scale: f32,
        ctl: Buf,
    ) -> Result<()> {
        self.time(
            || format!("softmax_cross_entropy_scaled {rows}x{classes}"),
            0,
            |b| b.softmax_cross_entropy_scaled(logits, labels, rows, classes, loss, dlogits, grad_scale, ctl),
        )
    }
    fn softmax_cross_entropy_to(&mut self, op: &LossTo) -> Result<()> {
        let what = if op.dlogits.dtype == DType::F32 { "" } else { " (+ rounding and underflow count)" };
        self.time(
            || format!("softmax_cross_entropy_to {}x{} {}{what}", op.rows, op.classes, op.dlogits.dtype.name()),
            0,
            |b| b.softmax_cross_entropy_to(op),
        )
    }
    fn count_correct_to(&mut self, logits: Buf, labels: Buf, rows: usize, classes: usize, ctl: Buf) -> Result<()> {
        self.time(|| "count_correct_to".into(), 0, |b| b.count_correct_to(logits, labels, rows, classes, ctl))
    }
    fn count_underflow_to(&mut self, src: Buf, dtype: DType, ctl: Buf) -> Result<()> {
        self.time(|| "count_underflow_to".into(), 0, |b| b.count_underflow_to(src, dtype, ctl))
    }
    fn step_control(&mut self, ctl: Buf, grad: Buf, loss: Buf, rule: &StepRule) -> Result<()> {
        self.time(|| format!("step_control x{}", grad.len), 0, |b| b.step_control(ctl, grad, loss, rule))
    }
    fn adamw_step_gated(&mut self, p: &ParamBufs, s: &AdamWStep, ctl: Buf) -> Result<()> {
        self.time(|| format!("adamw_step_gated x{}", p.master.len), 0, |b| b.adamw_step_gated(p, s, ctl))
    }
    fn sgd_step_gated(&mut self, p: &ParamBufs, s: &SgdStep, ctl: Buf) -> Result<()> {
        self.time(|| format!("sgd_step_gated x{}", p.master.len), 0, |b| b.sgd_step_gated(p, s, ctl))
    }
    fn record_begin(&mut self) -> Result<bool> {
        if self.timing {
            return Ok(false);
        }
        self.inner.record_begin()
    }
    fn record_end(&mut self, keep: bool) -> Result<Option<usize>> {
        self.inner.record_end(keep)
    }
    fn replay(&mut self, id: usize) -> Result<()> {
        self.time(|| "replay (a recorded step)".into(), 0, |b| b.replay(id))
    }
    fn clear_recordings(&mut self) {
        self.inner.clear_recordings()
    }
}
