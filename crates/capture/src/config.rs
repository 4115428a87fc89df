//! The RON run config (`moetrace run --config FILE`): model, prompt,
//! decode steps, backend, capture selection. Bad configs fail before any
//! work, with file:line:col and the valid choices.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::{self, Deserializer};
use stage_types::{IndexSet, StageList};

use crate::error::{CaptureError, Result};
use crate::faults::FaultSpec;
pub use crate::replay::RoutingSpec;
use pipeline::ModelConfig;

/// Which model to run.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub enum ModelSpec {
    /// A synthetic model: a preset (`tiny-moe`, `tiny-dense`,
    /// `qwen3-30b-a3b`) with seeded weights, optionally cut to `layers`.
    Synthetic {
        /// Preset name.
        preset: String,
        /// Weight seed.
        seed: u64,
        /// Build only the first N layers (for presets too big for memory).
        #[serde(default)]
        layers: Option<usize>,
    },
    /// A Hugging Face checkpoint folder (relative to the config file).
    Path(PathBuf),
}

/// The prompt.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub enum PromptSpec {
    /// Token ids.
    Tokens(Vec<u32>),
}

/// Activation precision of the CUDA backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum CudaDtype {
    /// f32 everywhere, no TF32.
    F32,
    /// bf16 weights and activations, f32 accumulation.
    Bf16,
}

/// Which backend computes the forward pass.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
pub enum BackendSpec {
    /// The CPU reference.
    #[default]
    Cpu,
    /// A CUDA device.
    Cuda {
        /// Device ordinal.
        device: usize,
        /// Precision.
        dtype: CudaDtype,
    },
}

impl BackendSpec {
    /// Whether this is a CUDA backend.
    pub fn is_cuda(&self) -> bool {
        matches!(self, BackendSpec::Cuda { .. })
    }
}

impl fmt::Display for BackendSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendSpec::Cpu => f.write_str("Cpu"),
            BackendSpec::Cuda { device, dtype } => {
                write!(f, "Cuda(device: {device}, dtype: {dtype:?})")
            }
        }
    }
}

/// A stage list written as a string in the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StagesField(pub StageList);

impl<'de> Deserialize<'de> for StagesField {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map(StagesField).map_err(de::Error::custom)
    }
}

/// A layer range written as a string in the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayersField(pub IndexSet);

impl<'de> Deserialize<'de> for LayersField {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        IndexSet::parse_layers(&text).map(LayersField).map_err(de::Error::custom)
    }
}

/// A step range written as a string in the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepsField(pub IndexSet);

impl<'de> Deserialize<'de> for StepsField {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        IndexSet::parse_steps(&text).map(StepsField).map_err(de::Error::custom)
    }
}

fn all_stages() -> StagesField {
    StagesField(StageList::all())
}

fn all_layers() -> LayersField {
    LayersField(IndexSet::All)
}

fn all_steps() -> StepsField {
    StepsField(IndexSet::All)
}

/// What to capture and where.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptureSpec {
    /// Stages (default all).
    #[serde(default = "all_stages")]
    pub stages: StagesField,
    /// Layers (default all).
    #[serde(default = "all_layers")]
    pub layers: LayersField,
    /// Steps (default all).
    #[serde(default = "all_steps")]
    pub steps: StepsField,
    /// Output folder (relative to the config file).
    pub out_dir: PathBuf,
}

/// A run config as written in RON.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// The model.
    pub model: ModelSpec,
    /// The prompt.
    pub prompt: PromptSpec,
    /// Tokens to produce by greedy decoding after the prompt (default 0).
    #[serde(default)]
    pub generate: usize,
    /// The backend (default Cpu).
    #[serde(default)]
    pub backend: BackendSpec,
    /// CPU worker threads (default: all cores). Never changes a result.
    #[serde(default)]
    pub threads: Option<usize>,
    /// What to capture; nothing when absent.
    #[serde(default)]
    pub capture: Option<CaptureSpec>,
    /// Faults to inject (default none).
    #[serde(default)]
    pub faults: Vec<FaultSpec>,
    /// The run's own routing (default) or `Replay("capture dir")`: expert
    /// ids and router weights (and the tokens fed) from that capture.
    #[serde(default)]
    pub routing: RoutingSpec,
}

/// Parses a RON config (`Some(..)` may be left out), reporting errors at
/// file:line:col.
pub(crate) fn parse_ron<T: serde::de::DeserializeOwned>(text: &str, path: &Path) -> Result<T> {
    let options = ron::Options::default().with_default_extension(ron::extensions::Extensions::IMPLICIT_SOME);
    options.from_str(text).map_err(|e| CaptureError::ConfigSyntax {
        path: path.to_path_buf(),
        line: e.span.start.line,
        col: e.span.start.col,
        message: e.code.to_string(),
    })
}

/// Reads a config file.
pub(crate) fn read_config(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| CaptureError::ReadConfig { path: path.to_path_buf(), source })
}

/// Resolves the model path and capture folder against the config file's
/// folder.
pub(crate) fn resolve_paths(
    path: &Path,
    model: &mut ModelSpec,
    capture: Option<&mut CaptureSpec>,
    routing: &mut RoutingSpec,
) {
    let base = path.parent().unwrap_or(Path::new(""));
    if let RoutingSpec::Replay(p) = routing {
        *p = base.join(&*p);
    }
    if let ModelSpec::Path(p) = model {
        *p = base.join(&*p);
    }
    if let Some(capture) = capture {
        capture.out_dir = base.join(&capture.out_dir);
    }
}

impl RunConfig {
    /// Parses RON text; `path` is for messages and for resolving relative
    /// paths against its folder.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let mut config: RunConfig = parse_ron(text, path)?;
        resolve_paths(path, &mut config.model, config.capture.as_mut(), &mut config.routing);
        config.check(path)?;
        Ok(config)
    }

    /// Reads and parses a config file.
    pub fn load(path: &Path) -> Result<Self> {
        Self::parse(&read_config(path)?, path)
    }

    /// The token ids of the prompt.
    pub fn prompt_tokens(&self) -> &[u32] {
        match &self.prompt {
            PromptSpec::Tokens(t) => t,
        }
    }

    /// Number of steps the run will make: the prompt, then one per
    /// generated token after the first.
    pub fn step_count(&self) -> usize {
        self.generate.max(1)
    }

    /// Checks that need no model.
    fn check(&self, path: &Path) -> Result<()> {
        let bad = |message: String| CaptureError::ConfigValue { path: path.to_path_buf(), message };
        if self.prompt_tokens().is_empty() {
            return Err(bad("prompt: Tokens([]) is empty; give at least one token id".into()));
        }
        if self.threads == Some(0) {
            return Err(bad("threads: must be at least 1 (or omit it to use every core)".into()));
        }
        if let Some(capture) = &self.capture {
            capture.steps.0.check_within(self.step_count(), "step").map_err(|e| {
                bad(format!("capture.steps: {e} (generate: {} makes {} steps)", self.generate, self.step_count()))
            })?;
        }
        Ok(())
    }

    /// Checks against the loaded model: layer range and token ids.
    pub fn check_against_model(&self, path: &Path, config: &ModelConfig) -> Result<()> {
        let (num_layers, vocab_size) = (config.num_layers, config.vocab_size);
        let bad = |message: String| CaptureError::ConfigValue { path: path.to_path_buf(), message };
        if let Some(capture) = &self.capture {
            capture.layers.0.check_within(num_layers, "layer").map_err(|e| bad(format!("capture.layers: {e}")))?;
        }
        for fault in &self.faults {
            fault
                .check(config, self.prompt_tokens().len(), self.step_count())
                .map_err(|e| bad(format!("faults: {e}")))?;
        }
        if let Some((i, &t)) = self.prompt_tokens().iter().enumerate().find(|&(_, &t)| t as usize >= vocab_size) {
            return Err(bad(format!(
                "prompt: token id {t} at index {i} is out of range: the model's vocabulary has {vocab_size} tokens (valid ids 0..{vocab_size})"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEBUG: &str = r#"(
        model: Synthetic(preset: "tiny-moe", seed: 7),
        prompt: Tokens([1, 17, 423]),
        generate: 2,
        backend: Cpu,
        capture: (
            stages: "ffn_norm, moe_router",
            layers: "0..2",
            steps: "all",
            out_dir: "captures/cpu",
        ),
        faults: [],
    )"#;

    fn parse(text: &str) -> Result<RunConfig> {
        RunConfig::parse(text, Path::new("cfg/run.ron"))
    }

    #[test]
    fn parses_the_design_example_and_resolves_paths() {
        let c = parse(DEBUG).unwrap();
        assert_eq!(c.model, ModelSpec::Synthetic { preset: "tiny-moe".into(), seed: 7, layers: None });
        let cap = c.capture.unwrap();
        assert_eq!(cap.out_dir, Path::new("cfg/captures/cpu"));
        assert_eq!(cap.stages.0.len(), 2);
        assert!(cap.layers.0.contains(1) && !cap.layers.0.contains(2));
    }

    #[test]
    fn cuda_backend_and_implicit_some_parse() {
        let text = DEBUG
            .replace("backend: Cpu", "backend: Cuda(device: 0, dtype: Bf16)")
            .replace("seed: 7", "seed: 7, layers: 2");
        let c = parse(&text).unwrap();
        assert_eq!(c.backend, BackendSpec::Cuda { device: 0, dtype: CudaDtype::Bf16 });
        assert!(matches!(c.model, ModelSpec::Synthetic { layers: Some(2), .. }));
    }

    #[test]
    fn syntax_errors_carry_line_and_column() {
        let text = DEBUG.replace("generate: 2,", "generate: 2,,");
        let msg = parse(&text).unwrap_err().to_string();
        assert!(msg.starts_with("cfg/run.ron:4:"), "{msg}");
    }

    #[test]
    fn unknown_stage_is_reported_at_its_position_with_valid_names() {
        let text = DEBUG.replace("moe_router\"", "moe_ruoter\"");
        let err = parse(&text).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, CaptureError::ConfigSyntax { line: 7, .. }), "{msg}");
        assert!(msg.contains("`moe_ruoter`") && msg.contains("moe_router_logits"), "{msg}");
    }

    #[test]
    fn unknown_fields_and_variants_name_the_valid_choices() {
        let msg = parse(&DEBUG.replace("backend: Cpu", "backend: Tpu")).unwrap_err().to_string();
        assert!(msg.contains("Tpu") && msg.contains("Cpu") && msg.contains("Cuda"), "{msg}");
        let msg = parse(&DEBUG.replace("generate:", "generat:")).unwrap_err().to_string();
        assert!(msg.contains("generat") && msg.contains("generate"), "{msg}");
    }

    #[test]
    fn value_checks_name_the_field() {
        let msg = parse(&DEBUG.replace("[1, 17, 423]", "[]")).unwrap_err().to_string();
        assert!(msg.contains("prompt"), "{msg}");
        let faulty =
            parse(&DEBUG.replace("faults: []", "faults: [(stage: \"moe_router\", layer: 9, kind: Nan)]")).unwrap();
        let config = pipeline::weights::SyntheticPreset::by_name("tiny-moe").unwrap().config(None);
        let msg = faulty.check_against_model(Path::new("x.ron"), &config).unwrap_err().to_string();
        assert!(msg.contains("faults") && msg.contains("layer 9"), "{msg}");
        let msg = parse(&DEBUG.replace("steps: \"all\"", "steps: \"0..5\"")).unwrap_err().to_string();
        assert!(msg.contains("capture.steps") && msg.contains("0..2"), "{msg}");
        let c = parse(DEBUG).unwrap();
        let preset = pipeline::weights::SyntheticPreset::by_name("tiny-moe").unwrap();
        let msg = c.check_against_model(Path::new("x.ron"), &preset.config(Some(1))).unwrap_err().to_string();
        assert!(msg.contains("capture.layers") && msg.contains("0..1"), "{msg}");
        let mut small_vocab = preset.config(None);
        small_vocab.vocab_size = 100;
        let msg = c.check_against_model(Path::new("x.ron"), &small_vocab).unwrap_err().to_string();
        assert!(msg.contains("token id 423") && msg.contains("0..100"), "{msg}");
    }
}
