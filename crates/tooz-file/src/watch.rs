//! inotify-driven wake-ups: for blocked lock acquisitions and for group event
//! streams.
//!
//! A lock waiter ([`FileWatch`]) already runs on a blocking-pool thread and waits
//! with `poll(2)` and a bounded timeout. A group event stream ([`GroupWatch`])
//! has no thread of its own: its non-blocking inotify descriptor is registered
//! with tokio's reactor through `AsyncFd` and read when the stream is polled.
//! Closing an inotify descriptor waits for an RCU grace period (milliseconds),
//! so a dropped stream closes its descriptor on the blocking pool.
//!
//! When inotify cannot be had (the per-user limit `fs.inotify.max_user_instances`
//! is reached, or the runtime has no I/O driver) callers fall back to polling.

use std::collections::HashSet;
use std::ffi::OsString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::Stream;
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, InotifyEvent, WatchDescriptor};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::time::{Interval, MissedTickBehavior};
use tooz_core::DriverEvent;

fn new_inotify() -> Option<Inotify> {
    match Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC) {
        Ok(i) => Some(i),
        Err(e) => {
            tracing::debug!(error = %e, "inotify unavailable; falling back to polling");
            None
        }
    }
}

/// Reads every queued event without blocking.
fn read_all(ino: &Inotify) -> io::Result<Vec<InotifyEvent>> {
    let mut all = Vec::new();
    loop {
        match ino.read_events() {
            Ok(evs) if !evs.is_empty() => all.extend(evs),
            Ok(_) | Err(Errno::EAGAIN) => return Ok(all),
            Err(Errno::EINTR) => {}
            Err(e) => return Err(io::Error::from(e)),
        }
    }
}

// ----- lock files -------------------------------------------------------------

/// Wakes a waiter when a lock file is closed (a holder releasing: ours and
/// Python's close their descriptor), touched, or removed.
#[derive(Debug)]
pub(crate) struct FileWatch {
    ino: Inotify,
}

impl FileWatch {
    /// Watches `path`; `None` when inotify is unavailable (poll instead).
    pub(crate) fn new(path: &Path) -> Option<Self> {
        let ino = new_inotify()?;
        let mask = AddWatchFlags::IN_CLOSE_WRITE
            | AddWatchFlags::IN_CLOSE_NOWRITE
            | AddWatchFlags::IN_ATTRIB
            | AddWatchFlags::IN_DELETE_SELF
            | AddWatchFlags::IN_MOVE_SELF;
        match ino.add_watch(path, mask) {
            Ok(_) => Some(FileWatch { ino }),
            Err(e) => {
                tracing::debug!(path = %path.display(), error = %e, "cannot watch lock file; polling");
                None
            }
        }
    }

    /// Blocks the (blocking-pool) thread until an event arrives or `timeout`
    /// passes; drains the queue. Returns whether something happened.
    pub(crate) fn wait(&self, timeout: Duration) -> bool {
        let mut fds = [PollFd::new(self.ino.as_fd(), PollFlags::POLLIN)];
        match poll(
            &mut fds,
            PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX),
        ) {
            Ok(n) if n > 0 => {
                let _ = read_all(&self.ino);
                true
            }
            _ => false,
        }
    }
}

// ----- group event streams ----------------------------------------------------

/// Where a group's changes show up on disk.
#[derive(Debug, Clone)]
pub(crate) struct GroupPaths {
    /// `groups/<sha1>`: member records created, replaced, removed.
    pub(crate) group_dir: PathBuf,
    /// `.tooz/alive`: a liveness file closed by its writer = a Rust coordinator
    /// stopped or died.
    pub(crate) alive_dir: PathBuf,
    /// `.tooz/leaders` and the group's file names there (lock closed by a
    /// writer = leader gone; state renamed into place = new leader).
    pub(crate) leaders_dir: PathBuf,
    pub(crate) leader_lock: OsString,
    pub(crate) leader_state: OsString,
}

const GROUP_MASK: AddWatchFlags = AddWatchFlags::IN_CREATE
    .union(AddWatchFlags::IN_DELETE)
    .union(AddWatchFlags::IN_MOVED_FROM)
    .union(AddWatchFlags::IN_MOVED_TO)
    .union(AddWatchFlags::IN_CLOSE_WRITE)
    .union(AddWatchFlags::IN_DELETE_SELF)
    .union(AddWatchFlags::IN_MOVE_SELF);
/// Only IN_CLOSE_WRITE: readers probing liveness open read-only, and their
/// IN_CLOSE_NOWRITE must not wake us (or every re-read would wake us again).
const ALIVE_MASK: AddWatchFlags = AddWatchFlags::IN_CLOSE_WRITE;
const LEADERS_MASK: AddWatchFlags = AddWatchFlags::IN_CLOSE_WRITE.union(AddWatchFlags::IN_MOVED_TO);

/// The watch descriptors of one group stream and what their events mean.
#[derive(Debug)]
struct Watches {
    paths: GroupPaths,
    group_wd: Option<WatchDescriptor>,
    alive_wd: Option<WatchDescriptor>,
    leaders_wd: Option<WatchDescriptor>,
}

impl Watches {
    /// Adds the watches that are missing (at start, and after a watched
    /// directory was removed and maybe recreated).
    fn arm(&mut self, ino: &Inotify) {
        if self.group_wd.is_none() {
            self.group_wd = ino.add_watch(&self.paths.group_dir, GROUP_MASK).ok();
        }
        if self.alive_wd.is_none() {
            self.alive_wd = ino.add_watch(&self.paths.alive_dir, ALIVE_MASK).ok();
        }
        if self.leaders_wd.is_none() {
            self.leaders_wd = ino.add_watch(&self.paths.leaders_dir, LEADERS_MASK).ok();
        }
    }

    fn fully_armed(&self) -> bool {
        self.group_wd.is_some() && self.alive_wd.is_some() && self.leaders_wd.is_some()
    }

    /// Whether an event says something about this group.
    fn relevant(&mut self, ev: &InotifyEvent) -> bool {
        if ev.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
            return true;
        }
        let ignored = ev.mask.contains(AddWatchFlags::IN_IGNORED);
        if Some(ev.wd) == self.group_wd {
            if ignored {
                self.group_wd = None;
            }
            return true;
        }
        if Some(ev.wd) == self.alive_wd {
            if ignored {
                self.alive_wd = None;
            }
            return true;
        }
        if Some(ev.wd) == self.leaders_wd {
            if ignored {
                self.leaders_wd = None;
                return true;
            }
            return ev.name.as_ref().is_some_and(|n| {
                (*n == self.paths.leader_lock && ev.mask.contains(AddWatchFlags::IN_CLOSE_WRITE))
                    || (*n == self.paths.leader_state
                        && ev.mask.contains(AddWatchFlags::IN_MOVED_TO))
            });
        }
        false
    }
}

/// An inotify descriptor as `AsyncFd` wants it (nix's `Inotify` implements
/// `AsFd` only).
#[derive(Debug)]
struct InotifyFd(Inotify);

impl AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// Registers `ino` with the current runtime's reactor, for readability only.
/// `None` (the core polls instead) when registering fails or the runtime has no
/// I/O driver.
fn register(ino: Inotify) -> Option<AsyncFd<InotifyFd>> {
    // `AsyncFd::register_with_interest` is `unsafe` and the workspace denies
    // unsafe code, so its safe predecessor is used. Its contract holds here:
    // `Inotify` owns its descriptor until dropped, and `as_raw_fd` always returns
    // that one. tokio panics (rather than failing) without an I/O driver.
    #[allow(deprecated)]
    let registered = std::panic::catch_unwind(AssertUnwindSafe(move || {
        AsyncFd::with_interest(InotifyFd(ino), Interest::READABLE)
    }));
    match registered {
        Ok(Ok(fd)) => Some(fd),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "cannot register inotify with the runtime; polling");
            None
        }
        Err(_) => {
            tracing::debug!("the runtime has no I/O driver; polling");
            None
        }
    }
}

/// Closes an inotify descriptor on the blocking pool (a close waits for an RCU
/// grace period), or here when there is no runtime.
fn close_off_runtime(ino: Inotify) {
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => drop(rt.spawn_blocking(move || drop(ino))),
        Err(_) => drop(ino),
    }
}

/// One non-blocking read: a batch of events, `WouldBlock` when none is queued.
fn read_batch(ino: &Inotify) -> io::Result<Vec<InotifyEvent>> {
    loop {
        match ino.read_events() {
            Ok(evs) if !evs.is_empty() => return Ok(evs),
            Ok(_) | Err(Errno::EAGAIN) => return Err(io::ErrorKind::WouldBlock.into()),
            Err(Errno::EINTR) => {}
            Err(e) => return Err(io::Error::from(e)),
        }
    }
}

/// Reads per poll before yielding to other tasks (under an event flood).
const MAX_BATCHES: usize = 32;

/// The event stream of one group: `Changed` for every batch of relevant
/// inotify events and on a timer tick (for Python members that expire by
/// modification time without any file event). Dropping it closes its inotify
/// descriptor off the async threads.
#[derive(Debug)]
pub(crate) struct GroupWatch {
    /// `None` once closed (after a read error).
    fd: Option<AsyncFd<InotifyFd>>,
    watches: Watches,
    /// Retries missing watches every second while any is missing.
    rearm: Interval,
    tick: Interval,
}

impl GroupWatch {
    /// Starts watching; `None` when inotify is unavailable (the core then
    /// polls). Must be called on a tokio runtime.
    pub(crate) fn new(paths: GroupPaths, tick: Duration) -> Option<Self> {
        let fd = register(new_inotify()?)?;
        let mut watches = Watches {
            paths,
            group_wd: None,
            alive_wd: None,
            leaders_wd: None,
        };
        watches.arm(&fd.get_ref().0);
        let interval = |d: Duration| {
            let mut i = tokio::time::interval_at(tokio::time::Instant::now() + d, d);
            i.set_missed_tick_behavior(MissedTickBehavior::Delay);
            i
        };
        Some(GroupWatch {
            fd: Some(fd),
            watches,
            rearm: interval(Duration::from_secs(1)),
            tick: interval(tick.max(Duration::from_millis(10))),
        })
    }

    /// Drains the inotify queue and retries missing watches. `Ok(true)` when
    /// something relevant happened (or a missing watch was restored).
    fn poll_inotify(&mut self, cx: &mut Context<'_>) -> io::Result<bool> {
        let Some(fd) = self.fd.as_ref() else {
            return Err(io::Error::other("closed"));
        };
        let mut events = Vec::new();
        let mut batches = 0;
        loop {
            if batches == MAX_BATCHES {
                cx.waker().wake_by_ref();
                break;
            }
            let mut ready = match fd.poll_read_ready(cx) {
                Poll::Ready(r) => r?,
                Poll::Pending => break,
            };
            // `WouldBlock` clears the readiness; the next round registers the waker.
            if let Ok(batch) = ready.try_io(|fd| read_batch(&fd.get_ref().0)) {
                events.extend(batch?);
                batches += 1;
            }
        }
        let mut seen = HashSet::new();
        let mut hit = false;
        for ev in &events {
            if seen.insert((ev.wd, ev.mask.bits(), ev.name.clone())) {
                hit |= self.watches.relevant(ev);
            }
        }
        while !self.watches.fully_armed() && self.rearm.poll_tick(cx).is_ready() {
            self.watches.arm(&fd.get_ref().0);
            hit |= self.watches.fully_armed();
        }
        Ok(hit)
    }

    fn close(&mut self) {
        if let Some(fd) = self.fd.take() {
            // Leaves the reactor here; the close itself goes to the blocking pool.
            close_off_runtime(fd.into_inner().0);
        }
    }
}

impl Drop for GroupWatch {
    fn drop(&mut self) {
        self.close();
    }
}

impl Stream for GroupWatch {
    type Item = DriverEvent;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<DriverEvent>> {
        let this = self.get_mut();
        if this.fd.is_none() {
            return Poll::Ready(None);
        }
        match this.poll_inotify(cx) {
            Ok(true) => return Poll::Ready(Some(DriverEvent::Changed)),
            Ok(false) => {}
            // End, so the core polls instead.
            Err(e) => {
                tracing::warn!(error = %e, "reading inotify failed; the group stream ends");
                this.close();
                return Poll::Ready(None);
            }
        }
        match this.tick.poll_tick(cx) {
            Poll::Ready(_) => Poll::Ready(Some(DriverEvent::Changed)),
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    fn paths(root: &Path) -> GroupPaths {
        for d in ["g", "alive", "leaders"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        GroupPaths {
            group_dir: root.join("g"),
            alive_dir: root.join("alive"),
            leaders_dir: root.join("leaders"),
            leader_lock: "x.lock".into(),
            leader_state: "x.state".into(),
        }
    }

    async fn next_within(w: &mut GroupWatch, d: Duration) -> Option<DriverEvent> {
        tokio::time::timeout(d, w.next()).await.ok().flatten()
    }

    #[tokio::test]
    async fn group_stream_reports_relevant_events_only() {
        let root = std::env::temp_dir().join(format!("tooz-file-watch-{}", uuid::Uuid::new_v4()));
        let p = paths(&root);
        let mut w = GroupWatch::new(p, Duration::from_secs(3600)).unwrap();
        let short = Duration::from_millis(300);
        assert_eq!(next_within(&mut w, short).await, None);

        std::fs::write(root.join("g/a.raw"), b"x").unwrap();
        assert_eq!(
            next_within(&mut w, Duration::from_secs(5)).await,
            Some(DriverEvent::Changed)
        );
        while next_within(&mut w, short).await.is_some() {}

        // Readers opening read-only in alive/ or leaders/ do not wake the stream.
        std::fs::write(root.join("alive/f"), b"").unwrap();
        while next_within(&mut w, short).await.is_some() {}
        let _ = std::fs::read(root.join("alive/f")).unwrap();
        std::fs::write(root.join("leaders/other.lock"), b"").unwrap();
        assert_eq!(next_within(&mut w, short).await, None);

        // A writer closing its liveness file does.
        drop(
            std::fs::OpenOptions::new()
                .write(true)
                .open(root.join("alive/f"))
                .unwrap(),
        );
        assert_eq!(
            next_within(&mut w, Duration::from_secs(5)).await,
            Some(DriverEvent::Changed)
        );
        // So does the group's leader lock being closed by a writer.
        std::fs::write(root.join("leaders/x.lock"), b"").unwrap();
        assert_eq!(
            next_within(&mut w, Duration::from_secs(5)).await,
            Some(DriverEvent::Changed)
        );

        // The group directory removed and recreated: re-armed.
        std::fs::remove_dir_all(root.join("g")).unwrap();
        assert_eq!(
            next_within(&mut w, Duration::from_secs(5)).await,
            Some(DriverEvent::Changed)
        );
        std::fs::create_dir_all(root.join("g")).unwrap();
        while next_within(&mut w, Duration::from_millis(1500))
            .await
            .is_some()
        {}
        std::fs::write(root.join("g/b.raw"), b"x").unwrap();
        assert_eq!(
            next_within(&mut w, Duration::from_secs(5)).await,
            Some(DriverEvent::Changed)
        );
        drop(w);
        std::fs::remove_dir_all(root).unwrap();
    }

    #[tokio::test]
    async fn group_stream_ticks() {
        let root = std::env::temp_dir().join(format!("tooz-file-watch-{}", uuid::Uuid::new_v4()));
        let mut w = GroupWatch::new(paths(&root), Duration::from_millis(50)).unwrap();
        assert_eq!(
            next_within(&mut w, Duration::from_secs(5)).await,
            Some(DriverEvent::Changed)
        );
        assert_eq!(
            next_within(&mut w, Duration::from_secs(5)).await,
            Some(DriverEvent::Changed)
        );
        drop(w);
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn group_stream_without_io_driver_is_none() {
        let root = std::env::temp_dir().join(format!("tooz-file-watch-{}", uuid::Uuid::new_v4()));
        let p = paths(&root);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async { assert!(GroupWatch::new(p, Duration::from_secs(1)).is_none()) });
        std::fs::remove_dir_all(root).unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn group_stream_on_a_multi_thread_runtime() {
        let root = std::env::temp_dir().join(format!("tooz-file-watch-{}", uuid::Uuid::new_v4()));
        let mut w = GroupWatch::new(paths(&root), Duration::from_secs(3600)).unwrap();
        let writer = tokio::task::spawn_blocking({
            let f = root.join("g/c.raw");
            move || std::fs::write(f, b"x").unwrap()
        });
        assert_eq!(
            next_within(&mut w, Duration::from_secs(5)).await,
            Some(DriverEvent::Changed)
        );
        writer.await.unwrap();
        drop(w);
        std::fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn file_watch_wakes_on_close() {
        let p = std::env::temp_dir().join(format!("tooz-file-fw-{}", uuid::Uuid::new_v4()));
        std::fs::write(&p, b"").unwrap();
        let w = FileWatch::new(&p).unwrap();
        assert!(!w.wait(Duration::from_millis(20)));
        drop(std::fs::OpenOptions::new().write(true).open(&p).unwrap());
        assert!(w.wait(Duration::from_secs(5)));
        assert!(!w.wait(Duration::from_millis(20)), "drained");
        std::fs::remove_file(&p).unwrap();
    }
}
