//! Capture systems: one per selected stage, attached in
//! `StageHookSystems::Observe(stage)` (after the stage and any amender),
//! starting a copy of the stage's output to the host when the current step
//! and layer are selected and handing it, still in flight, to the writer
//! thread (which waits for it). Stages not selected get no system, so with
//! nothing selected no copy is ever made.

use std::sync::atomic::{AtomicUsize, Ordering};

use bevy_ecs::prelude::*;
use crossbeam_channel::Sender;
use pipeline::{Forward, HookCtx};
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
        forward.add_observer(stage, move |ctx: HookCtx, selection: Res<CaptureSelection>, sink: Res<CaptureSink>| {
            capture_stage(stage, ctx, selection, sink)
        });
    }
}

/// What a capture system reads.
fn capture_stage(stage: SaveTensorStage, mut ctx: HookCtx, selection: Res<CaptureSelection>, sink: Res<CaptureSink>) {
    if !ctx.produced(stage) || !selection.steps.contains(ctx.step().step) {
        return;
    }
    let layer = if stage.is_layer_stage() { ctx.layer() } else { None };
    if stage.is_layer_stage() && !layer.is_some_and(|l| selection.layers.contains(l)) {
        return;
    }
    if let Some(tensor) = ctx.read_async(stage) {
        let order = sink.1.fetch_add(1, Ordering::Relaxed);
        let item = CapturedTensor { order, step: ctx.step().step, layer, stage, tensor };
        // The writer drains until every sender is gone, so this only
        // fails if it panicked; its join reports that.
        let _ = sink.0.send(item);
    }
}
