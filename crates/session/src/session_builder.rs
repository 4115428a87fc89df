//! One session builder for run, bisect and every later command: the model
//! loaded for the backends that will use it, one check of the config
//! against it, then per backend the forward pass: backend -> device setup
//! (memory check, warm-up, pinned capture buffers) -> capture systems.
//! Faults and routing replay are attached by the command, to the passes it
//! says (bisect: the target, and replay to the expected side too).

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use capture::lifecycle::{CaptureSession, RunRecord};
use compare::manifest::ManifestPromptText;
use pipeline::backend::contract::NumericContract;
use pipeline::backend::cpu::device_products::DeviceProducts;
use pipeline::{Backend, CpuBackend, Forward, LoadMeter, Model, ModelSource, StepRecord};

use crate::config::ModelSpec;
use crate::error::{Result, SessionError};
use crate::faults::FaultSpec;
use crate::replay::{Replay, RoutingSpec};

use crate::spec::{BackendSpec, SessionSpec, run_bytes};

/// A loaded model with the spec that runs on it.
pub struct Session<'a> {
    /// What runs.
    pub spec: &'a SessionSpec,
    /// The config file, for messages.
    pub path: &'a Path,
    /// The model.
    pub model: Model,
    /// Counts the bytes of each loading phase (model, device weights).
    pub meter: LoadMeter,
    /// Time the model took to load.
    pub load_time: Duration,
    /// The device products of a `Cuda(dtype: F64)` reference, opened by
    /// the first such backend and shared by every CPU pass after it (the
    /// expected side's too), so weights go to the device once.
    products: Mutex<Option<(usize, Arc<dyn DeviceProducts>)>>,
}

/// One backend's forward pass, ready for its first step.
pub struct Prepared {
    /// The forward pass (capture systems attached).
    pub forward: Forward,
    /// Backend name (`cpu`, `cuda`).
    pub name: &'static str,
    /// Activation dtype (`f32`, `bf16`).
    pub dtype: &'static str,
    /// One line: backend, dtype, the config's spec and what setup took.
    pub description: String,
    /// Time the backend took to be ready.
    pub elapsed: Duration,
}

impl<'a> Session<'a> {
    /// Loads the model `spec` names for `backends` and checks `spec`
    /// against it: `extra_host_passes` CPU forward passes run besides the
    /// backends' own (bisect's expected side). A synthetic model is made
    /// on the device only when every backend is CUDA or the F64 reference
    /// (whose products make its synthetic weights on the device, as do
    /// the expected side's that share them): the host then computes the
    /// few values it reads itself (norms, biases, embedding rows).
    pub fn open(
        spec: &'a SessionSpec,
        path: &'a Path,
        backends: &[&BackendSpec],
        extra_host_passes: usize,
        meter: LoadMeter,
    ) -> Result<Self> {
        let start = Instant::now();
        let device_only = backends.iter().all(|b| b.is_cuda() || b.is_f64_reference());
        let model = match &spec.model {
            ModelSpec::Synthetic { preset, seed, layers } if device_only => {
                Model::synthetic_on_demand(preset, *seed, *layers)?
            }
            ModelSpec::Synthetic { preset, seed, layers } => {
                Model::synthetic_for_steps(preset, *seed, *layers, &meter, spec.generate)?
            }
            ModelSpec::Path(p) => Model::load(p)?,
        };
        let mut model = model;
        if let Some(parallel) = &spec.parallel {
            crate::parallel_spec::apply_parallel(&mut model.config, parallel, backends)
                .map_err(|message| SessionError::ConfigValue { path: path.to_path_buf(), message })?;
        }
        let load_time = start.elapsed();
        tracing::info!(model = %describe_model(&model), seconds = load_time.as_secs_f64(), "model loaded");
        let host_passes = backends.iter().filter(|b| !b.is_cuda()).count() + extra_host_passes;
        spec.check_against_model(path, &model.config, host_passes)?;
        Ok(Self { spec, path, model, meter, load_time, products: Mutex::new(None) })
    }

    /// The forward pass of `backend`: the backend built, its device (if it
    /// has one) checked for the run's memory, warmed up and given pinned
    /// buffers for `capture`, whose systems are attached. `every_stage`:
    /// the caller reads every stage between operations (bisect), so the
    /// prompt's attention scores count as kept in memory.
    pub fn forward(
        &self,
        backend: &BackendSpec,
        capture: Option<&CaptureSession>,
        every_stage: bool,
    ) -> Result<Prepared> {
        let start = Instant::now();
        let mut built = self.backend(backend)?;
        let (config, prompt) = (&self.model.config, self.spec.tokens().len());
        let mut setup = String::new();
        if let Some(device) = built.device_setup() {
            // The prompt's scores stay in memory unless attention is fused
            // and nothing reads them.
            let scores = every_stage
                || !device.fuses_attention(prompt, config.head_dim)
                || capture.is_some_and(CaptureSession::captures_prompt_attention);
            device.check_run_memory(run_bytes(config, prompt, self.spec.generate, scores))?;
            device.warm_up(prompt)?;
            if let Some(capture) = capture {
                device.reserve_capture(&capture.reserve_elements(config, prompt))?;
            }
            setup = device.setup_note().map(|n| format!("; {n}")).unwrap_or_default();
        }
        let (name, dtype) = (built.name(), built.dtype());
        let mut forward = Forward::new(&self.model, built);
        if let Some(capture) = capture {
            capture.attach(&mut forward);
        }
        Ok(Prepared {
            forward,
            name,
            dtype,
            description: format!("{name} {dtype} ({backend}{setup}{})", ranks_note(&self.model.config)),
            elapsed: start.elapsed(),
        })
    }

    /// A CPU forward pass keeping `contract` (bisect's expected side).
    pub fn emulating(&self, contract: NumericContract) -> Result<Forward> {
        let mut backend = CpuBackend::new(self.model.store.clone(), self.spec.threads)?.with_contract(contract);
        if let Some((_, products)) = self.products.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            backend = backend.with_device_products(products);
        }
        Ok(Forward::new(&self.model, Box::new(backend)))
    }

    /// The routing replay the spec names, if any, checked against the model.
    pub fn replay(&self) -> Result<Option<Replay>> {
        match &self.spec.routing {
            RoutingSpec::Own => Ok(None),
            RoutingSpec::Replay(dir) => {
                Ok(Some(Replay::open(dir, &self.model.config, self.spec.tokens(), self.spec.step_count(), self.path)?))
            }
        }
    }

    /// What a capture's manifest records of a pass on this session: its
    /// backend, the tokens it generated in its steps, the faults injected
    /// into it, the routing replayed into it, what forced its stages.
    pub fn record<'r>(
        &'r self,
        (backend, dtype): (&'r str, &'r str),
        (generated, steps): (&'r [u32], &'r [StepRecord]),
        faults: &[FaultSpec],
        replay: Option<&Replay>,
        teacher_forced: Option<String>,
    ) -> RunRecord<'r> {
        let text = self.spec.resolved.text.as_ref();
        RunRecord {
            model: &self.model,
            backend,
            dtype,
            prompt: self.spec.tokens(),
            generated,
            steps,
            faults: faults.iter().map(ToString::to_string).collect(),
            routing: replay.map(|r| serde_json::to_value(r.record()).expect("a replay record serialises")),
            prompt_text: text.map(|p| ManifestPromptText {
                text: p.text.clone(),
                rendered: p.rendered.clone(),
                tokenizer: p.tokenizer.path.display().to_string(),
            }),
            token_texts: text
                .map(|p| p.tokenizer.token_texts(&[self.spec.tokens(), generated].concat()))
                .unwrap_or_default(),
            teacher_forced,
        }
    }

    /// Builds the backend `spec` names.
    fn backend(&self, spec: &BackendSpec) -> Result<Box<dyn Backend>> {
        let (store, threads) = (self.model.store.clone(), self.spec.threads);
        match spec {
            BackendSpec::Cpu => Ok(Box::new(CpuBackend::new(store, threads)?)),
            BackendSpec::CpuEmulating(dtype) => {
                Ok(Box::new(CpuBackend::new(store, threads)?.with_contract(dtype.contract())))
            }
            BackendSpec::CpuWithBug(bug) => {
                self.check_rank_bug(*bug, spec)?;
                Ok(Box::new(CpuBackend::new(store, threads)?.with_bug(*bug)?))
            }
            BackendSpec::CpuLlamaCpp => {
                let mut backend = CpuBackend::new(store, threads)?;
                backend.set_ggml_activations(true);
                Ok(Box::new(backend))
            }
            #[cfg(feature = "cuda")]
            BackendSpec::Cuda { device, dtype: crate::backend_spec::CudaDtype::F64, .. } => {
                let products = self.products(*device, spec)?;
                Ok(Box::new(CpuBackend::new(store, threads)?.with_device_products(products)))
            }
            #[cfg(feature = "cuda")]
            BackendSpec::Cuda { device, dtype, graphs } => {
                match pipeline::CudaBackend::new_metered(&self.model, *device, dtype.precision(), &self.meter) {
                    Ok(mut backend) => {
                        backend.set_step_graphs(*graphs);
                        Ok(Box::new(backend))
                    }
                    Err(pipeline::PipelineError::BackendUnavailable(why)) => Err(SessionError::ConfigValue {
                        path: self.path.to_path_buf(),
                        message: format!("backend: {spec}: {why}"),
                    }),
                    Err(other) => Err(other.into()),
                }
            }
            BackendSpec::Capture(_) => Err(SessionError::ConfigValue {
                path: self.path.to_path_buf(),
                message: format!("{spec} computes nothing: a capture is checked as a bisect's target"),
            }),
            #[cfg(not(feature = "cuda"))]
            BackendSpec::Cuda { .. } => Err(SessionError::ConfigValue {
                path: self.path.to_path_buf(),
                message: format!("backend: {spec}: this build has no CUDA support (build with the `cuda` feature)"),
            }),
        }
    }
}

impl Session<'_> {
    /// A bug of expert- or tensor-parallel ranks needs the ranks it lives
    /// between: refused, with what to add, where the run has none (or, for
    /// the reduction's, no rank-order sum or no such rank; for a row-split
    /// bias, a model without one).
    fn check_rank_bug(&self, bug: pipeline::backend::cpu::known_bugs::KnownBug, spec: &BackendSpec) -> Result<()> {
        use pipeline::backend::cpu::known_bugs::KnownBug;
        let layout = self.model.config.expert_parallel.as_ref();
        let why = match bug {
            KnownBug::DispatchDropped(_)
            | KnownBug::PartialAddedTwice(_)
            | KnownBug::WeightBeforeExperts(_)
            | KnownBug::ReplicaMismatch(_)
                if layout.is_none() =>
            {
                "it lives between expert-parallel ranks: add `parallel: (experts: R)`".to_string()
            }
            KnownBug::BiasOnEveryRank if self.model.config.tensor_ranks <= 1 => {
                "it lives between tensor-parallel ranks: add `parallel: (tensor: T)`".to_string()
            }
            KnownBug::BiasOnEveryRank if self.model.config.oss.is_none() => {
                "no row-split projection of this model has a bias (gpt-oss's o_proj has one)".to_string()
            }
            KnownBug::DispatchDropped(t) if t >= self.spec.tokens().len() => {
                format!("token {t} is beyond the prompt's {} tokens", self.spec.tokens().len())
            }
            KnownBug::PartialAddedTwice(_) if layout.is_some_and(|l| !l.rank_sum) => {
                "it lives in the rank-order reduction: add `combine: RankSum` to `parallel:`".to_string()
            }
            KnownBug::ReplicaMismatch(_) if layout.is_some_and(|l| l.replicas.is_empty()) => {
                "it lives in the ranks' views of replicated experts: add `replicas: [(expert: e, rank: r)]` to `parallel:`"
                    .to_string()
            }
            KnownBug::PartialAddedTwice(r) | KnownBug::WeightBeforeExperts(r) | KnownBug::ReplicaMismatch(r)
                if layout.is_some_and(|l| r >= l.ranks) =>
            {
                format!("rank {r} is beyond the run's {} ranks", layout.map_or(1, |l| l.ranks))
            }
            _ => return Ok(()),
        };
        Err(SessionError::ConfigValue { path: self.path.to_path_buf(), message: format!("{spec}: {why}") })
    }

    /// The session's device products on `device`, opened the first time.
    #[cfg(feature = "cuda")]
    fn products(&self, device: usize, spec: &BackendSpec) -> Result<Arc<dyn DeviceProducts>> {
        let mut products = self.products.lock().unwrap_or_else(|e| e.into_inner());
        match products.as_ref() {
            Some((on, p)) if *on == device => return Ok(p.clone()),
            Some((on, _)) => {
                return Err(SessionError::ConfigValue {
                    path: self.path.to_path_buf(),
                    message: format!(
                        "{spec}: this command's F64 reference already runs on device {on}; use one device"
                    ),
                });
            }
            None => {}
        }
        let opened: Arc<dyn DeviceProducts> =
            match pipeline::backend::cuda::reference_products::CudaProducts::open(device) {
                Ok(p) => Arc::new(p),
                Err(pipeline::PipelineError::BackendUnavailable(why)) => {
                    return Err(SessionError::ConfigValue {
                        path: self.path.to_path_buf(),
                        message: format!("backend: {spec}: {why}"),
                    });
                }
                Err(other) => return Err(other.into()),
            };
        *products = Some((device, opened.clone()));
        Ok(opened)
    }

    /// One line on the device products, if a pass used them.
    pub fn products_note(&self) -> Option<String> {
        self.products.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map(|(_, p)| p.describe())
    }
}

/// `; 4 expert-parallel ranks (rank order), 2 tensor-parallel ranks`, or
/// nothing for one rank: the run's virtual ranks, for descriptions.
pub fn ranks_note(config: &pipeline::ModelConfig) -> String {
    let mut parts = Vec::new();
    if let Some(p) = &config.expert_parallel {
        let order = if p.rank_sum { "rank order" } else { "slot order" };
        let replicas = match p.replicas.len() {
            0 => String::new(),
            n => format!(", {n} replica{}", if n == 1 { "" } else { "s" }),
        };
        parts.push(format!("{} expert-parallel ranks ({order}{replicas})", p.ranks));
    }
    if config.tensor_ranks > 1 {
        parts.push(format!("{} tensor-parallel ranks", config.tensor_ranks));
    }
    if parts.is_empty() { String::new() } else { format!("; {}", parts.join(", ")) }
}

/// Where a model comes from: its checkpoint path, or its preset and seed.
pub fn model_source(model: &Model) -> String {
    match &model.source {
        ModelSource::Checkpoint(p) => p.display().to_string(),
        ModelSource::Synthetic { preset, seed } => format!("synthetic {preset} (seed {seed})"),
    }
}

/// One line describing a model: source, family, size.
pub fn describe_model(model: &Model) -> String {
    let c = &model.config;
    let kind = if c.num_experts > 0 {
        format!(", {} experts top-{}", c.num_experts, c.experts_per_token)
    } else {
        String::new()
    };
    // Said where most weights are not stored but computed where read.
    let (total, computed) = (model.store.total_bytes(), model.store.computed_bytes());
    let computed = if computed * 2 > total { ", computed where read" } else { "" };
    format!(
        "{}: {}, {} layers, H {}{kind}, V {}, {:.1} MB of {} weights{computed}",
        model_source(model),
        c.architecture,
        c.num_layers,
        c.hidden_size,
        c.vocab_size,
        total as f64 / 1e6,
        model.weight_dtype()
    )
}
