//! Backend selection at run time. This is the one place that knows which backends are compiled in: a backend
//! whose Cargo feature is off answers [`Error::BackendNotCompiled`] naming the feature, so callers carry no
//! `#[cfg]`.

use mantissa_core::backend::{
    Activation, AdamWStep, Backend, Capabilities, ConvGeom, Epilogue, Gemm, GradStats, LinearActBackward,
    LinearActForward, LossTo, ParamBufs, PoolGeom, SgdStep,
};
use mantissa_core::control::StepRule;
use mantissa_core::{Buf, Error, Reference, Result};

/// The backends mantissa knows, compiled in or not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendKind {
    /// The scalar reference (always there).
    Reference,
    /// The SIMD CPU backend (feature `simd`).
    CpuSimd,
    /// NVIDIA GPUs (feature `cuda`).
    Cuda,
}

impl BackendKind {
    pub const ALL: [BackendKind; 3] = [BackendKind::Reference, BackendKind::CpuSimd, BackendKind::Cuda];

    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Reference => "reference",
            BackendKind::CpuSimd => "cpu-simd",
            BackendKind::Cuda => "cuda",
        }
    }

    /// Parses `reference`, `cpu-simd` (or `simd`), `cuda`, and `auto` (the best CPU backend compiled in).
    pub fn from_name(name: &str) -> core::result::Result<BackendKind, UnknownBackend> {
        match name {
            "reference" | "scalar" => Ok(BackendKind::Reference),
            "cpu-simd" | "simd" => Ok(BackendKind::CpuSimd),
            "cuda" => Ok(BackendKind::Cuda),
            "auto" => Ok(BackendKind::best_cpu()),
            _ => Err(UnknownBackend),
        }
    }

    /// Whether this backend is compiled into this build.
    pub fn compiled(self) -> bool {
        match self {
            BackendKind::Reference => true,
            BackendKind::CpuSimd => cfg!(feature = "simd"),
            BackendKind::Cuda => cfg!(feature = "cuda"),
        }
    }

    /// The fastest CPU backend compiled in.
    pub fn best_cpu() -> BackendKind {
        if BackendKind::CpuSimd.compiled() {
            BackendKind::CpuSimd
        } else {
            BackendKind::Reference
        }
    }

    fn feature(self) -> &'static str {
        match self {
            BackendKind::Reference => "std",
            BackendKind::CpuSimd => "simd",
            BackendKind::Cuda => "cuda",
        }
    }
}

/// A backend name that is not one of `reference`, `cpu-simd`, `cuda`, `auto`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnknownBackend;

impl core::fmt::Display for UnknownBackend {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("unknown backend; valid names are: reference, cpu-simd, cuda, auto")
    }
}

/// Any compiled-in backend over a host buffer, chosen at run time.
pub enum AnyBackend<'a> {
    Reference(Reference<'a>),
    /// AVX2 / AVX-512 kernels, chosen at run time (`MANTISSA_KERNEL` forces one).
    #[cfg(feature = "simd")]
    CpuSimd(mantissa_cpu_simd::SimdBackend<'a>),
    /// GPU 0 through CUDA. Its arena is one device allocation as long as the host buffer given to
    /// [`AnyBackend::open`]; the host buffer itself is not used (an empty one gives an empty arena).
    #[cfg(feature = "cuda")]
    Cuda(Box<mantissa_cuda::CudaBackend>),
}

impl core::fmt::Debug for AnyBackend<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "AnyBackend({})", self.capabilities().backend)
    }
}

impl<'a> AnyBackend<'a> {
    /// Opens `kind` over `buf` (the arena). A backend that is not compiled in, or cannot run here, is an error.
    pub fn open(kind: BackendKind, buf: &'a mut [u8]) -> Result<AnyBackend<'a>> {
        if !kind.compiled() {
            return Err(Error::BackendNotCompiled { backend: kind.name(), feature: kind.feature() });
        }
        match kind {
            BackendKind::Reference => Ok(AnyBackend::Reference(Reference::new(buf))),
            #[cfg(feature = "simd")]
            BackendKind::CpuSimd => Ok(AnyBackend::CpuSimd(mantissa_cpu_simd::SimdBackend::new(buf, 0)?)),
            #[cfg(not(feature = "simd"))]
            BackendKind::CpuSimd => Err(Error::BackendNotCompiled { backend: kind.name(), feature: kind.feature() }),
            // No driver or GPU here: `Error::DeviceUnavailable`, so callers can fall back to a CPU backend.
            #[cfg(feature = "cuda")]
            BackendKind::Cuda => Ok(AnyBackend::Cuda(Box::new(mantissa_cuda::CudaBackend::new(0, buf.len())?))),
            #[cfg(not(feature = "cuda"))]
            BackendKind::Cuda => Err(Error::BackendNotCompiled { backend: kind.name(), feature: kind.feature() }),
        }
    }
}

impl AnyBackend<'_> {
    /// The SIMD kernel in use (`scalar`, `avx2`, `avx512`, `avx512bf16`: `MANTISSA_KERNEL` forces one), or
    /// `None` for a backend without one.
    pub fn kernel(&self) -> Option<&'static str> {
        match self {
            AnyBackend::Reference(_) => None,
            #[cfg(feature = "simd")]
            AnyBackend::CpuSimd(b) => Some(b.kernel().name()),
            #[cfg(feature = "cuda")]
            AnyBackend::Cuda(_) => None,
        }
    }
}

/// Whether the SIMD kernel `name` (as for `MANTISSA_KERNEL`) is compiled in and runs on this CPU.
pub fn simd_kernel_available(name: &str) -> bool {
    #[cfg(feature = "simd")]
    {
        mantissa_cpu_simd::KernelId::from_name(name).is_some_and(|id| id.is_available())
    }
    #[cfg(not(feature = "simd"))]
    {
        let _ = name;
        false
    }
}

macro_rules! dispatch {
    ($self:ident, $b:ident => $e:expr) => {
        match $self {
            AnyBackend::Reference($b) => $e,
            #[cfg(feature = "simd")]
            AnyBackend::CpuSimd($b) => $e,
            #[cfg(feature = "cuda")]
            AnyBackend::Cuda($b) => $e,
        }
    };
}

impl Backend for AnyBackend<'_> {
    fn capabilities(&self) -> Capabilities {
        dispatch!(self, b => b.capabilities())
    }
    fn capacity(&self) -> usize {
        dispatch!(self, b => b.capacity())
    }
    fn upload(&mut self, dst: Buf, src: &[f32]) -> Result<()> {
        dispatch!(self, b => b.upload(dst, src))
    }
    fn upload_i32(&mut self, dst: Buf, src: &[i32]) -> Result<()> {
        dispatch!(self, b => b.upload_i32(dst, src))
    }
    fn download(&mut self, src: Buf, dst: &mut [f32]) -> Result<()> {
        dispatch!(self, b => b.download(src, dst))
    }
    fn download_bytes(&mut self, src: Buf, dst: &mut [u8]) -> Result<()> {
        dispatch!(self, b => b.download_bytes(src, dst))
    }
    fn upload_bytes(&mut self, dst: Buf, src: &[u8]) -> Result<()> {
        dispatch!(self, b => b.upload_bytes(dst, src))
    }
    fn fill(&mut self, dst: Buf, value: f32) -> Result<()> {
        dispatch!(self, b => b.fill(dst, value))
    }
    fn cast(&mut self, src: Buf, dst: Buf) -> Result<()> {
        dispatch!(self, b => b.cast(src, dst))
    }
    fn gemm(&mut self, g: &Gemm) -> Result<()> {
        dispatch!(self, b => b.gemm(g))
    }
    fn add_bias(&mut self, y: Buf, bias: Buf, outer: usize, channels: usize, inner: usize) -> Result<()> {
        dispatch!(self, b => b.add_bias(y, bias, outer, channels, inner))
    }
    fn bias_grad(&mut self, dy: Buf, dbias: Buf, outer: usize, channels: usize, inner: usize) -> Result<()> {
        dispatch!(self, b => b.bias_grad(dy, dbias, outer, channels, inner))
    }
    fn activation(&mut self, act: Activation, x: Buf, y: Buf) -> Result<()> {
        dispatch!(self, b => b.activation(act, x, y))
    }
    fn activation_backward(&mut self, act: Activation, x: Buf, dy: Buf, dx: Buf) -> Result<()> {
        dispatch!(self, b => b.activation_backward(act, x, dy, dx))
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
        dispatch!(self, b => b.softmax_cross_entropy(logits, labels, rows, classes, loss, dlogits, grad_scale))
    }
    fn im2col(&mut self, x: Buf, g: &ConvGeom, images: usize, cols: Buf) -> Result<()> {
        dispatch!(self, b => b.im2col(x, g, images, cols))
    }
    fn col2im(&mut self, cols: Buf, g: &ConvGeom, images: usize, dx: Buf) -> Result<()> {
        dispatch!(self, b => b.col2im(cols, g, images, dx))
    }
    fn maxpool(&mut self, x: Buf, g: &PoolGeom, images: usize, y: Buf, argmax: Buf) -> Result<()> {
        dispatch!(self, b => b.maxpool(x, g, images, y, argmax))
    }
    fn maxpool_backward(&mut self, dy: Buf, argmax: Buf, g: &PoolGeom, images: usize, dx: Buf) -> Result<()> {
        dispatch!(self, b => b.maxpool_backward(dy, argmax, g, images, dx))
    }
    fn grad_stats(&mut self, grad: Buf, scale: f32) -> Result<GradStats> {
        dispatch!(self, b => b.grad_stats(grad, scale))
    }
    fn sgd_step(&mut self, p: &ParamBufs, s: &SgdStep) -> Result<()> {
        dispatch!(self, b => b.sgd_step(p, s))
    }
    fn adamw_step(&mut self, p: &ParamBufs, s: &AdamWStep) -> Result<()> {
        dispatch!(self, b => b.adamw_step(p, s))
    }
    fn count_underflow(&mut self, src: Buf, dtype: mantissa_core::DType) -> Result<(usize, usize)> {
        dispatch!(self, b => b.count_underflow(src, dtype))
    }
    fn argmax(&mut self, logits: Buf, rows: usize, classes: usize, out: &mut [u32]) -> Result<()> {
        dispatch!(self, b => b.argmax(logits, rows, classes, out))
    }
    fn count_correct(&mut self, logits: Buf, labels: Buf, rows: usize, classes: usize) -> Result<usize> {
        dispatch!(self, b => b.count_correct(logits, labels, rows, classes))
    }
    fn synchronize(&mut self) -> Result<()> {
        dispatch!(self, b => b.synchronize())
    }
    // Every provided method is forwarded too: a device backend overrides them, and a default here would
    // silently run the host version on the device (tests/backends.rs `device_paths` checks the GPU's).
    fn gemm_fused(&mut self, g: &Gemm, ep: &Epilogue) -> Result<()> {
        dispatch!(self, b => b.gemm_fused(g, ep))
    }
    fn linear_act_forward(&mut self, op: &LinearActForward) -> Result<bool> {
        dispatch!(self, b => b.linear_act_forward(op))
    }
    fn linear_act_backward(&mut self, op: &LinearActBackward) -> Result<()> {
        dispatch!(self, b => b.linear_act_backward(op))
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
        dispatch!(self, b => b.softmax_cross_entropy_scaled(logits, labels, rows, classes, loss, dlogits, grad_scale, ctl))
    }
    fn softmax_cross_entropy_to(&mut self, op: &LossTo) -> Result<()> {
        dispatch!(self, b => b.softmax_cross_entropy_to(op))
    }
    fn count_correct_to(&mut self, logits: Buf, labels: Buf, rows: usize, classes: usize, ctl: Buf) -> Result<()> {
        dispatch!(self, b => b.count_correct_to(logits, labels, rows, classes, ctl))
    }
    fn count_underflow_to(&mut self, src: Buf, dtype: mantissa_core::DType, ctl: Buf) -> Result<()> {
        dispatch!(self, b => b.count_underflow_to(src, dtype, ctl))
    }
    fn step_control(&mut self, ctl: Buf, grad: Buf, loss: Buf, rule: &StepRule) -> Result<()> {
        dispatch!(self, b => b.step_control(ctl, grad, loss, rule))
    }
    fn adamw_step_gated(&mut self, p: &ParamBufs, s: &AdamWStep, ctl: Buf) -> Result<()> {
        dispatch!(self, b => b.adamw_step_gated(p, s, ctl))
    }
    fn sgd_step_gated(&mut self, p: &ParamBufs, s: &SgdStep, ctl: Buf) -> Result<()> {
        dispatch!(self, b => b.sgd_step_gated(p, s, ctl))
    }
    fn record_begin(&mut self) -> Result<bool> {
        dispatch!(self, b => b.record_begin())
    }
    fn record_end(&mut self, keep: bool) -> Result<Option<usize>> {
        dispatch!(self, b => b.record_end(keep))
    }
    fn replay(&mut self, id: usize) -> Result<()> {
        dispatch!(self, b => b.replay(id))
    }
    fn clear_recordings(&mut self) {
        dispatch!(self, b => b.clear_recordings())
    }
}
