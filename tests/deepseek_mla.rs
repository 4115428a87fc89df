//! MLA attention, the CPU backend's operations (`Backend` and its `MlaOps`
//! capability) in the order DeepSeek-V3's stage systems call them, against
//! transformers' `DeepseekV3Attention` in float64 on
//! tests/data/deepseek-v3-mla.json (python/tools/make_mla_vectors.py): a
//! tiny random layer with YaRN scaling and interleaved rope, a 5-token
//! prompt then one decode step through the cache, with and without
//! q_lora_rank; the rotation and softmax scale from `MlaConfig` read off
//! the case's config. Every intermediate the attention's submodules
//! produce and the output match within 1e-6 (rel_l2; transformers
//! computes cos/sin and the softmax in f32), the softmax scale within
//! 1e-12.

use std::path::Path;
use std::sync::Arc;

use moetrace_tests::{rel_l2, workspace_root};
use pipeline::backend::Backend;
use pipeline::mla_config::MlaConfig;
use pipeline::tensor::HostTensor;
use pipeline::weights::{WeightDtype, WeightStore, WeightTensor};
use pipeline::{CpuBackend, Result};
use serde_json::Value;
use stage_types::SaveTensorStage as S;

fn floats(v: &Value) -> Vec<f64> {
    match v {
        Value::Array(items) => items.iter().flat_map(floats).collect(),
        other => vec![other.as_f64().unwrap()],
    }
}

/// Every weight of the case, f32, under its submodule's name.
fn store(case: &Value) -> WeightStore {
    let mut store = WeightStore::default();
    for (name, w) in case["weights"].as_object().unwrap() {
        let shape = w["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
        let bytes = floats(&w["values"]).iter().flat_map(|&x| (x as f32).to_le_bytes()).collect();
        store.insert(WeightTensor::owned(name.clone(), WeightDtype::F32, shape, bytes));
    }
    store
}

/// A submodule's recorded output (or input) at step `step`, its last
/// `rows` rows of `width`.
fn recorded(case: &Value, module: &str, step: usize, side: &str, rows: usize) -> Vec<f64> {
    let all = floats(&case["intermediates"][module][step][side]);
    let width = case["intermediates"][module][step][side][0].as_array().unwrap().len();
    all[all.len() - rows * width..].to_vec()
}

fn close(what: &str, want: &[f64], got: &HostTensor) {
    let got: Vec<f64> = got.as_f32().unwrap().iter().map(|&x| f64::from(x)).collect();
    assert_eq!(want.len(), got.len(), "{what}: lengths");
    let e = rel_l2(want, &got);
    assert!(e < 1e-6, "{what}: rel_l2 {e:.2e}");
}

#[test]
fn mla_matches_transformers_deepseek_v3_attention_at_the_prompt_and_a_decode_step() -> Result<()> {
    let path = workspace_root().join("tests/data/deepseek-v3-mla.json");
    let data: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let cases = data["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 2);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let mut json = case["config"].as_object().unwrap().clone();
        json.insert("rope_parameters".into(), case["rope_parameters"].clone());
        let mla = MlaConfig::from_json(&json, Path::new(name))?;
        let heads = json["num_attention_heads"].as_u64().unwrap() as usize;
        let (dims, rope, scale) =
            (mla.dims(heads), mla.rope(case["rope_parameters"]["rope_theta"].as_f64().unwrap()), mla.softmax_scale());
        let theirs = case["softmax_scale"].as_f64().unwrap();
        assert!((scale - theirs).abs() < 1e-12, "{name}: softmax scale {scale} vs {theirs}");
        let store = store(case);
        let id = |n: &str| store.id(&format!("{n}.weight"));
        let (kv_a, kv_a_norm, kv_b, o) = (
            id("kv_a_proj_with_mqa").unwrap(),
            id("kv_a_layernorm").unwrap(),
            id("kv_b_proj").unwrap(),
            id("o_proj").unwrap(),
        );
        let query = (id("q_a_proj"), id("q_a_layernorm"), id("q_b_proj"), id("q_proj"));
        assert_eq!(query.0.is_some(), mla.q_lora_rank.is_some(), "{name}: the case's query weights");
        let hidden = store.get(kv_a).row_len();
        let eps = json["rms_norm_eps"].as_f64().unwrap();
        let x: Vec<f32> = floats(&case["hidden_states"]).iter().map(|&v| v as f32).collect();
        let mut b = CpuBackend::new(Arc::new(store), Some(1))?;
        for (step, span) in case["steps"].as_array().unwrap().iter().enumerate() {
            let (start, len) = (span[0].as_u64().unwrap() as usize, span[1].as_u64().unwrap() as usize);
            let at = |what: &str| format!("{name} step {step} {what}");
            let want = |module: &str, side: &str| recorded(case, module, step, side, len);
            b.begin_step(&vec![0; len], start)?;
            b.write(
                S::AttnNorm,
                &HostTensor::f32(vec![len, hidden], x[start * hidden..(start + len) * hidden].to_vec()),
            )?;
            match query {
                (Some(q_a), Some(q_a_norm), Some(q_b), None) => {
                    b.linear(S::AttnNorm, &[q_a], S::MlaQA)?;
                    b.rms_norm(S::MlaQA, q_a_norm, eps, S::MlaQANorm)?;
                    b.linear(S::MlaQANorm, &[q_b], S::MlaQ)?;
                    close(&at("q_a_proj"), &want("q_a_proj", "output"), &b.read(S::MlaQA)?);
                    close(&at("q_a_layernorm"), &want("q_a_layernorm", "output"), &b.read(S::MlaQANorm)?);
                    close(&at("q_b_proj"), &want("q_b_proj", "output"), &b.read(S::MlaQ)?);
                }
                (None, None, None, Some(q)) => {
                    b.linear(S::AttnNorm, &[q], S::MlaQ)?;
                    close(&at("q_proj"), &want("q_proj", "output"), &b.read(S::MlaQ)?);
                }
                _ => panic!("{name}: the case's query weights"),
            }
            b.linear(S::AttnNorm, &[kv_a], S::MlaKvA)?;
            b.mla().unwrap().latent_norm(S::MlaKvA, kv_a_norm, eps, S::MlaKvANorm)?;
            b.linear(S::MlaKvANorm, &[kv_b], S::MlaKvB)?;
            let ops = b.mla().unwrap();
            ops.query_rope(S::MlaQ, dims, &rope, S::QPostRope)?;
            ops.keys(S::MlaKvA, S::MlaKvB, dims, &rope, S::KPostRope)?;
            ops.append_kv(0, S::KPostRope, S::MlaKvB, dims)?;
            ops.scores(0, S::QPostRope, dims, scale, S::AttnScores)?;
            b.attn_softmax(S::AttnScores, S::AttnSoftmax)?;
            b.mla().unwrap().attention(0, S::AttnSoftmax, dims, S::Attention)?;
            b.linear(S::Attention, &[o], S::AttnOut)?;
            close(&at("kv_a_proj_with_mqa"), &want("kv_a_proj_with_mqa", "output"), &b.read(S::MlaKvA)?);
            close(&at("kv_a_layernorm"), &want("kv_a_layernorm", "output"), &b.read(S::MlaKvANorm)?);
            // Its hook saw the whole cache expanded; this step's rows here.
            close(&at("kv_b_proj"), &want("kv_b_proj", "output"), &b.read(S::MlaKvB)?);
            close(&at("attention (o_proj's input)"), &want("o_proj", "input"), &b.read(S::Attention)?);
            close(&at("o_proj"), &want("o_proj", "output"), &b.read(S::AttnOut)?);
            close(&at("the attention's output"), &floats(&case["outputs"][step]), &b.read(S::AttnOut)?);
        }
        assert_eq!(b.kv_cache(0)?.0.shape[0], 6, "{name}: the cache holds the prompt and the decode step");
    }
    Ok(())
}
