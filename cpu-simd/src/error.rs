//! Errors a caller can cause: a kernel the CPU lacks, bad shapes, too little scratch.

use core::fmt;

use crate::detect::KernelId;

/// Which GEMM operand an [`Error`] refers to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operand {
    A,
    B,
    C,
}

/// Everything a caller of this crate can get wrong, as a value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// `MANTISSA_KERNEL` (or [`crate::detect_from`]) named no known kernel.
    UnknownKernel,
    /// The kernel was requested but this CPU (or, without `std`, this build's
    /// target features) does not support it.
    KernelUnavailable(KernelId),
    /// Scratch given to a `*_in` function is smaller than [`crate::gemm_scratch_len`].
    ScratchTooSmall { needed: usize, got: usize },
    /// Inner or outer dimensions of A, B, C disagree.
    ShapeMismatch { a: (usize, usize), b: (usize, usize), c: (usize, usize) },
    /// An element of the operand lies outside its slice (or the index overflows).
    OutOfBounds(Operand),
    /// C's strides map two distinct elements to the same memory.
    AliasingOutput,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::UnknownKernel => write!(f, "unknown kernel name (expected scalar, avx2, avx512, avx512bf16 or amx)"),
            Error::KernelUnavailable(id) => {
                write!(f, "kernel `{}` is not supported by this CPU", id.name())
            }
            Error::ScratchTooSmall { needed, got } => {
                write!(f, "GEMM scratch too small: need {needed} bytes, got {got}")
            }
            Error::ShapeMismatch { a, b, c } => {
                write!(f, "GEMM shape mismatch: A {}x{}, B {}x{}, C {}x{}", a.0, a.1, b.0, b.1, c.0, c.1)
            }
            Error::OutOfBounds(op) => write!(f, "GEMM operand {op:?} indexes outside its slice"),
            Error::AliasingOutput => write!(f, "GEMM output C has overlapping strides"),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for Error {}
