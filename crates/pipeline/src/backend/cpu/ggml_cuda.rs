//! llama.cpp's CUDA kernel paths where they change the arithmetic, as the
//! CPU keeping [`GgmlPath::Cuda`] emulates them. Which kernel a product
//! takes depends on how many tokens the step holds (ggml-cuda.cu's
//! dispatch on sm_90 at llama.cpp 0c1e57098, the copy in llama-cpp-python
//! 0.3.36; docs/llama-cpp-numerics.md has the measurements):
//!
//! - up to [`VECTOR_MAX_BATCH`] tokens, the vector kernels (MMVQ, MMVF):
//!   quantized weights meet activations in q8_1 blocks of 32
//!   (ggml_activations.rs), f32 weights meet f32 activations;
//! - more tokens, the tensor-core kernels: Q4_K and Q5_K through MMQ, whose
//!   sub-block products `d * sc` and `dmin * m` are f16 and whose min term
//!   takes the f16 sum of each 32 float activations ([`matmul_mmq`]); f32
//!   weights through cuBLAS SGEMM in TF32 ([`tf32`] on both operands);
//!   attention's probabilities times the f16 values through batched cuBLAS
//!   computing in f16 (`CUBLAS_COMPUTE_16F`: 16 positions at a time into an
//!   f16 accumulator, which reproduces llama.cpp's to the bit on an H100).
//!   Its scores (queries times the f16 keys) llama.cpp's graph asks for in
//!   f32 precision: f16 operands, f32 sums, as in the vector path.
//!
//! Other quantized types keep the q8_1 blocks in MMQ too (Q6_K's products
//! measured at 1.00x the q8_1 expectation at 64 tokens).

use half::f16;

use super::ggml_activations;
use super::math::{by_weight_rows, dot, matmul_t_rounding};
use crate::backend::contract::GgmlPath;
use crate::weights::gguf::GgmlType;
use crate::weights::{WeightDtype, WeightTensor};

/// The most tokens for which llama.cpp's CUDA backend takes its vector
/// kernels (`MMVQ_MAX_BATCH_SIZE`, `MMVF_MAX_BATCH_SIZE`; the MoE
/// `mul_mat_id` limit on Hopper for the K-quants used here).
pub const VECTOR_MAX_BATCH: usize = 8;

/// Whether a step of `tokens` tokens runs llama.cpp's batched (tensor-core)
/// kernels.
pub fn batched(tokens: usize) -> bool {
    tokens > VECTOR_MAX_BATCH
}

/// `x` as a TF32 operand: the mantissa rounded to 10 bits, nearest with
/// ties to even (cuBLAS's conversion under `CUBLAS_TF32_TENSOR_OP_MATH`,
/// which reproduces llama.cpp's prompt router logits to 3e-7).
/// Infinities and NaN pass unchanged.
pub fn tf32(x: f32) -> f32 {
    if !x.is_finite() {
        return x;
    }
    let b = x.to_bits();
    let rounded = (b + 0xFFF + ((b >> 13) & 1)) & !0x1FFF;
    f32::from_bits(rounded)
}

/// `inputs · w` as cuBLAS computes it in TF32: both operands rounded by
/// [`tf32`], products summed in f64 (the reference's accumulation).
pub fn matmul_tf32(inputs: &[&[f32]], w: &WeightTensor) -> Vec<f32> {
    let rounded: Vec<Vec<f32>> = inputs.iter().map(|x| x.iter().map(|&v| tf32(v)).collect()).collect();
    let rows: Vec<&[f32]> = rounded.iter().map(Vec::as_slice).collect();
    matmul_t_rounding(&rows, w, |row| row.iter_mut().for_each(|v| *v = tf32(*v)))
}

/// `inputs · w` as MMQ computes it for a Q4_K or Q5_K weight: per
/// 32-value sub-block, `f16(d*sc) * Σ q·x8 - f16(dmin*m) * f16(Σ x)`, with
/// `x8` the q8_1 activations and `Σ x` the sum of the float ones (the
/// `DS4` layout's second half). None for other weight types.
pub fn matmul_mmq(inputs: &[&[f32]], w: &WeightTensor) -> Option<Vec<f32>> {
    if !matches!(w.dtype, WeightDtype::Quant(GgmlType::Q4_K | GgmlType::Q5_K)) {
        return None;
    }
    let k = w.row_len();
    let quantized: Vec<Vec<f32>> = inputs
        .iter()
        .map(|x| ggml_activations::as_vec_dot_input(GgmlPath::Cuda, w.dtype, x).unwrap_or_else(|| x.to_vec()))
        .collect();
    let sums: Vec<Vec<f32>> =
        inputs.iter().map(|x| x.chunks(32).map(|c| f16::from_f32(c.iter().sum::<f32>()).to_f32()).collect()).collect();
    Some(by_weight_rows(
        inputs.len(),
        w.shape[0],
        || (vec![0.0f32; k], vec![0.0f32; k / 32]),
        |r, (scaled, mins), outs| {
            w.read_row_mmq(r, scaled, mins);
            for ((o, x8), s) in outs.iter_mut().zip(&quantized).zip(&sums) {
                *o = (dot(x8, scaled) - dot(mins, s)) as f32;
            }
        },
    ))
}

/// Products a tensor-core GEMM computing in f16 (`CUBLAS_COMPUTE_16F`,
/// which batched cuBLAS takes for f16 operands on sm_90) sums exactly
/// before adding them to its f16 accumulator.
pub const F16_GEMM_CHUNK: usize = 16;

/// One step of that accumulation: `acc + part` rounded to f16.
pub fn f16_accumulate(acc: f64, part: f64) -> f64 {
    f16::from_f64(acc + part).to_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tf32_keeps_ten_mantissa_bits_rounding_to_nearest_even() {
        assert_eq!(tf32(1.0), 1.0);
        let ulp = 2f32.powi(-10);
        assert_eq!(tf32(1.0 + ulp), 1.0 + ulp);
        assert_eq!(tf32(1.0 + 0.4 * ulp), 1.0);
        assert_eq!(tf32(1.0 + 0.6 * ulp), 1.0 + ulp);
        // Ties: to the even mantissa.
        assert_eq!(tf32(1.0 + 0.5 * ulp), 1.0);
        assert_eq!(tf32(1.0 + 1.5 * ulp), 1.0 + 2.0 * ulp);
        assert_eq!(tf32(-(1.0 + 0.6 * ulp)), -(1.0 + ulp));
        assert!(tf32(f32::NAN).is_nan());
        assert_eq!(tf32(f32::INFINITY), f32::INFINITY);
    }

    /// `a · b` accumulated as the f16 GEMM does.
    fn f16_accumulated_dot(a: &[f32], b: &[f32]) -> f64 {
        a.chunks(F16_GEMM_CHUNK).zip(b.chunks(F16_GEMM_CHUNK)).fold(0.0, |acc, (x, y)| f16_accumulate(acc, dot(x, y)))
    }

    #[test]
    fn f16_accumulation_rounds_after_each_16_products() {
        // 16 products of 1 + 2^-12 each: exact in one chunk, then the
        // chunk's 16.0039 rounds to f16's 16.0 (spacing 2^-6 there).
        let a = vec![1.0 + 2f32.powi(-12); 16];
        assert_eq!(f16_accumulated_dot(&a, &[1.0; 16]), 16.0);
        // Chunks summing to 1024 and 1025: 2049 lies halfway between f16's
        // 2048 and 2050 (spacing 2 there) and rounds to the even 2048.
        let mut y = vec![64.0f32; 32];
        y[16] = 65.0;
        assert_eq!(f16_accumulated_dot(&y, &[1.0; 32]), 2048.0);
        assert_eq!(dot(&y, &[1.0; 32]), 2049.0);
        let z = vec![1.0f32; 40];
        assert_eq!(f16_accumulated_dot(&z, &z), 40.0);
    }

    #[test]
    fn batched_kernels_start_above_eight_tokens() {
        assert!(!batched(1) && !batched(8));
        assert!(batched(9) && batched(64));
    }
}
