//! Activations and KV caches in device memory.

use cudarc::driver::CudaSlice;

use super::Slot;
use crate::error::{PipelineError, Result};

/// A device tensor.
pub(super) enum DevData {
    F32(CudaSlice<f32>),
    I32(CudaSlice<i32>),
}

pub(super) struct DevTensor {
    pub(super) shape: Vec<usize>,
    pub(super) data: DevData,
}

impl DevTensor {
    pub(super) fn f32(&self, slot: Slot) -> Result<&CudaSlice<f32>> {
        match &self.data {
            DevData::F32(d) => Ok(d),
            DevData::I32(_) => Err(PipelineError::BadInput(format!("stage `{slot}` holds int32, expected float32"))),
        }
    }

    pub(super) fn width(&self) -> usize {
        self.shape.last().copied().unwrap_or(1)
    }

    pub(super) fn rows(&self) -> usize {
        self.shape.iter().product::<usize>() / self.width().max(1)
    }
}

/// Keys and values of one layer, `[capacity, width]` with `len` rows used.
pub(super) struct DevCache {
    pub(super) k: CudaSlice<f32>,
    pub(super) v: CudaSlice<f32>,
    pub(super) width: usize,
    pub(super) len: usize,
    pub(super) capacity: usize,
}
