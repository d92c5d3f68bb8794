//! Python tooz's semaphore lock protocol, synchronous (callers run waits on a
//! blocking thread).
//!
//! A lock is a set of one semaphore at `ftok(name, "__TOOZ_LOCK_")`: created
//! exclusively with value 1 (or opened when it exists), taken with `SEM_UNDO` so the
//! kernel gives it back when the holder dies, released by **removing** it (waiters
//! get `EIDRM` and start over by creating it again).
//!
//! Shared holds (ours; Python has none across processes) count themselves in a
//! second semaphore at `ftok(name, "__TOOZ_RS_READERS_")`, with `SEM_UNDO`: a
//! shared acquirer takes the lock semaphore for an instant, adds itself to the
//! readers and gives the lock semaphore back; an exclusive acquirer, once it holds
//! the lock semaphore, also needs the reader count to be zero.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::sys::{self, Key};

/// The longest single kernel wait, so that a cancelled waiter notices within it.
const WAIT_SLICE: Duration = Duration::from_millis(100);

fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

/// The semaphore was removed (or never existed) under us: start over.
fn is_gone(e: &io::Error) -> bool {
    matches!(errno(e), libc::EIDRM | libc::EINVAL | libc::ENOENT)
}

/// Opens the lock semaphore at `key`, creating it with value 1 when absent
/// (Python's `IPC_CREX` then open).
pub(crate) fn open_lock(key: Key) -> io::Result<libc::c_int> {
    loop {
        match sys::sem_create_excl(key) {
            Ok(id) => {
                match sys::sem_setval(id, 1) {
                    Ok(()) => return Ok(id),
                    // Removed right after we made it: start over.
                    Err(e) if is_gone(&e) => continue,
                    Err(e) => return Err(e),
                }
            }
            Err(e) if errno(&e) == libc::EEXIST => match sys::sem_open(key) {
                Ok(id) => return Ok(id),
                Err(e) if is_gone(&e) => continue,
                Err(e) => return Err(e),
            },
            Err(e) => return Err(e),
        }
    }
}

/// A hold on the lock semaphore (its id), or on the reader count (shared).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Holding {
    /// Holds the lock semaphore `id` (removing it releases).
    Exclusive(libc::c_int),
    /// Counted in the reader semaphore `id`.
    Shared(libc::c_int),
}

/// What stops a wait early.
#[derive(Debug)]
pub(crate) struct Until<'a> {
    /// `None`: forever.
    pub(crate) deadline: Option<Instant>,
    /// Set when the acquirer went away.
    pub(crate) cancelled: &'a AtomicBool,
}

impl Until<'_> {
    /// `None` when the wait is over, else how long the next kernel wait may last.
    fn slice(&self) -> Option<Duration> {
        if self.cancelled.load(Ordering::Acquire) {
            return None;
        }
        match self.deadline {
            None => Some(WAIT_SLICE),
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                (!left.is_zero()).then(|| left.min(WAIT_SLICE))
            }
        }
    }
}

/// One kernel operation on the lock semaphore: `Ok(true)` done, `Ok(false)` would
/// block / timed out, `Err` for anything else (`is_gone` included).
fn op(id: libc::c_int, op: libc::c_short, wait: Option<Duration>) -> io::Result<bool> {
    let flags = if op == 0 { 0 } else { libc::SEM_UNDO };
    let flags = if wait.is_none() {
        flags | libc::IPC_NOWAIT
    } else {
        flags
    };
    match sys::sem_op(id, op, flags, wait) {
        Ok(()) => Ok(true),
        Err(e) if errno(&e) == libc::EAGAIN => Ok(false),
        Err(e) if errno(&e) == libc::EINTR => Ok(false),
        Err(e) => Err(e),
    }
}

/// Whether no shared holder counts itself in the readers of `name`'s key.
fn no_readers(readers_key: Key, wait: Option<Duration>) -> io::Result<bool> {
    match sys::sem_open(readers_key) {
        Ok(rid) => match op(rid, 0, wait) {
            Ok(free) => Ok(free),
            Err(e) if is_gone(&e) => Ok(true),
            Err(e) => Err(e),
        },
        Err(e) if is_gone(&e) => Ok(true),
        Err(e) => Err(e),
    }
}

/// Gives back a lock semaphore taken for an instant (a shared acquirer's, or an
/// exclusive acquirer's that found readers) the way every release does: by
/// removing it, so that no idle semaphore is left behind.
fn give_back(id: libc::c_int) {
    if let Err(e) = sys::sem_remove(id)
        && !is_gone(&e)
    {
        tracing::warn!(error = %e, "cannot give back an IPC lock semaphore");
    }
}

/// Tries once, or waits as `until` says (`None`: do not wait), for `mode` on the
/// lock at `key`. `Ok(None)` when held by others (at the deadline, or cancelled).
pub(crate) fn acquire(
    key: Key,
    readers_key: Key,
    shared: bool,
    until: Option<&Until<'_>>,
) -> io::Result<Option<Holding>> {
    loop {
        let id = match sys::sem_create_excl(key) {
            // Ours, new: take it at once (it has no waiters to wake).
            Ok(id) => match sys::sem_take_fresh(id) {
                Ok(()) => id,
                Err(e) if is_gone(&e) => continue,
                Err(e) => return Err(e),
            },
            Err(e) if errno(&e) == libc::EEXIST => {
                let id = match sys::sem_open(key) {
                    Ok(id) => id,
                    Err(e) if is_gone(&e) => continue,
                    Err(e) => return Err(e),
                };
                let wait = match until {
                    None => None,
                    Some(u) => match u.slice() {
                        Some(s) => Some(s),
                        None => return Ok(None),
                    },
                };
                match op(id, -1, wait) {
                    Ok(true) => id,
                    Ok(false) if until.is_none() => return Ok(None),
                    Ok(false) => continue,
                    Err(e) if is_gone(&e) => continue,
                    Err(e) => return Err(e),
                }
            }
            Err(e) => return Err(e),
        };
        // We hold the lock semaphore `id`.
        if shared {
            let counted = loop {
                let rid = match sys::sem_open_or_create(readers_key) {
                    Ok(rid) => rid,
                    Err(e) => break Err(e),
                };
                match op(rid, 1, None) {
                    Ok(_) => break Ok(rid),
                    // Removed by its last reader or `break_lock` meanwhile.
                    Err(e) if is_gone(&e) => continue,
                    Err(e) => break Err(e),
                }
            };
            give_back(id);
            return counted.map(|rid| Some(Holding::Shared(rid)));
        }
        match no_readers(readers_key, None) {
            Ok(true) => return Ok(Some(Holding::Exclusive(id))),
            Ok(false) => {
                give_back(id);
                let Some(u) = until else { return Ok(None) };
                let Some(slice) = u.slice() else {
                    return Ok(None);
                };
                // Wait for the readers to leave, then start over.
                no_readers(readers_key, Some(slice))?;
            }
            Err(e) => {
                give_back(id);
                return Err(e);
            }
        }
    }
}

/// Releases a hold: removes the lock semaphore (Python's release) or leaves the
/// readers. `false` when the hold was already gone (broken).
///
/// The last reader to leave removes the reader count, if it can take the lock
/// semaphore at once (shared acquirers count themselves only while holding it, so
/// none can be counting itself in at that moment).
pub(crate) fn release(key: Key, h: Holding) -> io::Result<bool> {
    let res = match h {
        Holding::Exclusive(id) => sys::sem_remove(id),
        Holding::Shared(rid) => {
            let main = open_lock(key)
                .ok()
                .filter(|&id| op(id, -1, None).unwrap_or(false));
            let left = match op(rid, -1, None) {
                Ok(true) => Ok(()),
                // Nothing to take: the count was reset by `break_lock`.
                Ok(false) => {
                    if let Some(id) = main {
                        give_back(id);
                    }
                    return Ok(false);
                }
                Err(e) => Err(e),
            };
            if left.is_ok() && main.is_some() && sys::sem_getval(rid).is_ok_and(|v| v == 0) {
                let _ = sys::sem_remove(rid);
            }
            if let Some(id) = main {
                give_back(id);
            }
            left
        }
    };
    match res {
        Ok(()) => Ok(true),
        Err(e) if is_gone(&e) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Whether a hold still stands (not broken).
pub(crate) fn still_held(h: Holding) -> io::Result<bool> {
    match h {
        Holding::Exclusive(id) => match sys::sem_getval(id) {
            Ok(v) => Ok(v == 0),
            Err(e) if is_gone(&e) => Ok(false),
            Err(e) => Err(e),
        },
        Holding::Shared(rid) => match sys::sem_getval(rid) {
            Ok(v) => Ok(v > 0),
            Err(e) if is_gone(&e) => Ok(false),
            Err(e) => Err(e),
        },
    }
}

/// Python's `break_`: removes the lock semaphore (and, ours, the reader count).
/// `true` if the lock was held.
pub(crate) fn break_lock(key: Key, readers_key: Key) -> io::Result<bool> {
    let mut was_held = false;
    match sys::sem_open(key) {
        Ok(id) => {
            was_held = sys::sem_getval(id).map(|v| v == 0).unwrap_or(false);
            match sys::sem_remove(id) {
                Ok(()) => {}
                Err(e) if is_gone(&e) => {}
                Err(e) => return Err(e),
            }
        }
        Err(e) if is_gone(&e) => {}
        Err(e) => return Err(e),
    }
    match sys::sem_open(readers_key) {
        Ok(rid) => {
            was_held |= sys::sem_getval(rid).map(|v| v > 0).unwrap_or(false);
            match sys::sem_remove(rid) {
                Ok(()) => {}
                Err(e) if is_gone(&e) => {}
                Err(e) => return Err(e),
            }
        }
        Err(e) if is_gone(&e) => {}
        Err(e) => return Err(e),
    }
    Ok(was_held)
}

/// Holds Python's internal lock (`TOOZ_INTERNAL_LOCK`) for the group list; removes
/// it (Python's release) on drop.
#[derive(Debug)]
pub(crate) struct InternalLock(libc::c_int);

impl InternalLock {
    /// Waits at most `max_wait` for the internal lock.
    pub(crate) fn take(max_wait: Duration) -> io::Result<InternalLock> {
        let key = crate::keys::lock_key(crate::keys::INTERNAL_LOCK_NAME);
        let never = AtomicBool::new(false);
        let until = Until {
            deadline: Some(Instant::now() + max_wait),
            cancelled: &never,
        };
        loop {
            let id = open_lock(key)?;
            let Some(slice) = until.slice() else {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("waited {max_wait:?} for tooz's internal IPC lock"),
                ));
            };
            match op(id, -1, Some(slice)) {
                Ok(true) => return Ok(InternalLock(id)),
                Ok(false) => {}
                Err(e) if is_gone(&e) => {}
                Err(e) => return Err(e),
            }
        }
    }
}

impl Drop for InternalLock {
    fn drop(&mut self) {
        if let Err(e) = sys::sem_remove(self.0)
            && !is_gone(&e)
        {
            tracing::warn!(error = %e, "cannot release tooz's internal IPC lock");
        }
    }
}
