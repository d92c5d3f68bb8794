//! Lock handles on `<ns>/locks/<name>`, acquired with the coordinator's session
//! in one transaction whose reply carries the key's modify index (the fencing
//! token), released by a delete guarded on that index.
//!
//! Shared holds: the lock key holds [`keys::SHARED_MARKER`] on one reader's
//! session and every reader has a key of its own under
//! `<ns>/lock-readers/<hex name>/`, on its session. A Python or Rust exclusive
//! acquirer finds the lock key held; the last reader deletes it, and a reader
//! that leaves while others remain hands the marker to one of them in the same
//! transaction. Each reader's keeper puts the marker back on its own session if
//! the marker's session dies while it still reads.
//!
//! A blocked acquire waits in a queue, so that a release wakes one waiter, not
//! every blocked coordinator. After a failed attempt it writes an entry
//! `<ns>/lock-queue/<hex name>/<x|s><unique>`, acquired with the coordinator's
//! session (so it goes with a crashed waiter's session), and waits, by a
//! blocking query on that one key, for the nearest entry created before its own
//! (by `CreateIndex`) to go: any entry for an exclusive waiter, the nearest
//! exclusive one for a shared waiter (so readers queued behind readers proceed
//! together). With nobody ahead it is the head: it tries, and while the lock is
//! held waits by a blocking query on the lock key itself. A grant deletes the
//! entry in the same transaction, which wakes the waiter behind; so does a
//! waiter that gives up (its deadline, its future dropped, stop): its entry is
//! deleted, by itself or by a cleanup task. Python clients never queue: they
//! compete with the head, which sees their release on the lock key. Keys under
//! the queue prefix that are not entries of this form held by a session (another
//! client's junk) are ignored. An acquire that does not wait (`Wait::No`) never
//! queues.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tooz_core::util::{Backoff, InFlight, deadline_of, sleep_within};
use tooz_core::{DriverLock, FencingToken, LockName, Mode, Result, ToozError, Wait};

use crate::client::{Kv, Txn, op};
use crate::config::NAME;
use crate::driver::{CAS_TRIES, Inner, guard};
use crate::keys;
use crate::watch::WAIT;

#[derive(Debug, Clone)]
struct Hold {
    mode: Mode,
    session: String,
    /// Modify index of the lock key (exclusive) or of our reader key (shared)
    /// at the grant.
    token: u64,
    /// Our reader key (shared holds).
    reader: String,
    /// The task keeping the shared marker while we read (shared holds).
    keeper: Option<Arc<Keeper>>,
}

/// Aborts the marker keeper when the hold goes.
#[derive(Debug)]
struct Keeper(tokio::task::AbortHandle);

impl Drop for Keeper {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One lock handle.
#[derive(Debug)]
pub(crate) struct ConsulLock {
    inner: Arc<Inner>,
    name: LockName,
    key: String,
    readers: String,
    /// `<ns>/lock-queue/<hex name>/`: the waiters' entries.
    queue: String,
    hold: Mutex<Option<Hold>>,
}

/// The reader keys in `entries`.
fn readers_in<'a>(entries: &'a [Kv], prefix: &str) -> impl Iterator<Item = &'a Kv> + 'a {
    let prefix = prefix.to_string();
    entries.iter().filter(move |k| k.key.starts_with(&prefix))
}

/// The mode of a queue entry `key` under `queue`: `x` or `s` and 32 hex digits.
/// `None` for anything else (not ours: ignored).
fn entry_mode(queue: &str, key: &str) -> Option<Mode> {
    let rest = key.strip_prefix(queue)?;
    let (tag, id) = rest.split_at_checked(1)?;
    if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    match tag {
        "x" => Some(Mode::Exclusive),
        "s" => Some(Mode::Shared),
        _ => None,
    }
}

/// The live entries of `entries` (of the form [`entry_mode`] reads, held by a
/// session) with their mode.
fn waiters<'a>(entries: &'a [Kv], queue: &'a str) -> impl Iterator<Item = (&'a Kv, Mode)> + 'a {
    entries.iter().filter_map(move |k| {
        let m = entry_mode(queue, &k.key)?;
        k.holder().is_some().then_some((k, m))
    })
}

/// The entry the waiter `mine` (created at `at`, in `mode`) waits behind: the
/// newest live entry created before it (for a shared waiter, the newest
/// exclusive one). Entries created earlier only ever leave.
fn ahead<'a>(entries: &'a [Kv], queue: &'a str, mine: &str, mode: Mode, at: u64) -> Option<&'a Kv> {
    waiters(entries, queue)
        .filter(|(k, m)| {
            k.key != mine
                && k.create_index < at
                && (mode == Mode::Exclusive || *m == Mode::Exclusive)
        })
        .map(|(k, _)| k)
        .max_by(|a, b| (a.create_index, &a.key).cmp(&(b.create_index, &b.key)))
}

/// The outcome of one attempt.
enum Try {
    Granted(FencingToken),
    /// Held by someone else: the lock key as read (a wait is for it to change).
    Held(Kv),
    /// Free but refused for now (Consul's lock delay, our session gone until the
    /// next heartbeat replaces it, or a key that kept changing): try again after
    /// this long.
    Delayed(Duration),
    /// Readers hold it although their marker is gone (its session died): the
    /// grant was given back (and the queue entry went with it).
    Readers,
    /// Our queue entry is gone (the session ended).
    Gone,
}

/// What an acquire in progress may have left in Consul: its queue entry, and the
/// write of a transaction whose reply it has not seen. Dropped with either set
/// (the acquire was cancelled, stopped, or failed), it removes them in a task,
/// owner-checked: the entry first (it wakes the waiter behind it), then the
/// write.
struct Place {
    inner: Arc<Inner>,
    session: String,
    mode: Mode,
    key: String,
    readers: String,
    /// The value an exclusive attempt writes into the lock key.
    value: Vec<u8>,
    /// The reader key a shared attempt creates.
    reader: String,
    entry: Option<String>,
    unconfirmed: bool,
    /// The write in flight (see [`Place::write`]).
    writes: InFlight,
}

impl Place {
    /// Sends a write of the acquire (an attempt, a queue entry) so that dropping
    /// the acquire cannot cut it off mid-flight ([`InFlight`]): the clean-up
    /// waits for its reply before it removes anything. (An undo that ran while
    /// the write was still on its way read the lock free, and the write then
    /// landed and stayed: a hold left behind by a dropped acquire.)
    async fn write(&mut self, what: &'static str, ops: Vec<serde_json::Value>) -> Result<Txn> {
        let inner = Arc::clone(&self.inner);
        self.writes
            .send(NAME, async move { inner.client.txn(what, ops).await })
            .await
    }

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
        let entry = self.entry.take();
        let landed = self.writes.landed();
        let undo = self.unconfirmed.then(|| {
            (
                self.mode,
                self.key.clone(),
                self.readers.clone(),
                self.value.clone(),
                self.reader.clone(),
            )
        });
        Arc::clone(&self.inner).spawn_cleanup(
            self.session.clone(),
            "abandoned lock wait",
            move |i, s| {
                let (entry, undo, landed) = (entry.clone(), undo.clone(), landed.clone());
                async move {
                    // The write's reply: whatever it did is done.
                    landed.wait().await;
                    if let Some(e) = entry {
                        i.client
                            .txn("leaving the lock queue", vec![op::delete(&e)])
                            .await?;
                    }
                    if let Some((mode, key, readers, value, reader)) = undo {
                        undo_attempt(&i, mode, &key, &readers, &value, &reader, &s).await?;
                    }
                    Ok(())
                }
            },
        );
    }
}

/// Removes what an attempt whose reply was not seen may have written: our value
/// in the lock key on our session (exclusive), or our reader key (shared).
async fn undo_attempt(
    i: &Inner,
    mode: Mode,
    key: &str,
    readers: &str,
    value: &[u8],
    reader: &str,
    s: &str,
) -> Result<()> {
    const WHAT: &str = "undoing an unconfirmed acquire";
    match mode {
        Mode::Exclusive => match i.client.get(WHAT, key).await? {
            Some(kv) if kv.holder() == Some(s) && kv.bytes() == value => i
                .client
                .txn(
                    WHAT,
                    vec![op::check_index(key, kv.modify_index), op::delete(key)],
                )
                .await
                .map(|_| ()),
            _ => Ok(()),
        },
        Mode::Shared => release_reader(i, key, readers, reader, s).await.map(|_| ()),
    }
}

fn entry_gone() -> ToozError {
    ToozError::Backend {
        driver: NAME,
        message: "acquire: the lock wait's queue entry vanished (the coordinator's session ended; the next heartbeat replaces it)".into(),
        source: None,
        retryable: true,
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

impl ConsulLock {
    pub(crate) fn new(inner: Arc<Inner>, name: LockName) -> Self {
        let key = inner.layout.lock(name.as_bytes());
        let readers = inner.layout.readers(name.as_bytes());
        let queue = inner.layout.lock_queue(name.as_bytes());
        ConsulLock {
            inner,
            name,
            key,
            readers,
            queue,
            hold: Mutex::new(None),
        }
    }

    /// One attempt (a few, if the key changes under it), with the lock key as
    /// last read in `state` (`None`: not read; an exclusive attempt then guesses
    /// it absent, a shared one reads it). `entry`: our queue entry, removed with
    /// a grant (and checked to be ours). `defer`: a shared attempt does not join
    /// readers while an exclusive waiter is queued.
    async fn attempt(
        &self,
        place: &mut Place,
        state: Option<Option<Kv>>,
        entry: Option<&str>,
        defer: bool,
    ) -> Result<Try> {
        let s = place.session.clone();
        let mode = place.mode;
        let mut state = state;
        for _ in 0..CAS_TRIES {
            let cur = match state.take() {
                Some(c) => c,
                None if mode == Mode::Exclusive => None,
                None => self.inner.client.get("acquire", &self.key).await?,
            };
            let mut ops = match (mode, &cur) {
                (_, Some(kv)) if kv.holder().is_some() && kv.bytes() != keys::SHARED_MARKER => {
                    return Ok(Try::Held(kv.clone()));
                }
                (Mode::Exclusive, Some(kv)) if kv.holder().is_some() => {
                    return Ok(Try::Held(kv.clone()));
                }
                (Mode::Exclusive, Some(kv)) => vec![
                    op::check_index(&self.key, kv.modify_index),
                    op::lock(&self.key, &place.value, &s, 0),
                    op::get_tree(&self.readers),
                ],
                (Mode::Exclusive, None) => vec![
                    op::check_not_exists(&self.key),
                    op::lock(&self.key, &place.value, &s, 0),
                    op::get_tree(&self.readers),
                ],
                (Mode::Shared, Some(kv)) if kv.holder().is_some() => {
                    // Readers hold it: join them, unless a writer waits.
                    if defer && self.writer_queued().await? {
                        return Ok(Try::Held(kv.clone()));
                    }
                    vec![
                        op::check_index(&self.key, kv.modify_index),
                        op::lock(&place.reader, b"", &s, 0),
                    ]
                }
                (Mode::Shared, Some(kv)) => vec![
                    op::check_index(&self.key, kv.modify_index),
                    op::lock(&self.key, keys::SHARED_MARKER, &s, 0),
                    op::lock(&place.reader, b"", &s, 0),
                ],
                (Mode::Shared, None) => vec![
                    op::check_not_exists(&self.key),
                    op::lock(&self.key, keys::SHARED_MARKER, &s, 0),
                    op::lock(&place.reader, b"", &s, 0),
                ],
            };
            let entry_at = ops.len();
            if let Some(e) = entry {
                ops.push(op::check_session(e, &s));
                ops.push(op::delete(e));
            }
            // Until the reply is read, the write may have been applied: a drop or
            // an error leaves it to `Place` to undo.
            place.unconfirmed = true;
            let r = place.write("acquire", ops).await?;
            place.unconfirmed = false;
            match r {
                Txn::Applied(kvs) => return self.granted(place, &kvs).await,
                r if r.failed_at(0) => {
                    // Changed since it was read: read it again.
                    state = Some(self.inner.client.get("acquire", &self.key).await?);
                }
                r if entry.is_some() && r.failed_at(entry_at) => return Ok(Try::Gone),
                // The key is free but cannot be locked: Consul's lock delay
                // after a holder's session was invalidated (or our session is
                // gone until the next heartbeat replaces it).
                _ => return Ok(Try::Delayed(self.delay())),
            }
        }
        Ok(Try::Delayed(self.delay()))
    }

    /// Records the hold an applied attempt (`kvs`, its results) granted.
    async fn granted(&self, place: &mut Place, kvs: &[Kv]) -> Result<Try> {
        let s = place.session.clone();
        match place.mode {
            Mode::Exclusive => {
                // The `lock` op's result: the key's index after this write (a
                // `check-index` result before it carries the older one).
                let token = kvs
                    .iter()
                    .filter(|k| k.key == self.key)
                    .map(|k| k.modify_index)
                    .max()
                    .unwrap_or(0);
                if readers_in(kvs, &self.readers).next().is_some() {
                    // Readers hold it (their marker vanished with a crashed
                    // reader's session): give it back.
                    place.unconfirmed = true;
                    self.inner
                        .client
                        .txn(
                            "acquire",
                            vec![op::check_index(&self.key, token), op::delete(&self.key)],
                        )
                        .await?;
                    place.unconfirmed = false;
                    return Ok(Try::Readers);
                }
                *guard(&self.hold) = Some(Hold {
                    mode: Mode::Exclusive,
                    session: s,
                    token,
                    reader: String::new(),
                    keeper: None,
                });
                Ok(Try::Granted(FencingToken(token)))
            }
            Mode::Shared => {
                let token = kvs
                    .iter()
                    .filter(|k| k.key == place.reader)
                    .map(|k| k.modify_index)
                    .max()
                    .unwrap_or(0);
                let keeper = self.spawn_keeper(&s, &place.reader);
                *guard(&self.hold) = Some(Hold {
                    mode: Mode::Shared,
                    session: s,
                    token,
                    reader: place.reader.clone(),
                    keeper: Some(keeper),
                });
                Ok(Try::Granted(FencingToken(token)))
            }
        }
    }

    /// Whether a live exclusive waiter is queued.
    async fn writer_queued(&self) -> Result<bool> {
        let (entries, _) = self
            .inner
            .client
            .list("reading the lock queue", &self.queue)
            .await?;
        Ok(waiters(&entries, &self.queue).any(|(_, m)| m == Mode::Exclusive))
    }

    /// Waits until `key` is no longer as it was at modify index `index`
    /// (deleted, or written since): its state then, or `None` at `deadline`.
    /// One blocking query on that key (a key changed already answers at once);
    /// a query that fails is sent again after a pause (a connection lost while
    /// waiting does not end the wait). Beyond
    /// [`MAX_WAITS`](crate::client::MAX_WAITS) waits of the coordinator at once,
    /// the key is polled instead (50 ms doubling to 1 s). Ends with an error once the wait's
    /// `session` was replaced (its queue entry went with it), noticed at the
    /// latest when a blocking query's wait runs out.
    async fn wait_change(
        &self,
        session: &str,
        key: &str,
        index: u64,
        deadline: Option<Instant>,
    ) -> Result<Option<Option<Kv>>> {
        let mut backoff = Backoff::new(Duration::from_millis(20), Duration::from_secs(1));
        let mut poll = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
        loop {
            if !self.inner.on_session(session) {
                return Err(entry_gone());
            }
            let wait = match deadline {
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(None);
                    }
                    left.min(WAIT)
                }
                None => WAIT,
            };
            let kv = match self.inner.client.wait_permit() {
                Some(_permit) => {
                    let q = self.inner.client.get_blocking(
                        "waiting for the lock",
                        key,
                        index.max(1),
                        wait,
                    );
                    tokio::select! {
                        r = q => r,
                        () = sleep_until_opt(deadline) => return Ok(None),
                    }
                }
                // More waits than blocking queries allowed: look again after a
                // pause (until a permit is free).
                None => {
                    if !sleep_within(poll.next_delay(), deadline).await {
                        return Ok(None);
                    }
                    self.inner.client.get("waiting for the lock", key).await
                }
            };
            let kv = match kv {
                Ok(kv) => {
                    backoff.reset();
                    kv
                }
                Err(e) if e.is_retryable() => {
                    tracing::debug!(key, error = %e, "consul: a lock wait's blocking query failed; retrying");
                    if !sleep_within(backoff.next_delay(), deadline).await {
                        return Ok(None);
                    }
                    continue;
                }
                Err(e) => return Err(e),
            };
            match kv {
                Some(kv) if kv.modify_index == index => {}
                now => return Ok(Some(now)),
            }
        }
    }

    /// The wait ran out: leave the queue.
    async fn give_up(&self, place: &mut Place) -> Result<Option<FencingToken>> {
        if let Some(e) = place.entry.clone() {
            self.inner
                .client
                .txn("leaving the lock queue", vec![op::delete(&e)])
                .await?;
        }
        place.settled();
        Ok(None)
    }

    /// Queues (after a failed attempt) and waits (module docs). `state`: the lock
    /// key as the failed attempt read it.
    async fn wait_in_queue(
        &self,
        place: &mut Place,
        mut state: Option<Option<Kv>>,
        deadline: Option<Instant>,
    ) -> Result<Option<FencingToken>> {
        let tag = match place.mode {
            Mode::Exclusive => 'x',
            Mode::Shared => 's',
        };
        loop {
            let entry = format!("{}{tag}{}", self.queue, uuid::Uuid::new_v4().simple());
            // Set before the request: a reply lost after the write leaves the entry.
            place.entry = Some(entry.clone());
            let ops = vec![
                op::lock(&entry, b"", &place.session, 0),
                op::get_tree(&self.queue),
            ];
            let r = place.write("queueing for the lock", ops).await?;
            let mut entries = match r {
                Txn::Applied(kvs) => kvs,
                Txn::Failed(_) => {
                    place.entry = None;
                    return Err(entry_gone());
                }
            };
            let at = entries
                .iter()
                .find(|k| k.key == entry)
                .map(|k| k.create_index)
                .ok_or_else(entry_gone)?;
            // Behind others: wait for the nearest one ahead to leave, then look
            // again (the one ahead of it may still be there).
            while let Some(a) = ahead(&entries, &self.queue, &entry, place.mode, at) {
                let (key, index) = (a.key.clone(), a.modify_index);
                let changed = self
                    .wait_change(&place.session, &key, index, deadline)
                    .await?;
                if changed.is_none() {
                    return self.give_up(place).await;
                }
                // The queue, and the lock as it is now (it was handed on
                // meanwhile), in one read; a `get` of an absent key fails the
                // transaction (the lock is free), and then the queue is read
                // alone.
                let r = self
                    .inner
                    .client
                    .txn(
                        "reading the lock queue",
                        vec![op::get_tree(&self.queue), op::get(&self.key)],
                    )
                    .await?;
                (entries, state) = match r {
                    Txn::Applied(kvs) => {
                        let lock = kvs.iter().find(|k| k.key == self.key).cloned();
                        (kvs, Some(lock))
                    }
                    r => {
                        // Failed at the `get`: the lock key is absent (free).
                        let absent = r.failed_at(1).then_some(None);
                        let (entries, _) = self
                            .inner
                            .client
                            .list("reading the lock queue", &self.queue)
                            .await?;
                        (entries, absent)
                    }
                };
                if !entries.iter().any(|k| k.key == entry) {
                    place.entry = None;
                    return Err(entry_gone());
                }
            }
            // At the head: try, and while the lock is held, wait for it to change.
            let mut last = false;
            loop {
                let known = match state.take() {
                    Some(k) => k,
                    None => self.inner.client.get("acquire", &self.key).await?,
                };
                match self
                    .attempt(place, Some(known), Some(&entry), false)
                    .await?
                {
                    Try::Granted(t) => {
                        place.settled();
                        return Ok(Some(t));
                    }
                    Try::Gone => {
                        place.entry = None;
                        return Err(entry_gone());
                    }
                    Try::Readers => {
                        // The applied attempt took our entry: queue again once
                        // the readers' keeper had a chance to restore the marker.
                        place.entry = None;
                        if last || !sleep_within(self.delay(), deadline).await {
                            return Ok(None);
                        }
                        break;
                    }
                    _ if last => return self.give_up(place).await,
                    Try::Held(kv) => {
                        match self
                            .wait_change(&place.session, &self.key, kv.modify_index, deadline)
                            .await?
                        {
                            Some(now) => state = Some(now),
                            // One last attempt at the deadline.
                            None => last = true,
                        }
                    }
                    Try::Delayed(d) => {
                        if !sleep_within(d, deadline).await {
                            last = true;
                        }
                    }
                }
            }
        }
    }

    /// Keeps the shared marker while this handle reads (its reader key `reader`),
    /// fed by the coordinator's blocking query on every lock key: when the lock
    /// key vanishes or is unlocked (the marker's session died) and our reader key
    /// is still ours, the marker is put back on our session, so
    /// that a Python exclusive acquirer keeps finding the lock held. Consul's lock
    /// delay on the vanished key delays that as it delays everyone: the keeper
    /// retries until it passes.
    fn spawn_keeper(&self, s: &str, reader: &str) -> Arc<Keeper> {
        let i = Arc::clone(&self.inner);
        let mut rx = i.hubs.subscribe(&i.client, &i.layout.locks_watch());
        let (key, reader, s) = (self.key.clone(), reader.to_string(), s.to_string());
        let task = tokio::spawn(async move {
            let mut retry = false;
            loop {
                if retry {
                    tokio::select! {
                        r = rx.changed() => if r.is_err() { return },
                        () = tokio::time::sleep(std::time::Duration::from_millis(250)) => {}
                    }
                } else if rx.changed().await.is_err() {
                    return;
                }
                if !i.on_session(&s) {
                    return;
                }
                let Some(snap) = rx.borrow_and_update().clone() else {
                    continue;
                };
                let marker = snap.entries.iter().find(|k| k.key == key);
                retry = false;
                if marker.is_some_and(|m| m.holder().is_some()) {
                    continue;
                }
                let check = match marker {
                    None => op::check_not_exists(&key),
                    Some(m) => op::check_index(&key, m.modify_index),
                };
                let r = i
                    .client
                    .txn(
                        "keeping the shared marker",
                        vec![
                            op::check_session(&reader, &s),
                            check,
                            op::lock(&key, keys::SHARED_MARKER, &s, 0),
                        ],
                    )
                    .await;
                match r {
                    Ok(Txn::Applied(_)) => {
                        tracing::info!(lock = %key, "consul: the shared marker's session ended; the marker is back on ours");
                    }
                    // Our reader key is gone (broken, or its session ended):
                    // we no longer read.
                    Ok(r) if r.failed_at(0) => return,
                    // Under the lock delay, or changed meanwhile: look again.
                    Ok(Txn::Failed(_)) | Err(_) => retry = true,
                }
            }
        });
        Arc::new(Keeper(task.abort_handle()))
    }

    /// How long to wait before trying a free lock that refused us again: the
    /// lock delay (at least 250 ms, so that a gone session is not retried in a
    /// tight loop).
    fn delay(&self) -> Duration {
        self.inner.config.lock_delay.max(Duration::from_millis(250))
    }

    async fn release_hold(&self, h: &Hold) -> Result<bool> {
        match h.mode {
            Mode::Exclusive => release_exclusive(&self.inner, &self.key, &h.session, h.token).await,
            Mode::Shared => {
                release_reader(&self.inner, &self.key, &self.readers, &h.reader, &h.session).await
            }
        }
    }
}

/// Deletes the lock key if `session` holds it (and it is the grant `token`; a
/// key changed since is unlocked instead).
async fn release_exclusive(i: &Inner, key: &str, session: &str, token: u64) -> Result<bool> {
    // The key's modify index is the grant's as long as nobody wrote it since: it
    // was ours throughout (a lost session deletes it, a new grant rewrites it).
    if i.client.delete_cas("release", key, token).await? {
        return Ok(true);
    }
    // Changed since the grant: still ours (a value written without `acquire`)?
    let r = i
        .client
        .txn(
            "release",
            vec![op::check_session(key, session), op::unlock(key, session)],
        )
        .await?;
    Ok(matches!(r, Txn::Applied(_)))
}

/// Removes the reader key; the last reader deletes the marker, a reader whose
/// session holds the marker while others remain hands it to one of them.
async fn release_reader(
    i: &Inner,
    key: &str,
    readers: &str,
    me: &str,
    session: &str,
) -> Result<bool> {
    for _ in 0..CAS_TRIES {
        let (entries, _) = i.client.list("release", readers).await?;
        let Some(mine) = entries.iter().find(|k| k.key == me) else {
            return Ok(false);
        };
        if mine.holder() != Some(session) {
            return Ok(false);
        }
        let marker = i.client.get("release", key).await?;
        let on_me = marker
            .as_ref()
            .is_some_and(|m| m.holder() == Some(session) && m.bytes() == keys::SHARED_MARKER);
        let others: Vec<&Kv> = entries.iter().filter(|k| k.key != me).collect();
        let mut ops = vec![op::check_index(me, mine.modify_index), op::delete(me)];
        if let Some(m) = marker.as_ref().filter(|_| on_me) {
            ops.push(op::check_index(key, m.modify_index));
            match others.iter().find(|o| o.holder().is_some()) {
                // Another reader of our session stays: so does the marker.
                _ if others.iter().any(|o| o.holder() == Some(session)) => {}
                Some(o) => {
                    let next = o.holder().unwrap_or_default();
                    ops.push(op::check_index(&o.key, o.modify_index));
                    ops.push(op::unlock(key, session));
                    ops.push(op::lock(key, keys::SHARED_MARKER, next, 0));
                }
                None => ops.push(op::delete(key)),
            }
        }
        if matches!(i.client.txn("release", ops).await?, Txn::Applied(_)) {
            return Ok(true);
        }
    }
    Err(crate::driver::contention("release"))
}

#[tooz_core::async_trait]
impl DriverLock for ConsulLock {
    fn name(&self) -> &LockName {
        &self.name
    }

    fn queues(&self) -> bool {
        true
    }

    /// Tries once; a blocked acquire that may wait queues (module docs): it
    /// waits only on the entry ahead of it, and the head on the lock key, so a
    /// release wakes one exclusive waiter (or the shared waiters at the head).
    #[tracing::instrument(level = "debug", skip_all, fields(lock = %self.name, ?mode))]
    async fn acquire(&self, mode: Mode, wait: Wait) -> Result<Option<FencingToken>> {
        let session = self.inner.session()?;
        let id = uuid::Uuid::new_v4().simple();
        let mut place = Place {
            inner: Arc::clone(&self.inner),
            session,
            mode,
            key: self.key.clone(),
            readers: self.readers.clone(),
            value: format!("tooz-rs:{id}").into_bytes(),
            reader: format!("{}{id}", self.readers),
            entry: None,
            unconfirmed: false,
            writes: InFlight::default(),
        };
        let deadline = deadline_of(wait);
        let waits = wait != Wait::No;
        let state = match self.attempt(&mut place, None, None, waits).await? {
            Try::Granted(t) => {
                place.settled();
                return Ok(Some(t));
            }
            _ if !waits => return Ok(None),
            Try::Held(kv) => Some(Some(kv)),
            _ => None,
        };
        if deadline.is_some_and(|d| d <= Instant::now()) {
            return Ok(None);
        }
        self.wait_in_queue(&mut place, state, deadline).await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(lock = %self.name))]
    async fn release(&self) -> Result<bool> {
        let Some(mut h) = guard(&self.hold).take() else {
            return Ok(false);
        };
        // The marker keeper stops first: this reader is leaving.
        drop(h.keeper.take());
        if !self.inner.on_session(&h.session) {
            // The session is gone, and what it held with it.
            return Ok(false);
        }
        match self.release_hold(&h).await {
            Ok(released) => Ok(released),
            Err(e) => {
                let (key, readers) = (self.key.clone(), self.readers.clone());
                let hold = h.clone();
                Arc::clone(&self.inner).spawn_cleanup(
                    h.session.clone(),
                    "lock release",
                    move |i, s| {
                        let (key, readers, hold) = (key.clone(), readers.clone(), hold.clone());
                        async move {
                            match hold.mode {
                                Mode::Exclusive => {
                                    release_exclusive(&i, &key, &s, hold.token).await
                                }
                                Mode::Shared => {
                                    release_reader(&i, &key, &readers, &hold.reader, &s).await
                                }
                            }
                            .map(|_| ())
                        }
                    },
                );
                Err(e)
            }
        }
    }

    async fn heartbeat(&self) -> Result<bool> {
        self.is_still_owner().await
    }

    async fn is_still_owner(&self) -> Result<bool> {
        let Some(h) = guard(&self.hold).clone() else {
            return Ok(false);
        };
        let key = match h.mode {
            Mode::Exclusive => &self.key,
            Mode::Shared => &h.reader,
        };
        let kv = self.inner.client.get("is_still_owner", key).await?;
        Ok(kv.is_some_and(|k| {
            k.holder() == Some(h.session.as_str())
                && (h.mode == Mode::Shared || k.modify_index == h.token)
        }))
    }

    /// Deletes the lock key and every reader key, whoever holds them (queued
    /// waiters stay queued: the head sees the key go).
    async fn break_lock(&self) -> Result<bool> {
        let i = &self.inner;
        let (readers, _) = i.client.list("break_lock", &self.readers).await?;
        let kv = i.client.get("break_lock", &self.key).await?;
        let was_held = kv.as_ref().is_some_and(|k| k.holder().is_some()) || !readers.is_empty();
        i.client
            .txn(
                "break_lock",
                vec![op::delete_tree(&self.readers), op::delete(&self.key)],
            )
            .await?;
        Ok(was_held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &str, create_index: u64, session: Option<&str>) -> Kv {
        Kv {
            key: key.to_string(),
            value: None,
            flags: 0,
            session: session.map(str::to_string),
            create_index,
            modify_index: create_index,
        }
    }

    #[test]
    fn waiters_wait_behind_the_nearest_entry_they_must_let_go_first() {
        let q = "ns/lock-queue/6c/";
        let id = |c: char| c.to_string().repeat(32);
        let (x1, s2, s3, x4, s5) = (
            format!("{q}x{}", id('1')),
            format!("{q}s{}", id('2')),
            format!("{q}s{}", id('3')),
            format!("{q}x{}", id('4')),
            format!("{q}s{}", id('5')),
        );
        let entries = vec![
            kv(&s3, 30, Some("a")),
            kv(&x1, 10, Some("a")),
            kv(&s2, 20, Some("a")),
            kv(&x4, 40, Some("a")),
            kv(&s5, 50, Some("a")),
            // Junk: no session, a bad name, a key deeper down.
            kv(&format!("{q}x{}", id('9')), 35, None),
            kv(&format!("{q}junk"), 36, Some("a")),
            kv(&format!("{q}x{}/deeper", id('8')), 37, Some("a")),
        ];
        let behind = |me: &str, mode, at| ahead(&entries, q, me, mode, at).map(|k| k.key.clone());
        assert_eq!(behind(&x1, Mode::Exclusive, 10), None);
        assert_eq!(behind(&s2, Mode::Shared, 20), Some(x1.clone()));
        assert_eq!(behind(&s3, Mode::Shared, 30), Some(x1.clone()));
        assert_eq!(behind(&x4, Mode::Exclusive, 40), Some(s3.clone()));
        assert_eq!(behind(&s5, Mode::Shared, 50), Some(x4.clone()));
        // With the writers gone, readers are at the head together.
        let readers: Vec<Kv> = entries
            .iter()
            .filter(|k| entry_mode(q, &k.key) != Some(Mode::Exclusive))
            .cloned()
            .collect();
        assert_eq!(ahead(&readers, q, &s5, Mode::Shared, 50), None);
        assert_eq!(entry_mode(q, &format!("{q}z{}", id('1'))), None);
        assert_eq!(entry_mode(q, &format!("{q}x{}", "g".repeat(32))), None);
    }
}
