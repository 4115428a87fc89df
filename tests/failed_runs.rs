//! A run that fails mid-way leaves nothing behind: its temporary capture
//! folder is renamed away and removed while the writer threads may still be
//! creating folders in it (before, about a third of such failures left an
//! empty `.out.moetrace-tmp-PID-N/step-0/`). Repeated many times, since the
//! race it guards against is one of timing.

use std::path::Path;

use moetrace_tests::scratch;

/// Qwen3's vocabulary makes the prompt's logits large (64 x 151936 f32):
/// the writers are still busy with the prompt step when step 1 fails.
const MODEL: &str = "model: Synthetic(preset: \"tiny-moe-qwen3-vocab\", seed: 3), prompt: Tokens([5, 9, 200, 7, 11, 64, 3, 90, 5, 9, 200, 7, 11, 64, 3, 90, 5, 9, 200, 7, 11, 64, 3, 90, 5, 9, 200, 7, 11, 64, 3, 90, 5, 9, 200, 7, 11, 64, 3, 90, 5, 9, 200, 7, 11, 64, 3, 90, 5, 9, 200, 7, 11, 64, 3, 90, 5, 9, 200, 7, 11, 64, 3, 90])";

fn run(dir: &Path, name: &str, body: &str) -> session::Result<session::RunOutput> {
    moetrace_tests::run_config_text(dir, name, &format!("{MODEL}, {body}"))
}

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("moetrace-"))
        .collect()
}

/// A routing capture of three steps at `dir/source`, for replay.
fn routing_source(dir: &Path) {
    run(dir, "source", "generate: 3, capture: (stages: \"moe_router,moe_router_indices\", out_dir: \"source\")")
        .unwrap();
}

#[test]
fn a_run_that_fails_at_step_one_leaves_no_folder_fifty_times_over() {
    let dir = scratch("failed-runs");
    // A routing capture whose step-1 expert ids are truncated: the replaying
    // run opens it, runs the prompt step, and fails reading step 1.
    routing_source(&dir);
    let bad = dir.join("source/step-1/layer-1/moe_router_indices.npy");
    let bytes = std::fs::read(&bad).expect("the capture layout has step-1/layer-1");
    std::fs::write(&bad, &bytes[..bytes.len() - 8]).unwrap();
    let body = "generate: 3, routing: Replay(\"source\"), capture: (stages: \"all\", out_dir: \"out\")";
    for i in 0..50 {
        let err = run(&dir, "replay", body).err().unwrap_or_else(|| panic!("try {i}: the bad capture was not noticed"));
        let text = err.to_string();
        assert!(text.contains("moe_router_indices"), "try {i}: {text}");
        let left = leftovers(&dir);
        assert!(left.is_empty(), "try {i}: left behind {left:?} ({text})");
        assert!(!dir.join("out").exists(), "try {i}: a failed run made out/");
    }
}

/// A token fed from a replayed capture that is out of the vocabulary is
/// named with the capture's manifest, the step and the value, before any
/// work; nothing is left behind.
#[test]
fn a_bad_token_in_a_replayed_capture_names_the_capture() {
    let dir = scratch("failed-runs-token");
    routing_source(&dir);
    let manifest = dir.join("source/manifest.json");
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
    json["steps"][2]["tokens"] = serde_json::json!([999_999_999u32]);
    std::fs::write(&manifest, json.to_string()).unwrap();
    let body = "generate: 3, routing: Replay(\"source\"), capture: (out_dir: \"out\")";
    let Err(err) = run(&dir, "replay", body) else { panic!("the bad token is refused") };
    let err = err.to_string();
    assert!(err.contains("source/manifest.json") && err.contains("step 2") && err.contains("999999999"), "{err}");
    assert!(leftovers(&dir).is_empty() && !dir.join("out").exists());
}
