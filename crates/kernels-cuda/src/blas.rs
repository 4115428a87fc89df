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

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic bf16 bits of values in [-1, 1) (a 64-bit LCG).
    fn bf16_values(n: usize, seed: u64) -> Vec<u16> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let v = ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
                (v.to_bits() >> 16) as u16
            })
            .collect()
    }

    fn widen(bits: &[u16]) -> Vec<f64> {
        bits.iter().map(|&b| f32::from_bits((b as u32) << 16) as f64).collect()
    }

    /// cuBLAS's Hopper bf16 kernels store through the tensor memory
    /// accelerator, which compute-sanitizer's initcheck does not see (it
    /// reports the next kernel's reads of their output as uninitialised).
    /// This is the independent check that they write every output element
    /// and nothing else: the output is poisoned with NaN, then every
    /// element in the n written columns must be finite and equal the f64
    /// reference, and the columns beyond n must still be NaN. Shapes are
    /// those of the qwen3-30b-a3b projections at 1, 8 and 64 tokens.
    #[test]
    fn bf16_projections_write_every_output_element_and_nothing_else() {
        let Some(device) = crate::test_gpu() else { return };
        let stream = device.stream().clone();
        for rows in [1, 8, 64] {
            for (k, n) in [(2048, 5120), (4096, 2048), (2048, 128), (2048, 768), (768, 2048)] {
                let out_stride = n + 3;
                let (x, w) = (bf16_values(rows * k, rows as u64), bf16_values(n * k, (k + n) as u64));
                let x_dev = stream.clone_htod(&x).unwrap();
                let w_dev = stream.clone_htod(&w).unwrap();
                let mut out = stream.clone_htod(&vec![f32::NAN; rows * out_stride]).unwrap();
                device.project(&x_dev, &w_dev, &mut out, ProjectionShape { rows, k, n, out_stride }).unwrap();
                let got = stream.clone_dtoh(&out).unwrap();
                let (xf, wf) = (widen(&x), widen(&w));
                let (mut err, mut norm) = (0.0f64, 0.0f64);
                for t in 0..rows {
                    for j in 0..out_stride {
                        let g = got[t * out_stride + j];
                        if j >= n {
                            assert!(g.is_nan(), "rows {rows} k {k} n {n}: column {j} beyond n was written");
                            continue;
                        }
                        assert!(g.is_finite(), "rows {rows} k {k} n {n}: element ({t}, {j}) not written: {g}");
                        let want: f64 = (0..k).map(|i| xf[t * k + i] * wf[j * k + i]).sum();
                        err += (g as f64 - want).powi(2);
                        norm += want * want;
                    }
                }
                let rel = (err / norm).sqrt();
                assert!(rel < 1e-5, "rows {rows} k {k} n {n}: rel_l2 {rel:e} against the f64 reference");
            }
        }
    }
}
