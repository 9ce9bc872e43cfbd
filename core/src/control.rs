//! The step-control block: what a training step decides (apply or skip, the loss scale, the optimizer's
//! gradient multiplier and bias corrections) and what it reports (loss, accuracy, norm, underflow), kept in
//! the backend's arena next to the data.
//!
//! A device backend makes every decision of a step on the device: the overflow flag never crosses the bus,
//! the optimizer kernel reads it and skips, the loss scale adapts in place. The host reads the block only when
//! it reports ([`crate::Trainer::report`]), so a step is a fixed sequence of launches that can be recorded once
//! and replayed (a CUDA graph). Host backends run the same logic through the provided methods of
//! [`crate::Backend`], which download the block, call [`decide`] and upload it again: [`decide`] is the
//! specification every device implementation is tested against.
//!
//! The block is [`WORDS`] raw 32-bit little-endian words (an `I32` buffer); each word holds an `f32` or a
//! `u32` as its name says.

use crate::loss_scale::LossScale;

/// 32-bit words in the block.
pub const WORDS: usize = 32;

/// f32: the loss scale the next step uses.
pub const SCALE: usize = 0;
/// u32: consecutive finite steps since the scale last grew or backed off (dynamic scaling).
pub const GOOD_STEPS: usize = 1;
/// u32: overflows still tolerated before the next back-off (dynamic scaling).
pub const HYSTERESIS_LEFT: usize = 2;
/// u32 pair (low, high): updates applied so far (AdamW's `t`).
pub const UPDATES: usize = 3;
/// u32 pair (low, high): steps skipped so far.
pub const SKIPPED: usize = 5;
/// f32: the scale the last step used.
pub const LAST_SCALE: usize = 7;
/// u32: 1 when the last step's update was applied.
pub const LAST_APPLIED: usize = 8;
/// f32: global L2 norm of the last step's unscaled gradients before clipping (NaN when not finite).
pub const LAST_NORM: usize = 9;
/// u32: non-finite gradient values in the last step.
pub const LAST_NON_FINITE: usize = 10;
/// f32: the last step's mean loss.
pub const LAST_LOSS: usize = 11;
/// u32: rows of the last step whose arg-max was the label.
pub const LAST_CORRECT: usize = 12;
/// u32: loss-gradient values of the last step that flushed to zero in the compute dtype...
pub const LAST_FLUSHED: usize = 13;
/// u32: ...out of this many non-zero ones.
pub const LAST_NON_ZERO: usize = 14;
/// f32: the factor the optimizer multiplies gradients by: `1 / scale`, times the clip factor.
pub const GRAD_MUL: usize = 15;
/// f32: AdamW's `1 - beta1^t` for the update about to be applied.
pub const BIAS_CORRECTION1: usize = 16;
/// f32: AdamW's `1 - beta2^t`.
pub const BIAS_CORRECTION2: usize = 17;

/// The constants of a step's decision: how the loss scale adapts, clipping, and AdamW's betas (for the bias
/// corrections). The state lives in the block.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepRule {
    /// The loss-scaling mode and its configuration (a dynamic scale's state fields are ignored: the block
    /// holds the state).
    pub loss_scale: LossScale,
    pub clip_norm: Option<f32>,
    /// AdamW's `(beta1, beta2)`; `None` for SGD.
    pub adam_betas: Option<(f32, f32)>,
}

/// The block as host values.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct Control {
    pub words: [u32; WORDS],
}

impl Control {
    /// A fresh block: scale `scale`, no steps yet, the full hysteresis allowance.
    pub fn new(scale: f32, hysteresis: u32) -> Control {
        let mut c = Control::default();
        c.set_f32(SCALE, scale);
        c.words[HYSTERESIS_LEFT] = hysteresis;
        c.set_f32(LAST_SCALE, scale);
        c.set_f32(LAST_NORM, f32::NAN);
        c.set_f32(GRAD_MUL, 1.0 / scale);
        c
    }

    pub fn f32(&self, w: usize) -> f32 {
        f32::from_bits(self.words[w])
    }
    pub fn set_f32(&mut self, w: usize, v: f32) {
        self.words[w] = v.to_bits();
    }
    pub fn u64(&self, w: usize) -> u64 {
        self.words[w] as u64 | (self.words[w + 1] as u64) << 32
    }
    pub fn set_u64(&mut self, w: usize, v: u64) {
        self.words[w] = v as u32;
        self.words[w + 1] = (v >> 32) as u32;
    }

    /// The little-endian bytes, as the backend stores them.
    pub fn to_bytes(&self) -> [u8; WORDS * 4] {
        let mut out = [0u8; WORDS * 4];
        for (o, w) in out.chunks_exact_mut(4).zip(&self.words) {
            o.copy_from_slice(&w.to_le_bytes());
        }
        out
    }

    pub fn from_bytes(b: &[u8; WORDS * 4]) -> Control {
        let mut c = Control::default();
        for (w, i) in c.words.iter_mut().zip(b.chunks_exact(4)) {
            *w = u32::from_le_bytes([i[0], i[1], i[2], i[3]]);
        }
        c
    }

    /// The loss-scale state of the block, in `rule`'s mode.
    pub fn loss_scale(&self, rule: &LossScale) -> LossScale {
        match *rule {
            LossScale::Dynamic(mut d) => {
                d.scale = self.f32(SCALE);
                d.good_steps = self.words[GOOD_STEPS];
                d.hysteresis_left = self.words[HYSTERESIS_LEFT];
                LossScale::Dynamic(d)
            }
            other => other,
        }
    }

    /// Writes `s`'s scale (and a dynamic scale's state) into the block.
    pub fn set_loss_scale(&mut self, s: &LossScale) {
        self.set_f32(SCALE, s.scale());
        if let LossScale::Dynamic(d) = s {
            self.words[GOOD_STEPS] = d.good_steps;
            self.words[HYSTERESIS_LEFT] = d.hysteresis_left;
        }
    }
}

/// One step's decision, given the non-finite count and the sum of squares of the unscaled gradients
/// (`sum_sq` is ignored when `non_finite > 0`). Exactly what the trainer's host path does: record the scale
/// this step used, adapt the loss scale, and either count a skip or prepare the update (gradient multiplier
/// `1/scale` times the clip factor, AdamW's bias corrections for update `t + 1` computed in f64).
pub fn decide(c: &mut Control, rule: &StepRule, non_finite: u64, sum_sq: f64) {
    let scale = c.f32(SCALE);
    let finite = non_finite == 0;
    let norm = if finite { libm::sqrt(sum_sq) as f32 } else { f32::NAN };
    let mut ls = c.loss_scale(&rule.loss_scale);
    let apply = ls.update(finite);
    c.set_loss_scale(&ls);
    c.set_f32(LAST_SCALE, scale);
    c.set_f32(LAST_NORM, norm);
    c.words[LAST_NON_FINITE] = non_finite.min(u32::MAX as u64) as u32;
    c.words[LAST_APPLIED] = apply as u32;
    if apply {
        let clip = clip_factor(rule.clip_norm, norm);
        c.set_f32(GRAD_MUL, (1.0 / scale) * clip);
        let t = c.u64(UPDATES) + 1;
        c.set_u64(UPDATES, t);
        if let Some((b1, b2)) = rule.adam_betas {
            let (bc1, bc2) = bias_corrections(b1, b2, t);
            c.set_f32(BIAS_CORRECTION1, bc1);
            c.set_f32(BIAS_CORRECTION2, bc2);
        }
    } else {
        c.set_u64(SKIPPED, c.u64(SKIPPED) + 1);
    }
}

/// The factor that clips a global gradient norm `norm` to `max_norm` (PyTorch's `clip_grad_norm_`: 1 when
/// the norm is within it).
pub fn clip_factor(max_norm: Option<f32>, norm: f32) -> f32 {
    match max_norm {
        Some(max) if norm > max => max / (norm + 1e-6),
        _ => 1.0,
    }
}

/// AdamW's `(1 - beta1^t, 1 - beta2^t)`, computed in f64 and rounded to f32.
pub fn bias_corrections(beta1: f32, beta2: f32, t: u64) -> (f32, f32) {
    let t = t.max(1) as f64;
    ((1.0 - libm::pow(beta1 as f64, t)) as f32, (1.0 - libm::pow(beta2 as f64, t)) as f32)
}
