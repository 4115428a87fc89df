//! The .npy format (version 1.0): writing f32 and i32 tensors, reading
//! little-endian f32, f64, i32 and i64 ones (numpy's and the oracle's).

use std::io::Write;
use std::path::Path;

use pipeline::{HostTensor, TensorData};

use crate::error::{CaptureError, Result};

/// A tensor read from a .npy file, values widened to f64 (exact for every
/// dtype read).
#[derive(Debug, Clone, PartialEq)]
pub struct NpyArray {
    /// Shape, outermost first.
    pub shape: Vec<usize>,
    /// numpy dtype name: float32, float64, int32 or int64.
    pub dtype: &'static str,
    /// Elements in row-major order.
    pub values: Vec<f64>,
}

/// Serialises a tensor as .npy bytes.
pub fn to_npy_bytes(tensor: &HostTensor) -> Vec<u8> {
    let mut out = npy_header(tensor);
    out.reserve(tensor.byte_len());
    match &tensor.data {
        TensorData::F32(v) => v.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
        TensorData::I32(v) => v.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
    }
    out
}

/// The .npy header (magic, version, length, dict, padding) for `tensor`.
fn npy_header(tensor: &HostTensor) -> Vec<u8> {
    let descr = match tensor.data {
        TensorData::F32(_) => "<f4",
        TensorData::I32(_) => "<i4",
    };
    let shape = match tensor.shape.len() {
        1 => format!("({},)", tensor.shape[0]),
        _ => format!("({})", tensor.shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")),
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

/// Writes a tensor to `path` as .npy: the header, then the values as they
/// lie in memory on little-endian machines (no second copy of the data).
pub fn write_npy(path: &Path, tensor: &HostTensor) -> Result<()> {
    let mut file = std::fs::File::create(path).map_err(CaptureError::io("cannot create", path))?;
    #[cfg(target_endian = "little")]
    {
        let data: &[u8] = match &tensor.data {
            // SAFETY: f32 and i32 are plain 4-byte values with no padding;
            // viewing them as bytes is what little-endian .npy stores.
            TensorData::F32(v) => unsafe { std::slice::from_raw_parts(v.as_ptr().cast(), v.len() * 4) },
            // SAFETY: as above.
            TensorData::I32(v) => unsafe { std::slice::from_raw_parts(v.as_ptr().cast(), v.len() * 4) },
        };
        file.write_all(&npy_header(tensor))
            .and_then(|()| file.write_all(data))
            .map_err(CaptureError::io("cannot write", path))
    }
    #[cfg(not(target_endian = "little"))]
    file.write_all(&to_npy_bytes(tensor)).map_err(CaptureError::io("cannot write", path))
}

/// Reads a .npy file.
pub fn read_npy(path: &Path) -> Result<NpyArray> {
    let bytes = std::fs::read(path).map_err(CaptureError::io("cannot read", path))?;
    parse_npy(&bytes).map_err(|message| CaptureError::BadNpy { path: path.to_path_buf(), message })
}

/// Parses .npy bytes; the error says what is wrong.
pub fn parse_npy(bytes: &[u8]) -> Result<NpyArray, String> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err("missing the \\x93NUMPY magic (not a .npy file)".into());
    }
    let (header_len, header_start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12),
        v => return Err(format!("unsupported .npy version {v}")),
    };
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
    let (dtype, size) = match descr {
        "<f4" => ("float32", 4),
        "<f8" => ("float64", 8),
        "<i4" => ("int32", 4),
        "<i8" => ("int64", 8),
        other => {
            return Err(format!("dtype `{other}` is not supported (supported: <f4, <f8, <i4, <i8)"));
        }
    };
    let numel: usize = shape.iter().product();
    let data = &bytes[data_start.min(bytes.len())..];
    if data.len() != numel * size {
        return Err(format!(
            "shape {shape:?} of {dtype} needs {} data bytes but the file has {} (truncated?)",
            numel * size,
            data.len()
        ));
    }
    let values = match dtype {
        "float32" => data.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4")) as f64).collect(),
        "float64" => data.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8"))).collect(),
        "int32" => data.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().expect("4")) as f64).collect(),
        _ => data.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8")) as f64).collect(),
    };
    Ok(NpyArray { shape, dtype, values })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_and_i32_round_trip_with_aligned_headers() {
        for tensor in [
            HostTensor::f32(vec![2, 3], vec![1.0, -2.0, 3.5, f32::NAN, 0.0, 1e-30]),
            HostTensor::i32(vec![3, 1], vec![7, -1, 0]),
            HostTensor::f32(vec![4], vec![1.0; 4]),
            HostTensor::f32(vec![2, 0, 3], vec![]),
        ] {
            let bytes = to_npy_bytes(&tensor);
            let file = std::env::temp_dir().join(format!("moetrace-npy-{}.npy", std::process::id()));
            write_npy(&file, &tensor).unwrap();
            assert_eq!(std::fs::read(&file).unwrap(), bytes, "write_npy writes what to_npy_bytes makes");
            let _ = std::fs::remove_file(&file);
            let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
            assert_eq!((10 + header_len) % 64, 0);
            let back = parse_npy(&bytes).unwrap();
            assert_eq!(back.shape, tensor.shape);
            assert_eq!(back.dtype, tensor.dtype_name());
            let expect = tensor.to_f64();
            assert_eq!(back.values.len(), expect.len());
            for (a, b) in back.values.iter().zip(&expect) {
                assert!(a == b || (a.is_nan() && b.is_nan()));
            }
        }
    }

    #[test]
    fn corrupt_and_truncated_files_are_errors() {
        let bytes = to_npy_bytes(&HostTensor::f32(vec![2, 2], vec![1.0; 4]));
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
}
