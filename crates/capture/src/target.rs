//! [`CaptureTarget`]: the life of a capture folder. Tensors are written
//! into a temporary sibling of out_dir; on success it takes out_dir's place
//! in one atomic swap, so some complete capture is always at the final
//! path; on failure, on a panic or on SIGINT/SIGTERM it is removed. An
//! existing out_dir is replaced only when it is exactly a capture moetrace
//! wrote, and temporary folders of processes that died are cleaned up by
//! the next run that writes beside them.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use compare::manifest::Manifest;

use crate::error::{CaptureError, Result};

/// Temporary folders (and files) this process is writing, for
/// [`remove_temporary_folders`].
static IN_PROGRESS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Registers a temporary path so that an interrupt removes it.
pub fn register_temporary(path: &Path) {
    IN_PROGRESS.lock().unwrap_or_else(|e| e.into_inner()).push(path.to_path_buf());
}

/// Forgets a temporary path (committed or removed).
pub fn unregister_temporary(path: &Path) {
    IN_PROGRESS.lock().unwrap_or_else(|e| e.into_inner()).retain(|p| p != path);
}

/// Removes every registered temporary folder or file: what a SIGINT or
/// SIGTERM handler calls before the process exits. Writer threads may
/// still be adding files, so each folder is first renamed (atomically) to
/// a name no writer knows: they create files and folders by the old path,
/// which no longer resolves, so nothing new appears in the renamed tree
/// and its removal cannot race with them. The new name keeps the
/// temporary mark and this process's id, so should the process die
/// half-way, the next run beside it cleans it up.
pub fn remove_temporary_folders() {
    let paths = std::mem::take(&mut *IN_PROGRESS.lock().unwrap_or_else(|e| e.into_inner()));
    for path in paths {
        discard(&path);
    }
}

/// Removes a temporary folder (or file) that writer threads may still be
/// adding to: renamed away first, then removed. The one cleanup routine of
/// every failure path (an error, a panic's unwinding, a signal): removing
/// it in place raced with the writers, and a `step-0/` created between the
/// listing and the removal left the folder behind.
fn discard(path: &Path) {
    let mut doomed = path.as_os_str().to_os_string();
    doomed.push("-removing");
    let doomed = PathBuf::from(doomed);
    let path = if std::fs::rename(path, &doomed).is_ok() { doomed } else { path.to_path_buf() };
    for _ in 0..20 {
        let gone = match std::fs::symlink_metadata(&path) {
            Err(_) => true,
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(&path).is_ok(),
            Ok(_) => std::fs::remove_file(&path).is_ok(),
        };
        if gone {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// A capture folder being written: a temporary sibling of `out_dir`,
/// removed on drop unless [`CaptureTarget::commit`] swapped it into place.
#[derive(Debug)]
pub struct CaptureTarget {
    out_dir: PathBuf,
    tmp_dir: PathBuf,
    /// Folders above out_dir that `prepare` created, innermost first; a
    /// failed run removes them again when they are empty.
    created_parents: Vec<PathBuf>,
    committed: bool,
}

/// The marker in the names of temporary and moved-aside folders.
const TMP_MARK: &str = "moetrace-tmp-";
const OLD_MARK: &str = "moetrace-old-";

impl CaptureTarget {
    /// Checks that out_dir may be (re)placed, removes stale temporary
    /// folders of dead processes beside it, and creates the temporary
    /// folder. An existing out_dir is replaced only if it is empty or
    /// exactly a moetrace capture; a symbolic link is refused.
    pub fn prepare(out_dir: &Path) -> Result<Self> {
        check_replaceable(out_dir)?;
        let name = out_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "capture".into());
        let parent = out_dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let created_parents: Vec<PathBuf> = parent
            .ancestors()
            .take_while(|p| !p.as_os_str().is_empty() && !p.exists())
            .map(Path::to_path_buf)
            .collect();
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let unique = NEXT.fetch_add(1, Ordering::Relaxed);
        let tmp_dir = parent.join(format!(".{name}.{TMP_MARK}{}-{unique}", std::process::id()));
        // From here on, dropping `target` on an error undoes what was made.
        let target = Self { out_dir: out_dir.to_path_buf(), tmp_dir, created_parents, committed: false };
        std::fs::create_dir_all(parent).map_err(CaptureError::io("cannot create the parent of out_dir", parent))?;
        remove_stale(parent, &name);
        let tmp_dir = &target.tmp_dir;
        if tmp_dir.exists() {
            std::fs::remove_dir_all(tmp_dir).map_err(CaptureError::io("cannot remove stale", tmp_dir))?;
        }
        register_temporary(tmp_dir);
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

    /// Writes the manifest and swaps the folder into place, replacing a
    /// previous capture at out_dir (checked again: the user may have put a
    /// file in it while the run ran).
    pub fn commit(mut self, manifest: &Manifest) -> Result<()> {
        manifest.write(&self.tmp_dir)?;
        let had_old = std::fs::symlink_metadata(&self.out_dir).is_ok();
        if !had_old {
            std::fs::rename(&self.tmp_dir, &self.out_dir)
                .map_err(CaptureError::io("cannot rename the capture into place at", &self.out_dir))?;
            self.committed = true;
            unregister_temporary(&self.tmp_dir);
            return Ok(());
        }
        check_replaceable(&self.out_dir)?;
        match exchange(&self.tmp_dir, &self.out_dir) {
            // The temporary path now holds the previous capture.
            Ok(()) => {
                self.committed = true;
                let old = self.tmp_dir.clone();
                let removed = std::fs::remove_dir_all(&old);
                unregister_temporary(&old);
                removed.map_err(CaptureError::io("cannot remove the previous capture", &old))
            }
            Err(e) if e.kind() == std::io::ErrorKind::Unsupported => self.commit_in_two_renames(),
            Err(source) => Err(CaptureError::Io {
                action: "cannot swap the capture into place at",
                path: self.out_dir.clone(),
                source,
            }),
        }
    }

    /// Where the OS has no atomic exchange: the previous capture is moved
    /// aside, the new one renamed into place, the old one removed. A kill
    /// between the renames leaves the old capture in a hidden folder that
    /// the next run beside it removes.
    fn commit_in_two_renames(mut self) -> Result<()> {
        let name = self.out_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let old = self.out_dir.with_file_name(format!(".{name}.{OLD_MARK}{}", std::process::id()));
        std::fs::rename(&self.out_dir, &old)
            .map_err(CaptureError::io("cannot move aside the previous capture", &self.out_dir))?;
        if let Err(source) = std::fs::rename(&self.tmp_dir, &self.out_dir) {
            let _ = std::fs::rename(&old, &self.out_dir);
            return Err(CaptureError::Io {
                action: "cannot rename the capture into place at",
                path: self.out_dir.clone(),
                source,
            });
        }
        self.committed = true;
        unregister_temporary(&self.tmp_dir);
        std::fs::remove_dir_all(&old).map_err(CaptureError::io("cannot remove the previous capture", &old))
    }
}

impl Drop for CaptureTarget {
    fn drop(&mut self) {
        if !self.committed {
            discard(&self.tmp_dir);
            unregister_temporary(&self.tmp_dir);
            for dir in &self.created_parents {
                // Only empty folders go (remove_dir refuses others).
                let _ = std::fs::remove_dir(dir);
            }
        }
    }
}

/// Swaps two paths atomically (Linux `renameat2(RENAME_EXCHANGE)`); an
/// `Unsupported` error where the OS or filesystem cannot.
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        CString::new(p.as_os_str().as_bytes()).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
    };
    let (a, b) = (c(a)?, c(b)?);
    // SAFETY: both are valid NUL-terminated paths that outlive the call;
    // AT_FDCWD resolves them like rename(2) does.
    let rc = unsafe { libc::renameat2(libc::AT_FDCWD, a.as_ptr(), libc::AT_FDCWD, b.as_ptr(), libc::RENAME_EXCHANGE) };
    if rc == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::ENOSYS) | Some(libc::EINVAL) => Err(std::io::Error::new(std::io::ErrorKind::Unsupported, err)),
        _ => Err(err),
    }
}

#[cfg(not(target_os = "linux"))]
fn exchange(_: &Path, _: &Path) -> std::io::Result<()> {
    Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
}

/// Refuses an out_dir that must not be replaced: a symbolic link
/// (dangling or not), something other than a folder, or a folder that is
/// neither empty nor exactly a capture moetrace wrote.
fn check_replaceable(dir: &Path) -> Result<()> {
    let refuse = |why: String| Err(CaptureError::OutDirOccupied { path: dir.to_path_buf(), why });
    let Ok(meta) = std::fs::symlink_metadata(dir) else { return Ok(()) };
    if meta.file_type().is_symlink() {
        let to = std::fs::read_link(dir).map(|t| t.display().to_string()).unwrap_or_default();
        return if dir.exists() {
            refuse(format!("it is a symbolic link (to {to}); give the folder itself"))
        } else {
            refuse(format!("it is a dangling symbolic link (to {to}, which does not exist); give a real folder"))
        };
    }
    if !meta.is_dir() {
        return refuse("it is not a folder".into());
    }
    let files = files_under(dir).map_err(CaptureError::io("cannot list", dir))?;
    if files.is_empty() {
        return Ok(());
    }
    let manifest = match Manifest::read(dir) {
        Ok(m) => m,
        Err(_) => return refuse("it is not a moetrace capture: it holds files and no manifest.json".into()),
    };
    if !manifest.producer.as_deref().is_some_and(|p| p.starts_with("moetrace")) {
        return refuse(format!(
            "its manifest was written by {}, not moetrace",
            manifest.producer.as_deref().unwrap_or("an unnamed producer")
        ));
    }
    let expected: BTreeSet<String> =
        manifest.tensors.iter().map(|t| t.path.clone()).chain(["manifest.json".to_string()]).collect();
    let extra: Vec<&String> = files.difference(&expected).take(3).collect();
    if !extra.is_empty() {
        let names: Vec<&str> = extra.iter().map(|s| s.as_str()).collect();
        return refuse(format!("it holds files its manifest does not list: {}", names.join(", ")));
    }
    Ok(())
}

/// Every non-folder entry under `dir`, as `/`-separated relative paths.
fn files_under(dir: &Path) -> std::io::Result<BTreeSet<String>> {
    let mut out = BTreeSet::new();
    let mut stack = vec![(dir.to_path_buf(), String::new())];
    while let Some((folder, prefix)) = stack.pop() {
        for entry in std::fs::read_dir(&folder)? {
            let entry = entry?;
            let name = format!("{prefix}{}", entry.file_name().to_string_lossy());
            if entry.file_type()?.is_dir() {
                stack.push((entry.path(), format!("{name}/")));
            } else {
                out.insert(name);
            }
        }
    }
    Ok(out)
}

/// Removes `.<name>.moetrace-tmp-<pid>-<n>` and `.<name>.moetrace-old-<pid>`
/// folders in `parent` whose process is no longer running (best effort:
/// where liveness cannot be told, nothing is removed).
fn remove_stale(parent: &Path, name: &str) {
    let Ok(entries) = std::fs::read_dir(parent) else { return };
    let prefix = format!(".{name}.");
    for entry in entries.flatten() {
        let file = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = file.strip_prefix(&prefix) else { continue };
        let pid = rest
            .strip_prefix(TMP_MARK)
            .and_then(|r| r.split('-').next())
            .or_else(|| rest.strip_prefix(OLD_MARK))
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid
            && pid != std::process::id()
            && process_is_gone(pid)
        {
            tracing::info!(folder = %entry.path().display(), pid, "removing a stale temporary capture folder");
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Whether no process `pid` runs (Linux: no `/proc/<pid>`).
fn process_is_gone(pid: u32) -> bool {
    cfg!(target_os = "linux") && Path::new("/proc/self").exists() && !Path::new(&format!("/proc/{pid}")).exists()
}
