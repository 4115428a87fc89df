//! A moetrace session: what to run and how (the RON configs, prompts and
//! tokenizers, faults, routing replay), the one builder every command
//! opens ([`session_builder::Session`]: model -> checks -> backend ->
//! device setup -> capture -> forward pass), and the commands over it.
//!
//! - [`RunConfig`], [`BisectConfig`]: parse and check `debug.ron`-style
//!   configs; both hold a [`SessionSpec`].
//! - [`run()`]: load, run, capture; the capture folder appears only when
//!   the whole run succeeded.
//! - [`bisect::bisect`]: a reference and a target in lockstep, compared
//!   scope by scope, free running or locally; with `target:
//!   Capture("dir")`, each stage of another engine's capture checked on
//!   the capture's own inputs (check.rs).

pub mod backend_spec;
pub mod bisect;
mod check;
pub mod config;
pub mod error;
pub mod faults;
pub mod parallel_spec;
pub mod prompt;
mod prompt_gguf;
pub mod replay;
pub mod run;
pub mod session_builder;
mod sides;
pub mod spec;

pub use error::{Result, SessionError};
pub use run::{RunEvent, RunOutput, RunSummary, run};
pub use spec::{BisectConfig, RunConfig, SessionSpec};
