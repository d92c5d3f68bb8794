//! Lock files: `DIRECTORY/<name>`, OFD-locked, with fencing counters.
//!
//! The driver implements one attempt ([`DriverLock::try_acquire`]): a non-blocking
//! OFD try-lock (`F_OFD_SETLK`, never `SETLKW`), and on a grant the fencing
//! counter's advance. The core waits between attempts, woken by
//! [`DriverLock::wakeups`]: inotify on the lock file, read through tokio's
//! [`AsyncFd`].

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, fcntl};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tooz_core::{Attempt, DriverLock, FencingToken, LockName, Mode, Result, ToozError, WakeStream};

use crate::layout::{self, Layout};
use crate::ofd::{self, Kind, io_err};

/// How long a fencing counter update may wait for the counter's own lock (held
/// for microseconds by whoever updates it).
const COUNTER_WAIT: Duration = Duration::from_secs(10);

/// How many times one attempt reopens a lock file replaced under it.
const REOPENS: usize = 4;

#[derive(Debug)]
struct Held {
    file: File,
    mode: Mode,
}

/// A file's identity: device and inode.
type FileId = (u64, u64);

/// What a handle shares with the wake-up stream of its current wait.
#[derive(Debug, Default)]
struct Waiting {
    /// The lock file the stream watches, while it does.
    watched: Option<FileId>,
    /// The file of the last failed attempt, kept open while subscribed: closing a
    /// descriptor opened for writing is an inotify event, which would wake every
    /// other waiter for nothing (and their closes would wake us).
    idle: Option<File>,
}

/// One lock handle. Each handle acquires through its own open file description,
/// so two handles exclude each other even inside one process.
#[derive(Debug)]
pub(crate) struct FileLock {
    name: LockName,
    path: PathBuf,
    fence: PathBuf,
    held: Mutex<Option<Held>>,
    waiting: Arc<Mutex<Waiting>>,
}

fn lock_of<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl FileLock {
    pub(crate) fn new(layout: &Layout, name: &LockName) -> Result<Self> {
        let (path, rel) = layout.lock_path(name)?;
        Ok(FileLock {
            name: name.clone(),
            fence: layout.lock_fence(&rel),
            path,
            held: Mutex::new(None),
            waiting: Arc::default(),
        })
    }

    fn held(&self) -> MutexGuard<'_, Option<Held>> {
        lock_of(&self.held)
    }
}

/// Opens the lock file, creating it (and its parent directories when missing).
fn open(path: &Path) -> Result<File> {
    match ofd::open_lock_file(path) {
        Err(e) if ofd::is_missing(&e) => {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| io_err("cannot create lock directory", parent, e))?;
            }
            ofd::open_lock_file(path)
        }
        res => res,
    }
    .map_err(|e| io_err("cannot open lock file", path, e))
}

/// The identity of `file` if it is still the file at `path` (not removed or replaced).
fn id_at(file: &File, path: &Path) -> Option<FileId> {
    let (a, b) = (file.metadata().ok()?, std::fs::metadata(path).ok()?);
    ((a.dev(), a.ino()) == (b.dev(), b.ino())).then_some((a.dev(), a.ino()))
}

/// Whether the lock that keeps `kind` out is an open file description lock (a
/// Rust holder, whose release closes its descriptor: an inotify event on the
/// file) rather than a process-associated one (Python's `lockf`, which can be
/// released without a close of that file). `F_OFD_GETLK` reports `l_pid == -1`
/// for the former; `false` when nothing conflicts any more.
fn held_by_ofd(file: &File, kind: Kind) -> io::Result<bool> {
    let l_type = match kind {
        Kind::Read => libc::F_RDLCK,
        Kind::Write => libc::F_WRLCK,
    };
    let mut fl = libc::flock {
        // The constants fit in a c_short on every Linux target.
        l_type: l_type as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    };
    fcntl(file, FcntlArg::F_OFD_GETLK(&mut fl)).map_err(io::Error::from)?;
    Ok(i32::from(fl.l_type) != libc::F_UNLCK && fl.l_pid == -1)
}

/// Reads the start of `f` (a counter is at most 21 bytes; `buf` is larger, so a
/// full buffer means a damaged file). Returns how many bytes were read.
fn read_prefix(f: &File, buf: &mut [u8]) -> io::Result<usize> {
    use std::os::unix::fs::FileExt;
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Advances the fencing counter kept at the start of the lock file `f` (opened at
/// `path`) and returns the new value. The caller holds the lock file: a write
/// lock, or a read lock plus the shared holders' counter lock (see
/// [`advance_shared`]), so nobody else reads or writes the counter meanwhile.
/// Costs one `pread` and one `pwrite`, no extra lock.
///
/// - The value is `max(stored + 1, now in µs)` ([`layout::next_token`]); a counter
///   at `u64::MAX` is an error (a repeated token would be worse).
/// - An empty file (new, created by Python, or replaced by `break_lock` without a
///   value) is a counter never advanced: it continues from `legacy` (the separate
///   counter file earlier versions kept in `.tooz/fence/`) if that exists, else
///   from the clock.
/// - A counter that does not parse (a stray edit) is not fatal for ever: it
///   restarts at [`layout::recovery_token`], above every token it can have handed
///   out, and says so in a warning.
/// - Crash semantics: the value is written in place (it only grows, so the new
///   text covers the old) into the page cache, not synced. A process that dies,
///   even in the middle, loses nothing (a `pwrite` of 21 bytes is done or not
///   done, and the page cache survives the process). A machine that crashes may
///   come back with an older value, an empty file or no file; since every token
///   is at most the wall clock at its grant unless it ran ahead of it, the clock
///   after the reboot is above every lost token, so the first token after the
///   crash is still greater. A token that runs ahead of the clock (more than one
///   grant per microsecond, or a clock stepped back) is the exception: it is
///   `fdatasync`ed before it is returned, as is a recovered counter.
pub(crate) fn advance_counter(f: &File, path: &Path, legacy: &Path) -> Result<u64> {
    use std::os::unix::fs::FileExt;
    let mut buf = [0u8; 64];
    let n = read_prefix(f, &mut buf).map_err(|e| io_err("cannot read fencing counter", path, e))?;
    let stored = &buf[..n];
    let parsed = if stored.iter().all(u8::is_ascii_whitespace) {
        match ofd::read_opt(legacy)? {
            Some(old) => layout::parse_counter(&old),
            None => Ok(0),
        }
    } else {
        layout::parse_counter(stored)
    };
    let now = SystemTime::now();
    let (next, recovered) = match parsed {
        Ok(prev) => (layout::next_token(prev, now)?, false),
        Err(e) => {
            let mtime = f.metadata().and_then(|m| m.modified()).ok();
            let next = layout::recovery_token(now, mtime)?;
            tracing::warn!(
                path = %path.display(),
                error = %e,
                restart = next,
                "damaged fencing counter: restarting it above every token it can have given"
            );
            (next, true)
        }
    };
    let text = layout::format_counter(next);
    f.write_all_at(&text, 0)
        .and_then(|()| {
            if text.len() < n {
                f.set_len(text.len() as u64)
            } else {
                Ok(())
            }
        })
        .and_then(|()| {
            if recovered || next > layout::micros(now) {
                f.sync_data()
            } else {
                Ok(())
            }
        })
        .map_err(|e| io_err("cannot write fencing counter", path, e))?;
    Ok(next)
}

/// [`advance_counter`] for a shared grant: shared holders hold the lock file
/// together, so they advance its counter one at a time under a short write lock
/// on `fence` (held for microseconds; exclusive holders never take it, the lock
/// file itself keeps them apart from shared holders). Blocking: run it on a
/// blocking thread.
fn advance_shared(f: &File, path: &Path, fence: &Path) -> Result<u64> {
    if let Some(dir) = fence.parent() {
        std::fs::create_dir_all(dir).map_err(|e| io_err("cannot create", dir, e))?;
    }
    let _turn = ofd::lock_path_blocking(fence, Kind::Write, COUNTER_WAIT)?;
    advance_counter(f, path, fence)
}

/// Drops `x` on a blocking thread: closing an inotify instance waits for an RCU
/// grace period in the kernel (often 10-30 ms), which would stall the runtime and
/// delay the very acquisition it served.
fn close_off_runtime<T: Send + 'static>(x: T) {
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => drop(rt.spawn_blocking(move || drop(x))),
        Err(_) => drop(x),
    }
}

/// An inotify instance, for [`AsyncFd`].
#[derive(Debug)]
struct Ino(Inotify);

impl AsRawFd for Ino {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// The inotify watch of one wait on the lock file, which sees a holder close it
/// (a release, or its process dying), or the file replaced or removed.
#[derive(Debug)]
struct LockWatch {
    fd: Option<AsyncFd<Ino>>,
    waiting: Arc<Mutex<Waiting>>,
}

impl LockWatch {
    /// Watches the file at `path`; `None` when inotify is unavailable (the
    /// per-user limit `fs.inotify.max_user_instances` is reached), the file is
    /// gone, or the runtime has no I/O driver: the core then polls.
    fn stream(path: &Path, waiting: Arc<Mutex<Waiting>>) -> Option<WakeStream> {
        let ino = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .map_err(|e| tracing::debug!(error = %e, "inotify unavailable; polling"))
            .ok()?;
        let id = |p: &Path| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
        let before = id(path);
        let mask = AddWatchFlags::IN_CLOSE_WRITE
            | AddWatchFlags::IN_CLOSE_NOWRITE
            | AddWatchFlags::IN_ATTRIB
            | AddWatchFlags::IN_DELETE_SELF
            | AddWatchFlags::IN_MOVE_SELF;
        if let Err(e) = ino.add_watch(path, mask) {
            tracing::debug!(path = %path.display(), error = %e, "cannot watch lock file; polling");
            close_off_runtime(ino);
            return None;
        }
        // `AsyncFd` panics on a runtime built without I/O.
        let fd = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| register(Ino(ino))))
            .map_err(|_| tracing::debug!("no I/O driver in this runtime; polling"))
            .ok()?
            .map_err(|e| tracing::debug!(error = %e, "cannot register inotify; polling"))
            .ok()?;
        // The file the watch is on, unless it was replaced meanwhile.
        lock_of(&waiting).watched = before.filter(|b| id(path) == Some(*b));
        let watch = LockWatch {
            fd: Some(fd),
            waiting,
        };
        Some(Box::pin(futures_util::stream::unfold(
            watch,
            |mut w| async { w.next().await.map(|()| ((), w)) },
        )))
    }

    /// Waits for a batch of events. `None` when the watch is gone (the file was
    /// deleted) or on an error: the stream ends and the core polls.
    async fn next(&mut self) -> Option<()> {
        let fd = self.fd.as_ref()?;
        let res = loop {
            match fd.readable().await {
                Ok(mut ready) => match ready.try_io(|ino| drain(&ino.get_ref().0)) {
                    Ok(res) => break res,
                    Err(_would_block) => {}
                },
                Err(e) => break Err(e),
            }
        };
        match res {
            Ok(gone) => (!gone).then_some(()),
            Err(e) => {
                tracing::debug!(error = %e, "reading inotify failed; polling");
                None
            }
        }
    }
}

impl Drop for LockWatch {
    /// The wait is over: closes the watch and the idle file, off the runtime.
    fn drop(&mut self) {
        let idle = {
            let mut w = lock_of(&self.waiting);
            w.watched = None;
            w.idle.take()
        };
        close_off_runtime((self.fd.take().map(AsyncFd::into_inner), idle));
    }
}

/// Registers an inotify instance with the runtime's reactor.
///
/// tokio deprecated its safe constructors because, for an arbitrary `T`, they
/// cannot promise that the descriptor stays open and the same while registered
/// (the `unsafe` ones put that on the caller, and this workspace denies `unsafe`).
/// Here it holds: `Ino` owns its descriptor and never changes it, and the `AsyncFd`
/// owns the `Ino` until it is dropped or `into_inner` deregisters it.
#[expect(
    deprecated,
    reason = "the safe constructor; its condition holds for Ino"
)]
fn register(ino: Ino) -> io::Result<AsyncFd<Ino>> {
    AsyncFd::with_interest(ino, Interest::READABLE)
}

/// Reads every queued event. `Ok(gone)` when there were some, `gone` when the
/// watch was removed (the file deleted); `WouldBlock` when there were none.
fn drain(ino: &Inotify) -> io::Result<bool> {
    let (mut any, mut gone) = (false, false);
    loop {
        match ino.read_events() {
            Ok(evs) if !evs.is_empty() => {
                any = true;
                gone |= evs
                    .iter()
                    .any(|e| e.mask.contains(AddWatchFlags::IN_IGNORED));
            }
            Ok(_) | Err(Errno::EAGAIN) if any => return Ok(gone),
            Ok(_) | Err(Errno::EAGAIN) => return Err(io::ErrorKind::WouldBlock.into()),
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// The outcome of one synchronous attempt.
enum Step {
    /// Granted (exclusive) or refused.
    Done(Attempt),
    /// A shared hold taken on this file, whose counter is still to be advanced
    /// (on a blocking thread, see [`advance_shared`]).
    Shared(File),
}

impl FileLock {
    /// One non-blocking try-lock on the lock file; an exclusive grant also
    /// advances the counter in the file (a `pread` and a `pwrite`).
    fn attempt(&self, mode: Mode) -> Result<Step> {
        let kind = match mode {
            Mode::Exclusive => Kind::Write,
            Mode::Shared => Kind::Read,
        };
        let mut file = lock_of(&self.waiting).idle.take();
        for _ in 0..REOPENS {
            let f = match file.take() {
                Some(f) => f,
                None => open(&self.path)?,
            };
            let locked =
                ofd::try_lock(&f, kind).map_err(|e| io_err("cannot lock", &self.path, e))?;
            // A file replaced by `break_lock` (or removed) is not the lock any more:
            // holding it would not exclude anyone, waiting on it would wait for the
            // broken holder. Closing it drops the lock taken on it, if any.
            let Some(id) = id_at(&f, &self.path) else {
                continue;
            };
            if !locked {
                let ofd_holder =
                    held_by_ofd(&f, kind).map_err(|e| io_err("cannot probe", &self.path, e))?;
                let mut w = lock_of(&self.waiting);
                let notifies = ofd_holder && w.watched == Some(id);
                if w.watched.is_some() {
                    w.idle = Some(f);
                }
                return Ok(Step::Done(Attempt::Held {
                    expires_in: None,
                    notifies,
                }));
            }
            if mode == Mode::Shared {
                return Ok(Step::Shared(f));
            }
            // On an error `f` is closed, which releases the lock.
            let token = advance_counter(&f, &self.path, &self.fence)?;
            *self.held() = Some(Held { file: f, mode });
            return Ok(Step::Done(Attempt::Granted(FencingToken(token))));
        }
        // Replaced again and again: let the core try later.
        Ok(Step::Done(Attempt::Held {
            expires_in: None,
            notifies: false,
        }))
    }

    /// Unlocks and closes the descriptor; see [`DriverLock::release`].
    fn release_now(&self) -> Result<bool> {
        let Some(h) = self.held().take() else {
            return Ok(false);
        };
        let still = ofd::same_file(&h.file, &self.path);
        let res = ofd::unlock(&h.file).map_err(|e| io_err("cannot unlock", &self.path, e));
        tracing::trace!(mode = ?h.mode, broken = !still, "released");
        drop(h);
        res.map(|()| still)
    }
}

#[tooz_core::async_trait]
impl DriverLock for FileLock {
    fn name(&self) -> &LockName {
        &self.name
    }

    /// An exclusive attempt is a few system calls (open, try-lock, `stat`s,
    /// `pread`, `pwrite`), made inline; shared ones go the usual way (their counter
    /// waits for the shared holders' counter lock).
    fn try_acquire_local(&self, mode: Mode) -> Option<Result<Option<FencingToken>>> {
        if mode == Mode::Shared {
            return None;
        }
        Some(match self.attempt(mode) {
            Ok(Step::Done(Attempt::Granted(token))) => Ok(Some(token)),
            // Not returned for an exclusive attempt; dropping the file releases it.
            Ok(Step::Done(_) | Step::Shared(_)) => Ok(None),
            Err(e) => Err(e),
        })
    }

    /// Unlocking and closing a descriptor: done inline.
    fn release_local(&self) -> Option<Result<bool>> {
        Some(self.release_now())
    }

    /// One non-blocking try-lock on the lock file; when granted, the fencing
    /// counter's advance in the lock file (for a shared grant on a blocking
    /// thread, as it waits for the shared holders' counter lock). A refused
    /// attempt runs on the caller's thread.
    ///
    /// A holder "notifies" when it is a Rust holder (an OFD lock), whose release
    /// closes its descriptor, and this handle watches that very file; a Python
    /// holder (a process-associated lock) is polled for, inotify still waking the
    /// waiter early when Python closes the file.
    #[tracing::instrument(level = "debug", skip(self), fields(lock = %self.name))]
    async fn try_acquire(&self, mode: Mode) -> Result<Attempt> {
        match self.attempt(mode)? {
            Step::Done(attempt) => Ok(attempt),
            Step::Shared(f) => {
                let (path, fence) = (self.path.clone(), self.fence.clone());
                // Not cancelled in flight (the core awaits attempts); if it were, `f`
                // would be dropped on the blocking thread and the lock with it.
                let (f, token) = tokio::task::spawn_blocking(move || {
                    let token = advance_shared(&f, &path, &fence);
                    (f, token)
                })
                .await
                .map_err(|e| ToozError::backend("file", "fencing counter task failed", e))?;
                let token = token?;
                *self.held() = Some(Held {
                    file: f,
                    mode: Mode::Shared,
                });
                Ok(Attempt::Granted(FencingToken(token)))
            }
        }
    }

    /// An inotify watch on the lock file; see [`LockWatch`].
    async fn wakeups(&self) -> Result<Option<WakeStream>> {
        Ok(LockWatch::stream(&self.path, Arc::clone(&self.waiting)))
    }

    /// Unlocks and closes the descriptor (which wakes inotify waiters).
    /// `false` if not held, or if the lock was broken meanwhile (the file at the
    /// path is no longer the one this handle locked).
    #[tracing::instrument(level = "debug", skip(self), fields(lock = %self.name))]
    async fn release(&self) -> Result<bool> {
        self.release_now()
    }

    /// Nothing to renew: the kernel keeps the lock until it is released or the
    /// process dies. Reports whether this handle still holds it.
    async fn heartbeat(&self) -> Result<bool> {
        self.is_still_owner().await
    }

    /// Held by this handle, and the lock file was not removed or replaced meanwhile.
    async fn is_still_owner(&self) -> Result<bool> {
        Ok(self
            .held()
            .as_ref()
            .is_some_and(|h| ofd::same_file(&h.file, &self.path)))
    }

    /// Replaces the lock file with a fresh one (atomic rename) if someone holds
    /// it. A record lock cannot be taken away from the process holding it, so the
    /// name moves on instead: new acquirers (Rust and Python) lock the new file,
    /// Rust holders of the old one see `is_still_owner`/`heartbeat` turn false
    /// (the coordinator reports the hold lost) and their `release` returns
    /// `false`, and Rust waiters move over to the new file.
    ///
    /// Caveat: a Python tooz process that was *waiting* for the lock when it was
    /// broken keeps retrying on the old file and gets it once the broken holder
    /// lets go, while someone may hold the new file. Like every `break_lock`, this
    /// is an operator's tool for a holder that is stuck.
    #[tracing::instrument(level = "debug", skip(self), fields(lock = %self.name))]
    async fn break_lock(&self) -> Result<bool> {
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || break_file(&path))
            .await
            .map_err(|e| ToozError::backend("file", "break_lock task failed", e))?
    }
}

/// Replaces `path` with a new file (carrying the fencing counter over) if any
/// lock is held on it.
fn break_file(path: &std::path::Path) -> Result<bool> {
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if ofd::is_missing(&e) => return Ok(false),
        Err(e) => return Err(io_err("cannot open", path, e)),
    };
    if !ofd::is_locked(&file).map_err(|e| io_err("cannot probe", path, e))? {
        return Ok(false);
    }
    // The fencing counter moves over to the new file, so the next holder's token
    // is above the broken holder's.
    let mut counter = [0u8; 64];
    let n = read_prefix(&file, &mut counter).map_err(|e| io_err("cannot read", path, e))?;
    drop(file);
    // The replacement is created beside the lock file (same file system). Its
    // name must not grow with the lock's: a lock name component may already be
    // NAME_MAX long.
    let parent = path.parent().unwrap_or(std::path::Path::new("/"));
    let tmp = parent.join(format!(".tooz-break-{}", uuid::Uuid::new_v4().simple()));
    let res = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .and_then(|mut f| {
            std::io::Write::write_all(&mut f, &counter[..n])?;
            drop(f);
            std::fs::rename(&tmp, path)
        });
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_err("cannot replace", path, e));
    }
    tracing::warn!(path = %path.display(), "lock broken: the lock file was replaced");
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use tokio::time::Instant;
    use tooz_core::Wait;

    /// The core's wait loop, reduced to what these tests need: try; subscribe and
    /// try again at once; then wait for a wake-up (or, for a holder that does not
    /// notify, 20 ms) and try again, with a last try at the deadline.
    async fn acquire(l: &FileLock, mode: Mode, wait: Wait) -> Result<Option<FencingToken>> {
        let deadline = wait.deadline();
        let mut wakes: Option<WakeStream> = None;
        let mut subscribed = false;
        loop {
            let notifies = match l.try_acquire(mode).await? {
                Attempt::Granted(t) => return Ok(Some(t)),
                Attempt::Held { notifies, .. } => notifies,
                a => panic!("unexpected {a:?}"),
            };
            let now = Instant::now();
            if wait == Wait::No || deadline.is_some_and(|d| now >= d) {
                return Ok(None);
            }
            if !subscribed {
                subscribed = true;
                wakes = l.wakeups().await?;
                if wakes.is_some() {
                    continue;
                }
            }
            let pause = if notifies && wakes.is_some() {
                Duration::from_secs(3600)
            } else {
                Duration::from_millis(20)
            };
            let until = deadline.map_or(now + pause, |d| d.min(now + pause));
            let woke = async {
                match wakes.as_mut() {
                    Some(w) => w.next().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                w = woke => if w.is_none() { wakes = None },
                () = tokio::time::sleep_until(until) => {}
            }
        }
    }

    fn root() -> PathBuf {
        let p = std::env::temp_dir().join(format!("tooz-file-lock-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(p.join(".tooz/fence")).unwrap();
        p
    }

    /// Advances the counter in the lock file `path` the way an exclusive grant
    /// does: under the file's own write lock.
    fn bump_counter(path: &Path) -> Result<u64> {
        let held = ofd::lock_path_blocking(path, Kind::Write, COUNTER_WAIT)?;
        advance_counter(held.file(), path, &path.with_extension("legacy"))
    }

    #[test]
    fn fence_counter_is_monotonic_across_threads() {
        let r = root();
        let path = r.join(".tooz/fence/c");
        let mut all = Vec::new();
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let p = path.clone();
                std::thread::spawn(move || {
                    (0..50)
                        .map(|_| bump_counter(&p).unwrap())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for h in handles {
            let v = h.join().unwrap();
            assert!(v.windows(2).all(|w| w[0] < w[1]));
            all.extend(v);
        }
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 200, "every token is unique");
        // The counter never goes back, even if rewritten with a smaller value.
        let last = *all.last().unwrap();
        std::fs::write(&path, b"3\n").unwrap();
        assert!(bump_counter(&path).unwrap() > 3);
        std::fs::write(&path, format!("{}\n", last + 1_000_000_000)).unwrap();
        assert_eq!(bump_counter(&path).unwrap(), last + 1_000_000_001);
        std::fs::remove_dir_all(r).unwrap();
    }

    fn now_us() -> u64 {
        u64::try_from(
            SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_micros(),
        )
        .unwrap()
    }

    /// A counter that does not parse restarts above anything it can have handed
    /// out (clock and mtime plus the margin), is rewritten, and counts on from there.
    #[test]
    fn junk_counter_recovers_above_every_earlier_token() {
        let r = root();
        let path = r.join(".tooz/fence/j");
        let before = bump_counter(&path).unwrap();
        for junk in [
            &b"junk"[..],
            b"12\x0034",
            b"\xff\xfe",
            b"99999999999999999999999",
        ] {
            std::fs::write(&path, junk).unwrap();
            let t0 = now_us();
            let got = bump_counter(&path).unwrap();
            assert!(got > before);
            assert!(got >= t0 + layout::RECOVERY_MARGIN_US, "{junk:?}: {got}");
            assert_eq!(std::fs::read(&path).unwrap(), layout::format_counter(got));
            assert_eq!(
                bump_counter(&path).unwrap(),
                got + 1,
                "counts on from there"
            );
        }
        // A clock stepped back since the last write: the file's mtime still bounds it.
        std::fs::write(&path, b"junk").unwrap();
        let future = SystemTime::now() + Duration::from_secs(7200);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(future)
            .unwrap();
        let got = bump_counter(&path).unwrap();
        assert!(got >= now_us() + 7_200_000_000 + layout::RECOVERY_MARGIN_US - 60_000_000);
        std::fs::remove_dir_all(r).unwrap();
    }

    /// A counter at `u64::MAX` refuses to hand out a token (and the lock with it);
    /// it never repeats one.
    #[tokio::test]
    async fn exhausted_counter_is_an_error() {
        let r = root();
        let layout = Arc::new(Layout::new(&r));
        let a = FileLock::new(&layout, &"max".into()).unwrap();
        let (fence, _) = layout.lock_path(&"max".into()).unwrap();
        std::fs::write(&fence, format!("{}\n", u64::MAX - 1)).unwrap();
        assert_eq!(
            acquire(&a, Mode::Exclusive, Wait::No).await.unwrap(),
            Some(FencingToken(u64::MAX))
        );
        assert!(a.release().await.unwrap());
        let e = acquire(&a, Mode::Exclusive, Wait::No).await.unwrap_err();
        assert!(matches!(e, ToozError::Backend { .. }), "{e}");
        assert!(e.to_string().contains("exhausted"), "{e}");
        assert!(a.held().is_none());
        // Nothing is left held: another handle can take the lock (and fails the same way
        // at the token), and the counter was not touched.
        let b = FileLock::new(&layout, &"max".into()).unwrap();
        assert!(acquire(&b, Mode::Exclusive, Wait::No).await.is_err());
        assert_eq!(
            std::fs::read(&fence).unwrap(),
            layout::format_counter(u64::MAX)
        );
        std::fs::remove_dir_all(r).unwrap();
    }

    /// The counter lives in the lock file itself; a lock file without one (new,
    /// or written by an earlier version) continues from the separate counter
    /// earlier versions kept in `.tooz/fence/`, else from the clock.
    #[tokio::test]
    async fn counter_lives_in_the_lock_file_and_continues_a_legacy_one() {
        let r = root();
        let layout = Arc::new(Layout::new(&r));
        let name: LockName = "legacy".into();
        let (path, rel) = layout.lock_path(&name).unwrap();
        let legacy = now_us() + 3_000_000_000;
        std::fs::write(layout.lock_fence(&rel), format!("{legacy}\n")).unwrap();
        let a = FileLock::new(&layout, &name).unwrap();
        let t1 = acquire(&a, Mode::Exclusive, Wait::No)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(t1, FencingToken(legacy + 1));
        assert_eq!(std::fs::read(&path).unwrap(), layout::format_counter(t1.0));
        assert!(a.release().await.unwrap());
        // From now on the lock file's value counts, not the legacy one.
        std::fs::write(layout.lock_fence(&rel), b"5\n").unwrap();
        let t2 = acquire(&a, Mode::Exclusive, Wait::No)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(t2.0, t1.0 + 1);
        assert!(a.release().await.unwrap());
        std::fs::remove_dir_all(r).unwrap();
    }

    /// Shared holders advance the one counter in turn: distinct tokens, and the
    /// next exclusive holder's is above all of them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shared_holders_get_distinct_tokens() {
        let r = root();
        let layout = Arc::new(Layout::new(&r));
        let handles: Vec<_> = (0..6)
            .map(|_| Arc::new(FileLock::new(&layout, &"sh".into()).unwrap()))
            .collect();
        let tasks: Vec<_> = handles
            .iter()
            .map(|h| {
                let h = Arc::clone(h);
                tokio::spawn(async move { acquire(&h, Mode::Shared, Wait::No).await })
            })
            .collect();
        let mut tokens = Vec::new();
        for t in tasks {
            tokens.push(t.await.unwrap().unwrap().unwrap().0);
        }
        let top = *tokens.iter().max().unwrap();
        tokens.sort_unstable();
        tokens.dedup();
        assert_eq!(tokens.len(), 6, "every shared grant has its own token");
        for h in &handles {
            assert!(h.release().await.unwrap());
        }
        let x = acquire(&handles[0], Mode::Exclusive, Wait::No)
            .await
            .unwrap()
            .unwrap();
        assert!(x.0 > top);
        std::fs::remove_dir_all(r).unwrap();
    }

    /// A missing counter starts from the clock.
    #[test]
    fn missing_counter_starts_from_the_clock() {
        let r = root();
        let path = r.join(".tooz/fence/m");
        let t0 = now_us();
        let got = bump_counter(&path).unwrap();
        assert!(got >= t0 && got < t0 + 60_000_000);
        std::fs::remove_file(&path).unwrap();
        assert!(bump_counter(&path).unwrap() > got);
        std::fs::remove_dir_all(r).unwrap();
    }

    #[tokio::test]
    async fn handles_exclude_each_other_and_tokens_increase() {
        let r = root();
        let layout = Arc::new(Layout::new(&r));
        let a = FileLock::new(&layout, &"sub/dir/l".into()).unwrap();
        let b = FileLock::new(&layout, &"sub/dir/l".into()).unwrap();
        let t1 = acquire(&a, Mode::Exclusive, Wait::No)
            .await
            .unwrap()
            .unwrap();
        assert!(r.join("sub/dir/l").is_file());
        assert_eq!(acquire(&b, Mode::Exclusive, Wait::No).await.unwrap(), None);
        assert_eq!(acquire(&b, Mode::Shared, Wait::No).await.unwrap(), None);
        assert!(a.is_still_owner().await.unwrap());
        assert!(a.heartbeat().await.unwrap());
        assert!(!b.is_still_owner().await.unwrap());
        // A waiter is woken by the release.
        let waiter = tokio::spawn(async move {
            let t = acquire(&b, Mode::Exclusive, Wait::For(Duration::from_secs(10))).await;
            (b, t)
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(a.release().await.unwrap());
        assert!(!a.release().await.unwrap());
        let (b, t2) = waiter.await.unwrap();
        let t2 = t2.unwrap().unwrap();
        assert!(t2 > t1);
        assert!(b.release().await.unwrap());
        assert!(!a.break_lock().await.unwrap(), "nobody holds it");
        // Shared holders coexist and exclude exclusive ones.
        let t3 = acquire(&a, Mode::Shared, Wait::No).await.unwrap().unwrap();
        let t4 = acquire(&b, Mode::Shared, Wait::No).await.unwrap().unwrap();
        assert!(t4 > t3 && t3 > t2);
        let c = FileLock::new(&layout, &"sub/dir/l".into()).unwrap();
        assert_eq!(
            acquire(&c, Mode::Exclusive, Wait::For(Duration::from_millis(50)))
                .await
                .unwrap(),
            None
        );
        assert!(a.release().await.unwrap() && b.release().await.unwrap());
        assert!(
            acquire(&c, Mode::Exclusive, Wait::No)
                .await
                .unwrap()
                .is_some()
        );
        std::fs::remove_dir_all(r).unwrap();
    }

    #[tokio::test]
    async fn break_moves_the_name_to_a_fresh_file() {
        let r = root();
        let layout = Arc::new(Layout::new(&r));
        let new = || FileLock::new(&layout, &"b".into()).unwrap();
        let (a, b, c) = (new(), new(), new());
        // A counter ahead of the clock: only carrying it over to the new file
        // keeps the next token above it.
        let (path, _) = layout.lock_path(&"b".into()).unwrap();
        std::fs::write(&path, format!("{}\n", now_us() + 3_000_000_000)).unwrap();
        let t1 = acquire(&a, Mode::Exclusive, Wait::No)
            .await
            .unwrap()
            .unwrap();
        // A waiter queued before the break moves over to the new file.
        let waiter = tokio::spawn(async move {
            let t = acquire(&c, Mode::Exclusive, Wait::For(Duration::from_secs(10))).await;
            (c, t)
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(b.break_lock().await.unwrap());
        let (c, t2) = waiter.await.unwrap();
        let t2 = t2.unwrap().unwrap();
        assert!(t2 > t1, "tokens keep increasing across a break");
        assert!(!a.is_still_owner().await.unwrap());
        assert!(!a.heartbeat().await.unwrap());
        assert_eq!(acquire(&b, Mode::Exclusive, Wait::No).await.unwrap(), None);
        assert!(
            !a.release().await.unwrap(),
            "a broken hold releases as false"
        );
        assert_eq!(
            acquire(&b, Mode::Exclusive, Wait::No).await.unwrap(),
            None,
            "c still holds"
        );
        assert!(c.release().await.unwrap());
        assert!(!b.break_lock().await.unwrap(), "nothing held");
        // Shared holders can be broken too.
        assert!(acquire(&a, Mode::Shared, Wait::No).await.unwrap().is_some());
        assert!(b.break_lock().await.unwrap());
        assert!(!a.is_still_owner().await.unwrap());
        let leftovers: Vec<_> = std::fs::read_dir(&r)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n.to_string_lossy().contains("tooz-break"))
            .collect();
        assert!(leftovers.is_empty());
        std::fs::remove_dir_all(r).unwrap();
    }

    /// A lock whose last name component is NAME_MAX (255 bytes) long can be broken.
    #[tokio::test]
    async fn break_works_for_the_longest_names() {
        let r = root();
        let layout = Arc::new(Layout::new(&r));
        let name = format!("d/{}", "x".repeat(255));
        let new = || FileLock::new(&layout, &name.as_str().into()).unwrap();
        let (a, b) = (new(), new());
        assert!(
            acquire(&a, Mode::Exclusive, Wait::No)
                .await
                .unwrap()
                .is_some()
        );
        assert!(b.break_lock().await.unwrap());
        assert!(!a.is_still_owner().await.unwrap());
        assert!(
            acquire(&b, Mode::Exclusive, Wait::No)
                .await
                .unwrap()
                .is_some()
        );
        assert!(b.release().await.unwrap());
        std::fs::remove_dir_all(r).unwrap();
    }

    /// The core never drops an attempt in flight, but if one were dropped (at the
    /// counter's blocking step) the lock would go with it.
    #[tokio::test]
    async fn dropping_an_attempt_never_leaks_the_lock() {
        let r = root();
        let layout = Arc::new(Layout::new(&r));
        let a = FileLock::new(&layout, &"x".into()).unwrap();
        for _ in 0..50 {
            // Poll once or twice, then drop.
            let fut = a.try_acquire(Mode::Exclusive);
            let _ = tokio::time::timeout(Duration::from_micros(50), fut).await;
            if a.held().is_some() {
                assert!(a.release().await.unwrap());
            }
            let probe = FileLock::new(&layout, &"x".into()).unwrap();
            let got = acquire(&probe, Mode::Exclusive, Wait::No).await.unwrap();
            assert!(got.is_some());
            assert!(probe.release().await.unwrap());
        }
        std::fs::remove_dir_all(r).unwrap();
    }

    fn held(notifies: bool) -> Attempt {
        Attempt::Held {
            expires_in: None,
            notifies,
        }
    }

    async fn next_within(w: &mut WakeStream, d: Duration) -> Option<()> {
        tokio::time::timeout(d, w.next()).await.ok().flatten()
    }

    /// A Rust holder notifies once the waiter watches the file; the watch wakes on
    /// its release, and the waiter's own refused attempts do not wake other waiters.
    #[tokio::test]
    async fn rust_holders_notify_through_inotify() {
        let r = root();
        let layout = Arc::new(Layout::new(&r));
        let new = || FileLock::new(&layout, &"n".into()).unwrap();
        let (a, b, c) = (new(), new(), new());
        assert!(matches!(
            a.try_acquire(Mode::Exclusive).await.unwrap(),
            Attempt::Granted(_)
        ));
        // Not watching yet: the core would poll.
        assert_eq!(b.try_acquire(Mode::Shared).await.unwrap(), held(false));
        let mut wb = b.wakeups().await.unwrap().unwrap();
        let mut wc = c.wakeups().await.unwrap().unwrap();
        assert_eq!(b.try_acquire(Mode::Shared).await.unwrap(), held(true));
        assert_eq!(c.try_acquire(Mode::Exclusive).await.unwrap(), held(true));
        for _ in 0..3 {
            assert_eq!(c.try_acquire(Mode::Exclusive).await.unwrap(), held(true));
        }
        let quiet = Duration::from_millis(100);
        assert_eq!(
            next_within(&mut wb, quiet).await,
            None,
            "c's attempts kept quiet"
        );
        assert!(a.release().await.unwrap());
        let soon = Duration::from_secs(5);
        assert_eq!(next_within(&mut wb, soon).await, Some(()));
        assert_eq!(next_within(&mut wc, soon).await, Some(()));
        assert!(matches!(
            b.try_acquire(Mode::Shared).await.unwrap(),
            Attempt::Granted(_)
        ));
        // The wait is over: dropping the stream forgets the watch and closes the
        // idle file (another wake-up for c, whose watch is still on).
        drop(wb);
        assert!(lock_of(&b.waiting).watched.is_none());
        assert_eq!(
            next_within(&mut wc, quiet).await,
            None,
            "b's file is held, not idle"
        );
        assert_eq!(c.try_acquire(Mode::Exclusive).await.unwrap(), held(true));
        drop(wc);
        assert!(lock_of(&c.waiting).idle.is_none());
        assert!(b.release().await.unwrap());
        std::fs::remove_dir_all(r).unwrap();
    }

    /// A process-associated (POSIX, Python's `lockf`) holder is polled for.
    #[tokio::test]
    async fn posix_holders_do_not_notify() {
        let r = root();
        let layout = Arc::new(Layout::new(&r));
        let b = FileLock::new(&layout, &"p".into()).unwrap();
        let posix = open(&b.path).unwrap();
        let fl = libc::flock {
            l_type: libc::F_WRLCK as libc::c_short,
            l_whence: libc::SEEK_SET as libc::c_short,
            l_start: 0,
            l_len: 0,
            l_pid: 0,
        };
        fcntl(&posix, FcntlArg::F_SETLK(&fl)).unwrap();
        // Subscribed first: the attempts keep their file open, which would drop a
        // POSIX lock of this very process (any close of the file does).
        let mut wb = b.wakeups().await.unwrap().unwrap();
        assert_eq!(b.try_acquire(Mode::Exclusive).await.unwrap(), held(false));
        assert_eq!(b.try_acquire(Mode::Shared).await.unwrap(), held(false));
        // The holder closing the file still wakes the waiter early.
        drop(posix);
        assert_eq!(next_within(&mut wb, Duration::from_secs(5)).await, Some(()));
        assert!(matches!(
            b.try_acquire(Mode::Exclusive).await.unwrap(),
            Attempt::Granted(_)
        ));
        assert!(b.release().await.unwrap());
        std::fs::remove_dir_all(r).unwrap();
    }

    /// A waiter whose file was replaced (broken) watches the old file: polled for,
    /// and a deleted file ends the stream.
    #[tokio::test]
    async fn replaced_or_deleted_files_are_polled() {
        let r = root();
        let layout = Arc::new(Layout::new(&r));
        let new = || FileLock::new(&layout, &"r".into()).unwrap();
        let (a, b, c) = (new(), new(), new());
        assert!(
            acquire(&a, Mode::Exclusive, Wait::No)
                .await
                .unwrap()
                .is_some()
        );
        let mut wc = c.wakeups().await.unwrap().unwrap();
        assert_eq!(c.try_acquire(Mode::Exclusive).await.unwrap(), held(true));
        assert!(b.break_lock().await.unwrap());
        assert_eq!(next_within(&mut wc, Duration::from_secs(5)).await, Some(()));
        assert!(matches!(
            c.try_acquire(Mode::Exclusive).await.unwrap(),
            Attempt::Granted(_)
        ));
        assert_eq!(b.try_acquire(Mode::Exclusive).await.unwrap(), held(false));
        let mut wb = b.wakeups().await.unwrap().unwrap();
        assert_eq!(b.try_acquire(Mode::Exclusive).await.unwrap(), held(true));
        // Removed while watched (and no descriptor left open on it but c's and b's
        // idle one): the old inode goes once both are closed.
        std::fs::remove_file(&b.path).unwrap();
        drop(lock_of(&b.waiting).idle.take());
        assert!(!c.release().await.unwrap(), "removed under c");
        assert!(
            tokio::time::timeout(Duration::from_secs(5), wb.next())
                .await
                .unwrap()
                .is_none(),
            "a deleted file ends the stream"
        );
        assert!(lock_of(&b.waiting).watched.is_none());
        drop(wc);
        std::fs::remove_dir_all(r).unwrap();
    }
}
