//! Projections through cuBLAS: `out[t, col + j] = x[t] · w[j]` for row-major
//! activations `x` `[rows, k]` and weights `w` `[n, k]` (PyTorch's layout),
//! into `n` columns of a row-major output of `out_stride` columns, so the
//! q, k and v projections land side by side in one buffer.
//!
//! F32: f32 operands, `CUBLAS_COMPUTE_32F` with the default math mode (no
//! TF32). Bf16: bf16 operands, f32 accumulation and f32 output. cuBLAS is
//! deterministic for a given device, sizes and stream, so a stage re-run
//! alone (bisect's graft) or with capture on computes the same bits.

use core::ffi::c_void;

use cudarc::cublas::{result, sys};
use cudarc::driver::{DevicePtr, DevicePtrMut, DeviceRepr};

use crate::device::GpuDevice;
use crate::error::{KernelError, Result};

/// Sizes of one projection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProjectionShape {
    /// Rows of `x` and of the output (tokens).
    pub rows: usize,
    /// Inner dimension (row length of `x` and `w`).
    pub k: usize,
    /// Output columns written (rows of `w`).
    pub n: usize,
    /// Row length of the output buffer (>= n; the view starts at the first
    /// column written).
    pub out_stride: usize,
}

/// An operand element type cuBLAS multiplies.
pub trait GemmElement: DeviceRepr {
    /// cuBLAS's name for it.
    const DATA_TYPE: sys::cudaDataType;
}

impl GemmElement for f32 {
    const DATA_TYPE: sys::cudaDataType = sys::cudaDataType::CUDA_R_32F;
}

/// bf16 values as their raw bits.
impl GemmElement for u16 {
    const DATA_TYPE: sys::cudaDataType = sys::cudaDataType::CUDA_R_16BF;
}

impl GpuDevice {
    /// `out[t * out_stride + j] = Σ_i x[t * k + i] · w[j * k + i]` for
    /// `t < rows`, `j < n`, accumulated in f32, on the compute stream.
    /// Every buffer's length is checked against the shape, so this cannot
    /// read or write out of bounds.
    pub fn project<T: GemmElement>(
        &self,
        x: &impl DevicePtr<T>,
        w: &impl DevicePtr<T>,
        out: &mut impl DevicePtrMut<f32>,
        shape: ProjectionShape,
    ) -> Result<()> {
        let ProjectionShape { rows, k, n, out_stride } = shape;
        if rows == 0 || n == 0 {
            return Ok(());
        }
        let out_needed = (rows - 1) * out_stride + n;
        if x.len() < rows * k || w.len() < n * k || out.len() < out_needed || out_stride < n {
            return Err(KernelError::Blas {
                action: format!("checking a {rows}x{k} by {n}x{k} projection"),
                message: format!(
                    "buffers of {} / {} / {} elements, need {} / {} / {out_needed}",
                    x.len(),
                    w.len(),
                    out.len(),
                    rows * k,
                    n * k
                ),
            });
        }
        let int = |v: usize| i32::try_from(v).map_err(|_| KernelError::GemmTooLarge { m: n, n: rows, k });
        let (m32, n32, k32, ldc) = (int(n)?, int(rows)?, int(k)?, int(out_stride)?);
        let stream = self.stream();
        let (x_ptr, _x_sync) = x.device_ptr(stream);
        let (w_ptr, _w_sync) = w.device_ptr(stream);
        let (out_ptr, _out_sync) = out.device_ptr_mut(stream);
        let (alpha, beta) = (1.0f32, 0.0f32);
        // Column-major view: outᵀ [n, rows] (ld out_stride) = w [n, k] (stored
        // as wᵀ, ld k, so transposed) × xᵀ [k, rows] (ld k).
        // SAFETY: the pointers are live device buffers of this context whose
        // lengths were checked above against the extents cuBLAS touches;
        // alpha and beta are host scalars (the handle's default pointer mode).
        unsafe {
            result::gemm_ex(
                *self.blas().handle(),
                sys::cublasOperation_t::CUBLAS_OP_T,
                sys::cublasOperation_t::CUBLAS_OP_N,
                m32,
                n32,
                k32,
                (&alpha) as *const f32 as *const c_void,
                w_ptr as *const c_void,
                T::DATA_TYPE,
                k32,
                x_ptr as *const c_void,
                T::DATA_TYPE,
                k32,
                (&beta) as *const f32 as *const c_void,
                out_ptr as *mut c_void,
                sys::cudaDataType::CUDA_R_32F,
                ldc,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| KernelError::Blas {
            action: format!("a {rows}x{k} by {n}x{k} projection"),
            message: e.to_string(),
        })
    }
}
