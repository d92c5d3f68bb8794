//! Lock handles on `<ns>/locks/<name>`, acquired with the coordinator's session
//! in one transaction whose reply carries the key's modify index (the fencing
//! token), released by a delete guarded on that index. Waiters wake on the
//! coordinator's one blocking query over every lock key.
//!
//! Shared holds: the lock key holds [`keys::SHARED_MARKER`] on one reader's
//! session and every reader has a key of its own under
//! `<ns>/lock-readers/<hex name>/`, on its session. A Python or Rust exclusive
//! acquirer finds the lock key held; the last reader deletes it, and a reader
//! that leaves while others remain hands the marker to one of them in the same
//! transaction. Each reader's keeper puts the marker back on its own session if
//! the marker's session dies while it still reads.

use std::sync::{Arc, Mutex};

use tooz_core::{Attempt, DriverLock, FencingToken, LockName, Mode, Result, WakeStream};

use crate::client::{Kv, Txn, op};
use crate::driver::{CAS_TRIES, Inner, guard};
use crate::keys;
use crate::watch::lock_wakeups;

#[derive(Debug, Clone)]
struct Hold {
    mode: Mode,
    session: String,
    /// Modify index of the lock key (exclusive) or of our reader key (shared)
    /// at the grant.
    token: u64,
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
    reader: String,
    hold: Mutex<Option<Hold>>,
}

fn held() -> Attempt {
    Attempt::held()
}

/// Whether a reader key other than those of `session` exists in `entries`.
fn readers_in<'a>(entries: &'a [Kv], prefix: &str) -> impl Iterator<Item = &'a Kv> + 'a {
    let prefix = prefix.to_string();
    entries.iter().filter(move |k| k.key.starts_with(&prefix))
}

impl ConsulLock {
    pub(crate) fn new(inner: Arc<Inner>, name: LockName) -> Self {
        let key = inner.layout.lock(name.as_bytes());
        let readers = inner.layout.readers(name.as_bytes());
        let reader = format!("{readers}{}", uuid::Uuid::new_v4().simple());
        ConsulLock {
            inner,
            name,
            key,
            readers,
            reader,
            hold: Mutex::new(None),
        }
    }

    /// An exclusive attempt. `check` is the lock key's modify index when an
    /// unlocked key was found (0: the key must not exist).
    async fn exclusive(&self, s: &str, value: &[u8], check: u64) -> Result<Option<Txn>> {
        let guard_op = if check == 0 {
            op::check_not_exists(&self.key)
        } else {
            op::check_index(&self.key, check)
        };
        let r = self
            .inner
            .client
            .txn(
                "acquire",
                vec![
                    guard_op,
                    op::lock(&self.key, value, s, 0),
                    op::get_tree(&self.readers),
                ],
            )
            .await;
        match r {
            Ok(t) => Ok(Some(t)),
            Err(e) => {
                // The grant may have been applied with its reply lost: undo it
                // (our attempt's value, on our session) in the background.
                let (key, value) = (self.key.clone(), value.to_vec());
                Arc::clone(&self.inner).spawn_cleanup(
                    s.to_string(),
                    "unconfirmed acquire",
                    move |i, s| {
                        let (key, value) = (key.clone(), value.clone());
                        async move {
                            match i.client.get("undoing an unconfirmed acquire", &key).await? {
                                Some(kv) if kv.holder() == Some(&s) && kv.bytes() == value => i
                                    .client
                                    .txn(
                                        "undoing an unconfirmed acquire",
                                        vec![
                                            op::check_index(&key, kv.modify_index),
                                            op::delete(&key),
                                        ],
                                    )
                                    .await
                                    .map(|_| ()),
                                _ => Ok(()),
                            }
                        }
                    },
                );
                Err(e)
            }
        }
    }

    async fn try_exclusive(&self, s: &str) -> Result<Attempt> {
        let value = format!("tooz-rs:{}", uuid::Uuid::new_v4().simple()).into_bytes();
        let mut check = 0;
        for _ in 0..CAS_TRIES {
            let Some(r) = self.exclusive(s, &value, check).await? else {
                continue;
            };
            match r {
                Txn::Applied(kvs) => {
                    let token = kvs.first().map_or(0, |k| k.modify_index);
                    if readers_in(&kvs, &self.readers).next().is_some() {
                        // Readers hold it (their marker vanished with a crashed
                        // reader's session): give it back.
                        self.inner
                            .client
                            .txn(
                                "acquire",
                                vec![op::check_index(&self.key, token), op::delete(&self.key)],
                            )
                            .await?;
                        return Ok(held());
                    }
                    *guard(&self.hold) = Some(Hold {
                        mode: Mode::Exclusive,
                        session: s.to_string(),
                        token,
                        keeper: None,
                    });
                    return Ok(Attempt::Granted(FencingToken(token)));
                }
                r if r.failed_at(0) => match self.inner.client.get("acquire", &self.key).await? {
                    None => check = 0,
                    Some(kv) if kv.holder().is_some() => return Ok(held()),
                    Some(kv) => check = kv.modify_index,
                },
                // The key is free but cannot be locked: Consul's lock delay
                // after a holder's session was invalidated (or our session is
                // gone until the next heartbeat replaces it).
                _ => return Ok(self.delayed()),
            }
        }
        Ok(held())
    }

    async fn try_shared(&self, s: &str) -> Result<Attempt> {
        for _ in 0..CAS_TRIES {
            let cur = self.inner.client.get("acquire", &self.key).await?;
            let mut ops = match &cur {
                None => vec![
                    op::check_not_exists(&self.key),
                    op::lock(&self.key, keys::SHARED_MARKER, s, 0),
                ],
                Some(kv) if kv.holder().is_none() => vec![
                    op::check_index(&self.key, kv.modify_index),
                    op::lock(&self.key, keys::SHARED_MARKER, s, 0),
                ],
                Some(kv) if kv.bytes() == keys::SHARED_MARKER => {
                    vec![op::check_index(&self.key, kv.modify_index)]
                }
                Some(_) => return Ok(held()),
            };
            ops.push(op::lock(&self.reader, b"", s, 0));
            let r = self.inner.client.txn("acquire", ops).await;
            let r = match r {
                Ok(r) => r,
                Err(e) => {
                    self.spawn_shared_undo(s);
                    return Err(e);
                }
            };
            if let Txn::Failed(_) = r {
                if r.failed_at(0) {
                    // Changed since the read: read again.
                    continue;
                }
                return Ok(self.delayed());
            }
            if let Txn::Applied(kvs) = r {
                let token = kvs
                    .iter()
                    .find(|k| k.key == self.reader)
                    .map_or(0, |k| k.modify_index);
                *guard(&self.hold) = Some(Hold {
                    mode: Mode::Shared,
                    session: s.to_string(),
                    token,
                    keeper: Some(self.spawn_keeper(s)),
                });
                return Ok(Attempt::Granted(FencingToken(token)));
            }
        }
        Ok(held())
    }

    /// Keeps the shared marker while this handle reads: when the lock key vanishes
    /// or is unlocked (the marker's session died) and our reader key is still ours,
    /// the marker is put back on our session, so that a Python exclusive acquirer
    /// keeps finding the lock held. Consul's lock delay on the vanished key delays
    /// that as it delays everyone: the keeper retries until it passes.
    fn spawn_keeper(&self, s: &str) -> Arc<Keeper> {
        let i = Arc::clone(&self.inner);
        let mut rx = i.hubs.subscribe(&i.client, &i.layout.locks_watch());
        let (key, reader, s) = (self.key.clone(), self.reader.clone(), s.to_string());
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
                let mine = snap
                    .entries
                    .iter()
                    .any(|k| k.key == reader && k.holder() == Some(s.as_str()));
                retry = false;
                if !mine || marker.is_some_and(|m| m.holder().is_some()) {
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
                    // Under the lock delay, or changed meanwhile: look again.
                    Ok(Txn::Failed(_)) | Err(_) => retry = true,
                }
            }
        });
        Arc::new(Keeper(task.abort_handle()))
    }

    /// Held, without a release to wait for: the lock delay (at least 250 ms, so
    /// that a gone session is not retried in a tight loop) bounds the wait.
    fn delayed(&self) -> Attempt {
        Attempt::Held {
            expires_in: Some(
                self.inner
                    .config
                    .lock_delay
                    .max(std::time::Duration::from_millis(250)),
            ),
            notifies: false,
        }
    }

    fn spawn_shared_undo(&self, s: &str) {
        let (key, readers, reader) = (self.key.clone(), self.readers.clone(), self.reader.clone());
        Arc::clone(&self.inner).spawn_cleanup(
            s.to_string(),
            "unconfirmed shared acquire",
            move |i, s| {
                let (key, readers, reader) = (key.clone(), readers.clone(), reader.clone());
                async move {
                    release_reader(&i, &key, &readers, &reader, &s)
                        .await
                        .map(|_| ())
                }
            },
        );
    }

    async fn release_hold(&self, h: &Hold) -> Result<bool> {
        match h.mode {
            Mode::Exclusive => release_exclusive(&self.inner, &self.key, &h.session, h.token).await,
            Mode::Shared => {
                release_reader(
                    &self.inner,
                    &self.key,
                    &self.readers,
                    &self.reader,
                    &h.session,
                )
                .await
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

    #[tracing::instrument(level = "debug", skip_all, fields(lock = %self.name))]
    async fn try_acquire(&self, mode: Mode) -> Result<Attempt> {
        let s = self.inner.session()?;
        match mode {
            Mode::Exclusive => self.try_exclusive(&s).await,
            Mode::Shared => self.try_shared(&s).await,
        }
    }

    async fn wakeups(&self) -> Result<Option<WakeStream>> {
        let i = &self.inner;
        let rx = i.hubs.subscribe(&i.client, &i.layout.locks_watch());
        Ok(Some(lock_wakeups(
            rx,
            self.key.clone(),
            self.readers.clone(),
        )))
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
                let (key, readers, reader) =
                    (self.key.clone(), self.readers.clone(), self.reader.clone());
                let hold = h.clone();
                Arc::clone(&self.inner).spawn_cleanup(
                    h.session.clone(),
                    "lock release",
                    move |i, s| {
                        let (key, readers, reader, hold) =
                            (key.clone(), readers.clone(), reader.clone(), hold.clone());
                        async move {
                            match hold.mode {
                                Mode::Exclusive => {
                                    release_exclusive(&i, &key, &s, hold.token).await
                                }
                                Mode::Shared => {
                                    release_reader(&i, &key, &readers, &reader, &s).await
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
            Mode::Shared => &self.reader,
        };
        let kv = self.inner.client.get("is_still_owner", key).await?;
        Ok(kv.is_some_and(|k| {
            k.holder() == Some(h.session.as_str())
                && (h.mode == Mode::Shared || k.modify_index == h.token)
        }))
    }

    /// Deletes the lock key and every reader key, whoever holds them.
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
