//! Teacher forcing: after a stage's amenders and observers have run, the
//! pipeline's own system in `StageHookSystems::Teach(stage)` records the
//! stage's output (what this run computed, faults included) and, when a
//! teacher output is set for the stage, writes it in its place before the
//! next stage reads it. Running a scope with every stage forced to another
//! run's outputs gives each stage's *local* error: what it adds when fed
//! exactly the other run's inputs. The KV cache follows by itself: the
//! attention stages append the forced k and v.
//!
//! [`crate::Forward::set_teacher`] arms it for the next scope;
//! [`crate::Forward::graft_scope`] re-runs a scope that already ran, from
//! another run's inputs and KV cache, and restores the state afterwards.

use std::collections::BTreeMap;

use bevy_ecs::prelude::*;
use stage_types::SaveTensorStage;

use crate::ecs::HookCtx;
use crate::tensor::HostTensor;

/// Stage outputs by stage, for one scope.
pub type ScopeOutputs = BTreeMap<SaveTensorStage, HostTensor>;

/// The teacher-forcing state of a world.
#[derive(Resource, Debug, Default)]
pub struct Teacher {
    /// Record each produced stage's own output.
    pub record: bool,
    /// Outputs written in place of the stages' own (consumed as used).
    pub forced: ScopeOutputs,
    /// The stages' own outputs recorded in the current scope.
    pub recorded: ScopeOutputs,
}

/// What a scope is re-run from by [`crate::Forward::graft_scope`]: another
/// run's input of the scope, its KV cache of the layer, and its output of
/// every stage of the scope.
#[derive(Debug, Clone, Default)]
pub struct ScopeTeacher {
    /// The layer's input (the embedding, or the previous layer's
    /// post_ffn_residual); None keeps this run's own (and is the only
    /// choice for the prologue and epilogue, which read no layer input).
    pub input: Option<HostTensor>,
    /// The layer's KV cache (keys, values), of which the rows before this
    /// step are used; None keeps this run's own.
    pub kv_cache: Option<(HostTensor, HostTensor)>,
    /// Outputs of the stages to force.
    pub outputs: ScopeOutputs,
}

/// The Teach(stage) system: records the stage's own output and forces the
/// teacher's.
pub(crate) fn teach_stage(stage: SaveTensorStage, mut ctx: HookCtx, mut teacher: ResMut<Teacher>) {
    if !ctx.produced(stage) || (!teacher.record && teacher.forced.is_empty()) {
        return;
    }
    if teacher.record
        && let Some(own) = ctx.read(stage)
    {
        teacher.recorded.insert(stage, own);
    }
    if let Some(forced) = teacher.forced.remove(&stage) {
        ctx.write(stage, &forced);
    }
}

/// The first `rows` rows of a `[len, width]` f32 tensor (a KV cache).
pub(crate) fn head_rows(t: &HostTensor, rows: usize) -> crate::Result<HostTensor> {
    let width = t.shape.get(1).copied().unwrap_or(0);
    match t.as_f32() {
        Some(values) if t.shape.len() == 2 && rows <= t.shape[0] => {
            Ok(HostTensor::f32(vec![rows, width], values[..rows * width].to_vec()))
        }
        _ => Err(crate::PipelineError::BadInput(format!(
            "a KV cache of shape {:?} has no first {rows} rows to graft from",
            t.shape
        ))),
    }
}
