//! The shared expert of an MoE block (Qwen2-MoE, DeepSeek-V3): an MLP
//! every token goes through beside its routed experts, moe_shared_gate
//! through moe_shared_weight. moe_ffn_out adds it to the routed sum.

use bevy_ecs::prelude::*;
use stage_types::SaveTensorStage as S;

use super::current;
use crate::ecs::{LayerMlp, StageCtx};
use crate::model::{MlpWeights, SharedExpertWeights};

fn shared<'a>(ctx: &StageCtx, layers: &'a Query<&LayerMlp>) -> Option<&'a SharedExpertWeights> {
    match current(ctx, layers).map(|m| &m.0) {
        Some(MlpWeights::Moe(w)) => w.shared.as_ref(),
        _ => None,
    }
}

/// moe_shared_gate: `ffn_norm · shared_expert.gate_projᵀ`, [T,S].
pub fn moe_shared_gate(mut ctx: StageCtx, layers: Query<&LayerMlp>) {
    let Some(w) = shared(&ctx, &layers).map(|w| w.gate) else { return };
    ctx.run(S::MoeSharedGate, |b, _| b.linear(S::FfnNorm, &[w], S::MoeSharedGate));
}

/// moe_shared_up: `ffn_norm · shared_expert.up_projᵀ`, [T,S].
pub fn moe_shared_up(mut ctx: StageCtx, layers: Query<&LayerMlp>) {
    let Some(w) = shared(&ctx, &layers).map(|w| w.up) else { return };
    ctx.run(S::MoeSharedUp, |b, _| b.linear(S::FfnNorm, &[w], S::MoeSharedUp));
}

/// moe_shared_swigl: `silu(moe_shared_gate) * moe_shared_up`, [T,S].
pub fn moe_shared_swigl(mut ctx: StageCtx) {
    ctx.run(S::MoeSharedSwigl, |b, _| b.swiglu(S::MoeSharedGate, S::MoeSharedUp, S::MoeSharedSwigl));
}

/// moe_shared_out: `moe_shared_swigl · shared_expert.down_projᵀ`, [T,H].
pub fn moe_shared_out(mut ctx: StageCtx, layers: Query<&LayerMlp>) {
    let Some(w) = shared(&ctx, &layers).map(|w| w.down) else { return };
    ctx.run(S::MoeSharedOut, |b, c| super::row_split_linear(b, c, S::MoeSharedSwigl, (w, None), S::MoeSharedOut));
}

/// moe_shared_logit: `ffn_norm · shared_expert_gateᵀ`, [T,1].
pub fn moe_shared_logit(mut ctx: StageCtx, layers: Query<&LayerMlp>) {
    let Some(w) = shared(&ctx, &layers).and_then(|w| w.weight_gate) else { return };
    ctx.run(S::MoeSharedLogit, |b, _| b.linear(S::FfnNorm, &[w], S::MoeSharedLogit));
}

/// moe_shared_weight: `sigmoid(moe_shared_logit)`, [T,1].
pub fn moe_shared_weight(mut ctx: StageCtx) {
    ctx.run(S::MoeSharedWeight, |b, _| b.sigmoid(S::MoeSharedLogit, S::MoeSharedWeight));
}
