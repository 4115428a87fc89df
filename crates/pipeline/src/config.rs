//! [`ModelConfig`]: the architecture hyper-parameters of a Qwen3 or
//! Qwen3-MoE model, read from a Hugging Face config.json in either spelling.

use crate::parallel_config::{ExpertParallel, check_tensor_split};
use std::path::Path;

use serde_json::Value;

use crate::backend::cpu::grouped_routing::GroupedTopK;
use crate::config_keys::Keys;
use crate::error::{PipelineError, Result};

/// Largest hidden_size (and, times 8, MLP width) accepted.
pub const MAX_WIDTH: usize = 1 << 16;
/// Largest number of decoder layers accepted.
pub const MAX_LAYERS: usize = 1024;
/// Largest number of attention (or key-value) heads accepted.
pub const MAX_HEADS: usize = 1024;
/// Largest head_dim accepted.
pub const MAX_HEAD_DIM: usize = 4096;
/// Largest number of experts per MoE layer accepted.
pub const MAX_EXPERTS: usize = 4096;
/// Largest vocabulary accepted.
pub const MAX_VOCAB: usize = 1 << 22;
/// Largest max_position_embeddings accepted.
pub const MAX_POSITIONS: usize = 1 << 24;

/// The hyper-parameters of a Qwen3 / Qwen3-MoE decoder, with the keys'
/// alternative spellings resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// `architectures[0]`, e.g. `Qwen3MoeForCausalLM`.
    pub architecture: String,
    /// H.
    pub hidden_size: usize,
    /// Decoder layers.
    pub num_layers: usize,
    /// nh, query heads.
    pub num_heads: usize,
    /// nkv, key-value heads (GQA).
    pub num_kv_heads: usize,
    /// hd.
    pub head_dim: usize,
    /// Dense MLP width (0 when no layer is dense).
    pub intermediate_size: usize,
    /// Per-expert MLP width (0 for dense models).
    pub moe_intermediate_size: usize,
    /// S, the width of the MoE layers' always-on shared expert (0: none).
    pub shared_expert_intermediate_size: usize,
    /// A sigmoid gate weights the shared expert's output (Qwen2-MoE).
    pub shared_expert_gate: bool,
    /// E, experts per MoE layer (0 for dense models).
    pub num_experts: usize,
    /// k, experts chosen per token.
    pub experts_per_token: usize,
    /// Divide the top-k probabilities by their sum.
    pub norm_topk_prob: bool,
    /// Every `decoder_sparse_step`-th layer is MoE.
    pub decoder_sparse_step: usize,
    /// Layers forced dense.
    pub mlp_only_layers: Vec<usize>,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// V.
    pub vocab_size: usize,
    /// Positions the model was trained for (`max_position_embeddings`),
    /// if the config says; a run may not use more.
    pub max_positions: Option<usize>,
    /// lm_head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// q/k/v projections have a bias (not Qwen3; Qwen2-style).
    pub attention_bias: bool,
    /// Per-head RMSNorm of q and k before RoPE (the family's: Qwen3 has it,
    /// Mixtral not).
    pub qk_norm: bool,
    /// Positions each query sees at most (`sliding_window`), if the model
    /// limits them; runs are refused beyond it (the window is not
    /// implemented, and within it it changes nothing).
    pub sliding_window: Option<usize>,
    /// The checkpoint's declared dtype (`torch_dtype` or `dtype`), if any.
    pub dtype: Option<String>,
    /// Multi-head latent attention (DeepSeek-V2/V3), None for q/k/v
    /// projections.
    pub mla: Option<crate::mla_config::MlaConfig>,
    /// DeepSeek's router (sigmoid scores, the correction bias choosing in
    /// groups), None for softmax top-k.
    pub grouped_router: Option<GroupedTopK>,
    /// gpt-oss's parts (per-layer windows, sinks, the clamped SwiGLU,
    /// biases everywhere), None for other families.
    pub oss: Option<crate::oss_config::OssConfig>,
    /// How this run splits the experts across expert-parallel ranks (a
    /// property of the run, not of the checkpoint: set by
    /// [`ModelConfig::set_expert_parallel`]), None for one rank.
    pub expert_parallel: Option<ExpertParallel>,
    /// How many tensor-parallel ranks the run splits the row-split
    /// projections (o_proj, the dense and shared experts' down_proj)
    /// across, each rank's partial sum added in rank order (a property of
    /// the run: [`ModelConfig::set_tensor_parallel`]); 1 for none.
    pub tensor_ranks: usize,
    /// The config as JSON (the file's own content for checkpoints), for
    /// capture manifests.
    pub json: Value,
}

pub use crate::families::families_text;
use crate::families::{Family, QWEN3, QWEN3_MOE};

/// The family of a config (`architectures[0]`, else `model_type`), read
/// before any other key: a DeepSeek-V3 folder is "not supported", not a
/// missing key or tensor. A config naming neither is read as Qwen3 (MoE
/// when it has experts).
fn family_of(obj: &serde_json::Map<String, Value>, path: &Path, has_experts: bool) -> Result<&'static Family> {
    let architecture = obj.get("architectures").and_then(|a| a.get(0)).and_then(Value::as_str);
    let model_type = obj.get("model_type").and_then(Value::as_str);
    let found = match (architecture, model_type) {
        (Some(a), _) => Family::by_architecture(a),
        (None, Some(t)) => Family::by_model_type(t),
        (None, None) => Some(if has_experts { &QWEN3_MOE } else { &QWEN3 }),
    };
    found.ok_or_else(|| {
        let name = match (architecture, model_type) {
            (Some(a), Some(t)) => format!("{a} (model_type {t})"),
            (Some(a), None) => a.to_string(),
            (None, t) => format!("model_type {}", t.unwrap_or_default()),
        };
        PipelineError::Unsupported {
            path: path.to_path_buf(),
            message: format!("{name} is not a model family moetrace runs; it runs {}", families_text()),
        }
    })
}

impl ModelConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = stage_types::input::read_regular_text(path, 16 * stage_types::input::MIB)
            .map_err(|source| PipelineError::Io { path: path.to_path_buf(), source })?;
        let json: Value = serde_json::from_str(&text)
            .map_err(|e| PipelineError::BadConfig { path: path.to_path_buf(), message: e.to_string() })?;
        Self::from_json(json, path)
    }

    /// Whether `self` and `other` compute the same thing: every
    /// hyper-parameter and the family equal, whatever key spellings,
    /// declared dtype or trained length their config.json has.
    pub fn same_computation(&self, other: &Self) -> bool {
        let computation = |c: &Self| Self { dtype: None, json: Value::Null, max_positions: None, ..c.clone() };
        computation(self) == computation(other)
    }

    /// [`ModelConfig::same_computation`] of two config.json values (as
    /// capture manifests record them; for tools that compare captures and
    /// do not parse configs themselves). Err names why one cannot be read.
    pub fn same_computation_json(a: &Value, b: &Value) -> std::result::Result<bool, String> {
        let parse = |v: &Value| Self::from_json(v.clone(), Path::new("manifest.json")).map_err(|e| e.to_string());
        Ok(parse(a)?.same_computation(&parse(b)?))
    }

    /// Validates a parsed config.json; `path` is only for messages.
    pub fn from_json(json: Value, path: &Path) -> Result<Self> {
        let obj = json.as_object().ok_or_else(|| PipelineError::BadConfig {
            path: path.to_path_buf(),
            message: "the top level is not a JSON object".into(),
        })?;
        let has_experts =
            ["num_experts", "num_local_experts"].iter().any(|k| obj.get(*k).is_some_and(|v| v.as_u64() != Some(0)));
        let family = family_of(obj, path, has_experts)?;
        let keys = Keys { obj, path };
        let num_experts = keys.opt_usize(family.experts_keys)?.unwrap_or(0);
        let model_type = keys.opt_str("model_type")?.unwrap_or_default();
        let is_moe = num_experts > 0 || model_type.contains("moe") || family.experts_only;
        let hidden_size = keys.usize(&["hidden_size"])?;
        let num_heads = keys.usize(&["num_attention_heads"])?;
        let mla = if family.mla { Some(crate::mla_config::MlaConfig::from_json(obj, path)?) } else { None };
        // MLA: a head's query and key are its nope and rope columns; its
        // keys and values have as many heads as its queries.
        let head_dim = match (&mla, keys.opt_usize(&["head_dim"])?) {
            (Some(m), _) => m.qk_head(),
            (None, Some(hd)) => hd,
            (None, None) => hidden_size / num_heads.max(1),
        };
        let architecture = family.architecture.to_string();
        let num_layers = keys.usize(&["num_hidden_layers"])?;
        let oss = if family.oss {
            Some(crate::oss_config::OssConfig::from_json(obj, path, num_layers.min(MAX_LAYERS))?)
        } else {
            None
        };
        let rope_theta = match keys.opt_f64(&["rope_theta"])? {
            Some(t) => t,
            None => match obj.get("rope_parameters").and_then(|p| p.get("rope_theta")) {
                Some(v) => v.as_f64().ok_or_else(|| keys.bad("rope_parameters.rope_theta", "a number"))?,
                None => {
                    return Err(PipelineError::MissingConfigKey {
                        path: path.to_path_buf(),
                        key: "rope_theta",
                        hint: " (or rope_parameters.rope_theta)".into(),
                    });
                }
            },
        };
        let config = ModelConfig {
            architecture,
            hidden_size,
            num_layers,
            num_heads,
            num_kv_heads: if mla.is_some() { num_heads } else { keys.usize(&["num_key_value_heads"])? },
            head_dim,
            // A family of experts only has no dense layer to use it for
            // (Mixtral's `intermediate_size` is its experts' width).
            intermediate_size: if family.experts_only {
                0
            } else {
                keys.opt_usize(&["intermediate_size"])?.unwrap_or(0)
            },
            moe_intermediate_size: if is_moe { keys.usize(&[family.expert_width_key])? } else { 0 },
            shared_expert_intermediate_size: match family.shared_expert {
                Some(shared) if is_moe => {
                    let count = match family.shared_expert_count_key {
                        Some(key) => keys.opt_usize(&[key])?.unwrap_or(1),
                        None => 1,
                    };
                    keys.opt_usize(&[shared.width_key])?.unwrap_or(0) * count
                }
                _ => 0,
            },
            shared_expert_gate: is_moe && family.shared_expert.is_some_and(|s| s.gated),
            num_experts: if is_moe { keys.usize(family.experts_keys)? } else { 0 },
            experts_per_token: if is_moe { keys.usize(&["num_experts_per_tok"])? } else { 0 },
            norm_topk_prob: keys.opt_bool("norm_topk_prob")?.unwrap_or(family.norm_topk_default),
            decoder_sparse_step: keys.opt_usize(&["decoder_sparse_step"])?.unwrap_or(1),
            mlp_only_layers: {
                let mut dense: Vec<usize> = match obj.get("mlp_only_layers") {
                    None | Some(Value::Null) => Vec::new(),
                    Some(v) => serde_json::from_value(v.clone())
                        .map_err(|_| keys.bad("mlp_only_layers", "a list of layer indices"))?,
                };
                // DeepSeek's first_k_dense_replace: its leading layers dense.
                if let Some(key) = family.dense_first_key {
                    let first = keys.opt_usize(&[key])?.unwrap_or(0).min(MAX_LAYERS);
                    dense.extend((0..first).filter(|l| !dense.contains(l)).collect::<Vec<_>>());
                }
                dense
            },
            grouped_router: if family.grouped_router && is_moe {
                Some(GroupedTopK {
                    n_group: keys.opt_usize(&["n_group"])?.unwrap_or(1),
                    topk_group: keys.opt_usize(&["topk_group"])?.unwrap_or(1),
                    top_k: keys.usize(&["num_experts_per_tok"])?,
                    normalise: keys.opt_bool("norm_topk_prob")?.unwrap_or(family.norm_topk_default),
                    scaling: keys.opt_f64(&["routed_scaling_factor"])?.unwrap_or(1.0),
                })
            } else {
                None
            },
            rms_norm_eps: keys.opt_f64(&["rms_norm_eps"])?.unwrap_or(1e-6),
            rope_theta,
            vocab_size: keys.usize(&["vocab_size"])?,
            max_positions: keys.opt_usize(&["max_position_embeddings"])?,
            tie_word_embeddings: keys.opt_bool("tie_word_embeddings")?.unwrap_or(false),
            attention_bias: keys.opt_bool(family.attention_bias_key)?.unwrap_or(family.attention_bias_default),
            qk_norm: family.qk_norm,
            // gpt-oss's windows are per layer (`oss`), computed, not refused.
            sliding_window: if family.oss
                || family.sliding_window_gated && !keys.opt_bool("use_sliding_window")?.unwrap_or(false)
            {
                None
            } else {
                keys.opt_usize(&["sliding_window"])?
            },
            dtype: match keys.opt_str("torch_dtype")? {
                Some(d) => Some(d),
                None => keys.opt_str("dtype")?,
            },
            mla,
            oss,
            expert_parallel: None,
            tensor_ranks: 1,
            json,
        };
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let bad = |message: String| PipelineError::BadConfig { path: path.to_path_buf(), message };
        for (name, value) in [
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
            ("decoder_sparse_step", self.decoder_sparse_step),
            ("max_position_embeddings", self.max_positions.unwrap_or(1)),
        ] {
            if value == 0 {
                return Err(bad(format!("`{name}` must be at least 1")));
            }
        }
        // Far above any real model, far below what would overflow a size
        // or take the machine down: checked before any list of tensors is
        // built from these numbers.
        for (name, value, max) in [
            ("hidden_size", self.hidden_size, MAX_WIDTH),
            ("num_hidden_layers", self.num_layers, MAX_LAYERS),
            ("num_attention_heads", self.num_heads, MAX_HEADS),
            ("num_key_value_heads", self.num_kv_heads, MAX_HEADS),
            ("head_dim", self.head_dim, MAX_HEAD_DIM),
            ("intermediate_size", self.intermediate_size, MAX_WIDTH * 8),
            ("moe_intermediate_size", self.moe_intermediate_size, MAX_WIDTH * 8),
            ("shared_expert_intermediate_size", self.shared_expert_intermediate_size, MAX_WIDTH * 8),
            ("num_experts", self.num_experts, MAX_EXPERTS),
            ("vocab_size", self.vocab_size, MAX_VOCAB),
            ("decoder_sparse_step", self.decoder_sparse_step, MAX_LAYERS),
            ("max_position_embeddings", self.max_positions.unwrap_or(1), MAX_POSITIONS),
        ] {
            if value > max {
                return Err(bad(format!("`{name}` is {value}, more than the {max} moetrace accepts")));
            }
        }
        if let Some(m) = &self.mla {
            for (name, value, max) in [
                ("kv_lora_rank", m.kv_lora_rank, MAX_WIDTH),
                ("q_lora_rank", m.q_lora_rank.unwrap_or(1), MAX_WIDTH),
                ("qk_nope_head_dim", m.qk_nope_head_dim.max(1), MAX_HEAD_DIM),
                ("qk_rope_head_dim", m.qk_rope_head_dim, MAX_HEAD_DIM),
                ("v_head_dim", m.v_head_dim, MAX_HEAD_DIM),
            ] {
                if value == 0 || value > max {
                    return Err(bad(format!("`{name}` is {value}: it must be between 1 and {max}")));
                }
            }
        }
        if let Some(router) = &self.grouped_router {
            router.check(self.num_experts).map_err(bad)?;
            if !router.scaling.is_finite() || router.scaling <= 0.0 {
                return Err(bad(format!("routed_scaling_factor {} must be a positive number", router.scaling)));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_heads, self.num_kv_heads
            )));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(bad(format!("head_dim {} must be even for RoPE", self.head_dim)));
        }
        if self.num_experts > 0 && (self.experts_per_token == 0 || self.experts_per_token > self.num_experts) {
            return Err(bad(format!(
                "num_experts_per_tok {} must be between 1 and num_experts {}",
                self.experts_per_token, self.num_experts
            )));
        }
        if (0..self.num_layers).any(|l| !self.is_moe_layer(l)) && self.intermediate_size == 0 {
            return Err(PipelineError::MissingConfigKey {
                path: path.to_path_buf(),
                key: "intermediate_size",
                hint: " (the model has dense layers)".into(),
            });
        }
        if !self.rms_norm_eps.is_finite()
            || self.rms_norm_eps < 0.0
            || !self.rope_theta.is_finite()
            || self.rope_theta <= 0.0
        {
            return Err(bad("rms_norm_eps must be >= 0 and rope_theta > 0".into()));
        }
        Ok(())
    }

    /// Whether layer `layer` is a Mixture-of-Experts layer: the model has
    /// experts, the layer is not in `mlp_only_layers`, and
    /// `(layer + 1) % decoder_sparse_step == 0`.
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        self.num_experts > 0
            && !self.mlp_only_layers.contains(&layer)
            && (layer + 1).is_multiple_of(self.decoder_sparse_step)
    }

    /// Splits the experts of every MoE layer across `ranks` expert-parallel
    /// ranks in contiguous blocks (rank r holds experts r*E/R..(r+1)*E/R),
    /// with `replicas` (expert, rank) copies, reduced as `rank_sum` says
    /// ([`ExpertParallel::checked`] says what is refused).
    pub fn set_expert_parallel(
        &mut self,
        ranks: usize,
        rank_sum: bool,
        replicas: &[(usize, usize)],
    ) -> std::result::Result<(), String> {
        self.expert_parallel =
            ExpertParallel::checked(self.num_experts, &self.architecture, ranks, rank_sum, replicas)?;
        Ok(())
    }

    /// Splits the row-split projections across `ranks` tensor-parallel
    /// ranks: each rank holds a contiguous block of the heads (o_proj's
    /// input) and of the dense and shared experts' intermediate columns
    /// (down_proj's input). Err (with the valid counts) where `ranks` is 0
    /// or does not divide them all.
    pub fn set_tensor_parallel(&mut self, ranks: usize) -> std::result::Result<(), String> {
        let mut widths = vec![("query heads", self.num_heads), ("key-value heads", self.num_kv_heads)];
        if (0..self.num_layers).any(|l| !self.is_moe_layer(l)) {
            widths.push(("intermediate_size", self.intermediate_size));
        }
        if self.shared_expert_intermediate_size > 0 {
            widths.push(("the shared expert's width", self.shared_expert_intermediate_size));
        }
        check_tensor_split(ranks, &widths)?;
        self.tensor_ranks = ranks;
        Ok(())
    }

    /// The optional parts layer `layer` has (which stages it produces).
    pub fn layer_traits(&self, layer: usize) -> stage_types::LayerTraits {
        stage_types::LayerTraits {
            dense: !self.is_moe_layer(layer),
            qkv_bias: self.attention_bias,
            qk_norm: self.qk_norm,
            shared_expert: self.shared_expert_intermediate_size > 0,
            shared_expert_gate: self.shared_expert_intermediate_size > 0 && self.shared_expert_gate,
            mla: self.mla.is_some(),
            mla_q_lora: self.mla.as_ref().is_some_and(|m| m.q_lora_rank.is_some()),
            grouped_router: self.grouped_router.is_some(),
            layer_windows: self.oss.is_some(),
            sinks: self.oss.is_some(),
            clamped_swiglu: self.oss.is_some(),
            expert_parallel: self.expert_parallel.is_some(),
            rank_sum: self.expert_parallel.as_ref().is_some_and(|p| p.rank_sum),
        }
    }

    /// The positions a query of layer `layer` sees at most (itself
    /// included), None for all earlier ones.
    pub fn attention_window(&self, layer: usize) -> Option<usize> {
        self.oss.as_ref().and_then(|o| o.window(layer))
    }

    /// Width of the attention output (o_proj's input): nh * hd, or
    /// nh * v_head_dim with MLA.
    pub fn attention_width(&self) -> usize {
        self.mla.as_ref().map_or(self.q_width(), |m| self.num_heads * m.v_head_dim)
    }

    /// Width of the qkv_matmul output: (nh + 2 nkv) * hd.
    pub fn qkv_width(&self) -> usize {
        (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
    }

    /// Width of the query projection: nh * hd.
    pub fn q_width(&self) -> usize {
        self.num_heads * self.head_dim
    }

    /// Width of the key (or value) projection: nkv * hd.
    pub fn kv_width(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn moe_json() -> Value {
        json!({
            "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
            "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 96,
            "moe_intermediate_size": 32, "num_experts": 8, "num_experts_per_tok": 2,
            "norm_topk_prob": true, "decoder_sparse_step": 1, "mlp_only_layers": [],
            "rms_norm_eps": 1e-6, "rope_theta": 1e6, "vocab_size": 100, "torch_dtype": "bfloat16"
        })
    }

    fn parse(v: Value) -> Result<ModelConfig> {
        ModelConfig::from_json(v, Path::new("config.json"))
    }

    #[test]
    fn one_computation_whatever_the_spellings_dtype_or_trained_length() {
        let a = moe_json();
        let mut b = moe_json();
        let o = b.as_object_mut().unwrap();
        o.remove("num_experts");
        o.insert("num_local_experts".into(), json!(8));
        o.remove("rope_theta");
        o.insert("rope_parameters".into(), json!({"rope_theta": 1000000.0}));
        o.insert("torch_dtype".into(), json!("float32"));
        o.insert("max_position_embeddings".into(), json!(4096));
        assert_eq!(ModelConfig::same_computation_json(&a, &b), Ok(true));
        let mut c = moe_json();
        c["num_experts_per_tok"] = json!(4);
        assert_eq!(ModelConfig::same_computation_json(&a, &c), Ok(false));
        let err =
            ModelConfig::same_computation_json(&a, &json!({"architectures": ["Glm4MoeForCausalLM"]})).unwrap_err();
        assert!(err.contains("Glm4MoeForCausalLM"), "{err}");
    }

    #[test]
    fn a_sliding_window_is_the_models_only_where_its_family_uses_it() {
        let mut qwen = moe_json();
        qwen["sliding_window"] = json!(8);
        assert_eq!(parse(qwen.clone()).unwrap().sliding_window, None, "Qwen: off unless use_sliding_window");
        qwen["use_sliding_window"] = json!(true);
        assert_eq!(parse(qwen).unwrap().sliding_window, Some(8));
        let mut mixtral = moe_json();
        let o = mixtral.as_object_mut().unwrap();
        o.insert("architectures".into(), json!(["MixtralForCausalLM"]));
        o.insert("model_type".into(), json!("mixtral"));
        o.insert("intermediate_size".into(), json!(48));
        o.insert("sliding_window".into(), json!(8));
        o.remove("norm_topk_prob");
        let c = parse(mixtral).unwrap();
        assert_eq!((c.sliding_window, c.intermediate_size, c.moe_intermediate_size), (Some(8), 0, 48));
        assert!(!c.qk_norm && c.norm_topk_prob);
    }

    #[test]
    fn reads_the_older_spelling() {
        let c = parse(moe_json()).unwrap();
        assert_eq!(c.num_experts, 8);
        assert_eq!(c.rope_theta, 1e6);
        assert_eq!(c.dtype.as_deref(), Some("bfloat16"));
        assert!((0..4).all(|l| c.is_moe_layer(l)));
        assert_eq!(c.qkv_width(), (4 + 4) * 16);
    }

    #[test]
    fn reads_the_newer_spelling() {
        let mut v = moe_json();
        let o = v.as_object_mut().unwrap();
        let e = o.remove("num_experts").unwrap();
        o.insert("num_local_experts".into(), e);
        o.remove("rope_theta");
        o.insert("rope_parameters".into(), json!({"rope_theta": 5e5, "rope_type": "default"}));
        o.remove("torch_dtype");
        o.insert("dtype".into(), json!("float32"));
        let c = parse(v).unwrap();
        assert_eq!(c.num_experts, 8);
        assert_eq!(c.rope_theta, 5e5);
        assert_eq!(c.dtype.as_deref(), Some("float32"));
    }

    #[test]
    fn mlp_only_layers_and_sparse_step_make_dense_layers() {
        let mut v = moe_json();
        v["mlp_only_layers"] = json!([0]);
        v["decoder_sparse_step"] = json!(2);
        let c = parse(v).unwrap();
        let kinds: Vec<bool> = (0..4).map(|l| c.is_moe_layer(l)).collect();
        assert_eq!(kinds, [false, true, false, true]);
    }

    #[test]
    fn missing_required_key_is_named() {
        let mut v = moe_json();
        v.as_object_mut().unwrap().remove("hidden_size");
        let msg = parse(v).unwrap_err().to_string();
        assert!(msg.contains("missing required key `hidden_size`"), "{msg}");
        let mut v = moe_json();
        v.as_object_mut().unwrap().remove("rope_theta");
        let msg = parse(v).unwrap_err().to_string();
        assert!(msg.contains("rope_theta") && msg.contains("rope_parameters"), "{msg}");
    }

    #[test]
    fn wrong_types_and_impossible_values_are_rejected() {
        let mut v = moe_json();
        v["hidden_size"] = json!("big");
        assert!(parse(v).unwrap_err().to_string().contains("`hidden_size` must be a non-negative integer"));
        let mut v = moe_json();
        v["num_experts_per_tok"] = json!(9);
        assert!(parse(v).unwrap_err().to_string().contains("num_experts_per_tok 9"));
        let mut v = moe_json();
        v["num_key_value_heads"] = json!(3);
        assert!(parse(v).unwrap_err().to_string().contains("multiple"));
    }

    #[test]
    fn dense_model_needs_no_expert_keys() {
        let mut v = moe_json();
        let o = v.as_object_mut().unwrap();
        for k in ["num_experts", "num_experts_per_tok", "moe_intermediate_size"] {
            o.remove(k);
        }
        o.insert("model_type".into(), json!("qwen3"));
        let c = parse(v).unwrap();
        assert_eq!(c.num_experts, 0);
        assert!(!c.is_moe_layer(0));
    }
}
