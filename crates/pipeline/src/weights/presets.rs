//! [`SyntheticPreset`]: the named synthetic architectures, from the tiny
//! ones the tests run to real dimensions (Qwen3-30B-A3B, Mixtral-8x7B,
//! Qwen1.5-MoE-A2.7B), and the config.json each makes. The weights are
//! made by synthetic.rs.

use serde_json::json;

use super::WeightStore;
use super::synthetic::{PresetWeights, generate, on_demand};
use crate::config::ModelConfig;
use crate::error::{PipelineError, Result};
use crate::load_meter::LoadMeter;

/// A named synthetic architecture.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SyntheticPreset {
    /// Preset name as written in configs.
    pub name: &'static str,
    /// What it is for.
    pub description: &'static str,
    /// The family (`architectures[0]`) whose config it makes.
    architecture: &'static str,
    layers: usize,
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    intermediate: usize,
    experts: usize,
    experts_per_token: usize,
    moe_intermediate: usize,
    vocab: usize,
    positions: usize,
    /// How the projections are stored (bf16, Q4_K_M-style blocks, FP8).
    weights: PresetWeights,
    /// The mean of DeepSeek's router correction bias (0 but where a preset
    /// stands for a model whose biased scores fall below 0).
    router_bias_mean: f32,
    /// config.json keys of the family's own (a JSON object's members,
    /// e.g. `"shared_expert_intermediate_size": 5632`), written last over
    /// the common ones; empty for none.
    extra_config: &'static str,
}

/// Qwen3-30B-A3B's dimensions (two presets share them).
const QWEN3_30B_A3B: SyntheticPreset = SyntheticPreset {
    name: "qwen3-30b-a3b",
    description: "Qwen3-30B-A3B dimensions: 48 layers, H 2048, 32/4 heads, hd 128, 128 experts top-8, I 768, V 151936",
    architecture: "Qwen3MoeForCausalLM",
    layers: 48,
    hidden: 2048,
    heads: 32,
    kv_heads: 4,
    head_dim: 128,
    intermediate: 6144,
    experts: 128,
    experts_per_token: 8,
    moe_intermediate: 768,
    vocab: 151936,
    positions: 40960,
    weights: PresetWeights::Bf16,
    router_bias_mean: 0.0,
    extra_config: "",
};

/// DeepSeek-V3's dimensions (two presets share them).
const DEEPSEEK_V3: SyntheticPreset = SyntheticPreset {
    name: "deepseek-v3",
    description: "DeepSeek-V3 dimensions: 61 layers (3 dense), H 7168, 128 heads of MLA (q_lora 1536, kv_lora 512, nope 128, rope 64, v 128), 256 experts top-8 in 8 groups keeping 4, 1 shared expert, I 18432 / 2048, V 129280, YaRN x40; attention and MLP projections FP8 with 128x128 block scales as the checkpoint ships them (671 GB: give `layers: N`)",
    architecture: "DeepseekV3ForCausalLM",
    layers: 61,
    hidden: 7168,
    heads: 128,
    kv_heads: 128,
    head_dim: 192,
    intermediate: 18432,
    experts: 256,
    experts_per_token: 8,
    moe_intermediate: 2048,
    vocab: 129280,
    positions: 163840,
    weights: PresetWeights::Fp8,
    router_bias_mean: 0.0,
    extra_config: r#""q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5, "first_k_dense_replace": 3, "n_shared_experts": 1, "rope_theta": 10000.0, "rope_scaling": {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}"#,
};

impl SyntheticPreset {
    /// Every preset.
    pub const ALL: &'static [SyntheticPreset] = &[
        SyntheticPreset {
            name: "tiny-moe",
            description: "4-layer Qwen3-MoE, H 256, 16 experts top-4; the default",
            architecture: "Qwen3MoeForCausalLM",
            layers: 4,
            hidden: 256,
            heads: 4,
            kv_heads: 2,
            head_dim: 64,
            intermediate: 512,
            experts: 16,
            experts_per_token: 4,
            moe_intermediate: 128,
            vocab: 512,
            positions: 4096,
            weights: PresetWeights::Bf16,
            router_bias_mean: 0.0,
            extra_config: "",
        },
        SyntheticPreset {
            name: "tiny-dense",
            description: "3-layer dense Qwen3, H 256, I 512",
            architecture: "Qwen3ForCausalLM",
            layers: 3,
            hidden: 256,
            heads: 4,
            kv_heads: 2,
            head_dim: 64,
            intermediate: 512,
            experts: 0,
            experts_per_token: 0,
            moe_intermediate: 0,
            vocab: 512,
            positions: 4096,
            weights: PresetWeights::Bf16,
            router_bias_mean: 0.0,
            extra_config: "",
        },
        SyntheticPreset {
            name: "tiny-moe-qwen3-vocab",
            description: "2-layer Qwen3-MoE, H 128, 8 experts top-2, Qwen3's vocabulary (V 151936): text prompts with Qwen3's tokenizer, quickly",
            architecture: "Qwen3MoeForCausalLM",
            layers: 2,
            hidden: 128,
            heads: 2,
            kv_heads: 1,
            head_dim: 64,
            intermediate: 256,
            experts: 8,
            experts_per_token: 2,
            moe_intermediate: 64,
            vocab: 151936,
            positions: 4096,
            weights: PresetWeights::Bf16,
            router_bias_mean: 0.0,
            extra_config: "",
        },
        QWEN3_30B_A3B,
        SyntheticPreset {
            name: "qwen3-235b-a22b",
            description: "Qwen3-235B-A22B dimensions: 94 layers, H 4096, 64/4 heads, hd 128, 128 experts top-8, I 1536, V 151936 (470 GB in bf16: several GPUs, or `layers: N`, or the CPU computing weights where it reads them)",
            layers: 94,
            hidden: 4096,
            heads: 64,
            intermediate: 12288,
            moe_intermediate: 1536,
            ..QWEN3_30B_A3B
        },
        SyntheticPreset {
            name: "qwen3-30b-a3b-q4km",
            description: "qwen3-30b-a3b with Q4_K_M-style weights kept quantized (Q4_K, Q6_K for v, down and lm_head): the decode benchmark against the quantized bytes",
            weights: PresetWeights::Q4KM,
            router_bias_mean: 0.0,
            extra_config: "",
            ..QWEN3_30B_A3B
        },
        SyntheticPreset {
            name: "tiny-moe-q4km",
            description: "2-layer Qwen3-MoE, H 256, 8 experts top-2, I 256, with Q4_K_M-style quantized weights",
            architecture: "Qwen3MoeForCausalLM",
            layers: 2,
            hidden: 256,
            heads: 4,
            kv_heads: 2,
            head_dim: 64,
            intermediate: 512,
            experts: 8,
            experts_per_token: 2,
            moe_intermediate: 256,
            vocab: 512,
            positions: 4096,
            weights: PresetWeights::Q4KM,
            router_bias_mean: 0.0,
            extra_config: "",
        },
        SyntheticPreset {
            name: "tiny-mixtral",
            description: "2-layer Mixtral, H 256, 8 experts top-2, I 128, no q/k norm",
            architecture: "MixtralForCausalLM",
            layers: 2,
            hidden: 256,
            heads: 4,
            kv_heads: 2,
            head_dim: 64,
            intermediate: 0,
            experts: 8,
            experts_per_token: 2,
            moe_intermediate: 128,
            vocab: 512,
            positions: 4096,
            weights: PresetWeights::Bf16,
            router_bias_mean: 0.0,
            extra_config: "",
        },
        SyntheticPreset {
            name: "mixtral-8x7b",
            description: "Mixtral-8x7B dimensions: 32 layers, H 4096, 32/8 heads, hd 128, 8 experts top-2, I 14336, V 32000 (93 GB in bf16: give `layers: N` to fit one GPU)",
            architecture: "MixtralForCausalLM",
            layers: 32,
            hidden: 4096,
            heads: 32,
            kv_heads: 8,
            head_dim: 128,
            intermediate: 0,
            experts: 8,
            experts_per_token: 2,
            moe_intermediate: 14336,
            vocab: 32000,
            positions: 32768,
            weights: PresetWeights::Bf16,
            router_bias_mean: 0.0,
            extra_config: "",
        },
        SyntheticPreset {
            name: "tiny-qwen2-moe",
            description: "2-layer Qwen2-MoE, H 256, 8 experts top-2 (not renormalised), I 128, a gated shared expert of 256, q/k/v biases",
            architecture: "Qwen2MoeForCausalLM",
            layers: 2,
            hidden: 256,
            heads: 4,
            kv_heads: 2,
            head_dim: 64,
            intermediate: 512,
            experts: 8,
            experts_per_token: 2,
            moe_intermediate: 128,
            vocab: 512,
            positions: 4096,
            weights: PresetWeights::Bf16,
            router_bias_mean: 0.0,
            extra_config: r#""shared_expert_intermediate_size": 256, "norm_topk_prob": false, "qkv_bias": true"#,
        },
        SyntheticPreset {
            name: "qwen1.5-moe-a2.7b",
            description: "Qwen1.5-MoE-A2.7B dimensions: 24 layers, H 2048, 16/16 heads, hd 128, 60 experts top-4, I 1408, shared expert 5632, V 151936 (28.6 GB in bf16)",
            architecture: "Qwen2MoeForCausalLM",
            layers: 24,
            hidden: 2048,
            heads: 16,
            kv_heads: 16,
            head_dim: 128,
            intermediate: 5632,
            experts: 60,
            experts_per_token: 4,
            moe_intermediate: 1408,
            vocab: 151936,
            positions: 8192,
            weights: PresetWeights::Bf16,
            router_bias_mean: 0.0,
            extra_config: r#""shared_expert_intermediate_size": 5632, "norm_topk_prob": false, "qkv_bias": true"#,
        },
        SyntheticPreset {
            name: "tiny-deepseek-v3",
            description: "tiny DeepSeek-V3: 3 layers (the first dense), H 64, 4 heads of MLA (q_lora 24, kv_lora 16, nope 8, rope 4, v 6), 8 experts top-2 in 4 groups keeping 2, one shared expert, V 512",
            architecture: "DeepseekV3ForCausalLM",
            layers: 3,
            hidden: 64,
            heads: 4,
            kv_heads: 4,
            head_dim: 12,
            intermediate: 128,
            experts: 8,
            experts_per_token: 2,
            moe_intermediate: 32,
            vocab: 512,
            positions: 4096,
            weights: PresetWeights::Bf16,
            router_bias_mean: 0.0,
            extra_config: r#""q_lora_rank": 24, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 6, "n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5, "first_k_dense_replace": 1, "n_shared_experts": 1, "rope_theta": 10000.0, "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}"#,
        },
        DEEPSEEK_V3,
        SyntheticPreset {
            name: "deepseek-v3-negative-bias",
            description: "deepseek-v3 with the router's correction bias around -1 (every biased score below 0, as in models of DeepSeek's router trained with negative biases, GLM's among them; DeepSeek-V3's own are all above +2): where masked groups must be -inf, not 0",
            router_bias_mean: -1.0,
            ..DEEPSEEK_V3
        },
        SyntheticPreset {
            name: "tiny-gpt-oss",
            description: "tiny gpt-oss: 3 layers (sliding window 4, full, sliding), H 64, 4/2 heads of 16 with sinks, 8 experts top-2 of width 64 in MXFP4 with biases, the clamped SwiGLU, YaRN x32, V 512",
            architecture: "GptOssForCausalLM",
            layers: 3,
            hidden: 64,
            heads: 4,
            kv_heads: 2,
            head_dim: 16,
            intermediate: 0,
            experts: 8,
            experts_per_token: 2,
            moe_intermediate: 64,
            vocab: 512,
            positions: 4096,
            weights: PresetWeights::Mxfp4Experts,
            router_bias_mean: 0.0,
            extra_config: r#""sliding_window": 4, "attention_bias": true, "swiglu_limit": 7.0, "rope_theta": 150000.0, "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": false, "original_max_position_embeddings": 4096}"#,
        },
        SyntheticPreset {
            name: "gpt-oss-20b",
            description: "gpt-oss-20b dimensions: 24 layers alternating a sliding window of 128 and full attention, H 2880, 64/8 heads of 64 with sinks, 32 experts top-4 of width 2880 in MXFP4 with biases, the clamped SwiGLU (7), YaRN x32 over 4096, V 201088 (13 GB: the experts 10.1 GB)",
            architecture: "GptOssForCausalLM",
            layers: 24,
            hidden: 2880,
            heads: 64,
            kv_heads: 8,
            head_dim: 64,
            intermediate: 0,
            experts: 32,
            experts_per_token: 4,
            moe_intermediate: 2880,
            vocab: 201088,
            positions: 131072,
            weights: PresetWeights::Mxfp4Experts,
            router_bias_mean: 0.0,
            extra_config: r#""sliding_window": 128, "attention_bias": true, "swiglu_limit": 7.0, "rms_norm_eps": 1e-5, "rope_theta": 150000.0, "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": false, "original_max_position_embeddings": 4096}"#,
        },
        SyntheticPreset {
            name: "moonlight-16b-a3b",
            description: "Moonlight-16B-A3B dimensions: 27 layers (1 dense), H 2048, 16 heads of MLA (plain q, kv_lora 512, nope 128, rope 64, v 128), 64 experts top-6, 2 shared experts, I 11264 / 1408, V 163840 (32 GB in bf16)",
            architecture: "DeepseekV3ForCausalLM",
            layers: 27,
            hidden: 2048,
            heads: 16,
            kv_heads: 16,
            head_dim: 192,
            intermediate: 11264,
            experts: 64,
            experts_per_token: 6,
            moe_intermediate: 1408,
            vocab: 163840,
            positions: 8192,
            weights: PresetWeights::Bf16,
            router_bias_mean: 0.0,
            extra_config: r#""q_lora_rank": null, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "n_group": 1, "topk_group": 1, "routed_scaling_factor": 2.446, "first_k_dense_replace": 1, "n_shared_experts": 2, "rope_theta": 50000.0"#,
        },
    ];

    /// Looks a preset up by name (case-insensitive).
    pub fn by_name(name: &str) -> Result<&'static SyntheticPreset> {
        Self::ALL.iter().find(|p| p.name.eq_ignore_ascii_case(name.trim())).ok_or_else(|| {
            PipelineError::UnknownPreset {
                name: name.to_string(),
                valid: Self::ALL.iter().map(|p| p.name).collect::<Vec<_>>().join(", "),
            }
        })
    }

    /// The preset's config, with `layers` decoder layers if given (at
    /// least 1, at most [`crate::config::MAX_LAYERS`]).
    pub fn config(&self, layers: Option<usize>) -> Result<ModelConfig> {
        if let Some(n) = layers
            && !(1..=crate::config::MAX_LAYERS).contains(&n)
        {
            return Err(PipelineError::BadInput(format!(
                "synthetic preset {}: layers: {n} is out of range: give at least 1 and at most {} (the preset has {})",
                self.name,
                crate::config::MAX_LAYERS,
                self.layers
            )));
        }
        let family = crate::families::Family::by_architecture(self.architecture).ok_or_else(|| {
            PipelineError::BadInput(format!("synthetic preset {}: no family {}", self.name, self.architecture))
        })?;
        let mut json = json!({
            "architectures": [family.architecture],
            "model_type": family.model_type,
            "hidden_size": self.hidden,
            "num_hidden_layers": layers.unwrap_or(self.layers),
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1_000_000.0,
            "vocab_size": self.vocab,
            "max_position_embeddings": self.positions,
            "tie_word_embeddings": false,
            "attention_bias": false,
            "torch_dtype": "bfloat16",
            "hidden_act": "silu",
            "moetrace_synthetic_preset": self.name,
        });
        let obj = json.as_object_mut().expect("object");
        if self.intermediate > 0 {
            obj.insert("intermediate_size".into(), json!(self.intermediate));
        }
        if self.experts > 0 {
            obj.insert(family.experts_keys[0].into(), json!(self.experts));
            obj.insert("num_experts_per_tok".into(), json!(self.experts_per_token));
            obj.insert(family.expert_width_key.into(), json!(self.moe_intermediate));
            obj.insert("norm_topk_prob".into(), json!(true));
            obj.insert("decoder_sparse_step".into(), json!(1));
            obj.insert("mlp_only_layers".into(), json!([]));
        }
        if !self.extra_config.is_empty() {
            let extra: serde_json::Map<String, serde_json::Value> =
                serde_json::from_str(&format!("{{{}}}", self.extra_config)).map_err(|e| {
                    PipelineError::BadInput(format!("synthetic preset {}: extra_config: {e}", self.name))
                })?;
            obj.extend(extra);
        }
        ModelConfig::from_json(json, std::path::Path::new(self.name))
    }

    /// Generates every tensor of `config` (as bf16, or blocks for a
    /// quantized preset), after checking it fits in memory.
    /// `meter` counts the bytes made.
    pub fn generate(&self, config: &ModelConfig, seed: u64, meter: &LoadMeter) -> Result<WeightStore> {
        generate(config, seed, self.name, self.weights, self.router_bias_mean, meter)
    }

    /// The bytes the host would store for `config`'s tensors.
    pub fn stored_bytes(&self, config: &ModelConfig) -> usize {
        super::synthetic::stored_bytes(config, self.weights)
    }

    /// Every tensor of `config`, not materialised: each is computed where
    /// it is read (see [`synthetic_store_on_demand`]).
    pub fn on_demand(&self, config: &ModelConfig, seed: u64) -> WeightStore {
        on_demand(config, seed, self.weights, self.router_bias_mean)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_preset_makes_a_valid_config_of_its_family() {
        for preset in SyntheticPreset::ALL {
            let c = preset.config(Some(1)).unwrap_or_else(|e| panic!("{}: {e}", preset.name));
            assert_eq!(c.architecture, preset.architecture, "{}", preset.name);
            assert_eq!((c.hidden_size, c.num_experts), (preset.hidden, preset.experts), "{}", preset.name);
            assert!(!crate::model::tensor_specs(&c).is_empty());
        }
    }

    #[test]
    fn the_qwen2_moe_presets_have_a_gated_shared_expert_and_biases() {
        let c = SyntheticPreset::by_name("qwen1.5-moe-a2.7b").unwrap().config(None).unwrap();
        assert_eq!((c.num_layers, c.hidden_size, c.num_heads, c.head_dim), (24, 2048, 16, 128));
        assert_eq!((c.num_experts, c.experts_per_token, c.moe_intermediate_size), (60, 4, 1408));
        assert_eq!((c.shared_expert_intermediate_size, c.shared_expert_gate), (5632, true));
        assert!(c.attention_bias && !c.norm_topk_prob && !c.qk_norm);
        let params: usize = crate::model::tensor_specs(&c).iter().map(|s| s.shape.iter().product::<usize>()).sum();
        assert!((14.2e9..14.4e9).contains(&(params as f64)), "{params}");
        let t = c.layer_traits(0);
        assert!(t.shared_expert && t.shared_expert_gate && t.qkv_bias && !t.dense);
    }

    #[test]
    fn the_deepseek_presets_have_mla_grouped_routing_and_their_published_sizes() {
        let params = |c: &ModelConfig| -> f64 {
            crate::model::tensor_specs(c).iter().map(|s| s.shape.iter().product::<usize>() as f64).sum()
        };
        let v3 = SyntheticPreset::by_name("deepseek-v3").unwrap().config(None).unwrap();
        let mla = v3.mla.as_ref().unwrap();
        assert_eq!((mla.q_lora_rank, mla.kv_lora_rank, mla.qk_head(), mla.v_head_dim), (Some(1536), 512, 192, 128));
        let router = v3.grouped_router.unwrap();
        assert_eq!((router.n_group, router.topk_group, router.top_k, router.scaling), (8, 4, 8, 2.5));
        assert_eq!((v3.num_experts, v3.shared_expert_intermediate_size, v3.mlp_only_layers.len()), (256, 2048, 3));
        assert!(v3.layer_traits(2).dense && !v3.layer_traits(3).dense && v3.layer_traits(3).mla_q_lora);
        assert!(v3.mla.as_ref().unwrap().yarn.is_some());
        // 671B published for the main model (the hub's 685B adds the 14B
        // multi-token-prediction layer, which moetrace does not run).
        assert!((668e9..674e9).contains(&params(&v3)), "{}", params(&v3));
        let moon = SyntheticPreset::by_name("moonlight-16b-a3b").unwrap().config(None).unwrap();
        assert_eq!(moon.mla.as_ref().unwrap().q_lora_rank, None);
        assert_eq!((moon.num_experts, moon.experts_per_token, moon.shared_expert_intermediate_size), (64, 6, 2816));
        assert!((15.5e9..16.5e9).contains(&params(&moon)), "{}", params(&moon));
        let tiny = SyntheticPreset::by_name("tiny-deepseek-v3").unwrap().config(None).unwrap();
        assert!(tiny.layer_traits(0).dense && !tiny.layer_traits(1).dense && tiny.layer_traits(1).mla);
    }

    #[test]
    fn unknown_preset_lists_the_valid_ones() {
        let msg = SyntheticPreset::by_name("huge").unwrap_err().to_string();
        assert!(msg.contains("`huge`") && msg.contains("tiny-moe") && msg.contains("qwen3-30b-a3b"), "{msg}");
    }

    #[test]
    fn qwen3_235b_preset_has_the_real_dimensions_and_470_gb_of_bf16() {
        let c = SyntheticPreset::by_name("qwen3-235b-a22b").unwrap().config(None).unwrap();
        assert_eq!((c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim), (94, 4096, 64, 4, 128));
        assert_eq!((c.num_experts, c.experts_per_token, c.moe_intermediate_size), (128, 8, 1536));
        let params: usize = crate::model::tensor_specs(&c).iter().map(|s| s.shape.iter().product::<usize>()).sum();
        assert!((234e9..236e9).contains(&(params as f64)), "{params}");
    }

    #[test]
    fn qwen3_30b_preset_has_the_real_dimensions() {
        let c = SyntheticPreset::by_name("qwen3-30b-a3b").unwrap().config(None).unwrap();
        assert_eq!((c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim), (48, 2048, 32, 4, 128));
        assert_eq!((c.num_experts, c.experts_per_token, c.moe_intermediate_size, c.vocab_size), (128, 8, 768, 151936));
        let bytes: usize = crate::model::tensor_specs(&c).iter().map(|s| s.shape.iter().product::<usize>() * 2).sum();
        assert!((60e9..62e9).contains(&(bytes as f64)), "{bytes}");
    }
}
