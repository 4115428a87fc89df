//! Capture copies from the device: each selected tensor is copied on the
//! device's copy stream into a pinned host buffer (page-locked, so the DMA
//! runs asynchronously) taken from a pool, and handed over as a
//! [`PendingTensor`]. The compute stream never waits for a copy; the copy
//! stream waits only for the tensor it copies. A landing thread waits for
//! the copies (one wait per batch of queued copies), moves the values out
//! and puts the buffers back at once, so buffers are reused within a step
//! instead of waiting behind the disk (allocating pinned memory is slow and
//! synchronises the device). Eager decode steps fill them from device
//! buffers their gather kernels wrote, one copy each after the step
//! (taps.rs).

use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaEvent};
use kernels_cuda::gather::MappedHost;

use super::tensors::{CopyGuard, DevData};
use super::worker::JobThread;
use super::{Backend, CudaBackend, Slot, gpu, kernel_error};
use crate::error::{PipelineError, Result};
use crate::tensor::{HostTensor, PendingTensor};

/// Pinned memory the pool may hold at once; past it a capture falls back
/// to a synchronous copy rather than pinning more host memory.
const STAGING_LIMIT_BYTES: usize = 4 << 30;

/// Pinned host buffers for capture copies, reused across stages and steps.
#[derive(Default, Clone)]
pub(super) struct StagingPool(Arc<Mutex<PoolState>>);

#[derive(Default)]
struct PoolState {
    free: Vec<MappedHost>,
    pinned_bytes: usize,
}

impl StagingPool {
    /// A free buffer of at least `len` words, allocating one (rounded up to
    /// a power of two, for reuse) if none fits; None past the limit.
    pub(super) fn take(&self, ctx: &Arc<CudaContext>, len: usize) -> Result<Option<MappedHost>> {
        let mut state = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let best = state.free.iter().enumerate().filter(|(_, b)| b.len() >= len).min_by_key(|(_, b)| b.len());
        if let Some((i, _)) = best {
            return Ok(Some(state.free.swap_remove(i)));
        }
        let capacity = len.next_power_of_two().max(1 << 16);
        if state.pinned_bytes + capacity * 4 > STAGING_LIMIT_BYTES {
            return Ok(None);
        }
        let buffer = MappedHost::new(ctx, capacity).map_err(kernel_error)?;
        state.pinned_bytes += capacity * 4;
        Ok(Some(buffer))
    }

    /// Pins a buffer for each length (as `take` would size it) and puts
    /// them in the pool, stopping at the pool's limit.
    pub(super) fn reserve(&self, ctx: &Arc<CudaContext>, lens: &[usize]) -> Result<()> {
        let mut taken = Vec::new();
        for &len in lens {
            match self.take(ctx, len)? {
                Some(buffer) => taken.push(buffer),
                None => break,
            }
        }
        for buffer in taken {
            self.give_back(buffer);
        }
        Ok(())
    }

    pub(super) fn give_back(&self, buffer: MappedHost) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).free.push(buffer);
    }
}

/// A copy in flight, for the landing thread.
pub(super) struct Landing {
    /// Completes when the buffer holds the values.
    pub(super) landed: Arc<CudaEvent>,
    pub(super) buffer: MappedHost,
    pub(super) shape: Vec<usize>,
    pub(super) is_i32: bool,
    pub(super) done: SyncSender<Result<HostTensor>>,
}

/// The pool and the landing thread (started on the first capture).
#[derive(Default)]
pub(super) struct Staging {
    pub(super) pool: StagingPool,
    landing: JobThread<Landing>,
}

impl Staging {
    pub(super) fn send(&mut self, ctx: &Arc<CudaContext>, job: Landing) -> Result<()> {
        let (pool, ctx) = (self.pool.clone(), ctx.clone());
        self.landing.send("moetrace-capture-landing", job, move |jobs| land_all(&ctx, &pool, jobs))
    }
}

/// The landing thread: waits for the copies (sleeping, not spinning: a
/// spinning wait contends with the launching thread inside the driver),
/// moves the values out, returns the buffers to the pool. Copies run in
/// order on the one copy stream, so it takes every job queued so far and
/// waits only for the last one's event: one wake-up for a batch instead of
/// one per tensor (a wake-up per tensor kept the capture writers, and
/// through their bounded channel the forward pass, waiting).
fn land_all(ctx: &Arc<CudaContext>, pool: &StagingPool, jobs: Receiver<Landing>) {
    let bound = ctx.bind_to_thread();
    while let Ok(first) = jobs.recv() {
        let mut batch = vec![first];
        batch.extend(jobs.try_iter());
        // The copies finish in order on the copy stream, so after the last
        // job's event most are complete; those recorded elsewhere (a
        // kernel's, on the compute stream) are waited for each.
        let last = bound.and_then(|()| batch.last().expect("one job at least").landed.synchronize());
        for job in batch {
            let numel = job.shape.iter().product::<usize>();
            let landed = last.and_then(|()| job.landed.synchronize());
            let values = landed
                .map(|()| {
                    // SAFETY: the copy into the buffer's first numel words
                    // has completed; the buffer is ours until given back.
                    unsafe { std::slice::from_raw_parts(job.buffer.host_ptr() as *const f32, numel) }.to_vec()
                })
                .map_err(gpu("waiting for a capture copy"));
            pool.give_back(job.buffer);
            let tensor = values.map(|values| {
                if job.is_i32 {
                    HostTensor::i32(job.shape, values.iter().map(|v| v.to_bits() as i32).collect())
                } else {
                    HostTensor::f32(job.shape, values)
                }
            });
            // The receiver may have been dropped (a run that failed); nothing to do.
            let _ = job.done.send(tensor);
        }
    }
}

impl CudaBackend {
    pub(super) fn read_async_on_device(&mut self, slot: Slot) -> Result<PendingTensor> {
        let t = self.slot(slot)?;
        let shape = t.shape.clone();
        // The shape's elements (a buffer sized for the KV capacity holds more).
        let (device_len, is_i32) = (t.numel(), matches!(t.data, DevData::I32(_)));
        let ctx = self.device.context().clone();
        let Some(staging) = self.taps.staging.pool.take(&ctx, device_len)? else {
            return self.read(slot).map(PendingTensor::ready);
        };
        // SAFETY: the pinned buffer's `staging.len() >= device_len` words,
        // which nothing reads until the copy's event has completed (the
        // landing thread waits for it).
        let copied = unsafe { self.copy_slot_to_host(slot, staging.host_ptr() as *mut f32, device_len) }?;
        let (done, result) = sync_channel(1);
        self.taps.staging.send(&ctx, Landing { landed: copied, buffer: staging, shape, is_i32, done })?;
        Ok(PendingTensor::copying(device_len * 4, move || {
            result.recv().unwrap_or_else(|_| Err(PipelineError::Gpu("the capture landing thread stopped".into())))
        }))
    }

    /// Copies the first `len` elements of `slot`'s buffer to `dst` on the
    /// copy stream, after the work queued so far on the compute stream,
    /// and returns the copy's event (blocking sync: the landing threads
    /// sleep on it). The slot's tensor keeps a [`CopyGuard`], so the
    /// compute stream waits for the copy before the buffer is reused.
    /// (Recorded steps copy by a kernel instead: taps.rs.)
    ///
    /// # Safety
    /// `dst` must point to `len` f32 of pinned host memory that stays
    /// allocated, and is not read, until the event has completed.
    pub(super) unsafe fn copy_slot_to_host(&mut self, slot: Slot, dst: *mut f32, len: usize) -> Result<Arc<CudaEvent>> {
        let (compute, copy) = (self.stream(), self.device.copy_stream().clone());
        let t = self.slot(slot)?;
        if len > t.buffer_len() {
            return Err(PipelineError::Gpu(format!(
                "copying `{slot}` to the host: {len} values asked, the buffer holds {}",
                t.buffer_len()
            )));
        }
        let ready = compute.record_event(None).map_err(gpu("recording a capture event"))?;
        copy.wait(&ready).map_err(gpu("ordering a capture copy"))?;
        // SAFETY: the caller's promise; the slice only carries the pointer
        // to the copy (cudarc copies as many elements as it holds).
        let dst = unsafe { std::slice::from_raw_parts_mut(dst, len) };
        match &t.data {
            DevData::F32(d) => copy.memcpy_dtoh(&d.slice(..len), dst),
            DevData::I32(d) => {
                // SAFETY: i32 and f32 have the same size; the bits are copied
                // unchanged and turned back into i32 on the host.
                let as_f32 = unsafe { d.transmute::<f32>(len) }
                    .ok_or_else(|| PipelineError::Gpu("viewing expert ids for a capture copy".into()))?;
                copy.memcpy_dtoh(&as_f32, dst)
            }
        }
        .map_err(gpu("copying a captured tensor to the host"))?;
        // One event for every waiter: the compute stream (before the buffer
        // is freed or recycled) and the landing thread.
        let copied = Arc::new(
            copy.record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_BLOCKING_SYNC))
                .map_err(gpu("recording a capture event"))?,
        );
        if let Some(t) = self.activations.slots.get_mut(slot) {
            t.copy_guard = Some(CopyGuard::new(copied.clone(), compute));
        }
        Ok(copied)
    }
}
