//! Capture systems: one per selected stage, attached in
//! `StageHookSystems::Observe(stage)` (after the stage and any amender),
//! copying the stage's output to the host when the current step and layer
//! are selected and handing it to the writer thread. Stages not selected
//! get no system, so with nothing selected no copy is ever made.

use bevy_ecs::prelude::*;
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

/// The channel to the writer thread.
#[derive(Resource)]
pub struct CaptureSink(pub Sender<CapturedTensor>);

/// Adds one capture system per selected stage to `forward`.
pub fn attach_capture(
    forward: &mut Forward,
    selection: CaptureSelection,
    sink: Sender<CapturedTensor>,
) {
    let stages: Vec<SaveTensorStage> = selection.stages.iter().collect();
    forward.world_mut().insert_resource(selection);
    forward.world_mut().insert_resource(CaptureSink(sink));
    for stage in stages {
        forward.add_stage_hook(StageHookSystems::Observe(stage), capture_stage(stage));
    }
}

/// The capture system for one stage.
fn capture_stage(
    stage: SaveTensorStage,
) -> impl FnMut(
    ResMut<ActiveBackend>,
    Res<StepState>,
    Res<CurrentLayer>,
    Res<StageLog>,
    Res<CaptureSelection>,
    Res<CaptureSink>,
    ResMut<StepError>,
) {
    move |mut backend, step, layer, log, selection, sink, mut error| {
        if error.0.is_some() || !log.0.contains(stage) || !selection.steps.contains(step.step) {
            return;
        }
        if stage.is_layer_stage() && !layer.index.is_some_and(|l| selection.layers.contains(l)) {
            return;
        }
        match backend.0.read(stage) {
            Ok(tensor) => {
                let item = CapturedTensor {
                    step: step.step,
                    layer: if stage.is_layer_stage() {
                        layer.index
                    } else {
                        None
                    },
                    stage,
                    tensor,
                };
                // The writer drains until every sender is gone, so this only
                // fails if it panicked; its join reports that.
                let _ = sink.0.send(item);
            }
            Err(e) => error.0 = Some(e),
        }
    }
}
