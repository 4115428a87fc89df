//! The MoE family on the device: routing (softmax over all experts, top-k,
//! renormalise) writing weights and expert ids, the per-expert projections
//! over the stacked expert weights, and the weighted combination.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use kernels_cuda::kernels::{linear, moe};

/// From this many (token, expert) slots on, Bf16 expert projections take
/// the grouped tensor-core kernel (each expert's weights read once per 32
/// of its slots) instead of one warp per output (weights read per slot).
const GROUPED_MIN_SLOTS: usize = 32;

use super::deferred::{Deferred, ExpertLaunch};
use super::tensors::{DevData, DevTensor};
use super::weights::{DevWeight, Stacked, push_weight};
use super::{CudaBackend, CudaPrecision, gpu, threads, warps};
use crate::backend::{SharedTerm, Slot};
use crate::error::{PipelineError, Result};
use crate::weights::WeightId;

/// ggml's MXFP4 type id (blocks.cuh `GGML_MXFP4`).
const MXFP4: u32 = 39;

impl CudaBackend {
    pub(super) fn router_top_k_on_device(
        &mut self,
        logits: Slot,
        k: usize,
        normalise: bool,
        weights_out: Slot,
        indices_out: Slot,
    ) -> Result<()> {
        let l = self.slot(logits)?;
        let (rows, experts) = (l.rows(), l.width());
        if k == 0 || k > experts || k > 64 || experts > 4096 {
            return Err(PipelineError::BadInput(format!(
                "top-{k} of {experts} experts is not supported (k 1..=64, at most 4096 experts)"
            )));
        }
        let stream = self.stream();
        let mut w = self.alloc(rows * k)?;
        let mut ids = self.alloc_ids(rows * k)?;
        let f = self.kernel(moe::ROUTER_TOP_K)?;
        let a = (rows as u32, experts as u32, k as u32, u32::from(normalise));
        let mut b = stream.launch_builder(&f);
        b.arg(&mut w).arg(&mut ids).arg(l.f32(logits)?).arg(&a.0).arg(&a.1).arg(&a.2).arg(&a.3);
        // SAFETY: one warp per token writing k weights and ids.
        unsafe { b.launch(warps(rows)) }.map_err(gpu("router_top_k"))?;
        self.set(weights_out, vec![rows, k], w)?;
        self.store(indices_out, DevTensor::new(vec![rows, k], DevData::I32(ids)))?;
        Ok(())
    }

    pub(super) fn expert_linear_on_device(
        &mut self,
        input: Slot,
        indices: Slot,
        experts: &[WeightId],
        out: Slot,
    ) -> Result<()> {
        let (t_len, top_k) = {
            let it = self.slot(indices)?;
            (it.shape[0], it.shape[1])
        };
        let (per_slot, width) = {
            let xt = self.slot(input)?;
            (xt.shape.len() == 3, xt.width())
        };
        let (n_out, k_in, count) = {
            let s = self.stacked(experts)?;
            (s.n_out, s.k, s.experts)
        };
        if width != k_in {
            return Err(PipelineError::BadInput(format!(
                "expert input `{input}` rows of {width}, experts expect {k_in}"
            )));
        }
        let slots = t_len * top_k;
        let mut o = self.alloc(slots * n_out)?;
        // MXFP4 experts (gpt-oss) are not decoded inside the tiles
        // (DISPATCH_KIND_TILES in blocks.cuh): the warp-per-output path.
        let mxfp4 = matches!(&self.stacked[&experts[0]].data, DevWeight::Quant(q) if q.kind == MXFP4);
        let grouped = self.precision == CudaPrecision::Bf16
            && k_in.is_multiple_of(64)
            && n_out.is_multiple_of(64)
            && slots >= GROUPED_MIN_SLOTS
            && !mxfp4;
        if grouped {
            self.flush_deferred()?;
            self.expert_linear_grouped(input, indices, experts, &mut o, per_slot)?;
            return self.set(out, vec![t_len, top_k, n_out], o);
        }
        // Few slots, over quantized experts (either precision: the blocks
        // are read where they are used, quant.cu) or bf16 ones with rows
        // of a multiple of 8 (16-byte loads): one warp per output, the gate
        // and up projections in one launch (deferred.rs; the output goes
        // into its slot before the launch, so it must not be an input). A
        // prompt's slots in Bf16 took the grouped kernel above, which
        // decodes quantized blocks inside its weight tiles.
        let quantized = matches!(&self.stacked[&experts[0]].data, DevWeight::Quant(_));
        if quantized || (self.precision == CudaPrecision::Bf16 && k_in.is_multiple_of(8)) {
            let launch = ExpertLaunch {
                quantized,
                input,
                indices,
                first: experts[0],
                out,
                per_slot,
                t_len,
                top_k,
                k: k_in,
                n_out,
                experts: count,
            };
            if out != input && out != indices {
                self.set(out, vec![t_len, top_k, n_out], o)?;
                return self.defer(Deferred::Expert(launch));
            }
            self.flush_deferred()?;
            self.expert_launch(launch, None, &o, &o)?;
            return self.set(out, vec![t_len, top_k, n_out], o);
        }
        self.flush_deferred()?;
        let f = self.weight_kernel(linear::EXPERT_LINEAR)?;
        let stream = self.stream();
        let ids = self.slot(indices)?.i32(indices)?;
        let x = self.slot(input)?.f32(input)?;
        let w = &self.stacked[&experts[0]].data;
        let a = (t_len as u32, top_k as u32, k_in as u32, n_out as u32, count as u32, u32::from(per_slot));
        let mut b = stream.launch_builder(&f);
        b.arg(&mut o).arg(x).arg(ids);
        push_weight(&mut b, w)?;
        b.arg(&a.0).arg(&a.1).arg(&a.2).arg(&a.3).arg(&a.4).arg(&a.5);
        // SAFETY: one warp per (t, j, n); ids are range-checked in the kernel.
        unsafe { b.launch(warps(slots * n_out)) }.map_err(gpu("expert_linear"))?;
        self.set(out, vec![t_len, top_k, n_out], o)
    }

    pub(super) fn moe_combine_on_device(
        &mut self,
        expert_out: Slot,
        weights: Slot,
        shared: Option<SharedTerm>,
        out: Slot,
    ) -> Result<()> {
        let (t_len, k, h) =
            SharedTerm::combine_shapes(expert_out, weights, shared, |s| Ok(self.slot(s)?.shape.clone()))?;
        let (et, wt) = (self.slot(expert_out)?, self.slot(weights)?);
        // The shared term's output and weight (any valid pointer when
        // ungated: the kernel never reads it).
        let term = match shared {
            None => None,
            Some(term) => {
                let values = self.slot(term.out)?;
                let weight = match term.weight {
                    Some(w) => self.slot(w)?.f32(w)?,
                    None => values.f32(term.out)?,
                };
                Some((values.f32(term.out)?, weight, u32::from(term.weight.is_some())))
            }
        };
        let mut o = self.alloc(t_len * h)?;
        let f = self.kernel(if term.is_some() { moe::COMBINE_SHARED } else { moe::COMBINE })?;
        let stream = self.stream();
        let a = (t_len as u32, k as u32, h as u32);
        let mut b = stream.launch_builder(&f);
        b.arg(&mut o).arg(et.f32(expert_out)?).arg(wt.f32(weights)?);
        if let Some((values, weight, gated)) = &term {
            b.arg(*values).arg(*weight).arg(gated);
        }
        b.arg(&a.0).arg(&a.1).arg(&a.2);
        // SAFETY: one thread per output element of t_len * h; expert_out
        // holds t_len * k * h, weights t_len * k, a shared output t_len *
        // h and its weight t_len (checked above).
        unsafe { b.launch(threads(t_len * h)) }.map_err(gpu("moe_combine"))?;
        self.set(out, vec![t_len, h], o)
    }

    /// The grouped (prefill) expert projection, Bf16 mode: the slots are
    /// sorted by expert on the device (counts, offsets, slot lists: two
    /// small launches, deterministic order), rows of slots with an id that
    /// is no expert are NaN, then one tensor-core kernel per projection
    /// reads each expert's weights once per 32 of its slots. Needs
    /// k % 64 == 0 and n_out % 64 == 0.
    fn expert_linear_grouped(
        &mut self,
        input: Slot,
        indices: Slot,
        experts: &[WeightId],
        o: &mut cudarc::driver::CudaSlice<f32>,
        per_slot: bool,
    ) -> Result<()> {
        let it = self.slot(indices)?;
        let (slots, top_k) = (it.shape[0] * it.shape[1], it.shape[1]);
        let s = self.stacked(experts)?;
        let (n_out, k_in, count) = (s.n_out, s.k, s.experts);
        self.sort_slots(indices, count)?;
        self.input_as_bf16(input)?;
        let stream = self.stream();
        let it = self.slot(indices)?;
        let DevData::I32(ids) = &it.data else {
            return Err(PipelineError::BadInput(format!("stage `{indices}` must hold int32 expert ids")));
        };
        let slots32 = slots as u32;
        let a = (slots32, n_out as u32, count as u32);
        let f = self.kernel(moe::INVALID_ROWS)?;
        let mut b = stream.launch_builder(&f);
        b.arg(&mut *o).arg(ids).arg(&a.0).arg(&a.1).arg(&a.2);
        // SAFETY: one warp per slot, writing only its own row of n_out.
        unsafe { b.launch(warps(slots)) }.map_err(gpu("moe_invalid_rows"))?;
        let sort = self.grouped.sort.as_ref().expect("sorted above");
        let x = &self.grouped.input.as_ref().expect("converted above").1;
        let (sorted, offsets, counts) = (&sort.sorted, &sort.offsets, &sort.counts);
        let w = &self.stacked[&experts[0]].data;
        let a = (top_k as u32, k_in as u32, n_out as u32, u32::from(per_slot));
        let quantized = matches!(w, DevWeight::Quant(_));
        let f = self.kernel(if quantized { moe::EXPERT_LINEAR_GROUPED_QUANT } else { moe::EXPERT_LINEAR_GROUPED })?;
        let mut b = stream.launch_builder(&f);
        b.arg(&mut *o).arg(x).arg(sorted).arg(offsets).arg(counts);
        if let DevWeight::Quant(q) = w {
            // Rows of whole blocks: k is a multiple of the block length
            // (checked when the weight was kept quantized).
            b.arg(&q.blocks).arg(&q.kind);
        } else {
            push_weight(&mut b, w)?;
        }
        b.arg(&a.0).arg(&a.1).arg(&a.2).arg(&a.3);
        let cfg = LaunchConfig {
            grid_dim: ((n_out / 64) as u32, count as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: block (n tile, e) writes rows n0..n0+64 of the slots listed
        // for e (valid slot indices < slots); k % 64 == 0 and n_out % 64 == 0
        // were checked by the caller, so every 16-byte load is in bounds;
        // quantized rows are k / block_len whole blocks, every piece of 8
        // values inside one block.
        unsafe { b.launch(cfg) }.map_err(gpu("expert_linear_grouped"))?;
        Ok(())
    }

    /// The slots of `indices` sorted by expert (counts, offsets, slot
    /// lists: two small launches, deterministic order), once per router
    /// output: the gate, up and down projections of a layer share them.
    fn sort_slots(&mut self, indices: Slot, count: usize) -> Result<()> {
        let key = (indices, self.activations.slots.version(indices), count);
        if self.grouped.sort.as_ref().is_some_and(|s| s.key == key) {
            return Ok(());
        }
        self.grouped.sort = None;
        let it = self.slot(indices)?;
        let slots = it.shape[0] * it.shape[1];
        let DevData::I32(ids) = &it.data else {
            return Err(PipelineError::BadInput(format!("stage `{indices}` must hold int32 expert ids")));
        };
        let stream = self.stream();
        let alloc_i32 = |n: usize| stream.alloc_zeros::<i32>(n.max(1)).map_err(gpu("allocating expert slot lists"));
        let (mut counts, mut offsets, mut sorted) = (alloc_i32(count)?, alloc_i32(count)?, alloc_i32(slots)?);
        let per_expert = LaunchConfig { grid_dim: (count as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let slots32 = slots as u32;
        let f = self.kernel(moe::COUNT_SLOTS)?;
        let mut b = stream.launch_builder(&f);
        b.arg(&mut counts).arg(ids).arg(&slots32);
        // SAFETY: one block per expert writing counts[e]; ids holds `slots`.
        unsafe { b.launch(per_expert) }.map_err(gpu("moe_count_slots"))?;
        let f = self.kernel(moe::SORT_SLOTS)?;
        let mut b = stream.launch_builder(&f);
        b.arg(&mut sorted).arg(&mut offsets).arg(&counts).arg(ids).arg(&slots32);
        // SAFETY: expert e writes offsets[e] and sorted[offsets[e]..][..counts[e]],
        // disjoint ranges within `slots`.
        unsafe { b.launch(per_expert) }.map_err(gpu("moe_sort_slots"))?;
        self.grouped.sort = Some(SortedSlots { key, counts, offsets, sorted });
        Ok(())
    }

    /// `input` as bf16 bits (exact: Bf16 mode's activations are bf16
    /// values), converted once per value of the slot (the gate and up
    /// projections read the same input).
    fn input_as_bf16(&mut self, input: Slot) -> Result<()> {
        let key = (input, self.activations.slots.version(input));
        if self.grouped.input.as_ref().is_some_and(|(k, _)| *k == key) {
            return Ok(());
        }
        self.grouped.input = None;
        let xt = self.slot(input)?;
        let converted = self.to_bf16(xt.f32(input)?, xt.numel())?;
        self.grouped.input = Some((key, converted));
        Ok(())
    }

    /// The stacked weights whose first expert is `experts[0]`.
    fn stacked(&self, experts: &[WeightId]) -> Result<&Stacked> {
        self.stacked
            .get(&experts[0])
            .filter(|s| s.experts == experts.len())
            .ok_or_else(|| PipelineError::BadInput("expert weights that are not a MoE layer's experts".into()))
    }
}

/// What the grouped expert projections of a layer share (moe.rs).
#[derive(Default)]
pub(super) struct GroupedShared {
    /// The slots sorted by expert, for one value of the router's ids.
    sort: Option<SortedSlots>,
    /// The input as bf16 bits, for one value of its slot.
    input: Option<((Slot, u64), CudaSlice<u16>)>,
}

struct SortedSlots {
    /// (ids slot, its version, experts).
    key: (Slot, u64, usize),
    counts: CudaSlice<i32>,
    offsets: CudaSlice<i32>,
    sorted: CudaSlice<i32>,
}
