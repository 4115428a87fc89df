//! gpt-oss (`GptOssForCausalLM`): q, k, v and o biases, attention sinks,
//! layers alternating sliding-window and full attention (`layer_types`),
//! YaRN RoPE, a router with a bias (top-k of the logits, softmax over the
//! chosen), experts with biases whose gate and up rows are interleaved in
//! one `gate_up_proj`, and the clamped SwiGLU (`crate::oss_config`). Every
//! layer is MoE; the experts' width is `intermediate_size`. Its checkpoint
//! keeps the experts stacked (MXFP4 as the hub ships them, or plain):
//! `crate::weights::oss_experts` unpacks them into moetrace's per-expert
//! tensors.

use super::Family;

/// `GptOssForCausalLM`.
pub const GPT_OSS: Family = Family {
    architecture: "GptOssForCausalLM",
    model_type: "gpt_oss",
    qk_norm: false,
    experts_only: true,
    sliding_window_gated: false,
    expert_width_key: "intermediate_size",
    norm_topk_default: true,
    renames: &[("mlp.gate.", "mlp.router.")],
    attention_bias_default: true,
    experts_keys: &["num_local_experts"],
    oss: true,
    unpack: Some(crate::weights::oss_experts::unpack),
    ..Family::DEFAULTS
};
