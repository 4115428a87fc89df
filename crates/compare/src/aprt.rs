//! The upstream project's APRT captures: `<dir>/layer-<N>/<stage>.bin`
//! (model stages also directly in `<dir>`), each file the magic `APRT`, a
//! u32 LE layer (0xFFFFFFFF for model stages), a u32 LE element count and
//! that many f32 LE values. No shape, no steps: one step (0), with the
//! shape taken from the other side of a comparison.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use stage_types::SaveTensorStage;

use crate::error::{CompareError, Result};
use crate::npy::{NpyArray, NpyData};

/// An APRT capture folder, indexed.
#[derive(Debug, Clone)]
pub struct AprtDir {
    /// The folder.
    pub dir: PathBuf,
    files: BTreeMap<(Option<usize>, SaveTensorStage), PathBuf>,
    unknown: Vec<String>,
}

/// The layer value APRT writes for model stages.
const MODEL_LAYER: u32 = 0xFFFF_FFFF;

impl AprtDir {
    /// True if `dir` looks like an APRT capture (a `.bin` file directly
    /// inside or in a `layer-N` folder).
    pub fn detect(dir: &Path) -> bool {
        let has_bin = |d: &Path| {
            std::fs::read_dir(d)
                .map(|it| it.filter_map(|e| e.ok()).any(|e| e.path().extension().is_some_and(|x| x == "bin")))
                .unwrap_or(false)
        };
        has_bin(dir)
            || std::fs::read_dir(dir)
                .map(|it| {
                    it.filter_map(|e| e.ok())
                        .any(|e| e.file_name().to_string_lossy().starts_with("layer-") && has_bin(&e.path()))
                })
                .unwrap_or(false)
    }

    /// Indexes the `.bin` files of known stages (others are ignored).
    pub fn open(dir: &Path) -> Result<Self> {
        let mut files = BTreeMap::new();
        let mut unknown = Vec::new();
        let mut add = |layer: Option<usize>, folder: &Path| -> Result<()> {
            for entry in std::fs::read_dir(folder).map_err(CompareError::io("cannot read", folder))? {
                let path = entry.map_err(CompareError::io("cannot read", folder))?.path();
                if path.extension().is_some_and(|x| x == "bin") {
                    let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
                    match name.parse::<SaveTensorStage>() {
                        Ok(stage) => {
                            files.insert((if stage.is_layer_stage() { layer } else { None }, stage), path);
                        }
                        Err(_) if !unknown.contains(&name) => unknown.push(name),
                        Err(_) => {}
                    }
                }
            }
            Ok(())
        };
        add(None, dir)?;
        for entry in std::fs::read_dir(dir).map_err(CompareError::io("cannot read", dir))? {
            let entry = entry.map_err(CompareError::io("cannot read", dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(n) = name.strip_prefix("layer-").and_then(|n| n.parse::<usize>().ok()) {
                add(Some(n), &entry.path())?;
            }
        }
        Ok(Self { dir: dir.to_path_buf(), files, unknown })
    }

    /// File stems of `.bin` files that name no known stage.
    pub fn unknown_stages(&self) -> &[String] {
        &self.unknown
    }

    /// Every (layer, stage) present.
    pub fn keys(&self) -> Vec<(Option<usize>, SaveTensorStage)> {
        self.files.keys().copied().collect()
    }

    /// Loads (layer, stage) as a flat `[count]` array (the caller takes the
    /// shape from the other side of the comparison).
    pub fn load(&self, layer: Option<usize>, stage: SaveTensorStage) -> Result<Option<NpyArray>> {
        let Some(path) = self.files.get(&(layer, stage)) else { return Ok(None) };
        let io = || CompareError::io("cannot read", path);
        let bad = |message: String| CompareError::BadAprt { path: path.clone(), message };
        let (file, len) = stage_types::input::open_regular(path).map_err(io())?;
        let mut bytes = Vec::with_capacity(12);
        (&file).take(12).read_to_end(&mut bytes).map_err(io())?;
        let expected_layer = layer.map(|l| l as u32).unwrap_or(MODEL_LAYER);
        parse_header(&bytes, expected_layer, len).map_err(bad)?;
        // The values, from the same open file, once the header vouched for
        // the file's length.
        (&file).take(len - 12).read_to_end(&mut bytes).map_err(io())?;
        let values = parse_aprt(&bytes, expected_layer).map_err(bad)?;
        Ok(Some(NpyArray { shape: vec![values.len()], data: NpyData::F32(values) }))
    }
}

/// Checks an APRT header (the first 12 bytes) against the layer the file's
/// place implies and the file's length; returns the element count.
fn parse_header(head: &[u8], expected_layer: u32, file_len: u64) -> Result<usize, String> {
    if head.len() < 12 || &head[..4] != b"APRT" {
        return Err("not an APRT file: the magic `APRT` is missing".into());
    }
    let file_layer = u32::from_le_bytes(head[4..8].try_into().expect("4 bytes"));
    let count = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes"));
    if file_layer != expected_layer {
        return Err(format!("header says layer {file_layer} but the file sits where layer {expected_layer} belongs"));
    }
    if file_len != 12 + 4 * count as u64 {
        return Err(format!(
            "header promises {count} f32 values but the file holds {} bytes of data (truncated?)",
            file_len.saturating_sub(12)
        ));
    }
    Ok(count as usize)
}

/// Parses a whole APRT file whose place implies `expected_layer`
/// (0xFFFFFFFF for model stages). Allocates at most the input's size.
pub fn parse_aprt(bytes: &[u8], expected_layer: u32) -> Result<Vec<f32>, String> {
    parse_header(bytes, expected_layer, bytes.len() as u64)?;
    Ok(bytes[12..].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4"))).collect())
}

/// Writes an APRT file (for tests and for exporting to the upstream tool).
pub fn write_aprt(path: &Path, layer: Option<usize>, values: &[f32]) -> Result<()> {
    let mut bytes = b"APRT".to_vec();
    bytes.extend_from_slice(&layer.map(|l| l as u32).unwrap_or(MODEL_LAYER).to_le_bytes());
    bytes.extend_from_slice(&(values.len() as u32).to_le_bytes());
    values.iter().for_each(|v| bytes.extend_from_slice(&v.to_le_bytes()));
    std::fs::write(path, bytes).map_err(CompareError::io("cannot write", path))
}
