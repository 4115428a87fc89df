//! [`CaptureError`]: errors of capture folders, the writer and manifests.

use std::path::PathBuf;

/// Errors of the capture crate; messages name the file.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// Loading the model or running the forward pass failed.
    #[error(transparent)]
    Pipeline(#[from] pipeline::PipelineError),
    /// A filesystem operation on a capture failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done, e.g. "cannot create".
        action: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// out_dir exists and is not a capture this tool may replace.
    #[error("out_dir {path}: {why}; refusing to replace it; choose another out_dir or remove it")]
    OutDirOccupied {
        /// The folder.
        path: PathBuf,
        /// Why it is not exactly a moetrace capture.
        why: String,
    },
    /// Reading or comparing captures failed.
    #[error(transparent)]
    Compare(#[from] compare::CompareError),
}

/// Shorthand for results of this crate.
pub type Result<T, E = CaptureError> = std::result::Result<T, E>;

impl CaptureError {
    /// An [`CaptureError::Io`] from an io error.
    pub fn io(action: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| CaptureError::Io { action, path, source }
    }
}
