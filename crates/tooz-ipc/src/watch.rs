//! Push for membership and leader changes: inotify on the group's directory
//! (records written, renamed in, removed), on `alive/` (a coordinator stopping, or
//! its process dying and the kernel closing its liveness file) and on `leaders/`
//! (this group's leader file). Each batch of events is one
//! [`DriverEvent::Changed`]; the core re-reads the group.
//!
//! A process that dies closes its liveness file just *before* the kernel drops its
//! lock on it, so after an `alive/` event the stream says `Changed` again 5 ms
//! and 50 ms later (two timers, not a poll) to catch the lock going.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::Path;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::time::Instant;
use tooz_core::driver::{DriverEvent, DriverEventStream};

/// An inotify instance, for [`AsyncFd`].
#[derive(Debug)]
struct Ino(Inotify);

impl AsRawFd for Ino {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// Registers an inotify instance with the runtime's reactor.
///
/// tokio deprecated its safe constructors because, for an arbitrary `T`, they
/// cannot promise that the descriptor stays open and the same while registered.
/// Here it holds: `Ino` owns its descriptor and never changes it, and the
/// `AsyncFd` owns the `Ino` until it is dropped.
#[expect(
    deprecated,
    reason = "the safe constructor; its condition holds for Ino"
)]
fn register(ino: Ino) -> io::Result<AsyncFd<Ino>> {
    AsyncFd::with_interest(ino, Interest::READABLE)
}

#[derive(Debug)]
struct GroupWatch {
    fd: AsyncFd<Ino>,
    alive: WatchDescriptor,
    leaders: WatchDescriptor,
    leader_name: String,
    rechecks: VecDeque<Instant>,
}

/// What a batch of events means.
enum Batch {
    /// Nothing for us (another group's leader file).
    Nothing,
    /// Something changed; `alive` when a liveness file did.
    Changed { alive: bool },
}

impl GroupWatch {
    fn drain(&self) -> io::Result<Batch> {
        let (mut any, mut seen, mut alive) = (false, false, false);
        loop {
            match self.fd.get_ref().0.read_events() {
                Ok(evs) if !evs.is_empty() => {
                    any = true;
                    for e in evs {
                        if e.wd == self.leaders {
                            if e.name.as_deref().and_then(|n| n.to_str()) == Some(&self.leader_name)
                            {
                                seen = true;
                            }
                        } else {
                            seen = true;
                            alive |= e.wd == self.alive;
                        }
                    }
                }
                Ok(_) | Err(Errno::EAGAIN) if any => {
                    return Ok(if seen {
                        Batch::Changed { alive }
                    } else {
                        Batch::Nothing
                    });
                }
                Ok(_) | Err(Errno::EAGAIN) => return Err(io::ErrorKind::WouldBlock.into()),
                Err(Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    async fn next(&mut self) -> Option<DriverEvent> {
        loop {
            let recheck = self.rechecks.front().copied();
            let sleep = async {
                match recheck {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = sleep => {
                    self.rechecks.pop_front();
                    return Some(DriverEvent::Changed);
                }
                ready = self.fd.readable() => {
                    let mut ready = match ready {
                        Ok(r) => r,
                        Err(e) => {
                            tracing::warn!(error = %e, "inotify failed; the group watch ends");
                            return None;
                        }
                    };
                    match ready.try_io(|_| self.drain()) {
                        Ok(Ok(Batch::Changed { alive })) => {
                            if alive {
                                let now = Instant::now();
                                self.rechecks = [5, 50]
                                    .into_iter()
                                    .map(|ms| now + Duration::from_millis(ms))
                                    .collect();
                            }
                            return Some(DriverEvent::Changed);
                        }
                        Ok(Ok(Batch::Nothing)) | Err(_) => {}
                        Ok(Err(e)) => {
                            tracing::warn!(error = %e, "reading inotify failed; the group watch ends");
                            return None;
                        }
                    }
                }
            }
        }
    }
}

/// A stream of changes of the group whose directory is `group_dir`. `None` when
/// inotify is unavailable (the core then polls).
pub(crate) fn group_stream(
    group_dir: &Path,
    alive_dir: &Path,
    leaders_dir: &Path,
    leader_name: String,
) -> Option<DriverEventStream> {
    let ino = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
        .map_err(|e| tracing::debug!(error = %e, "inotify unavailable; polling"))
        .ok()?;
    let dir_events = AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_CLOSE_WRITE;
    let add = |p: &Path| {
        ino.add_watch(p, dir_events)
            .map_err(|e| tracing::debug!(path = %p.display(), error = %e, "cannot watch; polling"))
            .ok()
    };
    add(group_dir)?;
    let alive = add(alive_dir)?;
    let leaders = add(leaders_dir)?;
    // `AsyncFd` panics on a runtime built without I/O.
    let fd = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| register(Ino(ino))))
        .map_err(|_| tracing::debug!("no I/O driver in this runtime; polling"))
        .ok()?
        .map_err(|e| tracing::debug!(error = %e, "cannot register inotify; polling"))
        .ok()?;
    let watch = GroupWatch {
        fd,
        alive,
        leaders,
        leader_name,
        rechecks: VecDeque::new(),
    };
    Some(Box::pin(futures_util::stream::unfold(
        watch,
        |mut w| async move { w.next().await.map(|e| (e, w)) },
    )))
}
