//! DeepSeek-V3 (`DeepseekV3ForCausalLM`; DeepSeek-V3/R1, Kimi K2 and
//! Moonlight share its forward pass): multi-head latent attention
//! (`crate::mla_config`, stages mla_* then the usual scores, softmax,
//! attention) with YaRN scaling and interleaved rope, no q/k norm, no
//! attention bias unless said. Its MoE layers (sigmoid scores, the
//! correction bias choosing experts in groups, shared experts) come next
//! in issue 24: a checkpoint with any is refused by name for now.

use super::Family;

/// `DeepseekV3ForCausalLM`.
pub const DEEPSEEK_V3: Family = Family {
    architecture: "DeepseekV3ForCausalLM",
    model_type: "deepseek_v3",
    qk_norm: false,
    mla: true,
    ..Family::DEFAULTS
};
