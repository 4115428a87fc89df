//! [`SessionError`]: errors of configs, prompts and tokenizers, faults,
//! routing replay and the runs built from them.

use std::path::PathBuf;

/// Errors of the session crate; messages name the file and position.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
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
    /// A capture (its folder, writer or manifest) failed.
    #[error(transparent)]
    Capture(#[from] capture::CaptureError),
    /// Reading or comparing captures failed.
    #[error(transparent)]
    Compare(#[from] compare::CompareError),
}

/// Shorthand for results of this crate.
pub type Result<T, E = SessionError> = std::result::Result<T, E>;
