//! GGUF files, llama.cpp's format (version 3, little-endian): the header,
//! the metadata key/value pairs and the tensor infos, parsed and checked
//! against the file's length before any tensor is used. Nothing is read
//! past the bytes given and no count is trusted: every length and count is
//! checked against what is left of the file before anything is allocated,
//! so a bad file is an error naming the cause, never a panic.
//!
//! This is the container only. Tensor dimensions are in ggml's order
//! (`dims[0]` varies fastest: a `[rows, cols]` weight has `dims ==
//! [cols, rows]`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{PipelineError, Result};

/// The only GGUF version read.
pub const GGUF_VERSION: u32 = 3;

/// ggml's most dimensions a tensor has.
const MAX_DIMS: usize = 4;

/// Deepest nesting of arrays in metadata.
const MAX_ARRAY_DEPTH: usize = 2;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    /// Type 0.
    U8(u8),
    /// Type 1.
    I8(i8),
    /// Type 2.
    U16(u16),
    /// Type 3.
    I16(i16),
    /// Type 4.
    U32(u32),
    /// Type 5.
    I32(i32),
    /// Type 6.
    F32(f32),
    /// Type 7.
    Bool(bool),
    /// Type 8 (UTF-8).
    String(String),
    /// Type 9: elements of one type.
    Array(Vec<GgufValue>),
    /// Type 10.
    U64(u64),
    /// Type 11.
    I64(i64),
    /// Type 12.
    F64(f64),
}

impl GgufValue {
    /// An integer value of any width, if it is one and fits.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v.into()),
            GgufValue::U16(v) => Some(v.into()),
            GgufValue::U32(v) => Some(v.into()),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// A float value (f32 or f64), if it is one.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v.into()),
            GgufValue::F64(v) => Some(v),
            _ => None,
        }
    }

    /// A string value, if it is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }
}

/// A ggml tensor type: its id in the file, and for the known ones their
/// name, block length (elements) and block size (bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GgmlType(pub u32);

impl GgmlType {
    /// f32.
    pub const F32: GgmlType = GgmlType(0);
    /// f16.
    pub const F16: GgmlType = GgmlType(1);
    /// 32 values: an f16 scale and 4-bit values offset by 8.
    pub const Q4_0: GgmlType = GgmlType(2);
    /// 32 values: f16 scale and offset, 4-bit values.
    pub const Q4_1: GgmlType = GgmlType(3);
    /// 32 values: an f16 scale and 5-bit values offset by 16.
    pub const Q5_0: GgmlType = GgmlType(6);
    /// 32 values: f16 scale and offset, 5-bit values.
    pub const Q5_1: GgmlType = GgmlType(7);
    /// 32 values: an f16 scale and 32 int8.
    pub const Q8_0: GgmlType = GgmlType(8);
    /// 256 values: f16 scale and min, 6-bit packed sub-block scales, 4-bit values.
    pub const Q4_K: GgmlType = GgmlType(12);
    /// As Q4_K with a fifth bit per value.
    pub const Q5_K: GgmlType = GgmlType(13);
    /// 256 values: 6-bit values, int8 sub-block scales, an f16 scale.
    pub const Q6_K: GgmlType = GgmlType(14);
    /// bf16.
    pub const BF16: GgmlType = GgmlType(30);
    /// 32 values: an e8m0 exponent and 4-bit e2m1 values (gpt-oss's experts).
    pub const MXFP4: GgmlType = GgmlType(39);

    /// (name, elements per block, bytes per block) of the types llama.cpp
    /// defines that this reader can lay out.
    fn layout(self) -> Option<(&'static str, u64, u64)> {
        Some(match self.0 {
            0 => ("F32", 1, 4),
            1 => ("F16", 1, 2),
            2 => ("Q4_0", 32, 18),
            3 => ("Q4_1", 32, 20),
            6 => ("Q5_0", 32, 22),
            7 => ("Q5_1", 32, 24),
            8 => ("Q8_0", 32, 34),
            9 => ("Q8_1", 32, 36),
            10 => ("Q2_K", 256, 84),
            11 => ("Q3_K", 256, 110),
            12 => ("Q4_K", 256, 144),
            13 => ("Q5_K", 256, 176),
            14 => ("Q6_K", 256, 210),
            15 => ("Q8_K", 256, 292),
            30 => ("BF16", 1, 2),
            39 => ("MXFP4", 32, 17),
            _ => return None,
        })
    }

    /// The type's name (`Q4_K`), or `type N` for an id this reader does
    /// not know.
    pub fn name(self) -> String {
        self.layout().map_or_else(|| format!("type {}", self.0), |(name, _, _)| name.to_string())
    }

    /// The type's name, `unknown` for an id this reader does not know.
    pub fn static_name(self) -> &'static str {
        self.layout().map_or("unknown", |(name, _, _)| name)
    }

    /// Elements per block (1 for plain floats).
    pub fn block_len(self) -> Option<u64> {
        self.layout().map(|(_, n, _)| n)
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> Option<u64> {
        self.layout().map(|(_, _, b)| b)
    }
}

/// One tensor's entry in the file.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensorInfo {
    /// llama.cpp's name, e.g. `blk.0.ffn_gate_exps.weight`.
    pub name: String,
    /// ggml order: `dims[0]` varies fastest.
    pub dims: Vec<u64>,
    /// Element type.
    pub ggml_type: GgmlType,
    /// Where its data starts, from the start of the file.
    pub offset: u64,
    /// Bytes of data.
    pub byte_len: u64,
}

impl GgufTensorInfo {
    /// Elements.
    pub fn numel(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// A parsed GGUF header: everything but the tensor data.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufHeader {
    /// The format version (3).
    pub version: u32,
    /// Metadata, by key.
    pub metadata: BTreeMap<String, GgufValue>,
    /// Tensor infos, in file order.
    pub tensors: Vec<GgufTensorInfo>,
    /// `general.alignment` (32 when absent).
    pub alignment: u64,
    /// Where the tensor data starts.
    pub data_offset: u64,
}

impl GgufHeader {
    /// Parses the header of the GGUF file whose bytes are `bytes` (the
    /// whole file: tensor extents are checked against its length).
    /// `path` names the file in errors.
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Self> {
        parse(bytes).map_err(|message| PipelineError::BadGguf { path: PathBuf::from(path), message })
    }

    /// A metadata value by key.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }
}

/// A reader over the file's bytes that never reads past them.
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

type Parse<T> = std::result::Result<T, String>;

impl<'a> Cursor<'a> {
    fn left(&self) -> usize {
        self.bytes.len() - self.at
    }

    fn take(&mut self, n: usize, what: &str) -> Parse<&'a [u8]> {
        if n > self.left() {
            return Err(format!(
                "truncated: {what} needs {n} bytes at offset {}, the file has {} left",
                self.at,
                self.left()
            ));
        }
        let out = &self.bytes[self.at..self.at + n];
        self.at += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Parse<[u8; N]> {
        Ok(self.take(N, what)?.try_into().expect("N bytes taken"))
    }

    fn u32(&mut self, what: &str) -> Parse<u32> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Parse<u64> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// A count of items of at least `min_bytes` each: refused when the
    /// rest of the file could not hold them (before anything is allocated).
    fn count(&mut self, min_bytes: usize, what: &str) -> Parse<usize> {
        let n = self.u64(what)?;
        let fits = (self.left() / min_bytes.max(1)) as u64;
        if n > fits {
            return Err(format!("{what} is {n}, more than the {} bytes left in the file can hold", self.left()));
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &str) -> Parse<String> {
        let len = self.count(1, &format!("the length of {what}"))?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| format!("{what} is not UTF-8"))
    }

    fn value(&mut self, kind: u32, key: &str, depth: usize) -> Parse<GgufValue> {
        Ok(match kind {
            0 => GgufValue::U8(self.array::<1>(key)?[0]),
            1 => GgufValue::I8(self.array::<1>(key)?[0] as i8),
            2 => GgufValue::U16(u16::from_le_bytes(self.array(key)?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.array(key)?)),
            4 => GgufValue::U32(u32::from_le_bytes(self.array(key)?)),
            5 => GgufValue::I32(i32::from_le_bytes(self.array(key)?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.array(key)?)),
            7 => match self.array::<1>(key)?[0] {
                0 => GgufValue::Bool(false),
                1 => GgufValue::Bool(true),
                b => return Err(format!("metadata `{key}`: {b} is not a bool (0 or 1)")),
            },
            8 => GgufValue::String(self.string(&format!("metadata `{key}`"))?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(format!("metadata `{key}`: arrays nested deeper than {MAX_ARRAY_DEPTH}"));
                }
                let inner = self.u32(key)?;
                let min = match inner {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    _ => 8,
                };
                let n = self.count(min, &format!("the length of metadata array `{key}`"))?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(inner, key, depth + 1)?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::U64(u64::from_le_bytes(self.array(key)?)),
            11 => GgufValue::I64(i64::from_le_bytes(self.array(key)?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array(key)?)),
            other => {
                return Err(format!("metadata `{key}` has value type {other}, which GGUF does not define (0..=12)"));
            }
        })
    }
}

fn parse(bytes: &[u8]) -> Parse<GgufHeader> {
    let mut c = Cursor { bytes, at: 0 };
    if c.take(4, "the magic")? != b"GGUF" {
        return Err("not a GGUF file (it does not start with `GGUF`)".into());
    }
    let version = c.u32("the version")?;
    if version != GGUF_VERSION {
        return Err(format!("GGUF version {version}; only version {GGUF_VERSION} is read"));
    }
    // A tensor info takes at least 8 + 4 + 4 + 8 bytes, a key/value 8 + 4 + 1.
    let tensor_count = c.count(24, "the tensor count")?;
    let kv_count = c.count(13, "the metadata count")?;
    let mut metadata = BTreeMap::new();
    for _ in 0..kv_count {
        let key = c.string("a metadata key")?;
        let kind = c.u32(&key)?;
        let value = c.value(kind, &key, 0)?;
        if metadata.insert(key.clone(), value).is_some() {
            return Err(format!("metadata `{key}` appears twice"));
        }
    }
    let alignment = match metadata.get("general.alignment") {
        None => 32,
        Some(GgufValue::U32(a)) if a.is_power_of_two() => u64::from(*a),
        Some(other) => return Err(format!("general.alignment is {other:?}; it must be a u32 power of two")),
    };
    let mut infos = Vec::with_capacity(tensor_count);
    for _ in 0..tensor_count {
        let name = c.string("a tensor name")?;
        let n_dims = c.u32(&name)? as usize;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(format!("tensor `{name}` has {n_dims} dimensions (1..={MAX_DIMS})"));
        }
        let dims = (0..n_dims).map(|_| c.u64(&name)).collect::<Parse<Vec<u64>>>()?;
        let ggml_type = GgmlType(c.u32(&name)?);
        let offset = c.u64(&name)?;
        infos.push((name, dims, ggml_type, offset));
    }
    let data_offset = (c.at as u64).div_ceil(alignment) * alignment;
    let file_len = bytes.len() as u64;
    let mut tensors: Vec<GgufTensorInfo> = Vec::with_capacity(infos.len());
    let mut names = std::collections::BTreeSet::new();
    for (name, dims, ggml_type, offset) in infos {
        if !names.insert(name.clone()) {
            return Err(format!("tensor `{name}` appears twice"));
        }
        let (Some(block_len), Some(block_bytes)) = (ggml_type.block_len(), ggml_type.block_bytes()) else {
            return Err(format!("tensor `{name}` has ggml type {}, which this reader does not know", ggml_type.0));
        };
        if dims.contains(&0) {
            return Err(format!("tensor `{name}` has a zero dimension: {dims:?}"));
        }
        let numel = dims
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d))
            .ok_or_else(|| format!("tensor `{name}`: dimensions {dims:?} overflow"))?;
        if !dims[0].is_multiple_of(block_len) {
            return Err(format!(
                "tensor `{name}` ({}): its rows of {} are not whole blocks of {block_len}",
                ggml_type.name(),
                dims[0]
            ));
        }
        let byte_len = (numel / block_len)
            .checked_mul(block_bytes)
            .ok_or_else(|| format!("tensor `{name}`: its size overflows"))?;
        if !offset.is_multiple_of(alignment) {
            return Err(format!("tensor `{name}`: offset {offset} is not a multiple of the alignment {alignment}"));
        }
        let start = data_offset.checked_add(offset).filter(|s| *s <= file_len);
        let end = start.and_then(|s| s.checked_add(byte_len)).filter(|e| *e <= file_len);
        let Some(start) = start.filter(|_| end.is_some()) else {
            return Err(format!(
                "tensor `{name}`: {byte_len} bytes at data offset {offset} run past the end of the file ({file_len} \
                 bytes, data from {data_offset}): truncated?"
            ));
        };
        tensors.push(GgufTensorInfo { name, dims, ggml_type, offset: start, byte_len });
    }
    Ok(GgufHeader { version, metadata, tensors, alignment, data_offset })
}

/// One architecture's metadata (`{arch}.{key}`), typed, with errors that
/// name the full key: what gguf_deepseek2.rs and gguf_gpt_oss.rs read.
pub(super) struct ArchKeys<'a> {
    /// The file's header.
    pub header: &'a GgufHeader,
    /// `general.architecture`.
    pub arch: &'a str,
}

impl ArchKeys<'_> {
    /// The full key, `{arch}.{k}`.
    pub fn key(&self, k: &str) -> String {
        format!("{}.{k}", self.arch)
    }

    /// The value of `{arch}.{k}`, if the file has it.
    pub fn get(&self, k: &str) -> Option<&GgufValue> {
        self.header.get(&self.key(k))
    }

    /// An integer, or why not.
    pub fn int(&self, k: &str) -> Result<u64, String> {
        self.get(k).and_then(GgufValue::as_u64).ok_or_else(|| format!("missing integer metadata key `{}`", self.key(k)))
    }

    /// A float; an f32 as the decimal the converter wrote (Python's float:
    /// 0.1, 2.446), not the f32 nearest it widened: the reference computes
    /// with the checkpoint's numbers.
    pub fn float(&self, k: &str) -> Option<f64> {
        match self.get(k) {
            Some(GgufValue::F32(v)) => format!("{v}").parse::<f64>().ok(),
            other => other.and_then(GgufValue::as_f64),
        }
    }

    /// A float, or why not.
    pub fn need_float(&self, k: &str) -> Result<f64, String> {
        self.float(k).ok_or_else(|| format!("missing float metadata key `{}`", self.key(k)))
    }

    /// The YaRN keys every family's `rope_scaling` shares: the factor, the
    /// original context, and the betas (llama.cpp's defaults, 32 and 1,
    /// where the file leaves them out). Each family adds its own keys.
    pub fn yarn_scaling(&self) -> Result<serde_json::Map<String, serde_json::Value>, String> {
        let mut y = serde_json::Map::new();
        y.insert("factor".into(), self.need_float("rope.scaling.factor")?.into());
        y.insert("original_max_position_embeddings".into(), self.int("rope.scaling.original_context_length")?.into());
        y.insert("beta_fast".into(), self.float("rope.scaling.yarn_beta_fast").unwrap_or(32.0).into());
        y.insert("beta_slow".into(), self.float("rope.scaling.yarn_beta_slow").unwrap_or(1.0).into());
        Ok(y)
    }
}
