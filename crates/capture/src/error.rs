//! [`CaptureError`]: errors of configs, capture files and runs.

use std::path::PathBuf;

/// Errors of the capture crate; messages name the file and position.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// The config file could not be read.
    #[error("cannot read config {path}: {source}")]
    ReadConfig {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// RON syntax or a value of the wrong form, with its position.
    #[error("{path}:{line}:{col}: {message}")]
    ConfigSyntax {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        col: usize,
        /// What is wrong (RON's message, with the valid choices where it
        /// names them).
        message: String,
    },
    /// A config value that parses but does not fit the model or this build.
    #[error("{path}: {message}")]
    ConfigValue {
        /// The file.
        path: PathBuf,
        /// What is wrong and what would be valid.
        message: String,
    },
    /// A tokenizer (tokenizer.json, its chat template) that cannot be used.
    #[error("tokenizer {path}: {message}")]
    Tokenizer {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
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
