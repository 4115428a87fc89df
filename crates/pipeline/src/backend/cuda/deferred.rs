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
use kernels_cuda::kernels::{attention, linear, quant};

use super::quantized::quant_warps;
use super::tensors::{DevData, DevTensor};
use super::weights::{DevWeight, push_weight};
use super::{CudaBackend, gpu, threads, warps};
use crate::backend::{RopeArgs, Slot};
use crate::error::{PipelineError, Result};
use crate::weights::WeightId;

/// A launch waiting for a partner.
pub(super) enum Deferred {
    /// An expert projection of few slots: Bf16 (`expert_linear_bf16w_v8`)
    /// or over quantized experts (`expert_linear_quant`, either precision).
    Expert(ExpertLaunch),
    /// RoPE of some heads of a row block.
    Rope(RopeLaunch),
}

/// One `expert_linear_bf16w_v8` or `expert_linear_quant` part.
#[derive(Clone, Copy, PartialEq)]
pub(super) struct ExpertLaunch {
    /// Whether the experts are kept quantized (which kernel runs).
    pub(super) quantized: bool,
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
        let same =
            |a: &ExpertLaunch| (a.quantized, a.input, a.indices, a.per_slot, a.t_len, a.top_k, a.k, a.n_out, a.experts);
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
        match self.launcher.take_held() {
            None => Ok(()),
            Some(held) => self.launch_alone(held),
        }
    }

    /// Launches a held-back part on its own.
    fn launch_alone(&mut self, held: Deferred) -> Result<()> {
        match held {
            Deferred::Expert(e) => self.launch_experts(e, None),
            Deferred::Rope(r) => self.launch_rope(r, None),
        }
    }

    /// Holds `next` back, or launches it with the held-back part it pairs
    /// with (after launching a held-back part it does not pair with).
    pub(super) fn defer(&mut self, next: Deferred) -> Result<()> {
        match (self.launcher.take_held(), next) {
            (Some(Deferred::Expert(a)), Deferred::Expert(b)) if a.pairs_with(&b) => self.launch_experts(a, Some(b)),
            (Some(Deferred::Rope(a)), Deferred::Rope(b)) if a.pairs_with(&b) => self.launch_rope(a, Some(b)),
            (held, next) => {
                if let Some(held) = held {
                    self.launch_alone(held)?;
                }
                self.launcher.hold(next);
                Ok(())
            }
        }
    }

    /// Runs `launch` with the output buffers of `first` (and `second`)
    /// taken out of their slots (so they can be borrowed beside the
    /// backend), puts them back whatever happened, and returns its result.
    /// With one output, the second pointer is the first again (the
    /// kernels never write it then).
    fn with_outputs(
        &mut self,
        first: Slot,
        second: Option<Slot>,
        launch: impl FnOnce(&Self, &CudaSlice<f32>, &CudaSlice<f32>) -> Result<()>,
    ) -> Result<()> {
        let mut take = |slot: Slot| match self.activations.slots.take(slot) {
            Some(t @ DevTensor { data: DevData::F32(_), .. }) => Ok(t),
            other => {
                if let Some(t) = other {
                    self.activations.slots.restore(slot, t);
                }
                Err(PipelineError::BadInput(format!("stage `{slot}` lost its output before its launch")))
            }
        };
        let mut t0 = take(first)?;
        let mut t1 = second.map(&mut take).transpose();
        let result = match &mut t1 {
            Ok(t1) => {
                let o0: &CudaSlice<f32> = buffer(&mut t0);
                let o1: &CudaSlice<f32> = match t1.as_mut() {
                    Some(t) => buffer(t),
                    None => o0,
                };
                launch(self, o0, o1)
            }
            Err(_) => Ok(()),
        };
        self.activations.slots.restore(first, t0);
        let t1 = t1?;
        if let (Some(slot), Some(t)) = (second, t1) {
            self.activations.slots.restore(slot, t);
        }
        result
    }

    fn launch_experts(&mut self, a: ExpertLaunch, b: Option<ExpertLaunch>) -> Result<()> {
        self.with_outputs(a.out, b.map(|b| b.out), |this, o0, o1| this.expert_launch(a, b, o0, o1))
    }

    /// Launches `a` (and `b`) writing `o0` (and `o1`; `o0` again when
    /// alone: the kernels never write it then).
    pub(super) fn expert_launch(
        &self,
        a: ExpertLaunch,
        b: Option<ExpertLaunch>,
        o0: &CudaSlice<f32>,
        o1: &CudaSlice<f32>,
    ) -> Result<()> {
        let f = self.kernel(if a.quantized { quant::EXPERT_LINEAR_QUANT } else { linear::EXPERT_LINEAR_V8 })?;
        let stream = self.stream();
        let ids = self.slot(a.indices)?.i32(a.indices)?;
        let x = self.slot(a.input)?.f32(a.input)?;
        let (w0, w1) = (&self.stacked[&a.first].data, &self.stacked[&b.map_or(a.first, |b| b.first)].data);
        let parts = if b.is_some() { 2u32 } else { 1 };
        let args = (a.t_len as u32, a.top_k as u32, a.k as u32, a.n_out as u32, a.experts as u32);
        let per_slot = u32::from(a.per_slot);
        let mut l = stream.launch_builder(&f);
        l.arg(o0).arg(o1).arg(x).arg(ids);
        match (w0, w1) {
            (DevWeight::Quant(q0), DevWeight::Quant(q1)) => {
                l.arg(&q0.blocks).arg(&q1.blocks).arg(&q0.kind).arg(&q1.kind);
            }
            (DevWeight::Quant(_), _) | (_, DevWeight::Quant(_)) => {
                return Err(PipelineError::Gpu("one expert launch over quantized and decoded experts".into()));
            }
            _ => {
                push_weight(&mut l, w0)?;
                push_weight(&mut l, w1)?;
            }
        }
        l.arg(&parts).arg(&args.0).arg(&args.1).arg(&args.2).arg(&args.3).arg(&args.4).arg(&per_slot);
        let warps_needed = parts as usize * a.t_len * a.top_k * a.n_out;
        let config = if a.quantized { quant_warps(warps_needed) } else { warps(warps_needed) };
        // SAFETY: one warp per (part, t, j, n) writes out_part[(t * top_k
        // + j) * n_out + n] (each output holds t_len * top_k * n_out);
        // ids are range-checked in the kernel; x rows and weight rows
        // are k long with k % 8 == 0 (aligned 16-byte loads), quantized
        // rows k / block_len whole blocks.
        unsafe { l.launch(config) }.map_err(gpu("expert_linear"))?;
        Ok(())
    }

    fn launch_rope(&mut self, a: RopeLaunch, b: Option<RopeLaunch>) -> Result<()> {
        self.with_outputs(a.out, b.map(|b| b.out), |this, o0, o1| {
            let f = this.kernel(attention::ROPE)?;
            let stream = this.stream();
            let x = this.slot(a.input)?.f32(a.input)?;
            let second = b.map_or(a.args, |b| b.args);
            let parts = if b.is_some() { 2u32 } else { 1 };
            let dims = (a.rows as u32, a.in_width as u32, a.args.head_dim as u32);
            let (c0, h0, c1, h1) =
                (a.args.col_start as u32, a.args.heads as u32, second.col_start as u32, second.heads as u32);
            let mut l = stream.launch_builder(&f);
            l.arg(o0)
                .arg(o1)
                .arg(x)
                .arg(&parts)
                .arg(&dims.0)
                .arg(&dims.1)
                .arg(&c0)
                .arg(&h0)
                .arg(&c1)
                .arg(&h1)
                .arg(&dims.2);
            l.arg(&a.args.theta).arg(&this.step_start);
            let pairs = a.rows * (a.args.heads + b.map_or(0, |b| b.args.heads)) * a.args.head_dim / 2;
            // SAFETY: one thread per (part, t, head, pair) within each
            // part's output [rows, heads * hd]; the caller checked that
            // every part's heads lie within the input rows.
            unsafe { l.launch(threads(pairs)) }.map_err(gpu("rope"))?;
            Ok(())
        })
    }
}
