//! [`CompareError`]: errors of reading captures and comparing them.

use std::path::PathBuf;

/// Errors of the compare crate; messages name the file and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum CompareError {
    /// A filesystem operation failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done, e.g. "cannot read".
        action: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A .npy file that cannot be read.
    #[error("{path}: bad .npy file: {message}")]
    BadNpy {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// An APRT `.bin` file that cannot be read.
    #[error("{path}: bad APRT file: {message}")]
    BadAprt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A manifest.json that cannot be read.
    #[error("{path}: bad capture manifest: {message}")]
    BadManifest {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Two captures that are not of the same computation.
    #[error("{path}: {message}")]
    NotComparable {
        /// The capture that does not match.
        path: PathBuf,
        /// What differs.
        message: String,
    },
    /// A report JSON that cannot be read (another format or version).
    #[error("{path}: bad report: {message}")]
    BadReport {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// Shorthand for results of this crate.
pub type Result<T, E = CompareError> = std::result::Result<T, E>;

impl CompareError {
    /// An [`CompareError::Io`] from an io error.
    pub fn io(action: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| CompareError::Io { action, path, source }
    }
}
