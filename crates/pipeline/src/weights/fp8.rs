//! FP8 block-scaled weights, as DeepSeek-V3 and Qwen3's `-FP8`
//! checkpoints ship them: each projection `X.weight` is e4m3 (`F8_E4M3`)
//! with `X.weight_scale_inv`, one f32 (or bf16) scale per block of
//! `quantization_config.weight_block_size` (128 x 128), the last blocks of
//! a dimension that is not a multiple of 128 partial. A value decodes as
//! DeepSeek's reference `weight_dequant` computes it: `f32(q) * scale[i /
//! 128][j / 128]`, one f32 multiply.

use std::path::Path;
use std::sync::Arc;

use serde_json::Value;

use super::{WeightDtype, WeightStore};
use crate::error::{PipelineError, Result};

/// The suffix of a weight's block scales.
const SCALE_SUFFIX: &str = "_scale_inv";

/// e4m3 (`float8_e4m3fn`: 4 exponent bits with bias 7, 3 mantissa bits,
/// no infinities, S.1111.111 is NaN) as f32, exactly.
pub fn e4m3_to_f32(byte: u8) -> f32 {
    let sign = if byte & 0x80 != 0 { -1.0f32 } else { 1.0 };
    let (exp, man) = ((byte >> 3) & 0xF, byte & 0x7);
    if exp == 0xF && man == 0x7 {
        return f32::NAN;
    }
    let magnitude = if exp == 0 {
        // Subnormal: man / 8 * 2^-6.
        man as f32 * (1.0 / 512.0)
    } else {
        f32::from_bits(((exp as u32 + 127 - 7) << 23) | ((man as u32) << 20))
    };
    sign * magnitude
}

/// The scales of one block-scaled tensor: `rows x cols` blocks of `block`
/// (rows, columns) elements each, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockScales {
    /// Elements per block, (rows, columns).
    pub block: (usize, usize),
    /// Blocks per row of blocks.
    pub cols: usize,
    /// One scale per block.
    pub values: Vec<f32>,
}

impl BlockScales {
    /// The scale of element (row, column).
    pub fn at(&self, row: usize, col: usize) -> f32 {
        self.values[(row / self.block.0) * self.cols + col / self.block.1]
    }
}

/// The block size of an FP8 checkpoint in `dir`, from its config.json's
/// `quantization_config` (`quant_method: "fp8"`, `weight_block_size`).
fn block_size(dir: &Path) -> Result<(usize, usize)> {
    let path = dir.join("config.json");
    let bad = |message: String| PipelineError::BadConfig { path: path.clone(), message };
    let text = stage_types::input::read_regular_text(&path, 16 * stage_types::input::MIB)
        .map_err(|source| PipelineError::Io { path: path.clone(), source })?;
    let json: Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let q = json.get("quantization_config").ok_or_else(|| {
        bad("the checkpoint holds F8_E4M3 weights but config.json has no `quantization_config`".into())
    })?;
    let method = q.get("quant_method").and_then(Value::as_str).unwrap_or("");
    if method != "fp8" {
        return Err(bad(format!(
            "quantization_config.quant_method is `{method}`; FP8 weights are read with `fp8` (block-scaled e4m3)"
        )));
    }
    let size: Vec<usize> = q
        .get("weight_block_size")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(|v| v.as_u64().map(|v| v as usize)).collect())
        .unwrap_or_default();
    match size[..] {
        [r, c] if r > 0 && c > 0 => Ok((r, c)),
        _ => Err(bad(format!(
            "quantization_config.weight_block_size must be two positive integers, e.g. [128, 128]; got {}",
            q.get("weight_block_size").map_or("nothing".to_string(), Value::to_string)
        ))),
    }
}

/// Attaches to every F8_E4M3 tensor of `store` its `_scale_inv` blocks
/// and drops the scale tensors from the store. An FP8 tensor without
/// scales, scales that do not cover their tensor's blocks, or scales
/// without a tensor are errors naming the tensor. `dir` is the
/// checkpoint's folder (its config.json gives the block size).
pub fn attach_block_scales(store: WeightStore, dir: &Path) -> Result<WeightStore> {
    if !store.tensors().iter().any(|t| t.dtype == WeightDtype::Fp8E4m3) {
        return Ok(store);
    }
    let block = block_size(dir)?;
    let bad = |message: String| PipelineError::Unsupported { path: dir.to_path_buf(), message };
    let mut scales = std::collections::HashMap::new();
    for t in store.tensors().iter().filter(|t| t.name.ends_with(SCALE_SUFFIX)) {
        let owner = t.name.trim_end_matches(SCALE_SUFFIX);
        let weight = store.id(owner).map(|id| store.get(id));
        if weight.is_none_or(|w| w.dtype != WeightDtype::Fp8E4m3) {
            return Err(bad(format!(
                "`{}` scales `{owner}`, which is not an F8_E4M3 tensor of the checkpoint",
                t.name
            )));
        }
        scales.insert(owner.to_string(), t);
    }
    let mut out = WeightStore::default();
    for t in store.tensors() {
        if t.name.ends_with(SCALE_SUFFIX) {
            continue;
        }
        if t.dtype != WeightDtype::Fp8E4m3 {
            out.insert(t.clone());
            continue;
        }
        let [rows, cols] = t.shape[..] else {
            return Err(bad(format!(
                "`{}` is F8_E4M3 of shape {:?}; block-scaled FP8 weights are 2-D",
                t.name, t.shape
            )));
        };
        let Some(s) = scales.get(&t.name) else {
            return Err(bad(format!(
                "`{}` is F8_E4M3 without `{}{SCALE_SUFFIX}`: moetrace reads block-scaled FP8 (one scale per {}x{} block)",
                t.name, t.name, block.0, block.1
            )));
        };
        let want = [rows.div_ceil(block.0), cols.div_ceil(block.1)];
        if s.shape[..] != want {
            return Err(bad(format!(
                "`{}` has shape {:?}: the scales of `{}` [{rows}, {cols}] in {}x{} blocks are {want:?} (the scales do not cover the weights)",
                s.name, s.shape, t.name, block.0, block.1
            )));
        }
        if !matches!(s.dtype, WeightDtype::F32 | WeightDtype::Bf16 | WeightDtype::F16) {
            return Err(bad(format!("`{}` is {}; scales are F32, BF16 or F16", s.name, s.dtype.name())));
        }
        let values = s.to_f32_vec();
        out.insert(t.clone().with_block_scales(Arc::new(BlockScales { block, cols: want[1], values })));
    }
    Ok(out)
}

/// Elements per row block of [`as_row_blocks`] (kernels-cuda's `FP8_B128`).
pub const ROW_BLOCK: usize = 128;

/// Whether `t` is block-scaled FP8 that [`as_row_blocks`] can lay out:
/// 128-column blocks and rows of whole blocks.
pub fn has_row_blocks(t: &super::WeightTensor) -> bool {
    t.dtype == WeightDtype::Fp8E4m3
        && t.block_scales().is_some_and(|s| s.block.1 == ROW_BLOCK)
        && t.shape.len() == 2
        && t.row_len().is_multiple_of(ROW_BLOCK)
}

/// The bytes of [`as_row_blocks`] of `t`.
pub fn row_block_bytes(t: &super::WeightTensor) -> usize {
    t.numel() / ROW_BLOCK * (4 + ROW_BLOCK)
}

/// `t` (block-scaled FP8 with [`has_row_blocks`]) as rows of blocks that a
/// kernel decodes one row at a time: for each row, for each 128 columns,
/// the f32 scale of the block they belong to (little-endian), then the
/// 128 e4m3 bytes. The values are those of [`super::WeightTensor::read_row`]
/// (`f32(q) * scale`); a scale repeats for each row of its block (4 bytes
/// per 128 values).
pub fn as_row_blocks(t: &super::WeightTensor) -> Vec<u8> {
    let scales = t.block_scales().expect("has_row_blocks checked the scales");
    let (rows, cols) = (t.shape[0], t.row_len());
    let bytes = t.bytes();
    let mut out = Vec::with_capacity(row_block_bytes(t));
    for r in 0..rows {
        for c in (0..cols).step_by(ROW_BLOCK) {
            out.extend_from_slice(&scales.at(r, c).to_le_bytes());
            out.extend_from_slice(&bytes[r * cols + c..r * cols + c + ROW_BLOCK]);
        }
    }
    out
}

/// `store` with tensor `name`'s block scales as a kernel that reads one
/// block's scale from its neighbour computes with them: the last block
/// (the partial one where a dimension is not a multiple of the block)
/// takes the scale of the block before it in its row of blocks, or above
/// it when the row has one block. The same ids (every other tensor kept
/// as it is). For [`crate::backend::cpu::known_bugs::KnownBug::Fp8NeighbourScale`].
pub fn with_neighbour_scale(store: &WeightStore, name: &str) -> std::result::Result<WeightStore, String> {
    let id = store.id(name).ok_or_else(|| format!("the model has no tensor `{name}`"))?;
    let scales = store.get(id).block_scales().ok_or_else(|| format!("`{name}` is not an FP8 block-scaled tensor"))?;
    let n = scales.values.len();
    if n < 2 {
        return Err(format!("`{name}` has one block: it has no neighbour to read a scale from"));
    }
    let mut misread = scales.clone();
    let neighbour = if scales.cols > 1 { n - 2 } else { n - 1 - scales.cols };
    misread.values[n - 1] = scales.values[neighbour];
    let mut out = WeightStore::default();
    for (i, t) in store.tensors().iter().enumerate() {
        let t = if i == id.0 as usize { t.clone().with_block_scales(Arc::new(misread.clone())) } else { t.clone() };
        out.insert(t);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e4m3_decodes_its_landmarks_and_every_byte_round_trips_through_half() {
        for (byte, want) in [
            (0x00u8, 0.0f32),
            (0x38, 1.0),
            (0xB8, -1.0),
            (0x7E, 448.0),
            (0xFE, -448.0),
            (0x08, 1.0 / 64.0),
            (0x01, 1.0 / 512.0),
            (0x07, 7.0 / 512.0),
            (0x3C, 1.5),
            (0x40, 2.0),
        ] {
            assert_eq!(e4m3_to_f32(byte), want, "{byte:#04x}");
        }
        assert!(e4m3_to_f32(0x7F).is_nan() && e4m3_to_f32(0xFF).is_nan());
        // Every finite value has at most 4 significant bits and lies in
        // f16's range: f16 holds it exactly, and the order of the bytes
        // with the sign bit clear is the order of the values.
        let mut last = -1.0f32;
        for byte in 0u8..0x7F {
            let v = e4m3_to_f32(byte);
            assert_eq!(half::f16::from_f32(v).to_f32(), v, "{byte:#04x}");
            assert!(v > last, "{byte:#04x}: {v} after {last}");
            last = v;
        }
    }

    #[test]
    fn scales_are_found_by_block_with_partial_blocks_at_the_ends() {
        let s = BlockScales { block: (128, 128), cols: 2, values: vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0] };
        assert_eq!(
            [s.at(0, 0), s.at(127, 127), s.at(0, 128), s.at(200, 191), s.at(256, 0), s.at(319, 130)],
            [1.0, 1.0, 2.0, 4.0, 5.0, 6.0]
        );
    }

    /// The device's row blocks (kernels-cuda's FP8_B128), decoded here as
    /// the kernel decodes them (scale, then 128 bytes; f32(q) * scale),
    /// give the tensor's values; rows of a partial last block of rows keep
    /// that block's scale; a neighbour's scale misread changes exactly the
    /// last block.
    #[test]
    fn row_blocks_hold_the_tensors_values_and_a_misread_scale_moves_one_block() {
        let (rows, cols) = (200usize, 256usize);
        let bytes: Vec<u8> = (0..rows * cols).map(|i| ((i * 37 + 11) % 251) as u8).collect();
        let scales = BlockScales { block: (128, 128), cols: 2, values: vec![1e-3, 2e-3, 3e-8, 4.5] };
        let t = super::super::WeightTensor::owned("w".into(), WeightDtype::Fp8E4m3, vec![rows, cols], bytes)
            .with_block_scales(Arc::new(scales));
        assert!(has_row_blocks(&t));
        let blocks = as_row_blocks(&t);
        assert_eq!(blocks.len(), row_block_bytes(&t));
        let decoded: Vec<f32> = blocks
            .chunks(4 + ROW_BLOCK)
            .flat_map(|b| {
                let scale = f32::from_le_bytes(b[..4].try_into().unwrap());
                b[4..].iter().map(move |&q| e4m3_to_f32(q) * scale)
            })
            .collect();
        let want = t.to_f32_vec();
        assert!(decoded.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())));
        let mut store = WeightStore::default();
        store.insert(super::super::WeightTensor::owned("other".into(), WeightDtype::F32, vec![1], vec![0; 4]));
        store.insert(t);
        let bad = with_neighbour_scale(&store, "w").unwrap();
        let moved = bad.get(crate::weights::WeightId(1)).to_f32_vec();
        let changed: Vec<usize> = (0..rows * cols).filter(|&i| moved[i].to_bits() != want[i].to_bits()).collect();
        assert!(changed.iter().all(|&i| i / cols >= 128 && i % cols >= 128), "only block (1, 1)");
        // Block (1, 1): rows 128..200, columns 128..256; its zeros and NaN
        // stay as they were.
        assert!(changed.len() > 72 * 128 * 9 / 10, "{} values moved", changed.len());
        assert!(with_neighbour_scale(&store, "other").unwrap_err().contains("not an FP8"));
    }
}
