//! [`Model`]: a config, its weights, and the ids of every tensor each layer
//! uses, resolved and shape-checked once at load time.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::ModelConfig;
use crate::error::{PipelineError, Result};
use crate::weights::{WeightId, WeightStore, load_checkpoint};

mod synthetic;
pub use synthetic::{ON_READ_ABOVE_BYTES, ON_READ_MAX_STEPS};

/// How a tensor is initialised in a synthetic model; also says what it is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TensorRole {
    /// The token embedding table.
    Embedding,
    /// An RMSNorm weight (values near 1).
    Norm,
    /// An input projection (q, k, v, gate, up, router) with this fan-in.
    Projection {
        /// Input width.
        fan_in: usize,
    },
    /// An output projection writing into the residual (o_proj, down_proj).
    OutputProjection {
        /// Input width.
        fan_in: usize,
    },
    /// The MoE router matrix.
    Router {
        /// Input width.
        fan_in: usize,
    },
    /// A projection bias.
    Bias,
    /// DeepSeek's router correction bias (`e_score_correction_bias`):
    /// added to the scores to choose experts, never to weight them.
    RouterBias,
    /// gpt-oss's attention sinks: one logit per head joining the softmax.
    Sink,
}

/// Name, shape and role of one tensor the config implies.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    /// Checkpoint name.
    pub name: String,
    /// Expected shape.
    pub shape: Vec<usize>,
    /// What it is.
    pub role: TensorRole,
}

/// The three projections of a SwiGLU MLP (dense or one expert) of width
/// `i`, named `{prefix}{gate,up,down}_proj.weight`.
fn swiglu(push: &mut impl FnMut(String, Vec<usize>, TensorRole), prefix: String, h: usize, i: usize) {
    push(format!("{prefix}gate_proj.weight"), vec![i, h], TensorRole::Projection { fan_in: h });
    push(format!("{prefix}up_proj.weight"), vec![i, h], TensorRole::Projection { fan_in: h });
    push(format!("{prefix}down_proj.weight"), vec![h, i], TensorRole::OutputProjection { fan_in: i });
}

/// Every tensor a checkpoint of this config must hold, in a fixed order.
pub fn tensor_specs(config: &ModelConfig) -> Vec<TensorSpec> {
    let c = config;
    let (h, hd, v) = (c.hidden_size, c.head_dim, c.vocab_size);
    let mut specs = Vec::new();
    let mut push = |name: String, shape: Vec<usize>, role| specs.push(TensorSpec { name, shape, role });
    push("model.embed_tokens.weight".into(), vec![v, h], TensorRole::Embedding);
    for l in 0..c.num_layers {
        let p = format!("model.layers.{l}.");
        push(format!("{p}input_layernorm.weight"), vec![h], TensorRole::Norm);
        if let Some(m) = &c.mla {
            let a = format!("{p}self_attn.");
            let proj = |fan_in| TensorRole::Projection { fan_in };
            match m.q_lora_rank {
                Some(r) => {
                    push(format!("{a}q_a_proj.weight"), vec![r, h], proj(h));
                    push(format!("{a}q_a_layernorm.weight"), vec![r], TensorRole::Norm);
                    push(format!("{a}q_b_proj.weight"), vec![c.q_width(), r], proj(r));
                }
                None => push(format!("{a}q_proj.weight"), vec![c.q_width(), h], proj(h)),
            }
            let (r, heads) = (m.kv_lora_rank, c.num_heads);
            push(format!("{a}kv_a_proj_with_mqa.weight"), vec![r + m.qk_rope_head_dim, h], proj(h));
            push(format!("{a}kv_a_layernorm.weight"), vec![r], TensorRole::Norm);
            push(format!("{a}kv_b_proj.weight"), vec![heads * (m.qk_nope_head_dim + m.v_head_dim), r], proj(r));
        } else {
            push(format!("{p}self_attn.q_proj.weight"), vec![c.q_width(), h], TensorRole::Projection { fan_in: h });
            push(format!("{p}self_attn.k_proj.weight"), vec![c.kv_width(), h], TensorRole::Projection { fan_in: h });
            push(format!("{p}self_attn.v_proj.weight"), vec![c.kv_width(), h], TensorRole::Projection { fan_in: h });
        }
        if c.attention_bias {
            push(format!("{p}self_attn.q_proj.bias"), vec![c.q_width()], TensorRole::Bias);
            push(format!("{p}self_attn.k_proj.bias"), vec![c.kv_width()], TensorRole::Bias);
            push(format!("{p}self_attn.v_proj.bias"), vec![c.kv_width()], TensorRole::Bias);
        }
        if c.oss.is_some() {
            push(format!("{p}self_attn.o_proj.bias"), vec![h], TensorRole::Bias);
            push(format!("{p}self_attn.sinks"), vec![c.num_heads], TensorRole::Sink);
        }
        if c.qk_norm {
            push(format!("{p}self_attn.q_norm.weight"), vec![hd], TensorRole::Norm);
            push(format!("{p}self_attn.k_norm.weight"), vec![hd], TensorRole::Norm);
        }
        push(
            format!("{p}self_attn.o_proj.weight"),
            vec![h, c.attention_width()],
            TensorRole::OutputProjection { fan_in: c.attention_width() },
        );
        push(format!("{p}post_attention_layernorm.weight"), vec![h], TensorRole::Norm);
        if c.is_moe_layer(l) {
            let i = c.moe_intermediate_size;
            push(format!("{p}mlp.gate.weight"), vec![c.num_experts, h], TensorRole::Router { fan_in: h });
            if c.grouped_router.is_some() {
                push(format!("{p}mlp.gate.e_score_correction_bias"), vec![c.num_experts], TensorRole::RouterBias);
            }
            if c.oss.is_some() {
                push(format!("{p}mlp.gate.bias"), vec![c.num_experts], TensorRole::Bias);
            }
            for e in 0..c.num_experts {
                swiglu(&mut push, format!("{p}mlp.experts.{e}."), h, i);
                if c.oss.is_some() {
                    for (proj, width) in [("gate", i), ("up", i), ("down", h)] {
                        push(format!("{p}mlp.experts.{e}.{proj}_proj.bias"), vec![width], TensorRole::Bias);
                    }
                }
            }
            if c.shared_expert_intermediate_size > 0 {
                swiglu(&mut push, format!("{p}mlp.shared_expert."), h, c.shared_expert_intermediate_size);
                if c.shared_expert_gate {
                    push(format!("{p}mlp.shared_expert_gate.weight"), vec![1, h], TensorRole::Projection { fan_in: h });
                }
            }
        } else {
            swiglu(&mut push, format!("{p}mlp."), h, c.intermediate_size);
        }
    }
    push("model.norm.weight".into(), vec![h], TensorRole::Norm);
    if !c.tie_word_embeddings {
        push("lm_head.weight".into(), vec![v, h], TensorRole::Projection { fan_in: h });
    }
    specs
}

/// Weight ids of one attention block.
#[derive(Debug, Clone)]
pub struct AttentionWeights {
    /// input_layernorm.
    pub input_norm: WeightId,
    /// q_proj, k_proj, v_proj (None in an MLA layer).
    pub qkv: Option<[WeightId; 3]>,
    /// Multi-head latent attention's projections, in an MLA layer.
    pub mla: Option<MlaWeightIds>,
    /// q_proj, k_proj, v_proj biases, when the model has them.
    pub qkv_bias: Option<[WeightId; 3]>,
    /// q_norm and k_norm, when the family has them.
    pub qk_norm: Option<[WeightId; 2]>,
    /// o_proj.
    pub o_proj: WeightId,
    /// o_proj's bias, [H] (gpt-oss).
    pub o_bias: Option<WeightId>,
    /// The attention sinks, [nh] (gpt-oss).
    pub sinks: Option<WeightId>,
    /// post_attention_layernorm.
    pub post_norm: WeightId,
}

/// Weight ids of one MLA block's projections and norms.
#[derive(Debug, Clone)]
pub struct MlaWeightIds {
    /// q_a_proj, [Rq, H], with q_lora_rank.
    pub q_a: Option<WeightId>,
    /// q_a_layernorm, [Rq], with q_lora_rank.
    pub q_a_norm: Option<WeightId>,
    /// q_b_proj [nh*dqk, Rq] with q_lora_rank, else q_proj [nh*dqk, H].
    pub q: WeightId,
    /// kv_a_proj_with_mqa, [Rkv + dr, H].
    pub kv_a: WeightId,
    /// kv_a_layernorm, [Rkv].
    pub kv_a_norm: WeightId,
    /// kv_b_proj, [nh*(dn + dv), Rkv].
    pub kv_b: WeightId,
}

/// Weight ids of one feed-forward block.
#[derive(Debug, Clone)]
pub enum MlpWeights {
    /// A dense SwiGLU MLP.
    Dense {
        /// gate_proj.
        gate: WeightId,
        /// up_proj.
        up: WeightId,
        /// down_proj.
        down: WeightId,
    },
    /// A Mixture-of-Experts block.
    Moe(MoeWeights),
}

/// Weight ids of one MoE block; `gate[e]` is expert `e`'s gate_proj.
#[derive(Debug, Clone)]
pub struct MoeWeights {
    /// The router, [E, H].
    pub router: WeightId,
    /// The router's correction bias, [E], with a grouped router.
    pub router_bias: Option<WeightId>,
    /// Per-expert gate_proj, [I, H] each.
    pub gate: Vec<WeightId>,
    /// Per-expert up_proj, [I, H] each.
    pub up: Vec<WeightId>,
    /// Per-expert down_proj, [H, I] each.
    pub down: Vec<WeightId>,
    /// The always-on shared expert, if the family has one.
    pub shared: Option<SharedExpertWeights>,
    /// The router's bias, [E], added to the logits (gpt-oss).
    pub logit_bias: Option<WeightId>,
    /// Per-expert biases of gate, up ([I] each) and down ([H]) (gpt-oss).
    pub expert_bias: Option<[Vec<WeightId>; 3]>,
}

/// Weight ids of an MoE block's shared expert.
#[derive(Debug, Clone)]
pub struct SharedExpertWeights {
    /// gate_proj, [S, H].
    pub gate: WeightId,
    /// up_proj, [S, H].
    pub up: WeightId,
    /// down_proj, [H, S].
    pub down: WeightId,
    /// shared_expert_gate, [1, H], when a sigmoid gate weights its output.
    pub weight_gate: Option<WeightId>,
}

/// Weight ids of one decoder layer.
#[derive(Debug, Clone)]
pub struct LayerWeights {
    /// Attention block.
    pub attention: AttentionWeights,
    /// Feed-forward block.
    pub mlp: MlpWeights,
}

/// Where a model came from, for manifests and messages.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    /// A Hugging Face checkpoint folder.
    Checkpoint(PathBuf),
    /// A synthetic model.
    Synthetic {
        /// Preset name.
        preset: String,
        /// Seed.
        seed: u64,
    },
}

/// A loaded model: config, weights, and resolved per-layer ids.
#[derive(Debug)]
pub struct Model {
    /// Hyper-parameters.
    pub config: ModelConfig,
    /// Every tensor.
    pub store: Arc<WeightStore>,
    /// Where it came from.
    pub source: ModelSource,
    /// model.embed_tokens.
    pub embedding: WeightId,
    /// model.norm.
    pub final_norm: WeightId,
    /// lm_head (the embedding when tied).
    pub lm_head: WeightId,
    /// Per-layer ids, index = layer.
    pub layers: Vec<LayerWeights>,
}

impl Model {
    /// Loads a Hugging Face checkpoint folder (config.json + safetensors),
    /// or a GGUF file (`.gguf`: config from its metadata, weights in their
    /// stored formats; see [`crate::weights::load_gguf`]).
    pub fn load(dir: &Path) -> Result<Self> {
        if dir.is_file() && dir.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
            let (json, store) = crate::weights::load_gguf(dir)?;
            let config = ModelConfig::from_json(json, dir)?;
            check_counts(&config, &store, dir)?;
            return Self::assemble(config, store, ModelSource::Checkpoint(dir.to_path_buf()));
        }
        if !dir.is_dir() {
            return Err(PipelineError::MissingModelDir { path: dir.to_path_buf() });
        }
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        // Tensors by moetrace's names, whatever the family calls them.
        let family = crate::families::Family::by_architecture(&config.architecture);
        let mut store =
            load_checkpoint(dir)?.renamed(|name| family.map_or(name.to_string(), |f| f.canonical_name(name)));
        if let Some(unpack) = family.and_then(|f| f.unpack) {
            store = unpack(store, &config, dir)?;
        }
        check_counts(&config, &store, &dir.join("config.json"))?;
        Self::assemble(config, store, ModelSource::Checkpoint(dir.to_path_buf()))
    }

    /// The expert sets of the model: for each MoE layer, the per-expert
    /// ids of its gate, up and down projections (one list each).
    pub fn expert_lists(&self) -> Vec<&[crate::weights::WeightId]> {
        self.layers
            .iter()
            .filter_map(|l| match &l.mlp {
                MlpWeights::Moe(m) => Some([&m.gate[..], &m.up[..], &m.down[..]]),
                MlpWeights::Dense { .. } => None,
            })
            .flatten()
            .collect()
    }

    /// Resolves every tensor the config implies and checks its shape.
    pub fn assemble(config: ModelConfig, store: WeightStore, source: ModelSource) -> Result<Self> {
        let dir = match &source {
            ModelSource::Checkpoint(p) => p.clone(),
            ModelSource::Synthetic { preset, .. } => PathBuf::from(format!("synthetic:{preset}")),
        };
        // A GGUF file's tensors are named as the file names them.
        let gguf = dir.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
        let family = crate::families::Family::by_architecture(&config.architecture);
        let shown = |hf: &str| match crate::weights::gguf_name(hf).filter(|_| gguf) {
            Some(g) => format!("{g} [{hf}]"),
            None => match family.map(|f| f.checkpoint_name(hf)).filter(|theirs| theirs != hf) {
                Some(theirs) => format!("{theirs} [{hf}]"),
                None => hf.to_string(),
            },
        };
        for spec in tensor_specs(&config) {
            let id = store.id(&spec.name).ok_or_else(|| {
                if matches!(spec.role, TensorRole::Bias) {
                    PipelineError::MissingAttentionBias { path: dir.clone(), name: shown(&spec.name) }
                } else {
                    PipelineError::MissingTensor { path: dir.clone(), name: shown(&spec.name) }
                }
            })?;
            let tensor = store.get(id);
            if tensor.shape != spec.shape {
                // GGUF lists dimensions innermost first.
                let (expected, actual) = if gguf {
                    (spec.shape.iter().rev().copied().collect(), tensor.shape.iter().rev().copied().collect())
                } else {
                    (spec.shape.clone(), tensor.shape.clone())
                };
                return Err(PipelineError::WrongShape { name: tensor.describe(), expected, actual });
            }
        }
        let id = |name: String| store.id(&name).expect("checked above");
        let layers = (0..config.num_layers)
            .map(|l| {
                let p = format!("model.layers.{l}.");
                let attention = AttentionWeights {
                    input_norm: id(format!("{p}input_layernorm.weight")),
                    qkv: config
                        .mla
                        .is_none()
                        .then(|| ["q", "k", "v"].map(|x| id(format!("{p}self_attn.{x}_proj.weight")))),
                    mla: config.mla.as_ref().map(|m| {
                        let a = |name: &str| id(format!("{p}self_attn.{name}.weight"));
                        let lora = m.q_lora_rank.is_some();
                        MlaWeightIds {
                            q_a: lora.then(|| a("q_a_proj")),
                            q_a_norm: lora.then(|| a("q_a_layernorm")),
                            q: a(if lora { "q_b_proj" } else { "q_proj" }),
                            kv_a: a("kv_a_proj_with_mqa"),
                            kv_a_norm: a("kv_a_layernorm"),
                            kv_b: a("kv_b_proj"),
                        }
                    }),
                    qkv_bias: config
                        .attention_bias
                        .then(|| ["q", "k", "v"].map(|x| id(format!("{p}self_attn.{x}_proj.bias")))),
                    qk_norm: config.qk_norm.then(|| ["q", "k"].map(|x| id(format!("{p}self_attn.{x}_norm.weight")))),
                    o_proj: id(format!("{p}self_attn.o_proj.weight")),
                    o_bias: config.oss.is_some().then(|| id(format!("{p}self_attn.o_proj.bias"))),
                    sinks: config.oss.is_some().then(|| id(format!("{p}self_attn.sinks"))),
                    post_norm: id(format!("{p}post_attention_layernorm.weight")),
                };
                let mlp = if config.is_moe_layer(l) {
                    let expert = |e: usize, w: &str| id(format!("{p}mlp.experts.{e}.{w}_proj.weight"));
                    MlpWeights::Moe(MoeWeights {
                        router: id(format!("{p}mlp.gate.weight")),
                        router_bias: config
                            .grouped_router
                            .is_some()
                            .then(|| id(format!("{p}mlp.gate.e_score_correction_bias"))),
                        gate: (0..config.num_experts).map(|e| expert(e, "gate")).collect(),
                        up: (0..config.num_experts).map(|e| expert(e, "up")).collect(),
                        down: (0..config.num_experts).map(|e| expert(e, "down")).collect(),
                        shared: (config.shared_expert_intermediate_size > 0).then(|| SharedExpertWeights {
                            gate: id(format!("{p}mlp.shared_expert.gate_proj.weight")),
                            up: id(format!("{p}mlp.shared_expert.up_proj.weight")),
                            down: id(format!("{p}mlp.shared_expert.down_proj.weight")),
                            weight_gate: config
                                .shared_expert_gate
                                .then(|| id(format!("{p}mlp.shared_expert_gate.weight"))),
                        }),
                        logit_bias: config.oss.is_some().then(|| id(format!("{p}mlp.gate.bias"))),
                        expert_bias: config.oss.is_some().then(|| {
                            ["gate", "up", "down"].map(|w| {
                                (0..config.num_experts)
                                    .map(|e| id(format!("{p}mlp.experts.{e}.{w}_proj.bias")))
                                    .collect()
                            })
                        }),
                    })
                } else {
                    MlpWeights::Dense {
                        gate: id(format!("{p}mlp.gate_proj.weight")),
                        up: id(format!("{p}mlp.up_proj.weight")),
                        down: id(format!("{p}mlp.down_proj.weight")),
                    }
                };
                LayerWeights { attention, mlp }
            })
            .collect();
        let embedding = id("model.embed_tokens.weight".into());
        Ok(Model {
            final_norm: id("model.norm.weight".into()),
            lm_head: if config.tie_word_embeddings { embedding } else { id("lm_head.weight".into()) },
            embedding,
            layers,
            config,
            store: Arc::new(store),
            source,
        })
    }

    /// Writes the model as a Hugging Face checkpoint folder (config.json +
    /// model.safetensors), e.g. to give a synthetic model to another tool.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let io = |source| PipelineError::Io { path: dir.to_path_buf(), source };
        std::fs::create_dir_all(dir).map_err(io)?;
        let config = serde_json::to_string_pretty(&self.config.json).expect("config serialises");
        std::fs::write(dir.join("config.json"), config + "\n").map_err(io)?;
        crate::weights::save_safetensors(&self.store, &dir.join("model.safetensors"))
    }

    /// The dtype name of the embedding table (`BF16`, `F16`, `F32`), taken
    /// as the checkpoint's weight dtype.
    pub fn weight_dtype(&self) -> &'static str {
        self.store.get(self.embedding).dtype.name()
    }
}

/// Checks config.json's layer and expert counts against the tensors the
/// checkpoint holds, before the list of expected tensors is built (a
/// config that claims a billion layers is refused here, by name).
fn check_counts(config: &ModelConfig, store: &WeightStore, config_path: &Path) -> Result<()> {
    let (mut layers, mut experts) = (0usize, 0usize);
    for t in store.tensors() {
        let Some((layer, rest)) = t.name.strip_prefix("model.layers.").and_then(|r| r.split_once('.')) else {
            continue;
        };
        let Ok(layer) = layer.parse::<usize>() else { continue };
        layers = layers.max(layer.saturating_add(1));
        let expert = rest.strip_prefix("mlp.experts.").and_then(|r| r.split_once('.')).map(|(e, _)| e.parse::<usize>());
        if let Some(Ok(e)) = expert {
            experts = experts.max(e.saturating_add(1));
        }
    }
    let bad = |message: String| PipelineError::BadConfig { path: config_path.to_path_buf(), message };
    if config.num_layers > layers {
        return Err(bad(format!(
            "`num_hidden_layers` is {} but the checkpoint has {layers} (tensors model.layers.N.* for N below {layers})",
            config.num_layers
        )));
    }
    let has_moe_layer = (0..config.num_layers).any(|l| config.is_moe_layer(l));
    if has_moe_layer && config.num_experts > experts {
        return Err(bad(format!(
            "`num_experts` is {} but the checkpoint has {experts} (tensors mlp.experts.E.* for E below {experts})",
            config.num_experts
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saved_synthetic_model_loads_back_identically() {
        let dir = std::env::temp_dir().join(format!("moetrace-save-{}", std::process::id()));
        let model = Model::synthetic("tiny-moe", 5, Some(1)).unwrap();
        model.save(&dir).unwrap();
        let back = Model::load(&dir).unwrap();
        assert_eq!(back.config.num_experts, model.config.num_experts);
        let name = "model.layers.0.mlp.experts.3.down_proj.weight";
        let get = |m: &Model| m.store.get(m.store.id(name).unwrap()).to_f32_vec();
        assert_eq!(get(&back), get(&model));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn wrong_shape_and_missing_tensor_are_named() {
        let model = Model::synthetic("tiny-dense", 5, Some(1)).unwrap();
        let mut json = model.config.json.clone();
        json["intermediate_size"] = serde_json::json!(500);
        let config = ModelConfig::from_json(json, Path::new("config.json")).unwrap();
        let store = crate::weights::SyntheticPreset::by_name("tiny-dense")
            .unwrap()
            .generate(&model.config, 5, &crate::LoadMeter::default())
            .unwrap();
        let msg = Model::assemble(config, store, model.source.clone()).unwrap_err().to_string();
        assert!(
            msg.contains("model.layers.0.mlp.gate_proj.weight")
                && msg.contains("[512, 256]")
                && msg.contains("[500, 256]"),
            "{msg}"
        );

        let mut json = model.config.json.clone();
        json["tie_word_embeddings"] = serde_json::json!(false);
        json["attention_bias"] = serde_json::json!(true);
        let config = ModelConfig::from_json(json, Path::new("config.json")).unwrap();
        let store = crate::weights::SyntheticPreset::by_name("tiny-dense")
            .unwrap()
            .generate(&model.config, 5, &crate::LoadMeter::default())
            .unwrap();
        let msg = Model::assemble(config, store, model.source.clone()).unwrap_err().to_string();
        assert!(msg.contains("q_proj.bias"), "{msg}");
    }
}
