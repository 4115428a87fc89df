//! Feed-forward stages shared by both layer kinds (ffn_norm,
//! post_ffn_residual) and the dense MLP (ffn_gate .. ffn_out).

use bevy_ecs::prelude::*;
use stage_types::SaveTensorStage as S;

use super::current;
use crate::ecs::{LayerAttention, LayerMlp, StageCtx};
use crate::model::MlpWeights;

/// The current layer's dense weights (gate, up, down).
fn dense(ctx: &StageCtx, layers: &Query<&LayerMlp>) -> Option<[crate::weights::WeightId; 3]> {
    match current(ctx, layers).map(|m| &m.0) {
        Some(MlpWeights::Dense { gate, up, down }) => Some([*gate, *up, *down]),
        _ => None,
    }
}

/// ffn_norm: RMSNorm of post_attn_residual with
/// post_attention_layernorm, [T,H].
pub fn ffn_norm(mut ctx: StageCtx, layers: Query<&LayerAttention>) {
    let Some(w) = current(&ctx, &layers).map(|a| a.0.post_norm) else {
        return;
    };
    ctx.run(S::FfnNorm, |b, c| b.rms_norm(S::PostAttnResidual, w, c.rms_norm_eps, S::FfnNorm));
}

/// ffn_gate: `ffn_norm · gate_projᵀ`, [T,I].
pub fn ffn_gate(mut ctx: StageCtx, layers: Query<&LayerMlp>) {
    let Some([gate, _, _]) = dense(&ctx, &layers) else {
        return;
    };
    ctx.run(S::FfnGate, |b, _| b.linear(S::FfnNorm, &[gate], S::FfnGate));
}

/// ffn_up: `ffn_norm · up_projᵀ`, [T,I].
pub fn ffn_up(mut ctx: StageCtx, layers: Query<&LayerMlp>) {
    let Some([_, up, _]) = dense(&ctx, &layers) else {
        return;
    };
    ctx.run(S::FfnUp, |b, _| b.linear(S::FfnNorm, &[up], S::FfnUp));
}

/// ffn_silu: `silu(ffn_gate)`, [T,I].
pub fn ffn_silu(mut ctx: StageCtx) {
    ctx.run(S::FfnSilu, |b, _| b.silu(S::FfnGate, S::FfnSilu));
}

/// ffn_swigl: `ffn_silu * ffn_up`, [T,I].
pub fn ffn_swigl(mut ctx: StageCtx) {
    ctx.run(S::FfnSwigl, |b, _| b.mul(S::FfnSilu, S::FfnUp, S::FfnSwigl));
}

/// ffn_out: `ffn_swigl · down_projᵀ`, [T,H].
pub fn ffn_out(mut ctx: StageCtx, layers: Query<&LayerMlp>) {
    let Some([_, _, down]) = dense(&ctx, &layers) else {
        return;
    };
    ctx.run(S::FfnOut, |b, c| super::row_split_linear(b, c, S::FfnSwigl, (down, None), S::FfnOut));
}

/// post_ffn_residual: `post_attn_residual + (ffn_out or moe_ffn_out)`,
/// [T,H]; the next layer's input.
pub fn post_ffn_residual(mut ctx: StageCtx) {
    let ffn = if ctx.layer.traits.dense { S::FfnOut } else { S::MoeFfnOut };
    ctx.run(S::PostFfnResidual, |b, _| b.add(S::PostAttnResidual, ffn, S::PostFfnResidual));
}
