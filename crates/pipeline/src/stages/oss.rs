//! gpt-oss's stages (attn_window, attn_sink, moe_expert_clamp) and the
//! parts of the shared stages only it has (YaRN RoPE on its heads, the
//! window in the scores, sinks in the softmax, o_proj, router and expert
//! biases, the clamped SwiGLU), all through [`OssOps`].

use bevy_ecs::prelude::*;
use stage_types::SaveTensorStage as S;

use super::current;
use crate::backend::mla::MlaRope;
use crate::backend::oss::OssOps;
use crate::backend::{AttentionShape, Backend, RopeArgs};
use crate::config::ModelConfig;
use crate::ecs::{LayerAttention, StageCtx};
use crate::error::{PipelineError, Result};

/// The backend's gpt-oss operations, or why it has none.
pub(super) fn ops(b: &mut dyn Backend) -> Result<&mut dyn OssOps> {
    let name = b.name();
    b.oss()
        .ok_or_else(|| PipelineError::BackendUnavailable(format!("the {name} backend has no gpt-oss operations yet")))
}

/// gpt-oss's rotation of `args`' heads: YaRN's frequencies and attention
/// factor where the config scales it, else the plain ones.
pub(super) fn rope(b: &mut dyn Backend, c: &ModelConfig, input: S, args: RopeArgs, out: S) -> Result<()> {
    let Some(yarn) = c.oss.as_ref().and_then(|o| o.yarn) else {
        return b.rope(input, args, out);
    };
    let table = MlaRope {
        inv_freq: yarn.inv_freq(c.rope_theta, args.head_dim),
        attention_factor: yarn.attention_factor(),
        interleave: false,
    };
    ops(b)?.rope_scaled(input, args, &table, out)
}

/// attn_window: the first and last key position each query row sees
/// through the layer's window (`layer_types`), [T,2] int32.
pub fn attn_window(mut ctx: StageCtx) {
    let layer = ctx.layer_index();
    ctx.run(S::AttnWindow, |b, c| ops(b)?.window(c.attention_window(layer), S::AttnWindow));
}

/// The scores of a windowed layer: `q·kᵀ / sqrt(hd)` over the positions
/// its window leaves each row, others 0.
pub(super) fn windowed_scores(b: &mut dyn Backend, c: &ModelConfig, layer: usize, shape: AttentionShape) -> Result<()> {
    ops(b)?.windowed_scores(layer, S::QPostRope, shape, c.attention_window(layer), S::AttnScores)
}

/// attn_sink: the softmax of a layer with sinks, over its window and the
/// head's sink: the sink's share of each row here, [nh,T], the
/// probabilities into attn_softmax (which publishes them). First, so that
/// a sink left out is named here.
pub fn attn_sink(mut ctx: StageCtx, layers: Query<&LayerAttention>) {
    let layer = ctx.layer_index();
    let Some(sinks) = current(&ctx, &layers).and_then(|a| a.0.sinks) else {
        return;
    };
    ctx.run(S::AttnSink, |b, c| {
        ops(b)?.softmax_with_sinks(S::AttnScores, c.attention_window(layer), sinks, S::AttnSoftmax, S::AttnSink)
    });
}

/// moe_expert_clamp: each chosen expert's gate clamped above at
/// `swiglu_limit` and up clamped to +-limit, side by side, [T,k,2I].
pub fn moe_expert_clamp(mut ctx: StageCtx) {
    ctx.run(S::MoeExpertClamp, |b, c| {
        let limit = c.oss.as_ref().map_or(f64::INFINITY, |o| o.swiglu_limit);
        ops(b)?.clamp_gate_up(S::MoeExpertGate, S::MoeExpertUp, limit, S::MoeExpertClamp)
    });
}

/// moe_expert_swigl of clamped experts: `(up + 1) * gate * sigmoid(alpha
/// * gate)` of moe_expert_clamp.
pub(super) fn clamped_swiglu(b: &mut dyn Backend, c: &ModelConfig) -> Result<()> {
    let alpha = c.oss.as_ref().map_or(1.702, |o| o.swiglu_alpha);
    ops(b)?.clamped_swiglu(S::MoeExpertClamp, alpha, S::MoeExpertSwigl)
}
