//! Sequential models: a fixed-capacity list of layers with shapes checked when the model is built.

use heapless::Vec;

use crate::backend::{ConvGeom, PoolGeom};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::layers::{Conv2d, Flatten, Gelu, Layer, Linear, MaxPool2d, Relu, Shape, SoftmaxCrossEntropy};
use crate::policy::Policy;

/// The most layers a model holds (no heap: the list is inline).
pub const MAX_LAYERS: usize = 32;

/// A built model: layers with their shapes and parameter ranges, ending in a softmax cross-entropy head.
#[derive(Clone, Debug, PartialEq)]
pub struct Model {
    input: Shape,
    layers: Vec<Layer, MAX_LAYERS>,
    params: usize,
    /// Per-layer compute-dtype overrides (Keras' per-layer `dtype`): `Some(F32)` keeps that layer in float32
    /// under a mixed policy.
    overrides: [Option<DType>; MAX_LAYERS],
}

impl Model {
    /// Starts a sequential model that takes samples of shape `input`.
    pub fn sequential(input: Shape) -> ModelBuilder {
        ModelBuilder {
            input,
            current: input,
            layers: Vec::new(),
            params: 0,
            error: None,
            overrides: [None; MAX_LAYERS],
        }
    }

    pub fn input(&self) -> Shape {
        self.input
    }

    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }

    /// Total trainable parameters.
    pub fn param_len(&self) -> usize {
        self.params
    }

    /// Number of classes of the loss head (the last layer's output features).
    pub fn classes(&self) -> usize {
        self.output().len()
    }

    pub fn output(&self) -> Shape {
        self.layers.last().map(|l| l.out_shape()).unwrap_or(self.input)
    }

    pub fn loss(&self) -> SoftmaxCrossEntropy {
        SoftmaxCrossEntropy { classes: self.classes() }
    }

    /// The compute dtype of layer `i` under `policy`: its override for Linear and Conv2d layers, the dtype
    /// of its input for element-wise layers (they compute in whatever precision reaches them).
    pub fn compute_dtype(&self, i: usize, policy: Policy) -> DType {
        self.out_dtypes(policy)[i]
    }

    /// The dtype each layer's output is stored in under `policy`.
    pub fn out_dtypes(&self, policy: Policy) -> [DType; MAX_LAYERS] {
        let mut out = [policy.compute; MAX_LAYERS];
        let mut prev = policy.compute;
        for (i, layer) in self.layers.iter().enumerate() {
            let d = if layer.param_len() > 0 { self.overrides[i].unwrap_or(policy.compute) } else { prev };
            out[i] = d;
            prev = d;
        }
        out
    }

    /// Whether layer `i` has a per-layer override.
    pub fn override_of(&self, i: usize) -> Option<DType> {
        self.overrides.get(i).copied().flatten()
    }
}

/// Builds a [`Model`] layer by layer. The first invalid layer's error is kept and returned by `build`, so a
/// chain of calls needs no `?` on each.
#[derive(Clone, Debug)]
pub struct ModelBuilder {
    input: Shape,
    current: Shape,
    layers: Vec<Layer, MAX_LAYERS>,
    params: usize,
    error: Option<Error>,
    overrides: [Option<DType>; MAX_LAYERS],
}

impl ModelBuilder {
    fn push(mut self, make: impl FnOnce(Shape, usize) -> Result<Layer>) -> Self {
        if self.error.is_some() {
            return self;
        }
        match make(self.current, self.params) {
            Ok(layer) => {
                self.current = layer.out_shape();
                self.params += layer.param_len();
                if self.layers.push(layer).is_err() {
                    self.error = Some(Error::InvalidModel("too many layers (the limit is MAX_LAYERS = 32)"));
                }
            }
            Err(e) => self.error = Some(e),
        }
        self
    }

    /// Fully connected layer to `out` features. The input must be flat (use `flatten()` after convolutions).
    pub fn linear(self, out: usize) -> Self {
        self.push(|s, off| {
            if !s.is_flat() {
                return Err(Error::InvalidModel("Linear needs a flat input: add flatten() before it"));
            }
            if out == 0 || s.c == 0 {
                return Err(Error::InvalidModel("Linear with zero features"));
            }
            Ok(Layer::Linear(Linear { in_features: s.c, out_features: out, param_offset: off }))
        })
    }

    pub fn relu(self) -> Self {
        self.push(|s, _| Ok(Layer::Relu(Relu { shape: s })))
    }

    /// GELU, tanh approximation.
    pub fn gelu(self) -> Self {
        self.push(|s, _| Ok(Layer::Gelu(Gelu { shape: s })))
    }

    /// 2-D convolution to `out_channels`, square `kernel`, `stride`, zero `padding`.
    pub fn conv2d(self, out_channels: usize, kernel: usize, stride: usize, padding: usize) -> Self {
        self.push(|s, off| {
            if out_channels == 0 || kernel == 0 || stride == 0 {
                return Err(Error::InvalidModel("Conv2d needs non-zero channels, kernel and stride"));
            }
            if s.h + 2 * padding < kernel || s.w + 2 * padding < kernel {
                return Err(Error::InvalidModel("Conv2d kernel larger than the padded input"));
            }
            let geom = ConvGeom {
                channels: s.c,
                height: s.h,
                width: s.w,
                kernel,
                stride,
                padding,
                out_height: (s.h + 2 * padding - kernel) / stride + 1,
                out_width: (s.w + 2 * padding - kernel) / stride + 1,
            };
            Ok(Layer::Conv2d(Conv2d { geom, out_channels, param_offset: off }))
        })
    }

    /// 2-D max pooling, square `kernel`, `stride`, no padding.
    pub fn maxpool2d(self, kernel: usize, stride: usize) -> Self {
        self.push(|s, _| {
            if kernel == 0 || stride == 0 {
                return Err(Error::InvalidModel("MaxPool2d needs non-zero kernel and stride"));
            }
            if s.h < kernel || s.w < kernel {
                return Err(Error::InvalidModel("MaxPool2d kernel larger than the input"));
            }
            let geom = PoolGeom {
                channels: s.c,
                height: s.h,
                width: s.w,
                kernel,
                stride,
                out_height: (s.h - kernel) / stride + 1,
                out_width: (s.w - kernel) / stride + 1,
            };
            Ok(Layer::MaxPool2d(MaxPool2d { geom }))
        })
    }

    /// Runs the layer just added under `policy`'s compute dtype whatever the model's policy, as Keras' per-layer
    /// `dtype=` does; the usual use is `.linear(classes).dtype_policy(Policy::FLOAT32)` to keep the output
    /// layer in float32 under a mixed policy. Only Linear and Conv2d take an override (element-wise layers
    /// follow their input), and only `float32` is supported: the working copy holds one 16-bit dtype.
    pub fn dtype_policy(mut self, policy: Policy) -> Self {
        if self.error.is_some() {
            return self;
        }
        let Some(last) = self.layers.last() else {
            self.error = Some(Error::InvalidModel("dtype_policy() needs a layer before it"));
            return self;
        };
        if last.param_len() == 0 {
            self.error = Some(Error::InvalidModel(
                "dtype_policy() applies to Linear and Conv2d; element-wise layers follow their input's dtype",
            ));
            return self;
        }
        if policy.compute != DType::F32 {
            self.error = Some(Error::InvalidModel("per-layer dtype_policy() supports float32 only"));
            return self;
        }
        self.overrides[self.layers.len() - 1] = Some(policy.compute);
        self
    }

    pub fn flatten(self) -> Self {
        self.push(|s, _| Ok(Layer::Flatten(Flatten { shape: s })))
    }

    pub fn build(self) -> Result<Model> {
        if let Some(e) = self.error {
            return Err(e);
        }
        if self.layers.is_empty() {
            return Err(Error::InvalidModel("a model needs at least one layer"));
        }
        if self.input.is_empty() {
            return Err(Error::InvalidModel("the input shape is empty"));
        }
        if !self.current.is_flat() || self.current.c < 2 {
            return Err(Error::InvalidModel(
                "the last layer must output a flat vector of at least 2 class scores (end with linear(classes))",
            ));
        }
        Ok(Model { input: self.input, layers: self.layers, params: self.params, overrides: self.overrides })
    }
}
