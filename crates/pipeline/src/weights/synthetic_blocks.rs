//! Synthetic weights in ggml block formats (the `-q4km` presets): every
//! byte of a block a pure function of the tensor's key and the block's
//! index (splitmix64 words, as for the other synthetic weights), except
//! the f16 scale fields, fixed per tensor from the role's standard
//! deviation so that the decoded values have about that spread and mean 0.
//! The CUDA backend writes the same bytes on the device
//! (`synthetic_blocks` in kernels-cuda's synthetic.cu).

use half::f16;

use super::gguf::GgmlType;
use super::synthetic_values::mix;

/// How the blocks of a synthetic tensor are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockRecipe {
    /// [`super::tensor_key`] of the seed and the tensor's name.
    pub key: u64,
    /// The block format (Q8_0, Q4_K, Q5_K or Q6_K).
    pub kind: GgmlType,
    /// f16 bits of the block scale `d`...
    pub d: u16,
    /// ... and of `dmin` (Q4_K, Q5_K; 0 for the others).
    pub dmin: u16,
}

impl BlockRecipe {
    /// Blocks of `kind` whose values have about standard deviation `std`.
    /// The factors are the standard deviations of the decoded value over
    /// uniform random bytes with d = 1 (dmin chosen so the mean is 0):
    /// Q4_K d·sc·q − dmin·m with sc, m < 64, q < 16, dmin = 7.5 d: 258 d;
    /// Q5_K (q < 32, dmin = 15.5 d): 527 d; Q6_K d·sc·(q − 32), sc an int8,
    /// q < 64: 1366 d; Q8_0 d·q, q an int8: 73.9 d.
    pub fn new(key: u64, kind: GgmlType, std: f32) -> Self {
        let (spread, min_per_d) = match kind {
            GgmlType::Q4_K => (258.0, 7.5),
            GgmlType::Q5_K => (527.0, 15.5),
            GgmlType::Q6_K => (1366.0, 0.0),
            _ => (73.9, 0.0),
        };
        let d = std / spread;
        Self { key, kind, d: f16::from_f32(d).to_bits(), dmin: f16::from_f32(d * min_per_d).to_bits() }
    }

    /// Bytes per block.
    pub fn block_bytes(&self) -> usize {
        self.kind.block_bytes().unwrap_or(0) as usize
    }

    /// Values per block.
    pub fn block_len(&self) -> usize {
        self.kind.block_len().unwrap_or(1) as usize
    }

    /// Where a block keeps its f16 scale fields: the byte of `d`, and of
    /// `dmin` for the formats that have one.
    pub fn scale_fields(&self) -> (usize, Option<usize>) {
        match self.kind {
            GgmlType::Q4_K | GgmlType::Q5_K => (0, Some(2)),
            GgmlType::Q6_K => (208, None),
            _ => (0, None),
        }
    }

    /// Fills `out` (whole blocks) with blocks `first..` of the tensor.
    pub fn fill(&self, first: u64, out: &mut [u8]) {
        let bytes = self.block_bytes();
        let words = bytes.div_ceil(8) as u64;
        for (b, block) in out.chunks_exact_mut(bytes).enumerate() {
            let index = first + b as u64;
            for (w, chunk) in block.chunks_mut(8).enumerate() {
                let word = mix(self.key.wrapping_add((index * words + w as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)));
                chunk.copy_from_slice(&word.to_le_bytes()[..chunk.len()]);
            }
            let (d_at, dmin_at) = self.scale_fields();
            block[d_at..d_at + 2].copy_from_slice(&self.d.to_le_bytes());
            if let Some(at) = dmin_at {
                block[at..at + 2].copy_from_slice(&self.dmin.to_le_bytes());
            }
        }
    }

    /// Every block of a tensor of `numel` values.
    pub fn blocks(&self, numel: usize) -> Vec<u8> {
        let mut out = vec![0u8; numel.div_ceil(self.block_len()) * self.block_bytes()];
        self.fill(0, &mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::quant::dequantize;

    #[test]
    fn decoded_blocks_have_about_the_asked_spread_and_mean_zero() {
        for kind in [GgmlType::Q8_0, GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K] {
            let recipe = BlockRecipe::new(crate::weights::tensor_key(3, "w"), kind, 0.02);
            let n = 256 * 512;
            let mut values = vec![0.0f32; n];
            dequantize(kind, &recipe.blocks(n), &mut values).unwrap();
            let mean = values.iter().map(|&v| f64::from(v)).sum::<f64>() / n as f64;
            let std = (values.iter().map(|&v| (f64::from(v) - mean).powi(2)).sum::<f64>() / n as f64).sqrt();
            assert!((0.016..0.024).contains(&std), "{kind:?}: std {std}");
            assert!(mean.abs() < 0.002, "{kind:?}: mean {mean}");
        }
    }

    #[test]
    fn blocks_depend_on_key_and_index_only() {
        let recipe = BlockRecipe::new(7, GgmlType::Q4_K, 0.05);
        let all = recipe.blocks(256 * 4);
        let mut third = vec![0u8; 144];
        recipe.fill(2, &mut third);
        assert_eq!(&all[2 * 144..3 * 144], &third[..]);
        assert_ne!(BlockRecipe::new(8, GgmlType::Q4_K, 0.05).blocks(256), all[..144].to_vec());
    }
}
