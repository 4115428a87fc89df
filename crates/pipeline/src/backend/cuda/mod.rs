//! The CUDA backend (feature `cuda`): every operation of [`Backend`] on the
//! device (dense projections through cuBLAS, the rest as kernels of
//! kernels-cuda), activations and the KV caches in device memory, routing
//! and expert selection on the device (no host round trip inside a step).
//! [`CudaPrecision::F32`] accumulates in f32 without TF32;
//! [`CudaPrecision::Bf16`] keeps the weights in bf16 on the device and
//! rounds every stage's output to bf16 (accumulation stays f32). The op
//! families live in `projections.rs`, `attention.rs`, `moe.rs`,
//! `norm.rs`, `elementwise.rs` and `mla.rs` (DeepSeek's attention and
//! router), the [`Backend`] methods that dispatch
//! to them in `ops.rs`; this file holds the backend's state, its
//! construction and its buffers.

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, LaunchConfig, PushKernelArg};
use kernels_cuda::GpuDevice;
use kernels_cuda::kernels::{self as handles, Kernel, WeightKernel};

use super::{Backend, Slot};
use crate::error::{PipelineError, Result};
use crate::weights::{WeightId, WeightStore};

mod activations;
mod attention;
mod capabilities;
mod deferred;
mod eager_reads;
mod elementwise;
mod expert_parallel;
mod fused_attention;
mod graph;
mod launcher;
mod mla;
mod moe;
mod norm;
mod ops;
mod oss;
mod profile;
mod projections;
mod quantized;
pub mod reference_products;
mod staging;
mod taps;
mod tensors;
mod weights;
mod worker;

use tensors::{DevCache, DevData, DevTensor};
use weights::{
    DevWeight, Stacked, alloc_weight, check_fits, device_bytes, fill_weight, kept_quantized, upload_quantized,
};

/// Precision of the CUDA backend: `F32` (f32 weights and activations, f32
/// accumulation, no TF32) or `Bf16` (bf16 weights, activations rounded to
/// bf16 after every stage, f32 accumulation); the storage precision of its
/// numeric contract ([`crate::backend::contract::NumericContract::cuda`]).
pub type CudaPrecision = crate::backend::contract::Precision;

/// The CUDA backend.
pub struct CudaBackend {
    device: GpuDevice,
    store: Arc<WeightStore>,
    weights: HashMap<WeightId, DevWeight>,
    precision: CudaPrecision,
    stacked: HashMap<WeightId, Stacked>,
    /// A quantized weight decoded for a many-row projection (quantized.rs),
    /// kept for the next.
    scratch: Option<DevWeight>,
    /// Concatenated f32 biases per list of bias weights (the q, k and v
    /// biases of a layer), uploaded on first use.
    biases: HashMap<Vec<WeightId>, CudaSlice<f32>>,
    /// The activations: one tensor per stage, with versions and buffer
    /// lengths, and the pool their buffers come from (activations.rs).
    activations: activations::Activations,
    /// The step's tokens (the first `t_len`; the buffer is reused while it
    /// is long enough, so a decode step's token has one address).
    tokens: Option<CudaSlice<u32>>,
    t_len: usize,
    start_position: usize,
    /// The step's start position in device memory: kernels that depend on
    /// it read it from here (see graph.rs).
    step_start: CudaSlice<u32>,
    /// Decode steps recorded once as a CUDA graph and replayed (graph.rs).
    graphs: graph::StepGraphs,
    /// What the capture observers read out of a step, however it runs
    /// (taps.rs). Dropped after the recorded graph (its reads wait for
    /// their landing) and before the activations its copies read.
    taps: taps::Taps,
    /// The greedy choice on the device (elementwise.rs).
    choice: elementwise::GreedyChoice,
    /// The launch held back for the next operation to share, and the
    /// per-operation profiler (launcher.rs).
    launcher: launcher::Launcher,
    /// The attention of a many-row step, computed when needed
    /// (fused_attention.rs).
    attention_plan: Option<fused_attention::AttentionPlan>,
    /// Lazy stages of the last plan, gone with it (for the error a read
    /// of one gives).
    gone: Vec<Slot>,
    grouped: moe::GroupedShared,
    /// Whether many-row steps fuse attention (on unless
    /// `MOETRACE_NO_FUSED_ATTENTION` is set).
    fuse_attention: bool,
    caches: Vec<Option<DevCache>>,
    /// The rotation table on the device: MLA's (mla.rs) or gpt-oss's
    /// YaRN (oss.rs); a model has one.
    rope_table: mla::RopeTable,
    /// `MOETRACE_SANITIZE_ZERO_GEMM_OUTPUTS` set: every cuBLAS projection's
    /// output is zeroed before the GEMM overwrites it. Only for
    /// compute-sanitizer's initcheck, which does not see the TMA stores of
    /// cuBLAS's Hopper bf16 kernels and so calls their outputs
    /// uninitialised; with this on, what initcheck reports is about
    /// everything else. Never changes a result (the GEMM writes every
    /// element: kernels-cuda's bf16 projection test).
    zero_gemm_outputs: bool,
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        if let Some(clock) = &self.graphs.clock {
            eprint!("{}", clock.report());
        }
        if let Some(p) = self.launcher.profiler() {
            eprint!("{}", p.report());
        }
    }
}

/// Maps a driver error with what was being done; out of memory gets its
/// own error, which says what to change.
pub(super) fn gpu(what: &str) -> impl FnOnce(cudarc::driver::DriverError) -> PipelineError + '_ {
    move |e| {
        if kernels_cuda::is_out_of_memory(&e) {
            PipelineError::GpuOutOfMemory { action: what.to_string(), detail: String::new() }
        } else {
            PipelineError::Gpu(format!("{what}: {e}"))
        }
    }
}

fn kernel_error(e: kernels_cuda::KernelError) -> PipelineError {
    use kernels_cuda::KernelError as K;
    match e {
        K::DriverMissing | K::NvrtcMissing | K::CublasMissing => PipelineError::BackendUnavailable(e.to_string()),
        K::OutOfMemory { action } => PipelineError::GpuOutOfMemory { action, detail: String::new() },
        other => PipelineError::Gpu(other.to_string()),
    }
}

/// A grid of `n` threads in blocks of 256.
fn threads(n: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (n.div_ceil(256).max(1) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

/// A grid of one warp per output.
fn warps(n: usize) -> LaunchConfig {
    threads(n * 32)
}

impl CudaBackend {
    /// Opens device `ordinal` and uploads every weight of `model` once, as
    /// f32 or as bf16 depending on `precision`; each MoE layer's experts go
    /// up stacked (`[E, n, k]` per projection) and nowhere else.
    pub fn new(model: &crate::Model, ordinal: usize, precision: CudaPrecision) -> Result<Self> {
        Self::new_metered(model, ordinal, precision, &crate::LoadMeter::default())
    }

    /// Like [`CudaBackend::new`], with `meter` counting the bytes of
    /// weights placed on the device (read, converted and uploaded).
    pub fn new_metered(
        model: &crate::Model,
        ordinal: usize,
        precision: CudaPrecision,
        meter: &crate::LoadMeter,
    ) -> Result<Self> {
        let mut backend = Self::with_weights(model.store.clone(), &model.expert_lists(), ordinal, precision, meter)?;
        if model.config.mla.is_some() || model.config.oss.is_some() || model.config.expert_parallel.is_some() {
            // MLA's kernels (mla.rs), gpt-oss's window (oss.rs) and the
            // expert map of ranks (expert_parallel.rs) come from the host:
            // their decode steps run eagerly, whatever is asked later.
            backend.graphs.rule_out();
        }
        if model.config.oss.is_some() {
            // gpt-oss's softmax (with sinks) reads the scores: no fused
            // attention, whose scores live only inside it.
            backend.fuse_attention = false;
        }
        Ok(backend)
    }

    /// Like [`CudaBackend::new`] for any weight store: `expert_lists` are
    /// the expert sets (each the per-expert ids of one projection of one
    /// MoE layer) that `expert_linear` will be called with; `meter` counts
    /// the bytes placed on the device.
    pub fn with_weights(
        store: Arc<WeightStore>,
        expert_lists: &[&[WeightId]],
        ordinal: usize,
        precision: CudaPrecision,
        meter: &crate::LoadMeter,
    ) -> Result<Self> {
        let build = kernels_cuda::KernelBuild { round_bf16: precision == CudaPrecision::Bf16 };
        let device = GpuDevice::open_with(ordinal, build).map_err(kernel_error)?;
        check_fits(&device, &store, precision)?;
        // Every kernel is compiled before the first step, so no step's time
        // includes it (see `kernel_compile_time`).
        device.compile_all().map_err(kernel_error)?;
        let experts: std::collections::HashSet<WeightId> =
            expert_lists.iter().flat_map(|l| l.iter().copied()).collect();
        let total: usize = store.tensors().iter().map(|t| device_bytes(t, precision)).sum();
        meter.begin("placing weights on the device", total as u64);
        let mut weights = HashMap::new();
        for (i, t) in store.tensors().iter().enumerate() {
            let id = WeightId(i as u32);
            if !experts.contains(&id) {
                let what = format!("uploading {} ({:.1} MB)", t.name, device_bytes(t, precision) as f64 / 1e6);
                let w = match kept_quantized(t) {
                    Some(kind) => upload_quantized(&device, &[t], kind, &what)?,
                    None => {
                        let mut w = alloc_weight(&device, precision, t.numel(), &what)?;
                        fill_weight(&device, &mut w, 0, t, &what)?;
                        w
                    }
                };
                meter.advance(device_bytes(t, precision) as u64);
                weights.insert(id, w);
            }
        }
        let step_start = device.stream().alloc_zeros::<u32>(1).map_err(gpu("allocating the step's position"))?;
        let choice = elementwise::GreedyChoice::new(&device)?;
        let mut stacked = HashMap::new();
        for &list in expert_lists {
            let first = store.get(list[0]);
            let what = format!("uploading the stacked experts of {}", first.name);
            let per_expert = first.numel();
            let parts: Vec<&crate::weights::WeightTensor> = list.iter().map(|&id| store.get(id)).collect();
            if let Some(t) = parts.iter().find(|t| t.shape != first.shape) {
                return Err(PipelineError::BadInput(format!(
                    "experts `{}` and `{}` differ in shape",
                    first.name, t.name
                )));
            }
            let data = match kept_quantized(first) {
                Some(kind) => {
                    let data = upload_quantized(&device, &parts, kind, &what)?;
                    meter.advance(parts.iter().map(|t| device_bytes(t, precision) as u64).sum());
                    data
                }
                None => {
                    let mut data = alloc_weight(&device, precision, per_expert * list.len(), &what)?;
                    for (e, t) in parts.iter().enumerate() {
                        fill_weight(&device, &mut data, e * per_expert, t, &what)?;
                        meter.advance(device_bytes(t, precision) as u64);
                    }
                    data
                }
            };
            stacked.insert(list[0], Stacked { data, n_out: first.shape[0], k: first.row_len(), experts: list.len() });
        }
        let profiler = profile::OpProfiler::from_env();
        Ok(Self {
            device,
            store,
            weights,
            precision,
            stacked,
            scratch: None,
            biases: HashMap::new(),
            activations: activations::Activations::new(),
            tokens: None,
            t_len: 0,
            start_position: 0,
            step_start,
            caches: Vec::new(),
            rope_table: None,
            zero_gemm_outputs: std::env::var_os("MOETRACE_SANITIZE_ZERO_GEMM_OUTPUTS").is_some(),
            graphs: graph::StepGraphs::new(precision, profiler.is_some()),
            taps: taps::Taps::default(),
            choice,
            launcher: launcher::Launcher::new(profiler),
            attention_plan: None,
            gone: Vec::new(),
            grouped: moe::GroupedShared::default(),
            fuse_attention: std::env::var_os("MOETRACE_NO_FUSED_ATTENTION").is_none(),
        })
    }

    /// When on, every new activation buffer starts as NaN instead of zero,
    /// so a kernel that leaves an element unwritten shows up in any
    /// comparison (the backend-parity test turns it on).
    pub fn set_poison(&mut self, on: bool) {
        self.activations.poison = on;
    }

    /// Turns the fused attention of many-row steps off or back on (on
    /// unless `MOETRACE_NO_FUSED_ATTENTION` is set): off, attn_scores,
    /// attn_softmax and attention run as three kernels with `[nh, T, P]`
    /// tensors in memory between them (the parity tests compare both).
    pub fn set_fused_attention(&mut self, on: bool) {
        self.fuse_attention = on;
    }

    /// Turns recorded decode steps (CUDA graphs) off or back on (they are
    /// on in Bf16 mode unless `MOETRACE_NO_GRAPHS` is set, never for an MLA
    /// model): every step then
    /// launches its kernels one by one, which computes the same bits, more
    /// slowly (to rule graphs out, or to compare with them).
    pub fn set_step_graphs(&mut self, on: bool) {
        self.graphs.set_enabled(on, self.precision, self.launcher.profiling());
    }

    /// The device's name.
    pub fn device_name(&self) -> &str {
        self.device.name()
    }

    /// Bytes the weights take on the device (GGUF blocks count as stored:
    /// they stay quantized there).
    pub fn weight_bytes(&self) -> usize {
        self.weights.values().chain(self.stacked.values().map(|s| &s.data)).map(DevWeight::bytes).sum()
    }

    /// Time spent compiling the kernels to the device's machine code and
    /// loading them (all at construction).
    pub fn kernel_compile_time(&self) -> std::time::Duration {
        self.device.compile_time()
    }

    fn stream(&self) -> Arc<CudaStream> {
        self.device.stream().clone()
    }

    fn slot(&self, slot: Slot) -> Result<&DevTensor> {
        self.activations.slots.get(slot).ok_or_else(|| self.missing_slot(slot))
    }

    fn weight(&self, id: WeightId) -> &DevWeight {
        &self.weights[&id]
    }

    /// The entry point of `kernel` for the backend's weight type.
    fn weight_kernel(&self, kernel: WeightKernel) -> Result<cudarc::driver::CudaFunction> {
        self.kernel(match self.precision {
            CudaPrecision::F32 => kernel.f32,
            CudaPrecision::Bf16 => kernel.bf16w,
        })
    }

    /// An activation buffer of `n` f32 (at least one): a recycled one of
    /// that length if any, else a new one (after freeing the pool if the
    /// device is out of memory). Its contents are unspecified (NaN when
    /// poisoning).
    fn alloc(&self, n: usize) -> Result<CudaSlice<f32>> {
        let what = |n: usize| format!("a new activation buffer of {n} values");
        self.activations.alloc(&self.stream(), n, |n| self.refuse_in_capture(&what(n)))
    }

    /// An expert-id buffer of `n` int32 (at least one), recycled like
    /// [`Self::alloc`]'s; contents unspecified.
    fn alloc_ids(&self, n: usize) -> Result<CudaSlice<i32>> {
        let what = |n: usize| format!("a new expert-id buffer of {n} values");
        self.activations.alloc_ids(&self.stream(), n, |n| self.refuse_in_capture(&what(n)))
    }

    /// Puts `tensor` in `slot`, recycling what the slot held (after what
    /// the attention plan needs from it: fused_attention.rs).
    fn store(&mut self, slot: Slot, tensor: DevTensor) -> Result<()> {
        self.before_slot_write(slot)?;
        self.put(slot, tensor);
        Ok(())
    }

    /// [`Self::store`] without asking the attention plan.
    fn put(&mut self, slot: Slot, tensor: DevTensor) {
        self.graphs.slot_written();
        self.gone.retain(|&s| s != slot);
        if let Some(old) = self.activations.slots.write(slot, tensor) {
            self.retire(old);
        }
    }

    /// Takes back a tensor no slot holds any more: into the activation
    /// pool, or, while a recorded step's gathers still have to read it,
    /// aside until the recording ends (taps.rs).
    fn retire(&mut self, old: DevTensor) {
        if old.gather_hold {
            self.taps.gather_held.push(old);
        } else {
            self.activations.pool.recycle(old);
        }
    }

    /// Empties `slot` into the activation pool.
    fn drop_slot(&mut self, slot: Slot) {
        if let Some(old) = self.activations.slots.take(slot) {
            self.retire(old);
        }
    }

    /// Empties every slot into the activation pool; the attention plan
    /// ends with them.
    fn recycle_slots(&mut self) {
        self.attention_plan = None;
        self.gone.clear();
        for old in self.activations.slots.take_all() {
            self.retire(old);
        }
    }

    /// Stores a kernel's output. Kernels round what they store themselves
    /// in Bf16 mode (the device's modules are built with `ROUND_BF16`; see
    /// `store_act` in common.cuh), so nothing is launched here.
    fn set(&mut self, slot: Slot, shape: Vec<usize>, data: CudaSlice<f32>) -> Result<()> {
        self.store(slot, DevTensor::new(shape, DevData::F32(data)))
    }

    /// Whether a projection's output `slot` is rounded to bf16 in Bf16
    /// mode: all but the router logits, since the gate projection
    /// accumulates in f32 and routing (softmax, top-k, renormalise) is
    /// computed and kept in f32, as DESIGN asks ("softmax over all E in
    /// float32 or better").
    fn rounds_projection(&self, slot: Slot) -> bool {
        self.precision == CudaPrecision::Bf16 && slot != Slot::MoeRouterLogits
    }

    /// Stores a cuBLAS projection's output, rounded to bf16 first (cuBLAS
    /// writes f32) where [`Self::rounds_projection`] says so.
    fn set_projection(&mut self, slot: Slot, shape: Vec<usize>, mut data: CudaSlice<f32>) -> Result<()> {
        if self.rounds_projection(slot) {
            let n = shape.iter().product::<usize>();
            let f = self.kernel(handles::elementwise::ROUND_BF16)?;
            let stream = self.stream();
            let n64 = n as u64;
            let mut b = stream.launch_builder(&f);
            b.arg(&mut data).arg(&n64);
            // SAFETY: data holds n f32, rounded in place.
            unsafe { b.launch(threads(n)) }.map_err(gpu("rounding to bf16"))?;
        }
        self.set(slot, shape, data)
    }

    /// Runs one operation, between two timing events when profiling; `name`
    /// is the stage it computes (the profile is per stage).
    /// `inputs` are the slots it reads (a lazy attention stage among them
    /// is computed first: fused_attention.rs).
    fn timed<R>(&mut self, name: &'static str, inputs: &[Slot], op: impl FnOnce(&mut Self) -> Result<R>) -> Result<R> {
        self.flush_deferred()?;
        self.timed_deferring(name, inputs, op)
    }

    /// [`Self::timed`] for an operation that may share a held-back launch
    /// (deferred.rs), so nothing is flushed first.
    fn timed_deferring<R>(
        &mut self,
        name: &'static str,
        inputs: &[Slot],
        op: impl FnOnce(&mut Self) -> Result<R>,
    ) -> Result<R> {
        self.materialise(inputs)?;
        if !self.launcher.profiling() {
            return op(self);
        }
        let stream = self.stream();
        let host = std::time::Instant::now();
        let start = profile::OpProfiler::event(&stream);
        let result = op(self);
        let end = profile::OpProfiler::event(&stream);
        let host = host.elapsed();
        if let (Some(start), Some(end), Some(p)) = (start, end, self.launcher.profiler()) {
            p.push(name, start, end, host);
        }
        result
    }

    fn kernel(&self, kernel: Kernel) -> Result<cudarc::driver::CudaFunction> {
        self.device.kernel(kernel).map_err(kernel_error)
    }
}

impl CudaBackend {
    fn cache(&self, layer: usize) -> Result<&DevCache> {
        self.caches
            .get(layer)
            .and_then(|c| c.as_ref())
            .filter(|c| c.len == self.start_position + self.t_len)
            .ok_or_else(|| {
                PipelineError::BadInput(format!("the KV cache of layer {layer} was not filled for this step"))
            })
    }
}
