//! Synthetic weights generated on the device (kernels/synthetic.cu), so a
//! model too large for host memory never crosses PCIe.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use crate::device::GpuDevice;
use crate::error::{Result, driver};

/// The f32 scale the generator multiplies the centred Irwin–Hall sum by
/// for a standard deviation `std`.
pub fn synthetic_scale(std: f32) -> f32 {
    (std as f64 / (4.0 * (65536.0f64 * 65536.0 - 1.0) / 12.0).sqrt()) as f32
}

/// Allocates `n` bf16 values (as raw bits) and fills them with the
/// synthetic generator for tensor key `key`.
pub fn synthetic_fill_bf16(device: &GpuDevice, n: usize, key: u64, mean: f32, std: f32) -> Result<CudaSlice<u16>> {
    let stream = device.stream();
    let mut out = stream.alloc_zeros::<u16>(n).map_err(driver(format!("allocating {n} bf16 values")))?;
    let function = device.function("synthetic", "synthetic_fill_bf16")?;
    let blocks = n.div_ceil(256).clamp(1, 65_535) as u32;
    let config = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let (n64, scale) = (n as u64, synthetic_scale(std));
    let mut launch = stream.launch_builder(&function);
    launch.arg(&mut out).arg(&n64).arg(&key).arg(&mean).arg(&scale);
    // SAFETY: the argument list matches synthetic_fill_bf16(u16*, u64, u64,
    // float, float); `out` holds n elements and the kernel writes only
    // indices below n.
    unsafe { launch.launch(config) }.map_err(driver("launching synthetic_fill_bf16"))?;
    Ok(out)
}

/// Copies device bf16 bits back to the host.
pub fn download_u16(device: &GpuDevice, data: &CudaSlice<u16>) -> Result<Vec<u16>> {
    device.stream().clone_dtoh(data).map_err(driver("copying to the host"))
}
