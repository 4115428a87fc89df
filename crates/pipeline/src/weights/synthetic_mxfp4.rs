//! Synthetic MXFP4 weights, as gpt-oss's checkpoint ships its experts: per
//! 32 values of a row, the smallest e8m0 exponent that keeps the block's
//! largest synthetic value (synthetic.rs) within e2m1's largest, 6, and
//! each value the nearest e2m1 value of it over that power of two (ties to
//! the smaller magnitude), in GGUF's MXFP4 layout (quant_legacy.rs). The
//! same rule as python/tools/make_oracle_fixture.py's `mxfp4`. Made on the
//! host, in parallel.

use rayon::prelude::*;

use super::gguf::GgmlType;
use super::quant_legacy::MXFP4_BLOCK_BYTES;
use super::synthetic_values::synthetic_value;
use super::{SyntheticRecipe, WeightDtype, WeightTensor};
use crate::load_meter::LoadMeter;

/// e2m1's magnitudes, by code.
const E2M1: [f32; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];

/// One 32-value block of `values` as MXFP4 bytes (exponent, 16 bytes).
pub fn encode_block(values: &[f32], out: &mut [u8]) {
    let amax = values.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let e = if amax > 0.0 { (f64::from(amax) / 6.0).log2().ceil().clamp(-127.0, 127.0) as i32 } else { -127 };
    let scale = 2f64.powi(e);
    let code = |x: f32| -> u8 {
        let a = (f64::from(x) / scale).abs();
        let magnitude = (0..8)
            .min_by(|&i, &j| (a - f64::from(E2M1[i])).abs().total_cmp(&(a - f64::from(E2M1[j])).abs()).then(i.cmp(&j)))
            .unwrap_or(0) as u8;
        magnitude | if x < 0.0 { 8 } else { 0 }
    };
    out[0] = (e + 127) as u8;
    for j in 0..16 {
        out[1 + j] = code(values[j]) | (code(values[j + 16]) << 4);
    }
}

/// One synthetic MXFP4 tensor: its values' recipe (key, mean, spread).
#[derive(Debug, Clone, Copy)]
pub struct Mxfp4Recipe(pub SyntheticRecipe);

impl Mxfp4Recipe {
    /// The tensor `name` of `shape` (rows of a multiple of 32 values),
    /// made here; `meter` advances by its bytes.
    pub fn tensor(&self, name: String, shape: Vec<usize>, meter: &LoadMeter) -> WeightTensor {
        let cols = shape.last().copied().unwrap_or(1);
        let numel: usize = shape.iter().product();
        let mut bytes = vec![0u8; numel / 32 * MXFP4_BLOCK_BYTES];
        let row_bytes = cols / 32 * MXFP4_BLOCK_BYTES;
        bytes.par_chunks_mut(row_bytes.max(1)).enumerate().for_each(|(r, row)| {
            let mut values = [0.0f32; 32];
            for (b, block) in row.chunks_mut(MXFP4_BLOCK_BYTES).enumerate() {
                for (j, v) in values.iter_mut().enumerate() {
                    *v = synthetic_value(self.0.key, (r * cols + b * 32 + j) as u64, self.0.mean, self.0.std);
                }
                encode_block(&values, block);
            }
            meter.advance(row.len() as u64);
        });
        WeightTensor::owned(name, WeightDtype::Quant(GgmlType::MXFP4), shape, bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::quant::dequantize;

    #[test]
    fn each_value_decodes_to_the_nearest_e2m1_of_its_block_and_the_largest_fits() {
        let values: Vec<f32> = (0..32).map(|i| (i as f32 - 13.3) * 0.37).collect();
        let mut block = [0u8; MXFP4_BLOCK_BYTES];
        encode_block(&values, &mut block);
        let mut decoded = [0.0f32; 32];
        dequantize(GgmlType::MXFP4, &block, &mut decoded).unwrap();
        let scale = 2f32.powi(i32::from(block[0]) - 127);
        // The largest magnitude (18.5 * 0.37 = 6.845) within 6 * scale, and
        // the scale the smallest that does it.
        assert!(6.845 <= 6.0 * scale && 6.845 > 3.0 * scale, "scale {scale}");
        for (x, d) in values.iter().zip(decoded) {
            let best = E2M1.iter().map(|m| (m * scale - x.abs()).abs()).fold(f32::INFINITY, f32::min);
            assert!(((d.abs() - x.abs()).abs() - best).abs() < 1e-6, "{x} -> {d}");
            assert!(d == 0.0 || d.signum() == x.signum(), "{x} -> {d}");
        }
    }
}
