//! manifest.json of a capture directory (format `moetrace-capture/1`).
//! Readers ignore fields they do not know.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{CompareError, Result};

/// The format tag every capture manifest carries.
pub const FORMAT: &str = "moetrace-capture/1";

/// The model a capture was made with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManifestModel {
    /// `architectures[0]` of the config.
    pub architecture: String,
    /// The config.json content.
    pub config: serde_json::Value,
    /// Where the model came from (a path, or `synthetic:<preset>:<seed>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// One step of the run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestStep {
    /// Step number.
    pub step: usize,
    /// Position of the first token.
    pub start_position: usize,
    /// Tokens fed.
    pub tokens: Vec<u32>,
}

/// One captured tensor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestTensor {
    /// Path relative to the capture folder, `/`-separated.
    pub path: String,
    /// Canonical stage name.
    pub stage: String,
    /// Layer index; null for model stages.
    pub layer: Option<usize>,
    /// Step number.
    pub step: usize,
    /// Shape.
    pub shape: Vec<usize>,
    /// numpy dtype name.
    pub dtype: String,
}

/// manifest.json.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`FORMAT`].
    pub format: String,
    /// Who wrote it, e.g. `moetrace 0.1.0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub producer: Option<String>,
    /// Backend name, e.g. `cpu`.
    pub backend: String,
    /// Activation dtype, e.g. `f32`.
    pub dtype: String,
    /// The model.
    pub model: ManifestModel,
    /// Prompt tokens.
    pub prompt: Vec<u32>,
    /// Tokens produced by greedy decoding.
    #[serde(default)]
    pub generated: Vec<u32>,
    /// Steps that ran.
    pub steps: Vec<ManifestStep>,
    /// Captured tensors.
    pub tensors: Vec<ManifestTensor>,
    /// Faults injected into this run, in the CLI form.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub faults: Vec<String>,
    /// Set when the run was teacher-forced (bisect's local mode): each
    /// tensor is that stage's output on the forcing run's inputs, not a
    /// free run's; says what forced it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teacher_forced: Option<String>,
    /// How the run split the model across virtual ranks (`parallel:`):
    /// `experts` (R), `tensor` (T), `combine` (`SlotOrder` / `RankSum`)
    /// and `replicas` ([expert, rank] pairs); absent for one rank.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallel: Option<serde_json::Value>,
    /// Where the routing came from when it was not the run's own (routing
    /// replay: the source capture and each replayed step and layer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing: Option<serde_json::Value>,
    /// A prompt given as text: the text, the rendered chat template and
    /// the tokenizer that made `prompt`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_text: Option<ManifestPromptText>,
    /// Each position's token as text (the prompt, then the generated
    /// tokens), when the run had a tokenizer: what reports show beside a
    /// token index.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub token_texts: Vec<String>,
}

/// A text prompt as the manifest records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestPromptText {
    /// The text given (`Text`), or the chat messages as JSON (`Chat`).
    pub text: String,
    /// The rendered chat template (`Chat` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rendered: Option<String>,
    /// The tokenizer.json used.
    pub tokenizer: String,
}

impl Manifest {
    /// Reads and checks `<dir>/manifest.json`.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join("manifest.json");
        let text = stage_types::input::read_regular_text(&path, MAX_MANIFEST_BYTES)
            .map_err(CompareError::io("cannot read", &path))?;
        Self::parse(&text, &path)
    }

    /// Parses and checks manifest.json text; `path` is for messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let bad = |message: String| CompareError::BadManifest { path: path.to_path_buf(), message };
        let value: serde_json::Value = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        match value.get("format").and_then(|f| f.as_str()) {
            Some(FORMAT) => {}
            Some(other) => return Err(bad(format!("format is `{other}`, expected `{FORMAT}`"))),
            None => return Err(bad(format!("no `format` field (expected `{FORMAT}`)"))),
        }
        let manifest: Manifest = serde_json::from_value(value).map_err(|e| bad(e.to_string()))?;
        for t in &manifest.tensors {
            check_relative_path(&t.path).map_err(|why| bad(format!("tensor path `{}` {why}", t.path)))?;
        }
        Ok(manifest)
    }

    /// Writes `<dir>/manifest.json`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let path = dir.join("manifest.json");
        let text = serde_json::to_string_pretty(self).expect("manifest serialises");
        std::fs::write(&path, text + "\n").map_err(CompareError::io("cannot write", &path))
    }
}

/// The largest manifest.json read (a 48-layer capture of every stage over
/// a hundred steps is about 25 MB).
pub const MAX_MANIFEST_BYTES: u64 = 512 * stage_types::input::MIB;

/// A manifest's tensor paths stay inside the capture folder: relative,
/// `/`-separated names, no `..`, no root, no drive, no empty part.
pub fn check_relative_path(path: &str) -> Result<(), &'static str> {
    if path.is_empty() {
        return Err("is empty");
    }
    if path.starts_with('/') || path.contains('\\') || path.contains(':') {
        return Err("points outside the capture folder (absolute, or not a `/`-separated relative path)");
    }
    if path.split('/').any(|part| part.is_empty() || part == "." || part == "..") {
        return Err("points outside the capture folder (`..`, `.` or an empty part)");
    }
    Ok(())
}

/// The relative path of a stage tensor: `step-S/<stage>.npy` for model
/// stages, `step-S/layer-N/<stage>.npy` for layer stages.
pub fn tensor_path(step: usize, layer: Option<usize>, stage: &str) -> String {
    match layer {
        Some(l) => format!("step-{step}/layer-{l}/{stage}.npy"),
        None => format!("step-{step}/{stage}.npy"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn tensor_paths_must_stay_inside_the_capture() {
        use super::check_relative_path as check;
        assert!(check("step-0/layer-1/attn_out.npy").is_ok());
        for bad in ["/etc/passwd", "../x.npy", "step-0/../../x.npy", "a//b", "./a", "", "C:/x", "a\\b"] {
            assert!(check(bad).is_err(), "{bad}");
        }
    }
}
