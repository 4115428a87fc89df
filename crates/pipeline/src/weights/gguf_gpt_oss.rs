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

use super::gguf::{ArchKeys, GgufHeader, GgufValue};

/// The `GptOssForCausalLM` keys the `gpt-oss` metadata stands for, added
/// to `c` (which holds the keys every architecture has).
pub(super) fn config(h: &GgufHeader, c: &mut Map<String, Value>) -> Result<(), String> {
    let m = ArchKeys { header: h, arch: "gpt-oss" };
    let layers = m.int("block_count")?;
    c.insert("num_local_experts".into(), json!(m.int("expert_count")?));
    c.insert("num_experts_per_tok".into(), json!(m.int("expert_used_count")?));
    c.insert("intermediate_size".into(), json!(m.int("expert_feed_forward_length")?));
    c.insert("attention_bias".into(), json!(true));
    c.insert("swiglu_limit".into(), json!(7.0));
    if let Some(eps) = m.float("attention.layer_norm_rms_epsilon") {
        c.insert("rms_norm_eps".into(), json!(eps));
    }
    let window = m.int("attention.sliding_window")?;
    c.insert("sliding_window".into(), json!(window));
    let types: Vec<&str> =
        (0..layers).map(|l| if l % 2 == 0 { "sliding_attention" } else { "full_attention" }).collect();
    c.insert("layer_types".into(), json!(types));
    if let Some(kind) = m.get("rope.scaling.type").and_then(GgufValue::as_str) {
        if kind != "yarn" {
            return Err(format!("`{}` is `{kind}`: gpt-oss's rotation is yarn", m.key("rope.scaling.type")));
        }
        let mut yarn = m.yarn_scaling()?;
        yarn.insert("rope_type".into(), json!("yarn"));
        yarn.insert("truncate".into(), json!(false));
        c.insert("rope_scaling".into(), Value::Object(yarn));
    }
    Ok(())
}
