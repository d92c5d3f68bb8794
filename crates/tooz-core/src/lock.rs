//! Distributed locks: exclusive and shared, with fencing tokens, loss signals and
//! RAII guards.
//!
//! ```no_run
//! # async fn demo(coord: tooz_core::Coordinator) -> tooz_core::Result<()> {
//! use std::time::Duration;
//! use tooz_core::Wait;
//!
//! let lock = coord.get_lock("resize-volume-42")?;
//! if let Some(guard) = lock.guard(Wait::For(Duration::from_secs(5))).await? {
//!     // Pass the token along with every write so stale holders can be refused.
//!     println!("holding with fencing token {}", guard.token());
//!     guard.release().await?;
//! }
//! # Ok(()) }
//! ```

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::sync::{Notify, oneshot, watch};
use tokio::time::Instant;

use crate::coordinator::Shared;
use crate::driver::DriverLock;
use crate::error::{Result, ToozError};
use crate::ids::LockName;

/// How long `acquire` may wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Wait {
    /// Try once.
    No,
    /// Wait until acquired (or the coordinator stops).
    #[default]
    Forever,
    /// Wait at most this long; running out returns `Ok(false)`, never an error.
    For(Duration),
}

impl Wait {
    /// tooz's numeric `blocking`: a number of seconds to wait (negative or NaN means
    /// "try once").
    pub fn from_secs_f64(secs: f64) -> Self {
        if secs.is_finite() && secs > 0.0 {
            Wait::For(Duration::from_secs_f64(secs.min(1e9)))
        } else if secs == f64::INFINITY {
            Wait::Forever
        } else {
            Wait::No
        }
    }

    /// The deadline this wait implies, measured from now.
    pub fn deadline(self) -> Option<Instant> {
        match self {
            Wait::For(d) => Some(Instant::now() + d),
            _ => None,
        }
    }

    /// What is left of this wait at `deadline` (for passing on to a second stage).
    pub fn remaining(self, deadline: Option<Instant>) -> Wait {
        match (self, deadline) {
            (Wait::For(_), Some(d)) => Wait::For(d.saturating_duration_since(Instant::now())),
            (w, _) => w,
        }
    }
}

impl From<bool> for Wait {
    /// tooz's `blocking=True/False`.
    fn from(blocking: bool) -> Self {
        if blocking { Wait::Forever } else { Wait::No }
    }
}

impl From<Duration> for Wait {
    fn from(d: Duration) -> Self {
        Wait::For(d)
    }
}

/// Exclusive (writer) or shared (reader) mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Mode {
    /// One holder at a time.
    #[default]
    Exclusive,
    /// Any number of shared holders, excluding exclusive ones.
    Shared,
}

/// A number that strictly increases with every grant of one lock name (or one
/// group's leadership), across holders. Pass it with writes to a resource so the
/// resource can refuse a stale holder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FencingToken(pub u64);

impl fmt::Display for FencingToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Resolves when a hold is lost (lease expiry, coordinator stop, lock broken).
#[derive(Debug, Clone)]
pub struct LostSignal(watch::Receiver<bool>);

impl LostSignal {
    /// Whether the hold is already lost.
    pub fn is_lost(&self) -> bool {
        *self.0.borrow()
    }

    /// Waits until the hold is lost. Never resolves while it is held.
    pub async fn lost(mut self) {
        // An error means the sender is gone, which only happens once lost was sent.
        let _ = self.0.wait_for(|lost| *lost).await;
    }
}

#[derive(Debug)]
struct Hold {
    mode: Mode,
    token: FencingToken,
    count: u32,
    lost: watch::Sender<bool>,
}

#[derive(Debug, Default)]
struct State {
    hold: Option<Hold>,
    acquiring: bool,
}

pub(crate) struct LockInner {
    name: LockName,
    driver: Arc<dyn DriverLock>,
    shared: Weak<Shared>,
    state: Mutex<State>,
    changed: Notify,
}

impl fmt::Debug for LockInner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lock").field("name", &self.name).finish()
    }
}

/// A lock of one name, obtained from [`Coordinator::get_lock`](crate::Coordinator::get_lock).
///
/// Not re-entrant in exclusive mode: a held lock object returns `Ok(false)` to a
/// further `acquire(Wait::No)`, and a waiting `acquire` waits for the release. Two
/// lock objects of one name exclude each other, whether they come from one
/// coordinator, two tasks, or two processes. Cloning a `Lock` gives another handle to
/// the same lock object (same hold).
#[derive(Debug, Clone)]
pub struct Lock {
    inner: Arc<LockInner>,
}

impl Lock {
    pub(crate) fn new(name: LockName, driver: Arc<dyn DriverLock>, shared: Weak<Shared>) -> Self {
        Lock {
            inner: Arc::new(LockInner {
                name,
                driver,
                shared,
                state: Mutex::new(State::default()),
                changed: Notify::new(),
            }),
        }
    }

    /// The lock name.
    pub fn name(&self) -> &LockName {
        &self.inner.name
    }

    /// Acquires exclusively. `Ok(true)` when acquired, `Ok(false)` when the wait ran
    /// out (never an error for a timeout).
    ///
    /// # Errors
    /// `NotStarted`, `Stopped` (the coordinator stopped while waiting), or a backend error.
    ///
    /// # Cancel safety
    /// Cancel-safe: if the future is dropped, a lock won afterwards is released.
    pub async fn acquire(&self, wait: impl Into<Wait>) -> Result<bool> {
        self.acquire_with(Mode::Exclusive, wait.into()).await
    }

    /// Acquires in shared (reader) mode. A lock object held shared can be acquired
    /// shared again; each acquisition needs one release.
    ///
    /// # Errors
    /// As [`Lock::acquire`].
    pub async fn acquire_shared(&self, wait: impl Into<Wait>) -> Result<bool> {
        self.acquire_with(Mode::Shared, wait.into()).await
    }

    /// Acquires in the given mode.
    ///
    /// # Errors
    /// As [`Lock::acquire`].
    pub async fn acquire_with(&self, mode: Mode, wait: Wait) -> Result<bool> {
        let shared = self.inner.shared.upgrade().ok_or(ToozError::Stopped)?;
        let stop = shared.stop_token()?;
        let deadline = wait.deadline();
        // Local gate: one hold and one acquisition at a time per lock object.
        loop {
            let notified = self.inner.changed.notified();
            {
                let mut st = self.state();
                let acquiring = st.acquiring;
                match &mut st.hold {
                    Some(h) if h.mode == Mode::Shared && mode == Mode::Shared => {
                        h.count += 1;
                        return Ok(true);
                    }
                    None if !acquiring => {
                        st.acquiring = true;
                        break;
                    }
                    _ => {}
                }
            }
            if wait == Wait::No {
                return Ok(false);
            }
            tokio::select! {
                _ = notified => {}
                _ = stop.cancelled() => return Err(ToozError::Stopped),
                _ = sleep_until_opt(deadline) => return Ok(false),
            }
        }
        let remaining = wait.remaining(deadline);
        let (tx, rx) = oneshot::channel();
        let inner = Arc::clone(&self.inner);
        let task_stop = stop.clone();
        tokio::spawn(async move {
            let res = tokio::select! {
                r = inner.driver.acquire(mode, remaining) => r,
                _ = task_stop.cancelled() => Err(ToozError::Stopped),
            };
            let res = match res {
                Ok(Some(token)) => {
                    {
                        let mut st = inner.state();
                        st.hold = Some(Hold {
                            mode,
                            token,
                            count: 1,
                            lost: watch::channel(false).0,
                        });
                        st.acquiring = false;
                    }
                    if let Some(shared) = inner.shared.upgrade() {
                        shared.register_lock(&inner);
                    }
                    Ok(true)
                }
                Ok(None) => {
                    inner.state().acquiring = false;
                    Ok(false)
                }
                Err(e) => {
                    inner.state().acquiring = false;
                    Err(e)
                }
            };
            inner.changed.notify_waiters();
            if let Err(Ok(true)) = tx.send(res) {
                // The caller went away: do not leak the lock.
                let _ = inner.release_hold(true).await;
            }
        });
        rx.await.unwrap_or(Err(ToozError::Stopped))
    }

    /// Releases one hold. `Ok(false)` if this lock object did not hold the lock (or
    /// the hold was lost); never frees somebody else's lock.
    ///
    /// # Errors
    /// A backend error; the local hold is cleared anyway.
    pub async fn release(&self) -> Result<bool> {
        self.inner.release_hold(false).await
    }

    /// Renews the hold where the backend needs it (the coordinator's heartbeat does
    /// this for every held lock). `Ok(false)` if not held.
    ///
    /// # Errors
    /// A backend error.
    pub async fn heartbeat(&self) -> Result<bool> {
        self.inner.heartbeat().await
    }

    /// Asks the backend whether this lock object still holds the lock.
    ///
    /// # Errors
    /// A backend error.
    pub async fn is_still_owner(&self) -> Result<bool> {
        if self.state().hold.is_none() {
            return Ok(false);
        }
        self.inner.driver.is_still_owner().await
    }

    /// Forcibly frees the lock, whoever holds it (an operator's tool; tooz `break_`).
    ///
    /// # Errors
    /// A backend error.
    pub async fn break_lock(&self) -> Result<bool> {
        self.inner.driver.break_lock().await
    }

    /// Whether this lock object currently holds the lock (local view).
    pub fn is_held(&self) -> bool {
        self.state().hold.is_some()
    }

    /// The mode of the current hold.
    pub fn mode(&self) -> Option<Mode> {
        self.state().hold.as_ref().map(|h| h.mode)
    }

    /// The fencing token of the current hold.
    pub fn fencing_token(&self) -> Option<FencingToken> {
        self.state().hold.as_ref().map(|h| h.token)
    }

    /// A signal that resolves when the current hold is lost; `None` when not held.
    pub fn lost(&self) -> Option<LostSignal> {
        self.state()
            .hold
            .as_ref()
            .map(|h| LostSignal(h.lost.subscribe()))
    }

    /// Acquires exclusively and returns a guard that releases on drop.
    /// `Ok(None)` when the wait ran out.
    ///
    /// # Errors
    /// As [`Lock::acquire`].
    pub async fn guard(&self, wait: impl Into<Wait>) -> Result<Option<LockGuard>> {
        self.guard_with(Mode::Exclusive, wait.into()).await
    }

    /// Like [`Lock::guard`] in the given mode.
    ///
    /// # Errors
    /// As [`Lock::acquire`].
    pub async fn guard_with(&self, mode: Mode, wait: Wait) -> Result<Option<LockGuard>> {
        if !self.acquire_with(mode, wait).await? {
            return Ok(None);
        }
        let token = self
            .fencing_token()
            .ok_or_else(|| ToozError::LockLost(self.name().clone()))?;
        Ok(Some(LockGuard {
            lock: self.clone(),
            token,
            released: false,
        }))
    }

    /// Acquires or fails with [`ToozError::LockAcquireFailed`] (tooz's `with lock:`).
    ///
    /// # Errors
    /// `LockAcquireFailed` when the wait ran out, or as [`Lock::acquire`].
    pub async fn guard_or_fail(&self, wait: impl Into<Wait>) -> Result<LockGuard> {
        self.guard(wait)
            .await?
            .ok_or_else(|| ToozError::LockAcquireFailed(self.name().clone()))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner.state()
    }
}

impl LockInner {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn is_held(&self) -> bool {
        self.state().hold.is_some()
    }

    /// Releases the hold. `all`: drop every shared count at once (stop, drop).
    pub(crate) async fn release_hold(&self, all: bool) -> Result<bool> {
        {
            let mut st = self.state();
            match &mut st.hold {
                None => return Ok(false),
                Some(h) if h.count > 1 && !all => {
                    h.count -= 1;
                    return Ok(true);
                }
                Some(_) => {}
            }
        }
        let res = self.driver.release().await;
        let hold = self.state().hold.take();
        if let Some(h) = hold {
            h.lost.send_replace(true);
        }
        self.changed.notify_waiters();
        res
    }

    pub(crate) async fn heartbeat(&self) -> Result<bool> {
        if !self.is_held() {
            return Ok(false);
        }
        let ok = self.driver.heartbeat().await?;
        if !ok {
            self.mark_lost();
        }
        Ok(ok)
    }

    /// Signals loss without talking to the backend (the lease is gone).
    pub(crate) fn mark_lost(&self) {
        if let Some(h) = &self.state().hold {
            h.lost.send_replace(true);
        }
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Holds a lock until dropped or released, like tokio's `MutexGuard`.
///
/// Dropping the guard queues the release to a background task; call
/// [`LockGuard::release`] to see the result.
#[must_use = "if unused the lock is released at once"]
#[clippy::has_significant_drop]
#[derive(Debug)]
pub struct LockGuard {
    lock: Lock,
    token: FencingToken,
    released: bool,
}

impl LockGuard {
    /// The fencing token of this hold.
    pub fn token(&self) -> FencingToken {
        self.token
    }

    /// The lock this guard holds.
    pub fn lock(&self) -> &Lock {
        &self.lock
    }

    /// A signal that resolves when this hold is lost.
    pub fn lost(&self) -> LostSignal {
        self.lock
            .lost()
            .unwrap_or_else(|| LostSignal(watch::channel(true).1))
    }

    /// Releases the lock and reports whether it was still held.
    ///
    /// # Errors
    /// A backend error.
    pub async fn release(mut self) -> Result<bool> {
        self.released = true;
        self.lock.release().await
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        let lock = self.lock.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                h.spawn(async move {
                    if let Err(e) = lock.release().await {
                        tracing::warn!(lock = %lock.name(), error = %e, "releasing a dropped lock guard failed");
                    }
                });
            }
            Err(_) => {
                tracing::warn!(lock = %lock.name(), "lock guard dropped outside a tokio runtime; the lock is released when its coordinator stops");
            }
        }
    }
}
