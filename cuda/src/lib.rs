//! mantissa-cuda: the NVIDIA backend (cudarc with dynamic loading, cuBLASLt tensor-core GEMM, NVRTC kernels).
//!
//! Status: not implemented yet; its issue adds it. Until then [`CudaBackend::new`] answers with an error value
//! so callers can fall back to the CPU.

use mantissa_core::{Error, Result};

/// The CUDA backend (placeholder until the CUDA issue lands: it cannot be constructed).
#[derive(Debug)]
pub struct CudaBackend {
    _private: (),
}

impl CudaBackend {
    /// Opens device `ordinal` with an arena of `bytes`.
    pub fn new(_ordinal: usize, _bytes: usize) -> Result<CudaBackend> {
        Err(Error::DeviceUnavailable("the CUDA backend is not implemented in this version of mantissa"))
    }
}
