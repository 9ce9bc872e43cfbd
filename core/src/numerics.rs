//! Check-numerics: what the first non-finite value looked like and where it appeared.

use crate::dtype::DType;

/// The phase of a training step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Phase {
    Forward,
    Backward,
    Update,
}

impl Phase {
    pub fn name(&self) -> &'static str {
        match self {
            Phase::Forward => "forward",
            Phase::Backward => "backward",
            Phase::Update => "update",
        }
    }
}

/// Where check-numerics stopped a step.
#[derive(Clone, Copy, Debug, PartialEq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct NonFiniteReport {
    /// Index of the layer in the model (`None` for the loss head or the whole parameter vector).
    pub layer: Option<usize>,
    /// The layer kind (`Linear`, `Conv2d`, ...) or `loss` / `optimizer`.
    pub kind: &'static str,
    /// The tensor that held the value (`output`, `input gradient`, `weight gradient`, `master weights`).
    pub op: &'static str,
    pub phase: Phase,
    pub dtype: DType,
    /// Elements per sample and rows (or `[len, 1]` for parameter vectors).
    pub shape: [usize; 2],
    pub nan: usize,
    pub inf: usize,
}

impl core::fmt::Display for NonFiniteReport {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "non-finite values in the {} phase: ", self.phase.name())?;
        match self.layer {
            Some(i) => write!(f, "layer {i} ({})", self.kind)?,
            None => write!(f, "{}", self.kind)?,
        }
        write!(
            f,
            ", {} [{} x {}] {}: {} NaN, {} Inf",
            self.op, self.shape[0], self.shape[1], self.dtype, self.nan, self.inf
        )
    }
}
