//! Routing from other engines as a replay source: expert ids in vLLM's
//! returned layout (`prompt_routed_experts` [prompt_len, moe_layers, k] and
//! `routed_experts` [gen_len, moe_layers, k], int16) written as a capture by
//! `python -m moetrace_capture.routing`, then replayed (`routing:
//! Replay(..)`): ids only, so each token's weights come from the run's own
//! router logits at those ids. Replaying a run's own routing this way
//! reproduces it bit for bit. Needs python3 with numpy (SKIPPED without;
//! .ci/run installs it).

use std::path::Path;
use std::process::Command;

use compare::CaptureDir;
use moetrace_tests::{scratch, workspace_root};
use session::RunConfig;
use stage_types::SaveTensorStage as S;

const MODEL: &str = "Synthetic(preset: \"tiny-moe\", seed: 7)";
const PROMPT: [u32; 9] = [1, 17, 423, 45, 300, 5, 77, 100, 2];

/// A .npy of `shape` whose elements are `descr` (`<i2`, `<i4`, `<f4`),
/// each given as its little-endian bytes.
fn write_npy<const N: usize>(path: &Path, descr: &str, shape: &[usize], values: impl Iterator<Item = [u8; N]>) {
    let mut bytes = compare::npy::header(descr, shape);
    values.for_each(|v| bytes.extend_from_slice(&v));
    std::fs::write(path, bytes).unwrap();
}

/// An int16 .npy of `shape`.
fn write_i16(path: &Path, shape: &[usize], values: &[i16]) {
    write_npy(path, "<i2", shape, values.iter().map(|v| v.to_le_bytes()));
}

/// Each layer's values of `stage` at `step`.
fn per_layer(capture: &CaptureDir, step: usize, layers: usize, stage: S) -> Vec<Vec<f64>> {
    (0..layers).map(|l| capture.load(step, Some(l), stage).unwrap().unwrap().values()).collect()
}

fn run(extra: &str, out: &Path) -> session::RunOutput {
    let text = format!(
        "(model: {MODEL}, prompt: Tokens({PROMPT:?}), generate: 4, threads: 1, {extra} capture: (stages: \"moe_router_indices,lm_head\", out_dir: {out:?}))"
    );
    session::run(&RunConfig::parse(&text, Path::new("r.ron")).unwrap(), Path::new("r.ron"), &mut |_| {}).unwrap()
}

fn routing_tool(args: &[&str]) -> std::process::Output {
    Command::new("python3")
        .args(["-m", "moetrace_capture.routing"])
        .args(args)
        .env("PYTHONPATH", workspace_root().join("python"))
        .output()
        .expect("python3 runs")
}

#[test]
fn vllm_routed_experts_replay_a_runs_own_routing_bit_for_bit() {
    let ok = Command::new("python3").args(["-c", "import numpy"]).output().is_ok_and(|o| o.status.success());
    if !ok {
        moetrace_tests::skip("python3 with numpy not found; the routing import was not checked");
        return;
    }
    let dir = scratch("routing-import");
    let reference = dir.join("reference");
    let own = run("", &reference);
    let capture = CaptureDir::open(&reference).unwrap();
    let config = &capture.manifest.model.config;
    let layers = config["num_hidden_layers"].as_u64().unwrap() as usize;
    let k = config["num_experts_per_tok"].as_u64().unwrap() as usize;
    // vLLM's arrays: the prompt's rows, then one row per generated token fed.
    let ids = |step: usize| -> Vec<Vec<i32>> {
        per_layer(&capture, step, layers, S::MoeRouterIndices)
            .into_iter()
            .map(|v| v.iter().map(|&x| x as i32).collect())
            .collect()
    };
    let rows = |per_layer: Vec<Vec<i32>>, tokens: usize| -> Vec<i16> {
        let mut out = Vec::new();
        for t in 0..tokens {
            for layer in &per_layer {
                out.extend(layer[t * k..(t + 1) * k].iter().map(|&e| e as i16));
            }
        }
        out
    };
    write_i16(&dir.join("prompt_routed.npy"), &[PROMPT.len(), layers, k], &rows(ids(0), PROMPT.len()));
    let decode: Vec<i16> = (1..4).flat_map(|s| rows(ids(s), 1)).collect();
    write_i16(&dir.join("routed.npy"), &[3, layers, k], &decode);
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let generated: Vec<String> = own.summary.generated.iter().map(u32::to_string).collect();
    let prompt: Vec<String> = PROMPT.iter().map(u32::to_string).collect();
    let replay = dir.join("vllm-routing");
    let args = [
        dir.join("config.json").display().to_string(),
        replay.display().to_string(),
        "--prompt".into(),
        prompt.join(","),
        "--generated".into(),
        generated.join(","),
        "--ids".into(),
        dir.join("routed.npy").display().to_string(),
        "--prompt-ids".into(),
        dir.join("prompt_routed.npy").display().to_string(),
        "--backend".into(),
        "vllm".into(),
    ];
    let out = routing_tool(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Replayed: the same routing, the weights recomputed from the same
    // logits, so the same logits bit for bit.
    let replayed_dir = dir.join("replayed");
    run(&format!("routing: Replay({replay:?}),"), &replayed_dir);
    let replayed = CaptureDir::open(&replayed_dir).unwrap();
    for step in 0..4 {
        let a = capture.load(step, None, S::LmHead).unwrap().unwrap();
        let b = replayed.load(step, None, S::LmHead).unwrap().unwrap();
        assert_eq!(a, b, "step {step} logits");
    }
    let routing = &replayed.manifest.routing.as_ref().unwrap()["replayed"];
    assert_eq!(routing.as_array().unwrap().len(), 4 * layers);
    assert!(routing.as_array().unwrap().iter().all(|r| r["overridden_tokens"] == 0));
    // SGLang's export as the issue describes it: one [tokens, layers, k]
    // int32 array over the prompt and the generated tokens fed, with the
    // router weights beside it: replayed as given, the same bits again.
    let reference_with_weights = dir.join("reference-weights");
    let text = format!(
        "(model: {MODEL}, prompt: Tokens({PROMPT:?}), generate: 4, threads: 1, capture: (stages: \"moe_router,moe_router_indices\", out_dir: {reference_with_weights:?}))"
    );
    session::run(&RunConfig::parse(&text, Path::new("r.ron")).unwrap(), Path::new("r.ron"), &mut |_| {}).unwrap();
    let with_weights = CaptureDir::open(&reference_with_weights).unwrap();
    let tokens = PROMPT.len() + 3;
    let mut all_ids = Vec::new();
    let mut all_weights = Vec::new();
    for (step, count) in (0..4).map(|s| (s, if s == 0 { PROMPT.len() } else { 1 })) {
        let ids = per_layer(&with_weights, step, layers, S::MoeRouterIndices);
        let w = per_layer(&with_weights, step, layers, S::MoeRouter);
        for t in 0..count {
            for l in 0..layers {
                all_ids.extend(ids[l][t * k..(t + 1) * k].iter().map(|&x| x as i32));
                all_weights.extend(w[l][t * k..(t + 1) * k].iter().map(|&x| x as f32));
            }
        }
    }
    let shape = [tokens, layers, k];
    write_npy(&dir.join("sglang_ids.npy"), "<i4", &shape, all_ids.iter().map(|v| v.to_le_bytes()));
    write_npy(&dir.join("sglang_weights.npy"), "<f4", &shape, all_weights.iter().map(|v| v.to_le_bytes()));
    let sglang = dir.join("sglang-routing");
    let mut sglang_args: Vec<String> = args[..6].to_vec();
    sglang_args[1] = sglang.display().to_string();
    sglang_args.extend([
        "--ids".into(),
        dir.join("sglang_ids.npy").display().to_string(),
        "--weights".into(),
        dir.join("sglang_weights.npy").display().to_string(),
        "--backend".into(),
        "sglang".into(),
    ]);
    let out = routing_tool(&sglang_args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let replayed_dir = dir.join("replayed-sglang");
    run(&format!("routing: Replay({sglang:?}),"), &replayed_dir);
    let replayed = CaptureDir::open(&replayed_dir).unwrap();
    let original = CaptureDir::open(&reference).unwrap();
    for step in 0..4 {
        let a = original.load(step, None, S::LmHead).unwrap().unwrap();
        let b = replayed.load(step, None, S::LmHead).unwrap().unwrap();
        assert_eq!(a, b, "step {step} logits (SGLang layout)");
    }

    // A layer axis that fits no reading of the model: refused by name.
    write_i16(
        &dir.join("bad.npy"),
        &[PROMPT.len() + 3, layers + 1, k],
        &vec![0; (PROMPT.len() + 3) * (layers + 1) * k],
    );
    let mut bad = args.to_vec();
    bad[1] = dir.join("bad-routing").display().to_string();
    bad[7] = dir.join("bad.npy").display().to_string();
    bad.truncate(8);
    let out = routing_tool(&bad.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("layer axis") && err.contains("MoE layers"), "{err}");
}
