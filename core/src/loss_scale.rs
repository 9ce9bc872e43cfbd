//! Loss scaling: multiply the loss by `S` before the backward pass so small f16 gradients do not flush to
//! zero, divide the gradients by `S` before the update, and (dynamic) adapt `S` to the gradients.
//!
//! Every mode skips a step whose gradients are not all finite, so a failed step leaves the model as it was.

use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LossScale {
    /// `S = 1`.
    None,
    /// A constant `S` (512 is the classic choice for f16).
    Fixed(f32),
    /// `S` adapts: grows after a run of finite steps, backs off on overflow.
    Dynamic(DynamicLossScale),
}

impl LossScale {
    /// A fixed scale, validated (finite and > 0).
    pub fn fixed(scale: f32) -> Result<LossScale> {
        if !(scale.is_finite() && scale > 0.0) {
            return Err(Error::InvalidConfig("a fixed loss scale must be finite and > 0"));
        }
        Ok(LossScale::Fixed(scale))
    }

    /// The current scale `S`.
    pub fn scale(&self) -> f32 {
        match self {
            LossScale::None => 1.0,
            LossScale::Fixed(s) => *s,
            LossScale::Dynamic(d) => d.scale,
        }
    }

    /// Records whether this step's gradients were all finite and adapts the scale. Returns whether the step
    /// must be applied (`false`: skip it).
    pub fn update(&mut self, finite: bool) -> bool {
        match self {
            LossScale::None | LossScale::Fixed(_) => finite,
            LossScale::Dynamic(d) => d.update(finite),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            LossScale::None => "none",
            LossScale::Fixed(_) => "fixed",
            LossScale::Dynamic(_) => "dynamic",
        }
    }
}

/// The parameters of a dynamic loss scale. The presets reproduce the well-known implementations.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DynamicConfig {
    pub initial_scale: f32,
    /// Multiply the scale by this after `growth_interval` consecutive finite steps.
    pub growth_factor: f32,
    /// Multiply the scale by this on a non-finite step (after `hysteresis` of them).
    pub backoff_factor: f32,
    pub growth_interval: u32,
    /// Non-finite steps tolerated before backing off (DeepSpeed's `delayed_shift`); 1 backs off at once.
    /// The allowance is restored only when the scale grows, as in DeepSpeed.
    pub hysteresis: u32,
    /// The scale never backs off below this (0: no floor, as in PyTorch).
    pub min_scale: f32,
}

impl DynamicConfig {
    /// Keras' `LossScaleOptimizer` (the default): initial 2^15, x2 after 2000 finite steps, /2 on overflow,
    /// never below 1.
    pub const fn tensorflow() -> Self {
        DynamicConfig {
            initial_scale: 32768.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
            hysteresis: 1,
            min_scale: 1.0,
        }
    }

    /// `torch.amp.GradScaler`: initial 2^16, growth 2, backoff 0.5, interval 2000, no floor.
    pub const fn pytorch() -> Self {
        DynamicConfig {
            initial_scale: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
            hysteresis: 1,
            min_scale: 0.0,
        }
    }

    /// DeepSpeed's `DynamicLossScaler` as configured by its fp16 defaults: initial 2^16, window 1000,
    /// hysteresis 2, minimum 1.
    pub const fn deepspeed() -> Self {
        DynamicConfig {
            initial_scale: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 1000,
            hysteresis: 2,
            min_scale: 1.0,
        }
    }

    pub fn initial_scale(mut self, s: f32) -> Self {
        self.initial_scale = s;
        self
    }

    pub fn growth_interval(mut self, n: u32) -> Self {
        self.growth_interval = n;
        self
    }

    pub fn validate(&self) -> Result<()> {
        let pos = |x: f32| x.is_finite() && x > 0.0;
        if !pos(self.initial_scale) {
            return Err(Error::InvalidConfig("initial loss scale must be finite and > 0"));
        }
        if !(self.growth_factor.is_finite() && self.growth_factor >= 1.0) {
            return Err(Error::InvalidConfig("loss-scale growth factor must be finite and >= 1"));
        }
        if !(pos(self.backoff_factor) && self.backoff_factor < 1.0) {
            return Err(Error::InvalidConfig("loss-scale backoff factor must be in (0, 1)"));
        }
        if self.growth_interval == 0 || self.hysteresis == 0 {
            return Err(Error::InvalidConfig("loss-scale growth interval and hysteresis must be >= 1"));
        }
        if !(self.min_scale.is_finite() && self.min_scale >= 0.0) {
            return Err(Error::InvalidConfig("minimum loss scale must be finite and >= 0"));
        }
        Ok(())
    }
}

/// A dynamic loss scale's state.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DynamicLossScale {
    pub config: DynamicConfig,
    /// The current scale.
    pub scale: f32,
    /// Consecutive finite steps since the last growth or overflow.
    pub good_steps: u32,
    /// Overflows still tolerated before the next back-off.
    pub hysteresis_left: u32,
}

impl DynamicLossScale {
    pub fn new(config: DynamicConfig) -> Result<Self> {
        config.validate()?;
        Ok(DynamicLossScale { config, scale: config.initial_scale, good_steps: 0, hysteresis_left: config.hysteresis })
    }

    pub fn tensorflow() -> Self {
        Self::new(DynamicConfig::tensorflow()).expect("preset is valid")
    }

    pub fn pytorch() -> Self {
        Self::new(DynamicConfig::pytorch()).expect("preset is valid")
    }

    pub fn deepspeed() -> Self {
        Self::new(DynamicConfig::deepspeed()).expect("preset is valid")
    }

    /// See [`LossScale::update`].
    pub fn update(&mut self, finite: bool) -> bool {
        let c = &self.config;
        if finite {
            self.good_steps += 1;
            if self.good_steps >= c.growth_interval {
                let grown = self.scale * c.growth_factor;
                // Keras and GradScaler keep the old scale when growing would overflow f32.
                if grown.is_finite() {
                    self.scale = grown;
                }
                self.good_steps = 0;
                self.hysteresis_left = c.hysteresis;
            }
            true
        } else {
            self.good_steps = 0;
            if self.hysteresis_left <= 1 {
                self.scale = (self.scale * c.backoff_factor).max(c.min_scale);
            } else {
                self.hysteresis_left -= 1;
            }
            false
        }
    }
}

/// Loss scaling for custom training loops, like Keras' `LossScaleOptimizer` and PyTorch's `GradScaler`:
///
/// ```
/// # use mantissa_core::*;
/// # use mantissa_core::loss_scale::GradScaler;
/// # let model = Model::sequential(Shape::flat(3)).linear(2).build()?;
/// # let mut buf = [0u8; 4096];
/// # let policy = Policy::MIXED_FLOAT16;
/// # let mut trainer = Trainer::new(Reference::new(&mut buf), model, policy, Sgd::new(0.1), TrainConfig::new(2, policy))?;
/// # let (x, labels) = ([0.1f32; 6], [0u32, 1]);
/// let mut scaler = GradScaler::new(LossScale::Dynamic(DynamicLossScale::pytorch()));
/// for _ in 0..3 {
///     let loss = trainer.forward_backward(&x, &labels, scaler.scale())?; // backward of loss * S
///     let step = scaler.step(&mut trainer)?;                             // unscale, check, step or skip
///     assert!(loss.is_finite() && step.applied);
/// }
/// # Ok::<(), mantissa_core::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GradScaler {
    pub loss_scale: LossScale,
}

impl GradScaler {
    pub fn new(loss_scale: LossScale) -> Self {
        GradScaler { loss_scale }
    }

    /// The factor to multiply the loss by (pass it to `Trainer::forward_backward`).
    pub fn scale(&self) -> f32 {
        self.loss_scale.scale()
    }

    /// Unscales and checks the gradients, applies the optimizer or skips the step, and adapts the scale.
    pub fn step<B: crate::backend::Backend>(
        &mut self,
        trainer: &mut crate::trainer::Trainer<B>,
    ) -> Result<crate::trainer::Applied> {
        let scale = self.scale();
        let mut applied = trainer.apply_gradients(scale)?;
        // The update already ran (or not) on finiteness alone; hysteresis can only make a dynamic scale keep
        // its value, and every mode skips a non-finite step, so the two decisions agree.
        let keep = self.loss_scale.update(applied.finite);
        applied.applied &= keep;
        Ok(applied)
    }
}
