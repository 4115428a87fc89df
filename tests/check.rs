//! `check` (bisect with `target: Capture(dir)`): each stage of a capture
//! re-run by the reference on the capture's own inputs. A capture of a
//! correct implementation has no finding (the CPU's own: exact; one kept
//! in bf16: within its expected error); edits of one expert slot and of
//! one token's attention output at a decode step are named alone, with
//! step, layer, token and expert; a stage whose input was not captured is
//! checked with that input recomputed where the capture holds what it is
//! computed from, else named as not checkable; a capture with nothing checkable, of another
//! prompt or another model, is refused.

use std::path::{Path, PathBuf};

use compare::Report;
use compare::npy::{header, read_npy};
use moetrace_tests::{edit_npy, finding_places, scratch};
use session::bisect::{BisectConfig, BisectOptions, bisect};
use session::{RunConfig, run};
use stage_types::SaveTensorStage as S;

const MODEL: &str = "Synthetic(preset: \"tiny-moe\", seed: 5)";
const PROMPT: &str = "[1, 17, 423, 45, 300, 5, 77, 100, 2]";

/// A capture of every stage of `backend` on the tiny model, 3 steps.
fn capture(dir: &Path, backend: &str) -> PathBuf {
    capture_with_faults(dir, backend, "")
}

/// [`capture`] of a run with `faults` (a RON list's items): an engine
/// with those bugs, every stage after them computed from them.
fn capture_with_faults(dir: &Path, backend: &str, faults: &str) -> PathBuf {
    let out = dir.join(format!("{}{}", backend.replace(['(', ')'], "-"), faults.len()));
    let _ = std::fs::remove_dir_all(&out);
    let text = format!(
        "(model: {MODEL}, prompt: Tokens({PROMPT}), generate: 3, backend: {backend}, threads: 1, faults: [{faults}], capture: (out_dir: {out:?}))"
    );
    run(&RunConfig::parse(&text, Path::new("c.ron")).unwrap(), Path::new("c.ron"), &mut |_| {}).unwrap();
    out
}

fn check(capture: &Path, prompt: &str, model: &str) -> session::Result<Report> {
    let text = format!(
        "(model: {model}, prompt: Tokens({prompt}), generate: 3, reference: Cpu, target: Capture({capture:?}), threads: 1)"
    );
    let config = BisectConfig::parse(&text, Path::new("check.ron"))?;
    bisect(&config, Path::new("check.ron"), &BisectOptions::default(), &mut |_, _| {})
}

#[test]
fn a_correct_capture_has_no_finding_and_two_edits_are_named_alone() {
    let dir = scratch("check-edits");
    // The CPU's own capture: every stage recomputed bit for bit.
    let own = capture(&dir, "Cpu");
    let report = check(&own, PROMPT, MODEL).unwrap();
    assert!(report.findings().is_empty(), "{}", report.render(false));
    assert!(report.rows.len() > 100, "{} rows", report.rows.len());
    // A bf16 implementation's capture: within its expected error.
    let bf16 = capture(&dir, "CpuEmulating(Bf16)");
    let report = check(&bf16, PROMPT, MODEL).unwrap();
    assert!(report.findings().is_empty(), "{}", report.render(false));
    assert!(report.notes.iter().any(|n| n.contains("activations bf16")), "{:?}", report.notes);
    // An engine with two bugs: 2% on one expert's output at layer 2 of
    // step 1, noise on token 4 of layer 1's attention output in the
    // prompt. Its capture: each found alone, where it is.
    let ids = read_npy(&own.join("step-1/layer-2/moe_router_indices.npy")).unwrap().values();
    let expert = ids[1] as i32;
    let faults = format!(
        "(stage: \"moe_expert_out\", layer: 2, step: 1, expert: {expert}, kind: Scale(1.02)), (stage: \"attn_out\", layer: 1, step: 0, token: 4, kind: Noise(std: 0.02, seed: 3))"
    );
    let buggy = capture_with_faults(&dir, "Cpu", &faults);
    let report = check(&buggy, PROMPT, MODEL).unwrap();
    assert_eq!(
        finding_places(&report),
        [(0, Some(1), S::AttnOut, Some(4), None), (1, Some(2), S::MoeExpertOut, Some(0), Some(expert))],
        "{}",
        report.render(false)
    );
    // One .npy edited after the fact: the edit is found alone. Its
    // consumer's captured output no longer follows from the captured input
    // (the engine computed it from the value before the edit): a note
    // names it under the edit's finding, not as a second one.
    edit_npy(&own, "step-1/layer-2/moe_expert_out.npy", |shape, v| {
        let h = shape[2];
        v[h..2 * h].iter_mut().for_each(|x| *x *= 1.02);
    });
    let report = check(&own, PROMPT, MODEL).unwrap();
    assert_eq!(
        finding_places(&report),
        [(1, Some(2), S::MoeExpertOut, Some(0), Some(expert))],
        "{}",
        report.render(false)
    );
    let note = report.notes.iter().find(|n| n.starts_with("not counted as findings")).expect("a note on the consumer");
    assert!(
        note.contains("step 1 layer 2 moe_ffn_out (from the capture's moe_expert_out at step 1 layer 2 token 0"),
        "{note}"
    );
}

#[test]
fn stages_whose_inputs_were_not_captured_are_named_and_a_capture_of_nothing_checkable_is_refused() {
    let dir = scratch("check-missing");
    let own = capture(&dir, "Cpu");
    let remove = |file: &str| {
        std::fs::remove_file(own.join(file)).unwrap();
        let manifest_path = own.join("manifest.json");
        let mut manifest: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&manifest_path).unwrap()).unwrap();
        manifest["tensors"].as_array_mut().unwrap().retain(|t| t["path"] != file);
        std::fs::write(&manifest_path, manifest.to_string()).unwrap();
    };
    // A stage between two captured ones (a fused op's intermediate): its
    // consumer is checked with it folded in, the reference computing it.
    remove("step-0/layer-0/ffn_norm.npy");
    let report = check(&own, PROMPT, MODEL).unwrap();
    assert!(report.findings().is_empty(), "{}", report.render(false));
    let note = report.notes.iter().find(|n| n.starts_with("checked together")).expect("a note on the folded input");
    assert!(note.contains("moe_router_logits (with ffn_norm)"), "{note}");
    assert!(report.rows.iter().any(|r| (r.step, r.layer, r.stage) == (0, Some(0), S::MoeRouterLogits)));
    // A layer's input missing: what reads it is not checkable, by name.
    remove("step-0/layer-0/post_ffn_residual.npy");
    let report = check(&own, PROMPT, MODEL).unwrap();
    assert!(report.findings().is_empty(), "{}", report.render(false));
    let note = report.notes.iter().find(|n| n.starts_with("not checkable")).expect("a not-checkable note");
    assert!(note.contains("attn_norm needs post_ffn_residual of the layer before (at step 0 layer 1)"), "{note}");
    assert!(!report.rows.iter().any(|r| (r.step, r.layer, r.stage) == (0, Some(1), S::AttnNorm)));
    // Every layer stage checked elsewhere still is.
    assert!(report.rows.iter().any(|r| (r.step, r.layer, r.stage) == (0, Some(2), S::AttnNorm)));

    // Only the logits: nothing feeds anything.
    let bare = dir.join("bare");
    let _ = std::fs::remove_dir_all(&bare);
    let text = format!(
        "(model: {MODEL}, prompt: Tokens({PROMPT}), generate: 3, threads: 1, capture: (stages: \"lm_head\", out_dir: {bare:?}))"
    );
    run(&RunConfig::parse(&text, Path::new("c.ron")).unwrap(), Path::new("c.ron"), &mut |_| {}).unwrap();
    let err = check(&bare, PROMPT, MODEL).unwrap_err().to_string();
    assert!(err.contains("nothing checkable") && err.contains("lm_head needs final_norm"), "{err}");

    // A tensor of another shape than the model gives that stage: named.
    let wrong = dir.join("wrong-shape");
    let _ = std::fs::remove_dir_all(&wrong);
    let text =
        format!("(model: {MODEL}, prompt: Tokens({PROMPT}), generate: 3, threads: 1, capture: (out_dir: {wrong:?}))");
    run(&RunConfig::parse(&text, Path::new("c.ron")).unwrap(), Path::new("c.ron"), &mut |_| {}).unwrap();
    let file = wrong.join("step-0/layer-1/attn_out.npy");
    let mut bytes = header("<f4", &[9, 3]);
    bytes.extend(std::iter::repeat_n(0u8, 9 * 3 * 4));
    std::fs::write(&file, bytes).unwrap();
    let manifest_path = wrong.join("manifest.json");
    let text = std::fs::read_to_string(&manifest_path).unwrap();
    let mut manifest: serde_json::Value = serde_json::from_str(&text).unwrap();
    for t in manifest["tensors"].as_array_mut().unwrap() {
        if t["path"] == "step-0/layer-1/attn_out.npy" {
            t["shape"] = serde_json::json!([9, 3]);
        }
    }
    std::fs::write(&manifest_path, manifest.to_string()).unwrap();
    let err = check(&wrong, PROMPT, MODEL).unwrap_err().to_string();
    assert!(err.contains("attn_out of step 0 layer 1") && err.contains("[9, 3]"), "{err}");

    // Another prompt, another model: refused by name.
    let err = check(&own, "[1, 2, 3]", MODEL).unwrap_err().to_string();
    assert!(err.contains("prompt"), "{err}");
    let err = check(&own, PROMPT, "Synthetic(preset: \"tiny-qwen2-moe\", seed: 5)").unwrap_err().to_string();
    assert!(err.contains("another model"), "{err}");
    // A capture target takes no faults, and a run has no capture backend.
    let text = format!("(model: {MODEL}, prompt: Tokens({PROMPT}), backend: Capture({own:?}))");
    let err = RunConfig::parse(&text, Path::new("r.ron")).unwrap_err().to_string();
    assert!(err.contains("computes nothing"), "{err}");
}

/// The independent oracles of ../shared/fixtures (Hugging Face
/// transformers' float64 captures, made by other code): every stage of
/// every step checks clean against the safetensors and the Q4_K_M GGUF.
#[test]
fn the_shared_oracle_captures_check_clean() {
    for (name, model) in [("tiny-qwen3-moe", "model"), ("tiny-qwen3-moe-q4km", "model/model.gguf")] {
        let Some(dir) = moetrace_tests::fixture_with(name, "activations/manifest.json") else { continue };
        let capture = compare::CaptureDir::open(&dir.join("activations")).unwrap();
        let prompt = format!("{:?}", capture.manifest.prompt);
        let report = check(&dir.join("activations"), &prompt, &format!("Path({:?})", dir.join(model))).unwrap();
        assert!(report.findings().is_empty(), "{name}\n{}", report.render(false));
        assert_eq!(report.rows.len(), capture.manifest.tensors.len(), "{name}: every tensor checked");
    }
}

/// An engine whose attention output at one token turns NaN: check names
/// that stage, where the NaN is; the stages after it, fed the capture's
/// NaN, compute NaN where the engine did and are still checked on the rest
/// of their values (no finding), and the note says what was left out.
#[test]
fn a_nan_in_the_capture_is_named_where_it_appears_and_later_stages_are_still_checked() {
    let dir = scratch("check-nan");
    let fault = "(stage: \"attn_out\", layer: 1, step: 0, token: 4, kind: Nan)";
    let buggy = capture_with_faults(&dir, "Cpu", fault);
    let report = check(&buggy, PROMPT, MODEL).unwrap();
    let found = finding_places(&report);
    assert_eq!(found.first().map(|f| (f.0, f.1, f.2)), Some((0, Some(1), S::AttnOut)), "{}", report.render(false));
    assert_eq!(found.len(), 1, "{}", report.render(false));
    assert!(report.notes.iter().any(|n| n.contains("left out")), "{:?}", report.notes);
    // Later stages of the same token were compared (on their other values).
    assert!(report.rows.iter().any(|r| (r.step, r.layer, r.stage) == (0, Some(1), S::PostAttnResidual)));
}
