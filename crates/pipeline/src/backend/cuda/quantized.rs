//! Projections over weights kept quantized on the device (GGUF blocks:
//! weights.rs). A few rows (decode) read the blocks themselves and decode
//! each value where they use it (`gemv_quant`, `expert_linear_quant` in
//! kernels-cuda's quant.cu), so a decode step reads the quantized bytes
//! only. A prompt's expert projections in Bf16 decode the blocks inside the
//! grouped tensor-core kernel's weight tiles (moe.rs,
//! `expert_linear_grouped_quant`); a prompt's dense projections decode the
//! weight into a scratch buffer in the backend's precision, then take
//! cuBLAS (as llama.cpp does for its cuBLAS batches): read once per
//! projection, not per row. In Bf16 mode every path multiplies by the
//! values rounded to bf16, as weights decoded at upload are.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use kernels_cuda::blas::ProjectionShape;
use kernels_cuda::kernels::quant;
use kernels_cuda::quant::dequant_device;

use super::tensors::DevData;
use super::weights::{DevWeight, QuantWeight, alloc_weight};
use super::{CudaBackend, CudaPrecision, gpu, kernel_error, threads};
use crate::backend::Slot;
use crate::error::{PipelineError, Result};
use crate::weights::WeightId;

/// Projections of at most this many rows read quantized weights directly
/// (the kernel keeps one accumulator per row).
pub(super) const QUANT_GEMV_MAX_ROWS: usize = 8;

/// One warp per output in blocks of two warps: a k or v projection's 512
/// rows then spread over 256 blocks (every SM of an H100 or H200), where
/// blocks of eight warps would leave half the SMs idle.
fn quant_warps(n: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: ((n * 32).div_ceil(64).max(1) as u32, 1, 1), block_dim: (64, 1, 1), shared_mem_bytes: 0 }
}

/// The first `n` values of `w` decoded into `scratch` (reused when it holds
/// at least `n` values of the backend's precision, else a new buffer).
pub(super) fn decode_into(
    device: &kernels_cuda::GpuDevice,
    precision: CudaPrecision,
    scratch: Option<DevWeight>,
    w: &QuantWeight,
    n: usize,
) -> Result<DevWeight> {
    let fits = |d: &DevWeight| match d {
        DevWeight::F32(s) => precision == CudaPrecision::F32 && s.len() >= n,
        DevWeight::Bf16(s) => precision == CudaPrecision::Bf16 && s.len() >= n,
        DevWeight::Quant(_) => false,
    };
    let mut scratch = match scratch.filter(fits) {
        Some(s) => s,
        None => alloc_weight(device, precision, n, "allocating a decoded weight")?,
    };
    match &mut scratch {
        DevWeight::F32(s) => dequant_device(device, s, 0, n, w.kind, &w.blocks),
        DevWeight::Bf16(s) => dequant_device(device, s, 0, n, w.kind, &w.blocks),
        DevWeight::Quant(_) => unreachable!("filtered above"),
    }
    .map_err(kernel_error)?;
    Ok(scratch)
}

impl CudaBackend {
    /// `linear_on_device` when some of `weights` are quantized: `o` (rows
    /// x total) gets each matrix's columns in turn.
    pub(super) fn linear_quantized(
        &mut self,
        input: Slot,
        weights: &[WeightId],
        out: Slot,
        (rows, k, total): (usize, usize, usize),
        mut o: CudaSlice<f32>,
    ) -> Result<()> {
        let few = rows <= QUANT_GEMV_MAX_ROWS;
        let raw = u32::from(!self.rounds_projection(out));
        let mut x_bf16 = None;
        let mut through_blas = false;
        let mut col = 0usize;
        for &id in weights {
            let n = self.store.get(id).shape[0];
            if few && let DevWeight::Quant(q) = self.weight(id) {
                let f = self.kernel(quant::GEMV_QUANT)?;
                let stream = self.stream();
                let x = self.slot(input)?.f32(input)?;
                let a = (q.kind, q.block_len as u32, q.block_bytes as u32, n as u32, rows as u32, k as u32);
                let (stride, col32) = (total as u32, col as u32);
                let mut b = stream.launch_builder(&f);
                b.arg(&mut o).arg(x).arg(&q.blocks).arg(&a.0).arg(&a.1).arg(&a.2).arg(&a.3).arg(&a.4).arg(&a.5);
                b.arg(&stride).arg(&col32).arg(&raw);
                // SAFETY: one warp per row r < n writes rows t < rows <= 8 at
                // column col + r < total of `o` (rows * total); row r's blocks
                // are k / block_len blocks at r * that * block_bytes, within
                // the weight's n rows (k was checked against the weight).
                unsafe { b.launch(quant_warps(n)) }.map_err(gpu("gemv_quant"))?;
            } else {
                // Many rows, or a decoded weight among quantized ones: cuBLAS.
                self.refuse_in_capture("a projection through cuBLAS")?;
                if self.precision == CudaPrecision::Bf16 && x_bf16.is_none() {
                    x_bf16 = Some(self.to_bf16(self.slot(input)?.f32(input)?, rows * k)?);
                }
                let decoded = self.decoded(id, n * k)?;
                let shape = ProjectionShape { rows, k, n, out_stride: total };
                let x = self.slot(input)?.f32(input)?;
                let w = decoded.as_ref().unwrap_or_else(|| self.weight(id));
                self.project_decoded(x, x_bf16.as_ref(), w, &mut o.slice_mut(col..), shape)?;
                if decoded.is_some() {
                    self.scratch = decoded;
                }
                through_blas = true;
            }
            col += n;
        }
        if through_blas { self.set_projection(out, vec![rows, total], o) } else { self.set(out, vec![rows, total], o) }
    }

    /// Per-expert projection over quantized experts, one warp per output
    /// (a decode step's slots, or any step in F32 mode).
    pub(super) fn expert_linear_quantized(
        &mut self,
        (input, indices, first): (Slot, Slot, WeightId),
        (t_len, top_k, k, n_out, count, per_slot): (usize, usize, usize, usize, usize, bool),
        o: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let f = self.kernel(quant::EXPERT_LINEAR_QUANT)?;
        let stream = self.stream();
        let DevData::I32(ids) = &self.slot(indices)?.data else {
            return Err(PipelineError::BadInput(format!("stage `{indices}` must hold int32 expert ids")));
        };
        let x = self.slot(input)?.f32(input)?;
        let DevWeight::Quant(q) = &self.stacked[&first].data else {
            return Err(PipelineError::Gpu("expert_linear_quantized on decoded experts".into()));
        };
        let a = (q.kind, q.block_len as u32, q.block_bytes as u32);
        let d = (t_len as u32, top_k as u32, k as u32, n_out as u32, count as u32, u32::from(per_slot));
        let mut b = stream.launch_builder(&f);
        b.arg(&mut *o).arg(x).arg(ids).arg(&q.blocks).arg(&a.0).arg(&a.1).arg(&a.2);
        b.arg(&d.0).arg(&d.1).arg(&d.2).arg(&d.3).arg(&d.4).arg(&d.5);
        // SAFETY: one warp per (t, j, n) writing out[slot * n_out + n] of
        // t_len * top_k * n_out; ids are range-checked in the kernel, so an
        // expert's rows are within the stack of `count` experts.
        unsafe { b.launch(quant_warps(t_len * top_k * n_out)) }.map_err(gpu("expert_linear_quant"))?;
        Ok(())
    }

    /// Dense weight `id` decoded into the scratch buffer (its first `n`
    /// values) if it is quantized; None if it is not. Give the buffer back
    /// to `self.scratch` after use.
    pub(super) fn decoded(&mut self, id: WeightId, n: usize) -> Result<Option<DevWeight>> {
        let DevWeight::Quant(q) = &self.weights[&id] else { return Ok(None) };
        decode_into(&self.device, self.precision, self.scratch.take(), q, n).map(Some)
    }

    /// Embedding rows from a quantized table.
    pub(super) fn embedding_quantized(&mut self, table: WeightId, h: usize, o: &mut CudaSlice<f32>) -> Result<()> {
        let f = self.kernel(quant::EMBEDDING_QUANT)?;
        let stream = self.stream();
        let tokens = self.tokens.as_ref().ok_or_else(|| PipelineError::BadInput("no step begun".into()))?;
        let DevWeight::Quant(q) = self.weight(table) else {
            return Err(PipelineError::Gpu("embedding_quantized on a decoded table".into()));
        };
        let a = (q.kind, q.block_len as u32, q.block_bytes as u32, self.t_len as u32, h as u32);
        let mut b = stream.launch_builder(&f);
        b.arg(&mut *o).arg(&q.blocks).arg(tokens).arg(&a.0).arg(&a.1).arg(&a.2).arg(&a.3).arg(&a.4);
        // SAFETY: out holds T*H; tokens T ids < V (checked by
        // Forward::begin_step), each row h / block_len whole blocks.
        unsafe { b.launch(threads(self.t_len * h)) }.map_err(gpu("embedding_quant"))?;
        Ok(())
    }
}
