//! Stage systems, one per [`stage_types::SaveTensorStage`], grouped by
//! family. Each system computes exactly one stage through the backend;
//! its doc states the formula. Their order lives in `schedule.rs` only.

pub mod attention;
pub mod ffn;
pub mod mla;
pub mod model;
pub mod moe;
pub mod oss;
pub mod shared_expert;

use bevy_ecs::prelude::*;
use stage_types::SaveTensorStage;

use crate::ecs::StageCtx;

/// The current layer's component `C`, if the layer schedule is running.
fn current<'a, C: Component>(ctx: &StageCtx, query: &'a Query<&C>) -> Option<&'a C> {
    ctx.layer_entity().and_then(|e| query.get(e).ok())
}

/// The slot holding the input of layer `index`: the embedding for layer 0,
/// else the previous layer's post_ffn_residual.
pub fn layer_input(index: usize) -> SaveTensorStage {
    if index == 0 { SaveTensorStage::Embedding } else { SaveTensorStage::PostFfnResidual }
}

/// A row-split projection (o_proj, a down_proj): `input · weightᵀ` (+
/// `bias`), split across the run's tensor-parallel ranks where it has them.
fn row_split_linear(
    b: &mut dyn crate::backend::Backend,
    c: &crate::config::ModelConfig,
    input: SaveTensorStage,
    (weight, bias): (crate::weights::WeightId, Option<crate::weights::WeightId>),
    out: SaveTensorStage,
) -> crate::Result<()> {
    if c.tensor_ranks <= 1 {
        b.linear(input, &[weight], out)?;
        return match bias {
            Some(bias) => b.add_bias(out, &[bias], out),
            None => Ok(()),
        };
    }
    let name = b.name();
    let ops = b.tensor_parallel().ok_or_else(|| {
        crate::PipelineError::BackendUnavailable(format!(
            "the {name} backend has no tensor-parallel ranks yet; run `parallel: (tensor: T)` on the CPU"
        ))
    })?;
    ops.linear_row_split(input, weight, bias, c.tensor_ranks, out)
}
