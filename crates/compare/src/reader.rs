//! [`CaptureDir`]: reads any capture directory (ours, or the oracle
//! fixtures) through its manifest.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use stage_types::SaveTensorStage;

use crate::error::{CompareError, Result};
use crate::manifest::{Manifest, ManifestTensor};
use crate::npy::{NpyArray, read_npy};

/// An opened capture directory.
#[derive(Debug, Clone)]
pub struct CaptureDir {
    /// The folder.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
    index: HashMap<(usize, Option<usize>, SaveTensorStage), usize>,
    /// The folder with links resolved, which every tensor file must lie in.
    canonical: Option<PathBuf>,
}

impl CaptureDir {
    /// Opens `dir` and indexes its manifest. Entries whose stage this
    /// version does not know are kept in the manifest but not indexed.
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(CompareError::Io {
                action: "cannot open capture",
                path: dir.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such folder"),
            });
        }
        let manifest = Manifest::read(dir)?;
        let index = manifest
            .tensors
            .iter()
            .enumerate()
            .filter_map(|(i, t)| t.stage.parse::<SaveTensorStage>().ok().map(|s| ((t.step, t.layer, s), i)))
            .collect();
        Ok(Self { dir: dir.to_path_buf(), manifest, index, canonical: dir.canonicalize().ok() })
    }

    /// The manifest entry of (step, layer, stage), if captured.
    pub fn entry(&self, step: usize, layer: Option<usize>, stage: SaveTensorStage) -> Option<&ManifestTensor> {
        self.index.get(&(step, layer, stage)).map(|&i| &self.manifest.tensors[i])
    }

    /// Loads (step, layer, stage); `Ok(None)` if it was not captured.
    /// Checks the manifest's shape against the stage (its rank, no empty
    /// dimension) before reading, the file's shape against the manifest,
    /// and that the file, links resolved, lies inside the capture folder.
    pub fn load(&self, step: usize, layer: Option<usize>, stage: SaveTensorStage) -> Result<Option<NpyArray>> {
        let Some(entry) = self.entry(step, layer, stage) else {
            return Ok(None);
        };
        let path = self.dir.join(&entry.path);
        let bad = |message: String| CompareError::BadNpy { path: path.clone(), message };
        check_stage_shape(stage, &entry.shape).map_err(|m| bad(format!("the manifest's {m}")))?;
        let inside = match (path.canonicalize(), &self.canonical) {
            (Ok(file), Some(dir)) => file.starts_with(dir),
            _ => true, // a missing file is reported by the read below
        };
        if !inside {
            return Err(bad("is a link that points outside the capture folder".into()));
        }
        let array = read_npy(&path)?;
        if array.shape != entry.shape {
            return Err(bad(format!("shape {:?} differs from the manifest's {:?}", array.shape, entry.shape)));
        }
        Ok(Some(array))
    }

    /// Stage names of manifest entries this version does not know, each
    /// once, in manifest order.
    pub fn unknown_stages(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for t in &self.manifest.tensors {
            if t.stage.parse::<SaveTensorStage>().is_err() && !names.contains(&t.stage) {
                names.push(t.stage.clone());
            }
        }
        names
    }

    /// Every indexed (step, layer, stage), sorted by step, layer (model
    /// stages of the prologue first) and stage order.
    pub fn keys(&self) -> Vec<(usize, Option<usize>, SaveTensorStage)> {
        let mut keys: Vec<_> = self.index.keys().copied().collect();
        keys.sort_by_key(|&(step, layer, stage)| (step, stage_rank(layer, stage), stage));
        keys
    }
}

/// Checks a captured shape against its stage: the stage's rank (from
/// DESIGN's shape table) and no empty dimension (every stage tensor has at
/// least one token, head, expert and feature).
pub fn check_stage_shape(stage: SaveTensorStage, shape: &[usize]) -> Result<(), String> {
    if shape.len() != stage.rank() {
        return Err(format!(
            "shape {shape:?} has {} dimensions but {stage} is {} ({} dimensions)",
            shape.len(),
            stage.shape(),
            stage.rank()
        ));
    }
    if shape.contains(&0) {
        return Err(format!("shape {shape:?} of {stage} has an empty dimension"));
    }
    Ok(())
}

/// Orders prologue model stages before layers, layers by index, epilogue
/// stages after.
fn stage_rank(layer: Option<usize>, stage: SaveTensorStage) -> (u8, usize) {
    match layer {
        Some(l) => (1, l),
        None if stage < SaveTensorStage::AttnNorm => (0, 0),
        None => (2, 0),
    }
}
