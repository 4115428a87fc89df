//! [`Forward`]: the ECS world of a model (one entity per decoder layer),
//! its schedules, and the step loop: the scopes of a step ([`StepScope`]:
//! prologue, the layer schedule once per layer entity in order, epilogue)
//! in one place; greedy decoding on top. Hooks attach here: observers
//! ([`Forward::add_observer`]) and amenders ([`Forward::add_amender`]) go
//! into the one schedule every run and re-run of a scope uses.

use std::fmt;

use bevy_ecs::prelude::*;
use bevy_ecs::system::ScheduleSystem;
use stage_types::{SaveTensorStage, StageList};

use crate::backend::Backend;
use crate::ecs::{
    ActiveBackend, CurrentLayer, ForwardSchedule, LayerAttention, LayerIndex, LayerMlp, LayerParts, ModelParams,
    ObserverProbe, ObserversEnabled, StageHookSystems, StageLog, StepError, StepState,
};
use crate::error::{PipelineError, Result};
use crate::model::Model;
use crate::schedule::{ForwardSchedules, build_schedules};
use crate::stages::layer_input;
use crate::teacher::{ScopeOutputs, ScopeTeacher, Teacher, head_rows};
use crate::tensor::HostTensor;

/// A part of a step run by one schedule: the prologue (embedding), one
/// decoder layer, or the epilogue (final_norm, lm_head).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum StepScope {
    /// Model stages before the layers.
    Prologue,
    /// One decoder layer.
    Layer(usize),
    /// Model stages after the layers.
    Epilogue,
}

impl StepScope {
    /// Every scope of a step of a model with `layers` layers, in order.
    pub fn all(layers: usize) -> impl Iterator<Item = StepScope> {
        std::iter::once(StepScope::Prologue)
            .chain((0..layers).map(StepScope::Layer))
            .chain(std::iter::once(StepScope::Epilogue))
    }

    /// The schedule that runs this scope.
    pub fn schedule(self) -> ForwardSchedule {
        match self {
            StepScope::Prologue => ForwardSchedule::Prologue,
            StepScope::Layer(_) => ForwardSchedule::Layer,
            StepScope::Epilogue => ForwardSchedule::Epilogue,
        }
    }

    /// The layer index of a layer scope.
    pub fn layer(self) -> Option<usize> {
        match self {
            StepScope::Layer(l) => Some(l),
            _ => None,
        }
    }
}

impl fmt::Display for StepScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StepScope::Prologue => f.write_str("prologue"),
            StepScope::Layer(l) => write!(f, "layer {l}"),
            StepScope::Epilogue => f.write_str("epilogue"),
        }
    }
}

/// What the step loop reports as it goes, for progress display.
#[derive(Debug, Clone, PartialEq)]
pub enum ForwardEvent {
    /// A step is about to run.
    StepStarted {
        /// Step number.
        step: usize,
        /// Position of its first token.
        start_position: usize,
        /// Tokens fed.
        tokens: usize,
    },
    /// A layer of the current step finished.
    LayerDone {
        /// Step number.
        step: usize,
        /// Layer index.
        layer: usize,
        /// Number of layers.
        layers: usize,
    },
    /// A step finished; `next_token` is the greedy choice when decoding.
    StepDone {
        /// Step number.
        step: usize,
        /// The token greedy decoding chose after this step, if it decoded.
        next_token: Option<u32>,
    },
}

/// One step of a generation, as recorded in capture manifests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepRecord {
    /// Step number.
    pub step: usize,
    /// Position of the first token.
    pub start_position: usize,
    /// Tokens fed.
    pub tokens: Vec<u32>,
}

/// The result of [`Forward::generate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generation {
    /// Tokens produced by greedy decoding.
    pub generated: Vec<u32>,
    /// The steps that ran.
    pub steps: Vec<StepRecord>,
}

/// A model's forward pass as an ECS world and its schedules.
pub struct Forward {
    pub(crate) world: World,
    pub(crate) schedules: ForwardSchedules,
    pub(crate) layers: Vec<Entity>,
    vocab_size: usize,
    /// A stage observer or amender is attached: every step runs eagerly,
    /// so that hooks see each stage as it is computed.
    pub(crate) hooked: bool,
    /// A scope observer is attached (these run after a replayed step too:
    /// see step_graph.rs).
    pub(crate) scope_observed: bool,
    /// What each scope (in [`Forward::scopes`] order) produced the last
    /// time it ran: what its observers see after a replayed step.
    pub(crate) scope_logs: Vec<Option<StageList>>,
    /// Which scopes' observers read anything, by the last probe.
    pub(crate) probed_reads: Vec<bool>,
    /// Host time per step phase (`MOETRACE_PROFILE_STEPS`).
    pub(crate) phases: Option<crate::step_phases::StepPhases>,
}

impl Forward {
    /// Spawns one entity per layer of `model` and builds the schedules;
    /// `backend` becomes the [`ActiveBackend`] resource.
    pub fn new(model: &Model, backend: Box<dyn Backend>) -> Self {
        let mut world = World::new();
        let layers = model
            .layers
            .iter()
            .enumerate()
            .map(|(index, weights)| {
                world
                    .spawn((
                        LayerIndex(index),
                        LayerParts(model.config.layer_traits(index)),
                        LayerAttention(weights.attention.clone()),
                        LayerMlp(weights.mlp.clone()),
                    ))
                    .id()
            })
            .collect();
        world.insert_resource(ActiveBackend(backend));
        world.insert_resource(ModelParams {
            config: model.config.clone(),
            embedding: model.embedding,
            final_norm: model.final_norm,
            lm_head: model.lm_head,
        });
        world.init_resource::<StepState>();
        world.init_resource::<CurrentLayer>();
        world.init_resource::<StageLog>();
        world.init_resource::<StepError>();
        world.init_resource::<Teacher>();
        world.init_resource::<ObserverProbe>();
        world.insert_resource(ObserversEnabled(true));
        let scope_logs = vec![None; model.layers.len() + 2];
        Self {
            world,
            schedules: build_schedules(),
            layers,
            vocab_size: model.config.vocab_size,
            hooked: false,
            scope_observed: false,
            scope_logs,
            probed_reads: Vec::new(),
            phases: crate::step_phases::StepPhases::from_env(),
        }
    }

    /// Attaches an observer of `stage` (capture, collection for a
    /// comparison): it runs after the stage and its amenders, sees what
    /// they produced, and must only read (through
    /// [`crate::ecs::HookCtx::read`] or `read_async`). Observers do not run
    /// while a scope is re-run for a graft.
    pub fn add_observer<M>(&mut self, stage: SaveTensorStage, system: impl IntoScheduleConfigs<ScheduleSystem, M>) {
        self.add_hook(StageHookSystems::Observe(stage), system);
    }

    /// Attaches an amender of `stage` (fault injection): it runs right
    /// after the stage, before any observer and any consumer, and may
    /// rewrite the output ([`crate::ecs::HookCtx::write`]). It is part of
    /// the stage from then on: every run of the scope, re-runs for a graft
    /// included, goes through the same schedule and so through it.
    pub fn add_amender<M>(&mut self, stage: SaveTensorStage, system: impl IntoScheduleConfigs<ScheduleSystem, M>) {
        self.add_hook(StageHookSystems::Amend(stage), system);
    }

    /// Attaches an observer of a whole scope: it runs once per run of
    /// `scope`'s schedule, after every stage of it and their hooks, and
    /// may read any stage the scope produced (see
    /// [`crate::ecs::ScopeObservers`]); it must only read, and read the
    /// same stages whenever the step, layer and stages produced are the
    /// same (a recorded step is planned from what it reads). Unlike stage
    /// observers it lets steps be recorded and replayed. Not run while a
    /// scope is re-run for a graft.
    pub fn add_scope_observer<M>(
        &mut self,
        scope: ForwardSchedule,
        system: impl IntoScheduleConfigs<ScheduleSystem, M>,
    ) {
        self.scope_observed = true;
        self.schedules.observers_mut(scope).add_systems(system);
    }

    fn add_hook<M>(&mut self, hook: StageHookSystems, system: impl IntoScheduleConfigs<ScheduleSystem, M>) {
        let stage = match hook {
            StageHookSystems::Amend(s) | StageHookSystems::Observe(s) | StageHookSystems::Teach(s) => s,
        };
        self.hooked = true;
        self.schedules.get_mut(ForwardSchedule::of(stage)).add_systems(system.into_configs().in_set(hook));
    }

    /// The world, for inserting resources hooks need.
    pub fn world_mut(&mut self) -> &mut World {
        &mut self.world
    }

    /// The backend.
    pub fn backend_mut(&mut self) -> &mut dyn Backend {
        self.world.resource_mut::<ActiveBackend>().into_inner().0.as_mut()
    }

    /// Number of decoder layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// The scopes of a step, in order.
    pub fn scopes(&self) -> impl Iterator<Item = StepScope> + use<> {
        StepScope::all(self.layers.len())
    }

    /// Starts a step without running anything: checks the tokens, resets
    /// the backend's slots and truncates its KV caches to `start_position`.
    /// Follow with [`Forward::run_scope`] for each of [`Forward::scopes`]
    /// in order (what [`Forward::step`] does), e.g. to compare two backends
    /// scope by scope.
    pub fn begin_step(&mut self, step: usize, tokens: &[u32], start_position: usize) -> Result<()> {
        if tokens.is_empty() {
            return Err(PipelineError::BadInput("a step needs at least one token".into()));
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= self.vocab_size) {
            return Err(PipelineError::BadInput(format!(
                "token id {bad} is out of range: the vocabulary has {} tokens (0..{})",
                self.vocab_size, self.vocab_size
            )));
        }
        tracing::debug!(step, start_position, tokens = tokens.len(), "step");
        self.backend_mut().begin_step(tokens, start_position)?;
        *self.world.resource_mut::<StepState>() = StepState { step, start_position, tokens: tokens.to_vec() };
        Ok(())
    }

    /// Runs one scope of the current step.
    pub fn run_scope(&mut self, scope: StepScope) -> Result<()> {
        if let StepScope::Layer(index) = scope
            && index >= self.layers.len()
        {
            return Err(PipelineError::BadInput(format!(
                "layer {index} does not exist: the model has {} layers",
                self.layers.len()
            )));
        }
        let label = scope.schedule();
        self.set_layer(scope.layer());
        self.run(label)?;
        let index = self.scope_index(scope);
        self.scope_logs[index] = Some(self.world.resource::<StageLog>().0);
        if self.world.resource::<ObserversEnabled>().0 {
            self.observe(label)?;
        }
        Ok(())
    }

    /// The position of `scope` in [`Forward::scopes`].
    pub(crate) fn scope_index(&self, scope: StepScope) -> usize {
        match scope {
            StepScope::Prologue => 0,
            StepScope::Layer(l) => l + 1,
            StepScope::Epilogue => self.layers.len() + 1,
        }
    }

    /// Arms teacher forcing for the next [`Forward::run_scope`]: with
    /// `record`, every produced stage's own output (after its amenders) is
    /// kept for [`Forward::take_recorded`]; each stage in `forced` then has
    /// its output replaced by that tensor before the next stage reads it
    /// (observers still see the stage's own output).
    pub fn set_teacher(&mut self, record: bool, forced: ScopeOutputs) {
        let mut teacher = self.world.resource_mut::<Teacher>();
        teacher.record = record;
        teacher.forced = forced;
        teacher.recorded.clear();
    }

    /// The outputs recorded since [`Forward::set_teacher`]; disarms it.
    pub fn take_recorded(&mut self) -> ScopeOutputs {
        let mut teacher = self.world.resource_mut::<Teacher>();
        teacher.record = false;
        teacher.forced.clear();
        std::mem::take(&mut teacher.recorded)
    }

    /// Re-runs `scope` of the current step, after it ran, from another
    /// run's state (`teacher`: the layer input, the KV cache before this
    /// step, and every stage's output forced in turn), with amenders but
    /// without observers; returns what each stage computed itself, then
    /// restores this run's own state (the scope's outputs, the layer input
    /// slot, the KV cache). The local error of stage S is the difference
    /// between the returned S and the teacher's S.
    pub fn graft_scope(&mut self, scope: StepScope, teacher: ScopeTeacher) -> Result<ScopeOutputs> {
        let start = self.world.resource::<StepState>().start_position;
        let layer = scope.layer();
        let input_slot = layer.map(layer_input);
        let backend = self.backend_mut();
        let saved_input = input_slot.and_then(|s| backend.read(s).ok());
        let saved_outputs: Vec<(SaveTensorStage, HostTensor)> =
            teacher.outputs.keys().filter_map(|&s| backend.read(s).ok().map(|t| (s, t))).collect();
        let saved_cache = layer.and_then(|l| backend.kv_cache(l).ok());
        let ScopeTeacher { input, kv_cache, outputs } = teacher;
        let mut prepare = || -> Result<()> {
            let backend = self.backend_mut();
            if let (Some(slot), Some(input)) = (input_slot, &input) {
                backend.write(slot, input)?;
            }
            // The attention stages append this step's keys and values:
            // start from the cache as it was before the step.
            if let Some(l) = layer
                && let Some((k, v)) = kv_cache.as_ref().or(saved_cache.as_ref())
            {
                backend.set_kv_cache(l, &head_rows(k, start)?, &head_rows(v, start)?)?;
            }
            Ok(())
        };
        let prepared = prepare();
        self.world.resource_mut::<ObserversEnabled>().0 = false;
        self.set_teacher(true, outputs);
        let ran = prepared.and_then(|()| self.run_scope(scope));
        self.world.resource_mut::<ObserversEnabled>().0 = true;
        let recorded = self.take_recorded();
        let backend = self.backend_mut();
        if let (Some(slot), Some(t)) = (input_slot, &saved_input) {
            backend.write(slot, t)?;
        }
        for (s, t) in &saved_outputs {
            backend.write(*s, t)?;
        }
        if let (Some(l), Some((k, v))) = (layer, &saved_cache) {
            backend.set_kv_cache(l, k, v)?;
        }
        ran.map(|()| recorded)
    }

    /// Whether the current layer (or model scope) produced `stage` in its
    /// last run.
    pub fn produced(&self, stage: SaveTensorStage) -> bool {
        self.world.resource::<StageLog>().0.contains(stage)
    }

    /// Greedy choice after the last step: argmax of the last lm_head row.
    pub fn next_token(&mut self) -> Result<u32> {
        self.backend_mut().argmax_last_row(SaveTensorStage::LmHead)
    }

    /// Runs the prompt, then `generate - 1` decode steps feeding the greedy
    /// choice back, producing `generate` tokens. With `generate == 0` only
    /// the prompt step runs.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        generate: usize,
        on_event: &mut dyn FnMut(ForwardEvent),
    ) -> Result<Generation> {
        self.generate_feeding(prompt, generate, &mut |_, greedy| greedy, on_event)
    }

    /// As [`Forward::generate`], but each decode step is fed
    /// `feed(step, greedy choice of the step before)` instead of the greedy
    /// choice (e.g. the tokens of another run, for routing replay);
    /// `generated` still holds the greedy choices.
    pub fn generate_feeding(
        &mut self,
        prompt: &[u32],
        generate: usize,
        feed: &mut dyn FnMut(usize, u32) -> u32,
        on_event: &mut dyn FnMut(ForwardEvent),
    ) -> Result<Generation> {
        let mut steps = Vec::new();
        let mut generated = Vec::new();
        let mut tokens = prompt.to_vec();
        let mut position = 0;
        for step in 0.. {
            self.step(step, &tokens, position, on_event)?;
            steps.push(StepRecord { step, start_position: position, tokens: tokens.clone() });
            let t = std::time::Instant::now();
            let next = if generate > 0 { Some(self.next_token()?) } else { None };
            self.time(crate::step_phases::Phase::Token, t);
            on_event(ForwardEvent::StepDone { step, next_token: next });
            let Some(next) = next else { break };
            generated.push(next);
            if generated.len() >= generate {
                break;
            }
            position += tokens.len();
            tokens = vec![feed(step + 1, next)];
        }
        Ok(Generation { generated, steps })
    }

    pub(crate) fn set_layer(&mut self, index: Option<usize>) {
        let current = match index {
            None => CurrentLayer::default(),
            Some(i) => {
                let entity = self.layers[i];
                let e = self.world.entity(entity);
                CurrentLayer {
                    entity: Some(entity),
                    index: Some(i),
                    traits: e.get::<LayerParts>().map(|p| p.0).unwrap_or_default(),
                }
            }
        };
        *self.world.resource_mut::<CurrentLayer>() = current;
    }

    fn run(&mut self, label: ForwardSchedule) -> Result<()> {
        self.world.resource_mut::<StageLog>().0 = Default::default();
        self.schedules.get_mut(label).run(&mut self.world);
        self.take_step_error()
    }

    /// Runs the scope observers of `label` (none attached: nothing).
    pub(crate) fn observe(&mut self, label: ForwardSchedule) -> Result<()> {
        if !self.scope_observed {
            return Ok(());
        }
        self.schedules.observers_mut(label).run(&mut self.world);
        self.take_step_error()
    }

    pub(crate) fn take_step_error(&mut self) -> Result<()> {
        match self.world.resource_mut::<StepError>().0.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::config::ModelConfig;
    use crate::ecs::ActiveBackend;
    use crate::model::ModelSource;
    use crate::weights::{SyntheticPreset, generate_weights};
    use stage_types::SaveTensorStage as S;

    fn forward(model: &Model) -> Forward {
        Forward::new(model, Box::new(CpuBackend::new(model.store.clone(), Some(1)).unwrap()))
    }

    /// Records which stages each layer produced, through an Observe hook
    /// on every stage (as capture attaches).
    fn record_stages(forward: &mut Forward) -> SeenStages {
        let seen: SeenStages = Arc::default();
        for &stage in S::ALL {
            let seen = seen.clone();
            forward.add_observer(stage, move |log: Res<StageLog>, layer: Res<CurrentLayer>| {
                if log.0.contains(stage) {
                    seen.lock().unwrap().push((layer.index, stage));
                }
            });
        }
        seen
    }

    #[test]
    fn mixed_models_run_dense_stages_on_dense_layers_and_moe_stages_on_moe_layers() {
        let mut json = SyntheticPreset::by_name("tiny-moe").unwrap().config(Some(3)).unwrap().json;
        json["mlp_only_layers"] = serde_json::json!([1]);
        json["intermediate_size"] = serde_json::json!(96);
        let config = ModelConfig::from_json(json, std::path::Path::new("mixed")).unwrap();
        let store = generate_weights(&config, 3, "mixed").unwrap();
        let model = Model::assemble(config, store, ModelSource::Synthetic { preset: "mixed".into(), seed: 3 }).unwrap();
        let mut forward = forward(&model);
        let seen = record_stages(&mut forward);
        forward.step(0, &[1, 2, 3], 0, &mut |_| {}).unwrap();
        let seen = seen.lock().unwrap().clone();
        for layer in 0..3 {
            let stages: Vec<S> = seen.iter().filter(|(l, _)| *l == Some(layer)).map(|(_, s)| *s).collect();
            let traits =
                stage_types::LayerTraits { dense: layer == 1, qkv_bias: false, qk_norm: true, ..Default::default() };
            let expected: Vec<S> =
                S::ALL.iter().copied().filter(|s| s.is_layer_stage() && s.applies_to(traits)).collect();
            assert_eq!(stages, expected, "layer {layer}");
        }
        let model_stages: Vec<S> = seen.iter().filter(|(l, _)| l.is_none()).map(|(_, s)| *s).collect();
        assert_eq!(model_stages, [S::Embedding, S::FinalNorm, S::LmHead]);
    }

    #[test]
    fn qkv_bias_runs_only_for_models_with_a_bias_and_adds_it() {
        let mut json = SyntheticPreset::by_name("tiny-dense").unwrap().config(Some(1)).unwrap().json;
        json["attention_bias"] = serde_json::json!(true);
        let config = ModelConfig::from_json(json, std::path::Path::new("bias")).unwrap();
        let store = generate_weights(&config, 4, "bias").unwrap();
        let model = Model::assemble(config, store, ModelSource::Synthetic { preset: "bias".into(), seed: 4 }).unwrap();
        let bias: Vec<f32> = model.layers[0]
            .attention
            .qkv_bias
            .unwrap()
            .iter()
            .flat_map(|&id| model.store.get(id).to_f32_vec())
            .collect();
        let mut forward = forward(&model);
        let got: Arc<Mutex<Option<HostTensorPair>>> = Arc::default();
        let sink = got.clone();
        forward.add_observer(S::QkvBias, move |mut b: ResMut<ActiveBackend>| {
            let before = b.0.read(S::QkvMatmul).unwrap();
            let after = b.0.read(S::QkvBias).unwrap();
            *sink.lock().unwrap() = Some((before, after));
        });
        forward.step(0, &[5, 6], 0, &mut |_| {}).unwrap();
        let (before, after) = got.lock().unwrap().take().expect("qkv_bias ran");
        let width = bias.len();
        for (i, (a, b)) in before.as_f32().unwrap().iter().zip(after.as_f32().unwrap()).enumerate() {
            assert!(((b - a) - bias[i % width]).abs() < 1e-6);
        }
        let plain = Model::synthetic("tiny-dense", 4, Some(1)).unwrap();
        let mut forward = super::Forward::new(&plain, Box::new(CpuBackend::new(plain.store.clone(), Some(1)).unwrap()));
        let seen = record_stages(&mut forward);
        forward.step(0, &[5, 6], 0, &mut |_| {}).unwrap();
        assert!(!seen.lock().unwrap().iter().any(|(_, s)| *s == S::QkvBias));
    }

    /// (layer, stage) pairs in the order observers saw them produced.
    type SeenStages = Arc<Mutex<Vec<(Option<usize>, S)>>>;

    type HostTensorPair = (crate::tensor::HostTensor, crate::tensor::HostTensor);

    #[test]
    fn bad_token_and_bad_cache_position_are_errors_not_panics() {
        let model = Model::synthetic("tiny-moe", 1, Some(1)).unwrap();
        let mut forward = forward(&model);
        let err = forward.step(0, &[1, 9999], 0, &mut |_| {}).unwrap_err().to_string();
        assert!(err.contains("9999") && err.contains("0..512"), "{err}");
        let err = forward.step(0, &[1], 5, &mut |_| {}).unwrap_err().to_string();
        assert!(err.contains("position 5"), "{err}");
        assert!(forward.step(0, &[], 0, &mut |_| {}).is_err());
        forward.step(0, &[1, 2, 3], 0, &mut |_| {}).unwrap();
        forward.step(1, &[4], 3, &mut |_| {}).unwrap();
        // Re-running from an earlier position truncates the cache.
        forward.step(1, &[4], 1, &mut |_| {}).unwrap();
    }
}
