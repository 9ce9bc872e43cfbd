//! Errors as values. Everything a user can get wrong (names, shapes, capacity, file contents, a missing device)
//! is an [`Error`]; panics are reserved for bugs in mantissa itself.

use crate::dtype::DType;

#[derive(Clone, Copy, Debug, PartialEq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Error {
    /// The arena is too small. `needed` and `available` are bytes.
    OutOfMemory { needed: usize, available: usize },
    /// A precision policy name that is not one of `float32`, `mixed_float16`, `mixed_bfloat16`, `auto`.
    UnknownPolicy,
    /// A model description that cannot be built (a layer does not fit its input, too many layers, ...).
    InvalidModel(&'static str),
    /// Shapes or lengths that do not agree.
    ShapeMismatch { what: &'static str, expected: usize, got: usize },
    /// A dtype an operation does not take.
    UnsupportedDType { what: &'static str, dtype: DType },
    /// A hyper-parameter out of range (a non-positive learning rate, a non-finite loss scale, ...).
    InvalidConfig(&'static str),
    /// A label outside `0..classes`.
    LabelOutOfRange { label: i32, classes: usize },
    /// The backend was not compiled in; the string names the Cargo feature that adds it.
    BackendNotCompiled { backend: &'static str, feature: &'static str },
    /// The backend exists but cannot run here (no driver, no device, ...).
    DeviceUnavailable(&'static str),
    /// A failure reported by a device runtime (CUDA driver, cuBLAS, NVRTC), with its numeric code.
    Device { what: &'static str, code: i32 },
    /// Check-numerics found a non-finite value.
    NonFinite(crate::numerics::NonFiniteReport),
    /// A checkpoint that cannot be read back into this model.
    Checkpoint(&'static str),
}

pub type Result<T> = core::result::Result<T, Error>;

impl core::fmt::Display for Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            Error::OutOfMemory { needed, available } => write!(
                f,
                "out of memory: the arena needs {needed} bytes but {available} bytes are available \
                 ({} bytes short)",
                needed.saturating_sub(available)
            ),
            Error::UnknownPolicy => {
                write!(f, "unknown precision policy; valid names are: {}", crate::policy::POLICY_NAMES)
            }
            Error::InvalidModel(why) => write!(f, "invalid model: {why}"),
            Error::ShapeMismatch { what, expected, got } => {
                write!(f, "shape mismatch in {what}: expected {expected}, got {got}")
            }
            Error::UnsupportedDType { what, dtype } => write!(f, "{what} does not take dtype {dtype}"),
            Error::InvalidConfig(why) => write!(f, "invalid configuration: {why}"),
            Error::LabelOutOfRange { label, classes } => {
                write!(f, "label {label} is outside 0..{classes}")
            }
            Error::BackendNotCompiled { backend, feature } => {
                write!(f, "the {backend} backend is not compiled in: rebuild with `--features {feature}`")
            }
            Error::DeviceUnavailable(why) => write!(f, "device unavailable: {why}"),
            Error::Device { what, code } => write!(f, "device error in {what} (code {code})"),
            Error::NonFinite(ref r) => write!(f, "{r}"),
            Error::Checkpoint(why) => write!(f, "bad checkpoint: {why}"),
        }
    }
}

impl core::error::Error for Error {}
