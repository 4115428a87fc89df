//! Activations and KV caches in device memory.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaEvent, CudaSlice, CudaStream};

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
    pub(super) data: DevData,
}

/// Keeps a tensor's memory from being reused while the copy stream still
/// reads it: on drop, the compute stream waits for the copy's event before
/// the buffer's stream-ordered free that follows.
pub(super) struct CopyGuard {
    pub(super) copied: Arc<CudaEvent>,
    pub(super) compute: Arc<CudaStream>,
}

impl Drop for CopyGuard {
    fn drop(&mut self) {
        // An error here leaves the context recording it; the next call on
        // the stream reports it.
        let _ = self.compute.wait(&self.copied);
    }
}

impl DevTensor {
    pub(super) fn new(shape: Vec<usize>, data: DevData) -> Self {
        Self { shape, copy_guard: None, data }
    }

    pub(super) fn f32(&self, slot: Slot) -> Result<&CudaSlice<f32>> {
        match &self.data {
            DevData::F32(d) => Ok(d),
            DevData::I32(_) => Err(PipelineError::BadInput(format!("stage `{slot}` holds int32, expected float32"))),
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
    pub(super) width: usize,
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
}

impl ActivationPool {
    pub(super) fn take(&self, len: usize) -> Option<CudaSlice<f32>> {
        self.values.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&len).and_then(|v| v.pop())
    }

    pub(super) fn take_ids(&self, len: usize) -> Option<CudaSlice<i32>> {
        self.ids.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&len).and_then(|v| v.pop())
    }

    /// Takes back a scratch buffer no slot holds (nothing copies from it).
    pub(super) fn recycle_buffer(&self, buffer: CudaSlice<f32>) {
        self.values.lock().unwrap_or_else(|e| e.into_inner()).entry(buffer.len()).or_default().push(buffer);
    }

    /// Takes back a slot's tensor. Its copy guard (if a capture copy still
    /// reads it) drops first, so later work on the compute stream, which
    /// may write this buffer, waits for the copy.
    pub(super) fn recycle(&self, tensor: DevTensor) {
        let DevTensor { copy_guard, data, .. } = tensor;
        drop(copy_guard);
        match data {
            DevData::F32(d) => self.recycle_buffer(d),
            DevData::I32(d) => self.ids.lock().unwrap_or_else(|e| e.into_inner()).entry(d.len()).or_default().push(d),
        }
    }

    /// Frees every pooled buffer (before retrying an allocation that ran
    /// out of memory).
    pub(super) fn clear(&self) -> bool {
        let mut values = self.values.lock().unwrap_or_else(|e| e.into_inner());
        let mut ids = self.ids.lock().unwrap_or_else(|e| e.into_inner());
        let had = values.values().any(|v| !v.is_empty()) || ids.values().any(|v| !v.is_empty());
        values.clear();
        ids.clear();
        had
    }
}
