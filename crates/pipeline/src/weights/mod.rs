//! Weight storage: [`WeightStore`] holds every tensor of a model in its
//! checkpoint dtype, memory-mapped from safetensors files or generated in
//! memory for synthetic models, and converts rows to f32 on use.

pub mod fp8;
pub mod gguf;
mod gguf_deepseek2;
mod gguf_gpt_oss;
mod gguf_model;
mod host_buffer;
pub mod oss_experts;
mod presets;
pub mod quant;
mod quant_legacy;
mod safetensors;
mod synthetic;
mod synthetic_blocks;
pub mod synthetic_fp8;
mod synthetic_mxfp4;
mod synthetic_values;

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use memmap2::Mmap;

pub use gguf_model::{gguf_name, load_gguf, read_gguf_header};
pub use presets::SyntheticPreset;
pub use safetensors::{SafetensorsEntry, SafetensorsRefusal, index_safetensors, load_checkpoint, save_safetensors};
pub use synthetic::{available_memory_bytes, generate_weights, synthetic_store_on_demand};
pub use synthetic_blocks::BlockRecipe;
pub use synthetic_values::{synthetic_value, tensor_key};

/// A family's checkpoint transform (`crate::families::Family::unpack`):
/// the store under canonical names, the config, the checkpoint's path for
/// messages.
pub type Unpack = fn(WeightStore, &crate::config::ModelConfig, &std::path::Path) -> crate::error::Result<WeightStore>;

/// Element type of a stored weight tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightDtype {
    /// bfloat16.
    Bf16,
    /// IEEE half.
    F16,
    /// IEEE single.
    F32,
    /// A ggml block format from a GGUF file (Q8_0, Q4_K, Q5_K, Q6_K):
    /// rows are whole blocks, decoded to f32 where read (quant.rs).
    Quant(gguf::GgmlType),
    /// FP8 e4m3 with one scale per block of a 2-D tensor (fp8.rs), decoded
    /// to f32 where read.
    Fp8E4m3,
    /// Raw bytes: a Hugging Face checkpoint's MXFP4 blocks and e8m0 scales,
    /// before the family's unpacking makes them MXFP4 rows
    /// (oss_experts.rs). Read as their byte values.
    U8,
}

impl WeightDtype {
    /// Bytes of `numel` elements (whole blocks, for a block format).
    pub fn bytes_for(self, numel: usize) -> usize {
        match self {
            WeightDtype::Fp8E4m3 | WeightDtype::U8 => numel,
            WeightDtype::Bf16 | WeightDtype::F16 => 2 * numel,
            WeightDtype::F32 => 4 * numel,
            WeightDtype::Quant(kind) => {
                let (len, bytes) = (kind.block_len().unwrap_or(1), kind.block_bytes().unwrap_or(0));
                numel.div_ceil(len as usize) * bytes as usize
            }
        }
    }

    /// The safetensors header spelling (the ggml name for a block format).
    pub fn name(self) -> &'static str {
        match self {
            WeightDtype::Bf16 => "BF16",
            WeightDtype::F16 => "F16",
            WeightDtype::F32 => "F32",
            WeightDtype::Fp8E4m3 => "F8_E4M3",
            WeightDtype::U8 => "U8",
            WeightDtype::Quant(kind) => kind.static_name(),
        }
    }
}

/// Where a tensor's bytes live.
#[derive(Debug, Clone)]
enum WeightBytes {
    /// A byte range of a memory-mapped checkpoint file.
    Mapped { map: Arc<Mmap>, start: usize, end: usize },
    /// Bytes owned in memory (synthetic models).
    Owned(Arc<Vec<u8>>),
    /// A synthetic bf16 tensor not materialised anywhere: its elements are
    /// computed where they are read (on the device by the CUDA backend).
    Synthetic(SyntheticRecipe),
    /// The same for a synthetic tensor in a block format: its blocks are
    /// made where they are read.
    SyntheticBlocks(BlockRecipe),
}

/// How the elements of a synthetic tensor are computed: element `i` is
/// `bf16(synthetic_value(key, i, mean, std))`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SyntheticRecipe {
    /// [`tensor_key`] of the seed and the tensor's name.
    pub key: u64,
    /// Mean of the values.
    pub mean: f32,
    /// Standard deviation of the values.
    pub std: f32,
}

impl SyntheticRecipe {
    /// Elements `first..` as little-endian bf16, two bytes a value (one
    /// loop vectorised where the CPU allows: synthetic_values.rs).
    pub fn fill_bf16(&self, first: u64, out: &mut [u8]) {
        synthetic_values::fill_bf16(self.key, first, self.mean, synthetic_values::synthetic_scale(self.std), out);
    }

    /// Elements `first..` as f32: the bf16 values [`Self::fill_bf16`]
    /// makes, widened exactly.
    pub fn fill_f32(&self, first: u64, out: &mut [f32]) {
        synthetic_values::fill_f32_of_bf16(
            self.key,
            first,
            self.mean,
            synthetic_values::synthetic_scale(self.std),
            out,
        );
    }
}

/// One named weight tensor, row-major, in its stored dtype.
#[derive(Debug, Clone)]
pub struct WeightTensor {
    /// The checkpoint name, e.g. `model.layers.0.self_attn.q_proj.weight`.
    pub name: String,
    /// Stored element type.
    pub dtype: WeightDtype,
    /// Shape, outermost first.
    pub shape: Vec<usize>,
    bytes: WeightBytes,
    /// What the file calls it when that is not `name`: a GGUF tensor's
    /// llama.cpp name and file, e.g. `blk.1.attn_q.weight in model.gguf`.
    pub source: Option<String>,
    /// The block scales of an FP8 tensor (fp8.rs).
    scales: Option<Arc<fp8::BlockScales>>,
}

impl WeightTensor {
    /// The name to show a person: the file's own (`blk.1.attn_q.weight in
    /// model.gguf [model.layers.1.self_attn.q_proj.weight]`) where the
    /// file calls it otherwise, else `name`.
    pub fn describe(&self) -> String {
        match &self.source {
            Some(source) => format!("{source} [{}]", self.name),
            None => self.name.clone(),
        }
    }

    /// A tensor over a byte range of a mapped file. The range must hold
    /// exactly `shape.product() * dtype.size()` bytes (the loader checks).
    pub(crate) fn mapped(
        name: String,
        dtype: WeightDtype,
        shape: Vec<usize>,
        map: Arc<Mmap>,
        start: usize,
        end: usize,
    ) -> Self {
        Self { name, dtype, shape, bytes: WeightBytes::Mapped { map, start, end }, source: None, scales: None }
    }

    /// A tensor over owned little-endian bytes; `bytes.len()` must be
    /// `shape.product() * dtype.size()`.
    pub fn owned(name: String, dtype: WeightDtype, shape: Vec<usize>, bytes: Vec<u8>) -> Self {
        Self { name, dtype, shape, bytes: WeightBytes::Owned(Arc::new(bytes)), source: None, scales: None }
    }

    /// A synthetic bf16 tensor whose elements are computed when read.
    pub fn synthetic(name: String, shape: Vec<usize>, recipe: SyntheticRecipe) -> Self {
        Self {
            name,
            dtype: WeightDtype::Bf16,
            shape,
            bytes: WeightBytes::Synthetic(recipe),
            source: None,
            scales: None,
        }
    }

    /// A synthetic tensor in a block format, its blocks made when read.
    pub fn synthetic_blocks(name: String, shape: Vec<usize>, recipe: BlockRecipe) -> Self {
        Self {
            name,
            dtype: WeightDtype::Quant(recipe.kind),
            shape,
            bytes: WeightBytes::SyntheticBlocks(recipe),
            source: None,
            scales: None,
        }
    }

    /// The tensor with its FP8 block scales attached (the loader's).
    pub fn with_block_scales(mut self, scales: Arc<fp8::BlockScales>) -> Self {
        self.scales = Some(scales);
        self
    }

    /// The block scales of an FP8 tensor.
    pub fn block_scales(&self) -> Option<&fp8::BlockScales> {
        self.scales.as_deref()
    }

    /// How its blocks are made, for a synthetic block-format tensor that
    /// was not materialised.
    pub fn block_recipe(&self) -> Option<BlockRecipe> {
        match self.bytes {
            WeightBytes::SyntheticBlocks(r) => Some(r),
            _ => None,
        }
    }

    /// How its elements are computed, for a synthetic tensor that was not
    /// materialised.
    pub fn recipe(&self) -> Option<SyntheticRecipe> {
        match self.bytes {
            WeightBytes::Synthetic(r) => Some(r),
            _ => None,
        }
    }

    /// The raw little-endian bytes (computed, for a synthetic tensor that
    /// was not materialised).
    pub fn bytes(&self) -> Cow<'_, [u8]> {
        match &self.bytes {
            WeightBytes::Mapped { map, start, end } => Cow::Borrowed(&map[*start..*end]),
            WeightBytes::Owned(v) => Cow::Borrowed(v),
            WeightBytes::Synthetic(r) => {
                let mut bytes = vec![0u8; self.numel() * 2];
                r.fill_bf16(0, &mut bytes);
                Cow::Owned(bytes)
            }
            WeightBytes::SyntheticBlocks(r) => Cow::Owned(r.blocks(self.numel())),
        }
    }

    /// The stored bytes where they are held in memory (owned, or a mapped
    /// file's range), with what keeps them alive; None for a synthetic
    /// tensor computed where it is read. For a reader that keeps the host's
    /// pages (the reference's device products register them).
    pub fn host_bytes(&self) -> Option<(&[u8], Arc<dyn std::any::Any + Send + Sync>)> {
        match &self.bytes {
            WeightBytes::Mapped { map, start, end } => Some((&map[*start..*end], map.clone())),
            WeightBytes::Owned(v) => Some((v.as_slice(), v.clone())),
            WeightBytes::Synthetic(_) | WeightBytes::SyntheticBlocks(_) => None,
        }
    }

    /// Size in bytes in its stored dtype.
    pub fn byte_len(&self) -> usize {
        self.dtype.bytes_for(self.numel())
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Length of one row (the last dimension).
    pub fn row_len(&self) -> usize {
        self.shape.last().copied().unwrap_or(1)
    }

    /// Converts elements `start..start + out.len()` to f32 into `out`
    /// (exactly: bf16, f16 and f32 values are all representable in f32).
    pub fn read_f32(&self, start: usize, out: &mut [f32]) {
        if let WeightBytes::Synthetic(r) = &self.bytes {
            r.fill_f32(start as u64, out);
            return;
        }
        if let WeightDtype::Quant(kind) = self.dtype {
            return self.read_blocks(kind, start, out);
        }
        let size = self.dtype.bytes_for(1);
        let all = self.bytes();
        let bytes = &all[start * size..(start + out.len()) * size];
        match self.dtype {
            WeightDtype::Bf16 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
                }
            }
            WeightDtype::F16 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
                }
            }
            WeightDtype::F32 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            WeightDtype::Fp8E4m3 => {
                // The loader attaches every FP8 tensor's scales (fp8.rs);
                // without them the raw e4m3 values are all there is. One
                // scale per run of a row within one block.
                let cols = self.row_len().max(1);
                let mut k = 0;
                while k < out.len() {
                    let (row, col) = ((start + k) / cols, (start + k) % cols);
                    let (scale, run) = match self.scales.as_deref() {
                        Some(s) => (s.at(row, col), s.block.1 - col % s.block.1),
                        None => (1.0, cols),
                    };
                    let run = run.min(cols - col).min(out.len() - k);
                    for (o, &b) in out[k..k + run].iter_mut().zip(&bytes[k..k + run]) {
                        *o = fp8::e4m3_to_f32(b) * scale;
                    }
                    k += run;
                }
            }
            WeightDtype::U8 => {
                for (o, &b) in out.iter_mut().zip(bytes) {
                    *o = f32::from(b);
                }
            }
            WeightDtype::Quant(_) => unreachable!("decoded above"),
        }
    }

    /// [`WeightTensor::read_f32`] for a block format: decodes the blocks
    /// covering `start..start + out.len()`.
    fn read_blocks(&self, kind: gguf::GgmlType, start: usize, out: &mut [f32]) {
        let (len, bytes) = (kind.block_len().unwrap_or(1) as usize, kind.block_bytes().unwrap_or(0) as usize);
        let (first, last) = (start / len, (start + out.len()).div_ceil(len));
        let all = self.blocks(first, last, bytes);
        let blocks = &all[..];
        // The loader checked the type and that the tensor is whole blocks.
        let whole = "whole blocks of a known type";
        if start.is_multiple_of(len) && out.len().is_multiple_of(len) {
            // Whole blocks (a row, the tensor): straight into `out`.
            return quant::dequantize(kind, blocks, out).expect(whole);
        }
        let mut values = vec![0.0f32; (last - first) * len];
        quant::dequantize(kind, blocks, &mut values).expect(whole);
        let skip = start - first * len;
        out.copy_from_slice(&values[skip..skip + out.len()]);
    }

    /// The bytes of blocks `first..last` (of `bytes` bytes each); synthetic
    /// blocks are made for just those.
    fn blocks(&self, first: usize, last: usize, bytes: usize) -> Cow<'_, [u8]> {
        match &self.bytes {
            WeightBytes::SyntheticBlocks(r) => {
                let mut some = vec![0u8; (last - first) * bytes];
                r.fill(first as u64, &mut some);
                Cow::Owned(some)
            }
            _ => match self.bytes() {
                Cow::Borrowed(all) => Cow::Borrowed(&all[first * bytes..last * bytes]),
                Cow::Owned(all) => Cow::Owned(all[first * bytes..last * bytes].to_vec()),
            },
        }
    }

    /// Row `row` of a Q4_K or Q5_K tensor as llama.cpp's CUDA MMQ kernels
    /// multiply it ([`quant::mmq_sub_blocks`]): each value's scaled part in
    /// `scaled`, each 32 values' min in `mins`. False (nothing written) for
    /// other types.
    pub fn read_row_mmq(&self, row: usize, scaled: &mut [f32], mins: &mut [f32]) -> bool {
        let WeightDtype::Quant(kind @ (gguf::GgmlType::Q4_K | gguf::GgmlType::Q5_K)) = self.dtype else {
            return false;
        };
        let (len, bytes) = (self.row_len(), kind.block_bytes().unwrap_or(0) as usize);
        let first = row * len / 256;
        let blocks = self.blocks(first, first + len / 256, bytes);
        // The loader checked that a K-quant row is whole blocks.
        quant::mmq_sub_blocks(kind, &blocks, &mut scaled[..len], &mut mins[..len / 32])
            .expect("whole Q4_K/Q5_K blocks");
        true
    }

    /// Converts row `row` (of [`WeightTensor::row_len`] elements) into `out`.
    pub fn read_row(&self, row: usize, out: &mut [f32]) {
        let len = self.row_len();
        self.read_f32(row * len, &mut out[..len]);
    }

    /// The whole tensor as f32.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.numel()];
        self.read_f32(0, &mut out);
        out
    }
}

/// Index of a tensor in a [`WeightStore`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WeightId(pub u32);

/// All tensors of a model, by name and by [`WeightId`].
#[derive(Debug, Default)]
pub struct WeightStore {
    tensors: Vec<WeightTensor>,
    by_name: HashMap<String, WeightId>,
}

impl WeightStore {
    /// Adds a tensor (replacing none: names are unique in checkpoints).
    pub fn insert(&mut self, tensor: WeightTensor) -> WeightId {
        let id = WeightId(self.tensors.len() as u32);
        self.by_name.insert(tensor.name.clone(), id);
        self.tensors.push(tensor);
        id
    }

    /// Looks a tensor up by name.
    pub fn id(&self, name: &str) -> Option<WeightId> {
        self.by_name.get(name).copied()
    }

    /// The tensor with this id.
    pub fn get(&self, id: WeightId) -> &WeightTensor {
        &self.tensors[id.0 as usize]
    }

    /// Every tensor, in insertion order.
    pub fn tensors(&self) -> &[WeightTensor] {
        &self.tensors
    }

    /// Renames every tensor whose name `canonical` maps to another, noting
    /// the checkpoint's own name as its `source` (so messages show what the
    /// file holds). Returns the store with the canonical names.
    pub fn renamed(self, canonical: impl Fn(&str) -> String) -> Self {
        let mut out = WeightStore::default();
        for mut tensor in self.tensors {
            let name = canonical(&tensor.name);
            if name != tensor.name {
                tensor.source.get_or_insert_with(|| tensor.name.clone());
                tensor.name = name;
            }
            out.insert(tensor);
        }
        out
    }

    /// The tensors `keep` says yes to, in order (a family's unpacking drops
    /// what it consumed).
    pub fn retain(self, keep: impl Fn(&WeightTensor) -> bool) -> Self {
        let mut out = WeightStore::default();
        for tensor in self.tensors.into_iter().filter(|t| keep(t)) {
            out.insert(tensor);
        }
        out
    }

    /// Total bytes of all tensors.
    pub fn total_bytes(&self) -> usize {
        self.tensors.iter().map(|t| t.byte_len()).sum()
    }

    /// The bytes of the tensors not stored anywhere: synthetic ones
    /// computed where they are read.
    pub fn computed_bytes(&self) -> usize {
        self.tensors.iter().filter(|t| t.host_bytes().is_none()).map(|t| t.byte_len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_are_exact_for_every_dtype() {
        let values = [1.0f32, -2.5, 0.0, 65504.0, 3.0e-5];
        let bf16: Vec<u8> = values.iter().flat_map(|v| half::bf16::from_f32(*v).to_bits().to_le_bytes()).collect();
        let f16: Vec<u8> = values.iter().flat_map(|v| half::f16::from_f32(*v).to_bits().to_le_bytes()).collect();
        let f32b: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        for (dtype, bytes, expect) in [
            (WeightDtype::Bf16, bf16, values.map(|v| half::bf16::from_f32(v).to_f32())),
            (WeightDtype::F16, f16, values.map(|v| half::f16::from_f32(v).to_f32())),
            (WeightDtype::F32, f32b, values),
        ] {
            let t = WeightTensor::owned("t".into(), dtype, vec![5], bytes);
            assert_eq!(t.to_f32_vec(), expect, "{dtype:?}");
            let mut two = [0.0; 2];
            t.read_f32(3, &mut two);
            assert_eq!(two, [expect[3], expect[4]]);
        }
    }

    /// An FP8 tensor of 3 rows of 200 values in 2x128 blocks (partial on
    /// both axes): any range, across rows and blocks, reads each value's
    /// e4m3 decoding times its own block's scale.
    #[test]
    fn fp8_reads_any_range_with_each_values_block_scale() {
        let (rows, cols) = (3usize, 200usize);
        let bytes: Vec<u8> = (0..rows * cols).map(|i| (i * 37 % 0x7E) as u8).collect();
        let scales = fp8::BlockScales { block: (2, 128), cols: 2, values: vec![0.5, 2.0, 3.0, 0.25] };
        let want: Vec<f32> =
            (0..rows * cols).map(|i| fp8::e4m3_to_f32(bytes[i]) * scales.at(i / cols, i % cols)).collect();
        let t = WeightTensor::owned("f".into(), WeightDtype::Fp8E4m3, vec![rows, cols], bytes)
            .with_block_scales(Arc::new(scales));
        assert_eq!(t.to_f32_vec(), want);
        for (start, len) in [(0, 200), (120, 20), (127, 2), (190, 150), (399, 201), (5, 590)] {
            let mut part = vec![0.0; len];
            t.read_f32(start, &mut part);
            assert_eq!(part, want[start..start + len], "{start}..+{len}");
        }
    }

    /// A Q8_0 tensor of 3 rows of 96 values (three blocks a row): rows and
    /// ranges that start and end inside blocks read as the slices of the
    /// whole tensor's decoding, which is each value's int8 times its
    /// block's scale; its byte length counts whole blocks.
    #[test]
    fn block_formats_read_any_range_of_rows_of_several_blocks() {
        let (rows, cols) = (3usize, 96usize);
        let mut bytes = Vec::new();
        let mut want = Vec::new();
        for b in 0..rows * cols / 32 {
            let d = 0.125 * (b + 1) as f32;
            bytes.extend(half::f16::from_f32(d).to_bits().to_le_bytes());
            for i in 0..32 {
                let q = ((b * 32 + i) % 255) as i32 - 127;
                bytes.push(q as i8 as u8);
                want.push(q as f32 * d);
            }
        }
        let t = WeightTensor::owned("q".into(), WeightDtype::Quant(gguf::GgmlType::Q8_0), vec![rows, cols], bytes);
        assert_eq!(t.byte_len(), 9 * 34);
        assert_eq!(t.to_f32_vec(), want);
        let mut row = vec![0.0; cols];
        t.read_row(2, &mut row);
        assert_eq!(row, want[192..288]);
        for (start, len) in [(5, 20), (30, 70), (95, 2), (100, 188)] {
            let mut part = vec![0.0; len];
            t.read_f32(start, &mut part);
            assert_eq!(part, want[start..start + len], "{start}..+{len}");
        }
    }
}
