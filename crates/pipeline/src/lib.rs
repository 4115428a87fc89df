//! The forward pass of Qwen3 and Qwen3-MoE models as ordered bevy_ecs
//! systems, one per named stage.
//!
//! - [`Model`]: config.json ([`ModelConfig`], both key spellings) and
//!   weights ([`WeightStore`]: memory-mapped safetensors, single or
//!   sharded, bf16/f16/f32; or a synthetic preset), resolved per layer.
//! - [`Backend`]: one method per operation; [`CpuBackend`] is the f64-
//!   accumulating reference.
//! - [`Forward`]: the world (one entity per layer), the schedules built by
//!   `schedule.rs`, the step loop ([`StepScope`]) and greedy decoding.
//!   Code outside this crate attaches systems to a stage through
//!   [`Forward::add_observer`] (capture) and [`Forward::add_amender`]
//!   (fault injection), both given a [`HookCtx`]; this crate knows nothing
//!   of them.
//! - [`teacher`]: teacher forcing and grafts ([`Forward::set_teacher`],
//!   [`Forward::graft_scope`]), the basis of bisect's local errors.
//!
//! ```
//! use pipeline::{CpuBackend, Forward, Model};
//!
//! let model = Model::synthetic("tiny-moe", 7, Some(1)).unwrap();
//! let backend = CpuBackend::new(model.store.clone(), Some(1)).unwrap();
//! let mut forward = Forward::new(&model, Box::new(backend));
//! let out = forward.generate(&[1, 17, 423], 2, &mut |_| {}).unwrap();
//! assert_eq!(out.generated.len(), 2);
//! ```

pub mod backend;
pub mod config;
mod config_keys;
mod config_sizes;
pub mod ecs;
pub mod error;
pub mod families;
pub mod forward;
pub mod load_meter;
pub mod mla_config;
pub mod model;
pub mod oss_config;
pub mod parallel_config;
pub mod rope_scaling;
pub mod schedule;
pub mod stages;
mod step_graph;
mod step_phases;
pub mod teacher;
pub mod tensor;
pub mod weights;

pub use backend::Backend;
pub use backend::cpu::CpuBackend;
#[cfg(feature = "cuda")]
pub use backend::cuda::CudaBackend;
pub use config::ModelConfig;
pub use ecs::{CurrentLayer, HookCtx, StageHookSystems, StageLog, StageSet, StepState};
pub use error::{PipelineError, Result};
pub use forward::{Forward, ForwardEvent, Generation, StepRecord, StepScope};
pub use load_meter::{LoadMeter, LoadReading};
pub use model::{Model, ModelSource};
pub use teacher::{ScopeOutputs, ScopeTeacher};
pub use tensor::{HostTensor, PendingTensor, TensorData};
pub use weights::available_memory_bytes;
pub use weights::{WeightStore, WeightTensor};
