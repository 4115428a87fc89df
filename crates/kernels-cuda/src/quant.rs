//! ggml block formats decoded on the device (kernels/quant.cu): a GGUF
//! tensor's blocks are copied as they are stored (about a quarter of the
//! f32 bytes for Q4_K) and decoded into the weight buffer, bit for bit the
//! values the host decoder gives.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use crate::WeightElement;
use crate::device::GpuDevice;
use crate::error::{KernelError, Result, driver};

/// Not a ggml type: moetrace's row block of block-scaled FP8 weights
/// (`MT_FP8_B128` in blocks.cuh): the f32 scale of the 128 x 128 block
/// (little-endian), then the 128 e4m3 values of one row in that block;
/// a value decodes as `f32(q) * scale`.
pub const FP8_B128: u32 = 200;

/// (values, bytes) per block of the type with id `kind` that the device
/// decodes: ggml's Q8_0 (8), Q4_K (12), Q5_K (13), Q6_K (14), MXFP4 (39),
/// and [`FP8_B128`].
pub fn block_layout(kind: u32) -> Option<(usize, usize)> {
    match kind {
        8 => Some((32, 34)),
        39 => Some((32, 17)),
        12 => Some((256, 144)),
        13 => Some((256, 176)),
        14 => Some((256, 210)),
        FP8_B128 => Some((128, 132)),
        _ => None,
    }
}

/// Decodes `blocks` (consecutive blocks of ggml type `kind`, as a GGUF file
/// stores them) into `out[offset..offset + n]`: copied to the device as
/// they are, then [`dequant_device`].
pub fn dequant_fill<T: WeightElement>(
    device: &GpuDevice,
    out: &mut CudaSlice<T>,
    offset: usize,
    n: usize,
    kind: u32,
    blocks: &[u8],
) -> Result<()> {
    check_blocks(kind, n, blocks.len())?;
    if n == 0 {
        return Ok(());
    }
    let source = device.stream().clone_htod(blocks).map_err(driver("copying quantized blocks to the device"))?;
    dequant_device(device, out, offset, n, kind, &source)
}

/// An error of the decoding.
fn bad(message: String) -> KernelError {
    KernelError::Driver { action: "decoding quantized weights".into(), message }
}

/// The (values, bytes) per block of ggml type `kind`, when the device
/// decodes it and `n` values are whole blocks of it.
fn whole_blocks(kind: u32, n: usize) -> Result<(usize, usize)> {
    let (len, block_bytes) =
        block_layout(kind).ok_or_else(|| bad(format!("ggml type {kind} is not decoded on the device")))?;
    if !n.is_multiple_of(len) {
        return Err(bad(format!("{n} values are not whole blocks of {len}")));
    }
    Ok((len, block_bytes))
}

/// Checks that `bytes` hold `n` values in blocks of ggml type `kind`;
/// returns the type's (values, bytes) per block.
pub fn check_blocks(kind: u32, n: usize, bytes: usize) -> Result<(usize, usize)> {
    let (len, block_bytes) = whole_blocks(kind, n)?;
    if bytes != n / len * block_bytes {
        return Err(bad(format!("{bytes} bytes do not hold {n} values in blocks of {len} in {block_bytes} bytes")));
    }
    Ok((len, block_bytes))
}

/// Decodes the first `n` values of `blocks` (device memory, consecutive
/// blocks of ggml type `kind`) into `out[offset..offset + n]`, on the
/// device's stream.
pub fn dequant_device<T: WeightElement>(
    device: &GpuDevice,
    out: &mut CudaSlice<T>,
    offset: usize,
    n: usize,
    kind: u32,
    blocks: &CudaSlice<u8>,
) -> Result<()> {
    let (len, bytes) = whole_blocks(kind, n)?;
    if n / len * bytes > blocks.len() || offset + n > out.len() {
        return Err(bad(format!(
            "{n} values at {offset} from {} bytes of blocks do not fit a buffer of {}",
            blocks.len(),
            out.len()
        )));
    }
    if n == 0 {
        return Ok(());
    }
    let stream = device.stream();
    let function = device.kernel(T::DEQUANT)?;
    // One thread per eight values (n is whole blocks: a multiple of 8).
    let grid = (n / 8).div_ceil(256).clamp(1, 65_535) as u32;
    let config = LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let (kind32, n64) = (kind, n as u64);
    let mut view = out.slice_mut(offset..offset + n);
    let mut launch = stream.launch_builder(&function);
    launch.arg(&mut view).arg(blocks).arg(&kind32).arg(&n64);
    // SAFETY: the arguments match dequant_*(T*, const u8*, u32 kind, u64);
    // `view` holds n elements and `blocks` at least n / len blocks of
    // `bytes` (checked above); the kernel reads only blocks below n / len
    // and writes only indices below n.
    unsafe { launch.launch(config) }.map_err(driver(format!("launching {}", T::DEQUANT.name)))?;
    Ok(())
}
