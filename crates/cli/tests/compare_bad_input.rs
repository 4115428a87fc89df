//! diff and bisect on bad input: a clear message naming the problem, exit
//! code 2, never a panic. And their exit codes 0/1 on good input.

use std::path::Path;

mod common;

use common::{capture, expect_error, moetrace, scratch, stderr};

#[test]
fn diff_exit_codes_are_0_without_and_1_with_a_divergence() {
    let dir = scratch("compare-codes");
    let a = capture(&dir, "a", "");
    let b = capture(&dir, "b", "");
    let c = capture(&dir, "c", "faults: [(stage: \"ffn_norm\", layer: 1, kind: Zero)],");
    assert_eq!(moetrace(&["diff", a.to_str().unwrap(), b.to_str().unwrap()]).status.code(), Some(0));
    let out = moetrace(&["diff", "--json", a.to_str().unwrap(), c.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["first_divergence"]["stage"], "ffn_norm");
    assert_eq!(json["first_divergence"]["layer"], 1);
    let out = moetrace(&["diff", a.to_str().unwrap(), b.to_str().unwrap(), "--tolerance", "bogus=1"]);
    expect_error(&out, &["--tolerance", "unknown stage `bogus`"]);
}

#[test]
fn diff_refuses_captures_of_another_computation_but_not_another_spelling() {
    let dir = scratch("compare-configs");
    let a = capture(&dir, "a", "");
    let respelled = capture(&dir, "respelled", "");
    let other = capture(&dir, "other", "");
    let edit = |capture: &Path, f: &dyn Fn(&mut serde_json::Value)| {
        let path = capture.join("manifest.json");
        let mut m: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        f(&mut m["model"]["config"]);
        std::fs::write(&path, m.to_string()).unwrap();
    };
    edit(&respelled, &|c| {
        let experts = c["num_experts"].take();
        c["num_local_experts"] = experts;
        c.as_object_mut().unwrap().remove("num_experts");
        c["torch_dtype"] = "float32".into();
    });
    edit(&other, &|c| c["rms_norm_eps"] = 1e-5.into());
    let (a, respelled, other) = (a.to_str().unwrap(), respelled.to_str().unwrap(), other.to_str().unwrap());
    assert_eq!(moetrace(&["diff", a, respelled]).status.code(), Some(0), "same computation, other spellings");
    expect_error(&moetrace(&["diff", a, other]), &["model configs differ", "--force"]);
    let forced = moetrace(&["diff", "--force", a, other]);
    assert_eq!(forced.status.code(), Some(0), "{}", stderr(&forced));
}

#[test]
fn diff_rejects_bad_captures_with_exit_2() {
    let dir = scratch("compare-bad");
    let good = capture(&dir, "good", "");
    expect_error(&moetrace(&["diff", good.to_str().unwrap(), "/no/such/capture"]), &["/no/such/capture"]);

    let other = capture(&dir, "other-format", "");
    let manifest = other.join("manifest.json");
    let text = std::fs::read_to_string(&manifest).unwrap().replace("moetrace-capture/1", "somebody-else/9");
    std::fs::write(&manifest, text).unwrap();
    expect_error(
        &moetrace(&["diff", good.to_str().unwrap(), other.to_str().unwrap()]),
        &["somebody-else/9", "moetrace-capture/1"],
    );

    let truncated = capture(&dir, "truncated", "");
    let npy = truncated.join("step-0/layer-1/attn_out.npy");
    let bytes = std::fs::read(&npy).unwrap();
    std::fs::write(&npy, &bytes[..bytes.len() - 7]).unwrap();
    expect_error(
        &moetrace(&["diff", good.to_str().unwrap(), truncated.to_str().unwrap()]),
        &["attn_out.npy", "truncated"],
    );

    let corrupt = capture(&dir, "corrupt", "");
    std::fs::write(corrupt.join("step-0/layer-0/qk_norm.npy"), b"not numpy at all").unwrap();
    expect_error(&moetrace(&["diff", good.to_str().unwrap(), corrupt.to_str().unwrap()]), &["qk_norm.npy", "magic"]);

    let reshaped = capture(&dir, "reshaped", "");
    let manifest = reshaped.join("manifest.json");
    let text = std::fs::read_to_string(&manifest).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json["tensors"][0]["shape"] = serde_json::json!([1, 1]);
    std::fs::write(&manifest, json.to_string()).unwrap();
    expect_error(
        &moetrace(&["diff", good.to_str().unwrap(), reshaped.to_str().unwrap()]),
        &["differs from the manifest"],
    );

    let other_prompt = dir.join("prompt.ron");
    std::fs::write(
        &other_prompt,
        format!("(model: Synthetic(preset: \"tiny-moe\", seed: 1, layers: 2), prompt: Tokens([9]), capture: (out_dir: {:?}))", dir.join("p")),
    )
    .unwrap();
    assert!(moetrace(&["run", "-q", "--config", other_prompt.to_str().unwrap()]).status.success());
    let p = dir.join("p");
    expect_error(&moetrace(&["diff", good.to_str().unwrap(), p.to_str().unwrap()]), &["prompts differ", "--force"]);
    assert_eq!(moetrace(&["diff", "--force", good.to_str().unwrap(), p.to_str().unwrap()]).status.code(), Some(1));
}

#[test]
fn diff_reads_aprt_captures_and_rejects_a_bad_magic() {
    let dir = scratch("compare-aprt");
    let good = capture(&dir, "good", "");
    let ours = capture::CaptureDir::open(&good).unwrap();
    let aprt = dir.join("aprt");
    for (step, layer, stage) in ours.keys().into_iter().filter(|k| k.0 == 0) {
        let a = ours.load(step, layer, stage).unwrap().unwrap();
        let folder = match layer {
            Some(l) => aprt.join(format!("layer-{l}")),
            None => aprt.clone(),
        };
        std::fs::create_dir_all(&folder).unwrap();
        let values: Vec<f32> = a.values().iter().map(|&x| x as f32).collect();
        compare::aprt::write_aprt(&folder.join(format!("{stage}.bin")), layer, &values).unwrap();
    }
    let out = moetrace(&["diff", aprt.to_str().unwrap(), good.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(aprt.join("layer-1/attn_out.bin"), b"XXXX\0\0\0\0\0\0\0\0").unwrap();
    expect_error(&moetrace(&["diff", aprt.to_str().unwrap(), good.to_str().unwrap()]), &["attn_out.bin", "APRT"]);
}

#[test]
fn bisect_as_shipped_names_the_injected_fault() {
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/bisect.ron");
    let out = moetrace(&["bisect", "-q", "--json", "--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["first_divergence"]["stage"], "moe_router");
    assert_eq!(json["first_divergence"]["layer"], 2);
    assert_eq!(json["graft"]["stage_is_wrong"], true);
    let out = moetrace(&["bisect", "-q", "--config", config.to_str().unwrap(), "--fault", "attn_out@9=nan"]);
    expect_error(&out, &["layer 9"]);
}

/// A report whose numbers are absurd (a row at layer 2^40, a step of
/// 2^60) is refused with the field named, at once, before the map is
/// sized by them.
#[test]
fn a_report_with_absurd_indices_is_refused_naming_the_field() {
    let dir = scratch("hostile-report-sizes");
    let config = dir.join("b.ron");
    std::fs::write(&config, "(model: Synthetic(preset: \"tiny-moe\", seed: 1, layers: 2), prompt: Tokens([3, 4, 5]), reference: Cpu, target: Cpu, mode: Local)").unwrap();
    let out = moetrace(&["bisect", "-q", "--json", "--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let good: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for (field, value, says) in [
        ("layer", serde_json::json!(1u64 << 40), "rows[3].layer"),
        ("step", serde_json::json!(1u64 << 60), "rows[3].step"),
    ] {
        let mut bad = good.clone();
        bad["rows"][3][field] = value;
        let path = dir.join(format!("{field}.json"));
        std::fs::write(&path, bad.to_string()).unwrap();
        let start = std::time::Instant::now();
        let out = moetrace(&["report", path.to_str().unwrap(), "--html", dir.join("map.html").to_str().unwrap()]);
        expect_error(&out, &[&format!("{field}.json"), says]);
        assert!(start.elapsed().as_secs() < 10, "{field}: {:?}", start.elapsed());
        assert!(!dir.join("map.html").exists(), "{field}: a page was written");
    }
}

#[test]
fn check_names_the_capture_and_model_it_cannot_use_and_passes_a_clean_capture() {
    let dir = scratch("check-cli");
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-qwen2-moe-oracle");
    let (activations, model) = (root.join("activations"), root.join("model"));
    let (activations, model) = (activations.to_str().unwrap(), model.to_str().unwrap());
    // Hugging Face's float64 capture of the fixture: clean, exit 0, JSON.
    let out = moetrace(&["check", activations, "--model", model, "--json", "-q"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["mode"], "local");
    assert_eq!(json["findings"].as_array().map(Vec::len), Some(0));
    // The per-stage summary: a line per stage of the model, none with a finding.
    let out = moetrace(&["check", activations, "--model", model, "--by-stage", "-q"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    let table: Vec<&str> = text.lines().skip_while(|l| !l.starts_with("stage ")).skip(1).collect();
    assert!(table.iter().any(|l| l.starts_with("moe_shared_weight ")), "{text}");
    assert!(table.len() >= 20 && table.iter().all(|l| l.ends_with(" 0")), "{text}");
    // No such capture, no such model, another model: exit 2, named.
    let missing = dir.join("nowhere");
    expect_error(&moetrace(&["check", missing.to_str().unwrap(), "--model", model]), &["nowhere"]);
    expect_error(&moetrace(&["check", activations, "--model", "/no/such/model"]), &["--model", "/no/such/model"]);
    let other = "Synthetic(preset: \"tiny-qwen2-moe\", seed: 5)";
    expect_error(&moetrace(&["check", activations, "--model", other]), &["another model"]);
    expect_error(&moetrace(&["check", activations, "--model", model, "--reference", "Gpu"]), &["Gpu"]);
}
