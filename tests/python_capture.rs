//! The Python package (python/moetrace_capture) writes captures moetrace
//! reads: a CPU capture read with numpy and written again through it
//! compares clean against the original at every stage and step; one NaN
//! written through it is recorded and found where it is; the writer's bad
//! input checks (tests/python/writer_checks.py); the llama.cpp recorder's
//! layout conversions (tests/python/llamacpp_layouts.py). Needs python3 with numpy;
//! says SKIPPED without them (.ci/run installs numpy).

use std::path::Path;
use std::process::Command;

use compare::diff::{DiffOptions, diff};
use compare::scope::Verdict;
use moetrace_tests::{scratch, workspace_root};
use session::RunConfig;
use stage_types::SaveTensorStage as S;

fn python_with_numpy() -> bool {
    let ok = Command::new("python3").args(["-c", "import numpy"]).output().map(|o| o.status.success()).unwrap_or(false);
    if !ok {
        moetrace_tests::skip("python3 with numpy not found (pip install numpy); the Python package was not checked");
    }
    ok
}

fn python(script: &str, args: &[&Path], extra: &[&str]) {
    let out = Command::new("python3")
        .arg(workspace_root().join("tests/python").join(script))
        .args(args)
        .args(extra)
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "{script} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn captures_written_from_python_compare_with_moetrace_captures() {
    if !python_with_numpy() {
        return;
    }
    let dir = scratch("python-capture");
    let original = dir.join("moetrace");
    let text = format!(
        "(model: Synthetic(preset: \"tiny-moe\", seed: 5), prompt: Tokens([3, 14, 15, 92, 65]), generate: 3, capture: (stages: \"all\", out_dir: {original:?}))"
    );
    let config = RunConfig::parse(&text, Path::new("py.ron")).unwrap();
    session::run(&config, Path::new("py.ron"), &mut |_| {}).unwrap();

    let copy = dir.join("python");
    python("recapture.py", &[&original, &copy], &[]);
    let report = diff(&original, &copy, &DiffOptions::default()).unwrap();
    assert!(report.first_divergence().is_none(), "{}", report.render(false));
    let steps: std::collections::BTreeSet<usize> = report.rows.iter().map(|r| r.step).collect();
    let stages: std::collections::BTreeSet<&str> = report.rows.iter().map(|r| r.stage.name()).collect();
    assert_eq!(steps.len(), 3, "every step compared");
    assert_eq!(stages.len(), 23, "every stage of a MoE model compared (3 model, 20 per layer): {stages:?}");
    assert!(report.rows.iter().all(|r| r.verdict.is_ok()), "{}", report.render(false));

    let poisoned = dir.join("poisoned");
    python("recapture.py", &[&original, &poisoned], &["1", "1", "moe_ffn_out"]);
    let report = diff(&original, &poisoned, &DiffOptions::default()).unwrap();
    let first = report.first_divergence().expect("the NaN is found");
    assert_eq!((first.step, first.layer, first.stage), (1, Some(1), S::MoeFfnOut), "{}", report.render(false));
    assert!(matches!(first.verdict, Verdict::Nan { .. }), "{:?}", first.verdict);
}

#[test]
fn the_python_writer_refuses_bad_input_and_keeps_non_finite_values() {
    if !python_with_numpy() {
        return;
    }
    python("writer_checks.py", &[], &[]);
}

#[test]
fn the_llama_cpp_recorder_converts_ggml_layouts_and_names_unknown_nodes() {
    if !python_with_numpy() {
        return;
    }
    python("llamacpp_layouts.py", &[], &[]);
}
