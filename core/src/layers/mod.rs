//! Layers, one file each, forward and backward side by side.
//!
//! Shapes in comments: `B` rows in the batch, `I`/`O` features in/out, `C`/`OC` channels, `H`/`W` height and
//! width, `K` kernel size, `P = OH * OW` output positions. Tensors are row-major, images NCHW.
//!
//! A layer owns no memory. The trainer hands it [`Fwd`]/[`Bwd`] with buffer handles for this step and
//! [`LayerParams`]: explicit views of its weight and bias (trainable working copy, or frozen storage) and of
//! their gradients (`None` for a frozen tensor). In the model's flat parameter order a layer's parameters are a
//! contiguous range starting at its `param_offset` (weight first, then bias, as PyTorch orders them).

mod conv2d;
mod flatten;
mod gelu;
mod linear;
mod maxpool2d;
mod relu;
mod softmax_xent;

pub use conv2d::Conv2d;
pub use flatten::Flatten;
pub use gelu::Gelu;
pub use linear::Linear;
pub use maxpool2d::MaxPool2d;
pub use relu::Relu;
pub use softmax_xent::SoftmaxCrossEntropy;

use crate::arena::Buf;
use crate::backend::Backend;
use crate::dtype::DType;
use crate::error::Result;

/// The shape of one sample: `C x H x W` (a flat feature vector is `N x 1 x 1`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Shape {
    pub c: usize,
    pub h: usize,
    pub w: usize,
}

impl Shape {
    pub const fn flat(n: usize) -> Shape {
        Shape { c: n, h: 1, w: 1 }
    }
    pub const fn image(c: usize, h: usize, w: usize) -> Shape {
        Shape { c, h, w }
    }
    pub const fn len(&self) -> usize {
        self.c * self.h * self.w
    }
    pub const fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub const fn is_flat(&self) -> bool {
        self.h == 1 && self.w == 1
    }
}

impl core::fmt::Display for Shape {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        if self.is_flat() {
            write!(f, "{}", self.c)
        } else {
            write!(f, "{}x{}x{}", self.c, self.h, self.w)
        }
    }
}

/// One layer's parameters as it reads and writes them.
///
/// `weight` and `bias` are the trainable working copy (compute dtype), the f32 master weights (a float32 layer
/// under a mixed policy), or frozen storage in any float dtype. Matrix products need the weight in the compute
/// dtype: a weight stored otherwise is converted a block at a time into `widen` (exact when widening), so a
/// bf16-stored frozen weight never needs an f32 copy of its whole size. `add_bias` reads any dtype directly.
#[derive(Clone, Copy, Debug)]
pub struct LayerParams {
    /// Linear `[O, I]`, Conv2d `[OC, C*K*K]`.
    pub weight: Buf,
    /// `[O]` / `[OC]`.
    pub bias: Buf,
    /// f32 weight gradient to overwrite; `None`: the weight is frozen.
    pub dweight: Option<Buf>,
    /// f32 bias gradient to overwrite; `None`: the bias is frozen.
    pub dbias: Option<Buf>,
    /// Conversion scratch in the compute dtype, holding at least one row and one column of the weight; empty
    /// when the weight is stored in the compute dtype.
    pub widen: Buf,
}

impl LayerParams {
    /// For layers without parameters.
    pub const NONE: LayerParams =
        LayerParams { weight: Buf::EMPTY, bias: Buf::EMPTY, dweight: None, dbias: None, widen: Buf::EMPTY };
}

/// Elements of conversion scratch a weight `[rows, cols]` stored in another dtype than its layer computes in
/// asks for: a block of about this many elements, and never less than one row or one column.
pub const WIDEN_BLOCK: usize = 1024;

/// Elements of `widen` scratch for a `[rows, cols]` weight: see [`WIDEN_BLOCK`].
pub const fn widen_len(rows: usize, cols: usize) -> usize {
    let want = if WIDEN_BLOCK > rows { WIDEN_BLOCK } else { rows };
    let want = if want > cols { want } else { cols };
    if want < rows * cols {
        want
    } else {
        rows * cols
    }
}

/// How many rows (or columns, with `per = rows`) of `[_, per]` elements fit one block of `p.widen`, or all
/// `total` when `w` needs no conversion to `dtype`.
fn block_count(w: Buf, dtype: crate::dtype::DType, widen: Buf, per: usize, total: usize) -> Result<usize> {
    if w.dtype == dtype {
        return Ok(total);
    }
    let fit = widen.bytes() / dtype.size() / per.max(1);
    if fit == 0 {
        return Err(crate::error::Error::InvalidConfig(
            "internal: a weight stored in another dtype reached a layer without conversion scratch",
        ));
    }
    Ok(fit.min(total))
}

/// Rows `r0..r0 + rn`, columns `c0..c0 + cn` of the row-major matrix `w: [_, cols]`, in `dtype`: a view into
/// `w` itself when it is stored in `dtype` (leading dimension `cols`), else a copy packed `[rn, cn]` in `widen`
/// (leading dimension `cn`). Returns the view and its leading dimension.
#[allow(clippy::too_many_arguments)]
fn weight_block<B: Backend>(
    be: &mut B,
    w: Buf,
    cols: usize,
    (r0, rn): (usize, usize),
    (c0, cn): (usize, usize),
    dtype: crate::dtype::DType,
    widen: Buf,
) -> Result<(Buf, usize)> {
    if w.dtype == dtype {
        return Ok((w.slice(r0 * cols + c0, (rn - 1) * cols + cn), cols));
    }
    let dst = crate::plan::retype(widen, dtype, rn * cn);
    if cn == cols {
        be.cast(w.slice(r0 * cols, rn * cols), dst)?;
    } else {
        for r in 0..rn {
            be.cast(w.slice((r0 + r) * cols + c0, cn), dst.slice(r * cn, cn))?;
        }
    }
    Ok((dst, cn))
}

/// A forward call: `y = layer(x)` for `rows` samples.
#[derive(Clone, Copy, Debug)]
pub struct Fwd {
    /// `[rows, in_shape]`
    pub x: Buf,
    /// `[rows, out_shape]`
    pub y: Buf,
    /// Per-step state the backward pass needs (max-pool positions); empty for most layers.
    pub aux: Buf,
    /// Shared scratch (im2col columns); contents do not survive to the backward pass.
    pub scratch: Buf,
    pub rows: usize,
}

/// A backward call: from `dy` compute the parameter gradients and, when `dx` is given, the input gradient.
#[derive(Clone, Copy, Debug)]
pub struct Bwd {
    pub x: Buf,
    pub y: Buf,
    pub dy: Buf,
    /// `None` for the first trainable layer: nothing upstream needs the input gradient.
    pub dx: Option<Buf>,
    pub aux: Buf,
    pub scratch: Buf,
    pub rows: usize,
}

/// One layer of a sequential model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Layer {
    Linear(Linear),
    Relu(Relu),
    Gelu(Gelu),
    Conv2d(Conv2d),
    MaxPool2d(MaxPool2d),
    Flatten(Flatten),
}

impl Layer {
    /// Short name for tables, errors and checkpoints.
    pub fn kind(&self) -> &'static str {
        match self {
            Layer::Linear(_) => "Linear",
            Layer::Relu(_) => "ReLU",
            Layer::Gelu(_) => "GELU",
            Layer::Conv2d(_) => "Conv2d",
            Layer::MaxPool2d(_) => "MaxPool2d",
            Layer::Flatten(_) => "Flatten",
        }
    }

    pub fn in_shape(&self) -> Shape {
        match self {
            Layer::Linear(l) => Shape::flat(l.in_features),
            Layer::Relu(l) => l.shape,
            Layer::Gelu(l) => l.shape,
            Layer::Conv2d(l) => Shape::image(l.geom.channels, l.geom.height, l.geom.width),
            Layer::MaxPool2d(l) => Shape::image(l.geom.channels, l.geom.height, l.geom.width),
            Layer::Flatten(l) => l.shape,
        }
    }

    pub fn out_shape(&self) -> Shape {
        match self {
            Layer::Linear(l) => Shape::flat(l.out_features),
            Layer::Relu(l) => l.shape,
            Layer::Gelu(l) => l.shape,
            Layer::Conv2d(l) => Shape::image(l.out_channels, l.geom.out_height, l.geom.out_width),
            Layer::MaxPool2d(l) => Shape::image(l.geom.channels, l.geom.out_height, l.geom.out_width),
            Layer::Flatten(l) => Shape::flat(l.shape.len()),
        }
    }

    /// Number of parameters (f32 elements of the flat vectors).
    pub fn param_len(&self) -> usize {
        match self {
            Layer::Linear(l) => l.param_len(),
            Layer::Conv2d(l) => l.param_len(),
            _ => 0,
        }
    }

    /// The named parameter tensors of this layer: `(name, offset in the flat vector, shape)`.
    pub fn tensors(&self) -> heapless::Vec<(&'static str, usize, heapless::Vec<usize, 4>), 2> {
        let mut out = heapless::Vec::new();
        let mut push = |name, off, dims: &[usize]| {
            let _ = out.push((name, off, heapless::Vec::from_slice(dims).unwrap_or_default()));
        };
        match self {
            Layer::Linear(l) => {
                push("weight", l.weight_offset(), &[l.out_features, l.in_features]);
                push("bias", l.bias_offset(), &[l.out_features]);
            }
            Layer::Conv2d(l) => {
                let g = &l.geom;
                push("weight", l.weight_offset(), &[l.out_channels, g.channels, g.kernel, g.kernel]);
                push("bias", l.bias_offset(), &[l.out_channels]);
            }
            _ => {}
        }
        out
    }

    /// Whether the layer's output is a view of its input (no buffer of its own).
    /// The element-wise activation this layer applies, if it is one (what a fused GEMM epilogue can take).
    pub fn activation(&self) -> Option<crate::backend::Activation> {
        match self {
            Layer::Relu(_) => Some(crate::backend::Activation::Relu),
            Layer::Gelu(_) => Some(crate::backend::Activation::GeluTanh),
            _ => None,
        }
    }

    pub fn aliases_input(&self) -> bool {
        matches!(self, Layer::Flatten(_))
    }

    /// Per-sample elements of per-step state kept for the backward pass, and its dtype.
    pub fn aux_len(&self) -> (usize, DType) {
        match self {
            Layer::MaxPool2d(l) => (l.geom.out_len(), DType::I32),
            _ => (0, DType::I32),
        }
    }

    /// Per-sample elements of shared scratch (in the compute dtype).
    pub fn scratch_len(&self) -> usize {
        match self {
            Layer::Conv2d(l) => l.geom.col_rows() * l.geom.col_cols(),
            _ => 0,
        }
    }

    pub fn forward<B: Backend>(&self, be: &mut B, p: &LayerParams, io: &Fwd) -> Result<()> {
        match self {
            Layer::Linear(l) => l.forward(be, p, io),
            Layer::Relu(l) => l.forward(be, io),
            Layer::Gelu(l) => l.forward(be, io),
            Layer::Conv2d(l) => l.forward(be, p, io),
            Layer::MaxPool2d(l) => l.forward(be, io),
            Layer::Flatten(_) => Ok(()),
        }
    }

    pub fn backward<B: Backend>(&self, be: &mut B, p: &LayerParams, io: &Bwd) -> Result<()> {
        match self {
            Layer::Linear(l) => l.backward(be, p, io),
            Layer::Relu(l) => l.backward(be, io),
            Layer::Gelu(l) => l.backward(be, io),
            Layer::Conv2d(l) => l.backward(be, p, io),
            Layer::MaxPool2d(l) => l.backward(be, io),
            // The output is the input seen flat: the gradient passes through unchanged. The trainer hands
            // Flatten the same buffer as dy and dx, so there is nothing to copy.
            Layer::Flatten(_) => Ok(()),
        }
    }

    /// The bound of PyTorch's default initialisation for this layer's weight and bias: `1/sqrt(fan_in)`
    /// (`None` for layers without parameters).
    pub fn init_bound(&self) -> Option<f32> {
        let fan_in = match self {
            Layer::Linear(l) => l.in_features,
            Layer::Conv2d(l) => l.geom.col_rows(),
            _ => return None,
        };
        Some(1.0 / libm::sqrtf(fan_in as f32))
    }

    /// Fills this layer's parameters with PyTorch's default initialisation (uniform in
    /// `+-1/sqrt(fan_in)` for weight and bias), drawing from `rng`, into the f32 master vector (in the model's
    /// flat parameter order).
    pub fn init<B: Backend>(&self, be: &mut B, master: Buf, rng: &mut crate::rng::Rng) -> Result<()> {
        let Some(bound) = self.init_bound() else {
            return Ok(());
        };
        let (start, len) = match self {
            Layer::Linear(l) => (l.param_offset, l.param_len()),
            Layer::Conv2d(l) => (l.param_offset, l.param_len()),
            _ => return Ok(()),
        };
        // Upload in small chunks: no heap here.
        let mut chunk = [0.0f32; 256];
        let mut done = 0;
        while done < len {
            let n = chunk.len().min(len - done);
            for v in &mut chunk[..n] {
                *v = rng.uniform(-bound, bound);
            }
            be.upload(master.slice(start + done, n), &chunk[..n])?;
            done += n;
        }
        Ok(())
    }
}
