//! `run`: load the model, build the backend and the forward pass, attach
//! capture, generate, and commit the capture folder.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use pipeline::{Backend, CpuBackend, Forward, ForwardEvent, HostTensor, LoadMeter, Model, ModelSource};
use stage_types::SaveTensorStage;

use crate::config::{BackendSpec, ModelSpec, RunConfig};
use crate::error::{CaptureError, Result};
use crate::faults::attach_faults;
use crate::replay::{Replay, RoutingSpec};
use crate::session::{CaptureSession, RunRecord};

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
}

/// A run's summary and the logits of its last step.
#[derive(Debug, Clone)]
pub struct RunOutput {
    /// What happened.
    pub summary: RunSummary,
    /// lm_head of the last step, [T,V].
    pub last_logits: HostTensor,
}

/// Loads the model a config names. With `device_only` (every backend that
/// will use it is CUDA) a synthetic model is not materialised on the host:
/// the CUDA backend generates its weights on the device. `meter` counts
/// the bytes made.
pub fn load_model(spec: &ModelSpec, device_only: bool, meter: &LoadMeter) -> Result<Model> {
    Ok(match spec {
        ModelSpec::Synthetic { preset, seed, layers } if device_only => {
            Model::synthetic_on_demand(preset, *seed, *layers)?
        }
        ModelSpec::Synthetic { preset, seed, layers } => Model::synthetic_metered(preset, *seed, *layers, meter)?,
        ModelSpec::Path(path) => Model::load(path)?,
    })
}

/// Builds the backend a config names; `meter` counts the bytes of weights
/// placed on a device.
pub fn build_backend(
    spec: &BackendSpec,
    threads: Option<usize>,
    model: &Model,
    config_path: &Path,
    meter: &LoadMeter,
) -> Result<Box<dyn Backend>> {
    match spec {
        BackendSpec::Cpu => Ok(Box::new(CpuBackend::new(model.store.clone(), threads)?)),
        BackendSpec::CpuEmulating(dtype) => {
            Ok(Box::new(CpuBackend::new(model.store.clone(), threads)?.with_contract(dtype.contract())))
        }
        BackendSpec::CpuLlamaCpp => {
            let mut backend = CpuBackend::new(model.store.clone(), threads)?;
            backend.set_ggml_activations(true);
            Ok(Box::new(backend))
        }
        #[cfg(feature = "cuda")]
        BackendSpec::Cuda { device, dtype, graphs } => {
            use pipeline::backend::cuda::CudaPrecision;
            let precision = match dtype {
                crate::config::CudaDtype::F32 => CudaPrecision::F32,
                crate::config::CudaDtype::Bf16 => CudaPrecision::Bf16,
            };
            match pipeline::CudaBackend::new_metered(model, *device, precision, meter) {
                Ok(mut backend) => {
                    backend.set_step_graphs(*graphs);
                    Ok(Box::new(backend))
                }
                Err(pipeline::PipelineError::BackendUnavailable(why)) => Err(CaptureError::ConfigValue {
                    path: config_path.to_path_buf(),
                    message: format!("backend: {spec}: {why}"),
                }),
                Err(other) => Err(other.into()),
            }
        }
        #[cfg(not(feature = "cuda"))]
        BackendSpec::Cuda { .. } => Err(CaptureError::ConfigValue {
            path: config_path.to_path_buf(),
            message: format!("backend: {spec}: this build has no CUDA support (build with the `cuda` feature)"),
        }),
    }
}

fn describe(model: &Model) -> String {
    let c = &model.config;
    let source = match &model.source {
        ModelSource::Checkpoint(p) => p.display().to_string(),
        ModelSource::Synthetic { preset, seed } => format!("synthetic {preset} (seed {seed})"),
    };
    let kind = if c.num_experts > 0 {
        format!(", {} experts top-{}", c.num_experts, c.experts_per_token)
    } else {
        String::new()
    };
    format!(
        "{source}: {}, {} layers, H {}{kind}, V {}, {:.1} MB of {} weights",
        c.architecture,
        c.num_layers,
        c.hidden_size,
        c.vocab_size,
        model.store.total_bytes() as f64 / 1e6,
        model.weight_dtype()
    )
}

/// Runs a parsed config. `config_path` is for messages. On any error the
/// capture folder is left untouched and no temporary folder remains.
pub fn run(config: &RunConfig, config_path: &Path, on_event: &mut dyn FnMut(RunEvent)) -> Result<RunOutput> {
    // Before any work (an unusable out_dir must not wait for a model to
    // load), and declared before the forward pass: see CaptureSession.
    let session = match &config.capture {
        Some(spec) => Some(CaptureSession::start(spec, &spec.out_dir)?),
        None => None,
    };
    let load_start = Instant::now();
    let meter = LoadMeter::default();
    on_event(RunEvent::Loading(meter.clone()));
    let model = load_model(&config.model, config.backend.is_cuda(), &meter)?;
    let load_time = load_start.elapsed();
    tracing::info!(model = %describe(&model), seconds = load_time.as_secs_f64(), "model loaded");
    on_event(RunEvent::ModelLoaded { description: describe(&model), elapsed: load_time });
    config.check_against_model(config_path, &model.config)?;
    let backend_start = Instant::now();
    let mut backend = build_backend(&config.backend, config.threads, &model, config_path, &meter)?;
    let prompt_len = config.prompt_tokens().len();
    let mut setup = String::new();
    if let Some(device) = backend.device_setup() {
        // The prompt's scores stay in memory unless attention is fused and
        // no capture reads them.
        let scores = !device.fuses_attention(prompt_len, model.config.head_dim)
            || session.as_ref().is_some_and(CaptureSession::captures_prompt_attention);
        device.check_run_memory(crate::config::run_bytes(&model.config, prompt_len, config.generate, scores))?;
        device.warm_up(prompt_len)?;
        if let Some(session) = &session {
            device.reserve_capture(&session.reserve_elements(&model.config, prompt_len))?;
        }
        setup = device.setup_note().map(|n| format!("; {n}")).unwrap_or_default();
    }
    let (backend_name, backend_dtype) = (backend.name().to_string(), backend.dtype().to_string());
    on_event(RunEvent::BackendReady {
        description: format!("{backend_name} {backend_dtype} ({}{setup})", config.backend),
        elapsed: backend_start.elapsed(),
    });
    let replay = match &config.routing {
        RoutingSpec::Own => None,
        RoutingSpec::Replay(dir) => {
            Some(Replay::open(dir, &model.config, config.prompt_tokens(), config.step_count(), config_path)?)
        }
    };
    let mut forward = Forward::new(&model, backend);
    // A fault that changes nothing is logged as a warning when it happens.
    let _fault_notes = attach_faults(&mut forward, &config.faults);
    if let Some(replay) = &replay {
        replay.attach(&mut forward);
    }
    if let Some(session) = &session {
        session.attach(&mut forward);
    }

    let start = Instant::now();
    let mut prefill_time = None;
    // Replayed routing belongs to the replayed run's tokens: feed those.
    let replayed_tokens = replay.as_ref().map(|r| r.step_tokens(config.step_count()));
    let mut feed = |step: usize, greedy: u32| match &replayed_tokens {
        Some(steps) => steps.get(step).and_then(|t| t.first().copied()).unwrap_or(greedy),
        None => greedy,
    };
    let generation = forward.generate_feeding(config.prompt_tokens(), config.generate, &mut feed, &mut |e| {
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
        backend: backend_name.clone(),
        prompt_tokens: config.prompt_tokens().len(),
        generated: generation.generated.clone(),
        steps: generation.steps.len(),
        forward_time,
        prefill_time: prefill_time.unwrap_or(forward_time),
        load_time,
        tensors_written: 0,
        bytes_written: 0,
        out_dir: None,
        generated_text: config.resolved.text.as_ref().map(|p| p.tokenizer.decode(&generation.generated)),
        graph_replays,
    };
    if let Some(session) = session {
        let stats = session.commit(&RunRecord {
            model: &model,
            backend: &backend_name,
            dtype: &backend_dtype,
            prompt: config.prompt_tokens(),
            generated: &generation.generated,
            steps: &generation.steps,
            faults: &config.faults,
            routing: replay.as_ref().map(Replay::record),
            prompt_text: config.resolved.text.as_ref(),
            teacher_forced: None,
        })?;
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
        let model = Model::synthetic("tiny-moe", 3, Some(1)).unwrap();
        assert_eq!((reading.done, reading.total), (model.store.total_bytes() as u64, model.store.total_bytes() as u64));
    }
}
