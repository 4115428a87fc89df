//! Where captured tensors go: [`CaptureTarget`] (a temporary folder beside
//! out_dir, renamed into place only when the run succeeds) and
//! [`CaptureWriter`] (writer threads fed over one bounded crossbeam channel
//! that write the .npy files, so the forward pass never waits on the disk
//! beyond the channel's capacity).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, bounded};
use pipeline::PendingTensor;
use stage_types::SaveTensorStage;

use crate::error::{CaptureError, Result};
use compare::manifest::{FORMAT, Manifest, ManifestTensor, tensor_path};

/// One tensor on its way to disk.
#[derive(Debug)]
pub struct CapturedTensor {
    /// Position in capture order (the manifest lists tensors in this order
    /// whichever writer thread wrote them).
    pub order: usize,
    /// Step number.
    pub step: usize,
    /// Layer, or None for model stages.
    pub layer: Option<usize>,
    /// The stage.
    pub stage: SaveTensorStage,
    /// The data, possibly still being copied from the device (the writer
    /// waits for it).
    pub tensor: PendingTensor,
}

/// A capture folder being written: a temporary sibling of `out_dir`,
/// removed on drop unless [`CaptureTarget::commit`] renamed it into place.
#[derive(Debug)]
pub struct CaptureTarget {
    out_dir: PathBuf,
    tmp_dir: PathBuf,
    /// Folders above out_dir that `prepare` created, innermost first; a
    /// failed run removes them again when they are empty.
    created_parents: Vec<PathBuf>,
    committed: bool,
}

impl CaptureTarget {
    /// Checks that out_dir may be (re)placed and creates the temporary
    /// folder. An existing out_dir is replaced only if it is empty or a
    /// moetrace capture.
    pub fn prepare(out_dir: &Path) -> Result<Self> {
        if out_dir.exists() && !is_replaceable(out_dir) {
            return Err(CaptureError::OutDirOccupied { path: out_dir.to_path_buf() });
        }
        let name = out_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "capture".into());
        let parent = out_dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let created_parents: Vec<PathBuf> = parent
            .ancestors()
            .take_while(|p| !p.as_os_str().is_empty() && !p.exists())
            .map(Path::to_path_buf)
            .collect();
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let unique = NEXT.fetch_add(1, Ordering::Relaxed);
        let tmp_dir = parent.join(format!(".{name}.moetrace-tmp-{}-{unique}", std::process::id()));
        // From here on, dropping `target` on an error undoes what was made.
        let target = Self { out_dir: out_dir.to_path_buf(), tmp_dir, created_parents, committed: false };
        std::fs::create_dir_all(parent).map_err(CaptureError::io("cannot create the parent of out_dir", parent))?;
        let tmp_dir = &target.tmp_dir;
        if tmp_dir.exists() {
            std::fs::remove_dir_all(tmp_dir).map_err(CaptureError::io("cannot remove stale", tmp_dir))?;
        }
        std::fs::create_dir(tmp_dir).map_err(CaptureError::io("cannot create capture folder", tmp_dir))?;
        Ok(target)
    }

    /// The folder tensors are written into until commit.
    pub fn tmp_dir(&self) -> &Path {
        &self.tmp_dir
    }

    /// The final folder.
    pub fn out_dir(&self) -> &Path {
        &self.out_dir
    }

    /// Writes the manifest and renames the folder into place, replacing a
    /// previous capture at out_dir.
    pub fn commit(mut self, manifest: &Manifest) -> Result<()> {
        manifest.write(&self.tmp_dir)?;
        let old = self.out_dir.with_file_name(format!(
            ".{}.moetrace-old-{}",
            self.out_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            std::process::id()
        ));
        let had_old = self.out_dir.exists();
        if had_old {
            std::fs::rename(&self.out_dir, &old)
                .map_err(CaptureError::io("cannot move aside the previous capture", &self.out_dir))?;
        }
        if let Err(source) = std::fs::rename(&self.tmp_dir, &self.out_dir) {
            if had_old {
                let _ = std::fs::rename(&old, &self.out_dir);
            }
            return Err(CaptureError::Io {
                action: "cannot rename the capture into place at",
                path: self.out_dir.clone(),
                source,
            });
        }
        self.committed = true;
        if had_old {
            std::fs::remove_dir_all(&old).map_err(CaptureError::io("cannot remove the previous capture", &old))?;
        }
        Ok(())
    }
}

impl Drop for CaptureTarget {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.tmp_dir);
            for dir in &self.created_parents {
                // Only empty folders go (remove_dir refuses others).
                let _ = std::fs::remove_dir(dir);
            }
        }
    }
}

/// An existing folder is replaceable when empty or a moetrace capture.
fn is_replaceable(dir: &Path) -> bool {
    if !dir.is_dir() {
        return false;
    }
    let empty = std::fs::read_dir(dir).map(|mut d| d.next().is_none()).unwrap_or(false);
    empty
        || std::fs::read_to_string(dir.join("manifest.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .is_some_and(|v| v.get("format").and_then(|f| f.as_str()) == Some(FORMAT))
}

/// What the writer threads did.
#[derive(Debug, Default)]
pub struct WriterReport {
    /// Manifest entries of the files written, in capture order.
    pub entries: Vec<ManifestTensor>,
    /// Bytes written (file sizes).
    pub bytes: u64,
}

/// The writer threads and the sending end of their channel.
pub struct CaptureWriter {
    tx: Option<Sender<CapturedTensor>>,
    handles: Vec<JoinHandle<Result<Written>>>,
}

/// One writer thread's entries, with their capture order.
type Written = (Vec<(usize, ManifestTensor)>, u64);

impl CaptureWriter {
    /// Tensors that may wait in the channel before a capture system blocks.
    pub const QUEUE: usize = 64;

    /// Writer threads: files are written in parallel (one thread leaves the
    /// forward pass waiting on the disk when a step captures hundreds of MB).
    pub const THREADS: usize = 4;

    /// Starts writers that write under `dir`.
    pub fn spawn(dir: PathBuf) -> Result<Self> {
        let (tx, rx) = bounded(Self::QUEUE);
        let mut writer = Self { tx: Some(tx), handles: Vec::new() };
        for i in 0..Self::THREADS {
            let (dir, rx) = (dir.clone(), rx.clone());
            let handle = std::thread::Builder::new()
                .name(format!("moetrace-capture-writer-{i}"))
                .spawn(move || write_all(&dir, rx))
                .map_err(CaptureError::io("cannot start a writer thread for", "capture"))?;
            writer.handles.push(handle);
        }
        Ok(writer)
    }

    /// A sender for capture systems.
    pub fn sender(&self) -> Sender<CapturedTensor> {
        self.tx.clone().expect("sender taken only by finish")
    }

    /// Waits for every queued tensor to be written. All other senders must
    /// have been dropped first.
    pub fn finish(mut self) -> Result<WriterReport> {
        drop(self.tx.take());
        let mut entries = Vec::new();
        let mut report = WriterReport::default();
        let mut first_error = None;
        for handle in std::mem::take(&mut self.handles) {
            let written = handle.join().unwrap_or_else(|_| {
                Err(CaptureError::Io {
                    action: "writer thread panicked while writing",
                    path: PathBuf::from("capture"),
                    source: std::io::Error::other("panic"),
                })
            });
            match written {
                Ok((e, bytes)) => {
                    entries.extend(e);
                    report.bytes += bytes;
                }
                Err(e) => first_error = first_error.or(Some(e)),
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        entries.sort_by_key(|(order, _)| *order);
        report.entries = entries.into_iter().map(|(_, e)| e).collect();
        Ok(report)
    }
}

impl Drop for CaptureWriter {
    fn drop(&mut self) {
        drop(self.tx.take());
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// A writer thread: writes each tensor it receives; after the first error
/// it keeps draining the channel (so senders never block) and reports that
/// error.
fn write_all(dir: &Path, rx: Receiver<CapturedTensor>) -> Result<Written> {
    let (mut entries, mut bytes) = (Vec::new(), 0u64);
    let mut first_error = None;
    for item in rx {
        if first_error.is_some() {
            continue;
        }
        let rel = tensor_path(item.step, item.layer, item.stage.name());
        let path = dir.join(&rel);
        let tensor = match item.tensor.wait() {
            Ok(t) => t,
            Err(e) => {
                first_error = Some(e.into());
                continue;
            }
        };
        let result = path
            .parent()
            .map(|p| std::fs::create_dir_all(p).map_err(CaptureError::io("cannot create", p)))
            .transpose()
            .and_then(|_| crate::npy::write_npy(&path, &tensor));
        match result {
            Ok(()) => {
                bytes += std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                entries.push((
                    item.order,
                    ManifestTensor {
                        path: rel,
                        stage: item.stage.name().to_string(),
                        layer: item.layer,
                        step: item.step,
                        shape: tensor.shape.clone(),
                        dtype: tensor.dtype_name().to_string(),
                    },
                ));
            }
            Err(e) => first_error = Some(e),
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok((entries, bytes)),
    }
}
