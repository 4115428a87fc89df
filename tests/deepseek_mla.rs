//! MLA attention (pipeline's `backend::cpu::mla`) against transformers'
//! `DeepseekV3Attention` in float64 on tests/data/deepseek-v3-mla.json
//! (python/tools/make_mla_vectors.py): a tiny random layer with YaRN
//! scaling and interleaved rope, a 5-token prompt then one decode step
//! through the cache, with and without q_lora_rank. Every intermediate
//! the attention's submodules produce and the output match within 1e-6
//! (rel_l2; transformers computes cos/sin and the softmax in f32).

use moetrace_tests::{rel_l2, workspace_root};
use pipeline::backend::cpu::mla::{MlaCache, MlaDims, MlaRope, MlaWeights, QueryWeights, mla_step};
use pipeline::rope_scaling::Yarn;
use pipeline::weights::{WeightDtype, WeightTensor};
use serde_json::Value;

fn floats(v: &Value) -> Vec<f64> {
    match v {
        Value::Array(items) => items.iter().flat_map(floats).collect(),
        other => vec![other.as_f64().unwrap()],
    }
}

fn as_f64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| f64::from(x)).collect()
}

fn tensor(case: &Value, name: &str) -> Option<WeightTensor> {
    let w = case["weights"].get(name)?;
    let shape: Vec<usize> = w["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
    let bytes = floats(&w["values"]).iter().flat_map(|&x| (x as f32).to_le_bytes()).collect();
    Some(WeightTensor::owned(name.into(), WeightDtype::F32, shape, bytes))
}

/// A submodule's recorded output (or input) at step `step`.
fn recorded(case: &Value, module: &str, step: usize, side: &str) -> Vec<f64> {
    floats(&case["intermediates"][module][step][side])
}

fn close(what: &str, want: &[f64], got: &[f32]) {
    assert_eq!(want.len(), got.len(), "{what}: lengths");
    let e = rel_l2(want, &as_f64(got));
    assert!(e < 1e-6, "{what}: rel_l2 {e:.2e}");
}

#[test]
fn mla_matches_transformers_deepseek_v3_attention_at_the_prompt_and_a_decode_step() {
    let path = workspace_root().join("tests/data/deepseek-v3-mla.json");
    let data: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let cases = data["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 2);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let c = &case["config"];
        let get = |k: &str| c[k].as_u64().map(|v| v as usize);
        let dims = MlaDims {
            heads: get("num_attention_heads").unwrap(),
            q_lora_rank: get("q_lora_rank"),
            kv_lora_rank: get("kv_lora_rank").unwrap(),
            qk_nope: get("qk_nope_head_dim").unwrap(),
            qk_rope: get("qk_rope_head_dim").unwrap(),
            v_head_dim: get("v_head_dim").unwrap(),
        };
        let p = &case["rope_parameters"];
        let yarn = Yarn {
            factor: p["factor"].as_f64().unwrap(),
            original_max_position: p["original_max_position_embeddings"].as_f64().unwrap(),
            beta_fast: p["beta_fast"].as_f64().unwrap(),
            beta_slow: p["beta_slow"].as_f64().unwrap(),
            mscale: p["mscale"].as_f64(),
            mscale_all_dim: p["mscale_all_dim"].as_f64(),
            attention_factor: None,
            truncate: true,
        };
        let scale = yarn.softmax_scale((dims.qk_head() as f64).powf(-0.5));
        let theirs = case["softmax_scale"].as_f64().unwrap();
        assert!((scale - theirs).abs() < 1e-12, "{name}: softmax scale {scale} vs {theirs}");
        let rope = MlaRope {
            inv_freq: yarn.inv_freq(p["rope_theta"].as_f64().unwrap(), dims.qk_rope),
            attention_factor: yarn.attention_factor(),
            interleave: c["rope_interleave"].as_bool().unwrap(),
        };
        let norm = |n: &str| floats(&case["weights"][n]["values"]).iter().map(|&x| x as f32).collect::<Vec<f32>>();
        let (q_a, q_b, q_plain) =
            (tensor(case, "q_a_proj.weight"), tensor(case, "q_b_proj.weight"), tensor(case, "q_proj.weight"));
        let q_norm = dims.q_lora_rank.map(|_| norm("q_a_layernorm.weight"));
        let query = match (&q_a, &q_norm, &q_b, &q_plain) {
            (Some(a), Some(norm), Some(b), None) => QueryWeights::Lora { a, norm, b },
            (None, None, None, Some(q)) => QueryWeights::Plain(q),
            _ => panic!("{name}: the case's query weights"),
        };
        let (kv_a, kv_b, o) = (
            tensor(case, "kv_a_proj_with_mqa.weight").unwrap(),
            tensor(case, "kv_b_proj.weight").unwrap(),
            tensor(case, "o_proj.weight").unwrap(),
        );
        let kv_a_norm = norm("kv_a_layernorm.weight");
        let weights = MlaWeights { query, kv_a: &kv_a, kv_a_norm: &kv_a_norm, kv_b: &kv_b, o: &o };
        let x: Vec<f32> = floats(&case["hidden_states"]).iter().map(|&v| v as f32).collect();
        let hidden = kv_a.row_len();
        let eps = c["rms_norm_eps"].as_f64().unwrap();
        let mut cache = MlaCache::default();
        for (step, span) in case["steps"].as_array().unwrap().iter().enumerate() {
            let (start, len) = (span[0].as_u64().unwrap() as usize, span[1].as_u64().unwrap() as usize);
            let got =
                mla_step(&x[start * hidden..(start + len) * hidden], dims, &weights, &rope, scale, eps, &mut cache);
            let at = |what: &str| format!("{name} step {step} {what}");
            if let (Some(q_a), Some(q_a_norm)) = (&got.q_a, &got.q_a_norm) {
                close(&at("q_a_proj"), &recorded(case, "q_a_proj", step, "output"), q_a);
                close(&at("q_a_layernorm"), &recorded(case, "q_a_layernorm", step, "output"), q_a_norm);
                close(&at("q_b_proj"), &recorded(case, "q_b_proj", step, "output"), &got.q);
            } else {
                close(&at("q_proj"), &recorded(case, "q_proj", step, "output"), &got.q);
            }
            close(&at("kv_a_proj_with_mqa"), &recorded(case, "kv_a_proj_with_mqa", step, "output"), &got.kv_a);
            close(&at("kv_a_layernorm"), &recorded(case, "kv_a_layernorm", step, "output"), &got.kv_a_norm);
            close(&at("kv_b_proj (the whole cache)"), &recorded(case, "kv_b_proj", step, "output"), &got.kv_b);
            close(&at("attention (o_proj's input)"), &recorded(case, "o_proj", step, "input"), &got.attention);
            close(&at("o_proj"), &recorded(case, "o_proj", step, "output"), &got.out);
            close(&at("the attention's output"), &floats(&case["outputs"][step]), &got.out);
        }
        assert_eq!(cache.len, 6, "{name}: the cache holds the prompt and the decode step");
    }
}
