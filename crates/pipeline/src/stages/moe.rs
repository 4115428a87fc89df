//! Mixture-of-Experts stages, moe_router_logits through moe_ffn_out.

use bevy_ecs::prelude::*;
use stage_types::SaveTensorStage as S;

use super::{current, oss};
use crate::backend::SharedTerm;
use crate::backend::expert_parallel::ExpertParallelOps;
use crate::backend::grouped_router::GroupedSlots;
use crate::ecs::{LayerMlp, StageCtx};
use crate::error::PipelineError;
use crate::model::{MlpWeights, MoeWeights};

fn moe<'a>(ctx: &StageCtx, layers: &'a Query<&LayerMlp>) -> Option<&'a MoeWeights> {
    match current(ctx, layers).map(|m| &m.0) {
        Some(MlpWeights::Moe(w)) => Some(w),
        _ => None,
    }
}

/// moe_router_logits: `ffn_norm · gateᵀ` over all E experts (+ the
/// router's bias, gpt-oss), [T,E].
pub fn moe_router_logits(mut ctx: StageCtx, layers: Query<&LayerMlp>) {
    let Some((router, bias)) = moe(&ctx, &layers).map(|w| (w.router, w.logit_bias)) else {
        return;
    };
    ctx.run(S::MoeRouterLogits, |b, _| {
        b.linear(S::FfnNorm, &[router], S::MoeRouterLogits)?;
        match bias {
            Some(bias) => oss::ops(b)?.router_bias(S::MoeRouterLogits, bias, S::MoeRouterLogits),
            None => Ok(()),
        }
    });
}

/// moe_router_choice (DeepSeek's grouped router): `sigmoid(logits) +
/// e_score_correction_bias`, what chooses the groups and the experts
/// (never what weights them), [T,E]. Captured so that routing flips are
/// judged on it; moe_router routes from the logits itself.
pub fn moe_router_choice(mut ctx: StageCtx, layers: Query<&LayerMlp>) {
    let Some(bias) = moe(&ctx, &layers).and_then(|w| w.router_bias) else {
        return;
    };
    ctx.run(S::MoeRouterChoice, |b, _| {
        b.sigmoid(S::MoeRouterLogits, S::MoeRouterChoice)?;
        b.add_bias(S::MoeRouterChoice, &[bias], S::MoeRouterChoice)
    });
}

/// moe_router_group_scores (DeepSeek's grouped router): routes the
/// layer's tokens in one pass from the logits (sigmoid scores, the
/// correction bias choosing `topk_group` groups and the experts in them,
/// the chosen experts' unbiased scores renormalised and scaled, best
/// biased score first) and writes the group scores `[T,G]` here, the kept
/// groups, the weights and the ids into the stages that follow, which
/// publish them. One pass, so that no stage re-derives another's choice.
pub fn moe_router_group_scores(mut ctx: StageCtx, layers: Query<&LayerMlp>) {
    let Some(bias) = moe(&ctx, &layers).and_then(|w| w.router_bias) else {
        return;
    };
    ctx.run(S::MoeRouterGroupScores, |b, c| {
        let Some(router) = &c.grouped_router else {
            return Err(PipelineError::BadInput("a router correction bias without n_group / topk_group".into()));
        };
        let name = b.name();
        let ops = b.grouped_router().ok_or_else(|| {
            PipelineError::BackendUnavailable(format!("the {name} backend has no grouped (DeepSeek) router yet"))
        })?;
        ops.route_grouped(S::MoeRouterLogits, bias, router, GroupedSlots::STAGES)
    });
}

/// moe_router_groups: publishes the groups moe_router_group_scores kept,
/// `[T,topk_group]` int32, best first. Nothing is computed here.
pub fn moe_router_groups(mut ctx: StageCtx, layers: Query<&LayerMlp>) {
    if moe(&ctx, &layers).and_then(|w| w.router_bias).is_some() {
        ctx.run(S::MoeRouterGroups, |_, _| Ok(()));
    }
}

/// moe_router: softmax over all experts (f64 on the CPU), top-k
/// descending, divided by their sum when norm_topk_prob, [T,k]. Routing
/// yields the weights and the ids together; both are written here.
///
/// With DeepSeek's grouped router the weights and ids were written by
/// moe_router_group_scores: published here.
pub fn moe_router(mut ctx: StageCtx, layers: Query<&LayerMlp>) {
    let grouped = moe(&ctx, &layers).and_then(|w| w.router_bias).is_some();
    ctx.run(S::MoeRouter, |b, c| {
        if grouped {
            return Ok(());
        }
        b.router_top_k(S::MoeRouterLogits, c.experts_per_token, c.norm_topk_prob, S::MoeRouter, S::MoeRouterIndices)
    });
}

/// moe_router_indices: publishes the expert ids moe_router chose, [T,k]
/// int32. Nothing is computed here; the stage exists so that observers
/// and amenders of the ids attach between routing and the experts.
pub fn moe_router_indices(mut ctx: StageCtx) {
    ctx.run(S::MoeRouterIndices, |_, _| Ok(()));
}

/// The backend's expert-parallel operations, or why it has none.
fn ranks(b: &mut dyn crate::backend::Backend) -> crate::Result<&mut dyn ExpertParallelOps> {
    let name = b.name();
    b.expert_parallel().ok_or_else(|| {
        PipelineError::BackendUnavailable(format!(
            "the {name} backend has no expert-parallel ranks yet; run `parallel:` on the CPU"
        ))
    })
}

/// moe_expert_map (expert-parallel ranks only): per rank, the rank that
/// serves each logical expert in its view, `[R,E]` int32.
pub fn moe_expert_map(mut ctx: StageCtx) {
    ctx.run(S::MoeExpertMap, |b, c| {
        let layout =
            c.expert_parallel.as_ref().ok_or_else(|| PipelineError::BadInput("moe_expert_map without ranks".into()))?;
        ranks(b)?.expert_map(layout, c.num_experts, S::MoeExpertMap)
    });
}

/// moe_dispatch (expert-parallel ranks only): each slot's row in the
/// receive buffer of each rank that serves it in its own view, `[R,T,k]`
/// int32.
pub fn moe_dispatch(mut ctx: StageCtx) {
    ctx.run(S::MoeDispatch, |b, _| ranks(b)?.dispatch(S::MoeRouterIndices, S::MoeExpertMap, S::MoeDispatch));
}

/// moe_combine (expert-parallel ranks only): each rank's weighted sum of
/// the slots it received, before the reduction, `[R,T,H]`.
pub fn moe_combine(mut ctx: StageCtx) {
    ctx.run(S::MoeCombine, |b, _| {
        ranks(b)?.combine_partials(S::MoeExpertOut, S::MoeRouter, S::MoeDispatch, S::MoeCombine)
    });
}

/// `experts[e] · input` for each chosen expert (+ its bias, gpt-oss), into
/// `out`.
fn expert_projection(
    b: &mut dyn crate::backend::Backend,
    input: S,
    experts: &[crate::weights::WeightId],
    bias: Option<&[crate::weights::WeightId]>,
    out: S,
) -> crate::Result<()> {
    b.expert_linear(input, S::MoeRouterIndices, experts, out)?;
    match bias {
        Some(bias) => oss::ops(b)?.expert_bias(out, S::MoeRouterIndices, bias, out),
        None => Ok(()),
    }
}

/// moe_expert_gate: `gate_proj[e] · ffn_norm[t]` (+ its bias, gpt-oss) for
/// each chosen expert e of each token t, [T,k,I].
pub fn moe_expert_gate(mut ctx: StageCtx, layers: Query<&LayerMlp>) {
    let Some(w) = moe(&ctx, &layers) else { return };
    let bias = w.expert_bias.as_ref().map(|b| b[0].as_slice());
    ctx.run(S::MoeExpertGate, |b, _| expert_projection(b, S::FfnNorm, &w.gate, bias, S::MoeExpertGate));
}

/// moe_expert_up: `up_proj[e] · ffn_norm[t]` (+ its bias, gpt-oss) per
/// chosen expert, [T,k,I].
pub fn moe_expert_up(mut ctx: StageCtx, layers: Query<&LayerMlp>) {
    let Some(w) = moe(&ctx, &layers) else { return };
    let bias = w.expert_bias.as_ref().map(|b| b[1].as_slice());
    ctx.run(S::MoeExpertUp, |b, _| expert_projection(b, S::FfnNorm, &w.up, bias, S::MoeExpertUp));
}

/// moe_expert_swigl: `silu(moe_expert_gate) * moe_expert_up`, [T,k,I];
/// gpt-oss's clamped form of moe_expert_clamp where the experts clamp.
pub fn moe_expert_swigl(mut ctx: StageCtx) {
    let clamped = ctx.layer.traits.clamped_swiglu;
    ctx.run(S::MoeExpertSwigl, |b, c| {
        if clamped {
            return oss::clamped_swiglu(b, c);
        }
        b.swiglu(S::MoeExpertGate, S::MoeExpertUp, S::MoeExpertSwigl)
    });
}

/// moe_expert_out: `down_proj[e] · moe_expert_swigl[t,j]` (+ its bias,
/// gpt-oss), [T,k,H].
pub fn moe_expert_out(mut ctx: StageCtx, layers: Query<&LayerMlp>) {
    let Some(w) = moe(&ctx, &layers) else { return };
    let bias = w.expert_bias.as_ref().map(|b| b[2].as_slice());
    ctx.run(S::MoeExpertOut, |b, _| expert_projection(b, S::MoeExpertSwigl, &w.down, bias, S::MoeExpertOut));
}

/// moe_ffn_out: `Σ_j moe_router[t,j] · moe_expert_out[t,j]`, plus
/// `moe_shared_weight[t] · moe_shared_out[t]` (or `moe_shared_out[t]`,
/// ungated) in a layer with a shared expert, [T,H]. With expert-parallel
/// ranks: the slots the ranks received (moe_dispatch), in slot order, or
/// the ranks' partial sums (moe_combine) in rank order.
pub fn moe_ffn_out(mut ctx: StageCtx) {
    let traits = ctx.layer.traits;
    let shared = traits
        .shared_expert
        .then(|| SharedTerm { out: S::MoeSharedOut, weight: traits.shared_expert_gate.then_some(S::MoeSharedWeight) });
    ctx.run(S::MoeFfnOut, |b, _| {
        if !traits.expert_parallel {
            return b.moe_combine(S::MoeExpertOut, S::MoeRouter, shared, S::MoeFfnOut);
        }
        let partials = traits.rank_sum.then_some(S::MoeCombine);
        ranks(b)?.reduce(S::MoeExpertOut, S::MoeRouter, S::MoeDispatch, partials, shared, S::MoeFfnOut)
    });
}
