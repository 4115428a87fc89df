//! Capture copies from the device: each selected tensor is copied on the
//! device's copy stream into a pinned host buffer (page-locked, so the DMA
//! runs asynchronously) taken from a pool, and handed over as a
//! [`PendingTensor`] that the capture writer thread waits for. The compute
//! stream never waits for a copy; the copy stream waits only for the
//! tensor it copies. Buffers go back to the pool once the writer has read
//! them.

use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, PinnedHostSlice};

use super::tensors::{CopyGuard, DevData};
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

    fn give_back(&self, buffer: PinnedHostSlice<f32>) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).free.push(buffer);
    }
}

impl CudaBackend {
    pub(super) fn read_async_on_device(&mut self, slot: Slot) -> Result<PendingTensor> {
        let t = self.slot(slot)?;
        let (shape, numel) = (t.shape.clone(), t.shape.iter().product::<usize>());
        let (device_len, is_i32) = match &t.data {
            DevData::F32(d) => (d.len(), false),
            DevData::I32(d) => (d.len(), true),
        };
        let ctx = self.device.context().clone();
        let Some(mut staging) = self.staging.take(&ctx, device_len)? else {
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
        // and is not read until `landed` has completed.
        let dst = unsafe { std::slice::from_raw_parts_mut(base, device_len) };
        match &t.data {
            DevData::F32(d) => copy.memcpy_dtoh(d, dst),
            DevData::I32(d) => {
                // SAFETY: i32 and f32 have the same size; the bits are copied
                // unchanged and turned back into i32 on the host.
                let as_f32 = unsafe { d.transmute::<f32>(d.len()) }
                    .ok_or_else(|| PipelineError::Gpu("viewing expert ids for a capture copy".into()))?;
                copy.memcpy_dtoh(&as_f32, dst)
            }
        }
        .map_err(gpu("copying a captured tensor to the host"))?;
        let copied = copy.record_event(None).map_err(gpu("recording a capture event"))?;
        let landed = copy.record_event(None).map_err(gpu("recording a capture event"))?;
        if let Some(t) = self.slots[slot.index()].as_mut() {
            t.copy_guard = Some(CopyGuard { copied, compute });
        }
        let pool = self.staging.clone();
        Ok(PendingTensor::copying(move || {
            let values = ctx
                .bind_to_thread()
                .and_then(|()| landed.synchronize())
                .and_then(|()| staging.as_slice().map(|s| s[..numel].to_vec()))
                .map_err(gpu("waiting for a capture copy"));
            pool.give_back(staging);
            let values = values?;
            Ok(if is_i32 {
                HostTensor::i32(shape, values.iter().map(|v| v.to_bits() as i32).collect())
            } else {
                HostTensor::f32(shape, values)
            })
        }))
    }
}
