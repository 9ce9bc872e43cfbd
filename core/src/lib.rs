//! mantissa-core: mixed-precision training with no heap. `#![no_std]`, no `alloc`: every tensor lives in one
//! caller-provided arena whose size the [`plan::MemoryPlan`] gives before the first step.
//!
//! The pieces, in the order a step uses them: [`policy`] (which dtype computes), [`arena`] and [`plan`] (where
//! every byte goes), [`backend`] (the operations; [`reference`] is the scalar implementation every other
//! backend is tested against), [`layers`] and [`model`], [`optim`], [`loss_scale`], and [`trainer`].
#![no_std]
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_debug_implementations)]

mod fmt;

pub mod arena;
pub mod backend;
pub mod checkpoint;
pub mod control;
pub mod dtype;
pub mod error;
pub mod layers;
pub mod loss_scale;
pub mod model;
pub mod numerics;
pub mod optim;
pub mod plan;
pub mod policy;
pub mod reference;
pub mod rng;
pub mod trainable;
pub mod trainer;

pub use arena::{Arena, Buf};
pub use backend::{Backend, Capabilities};
pub use dtype::DType;
pub use error::{Error, Result};
pub use layers::Shape;
pub use loss_scale::{DynamicConfig, DynamicLossScale, GradScaler, LossScale};
pub use model::Model;
pub use optim::{AdamW, Optimizer, Sgd};
pub use plan::{MemoryPlan, SideBySide};
pub use policy::Policy;
pub use reference::Reference;
pub use trainable::Trainable;
pub use trainer::{Applied, Evaluation, StepReport, TrainConfig, Trainer};
