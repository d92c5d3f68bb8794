//! inotify-driven wake-ups: for blocked lock acquisitions and for group event
//! streams.
//!
//! inotify descriptors are read on blocking threads with `poll(2)` and a bounded
//! timeout (tokio's `AsyncFd` would need `unsafe` registration, and panics on a
//! runtime without an I/O driver). When an instance cannot be had (the per-user
//! limit `fs.inotify.max_user_instances` is reached) callers fall back to polling.

use std::collections::HashSet;
use std::ffi::OsString;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::Stream;
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, InotifyEvent, WatchDescriptor};
use tokio::sync::mpsc;
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

fn poll_timeout(d: Option<Duration>) -> PollTimeout {
    match d {
        None => PollTimeout::NONE,
        Some(d) => PollTimeout::try_from(d).unwrap_or(PollTimeout::MAX),
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
        match poll(&mut fds, poll_timeout(Some(timeout))) {
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

/// The inotify side of a group stream, owned by its thread.
struct Watcher {
    ino: Inotify,
    paths: GroupPaths,
    group_wd: Option<WatchDescriptor>,
    alive_wd: Option<WatchDescriptor>,
    leaders_wd: Option<WatchDescriptor>,
}

impl Watcher {
    /// Adds the watches that are missing (at start, and after a watched
    /// directory was removed and maybe recreated).
    fn arm(&mut self) {
        if self.group_wd.is_none() {
            self.group_wd = self.ino.add_watch(&self.paths.group_dir, GROUP_MASK).ok();
        }
        if self.alive_wd.is_none() {
            self.alive_wd = self.ino.add_watch(&self.paths.alive_dir, ALIVE_MASK).ok();
        }
        if self.leaders_wd.is_none() {
            self.leaders_wd = self
                .ino
                .add_watch(&self.paths.leaders_dir, LEADERS_MASK)
                .ok();
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

    /// The thread: waits on inotify and on the stop socket; sends a (coalesced)
    /// wake-up for every batch of relevant events. Ends when the stream is
    /// dropped (the other end of the socket closes) or on an inotify error.
    fn run(mut self, stop: UnixStream, tx: mpsc::Sender<()>) {
        loop {
            // Fully armed: wait for events only; else retry arming every second.
            let timeout = if self.fully_armed() {
                None
            } else {
                Some(Duration::from_secs(1))
            };
            let mut fds = [
                PollFd::new(self.ino.as_fd(), PollFlags::POLLIN),
                PollFd::new(stop.as_fd(), PollFlags::POLLIN),
            ];
            let ready = match poll(&mut fds, poll_timeout(timeout)) {
                Ok(n) => n,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "polling inotify failed; the group stream ends");
                    return;
                }
            };
            let stop_ready = fds[1].any().unwrap_or(true);
            let ino_ready = fds[0].any().unwrap_or(false);
            if stop_ready {
                return;
            }
            if ready == 0 || !ino_ready {
                let was = self.fully_armed();
                self.arm();
                if !was && self.fully_armed() && tx.try_send(()).is_err() && tx.is_closed() {
                    return;
                }
                continue;
            }
            let events = match read_all(&self.ino) {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(error = %e, "reading inotify failed; the group stream ends");
                    return;
                }
            };
            let mut seen = HashSet::new();
            let mut hit = false;
            for ev in &events {
                if seen.insert((ev.wd, ev.mask.bits(), ev.name.clone())) {
                    hit |= self.relevant(ev);
                }
            }
            if hit {
                match tx.try_send(()) {
                    // Full: a wake-up is already pending, which covers this one.
                    Ok(()) | Err(mpsc::error::TrySendError::Full(())) => {}
                    Err(mpsc::error::TrySendError::Closed(())) => return,
                }
            }
        }
    }
}

/// The event stream of one group: `Changed` for every batch of relevant
/// inotify events and on a timer tick (for Python members that expire by
/// modification time without any file event). Dropping it stops its thread.
#[derive(Debug)]
pub(crate) struct GroupWatch {
    rx: mpsc::Receiver<()>,
    tick: Interval,
    _stop: UnixStream,
}

impl GroupWatch {
    /// Starts watching; `None` when inotify or a thread is unavailable (the
    /// core then polls).
    pub(crate) fn new(paths: GroupPaths, tick: Duration) -> Option<Self> {
        let ino = new_inotify()?;
        let (stop_keep, stop_thread) = UnixStream::pair()
            .map_err(|e| tracing::debug!(error = %e, "cannot create a socket pair; polling"))
            .ok()?;
        let mut w = Watcher {
            ino,
            paths,
            group_wd: None,
            alive_wd: None,
            leaders_wd: None,
        };
        w.arm();
        let (tx, rx) = mpsc::channel(1);
        std::thread::Builder::new()
            .name("tooz-file-watch".into())
            .spawn(move || w.run(stop_thread, tx))
            .map_err(|e| tracing::debug!(error = %e, "cannot start a watch thread; polling"))
            .ok()?;
        let tick = tick.max(Duration::from_millis(10));
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + tick, tick);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Some(GroupWatch {
            rx,
            tick,
            _stop: stop_keep,
        })
    }
}

impl Stream for GroupWatch {
    type Item = DriverEvent;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<DriverEvent>> {
        let this = self.get_mut();
        match this.rx.poll_recv(cx) {
            Poll::Ready(Some(())) => return Poll::Ready(Some(DriverEvent::Changed)),
            // The thread ended (inotify failed): end, so the core polls instead.
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => {}
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
