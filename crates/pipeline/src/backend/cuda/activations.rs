//! The CUDA backend's activations as one part ([`Activations`]): one
//! device tensor per stage ([`StageSlots`]) and the pool their buffers come
//! from and go back to ([`ActivationPool`], tensors.rs).
//!
//! Beside each slot's tensor [`StageSlots`] keeps how many times it was
//! written (its version: what derived work is keyed by, so a slot
//! rewritten with the same shape is never mistaken for the old contents:
//! the grouped expert sort and bf16 input in moe.rs, the greedy choice in
//! elementwise.rs) and the buffer length it was last given (what a
//! recorded step plans its capture copies with: taps.rs). A write goes
//! through [`StageSlots::write`], which keeps both; the buffers a write
//! replaces go back to the caller (to the pool, or aside while a
//! recording's gathers read them). New buffers come from
//! [`Activations::alloc`]: recycled where the pool has one of that
//! length, else allocated (after emptying the pool if the device is out
//! of memory), NaN-filled when poisoning.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream};

use super::gpu;
use super::tensors::ActivationPool;
use super::tensors::DevTensor;
use crate::backend::Slot;
use crate::error::Result;

/// One tensor per stage, with each slot's version and last buffer length.
pub(super) struct StageSlots {
    tensors: Vec<Option<DevTensor>>,
    versions: Vec<u64>,
    buffer_lens: Vec<Option<usize>>,
}

impl StageSlots {
    /// Every slot empty, at version 0.
    pub(super) fn new() -> Self {
        let n = Slot::ALL.len();
        Self { tensors: (0..n).map(|_| None).collect(), versions: vec![0; n], buffer_lens: vec![None; n] }
    }

    /// What `slot` holds.
    pub(super) fn get(&self, slot: Slot) -> Option<&DevTensor> {
        self.tensors[slot.index()].as_ref()
    }

    /// What `slot` holds, to annotate (shape of a replayed step, copy
    /// guards, gather holds): not a write, the version stays.
    pub(super) fn get_mut(&mut self, slot: Slot) -> Option<&mut DevTensor> {
        self.tensors[slot.index()].as_mut()
    }

    /// Writes `tensor` into `slot`: its version goes up and its buffer
    /// length is recorded. Returns what the slot held.
    pub(super) fn write(&mut self, slot: Slot, tensor: DevTensor) -> Option<DevTensor> {
        self.versions[slot.index()] += 1;
        self.buffer_lens[slot.index()] = Some(tensor.buffer_len());
        self.tensors[slot.index()].replace(tensor)
    }

    /// Empties `slot`, returning what it held.
    pub(super) fn take(&mut self, slot: Slot) -> Option<DevTensor> {
        self.tensors[slot.index()].take()
    }

    /// Puts back a tensor [`Self::take`] lent out for a launch that writes
    /// into it (deferred.rs): the same contents, so not a new version.
    pub(super) fn restore(&mut self, slot: Slot, tensor: DevTensor) {
        self.tensors[slot.index()] = Some(tensor);
    }

    /// Empties every slot, returning what they held.
    pub(super) fn take_all(&mut self) -> Vec<DevTensor> {
        self.tensors.iter_mut().filter_map(Option::take).collect()
    }

    /// Every tensor held.
    pub(super) fn iter_mut(&mut self) -> impl Iterator<Item = &mut DevTensor> {
        self.tensors.iter_mut().flatten()
    }

    /// How many times `slot` was written.
    pub(super) fn version(&self, slot: Slot) -> u64 {
        self.versions[slot.index()]
    }

    /// The buffer length `slot` was last written with, if ever.
    pub(super) fn buffer_len(&self, slot: Slot) -> Option<usize> {
        self.buffer_lens[slot.index()]
    }
}

/// The activations: the stage slots, the pool of their buffers, and
/// whether new buffers are poisoned (NaN, to prove every kernel writes its
/// whole output).
pub(super) struct Activations {
    /// One tensor per stage.
    pub(super) slots: StageSlots,
    /// Recycled buffers.
    pub(super) pool: ActivationPool,
    /// New buffers are filled with NaN.
    pub(super) poison: bool,
}

impl Activations {
    /// Empty slots, an empty pool, no poisoning.
    pub(super) fn new() -> Self {
        Self { slots: StageSlots::new(), pool: ActivationPool::default(), poison: false }
    }

    /// A buffer of `n` f32 (at least one): a recycled one of that length if
    /// any, else a new one, once `fresh(n)` allows it (a recording may not
    /// allocate). Its contents are unspecified (NaN when poisoning).
    pub(super) fn alloc(
        &self,
        stream: &Arc<CudaStream>,
        n: usize,
        fresh: impl FnOnce(usize) -> Result<()>,
    ) -> Result<CudaSlice<f32>> {
        let n = n.max(1);
        let mut buffer = match self.pool.take(n) {
            Some(b) => b,
            None => {
                fresh(n)?;
                // SAFETY: every kernel writes its whole output before it is
                // read (or poisoning fills it just below).
                match unsafe { stream.alloc::<f32>(n) } {
                    Err(e) if kernels_cuda::is_out_of_memory(&e) && self.pool.clear() => {
                        // SAFETY: as above.
                        unsafe { stream.alloc::<f32>(n) }.map_err(gpu("allocating activations"))?
                    }
                    other => other.map_err(gpu("allocating activations"))?,
                }
            }
        };
        if self.poison {
            stream.memcpy_htod(&vec![f32::NAN; n], &mut buffer).map_err(gpu("poisoning activations"))?;
        }
        Ok(buffer)
    }

    /// An expert-id buffer of `n` int32 (at least one), recycled or new as
    /// [`Self::alloc`]'s; contents unspecified.
    pub(super) fn alloc_ids(
        &self,
        stream: &Arc<CudaStream>,
        n: usize,
        fresh: impl FnOnce(usize) -> Result<()>,
    ) -> Result<CudaSlice<i32>> {
        let n = n.max(1);
        if let Some(b) = self.pool.take_ids(n) {
            return Ok(b);
        }
        fresh(n)?;
        // SAFETY: the router writes every id before anything reads them.
        unsafe { stream.alloc::<i32>(n) }.map_err(gpu("allocating expert ids"))
    }
}
