//! Capture copies from the device: each selected tensor is copied on the
//! device's copy stream into a pinned host buffer (page-locked, so the DMA
//! runs asynchronously) taken from a pool, and handed over as a
//! [`PendingTensor`]. The compute stream never waits for a copy; the copy
//! stream waits only for the tensor it copies. A landing thread waits for
//! the copies (one wait per batch of queued copies, which finish in order),
//! moves the values out and puts the buffers back at once, so buffers are reused within a step instead of waiting behind the
//! disk (allocating pinned memory is slow and synchronises the device).

use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaEvent, PinnedHostSlice};

use super::tensors::{CopyGuard, DevData};
use super::worker::JobThread;
use super::{Backend, CudaBackend, Slot, gpu};
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
    free: Vec<PinnedHostSlice<f32>>,
    pinned_bytes: usize,
}

impl StagingPool {
    /// A free buffer of at least `len` f32, allocating one (rounded up to a
    /// power of two, for reuse) if none fits; None past the limit.
    fn take(&self, ctx: &Arc<CudaContext>, len: usize) -> Result<Option<PinnedHostSlice<f32>>> {
        let mut state = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let best = state.free.iter().enumerate().filter(|(_, b)| b.len() >= len).min_by_key(|(_, b)| b.len());
        if let Some((i, _)) = best {
            return Ok(Some(state.free.swap_remove(i)));
        }
        let capacity = len.next_power_of_two().max(1 << 16);
        if state.pinned_bytes + capacity * 4 > STAGING_LIMIT_BYTES {
            return Ok(None);
        }
        // SAFETY: the buffer is only read after a copy has filled the
        // elements read. Flags 0: cached memory (the host reads it).
        let buffer = unsafe { ctx.alloc_pinned_with_flags::<f32>(capacity, 0) }
            .map_err(gpu("allocating pinned host memory for capture"))?;
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

    fn give_back(&self, buffer: PinnedHostSlice<f32>) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).free.push(buffer);
    }
}

/// A copy in flight, for the landing thread.
struct Landing {
    landed: Arc<CudaEvent>,
    buffer: PinnedHostSlice<f32>,
    shape: Vec<usize>,
    is_i32: bool,
    done: SyncSender<Result<HostTensor>>,
}

/// The pool and the landing thread (started on the first capture).
#[derive(Default)]
pub(super) struct Staging {
    pub(super) pool: StagingPool,
    landing: JobThread<Landing>,
}

impl Staging {
    fn send(&mut self, ctx: &Arc<CudaContext>, job: Landing) -> Result<()> {
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
        let landed = bound.and_then(|()| batch.last().expect("one job at least").landed.synchronize());
        for job in batch {
            let numel = job.shape.iter().product::<usize>();
            let values = landed
                .and_then(|()| job.buffer.as_slice().map(|s| s[..numel].to_vec()))
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
        let Some(mut staging) = self.staging.pool.take(&ctx, device_len)? else {
            return self.read(slot).map(PendingTensor::ready);
        };
        let (compute, copy) = (self.stream(), self.device.copy_stream().clone());
        let ready = compute.record_event(None).map_err(gpu("recording a capture event"))?;
        copy.wait(&ready).map_err(gpu("ordering a capture copy"))?;
        // The copy's destination is exactly the tensor's length (cudarc
        // copies as many elements as the destination holds).
        let base = staging.as_mut_ptr().map_err(gpu("preparing a capture buffer"))?;
        // SAFETY: `base` points to the pinned buffer's `staging.len() >=
        // device_len` f32; the slice only carries the pointer to the copy
        // and is not read until the copy's event has completed.
        let dst = unsafe { std::slice::from_raw_parts_mut(base, device_len) };
        let t = self.slot(slot)?;
        match &t.data {
            DevData::F32(d) => copy.memcpy_dtoh(&d.slice(..device_len), dst),
            DevData::I32(d) => {
                // SAFETY: i32 and f32 have the same size; the bits are copied
                // unchanged and turned back into i32 on the host.
                let as_f32 = unsafe { d.transmute::<f32>(device_len) }
                    .ok_or_else(|| PipelineError::Gpu("viewing expert ids for a capture copy".into()))?;
                copy.memcpy_dtoh(&as_f32, dst)
            }
        }
        .map_err(gpu("copying a captured tensor to the host"))?;
        // One event for both waiters: the compute stream (before the buffer is
        // freed or recycled) and the landing thread, which sleeps on it
        // (blocking sync; see land_all).
        let copied = Arc::new(
            copy.record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_BLOCKING_SYNC))
                .map_err(gpu("recording a capture event"))?,
        );
        if let Some(t) = self.slots[slot.index()].as_mut() {
            t.copy_guard = Some(CopyGuard::new(copied.clone(), compute));
        }
        let (done, result) = sync_channel(1);
        self.staging.send(&ctx, Landing { landed: copied, buffer: staging, shape, is_i32, done })?;
        Ok(PendingTensor::copying(device_len * 4, move || {
            result.recv().unwrap_or_else(|_| Err(PipelineError::Gpu("the capture landing thread stopped".into())))
        }))
    }
}
