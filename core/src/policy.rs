//! Precision policies, named as in Keras (`tf.keras.mixed_precision.Policy`).
//!
//! | name             | compute dtype | variable dtype | loss scaling by default |
//! |------------------|---------------|----------------|-------------------------|
//! | `float32`        | float32       | float32        | none                    |
//! | `mixed_float16`  | float16       | float32        | dynamic                 |
//! | `mixed_bfloat16` | bfloat16      | float32        | none                    |
//!
//! Under a mixed policy, as with autocast, matrix products (Linear, Conv2d) read their inputs and weights in
//! the compute dtype and accumulate in f32; activations between layers are stored in the compute dtype;
//! softmax, log-softmax, the loss, reductions, gradient statistics and the optimizer run in f32 on f32 master
//! weights.

use crate::backend::Capabilities;
use crate::dtype::DType;
use crate::error::{Error, Result};

/// Every name [`Policy::from_name`] accepts.
pub const POLICY_NAMES: &str = "float32, mixed_float16, mixed_bfloat16, auto";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Policy {
    /// The dtype layers compute in (matrix-product inputs, stored activations, working weights).
    pub compute: DType,
    /// The dtype of the trainable variables (the master weights): always float32 here, as in Keras.
    pub variable: DType,
}

impl Policy {
    pub const FLOAT32: Policy = Policy { compute: DType::F32, variable: DType::F32 };
    pub const MIXED_FLOAT16: Policy = Policy { compute: DType::F16, variable: DType::F32 };
    pub const MIXED_BFLOAT16: Policy = Policy { compute: DType::BF16, variable: DType::F32 };

    /// A policy by its Keras name. `auto` is not a fixed policy: use [`Policy::resolve`] for it.
    pub fn from_name(name: &str) -> Result<Policy> {
        match name {
            "float32" => Ok(Policy::FLOAT32),
            "mixed_float16" => Ok(Policy::MIXED_FLOAT16),
            "mixed_bfloat16" => Ok(Policy::MIXED_BFLOAT16),
            _ => Err(Error::UnknownPolicy),
        }
    }

    /// A policy name, `auto` included, resolved for a backend. Returns the policy and why it was chosen.
    pub fn resolve(name: &str, caps: &Capabilities) -> Result<(Policy, &'static str)> {
        if name == "auto" {
            return Ok(Policy::auto(caps));
        }
        Policy::from_name(name).map(|p| (p, "chosen by name"))
    }

    /// Picks from what the hardware does natively, and says why.
    ///
    /// bf16 first where it is fast: it has f32's exponent range, so it trains without loss scaling. Then f16
    /// (with dynamic loss scaling). Otherwise float32: without 16-bit arithmetic units, mixed precision only
    /// adds conversions (the GTX 1080 Ti rows of the mixed-precision guides show no speedup).
    pub fn auto(caps: &Capabilities) -> (Policy, &'static str) {
        if caps.fast_bf16 {
            (
                Policy::MIXED_BFLOAT16,
                "the backend computes bf16 natively (twice the f32 rate or more) and bf16 keeps f32's range, \
                 so no loss scaling is needed",
            )
        } else if caps.fast_f16 {
            (
                Policy::MIXED_FLOAT16,
                "the backend computes f16 natively but not bf16; f16 needs dynamic loss scaling, which the \
                 trainer applies",
            )
        } else {
            (
                Policy::FLOAT32,
                "the backend has no native 16-bit arithmetic: a mixed policy would only add conversions \
                 (16-bit storage still halves activation memory if memory, not speed, is the limit)",
            )
        }
    }

    /// The Keras name.
    pub const fn name(&self) -> &'static str {
        match self.compute {
            DType::F16 => "mixed_float16",
            DType::BF16 => "mixed_bfloat16",
            _ => "float32",
        }
    }

    /// Whether weights have a separate working copy in the compute dtype.
    pub const fn is_mixed(&self) -> bool {
        !matches!(self.compute, DType::F32)
    }
}

impl core::fmt::Display for Policy {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}
