//! Lock handles: one attempt at a time, driven by the core. A blocked acquire
//! waits in the lock's queue (see the `queue` module): its wake-ups come from its
//! waiter task, which asks for an attempt only when it is the head of the queue.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tooz_core::{Attempt, DriverLock, FencingToken, LockName, Mode, Result, WakeStream};

use crate::driver::{Grant, Inner, new_token};
use crate::keys;
use crate::queue::{self, Entry};

fn guard<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What a handle holds: an exclusive hold is known by the CAS value of its key,
/// a shared one by its reader token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Hold {
    Exclusive { cas: u64 },
    Shared { token: Vec<u8> },
}

/// One lock handle.
#[derive(Debug)]
pub(crate) struct MemcachedLock {
    name: LockName,
    pub(crate) key: Vec<u8>,
    inner: Arc<Inner>,
    pub(crate) hold: tokio::sync::Mutex<Option<Hold>>,
    /// The queue entry of the acquisition in progress, once it blocked.
    queued: Mutex<Option<Arc<Entry>>>,
    /// The mode of the last attempt (the queue's head joins readers).
    mode: Mutex<Mode>,
    /// The last wake-ups handed out come from the queue (they cover a release
    /// right after the failed attempt).
    covers: AtomicBool,
}

impl MemcachedLock {
    pub(crate) fn new(inner: Arc<Inner>, name: LockName) -> Self {
        MemcachedLock {
            key: keys::lock(name.as_bytes()),
            name,
            inner,
            hold: tokio::sync::Mutex::new(None),
            queued: Mutex::new(None),
            mode: Mutex::new(Mode::Exclusive),
            covers: AtomicBool::new(false),
        }
    }

    /// Renews the hold (owner-checked); `false` when it was found lost.
    pub(crate) async fn renew(&self) -> Result<bool> {
        let mut hold = self.hold.lock().await;
        let kept = match hold.as_mut() {
            None => return Ok(false),
            Some(Hold::Exclusive { cas }) => {
                match self
                    .inner
                    .renew_exclusive(&self.key, *cas, self.inner.config.lock_timeout)
                    .await?
                {
                    Some(new) => {
                        *cas = new;
                        true
                    }
                    None => false,
                }
            }
            Some(Hold::Shared { token }) => self.inner.renew_shared(&self.key, token).await?,
        };
        if !kept {
            tracing::info!(lock = %self.name, "memcached: lock lost (its key expired, was evicted or taken)");
            *hold = None;
        }
        Ok(kept)
    }
}

#[tooz_core::async_trait]
impl DriverLock for MemcachedLock {
    fn name(&self) -> &LockName {
        &self.name
    }

    #[tracing::instrument(level = "debug", skip_all, fields(lock = %self.name, ?mode))]
    async fn try_acquire(&self, mode: Mode) -> Result<Attempt> {
        *guard(&self.mode) = mode;
        let entry = guard(&self.queued).clone().filter(|e| !e.has_left());
        let queued = entry.is_some();
        // The head woken by a release leaves the queue in the attempt's round trip.
        let leaving = match (&entry, mode) {
            (Some(e), Mode::Exclusive) => e.leave_with_attempt(),
            _ => None,
        };
        let mut hold = self.hold.lock().await;
        let (grant, new) = match mode {
            Mode::Shared => {
                let token = new_token();
                let g = self.inner.acquire_shared(&self.key, &token).await?;
                (g, Hold::Shared { token })
            }
            _ => {
                let g = self
                    .inner
                    .acquire_exclusive(
                        &self.key,
                        self.inner.config.lock_timeout,
                        leaving.as_ref().map_or(&[], |c| &c[..]),
                    )
                    .await?;
                let cas = match g {
                    Grant::Granted { cas, .. } => cas,
                    Grant::Held(_) => 0,
                };
                (g, Hold::Exclusive { cas })
            }
        };
        match grant {
            Grant::Granted { fence, .. } => {
                *hold = Some(new);
                // Out of the queue: the waiter behind moves up.
                if let Some(e) = guard(&self.queued).take() {
                    if leaving.is_some() {
                        e.left_with();
                    } else {
                        e.leave();
                    }
                }
                Ok(Attempt::Granted(FencingToken(fence)))
            }
            // Queued: the waiter's task says when to try again.
            Grant::Held(_) if queued => {
                drop(hold);
                if let (Some(e), Some(_)) = (&entry, &leaving) {
                    e.rejoin().await;
                }
                Ok(Attempt::Held {
                    expires_in: None,
                    notifies: true,
                })
            }
            Grant::Held(expires_in) => Ok(Attempt::Held {
                expires_in,
                notifies: false,
            }),
        }
    }

    #[tracing::instrument(level = "debug", skip_all, fields(lock = %self.name))]
    async fn release(&self) -> Result<bool> {
        let Some(hold) = self.hold.lock().await.take() else {
            return Ok(false);
        };
        match self.inner.release_hold(&self.key, &hold).await {
            Ok(freed) => Ok(freed),
            Err(e) => {
                self.inner.spawn_release(self.key.clone(), hold);
                Err(e)
            }
        }
    }

    /// Queues the blocked acquire (see the `queue` module): the stream yields
    /// when it is the head and the lock may be free, and leaves the queue when
    /// dropped. If it cannot queue (the ticket counter holds junk, a backend
    /// error), hints from the mutation log as before: a Rust holder's release
    /// marker or a store of the lock key, with the core polling as well.
    async fn wakeups(&self) -> Result<Option<WakeStream>> {
        if let Some(old) = guard(&self.queued).take() {
            old.leave();
        }
        let mode = *guard(&self.mode);
        match queue::enqueue(&self.inner, self.name.as_bytes(), &self.key, mode).await {
            Ok((entry, wakes)) => {
                *guard(&self.queued) = Some(entry);
                self.covers.store(true, Ordering::SeqCst);
                return Ok(Some(Box::pin(wakes)));
            }
            Err(e) => {
                tracing::debug!(lock = %self.name, error = %e, "memcached: cannot queue; polling the lock");
            }
        }
        self.covers.store(false, Ordering::SeqCst);
        Ok(self
            .inner
            .notifier
            .subscribe(std::slice::from_ref(&self.key))
            .await
            .map(|s| -> WakeStream { Box::pin(s) }))
    }

    /// A queued waiter's task reads the lock after it subscribed to its release
    /// markers, so no release since the last attempt is missed.
    fn wakeups_cover_last_attempt(&self) -> bool {
        self.covers.load(Ordering::SeqCst)
    }

    async fn heartbeat(&self) -> Result<bool> {
        self.renew().await
    }

    async fn is_still_owner(&self) -> Result<bool> {
        let hold = self.hold.lock().await.clone();
        match hold {
            None => Ok(false),
            Some(Hold::Exclusive { cas }) => Ok(self
                .inner
                .pool
                .get("is_still_owner", &self.key, &["c"])
                .await?
                .and_then(|v| v.cas)
                == Some(cas)),
            Some(Hold::Shared { token }) => self.inner.holds_shared(&self.key, &token).await,
        }
    }

    async fn break_lock(&self) -> Result<bool> {
        self.inner.pool.delete("break_lock", &self.key, &[]).await
    }
}
