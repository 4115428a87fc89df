//! Mixtral (`MixtralForCausalLM`): no q/k norm, head_dim from
//! hidden/heads when config.json omits it, softmax -> top-2 -> renormalise
//! (always), the experts' width in `intermediate_size`, and the hub
//! checkpoints' `block_sparse_moe` names (w1 gate, w3 up, w2 down).

use super::Family;

/// `MixtralForCausalLM`.
#[allow(
    clippy::needless_update,
    reason = "every field is named today; `..Family::DEFAULTS` gives it the fields later families add"
)]
pub const MIXTRAL: Family = Family {
    architecture: "MixtralForCausalLM",
    model_type: "mixtral",
    qk_norm: false,
    experts_only: true,
    sliding_window_gated: false,
    expert_width_key: "intermediate_size",
    norm_topk_default: true,
    renames: &[
        ("mlp.gate.", "block_sparse_moe.gate."),
        ("gate_proj.", "w1."),
        ("up_proj.", "w3."),
        ("down_proj.", "w2."),
        ("mlp.experts.", "block_sparse_moe.experts."),
    ],
    ..Family::DEFAULTS
};
