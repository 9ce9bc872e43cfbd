//! SIMD CPU kernels for mantissa: blocked, packed GEMM in f32, bf16 and f16, and (with `std`) [`SimdBackend`],
//! the `mantissa_core::Backend` that trains with them (GEMM here, element-wise ops vectorised in `ops/`, one
//! file per op family, tested against the scalar reference by the workspace's `tests/backends.rs`).
//!
//! One zero-sized kernel type per instruction set (scalar, AVX2+FMA, AVX-512F,
//! AVX-512 BF16), chosen once by [`detect`] and carried around as a [`Kernel`]
//! token that proves the CPU supports it. `MANTISSA_KERNEL=scalar|avx2|avx512|avx512bf16`
//! forces one (with `std`); forcing one the CPU lacks is an [`Error`], never a
//! silent fallback.
//!
//! ```
//! use mantissa_cpu_simd::{detect, gemm, MatMut, MatRef};
//! let kernel = detect().unwrap();
//! // a: (2, 3), b: (3, 2), c: (2, 2), all row-major.
//! let a = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
//! let b = [1.0f32, 0.0, 0.0, 1.0, 1.0, 1.0];
//! let mut c = [0.0f32; 4];
//! gemm(kernel, 1, 1.0, MatRef::row_major(&a, 2, 3), MatRef::row_major(&b, 3, 2),
//!      0.0, MatMut::row_major(&mut c, 2, 2)).unwrap();
//! assert_eq!(c, [4.0, 5.0, 10.0, 11.0]);
//! ```
//!
//! Without the `std` feature the crate is `no_std` and allocation-free: kernels are
//! detected from compile-time target features, there are no threads, and the
//! caller passes packing scratch sized by [`gemm_scratch_len`] to the `*_in` functions.
#![cfg_attr(not(feature = "std"), no_std)]

#[cfg(feature = "std")]
mod backend;
mod detect;
mod error;
pub mod gemm;
#[cfg(feature = "std")]
mod ops;
#[cfg(feature = "std")]
mod threads;

#[cfg(feature = "std")]
pub use backend::SimdBackend;
#[cfg(feature = "std")]
pub use detect::available_kernels;
pub use detect::{detect, detect_from, Kernel, KernelId, KERNEL_ENV};
pub use error::{Error, Operand};
#[cfg(feature = "std")]
pub use gemm::{gemm, gemm_bf16, gemm_f16, gemm_f32};
pub use gemm::{gemm_bf16_in, gemm_f16_in, gemm_f32_in, gemm_in, gemm_scratch_len, COut, Elem, MatMut, MatRef};
