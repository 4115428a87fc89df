//! Weights on the device: f32 or bf16 buffers, stacked experts, and their
//! upload from a [`WeightStore`](crate::weights::WeightStore).

use cudarc::driver::{CudaSlice, LaunchArgs, PushKernelArg};
use kernels_cuda::GpuDevice;

use super::{CudaPrecision, gpu};
use crate::error::Result;

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

/// A tensor's values on the host, in the backend's precision.
pub(super) enum HostValues {
    F32(Vec<f32>),
    Bf16(Vec<u16>),
}

impl HostValues {
    pub(super) fn empty(precision: CudaPrecision) -> Self {
        match precision {
            CudaPrecision::F32 => HostValues::F32(Vec::new()),
            CudaPrecision::Bf16 => HostValues::Bf16(Vec::new()),
        }
    }

    pub(super) fn extend(&mut self, other: HostValues) {
        match (self, other) {
            (HostValues::F32(a), HostValues::F32(b)) => a.extend(b),
            (HostValues::Bf16(a), HostValues::Bf16(b)) => a.extend(b),
            _ => unreachable!("one precision per backend"),
        }
    }
}

/// A weight's values for upload: f32, or bf16 bits (taken as stored when
/// the checkpoint is bf16, rounded to nearest otherwise).
pub(super) fn host_values(t: &crate::weights::WeightTensor, precision: CudaPrecision) -> HostValues {
    match precision {
        CudaPrecision::F32 => HostValues::F32(t.to_f32_vec()),
        CudaPrecision::Bf16 if t.dtype == crate::weights::WeightDtype::Bf16 => {
            HostValues::Bf16(t.bytes().chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect())
        }
        CudaPrecision::Bf16 => {
            HostValues::Bf16(t.to_f32_vec().iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect())
        }
    }
}

pub(super) fn upload(device: &GpuDevice, values: &HostValues, what: &str) -> Result<DevWeight> {
    let stream = device.stream();
    Ok(match values {
        HostValues::F32(v) => DevWeight::F32(stream.clone_htod(v).map_err(gpu(what))?),
        HostValues::Bf16(v) => DevWeight::Bf16(stream.clone_htod(v).map_err(gpu(what))?),
    })
}
