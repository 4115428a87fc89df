//! The sizes a [`ModelConfig`] implies for a forward pass: each stage's
//! tensor shape and the memory a run needs besides the weights.

use stage_types::SaveTensorStage;

use crate::config::ModelConfig;

impl ModelConfig {
    /// Bytes a forward pass needs besides the weights, for a prompt of
    /// `prompt` tokens and `positions` positions in all: the KV caches
    /// (f32) and the largest step's activations (every stage slot of one
    /// layer, the attention scores `[nh, T, P]` dominating long prompts
    /// when `scores` says they are kept in memory: always on the CPU, on
    /// the device when not fused or when captured), on the host for the
    /// CPU backend, on the device for CUDA (both keep f32 activations). An
    /// estimate in f64, so absurd sizes cannot overflow.
    pub fn forward_bytes(&self, prompt: usize, positions: usize, scores: bool) -> f64 {
        let f = |x: usize| x as f64;
        let (t, p) = (f(prompt), f(positions));
        let kv = f(self.num_layers) * 2.0 * p * f(self.kv_width());
        let per_token = 12.0 * f(self.hidden_size)
            + 3.0 * f(self.qkv_width())
            + 4.0 * f(self.intermediate_size)
            + f(self.experts_per_token) * (3.0 * f(self.moe_intermediate_size) + f(self.hidden_size))
            + 4.0 * f(self.shared_expert_intermediate_size)
            + f(self.num_experts)
            + f(self.vocab_size);
        let scores = if scores { 2.0 * f(self.num_heads) * t * f(prompt) } else { 0.0 };
        4.0 * (kv + t * per_token + scores)
    }

    /// The shape of `stage`'s tensor in a step of `t` tokens whose KV cache
    /// then holds `positions` entries (DESIGN's stage table with this
    /// model's sizes). Lets a capture size its buffers before the first
    /// step; checked against every tensor a run captures (tests).
    pub fn stage_shape(&self, stage: SaveTensorStage, t: usize, positions: usize) -> Vec<usize> {
        use SaveTensorStage as S;
        let (h, k, hd) = (self.hidden_size, self.experts_per_token, self.head_dim);
        match stage {
            S::QkvMatmul | S::QkvBias => vec![t, self.qkv_width()],
            S::QkNorm => vec![t, (self.num_heads + self.num_kv_heads) * hd],
            S::QPostRope | S::MlaQ => vec![t, self.q_width()],
            S::Attention => vec![t, self.attention_width()],
            S::MlaQA | S::MlaQANorm => vec![t, self.mla.as_ref().and_then(|m| m.q_lora_rank).unwrap_or(0)],
            S::MlaKvA => vec![t, self.mla.as_ref().map_or(0, |m| m.kv_lora_rank + m.qk_rope_head_dim)],
            S::MlaKvANorm => vec![t, self.mla.as_ref().map_or(0, |m| m.kv_lora_rank)],
            S::MlaKvB => vec![t, self.mla.as_ref().map_or(0, |m| self.num_heads * (m.qk_nope_head_dim + m.v_head_dim))],
            S::KPostRope => vec![t, self.kv_width()],
            S::AttnScores | S::AttnSoftmax => vec![self.num_heads, t, positions],
            S::AttnWindow => vec![t, 2],
            S::AttnSink => vec![self.num_heads, t],
            S::MoeExpertClamp => vec![t, k, 2 * self.moe_intermediate_size],
            S::FfnGate | S::FfnUp | S::FfnSilu | S::FfnSwigl => vec![t, self.intermediate_size],
            S::MoeRouterLogits | S::MoeRouterChoice => vec![t, self.num_experts],
            S::MoeRouter | S::MoeRouterIndices => vec![t, k],
            S::MoeRouterGroupScores => vec![t, self.grouped_router.map_or(0, |g| g.n_group)],
            S::MoeRouterGroups => vec![t, self.grouped_router.map_or(0, |g| g.topk_group)],
            S::MoeExpertGate | S::MoeExpertUp | S::MoeExpertSwigl => vec![t, k, self.moe_intermediate_size],
            S::MoeExpertOut => vec![t, k, h],
            S::MoeExpertMap => vec![self.expert_parallel.as_ref().map_or(1, |p| p.ranks), self.num_experts],
            S::MoeDispatch => vec![self.expert_parallel.as_ref().map_or(1, |p| p.ranks), t, k],
            S::MoeCombine => vec![self.expert_parallel.as_ref().map_or(1, |p| p.ranks), t, h],
            S::MoeSharedGate | S::MoeSharedUp | S::MoeSharedSwigl => vec![t, self.shared_expert_intermediate_size],
            S::MoeSharedLogit | S::MoeSharedWeight => vec![t, 1],
            S::LmHead => vec![t, self.vocab_size],
            S::Embedding
            | S::AttnNorm
            | S::AttnOut
            | S::PostAttnResidual
            | S::FfnNorm
            | S::FfnOut
            | S::MoeSharedOut
            | S::MoeFfnOut
            | S::PostFfnResidual
            | S::FinalNorm => vec![t, h],
        }
    }
}
