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
    /// `None` also for a wait too long to be represented as an instant (which is
    /// then as good as forever).
    pub fn deadline(self) -> Option<Instant> {
        match self {
            Wait::For(d) => Instant::now().checked_add(d),
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

/// This member's leadership of a group, from
/// [`Coordinator::become_leader`](crate::Coordinator::become_leader) or
/// [`Coordinator::try_become_leader`](crate::Coordinator::try_become_leader).
///
/// Carries the grant's fencing token and a loss signal that fires, like a lock's,
/// before the backend can elect somebody else: when the lease it hangs on is lost,
/// when a heartbeat finds the leadership gone, when this member stands down or stops,
/// or when a later campaign finds another leader.
///
/// ```no_run
/// # async fn demo(coord: tooz_core::Coordinator) -> tooz_core::Result<()> {
/// let leadership = coord.become_leader("schedulers").await?;
/// tokio::select! {
///     () = leadership.lost().lost() => eprintln!("no longer leading: stop scheduling"),
///     () = async { /* schedule, passing leadership.token() along */ } => {}
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Leadership {
    pub(crate) group: crate::ids::GroupId,
    pub(crate) token: FencingToken,
    pub(crate) lost: watch::Receiver<bool>,
}

impl Leadership {
    /// The group led.
    pub fn group(&self) -> &crate::ids::GroupId {
        &self.group
    }

    /// The fencing token of this grant: it increases with every grant of the
    /// group's leadership.
    pub fn token(&self) -> FencingToken {
        self.token
    }

    /// A signal that resolves when this leadership is lost.
    pub fn lost(&self) -> LostSignal {
        LostSignal(self.lost.clone())
    }

    /// Whether this leadership is already lost.
    pub fn is_lost(&self) -> bool {
        *self.lost.borrow()
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
    /// A release is talking to the backend: the hold must not be shared further,
    /// nor released twice.
    releasing: bool,
}

pub(crate) struct LockInner {
    name: LockName,
    driver: Arc<dyn DriverLock>,
    shared: Weak<Shared>,
    state: Mutex<State>,
    changed: Notify,
}

impl Drop for LockInner {
    /// The last handle of a held lock went away without releasing it: release it
    /// in the background rather than leave it to a lease (or forever).
    fn drop(&mut self) {
        let held = self
            .state
            .get_mut()
            .map_or_else(|p| p.into_inner().hold.is_some(), |st| st.hold.is_some());
        if !held {
            return;
        }
        let driver = Arc::clone(&self.driver);
        let name = self.name.clone();
        if let Ok(h) = tokio::runtime::Handle::try_current() {
            h.spawn(async move {
                if let Err(e) = driver.release().await {
                    tracing::warn!(lock = %name, error = %e, "releasing a dropped lock failed");
                }
            });
        }
    }
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
        let driver_name = shared.driver_name();
        let deadline = wait.deadline();
        // Local gate: one hold and one acquisition at a time per lock object.
        loop {
            let notified = self.inner.changed.notified();
            {
                let mut st = self.state();
                let (acquiring, releasing) = (st.acquiring, st.releasing);
                match &mut st.hold {
                    Some(h) if !releasing && h.mode == Mode::Shared && mode == Mode::Shared => {
                        h.count += 1;
                        return Ok(true);
                    }
                    None if !acquiring && !releasing => {
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
        // A driver whose attempt is local (a few system calls) tries inline first:
        // nothing to cancel, so no task is needed unless the caller must wait.
        if let Some(res) = self.inner.driver.try_acquire_local(mode) {
            let inner = &self.inner;
            match res {
                Ok(Some(token)) => {
                    crate::observe::granted(driver_name, mode);
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
                        shared.register_lock(inner);
                    }
                    inner.changed.notify_waiters();
                    // As for a grant from the task below.
                    if stop.is_cancelled() {
                        let _ = inner.release_hold(true, Some(token)).await;
                        return Err(ToozError::Stopped);
                    }
                    if inner.shared.upgrade().is_some_and(|s| s.lease_lost()) {
                        let _ = inner.release_hold(true, Some(token)).await;
                        return Err(ToozError::LockLost(inner.name.clone()));
                    }
                    return Ok(true);
                }
                Ok(None) if wait == Wait::No => {
                    inner.state().acquiring = false;
                    inner.changed.notify_waiters();
                    return Ok(false);
                }
                Ok(None) => {}
                Err(e) => {
                    inner.state().acquiring = false;
                    inner.changed.notify_waiters();
                    return Err(e);
                }
            }
        }
        let remaining = wait.remaining(deadline);
        let (mut tx, rx) = oneshot::channel::<(Result<bool>, Option<FencingToken>)>();
        let inner = Arc::clone(&self.inner);
        let task_stop = stop.clone();
        let span = crate::observe::lock_span(driver_name, "acquire", &inner.name);
        let started = std::time::Instant::now();
        tokio::spawn(async move {
            // The wait also ends when the caller goes away (its future dropped): a
            // queueing driver's wait is dropped (it is cancel-safe), the attempt loop
            // stops between attempts.
            let attempt = async {
                if inner.driver.queues() {
                    tokio::select! {
                        r = inner.driver.acquire(mode, remaining) => r,
                        _ = task_stop.cancelled() => Err(ToozError::Stopped),
                        () = tx.closed() => Err(ToozError::Stopped),
                    }
                } else {
                    let gone = task_stop.child_token();
                    let attempt =
                        engine::acquire_in(driver_name, &*inner.driver, mode, remaining, &gone);
                    tokio::pin!(attempt);
                    tokio::select! {
                        r = &mut attempt => r,
                        () = tx.closed() => {
                            gone.cancel();
                            attempt.await
                        }
                    }
                }
            };
            let res = match tracing::Instrument::instrument(attempt, span.clone()).await {
                // `stop` cancels the waits before it ends the driver's session: a
                // wait that failed because the session ended (both were ready when
                // this task ran) was ended by the stop.
                Err(e) if task_stop.is_cancelled() && !matches!(e, ToozError::Stopped) => {
                    tracing::debug!(lock = %inner.name, error = %e, "a wait failed while stopping");
                    Err(ToozError::Stopped)
                }
                r => r,
            };
            crate::observe::lock_done(driver_name, "acquire", &span, started, &res);
            if let Ok(Some(t)) = &res {
                span.record("token", t.0);
                crate::observe::granted(driver_name, mode);
            }
            let mut won = None;
            let res = match res {
                Ok(Some(token)) => {
                    won = Some(token);
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
            let res = match won {
                // `stop` ran while the backend granted the lock: it may already have
                // released what it found held, so this hold must not outlive it.
                Some(token) if task_stop.is_cancelled() => {
                    let _ = inner.release_hold(true, Some(token)).await;
                    Err(ToozError::Stopped)
                }
                // The lease was declared lost while the grant was on its way: the
                // loss signal of this hold would never fire, so it is not handed out.
                Some(token) if inner.shared.upgrade().is_some_and(|s| s.lease_lost()) => {
                    let _ = inner.release_hold(true, Some(token)).await;
                    Err(ToozError::LockLost(inner.name.clone()))
                }
                _ => res,
            };
            if let Err((Ok(true), Some(token))) = tx.send((res, won)) {
                // The caller went away: do not leak its hold (only its own: another
                // handle may have joined a shared hold meanwhile).
                let _ = inner.release_hold(false, Some(token)).await;
            }
        });
        // If this future is dropped after the task sent a grant but before it was
        // read, the guard releases that hold (the send above succeeded, so the task
        // will not).
        let mut pending = PendingGrant {
            rx: Some(rx),
            inner: Arc::clone(&self.inner),
        };
        let res = match pending.rx.as_mut() {
            Some(rx) => rx.await.map_or(Err(ToozError::Stopped), |(res, _)| res),
            None => Err(ToozError::Stopped),
        };
        pending.rx = None;
        res
    }

    /// Releases one hold. `Ok(false)` if this lock object did not hold the lock (or
    /// the hold was lost); never frees somebody else's lock.
    ///
    /// # Errors
    /// A backend error; the local hold is cleared anyway.
    pub async fn release(&self) -> Result<bool> {
        self.inner.release_hold(false, None).await
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

    /// Whether this lock object currently holds the lock (local view; `false` as
    /// soon as the hold's loss is signalled).
    pub fn is_held(&self) -> bool {
        self.inner.is_held()
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

    /// The current hold as the heartbeat sees it.
    pub(crate) fn held_lock(&self) -> Option<crate::driver::HeldLock> {
        let st = self.state();
        let h = st.hold.as_ref().filter(|h| !*h.lost.borrow())?;
        Some(crate::driver::HeldLock::new(
            Arc::clone(&self.driver),
            h.mode,
            h.token,
        ))
    }

    /// Whether `held` describes this lock object's current hold.
    pub(crate) fn is_hold(&self, held: &crate::driver::HeldLock) -> bool {
        Arc::ptr_eq(&self.driver, &held.lock)
            && self
                .state()
                .hold
                .as_ref()
                .is_some_and(|h| h.token == held.token)
    }

    pub(crate) fn is_held(&self) -> bool {
        self.state()
            .hold
            .as_ref()
            .is_some_and(|h| !*h.lost.borrow())
    }

    /// Releases the hold. `all`: drop every shared count at once (stop).
    /// `token`: only if the current hold is that grant (a guard must not release a
    /// later hold of the same lock object).
    ///
    /// The backend release runs in a task of its own: it completes (and the hold is
    /// cleared) even when the caller's future is dropped.
    pub(crate) async fn release_hold(
        self: &Arc<Self>,
        all: bool,
        token: Option<FencingToken>,
    ) -> Result<bool> {
        {
            let mut st = self.state();
            if st.releasing {
                return Ok(false);
            }
            match &mut st.hold {
                None => return Ok(false),
                Some(h) if token.is_some_and(|t| t != h.token) => return Ok(false),
                Some(h) if h.count > 1 && !all => {
                    h.count -= 1;
                    return Ok(true);
                }
                Some(_) => {}
            }
            st.releasing = true;
        }
        // From here on the lock object no longer holds (its guard's `lost()` fires),
        // whatever the backend answers; `releasing` keeps new acquisitions out until
        // the backend release is over.
        let was_lost = match self.state().hold.take() {
            Some(h) => h.lost.send_replace(true),
            None => false,
        };
        // A driver whose release is local releases inline (no task hop).
        let releasing = Releasing(self);
        match self.driver.release_local() {
            Some(res) => {
                drop(releasing);
                return res.map(|released| released && !was_lost);
            }
            // The task below clears `releasing`.
            None => std::mem::forget(releasing),
        }
        let me = Arc::clone(self);
        let driver_name = self.shared.upgrade().map_or("", |s| s.driver_name());
        let task = async move {
            // Clears `releasing` and wakes waiters even if the release panics.
            let _releasing = Releasing(&me);
            let span = crate::observe::lock_span(driver_name, "release", &me.name);
            let started = std::time::Instant::now();
            let res = tracing::Instrument::instrument(me.driver.release(), span.clone()).await;
            crate::observe::lock_done(driver_name, "release", &span, started, &res);
            res
        };
        match tokio::spawn(task).await {
            // A hold already reported lost is not reported released.
            Ok(res) => res.map(|released| released && !was_lost),
            Err(e) => Err(ToozError::backend_msg(
                "",
                format!("releasing lock {} failed: {e}", self.name),
            )),
        }
    }

    pub(crate) async fn heartbeat(self: &Arc<Self>) -> Result<bool> {
        if !self.is_held() {
            return Ok(false);
        }
        let ok = self.driver.heartbeat().await?;
        if !ok {
            self.lose();
        }
        Ok(ok)
    }

    /// The hold is gone (its lease was lost, or a renewal found it gone): signals
    /// the loss at once, then releases what may be left of it in the background
    /// (ownership-checked, so nobody else's hold is touched) and clears it.
    pub(crate) fn lose(self: &Arc<Self>) {
        let token = {
            let st = self.state();
            match &st.hold {
                Some(h) => {
                    if let Some(s) = self.shared.upgrade() {
                        crate::observe::lost(s.driver_name(), "lock");
                    }
                    h.lost.send_replace(true);
                    h.token
                }
                None => return,
            }
        };
        let me = Arc::clone(self);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = me.release_hold(true, Some(token)).await {
                    tracing::debug!(lock = %me.name, error = %e, "releasing a lost hold failed");
                }
            });
        }
    }
}

/// The receiving end of an acquire task; see [`Lock::acquire_with`].
struct PendingGrant {
    rx: Option<oneshot::Receiver<(Result<bool>, Option<FencingToken>)>>,
    inner: Arc<LockInner>,
}

impl Drop for PendingGrant {
    fn drop(&mut self) {
        let Some(mut rx) = self.rx.take() else { return };
        // After `close` a late send fails (and the task releases); a grant sent
        // before it is still here to be found.
        rx.close();
        if let Ok((Ok(true), Some(token))) = rx.try_recv()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            let inner = Arc::clone(&self.inner);
            rt.spawn(async move {
                let _ = inner.release_hold(false, Some(token)).await;
            });
        }
    }
}

/// Ends a release in progress when dropped.
struct Releasing<'a>(&'a Arc<LockInner>);

impl Drop for Releasing<'_> {
    fn drop(&mut self) {
        self.0.state().releasing = false;
        self.0.changed.notify_waiters();
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

    /// A signal that resolves when this hold is lost (at once if the lock object
    /// no longer has this hold, even if it was acquired again since).
    pub fn lost(&self) -> LostSignal {
        match &self.lock.state().hold {
            Some(h) if h.token == self.token => LostSignal(h.lost.subscribe()),
            _ => LostSignal(watch::channel(true).1),
        }
    }

    /// Releases the lock and reports whether it was still held.
    ///
    /// # Errors
    /// A backend error.
    pub async fn release(mut self) -> Result<bool> {
        self.released = true;
        self.lock.inner.release_hold(false, Some(self.token)).await
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        let lock = self.lock.clone();
        let token = self.token;
        match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                h.spawn(async move {
                    if let Err(e) = lock.inner.release_hold(false, Some(token)).await {
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

pub(crate) mod engine;

#[cfg(test)]
mod tests;
