//! gpt-oss checkpoints that cannot be right are refused before any work,
//! with exit code 2 and the reason: MXFP4 scales that do not match their
//! blocks, a `layer_types` list of the wrong length, a window of 0.

use std::path::{Path, PathBuf};
use std::process::Command;

mod common;

use common::scratch;

/// The in-repo gpt-oss fixture's model, copied into `dir` for editing.
fn fixture_copy(dir: &Path) -> PathBuf {
    let from = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-gpt-oss-oracle/model");
    let to = dir.join("model");
    std::fs::create_dir_all(&to).unwrap();
    for name in ["config.json", "model.safetensors"] {
        std::fs::copy(from.join(name), to.join(name)).unwrap();
    }
    to
}

/// `moetrace run` on `model`: exit 2 and every `expected` string on stderr.
fn refused(dir: &Path, model: &Path, expected: &[&str]) {
    let config = dir.join("run.ron");
    let text = format!("(model: Path({:?}), prompt: Tokens([1, 17, 42]), generate: 1, backend: Cpu)", model.display());
    std::fs::write(&config, text).unwrap();
    let out =
        Command::new(env!("CARGO_BIN_EXE_moetrace")).args(["run", "-q", "--config"]).arg(&config).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "exit code; stderr:\n{stderr}");
    assert!(!stderr.contains("panicked"), "panic:\n{stderr}");
    for e in expected {
        assert!(stderr.contains(e), "stderr lacks `{e}`:\n{stderr}");
    }
}

fn edit_config(model: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = model.join("config.json");
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut json);
    std::fs::write(&path, json.to_string()).unwrap();
}

#[test]
fn a_layer_types_list_of_the_wrong_length_or_a_window_of_0_is_refused() {
    let dir = scratch("bad-gpt-oss-config");
    let model = fixture_copy(&dir);
    edit_config(&model, |j| j["layer_types"] = serde_json::json!(["sliding_attention", "full_attention"]));
    refused(&dir, &model, &["config.json", "`layer_types` has 2 entries for num_hidden_layers 3"]);
    let model = fixture_copy(&dir);
    edit_config(&model, |j| j["sliding_window"] = serde_json::json!(0));
    refused(&dir, &model, &["`sliding_window` is 0"]);
    let model = fixture_copy(&dir);
    edit_config(&model, |j| j["layer_types"][1] = serde_json::json!("chunked_attention"));
    refused(&dir, &model, &["`layer_types[1]` is \"chunked_attention\"", "full_attention"]);
}

#[test]
fn mxfp4_scales_that_do_not_match_their_blocks_are_refused() {
    let dir = scratch("bad-gpt-oss-mxfp4");
    let model = fixture_copy(&dir);
    // Rewrite the safetensors with layer 1's down_proj scales one block short.
    let path = model.join("model.safetensors");
    let store = pipeline::weights::load_checkpoint(&model).unwrap();
    let mut edited = pipeline::weights::WeightStore::default();
    for t in store.tensors() {
        let name = "model.layers.1.mlp.experts.down_proj_scales";
        if t.name == name {
            let mut shape = t.shape.clone();
            let last = shape.len() - 1;
            shape[last] -= 1;
            let keep = shape.iter().product::<usize>();
            let bytes: Vec<u8> =
                t.bytes().chunks(t.shape[last]).flat_map(|row| row[..row.len() - 1].to_vec()).collect();
            assert_eq!(bytes.len(), keep);
            edited.insert(pipeline::weights::WeightTensor::owned(t.name.clone(), t.dtype, shape, bytes));
        } else {
            edited.insert(pipeline::weights::WeightTensor::owned(
                t.name.clone(),
                t.dtype,
                t.shape.clone(),
                t.bytes().into_owned(),
            ));
        }
    }
    drop(store);
    pipeline::weights::save_safetensors(&edited, &path).unwrap();
    refused(&dir, &model, &["model.layers.1.mlp.experts.down_proj_scales", "does not match its blocks", "e8m0"]);
}
