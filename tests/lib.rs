//! Helpers shared by the end-to-end tests: where the oracle fixtures are
//! (and a clear skip when they are not), scratch folders, and rel_l2.

use std::path::{Path, PathBuf};

/// Says why a test checked nothing and returns, on a user's machine; fails
/// under CI (`MOETRACE_CI` set by .ci/run, which installs every tool and
/// has ../shared), where a skip would hide a test that must run.
pub fn skip(why: &str) {
    if std::env::var_os("MOETRACE_CI").is_some() {
        panic!("{why}: CI must run this test (.ci/run installs what it needs and sets MOETRACE_CI)");
    }
    eprintln!("SKIPPED: {why}; this test checked nothing");
}

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// The oracle fixture folder `name` (e.g. `tiny-qwen3-moe`), from
/// `$MOETRACE_FIXTURES` or `../shared/fixtures` beside the checkout.
/// Prints why and returns None when it is absent, so the calling test can
/// skip (a user's fresh clone has no ../shared).
pub fn fixture(name: &str) -> Option<PathBuf> {
    fixture_with(name, "model/config.json")
}

/// The GGUF fixture folder `name` (holding `model/model.gguf`), else None
/// with a SKIPPED line.
pub fn gguf_fixture(name: &str) -> Option<PathBuf> {
    fixture_with(name, "model/model.gguf")
}

/// The fixture folder `name` if it holds `marker`, else None with a
/// SKIPPED line.
pub fn fixture_with(name: &str, marker: &str) -> Option<PathBuf> {
    let base = std::env::var_os("MOETRACE_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("../shared/fixtures"));
    let dir = base.join(name);
    if dir.join(marker).is_file() {
        Some(dir)
    } else {
        skip(&format!(
            "fixture {} not found (set MOETRACE_FIXTURES or put ../shared/fixtures beside the checkout)",
            dir.display()
        ));
        None
    }
}

/// Qwen3's real tokenizer (`qwen3-tokenizer`: tokenizer.json and
/// tokenizer_config.json) from the fixtures, or None with a SKIPPED line.
pub fn tokenizer_fixture() -> Option<PathBuf> {
    fixture_with("qwen3-tokenizer", "tokenizer.json")
}

/// Writes `(body)` as `<dir>/<name>.ron` and runs it (messages name that
/// file).
pub fn run_config_text(dir: &Path, name: &str, body: &str) -> session::Result<session::RunOutput> {
    let path = dir.join(format!("{name}.ron"));
    std::fs::write(&path, format!("({body})")).expect("config written");
    let config = session::RunConfig::load(&path)?;
    session::run(&config, &path, &mut |_| {})
}

/// A fresh, empty scratch folder under the target directory.
pub fn scratch(name: &str) -> PathBuf {
    let dir = workspace_root().join("target/test-scratch").join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch folder");
    dir
}

/// ||a - b|| / ||a|| in f64, as `moetrace diff` computes it (infinite when
/// a value is non-finite on one side only, so NaN never passes a bound).
pub fn rel_l2(reference: &[f64], target: &[f64]) -> f64 {
    assert_eq!(reference.len(), target.len(), "element counts differ");
    compare::tensor_metrics(compare::Elements::F64(reference), compare::Elements::F64(target), &[reference.len()], 0)
        .rel_l2
}

/// The fixture's `greedy_continuation` (the tokens Hugging Face's greedy
/// decoding appends to the prompt).
pub fn greedy_continuation(fixture_dir: &Path) -> Vec<u32> {
    let text = std::fs::read_to_string(fixture_dir.join("activations/manifest.json")).expect("fixture manifest");
    let json: serde_json::Value = serde_json::from_str(&text).expect("fixture manifest is JSON");
    serde_json::from_value(json["greedy_continuation"].clone()).expect("fixture manifest has greedy_continuation")
}

/// Whether GPU tests run here (MOETRACE_GPU set, on the GPU machine); when
/// not, says plainly that the calling test checked nothing.
pub fn gpu_enabled() -> bool {
    let on = std::env::var_os("MOETRACE_GPU").is_some();
    if !on {
        eprintln!("SKIPPED (GPU test): set MOETRACE_GPU=1 on a machine with an NVIDIA GPU; this test checked nothing");
    }
    on
}

/// A model for the fault tests: a synthetic preset by name (seed 5), else
/// an oracle fixture by name, as a RON model spec and its config; None
/// (with the skip message) when the fixture is absent.
pub fn model_spec(name: &str) -> Option<(String, pipeline::ModelConfig)> {
    if let Ok(preset) = pipeline::weights::SyntheticPreset::by_name(name) {
        let spec = format!("Synthetic(preset: {name:?}, seed: 5)");
        return Some((spec, preset.config(None).expect("every preset's config is valid")));
    }
    let dir = fixture(name)?.join("model");
    let config = pipeline::ModelConfig::from_file(&dir.join("config.json")).expect("fixture config.json");
    Some((format!("Path({dir:?})"), config))
}

/// A GGUF string: u64 length, then the bytes.
pub fn gguf_string(s: &str) -> Vec<u8> {
    let mut out = (s.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(s.as_bytes());
    out
}

/// GGUF bytes of `version`: metadata (key, value type, value bytes), then
/// tensor infos (name, dims, ggml type, offset), then `data_len` bytes of
/// data (0x5a) at the 32-byte alignment.
pub fn gguf_bytes(
    version: u32,
    kvs: &[(String, u32, Vec<u8>)],
    tensors: &[(String, Vec<u64>, u32, u64)],
    data_len: usize,
) -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(kvs.len() as u64).to_le_bytes());
    for (key, kind, value) in kvs {
        out.extend(gguf_string(key));
        out.extend_from_slice(&kind.to_le_bytes());
        out.extend_from_slice(value);
    }
    for (name, dims, kind, offset) in tensors {
        out.extend(gguf_string(name));
        out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
        for d in dims {
            out.extend_from_slice(&d.to_le_bytes());
        }
        out.extend_from_slice(&kind.to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
    }
    while !out.len().is_multiple_of(32) {
        out.push(0);
    }
    out.extend(std::iter::repeat_n(0x5a, data_len));
    out
}

/// Checks `tok` against the ids Hugging Face transformers gave for Qwen3's
/// tokenizer (tests/data/qwen3-tokenizer-ids.json): every text encodes to
/// its ids and decodes back, every chat renders to its template text and
/// ids.
pub fn check_recorded_qwen3_ids(tok: &session::prompt::PromptTokenizer) {
    let text = std::fs::read_to_string(workspace_root().join("tests/data/qwen3-tokenizer-ids.json")).unwrap();
    let data: serde_json::Value = serde_json::from_str(&text).unwrap();
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
    };
    for t in data["texts"].as_array().unwrap() {
        let text = t["text"].as_str().unwrap();
        assert_eq!(tok.encode_text(text).unwrap(), ids(&t["ids"]), "text {text:?}");
        assert_eq!(tok.decode(&ids(&t["ids"])), text, "decoding gives the text back");
    }
    for c in data["chats"].as_array().unwrap() {
        let messages: Vec<session::prompt::ChatMessage> = serde_json::from_value(c["messages"].clone()).unwrap();
        let (rendered, got) = tok.encode_chat(&messages).unwrap();
        assert_eq!(rendered, c["rendered"].as_str().unwrap(), "chat template of {messages:?}");
        assert_eq!(got, ids(&c["ids"]), "chat ids of {messages:?}");
    }
}

/// Where a finding is: (step, layer, stage, worst token, worst expert).
pub type FindingPlace = (usize, Option<usize>, stage_types::SaveTensorStage, Option<usize>, Option<i32>);

/// The place of each finding of `report`, in its order.
pub fn finding_places(report: &compare::Report) -> Vec<FindingPlace> {
    report.findings().iter().map(|r| (r.step, r.layer, r.stage, r.worst_token, r.worst_expert)).collect()
}

/// Rewrites one f32 .npy of a capture with `edit` applied to its values
/// (given the array's shape): a capture edited after the fact.
pub fn edit_npy(capture: &Path, file: &str, edit: impl FnOnce(&[usize], &mut [f32])) {
    let path = capture.join(file);
    let array = compare::npy::read_npy(&path).unwrap();
    let mut values: Vec<f32> = array.values().iter().map(|&v| v as f32).collect();
    edit(&array.shape, &mut values);
    let mut bytes = compare::npy::header("<f4", &array.shape);
    values.iter().for_each(|v| bytes.extend_from_slice(&v.to_le_bytes()));
    std::fs::write(&path, bytes).unwrap();
}

/// The in-repo DeepSeek-V3 oracle fixtures (tests/fixtures), made by
/// python/tools/make_oracle_fixture.py kind `deepseek`: MLA with a
/// compressed query (dense layers), with a plain q_proj, with MoE layers
/// (grouped router, negative biased scores, a shared expert), and the
/// same with FP8 block-scaled projections (partial blocks).
pub const DEEPSEEK_FIXTURES: [&str; 4] = [
    "tiny-deepseek-v3-oracle",
    "tiny-deepseek-v3-plain-q-oracle",
    "tiny-deepseek-v3-moe-oracle",
    "tiny-deepseek-v3-fp8-oracle",
];

/// The oracle fixtures present: (name, folder, the model as a config
/// names it), for the GPU tests. The GGUF fixture's weights are decoded when uploaded.
pub fn oracle_fixtures() -> Vec<(&'static str, std::path::PathBuf, String)> {
    let mut found = Vec::new();
    for name in ["tiny-qwen3-moe", "tiny-qwen3"] {
        if let Some(dir) = fixture(name) {
            let model = format!("Path({:?})", dir.join("model"));
            found.push((name, dir, model));
        }
    }
    if let Some(dir) = gguf_fixture("tiny-qwen3-moe-q4km") {
        let model = format!("Path({:?})", dir.join("model/model.gguf"));
        found.push(("tiny-qwen3-moe-q4km", dir, model));
    }
    // The in-repo fixtures of the other families (always there).
    let dir = workspace_root().join("tests/fixtures/tiny-mixtral-oracle");
    let model = format!("Path({:?})", dir.join("model"));
    found.push(("tiny-mixtral-oracle", dir.clone(), model));
    let model = format!("Path({:?})", dir.join("model.gguf"));
    found.push(("tiny-mixtral-oracle-gguf", dir, model));
    let dir = workspace_root().join("tests/fixtures/tiny-qwen2-moe-oracle");
    let model = format!("Path({:?})", dir.join("model"));
    found.push(("tiny-qwen2-moe-oracle", dir, model));
    let dir = workspace_root().join("tests/fixtures/tiny-qwen2-moe-gguf-oracle");
    let model = format!("Path({:?})", dir.join("model.gguf"));
    found.push(("tiny-qwen2-moe-gguf-oracle", dir, model));
    // FP8 block-scaled projections (decoded on the host before upload).
    let dir = workspace_root().join("tests/fixtures/tiny-moe-fp8-oracle");
    let model = format!("Path({:?})", dir.join("model"));
    found.push(("tiny-moe-fp8-oracle", dir, model));
    // DeepSeek-V3: MLA with q_lora (dense layers), with a plain q_proj,
    // and with the grouped router and shared experts (cuda/mla.rs).
    for name in DEEPSEEK_FIXTURES {
        let dir = workspace_root().join("tests/fixtures").join(name);
        let model = format!("Path({:?})", dir.join("model"));
        found.push((name, dir, model));
    }
    // The MoE one as llama.cpp's converter writes it (`deepseek2`).
    let dir = workspace_root().join("tests/fixtures/tiny-deepseek-v3-moe-oracle");
    let model = format!("Path({:?})", dir.join("model.gguf"));
    found.push(("tiny-deepseek-v3-moe-oracle-gguf", dir, model));
    // gpt-oss: sinks, windows, the clamp, MXFP4 experts kept MXFP4 on the
    // device (cuda/oss.rs), from the hub's layout and from llama.cpp's.
    let dir = workspace_root().join("tests/fixtures/tiny-gpt-oss-oracle");
    let model = format!("Path({:?})", dir.join("model"));
    found.push(("tiny-gpt-oss-oracle", dir.clone(), model));
    let model = format!("Path({:?})", dir.join("model.gguf"));
    found.push(("tiny-gpt-oss-oracle-gguf", dir, model));
    found
}

/// Every .npy file under `dir` (a capture), by its path relative to
/// `dir`, with its bytes.
pub fn npy_files(dir: &Path) -> std::collections::BTreeMap<PathBuf, Vec<u8>> {
    let mut files = std::collections::BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                todo.push(path);
            } else if path.extension().is_some_and(|e| e == "npy") {
                files.insert(path.strip_prefix(dir).unwrap().to_path_buf(), std::fs::read(&path).unwrap());
            }
        }
    }
    files
}
