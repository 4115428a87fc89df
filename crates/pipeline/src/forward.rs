//! [`Forward`]: the ECS world of a model (one entity per decoder layer),
//! its schedules, and the step loop: prologue, the layer schedule once per
//! layer entity in order, epilogue; greedy decoding on top.

use bevy_ecs::prelude::*;
use bevy_ecs::schedule::ScheduleConfigs;
use bevy_ecs::system::ScheduleSystem;
use stage_types::SaveTensorStage;

use crate::backend::Backend;
use crate::ecs::{
    ActiveBackend, CurrentLayer, ForwardSchedule, LayerAttention, LayerIndex, LayerKind, LayerMlp, ModelParams,
    StageHookSystems, StageLog, StepError, StepState,
};
use crate::error::{PipelineError, Result};
use crate::model::{MlpWeights, Model};
use crate::schedule::{ForwardSchedules, build_schedules, single_stage_schedule};

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
    world: World,
    schedules: ForwardSchedules,
    layers: Vec<Entity>,
    vocab_size: usize,
    amenders: Vec<(SaveTensorStage, AddToSchedule)>,
}

/// Adds an amending system to a schedule (kept to rebuild re-run schedules).
type AddToSchedule = Box<dyn Fn(&mut Schedule) + Send + Sync>;

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
                let kind = match weights.mlp {
                    MlpWeights::Dense { .. } => LayerKind::Dense,
                    MlpWeights::Moe(_) => LayerKind::Moe,
                };
                world
                    .spawn((
                        LayerIndex(index),
                        kind,
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
        Self { world, schedules: build_schedules(), layers, vocab_size: model.config.vocab_size, amenders: Vec::new() }
    }

    /// Attaches a system from outside the pipeline to `stage`: in
    /// [`StageHookSystems::Amend`] to rewrite its output before anything
    /// reads it, or [`StageHookSystems::Observe`] to read it (capture).
    /// The system goes into the schedule the stage runs in.
    pub fn add_stage_hook<M>(&mut self, hook: StageHookSystems, system: impl IntoScheduleConfigs<ScheduleSystem, M>) {
        let stage = match hook {
            StageHookSystems::Amend(s) | StageHookSystems::Observe(s) => s,
        };
        let configs: ScheduleConfigs<ScheduleSystem> = system.into_configs().in_set(hook);
        self.schedules.get_mut(ForwardSchedule::of(stage)).add_systems(configs);
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

    /// Attaches an amending system (one that rewrites `stage`'s output,
    /// such as fault injection) in [`StageHookSystems::Amend`]. `make` is
    /// called once for the forward schedule and once more if the stage is
    /// ever re-run alone ([`Forward::rerun_stage`]), so a re-run includes
    /// the same amendment.
    pub fn add_amend_hook<M, S>(&mut self, stage: SaveTensorStage, make: impl Fn() -> S + Send + Sync + 'static)
    where
        S: IntoScheduleConfigs<ScheduleSystem, M>,
        M: 'static,
    {
        self.add_stage_hook(StageHookSystems::Amend(stage), make());
        self.amenders.push((
            stage,
            Box::new(move |schedule: &mut Schedule| {
                schedule.add_systems(make().into_configs().in_set(StageHookSystems::Amend(stage)));
            }),
        ));
    }

    /// Runs one step: `tokens` at positions `start_position..`.
    pub fn step(
        &mut self,
        step: usize,
        tokens: &[u32],
        start_position: usize,
        on_event: &mut dyn FnMut(ForwardEvent),
    ) -> Result<()> {
        self.begin_step(step, tokens, start_position)?;
        on_event(ForwardEvent::StepStarted { step, start_position, tokens: tokens.len() });
        self.run_prologue()?;
        for index in 0..self.layers.len() {
            self.run_layer(index)?;
            on_event(ForwardEvent::LayerDone { step, layer: index, layers: self.layers.len() });
        }
        self.run_epilogue()
    }

    /// Starts a step without running anything: checks the tokens, resets
    /// the backend's slots and truncates its KV caches to `start_position`.
    /// Follow with [`Forward::run_prologue`], [`Forward::run_layer`] for
    /// each layer in order, and [`Forward::run_epilogue`] (what
    /// [`Forward::step`] does), e.g. to compare two backends layer by layer.
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

    /// Runs the prologue (embedding) of the current step.
    pub fn run_prologue(&mut self) -> Result<()> {
        self.set_layer(None);
        self.run(ForwardSchedule::Prologue)
    }

    /// Runs the layer schedule for layer `index` of the current step.
    pub fn run_layer(&mut self, index: usize) -> Result<()> {
        if index >= self.layers.len() {
            return Err(PipelineError::BadInput(format!(
                "layer {index} does not exist: the model has {} layers",
                self.layers.len()
            )));
        }
        self.set_layer(Some(index));
        self.run(ForwardSchedule::Layer)
    }

    /// Runs the epilogue (final_norm, lm_head) of the current step.
    pub fn run_epilogue(&mut self) -> Result<()> {
        self.set_layer(None);
        self.run(ForwardSchedule::Epilogue)
    }

    /// Runs `stage` alone, with its amending hooks but no observers, for
    /// `layer` (None for model stages), on whatever the backend's slots
    /// hold now. Used to re-run a stage on inputs put in place from
    /// elsewhere (bisect's graft check).
    pub fn rerun_stage(&mut self, layer: Option<usize>, stage: SaveTensorStage) -> Result<()> {
        if stage.is_layer_stage() != layer.is_some() || layer.is_some_and(|l| l >= self.layers.len()) {
            return Err(PipelineError::BadInput(format!("cannot re-run {stage} for layer {layer:?}")));
        }
        let mut schedule = single_stage_schedule(stage);
        for (s, add) in &self.amenders {
            if *s == stage {
                add(&mut schedule);
            }
        }
        self.set_layer(layer);
        self.world.resource_mut::<StageLog>().0 = Default::default();
        schedule.run(&mut self.world);
        match self.world.resource_mut::<StepError>().0.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
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
        let mut steps = Vec::new();
        let mut generated = Vec::new();
        let mut tokens = prompt.to_vec();
        let mut position = 0;
        for step in 0.. {
            self.step(step, &tokens, position, on_event)?;
            steps.push(StepRecord { step, start_position: position, tokens: tokens.clone() });
            let next = if generate > 0 { Some(self.next_token()?) } else { None };
            on_event(ForwardEvent::StepDone { step, next_token: next });
            let Some(next) = next else { break };
            generated.push(next);
            if generated.len() >= generate {
                break;
            }
            position += tokens.len();
            tokens = vec![next];
        }
        Ok(Generation { generated, steps })
    }

    fn set_layer(&mut self, index: Option<usize>) {
        let current = match index {
            None => CurrentLayer::default(),
            Some(i) => {
                let entity = self.layers[i];
                let e = self.world.entity(entity);
                CurrentLayer {
                    entity: Some(entity),
                    index: Some(i),
                    kind: e.get::<LayerKind>().copied(),
                    qkv_bias: e.get::<LayerAttention>().is_some_and(|a| a.0.qkv_bias.is_some()),
                }
            }
        };
        *self.world.resource_mut::<CurrentLayer>() = current;
    }

    fn run(&mut self, label: ForwardSchedule) -> Result<()> {
        self.world.resource_mut::<StageLog>().0 = Default::default();
        self.schedules.get_mut(label).run(&mut self.world);
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
            forward.add_stage_hook(
                StageHookSystems::Observe(stage),
                move |log: Res<StageLog>, layer: Res<CurrentLayer>| {
                    if log.0.contains(stage) {
                        seen.lock().unwrap().push((layer.index, stage));
                    }
                },
            );
        }
        seen
    }

    #[test]
    fn mixed_models_run_dense_stages_on_dense_layers_and_moe_stages_on_moe_layers() {
        let mut json = SyntheticPreset::by_name("tiny-moe").unwrap().config(Some(3)).json;
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
            let dense = layer == 1;
            let expected: Vec<S> =
                S::ALL.iter().copied().filter(|s| s.is_layer_stage() && s.applies_to(dense, false)).collect();
            assert_eq!(stages, expected, "layer {layer}");
        }
        let model_stages: Vec<S> = seen.iter().filter(|(l, _)| l.is_none()).map(|(_, s)| *s).collect();
        assert_eq!(model_stages, [S::Embedding, S::FinalNorm, S::LmHead]);
    }

    #[test]
    fn qkv_bias_runs_only_for_models_with_a_bias_and_adds_it() {
        let mut json = SyntheticPreset::by_name("tiny-dense").unwrap().config(Some(1)).json;
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
        forward.add_stage_hook(StageHookSystems::Observe(S::QkvBias), move |mut b: ResMut<ActiveBackend>| {
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
