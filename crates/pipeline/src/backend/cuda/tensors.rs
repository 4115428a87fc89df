//! Activations and KV caches in device memory.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaEvent, CudaSlice, CudaStream, DriverError};

use super::Slot;
use crate::error::{PipelineError, Result};

/// A device tensor.
pub(super) enum DevData {
    F32(CudaSlice<f32>),
    I32(CudaSlice<i32>),
}

pub(super) struct DevTensor {
    pub(super) shape: Vec<usize>,
    /// Declared before `data` so that it drops first: see [`CopyGuard`].
    pub(super) copy_guard: Option<CopyGuard>,
    /// A recorded step's capture gathers read it at the step's end: it
    /// stays out of the pool until the recording ends (taps.rs).
    pub(super) gather_hold: bool,
    pub(super) data: DevData,
}

/// Keeps a tensor's memory from being reused while the copy stream still
/// reads it: on drop, the compute stream waits for the copy's event before
/// the buffer's stream-ordered free or reuse that follows. The activation
/// pool avoids that wait where it can (see [`ActivationPool::recycle`]).
pub(super) struct CopyGuard {
    /// None once the copy is known to be complete.
    copied: Option<Arc<CudaEvent>>,
    compute: Arc<CudaStream>,
}

impl CopyGuard {
    pub(super) fn new(copied: Arc<CudaEvent>, compute: Arc<CudaStream>) -> Self {
        Self { copied: Some(copied), compute }
    }

    /// Whether the copy has finished; then the guard is spent (dropping it
    /// orders nothing).
    fn finished(&mut self) -> bool {
        if self.copied.as_ref().is_none_or(|c| c.is_complete()) {
            self.copied = None;
        }
        self.copied.is_none()
    }
}

impl Drop for CopyGuard {
    fn drop(&mut self) {
        if let Some(copied) = &self.copied {
            // An error here leaves the context recording it; the next call
            // on the stream reports it.
            let _ = self.compute.wait(copied);
        }
    }
}

impl DevTensor {
    pub(super) fn new(shape: Vec<usize>, data: DevData) -> Self {
        Self { shape, copy_guard: None, gather_hold: false, data }
    }

    pub(super) fn f32(&self, slot: Slot) -> Result<&CudaSlice<f32>> {
        match &self.data {
            DevData::F32(d) => Ok(d),
            DevData::I32(_) => Err(PipelineError::BadInput(format!("stage `{slot}` holds int32, expected float32"))),
        }
    }

    pub(super) fn i32(&self, slot: Slot) -> Result<&CudaSlice<i32>> {
        match &self.data {
            DevData::I32(d) => Ok(d),
            DevData::F32(_) => Err(PipelineError::BadInput(format!("stage `{slot}` holds float32, expected int32"))),
        }
    }

    pub(super) fn width(&self) -> usize {
        self.shape.last().copied().unwrap_or(1)
    }

    /// Elements the shape holds (the buffer may hold more: see graph.rs).
    pub(super) fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Elements the buffer holds.
    pub(super) fn buffer_len(&self) -> usize {
        match &self.data {
            DevData::F32(d) => d.len(),
            DevData::I32(d) => d.len(),
        }
    }

    pub(super) fn rows(&self) -> usize {
        self.shape.iter().product::<usize>() / self.width().max(1)
    }
}

/// Keys and values of one layer, `[capacity, width]` with `len` rows used.
pub(super) struct DevCache {
    pub(super) k: CudaSlice<f32>,
    pub(super) v: CudaSlice<f32>,
    /// A key row's width (nkv * hd; MLA: nh * (nope + rope)).
    pub(super) width: usize,
    /// A value row's width: `width` but for MLA (nh * v_head_dim).
    pub(super) v_width: usize,
    pub(super) len: usize,
    pub(super) capacity: usize,
}

/// Activation buffers for reuse, by length. A slot's buffer is recycled
/// when the slot is next written or the step ends, so from the second
/// layer on every stage's output lands in a buffer an earlier layer used
/// (each op needs its output allocated while its inputs are still held,
/// so each shape cycles through two buffers). Nothing is zeroed on reuse:
/// every kernel writes its whole output (the parity test poisons outputs
/// to prove it).
#[derive(Default)]
pub(super) struct ActivationPool {
    values: Mutex<HashMap<usize, Vec<CudaSlice<f32>>>>,
    /// Expert-id buffers (the router's int32 output).
    ids: Mutex<HashMap<usize, Vec<CudaSlice<i32>>>>,
    /// Buffers a capture copy still reads: back in the pool once it has
    /// finished, so the forward pass never waits for a copy.
    copying: Mutex<Vec<(CopyGuard, DevData)>>,
}

impl ActivationPool {
    pub(super) fn take(&self, len: usize) -> Option<CudaSlice<f32>> {
        self.release_copied();
        self.values.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&len).and_then(|v| v.pop())
    }

    pub(super) fn take_ids(&self, len: usize) -> Option<CudaSlice<i32>> {
        self.release_copied();
        self.ids.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&len).and_then(|v| v.pop())
    }

    /// Takes back a scratch buffer no slot holds (nothing copies from it).
    pub(super) fn recycle_buffer(&self, buffer: CudaSlice<f32>) {
        self.values.lock().unwrap_or_else(|e| e.into_inner()).entry(buffer.len()).or_default().push(buffer);
    }

    /// Takes back a slot's tensor. If a capture copy still reads it, it
    /// waits aside until the copy has finished (the pool allocates anew
    /// meanwhile) instead of making the compute stream wait for the copy:
    /// with a prompt step's large tensors captured, that wait held later
    /// layers behind the copies.
    pub(super) fn recycle(&self, tensor: DevTensor) {
        let DevTensor { copy_guard, data, .. } = tensor;
        match copy_guard {
            Some(mut guard) => {
                if guard.finished() {
                    self.put(data);
                } else {
                    self.copying.lock().unwrap_or_else(|e| e.into_inner()).push((guard, data));
                }
            }
            None => self.put(data),
        }
    }

    fn put(&self, data: DevData) {
        match data {
            DevData::F32(d) => self.recycle_buffer(d),
            DevData::I32(d) => self.ids.lock().unwrap_or_else(|e| e.into_inner()).entry(d.len()).or_default().push(d),
        }
    }

    /// Moves the buffers whose copies have finished back to the pool.
    fn release_copied(&self) {
        let mut done = Vec::new();
        {
            let mut copying = self.copying.lock().unwrap_or_else(|e| e.into_inner());
            let mut i = 0;
            while i < copying.len() {
                if copying[i].0.finished() {
                    done.push(copying.swap_remove(i).1);
                } else {
                    i += 1;
                }
            }
        }
        for data in done {
            self.put(data);
        }
    }

    /// Puts every buffer a copy still reads back in the pool, the compute
    /// stream ordered after those copies (before freeing the pool).
    fn release_all(&self) {
        let all: Vec<(CopyGuard, DevData)> =
            std::mem::take(&mut *self.copying.lock().unwrap_or_else(|e| e.into_inner()));
        for (guard, data) in all {
            drop(guard);
            self.put(data);
        }
    }

    /// Before recording a step, which may only take buffers from the pool:
    /// for each buffer a copy still reads, puts a new one of its length in
    /// the pool (the old one joins it when its copy has finished). Waiting
    /// for those copies instead held the recording behind every copy queued
    /// before them on the copy stream: the prompt step's, hundreds of MB.
    pub(super) fn stand_in_for_copying(&self, stream: &Arc<CudaStream>) -> std::result::Result<(), DriverError> {
        self.release_copied();
        let lens: Vec<(usize, bool)> = self
            .copying
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(_, d)| match d {
                DevData::F32(d) => (d.len(), false),
                DevData::I32(d) => (d.len(), true),
            })
            .collect();
        for (len, ids) in lens {
            // SAFETY: pool buffers are written whole before they are read
            // (see the pool's doc).
            let data = unsafe {
                if ids { DevData::I32(stream.alloc::<i32>(len)?) } else { DevData::F32(stream.alloc::<f32>(len)?) }
            };
            self.put(data);
        }
        Ok(())
    }

    /// Frees every pooled buffer (before retrying an allocation that ran
    /// out of memory).
    pub(super) fn clear(&self) -> bool {
        self.release_all();
        let mut values = self.values.lock().unwrap_or_else(|e| e.into_inner());
        let mut ids = self.ids.lock().unwrap_or_else(|e| e.into_inner());
        let had = values.values().any(|v| !v.is_empty()) || ids.values().any(|v| !v.is_empty());
        values.clear();
        ids.clear();
        had
    }
}
