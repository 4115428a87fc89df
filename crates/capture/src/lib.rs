//! Capture for moetrace: what to capture ([`selection::CaptureSpec`]),
//! capture systems that attach to the pipeline's stage sets from outside,
//! a writer thread fed over a crossbeam channel, the .npy + manifest.json
//! capture format, and the capture folder's life from a temporary folder to
//! a committed manifest ([`lifecycle::CaptureSession`]). What runs and when
//! (configs, run, bisect) is the `session` crate's.
//!
//! - [`npy`]: the .npy writer (reading, comparing and reports live in the
//!   `compare` crate, re-exported here as [`CaptureDir`] and [`Manifest`]).

pub mod error;
pub mod lifecycle;
pub mod npy;
pub mod selection;
pub mod systems;
pub mod target;
pub mod writer;

pub use compare::{CaptureDir, Manifest};
pub use error::{CaptureError, Result};
