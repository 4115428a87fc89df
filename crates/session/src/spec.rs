//! What `run` and `bisect` configs share, by composition: a
//! [`SessionSpec`] (model, prompt, steps, threads, faults, capture,
//! routing), plus the backend of a run ([`RunConfig`]) or the two backends
//! and the mode of a bisect ([`BisectConfig`]). Both are read by one parser
//! (`ConfigFile`) and checked by one set of checks, before any work and
//! against the loaded model ([`SessionSpec::check_against_model`]).

use std::path::{Path, PathBuf};

use pipeline::ModelConfig;
use serde::Deserialize;

pub use crate::backend_spec::{BackendSpec, CudaDtype};
use crate::config::{CaptureSpec, ModelSpec, PromptSpec, ResolvedPrompt, parse_ron, read_config, whole_number};
use crate::error::{Result, SessionError};
use crate::faults::FaultSpec;
pub use crate::parallel_spec::{CombineOrder, ParallelSpec, ReplicaSpec};
use crate::prompt::TokenizerSpec;
pub use crate::replay::RoutingSpec;

/// What every command runs: the model, the prompt, how many tokens, what
/// to inject, what to capture and whose routing to follow.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionSpec {
    /// The model.
    pub model: ModelSpec,
    /// The prompt.
    pub prompt: PromptSpec,
    /// The tokenizer of a text prompt, when the model's own is not wanted
    /// (the synthetic presets have none).
    pub tokenizer: Option<TokenizerSpec>,
    /// The prompt as token ids (filled when the config is parsed).
    pub resolved: ResolvedPrompt,
    /// Tokens to produce by greedy decoding after the prompt (default 0).
    pub generate: usize,
    /// CPU worker threads (default: all cores). Never changes a result.
    pub threads: Option<usize>,
    /// What to capture; nothing when absent (bisect: both runs, to
    /// `<out_dir>/reference` and `<out_dir>/target`).
    pub capture: Option<CaptureSpec>,
    /// Faults to inject (default none; bisect: into the target).
    pub faults: Vec<FaultSpec>,
    /// The run's own routing (default) or `Replay("capture dir")`: expert
    /// ids and router weights (and the tokens fed) from that capture.
    pub routing: RoutingSpec,
    /// Expert-parallel ranks for every pass (default: one rank).
    pub parallel: Option<ParallelSpec>,
}

/// A run config: what to run, on which backend.
#[derive(Debug, Clone, PartialEq)]
pub struct RunConfig {
    /// What runs.
    pub session: SessionSpec,
    /// The backend (default Cpu).
    pub backend: BackendSpec,
}

/// A bisect config: what to run, on a reference and a target backend;
/// `faults` apply to the target.
#[derive(Debug, Clone, PartialEq)]
pub struct BisectConfig {
    /// What runs.
    pub session: SessionSpec,
    /// The reference backend.
    pub reference: BackendSpec,
    /// The target backend.
    pub target: BackendSpec,
    /// Free running (accumulated errors) or local (teacher-forced).
    pub mode: BisectMode,
}

/// How a bisect's target runs beside the reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum BisectMode {
    /// On its own outputs: errors accumulate; stop at the first divergence.
    #[default]
    Free,
    /// Teacher-forced after every stage: each stage's own error, every
    /// stage of every step, outliers scored.
    Local,
}

/// A config file as written in RON: the session's fields and every
/// command's own; [`RunConfig`] and [`BisectConfig`] take what is theirs
/// and refuse the other's by name.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    model: ModelSpec,
    prompt: PromptSpec,
    #[serde(default)]
    tokenizer: Option<TokenizerSpec>,
    #[serde(default, deserialize_with = "whole_number")]
    generate: usize,
    #[serde(default)]
    threads: Option<usize>,
    #[serde(default)]
    capture: Option<CaptureSpec>,
    #[serde(default)]
    faults: Vec<FaultSpec>,
    #[serde(default)]
    routing: RoutingSpec,
    #[serde(default)]
    parallel: Option<ParallelSpec>,
    /// run's.
    #[serde(default)]
    backend: Option<BackendSpec>,
    /// bisect's.
    #[serde(default)]
    reference: Option<BackendSpec>,
    /// bisect's.
    #[serde(default)]
    target: Option<BackendSpec>,
    /// bisect's.
    #[serde(default)]
    mode: Option<BisectMode>,
}

/// The fields of a config file that belong to one command.
struct CommandFields {
    backend: Option<BackendSpec>,
    reference: Option<BackendSpec>,
    target: Option<BackendSpec>,
    mode: Option<BisectMode>,
}

impl ConfigFile {
    /// Parses RON text (file:line:col on errors) and makes the session:
    /// paths resolved against the config's folder, the prompt made into
    /// ids, the checks that need no model passed.
    fn parse(text: &str, path: &Path) -> Result<(SessionSpec, CommandFields)> {
        let file: ConfigFile = parse_ron(text, path)?;
        let ConfigFile {
            mut model,
            prompt,
            mut tokenizer,
            generate,
            threads,
            mut capture,
            faults,
            mut routing,
            parallel,
            mut backend,
            mut reference,
            mut target,
            mode,
        } = file;
        let backends = [("backend", &mut backend), ("reference", &mut reference), ("target", &mut target)];
        resolve_paths(path, &mut model, capture.as_mut(), &mut routing, backends)?;
        resolve_tokenizer_path(path, tokenizer.as_mut())?;
        let resolved = prompt.resolve(tokenizer.as_ref(), &model, path)?;
        let session =
            SessionSpec { model, prompt, tokenizer, resolved, generate, threads, capture, faults, routing, parallel };
        session.check(path)?;
        Ok((session, CommandFields { backend, reference, target, mode }))
    }

    /// Fails naming the fields of another command the file sets.
    fn refuse(path: &Path, fields: &[(&str, bool)], command: &str, own: &str) -> Result<()> {
        let set: Vec<String> = fields.iter().filter(|f| f.1).map(|f| format!("`{}`", f.0)).collect();
        if set.is_empty() {
            return Ok(());
        }
        let verb = if set.len() > 1 { "are" } else { "is" };
        Err(SessionError::ConfigValue {
            path: path.to_path_buf(),
            message: format!("{} {verb} not a field of a {command} config, which names {own}", set.join(" and ")),
        })
    }
}

impl RunConfig {
    /// Parses RON text; `path` is for messages and for resolving relative
    /// paths against its folder.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let (session, file) = ConfigFile::parse(text, path)?;
        let bisect =
            [("reference", file.reference.is_some()), ("target", file.target.is_some()), ("mode", file.mode.is_some())];
        ConfigFile::refuse(path, &bisect, "run", "one `backend` (`reference`, `target` and `mode` are bisect's)")?;
        if let Some(BackendSpec::Capture(_)) = &file.backend {
            return Err(SessionError::ConfigValue {
                path: path.to_path_buf(),
                message: "backend: Capture(..) computes nothing; a capture is checked as a bisect's `target` (or with `moetrace check CAPTURE --model MODEL`)".into(),
            });
        }
        Ok(Self { session, backend: file.backend.unwrap_or_default() })
    }

    /// Reads and parses a config file.
    pub fn load(path: &Path) -> Result<Self> {
        Self::parse(&read_config(path)?, path)
    }

    /// The token ids of the prompt.
    pub fn prompt_tokens(&self) -> &[u32] {
        self.session.tokens()
    }

    /// Number of steps the run will make: the prompt, then one per
    /// generated token after the first.
    pub fn step_count(&self) -> usize {
        self.session.step_count()
    }
}

impl BisectConfig {
    /// Reads and parses a bisect config, resolving paths against its folder.
    pub fn load(path: &Path) -> Result<Self> {
        Self::parse(&read_config(path)?, path)
    }

    /// Parses RON text (file:line:col on errors).
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let (session, file) = ConfigFile::parse(text, path)?;
        ConfigFile::refuse(path, &[("backend", file.backend.is_some())], "bisect", "`reference` and `target`")?;
        let missing = |field: &str, what: &str| SessionError::ConfigValue {
            path: path.to_path_buf(),
            message: format!("missing field `{field}`: a bisect config names {what}, e.g. `{field}: Cpu`"),
        };
        let reference = file.reference.ok_or_else(|| missing("reference", "the reference backend"))?;
        let target = file.target.ok_or_else(|| missing("target", "the target backend"))?;
        if let BackendSpec::Capture(_) = reference {
            return Err(SessionError::ConfigValue {
                path: path.to_path_buf(),
                message: "reference: Capture(..) is not a reference: the reference re-runs each stage; a capture is the `target`".into(),
            });
        }
        Ok(Self { session, reference, target, mode: file.mode.unwrap_or_default() })
    }
}

impl SessionSpec {
    /// The token ids of the prompt.
    pub fn tokens(&self) -> &[u32] {
        &self.resolved.ids
    }

    /// Number of steps: the prompt, then one per generated token after the
    /// first.
    pub fn step_count(&self) -> usize {
        self.generate.max(1)
    }

    /// Checks that need no model.
    fn check(&self, path: &Path) -> Result<()> {
        let bad = |message: String| SessionError::ConfigValue { path: path.to_path_buf(), message };
        check_threads(path, self.threads)?;
        if let Some(capture) = &self.capture {
            capture.steps.0.check_within(self.step_count(), "step").map_err(|e| {
                bad(format!("capture.steps: {e} (generate: {} makes {} steps)", self.generate, self.step_count()))
            })?;
        }
        Ok(())
    }

    /// Checks against the loaded model: layer range, faults, the run's
    /// size (`host_passes` forward passes on the CPU) and token ids.
    pub fn check_against_model(&self, path: &Path, config: &ModelConfig, host_passes: usize) -> Result<()> {
        let bad = |message: String| SessionError::ConfigValue { path: path.to_path_buf(), message };
        if let Some(capture) = &self.capture {
            capture
                .layers
                .0
                .check_within(config.num_layers, "layer")
                .map_err(|e| bad(format!("capture.layers: {e}")))?;
            check_captured_stages_exist(capture, config).map_err(bad)?;
        }
        for fault in &self.faults {
            fault.check(config, self.tokens().len(), self.step_count()).map_err(|e| bad(format!("faults: {e}")))?;
        }
        check_run_size(path, config, self.tokens().len(), self.generate, host_passes)?;
        check_prompt_vocabulary(path, &self.resolved, config.vocab_size)
    }
}

/// Stages a capture names that no selected layer of this model (and run:
/// `parallel:`) produces: an error when that is every stage it names
/// (nothing would be captured), a warning otherwise; "all" names every
/// stage and is never refused.
fn check_captured_stages_exist(capture: &CaptureSpec, config: &ModelConfig) -> std::result::Result<(), String> {
    use stage_types::{SaveTensorStage as S, Scope, StageList};
    if capture.stages.0 == StageList::all() {
        return Ok(());
    }
    let produced = |s: S| {
        s.scope() == Scope::Model
            || (0..config.num_layers).any(|l| capture.layers.0.contains(l) && s.applies_to(config.layer_traits(l)))
    };
    let selected: Vec<S> = S::ALL.iter().copied().filter(|s| capture.stages.0.contains(*s)).collect();
    let absent: Vec<S> = selected.iter().copied().filter(|s| !produced(*s)).collect();
    if absent.is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = absent.iter().map(|s| s.name()).collect();
    let ranks = absent.iter().any(|s| matches!(s, S::MoeExpertMap | S::MoeDispatch | S::MoeCombine));
    let why = format!(
        "{} {} produced by no selected layer of {}{}",
        names.join(", "),
        if names.len() == 1 { "is" } else { "are" },
        config.architecture,
        if ranks { " (the per-rank stages need `parallel: (experts: R)`)" } else { "" }
    );
    if absent.len() == selected.len() {
        return Err(format!("capture.stages: {why}; nothing would be captured"));
    }
    tracing::warn!("capture.stages: {why}; they will not be captured");
    Ok(())
}

/// Makes a `tokenizer: Path(..)` relative to the config's folder.
fn resolve_tokenizer_path(path: &Path, tokenizer: Option<&mut TokenizerSpec>) -> Result<()> {
    if let Some(TokenizerSpec::Path(p)) = tokenizer {
        if p.as_os_str().is_empty() {
            return Err(SessionError::ConfigValue {
                path: path.to_path_buf(),
                message: "tokenizer: Path(\"\") is empty; give a tokenizer.json or its folder".into(),
            });
        }
        *p = path.parent().unwrap_or(Path::new("")).join(&*p);
    }
    Ok(())
}

/// Resolves the model path, capture folder, replay folder and a capture
/// target's folder against the config file's folder; an empty one is an
/// error (joined, it would name the config's own folder).
fn resolve_paths(
    path: &Path,
    model: &mut ModelSpec,
    capture: Option<&mut CaptureSpec>,
    routing: &mut RoutingSpec,
    backends: [(&str, &mut Option<BackendSpec>); 3],
) -> Result<()> {
    let base = path.parent().unwrap_or(Path::new(""));
    let resolve = |p: &mut PathBuf, what: &str| {
        if p.as_os_str().is_empty() {
            return Err(SessionError::ConfigValue {
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
    for (field, spec) in backends {
        if let Some(BackendSpec::Capture(dir)) = spec {
            resolve(dir, &format!("{field}: Capture(..) folder"))?;
        }
    }
    Ok(())
}

/// `threads` is at least 1 and at most the machine's cores (more threads
/// than cores only slows the CPU backend down; a huge number would try to
/// start that many).
fn check_threads(path: &Path, threads: Option<usize>) -> Result<()> {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let bad = |message: String| SessionError::ConfigValue { path: path.to_path_buf(), message };
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
fn check_run_size(path: &Path, config: &ModelConfig, prompt: usize, generate: usize, host_passes: usize) -> Result<()> {
    let bad = |message: String| SessionError::ConfigValue { path: path.to_path_buf(), message };
    let positions = run_positions(prompt, generate);
    if let Some(max) = config.max_positions
        && positions > max
    {
        return Err(bad(format!(
            "prompt ({prompt} tokens) and generate ({generate}) need {positions} positions, more than the model's max_position_embeddings {max}"
        )));
    }
    if let Some(window) = config.sliding_window
        && positions > window
    {
        return Err(bad(format!(
            "prompt ({prompt} tokens) and generate ({generate}) need {positions} positions, more than the model's sliding_window {window}: moetrace computes full attention, which is the model's only within the window; use a shorter prompt or fewer tokens"
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

/// Every prompt id must be in the model's vocabulary; for a text prompt the
/// message blames the tokenizer (it does not belong to the model).
fn check_prompt_vocabulary(path: &Path, prompt: &ResolvedPrompt, vocab_size: usize) -> Result<()> {
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
    Err(SessionError::ConfigValue { path: path.to_path_buf(), message })
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
        assert_eq!(c.session.model, ModelSpec::Synthetic { preset: "tiny-moe".into(), seed: 7, layers: None });
        let cap = c.session.capture.unwrap();
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
        assert!(matches!(c.session.model, ModelSpec::Synthetic { layers: Some(2), .. }));
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
        assert!(matches!(err, SessionError::ConfigSyntax { line: 7, .. }), "{msg}");
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
        let msg = faulty.session.check_against_model(Path::new("x.ron"), &config, 0).unwrap_err().to_string();
        assert!(msg.contains("faults") && msg.contains("layer 9"), "{msg}");
        let msg = parse(&DEBUG.replace("steps: \"all\"", "steps: \"0..5\"")).unwrap_err().to_string();
        assert!(msg.contains("capture.steps") && msg.contains("0..2"), "{msg}");
        let c = parse(DEBUG).unwrap();
        let preset = pipeline::weights::SyntheticPreset::by_name("tiny-moe").unwrap();
        let msg = c
            .session
            .check_against_model(Path::new("x.ron"), &preset.config(Some(1)).unwrap(), 0)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("capture.layers") && msg.contains("0..1"), "{msg}");
        let mut small_vocab = preset.config(None).unwrap();
        small_vocab.vocab_size = 100;
        let msg = c.session.check_against_model(Path::new("x.ron"), &small_vocab, 0).unwrap_err().to_string();
        assert!(msg.contains("token id 423") && msg.contains("0..100"), "{msg}");
    }

    #[test]
    fn each_command_refuses_the_other_commands_fields_by_name() {
        let msg = parse(&DEBUG.replace("backend: Cpu", "reference: Cpu, target: Cpu")).unwrap_err().to_string();
        assert!(
            msg.contains("`reference` and `target` are not a field of a run config") && msg.contains("`backend`"),
            "{msg}"
        );
        let bisect = |text: &str| BisectConfig::parse(text, Path::new("b.ron"));
        let msg = bisect(DEBUG).unwrap_err().to_string();
        assert!(msg.contains("`backend` is not a field of a bisect config"), "{msg}");
        let msg = bisect(&DEBUG.replace("backend: Cpu", "target: Cpu")).unwrap_err().to_string();
        assert!(msg.contains("missing field `reference`"), "{msg}");
        let c =
            bisect(&DEBUG.replace("backend: Cpu", "reference: Cpu, target: CpuEmulating(Bf16), mode: Local")).unwrap();
        assert_eq!((c.mode, c.session.generate), (BisectMode::Local, 2));
    }
}
