//! Synthetic weights generated on the device (kernels/synthetic.cu), so a
//! model too large for host memory never crosses PCIe.

use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};

use crate::WeightElement;
use crate::device::GpuDevice;
use crate::error::{Result, driver};

/// The f32 scale the generator multiplies the centred Irwin–Hall sum by
/// for a standard deviation `std`.
pub fn synthetic_scale(std: f32) -> f32 {
    (std as f64 / (4.0 * (65536.0f64 * 65536.0 - 1.0) / 12.0).sqrt()) as f32
}

/// Fills `out[offset..offset + n]` with elements `0..n` of the synthetic
/// tensor with key `key` (the host's `synthetic_value`, rounded to bf16).
pub fn synthetic_fill<T: WeightElement>(
    device: &GpuDevice,
    out: &mut CudaSlice<T>,
    offset: usize,
    n: usize,
    key: u64,
    (mean, std): (f32, f32),
) -> Result<()> {
    if offset + n > out.len() {
        return Err(crate::KernelError::Driver {
            action: "filling synthetic weights".into(),
            message: format!("{n} values at {offset} do not fit a buffer of {}", out.len()),
        });
    }
    if n == 0 {
        return Ok(());
    }
    let function = device.kernel(T::SYNTHETIC_FILL)?;
    let blocks = n.div_ceil(256).clamp(1, 65_535) as u32;
    let config = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let (n64, scale) = (n as u64, synthetic_scale(std));
    let mut view = out.slice_mut(offset..offset + n);
    let stream = device.stream();
    let mut launch = stream.launch_builder(&function);
    launch.arg(&mut view).arg(&n64).arg(&key).arg(&mean).arg(&scale);
    // SAFETY: the argument list matches synthetic_fill_*(T*, u64, u64,
    // float, float); `view` holds n elements and the kernel writes only
    // indices below n.
    unsafe { launch.launch(config) }.map_err(driver(format!("launching {}", T::SYNTHETIC_FILL.name)))?;
    Ok(())
}

/// Where a block format keeps its f16 scales: (byte of d, byte of dmin or
/// None).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScaleFields {
    /// Byte offset of d in a block.
    pub d_at: u32,
    /// Byte offset of dmin, for the formats that have one.
    pub dmin_at: Option<u32>,
}

/// Fills `out[offset..]` with `blocks` blocks of `block_bytes` of the
/// synthetic block-format tensor with key `key` (pipeline's
/// synthetic_blocks.rs): random bytes, and the f16 bits `d` and `dmin` at
/// their fields.
pub fn synthetic_blocks_fill(
    device: &GpuDevice,
    out: &mut CudaSlice<u8>,
    offset: usize,
    (blocks, block_bytes): (usize, usize),
    key: u64,
    fields: ScaleFields,
    (d, dmin): (u16, u16),
) -> Result<()> {
    let n = blocks * block_bytes;
    if offset + n > out.len() || block_bytes == 0 {
        return Err(crate::KernelError::Driver {
            action: "filling synthetic blocks".into(),
            message: format!("{n} bytes at {offset} do not fit a buffer of {}", out.len()),
        });
    }
    if n == 0 {
        return Ok(());
    }
    let function = device.kernel(crate::kernels::synthetic::BLOCKS)?;
    let grid = n.div_ceil(256).clamp(1, 65_535) as u32;
    let config = LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let a = (blocks as u64, block_bytes as u32, fields.d_at, u32::from(d), fields.dmin_at.unwrap_or(u32::MAX));
    let dmin = u32::from(dmin);
    let mut view = out.slice_mut(offset..offset + n);
    let stream = device.stream();
    let mut launch = stream.launch_builder(&function);
    launch.arg(&mut view).arg(&a.0).arg(&a.1).arg(&key).arg(&a.2).arg(&a.3).arg(&a.4).arg(&dmin);
    // SAFETY: the argument list matches synthetic_blocks(u8*, u64, u32,
    // u64, u32, u32, u32, u32); `view` holds blocks * block_bytes bytes and
    // the kernel writes only those.
    unsafe { launch.launch(config) }.map_err(driver("launching synthetic_blocks"))?;
    Ok(())
}

/// Allocates `n` bf16 values (as raw bits) and fills them with the
/// synthetic generator for tensor key `key`.
pub fn synthetic_fill_bf16(device: &GpuDevice, n: usize, key: u64, mean: f32, std: f32) -> Result<CudaSlice<u16>> {
    let mut out = device.stream().alloc_zeros::<u16>(n).map_err(driver(format!("allocating {n} bf16 values")))?;
    synthetic_fill(device, &mut out, 0, n, key, (mean, std))?;
    Ok(out)
}

/// Copies device values back to the host.
pub fn download<T: DeviceRepr + Default + Clone>(device: &GpuDevice, data: &CudaSlice<T>) -> Result<Vec<T>> {
    device.stream().clone_dtoh(data).map_err(driver("copying to the host"))
}
