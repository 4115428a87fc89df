//! Qwen2-MoE (`Qwen2MoeForCausalLM`, e.g. Qwen1.5-MoE-A2.7B): q, k and v
//! biases (`qkv_bias`, true unless config.json says otherwise), no q/k
//! norm, softmax -> top-k without renormalising (`norm_topk_prob`
//! false unless said), and beside the routed experts one shared expert
//! (`shared_expert_intermediate_size` wide) weighted by
//! `sigmoid(shared_expert_gate · x)`; `decoder_sparse_step` and
//! `mlp_only_layers` make some layers dense. Its checkpoints use
//! moetrace's tensor names.

use super::{Family, SharedExpert};

/// `Qwen2MoeForCausalLM`.
pub const QWEN2_MOE: Family = Family {
    architecture: "Qwen2MoeForCausalLM",
    model_type: "qwen2_moe",
    qk_norm: false,
    attention_bias_key: "qkv_bias",
    attention_bias_default: true,
    shared_expert: Some(SharedExpert { width_key: "shared_expert_intermediate_size", gated: true }),
    ..Family::DEFAULTS
};
