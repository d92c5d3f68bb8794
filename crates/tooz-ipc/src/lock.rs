//! Locks: Python tooz's SysV semaphores (see [`crate::sem`]), waited on by the
//! kernel.
//!
//! An acquisition first tries without waiting, inline (a few system calls, no
//! thread hop). If the lock is held and the caller waits, one blocking-pool thread
//! sleeps in `semtimedop` on the semaphore: a release (the holder removing the
//! semaphore, Python's way), a crashed holder (`SEM_UNDO`) or a `break_lock` wakes
//! it at once. The thread waits in slices of at most 100 ms so that a cancelled
//! acquisition ends it; a grant that finds the acquirer gone is released by the
//! thread itself, so a dropped or timed-out acquire never leaves the lock taken.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use tokio::sync::oneshot;
use tooz_core::driver::DriverLock;
use tooz_core::{FencingToken, LockName, Mode, Result, ToozError, Wait};

use crate::config::NAME;
use crate::fence;
use crate::keys;
use crate::sem::{self, Holding, Until};
use crate::sys::Key;

fn backend(what: &str, name: &LockName, e: std::io::Error) -> ToozError {
    ToozError::backend(NAME, format!("{what} of lock {name}"), e)
}

/// A lock handle.
#[derive(Debug)]
pub(crate) struct IpcLock {
    name: LockName,
    key: Key,
    readers: Key,
    slot: usize,
    hold: Mutex<Option<Holding>>,
}

/// A grant in flight from the waiting thread; released unless taken.
#[derive(Debug)]
struct Grant(Key, Option<Holding>);

impl Drop for Grant {
    fn drop(&mut self) {
        if let Some(h) = self.1.take()
            && let Err(e) = sem::release(self.0, h)
        {
            tracing::warn!(error = %e, "cannot release an abandoned IPC lock grant");
        }
    }
}

/// Tells the waiting thread to give up when the acquisition is dropped.
#[derive(Debug)]
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

impl IpcLock {
    pub(crate) fn new(name: &LockName) -> Self {
        IpcLock {
            name: name.clone(),
            key: keys::lock_key(name.as_bytes()),
            readers: keys::readers_key(name.as_bytes()),
            slot: keys::lock_fence_slot(name.as_bytes()),
            hold: Mutex::new(None),
        }
    }

    fn hold(&self) -> MutexGuard<'_, Option<Holding>> {
        self.hold.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current hold, for the heartbeat.
    pub(crate) fn holding(&self) -> Option<Holding> {
        *self.hold()
    }

    /// One attempt without waiting.
    fn try_once(&self, mode: Mode) -> Result<Option<FencingToken>> {
        match sem::acquire(self.key, self.readers, mode == Mode::Shared, None)
            .map_err(|e| backend("acquisition", &self.name, e))?
        {
            Some(h) => self.granted(Grant(self.key, Some(h))),
            None => Ok(None),
        }
    }

    fn release_now(&self) -> Result<bool> {
        let Some(h) = self.hold().take() else {
            return Ok(false);
        };
        sem::release(self.key, h).map_err(|e| backend("release", &self.name, e))
    }

    /// Records a grant and numbers it; gives it back if numbering fails.
    fn granted(&self, mut grant: Grant) -> Result<Option<FencingToken>> {
        let token = fence::next(self.slot)?;
        *self.hold() = grant.1.take();
        Ok(Some(FencingToken(token)))
    }
}

#[tooz_core::async_trait]
impl DriverLock for IpcLock {
    fn name(&self) -> &LockName {
        &self.name
    }

    fn queues(&self) -> bool {
        true
    }

    /// The uncontended attempt, inline (a few system calls).
    fn try_acquire_local(&self, mode: Mode) -> Option<Result<Option<FencingToken>>> {
        Some(self.try_once(mode))
    }

    /// Removing the semaphore (or leaving the readers) is a system call or two.
    fn release_local(&self) -> Option<Result<bool>> {
        Some(self.release_now())
    }

    #[tracing::instrument(level = "debug", skip(self), fields(lock = %self.name))]
    async fn acquire(&self, mode: Mode, wait: Wait) -> Result<Option<FencingToken>> {
        let shared = mode == Mode::Shared;
        // Uncontended: one attempt inline, no thread hop.
        if let Some(token) = self.try_once(mode)? {
            return Ok(Some(token));
        }
        let deadline = match wait {
            Wait::No => return Ok(None),
            Wait::Forever => None,
            Wait::For(d) => Some(Instant::now() + d),
        };
        let cancelled = Arc::new(AtomicBool::new(false));
        let _cancel = CancelOnDrop(Arc::clone(&cancelled));
        let (tx, rx) = oneshot::channel();
        let (key, readers) = (self.key, self.readers);
        tokio::task::spawn_blocking(move || {
            let until = Until {
                deadline,
                cancelled: &cancelled,
            };
            let res = sem::acquire(key, readers, shared, Some(&until)).map(|h| Grant(key, h));
            // A send to a dropped acquirer drops the grant, which releases it.
            let _ = tx.send(res);
        });
        match rx.await {
            Ok(Ok(grant)) if grant.1.is_some() => self.granted(grant),
            Ok(Ok(_)) => Ok(None),
            Ok(Err(e)) => Err(backend("acquisition", &self.name, e)),
            Err(_) => Err(ToozError::backend_msg(
                NAME,
                format!("the waiting thread of lock {} ended", self.name),
            )),
        }
    }

    async fn release(&self) -> Result<bool> {
        self.release_now()
    }

    async fn heartbeat(&self) -> Result<bool> {
        self.is_still_owner().await
    }

    async fn is_still_owner(&self) -> Result<bool> {
        match self.holding() {
            None => Ok(false),
            Some(h) => sem::still_held(h).map_err(|e| backend("check", &self.name, e)),
        }
    }

    async fn break_lock(&self) -> Result<bool> {
        sem::break_lock(self.key, self.readers).map_err(|e| backend("break", &self.name, e))
    }
}
