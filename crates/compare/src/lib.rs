//! Comparing two runs of a transformer forward pass, with no dependency on
//! how they were computed (stage-types is its only moetrace dependency: no
//! bevy_ecs, no CUDA), so other tools can reuse it.
//!
//! - Reading: [`CaptureDir`] (a capture folder through its
//!   [`Manifest`]), [`npy`] (.npy reader and header), [`aprt`] (the
//!   upstream `.bin` format).
//! - What is compared: [`TensorView`], a shape and borrowed [`Elements`]
//!   in their own type (f32, bf16, i32, ...), read a row at a time.
//! - Metrics: [`tensor_metrics`] (rel_l2, max |a-b|, cosines, per-row
//!   errors), [`routing`] (expert sets, margins, near-ties, alignment by
//!   expert id).
//! - Verdicts: [`compare_scope`] with [`Tolerances`] and, where an
//!   emulation of the target's numeric contract ran beside it, each row's
//!   expected error; [`expected`] judges rows by their ratio to it and
//!   groups findings that share a cause.
//! - Reports: [`Report`] (rows, first divergence, graft, human and JSON
//!   renderings), [`diff::diff`] (two folders), [`html`] (the error map).
//!
//! ```
//! use compare::{Elements, Tolerances, tensor_metrics};
//!
//! let (reference, target) = ([1.0f32, 2.0], [1.0f32, 2.001]);
//! let m = tensor_metrics(Elements::F32(&reference), Elements::F32(&target), &[1, 2], 0);
//! assert!(m.rel_l2 < Tolerances::for_dtype("bf16"));
//! ```

pub mod aprt;
pub mod diff;
pub mod error;
pub mod expected;
pub mod findings;
pub mod html;
pub mod json_float;
pub mod manifest;
pub mod metrics;
pub mod npy;
mod ranks;
pub mod reader;
pub mod report;
pub mod routing;
pub mod row;
pub mod scope;
pub mod stage_table;
pub mod view;

pub use error::{CompareError, Result};
pub use manifest::Manifest;
pub use metrics::{TensorMetrics, tensor_metrics};
pub use npy::{NpyArray, NpyData};
pub use reader::CaptureDir;
pub use report::{Graft, Mode, Report};
pub use routing::FlippedToken;
pub use row::Row;
pub use scope::{Emulated, ExpectedTensors, ScopeTensors, Side, Tolerances, Verdict, compare_scope};
pub use view::{Elements, TensorView};
