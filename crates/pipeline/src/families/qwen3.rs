//! Qwen3 (dense) and Qwen3-MoE: the families whose names moetrace's are
//! (their choices are [`Family::DEFAULTS`]).

use super::Family;

/// `Qwen3ForCausalLM`: dense layers, q/k norm.
pub const QWEN3: Family = Family { architecture: "Qwen3ForCausalLM", model_type: "qwen3", ..Family::DEFAULTS };

/// `Qwen3MoeForCausalLM`: routed experts (softmax, top-k, renormalised when
/// `norm_topk_prob`), q/k norm.
pub const QWEN3_MOE: Family =
    Family { architecture: "Qwen3MoeForCausalLM", model_type: "qwen3_moe", ..Family::DEFAULTS };
