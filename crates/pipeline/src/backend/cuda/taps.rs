//! Capture reads inside a recorded decode step.
//!
//! Before a step is recorded, [`crate::Forward`] says which slots the
//! scope observers will read at the end of each scope
//! ([`crate::backend::Backend::set_step_reads`]). The recording then holds,
//! after each scope with reads, one `gather_to_host` kernel (kernels-cuda's
//! gather.rs) that copies those slots straight into pinned, device-mapped
//! host memory: each read at a fixed offset, with room for the slot's whole
//! buffer (attention scores are sized for the KV capacity; the kernel copies
//! the step's positions only). Being a kernel on the compute stream, the
//! copy stays in stream order: no copy-stream branch, no edges back into
//! the step, programmatic launches intact.
//!
//! The arena has two halves, and the kernel writes the one its step's
//! position names (start % 2, read from device memory): a decode step's
//! reads land (on a thread of their own, once the replay has finished)
//! while the next step runs, and a replay first waits for the landing of
//! the reads last taken from the half it will write. After each replay the
//! observers run again and read in the recorded order; each read is
//! answered from its copy.

use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaEvent, CudaStream};
use kernels_cuda::gather::{GATHER_MAX, GatherTable, MappedHost, launch_gather};

use super::tensors::DevData;
use super::worker::JobThread;
use super::{Backend, CudaBackend, Slot, gpu, kernel_error};
use crate::backend::StepGraph;
use crate::error::{PipelineError, Result};
use crate::tensor::{HostTensor, PendingTensor};

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
    /// Two halves of `half_len` words each (None when nothing is read).
    arena: Option<MappedHost>,
    half_len: usize,
    /// The half the last replay wrote (its start position % 2).
    half: usize,
    /// After a replay: the tap the next read takes...
    cursor: usize,
    /// ... the reads asked for so far.
    batch: Vec<TapRead>,
    /// Per half: the end of the replay that wrote it last...
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

/// A read of the current replay, for the landing thread.
struct TapRead {
    offset: usize,
    shape: Vec<usize>,
    is_i32: bool,
    done: SyncSender<Result<HostTensor>>,
}

impl StepReads {
    /// Plans `plan`, each read as long as `room(slot)` words (None if
    /// unknown), the arena allocated in the device's context.
    fn new(
        stream: &Arc<CudaStream>,
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
        let arena = if total == 0 {
            None
        } else {
            Some(MappedHost::new(stream.context(), 2 * total).map_err(|e| e.to_string())?)
        };
        let mut reads = Self::default();
        (reads.plan, reads.scope_start, reads.taps, reads.arena, reads.half_len) =
            (plan.to_vec(), scope_start, taps, arena, total);
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

    /// A replay at `start` was launched; `launched` completes when it has
    /// finished.
    pub(super) fn replayed(&mut self, start: usize, launched: Option<Arc<CudaEvent>>) {
        self.half = start % 2;
        self.launched[self.half] = launched;
        self.cursor = 0;
        self.batch.clear();
    }

    /// Whether the replays copy anything (each then records its end).
    pub(super) fn copies_anything(&self) -> bool {
        self.arena.is_some()
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

/// The reads of an eager decode step: each planned read, gathered at its
/// scope's end by a kernel into a staging buffer (or, past the staging
/// pool's limit, read at once).
pub(super) struct EagerReads {
    plan: Vec<Vec<Slot>>,
    taps: Vec<EagerTap>,
    cursor: usize,
    /// Completes when the step (and so every gather) has finished.
    finished: Option<Arc<CudaEvent>>,
}

struct EagerTap {
    slot: Slot,
    copy: EagerCopy,
}

enum EagerCopy {
    Gathered { buffer: MappedHost, shape: Vec<usize>, is_i32: bool },
    Read(HostTensor),
}

impl CudaBackend {
    pub(super) fn set_step_reads_on_device(&mut self, plan: Option<&[Vec<Slot>]>) -> Result<StepGraph> {
        self.graphs.eager_reads = None;
        let Some(plan) = plan else {
            self.run_step_eagerly();
            return Ok(StepGraph::Eager);
        };
        if self.graphs.plan == StepGraph::Eager {
            if self.can_gather_reads() && plan.iter().any(|r| !r.is_empty()) {
                self.graphs.eager_reads =
                    Some(EagerReads { plan: plan.to_vec(), taps: Vec::new(), cursor: 0, finished: None });
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
        match StepReads::new(&stream, plan, |slot| self.slot_lens[slot.index()]) {
            Ok(reads) => {
                self.graphs.pending_reads = Some(reads);
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
        if let Some(mut reads) = self.graphs.eager_reads.take() {
            let result = self.gather_eager(&mut reads, scope);
            self.graphs.eager_reads = Some(reads);
            return result;
        }
        if !self.graphs.capturing {
            return Err(PipelineError::BadInput("record_scope_reads outside a recording".into()));
        }
        let Some(mut reads) = self.graphs.pending_reads.take() else {
            return Err(PipelineError::BadInput("record_scope_reads without planned reads".into()));
        };
        let result = self.record_reads(&mut reads, scope);
        self.graphs.pending_reads = Some(reads);
        result
    }

    /// The slots `plan` reads at the end of `scope`; none: nothing to do
    /// (and no flush of a held-back launch, so launches stay as without
    /// capture).
    fn scope_reads(&mut self, plan: &[Vec<Slot>], scope: usize) -> Result<Vec<Slot>> {
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

    /// Records the gather of `scope`'s reads into the arena.
    fn record_reads(&mut self, reads: &mut StepReads, scope: usize) -> Result<()> {
        let slots = self.scope_reads(&reads.plan, scope)?;
        let first = reads.scope_start[scope];
        let base = reads.arena.as_ref().map_or(0, MappedHost::device_ptr);
        let mut entries = Vec::with_capacity(slots.len());
        for (k, &slot) in (first..first + slots.len()).zip(&slots) {
            let t = self.slot(slot)?;
            // Scores and probabilities [nh, 1, P] copy the step's P.
            let by_position = matches!(slot, Slot::AttnScores | Slot::AttnSoftmax) && t.shape.len() == 3;
            let len = if by_position { t.shape[0] * t.shape[1] } else { t.numel() };
            let tap = &mut reads.taps[k];
            if t.buffer_len() > tap.room {
                let why = format!("`{slot}` holds {} values where {} were planned", t.buffer_len(), tap.room);
                return Err(PipelineError::Gpu(format!("recording the decode step: {why}")));
            }
            (tap.shape, tap.is_i32) = (t.shape.clone(), matches!(t.data, DevData::I32(_)));
            entries.push((slot, base + 4 * tap.offset as u64, len, by_position));
        }
        // SAFETY: each entry's source is a slot buffer of at least its
        // length (by position: nh * P <= nh * capacity, the buffer's
        // length), and its offset plus room is within each half of the
        // arena, which lives as long as the recording (StepReads::drop).
        unsafe { self.gather(&entries, 4 * reads.half_len) }
    }

    /// Gathers `scope`'s reads of an eager decode step into staging buffers.
    fn gather_eager(&mut self, reads: &mut EagerReads, scope: usize) -> Result<()> {
        let slots = self.scope_reads(&reads.plan, scope)?;
        let ctx = self.device.context().clone();
        let mut entries = Vec::with_capacity(slots.len());
        for slot in slots {
            let t = self.slot(slot)?;
            let (numel, shape, is_i32) = (t.numel(), t.shape.clone(), matches!(t.data, DevData::I32(_)));
            let copy = match self.staging.pool.take(&ctx, numel)? {
                Some(buffer) => {
                    entries.push((slot, buffer.device_ptr(), numel, false));
                    EagerCopy::Gathered { buffer, shape, is_i32 }
                }
                // Past the staging pool's limit: read now.
                None => EagerCopy::Read(self.read(slot)?),
            };
            reads.taps.push(EagerTap { slot, copy });
        }
        // SAFETY: each entry copies its slot's numel words into a staging
        // buffer of at least that many, which stays out of the pool until
        // the step has finished and the landing thread has read it.
        unsafe { self.gather(&entries, 0) }
    }

    /// Launches `gather_to_host` for `entries` (slot, destination, length,
    /// by position), a table of at most `GATHER_MAX` at a time.
    ///
    /// # Safety
    /// As [`launch_gather`]'s, for every entry.
    unsafe fn gather(&self, entries: &[(Slot, u64, usize, bool)], half_bytes: usize) -> Result<()> {
        for chunk in entries.chunks(GATHER_MAX) {
            let mut table = GatherTable::default();
            for &(slot, dst, len, by_position) in chunk {
                match &self.slot(slot)?.data {
                    DevData::F32(d) => table.push(d, dst, len, by_position),
                    DevData::I32(d) => table.push(d, dst, len, by_position),
                };
            }
            // SAFETY: the caller's promise.
            unsafe { launch_gather(&self.device, &table, half_bytes, &self.step_start) }.map_err(kernel_error)?;
        }
        Ok(())
    }

    /// The step's scopes have run (or its replay was launched): the scope
    /// observers' reads come next, answered from the copies.
    pub(super) fn observe_step_reads_on_device(&mut self) -> Result<()> {
        if let Some(reads) = self.graphs.eager_reads.as_mut() {
            let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_BLOCKING_SYNC);
            let finished = self.device.stream().record_event(flags).map_err(gpu("recording a step's end"))?;
            reads.finished = Some(Arc::new(finished));
        }
        self.graphs.observing = true;
        Ok(())
    }

    /// A scope observer's read after the step: the next copy.
    pub(super) fn read_copied(&mut self, slot: Slot) -> Result<PendingTensor> {
        let Some(reads) = self.graphs.eager_reads.as_mut() else { return self.read_replayed(slot) };
        let Some(tap) = reads.taps.get_mut(reads.cursor) else {
            return Err(PipelineError::BadInput(format!(
                "a scope observer read `{slot}` after the step's last planned read: observers must read what the \
                 probe said"
            )));
        };
        if tap.slot != slot {
            return Err(PipelineError::BadInput(format!(
                "a scope observer read `{slot}` where the step copied `{}`: observers must read what the probe said",
                tap.slot
            )));
        }
        reads.cursor += 1;
        let copy = std::mem::replace(&mut tap.copy, EagerCopy::Read(HostTensor::f32(vec![0], Vec::new())));
        let (buffer, shape, is_i32) = match copy {
            EagerCopy::Read(t) => return Ok(PendingTensor::ready(t)),
            EagerCopy::Gathered { buffer, shape, is_i32 } => (buffer, shape, is_i32),
        };
        let landed = reads.finished.clone().ok_or_else(|| PipelineError::Gpu("a read before the step's end".into()))?;
        let bytes = shape.iter().product::<usize>() * 4;
        let (done, result) = sync_channel(1);
        let ctx = self.device.context().clone();
        self.staging.send(&ctx, super::staging::Landing { landed, buffer, shape, is_i32, done })?;
        Ok(PendingTensor::copying(bytes, move || {
            result.recv().unwrap_or_else(|_| Err(PipelineError::Gpu("the capture landing thread stopped".into())))
        }))
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
        self.graphs.observing = false;
        if let Some(reads) = self.graphs.eager_reads.take() {
            if let Some(finished) = &reads.finished {
                finished.synchronize().map_err(gpu("waiting for a step's end"))?;
            }
            for tap in reads.taps {
                if let EagerCopy::Gathered { buffer, .. } = tap.copy {
                    self.staging.pool.give_back(buffer);
                }
            }
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
        self.graphs.lander.send(job)
    }
}
