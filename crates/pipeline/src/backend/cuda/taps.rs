//! Capture reads inside a recorded decode step.
//!
//! Before a step is recorded, [`crate::Forward`] says which slots the
//! scope observers will read at the end of each scope
//! ([`crate::backend::StepRecorder::set_step_reads`]). The recording then ends
//! with `gather_words` kernels (kernels-cuda's gather.rs, one launch per 32
//! reads) that copy those slots into a device arena: each read at a fixed
//! offset, with room for the slot's whole buffer (attention scores are
//! sized for the KV capacity; the kernel copies the step's positions
//! only). The tensors read are held out of the activation pool until the
//! recording ends, so no later stage of the step reuses their buffers (the
//! pool gets one more buffer per read before recording, since a recording
//! may not allocate). Being kernels on the compute stream, the gathers stay
//! in stream order: no cross-stream edges in the graph, programmatic
//! launches intact. After each replay the copy stream moves the arena's
//! half to pinned host memory, one copy a step.
//!
//! Measured on an H200 (48 layers, bisect-style selection: 144 reads a
//! step): one gather launch per scope cost 60 us of GPU time a step (about
//! 1.2 us a launch between programmatic launches), and gathering straight
//! into mapped host memory put PCIe writes on the step's critical path; at
//! the step's end into device memory, a replay takes 4377-4380 us on the
//! GPU against 4370 with nothing captured.
//!
//! The arenas have two halves, and the kernel writes the one its step's
//! position names (start % 2, read from device memory): a decode step's
//! reads land (on a thread of their own, once their copy has finished)
//! while the next step runs, and a replay first waits for the landing of
//! the reads last taken from the half it will write. After each replay the
//! observers run again and read in the recorded order; each read is
//! answered from its copy. Eager decode steps plan their reads the same
//! way and gather them scope by scope (eager_reads.rs).

use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaEvent, CudaSlice, CudaStream, DevicePtr, DriverError};
use kernels_cuda::gather::{GATHER_MAX, GatherTable, MappedHost, launch_gather};

use super::eager_reads::EagerReads;
use super::tensors::{DevData, DevTensor};
use super::worker::JobThread;
use super::{CudaBackend, Slot, gpu, kernel_error};
use crate::backend::StepGraph;
use crate::error::{PipelineError, Result};
use crate::tensor::{HostTensor, PendingTensor};

/// Capture taps: how the capture observers' reads leave a step, however
/// it runs. An eager read is copied through pinned staging buffers
/// (staging.rs); an eager decode step gathers its planned reads scope by
/// scope (eager_reads.rs); a recorded step's reads are gathered into its
/// arena and landed after each replay ([`StepReads`], [`Lander`]). The
/// graph record/replay (graph.rs) only tells the taps when a recording
/// begins and ends and when a replay ran.
#[derive(Default)]
pub(super) struct Taps {
    /// The reads planned for the step being recorded.
    pub(super) pending_reads: Option<StepReads>,
    /// After a replay, until its observers are done: reads are answered
    /// from the recorded copies.
    pub(super) observing: bool,
    /// Lands replays' reads.
    pub(super) lander: Lander,
    /// The reads an eager decode step gathers (eager_reads.rs).
    pub(super) eager_reads: Option<EagerReads>,
    /// Eager steps' reads whose copies may still run (eager_reads.rs).
    pub(super) retired_reads: Vec<EagerReads>,
    /// Tensors a recording's gathers read at the step's end, kept out of
    /// the pool until the recording ends.
    pub(super) gather_held: Vec<DevTensor>,
    /// Pinned staging buffers and the thread that lands eager reads
    /// (staging.rs); dropped last, after the reads that use its buffers.
    pub(super) staging: super::staging::Staging,
}

/// The most pinned memory one recording's reads may take (both halves);
/// past it the step runs eagerly.
const ARENA_LIMIT_BYTES: usize = 4 << 30;

/// The reads a recorded step makes: planned before recording, placed while
/// recording, answered after each replay. The default reads nothing.
#[derive(Default)]
pub(super) struct StepReads {
    /// Per scope, the slots its observers read, in order.
    plan: Vec<Vec<Slot>>,
    /// Where the first tap of each scope is in `taps`.
    scope_start: Vec<usize>,
    /// In plan order.
    taps: Vec<Tap>,
    /// Two halves of `half_len` words each on the device, which the
    /// recording's gathers write...
    device: Option<CudaSlice<u32>>,
    /// ... and in pinned host memory, which the copy stream fills from
    /// them after each replay (None when nothing is read).
    arena: Option<MappedHost>,
    copy: Option<Arc<CudaStream>>,
    half_len: usize,
    /// The half the last replay wrote (its start position % 2).
    half: usize,
    /// While recording: the gathers queued for the step's end.
    queued: Vec<QueuedGather>,
    /// After a replay: the tap the next read takes...
    cursor: usize,
    /// ... the reads asked for so far.
    batch: Vec<TapRead>,
    /// Per half: the end of the copy of the replay that wrote it last...
    launched: [Option<Arc<CudaEvent>>; 2],
    /// ... and the landing of its reads, if not waited for yet (in a mutex
    /// only so that the backend is Sync; one thread uses it).
    landing: [Option<Mutex<Receiver<()>>>; 2],
}

/// One recorded copy.
struct Tap {
    slot: Slot,
    /// In words, into a half of the arena.
    offset: usize,
    /// Words planned for it (the slot's buffer length when planned).
    room: usize,
    /// The slot's shape when recorded.
    shape: Vec<usize>,
    is_i32: bool,
}

/// A gather a recording launches at the step's end: `len` words (times
/// the step's positions when `by_position`) from device address `src` to
/// `dst` in the device arena's first half (the kernel picks the half).
struct QueuedGather {
    src: u64,
    dst: u64,
    len: usize,
    by_position: bool,
}

/// A read of the current replay, for the landing thread.
struct TapRead {
    offset: usize,
    shape: Vec<usize>,
    is_i32: bool,
    done: SyncSender<Result<HostTensor>>,
}

impl StepReads {
    /// Plans `plan`, each read as long as `room(slot)` words (None if
    /// unknown), the arenas allocated on `stream` (the compute stream) and
    /// in its context; `copy` moves the reads to the host.
    fn new(
        stream: &Arc<CudaStream>,
        copy: &Arc<CudaStream>,
        plan: &[Vec<Slot>],
        room: impl Fn(Slot) -> Option<usize>,
    ) -> std::result::Result<Self, String> {
        let (mut taps, mut scope_start, mut total) = (Vec::new(), Vec::new(), 0usize);
        for slots in plan {
            scope_start.push(taps.len());
            for &slot in slots {
                let room = room(slot).ok_or_else(|| format!("`{slot}` has not been computed in a decode step yet"))?;
                taps.push(Tap { slot, offset: total, room, shape: Vec::new(), is_i32: false });
                total += room;
            }
        }
        if 2 * total * 4 > ARENA_LIMIT_BYTES {
            return Err(format!("the reads take {:.1} GB of pinned memory", (2 * total * 4) as f64 / 1e9));
        }
        let mut reads = Self::default();
        if total > 0 {
            reads.arena = Some(MappedHost::new(stream.context(), 2 * total).map_err(|e| e.to_string())?);
            reads.device = Some(stream.alloc_zeros::<u32>(2 * total).map_err(|e| e.to_string())?);
            reads.copy = Some(copy.clone());
        }
        (reads.plan, reads.scope_start, reads.taps, reads.half_len) = (plan.to_vec(), scope_start, taps, total);
        Ok(reads)
    }

    pub(super) fn matches(&self, plan: &[Vec<Slot>]) -> bool {
        // A recording without reads serves any plan without reads.
        let empty = |p: &[Vec<Slot>]| p.iter().all(Vec::is_empty);
        self.plan == plan || (empty(&self.plan) && empty(plan))
    }

    /// Waits until the reads last taken from `half` have landed.
    fn wait_landed(&mut self, half: usize) {
        if let Some(landing) = self.landing[half].take() {
            // An error means the landing thread is gone: nothing reads the
            // arena any more.
            let _ = landing.into_inner().unwrap_or_else(|e| e.into_inner()).recv();
        }
    }

    /// Before a replay at start position `start`: waits for the landing of
    /// the reads last taken from the half it will write.
    pub(super) fn before_replay(&mut self, start: usize) {
        self.wait_landed(start % 2);
    }

    /// A replay at `start` was launched on `compute`: the copy stream, once
    /// the replay has finished, moves the half of the device arena it
    /// wrote to the same half of the host arena (one copy a step, off the
    /// compute stream: the gathers wrote device memory, so the step never
    /// waits on PCIe).
    pub(super) fn replayed(&mut self, start: usize, compute: &Arc<CudaStream>) -> std::result::Result<(), DriverError> {
        self.half = start % 2;
        self.cursor = 0;
        self.batch.clear();
        self.launched[self.half] = None;
        let (Some(device), Some(arena), Some(copy)) = (&self.device, &self.arena, &self.copy) else { return Ok(()) };
        let (from, len) = (self.half * self.half_len, self.half_len);
        copy.wait(&compute.record_event(None)?)?;
        // SAFETY: the host half is `len` words of the arena, which lives as
        // long as `self`; nothing reads it until the copy's event has
        // completed (the landing thread waits for it), and the copy into it
        // before this one was waited for (`before_replay`) or nobody reads
        // it (no landing) and copies run in order on the one copy stream.
        let dst = unsafe { std::slice::from_raw_parts_mut((arena.host_ptr() as *mut u32).add(from), len) };
        copy.memcpy_dtoh(&device.slice(from..from + len), dst)?;
        let landed = copy.record_event(Some(CUevent_flags::CU_EVENT_BLOCKING_SYNC))?;
        self.launched[self.half] = Some(Arc::new(landed));
        Ok(())
    }
}

impl Drop for StepReads {
    fn drop(&mut self) {
        // The arena is freed below: every replay's copies must be done and
        // landed.
        for half in 0..2 {
            self.wait_landed(half);
            if let Some(launched) = &self.launched[half] {
                let _ = launched.synchronize();
            }
        }
    }
}

/// The thread that lands replays' reads: waits for the replay to finish,
/// copies each read out of the arena, and says when it is done.
#[derive(Default)]
pub(super) struct Lander(JobThread<LandingJob>);

struct LandingJob {
    launched: Arc<CudaEvent>,
    /// The arena's first element; it outlives the job (`StepReads` waits
    /// for `done` before the arena is written again or freed).
    arena: usize,
    reads: Vec<TapRead>,
    done: SyncSender<()>,
}

impl Lander {
    fn send(&mut self, job: LandingJob) -> Result<()> {
        self.0.send("moetrace-replay-landing", job, land_replays)
    }
}

fn land_replays(jobs: Receiver<LandingJob>) {
    while let Ok(job) = jobs.recv() {
        let finished = job.launched.synchronize().map_err(|e| e.to_string());
        for read in job.reads {
            let numel: usize = read.shape.iter().product();
            let finished = finished
                .clone()
                .map_err(|e| PipelineError::Gpu(format!("waiting for a replayed step's capture copies: {e}")));
            let tensor = finished.map(|()| {
                // SAFETY: the replay has finished, so the copies into the
                // arena are complete; offset + numel is within the arena
                // (checked when the read was taken), which outlives the job.
                let values = unsafe { std::slice::from_raw_parts((job.arena as *const f32).add(read.offset), numel) };
                if read.is_i32 {
                    HostTensor::i32(read.shape, values.iter().map(|v| v.to_bits() as i32).collect())
                } else {
                    HostTensor::f32(read.shape, values.to_vec())
                }
            });
            // The receiver may have been dropped (a run that failed).
            let _ = read.done.send(tensor);
        }
        let _ = job.done.send(());
    }
}

impl CudaBackend {
    pub(super) fn set_step_reads_on_device(&mut self, plan: Option<&[Vec<Slot>]>) -> Result<StepGraph> {
        self.taps.eager_reads = None;
        let Some(plan) = plan else {
            self.run_step_eagerly();
            return Ok(StepGraph::Eager);
        };
        if self.graphs.plan == StepGraph::Eager {
            if self.can_gather_reads() && plan.iter().any(|r| !r.is_empty()) {
                self.taps.eager_reads = Some(EagerReads::new(plan));
            }
            return Ok(StepGraph::Eager);
        }
        if self.graphs.plan == StepGraph::Replay {
            if self.graphs.recorded_reads().is_some_and(|r| r.matches(plan)) {
                return Ok(StepGraph::Replay);
            }
            // The observers read other slots than the recording copies:
            // record the step again, from an empty slot table.
            self.graphs.drop_recording();
            self.recycle_slots();
            self.graphs.plan = StepGraph::Capture;
        }
        let stream = self.stream();
        let copy = self.device.copy_stream().clone();
        match StepReads::new(&stream, &copy, plan, |slot| self.activations.slots.buffer_len(slot)) {
            Ok(reads) => {
                self.taps.pending_reads = Some(reads);
                Ok(StepGraph::Capture)
            }
            Err(why) => {
                tracing::warn!("this decode step runs eagerly: {why}");
                self.run_step_eagerly();
                Ok(StepGraph::Eager)
            }
        }
    }

    /// After a replay launched ahead of the probe: whether the recording
    /// copies `reads`. If not, the replay is let finish (nothing of it is
    /// read: its copies are dropped) and counted out, so that the step can
    /// begin again and be recorded anew.
    pub(super) fn keep_replay_on_device(&mut self, reads: Option<&[Vec<Slot>]>) -> Result<bool> {
        let same = reads.is_some_and(|r| self.graphs.recorded_reads().is_some_and(|rec| rec.matches(r)));
        if !same {
            self.end_step_reads_on_device()?;
            self.stream().synchronize().map_err(gpu("finishing a replay whose reads changed"))?;
            self.graphs.replays -= 1;
        }
        Ok(same)
    }

    /// Decode steps gather their reads by kernel (small tensors: one launch
    /// a scope costs less than a copy each); a prompt's are copied.
    pub(super) fn can_gather_reads(&self) -> bool {
        self.t_len == 1
    }

    pub(super) fn record_scope_reads_on_device(&mut self, scope: usize) -> Result<()> {
        if let Some(mut reads) = self.taps.eager_reads.take() {
            let result = self.gather_eager(&mut reads, scope);
            self.taps.eager_reads = Some(reads);
            return result;
        }
        if !self.graphs.capturing {
            return Err(PipelineError::BadInput("record_scope_reads outside a recording".into()));
        }
        let Some(mut reads) = self.taps.pending_reads.take() else {
            return Err(PipelineError::BadInput("record_scope_reads without planned reads".into()));
        };
        let result = self.record_reads(&mut reads, scope);
        self.taps.pending_reads = Some(reads);
        result
    }

    /// The slots `plan` reads at the end of `scope`; none: nothing to do
    /// (and no flush of a held-back launch, so launches stay as without
    /// capture).
    pub(super) fn scope_reads(&mut self, plan: &[Vec<Slot>], scope: usize) -> Result<Vec<Slot>> {
        let slots = plan
            .get(scope)
            .cloned()
            .ok_or_else(|| PipelineError::BadInput(format!("scope {scope} is not in the step's planned reads")))?;
        if !slots.is_empty() {
            self.flush_deferred()?;
            self.materialise(&slots)?;
        }
        Ok(slots)
    }

    /// Queues the gather of `scope`'s reads into the device arena, for
    /// the end of the recorded step ([`Self::launch_queued_gathers`]): one
    /// launch per 32 reads instead of one per scope (each launch in the
    /// step cost about 1.2 us of GPU time with programmatic launches: 60 us
    /// a step for a bisect-style selection of 48 layers on an H200). The
    /// tensors read stay out of the pool until the recording ends, so no
    /// later stage of the step writes over them.
    fn record_reads(&mut self, reads: &mut StepReads, scope: usize) -> Result<()> {
        let slots = self.scope_reads(&reads.plan, scope)?;
        let first = reads.scope_start[scope];
        let stream = self.stream();
        let base = reads.device.as_ref().map_or(0, |d| d.device_ptr(&stream).0);
        for (k, &slot) in (first..first + slots.len()).zip(&slots) {
            let t = self
                .activations
                .slots
                .get_mut(slot)
                .ok_or_else(|| PipelineError::BadInput(format!("stage `{slot}` has not been computed")))?;
            // Scores and probabilities [nh, 1, P] copy the step's P.
            let by_position = matches!(slot, Slot::AttnScores | Slot::AttnSoftmax) && t.shape.len() == 3;
            let len = if by_position { t.shape[0] * t.shape[1] } else { t.numel() };
            let tap = &mut reads.taps[k];
            if t.buffer_len() > tap.room {
                let why = format!("`{slot}` holds {} values where {} were planned", t.buffer_len(), tap.room);
                return Err(PipelineError::Gpu(format!("recording the decode step: {why}")));
            }
            (tap.shape, tap.is_i32) = (t.shape.clone(), matches!(t.data, DevData::I32(_)));
            let src = match &t.data {
                DevData::F32(d) => d.device_ptr(&stream).0,
                DevData::I32(d) => d.device_ptr(&stream).0,
            };
            t.gather_hold = true;
            reads.queued.push(QueuedGather { src, dst: base + 4 * tap.offset as u64, len, by_position });
        }
        Ok(())
    }

    /// At the end of a recording: launches the gathers its scopes queued.
    pub(super) fn launch_queued_gathers(&mut self) -> Result<()> {
        let Some(reads) = self.taps.pending_reads.as_mut().filter(|_| self.graphs.capturing) else { return Ok(()) };
        let half_bytes = 4 * reads.half_len;
        for chunk in std::mem::take(&mut reads.queued).chunks(GATHER_MAX) {
            let mut table = GatherTable::default();
            for g in chunk {
                table.push_address(g.src, g.dst, g.len, g.by_position);
            }
            // SAFETY: each source is a slot buffer of at least its length
            // (by position: nh * P <= nh * capacity, the buffer's length),
            // held out of the pool until the recording ends; its offset plus
            // room is within each half of the arena, which lives as long as
            // the recording (StepReads::drop).
            unsafe { launch_gather(&self.device, &table, half_bytes, &self.step_start) }.map_err(kernel_error)?;
        }
        Ok(())
    }

    /// Before recording a step: one more buffer in the pool for each
    /// planned read, as long as the slot's last one, so that the recording
    /// can take all it needs from the pool while the tensors its gathers
    /// read are held out of it.
    pub(super) fn pool_for_gather_holds(&mut self) -> Result<()> {
        let Some(reads) = self.taps.pending_reads.as_ref() else { return Ok(()) };
        let stream = self.stream();
        let mut extra = Vec::with_capacity(reads.taps.len());
        for tap in &reads.taps {
            // SAFETY: pool buffers are written whole before they are read.
            let data = unsafe {
                if tap.slot.element_type() == "int32" {
                    DevData::I32(stream.alloc::<i32>(tap.room).map_err(gpu("allocating activations"))?)
                } else {
                    DevData::F32(stream.alloc::<f32>(tap.room).map_err(gpu("allocating activations"))?)
                }
            };
            extra.push(DevTensor::new(Vec::new(), data));
        }
        for t in extra {
            self.activations.pool.recycle(t);
        }
        Ok(())
    }

    /// After a recording (made or failed): the tensors its gathers read go
    /// back to the pool.
    pub(super) fn release_gather_holds(&mut self) {
        for t in self.activations.slots.iter_mut() {
            t.gather_hold = false;
        }
        for mut t in std::mem::take(&mut self.taps.gather_held) {
            t.gather_hold = false;
            self.activations.pool.recycle(t);
        }
    }

    /// The step's scopes have run (or its replay was launched): the scope
    /// observers' reads come next, answered from the copies.
    pub(super) fn observe_step_reads_on_device(&mut self) -> Result<()> {
        self.copy_eager_reads()?;
        self.taps.observing = true;
        Ok(())
    }

    /// A scope observer's read after a replay: the next recorded copy.
    pub(super) fn read_replayed(&mut self, slot: Slot) -> Result<PendingTensor> {
        let p_len = self.start_position + self.t_len;
        let reads = self
            .graphs
            .recorded_reads_mut()
            .ok_or_else(|| PipelineError::BadInput(format!("reading `{slot}` after a replay without a recording")))?;
        let Some(tap) = reads.taps.get(reads.cursor) else {
            return Err(PipelineError::BadInput(format!(
                "a scope observer read `{slot}` after the recorded step's last copy: observers must read the same \
                 stages at every decode step"
            )));
        };
        if tap.slot != slot {
            return Err(PipelineError::BadInput(format!(
                "a scope observer read `{slot}` where the recorded step copied `{}`: observers must read the same \
                 stages at every decode step",
                tap.slot
            )));
        }
        let mut shape = tap.shape.clone();
        if matches!(slot, Slot::AttnScores | Slot::AttnSoftmax) && shape.len() == 3 {
            // [nh, 1, P]: P grows each step.
            shape[2] = p_len;
        }
        let numel: usize = shape.iter().product();
        if numel > tap.room {
            return Err(PipelineError::Gpu(format!("`{slot}` holds {numel} values, its copy {}", tap.room)));
        }
        // The half the replay just launched wrote.
        let half = reads.half;
        let (done, result) = sync_channel(1);
        reads.batch.push(TapRead { offset: half * reads.half_len + tap.offset, shape, is_i32: tap.is_i32, done });
        reads.cursor += 1;
        Ok(PendingTensor::copying(numel * 4, move || {
            result.recv().unwrap_or_else(|_| Err(PipelineError::Gpu("the replay landing thread stopped".into())))
        }))
    }

    /// After the observers: hands a replay's reads to the landing thread;
    /// puts back what an eager step gathered and nobody read.
    pub(super) fn end_step_reads_on_device(&mut self) -> Result<()> {
        self.taps.observing = false;
        if let Some(reads) = self.taps.eager_reads.take() {
            // Its device buffers and any staging buffer nobody read are
            // released once its copies have finished, without waiting here
            // (the copies may queue behind a prompt's on the copy stream).
            self.taps.retired_reads.push(reads);
            let pool = &self.taps.staging.pool;
            self.taps.retired_reads.retain_mut(|r| !r.release_if_copied(pool));
            return Ok(());
        }
        let Some(reads) = self.graphs.recorded_reads_mut() else { return Ok(()) };
        if reads.batch.is_empty() {
            return Ok(());
        }
        let half = reads.half;
        let (Some(launched), Some(arena)) = (reads.launched[half].clone(), reads.arena.as_ref()) else {
            return Err(PipelineError::Gpu("a replay's reads without its copies".into()));
        };
        let arena = arena.host_ptr() as usize;
        let (done, landing) = sync_channel(1);
        let job = LandingJob { launched, arena, reads: std::mem::take(&mut reads.batch), done };
        reads.landing[half] = Some(Mutex::new(landing));
        self.taps.lander.send(job)
    }
}
