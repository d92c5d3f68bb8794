//! Open file description (OFD) record locks and small file helpers.
//!
//! OFD locks (`F_OFD_SETLK`) belong to one open file description, so two handles
//! of one process exclude each other (unlike classic POSIX locks), they are
//! released when the last descriptor of the description is closed (including when
//! the process dies), and on Linux they conflict with the process-associated POSIX
//! locks Python's `fcntl.lockf` takes. We never use the blocking `F_OFD_SETLKW`:
//! waits are try-lock loops that can be cancelled.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, fcntl};
use tokio::time::Instant;
use tooz_core::util::Backoff;
use tooz_core::{Result, ToozError};

use crate::layout::Layout;

/// Kind of record lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Shared (reader) lock.
    Read,
    /// Exclusive (writer) lock.
    Write,
}

fn whole_file(l_type: libc::c_int) -> libc::flock {
    libc::flock {
        // The constants fit in a c_short on every Linux target.
        l_type: l_type as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    }
}

/// Tries once to lock the whole file. `Ok(false)` when another open file
/// description (of any process) holds a conflicting lock.
pub(crate) fn try_lock(file: &File, kind: Kind) -> io::Result<bool> {
    let l_type = match kind {
        Kind::Read => libc::F_RDLCK,
        Kind::Write => libc::F_WRLCK,
    };
    let fl = whole_file(l_type);
    match fcntl(file, FcntlArg::F_OFD_SETLK(&fl)) {
        Ok(_) => Ok(true),
        Err(Errno::EAGAIN | Errno::EACCES) => Ok(false),
        Err(e) => Err(io::Error::from(e)),
    }
}

/// Releases the lock this description holds on the file (closing it does too).
pub(crate) fn unlock(file: &File) -> io::Result<()> {
    let fl = whole_file(libc::F_UNLCK);
    fcntl(file, FcntlArg::F_OFD_SETLK(&fl))
        .map(drop)
        .map_err(io::Error::from)
}

/// Whether another open file description holds a write lock on the file.
/// Takes nothing (`F_OFD_GETLK`), so probing never disturbs the holder.
pub(crate) fn is_write_locked(file: &File) -> io::Result<bool> {
    let mut fl = whole_file(libc::F_RDLCK);
    fcntl(file, FcntlArg::F_OFD_GETLK(&mut fl)).map_err(io::Error::from)?;
    Ok(i32::from(fl.l_type) != libc::F_UNLCK)
}

/// Whether another open file description (or process) holds any lock on the
/// file. Needs a descriptor open for writing.
pub(crate) fn is_locked(file: &File) -> io::Result<bool> {
    let mut fl = whole_file(libc::F_WRLCK);
    fcntl(file, FcntlArg::F_OFD_GETLK(&mut fl)).map_err(io::Error::from)?;
    Ok(i32::from(fl.l_type) != libc::F_UNLCK)
}

/// Whether the file at `path` is write-locked by someone; a missing file is not.
pub(crate) fn path_is_write_locked(path: &Path) -> io::Result<bool> {
    match File::open(path) {
        Ok(f) => is_write_locked(&f),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Opens (creating if needed) a file to lock, read-write.
pub(crate) fn open_lock_file(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
}

/// Whether `file` is still the file at `path` (it was not removed or replaced).
pub(crate) fn same_file(file: &File, path: &Path) -> bool {
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// An exclusive or shared hold on a lock file, released on drop.
#[derive(Debug)]
pub(crate) struct Held {
    #[cfg_attr(
        not(test),
        expect(dead_code, reason = "kept open for its lock, released on drop")
    )]
    file: File,
}

impl Held {
    /// The locked file.
    #[cfg(test)]
    pub(crate) fn file(&self) -> &File {
        &self.file
    }
}

/// Waits (asynchronously) for a lock on `path`, with a short adaptive sleep
/// between attempts. Gives up with `OperationTimedOut` after `max_wait`.
///
/// Cancel-safe: the lock is taken in one synchronous step and owned by the
/// returned value.
pub(crate) async fn lock_path_async(path: &Path, kind: Kind, max_wait: Duration) -> Result<Held> {
    let file = open_lock_file(path).map_err(|e| io_err("cannot open lock file", path, e))?;
    let deadline = Instant::now() + max_wait;
    let mut backoff = Backoff::new(Duration::from_millis(1), Duration::from_millis(50));
    loop {
        if try_lock(&file, kind).map_err(|e| io_err("cannot lock", path, e))? {
            return Ok(Held { file });
        }
        if Instant::now() >= deadline {
            return Err(ToozError::OperationTimedOut(format!(
                "waited {max_wait:?} for the lock on {}",
                path.display()
            )));
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

/// Like [`lock_path_async`] for blocking threads: sleeps the thread between
/// attempts. Only for locks that are held for a few microseconds (counters).
pub(crate) fn lock_path_blocking(path: &Path, kind: Kind, max_wait: Duration) -> Result<Held> {
    let file = open_lock_file(path).map_err(|e| io_err("cannot open lock file", path, e))?;
    let deadline = std::time::Instant::now() + max_wait;
    let mut backoff = Backoff::new(Duration::from_micros(100), Duration::from_millis(10));
    loop {
        if try_lock(&file, kind).map_err(|e| io_err("cannot lock", path, e))? {
            return Ok(Held { file });
        }
        if std::time::Instant::now() >= deadline {
            return Err(ToozError::OperationTimedOut(format!(
                "waited {max_wait:?} for the lock on {}",
                path.display()
            )));
        }
        std::thread::sleep(backoff.next_delay());
    }
}

/// Writes `data` to `path` atomically: a scratch file in `tmp/`, then a rename
/// (readers see the old or the new content, never a mix).
pub(crate) fn write_atomic(layout: &Layout, path: &Path, data: &[u8]) -> Result<()> {
    let tmp = layout.temp_file();
    let res = (|| {
        let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        f.write_all(data)?;
        drop(f);
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_err("cannot write", path, e));
    }
    Ok(())
}

/// As [`write_atomic`], and durable once it returns: the scratch file is
/// `fdatasync`ed before the rename and the directory after it, so after a crash
/// the path holds the new content (never an empty or missing file where the old
/// content was). For what must not go back: the leadership token.
pub(crate) fn write_atomic_synced(layout: &Layout, path: &Path, data: &[u8]) -> Result<()> {
    let tmp = layout.temp_file();
    let res = (|| {
        let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        f.write_all(data)?;
        f.sync_data()?;
        drop(f);
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_err("cannot write", path, e));
    }
    if let Some(dir) = path.parent() {
        sync_dir(dir).map_err(|e| io_err("cannot sync", dir, e))?;
    }
    Ok(())
}

/// `fsync`s a directory, making the names created or renamed in it durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Reads a whole file; `Ok(None)` when it does not exist.
pub(crate) fn read_opt(path: &Path) -> Result<Option<Vec<u8>>> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if is_missing(&e) => Ok(None),
        Err(e) => Err(io_err("cannot read", path, e)),
    }
}

/// `NotFound`, or a path component that is not a directory (a lock file where
/// a group directory would be).
pub(crate) fn is_missing(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENOTDIR)
}

/// A backend error naming the path.
pub(crate) fn io_err(what: &str, path: &Path, e: io::Error) -> ToozError {
    ToozError::backend("file", format!("{what} {}: {e}", path.display()), e)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_path(tag: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("tooz-file-ofd-{tag}-{}", uuid::Uuid::new_v4()))
    }

    #[test]
    fn ofd_locks_are_per_description() {
        let p = temp_path("desc");
        let a = open_lock_file(&p).unwrap();
        let b = open_lock_file(&p).unwrap();
        assert!(!is_write_locked(&b).unwrap());
        assert!(try_lock(&a, Kind::Write).unwrap());
        // Same process, other description: excluded.
        assert!(!try_lock(&b, Kind::Write).unwrap());
        assert!(!try_lock(&b, Kind::Read).unwrap());
        assert!(is_write_locked(&b).unwrap());
        assert!(path_is_write_locked(&p).unwrap());
        // The holder itself sees no conflict.
        assert!(!is_write_locked(&a).unwrap());
        drop(a); // closing releases, like a crash
        assert!(!path_is_write_locked(&p).unwrap());
        assert!(try_lock(&b, Kind::Read).unwrap());
        let c = open_lock_file(&p).unwrap();
        assert!(try_lock(&c, Kind::Read).unwrap(), "shared holders coexist");
        assert!(!try_lock(&open_lock_file(&p).unwrap(), Kind::Write).unwrap());
        // A read lock is not reported by the write-lock probe.
        assert!(!path_is_write_locked(&p).unwrap());
        unlock(&b).unwrap();
        unlock(&c).unwrap();
        assert!(try_lock(&open_lock_file(&p).unwrap(), Kind::Write).unwrap());
        assert!(!path_is_write_locked(&temp_path("missing")).unwrap());
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn same_file_detects_replacement() {
        let p = temp_path("same");
        let f = open_lock_file(&p).unwrap();
        assert!(same_file(&f, &p));
        std::fs::remove_file(&p).unwrap();
        assert!(!same_file(&f, &p));
        let _g = open_lock_file(&p).unwrap();
        assert!(!same_file(&f, &p));
        std::fs::remove_file(&p).unwrap();
    }
}
