//! Lock handles: one transaction to acquire (create-if-absent, the create
//! revision is the fencing token), one to release guarded on that revision;
//! blocked acquirers wake on an etcd watch of the lock's keys.

use std::sync::{Arc, Mutex};

use etcd_client::{
    Compare, CompareOp, DeleteOptions, PutOptions, Txn, TxnOp, TxnOpResponse, WatchFilterType,
    WatchOptions,
};
use tokio::time::Instant;
use tooz_core::util::deadline_of;
use tooz_core::{DriverLock, FencingToken, LockName, Mode, Result, ToozError, Wait};

use crate::driver::{Inner, gets, got, guard, map_err, revision};
use crate::keys;

#[derive(Debug, Clone)]
struct Hold {
    /// Create revision of the lock key (exclusive) or of our reader key (shared).
    token: i64,
    /// Our reader key (shared holds).
    reader: Option<Vec<u8>>,
    /// The lease epoch the hold was taken on.
    epoch: u64,
}

/// The outcome of one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attempt {
    Acquired(i64),
    /// Held by someone else, as of this revision.
    Held(i64),
}

/// One lock handle.
#[derive(Debug)]
pub(crate) struct EtcdLock {
    id: u64,
    name: LockName,
    key: Vec<u8>,
    readers: Vec<u8>,
    inner: Arc<Inner>,
    hold: Mutex<Option<Hold>>,
}

fn random_value() -> Vec<u8> {
    let b: [u8; 16] = rand::random();
    b.to_vec()
}

/// One acquire attempt (one transaction).
async fn attempt(
    inner: &Inner,
    key: &[u8],
    readers: &[u8],
    reader: &[u8],
    mode: Mode,
) -> Result<(Attempt, u64)> {
    let lease = inner.lease()?;
    let put = || Some(PutOptions::new().with_lease(lease.id));
    let txn = match mode {
        Mode::Exclusive => Txn::new()
            .when(vec![
                Compare::create_revision(key.to_vec(), CompareOp::Equal, 0),
                Compare::version(readers.to_vec(), CompareOp::Equal, 0)
                    .with_range(keys::prefix_end(readers)),
            ])
            .and_then(vec![TxnOp::put(key.to_vec(), random_value(), put())]),
        Mode::Shared => Txn::new()
            .when(vec![Compare::create_revision(
                key.to_vec(),
                CompareOp::Equal,
                0,
            )])
            .and_then(vec![
                TxnOp::put(key.to_vec(), keys::SHARED_MARKER.to_vec(), put()),
                TxnOp::put(reader.to_vec(), Vec::new(), put()),
            ])
            .or_else(vec![TxnOp::txn(
                Txn::new()
                    .when(vec![Compare::value(
                        key.to_vec(),
                        CompareOp::Equal,
                        keys::SHARED_MARKER.to_vec(),
                    )])
                    .and_then(vec![TxnOp::put(reader.to_vec(), Vec::new(), put())]),
            )]),
    };
    let r = inner.txn("acquire", txn).await?;
    let rev = revision(&r);
    if r.succeeded() {
        return Ok((Attempt::Acquired(rev), lease.epoch));
    }
    let nested = r.op_responses().into_iter().any(|o| match o {
        TxnOpResponse::Txn(t) => t.succeeded(),
        _ => false,
    });
    if nested {
        Ok((Attempt::Acquired(rev), lease.epoch))
    } else {
        Ok((Attempt::Held(rev), lease.epoch))
    }
}

/// Releases a hold, guarded on its revision: never frees a newer holder's key.
async fn release_hold(inner: &Inner, key: &[u8], readers: &[u8], hold: &Hold) -> Result<bool> {
    let txn = match &hold.reader {
        None => Txn::new()
            .when(vec![Compare::create_revision(
                key.to_vec(),
                CompareOp::Equal,
                hold.token,
            )])
            .and_then(vec![TxnOp::delete(key.to_vec(), None)]),
        Some(me) => {
            let mut after = me.clone();
            after.push(0);
            // The last reader also removes the marker, in the same transaction.
            Txn::new()
                .when(vec![
                    Compare::create_revision(me.clone(), CompareOp::Equal, hold.token),
                    Compare::version(readers.to_vec(), CompareOp::Equal, 0).with_range(me.clone()),
                    Compare::version(after, CompareOp::Equal, 0)
                        .with_range(keys::prefix_end(readers)),
                    Compare::value(key.to_vec(), CompareOp::Equal, keys::SHARED_MARKER.to_vec()),
                ])
                .and_then(vec![
                    TxnOp::delete(me.clone(), None),
                    TxnOp::delete(key.to_vec(), None),
                ])
                .or_else(vec![TxnOp::txn(
                    Txn::new()
                        .when(vec![Compare::create_revision(
                            me.clone(),
                            CompareOp::Equal,
                            hold.token,
                        )])
                        .and_then(vec![TxnOp::delete(me.clone(), None)]),
                )])
        }
    };
    let r = inner.txn("release", txn).await?;
    if r.succeeded() {
        return Ok(true);
    }
    Ok(r.op_responses().into_iter().any(|o| match o {
        TxnOpResponse::Txn(t) => t.succeeded(),
        _ => false,
    }))
}

fn owner_compare(key: &[u8], hold: &Hold) -> Compare {
    match &hold.reader {
        None => Compare::create_revision(key.to_vec(), CompareOp::Equal, hold.token),
        Some(me) => Compare::create_revision(me.clone(), CompareOp::Equal, hold.token),
    }
}

struct Won {
    inner: Arc<Inner>,
    key: Vec<u8>,
    readers: Vec<u8>,
    hold: Hold,
}

async fn release_abandoned(w: Won) {
    if let Err(e) = release_hold(&w.inner, &w.key, &w.readers, &w.hold).await {
        tracing::warn!(error = %e, "etcd: releasing a lock won after its acquirer went away failed");
    }
}

type AttemptResult = Result<(Attempt, u64)>;

/// The receiving end of an attempt run in a task. Dropped before it read the
/// outcome (the acquire future was cancelled), it releases a lock the attempt won.
struct Pending {
    rx: Option<tokio::sync::oneshot::Receiver<AttemptResult>>,
    won: Option<Won>,
}

impl Drop for Pending {
    fn drop(&mut self) {
        let Some(mut rx) = self.rx.take() else { return };
        rx.close();
        if let Ok(Ok((Attempt::Acquired(rev), epoch))) = rx.try_recv()
            && let Some(mut w) = self.won.take()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            w.hold.token = rev;
            w.hold.epoch = epoch;
            rt.spawn(release_abandoned(w));
        }
    }
}

impl EtcdLock {
    pub(crate) fn new(inner: Arc<Inner>, name: LockName, id: u64) -> Self {
        EtcdLock {
            id,
            key: keys::lock(name.as_bytes()),
            readers: keys::lock_readers(name.as_bytes()),
            name,
            inner,
            hold: Mutex::new(None),
        }
    }

    /// One attempt in a task of its own, so that a cancelled acquire never leaks
    /// a lock won while the caller was gone.
    async fn attempt(&self, mode: Mode, reader: &[u8]) -> AttemptResult {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let won = |rev: i64, epoch: u64| Won {
            inner: Arc::clone(&self.inner),
            key: self.key.clone(),
            readers: self.readers.clone(),
            hold: Hold {
                token: rev,
                reader: (mode == Mode::Shared).then(|| reader.to_vec()),
                epoch,
            },
        };
        let template = won(0, 0);
        let task_won = won(0, 0);
        let (inner, key, readers, rd) = (
            Arc::clone(&self.inner),
            self.key.clone(),
            self.readers.clone(),
            reader.to_vec(),
        );
        tokio::spawn(async move {
            let res = attempt(&inner, &key, &readers, &rd, mode).await;
            if let Err(Ok((Attempt::Acquired(rev), epoch))) = tx.send(res) {
                let mut w = task_won;
                w.hold.token = rev;
                w.hold.epoch = epoch;
                release_abandoned(w).await;
            }
        });
        let mut pending = Pending {
            rx: Some(rx),
            won: Some(template),
        };
        let res = match pending.rx.as_mut() {
            Some(rx) => rx.await.unwrap_or(Err(ToozError::Stopped)),
            None => Err(ToozError::Stopped),
        };
        pending.rx = None;
        res
    }

    fn current(&self) -> Option<Hold> {
        guard(&self.hold).clone()
    }
}

#[tooz_core::async_trait]
impl DriverLock for EtcdLock {
    fn name(&self) -> &LockName {
        &self.name
    }

    #[tracing::instrument(level = "debug", skip_all, fields(lock = %self.name, ?mode))]
    async fn acquire(&self, mode: Mode, wait: Wait) -> Result<Option<FencingToken>> {
        let deadline = deadline_of(wait);
        let lease = self.inner.lease()?;
        let mut reader = self.readers.clone();
        reader.extend_from_slice(format!("{:x}-{:x}", lease.id, self.id).as_bytes());
        reader.extend_from_slice(hex::encode(random_value()).as_bytes());
        let mut watch: Option<etcd_client::WatchStream> = None;
        loop {
            let rev = match self.attempt(mode, &reader).await? {
                (Attempt::Acquired(rev), epoch) => {
                    *guard(&self.hold) = Some(Hold {
                        token: rev,
                        reader: (mode == Mode::Shared).then(|| reader.clone()),
                        epoch,
                    });
                    return Ok(Some(FencingToken(rev.max(0) as u64)));
                }
                (Attempt::Held(rev), _) => rev,
            };
            if wait == Wait::No || deadline.is_some_and(|d| d <= Instant::now()) {
                return Ok(None);
            }
            if watch.is_none() {
                // Deletes after the revision the attempt saw: nothing is missed.
                let mut c = self.inner.client()?;
                let opts = WatchOptions::new()
                    .with_start_revision(rev + 1)
                    .with_filters([WatchFilterType::NoPut]);
                let mut w = c
                    .watch(self.key.clone(), Some(opts.clone()))
                    .await
                    .map_err(|e| map_err("watching the lock", e))?;
                if mode == Mode::Exclusive {
                    w.watch(
                        self.readers.clone(),
                        Some(opts.with_range(keys::prefix_end(&self.readers))),
                    )
                    .await
                    .map_err(|e| map_err("watching the lock's readers", e))?;
                }
                watch = Some(w);
            }
            let Some(w) = watch.as_mut() else { continue };
            let next = async {
                loop {
                    match w.message().await {
                        Ok(Some(m)) if m.events().is_empty() && !m.canceled() => continue,
                        Ok(Some(_)) => return true,
                        Ok(None) | Err(_) => return false,
                    }
                }
            };
            let alive = match deadline {
                Some(d) => tokio::time::timeout_at(d, next).await.unwrap_or(true),
                None => next.await,
            };
            if !alive {
                watch = None;
            }
        }
    }

    #[tracing::instrument(level = "debug", skip_all, fields(lock = %self.name))]
    async fn release(&self) -> Result<bool> {
        let Some(hold) = guard(&self.hold).take() else {
            return Ok(false);
        };
        release_hold(&self.inner, &self.key, &self.readers, &hold).await
    }

    async fn heartbeat(&self) -> Result<bool> {
        // The hold lives on the coordinator's lease, renewed by the driver
        // heartbeat with one keep-alive: nothing to send per lock.
        let Some(hold) = self.current() else {
            return Ok(false);
        };
        Ok(self.inner.lease().is_ok_and(|l| l.epoch == hold.epoch))
    }

    async fn is_still_owner(&self) -> Result<bool> {
        let Some(hold) = self.current() else {
            return Ok(false);
        };
        let r = self
            .inner
            .txn(
                "is_still_owner",
                Txn::new().when(vec![owner_compare(&self.key, &hold)]),
            )
            .await?;
        Ok(r.succeeded())
    }

    async fn break_lock(&self) -> Result<bool> {
        let r = self
            .inner
            .txn(
                "break_lock",
                Txn::new().and_then(vec![
                    TxnOp::get(self.key.clone(), None),
                    TxnOp::delete(self.key.clone(), None),
                    TxnOp::delete(
                        self.readers.clone(),
                        Some(DeleteOptions::new().with_prefix()),
                    ),
                ]),
            )
            .await?;
        Ok(got(&gets(&r), 0).is_some())
    }
}
