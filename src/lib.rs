#![doc = include_str!("../README.md")]
#![cfg_attr(not(feature = "std"), no_std)]

pub use mantissa_core::*;
pub use mantissa_core::{
    arena, backend, dtype, error, layers, loss_scale, model, numerics, optim, plan, policy, reference, rng, trainer,
};

pub mod backends;
#[cfg(feature = "std")]
pub mod checkpoint;
/// The SIMD CPU backend's crate (kernels, `SimdBackend`), for benchmarks and direct use.
#[cfg(feature = "simd")]
pub use mantissa_cpu_simd as cpu_simd;
/// The CUDA backend's crate (`CudaBackend`), for benchmarks and direct use.
#[cfg(feature = "cuda")]
pub use mantissa_cuda as cuda;
#[cfg(feature = "std")]
pub mod data;
#[cfg(feature = "std")]
pub mod host;
#[cfg(feature = "std")]
pub mod io;
#[cfg(feature = "std")]
pub mod profile;
