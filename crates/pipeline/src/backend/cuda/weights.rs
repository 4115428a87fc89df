//! Weights on the device: f32 or bf16 buffers, or GGUF blocks kept as
//! stored; stacked experts; and how they get there from a [`WeightStore`]:
//! copied from the host; for a synthetic tensor that was never
//! materialised, generated on the device by the same function as the host
//! generator. GGUF blocks (Q8_0, Q4_K, Q5_K, Q6_K) stay quantized on the
//! device (a quarter to a half of the bf16 bytes) and are decoded where
//! they are used, bit for bit as the host decodes them (kernels-cuda's
//! quant.cu). Block-scaled FP8 (DeepSeek-V3, Qwen3-FP8) stays FP8 the same
//! way, laid out as rows of blocks each with its f32 scale (fp8.rs's
//! `as_row_blocks`, kernels-cuda's `FP8_B128`): a little over half the
//! bf16 bytes.

use cudarc::driver::{CudaSlice, LaunchArgs, PushKernelArg};
use kernels_cuda::GpuDevice;
use kernels_cuda::WeightElement;
use kernels_cuda::quant::{FP8_B128, block_layout};
use kernels_cuda::synthetic::{ScaleFields, synthetic_blocks_fill, synthetic_fill};

use super::{CudaPrecision, gpu, kernel_error};
use crate::error::{PipelineError, Result};
use crate::weights::{WeightDtype, WeightStore, WeightTensor, fp8};

/// A weight on the device, in the backend's precision.
pub(super) enum DevWeight {
    F32(CudaSlice<f32>),
    Bf16(CudaSlice<u16>),
    /// GGUF blocks as stored, decoded where used.
    Quant(QuantWeight),
}

impl DevWeight {
    /// Bytes on the device.
    pub(super) fn bytes(&self) -> usize {
        match self {
            DevWeight::F32(d) => 4 * d.len(),
            DevWeight::Bf16(d) => 2 * d.len(),
            DevWeight::Quant(q) => q.blocks.len(),
        }
    }
}

/// A quantized weight: rows of whole blocks of one ggml type.
pub(super) struct QuantWeight {
    pub(super) blocks: CudaSlice<u8>,
    /// The ggml type id.
    pub(super) kind: u32,
    /// Values and bytes per block.
    pub(super) block_len: usize,
    pub(super) block_bytes: usize,
}

/// Pushes a decoded weight argument, whichever its type; quantized blocks
/// are an error (their kernels take more arguments: quant.cu).
pub(super) fn push_weight<'a>(b: &mut LaunchArgs<'a>, w: &'a DevWeight) -> Result<()> {
    match w {
        DevWeight::F32(d) => b.arg(d),
        DevWeight::Bf16(d) => b.arg(d),
        DevWeight::Quant(_) => {
            return Err(PipelineError::Gpu("a kernel for decoded weights was given quantized blocks".into()));
        }
    };
    Ok(())
}

/// The ggml type of `t` when it stays quantized on the device: blocks of
/// a type the device decodes, in rows of whole blocks. Block-scaled FP8 whose blocks span 128 columns and whose rows are
/// whole blocks stays FP8 too, as rows of [`FP8_B128`] blocks (fp8.rs's
/// `as_row_blocks`); other FP8 tensors are decoded on the host.
pub(super) fn kept_quantized(t: &WeightTensor) -> Option<u32> {
    match t.dtype {
        WeightDtype::Quant(kind) => {
            let (len, _) = block_layout(kind.0)?;
            (t.recipe().is_none() && t.row_len().is_multiple_of(len)).then_some(kind.0)
        }
        WeightDtype::Fp8E4m3 => fp8::has_row_blocks(t).then_some(FP8_B128),
        _ => None,
    }
}

/// Bytes of `t`'s blocks on the device, when it stays quantized.
fn kept_bytes(t: &WeightTensor, kind: u32) -> usize {
    if kind == FP8_B128 { fp8::row_block_bytes(t) } else { t.byte_len() }
}

/// Bytes `t` takes on the device.
pub(super) fn device_bytes(t: &WeightTensor, precision: CudaPrecision) -> usize {
    match kept_quantized(t) {
        Some(kind) => kept_bytes(t, kind),
        None => t.numel() * element_size(precision),
    }
}

/// `parts` (one tensor, or the experts of one projection, all of ggml type
/// `kind`) uploaded as their blocks, one after the other.
pub(super) fn upload_quantized(
    device: &GpuDevice,
    parts: &[&WeightTensor],
    kind: u32,
    what: &str,
) -> Result<DevWeight> {
    let (block_len, block_bytes) =
        block_layout(kind).ok_or_else(|| PipelineError::Gpu(format!("{what}: ggml type {kind} is not decoded")))?;
    let total: usize = parts.iter().map(|t| kept_bytes(t, kind)).sum();
    let stream = device.stream();
    let mut blocks = stream.alloc_zeros::<u8>(total.max(1)).map_err(gpu(what))?;
    let mut offset = 0;
    for t in parts {
        if kept_quantized(t) != Some(kind) {
            return Err(PipelineError::BadInput(format!(
                "{what}: `{}` is not of the first part's block type",
                t.describe()
            )));
        }
        let len = kept_bytes(t, kind);
        if kind == FP8_B128 {
            let mut view = blocks.slice_mut(offset..offset + len);
            stream.memcpy_htod(&fp8::as_row_blocks(t)[..], &mut view).map_err(gpu(what))?;
            offset += len;
            continue;
        }
        match t.block_recipe() {
            // Synthetic blocks are made on the device, as the host makes them.
            Some(r) => {
                let (d_at, dmin_at) = r.scale_fields();
                let fields = ScaleFields { d_at: d_at as u32, dmin_at: dmin_at.map(|at| at as u32) };
                let shape = (len / block_bytes, block_bytes);
                synthetic_blocks_fill(device, &mut blocks, offset, shape, r.key, fields, (r.d, r.dmin))
                    .map_err(kernel_error)?;
            }
            None => {
                let mut view = blocks.slice_mut(offset..offset + len);
                stream.memcpy_htod(&t.bytes()[..], &mut view).map_err(gpu(what))?;
            }
        }
        offset += len;
    }
    Ok(DevWeight::Quant(QuantWeight { blocks, kind, block_len, block_bytes }))
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
    let need: usize = store.tensors().iter().map(|t| device_bytes(t, precision)).sum();
    // A prompt's dense projections decode a quantized weight into a scratch
    // buffer (quantized.rs): count the largest.
    let need = need + quantized_scratch(store) * element_size(precision);
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

/// Values of the scratch a prompt's dense projection decodes a quantized
/// weight into (quantized.rs): the largest quantized tensor. (Quantized
/// experts are never decoded whole: moe.rs.)
pub(super) fn quantized_scratch(store: &WeightStore) -> usize {
    store.tensors().iter().filter(|t| kept_quantized(t).is_some()).map(|t| t.numel()).max().unwrap_or(0)
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
        DevWeight::Quant(_) => Err(PipelineError::Gpu(format!("{what}: decoded values into quantized blocks"))),
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
    // GGUF blocks the device decodes stay quantized (`upload_quantized`);
    // an odd tensor of them (rows not whole blocks) is decoded here.
    if let WeightDtype::Quant(kind) = t.dtype
        && block_layout(kind.0).is_some()
    {
        return kernels_cuda::quant::dequant_fill(device, dst, offset, n, kind.0, &t.bytes()).map_err(kernel_error);
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
