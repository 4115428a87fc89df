//! llama.cpp's `deepseek2` architecture (its name for DeepSeek-V2/V3, Kimi
//! K2, Moonlight) read as the Hugging Face `DeepseekV3ForCausalLM` it was
//! converted from (gguf_model.rs reads the file; this is what differs):
//!
//! - the config: MLA's ranks and head sizes (`attention.kv_lora_rank`,
//!   `attention.q_lora_rank`, `attention.key_length_mla` = nope + rope,
//!   `attention.value_length_mla`, `rope.dimension_count`), the router's
//!   groups and scaling (`expert_group_count`, `expert_group_used_count`,
//!   `expert_weights_scale`, `expert_weights_norm`), the dense first layers
//!   (`leading_dense_block_count`), the shared experts
//!   (`expert_shared_count`), YaRN (`rope.scaling.*`, with
//!   `rope.scaling.yarn_log_multiplier` = 0.1 * mscale_all_dim, as
//!   llama.cpp's converter writes it); the converter's MQA form
//!   (`head_count_kv` 1) is undone: MLA has as many key/value heads as
//!   query heads. Only sigmoid routing (`expert_gating_func` 2, V3's) is
//!   read: DeepSeek-V2's softmax routing is refused by name, as is a file
//!   without the key (llama.cpp itself would route it by softmax).
//! - kv_b_proj: the converter splits it per head into `attn_k_b`
//!   (transposed: `[heads, kv_lora, nope]`) and `attn_v_b` (`[heads, v,
//!   kv_lora]`) for llama.cpp's absorbed attention; [`kv_b_from_split`]
//!   puts them back (`attn_kv_b`, from older converters, is read as is).

use serde_json::{Map, Value, json};

use super::gguf::{ArchKeys, GgufHeader, GgufValue};
use super::{WeightDtype, WeightTensor};

/// The `DeepseekV3ForCausalLM` keys the `deepseek2` metadata stands for,
/// added to `c` (which holds the keys every architecture has).
pub(super) fn config(h: &GgufHeader, c: &mut Map<String, Value>) -> Result<(), String> {
    let m = ArchKeys { header: h, arch: "deepseek2" };
    match m.get("expert_gating_func").and_then(GgufValue::as_u64) {
        Some(2) => {}
        Some(f) => {
            return Err(format!(
                "`{}` is {f} ({}): moetrace reads DeepSeek-V3's sigmoid routing (2); DeepSeek-V2's softmax routing is not a family it runs",
                m.key("expert_gating_func"),
                if f == 1 { "softmax" } else { "unknown" }
            ));
        }
        None => {
            return Err(format!(
                "missing metadata key `{}`: DeepSeek-V3 routes by sigmoid (2), V2 by softmax, and llama.cpp reads a file without it as V2; convert it again with a current convert_hf_to_gguf.py",
                m.key("expert_gating_func")
            ));
        }
    }
    let heads = m.int("attention.head_count")?;
    let rope = m.int("rope.dimension_count")?;
    let qk = m.int("attention.key_length_mla")?;
    if qk <= rope {
        return Err(format!("`{}` {qk} must exceed the rope dimensions {rope}", m.key("attention.key_length_mla")));
    }
    let q_lora = m.int("attention.q_lora_rank").ok();
    c.insert("num_key_value_heads".into(), json!(heads));
    c.insert("head_dim".into(), json!(qk));
    c.insert("q_lora_rank".into(), json!(q_lora));
    c.insert("kv_lora_rank".into(), json!(m.int("attention.kv_lora_rank")?));
    c.insert("qk_nope_head_dim".into(), json!(qk - rope));
    c.insert("qk_rope_head_dim".into(), json!(rope));
    c.insert("v_head_dim".into(), json!(m.int("attention.value_length_mla")?));
    c.insert("rope_interleave".into(), json!(true));
    c.insert("n_routed_experts".into(), json!(m.int("expert_count")?));
    c.insert("num_experts_per_tok".into(), json!(m.int("expert_used_count")?));
    c.insert("moe_intermediate_size".into(), json!(m.int("expert_feed_forward_length")?));
    c.insert("n_shared_experts".into(), json!(m.int("expert_shared_count").unwrap_or(0)));
    c.insert("first_k_dense_replace".into(), json!(m.int("leading_dense_block_count").unwrap_or(0)));
    c.insert("n_group".into(), json!(m.int("expert_group_count").unwrap_or(1)));
    c.insert("topk_group".into(), json!(m.int("expert_group_used_count").unwrap_or(1)));
    c.insert("routed_scaling_factor".into(), json!(m.float("expert_weights_scale").unwrap_or(1.0)));
    let norm = matches!(m.get("expert_weights_norm"), Some(GgufValue::Bool(true)));
    c.insert("norm_topk_prob".into(), json!(norm));
    c.insert("scoring_func".into(), json!("sigmoid"));
    c.insert("topk_method".into(), json!("noaux_tc"));
    if m.get("rope.scaling.type").and_then(GgufValue::as_str) == Some("yarn") {
        // The converter writes mscale_all_dim as 0.1 * it (llama.cpp
        // PR 17945); DeepSeek's checkpoints have mscale = mscale_all_dim.
        let mscale = m.float("rope.scaling.yarn_log_multiplier").map_or(0.0, |m| m / 0.1);
        let mut yarn = m.yarn_scaling()?;
        yarn.insert("type".into(), json!("yarn"));
        yarn.insert("mscale".into(), json!(mscale));
        yarn.insert("mscale_all_dim".into(), json!(mscale));
        c.insert("rope_scaling".into(), Value::Object(yarn));
    }
    Ok(())
}

/// Layer `layer`'s `self_attn.kv_b_proj.weight` (`[heads * (nope + v),
/// kv_lora]`: per head its nope key rows, then its value rows) from the
/// converter's split: `k_b` `[heads, kv_lora, nope]` (each head's key rows
/// transposed) and `v_b` `[heads, v, kv_lora]`. Float tensors of one type
/// keep it (their elements move); others are decoded to f32.
pub(super) fn kv_b_from_split(layer: usize, k_b: &WeightTensor, v_b: &WeightTensor) -> Result<WeightTensor, String> {
    let (&[heads, rank, nope], &[v_heads, v_dim, v_rank]) = (&k_b.shape[..], &v_b.shape[..]) else {
        return Err(format!(
            "attn_k_b {:?} and attn_v_b {:?} of layer {layer} must be 3-D ([heads, kv_lora, nope], [heads, v, kv_lora])",
            k_b.shape, v_b.shape
        ));
    };
    if (v_heads, v_rank) != (heads, rank) {
        return Err(format!(
            "attn_k_b {:?} and attn_v_b {:?} of layer {layer} disagree on heads or kv_lora_rank",
            k_b.shape, v_b.shape
        ));
    }
    let per = nope + v_dim;
    // Row r of head h's block of kv_b: element (r, j) comes from k_b
    // (h, j, r) for r < nope, else v_b (h, r - nope, j).
    let source = |h: usize, r: usize, j: usize| -> (bool, usize) {
        if r < nope { (true, (h * rank + j) * nope + r) } else { (false, (h * v_dim + r - nope) * rank + j) }
    };
    let order = (0..heads).flat_map(|h| (0..per).flat_map(move |r| (0..rank).map(move |j| source(h, r, j))));
    let name = format!("model.layers.{layer}.self_attn.kv_b_proj.weight");
    let shape = vec![heads * per, rank];
    if matches!(k_b.dtype, WeightDtype::F32 | WeightDtype::F16 | WeightDtype::Bf16) && k_b.dtype == v_b.dtype {
        let size = k_b.dtype.bytes_for(1);
        let (kb, vb) = (k_b.bytes(), v_b.bytes());
        let mut out = Vec::with_capacity(heads * per * rank * size);
        for (from_k, at) in order {
            out.extend_from_slice(&(if from_k { &kb[..] } else { &vb[..] })[at * size..(at + 1) * size]);
        }
        return Ok(WeightTensor::owned(name, k_b.dtype, shape, out));
    }
    let (kf, vf) = (k_b.to_f32_vec(), v_b.to_f32_vec());
    let out = order.flat_map(|(from_k, at)| (if from_k { kf[at] } else { vf[at] }).to_le_bytes()).collect();
    Ok(WeightTensor::owned(name, WeightDtype::F32, shape, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// kv_b's rows split as the converter splits them (per head: nope key
    /// rows transposed, value rows as they are) come back in place, for
    /// float tensors (moved) and mixed types (decoded).
    #[test]
    fn kv_b_is_put_back_from_the_converters_split() {
        let (heads, nope, v_dim, rank) = (3usize, 4usize, 2usize, 5usize);
        let per = nope + v_dim;
        let kv_b: Vec<f32> = (0..heads * per * rank).map(|i| i as f32).collect();
        let at = |h: usize, r: usize, j: usize| kv_b[(h * per + r) * rank + j];
        let mut k = Vec::new();
        let mut v = Vec::new();
        for h in 0..heads {
            for j in 0..rank {
                for r in 0..nope {
                    k.push(at(h, r, j));
                }
            }
            for d in 0..v_dim {
                for j in 0..rank {
                    v.push(at(h, nope + d, j));
                }
            }
        }
        let bytes = |x: &[f32]| x.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>();
        let k_b = WeightTensor::owned("k".into(), WeightDtype::F32, vec![heads, rank, nope], bytes(&k));
        let v_b = WeightTensor::owned("v".into(), WeightDtype::F32, vec![heads, v_dim, rank], bytes(&v));
        let back = kv_b_from_split(2, &k_b, &v_b).unwrap();
        assert_eq!(back.name, "model.layers.2.self_attn.kv_b_proj.weight");
        assert_eq!(back.shape, [heads * per, rank]);
        assert_eq!(back.to_f32_vec(), kv_b);
        // Mixed types: v_b in bf16 (the values are small integers: exact).
        let half: Vec<u8> = v.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect();
        let v16 = WeightTensor::owned("v".into(), WeightDtype::Bf16, vec![heads, v_dim, rank], half);
        let mixed = kv_b_from_split(2, &k_b, &v16).unwrap();
        assert_eq!((mixed.dtype, mixed.to_f32_vec()), (WeightDtype::F32, kv_b));
        let wrong = WeightTensor::owned(
            "v".into(),
            WeightDtype::F32,
            vec![heads, v_dim, rank + 1],
            vec![0; 4 * heads * v_dim * (rank + 1)],
        );
        assert!(kv_b_from_split(2, &k_b, &wrong).unwrap_err().contains("disagree"));
    }
}
