//! AdamW (decoupled weight decay), as `torch.optim.AdamW`: defaults lr 1e-3, betas (0.9, 0.999), eps 1e-8,
//! weight decay 0.01.

use super::finite_non_negative;
use crate::backend::{AdamWStep, Backend, ParamBufs};
use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

impl AdamW {
    pub fn new(lr: f32) -> Self {
        AdamW { lr, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 }
    }
    pub fn betas(mut self, beta1: f32, beta2: f32) -> Self {
        self.beta1 = beta1;
        self.beta2 = beta2;
        self
    }
    pub fn eps(mut self, eps: f32) -> Self {
        self.eps = eps;
        self
    }
    pub fn weight_decay(mut self, wd: f32) -> Self {
        self.weight_decay = wd;
        self
    }

    pub fn validate(&self) -> Result<()> {
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(Error::InvalidConfig("AdamW learning rate must be finite and > 0"));
        }
        let beta_ok = |b: f32| (0.0..1.0).contains(&b);
        if !beta_ok(self.beta1) || !beta_ok(self.beta2) {
            return Err(Error::InvalidConfig("AdamW betas must be in [0, 1)"));
        }
        if !(self.eps.is_finite() && self.eps > 0.0 && finite_non_negative(self.weight_decay)) {
            return Err(Error::InvalidConfig("AdamW eps must be > 0 and weight decay >= 0, both finite"));
        }
        Ok(())
    }

    /// Update `t` (1-based).
    pub fn step<B: Backend>(&self, be: &mut B, p: &ParamBufs, t: u64, grad_scale: f32) -> Result<()> {
        self.validate()?;
        be.adamw_step(p, &self.step_args(t, grad_scale))
    }

    /// The fused kernel's arguments for update `t` (bias corrections in f64, rounded to f32).
    pub fn step_args(&self, t: u64, grad_scale: f32) -> AdamWStep {
        let (bc1, bc2) = crate::control::bias_corrections(self.beta1, self.beta2, t);
        AdamWStep {
            lr: self.lr,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: self.weight_decay,
            bias_correction1: bc1,
            bias_correction2: bc2,
            grad_scale,
        }
    }
}
