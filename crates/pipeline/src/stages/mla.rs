//! Multi-head latent attention's stages (DeepSeek-V2/V3), attn_norm to
//! the keys; scores, softmax, attention and o_proj follow in
//! attention.rs, which hands MLA layers to [`mla_scores`] and
//! [`mla_attention`] here.

use bevy_ecs::prelude::*;
use stage_types::SaveTensorStage as S;

use super::current;
use crate::backend::Backend;
use crate::backend::mla::{MlaDims, MlaOps};
use crate::config::ModelConfig;
use crate::ecs::{LayerAttention, StageCtx};
use crate::error::{PipelineError, Result};
use crate::mla_config::MlaConfig;
use crate::model::MlaWeightIds;

/// The backend's MLA operations, or an error naming the backend.
fn ops(b: &mut dyn Backend) -> Result<&mut dyn MlaOps> {
    let name = b.name();
    b.mla().ok_or_else(|| {
        PipelineError::BackendUnavailable(format!(
            "the {name} backend has no multi-head latent attention (DeepSeek's MLA) yet; run this model on the CPU"
        ))
    })
}

/// The model's MLA config (the stages run only on MLA layers).
fn mla(c: &ModelConfig) -> Result<&MlaConfig> {
    c.mla.as_ref().ok_or_else(|| PipelineError::BadInput("an MLA stage ran on a model without MLA".into()))
}

fn dims(c: &ModelConfig) -> Result<MlaDims> {
    Ok(mla(c)?.dims(c.num_heads))
}

/// The current layer's MLA weights.
fn weights(ctx: &StageCtx, layers: &Query<&LayerAttention>) -> Option<MlaWeightIds> {
    current(ctx, layers).and_then(|a| a.0.mla.clone())
}

/// mla_q_a: `attn_norm · q_a_projᵀ`, [T,Rq].
pub fn mla_q_a(mut ctx: StageCtx, layers: Query<&LayerAttention>) {
    let Some(w) = weights(&ctx, &layers).and_then(|w| w.q_a) else {
        return;
    };
    ctx.run(S::MlaQA, |b, _| b.linear(S::AttnNorm, &[w], S::MlaQA));
}

/// mla_q_a_norm: RMSNorm of mla_q_a (q_a_layernorm), [T,Rq].
pub fn mla_q_a_norm(mut ctx: StageCtx, layers: Query<&LayerAttention>) {
    let Some(w) = weights(&ctx, &layers).and_then(|w| w.q_a_norm) else {
        return;
    };
    ctx.run(S::MlaQANorm, |b, c| b.rms_norm(S::MlaQA, w, c.rms_norm_eps, S::MlaQANorm));
}

/// mla_q: `mla_q_a_norm · q_b_projᵀ` (or `attn_norm · q_projᵀ`), per head
/// nope then rope columns, [T,nh*dqk].
pub fn mla_q(mut ctx: StageCtx, layers: Query<&LayerAttention>) {
    let Some(w) = weights(&ctx, &layers) else {
        return;
    };
    let input = if w.q_a.is_some() { S::MlaQANorm } else { S::AttnNorm };
    ctx.run(S::MlaQ, |b, _| b.linear(input, &[w.q], S::MlaQ));
}

/// mla_kv_a: `attn_norm · kv_a_proj_with_mqaᵀ`: the latent, then the
/// shared key's rope columns, [T,Rkv+dr].
pub fn mla_kv_a(mut ctx: StageCtx, layers: Query<&LayerAttention>) {
    let Some(w) = weights(&ctx, &layers) else {
        return;
    };
    ctx.run(S::MlaKvA, |b, _| b.linear(S::AttnNorm, &[w.kv_a], S::MlaKvA));
}

/// mla_kv_a_norm: RMSNorm of mla_kv_a's latent columns (kv_a_layernorm),
/// [T,Rkv].
pub fn mla_kv_a_norm(mut ctx: StageCtx, layers: Query<&LayerAttention>) {
    let Some(w) = weights(&ctx, &layers) else {
        return;
    };
    ctx.run(S::MlaKvANorm, |b, c| ops(b)?.latent_norm(S::MlaKvA, w.kv_a_norm, c.rms_norm_eps, S::MlaKvANorm));
}

/// mla_kv_b: `mla_kv_a_norm · kv_b_projᵀ`: per head k_nope then the
/// value, [T,nh*(dn+dv)].
pub fn mla_kv_b(mut ctx: StageCtx, layers: Query<&LayerAttention>) {
    let Some(w) = weights(&ctx, &layers) else {
        return;
    };
    ctx.run(S::MlaKvB, |b, _| b.linear(S::MlaKvANorm, &[w.kv_b], S::MlaKvB));
}

/// q_post_rope of an MLA layer: mla_q with each head's rope columns
/// rotated, [T,nh*dqk].
pub fn mla_q_post_rope(b: &mut dyn Backend, c: &ModelConfig) -> Result<()> {
    let (dims, rope) = (dims(c)?, mla(c)?.rope(c.rope_theta));
    ops(b)?.query_rope(S::MlaQ, dims, &rope, S::QPostRope)
}

/// k_post_rope of an MLA layer: each head's k_nope (mla_kv_b) then the
/// shared rope columns of mla_kv_a rotated, [T,nh*dqk].
pub fn mla_k_post_rope(b: &mut dyn Backend, c: &ModelConfig) -> Result<()> {
    let (dims, rope) = (dims(c)?, mla(c)?.rope(c.rope_theta));
    ops(b)?.keys(S::MlaKvA, S::MlaKvB, dims, &rope, S::KPostRope)
}

/// attn_scores of an MLA layer: appends this step's keys and values
/// (mla_kv_b's value columns) to the cache, then `q·kᵀ * scale` with
/// MLA's softmax scale (YaRN's mscale folded in), [nh,T,P].
pub fn mla_scores(b: &mut dyn Backend, c: &ModelConfig, layer: usize) -> Result<()> {
    let (dims, scale) = (dims(c)?, mla(c)?.softmax_scale());
    let ops = ops(b)?;
    ops.append_kv(layer, S::KPostRope, S::MlaKvB, dims)?;
    ops.scores(layer, S::QPostRope, dims, scale, S::AttnScores)
}

/// attention of an MLA layer: `softmax · v` over the cached values,
/// [T,nh*dv].
pub fn mla_attention(b: &mut dyn Backend, c: &ModelConfig, layer: usize) -> Result<()> {
    let dims = dims(c)?;
    ops(b)?.attention(layer, S::AttnSoftmax, dims, S::Attention)
}
