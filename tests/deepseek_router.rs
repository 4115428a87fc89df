//! moetrace's DeepSeek-V3 router (pipeline's `GroupedTopK`) against
//! transformers' `DeepseekV3TopkRouter` on the vectors of
//! tests/data/deepseek-v3-router.json (python/tools/make_deepseek_router_vectors.py):
//! the same experts for every token of every case (groups masked with
//! negative biased scores included), the same weights within f32 rounding
//! (transformers computes the router in float32).

use pipeline::backend::cpu::grouped_routing::GroupedTopK;
use serde_json::Value;

#[test]
fn the_grouped_router_chooses_and_weights_as_transformers_does() {
    let path = moetrace_tests::workspace_root().join("tests/data/deepseek-v3-router.json");
    let data: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let floats = |v: &Value| -> Vec<f32> { v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect() };
    let mut tokens = 0;
    for case in data["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let router = GroupedTopK {
            n_group: case["n_group"].as_u64().unwrap() as usize,
            topk_group: case["topk_group"].as_u64().unwrap() as usize,
            top_k: case["top_k"].as_u64().unwrap() as usize,
            normalise: case["norm_topk_prob"].as_bool().unwrap(),
            scaling: case["routed_scaling_factor"].as_f64().unwrap(),
        };
        let bias = floats(&case["bias"]);
        router.check(bias.len()).unwrap();
        for (t, (logits, want)) in
            case["logits"].as_array().unwrap().iter().zip(case["tokens"].as_array().unwrap()).enumerate()
        {
            let routed = router.route(&floats(logits), &bias);
            // transformers' top-k is unsorted: compare (expert, weight) by expert.
            let mut ours: Vec<(i32, f32)> =
                routed.experts.iter().copied().zip(routed.weights.iter().copied()).collect();
            let mut theirs: Vec<(i32, f32)> = want["experts"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e.as_i64().unwrap() as i32)
                .zip(floats(&want["weights"]))
                .collect();
            ours.sort_by_key(|p| p.0);
            theirs.sort_by_key(|p| p.0);
            let experts = |v: &[(i32, f32)]| v.iter().map(|p| p.0).collect::<Vec<_>>();
            assert_eq!(experts(&ours), experts(&theirs), "{name}, token {t}");
            for ((e, a), (_, b)) in ours.iter().zip(&theirs) {
                assert!((a - b).abs() <= 2e-6 * b.abs().max(1.0), "{name}, token {t}, expert {e}: {a} vs {b}");
            }
            tokens += 1;
        }
    }
    assert_eq!(tokens, 24);
}
