//! Model stages: embedding (prologue), final_norm and lm_head (epilogue).

use stage_types::SaveTensorStage as S;

use super::layer_input;
use crate::ecs::StageCtx;

/// embedding: `out[t] = embed_tokens[token[t]]`, [T,H].
pub fn embedding(mut ctx: StageCtx) {
    let table = ctx.model.embedding;
    ctx.run(S::Embedding, |b, _| b.embedding(table, S::Embedding));
}

/// final_norm: RMSNorm of the last layer's output with model.norm, [T,H].
pub fn final_norm(mut ctx: StageCtx) {
    let weight = ctx.model.final_norm;
    let input = layer_input(ctx.model.config.num_layers);
    ctx.run(S::FinalNorm, |b, c| b.rms_norm(input, weight, c.rms_norm_eps, S::FinalNorm));
}

/// lm_head: `logits = final_norm · lm_headᵀ`, [T,V].
pub fn lm_head(mut ctx: StageCtx) {
    let weight = ctx.model.lm_head;
    ctx.run(S::LmHead, |b, _| b.linear(S::FinalNorm, &[weight], S::LmHead));
}
