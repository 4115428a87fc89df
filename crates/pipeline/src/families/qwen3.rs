//! Qwen3 (dense) and Qwen3-MoE: the families whose names moetrace's are.

use super::Family;

/// `Qwen3ForCausalLM`: dense layers, q/k norm.
pub const QWEN3: Family = Family {
    architecture: "Qwen3ForCausalLM",
    model_type: "qwen3",
    qk_norm: true,
    experts_only: false,
    sliding_window_gated: true,
    expert_width_key: "moe_intermediate_size",
    norm_topk_default: false,
    renames: &[],
};

/// `Qwen3MoeForCausalLM`: routed experts (softmax, top-k, renormalised when
/// `norm_topk_prob`), q/k norm.
pub const QWEN3_MOE: Family = Family {
    architecture: "Qwen3MoeForCausalLM",
    model_type: "qwen3_moe",
    qk_norm: true,
    experts_only: false,
    sliding_window_gated: true,
    expert_width_key: "moe_intermediate_size",
    norm_topk_default: false,
    renames: &[],
};
