//! [`CaptureWriter`]: writer threads fed over one crossbeam channel that
//! write the .npy files into the capture's temporary folder (see
//! [`crate::target`]). The forward pass waits on the disk only when the
//! tensors queued or being written hold [`CaptureWriter::BUFFER_BYTES`]:
//! the queue is bounded by bytes, not by count, so a prompt step's large
//! tensors (hundreds of MB for one layer's every stage) do not hold up the
//! small ones of the decode steps behind them.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender, unbounded};
use pipeline::PendingTensor;
use stage_types::SaveTensorStage;

use crate::error::{CaptureError, Result};
use compare::manifest::{ManifestTensor, tensor_path};

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
    budget: ByteBudget,
    handles: Vec<JoinHandle<Result<Written>>>,
}

/// Bytes of tensors queued for or being written by the writers.
#[derive(Clone, Default)]
struct ByteBudget(Arc<(Mutex<usize>, Condvar)>);

impl ByteBudget {
    /// Counts `bytes` in, first waiting while that would pass `limit`
    /// (never when nothing is counted: a tensor larger than the limit
    /// still goes, alone).
    fn acquire(&self, bytes: usize, limit: usize) {
        let (used, freed) = &*self.0;
        let mut used = used.lock().unwrap_or_else(|e| e.into_inner());
        while *used > 0 && *used + bytes > limit {
            used = freed.wait(used).unwrap_or_else(|e| e.into_inner());
        }
        *used += bytes;
    }

    fn release(&self, bytes: usize) {
        let (used, freed) = &*self.0;
        let mut used = used.lock().unwrap_or_else(|e| e.into_inner());
        *used = used.saturating_sub(bytes);
        freed.notify_all();
    }
}

/// Gives a tensor's bytes back to the budget when its writer is done
/// with it, however that ends (written, failed, skipped, panicked).
struct Release(ByteBudget, usize);

impl Drop for Release {
    fn drop(&mut self) {
        self.0.release(self.1);
    }
}

/// The capture systems' end of the writers' channel.
#[derive(Clone)]
pub struct CaptureSender {
    tx: Sender<CapturedTensor>,
    budget: ByteBudget,
}

impl CaptureSender {
    /// Queues `item` for the writers, first waiting while the tensors
    /// already queued or being written hold [`CaptureWriter::BUFFER_BYTES`].
    pub fn send(&self, item: CapturedTensor) {
        self.budget.acquire(item.tensor.byte_len(), CaptureWriter::BUFFER_BYTES);
        // The writers drain until every sender is gone, so this only fails
        // if they all panicked; their join reports that.
        let _ = self.tx.send(item);
    }
}

/// One writer thread's entries, with their capture order.
type Written = (Vec<(usize, ManifestTensor)>, u64);

impl CaptureWriter {
    /// Bytes of tensors that may be queued or being written before a
    /// capture system waits. (A queue of 64 tensors held decode steps
    /// behind the prompt step's files: one layer's every stage captured ran
    /// decode at 84-98 tokens/s against 120-133 with a deep queue, H100.)
    pub const BUFFER_BYTES: usize = 1 << 30;

    /// Writer threads: files are written in parallel (one thread leaves the
    /// forward pass waiting on the disk when a step captures hundreds of MB).
    pub const THREADS: usize = 4;

    /// Starts writers that write under `dir`.
    pub fn spawn(dir: PathBuf) -> Result<Self> {
        let (tx, rx) = unbounded();
        let budget = ByteBudget::default();
        let mut writer = Self { tx: Some(tx), budget: budget.clone(), handles: Vec::new() };
        for i in 0..Self::THREADS {
            let (dir, rx, budget) = (dir.clone(), rx.clone(), budget.clone());
            let handle = std::thread::Builder::new()
                .name(format!("moetrace-capture-writer-{i}"))
                .spawn(move || write_all(&dir, rx, &budget))
                .map_err(CaptureError::io("cannot start a writer thread for", "capture"))?;
            writer.handles.push(handle);
        }
        Ok(writer)
    }

    /// A sender for capture systems.
    pub fn sender(&self) -> CaptureSender {
        CaptureSender { tx: self.tx.clone().expect("sender taken only by finish"), budget: self.budget.clone() }
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

/// Creates the folders of `rel`'s parent below `dir`, one level at a time
/// and never `dir` itself: once an interrupt has removed the temporary
/// folder, a writer thread cannot bring it back.
fn create_below(dir: &Path, rel: &str) -> Result<()> {
    let mut folder = dir.to_path_buf();
    let parts: Vec<&str> = rel.split('/').collect();
    for part in &parts[..parts.len().saturating_sub(1)] {
        folder.push(part);
        match std::fs::create_dir(&folder) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                return Err(CaptureError::Io { action: "cannot create", path: folder, source: e });
            }
            _ => {}
        }
    }
    Ok(())
}

/// A writer thread: writes each tensor it receives; after the first error
/// it keeps draining the channel (so senders never block) and reports that
/// error.
fn write_all(dir: &Path, rx: Receiver<CapturedTensor>, budget: &ByteBudget) -> Result<Written> {
    let (mut entries, mut bytes) = (Vec::new(), 0u64);
    let mut first_error = None;
    for item in rx {
        let _release = Release(budget.clone(), item.tensor.byte_len());
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
        let result = create_below(dir, &rel).and_then(|()| crate::npy::write_npy(&path, &tensor));
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
