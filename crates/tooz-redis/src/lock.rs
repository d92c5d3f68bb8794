//! Lock handles: one script call per attempt, one to release; waiters wake on
//! the lock's pub/sub channel (the core drives the attempts).

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use redis::Value;
use tooz_core::{Attempt, DriverLock, FencingToken, LockName, Mode, Result, ToozError, WakeStream};

use crate::driver::{Inner, LockKeys};
use crate::keys::{FENCE_TTL_MS, new_token};
use crate::watch::{Signal, Subscription};

#[derive(Debug, Clone)]
struct Hold {
    token: String,
    mode: Mode,
}

/// One lock handle.
#[derive(Debug)]
pub(crate) struct RedisLock {
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
        }
    }

    fn hold(&self) -> MutexGuard<'_, Option<Hold>> {
        self.hold.lock().unwrap_or_else(|p| p.into_inner())
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
        match self.inner.acquire_once(&self.keys, mode, &token).await {
            Ok(Attempt::Granted(fence)) => {
                *self.hold() = Some(Hold {
                    token: token.clone(),
                    mode,
                });
                Ok(Attempt::Granted(fence))
            }
            Ok(held) => Ok(held),
            Err(e) => {
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
        Ok(Some(wake_stream(sub)))
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

/// An item per message on the lock's channel (a release) and per reset of the
/// subscription (a message may have been missed); ends when resubscribing fails.
fn wake_stream(sub: Subscription) -> WakeStream {
    Box::pin(futures_util::stream::unfold(sub, |mut sub| async move {
        if sub.recv().await == Signal::Reset
            && let Err(e) = sub.resubscribe().await
        {
            tracing::debug!(error = %e, "re-subscribing to lock releases failed");
            return None;
        }
        Some(((), sub))
    }))
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
}
