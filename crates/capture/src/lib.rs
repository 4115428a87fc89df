//! Capture for moetrace: the RON run config, capture systems that attach
//! to the pipeline's stage sets from outside, a writer thread fed over a
//! crossbeam channel, the .npy + manifest.json capture format, a reader
//! for any capture directory, and [`run()`], which ties them together.
//!
//! - [`RunConfig`]: parse and check `debug.ron`-style configs.
//! - [`run()`]: load, run, capture; the capture folder appears only when
//!   the whole run succeeded.
//! - [`npy`]: the .npy writer (reading, comparing and reports live in
//!   the `compare` crate, re-exported here as [`CaptureDir`] and
//!   [`Manifest`]).

pub mod backend_spec;
pub mod bisect;
pub mod config;
pub mod error;
pub mod faults;
pub mod npy;
pub mod prompt;
mod prompt_gguf;
pub mod replay;
pub mod run;
pub mod session;
pub mod session_builder;
pub mod spec;
pub mod systems;
pub mod target;
pub mod writer;

pub use compare::{CaptureDir, Manifest};
pub use error::{CaptureError, Result};
pub use run::{RunEvent, RunOutput, RunSummary, run};
pub use spec::{BisectConfig, RunConfig, SessionSpec};
