//! Capture systems: one per selected stage, attached in
//! `StageHookSystems::Observe(stage)` (after the stage and any amender),
//! starting a copy of the stage's output to the host when the current step
//! and layer are selected and handing it, still in flight, to the writer
//! thread (which waits for it). Stages not selected get no system, so with
//! nothing selected no copy is ever made.

use std::sync::atomic::{AtomicUsize, Ordering};

use bevy_ecs::prelude::*;
use bevy_ecs::system::SystemParam;
use crossbeam_channel::Sender;
use pipeline::ecs::{ActiveBackend, StepError};
use pipeline::{CurrentLayer, Forward, StageHookSystems, StageLog, StepState};
use stage_types::{IndexSet, SaveTensorStage, StageList};

use crate::writer::CapturedTensor;

/// Which (step, layer, stage) tensors to capture.
#[derive(Resource, Debug, Clone)]
pub struct CaptureSelection {
    /// Stages.
    pub stages: StageList,
    /// Layers (layer stages only).
    pub layers: IndexSet,
    /// Steps.
    pub steps: IndexSet,
}

/// The channel to the writer threads, and how many tensors went into it.
#[derive(Resource)]
pub struct CaptureSink(pub Sender<CapturedTensor>, pub AtomicUsize);

/// Adds one capture system per selected stage to `forward`.
pub fn attach_capture(forward: &mut Forward, selection: CaptureSelection, sink: Sender<CapturedTensor>) {
    let stages: Vec<SaveTensorStage> = selection.stages.iter().collect();
    forward.world_mut().insert_resource(selection);
    forward.world_mut().insert_resource(CaptureSink(sink, AtomicUsize::new(0)));
    for stage in stages {
        forward.add_stage_hook(StageHookSystems::Observe(stage), move |ctx: CaptureCtx| capture_stage(stage, ctx));
    }
}

/// What a capture system reads.
#[derive(SystemParam)]
struct CaptureCtx<'w> {
    backend: ResMut<'w, ActiveBackend>,
    step: Res<'w, StepState>,
    layer: Res<'w, CurrentLayer>,
    log: Res<'w, StageLog>,
    selection: Res<'w, CaptureSelection>,
    sink: Res<'w, CaptureSink>,
    error: ResMut<'w, StepError>,
}

/// Captures `stage` if it was produced and the step and layer are
/// selected.
fn capture_stage(stage: SaveTensorStage, mut ctx: CaptureCtx) {
    if ctx.error.0.is_some() || !ctx.log.0.contains(stage) || !ctx.selection.steps.contains(ctx.step.step) {
        return;
    }
    let layer = if stage.is_layer_stage() { ctx.layer.index } else { None };
    if stage.is_layer_stage() && !layer.is_some_and(|l| ctx.selection.layers.contains(l)) {
        return;
    }
    match ctx.backend.0.read_async(stage) {
        Ok(tensor) => {
            let order = ctx.sink.1.fetch_add(1, Ordering::Relaxed);
            let item = CapturedTensor { order, step: ctx.step.step, layer, stage, tensor };
            // The writer drains until every sender is gone, so this only
            // fails if it panicked; its join reports that.
            let _ = ctx.sink.0.send(item);
        }
        Err(e) => ctx.error.0 = Some(e),
    }
}
