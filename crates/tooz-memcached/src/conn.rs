//! A small pool of `async-memcached` clients (one connection each, TCP_NODELAY
//! set by the client), with a timeout on every request and typed results.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use async_memcached::{Client, Error as McError, MetaProtocol, MetaValue, Status};
use tooz_core::{Result, ToozError};

const NAME: &str = "memcached";

type OpFuture<'c, T> = Pin<Box<dyn Future<Output = std::result::Result<T, McError>> + Send + 'c>>;

/// The outcome of a meta set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reply {
    /// Stored; the item's new CAS value when asked for.
    Stored(Option<u64>),
    /// `add` found the key (`NS`).
    NotStored,
    /// The CAS value did not match (`EX`).
    Exists,
    /// A CAS write found no item (`NF`).
    NotFound,
}

pub(crate) struct Pool {
    address: String,
    timeout: Duration,
    max_idle: usize,
    idle: Mutex<Vec<Client>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("address", &self.address)
            .field("timeout", &self.timeout)
            .field("idle", &self.idle().len())
            .finish()
    }
}

fn mc_err(what: &str, e: McError) -> ToozError {
    match e {
        McError::Protocol(s) => {
            ToozError::backend_msg(NAME, format!("{what}: memcached replied {s}"))
        }
        McError::ParseError(k) => {
            ToozError::backend_msg(NAME, format!("{what}: unparsable reply ({k:?})"))
        }
        other => ToozError::connection(NAME, format!("{what} failed"), other),
    }
}

fn stored(
    v: std::result::Result<Option<MetaValue>, McError>,
) -> std::result::Result<Reply, McError> {
    let status = match v {
        Ok(None) => return Ok(Reply::Stored(None)),
        Ok(Some(mv)) => match mv.status {
            Some(Status::Stored) | None => return Ok(Reply::Stored(mv.cas)),
            Some(s) => s,
        },
        Err(McError::Protocol(s)) => s,
        Err(e) => return Err(e),
    };
    match status {
        Status::NotStored => Ok(Reply::NotStored),
        Status::Exists => Ok(Reply::Exists),
        Status::NotFound => Ok(Reply::NotFound),
        s => Err(McError::Protocol(s)),
    }
}

impl Pool {
    pub(crate) fn new(address: String, timeout: Duration, max_idle: usize) -> Self {
        Pool {
            address,
            timeout,
            max_idle,
            idle: Mutex::new(Vec::new()),
        }
    }

    fn idle(&self) -> MutexGuard<'_, Vec<Client>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn close(&self) {
        self.idle().clear();
    }

    /// Runs `op` on a pooled client, within the request timeout. A client whose
    /// request failed or timed out is dropped (its connection may hold an unread
    /// reply).
    async fn run<T, F>(&self, what: &str, op: F) -> Result<T>
    where
        F: for<'c> FnOnce(&'c mut Client) -> OpFuture<'c, T>,
    {
        let pooled = self.idle().pop().filter(|c| !c.is_closed());
        let res = tokio::time::timeout(self.timeout, async {
            let mut client = match pooled {
                Some(c) => c,
                None => Client::new(&self.address).await.map_err(|e| {
                    ToozError::connection(
                        NAME,
                        format!("cannot connect to memcached at {}", self.address),
                        e,
                    )
                })?,
            };
            let out = op(&mut client).await;
            if out.is_ok() {
                let mut idle = self.idle();
                if idle.len() < self.max_idle {
                    idle.push(client);
                }
            }
            out.map_err(|e| mc_err(what, e))
        })
        .await;
        match res {
            Ok(r) => r,
            Err(_) => Err(ToozError::connection(
                NAME,
                format!(
                    "{what}: no reply from {} within {:?}",
                    self.address, self.timeout
                ),
                "timed out",
            )),
        }
    }

    /// `mg <key> <flags>`: `None` on a miss.
    pub(crate) async fn get(
        &self,
        what: &str,
        key: &[u8],
        flags: &[&str],
    ) -> Result<Option<MetaValue>> {
        let (key, flags) = (key.to_vec(), owned(flags));
        self.run(what, move |c| {
            Box::pin(async move { c.meta_get(&key, false, None, Some(&refs(&flags))).await })
        })
        .await
    }

    /// Quiet `mg` of many keys in one round trip: the hits, with their keys.
    pub(crate) async fn get_multi(
        &self,
        what: &str,
        keys: &[Vec<u8>],
        flags: &[&str],
    ) -> Result<Vec<MetaValue>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let (keys, flags) = (keys.to_vec(), owned(flags));
        self.run(what, move |c| {
            Box::pin(async move { c.meta_get_multi(&keys, Some(&refs(&flags))).await })
        })
        .await
    }

    /// `ms <key> <len> <flags>`.
    pub(crate) async fn set(
        &self,
        what: &str,
        key: &[u8],
        value: &[u8],
        flags: &[String],
    ) -> Result<Reply> {
        let (key, value, flags) = (key.to_vec(), value.to_vec(), flags.to_vec());
        self.run(what, move |c| {
            Box::pin(async move {
                stored(
                    c.meta_set(&key, value.as_slice(), false, None, Some(&refs(&flags)))
                        .await,
                )
            })
        })
        .await
    }

    /// `md <key> <flags>`: whether an item was deleted.
    pub(crate) async fn delete(&self, what: &str, key: &[u8], flags: &[String]) -> Result<bool> {
        let (key, flags) = (key.to_vec(), flags.to_vec());
        self.run(what, move |c| {
            Box::pin(async move {
                match c.meta_delete(&key, false, None, Some(&refs(&flags))).await {
                    Ok(_) => Ok(true),
                    Err(McError::Protocol(Status::NotFound | Status::Exists)) => Ok(false),
                    Err(e) => Err(e),
                }
            })
        })
        .await
    }

    /// `ma <key> <flags> v`: the new value.
    pub(crate) async fn incr(&self, what: &str, key: &[u8], flags: &[String]) -> Result<u64> {
        let (key, mut flags) = (key.to_vec(), flags.to_vec());
        flags.push("v".into());
        let v = self
            .run(what, move |c| {
                Box::pin(async move {
                    c.meta_increment(&key, false, None, None, Some(&refs(&flags)))
                        .await
                })
            })
            .await?;
        v.and_then(|v| v.data)
            .and_then(|d| std::str::from_utf8(&d).ok()?.trim().parse().ok())
            .ok_or_else(|| {
                ToozError::backend_msg(NAME, format!("{what}: no counter value in the reply"))
            })
    }

    /// The server's clock (`stats` `time`, seconds since the epoch).
    pub(crate) async fn server_time(&self) -> Result<Option<u64>> {
        let stats = self
            .run("stats", |c| Box::pin(async move { c.stats().await }))
            .await?;
        Ok(stats.get("time").and_then(|t| t.parse().ok()))
    }
}

fn owned(flags: &[&str]) -> Vec<String> {
    flags.iter().map(|s| (*s).to_string()).collect()
}

fn refs(flags: &[String]) -> Vec<&str> {
    flags.iter().map(String::as_str).collect()
}
