//! The [`RedisDriver`]: groups, membership, leadership and locks in Redis, laid
//! out as Python tooz lays them out.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::{Script, Value};
use tokio::time::Instant;
use tooz_core::{
    Attempt, Capabilities, Characteristic, ConnectRequest, Driver, DriverEventStream, DriverInfo,
    DriverLock, FencingToken, GroupId, Held, IdRef, LeaseState, LockName, MemberId, MemberInfo,
    Mode, Renewal, Result, ToozError,
};

use crate::config::RedisConfig;
use crate::conn::Connector;
use crate::keys::{
    self, FENCE_TTL_MS, Keys, PYTHON_LEADER, STILL_ALIVE, Scripts, check_lock_name,
    check_member_id, new_token,
};
use crate::lock::{RedisLock, acquire_args, mode_arg, parse_acquire};
use crate::watch::{Hub, group_events};

const CHARACTERISTICS: &[Characteristic] = &[
    Characteristic::DistributedAcrossThreads,
    Characteristic::DistributedAcrossProcesses,
    Characteristic::DistributedAcrossHosts,
    Characteristic::Causal,
];

/// The oldest server the scripts are written for.
const MIN_SERVER_MAJOR: u32 = 6;

/// The keys of one lock name.
#[derive(Debug, Clone)]
pub(crate) struct LockKeys {
    /// `<ns>_<name>_lock`, also the channel releases are published on.
    pub(crate) lock: Vec<u8>,
    pub(crate) readers: Vec<u8>,
    pub(crate) fence: Vec<u8>,
    /// The waiter queue (ZSET) and the waiters' registrations (HASH).
    pub(crate) queue: Vec<u8>,
    pub(crate) waiters: Vec<u8>,
}

/// A leadership this coordinator holds.
#[derive(Debug, Clone)]
struct Leading {
    token: String,
    fence: u64,
}

/// Shared state of a driver and its lock handles.
#[derive(Debug)]
pub(crate) struct Inner {
    config: RedisConfig,
    member: MemberId,
    keys: Keys,
    scripts: Scripts,
    connector: Arc<Connector>,
    hub: Mutex<Option<Arc<Hub>>>,
    leaders: Mutex<HashMap<GroupId, Leading>>,
    /// The lease of every key this member writes: each is written with a TTL of
    /// at least `heartbeat_interval()` and renewed by the heartbeat.
    lease: LeaseState,
}

fn guard<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

fn bytes(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

fn array(v: &Value) -> Option<&[Value]> {
    match v {
        Value::Array(a) | Value::Set(a) => Some(a),
        _ => None,
    }
}

/// At most this many keys per call of the heartbeat script (besides the beat
/// key): a large heartbeat is split into calls of this size, pipelined in one
/// round trip, so no single call holds single-threaded Redis for long.
pub(crate) const HEARTBEAT_BATCH_KEYS: usize = 500;

/// One thing a heartbeat renews or checks.
enum BeatItem {
    /// A lock hold, by its position in `Held::locks`.
    Lock {
        n: usize,
        keys: [Vec<u8>; 2],
        kind: &'static str,
        token: Vec<u8>,
    },
    /// A leadership.
    Leader {
        group: GroupId,
        keys: [Vec<u8>; 2],
        token: Vec<u8>,
    },
    /// A joined group whose hash must still list the member.
    Group { group: GroupId, key: Vec<u8> },
}

impl BeatItem {
    fn keys(&self) -> impl Iterator<Item = &[u8]> {
        let (a, b): (&[u8], Option<&[u8]>) = match self {
            BeatItem::Lock { keys, .. } | BeatItem::Leader { keys, .. } => {
                (&keys[0], Some(&keys[1]))
            }
            BeatItem::Group { key, .. } => (key, None),
        };
        std::iter::once(a).chain(b)
    }

    /// Kind and token of a hold (`None` for a group check).
    fn hold_args(&self) -> Option<(&'static str, &[u8])> {
        match self {
            BeatItem::Lock { kind, token, .. } => Some((kind, token)),
            BeatItem::Leader { token, .. } => Some(("l", token)),
            BeatItem::Group { .. } => None,
        }
    }

    fn key_count(&self) -> usize {
        match self {
            BeatItem::Group { .. } => 1,
            _ => 2,
        }
    }
}

/// Splits the items into script calls of at most `max_keys` keys each (an item
/// is never split; at least one call, which sets the beat key).
fn beat_batches(items: Vec<BeatItem>, max_keys: usize) -> Vec<Vec<BeatItem>> {
    let mut batches: Vec<Vec<BeatItem>> = vec![Vec::new()];
    let mut used = 0;
    for item in items {
        let k = item.key_count();
        if used + k > max_keys && batches.last().is_some_and(|b| !b.is_empty()) {
            batches.push(Vec::new());
            used = 0;
        }
        used += k;
        if let Some(b) = batches.last_mut() {
            b.push(item);
        }
    }
    batches
}

fn unexpected(what: &str, v: &Value) -> ToozError {
    ToozError::backend_msg("redis", format!("unexpected reply to {what}: {v:?}"))
}

/// Adds the keys a request touched, and the server's words, to a backend error:
/// a key of the wrong type (`WRONGTYPE`, another client's junk) is named.
fn with_keys(e: ToozError, keys: &[&[u8]]) -> ToozError {
    match e {
        ToozError::Backend {
            driver,
            message,
            source,
            retryable,
        } => {
            let names: Vec<String> = keys
                .iter()
                .map(|k| String::from_utf8_lossy(k).into_owned())
                .collect();
            let cause = source.as_ref().map(ToString::to_string).unwrap_or_default();
            ToozError::Backend {
                driver,
                message: format!("{message} on key(s) {}: {cause}", names.join(", ")),
                source,
                retryable,
            }
        }
        other => other,
    }
}

fn micros_to_time(us: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_micros(us)
}

impl Inner {
    pub(crate) fn lock_keys(&self, name: &LockName) -> LockKeys {
        LockKeys {
            lock: self.keys.lock(name),
            readers: self.keys.lock_readers(name),
            fence: self.keys.lock_fence(name),
            queue: self.keys.lock_queue(name),
            waiters: self.keys.lock_waiters(name),
        }
    }

    /// Runs an ownership-checked release (`op`) of a hold this coordinator may
    /// have without knowing it (an acquire or campaign whose reply was lost) or
    /// that a failed release left behind, in a task of its own: retried with
    /// backoff while the server cannot be reached, until it went through (freed
    /// or found the key gone or someone else's) or the hold would have expired
    /// on its own (`lock_timeout` from now: nobody renews it).
    pub(crate) fn spawn_cleanup<F, Fut>(self: &Arc<Self>, what: &'static str, op: F)
    where
        F: Fn(Arc<Inner>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<bool>> + Send + 'static,
    {
        let inner = Arc::clone(self);
        let deadline = Instant::now() + self.config.lock_timeout;
        tooz_core::util::spawn_cleanup("redis", what, Some(deadline), move || {
            let done = op(Arc::clone(&inner));
            async move { done.await.map(drop) }
        });
    }

    /// Spawns the owner-checked release of lock token `token` (see
    /// [`Inner::spawn_cleanup`]).
    pub(crate) fn spawn_release(self: &Arc<Self>, keys: &LockKeys, mode: Mode, token: &str) {
        let (keys, token) = (keys.clone(), token.to_string());
        self.spawn_cleanup("lock release", move |i| {
            let (keys, token) = (keys.clone(), token.clone());
            async move { i.release_token(&keys, mode, &token).await }
        });
    }

    /// Gives up the leadership of `group` if `token` holds it (one script call).
    async fn resign_token(&self, group: &GroupId, token: &str) -> Result<bool> {
        let n = self
            .eval_int(
                "stand_down_group_leader",
                &self.scripts.resign,
                &[&self.keys.leader(group), &self.keys.leader_owner(group)],
                &[token.as_bytes(), &self.keys.group(group)],
            )
            .await?;
        Ok(n == 1)
    }

    /// Spawns the owner-checked resignation of `token` (see [`Inner::spawn_cleanup`]).
    fn spawn_resign(self: &Arc<Self>, group: &GroupId, token: &str) {
        let (group, token) = (group.clone(), token.to_string());
        self.spawn_cleanup("leadership release", move |i| {
            let (group, token) = (group.clone(), token.clone());
            async move { i.resign_token(&group, &token).await }
        });
    }

    pub(crate) fn hub(&self) -> Arc<Hub> {
        let mut h = guard(&self.hub);
        Arc::clone(h.get_or_insert_with(|| Hub::new(Arc::clone(&self.connector))))
    }

    /// Runs a script (one `EVALSHA`; `EVAL` after a server restart forgot it).
    async fn eval(
        &self,
        what: &str,
        script: &Script,
        keys: &[&[u8]],
        args: &[&[u8]],
    ) -> Result<Value> {
        self.connector
            .run(what, |mut c| {
                let mut inv = script.prepare_invoke();
                for k in keys {
                    inv.key(*k);
                }
                for a in args {
                    inv.arg(*a);
                }
                async move { inv.invoke_async::<Value>(&mut c).await }
            })
            .await
            .map_err(|e| with_keys(e, keys))
    }

    async fn eval_int(
        &self,
        what: &str,
        script: &Script,
        keys: &[&[u8]],
        args: &[&[u8]],
    ) -> Result<i64> {
        let v = self.eval(what, script, keys, args).await?;
        int(&v).ok_or_else(|| unexpected(what, &v))
    }

    // ----- locks ---------------------------------------------------------------

    /// One attempt; when `waiter` is given and the lock is held, the waiter is
    /// registered in (or stays in) the lock's queue, and a grant removes it.
    pub(crate) async fn acquire_once(
        &self,
        k: &LockKeys,
        mode: Mode,
        token: &str,
        waiter: Option<&str>,
    ) -> Result<Attempt> {
        let ttl_ms = ms(self.config.lock_timeout);
        let [ttl, m, fttl] = acquire_args(ttl_ms, mode);
        let life = ttl_ms.saturating_mul(2).saturating_add(1000).to_string();
        let v = self
            .eval(
                "acquire",
                &self.scripts.lock_acquire,
                &[&k.lock, &k.readers, &k.fence, &k.queue, &k.waiters],
                &[
                    token.as_bytes(),
                    ttl.as_bytes(),
                    m.as_bytes(),
                    fttl.as_bytes(),
                    waiter.unwrap_or("").as_bytes(),
                    life.as_bytes(),
                ],
            )
            .await?;
        parse_acquire(&v)
    }

    /// Removes `waiter` from the lock's queue; wakes the next waiter when the
    /// lock is free. `true` when one was woken.
    pub(crate) async fn leave_queue(&self, k: &LockKeys, waiter: &str) -> Result<bool> {
        let n = self
            .eval_int(
                "leave lock queue",
                &self.scripts.lock_leave,
                &[&k.lock, &k.queue, &k.waiters],
                &[waiter.as_bytes()],
            )
            .await?;
        Ok(n > 0)
    }

    /// Spawns [`Inner::leave_queue`], retried like a release (see
    /// [`Inner::spawn_cleanup`]).
    pub(crate) fn spawn_leave(self: &Arc<Self>, keys: &LockKeys, waiter: &str) {
        let (keys, waiter) = (keys.clone(), waiter.to_string());
        self.spawn_cleanup("lock queue leave", move |i| {
            let (keys, waiter) = (keys.clone(), waiter.clone());
            async move { i.leave_queue(&keys, &waiter).await }
        });
    }

    pub(crate) async fn release_token(
        &self,
        k: &LockKeys,
        mode: Mode,
        token: &str,
    ) -> Result<bool> {
        let n = self
            .eval_int(
                "release",
                &self.scripts.lock_release,
                &[&k.lock, &k.readers, &k.queue, &k.waiters],
                &[token.as_bytes(), mode_arg(mode).as_bytes()],
            )
            .await?;
        Ok(n == 1)
    }

    pub(crate) async fn renew_token(
        &self,
        k: &LockKeys,
        mode: Mode,
        token: &str,
        renew: bool,
    ) -> Result<bool> {
        let ttl = ms(self.config.lock_timeout).to_string();
        let n = self
            .eval_int(
                if renew {
                    "lock heartbeat"
                } else {
                    "is_still_owner"
                },
                &self.scripts.lock_renew,
                &[&k.lock, &k.readers],
                &[
                    token.as_bytes(),
                    mode_arg(mode).as_bytes(),
                    ttl.as_bytes(),
                    if renew { b"1" } else { b"0" },
                ],
            )
            .await?;
        Ok(n == 1)
    }

    pub(crate) async fn break_lock(&self, k: &LockKeys) -> Result<bool> {
        let n = self
            .eval_int(
                "break_lock",
                &self.scripts.lock_break,
                &[&k.lock, &k.readers],
                &[],
            )
            .await?;
        Ok(n == 1)
    }

    // ----- group helpers ---------------------------------------------------------

    fn member_args(&self) -> (Vec<u8>, Vec<u8>) {
        (self.keys.beat_prefix(), self.member.as_bytes().to_vec())
    }

    /// Live members (with capabilities when `with_caps`), in one request.
    async fn members(&self, g: &GroupId, with_caps: bool) -> Result<Vec<(MemberId, Capabilities)>> {
        let (prefix, me) = self.member_args();
        let v = self
            .eval(
                "get_members",
                &self.scripts.members,
                &[&self.keys.group(g), &self.keys.joined_times(g)],
                &[&prefix, &me, if with_caps { b"1" } else { b"0" }],
            )
            .await?;
        let a = array(&v).ok_or_else(|| unexpected("get_members", &v))?;
        match a.first().and_then(int) {
            Some(-1) => return Err(ToozError::GroupNotCreated(g.clone())),
            Some(1) => {}
            _ => return Err(unexpected("get_members", &v)),
        }
        let rest = &a[1..];
        let mut out = Vec::new();
        if with_caps {
            for pair in rest.chunks(2) {
                let m = pair
                    .first()
                    .and_then(bytes)
                    .ok_or_else(|| unexpected("get_members", &v))?;
                let c = pair.get(1).and_then(bytes).unwrap_or(&[]);
                out.push((MemberId::new(m), Capabilities::from_msgpack(c.to_vec())));
            }
        } else {
            for m in rest {
                let m = bytes(m).ok_or_else(|| unexpected("get_members", &v))?;
                out.push((MemberId::new(m), Capabilities::none()));
            }
        }
        Ok(out)
    }

    /// One live member's capabilities and times.
    async fn member(
        &self,
        g: &GroupId,
        m: &MemberId,
    ) -> Result<(Capabilities, Option<(u64, u64)>)> {
        let (prefix, me) = self.member_args();
        let v = self
            .eval(
                "get_member",
                &self.scripts.member,
                &[&self.keys.group(g), &self.keys.joined_times(g)],
                &[&prefix, &me, m.as_bytes()],
            )
            .await?;
        let a = array(&v).ok_or_else(|| unexpected("get_member", &v))?;
        match a.first().and_then(int) {
            Some(-1) => Err(ToozError::GroupNotCreated(g.clone())),
            Some(-2) => Err(ToozError::MemberNotJoined {
                group: g.clone(),
                member: m.clone(),
            }),
            Some(1) => {
                let caps = a.get(1).and_then(bytes).unwrap_or(&[]);
                let times = a.get(2).and_then(bytes).and_then(keys::parse_times);
                Ok((Capabilities::from_msgpack(caps.to_vec()), times))
            }
            _ => Err(unexpected("get_member", &v)),
        }
    }
}

/// A coordination backend on a Redis server (≥ 6), sharing its keys with Python
/// tooz's redis driver. See the crate documentation for the layout and semantics.
///
/// Most code connects through a [`tooz_core::Registry`] with [`crate::DRIVER`];
/// build one directly to wrap it in a [`tooz_core::Coordinator`] yourself:
///
/// ```no_run
/// use std::sync::Arc;
/// use tooz_core::{Coordinator, MemberId};
/// use tooz_redis::{RedisConfig, RedisDriver};
///
/// let member = MemberId::from("worker-1");
/// let config = RedisConfig::from_url_str("redis://127.0.0.1:6379?timeout=10")?;
/// let driver = RedisDriver::new(config, member.clone())?;
/// let coord = Coordinator::new(Arc::new(driver), member, "redis://127.0.0.1:6379");
/// # Ok::<(), tooz_core::ToozError>(())
/// ```
#[derive(Debug, Clone)]
pub struct RedisDriver {
    inner: Arc<Inner>,
}

impl RedisDriver {
    /// A driver for `member` (nothing is contacted before `start`).
    ///
    /// # Errors
    /// `InvalidId` for the member id `__created__` (Python's group marker).
    pub fn new(config: RedisConfig, member: MemberId) -> Result<Self> {
        check_member_id(&member)?;
        let keys = Keys::new(config.namespace.clone());
        Ok(RedisDriver {
            inner: Arc::new(Inner {
                connector: Arc::new(Connector::new(config.clone())),
                config,
                member,
                keys,
                scripts: Scripts::new(),
                hub: Mutex::new(None),
                leaders: Mutex::new(HashMap::new()),
                lease: LeaseState::new(),
            }),
        })
    }

    /// The factory registered by [`crate::DRIVER`].
    pub(crate) fn connect(req: &ConnectRequest<'_>) -> Result<Arc<dyn Driver>> {
        let config = RedisConfig::from_request(req)?;
        Ok(Arc::new(RedisDriver::new(config, req.member_id.clone())?))
    }

    /// The settings of this driver.
    pub fn config(&self) -> &RedisConfig {
        &self.inner.config
    }

    /// The key layout of this driver's namespace.
    pub fn keys(&self) -> &Keys {
        &self.inner.keys
    }
}

fn parse_version(info: &str) -> Option<(u32, u32)> {
    let line = info
        .lines()
        .find_map(|l| l.trim().strip_prefix("redis_version:"))?;
    let mut it = line.trim().split('.');
    let major = it.next()?.parse().ok()?;
    let minor = it.next().and_then(|m| m.parse().ok()).unwrap_or(0);
    Some((major, minor))
}

#[tooz_core::async_trait]
impl Driver for RedisDriver {
    fn info(&self) -> DriverInfo {
        DriverInfo::new("redis", CHARACTERISTICS, true)
    }

    /// `__created__` is Python's group marker; lock names must fit Redis's key rules.
    fn check_id(&self, id: IdRef<'_>) -> Result<()> {
        match id {
            IdRef::Member(m) => check_member_id(m),
            IdRef::Lock(l) => check_lock_name(l),
            _ => Ok(()),
        }
    }

    #[tracing::instrument(level = "debug", skip_all, fields(member = %self.inner.member))]
    async fn start(&self) -> Result<()> {
        let i = &self.inner;
        // Every key written from now on outlives `sent + TTL` on the server.
        let sent = tokio::time::Instant::now();
        #[cfg(not(feature = "tls"))]
        {
            let sentinel_ssl = matches!(
                i.config.target,
                crate::config::Target::Sentinel { ssl: true, .. }
            );
            if i.config.tls.is_some() || sentinel_ssl {
                return Err(ToozError::invalid_option(
                    crate::config::NAME,
                    if sentinel_ssl { "sentinel_ssl" } else { "ssl" },
                    "TLS support is not built into this tooz-redis (enable its `tls` cargo feature)",
                ));
            }
        }
        let beat = i.keys.beat(&i.member);
        let beat_ms = ms(i.config.membership_timeout);
        let scripts = i.scripts.sources();
        // One round trip: version check, first heartbeat, scripts loaded.
        let info: String = i
            .connector
            .run("start", |mut c| {
                let mut p = redis::pipe();
                p.cmd("INFO").arg("server");
                p.cmd("SET")
                    .arg(&beat)
                    .arg(STILL_ALIVE)
                    .arg("PX")
                    .arg(beat_ms)
                    .ignore();
                for s in scripts {
                    p.cmd("SCRIPT").arg("LOAD").arg(s).ignore();
                }
                async move {
                    let (info,): (String,) = p.query_async(&mut c).await?;
                    Ok(info)
                }
            })
            .await?;
        i.lease.renewed(sent, i.config.heartbeat_interval());
        match parse_version(&info) {
            Some((major, _)) if major >= MIN_SERVER_MAJOR => Ok(()),
            Some((major, minor)) => Err(ToozError::backend_msg(
                "redis",
                format!(
                    "the server runs Redis {major}.{minor}; this driver needs Redis {MIN_SERVER_MAJOR} or newer"
                ),
            )),
            None => {
                tracing::warn!(
                    "redis: INFO did not report redis_version; assuming a recent server"
                );
                Ok(())
            }
        }
    }

    #[tracing::instrument(level = "debug", skip_all, fields(member = %self.inner.member))]
    async fn stop(&self) -> Result<()> {
        let i = &self.inner;
        guard(&i.leaders).clear();
        let beat = i.keys.beat(&i.member);
        let res = i
            .connector
            .run("stop", |mut c| {
                let beat = beat.clone();
                async move {
                    redis::cmd("DEL")
                        .arg(beat)
                        .query_async::<Value>(&mut c)
                        .await
                }
            })
            .await;
        if let Err(e) = res {
            tracing::warn!(error = %e, "redis: deleting the heartbeat key on stop failed");
        }
        let hub = guard(&i.hub).take();
        if let Some(h) = hub {
            h.shutdown().await;
        }
        i.connector.close().await;
        Ok(())
    }

    /// Everything in one round trip: the beat key, every lock hold (from the
    /// coordinator's held set), every leadership and a membership check of every
    /// joined group, in calls of the heartbeat script of at most
    /// 500 keys each (`HEARTBEAT_BATCH_KEYS`), pipelined.
    #[tracing::instrument(level = "debug", skip_all)]
    async fn heartbeat(&self, held: &Held<'_>) -> Result<Renewal> {
        let i = &self.inner;
        let mut items = Vec::new();
        for (n, h) in held.locks.iter().enumerate() {
            let Some((lk, mode, token)) = h.downcast::<RedisLock>().and_then(RedisLock::renewal)
            else {
                continue;
            };
            items.push(BeatItem::Lock {
                n,
                keys: [lk.lock.clone(), lk.readers.clone()],
                kind: mode_arg(mode),
                token: token.into_bytes(),
            });
        }
        for (g, l) in guard(&i.leaders).iter() {
            items.push(BeatItem::Leader {
                group: g.clone(),
                keys: [i.keys.leader(g), i.keys.leader_owner(g)],
                token: l.token.clone().into_bytes(),
            });
        }
        for g in held.joined {
            items.push(BeatItem::Group {
                key: i.keys.group(g),
                group: g.clone(),
            });
        }
        let batches = beat_batches(items, HEARTBEAT_BATCH_KEYS);
        let beat = i.keys.beat(&i.member);
        let beat_ms = ms(i.config.membership_timeout).to_string();
        let lock_ms = ms(i.config.lock_timeout).to_string();
        let script = &i.scripts.heartbeat;
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for (b, batch) in batches.iter().enumerate() {
            let keys: Vec<&[u8]> = batch.iter().flat_map(BeatItem::keys).collect();
            let cmd = pipe
                .cmd("EVALSHA")
                .arg(script.get_hash())
                .arg(keys.len() + 1);
            cmd.arg(&beat);
            for k in keys {
                cmd.arg(k);
            }
            // Only the first call sets the beat key.
            cmd.arg(if b == 0 { beat_ms.as_str() } else { "0" })
                .arg(&lock_ms)
                .arg(i.member.as_bytes());
            for item in batch {
                if let Some((kind, token)) = item.hold_args() {
                    cmd.arg(kind).arg(token);
                }
            }
        }
        let replies: Vec<Value> = i
            .connector
            .run("heartbeat", |mut c| {
                let pipe = pipe.clone();
                async move {
                    let replies: Vec<Value> = pipe.query_async(&mut c).await?;
                    let no_script = replies.iter().any(|v| {
                        matches!(v, Value::ServerError(e) if e.kind() == Some(redis::ServerErrorKind::NoScript))
                    });
                    if !no_script {
                        return Ok(replies);
                    }
                    // The server forgot its scripts (a restart, a failover, SCRIPT
                    // FLUSH): load it and send the beat again.
                    script.load_async(&mut c).await?;
                    pipe.query_async(&mut c).await
                }
            })
            .await?;
        if replies.len() != batches.len() {
            return Err(ToozError::backend_msg(
                "redis",
                format!(
                    "heartbeat: {} replies to {} script calls",
                    replies.len(),
                    batches.len()
                ),
            ));
        }
        let mut renewal = Renewal::new(i.config.heartbeat_interval());
        for (batch, v) in batches.into_iter().zip(replies) {
            if let Value::ServerError(e) = &v {
                let keys: Vec<&[u8]> = batch.iter().flat_map(BeatItem::keys).collect();
                let err = ToozError::backend_msg("redis", format!("heartbeat failed: {e:?}"));
                return Err(with_keys(err, &keys));
            }
            let results: Vec<bool> = match array(&v) {
                Some(a) => a.iter().map(|x| int(x) == Some(1)).collect(),
                None => return Err(unexpected("heartbeat", &v)),
            };
            let holds = batch.iter().filter(|b| b.hold_args().is_some()).count();
            let groups = batch.len() - holds;
            if results.len() != holds + groups {
                return Err(unexpected("heartbeat", &v));
            }
            let mut holds_then_groups: Vec<BeatItem> = Vec::with_capacity(batch.len());
            let (h, g): (Vec<BeatItem>, Vec<BeatItem>) =
                batch.into_iter().partition(|b| b.hold_args().is_some());
            holds_then_groups.extend(h);
            holds_then_groups.extend(g);
            for (item, ok) in holds_then_groups.into_iter().zip(results) {
                match (item, ok) {
                    (_, true) => {}
                    (BeatItem::Lock { n, .. }, false) => {
                        renewal.lose_lock(n);
                    }
                    (BeatItem::Leader { group, .. }, false) => {
                        tracing::info!(group = %group, "redis: leadership lost (the leader key expired or was taken)");
                        guard(&i.leaders).remove(&group);
                        renewal.lose_leadership(group);
                    }
                    (BeatItem::Group { group, .. }, false) => {
                        tracing::info!(group = %group, "redis: membership missing from the group hash while the member beats");
                        renewal.lose_group(group);
                    }
                }
            }
        }
        Ok(renewal)
    }

    fn lease(&self) -> Option<LeaseState> {
        Some(self.inner.lease.clone())
    }

    #[tracing::instrument(level = "debug", skip_all, fields(group = %group))]
    async fn create_group(&self, group: &GroupId) -> Result<()> {
        let i = &self.inner;
        let n = i
            .eval_int(
                "create_group",
                &i.scripts.create_group,
                &[&i.keys.group(group), &i.keys.groups()],
                &[group.as_bytes()],
            )
            .await?;
        if n == 1 {
            Ok(())
        } else {
            Err(ToozError::GroupAlreadyExist(group.clone()))
        }
    }

    #[tracing::instrument(level = "debug", skip_all, fields(group = %group))]
    async fn delete_group(&self, group: &GroupId) -> Result<()> {
        let i = &self.inner;
        let (prefix, me) = i.member_args();
        let n = i
            .eval_int(
                "delete_group",
                &i.scripts.delete_group,
                &[
                    &i.keys.group(group),
                    &i.keys.groups(),
                    &i.keys.joined_times(group),
                ],
                &[group.as_bytes(), &prefix, &me],
            )
            .await?;
        match n {
            1 => Ok(()),
            -1 | -2 => Err(ToozError::GroupNotCreated(group.clone())),
            -3 => Err(ToozError::GroupNotEmpty(group.clone())),
            -4 => Err(ToozError::backend_msg(
                "redis",
                format!("cannot remove group {group} from the set of groups"),
            )),
            other => Err(ToozError::backend_msg(
                "redis",
                format!("delete_group of {group} returned {other}"),
            )),
        }
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn get_groups(&self) -> Result<Vec<GroupId>> {
        let i = &self.inner;
        let key = i.keys.groups();
        let v: Vec<Vec<u8>> = i
            .connector
            .run("get_groups", |mut c| {
                let key = key.clone();
                async move { redis::cmd("SMEMBERS").arg(key).query_async(&mut c).await }
            })
            .await
            .map_err(|e| with_keys(e, &[&key]))?;
        Ok(v.into_iter().map(GroupId::from).collect())
    }

    #[tracing::instrument(level = "debug", skip_all, fields(group = %group))]
    async fn join_group(&self, group: &GroupId, capabilities: &Capabilities) -> Result<()> {
        let i = &self.inner;
        let n = i
            .eval_int(
                "join_group",
                &i.scripts.join,
                &[&i.keys.group(group), &i.keys.joined_times(group)],
                &[i.member.as_bytes(), capabilities.as_msgpack()],
            )
            .await?;
        match n {
            1 => Ok(()),
            -1 => Err(ToozError::GroupNotCreated(group.clone())),
            _ => Err(ToozError::MemberAlreadyExist {
                group: group.clone(),
                member: i.member.clone(),
            }),
        }
    }

    #[tracing::instrument(level = "debug", skip_all, fields(group = %group))]
    async fn leave_group(&self, group: &GroupId) -> Result<()> {
        let i = &self.inner;
        let n = i
            .eval_int(
                "leave_group",
                &i.scripts.leave,
                &[&i.keys.group(group), &i.keys.joined_times(group)],
                &[i.member.as_bytes()],
            )
            .await?;
        match n {
            1 => Ok(()),
            -1 => Err(ToozError::GroupNotCreated(group.clone())),
            _ => Err(ToozError::MemberNotJoined {
                group: group.clone(),
                member: i.member.clone(),
            }),
        }
    }

    #[tracing::instrument(level = "debug", skip_all, fields(group = %group))]
    async fn get_members(&self, group: &GroupId) -> Result<BTreeSet<MemberId>> {
        Ok(self
            .inner
            .members(group, false)
            .await?
            .into_iter()
            .map(|(m, _)| m)
            .collect())
    }

    #[tracing::instrument(level = "debug", skip_all, fields(group = %group, member = %member))]
    async fn get_member_capabilities(
        &self,
        group: &GroupId,
        member: &MemberId,
    ) -> Result<Capabilities> {
        Ok(self.inner.member(group, member).await?.0)
    }

    #[tracing::instrument(level = "debug", skip_all, fields(group = %group))]
    async fn get_members_with_capabilities(
        &self,
        group: &GroupId,
    ) -> Result<Vec<(MemberId, Capabilities)>> {
        self.inner.members(group, true).await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(group = %group, member = %member))]
    async fn get_member_info(&self, group: &GroupId, member: &MemberId) -> Result<MemberInfo> {
        let (caps, times) = self.inner.member(group, member).await?;
        Ok(MemberInfo::new(
            caps,
            times.map(|(c, _)| micros_to_time(c)),
            times.map(|(_, u)| micros_to_time(u)),
        ))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(group = %group))]
    async fn update_capabilities(
        &self,
        group: &GroupId,
        capabilities: &Capabilities,
    ) -> Result<()> {
        let i = &self.inner;
        let n = i
            .eval_int(
                "update_capabilities",
                &i.scripts.update,
                &[&i.keys.group(group), &i.keys.joined_times(group)],
                &[i.member.as_bytes(), capabilities.as_msgpack()],
            )
            .await?;
        match n {
            1 => Ok(()),
            -1 => Err(ToozError::GroupNotCreated(group.clone())),
            _ => Err(ToozError::MemberNotJoined {
                group: group.clone(),
                member: i.member.clone(),
            }),
        }
    }

    #[tracing::instrument(level = "debug", skip_all, fields(group = %group))]
    async fn campaign(&self, group: &GroupId) -> Result<Option<FencingToken>> {
        let i = &self.inner;
        let current = guard(&i.leaders).get(group).cloned();
        let token = current.as_ref().map_or_else(new_token, |l| l.token.clone());
        let ttl = ms(i.config.lock_timeout).to_string();
        let fttl = FENCE_TTL_MS.to_string();
        let res = i
            .eval(
                "campaign",
                &i.scripts.campaign,
                &[
                    &i.keys.leader(group),
                    &i.keys.leader_owner(group),
                    &i.keys.leader_fence(group),
                ],
                &[
                    token.as_bytes(),
                    i.member.as_bytes(),
                    ttl.as_bytes(),
                    &i.keys.group(group),
                    fttl.as_bytes(),
                ],
            )
            .await;
        let v = match res {
            Ok(v) => v,
            Err(e) => {
                // The script may have run with the reply lost: a fresh grant nobody
                // knows of would keep the group leaderless for others until it
                // expires. Free it if it is ours. (A leadership already held stays:
                // the coordinator still counts it and the heartbeat renews it.)
                if current.is_none() {
                    i.spawn_resign(group, &token);
                }
                return Err(e);
            }
        };
        let a = array(&v).ok_or_else(|| unexpected("campaign", &v))?;
        match a.first().and_then(int) {
            Some(1) => {
                let fence = a.get(1).and_then(int).unwrap_or(0).max(0) as u64;
                let fresh = a.get(2).and_then(int) == Some(1);
                let fence = match (&current, fresh) {
                    (Some(l), false) => l.fence,
                    _ => fence,
                };
                guard(&i.leaders).insert(group.clone(), Leading { token, fence });
                Ok(Some(FencingToken(fence)))
            }
            Some(0) => {
                guard(&i.leaders).remove(group);
                Ok(None)
            }
            _ => Err(unexpected("campaign", &v)),
        }
    }

    #[tracing::instrument(level = "debug", skip_all, fields(group = %group))]
    async fn resign(&self, group: &GroupId) -> Result<bool> {
        let i = &self.inner;
        let Some(l) = guard(&i.leaders).remove(group) else {
            return Ok(false);
        };
        match i.resign_token(group, &l.token).await {
            Ok(led) => Ok(led),
            Err(e) => {
                // Not renewed any more, but not left to its TTL either.
                i.spawn_resign(group, &l.token);
                Err(e)
            }
        }
    }

    #[tracing::instrument(level = "debug", skip_all, fields(group = %group))]
    async fn get_leader(&self, group: &GroupId) -> Result<Option<MemberId>> {
        let i = &self.inner;
        let (l, o) = (i.keys.leader(group), i.keys.leader_owner(group));
        let (token, owner): (Option<Vec<u8>>, Option<Vec<u8>>) = i
            .connector
            .run("get_leader", |mut c| {
                let (l, o) = (l.clone(), o.clone());
                async move { redis::cmd("MGET").arg(l).arg(o).query_async(&mut c).await }
            })
            .await?;
        let Some(token) = token else { return Ok(None) };
        if let Some(owner) = owner
            && let Some((t, m)) = keys::parse_owner(&owner)
            && t == token.as_slice()
        {
            return Ok(Some(MemberId::new(m)));
        }
        Ok(Some(MemberId::from(PYTHON_LEADER)))
    }

    fn lock(&self, name: &LockName) -> Result<Arc<dyn DriverLock>> {
        Ok(Arc::new(RedisLock::new(
            Arc::clone(&self.inner),
            name.clone(),
        )))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(group = %group))]
    async fn watch_group(&self, group: &GroupId) -> Result<Option<DriverEventStream>> {
        let i = &self.inner;
        let channel = i.keys.group(group);
        let sub = match i.hub().subscribe(&channel).await {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(group = %group, error = %e, "redis: cannot subscribe to group events; the coordinator will poll");
                None
            }
        };
        let exists: bool = i
            .connector
            .run("watch_group", |mut c| {
                let k = channel.clone();
                async move { redis::cmd("EXISTS").arg(k).query_async(&mut c).await }
            })
            .await?;
        if !exists {
            return Err(ToozError::GroupNotCreated(group.clone()));
        }
        let tick = i.config.membership_timeout / 2;
        Ok(sub.map(|s| group_events(s, tick)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_parsing() {
        let info = "# Server\r\nredis_version:7.0.15\r\nredis_mode:standalone\r\n";
        assert_eq!(parse_version(info), Some((7, 0)));
        assert_eq!(parse_version("redis_version:6.2.1"), Some((6, 2)));
        assert_eq!(parse_version("nothing"), None);
    }

    #[test]
    fn reserved_member_id_is_refused() {
        let c = RedisConfig::from_url_str("redis://localhost").unwrap();
        assert!(matches!(
            RedisDriver::new(c, "__created__".into()),
            Err(ToozError::InvalidId {
                kind: "member id",
                ..
            })
        ));
    }

    #[test]
    fn info_is_pythons() {
        let c = RedisConfig::from_url_str("redis://localhost").unwrap();
        let d = RedisDriver::new(c, "m".into()).unwrap();
        let info = d.info();
        assert_eq!(info.name, "redis");
        assert!(info.requires_beating);
        assert_eq!(info.characteristics, CHARACTERISTICS);
    }

    fn lock_item(n: usize) -> BeatItem {
        BeatItem::Lock {
            n,
            keys: [b"k".to_vec(), b"r".to_vec()],
            kind: "x",
            token: b"t".to_vec(),
        }
    }

    fn group_item(g: &str) -> BeatItem {
        BeatItem::Group {
            group: GroupId::from(g),
            key: g.as_bytes().to_vec(),
        }
    }

    #[test]
    fn heartbeat_batches_are_bounded_and_never_split_an_item() {
        // Nothing held: one call all the same (it sets the beat key).
        let b = beat_batches(Vec::new(), HEARTBEAT_BATCH_KEYS);
        assert_eq!(b.len(), 1);
        assert!(b[0].is_empty());
        // 600 holds (1,200 keys) and 101 groups: 250 holds per call, then the rest.
        let mut items: Vec<BeatItem> = (0..600).map(lock_item).collect();
        items.extend((0..101).map(|i| group_item(&format!("g{i}"))));
        let b = beat_batches(items, HEARTBEAT_BATCH_KEYS);
        let keys: Vec<usize> = b
            .iter()
            .map(|x| x.iter().map(BeatItem::key_count).sum())
            .collect();
        assert_eq!(keys, vec![500, 500, 301]);
        assert_eq!(b.iter().map(Vec::len).sum::<usize>(), 701);
        // An odd bound: a two-key hold is never cut across calls.
        let b = beat_batches(vec![group_item("a"), lock_item(0), lock_item(1)], 2);
        let shape: Vec<usize> = b.iter().map(Vec::len).collect();
        assert_eq!(shape, vec![1, 1, 1]);
        // Holds keep their order (the reply is matched by position).
        let b = beat_batches((0..5).map(lock_item).collect(), 4);
        let order: Vec<usize> = b
            .iter()
            .flatten()
            .filter_map(|i| match i {
                BeatItem::Lock { n, .. } => Some(*n),
                _ => None,
            })
            .collect();
        assert_eq!(order, vec![0, 1, 2, 3, 4]);
    }
}
