//! The ECS vocabulary of the forward pass: layer components, resources,
//! the system sets observers order against, and [`StageCtx`], the system
//! parameter every stage system runs through.

use bevy_ecs::prelude::*;
use bevy_ecs::schedule::ScheduleLabel;
use bevy_ecs::system::SystemParam;
use stage_types::{LayerTraits, SaveTensorStage, StageList};

use crate::backend::Backend;
use crate::config::ModelConfig;
use crate::error::PipelineError;
use crate::model::{AttentionWeights, MlpWeights};
use crate::tensor::{HostTensor, PendingTensor};
use crate::weights::WeightId;

/// The system set of one stage's system. The schedule chains these in
/// [`SaveTensorStage::ALL`] order; observers order themselves against them.
#[derive(SystemSet, Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StageSet(pub SaveTensorStage);

/// Where systems attach to a stage. For stage S the order is
/// `StageSet(S)`, `Amend(S)`, `Observe(S)`, `Teach(S)`, then the next
/// stage's set: an amending system (fault injection) changes S's output
/// before any consumer and any observer (capture) sees it; observers see
/// what the stage (with its amenders) produced; teacher forcing
/// ([`crate::teacher`]) then records that output and may replace it with
/// another run's before the next stage reads it.
#[derive(SystemSet, Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StageHookSystems {
    /// Runs right after the stage and may rewrite its output.
    Amend(SaveTensorStage),
    /// Runs after the amenders and must only read. Skipped while a scope
    /// is re-run ([`crate::Forward::graft_scope`]).
    Observe(SaveTensorStage),
    /// The pipeline's own teacher-forcing system; nothing else goes here.
    Teach(SaveTensorStage),
}

/// The schedule of a scope's observers ([`crate::Forward::add_scope_observer`]),
/// run after the scope's own schedule: each reads any stage of the scope
/// from its slot, which still holds what the stage and its amenders
/// produced (each stage writes only its own slot). One such system per
/// scope costs one system run, where an observer per stage costs one per
/// stage and layer whether it copies anything or not. Being a schedule of
/// its own, it also runs without the scope: after a replayed step
/// (`crate::backend::StepGraph::Replay`), and as a probe that only says
/// what it would read ([`ObserverProbe`]). Skipped while a scope is re-run,
/// like observers. (With teacher forcing armed a slot holds the forced
/// output by then; forcing and observing happen together only in grafts,
/// which skip observers.)
#[derive(ScheduleLabel, Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ScopeObservers(pub ForwardSchedule);

/// When set, the scope observers only say what they would read: each
/// [`HookCtx::read`] or [`HookCtx::read_async`] appends its stage here
/// and returns None, so nothing is copied or sent. [`crate::Forward`]
/// probes this way before a recorded step, whose reads must be known
/// before it is recorded or replayed.
#[derive(Resource, Debug, Default)]
pub struct ObserverProbe(pub Option<Vec<SaveTensorStage>>);

/// Whether observers run (false while a scope is re-run for a graft, so
/// nothing is captured twice).
#[derive(Resource, Debug, Clone, Copy)]
pub struct ObserversEnabled(pub bool);

/// Run condition: observers are enabled.
pub fn observers_enabled(enabled: Res<ObserversEnabled>) -> bool {
    enabled.0
}

/// The three schedules of a forward step.
#[derive(ScheduleLabel, Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ForwardSchedule {
    /// Model stages before the layers (embedding).
    Prologue,
    /// Layer stages, run once per layer entity in order.
    Layer,
    /// Model stages after the layers (final_norm, lm_head).
    Epilogue,
}

impl ForwardSchedule {
    /// The schedule a stage's system runs in.
    pub fn of(stage: SaveTensorStage) -> Self {
        if stage.is_layer_stage() {
            ForwardSchedule::Layer
        } else if stage < SaveTensorStage::AttnNorm {
            ForwardSchedule::Prologue
        } else {
            ForwardSchedule::Epilogue
        }
    }
}

/// A decoder layer's index (component of each layer entity).
#[derive(Component, Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerIndex(pub usize);

/// The optional parts a layer has, which decide the stages it produces
/// (component of each layer entity; from [`ModelConfig::layer_traits`]).
#[derive(Component, Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerParts(pub LayerTraits);

/// The attention weights of a layer entity.
#[derive(Component, Debug, Clone)]
pub struct LayerAttention(pub AttentionWeights);

/// The feed-forward weights of a layer entity.
#[derive(Component, Debug, Clone)]
pub struct LayerMlp(pub MlpWeights);

/// The backend every stage system calls.
#[derive(Resource)]
pub struct ActiveBackend(pub Box<dyn Backend>);

/// Model-wide parameters and weights (those that belong to no layer).
#[derive(Resource, Debug, Clone)]
pub struct ModelParams {
    /// Hyper-parameters.
    pub config: ModelConfig,
    /// Embedding table.
    pub embedding: WeightId,
    /// Final RMSNorm weight.
    pub final_norm: WeightId,
    /// lm_head (the embedding when tied).
    pub lm_head: WeightId,
}

/// The step being computed.
#[derive(Resource, Debug, Clone, Default)]
pub struct StepState {
    /// Step number: 0 is the prompt, then one per decoded token.
    pub step: usize,
    /// Position of the first token of this step.
    pub start_position: usize,
    /// The tokens fed this step.
    pub tokens: Vec<u32>,
}

/// The layer the layer schedule is running for (None in the prologue and
/// epilogue).
#[derive(Resource, Debug, Clone, Copy, Default)]
pub struct CurrentLayer {
    /// The layer entity.
    pub entity: Option<Entity>,
    /// Its index.
    pub index: Option<usize>,
    /// The optional parts it has (dense or MoE, a QKV bias, q/k norm,
    /// ...): which layer stages run.
    pub traits: LayerTraits,
}

/// Stages produced since the current schedule run began; observers check
/// it so a stage a layer does not have is never captured.
#[derive(Resource, Debug, Clone, Copy, Default)]
pub struct StageLog(pub StageList);

/// The first error of the running schedule; later stage systems skip
/// their work once it is set.
#[derive(Resource, Debug, Default)]
pub struct StepError(pub Option<PipelineError>);

/// What a stage system needs: the backend, the model, the current layer,
/// and the bookkeeping of which stages ran.
#[derive(SystemParam)]
pub struct StageCtx<'w> {
    backend: ResMut<'w, ActiveBackend>,
    /// Model-wide parameters.
    pub model: Res<'w, ModelParams>,
    /// The current layer.
    pub layer: Res<'w, CurrentLayer>,
    log: ResMut<'w, StageLog>,
    error: ResMut<'w, StepError>,
}

impl StageCtx<'_> {
    /// Runs `op` as the computation of `stage` unless an earlier stage
    /// failed; records the stage as produced on success and the error
    /// otherwise.
    pub fn run(
        &mut self,
        stage: SaveTensorStage,
        op: impl FnOnce(&mut dyn Backend, &ModelConfig) -> crate::Result<()>,
    ) {
        if self.error.0.is_some() {
            return;
        }
        match op(self.backend.0.as_mut(), &self.model.config) {
            Ok(()) => self.log.0.insert(stage),
            Err(e) => self.error.0 = Some(e),
        }
    }

    /// Index of the current layer (0 outside the layer schedule).
    pub fn layer_index(&self) -> usize {
        self.layer.index.unwrap_or(0)
    }

    /// The current layer entity.
    pub fn layer_entity(&self) -> Option<Entity> {
        self.layer.entity
    }
}

/// What a hook system (an amender or an observer) reads and writes: the
/// step and layer it runs for, whether its stage was produced, and the
/// stage's output in the backend. Errors are recorded as the step's error
/// (the step then fails with it) instead of panicking.
#[derive(SystemParam)]
pub struct HookCtx<'w> {
    backend: ResMut<'w, ActiveBackend>,
    step: Res<'w, StepState>,
    layer: Res<'w, CurrentLayer>,
    log: Res<'w, StageLog>,
    error: ResMut<'w, StepError>,
    probe: ResMut<'w, ObserverProbe>,
}

impl HookCtx<'_> {
    /// True when `stage` ran in this scope and nothing failed before: the
    /// condition for a hook to act at all.
    pub fn produced(&self, stage: SaveTensorStage) -> bool {
        self.error.0.is_none() && self.log.0.contains(stage)
    }

    /// The step being computed.
    pub fn step(&self) -> &StepState {
        &self.step
    }

    /// The layer being computed (None for model stages).
    pub fn layer(&self) -> Option<usize> {
        self.layer.index
    }

    /// Copies `stage`'s output to the host; on failure records the error
    /// and returns None (also during a probe: see [`ObserverProbe`]).
    pub fn read(&mut self, stage: SaveTensorStage) -> Option<HostTensor> {
        if self.probed(stage) {
            return None;
        }
        let result = self.backend.0.read(stage);
        self.keep(result)
    }

    /// Starts copying `stage`'s output to the host (see
    /// [`Backend::read_async`]); on failure records the error and returns
    /// None (also during a probe: see [`ObserverProbe`]).
    pub fn read_async(&mut self, stage: SaveTensorStage) -> Option<PendingTensor> {
        if self.probed(stage) {
            return None;
        }
        let result = self.backend.0.read_async(stage);
        self.keep(result)
    }

    /// Replaces `stage`'s output (amenders only); on failure records the
    /// error.
    pub fn write(&mut self, stage: SaveTensorStage, tensor: &HostTensor) {
        let result = self.backend.0.write(stage, tensor);
        self.keep(result);
    }

    /// During a probe ([`ObserverProbe`]): notes that `stage` would be
    /// read and returns true.
    fn probed(&mut self, stage: SaveTensorStage) -> bool {
        match self.probe.0.as_mut() {
            Some(reads) => {
                reads.push(stage);
                true
            }
            None => false,
        }
    }

    /// Records `error` as the step's error.
    pub fn fail(&mut self, error: PipelineError) {
        self.error.0.get_or_insert(error);
    }

    fn keep<T>(&mut self, result: crate::Result<T>) -> Option<T> {
        result.map_err(|e| self.fail(e)).ok()
    }
}

/// The run condition of a layer stage's system: the current layer has the
/// parts the stage needs ([`SaveTensorStage::applies_to`]).
pub fn layer_has(stage: SaveTensorStage) -> impl FnMut(Res<CurrentLayer>) -> bool + Clone {
    move |layer: Res<CurrentLayer>| layer.index.is_some() && stage.applies_to(layer.traits)
}
