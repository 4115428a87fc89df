//! Capture reads of an eager decode step (one the backend does not
//! record: the first decode steps, before a graph is recorded, or every
//! step with graphs off). Each scope's reads are gathered at the scope's
//! end by a kernel into device buffers of their own; after the step, one
//! wait on the copy stream and a copy each into pinned staging buffers;
//! the observers' reads are answered from those (taps.rs plans them the
//! same way as a recording's).

use std::sync::Arc;
use std::sync::mpsc::sync_channel;

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaEvent, CudaSlice, DevicePtr};
use kernels_cuda::gather::{GATHER_MAX, GatherTable, MappedHost, launch_gather};

use super::staging::StagingPool;
use super::tensors::DevData;
use super::{Backend, CudaBackend, Slot, gpu, kernel_error};
use crate::error::{PipelineError, Result};
use crate::tensor::{HostTensor, PendingTensor};

/// The reads of an eager decode step: each planned read, gathered at its
/// scope's end by a kernel into a device buffer of its own, then, after
/// the step, copied on the copy stream into a staging buffer (or, past the
/// staging pool's limit, read at once).
pub(super) struct EagerReads {
    plan: Vec<Vec<Slot>>,
    taps: Vec<EagerTap>,
    cursor: usize,
    /// Per gathered tap, in order: its device buffer, freed once the copies
    /// have finished.
    staged: Vec<CudaSlice<u32>>,
    /// Completes when the copies to the staging buffers have finished.
    finished: Option<Arc<CudaEvent>>,
}

struct EagerTap {
    slot: Slot,
    copy: EagerCopy,
}

impl EagerReads {
    /// Reads planned as `plan` (per scope, the slots its observers read).
    pub(super) fn new(plan: &[Vec<Slot>]) -> Self {
        Self { plan: plan.to_vec(), taps: Vec::new(), cursor: 0, staged: Vec::new(), finished: None }
    }

    /// Once the step's copies have finished: puts back the staging buffers
    /// nobody read and frees the device buffers; true then.
    pub(super) fn release_if_copied(&mut self, pool: &StagingPool) -> bool {
        if self.finished.as_ref().is_some_and(|f| !f.is_complete()) {
            return false;
        }
        for tap in self.taps.drain(..) {
            if let EagerCopy::Gathered { buffer, .. } = tap.copy {
                pool.give_back(buffer);
            }
        }
        self.staged.clear();
        true
    }
}

impl Drop for EagerReads {
    fn drop(&mut self) {
        // The device buffers are freed below, after the copies reading them.
        if let Some(finished) = &self.finished {
            let _ = finished.synchronize();
        }
    }
}

enum EagerCopy {
    /// In `staged[staged]` on the device; `buffer` once copied.
    Gathered {
        buffer: MappedHost,
        staged: usize,
        shape: Vec<usize>,
        is_i32: bool,
    },
    Read(HostTensor),
}

impl CudaBackend {
    /// Gathers `scope`'s reads of an eager decode step into device buffers
    /// of their own (copied to staging buffers after the step).
    pub(super) fn gather_eager(&mut self, reads: &mut EagerReads, scope: usize) -> Result<()> {
        let slots = self.scope_reads(&reads.plan, scope)?;
        let (ctx, stream) = (self.device.context().clone(), self.stream());
        let mut entries = Vec::with_capacity(slots.len());
        for slot in slots {
            let t = self.slot(slot)?;
            let (numel, shape, is_i32) = (t.numel(), t.shape.clone(), matches!(t.data, DevData::I32(_)));
            let copy = match self.taps.staging.pool.take(&ctx, numel)? {
                Some(buffer) => {
                    // SAFETY: the gather below writes all numel words before
                    // anything reads them.
                    let staged = unsafe { stream.alloc::<u32>(numel.max(1)) }.map_err(gpu("staging a capture read"))?;
                    entries.push((slot, staged.device_ptr(&stream).0, numel, false));
                    reads.staged.push(staged);
                    EagerCopy::Gathered { buffer, staged: reads.staged.len() - 1, shape, is_i32 }
                }
                // Past the staging pool's limit: read now.
                None => EagerCopy::Read(self.read(slot)?),
            };
            reads.taps.push(EagerTap { slot, copy });
        }
        // SAFETY: each entry copies its slot's numel words into a device
        // buffer of that many, which lives until the step's copies have
        // finished (`end_step_reads_on_device`).
        unsafe { self.gather(&entries, 0) }
    }

    /// Launches `gather_words` for `entries` (slot, destination, length,
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

    /// After an eager step's scopes: one wait for the step on the copy
    /// stream, then every gathered read's copy to its staging buffer (the
    /// gathers wrote device memory: the step did not wait on PCIe).
    pub(super) fn copy_eager_reads(&mut self) -> Result<()> {
        let Some(reads) = self.taps.eager_reads.as_mut() else { return Ok(()) };
        let (compute, copy) = (self.device.stream(), self.device.copy_stream());
        let ready = compute.record_event(None).map_err(gpu("recording a step's end"))?;
        copy.wait(&ready).map_err(gpu("ordering a step's capture copies"))?;
        for tap in &reads.taps {
            if let EagerCopy::Gathered { buffer, staged, .. } = &tap.copy {
                let src = &reads.staged[*staged];
                // SAFETY: the staging buffer holds at least the staged
                // buffer's words, and nothing reads it until `finished`
                // has completed (the landing thread waits for it).
                let dst = unsafe { std::slice::from_raw_parts_mut(buffer.host_ptr() as *mut u32, src.len()) };
                copy.memcpy_dtoh(src, dst).map_err(gpu("copying a step's capture reads"))?;
            }
        }
        let finished = copy
            .record_event(Some(CUevent_flags::CU_EVENT_BLOCKING_SYNC))
            .map_err(gpu("recording a step's capture copies"))?;
        reads.finished = Some(Arc::new(finished));
        Ok(())
    }

    /// A scope observer's read after the step: the next copy.
    pub(super) fn read_copied(&mut self, slot: Slot) -> Result<PendingTensor> {
        let Some(reads) = self.taps.eager_reads.as_mut() else { return self.read_replayed(slot) };
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
            EagerCopy::Gathered { buffer, shape, is_i32, .. } => (buffer, shape, is_i32),
        };
        let landed = reads.finished.clone().ok_or_else(|| PipelineError::Gpu("a read before the step's end".into()))?;
        let bytes = shape.iter().product::<usize>() * 4;
        let (done, result) = sync_channel(1);
        let ctx = self.device.context().clone();
        self.taps.staging.send(&ctx, super::staging::Landing { landed, buffer, shape, is_i32, done })?;
        Ok(PendingTensor::copying(bytes, move || {
            result.recv().unwrap_or_else(|_| Err(PipelineError::Gpu("the capture landing thread stopped".into())))
        }))
    }
}
