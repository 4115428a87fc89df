//! The llama.cpp recorder (python/moetrace_capture/llamacpp.py): llama.cpp
//! itself (llama-cpp-python, CPU) runs the tiny Q4_K_M GGUF fixture and its
//! eval callback writes a moetrace capture. `check` of that capture against
//! the float64 reference flags nothing: every projection's error is what
//! llama.cpp's Q8_K activations and f16 KV cache explain, and the CPU
//! replaying that arithmetic computes it. With an f32 KV cache, the capture
//! diffs against moetrace's own `CpuLlamaCpp` run within f32 noise at every
//! stage; one expert slot of one layer's ffn_moe_down scaled by 2% and
//! noise on one decode token's attention output: check names those two
//! alone, a free-running diff of the same capture the first. llama.cpp's
//! Qwen2-MoE (biases, a shared expert) and Mixtral (permuted q/k rows) are
//! checked clean too; llama.cpp's gpt-oss departs in its YaRN ramp alone.
//!
//! Recorded with `--no-extra-bufts` (see `record`). Needs python3 with numpy, gguf and llama-cpp-python 0.3.x (.ci/run
//! installs them); says SKIPPED without them.

use std::path::{Path, PathBuf};
use std::process::Command;

use compare::Report;
use compare::diff::{DiffOptions, diff};
use compare::npy::read_npy;
use moetrace_tests::{edit_npy, finding_places, gguf_fixture, scratch, skip, workspace_root};
use session::bisect::{BisectConfig, BisectOptions, bisect};
use session::{RunConfig, run};
use stage_types::SaveTensorStage as S;

const PROMPT: &str = "1,17,423,45,300,5,77,100,2";

fn llama_cpp_python() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import numpy, gguf, llama_cpp"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        skip("python3 with numpy, gguf and llama-cpp-python not found (pip install llama-cpp-python gguf)");
    }
    ok
}

/// Records `gguf` through llama.cpp into `out`; returns the recorder's stderr.
fn record(gguf: &Path, out: &Path, kv: &str) -> String {
    record_with(gguf, out, kv, &[])
}

/// [`record`] with more of the recorder's arguments.
fn record_with(gguf: &Path, out: &Path, kv: &str, more: &[&str]) -> String {
    let output = Command::new("python3")
        .env("PYTHONPATH", workspace_root().join("python"))
        .args(["-m", "moetrace_capture.llamacpp"])
        .arg(gguf)
        .arg(out)
        .args(["--prompt", PROMPT, "--generate", "3", "--threads", "2", "--kv-type", kv])
        // The plain CPU path on every machine: llama.cpp's AMX path (this
        // build, on a Sapphire Rapids CPU) crashes in its Q4_K multiply of
        // a 9-row prompt, and the AVX2 repack differs per machine.
        .arg("--no-extra-bufts")
        .args(more)
        .output()
        .expect("python3 runs");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        output.status.success(),
        "the recorder failed ({}):\n{}{stderr}",
        output.status,
        String::from_utf8_lossy(&output.stdout)
    );
    stderr
}

fn check(capture: &Path, gguf: &Path) -> Report {
    check_against(capture, gguf, "Cpu")
}

/// `check` with `reference` re-running the stages.
fn check_against(capture: &Path, gguf: &Path, reference: &str) -> Report {
    let text = format!(
        "(model: Path({gguf:?}), prompt: Tokens([{PROMPT}]), generate: 3, reference: {reference}, target: Capture({capture:?}), threads: 2)"
    );
    let config = BisectConfig::parse(&text, Path::new("check.ron")).unwrap();
    bisect(&config, Path::new("check.ron"), &BisectOptions::default(), &mut |_, _| {}).unwrap()
}

fn fixture() -> Option<PathBuf> {
    Some(gguf_fixture("tiny-qwen3-moe-q4km")?.join("model/model.gguf"))
}

#[test]
fn a_llama_cpp_capture_with_its_default_f16_cache_is_checked_clean() {
    let Some(gguf) = fixture() else { return };
    if !llama_cpp_python() {
        return;
    }
    let dir = scratch("llama-cpp-check");
    let capture = dir.join("llama-cpp");
    let log = record(&gguf, &capture, "f16");
    assert!(!log.contains("not recorded"), "every stage of a MoE model is recorded:\n{log}");
    let report = check(&capture, &gguf);
    assert!(finding_places(&report).is_empty(), "{}", report.render(false));
    let stages: std::collections::BTreeSet<S> = report.rows.iter().map(|r| r.stage).collect();
    assert_eq!(stages.len(), 23, "every stage of the MoE model checked: {stages:?}");
    let note = &report.notes[0];
    assert!(note.contains("llama.cpp's CPU converts them") && note.contains("attention on f16"), "{note}");
    // A correct llama.cpp is far inside: each row within a few percent of
    // the f32 floor from the CPU replaying its arithmetic.
    let worst = report.rows.iter().filter_map(|r| r.expected.as_ref().map(|e| e.ratio)).fold(0.0f64, f64::max);
    assert!(worst < 0.5, "largest ratio {worst}");
    // The quantized projections' local errors against float64 are
    // llama.cpp's Q8_K activations: against `CpuLlamaCpp` they are f32 noise.
    let projections = [S::QkvMatmul, S::AttnOut, S::MoeExpertGate, S::MoeExpertUp, S::MoeExpertOut, S::LmHead];
    let largest = |report: &Report, stage: S| {
        report
            .rows
            .iter()
            .filter(|r| r.stage == stage)
            .filter_map(|r| r.metrics.as_ref())
            .map(|m| m.rel_l2)
            .fold(0.0, f64::max)
    };
    let against_llama_numerics = check_against(&capture, &gguf, "CpuLlamaCpp");
    for stage in projections {
        let (exact, ggml) = (largest(&report, stage), largest(&against_llama_numerics, stage));
        assert!(exact > 1e-3 && ggml < 1e-6, "{stage}: rel_l2 {exact:e} against float64, {ggml:e} against CpuLlamaCpp");
    }

    // One layer recorded (and its input): checked alone.
    let one = dir.join("layer-2");
    record_with(&gguf, &one, "f16", &["--layers", "2"]);
    let report = check(&one, &gguf);
    assert!(finding_places(&report).is_empty(), "{}", report.render(false));
    let layers: std::collections::BTreeSet<Option<usize>> = report.rows.iter().map(|r| r.layer).collect();
    assert_eq!(layers, [None, Some(2)].into_iter().collect(), "{}", report.render(false));
    let layer_2 = report.rows.iter().filter(|r| r.layer == Some(2) && r.step == 0).count();
    assert_eq!(layer_2, 20, "every stage of layer 2 checked");
}

#[test]
fn llama_cpp_matches_its_numerics_replayed_and_two_edits_of_its_capture_are_named_alone() {
    let Some(gguf) = fixture() else { return };
    if !llama_cpp_python() {
        return;
    }
    let dir = scratch("llama-cpp-edits");
    // With an f32 cache, moetrace's `CpuLlamaCpp` run computes what
    // llama.cpp does, within f32 noise at every stage, free-running.
    let capture = dir.join("llama-cpp");
    record(&gguf, &capture, "f32");
    let ours = dir.join("moetrace");
    let text = format!(
        "(model: Path({gguf:?}), prompt: Tokens([{PROMPT}]), generate: 3, backend: CpuLlamaCpp, threads: 2, capture: (out_dir: {ours:?}))"
    );
    run(&RunConfig::parse(&text, Path::new("r.ron")).unwrap(), Path::new("r.ron"), &mut |_| {}).unwrap();
    let report = diff(&ours, &capture, &DiffOptions::default()).unwrap();
    assert!(report.first_divergence().is_none(), "{}", report.render(false));
    let stages: std::collections::BTreeSet<S> = report.rows.iter().map(|r| r.stage).collect();
    assert_eq!(stages.len(), 23, "{stages:?}");
    let worst = report.rows.iter().filter_map(|r| r.metrics.as_ref().map(|m| m.rel_l2)).fold(0.0f64, f64::max);
    assert!(worst < 1e-4, "largest rel_l2 {worst:e}");

    // Expert slot 1 of token 2's ffn_moe_down at layer 1 of the prompt,
    // 2% larger; token 0's attention output at layer 2 of step 2, noisy.
    edit_npy(&capture, "step-0/layer-1/moe_expert_out.npy", |shape, v| {
        let (k, h) = (shape[1], shape[2]);
        v[(2 * k + 1) * h..(2 * k + 2) * h].iter_mut().for_each(|x| *x *= 1.02);
    });
    edit_npy(&capture, "step-2/layer-2/attn_out.npy", |_, v| {
        v.iter_mut().enumerate().for_each(|(i, x)| *x += if i % 2 == 0 { 0.01 } else { -0.01 } * x.abs().max(0.1));
    });
    let expert = read_npy(&capture.join("step-0/layer-1/moe_router_indices.npy")).unwrap();
    let k = expert.shape[1];
    let edited_expert = expert.values()[2 * k + 1] as i32;
    let report = check(&capture, &gguf);
    assert_eq!(
        finding_places(&report),
        vec![(0, Some(1), S::MoeExpertOut, Some(2), Some(edited_expert)), (2, Some(2), S::AttnOut, Some(0), None)],
        "{}",
        report.render(false)
    );
    let note = report.notes.iter().find(|n| n.starts_with("not counted as findings")).expect("a note on the consumers");
    assert!(
        note.contains("step 0 layer 1 moe_ffn_out") && note.contains("step 2 layer 2 post_attn_residual"),
        "{note}"
    );
    // Free-running, the first edit is where the capture first diverges.
    let free = diff(&ours, &capture, &DiffOptions::default()).unwrap();
    let first = free.first_divergence().expect("the edited capture diverges");
    assert_eq!((first.step, first.layer, first.stage), (0, Some(1), S::MoeExpertOut), "{}", free.render(false));
}

/// The prompt the in-repo families' fixtures were made with.
const FAMILY_PROMPT: &str = "1,17,42,99,5,77";

/// Records an in-repo fixture's GGUF through llama.cpp (the prompt of
/// its oracle, 4 generated); returns the recorder's (stdout, stderr).
fn record_family(gguf: &Path, capture: &Path) -> (String, String) {
    let output = Command::new("python3")
        .env("PYTHONPATH", workspace_root().join("python"))
        .args(["-m", "moetrace_capture.llamacpp"])
        .arg(gguf)
        .arg(capture)
        .args(["--prompt", FAMILY_PROMPT, "--generate", "4", "--threads", "2", "--no-extra-bufts"])
        .output()
        .expect("python3 runs");
    let (stdout, stderr) = (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "{}: {stderr}", gguf.display());
    (stdout.into_owned(), stderr.into_owned())
}

/// `check` of a [`record_family`] capture against `model` on the CPU.
fn check_family(model: &Path, capture: &Path) -> Report {
    let text = format!(
        "(model: Path({model:?}), prompt: Tokens([{FAMILY_PROMPT}]), generate: 4, reference: Cpu, target: Capture({capture:?}), threads: 2)"
    );
    let config = BisectConfig::parse(&text, Path::new("check.ron")).unwrap();
    bisect(&config, Path::new("check.ron"), &BisectOptions::default(), &mut |_, _| {}).unwrap()
}

#[test]
fn llama_cpps_qwen2_moe_and_mixtral_are_checked_clean_at_every_stage() {
    if !llama_cpp_python() {
        return;
    }
    // The in-repo GGUFs written by llama.cpp's own converter: Qwen2-MoE
    // (q/k/v biases, top-k not renormalised, a shared expert behind
    // llama.cpp's silu(x) / x sigmoid) and Mixtral (`llama` with experts,
    // whose q and k rows the converter permutes for NORM RoPE). llama.cpp's
    // greedy tokens are transformers' float64 oracle's.
    for (fixture, greedy, stages, must) in [
        ("tiny-qwen2-moe-gguf-oracle", "[0, 91, 0, 92]", 29, [S::QkvBias, S::MoeSharedOut, S::MoeSharedWeight]),
        ("tiny-mixtral-oracle", "[18, 123, 52, 123]", 22, [S::QPostRope, S::KPostRope, S::MoeRouter]),
    ] {
        let gguf = workspace_root().join("tests/fixtures").join(fixture).join("model.gguf");
        let dir = scratch(&format!("llama-cpp-{fixture}"));
        let capture = dir.join("llama-cpp");
        let (stdout, log) = record_family(&gguf, &capture);
        assert!(!log.contains("not recorded"), "{fixture}: {log}");
        assert!(stdout.contains(&format!("generated {greedy}")), "{fixture}: {stdout}");
        let report = check_family(&gguf, &capture);
        assert!(finding_places(&report).is_empty(), "{fixture}: {}", report.render(false));
        let checked: std::collections::BTreeSet<S> = report.rows.iter().map(|r| r.stage).collect();
        assert!(must.iter().all(|s| checked.contains(s)), "{fixture}: {checked:?}");
        assert_eq!(checked.len(), stages, "{fixture}: every stage of the model checked: {checked:?}");
    }
}

/// llama.cpp's gpt-oss (the tiny fixture as llama.cpp's converter wrote it):
/// every stage it names matches the CPU replaying its arithmetic except
/// the rotation. Its YaRN ramp rounds its ends to whole dimensions
/// (ggml's corr dims, floor and ceil), where gpt-oss's checkpoint says
/// `truncate: false` (OpenAI's reference and transformers do not round;
/// vLLM #27722 and SGLang #14270 fixed the same departure): q_post_rope
/// and k_post_rope are flagged in every layer of every step, as one
/// systematic finding each, and nothing else is. The proof that the ramp is
/// the cause: the same capture checked against the checkpoint told
/// `truncate: true` has both stages clean. llama.cpp's greedy tokens are
/// the float64 oracle's; the window each row saw (read off its softmax)
/// is the checkpoint's; the sinks' share and the clamp are inside fused
/// ops and named as not recorded, with why.
#[test]
fn llama_cpps_gpt_oss_departs_from_the_checkpoint_in_its_yarn_ramp_only() {
    if !llama_cpp_python() {
        return;
    }
    let fixture = workspace_root().join("tests/fixtures/tiny-gpt-oss-oracle");
    let gguf = fixture.join("model.gguf");
    let dir = scratch("llama-cpp-gpt-oss");
    let capture = dir.join("llama-cpp");
    let (stdout, log) = record_family(&gguf, &capture);
    assert!(stdout.contains("generated [7, 62, 59, 4]"), "the oracle's greedy tokens: {stdout}");
    let not_recorded: Vec<&str> = log.lines().filter(|l| l.starts_with("not recorded:")).collect();
    assert_eq!(not_recorded.len(), 2, "{log}");
    for (stage, why) in [("attn_sink", "inside its softmax"), ("moe_expert_clamp", "fused SwiGLU")] {
        assert!(not_recorded.iter().any(|l| l.contains(stage) && l.contains(why)), "{stage}: {log}");
    }
    let report = check_family(&gguf, &capture);
    let text = report.render(false);
    let grouped = report.grouped_findings();
    assert!(grouped.lone.is_empty(), "{text}");
    let flagged: std::collections::BTreeSet<S> = grouped.systematic.iter().map(|s| s.stage).collect();
    assert_eq!(flagged, [S::QPostRope, S::KPostRope].into(), "{text}");
    for s in &grouped.systematic {
        assert_eq!(s.layers.len(), 3, "every layer: {text}");
    }
    let checked: std::collections::BTreeSet<S> = report.rows.iter().map(|r| r.stage).collect();
    assert_eq!(checked.len(), 24, "every stage llama.cpp names: {checked:?}");
    // The window each row saw, read off llama.cpp's softmax: exactly the
    // checkpoint's (4 on the sliding layers 0 and 2, none on layer 1).
    let windows: Vec<_> = report.rows.iter().filter(|r| r.stage == S::AttnWindow).collect();
    assert_eq!(windows.len(), 12, "{text}");
    assert!(windows.iter().all(|r| r.metrics.as_ref().is_some_and(|m| m.rel_l2 == 0.0)), "{text}");

    // The same capture and checkpoint, both told to round the ramp.
    let rounded = dir.join("checkpoint-truncating");
    std::fs::create_dir_all(&rounded).unwrap();
    for file in ["model.safetensors", "config.json"] {
        std::fs::copy(fixture.join("model").join(file), rounded.join(file)).unwrap();
    }
    let set_truncate = |path: &Path, pointer: &str| {
        let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        *json.pointer_mut(pointer).expect(pointer) = serde_json::json!(true);
        std::fs::write(path, json.to_string()).unwrap();
    };
    set_truncate(&rounded.join("config.json"), "/rope_parameters/truncate");
    set_truncate(&capture.join("manifest.json"), "/model/config/rope_scaling/truncate");
    let report = check_family(&rounded, &capture);
    let rope: Vec<_> = report.rows.iter().filter(|r| [S::QPostRope, S::KPostRope].contains(&r.stage)).collect();
    assert_eq!(rope.len(), 24, "{}", report.render(false));
    // (The router is not judged here: the checkpoint holds it in bf16,
    // llama.cpp's converter wrote it in f32, and the replay converts a bf16
    // weight's inputs as ggml does.)
    for row in rope {
        let ratio = row.expected.as_ref().map(|e| e.ratio).unwrap_or(f64::INFINITY);
        assert!(ratio < 0.5, "{} at {ratio}: {}", row.place(), report.render(false));
    }
}
