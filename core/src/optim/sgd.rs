//! SGD with momentum, Nesterov momentum and (coupled, L2) weight decay, as `torch.optim.SGD` (dampening 0).

use super::finite_non_negative;
use crate::backend::{Backend, ParamBufs, SgdStep};
use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sgd {
    pub lr: f32,
    pub momentum: f32,
    pub nesterov: bool,
    pub weight_decay: f32,
}

impl Sgd {
    pub fn new(lr: f32) -> Self {
        Sgd { lr, momentum: 0.0, nesterov: false, weight_decay: 0.0 }
    }
    pub fn momentum(mut self, momentum: f32) -> Self {
        self.momentum = momentum;
        self
    }
    pub fn nesterov(mut self, on: bool) -> Self {
        self.nesterov = on;
        self
    }
    pub fn weight_decay(mut self, wd: f32) -> Self {
        self.weight_decay = wd;
        self
    }

    pub fn validate(&self) -> Result<()> {
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(Error::InvalidConfig("SGD learning rate must be finite and > 0"));
        }
        if !finite_non_negative(self.momentum) || !finite_non_negative(self.weight_decay) {
            return Err(Error::InvalidConfig("SGD momentum and weight decay must be finite and >= 0"));
        }
        if self.nesterov && self.momentum == 0.0 {
            return Err(Error::InvalidConfig("Nesterov momentum needs momentum > 0 (as in PyTorch)"));
        }
        Ok(())
    }

    pub fn step<B: Backend>(&self, be: &mut B, p: &ParamBufs, grad_scale: f32) -> Result<()> {
        self.validate()?;
        be.sgd_step(p, &self.step_args(grad_scale))
    }

    /// The fused kernel's arguments.
    pub fn step_args(&self, grad_scale: f32) -> SgdStep {
        SgdStep {
            lr: self.lr,
            momentum: self.momentum,
            nesterov: self.nesterov,
            weight_decay: self.weight_decay,
            grad_scale,
        }
    }
}
