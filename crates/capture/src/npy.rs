//! Writing captured f32 and i32 tensors as .npy files (version 1.0; the
//! header and the reader live in `compare::npy`).

use std::io::Write;
use std::path::Path;

use pipeline::{HostTensor, TensorData};

use crate::error::{CaptureError, Result};

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

fn npy_header(tensor: &HostTensor) -> Vec<u8> {
    let descr = match tensor.data {
        TensorData::F32(_) => "<f4",
        TensorData::I32(_) => "<i4",
    };
    compare::npy::header(descr, &tensor.shape)
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
            let back = compare::npy::parse_npy(&bytes).unwrap();
            assert_eq!(back.shape, tensor.shape);
            assert_eq!(back.dtype(), tensor.dtype_name());
            let expect = tensor.to_f64();
            assert_eq!(back.values().len(), expect.len());
            for (a, b) in back.values().iter().zip(&expect) {
                assert!(a == b || (a.is_nan() && b.is_nan()));
            }
        }
    }
}
