//! The .npy format: the version 1.0 header moetrace writes, and a reader
//! of little-endian f32, f64, i32 and i64 arrays (numpy's and the
//! oracle's).

use std::io::Read;
use std::path::Path;

use crate::error::{CompareError, Result};
use crate::view::{Elements, TensorView};

/// A tensor read from a .npy file, its elements kept in their own type.
#[derive(Debug, Clone, PartialEq)]
pub struct NpyArray {
    /// Shape, outermost first.
    pub shape: Vec<usize>,
    /// Elements in row-major order.
    pub data: NpyData,
}

/// The elements of a .npy file, in the file's type.
#[derive(Debug, Clone, PartialEq)]
pub enum NpyData {
    /// `<f4`.
    F32(Vec<f32>),
    /// `<f8`.
    F64(Vec<f64>),
    /// `<i4`.
    I32(Vec<i32>),
    /// `<i8`.
    I64(Vec<i64>),
}

impl NpyArray {
    /// The elements, borrowed.
    pub fn elements(&self) -> Elements<'_> {
        match &self.data {
            NpyData::F32(v) => Elements::F32(v),
            NpyData::F64(v) => Elements::F64(v),
            NpyData::I32(v) => Elements::I32(v),
            NpyData::I64(v) => Elements::I64(v),
        }
    }

    /// The array as compare reads it.
    pub fn view(&self) -> TensorView<'_> {
        TensorView::new(&self.shape, self.elements())
    }

    /// numpy's dtype name: float32, float64, int32 or int64.
    pub fn dtype(&self) -> &'static str {
        self.elements().dtype()
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.elements().len()
    }

    /// True when the array holds no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every element widened to f64 (exact for every dtype read), in a new
    /// vector: for tools and tests.
    pub fn values(&self) -> Vec<f64> {
        self.elements().to_f64_vec()
    }
}

/// The .npy version 1.0 header for `descr` (`<f4`, `<i4`, ...) and
/// `shape`, padded so that the data starts at a multiple of 64 bytes.
pub fn header(descr: &str, shape: &[usize]) -> Vec<u8> {
    let shape = match shape.len() {
        1 => format!("({},)", shape[0]),
        _ => format!("({})", shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")),
    };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    // magic (6) + version (2) + length (2) + header + '\n' is a multiple of 64.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len());
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out
}

/// The most elements any array may describe, counting empty dimensions as
/// 1 (2^48: far beyond any activation, far below an overflow): an empty
/// array of shape (0, 2^60) is refused, not handed on to code that would
/// size a buffer by its other dimensions.
pub const MAX_ELEMENTS: usize = 1 << 48;

/// The largest header read (numpy writes at most a few hundred bytes).
const MAX_HEADER: usize = 1 << 20;

/// A parsed .npy header.
#[derive(Debug, Clone, PartialEq)]
struct Header {
    shape: Vec<usize>,
    dtype: &'static str,
    data_start: usize,
    data_len: usize,
}

/// Reads a .npy file: a regular file only, its size checked against the
/// header before the data is read.
pub fn read_npy(path: &Path) -> Result<NpyArray> {
    let bad = |message: String| CompareError::BadNpy { path: path.to_path_buf(), message };
    let io = || CompareError::io("cannot read", path);
    let (file, len) = stage_types::input::open_regular(path).map_err(io())?;
    let mut bytes = Vec::new();
    (&file).take(MAX_HEADER as u64).read_to_end(&mut bytes).map_err(io())?;
    let header = parse_header(&bytes).map_err(bad)?;
    let expected = header.data_start as u64 + header.data_len as u64;
    if len != expected {
        return Err(bad(size_message(&header, len.saturating_sub(header.data_start as u64))));
    }
    // The rest, from the same open file: only now is its size known to be
    // what the header says.
    let rest = expected.saturating_sub(bytes.len() as u64);
    bytes.reserve_exact(rest as usize);
    (&file).take(rest).read_to_end(&mut bytes).map_err(io())?;
    parse_npy(&bytes).map_err(bad)
}

fn size_message(h: &Header, data_len: u64) -> String {
    format!(
        "shape {:?} of {} needs {} data bytes but the file has {data_len} (truncated?)",
        h.shape, h.dtype, h.data_len
    )
}

/// Parses .npy bytes; the error says what is wrong. Allocates at most the
/// input's length (elements keep their type).
pub fn parse_npy(bytes: &[u8]) -> Result<NpyArray, String> {
    let header = parse_header(bytes)?;
    let data = &bytes[header.data_start.min(bytes.len())..];
    if data.len() != header.data_len {
        return Err(size_message(&header, data.len() as u64));
    }
    let data = match header.dtype {
        "float32" => NpyData::F32(data.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4"))).collect()),
        "float64" => NpyData::F64(data.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8"))).collect()),
        "int32" => NpyData::I32(data.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().expect("4"))).collect()),
        _ => NpyData::I64(data.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8"))).collect()),
    };
    Ok(NpyArray { shape: header.shape, data })
}

/// Parses the magic, version and header dictionary; sizes are checked
/// arithmetic, so no shape can overflow.
fn parse_header(bytes: &[u8]) -> Result<Header, String> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err("missing the \\x93NUMPY magic (not a .npy file)".into());
    }
    let (header_len, header_start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12),
        v => return Err(format!("unsupported .npy version {v}")),
    };
    if header_len > MAX_HEADER - header_start {
        return Err(format!("header of {header_len} bytes is longer than any numpy writes"));
    }
    let data_start = header_start + header_len;
    let header = bytes
        .get(header_start..data_start)
        .and_then(|h| std::str::from_utf8(h).ok())
        .ok_or("header is truncated or not text")?;
    let field = |key: &str| -> Result<&str, String> {
        let at = header.find(&format!("'{key}'")).ok_or(format!("header has no '{key}'"))?;
        Ok(header[at + key.len() + 2..].trim_start_matches([':', ' ']))
    };
    let descr_text = field("descr")?;
    let descr = descr_text.trim_start_matches('\'').split('\'').next().unwrap_or_default();
    if field("fortran_order")?.starts_with("True") {
        return Err("fortran_order True is not supported".into());
    }
    let shape_text = field("shape")?;
    let shape_body = shape_text.strip_prefix('(').and_then(|s| s.split(')').next()).ok_or("shape is not a tuple")?;
    let shape = shape_body
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().map_err(|_| format!("bad shape entry `{s}`")))
        .collect::<Result<Vec<_>, _>>()?;
    let (dtype, element_size) = match descr {
        "<f4" => ("float32", 4),
        "<f8" => ("float64", 8),
        "<i4" => ("int32", 4),
        "<i8" => ("int64", 8),
        other => {
            return Err(format!("dtype `{other}` is not supported (supported: <f4, <f8, <i4, <i8)"));
        }
    };
    let too_big = || format!("shape {shape:?} describes more than {MAX_ELEMENTS} elements");
    shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d.max(1)).filter(|&n| n <= MAX_ELEMENTS))
        .ok_or_else(too_big)?;
    let numel: usize = shape.iter().product();
    let data_len = numel * element_size;
    Ok(Header { shape, dtype, data_start, data_len })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32_file(shape: &[usize], values: &[f32]) -> Vec<u8> {
        let mut bytes = header("<f4", shape);
        values.iter().for_each(|v| bytes.extend_from_slice(&v.to_le_bytes()));
        bytes
    }

    #[test]
    fn headers_are_aligned_and_read_back() {
        for shape in [vec![2, 3], vec![4], vec![2, 0, 3]] {
            let n: usize = shape.iter().product();
            let bytes = f32_file(&shape, &vec![1.5; n]);
            let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
            assert_eq!((10 + header_len) % 64, 0);
            let back = parse_npy(&bytes).unwrap();
            assert_eq!((back.dtype(), back.values()), ("float32", vec![1.5; n]));
            assert_eq!(back.shape, shape);
        }
    }

    #[test]
    fn corrupt_and_truncated_files_are_errors() {
        let bytes = f32_file(&[2, 2], &[1.0; 4]);
        assert!(parse_npy(&bytes[..bytes.len() - 1]).unwrap_err().contains("truncated"));
        assert!(parse_npy(&bytes[..5]).unwrap_err().contains("magic"));
        assert!(parse_npy(&bytes[..30]).is_err());
        let mut wrong = bytes.clone();
        wrong[0] = b'X';
        assert!(parse_npy(&wrong).is_err());
        let mut complex = bytes.clone();
        let at = complex.windows(3).position(|w| w == b"<f4").unwrap();
        complex[at..at + 3].copy_from_slice(b"<c8");
        assert!(parse_npy(&complex).unwrap_err().contains("<c8"));
    }

    #[test]
    fn shapes_that_overflow_or_describe_huge_empty_arrays_are_refused() {
        for shape in [vec![1usize << 32, 1 << 32, 1 << 32], vec![0, 1 << 50], vec![1 << 50, 0], vec![usize::MAX, 2]] {
            let err = parse_npy(&header("<f4", &shape)).unwrap_err();
            assert!(err.contains("more than"), "{shape:?}: {err}");
        }
        assert_eq!(parse_npy(&header("<f4", &[3, 0])).unwrap().len(), 0);
    }
}
