//! Routing replay and the HTML error map through the real binary: a replay
//! run takes the capture's routing and records it; a replay capture of
//! another model, prompt or layer count, or without the routing stages, is
//! refused before the run (exit 2); `report` refuses a JSON of another
//! format version and an unwritable path (exit 2); the page opens in
//! headless Chromium without console errors where Chromium is installed.

use std::path::Path;
use std::process::Command;

mod common;

use common::{moetrace, run, scratch, stderr};

const PROMPT: &str = "Tokens([1, 17, 423, 45, 300, 5, 77, 100, 2])";

#[test]
fn a_replay_run_takes_the_captured_routing_and_records_it() {
    let dir = scratch("replay-report-replay");
    let model = "model: Synthetic(preset: \"tiny-moe\", seed: 7)";
    let out = run(&dir, "ref", &format!("{model}, prompt: {PROMPT}, generate: 3, capture: (out_dir: \"ref\")"));
    assert!(out.status.success(), "{}", stderr(&out));
    // A router whose logits are off takes the replayed experts instead.
    let noisy = "faults: [(stage: \"moe_router_logits\", layer: 2, token: 3, kind: Scale(-3.0))]";
    let out = run(
        &dir,
        "noisy",
        &format!(
            "{model}, prompt: {PROMPT}, generate: 3, {noisy}, routing: Replay(\"ref\"), capture: (out_dir: \"noisy\")"
        ),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("noisy/manifest.json")).unwrap()).unwrap();
    let step0_layer2 =
        manifest["routing"]["replayed"].as_array().unwrap().iter().find(|r| r["step"] == 0 && r["layer"] == 2).unwrap();
    assert_eq!(step0_layer2["overridden_tokens"], 1, "{step0_layer2}");
    assert_eq!(manifest["routing"]["replayed"].as_array().unwrap().len(), 3 * 4, "3 steps x 4 MoE layers");
    let diff = moetrace(&["diff", dir.join("ref").to_str().unwrap(), dir.join("noisy").to_str().unwrap()]);
    let text = String::from_utf8_lossy(&diff.stdout);
    assert!(text.contains("first divergence: step 0 layer 2 moe_router_logits"), "{text}");
    assert!(!text.contains("routing flip") && !text.contains("wrong router"), "{text}");
}

#[test]
fn a_replay_capture_that_does_not_fit_is_refused_before_the_run() {
    let dir = scratch("replay-report-replay-bad");
    let moe = "model: Synthetic(preset: \"tiny-moe\", seed: 7)";
    let ok = run(&dir, "ref", &format!("{moe}, prompt: {PROMPT}, generate: 2, capture: (out_dir: \"ref\")"));
    assert!(ok.status.success(), "{}", stderr(&ok));
    let partial = run(
        &dir,
        "partial",
        &format!("{moe}, prompt: {PROMPT}, capture: (stages: \"moe_router\", out_dir: \"partial\")"),
    );
    assert!(partial.status.success(), "{}", stderr(&partial));
    for (name, body, needles) in [
        (
            "other-model",
            "model: Synthetic(preset: \"tiny-dense\", seed: 7), prompt: Tokens([1, 17, 423, 45, 300, 5, 77, 100, 2]), routing: Replay(\"ref\")",
            vec!["another model"],
        ),
        (
            "other-layers",
            "model: Synthetic(preset: \"tiny-moe\", seed: 7, layers: 2), prompt: Tokens([1, 17, 423, 45, 300, 5, 77, 100, 2]), routing: Replay(\"ref\")",
            vec!["another model", "2 layers"],
        ),
        (
            "other-prompt",
            "model: Synthetic(preset: \"tiny-moe\", seed: 7), prompt: Tokens([1, 2, 3]), routing: Replay(\"ref\")",
            vec!["prompt"],
        ),
        (
            "more-steps",
            "model: Synthetic(preset: \"tiny-moe\", seed: 7), prompt: Tokens([1, 17, 423, 45, 300, 5, 77, 100, 2]), generate: 5, routing: Replay(\"ref\")",
            vec!["needs step 2"],
        ),
        (
            "no-indices",
            "model: Synthetic(preset: \"tiny-moe\", seed: 7), prompt: Tokens([1, 17, 423, 45, 300, 5, 77, 100, 2]), routing: Replay(\"partial\")",
            vec!["no moe_router_indices"],
        ),
        (
            "missing",
            "model: Synthetic(preset: \"tiny-moe\", seed: 7), prompt: Tokens([1, 17, 423, 45, 300, 5, 77, 100, 2]), routing: Replay(\"nowhere\")",
            vec!["nowhere"],
        ),
    ] {
        let out = run(&dir, name, &format!("{body}, capture: (out_dir: \"out-{name}\")"));
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{name}: {err}");
        assert!(err.contains("routing: Replay"), "{name}: {err}");
        for n in needles {
            assert!(err.contains(n), "{name}: `{n}` not in {err}");
        }
        assert!(!dir.join(format!("out-{name}")).exists(), "{name}: a refused run left a capture");
    }
}

#[test]
fn report_writes_a_page_and_refuses_other_versions_and_unwritable_paths() {
    let dir = scratch("replay-report-report");
    let config = dir.join("b.ron");
    std::fs::write(
        &config,
        format!("(model: Synthetic(preset: \"tiny-moe\", seed: 7), prompt: {PROMPT}, generate: 2, reference: Cpu, target: Cpu, mode: Local, faults: [(stage: \"moe_expert_out\", layer: 2, expert: 3, kind: Scale(1.05))])"),
    )
    .unwrap();
    let json = dir.join("local.json");
    let out = moetrace(&["bisect", "-q", "--json", "--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    std::fs::write(&json, &out.stdout).unwrap();
    let html = dir.join("map.html");
    let out = moetrace(&["report", json.to_str().unwrap(), "--html", html.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.contains("step 0 layer 2 moe_expert_out") && page.contains("class=\"finding\""));
    // bisect --html writes the same kind of page directly.
    let direct = dir.join("direct.html");
    let out = moetrace(&["bisect", "-q", "--html", direct.to_str().unwrap(), "--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(std::fs::read_to_string(&direct).unwrap().contains("class=\"finding\""));

    let old = dir.join("old.json");
    std::fs::write(
        &old,
        String::from_utf8_lossy(&std::fs::read(&json).unwrap()).replace("moetrace-report/2", "moetrace-report/0"),
    )
    .unwrap();
    let out = moetrace(&["report", old.to_str().unwrap(), "--html", dir.join("x.html").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("moetrace-report/0") && stderr(&out).contains("moetrace-report/2"),
        "{}",
        stderr(&out)
    );
    let unwritable = dir.join("no/such/folder/map.html");
    let out = moetrace(&["report", json.to_str().unwrap(), "--html", unwritable.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("cannot write the HTML report"), "{}", stderr(&out));
    // Checked before the run, not after it.
    let out = moetrace(&["bisect", "-q", "--html", unwritable.to_str().unwrap(), "--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("cannot write the HTML report"));

    // In a real browser: no console errors, a screenshot to look at.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/check-report-html.sh");
    if Command::new("chromium").arg("--version").output().is_err() {
        common::skip("chromium is not installed (apt-get install chromium); the page was not opened in a browser");
        return;
    }
    let shot = dir.join("map.png");
    let out = Command::new("bash").arg(script).arg(&html).arg(&shot).output().unwrap();
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
    assert!(std::fs::metadata(&shot).unwrap().len() > 10_000, "the screenshot is blank");
}
