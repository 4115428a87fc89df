//! DeepSeek-V3 (`DeepseekV3ForCausalLM`; DeepSeek-V3/R1, Kimi K2 and
//! Moonlight share its forward pass): multi-head latent attention
//! (`crate::mla_config`, stages mla_* then the usual scores, softmax,
//! attention) with YaRN scaling and interleaved rope, no q/k norm; its
//! first `first_k_dense_replace` layers dense, the others MoE with
//! `n_routed_experts` experts routed by sigmoid scores, the correction bias
//! (`mlp.gate.e_score_correction_bias`) choosing in `n_group` groups of
//! which `topk_group` are kept, the chosen experts weighted by their
//! unbiased scores (renormalised, times `routed_scaling_factor`), and
//! `n_shared_experts` always-on shared experts (one MLP of that many times
//! `moe_intermediate_size`, ungated) under `mlp.shared_experts`.

use super::{Family, SharedExpert};

/// `DeepseekV3ForCausalLM`.
pub const DEEPSEEK_V3: Family = Family {
    architecture: "DeepseekV3ForCausalLM",
    model_type: "deepseek_v3",
    qk_norm: false,
    mla: true,
    norm_topk_default: true,
    renames: &[("mlp.shared_expert.", "mlp.shared_experts.")],
    shared_expert: Some(SharedExpert { width_key: "moe_intermediate_size", gated: false }),
    experts_keys: &["n_routed_experts"],
    dense_first_key: Some("first_k_dense_replace"),
    shared_expert_count_key: Some("n_shared_experts"),
    grouped_router: true,
    ..Family::DEFAULTS
};
