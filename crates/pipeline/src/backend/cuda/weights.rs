//! Weights on the device: f32 or bf16 buffers, stacked experts, and how
//! they get there from a [`WeightStore`]: copied from the host; for a
//! synthetic tensor that was never materialised, generated on the device
//! by the same function as the host generator; for GGUF blocks (Q8_0,
//! Q4_K, Q5_K, Q6_K), copied as stored and decoded on the device (both
//! bit-identical to the host's values).

use cudarc::driver::{CudaSlice, LaunchArgs, PushKernelArg};
use kernels_cuda::GpuDevice;
use kernels_cuda::WeightElement;
use kernels_cuda::quant::{block_layout, dequant_fill};
use kernels_cuda::synthetic::synthetic_fill;

use super::{CudaPrecision, gpu, kernel_error};
use crate::error::{PipelineError, Result};
use crate::weights::{WeightDtype, WeightStore, WeightTensor};

/// A weight on the device, in the backend's precision.
pub(super) enum DevWeight {
    F32(CudaSlice<f32>),
    Bf16(CudaSlice<u16>),
}

/// Pushes a weight argument, whichever its type.
pub(super) fn push_weight<'a>(b: &mut LaunchArgs<'a>, w: &'a DevWeight) {
    match w {
        DevWeight::F32(d) => b.arg(d),
        DevWeight::Bf16(d) => b.arg(d),
    };
}

/// Stacked expert weights of one projection: `[E, n_out, k]`.
pub(super) struct Stacked {
    pub(super) data: DevWeight,
    pub(super) n_out: usize,
    pub(super) k: usize,
    pub(super) experts: usize,
}

/// Bytes per weight element on the device.
pub(super) fn element_size(precision: CudaPrecision) -> usize {
    match precision {
        CudaPrecision::F32 => 4,
        CudaPrecision::Bf16 => 2,
    }
}

/// Checks that every weight of `store` fits in the device's free memory
/// (with `reserve` bytes left for activations, caches and cuBLAS), before
/// anything is allocated, so a model that cannot fit fails at once with
/// the numbers rather than part-way through the upload.
pub(super) fn check_fits(device: &GpuDevice, store: &WeightStore, precision: CudaPrecision) -> Result<()> {
    let need: usize = store.tensors().iter().map(|t| t.numel() * element_size(precision)).sum();
    let (free, total) = device.memory().map_err(kernel_error)?;
    let reserve = (total / 50).max(512 << 20);
    if need + reserve > free {
        return Err(PipelineError::GpuOutOfMemory {
            action: format!("uploading the weights in {precision:?}"),
            detail: format!(
                ": they need {:.1} GB (plus {:.1} GB kept for activations) but {} has {:.1} GB free of {:.1} GB",
                need as f64 / 1e9,
                reserve as f64 / 1e9,
                device.name(),
                free as f64 / 1e9,
                total as f64 / 1e9
            ),
        });
    }
    Ok(())
}

/// A zeroed device buffer of `n` weights in `precision`.
pub(super) fn alloc_weight(device: &GpuDevice, precision: CudaPrecision, n: usize, what: &str) -> Result<DevWeight> {
    let stream = device.stream();
    Ok(match precision {
        CudaPrecision::F32 => DevWeight::F32(stream.alloc_zeros(n.max(1)).map_err(gpu(what))?),
        CudaPrecision::Bf16 => DevWeight::Bf16(stream.alloc_zeros(n.max(1)).map_err(gpu(what))?),
    })
}

/// Writes tensor `t` into `dst` from element `offset` on: generated on the
/// device when `t` is synthetic and not materialised, else converted on
/// the host (f32, or bf16 bits: as stored when the checkpoint is bf16,
/// rounded to nearest otherwise) and copied.
pub(super) fn fill_weight(
    device: &GpuDevice,
    dst: &mut DevWeight,
    offset: usize,
    t: &WeightTensor,
    what: &str,
) -> Result<()> {
    match dst {
        DevWeight::F32(d) => fill(device, d, offset, t, what, || t.to_f32_vec()),
        DevWeight::Bf16(d) => fill(device, d, offset, t, what, || bf16_bits(t)),
    }
}

fn fill<T: WeightElement>(
    device: &GpuDevice,
    dst: &mut CudaSlice<T>,
    offset: usize,
    t: &WeightTensor,
    what: &str,
    host: impl FnOnce() -> Vec<T>,
) -> Result<()> {
    let n = t.numel();
    if let Some(r) = t.recipe() {
        return synthetic_fill(device, dst, offset, n, r.key, (r.mean, r.std)).map_err(kernel_error);
    }
    // GGUF blocks: copied as stored and decoded on the device.
    if let WeightDtype::Quant(kind) = t.dtype
        && block_layout(kind.0).is_some()
    {
        return dequant_fill(device, dst, offset, n, kind.0, &t.bytes()).map_err(kernel_error);
    }
    let values = host();
    let mut view = dst.slice_mut(offset..offset + n);
    device.stream().memcpy_htod(&values, &mut view).map_err(gpu(what))
}

fn bf16_bits(t: &WeightTensor) -> Vec<u16> {
    if t.dtype == WeightDtype::Bf16 {
        t.bytes().chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect()
    } else {
        t.to_f32_vec().iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect()
    }
}
