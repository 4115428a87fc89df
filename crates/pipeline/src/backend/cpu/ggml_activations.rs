//! llama.cpp's CPU numerics as an option of the CPU backend: before each
//! dot product with a weight, ggml's CPU path converts the activation row
//! to the weight type's `vec_dot_type` (ggml-cpu's type traits): Q8_K for
//! Q4_K, Q5_K and Q6_K weights, Q8_0 for Q8_0, f16 for f16, bf16 for bf16,
//! nothing for f32. This module gives the row those conversions leave
//! (each block quantized as `quantize_row_q8_K_ref` / `quantize_row_q8_0_ref`
//! do, then read back), so the dot product that follows (f64, as the
//! reference's) sees the activations llama.cpp's does. What it does not
//! reproduce is the order of llama.cpp's integer and f32 sums, whose effect
//! is at f32 rounding, far below the quantization's.

use crate::backend::contract::GgmlPath;
use crate::weights::WeightDtype;

/// Q8_K's and Q8_0's block lengths.
const QK_K: usize = 256;
const QK8_0: usize = 32;

/// `x` as `path` (llama.cpp's CPU or CUDA backend) hands it to a dot
/// product with a `dtype` weight; None when it is used as it is (f32
/// weights). CUDA quantizes activations to q8_1 for every block type:
/// blocks of 32 with one scale, d = max|x| / 127, q = round(x / d), the
/// products scaled by d as f16 (its `half2` ds), which Q8_0's conversion
/// computes but for x * (1/d) against x / d (a rounding apart at ties).
pub fn as_vec_dot_input(path: GgmlPath, dtype: WeightDtype, x: &[f32]) -> Option<Vec<f32>> {
    if path == GgmlPath::Cuda && matches!(dtype, WeightDtype::Quant(_)) {
        return Some(x.chunks(QK8_0).flat_map(q8_0_block).collect());
    }
    match dtype {
        // FP8 is not a ggml type: its products take the row as it is.
        WeightDtype::F32 | WeightDtype::Fp8E4m3 | WeightDtype::U8 => None,
        WeightDtype::F16 => Some(f16_operand(x)),
        WeightDtype::Bf16 => Some(x.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect()),
        // The 32-value kinds take Q8_0 (Q8_1 for Q4_1 and Q5_1, whose
        // values quantize alike) as llama.cpp's vec_dot_type.
        WeightDtype::Quant(kind) if kind.block_len() == Some(32) => {
            Some(x.chunks(QK8_0).flat_map(q8_0_block).collect())
        }
        WeightDtype::Quant(_) => Some(x.chunks(QK_K).flat_map(q8_k_block).collect()),
    }
}

/// `x` converted to f16 (nearest, ties to even) and back: the f32 operand
/// of a dot product with f16 values as ggml converts it (an f16 weight, or
/// llama.cpp's f16 KV cache against the query and the probabilities).
pub fn f16_operand(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect()
}

/// One Q8_0 block quantized and read back: d = max|x| / 127 stored as f16,
/// q = round(x / d) (half away from zero, as C's roundf), value = f16(d) * q.
fn q8_0_block(x: &[f32]) -> Vec<f32> {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let stored = half::f16::from_f32(d).to_f32();
    x.iter().map(|&v| stored * (v * id).round()).collect()
}

/// One Q8_K block quantized and read back: the value of largest magnitude
/// (its sign kept) gives iscale = -127 / max, q = nearest(iscale * x)
/// (ties to even, as ggml's `nearest_int`) capped at 127, d = 1 / iscale in
/// f32, value = d * q. An all-zero block stays zero.
fn q8_k_block(x: &[f32]) -> Vec<f32> {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in x {
        if v.abs() > amax {
            (amax, max) = (v.abs(), v);
        }
    }
    if amax == 0.0 {
        return vec![0.0; x.len()];
    }
    let iscale = -127.0 / max;
    let d = 1.0 / iscale;
    x.iter().map(|&v| d * ((iscale * v).round_ties_even().min(127.0))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::gguf::GgmlType;

    #[test]
    fn q8_k_keeps_the_largest_value_and_rounds_the_rest_to_its_grid() {
        let mut x: Vec<f32> = (0..256).map(|i| (i as f32 - 100.0) / 50.0).collect();
        x[7] = -4.0; // the largest magnitude, negative: iscale = 127 / 4
        let y = as_vec_dot_input(GgmlPath::Cpu, WeightDtype::Quant(GgmlType::Q4_K), &x).unwrap();
        assert_eq!(y[7], -4.0);
        let step = 4.0f32 / 127.0;
        for (a, b) in x.iter().zip(&y) {
            assert!((a - b).abs() <= step / 2.0 + 1e-6, "{a} -> {b}");
            let k = b / step;
            assert!((k - k.round()).abs() < 1e-3, "{b} is on the grid of {step}");
        }
        // Two blocks are quantized apart; zeros stay zeros.
        let mut two = vec![0.0f32; 512];
        two[300] = 1.0;
        two[301] = 0.3;
        let y = as_vec_dot_input(GgmlPath::Cpu, WeightDtype::Quant(GgmlType::Q6_K), &two).unwrap();
        assert!(y[..256].iter().all(|&v| v == 0.0));
        assert_eq!(y[300], 1.0);
        assert!((y[301] - 38.0 / 127.0).abs() < 1e-6, "{}", y[301]);
    }

    #[test]
    fn q8_0_scales_each_block_of_32_by_its_f16_maximum() {
        let x: Vec<f32> = (0..64).map(|i| if i < 32 { i as f32 * 0.1 } else { -(i as f32) }).collect();
        let y = as_vec_dot_input(GgmlPath::Cpu, WeightDtype::Quant(GgmlType::Q8_0), &x).unwrap();
        let d = x[31] / 127.0;
        assert_eq!(y[10], half::f16::from_f32(d).to_f32() * (x[10] * (1.0 / d)).round());
        let d1 = half::f16::from_f32(63.0 / 127.0).to_f32();
        assert_eq!(y[63], d1 * -127.0);
        assert!(as_vec_dot_input(GgmlPath::Cpu, WeightDtype::F32, &x).is_none());
        assert_eq!(
            as_vec_dot_input(GgmlPath::Cpu, WeightDtype::F16, &[0.1]).unwrap()[0],
            half::f16::from_f32(0.1).to_f32()
        );
    }

    #[test]
    fn cuda_quantizes_every_block_type_in_blocks_of_32_and_leaves_bf16_as_the_cpu_does() {
        let x: Vec<f32> = (0..256).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0).collect();
        for kind in [GgmlType::Q4_K, GgmlType::Q6_K, GgmlType::Q8_0] {
            let cuda = as_vec_dot_input(GgmlPath::Cuda, WeightDtype::Quant(kind), &x).unwrap();
            let q8_0 = as_vec_dot_input(GgmlPath::Cpu, WeightDtype::Quant(GgmlType::Q8_0), &x).unwrap();
            assert_eq!(cuda, q8_0, "{kind:?}");
        }
        // Per block of 32: the CPU's Q8_K (one scale per 256) differs.
        let cpu = as_vec_dot_input(GgmlPath::Cpu, WeightDtype::Quant(GgmlType::Q4_K), &x).unwrap();
        assert_ne!(cpu, as_vec_dot_input(GgmlPath::Cuda, WeightDtype::Quant(GgmlType::Q4_K), &x).unwrap());
        for dtype in [WeightDtype::Bf16, WeightDtype::F32] {
            assert_eq!(as_vec_dot_input(GgmlPath::Cuda, dtype, &x), as_vec_dot_input(GgmlPath::Cpu, dtype, &x));
        }
    }
}
