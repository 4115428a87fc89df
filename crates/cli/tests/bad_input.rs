//! Bad input gets a clear message on stderr and exit code 2, never a
//! panic, and leaves no capture folder (nor a temporary one) behind.

use std::path::{Path, PathBuf};
use std::process::Command;

mod common;

use common::{leftovers, scratch};

/// `moetrace run --config <path>`, quiet, output captured.
fn run_config(path: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_moetrace")).args(["run", "-q", "--config"]).arg(path).output().unwrap()
}

/// Writes `config` (with `OUT` replaced by the capture folder) into `dir`,
/// runs `moetrace run`, and checks exit code 2, a message containing every
/// `expected` string, no panic, and an empty capture folder area.
fn expect_failure(dir: &Path, config: &str, expected: &[&str]) {
    let out_dir = dir.join("captures");
    let path = dir.join("run.ron");
    std::fs::write(&path, config.replace("OUT", &out_dir.display().to_string())).unwrap();
    let output = run_config(&path);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "exit code; stderr:\n{stderr}");
    assert!(!stderr.contains("panicked"), "panic:\n{stderr}");
    for e in expected {
        assert!(stderr.contains(e), "stderr lacks `{e}`:\n{stderr}");
    }
    assert!(!out_dir.exists(), "capture folder left behind");
    let left = leftovers(dir);
    assert!(left.is_empty(), "temporary folders left behind: {left:?}");
}

const GOOD: &str = r#"(
    model: MODEL,
    prompt: Tokens([1, 17, 423, 45]),
    generate: 2,
    backend: Cpu,
    capture: (stages: "STAGES", layers: "LAYERS", out_dir: "OUT"),
)"#;

fn config(model: &str, stages: &str, layers: &str) -> String {
    GOOD.replace("MODEL", model).replace("STAGES", stages).replace("LAYERS", layers)
}

const SYNTHETIC: &str = r#"Synthetic(preset: "tiny-moe", seed: 7)"#;

/// A small checkpoint folder made from a synthetic model.
fn checkpoint(dir: &Path) -> PathBuf {
    let model = pipeline::Model::synthetic("tiny-dense", 1, Some(1)).unwrap();
    let path = dir.join("model");
    model.save(&path).unwrap();
    path
}

fn path_model(dir: &Path) -> String {
    format!("Path({:?})", dir.display().to_string())
}

#[test]
fn the_good_config_runs() {
    let dir = scratch("bad-input-good");
    let path = dir.join("run.ron");
    let out = dir.join("captures");
    std::fs::write(&path, config(SYNTHETIC, "all", "all").replace("OUT", &out.display().to_string())).unwrap();
    let status = run_config(&path).status;
    assert!(status.success());
    assert!(out.join("manifest.json").is_file());
    // A second run replaces the first capture in place.
    let status = run_config(&path).status;
    assert!(status.success());
}

#[test]
fn ron_syntax_error_names_file_line_and_column() {
    let dir = scratch("bad-input-syntax");
    let text = config(SYNTHETIC, "all", "all").replace("generate: 2,", "generate: 2,,");
    expect_failure(&dir, &text, &["run.ron:4:"]);
}

#[test]
fn unknown_stage_lists_the_valid_names() {
    let dir = scratch("bad-input-stage");
    expect_failure(
        &dir,
        &config(SYNTHETIC, "moe_routr", "all"),
        &["`moe_routr`", "moe_router_indices", "lm_head", "run.ron:6:"],
    );
}

#[test]
fn layer_range_outside_the_model_is_named() {
    let dir = scratch("bad-input-layers");
    expect_failure(&dir, &config(SYNTHETIC, "all", "2..9"), &["capture.layers", "`2..9`", "0..4"]);
}

#[test]
fn missing_model_folder_is_named() {
    let dir = scratch("bad-input-missing");
    let model = path_model(&dir.join("no-such-model"));
    expect_failure(&dir, &config(&model, "all", "all"), &["no-such-model", "does not exist"]);
}

#[test]
fn config_json_missing_a_required_key_is_named() {
    let dir = scratch("bad-input-key");
    let model = checkpoint(&dir);
    let text = std::fs::read_to_string(model.join("config.json")).unwrap();
    let mut json: Vec<&str> = text.lines().filter(|l| !l.contains("\"num_attention_heads\"")).collect();
    json.retain(|l| !l.is_empty());
    std::fs::write(model.join("config.json"), json.join("\n")).unwrap();
    expect_failure(
        &dir,
        &config(&path_model(&model), "all", "all"),
        &["config.json", "missing required key `num_attention_heads`"],
    );
}

#[test]
fn truncated_safetensors_is_reported() {
    let dir = scratch("bad-input-truncated");
    let model = checkpoint(&dir);
    let file = model.join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() - 100]).unwrap();
    expect_failure(&dir, &config(&path_model(&model), "all", "all"), &["model.safetensors", "truncated"]);
}

#[test]
fn tensor_of_the_wrong_shape_is_named_with_both_shapes() {
    let dir = scratch("bad-input-shape");
    let model = checkpoint(&dir);
    let text = std::fs::read_to_string(model.join("config.json")).unwrap();
    std::fs::write(model.join("config.json"), text.replace("\"intermediate_size\": 512", "\"intermediate_size\": 500"))
        .unwrap();
    expect_failure(
        &dir,
        &config(&path_model(&model), "all", "all"),
        &["model.layers.0.mlp.gate_proj.weight", "[512, 256]", "[500, 256]"],
    );
}

#[test]
fn token_id_outside_the_vocabulary_is_named() {
    let dir = scratch("bad-input-token");
    let text = config(SYNTHETIC, "all", "all").replace("[1, 17, 423, 45]", "[1, 17, 9999]");
    expect_failure(&dir, &text, &["token id 9999", "0..512"]);
}

#[test]
fn unwritable_out_dir_is_reported_before_any_work() {
    let dir = scratch("bad-input-unwritable");
    let blocker = dir.join("not-a-folder");
    std::fs::write(&blocker, "a file where a folder should be").unwrap();
    let text = config(SYNTHETIC, "all", "all")
        .replace("\"OUT\"", &format!("{:?}", blocker.join("captures").display().to_string()));
    expect_failure(&dir, &text, &["not-a-folder", "cannot create"]);
    assert!(blocker.is_file());
}

#[test]
fn out_dir_holding_other_files_is_not_replaced() {
    let dir = scratch("bad-input-occupied");
    let out = dir.join("precious");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("notes.txt"), "keep me").unwrap();
    let text = config(SYNTHETIC, "all", "all").replace("\"OUT\"", &format!("{:?}", out.display().to_string()));
    let path = dir.join("run.ron");
    std::fs::write(&path, text).unwrap();
    let output = run_config(&path);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("not a moetrace capture"));
    assert_eq!(std::fs::read_to_string(out.join("notes.txt")).unwrap(), "keep me");
}

#[test]
fn missing_config_file_and_bad_arguments_exit_2() {
    let output =
        Command::new(env!("CARGO_BIN_EXE_moetrace")).args(["run", "--config", "/no/such/file.ron"]).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("/no/such/file.ron"));
    let output = Command::new(env!("CARGO_BIN_EXE_moetrace")).args(["run", "--bogus"]).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
}

#[test]
fn stages_lists_every_stage() {
    let output = Command::new(env!("CARGO_BIN_EXE_moetrace")).args(["stages", "--names"]).output().unwrap();
    assert!(output.status.success());
    let names: Vec<String> = String::from_utf8_lossy(&output.stdout).lines().map(str::to_string).collect();
    let expected: Vec<String> = stage_types::SaveTensorStage::ALL.iter().map(|s| s.name().to_string()).collect();
    assert_eq!(names, expected);
}

/// Regression: with stderr closed (`moetrace run ... 2>&1 | head -1`), a
/// failed progress write once panicked inside the forward pass, and the
/// unwinding joined the capture writer while the forward pass still held
/// its channel: a hang. Output must be best effort and never block.
#[test]
fn a_closed_stderr_neither_panics_nor_hangs() {
    use std::process::Stdio;
    let dir = scratch("bad-input-closed-stderr");
    let path = dir.join("run.ron");
    let out = dir.join("captures");
    std::fs::write(&path, config(SYNTHETIC, "all", "all").replace("OUT", &out.display().to_string())).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_moetrace"))
        .env("MOETRACE_LOG", "debug")
        .args(["run", "--config"])
        .arg(&path)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    drop(child.stderr.take());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("moetrace run hung with stderr closed");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    assert!(out.join("manifest.json").is_file());
}

#[test]
fn a_cuda_backend_without_a_driver_is_a_clear_error() {
    // F64: the CPU reference with its products on the device, which needs
    // the driver too.
    for dtype in ["F32", "F64"] {
        let dir = scratch(&format!("bad-input-no-driver-{dtype}"));
        let backend = format!("backend: Cuda(device: 0, dtype: {dtype})");
        let text = config(SYNTHETIC, "all", "all").replace("backend: Cpu", &backend);
        let path = dir.join("probe.ron");
        std::fs::write(&path, text.replace("OUT", &dir.join("probe-captures").display().to_string())).unwrap();
        let probe = run_config(&path);
        if probe.status.success() {
            eprintln!(
                "SKIPPED: this machine has a working NVIDIA driver, so the missing-driver error cannot occur here"
            );
            return;
        }
        expect_failure(&dir, &text, &["no NVIDIA driver found", "libcuda", "backend: Cpu", &backend[9..]]);
    }
}

#[test]
fn a_failed_run_removes_the_folders_it_made_for_out_dir() {
    let dir = scratch("bad-input-nested-out-dir");
    let path = dir.join("run.ron");
    let out = dir.join("made").join("by").join("run").join("captures");
    let text =
        config(r#"Path("/nonexistent/moetrace-model")"#, "all", "all").replace("OUT", &out.display().to_string());
    std::fs::write(&path, text).unwrap();
    let output = run_config(&path);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("/nonexistent/moetrace-model"), "{stderr}");
    assert!(!dir.join("made").exists(), "the folders made for out_dir were left behind");
}

/// A checkpoint of a family moetrace does not run is refused by its name
/// (architectures / model_type), with the families it runs, not by a
/// symptom (a missing key or tensor); an FP8 checkpoint's weight type is
/// named as unsupported, not as a malformed file.
#[test]
fn other_families_and_weight_types_are_refused_by_name() {
    let dir = scratch("bad-input-family");
    let model = checkpoint(&dir);
    let original: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap()).unwrap();
    for (architecture, model_type) in
        [("Qwen3NextForCausalLM", "qwen3_next"), ("Llama4ForCausalLM", "llama4"), ("Glm4MoeForCausalLM", "glm4_moe")]
    {
        let mut json = original.clone();
        json["architectures"] = serde_json::json!([architecture]);
        json["model_type"] = serde_json::json!(model_type);
        std::fs::write(model.join("config.json"), json.to_string()).unwrap();
        expect_failure(
            &dir,
            &config(&path_model(&model), "all", "all"),
            &[
                "config.json",
                architecture,
                "not a model family moetrace runs",
                "Qwen3MoeForCausalLM (qwen3_moe)",
                "MixtralForCausalLM (mixtral)",
                "Qwen2MoeForCausalLM (qwen2_moe)",
            ],
        );
    }
    // DeepSeek-V3: a config without MLA's keys names the key; groups that
    // do not divide the experts, or more groups kept than there are, are
    // refused with the reason before any weight is read.
    let mut deepseek = original.clone();
    deepseek["architectures"] = serde_json::json!(["DeepseekV3ForCausalLM"]);
    deepseek["model_type"] = serde_json::json!("deepseek_v3");
    deepseek["n_routed_experts"] = serde_json::json!(8);
    std::fs::write(model.join("config.json"), deepseek.to_string()).unwrap();
    expect_failure(&dir, &config(&path_model(&model), "all", "all"), &["config.json", "kv_lora_rank"]);
    for (key, value) in [
        ("kv_lora_rank", 16),
        ("qk_nope_head_dim", 8),
        ("qk_rope_head_dim", 4),
        ("v_head_dim", 6),
        ("moe_intermediate_size", 32),
        ("num_experts_per_tok", 2),
    ] {
        deepseek[key] = serde_json::json!(value);
    }
    for (n_group, topk_group, why) in [
        (3, 1, "n_group 3 does not divide the 8 routed experts"),
        (4, 5, "topk_group 5 must be between 1 and n_group 4"),
    ] {
        deepseek["n_group"] = serde_json::json!(n_group);
        deepseek["topk_group"] = serde_json::json!(topk_group);
        std::fs::write(model.join("config.json"), deepseek.to_string()).unwrap();
        expect_failure(&dir, &config(&path_model(&model), "all", "all"), &["config.json", why]);
    }
    std::fs::write(model.join("config.json"), original.to_string()).unwrap();
    // FP8 tensors: the first tensor's header dtype made an FP8 type (one
    // byte an element), the data cut to fit, so the file is valid.
    let file = model.join("model.safetensors");
    let original_file = std::fs::read(&file).unwrap();
    let with_first_tensor_as = |dtype: &str| {
        let bytes = &original_file;
        let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + len]).unwrap();
        let data = &bytes[8 + len..];
        let mut names: Vec<String> =
            header.as_object().unwrap().keys().filter(|k| *k != "__metadata__").cloned().collect();
        names.sort_by_key(|n| header[n]["data_offsets"][0].as_u64().unwrap());
        let (mut out, mut offset) = (Vec::new(), 0u64);
        for (i, name) in names.iter().enumerate() {
            let [start, end] = [0, 1].map(|j| header[name]["data_offsets"][j].as_u64().unwrap() as usize);
            let chunk: Vec<u8> = if i == 0 {
                header[name]["dtype"] = serde_json::json!(dtype);
                let n: u64 = header[name]["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap()).product();
                data[start..start + n as usize].to_vec()
            } else {
                data[start..end].to_vec()
            };
            header[name]["data_offsets"] = serde_json::json!([offset, offset + chunk.len() as u64]);
            offset += chunk.len() as u64;
            out.extend(chunk);
        }
        let text = header.to_string();
        let mut file_bytes = (text.len() as u64).to_le_bytes().to_vec();
        file_bytes.extend(text.as_bytes());
        file_bytes.extend(out);
        std::fs::write(&file, file_bytes).unwrap();
    };
    // e5m2: an FP8 format moetrace does not read.
    with_first_tensor_as("F8_E5M2");
    expect_failure(
        &dir,
        &config(&path_model(&model), "all", "all"),
        &[
            "model.safetensors",
            "F8_E5M2 (an FP8 checkpoint of another format)",
            "does not read",
            "F8_E4M3 with block scales",
        ],
    );
    // e4m3 is read as block-scaled FP8, which config.json must declare.
    with_first_tensor_as("F8_E4M3");
    expect_failure(
        &dir,
        &config(&path_model(&model), "all", "all"),
        &["config.json", "F8_E4M3", "quantization_config"],
    );
    with_first_tensor_as("F8_E5M2");
    let stderr = String::from_utf8_lossy(&run_config(&dir.join("run.ron")).stderr).into_owned();
    assert!(!stderr.contains("malformed"), "{stderr}");
}

/// A `deepseek2` GGUF (llama.cpp's converter's, of the DeepSeek-V3 MoE
/// fixture) whose routing is not V3's: `expert_gating_func` 1 (softmax,
/// DeepSeek-V2's) or absent (which llama.cpp reads as softmax) is refused
/// by name, with what it would take.
#[test]
fn a_deepseek2_gguf_without_sigmoid_routing_is_refused_by_name() {
    let dir = scratch("bad-input-deepseek2");
    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-deepseek-v3-moe-oracle/model.gguf");
    let original = std::fs::read(fixture).unwrap();
    let key = b"deepseek2.expert_gating_func";
    let at = original.windows(key.len()).position(|w| w == key).expect("the key is in the file");
    // After the key: its value type (u32: 4) and the value (2: sigmoid).
    assert_eq!(original[at + key.len()..at + key.len() + 8], [4, 0, 0, 0, 2, 0, 0, 0]);
    let file = dir.join("model.gguf");
    let mut softmax = original.clone();
    softmax[at + key.len() + 4] = 1;
    std::fs::write(&file, &softmax).unwrap();
    expect_failure(
        &dir,
        &config(&path_model(&file), "all", "all"),
        &["expert_gating_func` is 1 (softmax)", "DeepSeek-V2"],
    );
    let mut missing = original;
    missing[at + key.len() - 4..at + key.len()].copy_from_slice(b"fumc");
    std::fs::write(&file, &missing).unwrap();
    expect_failure(
        &dir,
        &config(&path_model(&file), "all", "all"),
        &["missing metadata key `deepseek2.expert_gating_func`"],
    );
}
