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
pub(super) fn quant_warps(n: usize) -> LaunchConfig {
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
        let mut i = 0;
        while i < weights.len() {
            // Up to three quantized matrices in a row go out as one launch
            // (q, k and v of a decode step).
            let run = weights[i..]
                .iter()
                .take(3)
                .take_while(|&&id| few && matches!(self.weight(id), DevWeight::Quant(_)))
                .count();
            if run > 0 {
                let n = self.gemv_quantized(input, &weights[i..i + run], &mut o, (rows, k, total, col), raw)?;
                col += n;
                i += run;
                continue;
            }
            let id = weights[i];
            let n = self.store.get(id).shape[0];
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
            col += n;
            i += 1;
        }
        if through_blas { self.set_projection(out, vec![rows, total], o) } else { self.set(out, vec![rows, total], o) }
    }

    /// `gemv_quant` over one to three quantized weights (`ids`) side by
    /// side into columns `col..` of `o` (rows x total); returns the number
    /// of columns written.
    fn gemv_quantized(
        &self,
        input: Slot,
        ids: &[WeightId],
        o: &mut CudaSlice<f32>,
        (rows, k, total, col): (usize, usize, usize, usize),
        raw: u32,
    ) -> Result<usize> {
        let parts: Vec<(&QuantWeight, u32)> = ids
            .iter()
            .map(|&id| match self.weight(id) {
                DevWeight::Quant(q) => Ok((q, self.store.get(id).shape[0] as u32)),
                _ => Err(PipelineError::Gpu("gemv_quantized on a decoded weight".into())),
            })
            .collect::<Result<_>>()?;
        // Absent parts: the first weight again, with no rows.
        let part = |i: usize| parts.get(i).copied().map_or((parts[0].0, 0), |p| p);
        let (p0, p1, p2) = (part(0), part(1), part(2));
        let f = self.kernel(quant::GEMV_QUANT)?;
        let stream = self.stream();
        let x = self.slot(input)?.f32(input)?;
        let dims = (rows as u32, k as u32, total as u32, col as u32);
        let mut b = stream.launch_builder(&f);
        b.arg(&mut *o).arg(x).arg(&p0.0.blocks).arg(&p1.0.blocks).arg(&p2.0.blocks);
        b.arg(&p0.0.kind).arg(&p1.0.kind).arg(&p2.0.kind).arg(&p0.1).arg(&p1.1).arg(&p2.1);
        b.arg(&dims.0).arg(&dims.1).arg(&dims.2).arg(&dims.3).arg(&raw);
        let n = (p0.1 + p1.1 + p2.1) as usize;
        // SAFETY: one warp per output feature f < n writes rows t < rows <= 8
        // at column col + f < total of `o` (rows * total); feature f's
        // weight row is k / block_len whole blocks within its matrix's rows
        // (k was checked against every weight).
        unsafe { b.launch(quant_warps(n)) }.map_err(gpu("gemv_quant"))?;
        Ok(n)
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
