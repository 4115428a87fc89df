//! [`StageSlots`]: the CUDA backend's activations, one device tensor per
//! stage, and the two facts kept beside each: how many times it was
//! written (its version: what derived work is keyed by, so a slot
//! rewritten with the same shape is never mistaken for the old contents:
//! the grouped expert sort and bf16 input in moe.rs, the greedy choice in
//! elementwise.rs) and the buffer length it was last given (what a
//! recorded step plans its capture copies with: taps.rs). A write goes
//! through [`StageSlots::write`], which keeps both; the buffers a write
//! replaces go back to the caller (to the pool, or aside while a
//! recording's gathers read them).

use super::tensors::DevTensor;
use crate::backend::Slot;

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
