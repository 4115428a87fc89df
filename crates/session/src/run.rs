//! `run`: load the model, build the backend and the forward pass, attach
//! capture, generate, and commit the capture folder.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use pipeline::{ForwardEvent, HostTensor, LoadMeter};
use stage_types::SaveTensorStage;

use crate::error::Result;
use crate::faults::attach_faults;
use crate::session_builder::{Session, describe_model};
use crate::spec::RunConfig;
use capture::lifecycle::CaptureSession;

/// Progress of a run, for display.
#[derive(Debug, Clone, PartialEq)]
pub enum RunEvent {
    /// Loading begins: the meter counts the bytes of each loading phase
    /// (a synthetic model made, weights placed on a device) as it goes.
    Loading(LoadMeter),
    /// The model is loaded.
    ModelLoaded {
        /// One line describing it.
        description: String,
        /// Time taken.
        elapsed: Duration,
    },
    /// The backend is ready (weights on the device for CUDA).
    BackendReady {
        /// Backend, dtype and device.
        description: String,
        /// Time taken.
        elapsed: Duration,
    },
    /// The forward pass progressed.
    Forward(ForwardEvent),
}

/// What a run did.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSummary {
    /// Backend name.
    pub backend: String,
    /// Prompt length.
    pub prompt_tokens: usize,
    /// Tokens produced by greedy decoding.
    pub generated: Vec<u32>,
    /// Steps run.
    pub steps: usize,
    /// Forward time (model loading excluded).
    pub forward_time: Duration,
    /// Time of the first step (the prompt), greedy choice included.
    pub prefill_time: Duration,
    /// Model loading time.
    pub load_time: Duration,
    /// Tensors written.
    pub tensors_written: usize,
    /// Bytes written.
    pub bytes_written: u64,
    /// Where the capture went, if any.
    pub out_dir: Option<PathBuf>,
    /// The generated tokens as text, for a text prompt.
    pub generated_text: Option<String>,
    /// Decode steps replayed from a recorded CUDA graph (0: every step ran
    /// its stage systems eagerly, as any capture or fault makes them).
    pub graph_replays: usize,
    /// What the device products of a `Cuda(dtype: F64)` run computed (one
    /// line), or None.
    pub products: Option<String>,
}

/// A run's summary and the logits of its last step.
#[derive(Debug, Clone)]
pub struct RunOutput {
    /// What happened.
    pub summary: RunSummary,
    /// lm_head of the last step, [T,V].
    pub last_logits: HostTensor,
}

/// Runs a parsed config. `config_path` is for messages. On any error the
/// capture folder is left untouched and no temporary folder remains.
pub fn run(config: &RunConfig, config_path: &Path, on_event: &mut dyn FnMut(RunEvent)) -> Result<RunOutput> {
    // Before any work (an unusable out_dir must not wait for a model to
    // load), and declared before the forward pass: see CaptureSession.
    let session = match &config.session.capture {
        Some(spec) => Some(CaptureSession::start(spec, &spec.out_dir)?),
        None => None,
    };
    let meter = LoadMeter::default();
    on_event(RunEvent::Loading(meter.clone()));
    let spec = &config.session;
    let opened = Session::open(spec, config_path, &[&config.backend], 0, meter)?;
    let model = &opened.model;
    on_event(RunEvent::ModelLoaded { description: describe_model(model), elapsed: opened.load_time });
    let prepared = opened.forward(&config.backend, session.as_ref(), false)?;
    on_event(RunEvent::BackendReady { description: prepared.description.clone(), elapsed: prepared.elapsed });
    let replay = opened.replay()?;
    let (backend_name, backend_dtype) = (prepared.name, prepared.dtype);
    let mut forward = prepared.forward;
    // A fault that changes nothing is logged as a warning when it happens.
    let _fault_notes = attach_faults(&mut forward, &spec.faults);
    if let Some(replay) = &replay {
        replay.attach(&mut forward);
    }

    let start = Instant::now();
    let mut prefill_time = None;
    // Replayed routing belongs to the replayed run's tokens: feed those.
    let replayed_tokens = replay.as_ref().map(|r| r.step_tokens(config.step_count()));
    let mut feed = |step: usize, greedy: u32| match &replayed_tokens {
        Some(steps) => steps.get(step).and_then(|t| t.first().copied()).unwrap_or(greedy),
        None => greedy,
    };
    let generation = forward.generate_feeding(config.prompt_tokens(), spec.generate, &mut feed, &mut |e| {
        if matches!(e, ForwardEvent::StepDone { step: 0, .. }) {
            prefill_time = Some(start.elapsed());
        }
        on_event(RunEvent::Forward(e))
    })?;
    let forward_time = start.elapsed();
    let last_logits = forward.backend_mut().read(SaveTensorStage::LmHead)?;
    let graph_replays = forward.backend_mut().recorder().map_or(0, |r| r.graph_replays());
    // The world holds the last sender; the writer finishes once it is gone.
    drop(forward);

    let mut summary = RunSummary {
        backend: backend_name.to_string(),
        prompt_tokens: config.prompt_tokens().len(),
        generated: generation.generated.clone(),
        steps: generation.steps.len(),
        forward_time,
        prefill_time: prefill_time.unwrap_or(forward_time),
        load_time: opened.load_time,
        tensors_written: 0,
        bytes_written: 0,
        out_dir: None,
        generated_text: spec.resolved.text.as_ref().map(|p| p.tokenizer.decode(&generation.generated)),
        graph_replays,
        products: opened.products_note(),
    };
    if let Some(session) = session {
        let generation = (&generation.generated[..], &generation.steps[..]);
        let record = opened.record((backend_name, backend_dtype), generation, &spec.faults, replay.as_ref(), None);
        let stats = session.commit(&record)?;
        summary.tensors_written = stats.tensors;
        summary.bytes_written = stats.bytes;
        summary.out_dir = Some(stats.out_dir);
    }
    Ok(RunOutput { summary, last_logits })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_meters_the_synthetic_weights_it_makes() {
        let path = Path::new("metered.ron");
        let config = RunConfig::parse(
            r#"(model: Synthetic(preset: "tiny-moe", seed: 3, layers: 1), prompt: Tokens([1, 2, 3]), generate: 1)"#,
            path,
        )
        .unwrap();
        let mut meters = Vec::new();
        run(&config, path, &mut |event| {
            if let RunEvent::Loading(meter) = event {
                meters.push(meter);
            }
        })
        .unwrap();
        assert_eq!(meters.len(), 1, "one meter, announced before loading");
        let reading = meters[0].read().expect("loading began a phase");
        assert_eq!(reading.phase, "generating synthetic weights");
        let model = pipeline::Model::synthetic("tiny-moe", 3, Some(1)).unwrap();
        assert_eq!((reading.done, reading.total), (model.store.total_bytes() as u64, model.store.total_bytes() as u64));
    }
}
