//! The stage taxonomy of a Qwen3 / Qwen3-MoE forward pass, shared by every
//! part of moetrace and by other tools that read or write its captures.
//!
//! - [`SaveTensorStage`]: one variant per named stage, [`SaveTensorStage::ALL`]
//!   in execution order, canonical names (the capture file names and CLI
//!   words), [`Scope`] (model or layer) and [`Applicability`] (dense-only,
//!   MoE-only, ...).
//! - [`SaveTensorStage::inputs`] ([`StageInput`]): what each stage reads,
//!   so a stage of any engine's capture can be re-run on its captured
//!   inputs.
//! - [`StageList`]: a parsed selection of stages (`"all"` or a comma list).
//! - [`IndexSet`]: a parsed selection of layers or steps (`"all"`, `"3"`,
//!   `"0..4"`, `"0..2,7"`; ends exclusive).
//! - [`input`]: reading user-given files safely (regular files only, size
//!   limits, byte order marks dropped).
//! - [`ParseError`]: what went wrong, naming the bad token and the valid
//!   choices.
//!
//! ```
//! use stage_types::{SaveTensorStage, StageList, IndexSet};
//!
//! let stage: SaveTensorStage = "Layer_Output".parse().unwrap();
//! assert_eq!(stage, SaveTensorStage::PostFfnResidual);
//! let stages: StageList = "ffn_norm, moe_router".parse().unwrap();
//! assert!(stages.contains(SaveTensorStage::MoeRouter));
//! let layers = IndexSet::parse_layers("0..4").unwrap();
//! assert!(layers.contains(3) && !layers.contains(4));
//! ```
//!
//! This crate has no dependencies at all, so any tool can reuse it.

mod error;
pub mod input;
mod inputs;
mod selection;
mod stage;

pub use error::ParseError;
pub use inputs::StageInput;
pub use selection::{IndexSet, IndexSpan, StageList};
pub use stage::{Applicability, LayerTraits, SaveTensorStage, Scope};
