//! Checkpoint files: [`save_file`] and [`load_file`] around the core's [`save`] and [`load`], which document
//! the format (safetensors) and what a load restores.
//!
//! ```no_run
//! # fn demo<B: mantissa::Backend>(trainer: &mut mantissa::Trainer<B>) -> Result<(), Box<dyn std::error::Error>> {
//! mantissa::checkpoint::save_file(trainer, "run.safetensors")?;
//! mantissa::checkpoint::load_file(trainer, "run.safetensors")?;
//! # Ok(()) }
//! ```

pub use mantissa_core::checkpoint::*;

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use crate::{Backend, Error, Trainer};

/// Writes the checkpoint of `trainer` to `path`, atomically ([`crate::io::write_atomic`]): a crash or a full
/// disk leaves the previous file whole, never half a checkpoint. Holds the whole file in memory once.
pub fn save_file<B: Backend>(trainer: &mut Trainer<B>, path: impl AsRef<Path>) -> Result<(), CheckpointError> {
    let path = path.as_ref();
    let mut bytes = vec![0u8; checkpoint_len(trainer)];
    let n = save(trainer, &mut bytes).map_err(|e| CheckpointError::new(path, CheckpointErrorKind::Save(e)))?;
    crate::io::write_atomic(path, &bytes[..n]).map_err(|e| CheckpointError::new(path, CheckpointErrorKind::Write(e)))
}

/// Restores `trainer` from the checkpoint at `path` (see [`load`]). On error the trainer is unchanged.
pub fn load_file<B: Backend>(trainer: &mut Trainer<B>, path: impl AsRef<Path>) -> Result<(), CheckpointError> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| CheckpointError::new(path, CheckpointErrorKind::Read(e)))?;
    load(trainer, &bytes).map_err(|e| CheckpointError::new(path, CheckpointErrorKind::Load(e)))
}

/// A checkpoint file that could not be written or read back, with its path.
#[derive(Debug)]
pub struct CheckpointError {
    path: PathBuf,
    kind: CheckpointErrorKind,
}

/// What went wrong. The `Display` of [`CheckpointError`] names the file.
#[derive(Debug)]
#[non_exhaustive]
pub enum CheckpointErrorKind {
    /// Serializing failed (the backend could not hand over its buffers).
    Save(Error),
    /// Writing the file failed; an existing file at the path is as it was.
    Write(io::Error),
    /// The file could not be read.
    Read(io::Error),
    /// The file is not a checkpoint this trainer can load (or the backend failed); the trainer is unchanged.
    Load(Error),
}

impl CheckpointError {
    fn new(path: &Path, kind: CheckpointErrorKind) -> Self {
        CheckpointError { path: path.to_path_buf(), kind }
    }

    /// The file the error is about.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn kind(&self) -> &CheckpointErrorKind {
        &self.kind
    }
}

impl fmt::Display for CheckpointError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = self.path.display();
        match &self.kind {
            CheckpointErrorKind::Save(e) => write!(f, "{path}: cannot save checkpoint: {e}"),
            // write_atomic's errors already start with the path.
            CheckpointErrorKind::Write(e) => write!(f, "cannot write checkpoint: {e}"),
            CheckpointErrorKind::Read(e) => write!(f, "{path}: cannot read checkpoint: {e}"),
            CheckpointErrorKind::Load(e) => write!(f, "{path}: {e}"),
        }
    }
}

impl std::error::Error for CheckpointError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.kind {
            CheckpointErrorKind::Save(e) | CheckpointErrorKind::Load(e) => Some(e),
            CheckpointErrorKind::Write(e) | CheckpointErrorKind::Read(e) => Some(e),
        }
    }
}
