//! llama.cpp's `gpt-oss` architecture read as the Hugging Face
//! `GptOssForCausalLM` it was converted from (gguf_model.rs reads the
//! file; this is the config). The converter writes the experts' gate and
//! up apart (de-interleaved) and stacked, MXFP4 as the checkpoint had
//! them, their biases stacked (`ffn_*_exps.bias`), the sinks as
//! `attn_sinks.weight`; gguf_model.rs splits the stacks per expert. The
//! metadata has no `layer_types`, `swiglu_limit` or YaRN `truncate`:
//! llama.cpp fixes them for the architecture (sliding window on the even
//! layers, `set_swa_pattern(2)`; the limit 7; its own YaRN ramp), so they
//! are gpt-oss's published values here (transformers' defaults: sliding
//! first and alternating, 7.0, truncate false).

use serde_json::{Map, Value, json};

use super::gguf::{GgufHeader, GgufValue};

/// The `GptOssForCausalLM` keys the `gpt-oss` metadata stands for, added
/// to `c` (which holds the keys every architecture has).
pub(super) fn config(h: &GgufHeader, c: &mut Map<String, Value>) -> Result<(), String> {
    let key = |k: &str| format!("gpt-oss.{k}");
    let get = |k: &str| h.get(&key(k));
    let int = |k: &str| {
        get(k).and_then(GgufValue::as_u64).ok_or_else(|| format!("missing integer metadata key `{}`", key(k)))
    };
    // f32 values as the decimal the converter wrote, not the f32 widened.
    let float = |k: &str| match get(k) {
        Some(GgufValue::F32(v)) => format!("{v}").parse::<f64>().ok(),
        other => other.and_then(GgufValue::as_f64),
    };
    let layers = int("block_count")?;
    c.insert("num_local_experts".into(), json!(int("expert_count")?));
    c.insert("num_experts_per_tok".into(), json!(int("expert_used_count")?));
    c.insert("intermediate_size".into(), json!(int("expert_feed_forward_length")?));
    c.insert("attention_bias".into(), json!(true));
    c.insert("swiglu_limit".into(), json!(7.0));
    if let Some(eps) = float("attention.layer_norm_rms_epsilon") {
        c.insert("rms_norm_eps".into(), json!(eps));
    }
    let window = int("attention.sliding_window")?;
    c.insert("sliding_window".into(), json!(window));
    let types: Vec<&str> =
        (0..layers).map(|l| if l % 2 == 0 { "sliding_attention" } else { "full_attention" }).collect();
    c.insert("layer_types".into(), json!(types));
    if let Some(kind) = get("rope.scaling.type").and_then(GgufValue::as_str) {
        if kind != "yarn" {
            return Err(format!("`{}` is `{kind}`: gpt-oss's rotation is yarn", key("rope.scaling.type")));
        }
        let need = |k: &str| float(k).ok_or_else(|| format!("missing float metadata key `{}`", key(k)));
        c.insert(
            "rope_scaling".into(),
            json!({
                "rope_type": "yarn",
                "factor": need("rope.scaling.factor")?,
                "original_max_position_embeddings": int("rope.scaling.original_context_length")?,
                "beta_fast": float("rope.scaling.yarn_beta_fast").unwrap_or(32.0),
                "beta_slow": float("rope.scaling.yarn_beta_slow").unwrap_or(1.0),
                "truncate": false,
            }),
        );
    }
    Ok(())
}
