//! Lock handles: one script call to acquire, one to release; blocked acquirers
//! wake on the lock's pub/sub channel.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use redis::Value;
use tokio::time::Instant;
use tooz_core::util::{Backoff, deadline_of};
use tooz_core::{DriverLock, FencingToken, LockName, Mode, Result, ToozError, Wait};

use crate::driver::{Inner, LockKeys};
use crate::keys::{FENCE_TTL_MS, new_token};
use crate::watch::{Signal, Subscription};

/// The outcome of one acquire attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Attempt {
    Acquired(u64),
    /// Held by someone else: how long the holder's key still lives (ms, `<= 0`
    /// unknown) and whether the holder is ours (publishes its release).
    Held {
        wait_ms: i64,
        rust: bool,
    },
}

#[derive(Debug, Clone)]
struct Hold {
    token: String,
    mode: Mode,
}

/// One lock handle.
#[derive(Debug)]
pub(crate) struct RedisLock {
    id: u64,
    name: LockName,
    keys: LockKeys,
    inner: Arc<Inner>,
    hold: Mutex<Option<Hold>>,
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

fn parse_attempt(v: &Value) -> Result<Attempt> {
    let bad = || ToozError::backend_msg(format!("redis: unexpected acquire reply {v:?}"));
    let Value::Array(a) = v else {
        return Err(bad());
    };
    match a.first().and_then(as_i64) {
        Some(1) => Ok(Attempt::Acquired(
            a.get(1).and_then(as_i64).unwrap_or(0).max(0) as u64,
        )),
        Some(0) => Ok(Attempt::Held {
            wait_ms: a.get(1).and_then(as_i64).unwrap_or(-1),
            rust: a.get(2).and_then(as_i64) == Some(1),
        }),
        _ => Err(bad()),
    }
}

impl RedisLock {
    pub(crate) fn new(inner: Arc<Inner>, name: LockName, id: u64) -> Self {
        let keys = inner.lock_keys(&name);
        RedisLock {
            id,
            name,
            keys,
            inner,
            hold: Mutex::new(None),
        }
    }

    fn hold(&self) -> MutexGuard<'_, Option<Hold>> {
        self.hold.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One attempt, run in a task of its own: if the caller goes away while the
    /// request is in flight and the lock was won, it is released, never leaked.
    async fn attempt(&self, mode: Mode, token: &str) -> Result<Attempt> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let inner = Arc::clone(&self.inner);
        let keys = self.keys.clone();
        let t = token.to_string();
        tokio::spawn(async move {
            let res = inner.acquire_once(&keys, mode, &t).await;
            // An error leaves the outcome unknown: the script may have run with its
            // reply lost. The token is this acquire's own, so an owner-checked
            // release frees exactly what it may have taken, and nothing else.
            let unknown = res.is_err();
            if let Err(Ok(Attempt::Acquired(_))) = tx.send(res) {
                release_abandoned(inner, keys, mode, t);
            } else if unknown {
                inner.spawn_release(&keys, mode, &t);
            }
        });
        let mut pending = PendingAttempt {
            rx: Some(rx),
            inner: Arc::clone(&self.inner),
            keys: self.keys.clone(),
            mode,
            token: token.to_string(),
        };
        let res = match pending.rx.as_mut() {
            Some(rx) => rx.await.unwrap_or(Err(ToozError::Stopped)),
            None => Err(ToozError::Stopped),
        };
        // Received: nothing left for the drop guard to clean up.
        pending.rx = None;
        res
    }

    /// Subscribes to the lock's channel; `None` (and polling) if pub/sub fails.
    async fn subscribe(&self) -> Option<Subscription> {
        match self.inner.hub().subscribe(&self.keys.lock).await {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::debug!(lock = %self.name, error = %e, "cannot subscribe to release notifications; polling");
                None
            }
        }
    }
}

/// Releases (in a task, retried) a lock won after its acquirer went away.
fn release_abandoned(inner: Arc<Inner>, keys: LockKeys, mode: Mode, token: String) {
    inner.spawn_release(&keys, mode, &token);
}

/// The receiving end of an attempt. Dropped before it read the outcome (the
/// acquire future was cancelled), it releases a lock the attempt won.
struct PendingAttempt {
    rx: Option<tokio::sync::oneshot::Receiver<Result<Attempt>>>,
    inner: Arc<Inner>,
    keys: LockKeys,
    mode: Mode,
    token: String,
}

impl Drop for PendingAttempt {
    fn drop(&mut self) {
        let Some(mut rx) = self.rx.take() else { return };
        // After close() a late send fails (and the task releases); a value sent
        // before it is still here to be found.
        rx.close();
        if let Ok(Ok(Attempt::Acquired(_))) = rx.try_recv() {
            release_abandoned(
                Arc::clone(&self.inner),
                self.keys.clone(),
                self.mode,
                std::mem::take(&mut self.token),
            );
        }
    }
}

#[tooz_core::async_trait]
impl DriverLock for RedisLock {
    fn name(&self) -> &LockName {
        &self.name
    }

    fn queues(&self) -> bool {
        true
    }

    #[tracing::instrument(level = "debug", skip_all, fields(lock = %self.name, ?mode))]
    async fn acquire(&self, mode: Mode, wait: Wait) -> Result<Option<FencingToken>> {
        let deadline = deadline_of(wait);
        let token = new_token();
        let mut sub: Option<Subscription> = None;
        // Polls only while a Python process holds the lock (it never publishes).
        let mut backoff = Backoff::new(Duration::from_millis(5), Duration::from_millis(250));
        loop {
            let (wait_ms, rust) = match self.attempt(mode, &token).await? {
                Attempt::Acquired(fence) => {
                    *self.hold() = Some(Hold {
                        token: token.clone(),
                        mode,
                    });
                    self.inner.register_hold(self.id, &self.keys, mode, &token);
                    return Ok(Some(FencingToken(fence)));
                }
                Attempt::Held { wait_ms, rust } => (wait_ms, rust),
            };
            if wait == Wait::No || deadline.is_some_and(|d| d <= Instant::now()) {
                return Ok(None);
            }
            if sub.is_none() {
                sub = self.subscribe().await;
                if sub.is_some() {
                    // Subscribed: a release from now on is seen. Try again at once in
                    // case it happened before the subscription.
                    continue;
                }
            }
            let ttl_hint = (wait_ms > 0).then(|| Duration::from_millis(wait_ms as u64 + 1));
            let pause = match (rust, &sub, ttl_hint) {
                // Our holder publishes its release; otherwise the key expires.
                (true, Some(_), Some(t)) => t,
                (_, _, Some(t)) => backoff.next_delay().min(t),
                (_, _, None) => backoff.next_delay(),
            };
            let until = match deadline {
                Some(d) => (Instant::now() + pause).min(d),
                None => Instant::now() + pause,
            };
            match sub.as_mut() {
                Some(s) => {
                    tokio::select! {
                        sig = s.recv() => {
                            if sig == Signal::Reset && s.resubscribe().await.is_err() {
                                sub = None;
                            }
                        }
                        _ = tokio::time::sleep_until(until) => {}
                    }
                }
                None => tokio::time::sleep_until(until).await,
            }
        }
    }

    #[tracing::instrument(level = "debug", skip_all, fields(lock = %self.name))]
    async fn release(&self) -> Result<bool> {
        let Some(hold) = self.hold().take() else {
            return Ok(false);
        };
        self.inner.unregister_hold(self.id);
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
        // The driver heartbeat renews every hold in one request just before the
        // coordinator calls this; answer from its result unless it is stale.
        match self.inner.hold_status(self.id) {
            Some((ok, renewed)) if !ok || renewed.elapsed() < self.inner.lock_ttl() / 3 => Ok(ok),
            _ => {
                let ok = self
                    .inner
                    .renew_token(&self.keys, hold.mode, &hold.token, true)
                    .await?;
                self.inner.note_renewal(self.id, ok);
                Ok(ok)
            }
        }
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

impl Drop for RedisLock {
    fn drop(&mut self) {
        self.inner.unregister_hold(self.id);
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

pub(crate) fn parse_acquire(v: &Value) -> Result<Attempt> {
    parse_attempt(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acquire_replies() {
        let ok = Value::Array(vec![Value::Int(1), Value::Int(1_700_000_000_000_000)]);
        assert_eq!(
            parse_attempt(&ok).unwrap(),
            Attempt::Acquired(1_700_000_000_000_000)
        );
        let held = Value::Array(vec![Value::Int(0), Value::Int(1500), Value::Int(1)]);
        assert_eq!(
            parse_attempt(&held).unwrap(),
            Attempt::Held {
                wait_ms: 1500,
                rust: true
            }
        );
        let py = Value::Array(vec![Value::Int(0), Value::Int(-1), Value::Int(0)]);
        assert_eq!(
            parse_attempt(&py).unwrap(),
            Attempt::Held {
                wait_ms: -1,
                rust: false
            }
        );
        assert!(parse_attempt(&Value::Nil).is_err());
    }
}
