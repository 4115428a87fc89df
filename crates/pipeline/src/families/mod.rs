//! Model families as plug-ins. A family is what moetrace must know of a
//! Hugging Face architecture beyond the shared decoder: its names
//! (`architectures[0]`, `model_type`), the config keys it spells its own
//! way, which optional layer parts it has (the stages that apply:
//! [`stage_types::LayerTraits`]), and how its checkpoint names the
//! tensors moetrace names canonically (Qwen3-MoE's names). Everything else
//! (ModelConfig, tensor_specs, the stage systems, the backends) reads a
//! family through [`Family`]; adding one is a module here, its line in
//! [`FAMILIES`], its stage variants in stage-types if it has new stages,
//! and its oracle fixture (ARCHITECTURE.md, "Adding a family").

mod deepseek_v3;
mod gpt_oss;
mod mixtral;
mod qwen2_moe;
mod qwen3;

pub use deepseek_v3::DEEPSEEK_V3;
pub use gpt_oss::GPT_OSS;
pub use mixtral::MIXTRAL;
pub use qwen2_moe::QWEN2_MOE;
pub use qwen3::{QWEN3, QWEN3_MOE};

use crate::weights::Unpack;

/// What moetrace knows of one model family.
#[derive(Debug)]
pub struct Family {
    /// `architectures[0]` of its config.json, e.g. `MixtralForCausalLM`.
    pub architecture: &'static str,
    /// `model_type` of its config.json, e.g. `mixtral`.
    pub model_type: &'static str,
    /// Whether its layers normalise q and k per head before RoPE.
    pub qk_norm: bool,
    /// Whether every layer is a Mixture-of-Experts layer (no dense MLP
    /// reads `intermediate_size`).
    pub experts_only: bool,
    /// Whether `sliding_window` applies only when `use_sliding_window` is
    /// true (Qwen's configs carry a window they do not use); otherwise a
    /// `sliding_window` given is the model's.
    pub sliding_window_gated: bool,
    /// The config.json key of the routed experts' width (Mixtral's
    /// `intermediate_size` is its experts'; Qwen3-MoE has
    /// `moe_intermediate_size`).
    pub expert_width_key: &'static str,
    /// Whether the top-k weights are renormalised when config.json does not
    /// say (`norm_topk_prob`).
    pub norm_topk_default: bool,
    /// Pairs (canonical part, checkpoint part) of tensor names that differ,
    /// each replaced once where it occurs, in order.
    pub renames: &'static [(&'static str, &'static str)],
    /// The config.json key saying whether q, k and v have a bias
    /// (`attention_bias`; Qwen2-MoE spells it `qkv_bias`).
    pub attention_bias_key: &'static str,
    /// Whether q, k and v have a bias when config.json does not say.
    pub attention_bias_default: bool,
    /// The always-on shared expert of its MoE layers, if it has one.
    pub shared_expert: Option<SharedExpert>,
    /// Whether its attention is multi-head latent attention (keys and
    /// values from a compressed latent: `crate::mla_config`).
    pub mla: bool,
    /// The config.json keys that may give the routed experts' count, first
    /// found wins (DeepSeek: `n_routed_experts`).
    pub experts_keys: &'static [&'static str],
    /// The key of the number of leading dense layers, if the family has
    /// one (DeepSeek: `first_k_dense_replace`).
    pub dense_first_key: Option<&'static str>,
    /// The key multiplying the shared expert's width, if its width is
    /// `width_key`'s times a count (DeepSeek: `n_shared_experts`).
    pub shared_expert_count_key: Option<&'static str>,
    /// Whether its router is DeepSeek's: sigmoid scores, a correction bias
    /// choosing experts in groups (`backend::grouped_router`).
    pub grouped_router: bool,
    /// Whether it has gpt-oss's parts (`crate::oss_config`): attention
    /// sinks, per-layer windows, o_proj, router and expert biases, the
    /// clamped SwiGLU (`backend::oss`).
    pub oss: bool,
    /// What turns its checkpoint's tensors (already renamed) into
    /// moetrace's canonical ones, where a rename cannot (gpt-oss's stacked
    /// and interleaved experts).
    pub unpack: Option<Unpack>,
}

/// How a family's config.json describes its shared expert.
#[derive(Debug, Clone, Copy)]
pub struct SharedExpert {
    /// The key of the shared expert's MLP width (Qwen2-MoE:
    /// `shared_expert_intermediate_size`).
    pub width_key: &'static str,
    /// Whether a sigmoid gate (`mlp.shared_expert_gate`, [1,H]) weights its
    /// output.
    pub gated: bool,
}

impl Family {
    /// What a family is unless its module says otherwise: Qwen3-MoE's
    /// choices (q/k norm, dense layers possible, a gated sliding window,
    /// `moe_intermediate_size`, no renames). A family's constant names
    /// what differs and ends with `..Family::DEFAULTS`, so a field added
    /// for a new family touches no other family's module.
    pub const DEFAULTS: Family = Family {
        architecture: "",
        model_type: "",
        qk_norm: true,
        experts_only: false,
        sliding_window_gated: true,
        expert_width_key: "moe_intermediate_size",
        norm_topk_default: false,
        renames: &[],
        attention_bias_key: "attention_bias",
        attention_bias_default: false,
        shared_expert: None,
        mla: false,
        experts_keys: &["num_experts", "num_local_experts"],
        dense_first_key: None,
        shared_expert_count_key: None,
        grouped_router: false,
        oss: false,
        unpack: None,
    };
}

/// Every family moetrace runs.
pub const FAMILIES: [&Family; 6] = [&QWEN3, &QWEN3_MOE, &MIXTRAL, &QWEN2_MOE, &DEEPSEEK_V3, &GPT_OSS];

impl Family {
    /// The family with this `architectures[0]`.
    pub fn by_architecture(name: &str) -> Option<&'static Family> {
        FAMILIES.iter().copied().find(|f| f.architecture == name)
    }

    /// The family with this `model_type`.
    pub fn by_model_type(name: &str) -> Option<&'static Family> {
        FAMILIES.iter().copied().find(|f| f.model_type == name)
    }

    /// The name this family's checkpoints give the tensor moetrace calls
    /// `canonical`.
    pub fn checkpoint_name(&self, canonical: &str) -> String {
        self.renames.iter().fold(canonical.to_string(), |name, (ours, theirs)| name.replacen(ours, theirs, 1))
    }

    /// The canonical name of the tensor this family's checkpoints call
    /// `name`.
    pub fn canonical_name(&self, name: &str) -> String {
        self.renames.iter().rev().fold(name.to_string(), |name, (ours, theirs)| name.replacen(theirs, ours, 1))
    }
}

/// What moetrace runs, for messages: `Qwen3ForCausalLM (qwen3), ...`.
pub fn families_text() -> String {
    FAMILIES.iter().map(|f| format!("{} ({})", f.architecture, f.model_type)).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_both_ways_and_families_are_found_by_either_name() {
        let m = Family::by_architecture("MixtralForCausalLM").unwrap();
        assert_eq!(Family::by_model_type("mixtral").unwrap().architecture, m.architecture);
        for (canonical, theirs) in [
            ("model.layers.3.mlp.gate.weight", "model.layers.3.block_sparse_moe.gate.weight"),
            ("model.layers.3.mlp.experts.5.gate_proj.weight", "model.layers.3.block_sparse_moe.experts.5.w1.weight"),
            ("model.layers.3.mlp.experts.5.up_proj.weight", "model.layers.3.block_sparse_moe.experts.5.w3.weight"),
            ("model.layers.3.mlp.experts.5.down_proj.weight", "model.layers.3.block_sparse_moe.experts.5.w2.weight"),
            ("model.layers.3.self_attn.q_proj.weight", "model.layers.3.self_attn.q_proj.weight"),
        ] {
            assert_eq!(m.checkpoint_name(canonical), theirs);
            assert_eq!(m.canonical_name(theirs), canonical);
        }
        assert_eq!(QWEN3_MOE.checkpoint_name("model.layers.0.mlp.gate.weight"), "model.layers.0.mlp.gate.weight");
        assert!(families_text().contains("MixtralForCausalLM (mixtral)"));
    }
}
