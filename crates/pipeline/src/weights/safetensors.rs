//! Loading Hugging Face checkpoints: `model.safetensors`, or shards listed in
//! `model.safetensors.index.json`, memory-mapped and validated (header,
//! offsets, sizes) before any tensor is used.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use safetensors::tensor::{Dtype, SafeTensorError, SafeTensors};
use serde_json::Value;

use super::{WeightDtype, WeightStore, WeightTensor};
use crate::error::{PipelineError, Result};

/// Maps every safetensors file of the checkpoint in `dir` into a
/// [`WeightStore`]. Single-file (`model.safetensors`) and sharded
/// (`model.safetensors.index.json`) layouts are both read.
pub fn load_checkpoint(dir: &Path) -> Result<WeightStore> {
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<PathBuf> = if index.is_file() {
        shard_files(&index)?.into_iter().map(|f| dir.join(f)).collect()
    } else {
        let single = dir.join("model.safetensors");
        if !single.is_file() {
            return Err(PipelineError::Io {
                path: single,
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no model.safetensors and no model.safetensors.index.json in the model folder",
                ),
            });
        }
        vec![single]
    };
    let mut store = WeightStore::default();
    for file in files {
        load_file(&file, &mut store)?;
    }
    super::fp8::attach_block_scales(store, dir)
}

/// Writes every tensor of `store` to one safetensors file at `path`, in
/// their stored dtypes (the layout Hugging Face writes).
pub fn save_safetensors(store: &WeightStore, path: &Path) -> Result<()> {
    if let Some(t) = store.tensors().iter().find(|t| matches!(t.dtype, WeightDtype::Quant(_) | WeightDtype::Fp8E4m3)) {
        return Err(PipelineError::BadInput(format!(
            "tensor `{}` is {}, a block-scaled format this writer does not write",
            t.name,
            t.dtype.name()
        )));
    }
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for t in store.tensors() {
        let len = t.byte_len();
        header.insert(
            t.name.clone(),
            serde_json::json!({"dtype": t.dtype.name(), "shape": t.shape, "data_offsets": [offset, offset + len]}),
        );
        offset += len;
    }
    let mut header = serde_json::to_vec(&header).expect("header serialises");
    while !header.len().is_multiple_of(8) {
        header.push(b' ');
    }
    let io = |source| PipelineError::Io { path: path.to_path_buf(), source };
    let mut file = std::io::BufWriter::new(File::create(path).map_err(io)?);
    file.write_all(&(header.len() as u64).to_le_bytes()).map_err(io)?;
    file.write_all(&header).map_err(io)?;
    for t in store.tensors() {
        file.write_all(&t.bytes()).map_err(io)?;
    }
    file.flush().map_err(io)
}

fn shard_files(index: &Path) -> Result<BTreeSet<String>> {
    let bad = |message: String| PipelineError::BadSafetensors { path: index.to_path_buf(), message };
    let text = stage_types::input::read_regular_text(index, 64 * stage_types::input::MIB)
        .map_err(|source| PipelineError::Io { path: index.to_path_buf(), source })?;
    let json: Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let map = json.get("weight_map").and_then(Value::as_object).ok_or_else(|| bad("no `weight_map` object".into()))?;
    map.values()
        .map(|v| {
            v.as_str()
                .filter(|f| !f.contains('/') && !f.contains('\\'))
                .map(str::to_string)
                .ok_or_else(|| bad(format!("weight_map value {v} is not a plain file name")))
        })
        .collect()
}

/// One tensor of a safetensors file, as its header describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct SafetensorsEntry {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub dtype: WeightDtype,
    /// Shape.
    pub shape: Vec<usize>,
    /// First byte in the file.
    pub start: usize,
    /// One past the last byte in the file.
    pub end: usize,
}

/// Why a safetensors file is not read.
#[derive(Debug, Clone, PartialEq)]
pub enum SafetensorsRefusal {
    /// The file is not a valid safetensors file (what is wrong).
    Malformed(String),
    /// A valid file holding a weight type moetrace does not read.
    UnsupportedDtype {
        /// The tensor.
        tensor: String,
        /// Its dtype as the header names it, e.g. `F8_E4M3`.
        dtype: String,
    },
}

impl std::fmt::Display for SafetensorsRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SafetensorsRefusal::Malformed(why) => f.write_str(why),
            SafetensorsRefusal::UnsupportedDtype { tensor, dtype } => write!(
                f,
                "tensor `{tensor}` is {dtype}{}, a weight type moetrace does not read (it reads BF16, F16, F32, F8_E4M3 with block scales, and U8 MXFP4 blocks with their scales)",
                if dtype.starts_with("F8") { " (an FP8 checkpoint of another format)" } else { "" }
            ),
        }
    }
}

/// Validates a whole safetensors file and lists its tensors, by name.
/// Hugging Face's own parser checks the header: its length, UTF-8 JSON,
/// contiguous non-overlapping offsets, shape x dtype sizes in checked
/// arithmetic, and that the data exactly fills the file. The error says
/// what is wrong.
pub fn index_safetensors(bytes: &[u8]) -> Result<Vec<SafetensorsEntry>, SafetensorsRefusal> {
    let (header_len, metadata) = SafeTensors::read_metadata(bytes)
        .map_err(|e| match e {
            SafeTensorError::MetadataIncompleteBuffer => format!(
                "the tensors its header describes do not exactly fill the file's {} bytes (truncated or extended?)",
                bytes.len()
            ),
            SafeTensorError::HeaderTooSmall | SafeTensorError::InvalidHeaderLength => {
                format!("the header length runs past the end of the {}-byte file (truncated?)", bytes.len())
            }
            other => other.to_string(),
        })
        .map_err(SafetensorsRefusal::Malformed)?;
    let data_start = 8 + header_len;
    let mut entries = Vec::new();
    for (name, info) in metadata.tensors() {
        let dtype = match info.dtype {
            Dtype::BF16 => WeightDtype::Bf16,
            Dtype::F16 => WeightDtype::F16,
            Dtype::F32 => WeightDtype::F32,
            Dtype::F8_E4M3 => WeightDtype::Fp8E4m3,
            Dtype::U8 => WeightDtype::U8,
            other => {
                return Err(SafetensorsRefusal::UnsupportedDtype { tensor: name, dtype: format!("{other:?}") });
            }
        };
        let (start, end) = info.data_offsets;
        entries.push(SafetensorsEntry {
            name,
            dtype,
            shape: info.shape.clone(),
            start: data_start + start,
            end: data_start + end,
        });
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(entries)
}

fn load_file(path: &Path, store: &mut WeightStore) -> Result<()> {
    let (file, _) = stage_types::input::open_regular(path)
        .map_err(|source| PipelineError::Io { path: path.to_path_buf(), source })?;
    // SAFETY: the checkpoint is opened read-only and is treated as immutable
    // input; if another process truncates it while we run, reads may fault,
    // which is the documented hazard of every mmap-based model loader.
    let map = unsafe { Mmap::map(&file) }.map_err(|source| PipelineError::Io { path: path.to_path_buf(), source })?;
    let map = Arc::new(map);
    let entries = index_safetensors(&map).map_err(|refusal| match refusal {
        SafetensorsRefusal::Malformed(message) => PipelineError::BadSafetensors { path: path.to_path_buf(), message },
        unsupported => PipelineError::Unsupported { path: path.to_path_buf(), message: unsupported.to_string() },
    })?;
    for e in entries {
        store.insert(WeightTensor::mapped(e.name, e.dtype, e.shape, map.clone(), e.start, e.end));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes a safetensors file with the given (name, shape, f32 values).
    pub(crate) fn write_safetensors(path: &Path, tensors: &[(&str, Vec<usize>, Vec<f32>)]) {
        let mut header = serde_json::Map::new();
        let mut data = Vec::new();
        for (name, shape, values) in tensors {
            let start = data.len();
            data.extend(values.iter().flat_map(|v| v.to_le_bytes()));
            header.insert(
                name.to_string(),
                serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [start, data.len()]}),
            );
        }
        let header = serde_json::to_vec(&header).unwrap();
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend(header);
        bytes.extend(data);
        std::fs::write(path, bytes).unwrap();
    }

    /// A fresh folder, removed with what the test wrote when dropped.
    fn temp_dir(name: &str) -> tempfile::TempDir {
        tempfile::Builder::new().prefix(&format!("moetrace-st-{name}-")).tempdir().unwrap()
    }

    #[test]
    fn reads_single_and_sharded_checkpoints() {
        let dir = temp_dir("single");
        write_safetensors(&dir.path().join("model.safetensors"), &[("a", vec![2, 2], vec![1.0, 2.0, 3.0, 4.0])]);
        let store = load_checkpoint(dir.path()).unwrap();
        assert_eq!(store.get(store.id("a").unwrap()).to_f32_vec(), [1.0, 2.0, 3.0, 4.0]);

        let dir = temp_dir("sharded");
        write_safetensors(&dir.path().join("s1.safetensors"), &[("a", vec![1], vec![5.0])]);
        write_safetensors(&dir.path().join("s2.safetensors"), &[("b", vec![2], vec![6.0, 7.0])]);
        std::fs::write(
            dir.path().join("model.safetensors.index.json"),
            r#"{"metadata": {}, "weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}"#,
        )
        .unwrap();
        let store = load_checkpoint(dir.path()).unwrap();
        assert_eq!(store.get(store.id("b").unwrap()).to_f32_vec(), [6.0, 7.0]);
        assert_eq!(store.tensors().len(), 2);
    }

    #[test]
    fn truncated_file_is_reported_with_the_tensor() {
        let dir = temp_dir("trunc");
        let path = dir.path().join("model.safetensors");
        write_safetensors(&path, &[("w", vec![4], vec![1.0; 4])]);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        let msg = load_checkpoint(dir.path()).unwrap_err().to_string();
        assert!(msg.contains("model.safetensors") && msg.contains("truncated"), "{msg}");
        std::fs::write(&path, &bytes[..20]).unwrap();
        let msg = load_checkpoint(dir.path()).unwrap_err().to_string();
        assert!(msg.contains("header length"), "{msg}");
        std::fs::write(&path, [1u8, 2]).unwrap();
        assert!(load_checkpoint(dir.path()).is_err());
    }

    #[test]
    fn missing_weights_file_is_named() {
        let dir = temp_dir("none");
        let msg = load_checkpoint(dir.path()).unwrap_err().to_string();
        assert!(msg.contains("model.safetensors"), "{msg}");
    }
}
