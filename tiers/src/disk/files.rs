//! The disk tier's data files: how the capacity is split into preallocated
//! files of at most `file_size` bytes (`data-NNNN.kvf` in the tier's
//! directory), opening them with O_DIRECT (buffered I/O, with a warning, where
//! the filesystem refuses it, as tmpfs does), and preallocating them with
//! `fallocate` so writes never extend a file or hit ENOSPC later.

use super::buf::ALIGN;
use crate::{TierError, TierResult};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};

/// The open, preallocated data files.
#[derive(Debug)]
pub(super) struct DataFiles {
    files: Vec<File>,
    sizes: Vec<u64>,
    direct: bool,
}

/// Sizes of the files that hold `capacity` bytes in files of at most
/// `file_size` bytes, each a whole number of pages.
pub(super) fn plan(capacity: u64, file_size: u64) -> Vec<u64> {
    let align = ALIGN as u64;
    let file_size = file_size / align * align;
    let mut left = capacity / align * align;
    let mut sizes = Vec::new();
    while left > 0 && file_size > 0 {
        let s = left.min(file_size);
        sizes.push(s);
        left -= s;
    }
    sizes
}

/// Path of data file `i`.
pub(super) fn data_path(dir: &Path, i: usize) -> PathBuf {
    dir.join(format!("data-{i:04}.kvf"))
}

fn open_file(path: &Path, direct: bool) -> io::Result<File> {
    let mut o = OpenOptions::new();
    o.read(true).write(true).create(true).truncate(false).mode(0o644);
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    o.open(path)
}

fn preallocate(file: &File, path: &Path, size: u64) -> TierResult<()> {
    let len = file
        .metadata()
        .map_err(|e| TierError::io(format!("stat {}", path.display()), e))?
        .len();
    // Always ask: a file extended with set_len earlier may still be sparse.
    // SAFETY: plain syscall on an fd we own.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, size as libc::off_t) };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => {
            tracing::warn!(path = %path.display(), "fallocate unsupported here; data file is sparse");
            if len < size {
                file.set_len(size)
                    .map_err(|e| TierError::io(format!("extending {}", path.display()), e))?;
            }
            Ok(())
        }
        _ => Err(TierError::io(
            format!("preallocating {} bytes for {}", size, path.display()),
            err,
        )),
    }
}

impl DataFiles {
    /// Opens (creating and preallocating as needed) the files that hold
    /// `capacity` bytes in `dir`. Files of an earlier, larger configuration
    /// are left alone and never truncated. With `try_direct` the files are
    /// opened with O_DIRECT where the filesystem allows it.
    pub(super) fn open(dir: &Path, capacity: u64, file_size: u64, try_direct: bool) -> TierResult<Self> {
        let sizes = plan(capacity, file_size);
        let mut direct = try_direct;
        let mut files = Vec::with_capacity(sizes.len());
        for (i, &size) in sizes.iter().enumerate() {
            let path = data_path(dir, i);
            let file = match open_file(&path, direct) {
                Ok(f) => f,
                Err(e) if direct && e.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::warn!(
                        dir = %dir.display(),
                        "O_DIRECT refused by this filesystem (EINVAL); disk tier uses buffered I/O"
                    );
                    direct = false;
                    // Reopen what is already open without O_DIRECT too, so
                    // all files behave the same.
                    files.clear();
                    for j in 0..i {
                        let p = data_path(dir, j);
                        files.push(
                            open_file(&p, false).map_err(|e| TierError::io(format!("opening {}", p.display()), e))?,
                        );
                    }
                    open_file(&path, false).map_err(|e| TierError::io(format!("opening {}", path.display()), e))?
                }
                Err(e) => return Err(TierError::io(format!("opening {}", path.display()), e)),
            };
            preallocate(&file, &path, size)?;
            file.sync_all()
                .map_err(|e| TierError::io(format!("syncing {}", path.display()), e))?;
            files.push(file);
        }
        // Make the files' creation durable before any index entry names them.
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| TierError::io(format!("syncing directory {}", dir.display()), e))?;
        Ok(Self { files, sizes, direct })
    }

    /// Number of files.
    pub(super) fn count(&self) -> usize {
        self.files.len()
    }

    /// Usable size of each file.
    pub(super) fn sizes(&self) -> &[u64] {
        &self.sizes
    }

    /// Raw descriptor of file `i`.
    pub(super) fn fd(&self, i: usize) -> RawFd {
        self.files[i].as_raw_fd()
    }

    /// Whether the files are open with O_DIRECT.
    pub(super) fn direct(&self) -> bool {
        self.direct
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_splits_capacity() {
        assert_eq!(plan(10 << 20, 4 << 20), vec![4 << 20, 4 << 20, 2 << 20]);
        assert_eq!(plan((1 << 20) + 100, 8 << 30), vec![1 << 20]);
        assert_eq!(plan(8 << 20, (4 << 20) + 1), vec![4 << 20, 4 << 20]);
    }

    #[test]
    fn files_are_preallocated() {
        let dir = tempfile::tempdir().unwrap();
        let f = DataFiles::open(dir.path(), 3 << 20, 2 << 20, true).unwrap();
        assert_eq!(f.count(), 2);
        assert_eq!(std::fs::metadata(data_path(dir.path(), 0)).unwrap().len(), 2 << 20);
        assert_eq!(std::fs::metadata(data_path(dir.path(), 1)).unwrap().len(), 1 << 20);
    }
}
