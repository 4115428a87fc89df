//! Synthetic models: presets with real dimensions and seeded random weights
//! that have the statistics of a trained net, so every command works with
//! no download.
//!
//! Every weight is a pure function of (seed, tensor name, element index):
//! a splitmix64 hash gives four 16-bit uniforms whose sum (Irwin–Hall,
//! close to normal) is scaled in f32 and rounded to bf16. The same
//! function can run in a GPU kernel and give bit-identical weights, a
//! tensor does not depend on which other tensors exist (a 2-layer cut of a
//! preset has the same first two layers), and generation parallelises
//! without changing a bit.

use rayon::prelude::*;
use serde_json::json;

use super::gguf::GgmlType;
use super::{BlockRecipe, SyntheticRecipe, WeightDtype, WeightStore, WeightTensor};
use crate::config::ModelConfig;
use crate::error::{PipelineError, Result};
use crate::load_meter::LoadMeter;
use crate::model::{TensorRole, TensorSpec, tensor_specs};

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
    /// Projections and the embedding in ggml blocks, as a Q4_K_M GGUF
    /// holds them (synthetic_blocks.rs): Q6_K for v, the down projections
    /// and lm_head, Q4_K for the rest; norms and routers stay bf16.
    quantized: bool,
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
    quantized: false,
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
            quantized: false,
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
            quantized: false,
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
            quantized: false,
        },
        QWEN3_30B_A3B,
        SyntheticPreset {
            name: "qwen3-30b-a3b-q4km",
            description: "qwen3-30b-a3b with Q4_K_M-style weights kept quantized (Q4_K, Q6_K for v, down and lm_head): the decode benchmark against the quantized bytes",
            quantized: true,
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
            quantized: true,
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
            quantized: false,
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
            quantized: false,
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
            obj.insert("num_experts".into(), json!(self.experts));
            obj.insert("num_experts_per_tok".into(), json!(self.experts_per_token));
            obj.insert(family.expert_width_key.into(), json!(self.moe_intermediate));
            obj.insert("norm_topk_prob".into(), json!(true));
            obj.insert("decoder_sparse_step".into(), json!(1));
            obj.insert("mlp_only_layers".into(), json!([]));
        }
        ModelConfig::from_json(json, std::path::Path::new(self.name))
    }

    /// Generates every tensor of `config` (as bf16, or blocks for a
    /// quantized preset), after checking it fits in memory.
    /// `meter` counts the bytes made.
    pub fn generate(&self, config: &ModelConfig, seed: u64, meter: &LoadMeter) -> Result<WeightStore> {
        generate(config, seed, self.name, self.quantized, meter)
    }

    /// Every tensor of `config`, not materialised: each is computed where
    /// it is read (see [`synthetic_store_on_demand`]).
    pub fn on_demand(&self, config: &ModelConfig, seed: u64) -> WeightStore {
        on_demand(config, seed, self.quantized)
    }
}

/// Generates all tensors `config` implies, as bf16, from `seed`.
pub fn generate_weights(config: &ModelConfig, seed: u64, label: &str) -> Result<WeightStore> {
    generate(config, seed, label, false, &LoadMeter::default())
}

fn generate(config: &ModelConfig, seed: u64, label: &str, quantized: bool, meter: &LoadMeter) -> Result<WeightStore> {
    let recipes = recipes(config, seed, quantized);
    let need: usize = recipes.iter().map(|(s, r)| r.dtype().bytes_for(s.shape.iter().product())).sum();
    if let Some(available) = available_memory_bytes() {
        // Leave room for activations, the OS and the capture writer.
        if need as f64 > available as f64 * 0.8 {
            return Err(PipelineError::SyntheticTooLarge {
                preset: label.to_string(),
                layers: config.num_layers,
                need_gb: need as f64 / 1e9,
                available_gb: available as f64 / 1e9,
            });
        }
    }
    meter.begin("generating synthetic weights", need as u64);
    let mut store = WeightStore::default();
    for (spec, recipe) in recipes {
        let numel: usize = spec.shape.iter().product();
        let recipe = match recipe {
            Recipe::Blocks(r) => {
                let mut bytes = vec![0u8; WeightDtype::Quant(r.kind).bytes_for(numel)];
                let chunk = r.block_bytes() * 256;
                bytes.par_chunks_mut(chunk).enumerate().for_each(|(i, out)| {
                    r.fill(i as u64 * 256, out);
                    meter.advance(out.len() as u64);
                });
                store.insert(WeightTensor::owned(spec.name, WeightDtype::Quant(r.kind), spec.shape, bytes));
                continue;
            }
            Recipe::Values(r) => r,
        };
        let mut bytes = vec![0u8; numel * 2];
        bytes.par_chunks_mut(1 << 16).enumerate().for_each(|(chunk, out)| {
            let first = chunk * (1 << 15);
            for (j, pair) in out.chunks_exact_mut(2).enumerate() {
                pair.copy_from_slice(&recipe.value((first + j) as u64).to_bits().to_le_bytes());
            }
            meter.advance(out.len() as u64);
        });
        store.insert(WeightTensor::owned(spec.name, WeightDtype::Bf16, spec.shape, bytes));
    }
    Ok(store)
}

/// All tensors `config` implies, from `seed`, not materialised: each is
/// computed where it is read (the CUDA backend generates them on the
/// device, so a model larger than host memory never exists on the host).
pub fn synthetic_store_on_demand(config: &ModelConfig, seed: u64) -> WeightStore {
    on_demand(config, seed, false)
}

fn on_demand(config: &ModelConfig, seed: u64, quantized: bool) -> WeightStore {
    let mut store = WeightStore::default();
    for (spec, recipe) in recipes(config, seed, quantized) {
        store.insert(match recipe {
            Recipe::Values(r) => WeightTensor::synthetic(spec.name, spec.shape, r),
            Recipe::Blocks(r) => WeightTensor::synthetic_blocks(spec.name, spec.shape, r),
        });
    }
    store
}

/// How one synthetic tensor is made.
enum Recipe {
    /// bf16 values.
    Values(SyntheticRecipe),
    /// ggml blocks.
    Blocks(BlockRecipe),
}

impl Recipe {
    fn dtype(&self) -> WeightDtype {
        match self {
            Recipe::Values(_) => WeightDtype::Bf16,
            Recipe::Blocks(r) => WeightDtype::Quant(r.kind),
        }
    }
}

/// Every tensor `config` implies with the statistics of its role; with
/// `quantized`, the embedding and projections whose rows are whole
/// 256-value blocks as Q4_K, or Q6_K for v, the down projections and
/// lm_head (as llama.cpp's Q4_K_M mix keeps more bits there).
fn recipes(config: &ModelConfig, seed: u64, quantized: bool) -> Vec<(TensorSpec, Recipe)> {
    let layers = config.num_layers.max(1) as f32;
    tensor_specs(config)
        .into_iter()
        .map(|spec| {
            let (mean, std) = match spec.role {
                TensorRole::Embedding => (0.0, 0.05),
                TensorRole::Norm => (1.0, 0.1),
                TensorRole::Projection { fan_in } => (0.0, 1.0 / (fan_in as f32).sqrt()),
                TensorRole::OutputProjection { fan_in } => (0.0, 1.0 / (2.0 * layers * fan_in as f32).sqrt()),
                TensorRole::Router { fan_in } => (0.0, 2.0 / (fan_in as f32).sqrt()),
                TensorRole::Bias => (0.0, 0.02),
            };
            let key = tensor_key(seed, &spec.name);
            let blocks = quantized
                && matches!(
                    spec.role,
                    TensorRole::Embedding | TensorRole::Projection { .. } | TensorRole::OutputProjection { .. }
                )
                && spec.shape.last().is_some_and(|k| k.is_multiple_of(256));
            if blocks {
                let more_bits = ["v_proj", "down_proj", "lm_head"].iter().any(|n| spec.name.contains(n));
                let kind = if more_bits { GgmlType::Q6_K } else { GgmlType::Q4_K };
                return (spec, Recipe::Blocks(BlockRecipe::new(key, kind, std)));
            }
            (spec, Recipe::Values(SyntheticRecipe { key, mean, std }))
        })
        .collect()
}

/// splitmix64 finaliser.
pub(super) fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The per-tensor key: FNV-1a of the name, mixed with the seed.
pub fn tensor_key(seed: u64, name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix(h ^ mix(seed))
}

/// Element `index` of the tensor with key `key`: mean + std * z where z is
/// the standardised sum of four 16-bit uniforms from
/// `mix(key + index * golden)`. Only integer operations, one f32 multiply and
/// one f32 add (no FMA), so a GPU kernel can reproduce it bit for bit.
pub fn synthetic_value(key: u64, index: u64, mean: f32, std: f32) -> f32 {
    let h = mix(key.wrapping_add(index.wrapping_mul(0x9e37_79b9_7f4a_7c15)));
    let sum = (h & 0xffff) + ((h >> 16) & 0xffff) + ((h >> 32) & 0xffff) + (h >> 48);
    // Sum of four U{0..65535}: mean 131070, variance 4 * (65536² - 1) / 12.
    let centred = sum as i64 - 131_070;
    let scale = (std as f64 / (4.0 * (65536.0f64 * 65536.0 - 1.0) / 12.0).sqrt()) as f32;
    centred as f32 * scale + mean
}

/// MemAvailable from /proc/meminfo, in bytes, where the OS tells.
pub fn available_memory_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_have_the_requested_mean_and_std() {
        let key = tensor_key(7, "w");
        let n = 200_000;
        let v: Vec<f64> = (0..n).map(|i| synthetic_value(key, i, 1.0, 0.5) as f64).collect();
        let mean = v.iter().sum::<f64>() / n as f64;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        assert!((mean - 1.0).abs() < 0.01, "{mean}");
        assert!((var.sqrt() - 0.5).abs() < 0.01, "{}", var.sqrt());
    }

    #[test]
    fn on_demand_tensors_read_exactly_as_materialised_ones() {
        let preset = SyntheticPreset::by_name("tiny-moe").unwrap();
        let config = preset.config(Some(1)).unwrap();
        let (made, lazy) =
            (preset.generate(&config, 3, &LoadMeter::default()).unwrap(), synthetic_store_on_demand(&config, 3));
        assert_eq!(made.tensors().len(), lazy.tensors().len());
        assert_eq!(made.total_bytes(), lazy.total_bytes());
        for (a, b) in made.tensors().iter().zip(lazy.tensors()) {
            assert_eq!((&a.name, &a.shape, a.dtype), (&b.name, &b.shape, b.dtype));
            assert!(a.recipe().is_none() && b.recipe().is_some());
            assert_eq!(a.bytes(), b.bytes(), "{}", a.name);
            let (mut x, mut y) = (vec![0.0; 5], vec![0.0; 5]);
            a.read_f32(a.numel() - 5, &mut x);
            b.read_f32(b.numel() - 5, &mut y);
            assert_eq!(x, y, "{}", a.name);
        }
    }

    #[test]
    fn weights_depend_on_seed_and_name_but_not_on_layer_count() {
        let preset = SyntheticPreset::by_name("tiny-moe").unwrap();
        let full = preset.generate(&preset.config(None).unwrap(), 7, &LoadMeter::default()).unwrap();
        let cut = preset.generate(&preset.config(Some(1)).unwrap(), 7, &LoadMeter::default()).unwrap();
        let other = preset.generate(&preset.config(Some(1)).unwrap(), 8, &LoadMeter::default()).unwrap();
        let name = "model.layers.0.self_attn.q_proj.weight";
        let get = |s: &WeightStore| s.get(s.id(name).unwrap()).to_f32_vec();
        assert_eq!(get(&full), get(&cut));
        assert_ne!(get(&full), get(&other));
        assert!(cut.id("model.layers.1.input_layernorm.weight").is_none());
    }

    #[test]
    fn the_q4km_presets_hold_blocks_read_the_same_on_demand_and_weigh_what_a_q4km_file_does() {
        let preset = SyntheticPreset::by_name("tiny-moe-q4km").unwrap();
        let config = preset.config(None).unwrap();
        let (made, lazy) = (preset.generate(&config, 3, &LoadMeter::default()).unwrap(), preset.on_demand(&config, 3));
        let kind = |s: &WeightStore, name: &str| s.get(s.id(name).unwrap()).dtype;
        let layer = "model.layers.1.";
        assert_eq!(kind(&made, &format!("{layer}self_attn.q_proj.weight")), WeightDtype::Quant(GgmlType::Q4_K));
        assert_eq!(kind(&made, &format!("{layer}self_attn.v_proj.weight")), WeightDtype::Quant(GgmlType::Q6_K));
        assert_eq!(kind(&made, &format!("{layer}mlp.experts.3.down_proj.weight")), WeightDtype::Quant(GgmlType::Q6_K));
        assert_eq!(kind(&made, &format!("{layer}mlp.gate.weight")), WeightDtype::Bf16);
        assert_eq!(kind(&made, "model.embed_tokens.weight"), WeightDtype::Quant(GgmlType::Q4_K));
        for (a, b) in made.tensors().iter().zip(lazy.tensors()) {
            assert_eq!((&a.name, &a.shape, a.dtype), (&b.name, &b.shape, b.dtype));
            assert_eq!(a.bytes(), b.bytes(), "{}", a.name);
            let n = a.numel().min(300);
            let (mut x, mut y) = (vec![0.0; n], vec![0.0; n]);
            a.read_f32(a.numel() - n, &mut x);
            b.read_f32(b.numel() - n, &mut y);
            assert_eq!(x, y, "{}", a.name);
        }
        let big = SyntheticPreset::by_name("qwen3-30b-a3b-q4km").unwrap();
        let c = big.config(None).unwrap();
        let bytes: usize =
            recipes(&c, 1, true).iter().map(|(s, r)| r.dtype().bytes_for(s.shape.iter().product())).sum();
        // llama.cpp's Qwen3-30B-A3B Q4_K_M is about 18.6 GB; this mix (Q6_K
        // for every layer's down projections, not some) 19.8 GB.
        assert!((18e9..21e9).contains(&(bytes as f64)), "{bytes}");
    }

    #[test]
    fn unknown_preset_lists_the_valid_ones() {
        let msg = SyntheticPreset::by_name("huge").unwrap_err().to_string();
        assert!(msg.contains("`huge`") && msg.contains("tiny-moe") && msg.contains("qwen3-30b-a3b"), "{msg}");
    }

    #[test]
    fn qwen3_30b_preset_has_the_real_dimensions() {
        let c = SyntheticPreset::by_name("qwen3-30b-a3b").unwrap().config(None).unwrap();
        assert_eq!((c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim), (48, 2048, 32, 4, 128));
        assert_eq!((c.num_experts, c.experts_per_token, c.moe_intermediate_size, c.vocab_size), (128, 8, 768, 151936));
        let bytes: usize = tensor_specs(&c).iter().map(|s| s.shape.iter().product::<usize>() * 2).sum();
        assert!((60e9..62e9).contains(&(bytes as f64)), "{bytes}");
    }
}
