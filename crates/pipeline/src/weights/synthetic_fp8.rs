//! Synthetic FP8 block-scaled weights, laid out as DeepSeek-V3's checkpoint
//! ships its projections (fp8.rs reads them): e4m3 values with one f32
//! scale per 128 x 128 block. Each block's scale is a pure function of the
//! tensor's key and the block (a few times the values' spread over 448,
//! e4m3's largest finite value, varied by up to 50% between blocks so a
//! scale read from the wrong block shows), and each value is the synthetic
//! value (synthetic.rs) over its block's scale, rounded to the nearest e4m3
//! (ties to even). The bytes are made on the host, in parallel.

use std::sync::Arc;

use rayon::prelude::*;

use super::fp8::BlockScales;
#[cfg(test)]
use super::fp8::e4m3_to_f32;
use super::synthetic_values::{mix, synthetic_value};
use super::{SyntheticRecipe, WeightDtype, WeightTensor};
use crate::load_meter::LoadMeter;

/// The block edge (rows and columns), as DeepSeek-V3's `weight_block_size`.
pub const BLOCK: usize = 128;

/// The largest finite e4m3 value.
const E4M3_MAX: f32 = 448.0;

/// `x` as the nearest e4m3 (float8_e4m3fn) byte, ties to even; beyond
/// ±448 it saturates to ±448 (NaN stays NaN: 0x7F with its sign).
pub fn f32_to_e4m3(x: f32) -> u8 {
    let sign = if x.is_sign_negative() { 0x80u8 } else { 0 };
    if x.is_nan() {
        return sign | 0x7f;
    }
    let a = f64::from(x.abs());
    if a >= f64::from(E4M3_MAX) {
        return sign | 0x7e;
    }
    // a's binade e (subnormals share the smallest normal one's step,
    // 2^-9): a is `units` steps of 2^(e - 3), rounded; its code is then
    // units + 8 (e + 6), which also holds when rounding carries into the
    // next binade (units 16) or out of the subnormals (units 8).
    let e = if a < 2f64.powi(-6) { -6 } else { a.log2().floor() as i32 };
    let units = (a / 2f64.powi(e - 3)).round_ties_even() as i32;
    sign | (units + 8 * (e + 6)).min(0x7e) as u8
}

/// One synthetic FP8 tensor: its values' recipe (key, mean, spread).
#[derive(Debug, Clone, Copy)]
pub struct Fp8Recipe(pub SyntheticRecipe);

impl Fp8Recipe {
    /// The scale of block (row block, column block).
    pub fn scale(&self, block_row: usize, block_col: usize) -> f32 {
        let h = mix(self.0.key ^ mix(((block_row as u64) << 32) | block_col as u64));
        let spread = self.0.mean.abs() + 3.5 * self.0.std;
        spread / E4M3_MAX * (1.0 + (h % 32) as f32 / 64.0)
    }

    /// The tensor `name` of `shape` ([rows, cols]), made here, its scales
    /// attached; `meter` advances by its bytes.
    pub fn tensor(&self, name: String, shape: Vec<usize>, meter: &LoadMeter) -> WeightTensor {
        let (rows, cols) = (shape[0], shape[1]);
        let (br, bc) = (rows.div_ceil(BLOCK), cols.div_ceil(BLOCK));
        let values: Vec<f32> = (0..br * bc).map(|i| self.scale(i / bc, i % bc)).collect();
        let mut bytes = vec![0u8; rows * cols];
        bytes.par_chunks_mut(cols.max(1)).enumerate().for_each(|(r, row)| {
            for (c, q) in row.iter_mut().enumerate() {
                let v = synthetic_value(self.0.key, (r * cols + c) as u64, self.0.mean, self.0.std);
                *q = f32_to_e4m3(v / values[(r / BLOCK) * bc + c / BLOCK]);
            }
            meter.advance(row.len() as u64);
        });
        let scales = BlockScales { block: (BLOCK, BLOCK), cols: bc, values };
        WeightTensor::owned(name, WeightDtype::Fp8E4m3, shape, bytes).with_block_scales(Arc::new(scales))
    }
}

/// Whether e4m3 byte `q` decodes to a value no farther from `x` than any
/// other finite e4m3 value (the test's oracle).
#[cfg(test)]
fn is_nearest(x: f32, q: u8) -> bool {
    let d = (f64::from(e4m3_to_f32(q)) - f64::from(x)).abs();
    (0u8..=255).filter(|b| b & 0x7f != 0x7f).all(|b| (f64::from(e4m3_to_f32(b)) - f64::from(x)).abs() >= d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_rounds_to_the_nearest_e4m3_and_every_code_round_trips() {
        for b in (0u8..=255).filter(|b| b & 0x7f != 0x7f) {
            let x = e4m3_to_f32(b);
            assert_eq!(e4m3_to_f32(f32_to_e4m3(x)).to_bits(), x.to_bits(), "code {b:#04x}");
        }
        let mut x = 1e-5f32;
        while x < 500.0 {
            for v in [x, -x, x * 1.0001, x * 0.9999] {
                assert!(is_nearest(v.clamp(-448.0, 448.0), f32_to_e4m3(v)), "{v}: {:#04x}", f32_to_e4m3(v));
            }
            x *= 1.013;
        }
        // Ties go to the even mantissa: 1.0625 lies between 1.0 (0x38)
        // and 1.125 (0x39).
        assert_eq!(f32_to_e4m3(1.0625), 0x38);
        assert_eq!(f32_to_e4m3(1.1875), 0x3a);
        assert_eq!((f32_to_e4m3(1000.0), f32_to_e4m3(-1000.0)), (0x7e, 0xfe));
        assert!(e4m3_to_f32(f32_to_e4m3(f32::NAN)).is_nan());
    }

    #[test]
    fn a_tensor_has_its_blocks_scales_and_values_near_the_recipes() {
        let recipe = Fp8Recipe(SyntheticRecipe { key: 99, mean: 0.0, std: 0.02 });
        let t = recipe.tensor("w".into(), vec![200, 256], &LoadMeter::default());
        let s = t.block_scales().unwrap();
        assert_eq!((s.block, s.cols, s.values.len()), ((128, 128), 2, 4));
        assert!(s.values.iter().all(|v| *v > 0.0) && s.values.windows(2).any(|w| w[0] != w[1]));
        let got = t.to_f32_vec();
        let (mut err, mut norm) = (0.0f64, 0.0f64);
        for (i, g) in got.iter().enumerate() {
            let want = synthetic_value(99, i as u64, 0.0, 0.02);
            err += f64::from(g - want).powi(2);
            norm += f64::from(want).powi(2);
        }
        // e4m3 keeps 3 mantissa bits: about 2^-5 relative per value.
        let rel = (err / norm).sqrt();
        assert!(rel < 0.05 && rel > 0.0, "{rel}");
    }
}
