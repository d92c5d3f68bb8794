//! The [`MemcachedDriver`]: groups, membership, leadership and locks in
//! memcached, laid out as Python tooz lays them out (see [`crate::keys`]).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use tokio::time::Instant;
use tooz_core::util::Backoff;
use tooz_core::{
    Capabilities, Characteristic, ConnectRequest, Driver, DriverEvent, DriverEventStream,
    DriverInfo, DriverLock, FencingToken, GroupId, Held, IdRef, LeaseState, LockName, MemberId,
    MemberInfo, Renewal, Result, ToozError,
};

use crate::config::{MemcachedConfig, NAME, ttl_arg};
use crate::conn::{Cmd, Item, Pool, Reply, Status};
use crate::keys::{self, FLAG_MSGPACK, FLAG_RAW, GroupMap, LockValue, STILL_ALIVE};
use crate::lock::{Hold, MemcachedLock};
use crate::notify::{self, Notifier};
use crate::watch::{Polled, Snapshot, Watcher};

const CHARACTERISTICS: &[Characteristic] = &[
    Characteristic::DistributedAcrossThreads,
    Characteristic::DistributedAcrossProcesses,
    Characteristic::DistributedAcrossHosts,
    Characteristic::Causal,
];

/// How many times a compare-and-swap loop retries on a concurrent change.
const CAS_TRIES: usize = 100;

/// memcached refuses to advance a counter that another client overwrote with
/// something else than digits, failing the whole grant pipeline: say which key.
/// (It is not repaired here: two acquirers resetting it at once could hand out
/// one token twice.)
fn junk_fence(key: &[u8], e: ToozError) -> ToozError {
    if !e.to_string().contains("non-numeric") {
        return e;
    }
    ToozError::backend_msg(
        NAME,
        format!(
            "the fencing counter {} does not hold a number (another client wrote it); no grant of {} until it is deleted",
            String::from_utf8_lossy(&keys::fence(key)),
            String::from_utf8_lossy(key)
        ),
    )
}

fn guard<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn unexpected(what: &str, s: Reply) -> ToozError {
    ToozError::backend_msg(NAME, format!("{what}: unexpected reply {s:?}"))
}

fn contention(what: &str) -> ToozError {
    ToozError::Backend {
        driver: NAME,
        message: format!(
            "{what}: the key kept changing under {CAS_TRIES} compare-and-swap attempts"
        ),
        source: None,
        retryable: true,
    }
}

/// The outcome of one attempt on a lock or leader key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Grant {
    /// Granted: the item's CAS value and the fencing token.
    Granted { cas: u64, fence: u64 },
    /// Held by someone else, for at most this long without a renewal (if known).
    Held(Option<Duration>),
}

/// A leadership this coordinator holds.
#[derive(Debug, Clone, Copy)]
struct Leading {
    cas: u64,
    fence: u64,
}

/// Shared state of a driver and its lock handles.
#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) config: MemcachedConfig,
    pub(crate) member: MemberId,
    pub(crate) pool: Pool,
    lease: LeaseState,
    leaders: tokio::sync::Mutex<HashMap<GroupId, Leading>>,
    /// CAS values of the exclusive holds of this driver (to tell them from a
    /// hold of the same member id whose grant reply was lost).
    held_cas: Mutex<HashSet<u64>>,
    /// The server's clock at start (seconds) and the local instant it was read.
    clock: Mutex<Option<(u64, Instant)>>,
    /// Wake-up hints from the server's mutation log.
    pub(crate) notifier: Arc<Notifier>,
    /// The other members of each group as last read: their liveness keys are
    /// read with the group map (one round trip while membership is stable).
    seen: Mutex<HashMap<GroupId, Vec<Vec<u8>>>>,
    /// The watched groups and their one poller.
    pub(crate) watcher: Watcher,
    /// Group list edits waiting for the next compare-and-swap of the list.
    list_edits: Mutex<Vec<ListEdit>>,
    /// Held while one batch of `list_edits` is written.
    list_writer: tokio::sync::Mutex<()>,
}

/// One queued edit of the group list and who waits for its outcome.
#[derive(Debug)]
struct ListEdit {
    group: GroupId,
    add: bool,
    done: tokio::sync::oneshot::Sender<Result<()>>,
}

static TOKENS: AtomicU64 = AtomicU64::new(0);

/// A reader token unique to this process and attempt.
pub(crate) fn new_token() -> Vec<u8> {
    format!(
        "{:x}.{:x}.{:x}",
        std::process::id(),
        keys::now_micros(),
        TOKENS.fetch_add(1, Ordering::Relaxed)
    )
    .into_bytes()
}

impl Inner {
    fn ttl_flags(&self, ttl: Duration, flag: u32) -> Vec<String> {
        vec![format!("T{}", ttl_arg(ttl)), format!("F{flag}"), "c".into()]
    }

    /// The server's time in µs, as well as it is known (its `stats` clock at
    /// start plus the local monotonic time since; the local clock without it).
    fn server_micros(&self) -> u64 {
        match *guard(&self.clock) {
            Some((secs, at)) => secs
                .saturating_mul(1_000_000)
                .saturating_add(u64::try_from(at.elapsed().as_micros()).unwrap_or(u64::MAX)),
            None => keys::now_micros(),
        }
    }

    fn replace_cas(&self, old: u64, new: u64) {
        let mut held = guard(&self.held_cas);
        held.remove(&old);
        held.insert(new);
    }

    fn forget_cas(&self, cas: u64) {
        guard(&self.held_cas).remove(&cas);
    }

    /// The `ma` flags that advance a fencing counter, creating it at the server's
    /// time in µs when absent (so that it never goes backwards after an eviction or
    /// a restart), and return its value.
    fn fence_flags(&self) -> Vec<String> {
        vec![
            "N0".to_string(),
            format!("J{}", self.server_micros()),
            "v".to_string(),
        ]
    }

    /// The fencing token from a pipelined `ma` reply; advances the counter once
    /// more on its own when that reply carried no value (two clients creating the
    /// counter at once).
    async fn fence_value(&self, key: &[u8], reply: Item) -> Result<u64> {
        if let Ok(v) = reply.counter("fence") {
            return Ok(v);
        }
        let again = self
            .pool
            .pipeline(
                "fence",
                &[Cmd::arith(&keys::fence(key), self.fence_flags())],
            )
            .await?;
        again
            .into_iter()
            .next()
            .ok_or_else(|| ToozError::backend_msg(NAME, "fence: no reply"))?
            .counter("fence")
    }

    /// Members (of `members`) whose liveness key is gone: one pipelined round trip.
    async fn dead_members<'a>(
        &self,
        members: impl Iterator<Item = &'a [u8]>,
    ) -> Result<HashSet<Vec<u8>>> {
        let mut others: Vec<Vec<u8>> = members
            .filter(|m| *m != self.member.as_bytes())
            .map(<[u8]>::to_vec)
            .collect();
        others.sort();
        others.dedup();
        let keys: Vec<Vec<u8>> = others.iter().map(|m| keys::member(m)).collect();
        let hits = self.pool.get_multi("liveness", &keys, &[]).await?;
        Ok(others
            .into_iter()
            .zip(hits)
            .filter_map(|(m, hit)| hit.is_none().then_some(m))
            .collect())
    }

    // ----- exclusive holds (locks and leaderships) -------------------------------

    /// One attempt at an exclusive hold of `key`, in one round trip: the `add`, the
    /// fencing counter's advance and a read that checks the hold survived the
    /// advance (or, when the `add` failed, tells who holds the key and how long
    /// for) are pipelined.
    pub(crate) async fn acquire_exclusive(
        self: &Arc<Self>,
        key: &[u8],
        ttl: Duration,
    ) -> Result<Grant> {
        for _ in 0..3 {
            let mut flags = self.ttl_flags(ttl, FLAG_RAW);
            flags.push("ME".into());
            let cmds = [
                Cmd::set(key, self.member.as_bytes(), flags),
                Cmd::arith(&keys::fence(key), self.fence_flags()),
                Cmd::get(key, &["v", "c", "f", "t"]),
            ];
            let replies = match self.pool.pipeline("acquire", &cmds).await {
                Ok(r) => r,
                Err(e) => {
                    self.spawn_unknown_grant(key.to_vec());
                    return Err(junk_fence(key, e));
                }
            };
            let mut replies = replies.into_iter();
            let (Some(add), Some(fence), Some(now)) =
                (replies.next(), replies.next(), replies.next())
            else {
                return Err(ToozError::backend_msg(NAME, "acquire: replies missing"));
            };
            let cas = match add.stored()? {
                Reply::Stored(Some(cas)) => cas,
                Reply::NotStored => match self.inspect(key, now.hit()).await? {
                    Some(held) => return Ok(held),
                    None => continue,
                },
                other => return Err(unexpected("acquire", other)),
            };
            guard(&self.held_cas).insert(cas);
            let fence = match self.fence_value(key, fence).await {
                Ok(f) => f,
                Err(e) => {
                    self.spawn_release(key.to_vec(), Hold::Exclusive { cas });
                    return Err(e);
                }
            };
            if now.hit().and_then(|v| v.cas) == Some(cas) {
                return Ok(Grant::Granted { cas, fence });
            }
            // Lost before the token was drawn: no grant.
            self.forget_cas(cas);
            return Ok(Grant::Held(None));
        }
        Ok(Grant::Held(None))
    }

    /// After a failed `add`, from the key as read right after it: who holds `key`.
    /// `None` when it is free again (or was freed here because all its shared
    /// holders are dead): try again.
    async fn inspect(&self, key: &[u8], current: Option<Item>) -> Result<Option<Grant>> {
        let Some(v) = current else {
            return Ok(None);
        };
        let expires_in = v
            .ttl_remaining
            .filter(|t| *t >= 0)
            .map(|t| Duration::from_secs(t.unsigned_abs()));
        if let LockValue::Readers(readers) =
            LockValue::read(key, v.flags, v.data.as_deref().unwrap_or(&[]))?
        {
            let dead = self
                .dead_members(readers.iter().map(|(_, m)| m.as_slice()))
                .await?;
            if readers.iter().all(|(_, m)| dead.contains(m))
                && let Some(cas) = v.cas
            {
                self.pool
                    .delete("acquire", key, &[format!("C{cas}")])
                    .await?;
                return Ok(None);
            }
        }
        Ok(Some(Grant::Held(expires_in)))
    }

    /// Renews an exclusive hold by rewriting it under its CAS value: the new CAS
    /// value, or `None` when the key is gone or someone else's.
    pub(crate) async fn renew_exclusive(
        &self,
        key: &[u8],
        cas: u64,
        ttl: Duration,
    ) -> Result<Option<u64>> {
        let mut flags = self.ttl_flags(ttl, FLAG_RAW);
        flags.push(format!("C{cas}"));
        match self
            .pool
            .set("renew", key, self.member.as_bytes(), &flags)
            .await?
        {
            Reply::Stored(Some(new)) => {
                self.replace_cas(cas, new);
                Ok(Some(new))
            }
            Reply::Exists | Reply::NotFound => {
                self.forget_cas(cas);
                Ok(None)
            }
            other => Err(unexpected("renew", other)),
        }
    }

    /// Frees an exclusive hold if the key still has its CAS value, and stores its
    /// release marker in the same round trip (the wake-up of Rust waiters).
    pub(crate) async fn release_exclusive(&self, key: &[u8], cas: u64) -> Result<bool> {
        let cmds = [Cmd::delete(key, vec![format!("C{cas}")]), free_marker(key)];
        let replies = self.pool.pipeline("release", &cmds).await?;
        self.forget_cas(cas);
        Ok(replies.first().is_some_and(|r| r.status == Status::Done))
    }

    /// An `add` whose reply was lost may have granted `key`: give it back.
    fn spawn_unknown_grant(self: &Arc<Self>, key: Vec<u8>) {
        self.spawn_cleanup("unconfirmed grant", move |i| {
            let key = key.clone();
            async move {
                let Some(v) = i.pool.get("resolve", &key, &["v", "c", "f"]).await? else {
                    return Ok(false);
                };
                let ours = LockValue::read(&key, v.flags, v.data.as_deref().unwrap_or(&[]))?
                    == LockValue::Owner(i.member.as_bytes().to_vec());
                match v.cas {
                    Some(cas) if ours && !guard(&i.held_cas).contains(&cas) => {
                        i.release_exclusive(&key, cas).await
                    }
                    _ => Ok(false),
                }
            }
        });
    }

    /// Releases `hold` of `key` in the background (after an error left its state
    /// unknown), retried until it went through or the hold would have expired.
    pub(crate) fn spawn_release(self: &Arc<Self>, key: Vec<u8>, hold: Hold) {
        self.spawn_cleanup("release", move |i| {
            let (key, hold) = (key.clone(), hold.clone());
            async move { i.release_hold(&key, &hold).await }
        });
    }

    pub(crate) async fn release_hold(&self, key: &[u8], hold: &Hold) -> Result<bool> {
        match hold {
            Hold::Exclusive { cas } => self.release_exclusive(key, *cas).await,
            Hold::Shared { token } => self.release_shared(key, token).await,
        }
    }

    /// Runs an owner-checked cleanup in the background until it goes through or
    /// what it would free has expired anyway (see `tooz_core::util::spawn_cleanup`).
    fn spawn_cleanup<F, Fut>(self: &Arc<Self>, what: &'static str, op: F)
    where
        F: Fn(Arc<Inner>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<bool>> + Send + 'static,
    {
        let inner = Arc::clone(self);
        let deadline = Instant::now() + self.config.lock_timeout.max(self.config.leader_timeout);
        tooz_core::util::spawn_cleanup("memcached", what, Some(deadline), move || {
            let done = op(Arc::clone(&inner));
            async move { done.await.map(drop) }
        });
    }

    // ----- shared holds ------------------------------------------------------------

    /// One attempt at a shared hold of `key` with reader `token`.
    pub(crate) async fn acquire_shared(
        self: &Arc<Self>,
        key: &[u8],
        token: &[u8],
    ) -> Result<Grant> {
        let me = self.member.as_bytes().to_vec();
        let ttl = self.config.lock_timeout;
        for _ in 0..CAS_TRIES {
            let res = match self.pool.get("acquire", key, &["v", "c", "f", "t"]).await? {
                None => {
                    let value = LockValue::readers_bytes(&[(token.to_vec(), me.clone())]);
                    let mut flags = self.ttl_flags(ttl, FLAG_MSGPACK);
                    flags.push("ME".into());
                    self.pool.set("acquire", key, &value, &flags).await
                }
                Some(v) => match LockValue::read(key, v.flags, v.data.as_deref().unwrap_or(&[]))? {
                    LockValue::Owner(_) => {
                        return Ok(Grant::Held(
                            v.ttl_remaining
                                .filter(|t| *t >= 0)
                                .map(|t| Duration::from_secs(t.unsigned_abs())),
                        ));
                    }
                    LockValue::Readers(mut readers) => {
                        let dead = self
                            .dead_members(readers.iter().map(|(_, m)| m.as_slice()))
                            .await?;
                        readers.retain(|(_, m)| !dead.contains(m));
                        readers.push((token.to_vec(), me.clone()));
                        let mut flags = self.ttl_flags(ttl, FLAG_MSGPACK);
                        flags.push(format!("C{}", v.cas.unwrap_or(0)));
                        self.pool
                            .set("acquire", key, &LockValue::readers_bytes(&readers), &flags)
                            .await
                    }
                },
            };
            match res {
                Ok(Reply::Stored(_)) => {}
                Ok(_) => continue,
                Err(e) => {
                    self.spawn_release(
                        key.to_vec(),
                        Hold::Shared {
                            token: token.to_vec(),
                        },
                    );
                    return Err(e);
                }
            }
            let checked = async {
                let cmds = [
                    Cmd::arith(&keys::fence(key), self.fence_flags()),
                    Cmd::get(key, &["v", "f"]),
                ];
                let mut replies = self
                    .pool
                    .pipeline("acquire", &cmds)
                    .await
                    .map_err(|e| junk_fence(key, e))?
                    .into_iter();
                let (Some(fence), Some(now)) = (replies.next(), replies.next()) else {
                    return Err(ToozError::backend_msg(NAME, "acquire: replies missing"));
                };
                let fence = self.fence_value(key, fence).await?;
                Ok::<_, ToozError>((fence, Self::has_reader(key, now.hit(), token)?))
            }
            .await;
            return match checked {
                Ok((fence, true)) => Ok(Grant::Granted { cas: 0, fence }),
                Ok((_, false)) => Ok(Grant::Held(None)),
                Err(e) => {
                    self.spawn_release(
                        key.to_vec(),
                        Hold::Shared {
                            token: token.to_vec(),
                        },
                    );
                    Err(e)
                }
            };
        }
        Err(contention("shared acquire"))
    }

    pub(crate) async fn holds_shared(&self, key: &[u8], token: &[u8]) -> Result<bool> {
        let v = self.pool.get("is_still_owner", key, &["v", "f"]).await?;
        Self::has_reader(key, v, token)
    }

    /// Whether the lock item `v` (read with `v f`) lists reader `token`.
    fn has_reader(key: &[u8], v: Option<Item>, token: &[u8]) -> Result<bool> {
        let Some(v) = v else {
            return Ok(false);
        };
        Ok(matches!(
            LockValue::read(key, v.flags, v.data.as_deref().unwrap_or(&[]))?,
            LockValue::Readers(r) if r.iter().any(|(t, _)| t == token)
        ))
    }

    /// Rewrites the reader map of `key` with `change` applied, under its CAS
    /// value; `false` when `token` is not a reader (any more).
    async fn edit_readers(
        &self,
        key: &[u8],
        token: &[u8],
        what: &str,
        change: impl Fn(&mut Vec<(Vec<u8>, Vec<u8>)>),
    ) -> Result<bool> {
        for _ in 0..CAS_TRIES {
            let Some(v) = self.pool.get(what, key, &["v", "c", "f"]).await? else {
                return Ok(false);
            };
            let LockValue::Readers(mut readers) =
                LockValue::read(key, v.flags, v.data.as_deref().unwrap_or(&[]))?
            else {
                return Ok(false);
            };
            if !readers.iter().any(|(t, _)| t == token) {
                return Ok(false);
            }
            change(&mut readers);
            let cas = format!("C{}", v.cas.unwrap_or(0));
            let done = if readers.is_empty() {
                let cmds = [Cmd::delete(key, vec![cas]), free_marker(key)];
                let replies = self.pool.pipeline(what, &cmds).await?;
                replies.first().is_some_and(|r| r.status == Status::Done)
            } else {
                let mut flags = self.ttl_flags(self.config.lock_timeout, FLAG_MSGPACK);
                flags.push(cas);
                matches!(
                    self.pool
                        .set(what, key, &LockValue::readers_bytes(&readers), &flags)
                        .await?,
                    Reply::Stored(_)
                )
            };
            if done {
                return Ok(true);
            }
        }
        Err(contention(what))
    }

    pub(crate) async fn renew_shared(&self, key: &[u8], token: &[u8]) -> Result<bool> {
        self.edit_readers(key, token, "renew", |_| {}).await
    }

    pub(crate) async fn release_shared(&self, key: &[u8], token: &[u8]) -> Result<bool> {
        self.edit_readers(key, token, "release", |r| r.retain(|(t, _)| t != token))
            .await
    }

    // ----- groups ------------------------------------------------------------------

    /// The member map of a group and its CAS value.
    /// One read of watched groups, in one pipelined round trip: each group's map
    /// and leader key, and the liveness keys of the members (`Polled`) its map
    /// listed last time. Per group: what the watcher compares, and the members
    /// the map lists now.
    pub(crate) async fn poll_groups(
        &self,
        groups: &[Polled],
    ) -> Result<Vec<(GroupId, Snapshot, Vec<Vec<u8>>)>> {
        let mut members: Vec<Vec<u8>> = groups
            .iter()
            .flat_map(|(_, ms)| ms.iter().cloned())
            .filter(|m| m.as_slice() != self.member.as_bytes())
            .collect();
        members.sort();
        members.dedup();
        let mut cmds = Vec::with_capacity(groups.len() * 2 + members.len());
        for (g, _) in groups {
            cmds.push(Cmd::get(&keys::group(g), &["v", "c", "f"]));
            cmds.push(Cmd::get(&keys::leader(g), &["v"]));
        }
        for m in &members {
            cmds.push(Cmd::get(&keys::member(m), &[]));
        }
        let mut replies = self.pool.pipeline("watch", &cmds).await?.into_iter();
        let mut read = Vec::with_capacity(groups.len());
        for (g, _) in groups {
            let (Some(map), Some(leader)) = (replies.next(), replies.next()) else {
                return Err(ToozError::backend_msg(NAME, "watch: replies missing"));
            };
            let (snap, listed) = Self::snapshot(g, map.hit(), leader.hit());
            read.push((g.clone(), snap, listed));
        }
        let dead: HashSet<&[u8]> = members
            .iter()
            .zip(replies)
            .filter(|(_, r)| !matches!(r.status, Status::Value | Status::Done))
            .map(|(m, _)| m.as_slice())
            .collect();
        for ((_, checked), (_, snap, _)) in groups.iter().zip(read.iter_mut()) {
            snap.dead = checked
                .iter()
                .filter(|m| dead.contains(m.as_slice()))
                .cloned()
                .collect();
        }
        Ok(read)
    }

    /// What the watcher compares of a group, from its map and leader key as read
    /// (dead members are filled in by the caller), and the members its map lists.
    pub(crate) fn snapshot(
        g: &GroupId,
        map: Option<Item>,
        leader: Option<Item>,
    ) -> (Snapshot, Vec<Vec<u8>>) {
        let cas = map.as_ref().and_then(|m| m.cas);
        let listed = match Self::group_map(g, map) {
            Ok((map, _)) => map.members().map(<[u8]>::to_vec).collect(),
            Err(_) => Vec::new(),
        };
        let snap = Snapshot {
            group: cas,
            leader: leader.map(|l| l.data.unwrap_or_default()),
            dead: BTreeSet::new(),
        };
        (snap, listed)
    }

    async fn read_group(&self, what: &str, g: &GroupId) -> Result<(GroupMap, u64)> {
        let v = self
            .pool
            .get(what, &keys::group(g), &["v", "c", "f"])
            .await?;
        Self::group_map(g, v)
    }

    fn group_map(g: &GroupId, v: Option<Item>) -> Result<(GroupMap, u64)> {
        let Some(v) = v else {
            return Err(ToozError::GroupNotCreated(g.clone()));
        };
        let key = keys::group(g);
        let value = keys::decode(&key, v.flags, v.data.as_deref().unwrap_or(&[]))?;
        match GroupMap::from_value(&key, value)? {
            Some(map) => Ok((map, v.cas.unwrap_or(0))),
            None => Err(ToozError::GroupNotCreated(g.clone())),
        }
    }

    async fn write_group(&self, what: &str, g: &GroupId, map: &GroupMap, cas: u64) -> Result<bool> {
        let flags = vec![format!("F{FLAG_MSGPACK}"), format!("C{cas}")];
        Ok(matches!(
            self.pool
                .set(what, &keys::group(g), &map.to_bytes(), &flags)
                .await?,
            Reply::Stored(_)
        ))
    }

    /// Reads, changes and CAS-writes a group map until the write goes through.
    async fn edit_group<T>(
        &self,
        what: &str,
        g: &GroupId,
        change: impl Fn(&mut GroupMap) -> Result<T>,
    ) -> Result<T> {
        let mut backoff = Backoff::new(Duration::from_millis(2), Duration::from_millis(100));
        for _ in 0..CAS_TRIES {
            let (mut map, cas) = self.read_group(what, g).await?;
            let out = change(&mut map)?;
            if self.write_group(what, g, &map, cas).await? {
                return Ok(out);
            }
            tokio::time::sleep(backoff.next_delay()).await;
        }
        Err(contention(what))
    }

    /// The live members of a group, pruning dead ones from the map (as Python
    /// does; a conflicting write is left to the next reader).
    ///
    /// One round trip when the group's other members are those seen last time:
    /// their liveness keys are read in the same pipeline as the group map. Members
    /// not seen before are checked in a second round trip.
    async fn live_group(&self, g: &GroupId) -> Result<GroupMap> {
        let guessed: Vec<Vec<u8>> = guard(&self.seen).get(g).cloned().unwrap_or_default();
        let mut cmds = vec![Cmd::get(&keys::group(g), &["v", "c", "f"])];
        cmds.extend(guessed.iter().map(|m| Cmd::get(&keys::member(m), &[])));
        let mut replies = self.pool.pipeline("get_members", &cmds).await?.into_iter();
        let (mut map, cas) = match Self::group_map(g, replies.next().and_then(Item::hit)) {
            Ok(found) => found,
            Err(e) => {
                guard(&self.seen).remove(g);
                return Err(e);
            }
        };
        let mut known: HashMap<Vec<u8>, bool> = guessed
            .into_iter()
            .zip(replies)
            .map(|(m, r)| (m, r.hit().is_some()))
            .collect();
        let unknown: Vec<Vec<u8>> = map
            .members()
            .filter(|m| *m != self.member.as_bytes() && !known.contains_key(*m))
            .map(<[u8]>::to_vec)
            .collect();
        let dead_unknown = self.dead_members(unknown.iter().map(Vec::as_slice)).await?;
        known.extend(unknown.into_iter().map(|m| {
            let alive = !dead_unknown.contains(&m);
            (m, alive)
        }));
        let dead: HashSet<Vec<u8>> = map
            .members()
            .filter(|m| known.get(*m) == Some(&false))
            .map(<[u8]>::to_vec)
            .collect();
        if !dead.is_empty() && map.retain(|m| !dead.contains(m)) {
            let _ = self.write_group("get_members", g, &map, cas).await;
        }
        let others: Vec<Vec<u8>> = map
            .members()
            .filter(|m| *m != self.member.as_bytes())
            .map(<[u8]>::to_vec)
            .collect();
        guard(&self.seen).insert(g.clone(), others);
        Ok(map)
    }

    /// Adds `g` to the group list or removes it. Concurrent edits of one
    /// coordinator are applied together, in one compare-and-swap of the list:
    /// a thousand groups created at once would otherwise fight over the one key
    /// until some ran out of attempts.
    async fn edit_group_list(&self, g: &GroupId, add: bool) -> Result<()> {
        // A batch whose writer was dropped mid-flight answers nobody: queue the
        // edit again (bounded: each round is a whole compare-and-swap loop).
        for _ in 0..3 {
            let (tx, rx) = tokio::sync::oneshot::channel();
            guard(&self.list_edits).push(ListEdit {
                group: g.clone(),
                add,
                done: tx,
            });
            {
                let _writer = self.list_writer.lock().await;
                let batch = std::mem::take(&mut *guard(&self.list_edits));
                if !batch.is_empty() {
                    let outcome = self.write_group_list(&batch).await;
                    for edit in batch {
                        let _ = edit.done.send(match &outcome {
                            Ok(()) => Ok(()),
                            Err(e) => Err(ToozError::Backend {
                                driver: NAME,
                                message: e.to_string(),
                                source: None,
                                retryable: e.is_retryable(),
                            }),
                        });
                    }
                }
            }
            if let Ok(outcome) = rx.await {
                return outcome;
            }
        }
        Err(contention("group list"))
    }

    /// Applies `batch` (in order) to the group list in one compare-and-swap loop.
    async fn write_group_list(&self, batch: &[ListEdit]) -> Result<()> {
        let key = keys::GROUP_LIST;
        for _ in 0..CAS_TRIES {
            let current = self.pool.get("group list", key, &["v", "c", "f"]).await?;
            let (mut list, cas) = match current {
                Some(v) => (
                    keys::group_list(keys::decode(
                        key,
                        v.flags,
                        v.data.as_deref().unwrap_or(&[]),
                    )?),
                    v.cas,
                ),
                None => (Vec::new(), None),
            };
            let mut changed = false;
            for edit in batch {
                let g = edit.group.as_bytes();
                let present = list.iter().any(|x| keys::id_bytes(x) == Some(g));
                if present == edit.add {
                    continue;
                }
                if edit.add {
                    list.push(rmpv::Value::Binary(g.to_vec()));
                } else {
                    list.retain(|x| keys::id_bytes(x) != Some(g));
                }
                changed = true;
            }
            if !changed {
                return Ok(());
            }
            let mut flags = vec![format!("F{FLAG_MSGPACK}")];
            flags.push(cas.map_or_else(|| "ME".to_string(), |c| format!("C{c}")));
            let value = keys::encode(&rmpv::Value::Array(list));
            if matches!(
                self.pool.set("group list", key, &value, &flags).await?,
                Reply::Stored(_)
            ) {
                return Ok(());
            }
        }
        Err(contention("group list"))
    }
}

/// A coordination backend on a memcached server (≥ 1.6, meta protocol), sharing
/// its keys with Python tooz's memcached driver. See the crate documentation.
///
/// Most code connects through a [`tooz_core::Registry`] with [`crate::DRIVER`].
#[derive(Debug, Clone)]
pub struct MemcachedDriver {
    inner: Arc<Inner>,
}

impl MemcachedDriver {
    /// A driver for `member` (nothing is contacted before `start`).
    pub fn new(config: MemcachedConfig, member: MemberId) -> Self {
        let notifier = Arc::new(Notifier::new(
            config.address(),
            config.timeout,
            config.mutation_log,
        ));
        MemcachedDriver {
            inner: Arc::new(Inner {
                pool: Pool::new(config.address(), config.timeout),
                config,
                member,
                lease: LeaseState::new(),
                leaders: tokio::sync::Mutex::new(HashMap::new()),
                held_cas: Mutex::new(HashSet::new()),
                clock: Mutex::new(None),
                seen: Mutex::new(HashMap::new()),
                watcher: Watcher::default(),
                notifier,
                list_edits: Mutex::new(Vec::new()),
                list_writer: tokio::sync::Mutex::new(()),
            }),
        }
    }

    pub(crate) fn connect(req: &ConnectRequest<'_>) -> Result<Arc<dyn Driver>> {
        let config = MemcachedConfig::from_request(req)?;
        Ok(Arc::new(MemcachedDriver::new(
            config,
            req.member_id.clone(),
        )))
    }

    /// The settings of this driver.
    pub fn config(&self) -> &MemcachedConfig {
        &self.inner.config
    }

    async fn set_alive(&self) -> Result<()> {
        let i = &self.inner;
        let flags = vec![
            format!("T{}", ttl_arg(i.config.membership_timeout)),
            format!("F{FLAG_RAW}"),
        ];
        match i
            .pool
            .set(
                "heartbeat",
                &keys::member(i.member.as_bytes()),
                STILL_ALIVE,
                &flags,
            )
            .await?
        {
            Reply::Stored(_) => Ok(()),
            other => Err(unexpected("heartbeat", other)),
        }
    }
}

/// The one-second marker a release stores so that Rust waiters reading the
/// mutation log wake up (see the `notify` module).
fn free_marker(key: &[u8]) -> Cmd {
    Cmd::set(&notify::marker(key), b"", vec!["T1".into(), "F0".into()])
}

fn micros_to_time(us: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_micros(us)
}

#[tooz_core::async_trait]
impl Driver for MemcachedDriver {
    fn info(&self) -> DriverInfo {
        DriverInfo::new(NAME, CHARACTERISTICS, true)
    }

    fn check_id(&self, id: IdRef<'_>) -> Result<()> {
        keys::check_id(id)
    }

    #[tracing::instrument(level = "debug", skip_all, fields(member = %self.inner.member))]
    async fn start(&self) -> Result<()> {
        let i = &self.inner;
        let sent = Instant::now();
        self.set_alive().await?;
        i.lease.renewed(sent, i.config.heartbeat_interval());
        match i.pool.server_time().await {
            Ok(Some(secs)) => *guard(&i.clock) = Some((secs, sent)),
            Ok(None) => tracing::warn!(
                "memcached: stats has no time; fencing counters are seeded from the local clock"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "memcached: cannot read the server's clock; fencing counters are seeded from the local clock")
            }
        }
        Ok(())
    }

    #[tracing::instrument(level = "debug", skip_all, fields(member = %self.inner.member))]
    async fn stop(&self) -> Result<()> {
        let i = &self.inner;
        let leading: Vec<(GroupId, Leading)> = i.leaders.lock().await.drain().collect();
        for (g, l) in leading {
            if let Err(e) = i.release_exclusive(&keys::leader(&g), l.cas).await {
                tracing::warn!(group = %g, error = %e, "memcached: releasing a leadership on stop failed");
            }
        }
        if let Err(e) = i
            .pool
            .delete("stop", &keys::member(i.member.as_bytes()), &[])
            .await
        {
            tracing::warn!(error = %e, "memcached: deleting the liveness key on stop failed");
        }
        i.watcher.clear();
        i.pool.close().await;
        Ok(())
    }

    /// The liveness key, every exclusive lock and every leadership renewed in one
    /// pipeline (one round trip whatever is held); exclusive holds are rewritten
    /// under their CAS value, so a renewal never touches another owner's key.
    /// Shared holds (a read-modify-write of the reader map each) follow, at most
    /// `max_pool_size` at a time. The same pipeline checks that each joined
    /// group's key still exists, and reports the groups a restart or an eviction
    /// lost (the coordinator re-joins them).
    #[tracing::instrument(level = "debug", skip_all)]
    async fn heartbeat(&self, held: &Held<'_>) -> Result<Renewal> {
        let i = &self.inner;
        let mut leaders = i.leaders.lock().await;
        let mut exclusive = Vec::new();
        let mut shared = Vec::new();
        for (n, h) in held.locks.iter().enumerate() {
            let Some(l) = h.downcast::<MemcachedLock>() else {
                continue;
            };
            let hold = l.hold.lock().await;
            match &*hold {
                Some(Hold::Exclusive { cas }) => {
                    let cas = *cas;
                    exclusive.push((n, l, hold, cas));
                }
                Some(Hold::Shared { .. }) => {
                    drop(hold);
                    shared.push((n, l));
                }
                None => {}
            }
        }
        let leading: Vec<(GroupId, u64)> =
            leaders.iter().map(|(g, l)| (g.clone(), l.cas)).collect();
        let renew = |key: &[u8], cas: u64, ttl: Duration| {
            let mut flags = i.ttl_flags(ttl, FLAG_RAW);
            flags.push(format!("C{cas}"));
            Cmd::set(key, i.member.as_bytes(), flags)
        };
        let mut cmds = vec![Cmd::set(
            &keys::member(i.member.as_bytes()),
            STILL_ALIVE,
            vec![
                format!("T{}", ttl_arg(i.config.membership_timeout)),
                format!("F{FLAG_RAW}"),
            ],
        )];
        for (_, l, _, cas) in &exclusive {
            cmds.push(renew(&l.key, *cas, i.config.lock_timeout));
        }
        for (g, cas) in &leading {
            cmds.push(renew(&keys::leader(g), *cas, i.config.leader_timeout));
        }
        // Whether each joined group's key still exists (`mg` without flags: `HD`
        // or `EN`, no value sent): a restart or an eviction loses it, and the
        // membership with it.
        for g in held.joined {
            cmds.push(Cmd::get(&keys::group(g), &[]));
        }
        let width = i.config.max_pool_size.max(1);
        type Boxed<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;
        let shared_renewals: Vec<Boxed<'_, (usize, Result<bool>)>> = shared
            .into_iter()
            .map(|(n, l)| -> Boxed<'_, _> { Box::pin(async move { (n, l.renew().await) }) })
            .collect();
        let shared_renewals = futures_util::stream::iter(shared_renewals)
            .buffer_unordered(width)
            .collect::<Vec<_>>();
        let (replies, shared) = tokio::join!(i.pool.pipeline("heartbeat", &cmds), shared_renewals);
        let mut replies = replies?.into_iter();
        match replies.next().map(|r| r.stored()).transpose()? {
            Some(Reply::Stored(_)) => {}
            other => {
                return Err(ToozError::backend_msg(
                    NAME,
                    format!("heartbeat: unexpected reply {other:?} to the liveness key"),
                ));
            }
        }
        let mut renewal = Renewal::new(i.config.heartbeat_interval());
        let mut error = None;
        for ((n, l, mut hold, cas), reply) in exclusive.into_iter().zip(replies.by_ref()) {
            match reply.stored() {
                Ok(Reply::Stored(Some(new))) => {
                    i.replace_cas(cas, new);
                    *hold = Some(Hold::Exclusive { cas: new });
                }
                Ok(Reply::Exists | Reply::NotFound) => {
                    tracing::info!(lock = %l.name(), "memcached: lock lost (its key expired, was evicted or taken)");
                    i.forget_cas(cas);
                    *hold = None;
                    renewal.lose_lock(n);
                }
                Ok(other) => error = Some(unexpected("renew", other)),
                Err(e) => error = Some(e),
            }
        }
        for ((g, cas), reply) in leading.into_iter().zip(replies.by_ref()) {
            match reply.stored() {
                Ok(Reply::Stored(Some(new))) => {
                    i.replace_cas(cas, new);
                    if let Some(l) = leaders.get_mut(&g) {
                        l.cas = new;
                    }
                }
                Ok(Reply::Exists | Reply::NotFound) => {
                    tracing::info!(group = %g, "memcached: leadership lost (the leader key expired, was evicted or taken)");
                    i.forget_cas(cas);
                    leaders.remove(&g);
                    renewal.lose_leadership(g);
                }
                Ok(other) => error = Some(unexpected("renew", other)),
                Err(e) => error = Some(e),
            }
        }
        for (g, reply) in held.joined.iter().zip(replies) {
            if reply.status == Status::Miss {
                tracing::info!(group = %g, "memcached: the group's key is gone (a restart or an eviction) while the member is alive");
                renewal.lose_group(g.clone());
            }
        }
        for (n, r) in shared {
            match r {
                Ok(true) => {}
                Ok(false) => {
                    renewal.lose_lock(n);
                }
                Err(e) => error = Some(e),
            }
        }
        match error {
            Some(e) if renewal.lost_locks.is_empty() && renewal.lost_leaderships.is_empty() => {
                Err(e)
            }
            _ => Ok(renewal),
        }
    }

    fn lease(&self) -> Option<LeaseState> {
        Some(self.inner.lease.clone())
    }

    #[tracing::instrument(level = "debug", skip_all, fields(group = %group))]
    async fn create_group(&self, group: &GroupId) -> Result<()> {
        let i = &self.inner;
        let flags = vec![format!("F{FLAG_MSGPACK}"), "ME".to_string()];
        let empty = keys::encode(&rmpv::Value::Map(Vec::new()));
        match i
            .pool
            .set("create_group", &keys::group(group), &empty, &flags)
            .await?
        {
            Reply::Stored(_) => {}
            Reply::NotStored => return Err(ToozError::GroupAlreadyExist(group.clone())),
            other => return Err(unexpected("create_group", other)),
        }
        i.edit_group_list(group, true).await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(group = %group))]
    async fn delete_group(&self, group: &GroupId) -> Result<()> {
        let i = &self.inner;
        for _ in 0..CAS_TRIES {
            let (mut map, cas) = i.read_group("delete_group", group).await?;
            let dead = i.dead_members(map.members()).await?;
            map.retain(|m| !dead.contains(m));
            if !map.is_empty() {
                return Err(ToozError::GroupNotEmpty(group.clone()));
            }
            // Python's order: nil under CAS (so no join slips in), delete, unlist.
            let flags = vec![format!("F{FLAG_MSGPACK}"), format!("C{cas}")];
            let nil = keys::encode(&rmpv::Value::Nil);
            if !matches!(
                i.pool
                    .set("delete_group", &keys::group(group), &nil, &flags)
                    .await?,
                Reply::Stored(_)
            ) {
                continue;
            }
            i.pool
                .delete("delete_group", &keys::group(group), &[])
                .await?;
            return i.edit_group_list(group, false).await;
        }
        Err(contention("delete_group"))
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn get_groups(&self) -> Result<Vec<GroupId>> {
        let i = &self.inner;
        let Some(v) = i
            .pool
            .get("get_groups", keys::GROUP_LIST, &["v", "f"])
            .await?
        else {
            return Ok(Vec::new());
        };
        let list = keys::group_list(keys::decode(
            keys::GROUP_LIST,
            v.flags,
            v.data.as_deref().unwrap_or(&[]),
        )?);
        Ok(list
            .iter()
            .filter_map(keys::id_bytes)
            .map(GroupId::new)
            .collect())
    }

    #[tracing::instrument(level = "debug", skip_all, fields(group = %group))]
    async fn join_group(&self, group: &GroupId, capabilities: &Capabilities) -> Result<()> {
        let i = &self.inner;
        i.edit_group("join_group", group, |map| {
            if map.contains(i.member.as_bytes()) {
                return Err(ToozError::MemberAlreadyExist {
                    group: group.clone(),
                    member: i.member.clone(),
                });
            }
            map.insert(&i.member, capabilities)
        })
        .await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(group = %group))]
    async fn leave_group(&self, group: &GroupId) -> Result<()> {
        let i = &self.inner;
        i.edit_group("leave_group", group, |map| {
            if map.remove(i.member.as_bytes()) {
                Ok(())
            } else {
                Err(ToozError::MemberNotJoined {
                    group: group.clone(),
                    member: i.member.clone(),
                })
            }
        })
        .await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(group = %group))]
    async fn get_members(&self, group: &GroupId) -> Result<BTreeSet<MemberId>> {
        let map = self.inner.live_group(group).await?;
        Ok(map.members().map(MemberId::new).collect())
    }

    #[tracing::instrument(level = "debug", skip_all, fields(group = %group, member = %member))]
    async fn get_member_capabilities(
        &self,
        group: &GroupId,
        member: &MemberId,
    ) -> Result<Capabilities> {
        Ok(self.get_member_info(group, member).await?.capabilities)
    }

    #[tracing::instrument(level = "debug", skip_all, fields(group = %group))]
    async fn get_members_with_capabilities(
        &self,
        group: &GroupId,
    ) -> Result<Vec<(MemberId, Capabilities)>> {
        let map = self.inner.live_group(group).await?;
        Ok(map
            .members()
            .filter_map(|m| Some((MemberId::new(m), map.entry(m)?.caps)))
            .collect())
    }

    #[tracing::instrument(level = "debug", skip_all, fields(group = %group, member = %member))]
    async fn get_member_info(&self, group: &GroupId, member: &MemberId) -> Result<MemberInfo> {
        let map = self.inner.live_group(group).await?;
        let e = map
            .entry(member.as_bytes())
            .ok_or_else(|| ToozError::MemberNotJoined {
                group: group.clone(),
                member: member.clone(),
            })?;
        Ok(MemberInfo::new(
            e.caps,
            e.created.map(micros_to_time),
            e.updated.map(micros_to_time),
        ))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(group = %group))]
    async fn update_capabilities(
        &self,
        group: &GroupId,
        capabilities: &Capabilities,
    ) -> Result<()> {
        let i = &self.inner;
        i.edit_group("update_capabilities", group, |map| {
            if map.update(i.member.as_bytes(), capabilities)? {
                Ok(())
            } else {
                Err(ToozError::MemberNotJoined {
                    group: group.clone(),
                    member: i.member.clone(),
                })
            }
        })
        .await
    }

    /// Python's election: a non-blocking `add` of the leader key. A leadership
    /// already held is kept (the heartbeat renews it and reports its loss).
    #[tracing::instrument(level = "debug", skip_all, fields(group = %group))]
    async fn campaign(&self, group: &GroupId) -> Result<Option<FencingToken>> {
        let i = &self.inner;
        let mut leaders = i.leaders.lock().await;
        if let Some(l) = leaders.get(group) {
            return Ok(Some(FencingToken(l.fence)));
        }
        match i
            .acquire_exclusive(&keys::leader(group), i.config.leader_timeout)
            .await?
        {
            Grant::Granted { cas, fence } => {
                leaders.insert(group.clone(), Leading { cas, fence });
                Ok(Some(FencingToken(fence)))
            }
            Grant::Held(_) => Ok(None),
        }
    }

    #[tracing::instrument(level = "debug", skip_all, fields(group = %group))]
    async fn resign(&self, group: &GroupId) -> Result<bool> {
        let i = &self.inner;
        let Some(l) = i.leaders.lock().await.remove(group) else {
            return Ok(false);
        };
        let key = keys::leader(group);
        match i.release_exclusive(&key, l.cas).await {
            Ok(led) => Ok(led),
            Err(e) => {
                i.spawn_release(key, Hold::Exclusive { cas: l.cas });
                Err(e)
            }
        }
    }

    #[tracing::instrument(level = "debug", skip_all, fields(group = %group))]
    async fn get_leader(&self, group: &GroupId) -> Result<Option<MemberId>> {
        let i = &self.inner;
        let Some(v) = i
            .pool
            .get("get_leader", &keys::leader(group), &["v", "f"])
            .await?
        else {
            return Ok(None);
        };
        match LockValue::read(
            &keys::leader(group),
            v.flags,
            v.data.as_deref().unwrap_or(&[]),
        )? {
            LockValue::Owner(m) if !m.is_empty() => Ok(Some(MemberId::new(m))),
            _ => Ok(None),
        }
    }

    fn lock(&self, name: &LockName) -> Result<Arc<dyn DriverLock>> {
        Ok(Arc::new(MemcachedLock::new(
            Arc::clone(&self.inner),
            name.clone(),
        )))
    }

    /// memcached cannot push: one poller per coordinator reads every watched group
    /// in one round trip (see the `watch` module) and wakes the groups that
    /// changed; stores of the group or leader key seen in the mutation log (see
    /// the crate README) make the core look at once. Checks that the group exists.
    async fn watch_group(&self, group: &GroupId) -> Result<Option<DriverEventStream>> {
        let i = &self.inner;
        let cmds = [
            Cmd::get(&keys::group(group), &["v", "c", "f"]),
            Cmd::get(&keys::leader(group), &["v"]),
        ];
        let mut replies = i.pool.pipeline("watch_group", &cmds).await?.into_iter();
        let (Some(map), Some(leader)) = (replies.next(), replies.next()) else {
            return Err(ToozError::backend_msg(NAME, "watch_group: replies missing"));
        };
        let map = map.hit();
        Inner::group_map(group, map.clone())?;
        let (first, members) = Inner::snapshot(group, map, leader.hit());
        let polled = i.watcher.subscribe(i, group, first, members);
        let hints = i
            .notifier
            .subscribe(&[keys::group(group), keys::leader(group)])
            .await;
        let changes: DriverEventStream = match hints {
            Some(h) => {
                Box::pin(futures_util::stream::select(polled, h).map(|()| DriverEvent::Changed))
            }
            None => Box::pin(polled.map(|()| DriverEvent::Changed)),
        };
        Ok(Some(changes))
    }
}
