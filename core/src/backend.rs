//! The one interface every backend implements. Everything a training step does to tensor data goes through
//! it, so the model, layers, optimizers, loss scaling and trainer are written once.
//!
//! Conventions (shared by every backend and checked against [`crate::reference::Reference`]):
//! - Buffers are [`Buf`] handles into the backend's arena. Float buffers may be F32, F16 or BF16; every op
//!   loads to f32, computes in f32 and stores by rounding to nearest even.
//! - Matrices are row-major. Shapes are in comments as `[rows, cols]`; `B` is the batch, `N` a count.
//! - Outputs never overlap inputs unless an op says it works in place.

use crate::arena::Buf;
use crate::control;
use crate::dtype::DType;
use crate::error::{Error, Result};

/// What a backend does natively. [`crate::policy::Policy::auto`] chooses from this.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// Short backend name: `reference`, `cpu-simd`, `cuda`.
    pub backend: &'static str,
    /// The hardware in words (`AMD EPYC 9xxx (Zen 4)`, `NVIDIA H200`, `Cortex-M4F`).
    pub device: &'static str,
    /// f16 arithmetic at more than f32's rate (tensor cores, FP16 NEON).
    pub fast_f16: bool,
    /// bf16 arithmetic at more than f32's rate (tensor cores, AVX512_BF16, BFDOT/BFMMLA).
    pub fast_bf16: bool,
}

/// `C = alpha * op(A) * op(B) + beta * C`, row-major, for `batch` independent problems.
///
/// `op(A)` is `[m, k]`: with `trans_a == false` element `(i, p)` is at `a[i * lda + p]`, with `trans_a == true`
/// at `a[p * lda + i]` (A is stored `[k, m]`). Likewise `op(B)` is `[k, n]`. `C[i, j]` is at `c[i * ldc + j]`.
/// Problem `t` uses element offsets `t * stride_a`, `t * stride_b`, `t * stride_c` (a stride of 0 broadcasts).
/// A and B share one dtype; C may be any float dtype. Products accumulate in f32. When `beta == 0` C is not
/// read (NaN in C does not leak), as in BLAS.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Gemm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: Buf,
    pub lda: usize,
    pub trans_a: bool,
    pub b: Buf,
    pub ldb: usize,
    pub trans_b: bool,
    pub c: Buf,
    pub ldc: usize,
    pub alpha: f32,
    pub beta: f32,
    pub batch: usize,
    pub stride_a: usize,
    pub stride_b: usize,
    pub stride_c: usize,
}

impl Gemm {
    /// A single, untransposed, densely packed problem `C[m, n] = A[m, k] * B[k, n]`.
    pub fn new(m: usize, n: usize, k: usize, a: Buf, b: Buf, c: Buf) -> Self {
        Gemm {
            m,
            n,
            k,
            a,
            lda: k,
            trans_a: false,
            b,
            ldb: n,
            trans_b: false,
            c,
            ldc: n,
            alpha: 1.0,
            beta: 0.0,
            batch: 1,
            stride_a: 0,
            stride_b: 0,
            stride_c: 0,
        }
    }

    /// `op(A)` is A transposed: A is stored `[k, m]` with leading dimension `lda`.
    pub fn a_t(mut self, lda: usize) -> Self {
        self.trans_a = true;
        self.lda = lda;
        self
    }

    /// `op(B)` is B transposed: B is stored `[n, k]` with leading dimension `ldb`.
    pub fn b_t(mut self, ldb: usize) -> Self {
        self.trans_b = true;
        self.ldb = ldb;
        self
    }

    pub fn beta(mut self, beta: f32) -> Self {
        self.beta = beta;
        self
    }

    pub fn batched(mut self, batch: usize, stride_a: usize, stride_b: usize, stride_c: usize) -> Self {
        self.batch = batch;
        self.stride_a = stride_a;
        self.stride_b = stride_b;
        self.stride_c = stride_c;
        self
    }

    /// The element counts each operand must hold: `(a, b, c)`, or `None` when one overflows `usize`.
    pub fn checked_extents(&self) -> Option<(usize, usize, usize)> {
        fn extent(rows: usize, cols: usize, ld: usize, batch: usize, stride: usize) -> Option<usize> {
            if rows == 0 || cols == 0 || batch == 0 {
                return Some(0);
            }
            (batch - 1).checked_mul(stride)?.checked_add((rows - 1).checked_mul(ld)?)?.checked_add(cols)
        }
        let (ar, ac) = if self.trans_a { (self.k, self.m) } else { (self.m, self.k) };
        let (br, bc) = if self.trans_b { (self.n, self.k) } else { (self.k, self.n) };
        Some((
            extent(ar, ac, self.lda, self.batch, self.stride_a)?,
            extent(br, bc, self.ldb, self.batch, self.stride_b)?,
            extent(self.m, self.n, self.ldc, self.batch, self.stride_c)?,
        ))
    }

    /// As [`Gemm::checked_extents`], saturating at `usize::MAX` (which no buffer holds).
    pub fn extents(&self) -> (usize, usize, usize) {
        self.checked_extents().unwrap_or((usize::MAX, usize::MAX, usize::MAX))
    }

    /// The checks every backend makes before a GEMM in an arena of `capacity` bytes: all three handles inside
    /// it, A and B of one dtype, each operand long enough for its extent, and C overlapping neither input.
    pub fn validate(&self, capacity: usize) -> Result<()> {
        self.a.check_in(capacity, "gemm A")?;
        self.b.check_in(capacity, "gemm B")?;
        self.c.check_in(capacity, "gemm C")?;
        if self.a.dtype != self.b.dtype {
            return Err(Error::UnsupportedDType { what: "gemm B (must match A)", dtype: self.b.dtype });
        }
        let (ea, eb, ec) =
            self.checked_extents().ok_or(Error::InvalidConfig("gemm: operand extent overflows usize"))?;
        self.a.check_len(ea, "gemm A")?;
        self.b.check_len(eb, "gemm B")?;
        self.c.check_len(ec, "gemm C")?;
        if self.c.overlaps(&self.a) || self.c.overlaps(&self.b) {
            return Err(Error::InvalidConfig("gemm: C overlaps an input"));
        }
        Ok(())
    }

    /// Floating-point operations (2 per multiply-add).
    pub fn flops(&self) -> u64 {
        2 * (self.m * self.n * self.k * self.batch) as u64
    }
}

/// Element-wise activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Activation {
    Relu,
    /// GELU, tanh approximation: `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`.
    GeluTanh,
}

/// The geometry of a 2-D convolution over NCHW tensors (one image; the batch is outside).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct ConvGeom {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
    pub out_height: usize,
    pub out_width: usize,
}

impl ConvGeom {
    /// Rows of the im2col matrix: `C * K * K`.
    pub const fn col_rows(&self) -> usize {
        self.channels * self.kernel * self.kernel
    }
    /// Columns of the im2col matrix: `OH * OW`.
    pub const fn col_cols(&self) -> usize {
        self.out_height * self.out_width
    }
    pub const fn in_len(&self) -> usize {
        self.channels * self.height * self.width
    }
}

/// The geometry of a 2-D max-pool over NCHW tensors (one image).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct PoolGeom {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub kernel: usize,
    pub stride: usize,
    pub out_height: usize,
    pub out_width: usize,
}

impl PoolGeom {
    pub const fn in_len(&self) -> usize {
        self.channels * self.height * self.width
    }
    pub const fn out_len(&self) -> usize {
        self.channels * self.out_height * self.out_width
    }

    /// The checks every backend makes before [`Backend::maxpool`] in an arena of `capacity` bytes: the
    /// handles inside it and long enough for `images` images, `argmax` in I32, and every window inside the
    /// image (the kernels index by the geometry alone).
    pub fn validate_forward(&self, capacity: usize, x: Buf, y: Buf, argmax: Buf, images: usize) -> Result<()> {
        x.check_in(capacity, "maxpool x")?;
        y.check_in(capacity, "maxpool y")?;
        argmax.check_in(capacity, "maxpool argmax")?;
        x.check_len(images * self.in_len(), "maxpool x")?;
        y.check_len(images * self.out_len(), "maxpool y")?;
        argmax.check_len(images * self.out_len(), "maxpool argmax")?;
        if argmax.dtype != DType::I32 {
            return Err(Error::UnsupportedDType { what: "maxpool argmax", dtype: argmax.dtype });
        }
        let fits = |out: usize, size: usize| {
            let last = (out.max(1) - 1).checked_mul(self.stride).and_then(|v| v.checked_add(self.kernel));
            out == 0 || (self.kernel >= 1 && last.is_some_and(|end| end <= size))
        };
        if !fits(self.out_height, self.height) || !fits(self.out_width, self.width) {
            return Err(Error::InvalidConfig("maxpool: pooling windows reach outside the input"));
        }
        Ok(())
    }

    /// The checks every backend makes before [`Backend::maxpool_backward`]: the handles inside the arena and
    /// long enough for `images` images (what `argmax` holds is each backend's to check).
    pub fn validate_backward(&self, capacity: usize, dy: Buf, argmax: Buf, dx: Buf, images: usize) -> Result<()> {
        dy.check_in(capacity, "maxpool_backward dy")?;
        argmax.check_in(capacity, "maxpool_backward argmax")?;
        dx.check_in(capacity, "maxpool_backward dx")?;
        dy.check_len(images * self.out_len(), "maxpool_backward dy")?;
        argmax.check_len(images * self.out_len(), "maxpool_backward argmax")?;
        dx.check_len(images * self.in_len(), "maxpool_backward dx")
    }
}

/// The checks every backend makes before [`Backend::softmax_cross_entropy`] in an arena of `capacity` bytes:
/// the handles inside it and long enough for `rows x classes`, labels in I32 and the loss in F32. (The labels'
/// values are checked by each backend, where they are.)
#[allow(clippy::too_many_arguments)]
pub fn validate_softmax_cross_entropy(
    capacity: usize,
    logits: Buf,
    labels: Buf,
    rows: usize,
    classes: usize,
    loss: Buf,
    dlogits: Buf,
) -> Result<()> {
    logits.check_in(capacity, "softmax_cross_entropy logits")?;
    labels.check_in(capacity, "softmax_cross_entropy labels")?;
    loss.check_in(capacity, "softmax_cross_entropy loss")?;
    dlogits.check_in(capacity, "softmax_cross_entropy dlogits")?;
    logits.check_len(rows * classes, "softmax_cross_entropy logits")?;
    dlogits.check_len(rows * classes, "softmax_cross_entropy dlogits")?;
    labels.check_len(rows, "softmax_cross_entropy labels")?;
    loss.check_len(1, "softmax_cross_entropy loss")?;
    if labels.dtype != DType::I32 {
        return Err(Error::UnsupportedDType { what: "softmax_cross_entropy labels", dtype: labels.dtype });
    }
    if loss.dtype != DType::F32 {
        return Err(Error::UnsupportedDType { what: "softmax_cross_entropy loss", dtype: loss.dtype });
    }
    Ok(())
}

/// What [`Backend::grad_stats`] found in the gradients.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct GradStats {
    /// Number of NaN or infinite values.
    pub non_finite: usize,
    /// Sum of squares of the gradients times `scale`, accumulated in f64 (meaningless when `non_finite > 0`).
    pub sum_sq: f64,
}

/// The buffers of one parameter vector for a fused optimizer update. All have the same length.
/// `working` may equal `master` (float32 policy): then there is no separate working copy to write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParamBufs {
    /// f32 master weights, updated in place.
    pub master: Buf,
    /// The copy the forward pass reads, in the compute dtype; rewritten from the new master.
    pub working: Buf,
    /// f32 gradients (still multiplied by the loss scale; `grad_scale` undoes it).
    pub grad: Buf,
    /// First optimizer state (SGD momentum, Adam m), f32; empty when unused.
    pub state1: Buf,
    /// Second optimizer state (Adam v), f32; empty when unused.
    pub state2: Buf,
}

impl ParamBufs {
    /// The checks every backend makes before a fused optimizer update in an arena of `capacity` bytes: every
    /// vector it uses (the states only when `state1` / `state2`) inside the arena and `master.len` long, all
    /// in F32 but the working copy, which is any float dtype. Returns that length.
    pub fn validate(&self, capacity: usize, state1: bool, state2: bool) -> Result<usize> {
        let n = self.master.len;
        for (b, what, used) in [
            (self.master, "optimizer master", true),
            (self.working, "optimizer working", true),
            (self.grad, "optimizer grad", true),
            (self.state1, "optimizer state1", state1),
            (self.state2, "optimizer state2", state2),
        ] {
            if !used {
                continue;
            }
            b.check_in(capacity, what)?;
            b.check_len(n, what)?;
            if b.dtype != DType::F32 && what != "optimizer working" {
                return Err(Error::UnsupportedDType { what, dtype: b.dtype });
            }
        }
        if !self.working.dtype.is_float() {
            return Err(Error::UnsupportedDType { what: "optimizer working", dtype: self.working.dtype });
        }
        Ok(n)
    }
}

/// One SGD step (PyTorch's `torch.optim.SGD` semantics, dampening 0):
/// `g = grad * grad_scale + weight_decay * w; buf = momentum * buf + g; g = nesterov ? g + momentum * buf : buf;
/// w -= lr * g` (with `momentum == 0`, `g` is used directly and no state is touched).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdStep {
    pub lr: f32,
    pub momentum: f32,
    pub nesterov: bool,
    pub weight_decay: f32,
    pub grad_scale: f32,
}

/// One AdamW step (PyTorch's `torch.optim.AdamW` semantics):
/// `w *= 1 - lr * weight_decay; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
/// w -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)` with `g = grad * grad_scale`, `bc_i = 1 - b_i^t`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// `1 - beta1^t` for this step `t` (computed on the host in f64, rounded to f32).
    pub bias_correction1: f32,
    /// `1 - beta2^t`.
    pub bias_correction2: f32,
    pub grad_scale: f32,
}

/// What a fused GEMM does to its product before storing it (cuBLASLt's epilogues). The GEMM must be a single
/// problem (`batch == 1`) with `alpha == 1` and `beta == 0`; `pre` and the result share C's dtype and layout
/// (`[m, n]`, leading dimension `ldc`); vectors run along `n`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Epilogue {
    /// `C = A B + bias` (`bias: [n]`, any float dtype).
    Bias { bias: Buf },
    /// `pre = A B + bias`, `C = act(pre)`: a linear layer and the activation after it.
    BiasAct { bias: Buf, act: Activation, pre: Buf },
    /// `C = (A B) * act'(pre)` and, when given, `dbias[j] = sum_i C[i, j]` (f32, overwritten): the input
    /// gradient of a linear layer through the activation before it, and that activation's linear layer's bias
    /// gradient.
    ActGrad { act: Activation, pre: Buf, dbias: Option<Buf> },
}

/// [`Backend::gemm_fused`] composed from unfused ops: the specification, and what host backends run. Each
/// intermediate is stored in C's dtype, as the unfused layers do.
pub fn gemm_fused_composed<B: Backend + ?Sized>(be: &mut B, g: &Gemm, ep: &Epilogue) -> Result<()> {
    if g.batch != 1 || g.alpha != 1.0 || g.beta != 0.0 || g.ldc != g.n {
        return Err(Error::InvalidConfig("gemm_fused: one dense problem with alpha 1 and beta 0"));
    }
    let len = g.m * g.n;
    g.c.check_len(len, "gemm_fused C")?;
    match *ep {
        Epilogue::Bias { bias } => {
            be.gemm(g)?;
            be.add_bias(g.c.prefix(len), bias, g.m, g.n, 1)
        }
        Epilogue::BiasAct { bias, act, pre } => {
            pre.check_len(len, "gemm_fused pre-activation")?;
            if pre.dtype != g.c.dtype || pre.overlaps(&g.c) {
                return Err(Error::InvalidConfig("gemm_fused: pre-activation must match C's dtype and not overlap C"));
            }
            be.gemm(&Gemm { c: pre, ..*g })?;
            be.add_bias(pre.prefix(len), bias, g.m, g.n, 1)?;
            be.activation(act, pre.prefix(len), g.c.prefix(len))
        }
        Epilogue::ActGrad { act, pre, dbias } => {
            pre.check_len(len, "gemm_fused pre-activation")?;
            if pre.dtype != g.c.dtype || pre.overlaps(&g.c) {
                return Err(Error::InvalidConfig("gemm_fused: pre-activation must match C's dtype and not overlap C"));
            }
            be.gemm(g)?;
            let c = g.c.prefix(len);
            be.activation_backward(act, pre.prefix(len), c, c)?;
            match dbias {
                Some(db) => be.bias_grad(c, db, g.m, g.n, 1),
                None => Ok(()),
            }
        }
    }
}

/// The backward pass of a linear layer through the activation before it (see
/// [`crate::layers::Linear::backward_act`]), with `rows` samples, `i` in and `o` out features:
///
/// - `dw = dy^T x` (`[o, i]`), `db = sum_r dy[r]` (`[o]`): the layer's own gradients, when given;
/// - `dx = (dy W) * act'(pre)` (`[rows, i]`, the product rounded to dx's dtype before the multiplication): the
///   gradient with respect to the activation's input;
/// - `prev_dbias = sum_r dx[r]` (`[i]`), when given: the bias gradient of the linear layer producing `pre`.
///
/// `x = act(pre)` is the layer's input. Gradients are f32 and overwritten.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinearActBackward {
    pub act: Activation,
    pub rows: usize,
    pub i: usize,
    pub o: usize,
    /// `[rows, o]`
    pub dy: Buf,
    /// `[rows, i]`: the layer's input as the forward pass stored it, or room for it (see `x_valid`).
    pub x: Buf,
    /// Whether `x` holds `act(pre)`: false after a [`Backend::linear_act_forward`] that did not write it. An
    /// implementation that reads `x` then computes it first.
    pub x_valid: bool,
    /// `[rows, i]`
    pub pre: Buf,
    /// `[o, i]`, in the compute dtype.
    pub w: Buf,
    /// `[rows, i]`
    pub dx: Buf,
    pub dw: Option<Buf>,
    pub db: Option<Buf>,
    pub prev_dbias: Option<Buf>,
}

/// The most outputs a linear layer after an activation may have for the trainer to run the two as one
/// [`Backend::linear_act_forward`] / [`Backend::linear_act_backward`] (a classifier head): where a backend fuses
/// them, the layer's input is then never stored.
pub const HEAD_MAX_OUT: usize = 16;

/// The forward pass of a linear layer fed by an activation, with `rows` samples, `i` in and `o` out features:
/// `x = act(pre)` (`[rows, i]`, the layer's input), `y = x W^T + b` (`[rows, o]`, the product rounded to y's
/// dtype before the bias is added, as [`crate::layers::Linear::forward`] does).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinearActForward {
    pub act: Activation,
    pub rows: usize,
    pub i: usize,
    pub o: usize,
    /// `[rows, i]`
    pub pre: Buf,
    /// `[rows, i]`: where `act(pre)` goes, if the backend stores it.
    pub x: Buf,
    /// `[o, i]`, in the compute dtype.
    pub w: Buf,
    /// `[o]`
    pub b: Buf,
    /// `[rows, o]`
    pub y: Buf,
}

/// [`Backend::linear_act_forward`] composed from the activation, a GEMM and `add_bias`: the specification, and
/// what host backends run. Stores `x`.
pub fn linear_act_forward_composed<B: Backend + ?Sized>(be: &mut B, op: &LinearActForward) -> Result<()> {
    let (i, o, rows) = (op.i, op.o, op.rows);
    be.activation(op.act, op.pre.prefix(rows * i), op.x.prefix(rows * i))?;
    op.y.check_len(rows * o, "linear_act_forward y")?;
    be.gemm(&Gemm::new(rows, o, i, op.x, op.w, op.y.prefix(rows * o)).b_t(i))?;
    be.add_bias(op.y.prefix(rows * o), op.b, rows, o, 1)
}

/// [`Backend::linear_act_backward`] composed from a GEMM, a bias gradient and a fused GEMM: the specification,
/// and what host backends run.
pub fn linear_act_backward_composed<B: Backend + ?Sized>(be: &mut B, op: &LinearActBackward) -> Result<()> {
    let (i, o, rows) = (op.i, op.o, op.rows);
    if let (Some(_), false) = (op.dw, op.x_valid) {
        be.activation(op.act, op.pre.prefix(rows * i), op.x.prefix(rows * i))?;
    }
    if let Some(dw) = op.dw {
        be.gemm(&Gemm::new(o, i, rows, op.dy, op.x, dw).a_t(o))?;
    }
    if let Some(db) = op.db {
        be.bias_grad(op.dy, db, rows, o, 1)?;
    }
    let n = rows * i;
    op.dx.check_len(n, "linear_act_backward dx")?;
    op.pre.check_len(n, "linear_act_backward pre")?;
    let g = Gemm::new(rows, i, o, op.dy, op.w, op.dx.prefix(n));
    be.gemm_fused(&g, &Epilogue::ActGrad { act: op.act, pre: op.pre.prefix(n), dbias: op.prev_dbias })
}

/// The loss of a step decided on the device ([`Backend::softmax_cross_entropy_to`]): softmax cross-entropy over
/// `logits: [rows, classes]` with `labels: [rows]` (I32) and the step-control block `ctl`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossTo {
    pub logits: Buf,
    pub labels: Buf,
    pub rows: usize,
    pub classes: usize,
    /// `[1]`, f32: the mean loss over rows.
    pub loss: Buf,
    /// `[rows, classes]`: `(softmax - onehot) * grad_scale * SCALE / rows`, computed in f32 and stored in
    /// `dlogits.dtype` (the dtype of the last layer's output).
    pub dlogits: Buf,
    /// For a 16-bit `dlogits`: f32 room for `rows * classes` values, where a backend that composes the op puts
    /// the gradient before rounding it (a backend that rounds in the loss kernel leaves it alone). Unused (may be
    /// empty) when `dlogits` is f32.
    pub dlogits_f32: Buf,
    pub grad_scale: f32,
    pub ctl: Buf,
}

/// [`Backend::softmax_cross_entropy_to`] composed from [`Backend::softmax_cross_entropy_scaled`],
/// [`Backend::count_underflow_to`], [`Backend::cast`] and [`Backend::count_correct_to`]: the specification, and
/// what host backends run.
pub fn softmax_cross_entropy_to_composed<B: Backend + ?Sized>(be: &mut B, op: &LossTo) -> Result<()> {
    let n = op.rows * op.classes;
    let (l, c) = (op.logits, op.classes);
    if op.dlogits.dtype == DType::F32 {
        be.softmax_cross_entropy_scaled(l, op.labels, op.rows, c, op.loss, op.dlogits, op.grad_scale, op.ctl)?;
    } else {
        if op.dlogits_f32.dtype != DType::F32 {
            return Err(Error::UnsupportedDType {
                what: "softmax_cross_entropy_to f32 room",
                dtype: op.dlogits_f32.dtype,
            });
        }
        op.dlogits_f32.check_len(n, "softmax_cross_entropy_to f32 room")?;
        op.dlogits.check_len(n, "softmax_cross_entropy dlogits")?;
        let d32 = op.dlogits_f32.prefix(n);
        be.softmax_cross_entropy_scaled(l, op.labels, op.rows, c, op.loss, d32, op.grad_scale, op.ctl)?;
        be.count_underflow_to(d32, op.dlogits.dtype, op.ctl)?;
        be.cast(d32, op.dlogits.prefix(n))?;
    }
    l.check_len(n, "softmax_cross_entropy logits")?;
    op.labels.check_len(op.rows, "softmax_cross_entropy labels")?;
    be.count_correct_to(l.prefix(n), op.labels.prefix(op.rows), op.rows, c, op.ctl)
}

/// The operations of a training step over buffers in the backend's arena.
///
/// Every method validates its handles against the arena and the op's dtype rules and returns an error
/// instead of touching memory it does not own.
pub trait Backend {
    fn capabilities(&self) -> Capabilities;

    /// Bytes of arena this backend owns.
    fn capacity(&self) -> usize;

    /// Copies `src` into `dst`, converting to `dst.dtype` (round to nearest even). `src.len() == dst.len`.
    fn upload(&mut self, dst: Buf, src: &[f32]) -> Result<()>;

    /// Copies indices (labels) into an I32 buffer.
    fn upload_i32(&mut self, dst: Buf, src: &[i32]) -> Result<()>;

    /// Copies `src` out of the arena, widening to f32. `dst.len() == src.len`.
    fn download(&mut self, src: Buf, dst: &mut [f32]) -> Result<()>;

    /// Copies the raw bytes of `src` (its dtype's little-endian encoding) into `dst`. For checkpoints.
    fn download_bytes(&mut self, src: Buf, dst: &mut [u8]) -> Result<()>;

    /// Writes raw little-endian bytes into `dst`. For checkpoints.
    fn upload_bytes(&mut self, dst: Buf, src: &[u8]) -> Result<()>;

    /// Sets every element of `dst` to `value`.
    fn fill(&mut self, dst: Buf, value: f32) -> Result<()>;

    /// `dst = src`, converting dtype. Same length.
    fn cast(&mut self, src: Buf, dst: Buf) -> Result<()>;

    /// General matrix product, see [`Gemm`].
    fn gemm(&mut self, g: &Gemm) -> Result<()>;

    /// `y[o, c, i] += bias[c]` for `y: [outer, channels, inner]`, in place. Linear: `inner = 1`; conv: `HW`.
    fn add_bias(&mut self, y: Buf, bias: Buf, outer: usize, channels: usize, inner: usize) -> Result<()>;

    /// `dbias[c] = sum over o, i of dy[o, c, i]` (f32 accumulation, overwrites `dbias`).
    fn bias_grad(&mut self, dy: Buf, dbias: Buf, outer: usize, channels: usize, inner: usize) -> Result<()>;

    /// `y = act(x)`, element-wise (may be in place: `x == y`).
    fn activation(&mut self, act: Activation, x: Buf, y: Buf) -> Result<()>;

    /// `dx = dy * act'(x)`, element-wise (`dx` may equal `dy`).
    fn activation_backward(&mut self, act: Activation, x: Buf, dy: Buf, dx: Buf) -> Result<()>;

    /// Softmax cross-entropy over `logits: [rows, classes]` with `labels: [rows]` (I32), computed in f32.
    /// Writes the mean loss over rows to `loss[0]` (f32) and `dlogits = (softmax - onehot) * grad_scale / rows`
    /// in `dlogits.dtype` (pass the loss scale as `grad_scale`).
    #[allow(clippy::too_many_arguments)]
    fn softmax_cross_entropy(
        &mut self,
        logits: Buf,
        labels: Buf,
        rows: usize,
        classes: usize,
        loss: Buf,
        dlogits: Buf,
        grad_scale: f32,
    ) -> Result<()>;

    /// Unfolds `images` images `x: [images, C, H, W]` into `cols: [images, C*K*K, OH*OW]` (zero padding).
    fn im2col(&mut self, x: Buf, g: &ConvGeom, images: usize, cols: Buf) -> Result<()>;

    /// The adjoint of [`Backend::im2col`]: `dx = sum of cols into their source pixels` (overwrites `dx`).
    fn col2im(&mut self, cols: Buf, g: &ConvGeom, images: usize, dx: Buf) -> Result<()>;

    /// Max-pool `x: [images, C, H, W]` to `y: [images, C, OH, OW]`, recording each max's flat input index
    /// within its image in `argmax` (I32, same length as `y`). Ties go to the first (row-major) position.
    fn maxpool(&mut self, x: Buf, g: &PoolGeom, images: usize, y: Buf, argmax: Buf) -> Result<()>;

    /// Scatters `dy` to the recorded positions: `dx` (overwritten) is zero elsewhere.
    fn maxpool_backward(&mut self, dy: Buf, argmax: Buf, g: &PoolGeom, images: usize, dx: Buf) -> Result<()>;

    /// Counts non-finite gradients and sums `(g * scale)^2` (the fused unscale-and-check of a mixed step).
    fn grad_stats(&mut self, grad: Buf, scale: f32) -> Result<GradStats>;

    /// Fused SGD update of `p.master`, its momentum and the working copy.
    fn sgd_step(&mut self, p: &ParamBufs, s: &SgdStep) -> Result<()>;

    /// Fused AdamW update of `p.master`, both moments and the working copy.
    fn adamw_step(&mut self, p: &ParamBufs, s: &AdamWStep) -> Result<()>;

    /// Counts the values of `src` that are non-zero but become zero when stored in `dtype` (they lie below
    /// half of `dtype`'s smallest subnormal). Returns `(flushed, non_zero)`. This makes f16 underflow
    /// visible; the provided version reads `src` back in small chunks, which is cheap for the loss gradients
    /// it is used on.
    fn count_underflow(&mut self, src: Buf, dtype: DType) -> Result<(usize, usize)> {
        let (mut flushed, mut non_zero) = (0, 0);
        let mut chunk = [0.0f32; 256];
        let mut done = 0;
        while done < src.len {
            let n = chunk.len().min(src.len - done);
            self.download(src.slice(done, n), &mut chunk[..n])?;
            for &v in &chunk[..n] {
                if v != 0.0 {
                    non_zero += 1;
                    if dtype.round(v) == 0.0 {
                        flushed += 1;
                    }
                }
            }
            done += n;
        }
        Ok((flushed, non_zero))
    }

    /// Writes the arg-max class of each row of `logits: [rows, classes]` into `out` (`out.len() == rows`);
    /// ties go to the lowest index, NaN never wins. The provided version reads the logits back in small
    /// chunks; a device backend overrides it so that only `rows` indices cross the bus.
    fn argmax(&mut self, logits: Buf, rows: usize, classes: usize, out: &mut [u32]) -> Result<()> {
        if out.len() != rows {
            return Err(crate::error::Error::ShapeMismatch { what: "argmax output", expected: rows, got: out.len() });
        }
        let mut chunk = [0.0f32; 256];
        for (r, o) in out.iter_mut().enumerate() {
            let (mut best, mut best_j) = (f32::NEG_INFINITY, 0);
            let mut j = 0;
            while j < classes {
                let n = chunk.len().min(classes - j);
                self.download(logits.slice(r * classes + j, n), &mut chunk[..n])?;
                for (k, &v) in chunk[..n].iter().enumerate() {
                    if v > best {
                        best = v;
                        best_j = j + k;
                    }
                }
                j += n;
            }
            *o = best_j as u32;
        }
        Ok(())
    }

    /// Counts the rows of `logits: [rows, classes]` whose arg-max (as [`Backend::argmax`]) equals `labels`
    /// (I32). The provided version goes through `argmax` and reads the labels back in chunks.
    fn count_correct(&mut self, logits: Buf, labels: Buf, rows: usize, classes: usize) -> Result<usize> {
        let (mut pred, mut lab) = ([0u32; 256], [0.0f32; 256]);
        let mut correct = 0;
        let mut r = 0;
        while r < rows {
            let n = pred.len().min(rows - r);
            self.argmax(logits.slice(r * classes, n * classes), n, classes, &mut pred[..n])?;
            self.download(labels.slice(r, n), &mut lab[..n])?;
            correct += pred[..n].iter().zip(&lab[..n]).filter(|(&p, &l)| p as f32 == l).count();
            r += n;
        }
        Ok(correct)
    }

    /// Waits for queued work to finish (a no-op on synchronous backends).
    fn synchronize(&mut self) -> Result<()> {
        Ok(())
    }

    /// A GEMM with a fused epilogue (see [`Epilogue`]). The provided version composes unfused ops.
    fn gemm_fused(&mut self, g: &Gemm, ep: &Epilogue) -> Result<()> {
        gemm_fused_composed(self, g, ep)
    }

    /// A linear layer fed by an activation, forward, in as few passes as the backend can (see
    /// [`LinearActForward`]). Returns whether `x` now holds `act(pre)` (a backend that computes `y` straight
    /// from `pre` need not store it). The provided version composes the activation, a GEMM and `add_bias`.
    fn linear_act_forward(&mut self, op: &LinearActForward) -> Result<bool> {
        linear_act_forward_composed(self, op)?;
        Ok(true)
    }

    /// A linear layer's backward through the activation before it, in as few passes as the backend can (see
    /// [`LinearActBackward`]). The provided version composes a GEMM, `bias_grad` and `gemm_fused`.
    fn linear_act_backward(&mut self, op: &LinearActBackward) -> Result<()> {
        linear_act_backward_composed(self, op)
    }

    // ---- Steps decided where the data is (see `crate::control`). `ctl` is the control block: an I32 buffer
    // of `control::WORDS` words. The provided versions read it back, compute on the host and write it again.

    /// [`Backend::softmax_cross_entropy`] with `grad_scale` further multiplied by the block's loss scale.
    #[allow(clippy::too_many_arguments)]
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
        let c = read_control(self, ctl)?;
        let s = c.f32(control::SCALE);
        self.softmax_cross_entropy(logits, labels, rows, classes, loss, dlogits, grad_scale * s)
    }

    /// The loss of a step decided on the device, in as few passes as the backend can (see [`LossTo`]): the mean
    /// loss, the logits' gradient in `dlogits.dtype`, and in the block `LAST_CORRECT` (as
    /// [`Backend::count_correct_to`]) and, for a 16-bit `dlogits`, `LAST_FLUSHED` and `LAST_NON_ZERO` (as
    /// [`Backend::count_underflow_to`] on the f32 gradient). The provided version composes those ops.
    fn softmax_cross_entropy_to(&mut self, op: &LossTo) -> Result<()> {
        softmax_cross_entropy_to_composed(self, op)
    }

    /// [`Backend::count_correct`], written to the block's `LAST_CORRECT` word.
    fn count_correct_to(&mut self, logits: Buf, labels: Buf, rows: usize, classes: usize, ctl: Buf) -> Result<()> {
        let n = self.count_correct(logits, labels, rows, classes)?;
        let mut c = read_control(self, ctl)?;
        c.words[control::LAST_CORRECT] = n as u32;
        write_control(self, ctl, &c)
    }

    /// [`Backend::count_underflow`], written to the block's `LAST_FLUSHED` and `LAST_NON_ZERO` words.
    fn count_underflow_to(&mut self, src: Buf, dtype: DType, ctl: Buf) -> Result<()> {
        let (flushed, non_zero) = self.count_underflow(src, dtype)?;
        let mut c = read_control(self, ctl)?;
        c.words[control::LAST_FLUSHED] = flushed as u32;
        c.words[control::LAST_NON_ZERO] = non_zero as u32;
        write_control(self, ctl, &c)
    }

    /// The decision of a step: unscales and checks `grad` with the block's scale ([`Backend::grad_stats`]),
    /// copies `loss[0]` (f32) to `LAST_LOSS`, and runs [`control::decide`].
    fn step_control(&mut self, ctl: Buf, grad: Buf, loss: Buf, rule: &control::StepRule) -> Result<()> {
        let mut c = read_control(self, ctl)?;
        let stats = self.grad_stats(grad, 1.0 / c.f32(control::SCALE))?;
        let mut l = [0.0f32];
        self.download(loss.prefix(1), &mut l)?;
        c.set_f32(control::LAST_LOSS, l[0]);
        control::decide(&mut c, rule, stats.non_finite as u64, stats.sum_sq);
        write_control(self, ctl, &c)
    }

    /// [`Backend::adamw_step`] when the block says the last step applies, with its gradient multiplier and
    /// bias corrections (those fields of `s` are ignored); nothing otherwise.
    fn adamw_step_gated(&mut self, p: &ParamBufs, s: &AdamWStep, ctl: Buf) -> Result<()> {
        let c = read_control(self, ctl)?;
        if c.words[control::LAST_APPLIED] == 0 {
            return Ok(());
        }
        let s = AdamWStep {
            grad_scale: c.f32(control::GRAD_MUL),
            bias_correction1: c.f32(control::BIAS_CORRECTION1),
            bias_correction2: c.f32(control::BIAS_CORRECTION2),
            ..*s
        };
        self.adamw_step(p, &s)
    }

    /// [`Backend::sgd_step`] when the block says the last step applies, with its gradient multiplier.
    fn sgd_step_gated(&mut self, p: &ParamBufs, s: &SgdStep, ctl: Buf) -> Result<()> {
        let c = read_control(self, ctl)?;
        if c.words[control::LAST_APPLIED] == 0 {
            return Ok(());
        }
        self.sgd_step(p, &SgdStep { grad_scale: c.f32(control::GRAD_MUL), ..*s })
    }

    // ---- Recording (CUDA graphs). A backend that queues work can record a sequence of ops once and replay it;
    // the provided versions say it cannot, and the trainer then simply runs the ops.

    /// Starts recording: the ops that follow are recorded, not run, until [`Backend::record_end`]. Returns
    /// `false` (and changes nothing) when the backend does not record.
    fn record_begin(&mut self) -> Result<bool> {
        Ok(false)
    }

    /// Ends the recording. With `keep`, returns an id for [`Backend::replay`]; without, discards it (an op
    /// failed while recording).
    fn record_end(&mut self, keep: bool) -> Result<Option<usize>> {
        let _ = keep;
        Err(Error::InvalidConfig("record_end without record_begin"))
    }

    /// Runs recording `id` again (same buffers, same constants).
    fn replay(&mut self, id: usize) -> Result<()> {
        let _ = id;
        Err(Error::InvalidConfig("this backend has no recordings"))
    }

    /// Frees every recording (their ids become invalid).
    fn clear_recordings(&mut self) {}
}

/// Reads the control block `ctl` (I32, [`control::WORDS`] long) to the host.
pub fn read_control<B: Backend + ?Sized>(be: &mut B, ctl: Buf) -> Result<control::Control> {
    check_control(ctl)?;
    let mut bytes = [0u8; control::WORDS * 4];
    be.download_bytes(ctl, &mut bytes)?;
    Ok(control::Control::from_bytes(&bytes))
}

/// Writes the control block `ctl` from the host.
pub fn write_control<B: Backend + ?Sized>(be: &mut B, ctl: Buf, c: &control::Control) -> Result<()> {
    check_control(ctl)?;
    be.upload_bytes(ctl, &c.to_bytes())
}

/// The control block is an I32 buffer of exactly [`control::WORDS`] words.
pub fn check_control(ctl: Buf) -> Result<()> {
    if ctl.dtype != DType::I32 {
        return Err(Error::UnsupportedDType { what: "step control block (I32)", dtype: ctl.dtype });
    }
    ctl.check_len(control::WORDS, "step control block")?;
    if ctl.len != control::WORDS {
        return Err(Error::ShapeMismatch { what: "step control block words", expected: control::WORDS, got: ctl.len });
    }
    Ok(())
}
