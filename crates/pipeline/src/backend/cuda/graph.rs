//! Decode steps recorded once as a CUDA graph and replayed.
//!
//! A decode step launches about 24 kernels a layer; launched one by one
//! from the host, the GPU waits between them. Recorded once (cudarc's
//! stream capture) and replayed, the step is one launch. What makes the
//! recording valid for later steps:
//!
//! - every per-step value a kernel reads (the step's start position, hence
//!   the number of cached positions; the token) lives in device memory,
//!   written before the step (`step_start`, `tokens`), never a kernel
//!   argument;
//! - grids depend only on the KV caches' capacity (blocks past the current
//!   length exit), and buffers whose size follows the positions are sized
//!   for the capacity;
//! - no allocation inside the step: the capture step runs after an eager
//!   decode step at the same capacity, whose buffers the activation pool
//!   holds, and an allocation the pool cannot serve fails the capture;
//! - the slot table the capture left is the one every replay fills, so
//!   replay skips recycling the slots, and any eager step (any slot written
//!   outside a recording) drops the graph.
//!
//! A replay runs the same kernels with the same arguments as an eager
//! step, so it computes the same bits (GPU tests: Bf16 logits, and every
//! captured tensor, with graphs and with `graphs: false`). Capture reads
//! are recorded too (taps.rs). Graphs are used only in Bf16 mode (F32 mode
//! projects through cuBLAS), without profiling or poisoning, and never
//! with `MOETRACE_NO_GRAPHS` set or `Cuda(graphs: false)`, nor for a model
//! whose kernels take the step's length from the host (MLA: `rule_out`). A capture that
//! fails turns graphs off for the backend's lifetime (with a warning) and
//! the step runs eagerly.

use std::sync::Arc;

use cudarc::driver::CudaStream;
use cudarc::driver::sys::{self, CUstreamCaptureMode};

use super::taps::StepReads;
use super::{CudaBackend, CudaPrecision, gpu};
use crate::backend::{Slot, StepGraph};
use crate::error::{PipelineError, Result};

/// The graph state of a [`CudaBackend`].
pub(super) struct StepGraphs {
    /// Graphs may be used at all (Bf16, no profiler, not turned off).
    enabled: bool,
    /// Never, whatever is asked: the model's kernels take the step's
    /// length from the host (MLA's, cuda/mla.rs).
    ruled_out: bool,
    /// The next `begin_step` may plan a graph ([`CudaBackend::allow_step_graph`]).
    allowed_next: bool,
    /// A capture is in progress: allocations must come from the pool and
    /// no kernel may take the position from the host.
    pub(super) capturing: bool,
    /// What the step begun last does.
    pub(super) plan: StepGraph,
    /// The KV capacity of the step begun last (decode steps that do not
    /// grow the caches).
    capacity: Option<usize>,
    /// The capacity at which the last eager decode step ran without
    /// growing the caches: the pool holds every buffer a capture at that
    /// capacity needs.
    warm: Option<usize>,
    /// The recorded step.
    recorded: Option<Recorded>,
    /// Steps replayed so far.
    pub(super) replays: usize,
    /// `MOETRACE_PROFILE_STEPS`: replays timed on the GPU (profile.rs).
    pub(super) clock: Option<super::profile::ReplayClock>,
}

/// A recorded decode step (the graph and its one instance), the KV
/// capacity it was recorded at and the capture copies it makes.
struct Recorded {
    graph: sys::CUgraph,
    exec: sys::CUgraphExec,
    stream: Arc<CudaStream>,
    capacity: usize,
    /// Dropped after the graph (fields drop after `Drop::drop`): it waits
    /// for the last replay before its memory goes.
    reads: StepReads,
}

impl Recorded {
    /// Instantiates a recorded `graph` (taking it over), its
    /// kernel-to-kernel edges made programmatic first when `programmatic`
    /// (a failure there leaves the edges it did not reach plain, which
    /// changes nothing but speed).
    fn instantiate(
        graph: sys::CUgraph,
        stream: Arc<CudaStream>,
        capacity: usize,
        reads: StepReads,
        programmatic: bool,
    ) -> std::result::Result<Self, String> {
        if programmatic {
            // SAFETY: the graph is ours alone and not instantiated yet.
            if let Err(e) = unsafe { make_edges_programmatic(graph) } {
                tracing::warn!("decode steps replay without programmatic launches: {e}");
            }
        }
        let mut exec = std::ptr::null_mut();
        // SAFETY: a valid graph, instantiated once; on failure it is
        // destroyed here, on success the `Recorded` owns it.
        match unsafe { sys::cuGraphInstantiateWithFlags(&mut exec, graph, 0) }.result() {
            Ok(()) => Ok(Self { graph, exec, stream, capacity, reads }),
            Err(e) => {
                // SAFETY: as above.
                let _ = unsafe { sys::cuGraphDestroy(graph) };
                Err(format!("the driver could not instantiate the recording: {e}"))
            }
        }
    }

    /// Launches the graph, for a step at `start`, on the stream it was
    /// recorded on, once the reads last taken from the half of the reads'
    /// arena it writes have landed (taps.rs). `&mut`: the graph is only
    /// ever used through an exclusive borrow.
    fn launch(&mut self, start: usize) -> Result<()> {
        self.reads.before_replay(start);
        // SAFETY: a live instance of this graph, launched on the stream its
        // kernels were recorded on.
        unsafe { sys::cuGraphLaunch(self.exec, self.stream.cu_stream()) }
            .result()
            .map_err(gpu("replaying the decode step"))?;
        self.reads.replayed(start, &self.stream).map_err(gpu("copying a replay's capture reads to the host"))
    }
}

impl Drop for Recorded {
    fn drop(&mut self) {
        // SAFETY: our own instance and graph, each destroyed once; an error
        // leaves a leak, nothing worse.
        unsafe {
            let _ = sys::cuGraphExecDestroy(self.exec);
            let _ = sys::cuGraphDestroy(self.graph);
        }
    }
}

/// Ends the capture on `stream` (it must leave capture mode whatever
/// happened) and returns the graph it recorded, if any.
fn end_capture(stream: &CudaStream) -> std::result::Result<Option<sys::CUgraph>, String> {
    let mut graph = std::ptr::null_mut();
    // SAFETY: the stream is capturing (begin_graph_capture_on_device) on
    // this thread; the driver hands over the graph it recorded.
    unsafe { sys::cuStreamEndCapture(stream.cu_stream(), &mut graph) }
        .result()
        .map_err(|e| format!("the driver refused the recording: {e}"))?;
    Ok((!graph.is_null()).then_some(graph))
}

/// Makes every kernel-to-kernel edge of `graph` programmatic: each kernel
/// may launch once all blocks of the one before have started; they wait
/// in `PDL_ENTRY` (common.cuh) for it to finish.
///
/// # Safety
/// `graph` must be a valid graph no other thread uses.
unsafe fn make_edges_programmatic(graph: sys::CUgraph) -> std::result::Result<(), String> {
    let check = |r: sys::CUresult, what: &str| r.result().map_err(|e| format!("{what}: {e}"));
    let mut n = 0usize;
    let none = std::ptr::null_mut();
    // SAFETY: every call gets pointers to buffers of n elements, as the
    // driver asks, and nodes of this graph, which the caller owns.
    unsafe {
        check(sys::cuGraphGetEdges_v2(graph, none, none, std::ptr::null_mut(), &mut n), "counting the graph's edges")?;
        let mut from = vec![std::ptr::null_mut(); n];
        let mut to = vec![std::ptr::null_mut(); n];
        let blank = sys::CUgraphEdgeData_st { from_port: 0, to_port: 0, type_: 0, reserved: [0; 5] };
        let mut data = vec![blank; n];
        check(
            sys::cuGraphGetEdges_v2(graph, from.as_mut_ptr(), to.as_mut_ptr(), data.as_mut_ptr(), &mut n),
            "reading the graph's edges",
        )?;
        let is_kernel = |node: sys::CUgraphNode| {
            let mut kind = sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_EMPTY;
            sys::cuGraphNodeGetType(node, &mut kind).result().is_ok()
                && kind == sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_KERNEL
        };
        let programmatic = sys::CUgraphEdgeData_st {
            from_port: sys::CU_GRAPH_KERNEL_NODE_PORT_PROGRAMMATIC as u8,
            to_port: 0,
            type_: sys::CUgraphDependencyType::CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC as u8,
            reserved: [0; 5],
        };
        for i in 0..n {
            if data[i].type_ != 0 || !is_kernel(from[i]) || !is_kernel(to[i]) {
                continue;
            }
            check(sys::cuGraphRemoveDependencies_v2(graph, &from[i], &to[i], &data[i], 1), "removing an edge")?;
            check(
                sys::cuGraphAddDependencies_v2(graph, &from[i], &to[i], &programmatic, 1),
                "adding a programmatic edge",
            )?;
        }
        Ok(())
    }
}

// SAFETY: CUDA graph objects are not internally synchronised and must not
// be used from two threads at once. A `Recorded` is only launched through
// `&mut` (above) and dropped by its owner, so moving it to another thread
// or sharing `&Recorded` (which exposes nothing) cannot race.
unsafe impl Send for Recorded {}
// SAFETY: as above: `&Recorded` gives no access to the graph.
unsafe impl Sync for Recorded {}

impl StepGraphs {
    pub(super) fn new(precision: CudaPrecision, profiling: bool) -> Self {
        let enabled = Self::possible(precision, profiling);
        Self {
            enabled,
            ruled_out: false,
            allowed_next: false,
            capturing: false,
            plan: StepGraph::Eager,
            capacity: None,
            warm: None,
            recorded: None,
            replays: 0,
            clock: super::profile::ReplayClock::from_env(),
        }
    }

    /// The reads of the recorded step, if any.
    pub(super) fn recorded_reads(&self) -> Option<&StepReads> {
        self.recorded.as_ref().map(|r| &r.reads)
    }

    pub(super) fn recorded_reads_mut(&mut self) -> Option<&mut StepReads> {
        self.recorded.as_mut().map(|r| &mut r.reads)
    }

    /// Forgets the recorded step (it is recorded again or not at all).
    pub(super) fn drop_recording(&mut self) {
        self.recorded = None;
    }

    /// Graphs are possible at all: Bf16 (F32 mode projects through
    /// cuBLAS), no profiler and `MOETRACE_NO_GRAPHS` unset (also after
    /// [`super::CudaBackend::set_step_graphs`]).
    fn possible(precision: CudaPrecision, profiling: bool) -> bool {
        precision == CudaPrecision::Bf16 && !profiling && std::env::var_os("MOETRACE_NO_GRAPHS").is_none()
    }

    /// Turns graphs on (where possible) or off, dropping any recording.
    pub(super) fn set_enabled(&mut self, on: bool, precision: CudaPrecision, profiling: bool) {
        self.enabled = on && !self.ruled_out && Self::possible(precision, profiling);
        self.recorded = None;
    }

    /// Turns graphs off for good (a later [`Self::set_enabled`] keeps them
    /// off): the model's kernels cannot be recorded.
    pub(super) fn rule_out(&mut self) {
        self.ruled_out = true;
        self.enabled = false;
        self.recorded = None;
    }

    pub(super) fn allow_next(&mut self) {
        self.allowed_next = true;
    }

    /// A slot was written outside a recording: the slot table is no longer
    /// the one a replay fills, so the recorded step is dropped.
    pub(super) fn slot_written(&mut self) {
        if !self.capturing {
            self.recorded = None;
        }
    }
}

impl CudaBackend {
    /// Decides how the step of `t_len` tokens at `start` runs (called
    /// first thing in `begin_step`).
    pub(super) fn plan_step(&mut self, t_len: usize, start: usize) {
        let allowed = std::mem::take(&mut self.graphs.allowed_next) && self.graphs.enabled && !self.activations.poison;
        let capacity = self.decode_capacity(t_len, start);
        let g = &mut self.graphs;
        g.capacity = capacity;
        g.plan = match capacity {
            Some(c) if allowed && g.recorded.as_ref().is_some_and(|r| r.capacity == c) => StepGraph::Replay,
            Some(c) if allowed && g.warm == Some(c) => StepGraph::Capture,
            _ => StepGraph::Eager,
        };
        if g.plan == StepGraph::Eager {
            // The eager step changes the slot table a graph fills.
            g.recorded = None;
            g.warm = capacity;
        }
    }

    /// Turns the step begun last (planned for a graph) into an eager one.
    pub(super) fn run_step_eagerly(&mut self) {
        self.taps.pending_reads = None;
        let g = &mut self.graphs;
        g.recorded = None;
        g.plan = StepGraph::Eager;
        g.warm = g.capacity;
        self.recycle_slots();
    }

    /// The capacity every layer's KV cache has, when this is a decode step
    /// (one token after the prompt) that grows none of them.
    fn decode_capacity(&self, t_len: usize, start: usize) -> Option<usize> {
        if t_len != 1 || start == 0 || self.caches.is_empty() {
            return None;
        }
        let first = self.caches[0].as_ref()?.capacity;
        let uniform = self.caches.iter().all(|c| c.as_ref().is_some_and(|c| c.capacity == first));
        (uniform && first > start).then_some(first)
    }

    pub(super) fn begin_graph_capture_on_device(&mut self) -> Result<()> {
        if self.graphs.plan != StepGraph::Capture {
            return Err(PipelineError::BadInput("begin_graph_capture without a step planned for capture".into()));
        }
        // Buffers still read by the last eager step's capture copies get
        // stand-ins: the recording may only take buffers from the pool.
        self.activations.pool.stand_in_for_copying(&self.stream()).map_err(gpu("allocating activations"))?;
        self.pool_for_gather_holds()?;
        self.stream()
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(gpu("starting to record the decode step"))?;
        self.graphs.capturing = true;
        Ok(())
    }

    pub(super) fn end_graph_capture_on_device(&mut self, failure: Option<String>) -> Result<bool> {
        if !self.graphs.capturing {
            return Ok(false);
        }
        self.graphs.capturing = false;
        let stream = self.stream();
        let reads = self.taps.pending_reads.take().unwrap_or_default();
        let why = match (failure, end_capture(&stream)) {
            (None, Ok(Some(graph))) => {
                let capacity = self.graphs.capacity.expect("a capture is planned at a known capacity");
                let programmatic = std::env::var_os("MOETRACE_NO_PDL").is_none();
                match Recorded::instantiate(graph, stream, capacity, reads, programmatic) {
                    Ok(recorded) => {
                        self.graphs.recorded = Some(recorded);
                        self.graphs.plan = StepGraph::Replay;
                        return Ok(true);
                    }
                    Err(why) => why,
                }
            }
            (None, Ok(None)) => "the recording was empty".to_string(),
            (None, Err(why)) => why,
            (Some(failure), ended) => {
                if let Ok(Some(graph)) = ended {
                    // SAFETY: the graph just recorded, owned by nobody else.
                    let _ = unsafe { sys::cuGraphDestroy(graph) };
                }
                failure
            }
        };
        tracing::warn!("decode steps run without a CUDA graph from now on: {why}");
        self.graphs.enabled = false;
        self.graphs.plan = StepGraph::Eager;
        Ok(false)
    }

    pub(super) fn replay_step_on_device(&mut self) -> Result<()> {
        let planned = self.graphs.plan == StepGraph::Replay;
        let Some(recorded) = self.graphs.recorded.as_mut().filter(|_| planned) else {
            return Err(PipelineError::BadInput("replay_step without a recorded step planned for replay".into()));
        };
        match self.graphs.clock.as_mut() {
            Some(clock) => clock.around(&self.device.stream().clone(), || recorded.launch(self.start_position))?,
            None => recorded.launch(self.start_position)?,
        }
        self.graphs.replays += 1;
        // What the stage systems would have recorded on the host.
        let p_len = self.start_position + self.t_len;
        for cache in self.caches.iter_mut().flatten() {
            cache.len = p_len;
        }
        for slot in [Slot::AttnScores, Slot::AttnSoftmax] {
            if let Some(t) = self.activations.slots.get_mut(slot).filter(|t| t.shape.len() == 3) {
                t.shape[2] = p_len;
            }
        }
        Ok(())
    }

    /// Fails the capture in progress, if any, with `why` (an operation that
    /// cannot be replayed: it would allocate, or it takes a per-step value
    /// from the host).
    pub(super) fn refuse_in_capture(&self, why: &str) -> Result<()> {
        if self.graphs.capturing {
            return Err(PipelineError::Gpu(format!("recording the decode step: {why}")));
        }
        Ok(())
    }
}
