//! moetrace's CUDA layer, through cudarc with dynamic loading (it builds
//! with no CUDA toolkit; libcuda, libnvrtc and libcublas are opened at run
//! time).
//!
//! - [`GpuDevice`]: a context on one device; kernel families compiled by
//!   NVRTC once per process for the device's own architecture, with exact
//!   IEEE arithmetic (no FTZ, no FMA contraction).
//! - `kernels/<family>.cu` with the shared `kernels/common.cuh`, embedded
//!   with `include_str!` ([`sources`]).
//! - [`synthetic`]: synthetic weights generated on the device, bit-identical
//!   to the host generator.
//!
//! - [`reference`]: the CPU reference's products on the device, to the
//!   bit (the `Cuda(dtype: F64)` reference).
//! - [`blas`]: the projections through cuBLAS (f32 without TF32, or bf16
//!   operands with f32 accumulation).
//!
//! This crate is linked into every CLI build so CI compiles it.

pub mod blas;
pub mod collectives;
pub mod device;
pub mod error;
pub mod gather;
pub mod kernels;
pub mod quant;
pub mod reference;
pub mod sources;
pub mod synthetic;

pub use device::{GpuDevice, KernelBuild};
pub use error::{KernelError, Result, is_out_of_memory};

/// What a device weight buffer holds: bf16 bits (`u16`) or `f32`; the
/// entry points that write weights of that type.
pub trait WeightElement: cudarc::driver::DeviceRepr {
    /// The synthetic generator (synthetic.rs).
    const SYNTHETIC_FILL: kernels::Kernel;
    /// The ggml block decoder (quant.rs).
    const DEQUANT: kernels::Kernel;
}

impl WeightElement for u16 {
    const SYNTHETIC_FILL: kernels::Kernel = kernels::synthetic::FILL_BF16;
    const DEQUANT: kernels::Kernel = kernels::quant::DEQUANT_BF16;
}

impl WeightElement for f32 {
    const SYNTHETIC_FILL: kernels::Kernel = kernels::synthetic::FILL_F32;
    const DEQUANT: kernels::Kernel = kernels::quant::DEQUANT_F32;
}

/// For GPU tests: device 0 when `MOETRACE_GPU` is set, else None after
/// saying that the test checked nothing.
#[cfg(test)]
pub(crate) fn test_gpu() -> Option<GpuDevice> {
    if std::env::var_os("MOETRACE_GPU").is_none() {
        eprintln!("SKIPPED (GPU test): set MOETRACE_GPU=1 on a machine with an NVIDIA GPU; this test checked nothing");
        return None;
    }
    Some(GpuDevice::open(0).expect("a GPU"))
}
