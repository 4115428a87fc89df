//! The RON run config (`moetrace run --config FILE`): model, prompt,
//! decode steps, backend, capture selection. Bad configs fail before any
//! work, with file:line:col and the valid choices.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::{self, Deserializer};
use stage_types::{IndexSet, StageList};

pub use crate::backend_spec::{BackendSpec, CudaDtype};
use crate::error::{CaptureError, Result};
use crate::faults::FaultSpec;
use crate::prompt::{ChatMessage, PromptText, PromptTokenizer, TokenizerSpec, locate_tokenizer};
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
    /// Text, tokenized with the model's tokenizer (`tokenizer(text)`).
    Text(String),
    /// Messages, rendered with the tokenizer's chat template (generation
    /// prompt on) and tokenized.
    Chat(Vec<ChatMessage>),
}

/// A prompt made into token ids (what every run and bisect works from).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ResolvedPrompt {
    /// The ids fed.
    pub ids: Vec<u32>,
    /// For Text and Chat prompts: the text and its tokenizer.
    pub text: Option<PromptText>,
}

impl PromptSpec {
    /// The ids: as given, or through the tokenizer (named, or the
    /// checkpoint's). Empty prompts and prompts that tokenize to nothing are
    /// errors naming the field.
    pub fn resolve(&self, tokenizer: Option<&TokenizerSpec>, model: &ModelSpec, path: &Path) -> Result<ResolvedPrompt> {
        let bad = |message: String| CaptureError::ConfigValue { path: path.to_path_buf(), message };
        let tokenizer = || -> Result<std::sync::Arc<PromptTokenizer>> {
            let named = tokenizer.map(|TokenizerSpec::Path(p)| p.as_path());
            let checkpoint = match model {
                ModelSpec::Path(p) => Some(p.as_path()),
                ModelSpec::Synthetic { .. } => None,
            };
            Ok(std::sync::Arc::new(PromptTokenizer::load(&locate_tokenizer(named, checkpoint, path)?)?))
        };
        let resolved = match self {
            PromptSpec::Tokens(ids) => ResolvedPrompt { ids: ids.clone(), text: None },
            PromptSpec::Text(text) => {
                let tok = tokenizer()?;
                let ids = tok.encode_text(text)?;
                ResolvedPrompt { ids, text: Some(PromptText { tokenizer: tok, text: text.clone(), rendered: None }) }
            }
            PromptSpec::Chat(messages) => {
                if messages.is_empty() {
                    return Err(bad("prompt: Chat([]) has no messages".into()));
                }
                let tok = tokenizer()?;
                let (rendered, ids) = tok.encode_chat(messages)?;
                let json: Vec<serde_json::Value> =
                    messages.iter().map(|m| serde_json::json!({"role": m.role, "content": m.content})).collect();
                let text = serde_json::Value::Array(json).to_string();
                ResolvedPrompt { ids, text: Some(PromptText { tokenizer: tok, text, rendered: Some(rendered) }) }
            }
        };
        if resolved.ids.is_empty() {
            let what = match self {
                PromptSpec::Tokens(_) => "prompt: Tokens([]) is empty; give at least one token id",
                _ => "the prompt tokenizes to no tokens; give some text",
            };
            return Err(bad(what.into()));
        }
        Ok(resolved)
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
    /// The tokenizer of a text prompt, when the model's own is not wanted
    /// (the synthetic presets have none).
    #[serde(default)]
    pub tokenizer: Option<TokenizerSpec>,
    /// The prompt as token ids (filled when the config is parsed).
    #[serde(skip)]
    pub resolved: ResolvedPrompt,
    /// Tokens to produce by greedy decoding after the prompt (default 0).
    #[serde(default, deserialize_with = "whole_number")]
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

/// Deserialises `generate`, a count of tokens; `1.5`, `-1` or `"3"` get
/// a message that says so (RON's own names only the type).
pub(crate) fn whole_number<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    struct Whole;
    impl de::Visitor<'_> for Whole {
        type Value = usize;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("generate: a whole number of tokens (0, 1, 2, ...)")
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<usize, E> {
            usize::try_from(v).map_err(|_| E::custom(format!("generate: {v} is too large")))
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<usize, E> {
            usize::try_from(v)
                .map_err(|_| E::custom(format!("generate: {v} is not a whole number of tokens (0, 1, 2, ...)")))
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<usize, E> {
            Err(E::custom(format!("generate: {v} is not a whole number of tokens (0, 1, 2, ...)")))
        }
    }
    d.deserialize_any(Whole)
}

/// Largest config file read.
const MAX_CONFIG_BYTES: u64 = 16 * stage_types::input::MIB;

/// Parses a RON config (`Some(..)` may be left out), reporting errors at
/// file:line:col.
pub(crate) fn parse_ron<T: serde::de::DeserializeOwned>(text: &str, path: &Path) -> Result<T> {
    let options = ron::Options::default().with_default_extension(ron::extensions::Extensions::IMPLICIT_SOME);
    options.from_str(text).map_err(|e| {
        use ron::error::Error as E;
        let (line, col) = (e.span.start.line, e.span.start.col);
        let what = match &e.code {
            E::ExpectedFloat => "expected a number, e.g. 1.5".to_string(),
            E::ExpectedInteger => "expected a whole number".to_string(),
            E::ExpectedString => "expected a string in double quotes".to_string(),
            other => other.to_string(),
        };
        let message = match near(text, line, col) {
            Some(snippet) => format!("{what} (near `{snippet}`)"),
            None => what,
        };
        CaptureError::ConfigSyntax { path: path.to_path_buf(), line, col, message }
    })
}

/// Up to 24 characters of `text` before (1-based) line:col and 8 after,
/// on that line, trimmed: where a syntax error points.
fn near(text: &str, line: usize, col: usize) -> Option<String> {
    let chars: Vec<char> = text.lines().nth(line.checked_sub(1)?)?.chars().collect();
    let at = col.saturating_sub(1).min(chars.len());
    let snippet: String = chars[at.saturating_sub(24)..(at + 8).min(chars.len())].iter().collect();
    let snippet = snippet.trim();
    (!snippet.is_empty()).then(|| snippet.to_string())
}

/// Reads a config file.
pub(crate) fn read_config(path: &Path) -> Result<String> {
    stage_types::input::read_regular_text(path, MAX_CONFIG_BYTES)
        .map_err(|source| CaptureError::ReadConfig { path: path.to_path_buf(), source })
}

/// Resolves the model path, capture folder and replay folder against the
/// config file's folder; an empty one is an error (joined, it would name
/// the config's own folder).
/// Makes a `tokenizer: Path(..)` relative to the config's folder.
pub(crate) fn resolve_tokenizer_path(path: &Path, tokenizer: Option<&mut TokenizerSpec>) -> Result<()> {
    if let Some(TokenizerSpec::Path(p)) = tokenizer {
        if p.as_os_str().is_empty() {
            return Err(CaptureError::ConfigValue {
                path: path.to_path_buf(),
                message: "tokenizer: Path(\"\") is empty; give a tokenizer.json or its folder".into(),
            });
        }
        *p = path.parent().unwrap_or(Path::new("")).join(&*p);
    }
    Ok(())
}

pub(crate) fn resolve_paths(
    path: &Path,
    model: &mut ModelSpec,
    capture: Option<&mut CaptureSpec>,
    routing: &mut RoutingSpec,
) -> Result<()> {
    let base = path.parent().unwrap_or(Path::new(""));
    let resolve = |p: &mut PathBuf, what: &str| {
        if p.as_os_str().is_empty() {
            return Err(CaptureError::ConfigValue {
                path: path.to_path_buf(),
                message: format!("{what} is empty; give a path (relative paths are taken from the config's folder)"),
            });
        }
        *p = base.join(&*p);
        Ok(())
    };
    if let RoutingSpec::Replay(p) = routing {
        resolve(p, "routing: Replay(..) path")?;
    }
    if let ModelSpec::Path(p) = model {
        resolve(p, "model path")?;
    }
    if let Some(capture) = capture {
        resolve(&mut capture.out_dir, "capture.out_dir")?;
    }
    Ok(())
}

/// `threads` is at least 1 and at most the machine's cores (more threads
/// than cores only slows the CPU backend down; a huge number would try to
/// start that many).
pub(crate) fn check_threads(path: &Path, threads: Option<usize>) -> Result<()> {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let bad = |message: String| CaptureError::ConfigValue { path: path.to_path_buf(), message };
    match threads {
        Some(0) => Err(bad("threads: must be at least 1 (or omit it to use every core)".into())),
        Some(n) if n > cores => Err(bad(format!(
            "threads: {n} is more than this machine's {cores} cores; give at most {cores} (or omit it to use every core)"
        ))),
        _ => Ok(()),
    }
}

/// The positions a run uses: the prompt, then one per decode step.
fn run_positions(prompt: usize, generate: usize) -> usize {
    prompt.saturating_add(generate.saturating_sub(1))
}

/// The KV caches and activations a run needs besides the weights (see
/// [`ModelConfig::forward_bytes`]), for a backend's own check; `scores`:
/// whether the prompt's attention scores are kept in memory.
pub(crate) fn run_bytes(config: &ModelConfig, prompt: usize, generate: usize, scores: bool) -> f64 {
    config.forward_bytes(prompt, run_positions(prompt, generate), scores)
}

/// Checks a run's size against the model before anything is allocated:
/// the positions it uses against max_position_embeddings, and (when
/// `host_passes` forward passes run on the CPU) its KV caches and
/// activations against the memory the OS says is available.
pub(crate) fn check_run_size(
    path: &Path,
    config: &ModelConfig,
    prompt: usize,
    generate: usize,
    host_passes: usize,
) -> Result<()> {
    let bad = |message: String| CaptureError::ConfigValue { path: path.to_path_buf(), message };
    let positions = run_positions(prompt, generate);
    if let Some(max) = config.max_positions
        && positions > max
    {
        return Err(bad(format!(
            "prompt ({prompt} tokens) and generate ({generate}) need {positions} positions, more than the model's max_position_embeddings {max}"
        )));
    }
    if host_passes > 0
        && let Some(available) = pipeline::available_memory_bytes()
    {
        let need = config.forward_bytes(prompt, positions, true) * host_passes as f64;
        if need > available as f64 * 0.8 {
            return Err(bad(format!(
                "prompt ({prompt} tokens) and generate ({generate}) need about {:.1} GB of KV cache and activations on the host for {host_passes} CPU forward pass(es), more than the {:.1} GB available; use a shorter prompt or fewer tokens",
                need / 1e9,
                available as f64 / 1e9
            )));
        }
    }
    Ok(())
}

impl RunConfig {
    /// Parses RON text; `path` is for messages and for resolving relative
    /// paths against its folder.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let mut config: RunConfig = parse_ron(text, path)?;
        resolve_paths(path, &mut config.model, config.capture.as_mut(), &mut config.routing)?;
        resolve_tokenizer_path(path, config.tokenizer.as_mut())?;
        config.resolved = config.prompt.resolve(config.tokenizer.as_ref(), &config.model, path)?;
        config.check(path)?;
        Ok(config)
    }

    /// Reads and parses a config file.
    pub fn load(path: &Path) -> Result<Self> {
        Self::parse(&read_config(path)?, path)
    }

    /// The token ids of the prompt.
    pub fn prompt_tokens(&self) -> &[u32] {
        &self.resolved.ids
    }

    /// Number of steps the run will make: the prompt, then one per
    /// generated token after the first.
    pub fn step_count(&self) -> usize {
        self.generate.max(1)
    }

    /// Checks that need no model.
    fn check(&self, path: &Path) -> Result<()> {
        let bad = |message: String| CaptureError::ConfigValue { path: path.to_path_buf(), message };
        check_threads(path, self.threads)?;
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
        let host_passes = usize::from(!self.backend.is_cuda());
        check_run_size(path, config, self.prompt_tokens().len(), self.generate, host_passes)?;
        check_prompt_vocabulary(path, &self.resolved, vocab_size)
    }
}

/// Every prompt id must be in the model's vocabulary; for a text prompt the
/// message blames the tokenizer (it does not belong to the model).
pub(crate) fn check_prompt_vocabulary(path: &Path, prompt: &ResolvedPrompt, vocab_size: usize) -> Result<()> {
    let Some((i, &t)) = prompt.ids.iter().enumerate().find(|&(_, &t)| t as usize >= vocab_size) else {
        return Ok(());
    };
    let message = match &prompt.text {
        None => format!(
            "prompt: token id {t} at index {i} is out of range: the model's vocabulary has {vocab_size} tokens (valid ids 0..{vocab_size})"
        ),
        Some(text) => format!(
            "the prompt tokenizes (with {}) to id {t} at index {i}, beyond the model's vocabulary of {vocab_size} tokens: that tokenizer does not belong to this model",
            text.tokenizer.path.display()
        ),
    };
    Err(CaptureError::ConfigValue { path: path.to_path_buf(), message })
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
        assert_eq!(c.backend, BackendSpec::Cuda { device: 0, dtype: CudaDtype::Bf16, graphs: true });
        assert_eq!(c.backend.to_string(), "Cuda(device: 0, dtype: Bf16)");
        assert!(matches!(c.model, ModelSpec::Synthetic { layers: Some(2), .. }));
        let eager = parse(&text.replace("dtype: Bf16)", "dtype: Bf16, graphs: false)")).unwrap();
        assert_eq!(eager.backend.to_string(), "Cuda(device: 0, dtype: Bf16, graphs: false)");
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
        let config = pipeline::weights::SyntheticPreset::by_name("tiny-moe").unwrap().config(None).unwrap();
        let msg = faulty.check_against_model(Path::new("x.ron"), &config).unwrap_err().to_string();
        assert!(msg.contains("faults") && msg.contains("layer 9"), "{msg}");
        let msg = parse(&DEBUG.replace("steps: \"all\"", "steps: \"0..5\"")).unwrap_err().to_string();
        assert!(msg.contains("capture.steps") && msg.contains("0..2"), "{msg}");
        let c = parse(DEBUG).unwrap();
        let preset = pipeline::weights::SyntheticPreset::by_name("tiny-moe").unwrap();
        let msg = c.check_against_model(Path::new("x.ron"), &preset.config(Some(1)).unwrap()).unwrap_err().to_string();
        assert!(msg.contains("capture.layers") && msg.contains("0..1"), "{msg}");
        let mut small_vocab = preset.config(None).unwrap();
        small_vocab.vocab_size = 100;
        let msg = c.check_against_model(Path::new("x.ron"), &small_vocab).unwrap_err().to_string();
        assert!(msg.contains("token id 423") && msg.contains("0..100"), "{msg}");
    }
}
