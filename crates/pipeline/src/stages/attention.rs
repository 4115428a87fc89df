//! Attention stages, attn_norm through post_attn_residual.

use bevy_ecs::prelude::*;
use stage_types::SaveTensorStage as S;

use super::{current, layer_input, mla, oss};
use crate::backend::{AttentionShape, QkNormArgs, RopeArgs};
use crate::config::ModelConfig;
use crate::ecs::{LayerAttention, StageCtx};

fn shape(c: &ModelConfig) -> AttentionShape {
    AttentionShape { heads: c.num_heads, kv_heads: c.num_kv_heads, head_dim: c.head_dim }
}

/// The slot holding q, k, v after the projections (and bias, if any).
fn qkv_source(ctx: &StageCtx) -> S {
    S::qkv_source(ctx.layer.traits)
}

/// The slot RoPE reads q and k from: qk_norm, or, in a family without it,
/// the projections' (q and k keep their columns there).
fn rope_source(ctx: &StageCtx) -> S {
    S::rope_source(ctx.layer.traits)
}

/// attn_norm: `x * rsqrt(mean(x²) + eps) * input_layernorm`, [T,H].
pub fn attn_norm(mut ctx: StageCtx, layers: Query<&LayerAttention>) {
    let Some(w) = current(&ctx, &layers).map(|a| a.0.input_norm) else {
        return;
    };
    let input = layer_input(ctx.layer_index());
    ctx.run(S::AttnNorm, |b, c| b.rms_norm(input, w, c.rms_norm_eps, S::AttnNorm));
}

/// qkv_matmul: `attn_norm · [q_proj; k_proj; v_proj]ᵀ`, [T,(nh+2nkv)*hd].
pub fn qkv_matmul(mut ctx: StageCtx, layers: Query<&LayerAttention>) {
    let Some(w) = current(&ctx, &layers).and_then(|a| a.0.qkv) else {
        return;
    };
    ctx.run(S::QkvMatmul, |b, _| b.linear(S::AttnNorm, &w, S::QkvMatmul));
}

/// qkv_bias: `qkv_matmul + [q_bias, k_bias, v_bias]` (models with a QKV
/// bias only).
pub fn qkv_bias(mut ctx: StageCtx, layers: Query<&LayerAttention>) {
    let Some(bias) = current(&ctx, &layers).and_then(|a| a.0.qkv_bias) else {
        return;
    };
    ctx.run(S::QkvBias, |b, _| b.add_bias(S::QkvMatmul, &bias, S::QkvBias));
}

/// qk_norm: per-head RMSNorm over hd of q (q_norm) then k (k_norm),
/// [T,(nh+nkv)*hd].
pub fn qk_norm(mut ctx: StageCtx, layers: Query<&LayerAttention>) {
    let Some([q_weight, k_weight]) = current(&ctx, &layers).and_then(|a| a.0.qk_norm) else {
        return;
    };
    let input = qkv_source(&ctx);
    ctx.run(S::QkNorm, |b, c| {
        let args = QkNormArgs {
            q_heads: c.num_heads,
            kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            q_weight,
            k_weight,
            eps: c.rms_norm_eps,
        };
        b.qk_norm(input, args, S::QkNorm)
    });
}

/// q_post_rope: NeoX RoPE of the q heads of qk_norm (or of the
/// projections, without it), [T,nh*hd].
pub fn q_post_rope(mut ctx: StageCtx) {
    if ctx.layer.traits.mla {
        return ctx.run(S::QPostRope, mla::mla_q_post_rope);
    }
    let input = rope_source(&ctx);
    ctx.run(S::QPostRope, |b, c| {
        let args = RopeArgs { col_start: 0, heads: c.num_heads, head_dim: c.head_dim, theta: c.rope_theta };
        oss::rope(b, c, input, args, S::QPostRope)
    });
}

/// k_post_rope: NeoX RoPE of the k heads of qk_norm (or of the
/// projections, without it), [T,nkv*hd].
pub fn k_post_rope(mut ctx: StageCtx) {
    if ctx.layer.traits.mla {
        return ctx.run(S::KPostRope, mla::mla_k_post_rope);
    }
    let input = rope_source(&ctx);
    ctx.run(S::KPostRope, |b, c| {
        let args =
            RopeArgs { col_start: c.q_width(), heads: c.num_kv_heads, head_dim: c.head_dim, theta: c.rope_theta };
        oss::rope(b, c, input, args, S::KPostRope)
    });
}

/// attn_scores: appends this step's k (k_post_rope) and v to the layer's
/// cache, then `q·kᵀ / sqrt(hd)` over all cached positions, masked entries
/// 0, [nh,T,P].
pub fn attn_scores(mut ctx: StageCtx) {
    let layer = ctx.layer_index();
    if ctx.layer.traits.mla {
        return ctx.run(S::AttnScores, |b, c| mla::mla_scores(b, c, layer));
    }
    let v = qkv_source(&ctx);
    let windowed = ctx.layer.traits.layer_windows;
    ctx.run(S::AttnScores, |b, c| {
        b.append_kv(layer, S::KPostRope, v, c.q_width() + c.kv_width())?;
        if windowed {
            return oss::windowed_scores(b, c, layer, shape(c));
        }
        b.attn_scores(layer, S::QPostRope, shape(c), S::AttnScores)
    });
}

/// attn_softmax: causal softmax of attn_scores over P, [nh,T,P]. With
/// attention sinks attn_sink computed it (over the layer's window and the
/// head's sink): published here.
pub fn attn_softmax(mut ctx: StageCtx) {
    let sinks = ctx.layer.traits.sinks;
    ctx.run(S::AttnSoftmax, |b, _| if sinks { Ok(()) } else { b.attn_softmax(S::AttnScores, S::AttnSoftmax) });
}

/// attention: `softmax · v` over the cached values, [T,nh*hd].
pub fn attention(mut ctx: StageCtx) {
    let layer = ctx.layer_index();
    if ctx.layer.traits.mla {
        return ctx.run(S::Attention, |b, c| mla::mla_attention(b, c, layer));
    }
    ctx.run(S::Attention, |b, c| b.attention(layer, S::AttnSoftmax, shape(c), S::Attention));
}

/// attn_out: `attention · o_projᵀ` (+ o_proj's bias, gpt-oss), [T,H].
pub fn attn_out(mut ctx: StageCtx, layers: Query<&LayerAttention>) {
    let Some((w, bias)) = current(&ctx, &layers).map(|a| (a.0.o_proj, a.0.o_bias)) else {
        return;
    };
    ctx.run(S::AttnOut, |b, c| super::row_split_linear(b, c, S::Attention, (w, bias), S::AttnOut));
}

/// post_attn_residual: `layer input + attn_out`, [T,H].
pub fn post_attn_residual(mut ctx: StageCtx) {
    let input = layer_input(ctx.layer_index());
    ctx.run(S::PostAttnResidual, |b, _| b.add(input, S::AttnOut, S::PostAttnResidual));
}
