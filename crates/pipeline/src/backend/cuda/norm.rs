//! The norm family on the device (kernels/norm.cu): RMSNorm of rows and
//! Qwen3's per-head QK-norm.

use cudarc::driver::{LaunchConfig, PushKernelArg};
use kernels_cuda::kernels::norm;

use super::weights::push_weight;
use super::{CudaBackend, gpu};
use crate::backend::{QkNormArgs, Slot};
use crate::error::{PipelineError, Result};
use crate::weights::WeightId;

/// One block per row of `width` normalised values, up to 1024 threads,
/// about two elements each: a decode step's single row is spread over the
/// whole block (rms_norm, and MLA's latent norm in mla.rs).
pub(super) fn row_blocks(rows: usize, width: usize) -> LaunchConfig {
    let block = (width.div_ceil(2).next_multiple_of(32)).clamp(32, 1024) as u32;
    LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (block, 1, 1), shared_mem_bytes: 0 }
}

impl CudaBackend {
    pub(super) fn rms_norm_on_device(&mut self, input: Slot, weight: WeightId, eps: f64, out: Slot) -> Result<()> {
        let x = self.slot(input)?;
        let (rows, width) = (x.rows(), x.width());
        if self.store.get(weight).numel() != width {
            return Err(PipelineError::BadInput(format!("stage `{input}` rows of {width} do not fit the norm weight")));
        }
        let mut o = self.alloc(rows * width)?;
        let f = self.weight_kernel(norm::RMS_NORM)?;
        let stream = self.stream();
        let (w32, e32) = (width as u32, eps as f32);
        let mut b = stream.launch_builder(&f);
        b.arg(&mut o).arg(x.f32(input)?);
        push_weight(&mut b, self.weight(weight))?;
        b.arg(&w32).arg(&e32);
        // SAFETY: one block per row of `width`; buffers hold rows*width.
        unsafe { b.launch(row_blocks(rows, width)) }.map_err(gpu("rms_norm"))?;
        self.set(out, vec![rows, width], o)
    }

    pub(super) fn qk_norm_on_device(&mut self, input: Slot, args: QkNormArgs, out: Slot) -> Result<()> {
        let x = self.slot(input)?;
        let (rows, in_width) = (x.rows(), x.width());
        let heads = args.q_heads + args.kv_heads;
        if in_width < heads * args.head_dim {
            return Err(PipelineError::BadInput(format!("qk_norm needs rows of at least {}", heads * args.head_dim)));
        }
        let mut o = self.alloc(rows * heads * args.head_dim)?;
        let f = self.weight_kernel(norm::QK_NORM)?;
        let stream = self.stream();
        let a = (in_width as u32, args.q_heads as u32, args.kv_heads as u32, args.head_dim as u32, args.eps as f32);
        let mut b = stream.launch_builder(&f);
        b.arg(&mut o).arg(x.f32(input)?);
        push_weight(&mut b, self.weight(args.q_weight))?;
        push_weight(&mut b, self.weight(args.k_weight))?;
        b.arg(&a.0).arg(&a.1).arg(&a.2).arg(&a.3).arg(&a.4);
        let cfg = LaunchConfig { grid_dim: (rows as u32, heads as u32, 1), block_dim: (64, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: one block per (token, head); reads within rows of in_width.
        unsafe { b.launch(cfg) }.map_err(gpu("qk_norm"))?;
        self.set(out, vec![rows, heads * args.head_dim], o)
    }
}
