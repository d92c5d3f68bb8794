//! Lock handles: one attempt at a time, driven by the core (memcached cannot
//! push a release, so waiters poll with the core's jittered backoff).

use std::sync::Arc;

use tooz_core::{Attempt, DriverLock, FencingToken, LockName, Mode, Result, WakeStream};

use crate::driver::{Grant, Inner, new_token};
use crate::keys;

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
}

impl MemcachedLock {
    pub(crate) fn new(inner: Arc<Inner>, name: LockName) -> Self {
        MemcachedLock {
            key: keys::lock(name.as_bytes()),
            name,
            inner,
            hold: tokio::sync::Mutex::new(None),
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
                    .acquire_exclusive(&self.key, self.inner.config.lock_timeout)
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
                Ok(Attempt::Granted(FencingToken(fence)))
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

    /// Hints from the mutation log: a Rust holder's release marker or a store
    /// of the lock key. The core keeps polling as well (`notifies: false`), for
    /// Python holders, expiries and skipped log lines.
    async fn wakeups(&self) -> Result<Option<WakeStream>> {
        Ok(self
            .inner
            .notifier
            .subscribe(std::slice::from_ref(&self.key))
            .await
            .map(|s| -> WakeStream { Box::pin(s) }))
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
