//! Hugging Face transformers captured through python/moetrace_capture/hf.py
//! at every stage, prefill and decode, compared with `moetrace diff`:
//! against moetrace's CPU run of the same checkpoint and prompt (every
//! stage of a MoE model at every step, no divergence at the f32
//! tolerance) and against ../shared's independent oracle. Needs python3
//! with torch and transformers; says SKIPPED without them (CI has none;
//! the GPU machine has both).

use std::path::Path;
use std::process::Command;

use compare::diff::{DiffOptions, diff};
use moetrace_tests::{fixture, scratch, workspace_root};
use session::RunConfig;

fn torch_and_transformers() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import torch, transformers, numpy"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("SKIPPED: python3 with torch and transformers not found; the Hugging Face hooks were not checked");
    }
    ok
}

fn record(model: &Path, out: &Path, prompt: &[u32], generate: usize) {
    let prompt: Vec<String> = prompt.iter().map(|t| t.to_string()).collect();
    let output = Command::new("python3")
        .arg(workspace_root().join("python/tools/record_hf.py"))
        .arg(model)
        .arg(out)
        .args(["--prompt", &prompt.join(","), "--generate", &generate.to_string()])
        .output()
        .expect("python3 runs");
    assert!(output.status.success(), "record_hf.py failed:\n{}", String::from_utf8_lossy(&output.stderr));
}

fn moetrace_capture(model: &Path, out: &Path, prompt: &[u32], generate: usize) {
    let text = format!(
        "(model: Path({model:?}), prompt: Tokens({prompt:?}), generate: {generate}, capture: (stages: \"all\", out_dir: {out:?}))"
    );
    let config = RunConfig::parse(&text, Path::new("hf.ron")).unwrap();
    session::run(&config, Path::new("hf.ron"), &mut |_| {}).unwrap();
}

fn check_no_divergence(reference: &Path, target: &Path, steps: usize, stage_kinds: usize) {
    let report = diff(reference, target, &DiffOptions::default()).unwrap();
    assert!(report.first_divergence().is_none(), "{}", report.render(false));
    assert!(report.rows.iter().all(|r| r.verdict.is_ok()), "{}", report.render(false));
    let steps_seen: std::collections::BTreeSet<usize> = report.rows.iter().map(|r| r.step).collect();
    let stages: std::collections::BTreeSet<&str> = report.rows.iter().map(|r| r.stage.name()).collect();
    assert_eq!(steps_seen.len(), steps, "every step compared");
    assert_eq!(stages.len(), stage_kinds, "every stage compared: {stages:?}");
}

#[test]
fn hugging_face_captured_through_the_package_matches_moetrace_at_every_stage() {
    if !torch_and_transformers() {
        return;
    }
    let dir = scratch("hf-capture");
    // The in-repo MoE checkpoint: every MoE-model stage (3 model stages and
    // 20 per layer) at every step.
    let model = workspace_root().join("tests/fixtures/tiny-moe-oracle/model");
    let prompt = [3u32, 14, 15, 92, 65];
    record(&model, &dir.join("hf"), &prompt, 3);
    moetrace_capture(&model, &dir.join("cpu"), &prompt, 3);
    check_no_divergence(&dir.join("hf"), &dir.join("cpu"), 3, 23);
    // The independent oracle of ../shared, when present.
    if let Some(shared) = fixture("tiny-qwen3-moe") {
        let oracle = shared.join("activations");
        let m = compare::Manifest::read(&oracle).unwrap();
        record(&shared.join("model"), &dir.join("hf-shared"), &m.prompt, m.steps.len());
        check_no_divergence(&oracle, &dir.join("hf-shared"), m.steps.len(), 23);
    }
}

/// The recipe for any PyTorch engine (python/examples/record_with_hooks.py:
/// forward hooks only, a module per stage) on the in-repo Qwen2-MoE
/// fixture, then `check`: every stage it recorded whose inputs it recorded
/// too is checked clean; the others are listed with what they need.
#[test]
fn an_engine_recorded_through_hooks_alone_checks_clean_where_its_inputs_were_recorded() {
    if !torch_and_transformers() {
        return;
    }
    let dir = scratch("hooks-recipe");
    let out = dir.join("hooks");
    let _ = std::fs::remove_dir_all(&out);
    let model = workspace_root().join("tests/fixtures/tiny-qwen2-moe-oracle/model");
    let output = Command::new("python3")
        .arg(workspace_root().join("python/examples/record_with_hooks.py"))
        .arg(&model)
        .arg(&out)
        .args(["--prompt", "1,17,42,99,5,77", "--generate", "3"])
        .env("PYTHONPATH", workspace_root().join("python"))
        .output()
        .expect("python3 runs");
    assert!(output.status.success(), "record_with_hooks.py failed:\n{}", String::from_utf8_lossy(&output.stderr));
    let text = format!(
        "(model: Path({model:?}), prompt: Tokens([1, 17, 42, 99, 5, 77]), generate: 3, reference: Cpu, target: Capture({out:?}))"
    );
    let config = session::bisect::BisectConfig::parse(&text, Path::new("hooks.ron")).unwrap();
    let options = session::bisect::BisectOptions::default();
    let report = session::bisect::bisect(&config, Path::new("hooks.ron"), &options, &mut |_, _| {}).unwrap();
    assert!(report.findings().is_empty(), "{}", report.render(false));
    assert!(report.rows.len() >= 30, "{} rows checked", report.rows.len());
    assert!(report.notes.iter().any(|n| n.contains("attn_out needs attention")), "{:?}", report.notes);
}
