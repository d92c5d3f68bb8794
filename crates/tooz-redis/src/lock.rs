//! Lock handles: one script call per attempt, one to release; waiters wake on
//! the lock's pub/sub channel (the core drives the attempts).
//!
//! A blocked acquire queues (see the crate's key layout docs, "Waiter queue"): the
//! wake-up stream the core asks for after a failed attempt owns a fresh waiter id;
//! the attempts made while it lives carry that id (the first one, right after
//! subscribing, registers it), so a release wakes only the waiter it names. When
//! the stream is dropped (the wait ended: granted, deadline, stop, the caller gone)
//! a waiter still registered leaves the queue, passing a wake-up on if the lock is
//! free.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use redis::Value;
use tooz_core::{Attempt, DriverLock, FencingToken, LockName, Mode, Result, ToozError, WakeStream};

use crate::driver::{Inner, LockKeys};
use crate::keys::{FENCE_TTL_MS, new_token, new_waiter_id};
use crate::watch::{Signal, Subscription};

#[derive(Debug, Clone)]
struct Hold {
    token: String,
    mode: Mode,
}

/// One blocked wait's registration in the lock's queue.
#[derive(Debug)]
struct Waiter {
    id: String,
    /// The wait is still on (its wake-up stream lives).
    active: AtomicBool,
    /// The server may hold a registration of this id (an attempt carrying it did
    /// not end in a grant).
    queued: AtomicBool,
}

/// One lock handle.
#[derive(Debug)]
pub(crate) struct RedisLock {
    name: LockName,
    keys: LockKeys,
    inner: Arc<Inner>,
    hold: Mutex<Option<Hold>>,
    /// The waiter of the current blocked wait, if any.
    waiter: Mutex<Option<Arc<Waiter>>>,
}

pub(crate) fn mode_arg(mode: Mode) -> &'static str {
    match mode {
        Mode::Exclusive => "x",
        Mode::Shared => "s",
    }
}

fn as_i64(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

/// The `lock_acquire` reply: `{1, fence}` or `{0, ttl_ms, rust_holder}`.
pub(crate) fn parse_acquire(v: &Value) -> Result<Attempt> {
    let bad = || ToozError::backend_msg("redis", format!("unexpected acquire reply {v:?}"));
    let Value::Array(a) = v else {
        return Err(bad());
    };
    match a.first().and_then(as_i64) {
        Some(1) => Ok(Attempt::Granted(FencingToken(
            a.get(1).and_then(as_i64).unwrap_or(0).max(0) as u64,
        ))),
        // Held: how long the holder's key still lives (ms, `<= 0` unknown) and
        // whether the holder is ours (publishes its release).
        Some(0) => Ok(Attempt::Held {
            expires_in: a
                .get(1)
                .and_then(as_i64)
                .filter(|ms| *ms > 0)
                .map(|ms| Duration::from_millis(ms as u64)),
            notifies: a.get(2).and_then(as_i64) == Some(1),
        }),
        _ => Err(bad()),
    }
}

impl RedisLock {
    /// What the driver heartbeat renews: the keys, mode and owner token of the
    /// current hold.
    pub(crate) fn renewal(&self) -> Option<(&LockKeys, Mode, String)> {
        let hold = self.hold().clone()?;
        Some((&self.keys, hold.mode, hold.token))
    }

    pub(crate) fn new(inner: Arc<Inner>, name: LockName) -> Self {
        let keys = inner.lock_keys(&name);
        RedisLock {
            name,
            keys,
            inner,
            hold: Mutex::new(None),
            waiter: Mutex::new(None),
        }
    }

    fn hold(&self) -> MutexGuard<'_, Option<Hold>> {
        self.hold.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The waiter of the wait in progress (forgetting one whose wait ended).
    fn current_waiter(&self) -> Option<Arc<Waiter>> {
        let mut w = self.waiter.lock().unwrap_or_else(|p| p.into_inner());
        if w.as_ref().is_some_and(|w| !w.active.load(Ordering::SeqCst)) {
            *w = None;
        }
        w.clone()
    }

    /// After an attempt that may have left `waiter` registered: remember it, and
    /// leave the queue at once if the wait ended meanwhile.
    fn maybe_queued(&self, waiter: &Waiter) {
        waiter.queued.store(true, Ordering::SeqCst);
        if !waiter.active.load(Ordering::SeqCst) && waiter.queued.swap(false, Ordering::SeqCst) {
            self.inner.spawn_leave(&self.keys, &waiter.id);
        }
    }
}

#[tooz_core::async_trait]
impl DriverLock for RedisLock {
    fn name(&self) -> &LockName {
        &self.name
    }

    #[tracing::instrument(level = "debug", skip_all, fields(lock = %self.name, ?mode))]
    async fn try_acquire(&self, mode: Mode) -> Result<Attempt> {
        let token = new_token();
        let waiter = self.current_waiter();
        let id = waiter.as_deref().map(|w| w.id.as_str());
        match self.inner.acquire_once(&self.keys, mode, &token, id).await {
            Ok(Attempt::Granted(fence)) => {
                // The script removed the waiter from the queue.
                if let Some(w) = &waiter {
                    w.queued.store(false, Ordering::SeqCst);
                }
                *self.hold() = Some(Hold {
                    token: token.clone(),
                    mode,
                });
                Ok(Attempt::Granted(fence))
            }
            Ok(held) => {
                if let Some(w) = &waiter {
                    self.maybe_queued(w);
                }
                Ok(held)
            }
            Err(e) => {
                if let Some(w) = &waiter {
                    self.maybe_queued(w);
                }
                // The outcome is unknown: the script may have run with its reply
                // lost. The token is this attempt's own, so an owner-checked
                // release (retried until it goes through) frees exactly what it
                // may have taken, and nothing else.
                self.inner.spawn_release(&self.keys, mode, &token);
                Err(e)
            }
        }
    }

    async fn wakeups(&self) -> Result<Option<WakeStream>> {
        let sub = self.inner.hub().subscribe(&self.keys.lock).await?;
        // Registered by the next attempt, which the core makes right away (we are
        // subscribed by then, so no release that finds us queued goes unheard).
        let waiter = Arc::new(Waiter {
            id: new_waiter_id(),
            active: AtomicBool::new(true),
            queued: AtomicBool::new(false),
        });
        *self.waiter.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::clone(&waiter));
        let guard = QueueGuard {
            inner: Arc::clone(&self.inner),
            keys: self.keys.clone(),
            waiter,
        };
        Ok(Some(wake_stream(sub, guard)))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(lock = %self.name))]
    async fn release(&self) -> Result<bool> {
        let Some(hold) = self.hold().take() else {
            return Ok(false);
        };
        match self
            .inner
            .release_token(&self.keys, hold.mode, &hold.token)
            .await
        {
            Ok(released) => Ok(released),
            Err(e) => {
                // The request may not have reached the server (or its reply was
                // lost): keep trying, owner-checked, instead of leaving the hold
                // to its TTL.
                self.inner.spawn_release(&self.keys, hold.mode, &hold.token);
                Err(e)
            }
        }
    }

    async fn heartbeat(&self) -> Result<bool> {
        let Some(hold) = self.hold().clone() else {
            return Ok(false);
        };
        self.inner
            .renew_token(&self.keys, hold.mode, &hold.token, true)
            .await
    }

    async fn is_still_owner(&self) -> Result<bool> {
        let Some(hold) = self.hold().clone() else {
            return Ok(false);
        };
        self.inner
            .renew_token(&self.keys, hold.mode, &hold.token, false)
            .await
    }

    async fn break_lock(&self) -> Result<bool> {
        self.inner.break_lock(&self.keys).await
    }
}

/// The `lock_acquire` arguments (shared with the driver).
pub(crate) fn acquire_args(ttl_ms: u64, mode: Mode) -> [String; 3] {
    [
        ttl_ms.to_string(),
        mode_arg(mode).to_string(),
        FENCE_TTL_MS.to_string(),
    ]
}

/// Ends a wait's registration when its wake-up stream is dropped.
#[derive(Debug)]
struct QueueGuard {
    inner: Arc<Inner>,
    keys: LockKeys,
    waiter: Arc<Waiter>,
}

impl Drop for QueueGuard {
    fn drop(&mut self) {
        self.waiter.active.store(false, Ordering::SeqCst);
        if self.waiter.queued.swap(false, Ordering::SeqCst) {
            self.inner.spawn_leave(&self.keys, &self.waiter.id);
        }
    }
}

/// Whether a message on the lock's channel wakes waiter `id`: `w <id>...` names
/// the waiters it wakes; anything else (`released` from older versions, `broken`)
/// wakes everyone.
fn wakes(payload: &[u8], id: &str) -> bool {
    match payload.strip_prefix(b"w ") {
        Some(ids) => ids.split(|b| *b == b' ').any(|x| x == id.as_bytes()),
        None => true,
    }
}

/// An item per message on the lock's channel that wakes this waiter (see
/// [`wakes`]) and per reset of the subscription (a message may have been
/// missed); ends when resubscribing fails (the waiter then leaves the queue and
/// the core polls).
fn wake_stream(sub: Subscription, guard: QueueGuard) -> WakeStream {
    Box::pin(futures_util::stream::unfold(
        (sub, guard),
        |(mut sub, guard)| async move {
            loop {
                match sub.recv().await {
                    Signal::Message(p) if !wakes(&p, &guard.waiter.id) => continue,
                    Signal::Message(_) => {}
                    Signal::Reset => {
                        if let Err(e) = sub.resubscribe().await {
                            tracing::debug!(error = %e, "re-subscribing to lock releases failed");
                            return None;
                        }
                    }
                }
                return Some(((), (sub, guard)));
            }
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acquire_replies() {
        let ok = Value::Array(vec![Value::Int(1), Value::Int(1_700_000_000_000_000)]);
        assert_eq!(
            parse_acquire(&ok).unwrap(),
            Attempt::Granted(FencingToken(1_700_000_000_000_000))
        );
        let held = Value::Array(vec![Value::Int(0), Value::Int(1500), Value::Int(1)]);
        assert_eq!(
            parse_acquire(&held).unwrap(),
            Attempt::Held {
                expires_in: Some(Duration::from_millis(1500)),
                notifies: true
            }
        );
        let py = Value::Array(vec![Value::Int(0), Value::Int(-1), Value::Int(0)]);
        assert_eq!(
            parse_acquire(&py).unwrap(),
            Attempt::Held {
                expires_in: None,
                notifies: false
            }
        );
        assert!(parse_acquire(&Value::Nil).is_err());
    }

    #[test]
    fn addressed_wakeups() {
        assert!(wakes(b"w abc", "abc"));
        assert!(wakes(b"w x abc y", "abc"));
        assert!(!wakes(b"w abcd", "abc"));
        assert!(!wakes(b"w x y", "abc"));
        assert!(wakes(b"released", "abc"));
        assert!(wakes(b"broken", "abc"));
        assert!(wakes(b"", "abc"));
    }
}
