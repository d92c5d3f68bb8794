//! Lock handles: one transaction to acquire (create-if-absent, the create
//! revision is the fencing token), one to release guarded on that revision.
//!
//! A blocked acquire waits in a queue, so that a release wakes one waiter, not
//! all of them (etcd's own lock recipe, in our own key space): the acquire's
//! first transaction takes the lock if it is free and nobody waits ahead, and
//! otherwise puts an entry `tooz/lock-queue/<hex name>/<x|s><unique>` on the
//! coordinator's lease (gone with a crashed waiter) in the same transaction. An
//! entry waits behind the newest entry created before it (for a shared waiter:
//! the newest *exclusive* one, so readers behind readers proceed together): it
//! watches only that entry's deletion. With nobody ahead it is the head: it tries,
//! and while the lock is held watches the lock key (and, exclusive, the reader
//! keys). A grant deletes the entry in the same transaction, which wakes the
//! waiter behind; so does a waiter that gives up (deadline, its future dropped,
//! stop): the wait ends with its entry removed, by itself or by a task. Every
//! watch starts at the revision after the state it waits on was read, so no
//! release is missed. Python clients never queue: they take the lock by their own
//! path, and the head, watching the lock key, sees their release. An acquire that
//! does not wait (`Wait::No`) does not queue either: it takes a free lock even
//! with waiters queued.
//!
//! Every attempt writes something only it can recognise (a random value in the
//! lock key, or a reader key of its own), so an attempt whose reply is lost is
//! undone, owner-checked, in a task that retries until it goes through: otherwise
//! the hold would sit on the coordinator's lease, kept alive for as long as the
//! process runs. A failed release is retried the same way. An acquire's writes
//! run in tasks of their own ([`InFlight`]) and the undo of a dropped acquire
//! waits for the reply of the write in flight: etcd serves concurrent requests in
//! any order, so an undo sent after a write could land before it and find nothing
//! to undo.
//!
//! While Rust readers hold a lock in shared mode the lock key holds
//! [`keys::SHARED_MARKER`] (which makes a Python exclusive acquirer wait). The
//! marker is kept on a remaining reader's lease: a reader that releases while
//! others remain moves it, in the same transaction, to a remaining reader's lease;
//! and every reader watches it and re-creates it on its own lease if it vanishes
//! (its lease died) while the reader still reads.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{
    Compare, CompareOp, DeleteOptions, EventType, GetOptions, KeyValue, PutOptions, SortOrder,
    SortTarget, Txn, TxnOp, TxnOpResponse, TxnResponse, WatchFilterType, WatchOptions, WatchStream,
};
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tooz_core::util::{Backoff, InFlight, deadline_of};
use tooz_core::{DriverLock, FencingToken, LockName, Mode, Result, ToozError, Wait};

use crate::config::NAME;
use crate::driver::{Inner, Lease, gets, got, guard, map_err, revision};
use crate::keys;

#[derive(Debug, Clone)]
struct Hold {
    /// Create revision of the lock key (exclusive) or of our reader key (shared).
    token: i64,
    /// Our reader key (shared holds).
    reader: Option<Vec<u8>>,
    /// The lease the hold was taken on.
    lease: Lease,
    /// The task keeping the shared marker on a live lease (shared holds).
    keeper: Option<AbortHandle>,
}

/// The outcome of one attempt: granted (at this revision), or held by someone
/// else (as of this revision).
type Outcome = std::result::Result<i64, i64>;

/// One lock handle.
#[derive(Debug)]
pub(crate) struct EtcdLock {
    id: u64,
    name: LockName,
    key: Vec<u8>,
    readers: Vec<u8>,
    inner: Arc<Inner>,
    /// `keys::lock_queue` of the name: the waiters.
    queue: Vec<u8>,
    /// `keys::lock_queue_exclusive` of the name: the exclusive waiters.
    queue_exclusive: Vec<u8>,
    hold: Mutex<Option<Hold>>,
}

fn random_value() -> Vec<u8> {
    let b: [u8; 16] = rand::random();
    b.to_vec()
}

fn nested(r: &TxnResponse) -> Option<TxnResponse> {
    r.op_responses().into_iter().find_map(|o| match o {
        TxnOpResponse::Txn(t) => Some(t),
        _ => None,
    })
}

/// What one attempt writes: `value` into the lock key (exclusive) or the reader
/// key `reader` (shared), on `lease`. Both are this attempt's own.
#[derive(Debug, Clone)]
struct Write {
    mode: Mode,
    value: Vec<u8>,
    reader: Vec<u8>,
    lease: Lease,
}

/// One acquire attempt (one transaction).
async fn attempt(inner: &Inner, key: &[u8], readers: &[u8], w: &Write) -> Result<Outcome> {
    let put = || Some(PutOptions::new().with_lease(w.lease.id));
    let reader = &w.reader;
    let txn = match w.mode {
        Mode::Exclusive => Txn::new()
            .when(vec![
                Compare::create_revision(key.to_vec(), CompareOp::Equal, 0),
                Compare::version(readers.to_vec(), CompareOp::Equal, 0)
                    .with_range(keys::prefix_end(readers)),
            ])
            .and_then(vec![TxnOp::put(key.to_vec(), w.value.clone(), put())]),
        Mode::Shared => Txn::new()
            .when(vec![Compare::create_revision(
                key.to_vec(),
                CompareOp::Equal,
                0,
            )])
            .and_then(vec![
                TxnOp::put(key.to_vec(), keys::SHARED_MARKER.to_vec(), put()),
                TxnOp::put(reader.clone(), Vec::new(), put()),
            ])
            .or_else(vec![TxnOp::txn(
                Txn::new()
                    .when(vec![Compare::value(
                        key.to_vec(),
                        CompareOp::Equal,
                        keys::SHARED_MARKER.to_vec(),
                    )])
                    .and_then(vec![TxnOp::put(reader.clone(), Vec::new(), put())]),
            )]),
    };
    let r = inner.txn("acquire", txn).await?;
    let rev = revision(&r);
    if r.succeeded() || nested(&r).is_some_and(|t| t.succeeded()) {
        Ok(Ok(rev))
    } else {
        Ok(Err(rev))
    }
}

/// After an attempt whose outcome is unknown: removes what it wrote, if it was
/// applied. `Ok` once nothing of it is left (freed, or never there).
async fn undo_attempt(inner: &Inner, key: &[u8], readers: &[u8], w: &Write) -> Result<()> {
    match w.mode {
        Mode::Exclusive => {
            // Our value on our lease: only this attempt wrote it.
            inner
                .txn(
                    "undoing an unconfirmed acquire",
                    Txn::new()
                        .when(vec![
                            Compare::value(key.to_vec(), CompareOp::Equal, w.value.clone()),
                            Compare::lease(key.to_vec(), CompareOp::Equal, w.lease.id),
                        ])
                        .and_then(vec![TxnOp::delete(key.to_vec(), None)]),
                )
                .await?;
            Ok(())
        }
        Mode::Shared => {
            let r = inner
                .get(
                    "undoing an unconfirmed acquire",
                    w.reader.clone(),
                    Some(GetOptions::new().with_keys_only()),
                )
                .await?;
            match r.kvs().first() {
                Some(kv) if kv.lease() == w.lease.id => {
                    let token = kv.create_revision();
                    release_reader(inner, key, readers, &w.reader, token, w.lease.id).await?;
                    Ok(())
                }
                _ => Ok(()),
            }
        }
    }
}

/// Releases a hold, guarded on its revision: never frees a newer holder's key.
async fn release_hold(inner: &Inner, key: &[u8], readers: &[u8], hold: &Hold) -> Result<bool> {
    match &hold.reader {
        None => {
            let r = inner
                .txn(
                    "release",
                    Txn::new()
                        .when(vec![Compare::create_revision(
                            key.to_vec(),
                            CompareOp::Equal,
                            hold.token,
                        )])
                        .and_then(vec![TxnOp::delete(key.to_vec(), None)]),
                )
                .await?;
            Ok(r.succeeded())
        }
        Some(me) => release_reader(inner, key, readers, me, hold.token, hold.lease.id).await,
    }
}

/// How many times a reader's release re-reads the lock after a concurrent change
/// before it just removes its reader key (the remaining readers' keepers then
/// re-create the marker if it goes).
const RELEASE_ROUNDS: usize = 8;

/// Releases the reader key `me` (created at `token`, on `lease`). The last reader
/// also removes the marker; a reader on whose lease the marker sits while others
/// remain moves it to a remaining reader's lease, in the same transaction.
async fn release_reader(
    inner: &Inner,
    key: &[u8],
    readers: &[u8],
    me: &[u8],
    token: i64,
    lease: i64,
) -> Result<bool> {
    let mine = || Compare::create_revision(me.to_vec(), CompareOp::Equal, token);
    let delete_me = || TxnOp::delete(me.to_vec(), None);
    let mut after = me.to_vec();
    after.push(0);
    for _ in 0..RELEASE_ROUNDS {
        // The common cases in one transaction: the last reader removes the marker;
        // a reader the marker does not hang on just leaves. Otherwise read it all.
        let r = inner
            .txn(
                "release",
                Txn::new()
                    .when(vec![
                        mine(),
                        Compare::version(readers.to_vec(), CompareOp::Equal, 0)
                            .with_range(me.to_vec()),
                        Compare::version(after.clone(), CompareOp::Equal, 0)
                            .with_range(keys::prefix_end(readers)),
                        Compare::value(
                            key.to_vec(),
                            CompareOp::Equal,
                            keys::SHARED_MARKER.to_vec(),
                        ),
                    ])
                    .and_then(vec![delete_me(), TxnOp::delete(key.to_vec(), None)])
                    .or_else(vec![TxnOp::txn(
                        Txn::new()
                            .when(vec![
                                mine(),
                                Compare::lease(key.to_vec(), CompareOp::NotEqual, lease),
                            ])
                            .and_then(vec![delete_me()])
                            .or_else(vec![
                                TxnOp::get(me.to_vec(), Some(GetOptions::new().with_keys_only())),
                                TxnOp::get(key.to_vec(), None),
                                TxnOp::get(
                                    readers.to_vec(),
                                    Some(GetOptions::new().with_prefix().with_keys_only()),
                                ),
                            ]),
                    )]),
            )
            .await?;
        if r.succeeded() {
            return Ok(true);
        }
        let Some(n) = nested(&r) else {
            return Err(ToozError::backend_msg("etcd3", "release: malformed reply"));
        };
        if n.succeeded() {
            return Ok(true);
        }
        let state = gets(&n);
        match got(&state, 0) {
            Some(kv) if kv.create_revision() == token => {}
            // Our reader key is gone (expired, broken) or is another hold's.
            _ => return Ok(false),
        }
        let marker = got(&state, 1);
        let others: Vec<KeyValue> = state
            .get(2)
            .and_then(|g| g.as_ref())
            .map(|g| g.kvs().to_vec())
            .unwrap_or_default()
            .into_iter()
            .filter(|kv| kv.key() != me)
            .collect();
        let Some(m) = marker.filter(|m| {
            m.lease() == lease && m.value() == keys::SHARED_MARKER && !others.is_empty()
        }) else {
            // Changed since the first transaction: go round again.
            continue;
        };
        let unchanged = Compare::mod_revision(key.to_vec(), CompareOp::Equal, m.mod_revision());
        let txn = if let Some(o) = others.iter().find(|o| o.lease() == lease) {
            // Another reader on our lease stays: the marker can stay too.
            Txn::new()
                .when(vec![
                    mine(),
                    unchanged,
                    Compare::create_revision(
                        o.key().to_vec(),
                        CompareOp::Equal,
                        o.create_revision(),
                    ),
                ])
                .and_then(vec![delete_me()])
        } else {
            let Some(o) = others.first() else { continue };
            Txn::new()
                .when(vec![
                    mine(),
                    unchanged,
                    Compare::create_revision(
                        o.key().to_vec(),
                        CompareOp::Equal,
                        o.create_revision(),
                    ),
                ])
                .and_then(vec![
                    delete_me(),
                    TxnOp::put(
                        key.to_vec(),
                        keys::SHARED_MARKER.to_vec(),
                        Some(PutOptions::new().with_lease(o.lease())),
                    ),
                ])
        };
        let mut c = inner.client()?;
        match c.txn(txn).await {
            Ok(r) if r.succeeded() => return Ok(true),
            Ok(_) => continue,
            // The chosen reader's lease ended meanwhile (its key went with it).
            Err(e) if crate::error::lease_not_found(&e) => {
                continue;
            }
            Err(e) => return Err(map_err("release", e)),
        }
    }
    // Still contended: leave; the remaining readers' keepers restore the marker.
    let r = inner
        .txn(
            "release",
            Txn::new().when(vec![mine()]).and_then(vec![delete_me()]),
        )
        .await?;
    Ok(r.succeeded())
}

/// Keeps the shared marker in the lock key while our reader key `me` (created at
/// `token`) exists: watches the lock key from `from` and, when the marker is
/// deleted (its lease ended), re-creates it on our lease. Ends when we no
/// longer read or the lease is gone.
async fn keep_marker(
    inner: Arc<Inner>,
    key: Vec<u8>,
    me: Vec<u8>,
    token: i64,
    lease: i64,
    from: i64,
) {
    let mut backoff = Backoff::new(Duration::from_millis(20), Duration::from_secs(2));
    let mut from = from;
    loop {
        if !inner.on_lease(lease) {
            return;
        }
        let changed = async {
            let mut c = inner.client()?;
            let opts = WatchOptions::new()
                .with_start_revision(from)
                .with_filters([WatchFilterType::NoPut]);
            let mut w = c
                .watch(key.clone(), Some(opts))
                .await
                .map_err(|e| map_err("watching the shared marker", e))?;
            loop {
                match w.message().await {
                    Ok(Some(m))
                        if m.canceled()
                            || m.events()
                                .iter()
                                .any(|e| e.event_type() == EventType::Delete) =>
                    {
                        return Ok(());
                    }
                    Ok(Some(_)) => continue,
                    Ok(None) => return Err(ToozError::backend_msg("etcd3", "the watch ended")),
                    Err(e) => return Err(map_err("watching the shared marker", e)),
                }
            }
        };
        if let Err(e) = changed.await {
            tracing::debug!(error = %e, "etcd: shared marker watch broke; checking the marker");
            tokio::time::sleep(backoff.next_delay()).await;
        }
        // The marker may be gone: put it back on our lease while we still read.
        let r = inner
            .txn(
                "keeping the shared marker",
                Txn::new()
                    .when(vec![
                        Compare::create_revision(me.clone(), CompareOp::Equal, token),
                        Compare::create_revision(key.clone(), CompareOp::Equal, 0),
                    ])
                    .and_then(vec![TxnOp::put(
                        key.clone(),
                        keys::SHARED_MARKER.to_vec(),
                        Some(PutOptions::new().with_lease(lease)),
                    )])
                    .or_else(vec![TxnOp::get(
                        me.clone(),
                        Some(GetOptions::new().with_keys_only()),
                    )]),
            )
            .await;
        match r {
            Ok(r) if r.succeeded() => {
                tracing::info!(
                    "etcd: the shared-lock marker vanished with another reader's lease; re-created it on ours"
                );
                backoff.reset();
                from = revision(&r) + 1;
            }
            Ok(r) => {
                if got(&gets(&r), 0).is_none_or(|kv| kv.create_revision() != token) {
                    return;
                }
                backoff.reset();
                from = revision(&r) + 1;
            }
            Err(e) => {
                tracing::debug!(error = %e, "etcd: checking the shared marker failed");
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
}

/// Releases `hold` in a task, retried until it goes through or its lease is gone
/// (a lock won after its acquirer went away, or a release that failed).
fn spawn_release(inner: &Arc<Inner>, key: &[u8], readers: &[u8], hold: Hold) {
    if let Some(k) = &hold.keeper {
        k.abort();
    }
    let (key, readers) = (key.to_vec(), readers.to_vec());
    let lease = hold.lease.id;
    inner.spawn_cleanup(lease, "lock release", move |i| {
        let (key, readers, hold) = (key.clone(), readers.clone(), hold.clone());
        async move { release_hold(&i, &key, &readers, &hold).await.map(|_| ()) }
    });
}

/// A waiter's watch of the deletes of one key: the lock key (and the reader keys)
/// or the queue entry ahead.
struct Wakes {
    inner: Arc<Inner>,
    key: Vec<u8>,
    readers: Option<Vec<u8>>,
    /// The first revision not seen yet.
    from: i64,
    watch: Option<WatchStream>,
}

impl Wakes {
    async fn open(&self) -> Result<WatchStream> {
        let mut c = self.inner.client()?;
        let opts = WatchOptions::new()
            .with_start_revision(self.from)
            .with_filters([WatchFilterType::NoPut]);
        let mut w = c
            .watch(self.key.clone(), Some(opts.clone()))
            .await
            .map_err(|e| map_err("watching the lock", e))?;
        if let Some(r) = &self.readers {
            w.watch(r.clone(), Some(opts.with_range(keys::prefix_end(r))))
                .await
                .map_err(|e| map_err("watching the lock's readers", e))?;
        }
        Ok(w)
    }

    /// Waits for the next delete; `true` for one (or for a watch that broke and
    /// was re-opened: something may have been missed), `false` when the watch
    /// cannot be re-opened.
    async fn next(&mut self) -> bool {
        let Some(w) = self.watch.as_mut() else {
            return false;
        };
        loop {
            match w.message().await {
                Ok(Some(m)) if m.canceled() => {
                    if m.compact_revision() == 0 {
                        tracing::debug!(reason = m.cancel_reason(), "etcd: lock watch cancelled");
                        return false;
                    }
                    // Compacted past `from`: what is left starts there.
                    self.from = self.from.max(m.compact_revision());
                    break;
                }
                Ok(Some(m)) if m.events().is_empty() => {}
                Ok(Some(m)) => {
                    let last = m
                        .events()
                        .iter()
                        .filter_map(|e| e.kv())
                        .map(KeyValue::mod_revision);
                    self.from = self.from.max(last.max().unwrap_or(0) + 1);
                    return true;
                }
                Ok(None) | Err(_) => break,
            }
        }
        self.watch = match self.open().await {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::debug!(error = %e, "etcd: re-opening a lock watch failed");
                None
            }
        };
        self.watch.is_some()
    }
}

/// Where a waiting acquire stands after one of its transactions.
enum Step {
    /// Granted, at this revision (the fencing token).
    Granted(i64),
    /// Queued at this revision (the entry's create revision), behind this entry
    /// (`None`: nobody it waits behind).
    Queued(i64, Option<Vec<u8>>),
}

/// The outcome of an attempt by the head of the queue.
enum Head {
    /// Granted at this revision; the entry was removed with it.
    Granted(i64),
    /// Still held by someone else, as of this revision.
    Held(i64),
    /// The queue entry is gone (its lease ended).
    Gone,
}

/// The get of the last entries of a waiter range, newest first.
fn newest_entries(limit: i64) -> GetOptions {
    GetOptions::new()
        .with_prefix()
        .with_keys_only()
        .with_sort(SortTarget::Create, SortOrder::Descend)
        .with_limit(limit)
}

/// A waiting acquire's first transaction: the lock, if it is free and nobody
/// waits that this acquire would have to let go first (anybody for an exclusive
/// acquire, an exclusive waiter for a shared one; the waiters to let go first are
/// the keys under `ahead`); else its entry `q` in the queue, and the newest of
/// those waiters, the one it waits behind.
async fn grant_or_enqueue(
    inner: &Inner,
    key: &[u8],
    readers: &[u8],
    ahead: &[u8],
    w: &Write,
    q: &[u8],
) -> Result<Step> {
    let put = || Some(PutOptions::new().with_lease(w.lease.id));
    let nobody_ahead = || {
        Compare::version(ahead.to_vec(), CompareOp::Equal, 0).with_range(keys::prefix_end(ahead))
    };
    let enqueue = vec![
        TxnOp::put(q.to_vec(), Vec::new(), put()),
        TxnOp::get(ahead.to_vec(), Some(newest_entries(2))),
    ];
    let txn = match w.mode {
        Mode::Exclusive => Txn::new()
            .when(vec![
                Compare::create_revision(key.to_vec(), CompareOp::Equal, 0),
                Compare::version(readers.to_vec(), CompareOp::Equal, 0)
                    .with_range(keys::prefix_end(readers)),
                nobody_ahead(),
            ])
            .and_then(vec![TxnOp::put(key.to_vec(), w.value.clone(), put())])
            .or_else(enqueue),
        Mode::Shared => Txn::new()
            .when(vec![
                Compare::create_revision(key.to_vec(), CompareOp::Equal, 0),
                nobody_ahead(),
            ])
            .and_then(vec![
                TxnOp::put(key.to_vec(), keys::SHARED_MARKER.to_vec(), put()),
                TxnOp::put(w.reader.clone(), Vec::new(), put()),
            ])
            .or_else(vec![TxnOp::txn(
                Txn::new()
                    .when(vec![
                        Compare::value(
                            key.to_vec(),
                            CompareOp::Equal,
                            keys::SHARED_MARKER.to_vec(),
                        ),
                        nobody_ahead(),
                    ])
                    .and_then(vec![TxnOp::put(w.reader.clone(), Vec::new(), put())])
                    .or_else(enqueue),
            )]),
    };
    let r = inner.txn("acquire", txn).await?;
    let rev = revision(&r);
    if r.succeeded() {
        return Ok(Step::Granted(rev));
    }
    let outer = match w.mode {
        Mode::Exclusive => r,
        Mode::Shared => match nested(&r) {
            Some(n) if n.succeeded() => return Ok(Step::Granted(rev)),
            Some(n) => n,
            None => return Err(ToozError::backend_msg("etcd3", "acquire: malformed reply")),
        },
    };
    let before = gets(&outer).get(1).and_then(|g| g.as_ref()).and_then(|g| {
        g.kvs()
            .iter()
            .find(|kv| kv.key() != q)
            .map(|kv| kv.key().to_vec())
    });
    Ok(Step::Queued(rev, before))
}

/// The newest waiter under `ahead` queued before revision `at` (the one an entry
/// created at `at` waits behind), and the revision this was read at. Waiters
/// queued earlier only ever leave, so once there is none there never is.
async fn waiting_behind(inner: &Inner, ahead: &[u8], at: i64) -> Result<(i64, Option<Vec<u8>>)> {
    if at <= 1 {
        return Ok((at, None));
    }
    let r = inner
        .get(
            "reading the lock queue",
            ahead.to_vec(),
            Some(newest_entries(1).with_max_create_revision(at - 1)),
        )
        .await?;
    let rev = r.header().map_or(0, |h| h.revision());
    Ok((rev, r.kvs().first().map(|kv| kv.key().to_vec())))
}

/// An attempt by the head of the queue (entry `q`, created at `at`): the lock and
/// the entry's removal in one transaction. `last` (the wait ran out) removes the
/// entry anyway.
async fn head_attempt(
    inner: &Inner,
    key: &[u8],
    readers: &[u8],
    w: &Write,
    (q, at): (&[u8], i64),
    last: bool,
) -> Result<Head> {
    let put = || Some(PutOptions::new().with_lease(w.lease.id));
    let mine = || Compare::create_revision(q.to_vec(), CompareOp::Equal, at);
    let mut otherwise = vec![TxnOp::get(
        q.to_vec(),
        Some(GetOptions::new().with_keys_only()),
    )];
    if last {
        otherwise.push(TxnOp::delete(q.to_vec(), None));
    }
    let leave = || TxnOp::delete(q.to_vec(), None);
    let txn = match w.mode {
        Mode::Exclusive => Txn::new()
            .when(vec![
                mine(),
                Compare::create_revision(key.to_vec(), CompareOp::Equal, 0),
                Compare::version(readers.to_vec(), CompareOp::Equal, 0)
                    .with_range(keys::prefix_end(readers)),
            ])
            .and_then(vec![
                TxnOp::put(key.to_vec(), w.value.clone(), put()),
                leave(),
            ])
            .or_else(otherwise),
        Mode::Shared => Txn::new()
            .when(vec![
                mine(),
                Compare::create_revision(key.to_vec(), CompareOp::Equal, 0),
            ])
            .and_then(vec![
                TxnOp::put(key.to_vec(), keys::SHARED_MARKER.to_vec(), put()),
                TxnOp::put(w.reader.clone(), Vec::new(), put()),
                leave(),
            ])
            .or_else(vec![TxnOp::txn(
                Txn::new()
                    .when(vec![
                        mine(),
                        Compare::value(
                            key.to_vec(),
                            CompareOp::Equal,
                            keys::SHARED_MARKER.to_vec(),
                        ),
                    ])
                    .and_then(vec![
                        TxnOp::put(w.reader.clone(), Vec::new(), put()),
                        leave(),
                    ])
                    .or_else(otherwise),
            )]),
    };
    let r = inner.txn("acquire", txn).await?;
    let rev = revision(&r);
    if r.succeeded() {
        return Ok(Head::Granted(rev));
    }
    let outer = match w.mode {
        Mode::Exclusive => r,
        Mode::Shared => match nested(&r) {
            Some(n) if n.succeeded() => return Ok(Head::Granted(rev)),
            Some(n) => n,
            None => return Err(ToozError::backend_msg("etcd3", "acquire: malformed reply")),
        },
    };
    Ok(match got(&gets(&outer), 0) {
        Some(kv) if kv.create_revision() == at => Head::Held(rev),
        _ => Head::Gone,
    })
}

/// What an acquire in progress may have left in etcd: its queue entry, and the
/// write of a transaction whose reply it has not seen. Dropped with either set
/// (the acquire was cancelled, stopped, or failed), it removes them in a task,
/// owner-checked, once the transaction in flight has its reply: the entry first
/// (it wakes the waiter behind it), then the write.
struct Place {
    inner: Arc<Inner>,
    key: Vec<u8>,
    readers: Vec<u8>,
    write: Write,
    entry: Option<Vec<u8>>,
    unconfirmed: bool,
    /// The acquire's transaction in flight.
    writes: InFlight,
}

impl Place {
    /// Nothing is left to remove (granted, or given up cleanly).
    fn settled(&mut self) {
        self.entry = None;
        self.unconfirmed = false;
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        if self.entry.is_none() && !self.unconfirmed {
            return;
        }
        let (key, readers, w) = (self.key.clone(), self.readers.clone(), self.write.clone());
        let (entry, undo) = (self.entry.take(), self.unconfirmed);
        let landed = self.writes.landed();
        self.inner
            .spawn_cleanup(w.lease.id, "abandoned lock wait", move |i| {
                let (key, readers, w, entry) =
                    (key.clone(), readers.clone(), w.clone(), entry.clone());
                let landed = landed.clone();
                async move {
                    // Whatever the write in flight does is done before the undo.
                    landed.wait().await;
                    if let Some(q) = entry {
                        i.txn(
                            "leaving the lock queue",
                            Txn::new().and_then(vec![TxnOp::delete(q, None)]),
                        )
                        .await?;
                    }
                    if undo {
                        undo_attempt(&i, &key, &readers, &w).await?;
                    }
                    Ok(())
                }
            });
    }
}

/// Waits for the next delete `wakes` reports, until `deadline`; `false` when the
/// deadline came first. A watch that cannot be re-opened turns into polling.
async fn next_delete(wakes: &mut Wakes, deadline: Option<Instant>, backoff: &mut Backoff) -> bool {
    let woke = async {
        if wakes.next().await {
            backoff.reset();
        } else {
            // No watch: look again after a pause (and try watching again).
            tokio::time::sleep(backoff.next_delay()).await;
            match wakes.open().await {
                Ok(w) => wakes.watch = Some(w),
                Err(e) => tracing::debug!(error = %e, "etcd: lock watch still failing; polling"),
            }
        }
    };
    tokio::select! {
        () = woke => true,
        () = sleep_until_opt(deadline) => false,
    }
}

/// The wait ran out before the acquire reached the head: it leaves the queue.
async fn give_up(inner: &Inner, place: &mut Place, q: &[u8]) -> Result<Option<FencingToken>> {
    inner
        .txn(
            "leaving the lock queue",
            Txn::new().and_then(vec![TxnOp::delete(q.to_vec(), None)]),
        )
        .await?;
    place.settled();
    Ok(None)
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

impl EtcdLock {
    pub(crate) fn new(inner: Arc<Inner>, name: LockName, id: u64) -> Self {
        EtcdLock {
            id,
            key: keys::lock(name.as_bytes()),
            readers: keys::lock_readers(name.as_bytes()),
            queue: keys::lock_queue(name.as_bytes()),
            queue_exclusive: keys::lock_queue_exclusive(name.as_bytes()),
            name,
            inner,
            hold: Mutex::new(None),
        }
    }

    fn current(&self) -> Option<Hold> {
        guard(&self.hold).clone()
    }

    /// A name no other acquire uses: `<lease>-<handle>-<random>`.
    fn unique(&self, lease: &Lease) -> String {
        format!(
            "{:x}-{:x}-{}",
            lease.id,
            self.id,
            hex::encode(random_value())
        )
    }

    /// Records a hold granted at `rev` to the acquire that wrote `w`.
    fn granted(&self, rev: i64, w: Write) -> FencingToken {
        let mut hold = Hold {
            token: rev,
            reader: None,
            lease: w.lease,
            keeper: None,
        };
        if w.mode == Mode::Shared {
            let task = tokio::spawn(keep_marker(
                Arc::clone(&self.inner),
                self.key.clone(),
                w.reader.clone(),
                rev,
                w.lease.id,
                rev + 1,
            ));
            hold.reader = Some(w.reader);
            hold.keeper = Some(task.abort_handle());
        }
        if let Some(old) = guard(&self.hold).replace(hold)
            && let Some(k) = old.keeper
        {
            k.abort();
        }
        FencingToken(rev.max(0) as u64)
    }

    /// What an acquire's transaction needs, owned (it runs in a task of its own).
    fn owned(&self, w: &Write) -> (Arc<Inner>, Vec<u8>, Vec<u8>, Write) {
        (
            Arc::clone(&self.inner),
            self.key.clone(),
            self.readers.clone(),
            w.clone(),
        )
    }

    /// A watch of deletes of `key` (and of the reader keys, when given) from
    /// revision `from` on, opened.
    async fn watch_deletes(&self, key: Vec<u8>, readers: Option<Vec<u8>>, from: i64) -> Wakes {
        let mut wakes = Wakes {
            inner: Arc::clone(&self.inner),
            key,
            readers,
            from,
            watch: None,
        };
        match wakes.open().await {
            Ok(w) => wakes.watch = Some(w),
            // `next_delete` polls until it can watch.
            Err(e) => tracing::debug!(error = %e, "etcd: opening a lock watch failed"),
        }
        wakes
    }
}

impl Drop for EtcdLock {
    fn drop(&mut self) {
        if let Some(k) = guard(&self.hold).as_ref().and_then(|h| h.keeper.as_ref()) {
            k.abort();
        }
    }
}

#[tooz_core::async_trait]
impl DriverLock for EtcdLock {
    fn name(&self) -> &LockName {
        &self.name
    }

    fn queues(&self) -> bool {
        true
    }

    /// A blocked acquire waits in the lock's queue (module docs): it watches only
    /// the entry ahead of it, and the head watches the lock, so a release wakes
    /// one exclusive waiter (or the shared waiters at the head).
    #[tracing::instrument(level = "debug", skip_all, fields(lock = %self.name, ?mode))]
    async fn acquire(&self, mode: Mode, wait: Wait) -> Result<Option<FencingToken>> {
        let lease = self.inner.lease()?;
        let id = self.unique(&lease);
        let mut reader = self.readers.clone();
        reader.extend_from_slice(id.as_bytes());
        let w = Write {
            mode,
            value: random_value(),
            reader,
            lease,
        };
        let mut place = Place {
            inner: Arc::clone(&self.inner),
            key: self.key.clone(),
            readers: self.readers.clone(),
            write: w.clone(),
            entry: None,
            unconfirmed: true,
            writes: InFlight::default(),
        };
        if wait == Wait::No {
            let out = {
                let (inner, key, readers, w) = self.owned(&w);
                place
                    .writes
                    .send(
                        NAME,
                        async move { attempt(&inner, &key, &readers, &w).await },
                    )
                    .await?
            };
            place.settled();
            return Ok(out.ok().map(|rev| self.granted(rev, w)));
        }
        let deadline = deadline_of(wait);
        let (ahead, q) = match mode {
            Mode::Exclusive => (&self.queue, [&self.queue[..], b"x", id.as_bytes()].concat()),
            Mode::Shared => (
                &self.queue_exclusive,
                [&self.queue[..], b"s", id.as_bytes()].concat(),
            ),
        };
        // Set before the request: a reply lost after the put leaves the entry.
        place.entry = Some(q.clone());
        let step = {
            let (inner, key, readers, w) = self.owned(&w);
            let (ahead, q) = (ahead.clone(), q.clone());
            place
                .writes
                .send(NAME, async move {
                    grant_or_enqueue(&inner, &key, &readers, &ahead, &w, &q).await
                })
                .await?
        };
        place.unconfirmed = false;
        let (at, mut before) = match step {
            Step::Granted(rev) => {
                place.settled();
                return Ok(Some(self.granted(rev, w)));
            }
            Step::Queued(at, before) => (at, before),
        };
        let mut backoff = Backoff::new(Duration::from_millis(20), Duration::from_secs(1));
        let mut seen = at;
        // Behind other waiters: wait for the one just ahead to leave, then look
        // again (the one ahead of it may still be there).
        while let Some(b) = before.take() {
            let mut wakes = self.watch_deletes(b, None, seen + 1).await;
            if !next_delete(&mut wakes, deadline, &mut backoff).await {
                return give_up(&self.inner, &mut place, &q).await;
            }
            (seen, before) = waiting_behind(&self.inner, ahead, at).await?;
        }
        // At the head: try, and while the lock is held, wait for a release.
        let readers = (mode == Mode::Exclusive).then(|| self.readers.clone());
        let mut last = false;
        loop {
            place.unconfirmed = true;
            let out = {
                let (inner, key, readers, w) = self.owned(&w);
                let q = q.clone();
                place
                    .writes
                    .send(NAME, async move {
                        head_attempt(&inner, &key, &readers, &w, (&q, at), last).await
                    })
                    .await?
            };
            place.unconfirmed = false;
            let rev = match out {
                Head::Granted(rev) => {
                    place.settled();
                    return Ok(Some(self.granted(rev, w)));
                }
                Head::Gone => {
                    place.settled();
                    return Err(ToozError::backend_msg(
                        "etcd3",
                        "the lock wait's queue entry vanished (its lease ended)",
                    ));
                }
                Head::Held(_) if last => {
                    place.settled();
                    return Ok(None);
                }
                Head::Held(rev) => rev,
            };
            let mut wakes = self
                .watch_deletes(self.key.clone(), readers.clone(), rev + 1)
                .await;
            if !next_delete(&mut wakes, deadline, &mut backoff).await {
                // One last attempt at the deadline, leaving the queue either way.
                last = true;
            }
        }
    }
    #[tracing::instrument(level = "debug", skip_all, fields(lock = %self.name))]
    async fn release(&self) -> Result<bool> {
        let Some(hold) = guard(&self.hold).take() else {
            return Ok(false);
        };
        if let Some(k) = &hold.keeper {
            k.abort();
        }
        match release_hold(&self.inner, &self.key, &self.readers, &hold).await {
            Ok(released) => Ok(released),
            Err(e) => {
                // On the coordinator's lease the hold would outlive this error for
                // as long as the process runs: keep trying, owner-checked.
                spawn_release(&self.inner, &self.key, &self.readers, hold);
                Err(e)
            }
        }
    }

    async fn heartbeat(&self) -> Result<bool> {
        // The hold lives on the coordinator's lease, renewed by the driver
        // heartbeat with one keep-alive: nothing to send per lock.
        let Some(hold) = self.current() else {
            return Ok(false);
        };
        Ok(self
            .inner
            .lease()
            .is_ok_and(|l| l.epoch == hold.lease.epoch && l.id == hold.lease.id))
    }

    async fn is_still_owner(&self) -> Result<bool> {
        let Some(hold) = self.current() else {
            return Ok(false);
        };
        let owner = match &hold.reader {
            None => Compare::create_revision(self.key.clone(), CompareOp::Equal, hold.token),
            Some(me) => Compare::create_revision(me.clone(), CompareOp::Equal, hold.token),
        };
        let r = self
            .inner
            .txn("is_still_owner", Txn::new().when(vec![owner]))
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
