//! Capture systems: one per scope schedule (prologue, layer, epilogue) that
//! has a selected stage, attached at the scope's end
//! ([`pipeline::ecs::ScopeObservers`]: every stage of the scope and its
//! hooks have run, and each stage's slot still holds what it and its
//! amenders produced; after a replayed decode step they run for each scope
//! in turn and read what the recorded step copied). When the current step
//! and layer are selected it starts a copy of each selected stage's output
//! to the host, in stage order, and hands it, still in flight, to the
//! writer threads (which wait for it).
//! With nothing selected there is no system and no copy. (A system per
//! stage ran once per stage and layer, selected or not: for every stage of
//! one layer of a 48-layer model that was 1104 system runs a decode step,
//! which cost more than the copies.)

use std::sync::atomic::{AtomicUsize, Ordering};

use bevy_ecs::prelude::*;
use pipeline::ecs::ForwardSchedule;
use pipeline::{Forward, HookCtx};
use stage_types::{IndexSet, SaveTensorStage, StageList};

use crate::writer::{CaptureSender, CapturedTensor};

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
pub struct CaptureSink(pub CaptureSender, pub AtomicUsize);

/// Adds one capture system per selected stage to `forward`.
pub fn attach_capture(forward: &mut Forward, selection: CaptureSelection, sink: CaptureSender) {
    let stages: Vec<SaveTensorStage> = selection.stages.iter().collect();
    forward.world_mut().insert_resource(selection);
    forward.world_mut().insert_resource(CaptureSink(sink, AtomicUsize::new(0)));
    for scope in [ForwardSchedule::Prologue, ForwardSchedule::Layer, ForwardSchedule::Epilogue] {
        let mine: Vec<SaveTensorStage> = stages.iter().copied().filter(|&s| ForwardSchedule::of(s) == scope).collect();
        if mine.is_empty() {
            continue;
        }
        forward.add_scope_observer(
            scope,
            move |ctx: HookCtx, selection: Res<CaptureSelection>, sink: Res<CaptureSink>| {
                capture_scope(&mine, ctx, selection, sink)
            },
        );
    }
}

/// What a capture system reads: `stages` (one scope's, in stage order).
fn capture_scope(
    stages: &[SaveTensorStage],
    mut ctx: HookCtx,
    selection: Res<CaptureSelection>,
    sink: Res<CaptureSink>,
) {
    if !selection.steps.contains(ctx.step().step) {
        return;
    }
    let layer = ctx.layer();
    if layer.is_some_and(|l| !selection.layers.contains(l)) {
        return;
    }
    for &stage in stages {
        if !ctx.produced(stage) {
            continue;
        }
        // None: a failure (recorded as the step's error) or a probe, which
        // must see every read.
        let Some(tensor) = ctx.read_async(stage) else { continue };
        let order = sink.1.fetch_add(1, Ordering::Relaxed);
        let item = CapturedTensor { order, step: ctx.step().step, layer, stage, tensor };
        sink.0.send(item);
    }
}
