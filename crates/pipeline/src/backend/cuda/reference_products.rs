//! [`CudaProducts`]: the CPU reference's products on a CUDA device, to the
//! bit (kernels_cuda::reference). `Cuda(dtype: F64)` is the CPU reference
//! with these products: every other stage is its own code.

use std::sync::atomic::{AtomicBool, Ordering};

use kernels_cuda::reference::{ReferenceDots, ReferenceWeight, WeightFormat, WeightSource};
use kernels_cuda::synthetic::ScaleFields;

use super::kernel_error;
use crate::backend::contract::Precision;
use crate::backend::cpu::device_products::DeviceProducts;
use crate::error::Result;
use crate::weights::{WeightDtype, WeightTensor};

/// The reference's products on one device.
pub struct CudaProducts {
    dots: ReferenceDots,
    /// Set when the device failed: from then on the CPU computes them.
    failed: AtomicBool,
}

impl CudaProducts {
    /// Opens device `ordinal` (a context of its own beside any other run's).
    pub fn open(ordinal: usize) -> Result<Self> {
        Ok(Self { dots: ReferenceDots::open(ordinal).map_err(kernel_error)?, failed: AtomicBool::new(false) })
    }

    /// What the device did so far.
    pub fn stats(&self) -> kernels_cuda::reference::DotsStats {
        self.dots.stats()
    }
}

impl DeviceProducts for CudaProducts {
    fn matmul_t(&self, inputs: &[&[f32]], w: &WeightTensor, weights: Precision) -> Option<Vec<f32>> {
        if self.failed.load(Ordering::Relaxed) {
            return None;
        }
        // Plain and ggml block storage, in memory or synthetic (made on the
        // device); FP8 (its scales are a tensor of their own) stays on the
        // CPU.
        let format = match w.dtype {
            WeightDtype::Bf16 => WeightFormat::Bf16,
            WeightDtype::F16 => WeightFormat::F16,
            WeightDtype::F32 => WeightFormat::F32,
            WeightDtype::Quant(kind) => WeightFormat::from_ggml(kind.0)?,
            WeightDtype::Fp8E4m3 | WeightDtype::U8 => return None,
        };
        let source = match (w.host_bytes(), w.recipe(), w.block_recipe()) {
            (Some((bytes, owner)), _, _) => WeightSource::Host { bytes, owner },
            (None, Some(r), _) if format == WeightFormat::Bf16 => {
                WeightSource::SyntheticBf16 { key: r.key, mean: r.mean, std: r.std }
            }
            (None, None, Some(r)) => {
                let (d_at, dmin_at) = r.scale_fields();
                let fields = ScaleFields { d_at: d_at as u32, dmin_at: dmin_at.map(|at| at as u32) };
                WeightSource::SyntheticBlocks { key: r.key, fields, scales: (r.d, r.dmin) }
            }
            _ => return None,
        };
        let cols = w.row_len();
        let host = ReferenceWeight { source, format, rows: w.numel() / cols.max(1), cols };
        match self.dots.matmul_t(&host, inputs, weights == Precision::Bf16) {
            Ok(out) => out,
            Err(e) => {
                tracing::warn!(
                    "the reference's products failed on {} ({e}); the CPU computes them from here on (the same results)",
                    self.dots.device_name()
                );
                self.failed.store(true, Ordering::Relaxed);
                None
            }
        }
    }

    fn describe(&self) -> String {
        let s = self.dots.stats();
        // MB below a gigabyte: a fixture's weights are not "0.0 GB".
        let size = |bytes: usize| match bytes as f64 {
            b if b >= 1e9 => format!("{:.1} GB", b / 1e9),
            b => format!("{:.1} MB", b / 1e6),
        };
        // Synthetic weights are made on the device: said only where some were.
        let made = match (s.generated_bytes, s.regenerated) {
            (0, 0) => String::new(),
            (kept, again) => format!(" ({} of them made there, {again} products made their weight again)", size(kept)),
        };
        format!(
            "products on {}: {} launches, {} of weights in device memory{made}, {} read from host memory, {} tensors on the CPU",
            self.dots.device_name(),
            s.launches,
            size(s.copied_bytes + s.generated_bytes),
            size(s.mapped_bytes),
            s.declined
        )
    }

    fn backend_name(&self) -> &'static str {
        "cuda-f64"
    }
}
