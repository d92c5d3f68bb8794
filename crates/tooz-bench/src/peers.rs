//! `--compare-peers`: the lock crates a Rust user would pick instead of tooz, on the same
//! server in the same run, and the cancellation scenario for every lock, ours included.
//!
//! Each peer is a [`PeerLock`] client (one connection or session); the three scenarios
//! are generic over it:
//!
//! * `lock_pair`: one uncontended acquire + release, as ours.
//! * `lock_handoff`: A holds, B blocks in the peer's own blocking acquire for
//!   [`HANDOFF_WAIT`] plus a spread offset of 0–10 ms (so a polling peer's retry phase
//!   varies), A releases; the figure is A's release returning → B's acquire
//!   returning. How B learns the lock is free is the peer's [`Peer::wake_up`].
//! * `cancel` (see [`cancel`]): acquires dropped mid-flight, then holds left behind
//!   counted.
//!
//! `TOOZ_BENCH_DEBUG_CANCEL=1` prints every cancellation attempt (delay, contended,
//! dropped) on stderr.
//!
//! Peers: on Redis `rslock` (Redlock over the one server) and a hand-written
//! `SET key token NX PX ttl` lock with an owner-checked Lua `DEL` (polling every 10 ms
//! while blocked); on etcd, etcd-client's Lock service and its Election service
//! (campaign/resign used as a lock); on ZooKeeper, zookeeper-client's lock recipe.

use std::{
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use futures_util::future::join_all;
use serde_json::{Value, json};

use crate::{
    Target,
    report::{Figures, Measured},
};

/// How long B sits in its blocking acquire before A releases (as ours).
const HANDOFF_WAIT: Duration = Duration::from_millis(20);
/// Time-to-live of the peers' holds (Redis key TTLs, etcd leases): far longer than
/// [`CHECK_GRACE`], so a hold left behind cannot expire before it is counted.
const PEER_TTL: Duration = Duration::from_secs(60);
/// How long the checker may take to get each lock after the drops: covers a release
/// queued to a background task and a polling peer's retry interval (rslock: up to
/// 200 ms), never a hold's expiry.
const CHECK_GRACE: Duration = Duration::from_secs(2);

/// Iterations of the peer scenarios (as ours) and of the cancellation scenario.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sizes {
    pub(crate) lock_pair: usize,
    pub(crate) lock_handoff: usize,
    pub(crate) cancel: usize,
}

impl Sizes {
    pub(crate) fn new(quick: bool) -> Self {
        if quick {
            Self {
                lock_pair: 200,
                lock_handoff: 20,
                cancel: 16,
            }
        } else {
            Self {
                lock_pair: 2000,
                lock_handoff: 200,
                cancel: 48,
            }
        }
    }
}

/// A lock client: one connection (or session) of a lock library. Cheap to clone (the
/// clones share the connection); futures are `'static` so a waiter can be spawned.
pub(crate) trait PeerLock: Clone + Send + Sync + 'static {
    /// Proof of a hold, needed to release it.
    type Held: Send + 'static;
    /// Blocks until the lock `key` is held (the library's own way of waiting).
    fn acquire(&self, key: String) -> impl Future<Output = Result<Self::Held>> + Send + 'static;
    /// Releases a hold, returning once the library says it is released.
    fn release(&self, held: Self::Held) -> impl Future<Output = Result<()>> + Send + 'static;
}

/// The outcome of the cancellation scenario for one lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Cancel {
    /// Acquires started.
    pub(crate) attempts: usize,
    /// Acquires dropped before they returned (the rest completed first and were
    /// released normally).
    pub(crate) n: usize,
    /// Locks another client could not get within [`CHECK_GRACE`] afterwards.
    pub(crate) left_behind: usize,
}

impl Cancel {
    pub(crate) fn json(&self) -> Value {
        json!({
            "attempts": self.attempts,
            "n": self.n,
            "left_behind": self.left_behind,
            "check_grace_ms": CHECK_GRACE.as_millis() as u64,
        })
    }
}

/// Runs `fut` and drops it when `delay` has passed. The deadline is checked by a
/// future that yields to the scheduler until then (busy, but microsecond-precise:
/// a Redis acquire takes tens of microseconds, far below tokio's millisecond timer or
/// the wake-up of a sleeping thread). `Some` if `fut` finished first.
async fn drop_after<T>(delay: Duration, fut: impl Future<Output = T>) -> Option<T> {
    let deadline = Instant::now() + delay;
    let expired = async {
        while Instant::now() < deadline {
            tokio::task::yield_now().await;
        }
    };
    tokio::select! {
        biased;
        r = fut => Some(r),
        () = expired => None,
    }
}

/// The cancellation scenario: `attempts` acquires by client `a`, each of its own lock,
/// each dropped after a stepped delay. Even attempts are uncontended (the drop lands
/// while the request is on its way or the grant on its way back); odd ones wait behind
/// a hold of `b` (the drop lands while queued or polling), and `b` releases after the
/// drop. Then `b` tries every lock, all at once, each within [`CHECK_GRACE`]: a lock it
/// cannot get was left held by the dropped acquire.
pub(crate) async fn cancel<P: PeerLock>(
    a: &P,
    b: &P,
    prefix: &str,
    attempts: usize,
) -> Result<Cancel> {
    let key = |i: usize| format!("{prefix}-cancel-{i}");
    // How long an uncontended acquire takes: the delays are spread over it.
    let mut took = Vec::new();
    for i in 0..10 {
        let start = Instant::now();
        let h = a.acquire(format!("{prefix}-cancel-warm-{i}")).await?;
        took.push(start.elapsed());
        a.release(h).await?;
    }
    took.sort();
    let typical = took[took.len() / 2];
    let mut dropped = 0;
    for i in 0..attempts {
        let contended = i % 2 == 1;
        let step = (i / 2) as u32;
        let steps = attempts.div_ceil(2).max(1) as u32;
        // Uncontended: 0 .. 1.2 × a typical acquire; contended: 0 .. 2.4 × (the waiter
        // is still queued or polling when dropped).
        let span = if contended {
            typical * 12 / 5
        } else {
            typical * 6 / 5
        };
        let delay = span * step / steps;
        let holder = if contended {
            Some(
                b.acquire(key(i))
                    .await
                    .context("the holder could not take its lock")?,
            )
        } else {
            None
        };
        let outcome = drop_after(delay, a.acquire(key(i))).await;
        if std::env::var_os("TOOZ_BENCH_DEBUG_CANCEL").is_some() {
            eprintln!(
                "cancel {prefix} #{i}: delay {delay:?}, contended {contended}, dropped {}",
                outcome.is_none()
            );
        }
        match outcome {
            Some(Ok(held)) => {
                ensure!(!contended, "a dropped waiter acquired a held lock");
                a.release(held).await?;
            }
            Some(Err(e)) => return Err(e.context("acquire failed before its drop")),
            None => dropped += 1,
        }
        if let Some(h) = holder {
            b.release(h).await?;
        }
    }
    let checks = (0..attempts).map(|i| {
        let (b, k) = (b.clone(), key(i));
        async move {
            match tokio::time::timeout(CHECK_GRACE, b.acquire(k)).await {
                Ok(Ok(h)) => b.release(h).await.map(|()| false),
                Ok(Err(e)) => Err(e),
                Err(_) => Ok(true),
            }
        }
    });
    let mut left_behind = 0;
    for r in join_all(checks).await {
        if r.context("the checker's acquire failed")? {
            left_behind += 1;
        }
    }
    Ok(Cancel {
        attempts,
        n: dropped,
        left_behind,
    })
}

async fn lock_pair<P: PeerLock>(c: &P, key: &str, n: usize) -> Result<Measured> {
    for _ in 0..10 {
        let h = c.acquire(key.to_owned()).await?;
        c.release(h).await?;
    }
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        let h = c.acquire(key.to_owned()).await?;
        c.release(h).await?;
        samples.push(start.elapsed());
    }
    Ok(Measured {
        samples,
        ops_per_sample: 1,
        round_trips: None,
    })
}

async fn lock_handoff<P: PeerLock>(a: &P, b: &P, key: &str, n: usize) -> Result<Measured> {
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let held = a.acquire(key.to_owned()).await?;
        let wait = b.acquire(key.to_owned());
        let waiter = tokio::spawn(async move {
            let res = wait.await;
            (res, Instant::now())
        });
        // Plus a spread offset (0–9.9 ms), so the release lands at varied phases of a
        // polling peer's retry interval instead of always the same one.
        let offset = Duration::from_micros((i as u64 * 1_370) % 10_000);
        tokio::time::sleep(HANDOFF_WAIT + offset).await;
        if waiter.is_finished() {
            bail!("B acquired a lock A holds");
        }
        a.release(held).await?;
        let released = Instant::now();
        let (res, acquired) = waiter.await?;
        let h = res.context("B's blocking acquire failed")?;
        samples.push(acquired.saturating_duration_since(released));
        b.release(h).await?;
    }
    Ok(Measured {
        samples,
        ops_per_sample: 1,
        round_trips: None,
    })
}

/// One peer's results (each scenario separately: one failing leaves the others).
#[derive(Debug)]
pub(crate) struct PeerResult {
    pub(crate) name: &'static str,
    pub(crate) wake_up: &'static str,
    pub(crate) lock_pair: Result<Figures>,
    pub(crate) lock_handoff: Result<Figures>,
    pub(crate) cancel: Result<Cancel>,
}

fn err_json(e: &anyhow::Error) -> Value {
    json!({ "error": format!("{e:#}") })
}

impl PeerResult {
    pub(crate) fn json(&self, floor_us: Option<f64>) -> Value {
        let fig = |f: &Result<Figures>| match f {
            Ok(f) => {
                let mut f = f.clone();
                f.ratio_to_floor = floor_us.filter(|r| *r > 0.0).map(|r| f.median_us / r);
                crate::report::figure_json(&f)
            }
            Err(e) => err_json(e),
        };
        json!({
            "wake_up": self.wake_up,
            "lock_pair": fig(&self.lock_pair),
            "lock_handoff": fig(&self.lock_handoff),
            "cancel": match &self.cancel { Ok(c) => c.json(), Err(e) => err_json(e) },
        })
    }

    pub(crate) fn line(&self) -> String {
        let med = |f: &Result<Figures>| match f {
            Ok(f) => format!("{:.0} µs", f.median_us),
            Err(e) => format!("failed ({e:#})"),
        };
        let cancel = match &self.cancel {
            Ok(c) => format!("{} left behind of {} dropped", c.left_behind, c.n),
            Err(e) => format!("failed ({e:#})"),
        };
        format!(
            "peer {}: lock_pair {}, lock_handoff {} ({}), cancel {}",
            self.name,
            med(&self.lock_pair),
            med(&self.lock_handoff),
            self.wake_up,
            cancel
        )
    }
}

/// Runs one peer: two clients from `connect`, lock names under `prefix`.
async fn run_peer<P, F, Fut>(
    name: &'static str,
    wake_up: &'static str,
    prefix: &str,
    sizes: Sizes,
    connect: F,
) -> PeerResult
where
    P: PeerLock,
    F: Fn() -> Fut,
    Fut: Future<Output = Result<P>>,
{
    let clients = async { Ok::<_, anyhow::Error>((connect().await?, connect().await?)) }.await;
    let (a, b) = match clients {
        Ok(c) => c,
        Err(e) => {
            let e = Arc::new(e);
            let again = |e: &Arc<anyhow::Error>| anyhow::anyhow!("cannot connect: {e:#}");
            return PeerResult {
                name,
                wake_up,
                lock_pair: Err(again(&e)),
                lock_handoff: Err(again(&e)),
                cancel: Err(again(&e)),
            };
        }
    };
    let lock_pair = lock_pair(&a, &format!("{prefix}-pair"), sizes.lock_pair)
        .await
        .map(|m| m.figures("lock_pair"));
    let lock_handoff = lock_handoff(&a, &b, &format!("{prefix}-handoff"), sizes.lock_handoff)
        .await
        .map(|m| m.figures("lock_handoff"));
    let cancel = cancel(&a, &b, prefix, sizes.cancel).await;
    let r = PeerResult {
        name,
        wake_up,
        lock_pair,
        lock_handoff,
        cancel,
    };
    eprintln!("tooz-bench: {}", r.line());
    r
}

/// Runs the peers of the target's backend (none for the other backends).
pub(crate) async fn run(t: &Target, sizes: Sizes) -> Vec<PeerResult> {
    t.set_counting(false);
    let mut out = Vec::new();
    match t.driver {
        #[cfg(feature = "redis")]
        "redis" => {
            let prefix = t.name("peer-setnx");
            out.push(
                run_peer("redis-setnx", "polls (10 ms)", &prefix, sizes, || {
                    redis_peers::SetNx::connect(t)
                })
                .await,
            );
            let prefix = t.name("peer-rslock");
            out.push(
                run_peer(
                    "rslock",
                    "polls (3 tries, 0–200 ms apart)",
                    &prefix,
                    sizes,
                    || redis_peers::Rslock::connect(t),
                )
                .await,
            );
        }
        #[cfg(feature = "etcd")]
        "etcd" => {
            let prefix = format!("tooz-bench/{}", t.name("peer-lock"));
            out.push(
                run_peer("etcd-lock", "server-side watch", &prefix, sizes, || {
                    etcd_peers::EtcdLock::connect(t)
                })
                .await,
            );
            let prefix = format!("tooz-bench/{}", t.name("peer-election"));
            out.push(
                run_peer("etcd-election", "server-side watch", &prefix, sizes, || {
                    etcd_peers::EtcdElection::connect(t)
                })
                .await,
            );
            etcd_peers::revoke_all().await;
        }
        #[cfg(feature = "zookeeper")]
        "zookeeper" => {
            let prefix = t.name("peer-zk");
            out.push(
                run_peer(
                    "zookeeper-client",
                    "watch (previous node)",
                    &prefix,
                    sizes,
                    || zk_peer::ZkLock::connect(t, &prefix),
                )
                .await,
            );
            zk_peer::cleanup(t, &prefix).await;
        }
        _ => {}
    }
    out
}

/// Ours behind the same trait (for the cancellation scenario): a coordinator, a fresh
/// lock object per acquire.
#[derive(Clone, Debug)]
pub(crate) struct Ours(pub(crate) tooz_core::Coordinator);

impl PeerLock for Ours {
    type Held = tooz_core::Lock;

    fn acquire(&self, key: String) -> impl Future<Output = Result<Self::Held>> + Send + 'static {
        let c = self.0.clone();
        async move {
            let lock = c.get_lock(key)?;
            ensure!(
                lock.acquire(tooz_core::Wait::Forever).await?,
                "acquire(Wait::Forever) returned false"
            );
            Ok(lock)
        }
    }

    // Not `async fn`: that future would borrow `self`, and the trait wants `'static`.
    #[allow(clippy::manual_async_fn)]
    fn release(&self, held: Self::Held) -> impl Future<Output = Result<()>> + Send + 'static {
        async move {
            ensure!(
                held.release().await?,
                "release of a held lock returned false"
            );
            Ok(())
        }
    }
}

/// Ours: the cancellation scenario on the target's driver (every driver).
pub(crate) async fn ours_cancel(t: &Target, attempts: usize) -> Result<Cancel> {
    t.set_counting(false);
    let a = Ours(t.coordinator("cancel-a", false).await?);
    let b = Ours(t.coordinator("cancel-b", false).await?);
    let res = cancel(&a, &b, &t.name("ours"), attempts).await;
    a.0.stop().await?;
    b.0.stop().await?;
    res
}

#[cfg(feature = "redis")]
mod redis_peers {
    use super::*;

    /// Releases only the caller's own hold.
    const RELEASE: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then \
                           return redis.call('DEL', KEYS[1]) else return 0 end";
    /// How often a blocked hand-written acquire retries.
    const POLL: Duration = Duration::from_millis(10);

    async fn connection(t: &Target) -> Result<redis::aio::MultiplexedConnection> {
        let url = format!("redis://{}/", t.raw_addr()?);
        let client = redis::Client::open(url.as_str())?;
        Ok(client.get_multiplexed_async_connection().await?)
    }

    /// The hand-written lock: `SET key token NX PX ttl`, released by an owner-checked
    /// Lua `DEL`, polling every 10 ms while blocked.
    #[derive(Clone)]
    pub(super) struct SetNx {
        con: redis::aio::MultiplexedConnection,
        release: Arc<redis::Script>,
    }

    impl std::fmt::Debug for SetNx {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("SetNx")
        }
    }

    impl SetNx {
        pub(super) async fn connect(t: &Target) -> Result<Self> {
            Ok(Self {
                con: connection(t).await?,
                release: Arc::new(redis::Script::new(RELEASE)),
            })
        }
    }

    impl PeerLock for SetNx {
        type Held = (String, String);

        fn acquire(
            &self,
            key: String,
        ) -> impl Future<Output = Result<Self::Held>> + Send + 'static {
            let mut con = self.con.clone();
            async move {
                let token = uuid::Uuid::new_v4().simple().to_string();
                loop {
                    let set: Option<String> = redis::cmd("SET")
                        .arg(&key)
                        .arg(&token)
                        .arg("NX")
                        .arg("PX")
                        .arg(PEER_TTL.as_millis() as u64)
                        .query_async(&mut con)
                        .await?;
                    if set.is_some() {
                        return Ok((key, token));
                    }
                    tokio::time::sleep(POLL).await;
                }
            }
        }

        fn release(&self, held: Self::Held) -> impl Future<Output = Result<()>> + Send + 'static {
            let mut con = self.con.clone();
            let script = Arc::clone(&self.release);
            async move {
                let n: i64 = script
                    .key(&held.0)
                    .arg(&held.1)
                    .invoke_async(&mut con)
                    .await?;
                ensure!(n == 1, "the hand-written lock was not held at release");
                Ok(())
            }
        }
    }

    /// `rslock` (Redlock) over the one server, default retries.
    #[derive(Clone)]
    pub(super) struct Rslock(rslock::LockManager);

    impl std::fmt::Debug for Rslock {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("Rslock")
        }
    }

    impl Rslock {
        pub(super) async fn connect(t: &Target) -> Result<Self> {
            let url = format!("redis://{}/", t.raw_addr()?);
            let client = redis::Client::open(url.as_str())?;
            let m = rslock::LockManager::from_clients(vec![client]);
            // Connect now (the manager connects lazily).
            m.query_redis_for_key_value(b"tooz-bench-rslock-probe")
                .await
                .map_err(|e| anyhow::anyhow!("rslock cannot reach the server: {e}"))?;
            Ok(Self(m))
        }
    }

    impl PeerLock for Rslock {
        type Held = rslock::Lock;

        fn acquire(
            &self,
            key: String,
        ) -> impl Future<Output = Result<Self::Held>> + Send + 'static {
            let m = self.0.clone();
            async move {
                m.acquire_no_guard(key.as_bytes(), PEER_TTL)
                    .await
                    .map_err(|e| anyhow::anyhow!("rslock acquire: {e}"))
            }
        }

        fn release(&self, held: Self::Held) -> impl Future<Output = Result<()>> + Send + 'static {
            let m = self.0.clone();
            async move {
                m.unlock(&held).await;
                Ok(())
            }
        }
    }
}

#[cfg(feature = "etcd")]
mod etcd_peers {
    use std::sync::Mutex;

    use etcd_client::{Client, LeaderKey, LockOptions, ResignOptions};

    use super::*;

    /// Leases granted to peer clients, revoked at the end of the run.
    static LEASES: Mutex<Vec<(Client, i64)>> = Mutex::new(Vec::new());

    async fn client_with_lease(t: &Target) -> Result<(Client, i64)> {
        let endpoint = format!("http://{}", t.raw_addr()?);
        let mut client = Client::connect([endpoint.as_str()], None)
            .await
            .with_context(|| format!("etcd connection to {endpoint}"))?;
        let lease = client
            .lease_grant(PEER_TTL.as_secs() as i64, None)
            .await?
            .id();
        if let Ok(mut l) = LEASES.lock() {
            l.push((client.clone(), lease));
        }
        Ok((client, lease))
    }

    /// Revokes every lease handed out (their keys go with them).
    pub(super) async fn revoke_all() {
        let leases = LEASES
            .lock()
            .map(|mut l| std::mem::take(&mut *l))
            .unwrap_or_default();
        for (mut c, id) in leases {
            let _ = c.lease_revoke(id).await;
        }
    }

    /// etcd's Lock service (v3lock): a key under the client's lease, the call blocks
    /// server-side until the keys before it are gone.
    #[derive(Clone)]
    pub(super) struct EtcdLock {
        client: Client,
        lease: i64,
    }

    impl std::fmt::Debug for EtcdLock {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("EtcdLock")
                .field("lease", &self.lease)
                .finish()
        }
    }

    impl EtcdLock {
        pub(super) async fn connect(t: &Target) -> Result<Self> {
            let (client, lease) = client_with_lease(t).await?;
            Ok(Self { client, lease })
        }
    }

    impl PeerLock for EtcdLock {
        type Held = Vec<u8>;

        fn acquire(
            &self,
            key: String,
        ) -> impl Future<Output = Result<Self::Held>> + Send + 'static {
            let mut c = self.client.clone();
            let lease = self.lease;
            async move {
                let r = c
                    .lock(key, Some(LockOptions::new().with_lease(lease)))
                    .await?;
                Ok(r.key().to_vec())
            }
        }

        fn release(&self, held: Self::Held) -> impl Future<Output = Result<()>> + Send + 'static {
            let mut c = self.client.clone();
            async move {
                c.unlock(held).await?;
                Ok(())
            }
        }
    }

    /// etcd's Election service (v3election): campaign to take the lock, resign to
    /// release it.
    #[derive(Clone)]
    pub(super) struct EtcdElection {
        client: Client,
        lease: i64,
    }

    impl std::fmt::Debug for EtcdElection {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("EtcdElection")
                .field("lease", &self.lease)
                .finish()
        }
    }

    impl EtcdElection {
        pub(super) async fn connect(t: &Target) -> Result<Self> {
            let (client, lease) = client_with_lease(t).await?;
            Ok(Self { client, lease })
        }
    }

    impl PeerLock for EtcdElection {
        type Held = LeaderKey;

        fn acquire(
            &self,
            key: String,
        ) -> impl Future<Output = Result<Self::Held>> + Send + 'static {
            let mut c = self.client.clone();
            let lease = self.lease;
            async move {
                let r = c.campaign(key, "tooz-bench", lease).await?;
                r.leader()
                    .cloned()
                    .context("campaign returned no leader key")
            }
        }

        fn release(&self, held: Self::Held) -> impl Future<Output = Result<()>> + Send + 'static {
            let mut c = self.client.clone();
            async move {
                c.resign(Some(ResignOptions::new().with_leader(held)))
                    .await?;
                Ok(())
            }
        }
    }
}

#[cfg(feature = "zookeeper")]
mod zk_peer {
    use zookeeper_client::{Acls, Client, CreateMode, LockOptions, LockPrefix};

    use super::*;

    /// zookeeper-client's lock recipe (`Client::lock` with a Curator-style prefix):
    /// an ephemeral sequential node, a watch on the node before it. Released by deleting
    /// the node and waiting for the reply (dropping the recipe's guard deletes it in the
    /// background, which would make the release look free).
    #[derive(Clone, Debug)]
    pub(super) struct ZkLock {
        client: Client,
        root: String,
    }

    impl ZkLock {
        pub(super) async fn connect(t: &Target, prefix: &str) -> Result<Self> {
            let hosts = t.raw_addr()?;
            let client = Client::connect(&hosts)
                .await
                .with_context(|| format!("ZooKeeper connection to {hosts}"))?;
            Ok(Self {
                client,
                root: format!("/{prefix}"),
            })
        }
    }

    impl PeerLock for ZkLock {
        type Held = String;

        fn acquire(
            &self,
            key: String,
        ) -> impl Future<Output = Result<Self::Held>> + Send + 'static {
            let client = self.client.clone();
            let dir = format!("{}/{key}", self.root);
            async move {
                let prefix = LockPrefix::new_curator(&dir, "lock-")?;
                let options = LockOptions::new(Acls::anyone_all())
                    .with_ancestor_options(CreateMode::Persistent.with_acls(Acls::anyone_all()))?;
                let held = client.lock(prefix, b"", options).await?;
                let path = held.lock_path().to_owned();
                // Released below by an awaited delete instead of the guard's background one.
                std::mem::forget(held);
                Ok(path)
            }
        }

        fn release(&self, held: Self::Held) -> impl Future<Output = Result<()>> + Send + 'static {
            let client = self.client.clone();
            async move {
                client.delete(&held, None).await?;
                Ok(())
            }
        }
    }

    /// Removes the lock directories (best effort: a node left in a live session stays).
    pub(super) async fn cleanup(t: &Target, prefix: &str) {
        let Ok(hosts) = t.raw_addr() else { return };
        let Ok(client) = Client::connect(&hosts).await else {
            return;
        };
        let root = format!("/{prefix}");
        if let Ok(dirs) = client.list_children(&root).await {
            for d in dirs {
                let _ = client.delete(&format!("{root}/{d}"), None).await;
            }
        }
        let _ = client.delete(&root, None).await;
    }
}

#[cfg(test)]
mod tests {
    use std::{
        collections::HashSet,
        sync::{Arc, Mutex},
    };

    use super::*;

    /// An in-process lock whose grant takes a millisecond to "come back". `leaky`: a
    /// dropped acquire keeps a grant it already took (the bug the scenario looks for);
    /// otherwise a drop guard gives it back.
    #[derive(Clone, Debug, Default)]
    struct Fake {
        held: Arc<Mutex<HashSet<String>>>,
        leaky: bool,
    }

    struct GiveBack(Option<(Arc<Mutex<HashSet<String>>>, String)>);

    impl Drop for GiveBack {
        fn drop(&mut self) {
            if let Some((held, key)) = self.0.take() {
                held.lock().unwrap().remove(&key);
            }
        }
    }

    impl PeerLock for Fake {
        type Held = String;

        fn acquire(&self, key: String) -> impl Future<Output = Result<String>> + Send + 'static {
            let (held, leaky) = (Arc::clone(&self.held), self.leaky);
            async move {
                while !held.lock().unwrap().insert(key.clone()) {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                let mut guard = GiveBack((!leaky).then(|| (Arc::clone(&held), key.clone())));
                tokio::time::sleep(Duration::from_millis(1)).await;
                guard.0 = None;
                Ok(key)
            }
        }

        fn release(&self, held: String) -> impl Future<Output = Result<()>> + Send + 'static {
            let set = Arc::clone(&self.held);
            async move {
                ensure!(set.lock().unwrap().remove(&held), "not held");
                Ok(())
            }
        }
    }

    #[tokio::test]
    async fn cancel_counts_holds_left_behind() {
        let safe = Fake::default();
        let c = cancel(&safe, &safe.clone(), "safe", 8).await.unwrap();
        assert_eq!(c.attempts, 8);
        assert!(c.n >= 4, "the contended half is always dropped: {c:?}");
        assert_eq!(c.left_behind, 0, "{c:?}");

        let leaky = Fake {
            leaky: true,
            ..Fake::default()
        };
        let c = cancel(&leaky, &leaky.clone(), "leaky", 8).await.unwrap();
        // Attempt 0 is dropped right after its first poll, which took the lock.
        assert!(c.left_behind >= 1, "{c:?}");
        assert!(c.left_behind <= c.n, "{c:?}");
    }

    #[tokio::test]
    async fn drop_after_drops_or_completes() {
        let pending = drop_after(Duration::from_millis(5), std::future::pending::<()>()).await;
        assert_eq!(pending, None);
        assert_eq!(drop_after(Duration::ZERO, async { 7 }).await, Some(7));
    }
}
