//! Capture for moetrace: the RON run config, capture systems that attach
//! to the pipeline's stage sets from outside, a writer thread fed over a
//! crossbeam channel, the .npy + manifest.json capture format, a reader
//! for any capture directory, and [`run()`], which ties them together.
//!
//! - [`RunConfig`]: parse and check `debug.ron`-style configs.
//! - [`run()`]: load, run, capture; the capture folder appears only when
//!   the whole run succeeded.
//! - [`CaptureDir`]: read a capture (ours or the oracle fixtures).
//! - [`npy`]: the .npy reader and writer.

pub mod bisect;
pub mod compare;
pub mod config;
pub mod error;
pub mod faults;
pub mod manifest;
pub mod npy;
pub mod reader;
pub mod run;
pub mod session;
pub mod systems;
pub mod writer;

pub use config::RunConfig;
pub use error::{CaptureError, Result};
pub use manifest::Manifest;
pub use reader::CaptureDir;
pub use run::{RunEvent, RunOutput, RunSummary, run};
