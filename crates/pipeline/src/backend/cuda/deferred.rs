//! Launches held back by one operation, so that the next one can share
//! them: two stages computed by the same kernel over the same input (the
//! MoE gate and up projections of a decode step; RoPE of q and of k) go
//! out as one launch. The first stage's output is allocated and in its
//! slot at once; its kernel launches with the second's, or alone before
//! any other operation, read, write or step boundary ([`CudaBackend::flush_deferred`]).
//! Each output element is computed by the same code either way, so a
//! shared launch changes no bit: it only saves a launch and lets one grid
//! stream both weight sets.

use cudarc::driver::{CudaSlice, PushKernelArg};

/// The f32 buffer of an output taken by `take_outputs` (checked there).
fn buffer(t: &mut DevTensor) -> &mut CudaSlice<f32> {
    match &mut t.data {
        DevData::F32(d) => d,
        DevData::I32(_) => unreachable!("take_outputs takes only f32 outputs"),
    }
}
use kernels_cuda::kernels::{attention, linear};

use super::tensors::{DevData, DevTensor};
use super::weights::push_weight;
use super::{CudaBackend, gpu, threads, warps};
use crate::backend::{RopeArgs, Slot};
use crate::error::{PipelineError, Result};
use crate::weights::WeightId;

/// A launch waiting for a partner.
pub(super) enum Deferred {
    /// A Bf16 expert projection of few slots (`expert_linear_bf16w_v8`).
    Expert(ExpertLaunch),
    /// RoPE of some heads of a row block.
    Rope(RopeLaunch),
}

/// One `expert_linear_bf16w_v8` part.
#[derive(Clone, Copy, PartialEq)]
pub(super) struct ExpertLaunch {
    pub(super) input: Slot,
    pub(super) indices: Slot,
    /// The first expert's weight id (the stacked weights' key).
    pub(super) first: WeightId,
    pub(super) out: Slot,
    pub(super) per_slot: bool,
    pub(super) t_len: usize,
    pub(super) top_k: usize,
    pub(super) k: usize,
    pub(super) n_out: usize,
    pub(super) experts: usize,
}

impl ExpertLaunch {
    /// Whether `next` can share this launch: same input, ids and shapes,
    /// writing a slot that none of this launch's reads or writes.
    fn pairs_with(&self, next: &ExpertLaunch) -> bool {
        let same = |a: &ExpertLaunch| (a.input, a.indices, a.per_slot, a.t_len, a.top_k, a.k, a.n_out, a.experts);
        same(self) == same(next) && ![self.input, self.indices, self.out].contains(&next.out)
    }
}

/// One `rope_f32` part.
#[derive(Clone, Copy)]
pub(super) struct RopeLaunch {
    pub(super) input: Slot,
    pub(super) args: RopeArgs,
    pub(super) out: Slot,
    pub(super) rows: usize,
    pub(super) in_width: usize,
}

impl RopeLaunch {
    fn pairs_with(&self, next: &RopeLaunch) -> bool {
        self.input == next.input
            && (self.rows, self.in_width, self.args.head_dim) == (next.rows, next.in_width, next.args.head_dim)
            && self.args.theta.to_bits() == next.args.theta.to_bits()
            && ![self.input, self.out].contains(&next.out)
    }
}

impl CudaBackend {
    /// Launches what is held back, if anything.
    pub(super) fn flush_deferred(&mut self) -> Result<()> {
        match self.deferred.take() {
            None => Ok(()),
            Some(Deferred::Expert(e)) => self.launch_experts(e, None),
            Some(Deferred::Rope(r)) => self.launch_rope(r, None),
        }
    }

    /// Holds `next` back, or launches it with the held-back part it pairs with.
    pub(super) fn defer_expert(&mut self, next: ExpertLaunch) -> Result<()> {
        match self.deferred.take() {
            Some(Deferred::Expert(first)) if first.pairs_with(&next) => self.launch_experts(first, Some(next)),
            other => {
                self.deferred = other;
                self.flush_deferred()?;
                self.deferred = Some(Deferred::Expert(next));
                Ok(())
            }
        }
    }

    /// Holds `next` back, or launches it with the held-back part it pairs with.
    pub(super) fn defer_rope(&mut self, next: RopeLaunch) -> Result<()> {
        match self.deferred.take() {
            Some(Deferred::Rope(first)) if first.pairs_with(&next) => self.launch_rope(first, Some(next)),
            other => {
                self.deferred = other;
                self.flush_deferred()?;
                self.deferred = Some(Deferred::Rope(next));
                Ok(())
            }
        }
    }

    /// The output tensors of `first` (and `second`), taken out of their
    /// slots for the launch; [`Self::put_back`] returns them.
    fn take_outputs(&mut self, first: Slot, second: Option<Slot>) -> Result<(DevTensor, Option<DevTensor>)> {
        let mut take = |slot: Slot| match self.slots[slot.index()].take() {
            Some(t) if matches!(t.data, DevData::F32(_)) => Ok(t),
            _ => Err(PipelineError::BadInput(format!("stage `{slot}` lost its output before its launch"))),
        };
        let a = take(first)?;
        let b = second.map(&mut take).transpose()?;
        Ok((a, b))
    }

    fn put_back(&mut self, slot: Slot, tensor: DevTensor) {
        self.slots[slot.index()] = Some(tensor);
    }

    fn launch_experts(&mut self, a: ExpertLaunch, b: Option<ExpertLaunch>) -> Result<()> {
        let (mut t0, mut t1) = self.take_outputs(a.out, b.map(|b| b.out))?;
        let result = (|| {
            let o0 = buffer(&mut t0);
            let o1 = t1.as_mut().map(buffer);
            let f = self.kernel(linear::EXPERT_LINEAR_V8)?;
            let stream = self.stream();
            let DevData::I32(ids) = &self.slot(a.indices)?.data else {
                return Err(PipelineError::BadInput(format!("stage `{}` must hold int32 expert ids", a.indices)));
            };
            let x = self.slot(a.input)?.f32(a.input)?;
            let stacked = |id: WeightId| &self.stacked[&id].data;
            let parts = if b.is_some() { 2u32 } else { 1 };
            let args = (a.t_len as u32, a.top_k as u32, a.k as u32, a.n_out as u32, a.experts as u32);
            let per_slot = u32::from(a.per_slot);
            let mut l = stream.launch_builder(&f);
            // One part: out1 is never written (any valid pointer will do).
            let o0_ptr: &CudaSlice<f32> = o0;
            match o1 {
                Some(o1) => l.arg(o0_ptr).arg(o1),
                None => l.arg(o0_ptr).arg(o0_ptr),
            };
            l.arg(x).arg(ids);
            push_weight(&mut l, stacked(a.first));
            push_weight(&mut l, stacked(b.map_or(a.first, |b| b.first)));
            l.arg(&parts).arg(&args.0).arg(&args.1).arg(&args.2).arg(&args.3).arg(&args.4).arg(&per_slot);
            // SAFETY: one warp per (part, t, j, n) writes out_part[(t * top_k
            // + j) * n_out + n] (each output holds t_len * top_k * n_out);
            // ids are range-checked in the kernel; x rows and weight rows
            // are k long with k % 8 == 0 (aligned 16-byte loads).
            unsafe { l.launch(warps(parts as usize * a.t_len * a.top_k * a.n_out)) }.map_err(gpu("expert_linear"))?;
            Ok(())
        })();
        self.put_back(a.out, t0);
        if let (Some(b), Some(t1)) = (b, t1) {
            self.put_back(b.out, t1);
        }
        result
    }

    fn launch_rope(&mut self, a: RopeLaunch, b: Option<RopeLaunch>) -> Result<()> {
        let (mut t0, mut t1) = self.take_outputs(a.out, b.map(|b| b.out))?;
        let result = (|| {
            let o0 = buffer(&mut t0);
            let o1 = t1.as_mut().map(buffer);
            let f = self.kernel(attention::ROPE)?;
            let stream = self.stream();
            let x = self.slot(a.input)?.f32(a.input)?;
            let second = b.map_or(a.args, |b| b.args);
            let parts = if b.is_some() { 2u32 } else { 1 };
            let dims = (a.rows as u32, a.in_width as u32, a.args.head_dim as u32);
            let (c0, h0, c1, h1) =
                (a.args.col_start as u32, a.args.heads as u32, second.col_start as u32, second.heads as u32);
            let mut l = stream.launch_builder(&f);
            // One part: out1 is never written (any valid pointer will do).
            let o0_ptr: &CudaSlice<f32> = o0;
            match o1 {
                Some(o1) => l.arg(o0_ptr).arg(o1),
                None => l.arg(o0_ptr).arg(o0_ptr),
            };
            l.arg(x).arg(&parts).arg(&dims.0).arg(&dims.1).arg(&c0).arg(&h0).arg(&c1).arg(&h1).arg(&dims.2);
            l.arg(&a.args.theta).arg(&self.step_start);
            let pairs = a.rows * (a.args.heads + b.map_or(0, |b| b.args.heads)) * a.args.head_dim / 2;
            // SAFETY: one thread per (part, t, head, pair) within each
            // part's output [rows, heads * hd]; the caller checked that
            // every part's heads lie within the input rows.
            unsafe { l.launch(threads(pairs)) }.map_err(gpu("rope"))?;
            Ok(())
        })();
        self.put_back(a.out, t0);
        if let (Some(b), Some(t1)) = (b, t1) {
            self.put_back(b.out, t1);
        }
        result
    }
}
