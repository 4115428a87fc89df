//! moetrace's YaRN RoPE scaling (pipeline's `rope_scaling::Yarn`) against
//! transformers' `_compute_yarn_parameters` and `yarn_apply_mscale` on
//! tests/data/yarn.json (python/tools/make_yarn_vectors.py): DeepSeek-V3's
//! and gpt-oss's published parameters and two variants; inverse
//! frequencies within f32 rounding (transformers computes them in f32),
//! the attention factor and DeepSeek's softmax scale within 1e-12.

use pipeline::rope_scaling::Yarn;
use serde_json::Value;

#[test]
fn yarn_frequencies_and_scales_are_transformers_own() {
    let path = moetrace_tests::workspace_root().join("tests/data/yarn.json");
    let data: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let cases = data["cases"].as_array().unwrap();
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let p = &case["rope_parameters"];
        let yarn = Yarn {
            factor: p["factor"].as_f64().unwrap(),
            original_max_position: p["original_max_position_embeddings"].as_f64().unwrap(),
            beta_fast: p["beta_fast"].as_f64().unwrap_or(32.0),
            beta_slow: p["beta_slow"].as_f64().unwrap_or(1.0),
            mscale: p["mscale"].as_f64(),
            mscale_all_dim: p["mscale_all_dim"].as_f64(),
            attention_factor: p["attention_factor"].as_f64(),
            truncate: p["truncate"].as_bool().unwrap_or(true),
        };
        let theta = case["theta"].as_f64().unwrap();
        let dim = case["dim"].as_u64().unwrap() as usize;
        let ours = yarn.inv_freq(theta, dim);
        let theirs: Vec<f64> = case["inv_freq"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        assert_eq!(ours.len(), theirs.len(), "{name}");
        for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
            assert!((a - b).abs() <= 1e-6 * b.abs(), "{name}: inv_freq[{i}] {a:e} vs {b:e}");
        }
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * b.abs().max(1.0);
        let factor = case["attention_factor"].as_f64().unwrap();
        assert!(
            close(yarn.attention_factor(), factor),
            "{name}: attention factor {} vs {factor}",
            yarn.attention_factor()
        );
        let (qk, scale) = (case["qk_scale"].as_f64().unwrap(), case["softmax_scale"].as_f64().unwrap());
        assert!(close(yarn.softmax_scale(qk), scale), "{name}: softmax scale {} vs {scale}", yarn.softmax_scale(qk));
    }
    assert_eq!(cases.len(), 4);
}
