//! Optimizers on f32 master weights with f32 state. Each update is one fused backend call that also writes
//! the working copy in the compute dtype.

mod adamw;
mod sgd;

pub use adamw::AdamW;
pub use sgd::Sgd;

use crate::backend::{Backend, ParamBufs};
use crate::error::Result;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Optimizer {
    Sgd(Sgd),
    AdamW(AdamW),
}

impl Optimizer {
    /// f32 state vectors per parameter: SGD with momentum 1, plain SGD 0, AdamW 2.
    pub fn state_vectors(&self) -> usize {
        match self {
            Optimizer::Sgd(s) => usize::from(s.momentum != 0.0),
            Optimizer::AdamW(_) => 2,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Optimizer::Sgd(_) => "SGD",
            Optimizer::AdamW(_) => "AdamW",
        }
    }

    pub fn lr(&self) -> f32 {
        match self {
            Optimizer::Sgd(s) => s.lr,
            Optimizer::AdamW(a) => a.lr,
        }
    }

    pub fn set_lr(&mut self, lr: f32) {
        match self {
            Optimizer::Sgd(s) => s.lr = lr,
            Optimizer::AdamW(a) => a.lr = lr,
        }
    }

    pub fn validate(&self) -> Result<()> {
        match self {
            Optimizer::Sgd(s) => s.validate(),
            Optimizer::AdamW(a) => a.validate(),
        }
    }

    /// Applies update number `t` (1-based) with gradients multiplied by `grad_scale` first.
    pub fn step<B: Backend>(&self, be: &mut B, p: &ParamBufs, t: u64, grad_scale: f32) -> Result<()> {
        match self {
            Optimizer::Sgd(s) => s.step(be, p, grad_scale),
            Optimizer::AdamW(a) => a.step(be, p, t, grad_scale),
        }
    }
}

impl Optimizer {
    /// The update of a step decided on the backend ([`crate::control`]): applied only when the control block
    /// `ctl` says so, with its gradient multiplier and bias corrections.
    pub fn step_gated<B: Backend>(&self, be: &mut B, p: &ParamBufs, ctl: crate::arena::Buf) -> Result<()> {
        self.validate()?;
        match self {
            Optimizer::Sgd(s) => be.sgd_step_gated(p, &s.step_args(1.0), ctl),
            Optimizer::AdamW(a) => be.adamw_step_gated(p, &a.step_args(1, 1.0), ctl),
        }
    }

    /// AdamW's betas (for the bias corrections a step decides); `None` for SGD.
    pub fn adam_betas(&self) -> Option<(f32, f32)> {
        match self {
            Optimizer::Sgd(_) => None,
            Optimizer::AdamW(a) => Some((a.beta1, a.beta2)),
        }
    }
}

impl From<Sgd> for Optimizer {
    fn from(s: Sgd) -> Self {
        Optimizer::Sgd(s)
    }
}

impl From<AdamW> for Optimizer {
    fn from(a: AdamW) -> Self {
        Optimizer::AdamW(a)
    }
}

pub(crate) fn finite_non_negative(x: f32) -> bool {
    x.is_finite() && x >= 0.0
}
