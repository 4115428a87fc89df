//! Reading files a user hands to moetrace (configs, config.json,
//! manifests, tensors) without trusting them: only regular files are
//! opened (a FIFO would block forever, a device could be endless, a folder
//! is not a file), and a file larger than the caller's limit is refused
//! before a byte of it is read.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

/// The megabyte, for limits.
pub const MIB: u64 = 1 << 20;

/// Opens `path` for reading if it is a regular file (symbolic links are
/// followed); returns it with its length.
pub fn open_regular(path: &Path) -> io::Result<(File, u64)> {
    let meta = std::fs::metadata(path)?;
    if !meta.is_file() {
        let kind = if meta.is_dir() { "a folder" } else { "a FIFO, socket or device" };
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("not a regular file (it is {kind})")));
    }
    // The type is checked again on the open file: the path may have been
    // swapped for a FIFO in between (opening a FIFO for reading blocks
    // until a writer comes, so where O_NONBLOCK is known it is opened
    // non-blocking).
    let file = open_nonblocking(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"));
    }
    Ok((file, meta.len()))
}

#[cfg(unix)]
fn open_nonblocking(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    // O_NONBLOCK as Linux defines it on x86-64 and aarch64 (this crate has
    // no libc to ask); elsewhere no flag, and the check before opening is
    // what stands.
    #[cfg(all(target_os = "linux", any(target_arch = "x86_64", target_arch = "aarch64")))]
    const O_NONBLOCK: i32 = 0o4000;
    #[cfg(not(all(target_os = "linux", any(target_arch = "x86_64", target_arch = "aarch64"))))]
    const O_NONBLOCK: i32 = 0;
    std::fs::OpenOptions::new().read(true).custom_flags(O_NONBLOCK).open(path)
}

#[cfg(not(unix))]
fn open_nonblocking(path: &Path) -> io::Result<File> {
    File::open(path)
}

/// Reads a whole regular file of at most `limit` bytes.
pub fn read_regular(path: &Path, limit: u64) -> io::Result<Vec<u8>> {
    let (file, len) = open_regular(path)?;
    if len > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the file has {len} bytes, more than the {limit} this kind of file may have"),
        ));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    // `take`: a file that grows while read still stops at the limit.
    file.take(limit + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("the file grew past {limit} bytes while read")));
    }
    Ok(bytes)
}

/// Reads a whole regular UTF-8 text file of at most `limit` bytes; a
/// leading byte order mark is dropped.
pub fn read_regular_text(path: &Path, limit: u64) -> io::Result<String> {
    let bytes = read_regular(path, limit)?;
    let mut text = String::from_utf8(bytes)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("not UTF-8 text ({e})")))?;
    if text.starts_with('\u{feff}') {
        text.drain(..'\u{feff}'.len_utf8());
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh folder under the system's temporary folder, removed (with
    /// what the test wrote) when dropped.
    struct TempDir(std::path::PathBuf);

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    impl std::ops::Deref for TempDir {
        type Target = std::path::Path;
        fn deref(&self) -> &std::path::Path {
            &self.0
        }
    }

    fn temp(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("stage-types-input-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    #[test]
    fn folders_large_files_and_boms_are_handled() {
        let dir = temp("kinds");
        assert!(read_regular(&dir, 10).unwrap_err().to_string().contains("folder"));
        let file = dir.join("f");
        std::fs::write(&file, "\u{feff}hello").unwrap();
        assert_eq!(read_regular_text(&file, 100).unwrap(), "hello");
        assert!(read_regular(&file, 3).unwrap_err().to_string().contains("more than"));
        std::fs::write(&file, [0xff, 0xfe]).unwrap();
        assert!(read_regular_text(&file, 100).unwrap_err().to_string().contains("UTF-8"));
        assert!(read_regular(&dir.join("missing"), 10).is_err());
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let dir = temp("fifo");
        let fifo = dir.join("p");
        assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
        let err = read_regular(&fifo, 10).unwrap_err().to_string();
        assert!(err.contains("not a regular file"), "{err}");
    }
}
