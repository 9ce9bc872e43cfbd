//! Partial training: which parameter tensors train, and where each tensor lives.
//!
//! Fine-tuning on a device rarely trains everything. Freezing the early layers (or every weight, training the
//! biases only, as BitFit does) cuts three costs at once, and the memory plan shows each:
//! - frozen tensors have no f32 master copy, no gradient and no optimizer state: they live in one *frozen*
//!   vector, stored in the compute dtype or narrower (`bfloat16` halves them under `float32`);
//! - the backward pass stops at the first trainable layer: no input gradient there, nothing before it;
//! - layers before the first trainable layer keep no activations: their outputs alternate between two
//!   forward-only buffers.
//!
//! Trainable tensors are packed, in model order, into compact master / working / gradient / state vectors; frozen
//! ones, in model order, into the frozen vector. With [`Trainable::All`] the packing is the identity: every
//! offset equals the tensor's offset in the model's flat parameter order, and nothing is frozen.

use crate::error::{Error, Result};
use crate::model::{Model, MAX_LAYERS};

/// Which parameters a [`crate::Trainer`] updates.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Trainable {
    /// Every parameter (training from scratch, or full fine-tuning).
    #[default]
    All,
    /// The last `k` layers that have parameters (Linear, Conv2d, counted from the end); earlier ones are frozen.
    LastLayers(usize),
    /// The biases of every layer; all weights frozen (BitFit).
    BiasOnly,
}

impl Trainable {
    /// Whether anything is frozen.
    pub fn is_partial(&self) -> bool {
        !matches!(self, Trainable::All)
    }
}

impl core::fmt::Display for Trainable {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Trainable::All => f.write_str("all layers"),
            Trainable::LastLayers(1) => f.write_str("last layer"),
            Trainable::LastLayers(k) => write!(f, "last {k} layers"),
            Trainable::BiasOnly => f.write_str("biases only"),
        }
    }
}

/// Where one parameter tensor lives.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TensorLoc {
    /// In the trainable vectors (master, working, gradients, optimizer state) or in the frozen vector.
    pub trainable: bool,
    /// Element offset within that vector.
    pub offset: usize,
    /// Elements (0: the layer has no such tensor).
    pub len: usize,
    /// Element offset in the model's flat parameter order ([`crate::layers::Layer::tensors`]).
    pub model_offset: usize,
}

/// Where every parameter tensor of a model lives under a [`Trainable`] choice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParamLayout {
    /// Per layer: `[weight, bias]`.
    tensors: [[TensorLoc; 2]; MAX_LAYERS],
    trainable: Trainable,
    trainable_len: usize,
    frozen_len: usize,
    first_trainable: usize,
}

impl ParamLayout {
    pub fn new(model: &Model, trainable: Trainable) -> Result<ParamLayout> {
        let with_params = model.layers().iter().filter(|l| l.param_len() > 0).count();
        if let Trainable::LastLayers(k) = trainable {
            if k == 0 {
                return Err(Error::InvalidConfig("Trainable::LastLayers(0) trains nothing: use k >= 1"));
            }
            if k > with_params {
                return Err(Error::InvalidConfig(
                    "Trainable::LastLayers(k): k is larger than the number of layers with parameters",
                ));
            }
        }
        let mut tensors = [[TensorLoc::default(); 2]; MAX_LAYERS];
        let (mut t_len, mut f_len) = (0usize, 0usize);
        let mut first = None;
        let mut param_layer = 0usize;
        for (i, layer) in model.layers().iter().enumerate() {
            if layer.param_len() == 0 {
                continue;
            }
            for (j, (name, model_offset, dims)) in layer.tensors().into_iter().enumerate().take(2) {
                let len: usize = dims.iter().product();
                let train = match trainable {
                    Trainable::All => true,
                    Trainable::LastLayers(k) => param_layer + k >= with_params,
                    Trainable::BiasOnly => name == "bias",
                };
                let vec_len = if train { &mut t_len } else { &mut f_len };
                tensors[i][j] = TensorLoc { trainable: train, offset: *vec_len, len, model_offset };
                *vec_len += len;
                if train && first.is_none() {
                    first = Some(i);
                }
            }
            param_layer += 1;
        }
        let Some(first_trainable) = first else {
            return Err(Error::InvalidConfig("nothing to train: the model has no trainable parameters"));
        };
        Ok(ParamLayout { tensors, trainable, trainable_len: t_len, frozen_len: f_len, first_trainable })
    }

    /// `[weight, bias]` of layer `i` (zero-length locations for layers without parameters).
    pub fn layer(&self, i: usize) -> [TensorLoc; 2] {
        self.tensors.get(i).copied().unwrap_or_default()
    }

    pub fn trainable(&self) -> Trainable {
        self.trainable
    }

    /// Elements of each trainable vector (master, gradients, optimizer state).
    pub fn trainable_len(&self) -> usize {
        self.trainable_len
    }

    /// Elements of the frozen vector.
    pub fn frozen_len(&self) -> usize {
        self.frozen_len
    }

    /// The first layer with a trainable tensor: the backward pass ends there, and the layers before it keep
    /// no activations.
    pub fn first_trainable(&self) -> usize {
        self.first_trainable
    }

    /// Every tensor with its layer index, in model order.
    pub fn iter(&self, layers: usize) -> impl Iterator<Item = (usize, TensorLoc)> + '_ {
        self.tensors[..layers.min(MAX_LAYERS)]
            .iter()
            .enumerate()
            .flat_map(|(i, t)| t.iter().filter(|l| l.len > 0).map(move |l| (i, *l)))
    }
}
