//! `bisect`: a reference and a target backend run the same model in
//! lockstep in one process, scope by scope (prologue, each layer,
//! epilogue), compared in memory; at the first divergence the graft check
//! re-runs that stage on the target with the reference's inputs, to tell a
//! wrong stage from one that only amplifies upstream drift. Both runs are
//! fed the reference's greedy tokens, so every step stays comparable.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use bevy_ecs::prelude::*;
use pipeline::ecs::ActiveBackend;
use pipeline::stages::layer_input;
use pipeline::{Forward, HostTensor, Model, StageHookSystems, StageLog, StepRecord};
use serde::Deserialize;
use stage_types::SaveTensorStage as S;

use crate::config::{BackendSpec, CaptureSpec, ModelSpec, PromptSpec, parse_ron, read_config, resolve_paths};
use crate::error::{CaptureError, Result};
use crate::faults::{FaultSpec, attach_faults};
use crate::run::{build_backend, load_model};
use crate::session::{CaptureSession, RunRecord};
use compare::{Graft, NpyArray, Report, Row, ScopeTensors, Tolerances, compare_scope};

/// A bisect config: the run config with `reference` and `target` in place
/// of `backend`; `faults` apply to the target.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BisectConfig {
    /// The model.
    pub model: ModelSpec,
    /// The prompt.
    pub prompt: PromptSpec,
    /// Greedy tokens after the prompt (default 0).
    #[serde(default)]
    pub generate: usize,
    /// The reference backend.
    pub reference: BackendSpec,
    /// The target backend.
    pub target: BackendSpec,
    /// CPU threads (default all cores).
    #[serde(default)]
    pub threads: Option<usize>,
    /// Faults injected into the target.
    #[serde(default)]
    pub faults: Vec<FaultSpec>,
    /// Optional capture of both runs, to `<out_dir>/reference` and
    /// `<out_dir>/target` (what ran: up to the first divergence unless
    /// `--all`).
    #[serde(default)]
    pub capture: Option<CaptureSpec>,
}

impl BisectConfig {
    /// Reads and parses a bisect config, resolving paths against its folder.
    pub fn load(path: &Path) -> Result<Self> {
        Self::parse(&read_config(path)?, path)
    }

    /// Parses RON text (file:line:col on errors).
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let mut config: BisectConfig = parse_ron(text, path)?;
        resolve_paths(path, &mut config.model, config.capture.as_mut());
        let PromptSpec::Tokens(tokens) = &config.prompt;
        if tokens.is_empty() {
            return Err(CaptureError::ConfigValue {
                path: path.to_path_buf(),
                message: "prompt: Tokens([]) is empty".into(),
            });
        }
        Ok(config)
    }

    fn tokens(&self) -> &[u32] {
        let PromptSpec::Tokens(t) = &self.prompt;
        t
    }
}

/// Options of a bisect run.
#[derive(Debug, Clone, Default)]
pub struct BisectOptions {
    /// rel_l2 tolerances.
    pub tolerances: Tolerances,
    /// Keep going after the first divergence (every step, every stage).
    pub all: bool,
}

/// Stage outputs an Observe hook collected during the current scope.
#[derive(Resource, Clone, Default)]
struct Collected(Arc<Mutex<BTreeMap<S, HostTensor>>>);

fn collect_every_stage(forward: &mut Forward) -> Arc<Mutex<BTreeMap<S, HostTensor>>> {
    let store: Arc<Mutex<BTreeMap<S, HostTensor>>> = Arc::default();
    forward.world_mut().insert_resource(Collected(store.clone()));
    for &stage in S::ALL {
        forward.add_stage_hook(
            StageHookSystems::Observe(stage),
            move |mut backend: ResMut<ActiveBackend>, log: Res<StageLog>, collected: Res<Collected>| {
                if log.0.contains(stage)
                    && let Ok(t) = backend.0.read(stage)
                {
                    collected.0.lock().unwrap_or_else(|e| e.into_inner()).insert(stage, t);
                }
            },
        );
    }
    store
}

fn to_array(t: &HostTensor) -> NpyArray {
    NpyArray { shape: t.shape.clone(), dtype: t.dtype_name(), values: t.to_f64() }
}

/// One side of the lockstep.
struct Side {
    forward: Forward,
    collected: Arc<Mutex<BTreeMap<S, HostTensor>>>,
    /// Backend name and dtype, for capture manifests.
    name: (&'static str, &'static str),
}

impl Side {
    fn take(&self) -> BTreeMap<S, HostTensor> {
        std::mem::take(&mut *self.collected.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Where the lockstep is: which scope just ran.
#[derive(Clone, Copy)]
enum Scope {
    Prologue,
    Layer(usize),
    Epilogue,
}

/// Runs a bisect config. `on_scope` is told each (step, scope name) as it
/// completes, for progress.
pub fn bisect(
    config: &BisectConfig,
    path: &Path,
    options: &BisectOptions,
    on_scope: &mut dyn FnMut(usize, String),
) -> Result<Report> {
    let model = load_model(&config.model, config.reference.is_cuda() && config.target.is_cuda())?;
    let steps = config.generate.max(1);
    for f in &config.faults {
        f.check(&model.config, config.tokens().len(), steps)
            .map_err(|e| CaptureError::ConfigValue { path: path.to_path_buf(), message: format!("faults: {e}") })?;
    }
    if let Some(&bad) = config.tokens().iter().find(|&&t| t as usize >= model.config.vocab_size) {
        return Err(CaptureError::ConfigValue {
            path: path.to_path_buf(),
            message: format!("prompt: token id {bad} is out of range 0..{}", model.config.vocab_size),
        });
    }
    if let Some(capture) = &config.capture {
        capture.steps.0.check_within(steps, "step").map_err(|e| CaptureError::ConfigValue {
            path: path.to_path_buf(),
            message: format!("capture.steps: {e}"),
        })?;
        capture.layers.0.check_within(model.config.num_layers, "layer").map_err(|e| CaptureError::ConfigValue {
            path: path.to_path_buf(),
            message: format!("capture.layers: {e}"),
        })?;
    }
    // Declared before the forward passes: see CaptureSession.
    let sessions = match &config.capture {
        Some(spec) => Some([
            CaptureSession::start(spec, &spec.out_dir.join("reference"))?,
            CaptureSession::start(spec, &spec.out_dir.join("target"))?,
        ]),
        None => None,
    };
    let make = |spec: &BackendSpec, session: Option<&CaptureSession>| -> Result<Side> {
        let backend = build_backend(spec, config.threads, &model, path)?;
        let name = (backend.name(), backend.dtype());
        let mut forward = Forward::new(&model, backend);
        let collected = collect_every_stage(&mut forward);
        if let Some(session) = session {
            session.attach(&mut forward);
        }
        Ok(Side { forward, collected, name })
    };
    let mut reference = make(&config.reference, sessions.as_ref().map(|s| &s[0]))?;
    let mut target = make(&config.target, sessions.as_ref().map(|s| &s[1]))?;
    attach_faults(&mut target.forward, &config.faults);
    let target_dtype = match config.target {
        BackendSpec::Cpu => "f32".to_string(),
        BackendSpec::Cuda { dtype, .. } => format!("{dtype:?}").to_ascii_lowercase(),
    };
    let mut report = Report {
        reference: format!("{} on {}", config.reference, describe_model(&model)),
        target: format!(
            "{}{}",
            config.target,
            if config.faults.is_empty() {
                String::new()
            } else {
                format!(" with faults {}", config.faults.iter().map(|f| f.to_string()).collect::<Vec<_>>().join(", "))
            }
        ),
        ..Report::default()
    };
    let mut progress = Progress { steps: Vec::new(), generated: Vec::new() };
    lockstep(
        config,
        &model,
        options,
        &mut reference,
        &mut target,
        &target_dtype,
        &mut report,
        &mut progress,
        on_scope,
    )?;
    let names = [reference.name, target.name];
    drop((reference, target));
    if let Some(sessions) = sessions {
        let faults: [&[FaultSpec]; 2] = [&[], &config.faults];
        for ((session, (backend, dtype)), faults) in sessions.into_iter().zip(names).zip(faults) {
            session.commit(&RunRecord {
                model: &model,
                backend,
                dtype,
                prompt: config.tokens(),
                generated: &progress.generated,
                steps: &progress.steps,
                faults,
            })?;
        }
        report.notes.push(format!(
            "captured to {}/reference and {}/target",
            config.capture.as_ref().map(|c| c.out_dir.display().to_string()).unwrap_or_default(),
            config.capture.as_ref().map(|c| c.out_dir.display().to_string()).unwrap_or_default()
        ));
    }
    Ok(report)
}

/// What the lockstep ran, for capture manifests.
struct Progress {
    steps: Vec<StepRecord>,
    generated: Vec<u32>,
}

/// The step loop of [`bisect`]; returns early after the first divergence
/// unless `options.all`.
#[expect(clippy::too_many_arguments, reason = "the loop's state is owned by bisect, which commits captures after it")]
fn lockstep(
    config: &BisectConfig,
    model: &Model,
    options: &BisectOptions,
    reference: &mut Side,
    target: &mut Side,
    target_dtype: &str,
    report: &mut Report,
    progress: &mut Progress,
    on_scope: &mut dyn FnMut(usize, String),
) -> Result<()> {
    let steps = config.generate.max(1);
    let mut tokens = config.tokens().to_vec();
    let mut position = 0;
    for step in 0..steps {
        progress.steps.push(StepRecord { step, start_position: position, tokens: tokens.clone() });
        reference.forward.begin_step(step, &tokens, position)?;
        target.forward.begin_step(step, &tokens, position)?;
        let mut ref_input: Option<HostTensor> = None;
        let scopes = std::iter::once(Scope::Prologue)
            .chain((0..model.config.num_layers).map(Scope::Layer))
            .chain(std::iter::once(Scope::Epilogue));
        for scope in scopes {
            for side in [&mut *reference, &mut *target] {
                match scope {
                    Scope::Prologue => side.forward.run_prologue()?,
                    Scope::Layer(l) => side.forward.run_layer(l)?,
                    Scope::Epilogue => side.forward.run_epilogue()?,
                }
            }
            let (r, t) = (reference.take(), target.take());
            let layer = match scope {
                Scope::Layer(l) => Some(l),
                _ => None,
            };
            let mut tensors = ScopeTensors::new();
            for stage in r.keys().chain(t.keys()) {
                tensors.insert(*stage, (r.get(stage).map(to_array), t.get(stage).map(to_array)));
            }
            let rows = compare_scope(step, layer, &tensors, &options.tolerances, target_dtype);
            on_scope(
                step,
                match scope {
                    Scope::Prologue => "prologue".into(),
                    Scope::Layer(l) => format!("layer {l}"),
                    Scope::Epilogue => "epilogue".into(),
                },
            );
            let first_new = report.first_divergence().is_none();
            report.rows.extend(rows);
            if first_new && let Some(row) = report.first_divergence().cloned() {
                let inputs = GraftInputs {
                    reference_scope: &r,
                    target_scope: &t,
                    reference_input: ref_input.as_ref(),
                    num_layers: model.config.num_layers,
                };
                let g = graft(
                    &mut target.forward,
                    &mut reference.forward,
                    &row,
                    &inputs,
                    &report.rows,
                    options,
                    target_dtype,
                )?;
                report.graft = Some(g);
                if !options.all {
                    return Ok(());
                }
            }
            ref_input = match scope {
                Scope::Prologue => r.get(&S::Embedding).cloned(),
                Scope::Layer(_) => r.get(&S::PostFfnResidual).cloned(),
                Scope::Epilogue => None,
            };
        }
        if config.generate == 0 {
            break;
        }
        let next_ref = reference.forward.next_token()?;
        let next_target = target.forward.next_token()?;
        progress.generated.push(next_ref);
        if next_ref != next_target {
            report.notes.push(format!(
                "step {step}: greedy tokens differ (reference {next_ref}, target {next_target}); both runs continue with the reference's"
            ));
        }
        position += tokens.len();
        tokens = vec![next_ref];
    }
    Ok(())
}

fn describe_model(model: &Model) -> String {
    match &model.source {
        pipeline::ModelSource::Checkpoint(p) => p.display().to_string(),
        pipeline::ModelSource::Synthetic { preset, seed } => format!("synthetic {preset} (seed {seed})"),
    }
}

/// Both sides' state of the scope the divergence is in.
struct GraftInputs<'a> {
    reference_scope: &'a BTreeMap<S, HostTensor>,
    target_scope: &'a BTreeMap<S, HostTensor>,
    /// The reference's input of this scope (embedding or the previous
    /// layer's output); None in the prologue.
    reference_input: Option<&'a HostTensor>,
    num_layers: usize,
}

/// Re-runs the divergent stage on the target with the reference's inputs
/// (its outputs of every earlier stage of the scope, its layer input and
/// its KV cache), compares, then restores the target's state.
fn graft(
    target: &mut Forward,
    reference: &mut Forward,
    row: &Row,
    inputs: &GraftInputs,
    rows: &[Row],
    options: &BisectOptions,
    target_dtype: &str,
) -> Result<Graft> {
    let stage = row.stage;
    let input_slot = layer_input(row.layer.unwrap_or(inputs.num_layers));
    let reference_cache = match row.layer {
        Some(l) if stage >= S::AttnScores => reference.backend_mut().kv_cache(l).ok(),
        _ => None,
    };
    let backend = target.backend_mut();
    // Snapshot what the graft overwrites beyond this scope's own outputs.
    let saved_input = backend.read(input_slot).ok();
    let saved_cache = row.layer.and_then(|l| backend.kv_cache(l).ok());
    if let Some(input) = inputs.reference_input {
        backend.write(input_slot, input)?;
    }
    for (&s, t) in inputs.reference_scope.range(..=stage) {
        backend.write(s, t)?;
    }
    if let (Some(layer), Some((k, v))) = (row.layer, reference_cache) {
        // attn_scores appends this step's keys itself: give it the cache as
        // it was before the step.
        let this_step = inputs.reference_scope.get(&S::KPostRope).map_or(0, |t| t.shape[0]);
        let keep = if stage == S::AttnScores { k.shape[0] - this_step } else { k.shape[0] };
        backend.set_kv_cache(layer, &head_rows(&k, keep), &head_rows(&v, keep))?;
    }
    target.rerun_stage(row.layer, stage)?;
    let backend = target.backend_mut();
    let grafted = backend.read(stage)?;
    // Routing context for MoE stages: the reference's logits and ids on
    // both sides (the target was given them).
    let mut tensors = ScopeTensors::new();
    for s in [S::MoeRouterLogits, S::MoeRouterIndices] {
        if s != stage
            && let Some(t) = inputs.reference_scope.get(&s)
        {
            tensors.insert(s, (Some(to_array(t)), Some(to_array(t))));
        }
    }
    tensors.insert(stage, (inputs.reference_scope.get(&stage).map(to_array), Some(to_array(&grafted))));
    let graft_row = compare_scope(row.step, row.layer, &tensors, &options.tolerances, target_dtype)
        .into_iter()
        .find(|r| r.stage == stage)
        .expect("the grafted stage is compared");
    // Restore the target's own state.
    if let Some(input) = saved_input {
        backend.write(input_slot, &input)?;
    }
    for (&s, t) in inputs.target_scope {
        backend.write(s, t)?;
    }
    if let (Some(layer), Some((k, v))) = (row.layer, saved_cache) {
        backend.set_kv_cache(layer, &k, &v)?;
    }
    let stage_is_wrong = !graft_row.verdict.is_ok();
    Ok(Graft {
        rel_l2: graft_row.rel_l2().unwrap_or(if stage_is_wrong { f64::INFINITY } else { 0.0 }),
        verdict: graft_row.verdict,
        stage_is_wrong,
        largest_jump: if stage_is_wrong { None } else { largest_jump(rows) },
    })
}

fn head_rows(t: &HostTensor, rows: usize) -> HostTensor {
    let width = t.shape[1];
    HostTensor::f32(vec![rows, width], t.as_f32().expect("float32 cache")[..rows * width].to_vec())
}

/// The row whose rel_l2 grew the most over the row before it.
fn largest_jump(rows: &[Row]) -> Option<(String, f64)> {
    let errors: Vec<(usize, f64)> = rows.iter().enumerate().filter_map(|(i, r)| r.rel_l2().map(|e| (i, e))).collect();
    errors
        .windows(2)
        .map(|w| {
            let ratio = if w[0].1 > 0.0 {
                w[1].1 / w[0].1
            } else if w[1].1 > 0.0 {
                f64::INFINITY
            } else {
                1.0
            };
            (rows[w[1].0].place(), ratio)
        })
        .max_by(|a, b| a.1.total_cmp(&b.1))
}
