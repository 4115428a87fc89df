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

use super::{SyntheticRecipe, WeightDtype, WeightStore, WeightTensor};
use crate::config::ModelConfig;
use crate::error::{PipelineError, Result};
use crate::model::{TensorRole, TensorSpec, tensor_specs};

/// A named synthetic architecture.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SyntheticPreset {
    /// Preset name as written in configs.
    pub name: &'static str,
    /// What it is for.
    pub description: &'static str,
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
}

impl SyntheticPreset {
    /// Every preset.
    pub const ALL: &'static [SyntheticPreset] = &[
        SyntheticPreset {
            name: "tiny-moe",
            description: "4-layer Qwen3-MoE, H 256, 16 experts top-4; the default",
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
        },
        SyntheticPreset {
            name: "tiny-dense",
            description: "3-layer dense Qwen3, H 256, I 512",
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
        },
        SyntheticPreset {
            name: "tiny-moe-qwen3-vocab",
            description: "2-layer Qwen3-MoE, H 128, 8 experts top-2, Qwen3's vocabulary (V 151936): text prompts with Qwen3's tokenizer, quickly",
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
        },
        SyntheticPreset {
            name: "qwen3-30b-a3b",
            description: "Qwen3-30B-A3B dimensions: 48 layers, H 2048, 32/4 heads, hd 128, 128 experts top-8, I 768, V 151936",
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
        let moe = self.experts > 0;
        let mut json = json!({
            "architectures": [if moe { "Qwen3MoeForCausalLM" } else { "Qwen3ForCausalLM" }],
            "model_type": if moe { "qwen3_moe" } else { "qwen3" },
            "hidden_size": self.hidden,
            "num_hidden_layers": layers.unwrap_or(self.layers),
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate,
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
        if moe {
            let obj = json.as_object_mut().expect("object");
            obj.insert("num_experts".into(), json!(self.experts));
            obj.insert("num_experts_per_tok".into(), json!(self.experts_per_token));
            obj.insert("moe_intermediate_size".into(), json!(self.moe_intermediate));
            obj.insert("norm_topk_prob".into(), json!(true));
            obj.insert("decoder_sparse_step".into(), json!(1));
            obj.insert("mlp_only_layers".into(), json!([]));
        }
        ModelConfig::from_json(json, std::path::Path::new(self.name))
    }

    /// Generates every tensor of `config` as bf16, after checking it fits in
    /// memory.
    pub fn generate(&self, config: &ModelConfig, seed: u64) -> Result<WeightStore> {
        generate_weights(config, seed, self.name)
    }
}

/// Generates all tensors `config` implies, as bf16, from `seed`.
pub fn generate_weights(config: &ModelConfig, seed: u64, label: &str) -> Result<WeightStore> {
    let recipes = recipes(config, seed);
    let need: usize = recipes.iter().map(|(s, _)| s.shape.iter().product::<usize>() * 2).sum();
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
    let mut store = WeightStore::default();
    for (spec, recipe) in recipes {
        let numel: usize = spec.shape.iter().product();
        let mut bytes = vec![0u8; numel * 2];
        bytes.par_chunks_mut(1 << 16).enumerate().for_each(|(chunk, out)| {
            let first = chunk * (1 << 15);
            for (j, pair) in out.chunks_exact_mut(2).enumerate() {
                pair.copy_from_slice(&recipe.value((first + j) as u64).to_bits().to_le_bytes());
            }
        });
        store.insert(WeightTensor::owned(spec.name, WeightDtype::Bf16, spec.shape, bytes));
    }
    Ok(store)
}

/// All tensors `config` implies, from `seed`, not materialised: each is
/// computed where it is read (the CUDA backend generates them on the
/// device, so a model larger than host memory never exists on the host).
pub fn synthetic_store_on_demand(config: &ModelConfig, seed: u64) -> WeightStore {
    let mut store = WeightStore::default();
    for (spec, recipe) in recipes(config, seed) {
        store.insert(WeightTensor::synthetic(spec.name, spec.shape, recipe));
    }
    store
}

/// Every tensor `config` implies with the statistics of its role.
fn recipes(config: &ModelConfig, seed: u64) -> Vec<(TensorSpec, SyntheticRecipe)> {
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
            (spec, SyntheticRecipe { key, mean, std })
        })
        .collect()
}

/// splitmix64 finaliser.
fn mix(mut z: u64) -> u64 {
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
        let (made, lazy) = (preset.generate(&config, 3).unwrap(), synthetic_store_on_demand(&config, 3));
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
        let full = preset.generate(&preset.config(None).unwrap(), 7).unwrap();
        let cut = preset.generate(&preset.config(Some(1)).unwrap(), 7).unwrap();
        let other = preset.generate(&preset.config(Some(1)).unwrap(), 8).unwrap();
        let name = "model.layers.0.self_attn.q_proj.weight";
        let get = |s: &WeightStore| s.get(s.id(name).unwrap()).to_f32_vec();
        assert_eq!(get(&full), get(&cut));
        assert_ne!(get(&full), get(&other));
        assert!(cut.id("model.layers.1.input_layernorm.weight").is_none());
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
