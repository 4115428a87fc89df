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

use super::gguf::GgmlType;
use super::host_buffer::HostBuffer;
use super::synthetic_fp8::Fp8Recipe;
use super::synthetic_mxfp4::Mxfp4Recipe;
use super::synthetic_values::tensor_key;
use super::{BlockRecipe, SyntheticRecipe, WeightDtype, WeightStore, WeightTensor};
use crate::config::ModelConfig;
use crate::error::{PipelineError, Result};
use crate::load_meter::LoadMeter;
use crate::model::{TensorRole, TensorSpec, tensor_specs};

/// How a preset's projections are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PresetWeights {
    /// bf16.
    Bf16,
    /// ggml blocks, as a Q4_K_M GGUF holds them (synthetic_blocks.rs): Q6_K
    /// for v, the down projections and lm_head, Q4_K for the rest and the
    /// embedding; norms and routers stay bf16.
    Q4KM,
    /// FP8 e4m3 with a scale per 128 x 128 block, as DeepSeek-V3's
    /// checkpoint holds its attention and MLP projections
    /// (synthetic_fp8.rs); the embedding, lm_head, norms and router stay
    /// bf16. Made on the host, also when asked for on demand.
    Fp8,
    /// The routed experts' projections MXFP4 (32 values a block: an e8m0
    /// exponent, e2m1 values), as gpt-oss's checkpoint ships them
    /// (synthetic_mxfp4.rs); everything else bf16. Made on the host.
    Mxfp4Experts,
}

/// Generates all tensors `config` implies, as bf16, from `seed`.
pub fn generate_weights(config: &ModelConfig, seed: u64, label: &str) -> Result<WeightStore> {
    generate(config, seed, label, PresetWeights::Bf16, 0.0, &LoadMeter::default())
}

/// The bytes [`generate`] would store for `config` in `weights`' formats.
pub(super) fn stored_bytes(config: &ModelConfig, weights: PresetWeights) -> usize {
    recipes(config, 0, weights, 0.0).iter().map(|(s, r)| r.dtype().bytes_for(s.shape.iter().product())).sum()
}

pub(super) fn generate(
    config: &ModelConfig,
    seed: u64,
    label: &str,
    weights: PresetWeights,
    router_bias_mean: f32,
    meter: &LoadMeter,
) -> Result<WeightStore> {
    let recipes = recipes(config, seed, weights, router_bias_mean);
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
                let mut buffer = HostBuffer::zeroed(WeightDtype::Quant(r.kind).bytes_for(numel));
                let chunk = r.block_bytes() * 256;
                buffer.bytes_mut().par_chunks_mut(chunk).enumerate().for_each(|(i, out)| {
                    r.fill(i as u64 * 256, out);
                    meter.advance(out.len() as u64);
                });
                store.insert(buffer.into_tensor(spec.name, WeightDtype::Quant(r.kind), spec.shape)?);
                continue;
            }
            Recipe::Fp8(r) => {
                store.insert(r.tensor(spec.name, spec.shape, meter));
                continue;
            }
            Recipe::Mxfp4(r) => {
                store.insert(r.tensor(spec.name, spec.shape, meter));
                continue;
            }
            Recipe::Values(r) => r,
        };
        let mut buffer = HostBuffer::zeroed(numel * 2);
        buffer.bytes_mut().par_chunks_mut(1 << 16).enumerate().for_each(|(chunk, out)| {
            recipe.fill_bf16((chunk * (1 << 15)) as u64, out);
            meter.advance(out.len() as u64);
        });
        store.insert(buffer.into_tensor(spec.name, WeightDtype::Bf16, spec.shape)?);
    }
    Ok(store)
}

/// All tensors `config` implies, from `seed`, not materialised: each is
/// computed where it is read (the CUDA backend generates them on the
/// device, so a model larger than host memory never exists on the host).
pub fn synthetic_store_on_demand(config: &ModelConfig, seed: u64) -> WeightStore {
    on_demand(config, seed, PresetWeights::Bf16, 0.0)
}

pub(super) fn on_demand(config: &ModelConfig, seed: u64, weights: PresetWeights, router_bias_mean: f32) -> WeightStore {
    let mut store = WeightStore::default();
    for (spec, recipe) in recipes(config, seed, weights, router_bias_mean) {
        store.insert(match recipe {
            Recipe::Values(r) => WeightTensor::synthetic(spec.name, spec.shape, r),
            Recipe::Blocks(r) => WeightTensor::synthetic_blocks(spec.name, spec.shape, r),
            Recipe::Fp8(r) => r.tensor(spec.name, spec.shape, &LoadMeter::default()),
            Recipe::Mxfp4(r) => r.tensor(spec.name, spec.shape, &LoadMeter::default()),
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
    /// FP8 with block scales.
    Fp8(Fp8Recipe),
    /// MXFP4 blocks.
    Mxfp4(Mxfp4Recipe),
}

impl Recipe {
    fn dtype(&self) -> WeightDtype {
        match self {
            Recipe::Values(_) => WeightDtype::Bf16,
            Recipe::Blocks(r) => WeightDtype::Quant(r.kind),
            Recipe::Fp8(_) => WeightDtype::Fp8E4m3,
            Recipe::Mxfp4(_) => WeightDtype::Quant(GgmlType::MXFP4),
        }
    }
}

/// Every tensor `config` implies with the statistics of its role, stored
/// as `weights` says: with Q4KM the embedding and projections whose rows
/// are whole 256-value blocks as Q4_K, or Q6_K for v, the down projections
/// and lm_head (as llama.cpp's Q4_K_M mix keeps more bits there); with
/// Fp8 the 2-D projections but lm_head. DeepSeek's router correction bias
/// has mean `router_bias_mean`.
fn recipes(
    config: &ModelConfig,
    seed: u64,
    weights: PresetWeights,
    router_bias_mean: f32,
) -> Vec<(TensorSpec, Recipe)> {
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
                // Sigmoid scores lie in (0, 1): a bias of this spread
                // reorders close experts without swamping the scores.
                TensorRole::RouterBias => (router_bias_mean, 0.05),
                // Logits beside the scores' (of order 1): a share of the
                // softmax from a few percent to most of it.
                TensorRole::Sink => (0.0, 1.0),
            };
            // gpt-oss's experts wide enough that the SwiGLU's clamp (7)
            // bites on a few percent of gate and up values, as the
            // tiny-gpt-oss-oracle fixture's do.
            let clamped = config.oss.is_some()
                && spec.name.contains(".mlp.experts.")
                && (spec.name.ends_with("gate_proj.weight") || spec.name.ends_with("up_proj.weight"));
            let std = if clamped { 4.0 * std } else { std };
            let key = tensor_key(seed, &spec.name);
            let projection = matches!(spec.role, TensorRole::Projection { .. } | TensorRole::OutputProjection { .. });
            if weights == PresetWeights::Fp8 && projection && spec.shape.len() == 2 && spec.name != "lm_head.weight" {
                return (spec, Recipe::Fp8(Fp8Recipe(SyntheticRecipe { key, mean, std })));
            }
            let expert = spec.name.contains(".mlp.experts.") && spec.name.ends_with("_proj.weight");
            if weights == PresetWeights::Mxfp4Experts && expert && spec.shape.last().is_some_and(|c| c % 32 == 0) {
                return (spec, Recipe::Mxfp4(Mxfp4Recipe(SyntheticRecipe { key, mean, std })));
            }
            let blocks = weights == PresetWeights::Q4KM
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
    use crate::weights::SyntheticPreset;
    use crate::weights::synthetic_value;

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
        let bytes: usize = recipes(&c, 1, PresetWeights::Q4KM, 0.0)
            .iter()
            .map(|(s, r)| r.dtype().bytes_for(s.shape.iter().product()))
            .sum();
        // llama.cpp's Qwen3-30B-A3B Q4_K_M is about 18.6 GB; this mix (Q6_K
        // for every layer's down projections, not some) 19.8 GB.
        assert!((18e9..21e9).contains(&(bytes as f64)), "{bytes}");
    }

    /// The deepseek-v3 preset stores what DeepSeek-V3's checkpoint stores
    /// in FP8 (attention and MLP projections, experts and the shared one)
    /// as FP8, and the rest (embedding, lm_head, norms, the router and its
    /// bias) as bf16; a small FP8 cut runs.
    #[test]
    fn the_deepseek_v3_preset_holds_fp8_projections_where_the_checkpoint_does() {
        let preset = crate::weights::SyntheticPreset::by_name("deepseek-v3").unwrap();
        let c = preset.config(Some(4)).unwrap();
        let dtypes: std::collections::HashMap<String, WeightDtype> =
            recipes(&c, 1, PresetWeights::Fp8, 0.0).into_iter().map(|(s, r)| (s.name, r.dtype())).collect();
        for name in [
            "model.layers.0.self_attn.kv_a_proj_with_mqa.weight",
            "model.layers.0.self_attn.q_b_proj.weight",
            "model.layers.0.mlp.down_proj.weight",
            "model.layers.3.mlp.experts.255.up_proj.weight",
            "model.layers.3.mlp.shared_expert.gate_proj.weight",
            "model.layers.3.self_attn.o_proj.weight",
        ] {
            assert_eq!(dtypes[name], WeightDtype::Fp8E4m3, "{name}");
        }
        for name in [
            "model.embed_tokens.weight",
            "lm_head.weight",
            "model.layers.3.mlp.gate.weight",
            "model.layers.3.mlp.gate.e_score_correction_bias",
            "model.layers.0.self_attn.kv_a_layernorm.weight",
        ] {
            assert_eq!(dtypes[name], WeightDtype::Bf16, "{name}");
        }
        let fp8: usize = recipes(&c, 1, PresetWeights::Fp8, 0.0)
            .iter()
            .filter(|(_, r)| r.dtype() == WeightDtype::Fp8E4m3)
            .map(|(s, _)| s.shape.iter().product::<usize>())
            .sum();
        assert!((13.0e9..14.5e9).contains(&(fp8 as f64)), "{fp8} FP8 values in 4 layers");
    }
}
