//! A model from one GGUF file (llama.cpp's `qwen3moe`, `qwen3`,
//! `qwen2moe` and `deepseek2` architectures (the last in
//! gguf_deepseek2.rs), and `llama` with experts: Mixtral): the config from the
//! metadata, as the Hugging Face
//! config those keys stand for (what llama.cpp reads: block_count,
//! embedding_length, head counts, key_length, expert counts and width,
//! rope.freq_base, layer_norm_rms_epsilon, ...), and every tensor under
//! its Hugging Face name over its bytes in the mapped file: ggml's
//! `[cols, rows]` becomes `[rows, cols]`, and each layer's stacked experts
//! (`ffn_*_exps`, `[cols, rows, E]`) become E tensors over consecutive
//! byte ranges. Quantized tensors stay in their block format and are
//! decoded where read. Every tensor's type is checked before anything else
//! is done. llama.cpp's converter permutes the q and k rows of a `llama`
//! model for its interleaved RoPE; they are put back in Hugging Face's
//! order here (a copy of those two tensors per layer).

use std::path::Path;
use std::sync::Arc;

use memmap2::Mmap;
use serde_json::{Value, json};

use super::gguf::{GgmlType, GgufHeader, GgufValue};
use super::{WeightDtype, WeightStore, WeightTensor};
use super::{gguf_deepseek2, gguf_gpt_oss};
use crate::error::{PipelineError, Result};

/// The architectures read, with their Hugging Face class and model type
/// (`llama` only with experts: a dense Llama is not a family moetrace runs).
const ARCHITECTURES: [(&str, &str, &str); 6] = [
    ("qwen3moe", "Qwen3MoeForCausalLM", "qwen3_moe"),
    ("qwen3", "Qwen3ForCausalLM", "qwen3"),
    ("llama", "MixtralForCausalLM", "mixtral"),
    ("qwen2moe", "Qwen2MoeForCausalLM", "qwen2_moe"),
    ("deepseek2", "DeepseekV3ForCausalLM", "deepseek_v3"),
    ("gpt-oss", "GptOssForCausalLM", "gpt_oss"),
];

/// The tensor types read.
const TYPES: [GgmlType; 12] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::MXFP4,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

/// A layer tensor's llama.cpp name (after `blk.N.`) and Hugging Face name
/// (after `model.layers.N.`).
const LAYER_NAMES: [(&str, &str); 25] = [
    ("attn_norm", "input_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("attn_q_norm", "self_attn.q_norm"),
    ("attn_k_norm", "self_attn.k_norm"),
    ("ffn_norm", "post_attention_layernorm"),
    ("ffn_gate_inp", "mlp.gate"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
    ("ffn_gate_inp_shexp", "mlp.shared_expert_gate"),
    ("ffn_gate_shexp", "mlp.shared_expert.gate_proj"),
    ("ffn_up_shexp", "mlp.shared_expert.up_proj"),
    ("ffn_down_shexp", "mlp.shared_expert.down_proj"),
    // deepseek2 (gguf_deepseek2.rs): MLA, and the router's correction bias.
    ("attn_q_a", "self_attn.q_a_proj"),
    ("attn_q_a_norm", "self_attn.q_a_layernorm"),
    ("attn_q_b", "self_attn.q_b_proj"),
    ("attn_kv_a_mqa", "self_attn.kv_a_proj_with_mqa"),
    ("attn_kv_a_norm", "self_attn.kv_a_layernorm"),
    ("attn_kv_b", "self_attn.kv_b_proj"),
    ("exp_probs_b", "mlp.gate.e_score_correction_bias"),
    // gpt-oss (gguf_gpt_oss.rs): the sinks, and its post-attention norm's name.
    ("attn_sinks", "self_attn.sinks"),
    ("post_attention_norm", "post_attention_layernorm"),
];

/// The tensors whose Hugging Face names have no `.weight`/`.bias` suffix.
const ROUTER_BIAS: &str = "mlp.gate.e_score_correction_bias";
const SINKS: &str = "self_attn.sinks";

/// Stacked experts: llama.cpp's name and the projection of each expert.
const EXPERT_NAMES: [(&str, &str); 3] =
    [("ffn_gate_exps", "gate_proj"), ("ffn_up_exps", "up_proj"), ("ffn_down_exps", "down_proj")];

/// The header (metadata and tensor table) of the GGUF file at `path`,
/// checked as [`load_gguf`] checks it; the tensors are not read (what a
/// tokenizer built from the metadata needs).
pub fn read_gguf_header(path: &Path) -> Result<GgufHeader> {
    map_gguf(path).map(|(_, header)| header)
}

/// The file at `path` mapped, and its parsed header.
fn map_gguf(path: &Path) -> Result<(Arc<Mmap>, GgufHeader)> {
    let (file, _) = stage_types::input::open_regular(path)
        .map_err(|source| PipelineError::Io { path: path.to_path_buf(), source })?;
    // SAFETY: the file is opened read-only and treated as immutable input;
    // if another process truncates it while we run, reads may fault, the
    // documented hazard of every mmap-based model loader.
    let map = unsafe { Mmap::map(&file) }.map_err(|source| PipelineError::Io { path: path.to_path_buf(), source })?;
    let header = GgufHeader::parse(&map, path)?;
    Ok((Arc::new(map), header))
}

/// Loads the GGUF file at `path`: the Hugging Face config JSON its
/// metadata stands for, and its tensors.
pub fn load_gguf(path: &Path) -> Result<(Value, WeightStore)> {
    let bad = |message: String| PipelineError::BadGguf { path: path.to_path_buf(), message };
    let (map, header) = map_gguf(path)?;
    if let Some(arch) = header.get("general.architecture").and_then(GgufValue::as_str)
        && !ARCHITECTURES.iter().any(|a| a.0 == arch)
    {
        let runs: Vec<String> = ARCHITECTURES.iter().map(|a| format!("{} ({})", a.0, a.1)).collect();
        return Err(PipelineError::Unsupported {
            path: path.to_path_buf(),
            message: format!(
                "general.architecture `{arch}` is not a model family moetrace runs; it runs {}",
                runs.join(", ")
            ),
        });
    }
    if let Some(t) = header.tensors.iter().find(|t| !TYPES.contains(&t.ggml_type)) {
        let valid: Vec<&str> = TYPES.iter().map(|t| t.static_name()).collect();
        return Err(PipelineError::Unsupported {
            path: path.to_path_buf(),
            message: format!(
                "tensor `{}` is {}, a weight type moetrace does not read (it reads {})",
                t.name,
                t.ggml_type.name(),
                valid.join(", ")
            ),
        });
    }
    let config = config_json(&header).map_err(bad)?;
    // `llama`: q and k rows in llama.cpp's RoPE order (heads of q, of k).
    let permuted = (config["model_type"] == "mixtral").then(|| {
        let n = |k: &str| config[k].as_u64().unwrap_or(0) as usize;
        (n("num_attention_heads"), n("num_key_value_heads"))
    });
    let file = path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
    let mut store = WeightStore::default();
    // deepseek2's kv_b_proj halves by layer: (k_b, v_b).
    let mut split: std::collections::BTreeMap<usize, (Option<WeightTensor>, Option<WeightTensor>)> = Default::default();
    for t in &header.tensors {
        let dtype = match t.ggml_type {
            GgmlType::F32 => WeightDtype::F32,
            GgmlType::F16 => WeightDtype::F16,
            GgmlType::BF16 => WeightDtype::Bf16,
            other => WeightDtype::Quant(other),
        };
        let mut shape: Vec<usize> = t.dims.iter().rev().map(|&d| d as usize).collect();
        if let Some((layer, is_k)) = split_kv_b(&t.name) {
            let start = t.offset as usize;
            let w = WeightTensor::mapped(t.name.clone(), dtype, shape, map.clone(), start, start + t.byte_len as usize);
            let halves = split.entry(layer).or_default();
            *(if is_k { &mut halves.0 } else { &mut halves.1 }) = Some(w);
            continue;
        }
        let Some(hf) = hf_name(&t.name) else {
            tracing::debug!("{}: tensor `{}` is not one moetrace uses", path.display(), t.name);
            continue;
        };
        if shape.len() == 1 && t.name.ends_with("ffn_gate_inp_shexp.weight") {
            // The shared expert's gate is one row ([1, H] in Hugging Face's
            // checkpoints); a file may store it 1-D.
            shape.insert(0, 1);
        }
        let start = t.offset as usize;
        match hf {
            HfName::One(name) => {
                let mut w = WeightTensor::mapped(name, dtype, shape, map.clone(), start, start + t.byte_len as usize);
                let heads = match (permuted, t.name.rsplit('.').nth(1)) {
                    (Some((q, _)), Some("attn_q")) => Some(q),
                    (Some((_, kv)), Some("attn_k")) => Some(kv),
                    _ => None,
                };
                if let Some(heads) = heads {
                    w = unpermute_rope_rows(&w, heads).map_err(|m| bad(format!("tensor `{}`: {m}", t.name)))?;
                }
                w.source = Some(format!("{} in {file}", t.name));
                store.insert(w);
            }
            HfName::Experts { layer, projection, suffix } => {
                let dims = if suffix == "weight" { 3 } else { 2 };
                if shape.len() != dims {
                    return Err(bad(format!("tensor `{}` has dims {:?}; stacked experts have {dims}", t.name, t.dims)));
                }
                let experts = shape.remove(0);
                let each = t.byte_len as usize / experts;
                for e in 0..experts {
                    let name = format!("model.layers.{layer}.mlp.experts.{e}.{projection}.{suffix}");
                    let at = start + e * each;
                    let mut w = WeightTensor::mapped(name, dtype, shape.clone(), map.clone(), at, at + each);
                    w.source = Some(format!("{} (expert {e}) in {file}", t.name));
                    store.insert(w);
                }
            }
        }
    }
    for (layer, halves) in split {
        let (Some(k_b), Some(v_b)) = halves else {
            return Err(bad(format!("layer {layer} has one of attn_k_b and attn_v_b without the other")));
        };
        let mut w = gguf_deepseek2::kv_b_from_split(layer, &k_b, &v_b).map_err(bad)?;
        w.source = Some(format!("blk.{layer}.attn_k_b and attn_v_b in {file}"));
        store.insert(w);
    }
    Ok((config, store))
}

/// `tensor` with its rows put back from llama.cpp's RoPE order into
/// Hugging Face's: llama.cpp's converter stores, in each of `heads` heads
/// of hd rows, row i of the first half at 2i and row i of the second at
/// 2i + 1 (`LlamaModel.permute`). Whole rows move, so any row-wise type
/// (float or ggml blocks) is handled alike.
fn unpermute_rope_rows(tensor: &WeightTensor, heads: usize) -> std::result::Result<WeightTensor, String> {
    let rows = tensor.shape.first().copied().unwrap_or(0);
    if heads == 0 || !rows.is_multiple_of(heads) || !(rows / heads).is_multiple_of(2) {
        return Err(format!("{rows} rows are not {heads} heads of an even size"));
    }
    let bytes = tensor.bytes();
    let row_bytes = bytes.len() / rows;
    let (head_dim, half) = (rows / heads, rows / heads / 2);
    let mut out = Vec::with_capacity(bytes.len());
    for row in 0..rows {
        let (head, j) = (row / head_dim, row % head_dim);
        let from = head * head_dim + if j < half { 2 * j } else { 2 * (j - half) + 1 };
        out.extend_from_slice(&bytes[from * row_bytes..(from + 1) * row_bytes]);
    }
    Ok(WeightTensor::owned(tensor.name.clone(), tensor.dtype, tensor.shape.clone(), out))
}

/// The GGUF tensor a Hugging Face name comes from (`blk.1.attn_q.weight`,
/// or `blk.1.ffn_up_exps.weight (expert 3)` for one expert of a stack), if
/// a GGUF file holds it.
pub fn gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    if let Some(expert) = rest.strip_prefix("mlp.experts.") {
        let (e, rest) = expert.split_once('.')?;
        let (projection, suffix) = rest.rsplit_once('.')?;
        let (g, _) = EXPERT_NAMES.iter().find(|(_, p)| *p == projection)?;
        return Some(format!("blk.{layer}.{g}.{suffix} (expert {e})"));
    }
    if rest == ROUTER_BIAS {
        return Some(format!("blk.{layer}.exp_probs_b.bias"));
    }
    if rest == SINKS {
        return Some(format!("blk.{layer}.attn_sinks.weight"));
    }
    if rest == "self_attn.kv_b_proj.weight" {
        return Some(format!("blk.{layer}.attn_kv_b.weight (or attn_k_b and attn_v_b)"));
    }
    let (base, suffix) = rest.rsplit_once('.')?;
    let (g, _) = LAYER_NAMES.iter().find(|(_, h)| *h == base)?;
    Some(format!("blk.{layer}.{g}.{suffix}"))
}

/// Where a GGUF tensor goes.
enum HfName {
    One(String),
    Experts { layer: usize, projection: &'static str, suffix: &'static str },
}

fn hf_name(gguf: &str) -> Option<HfName> {
    let one = |s: String| Some(HfName::One(s));
    match gguf {
        "token_embd.weight" => return one("model.embed_tokens.weight".into()),
        "output_norm.weight" => return one("model.norm.weight".into()),
        "output.weight" => return one("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (base, suffix) = rest.rsplit_once('.')?;
    if let Some(&(_, projection)) = EXPERT_NAMES.iter().find(|(g, _)| *g == base) {
        // gpt-oss's experts have biases too.
        let suffix = ["weight", "bias"].into_iter().find(|s| *s == suffix)?;
        return Some(HfName::Experts { layer, projection, suffix });
    }
    let (_, hf) = LAYER_NAMES.iter().find(|(g, _)| *g == base)?;
    if *hf == ROUTER_BIAS || *hf == SINKS {
        return one(format!("model.layers.{layer}.{hf}"));
    }
    one(format!("model.layers.{layer}.{hf}.{suffix}"))
}

/// `(layer, is the key half)` of a deepseek2 `blk.N.attn_k_b.weight` or
/// `blk.N.attn_v_b.weight` (kv_b_proj split by the converter).
fn split_kv_b(gguf: &str) -> Option<(usize, bool)> {
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let is_k = match rest {
        "attn_k_b.weight" => true,
        "attn_v_b.weight" => false,
        _ => return None,
    };
    Some((layer.parse().ok()?, is_k))
}

/// The Hugging Face config the metadata stands for (llama.cpp's reading of
/// these keys for each architecture).
fn config_json(h: &GgufHeader) -> std::result::Result<Value, String> {
    let arch = h
        .get("general.architecture")
        .and_then(GgufValue::as_str)
        .ok_or("missing metadata key `general.architecture`")?;
    let valid: Vec<&str> = ARCHITECTURES.iter().map(|a| a.0).collect();
    let &(_, class, model_type) = ARCHITECTURES
        .iter()
        .find(|a| a.0 == arch)
        .ok_or_else(|| format!("architecture `{arch}` is not read here (valid: {})", valid.join(", ")))?;
    let key = |k: &str| format!("{arch}.{k}");
    let int = |k: &str| -> std::result::Result<u64, String> {
        let full = key(k);
        h.get(&full).and_then(GgufValue::as_u64).ok_or_else(|| format!("missing integer metadata key `{full}`"))
    };
    let float = |k: &str| -> std::result::Result<f64, String> {
        let full = key(k);
        h.get(&full).and_then(GgufValue::as_f64).ok_or_else(|| format!("missing float metadata key `{full}`"))
    };
    if arch == "llama" && int("expert_count").is_err() {
        return Err("a `llama` GGUF without `llama.expert_count` is a dense Llama, not a family moetrace runs (it reads `llama` with experts: Mixtral)".into());
    }
    let embd = h.tensors.iter().find(|t| t.name == "token_embd.weight").ok_or("no tensor `token_embd.weight`")?;
    let vocab = *embd.dims.get(1).ok_or("`token_embd.weight` is not 2-D")?;
    // `llama` may leave key_length out: the head size is then hidden / heads.
    let head_dim = match int("attention.key_length") {
        Ok(hd) => hd,
        Err(_) if arch == "llama" => int("embedding_length")? / int("attention.head_count")?.max(1),
        Err(e) => return Err(e),
    };
    if let Ok(v) = int("attention.value_length")
        && v != head_dim
        && arch != "deepseek2"
    {
        return Err(format!(
            "attention.value_length {v} differs from key_length {head_dim}; moetrace needs them equal"
        ));
    }
    let mut c = json!({
        "architectures": [class], "model_type": model_type,
        "vocab_size": vocab, "hidden_size": int("embedding_length")?,
        "num_hidden_layers": int("block_count")?,
        "num_attention_heads": int("attention.head_count")?,
        "num_key_value_heads": int("attention.head_count_kv")?,
        "head_dim": head_dim,
        "rms_norm_eps": float("attention.layer_norm_rms_epsilon")?,
        "rope_theta": float("rope.freq_base")?,
        "tie_word_embeddings": !h.tensors.iter().any(|t| t.name == "output.weight"),
        "attention_bias": false, "torch_dtype": "float32",
    });
    if let Ok(n) = int("context_length") {
        c["max_position_embeddings"] = json!(n);
    }
    if let Ok(n) = int("feed_forward_length") {
        c["intermediate_size"] = json!(n);
    }
    if arch == "llama" {
        // Mixtral: the experts' width is feed_forward_length.
        c["num_local_experts"] = json!(int("expert_count")?);
        c["num_experts_per_tok"] = json!(int("expert_used_count")?);
    }
    if arch == "qwen2moe" {
        // A shared expert weighted by its sigmoid gate; q, k and v biases
        // (when the file has them); top-k weights not renormalised.
        c["num_experts"] = json!(int("expert_count")?);
        c["num_experts_per_tok"] = json!(int("expert_used_count")?);
        c["moe_intermediate_size"] = json!(int("expert_feed_forward_length")?);
        c["shared_expert_intermediate_size"] = json!(int("expert_shared_feed_forward_length")?);
        c["qkv_bias"] = json!(h.tensors.iter().any(|t| t.name == "blk.0.attn_q.bias"));
        c["norm_topk_prob"] = json!(false);
        c["decoder_sparse_step"] = json!(1);
        c["mlp_only_layers"] = json!([]);
    }
    if arch == "deepseek2" {
        let map = c.as_object_mut().expect("a JSON object");
        gguf_deepseek2::config(h, map)?;
    }
    if arch == "gpt-oss" {
        let map = c.as_object_mut().expect("a JSON object");
        gguf_gpt_oss::config(h, map)?;
    }
    if arch == "qwen3moe" {
        c["num_experts"] = json!(int("expert_count")?);
        c["num_experts_per_tok"] = json!(int("expert_used_count")?);
        c["moe_intermediate_size"] = json!(int("expert_feed_forward_length")?);
        c["norm_topk_prob"] = json!(true);
        c["decoder_sparse_step"] = json!(1);
        c["mlp_only_layers"] = json!([]);
    }
    Ok(c)
}
