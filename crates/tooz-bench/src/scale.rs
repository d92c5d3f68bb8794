//! Scale scenarios (issue 16, item 2): how cost grows with the number of held locks,
//! concurrent acquires, waiters, members and watched groups.
//!
//! Every scenario runs once, with the measured coordinators behind the counting proxy when
//! the backend has one (so latencies include one extra loopback hop per round trip, as do
//! the pipelined floors they are compared with); set-up coordinators connect directly.
//! Memory is the growth of this process's resident set (`VmRSS`) across the step that
//! creates the state, divided by the number of items: a coarse figure (the allocator keeps
//! freed pages, and page granularity blurs small deltas), good for telling bytes from
//! kilobytes per item.
//!
//! * `scale_heartbeat`: one coordinator joins `lock_groups` groups and holds `locks`
//!   locks, then `heartbeat()` is timed; requests per beat should not grow with the
//!   number held (the 100-lock figure is `heartbeat_100` in the main table).
//! * `scale_acquire`: `concurrent` acquires of distinct locks started at once from one
//!   coordinator, timed to the last one returning; compared with the same number of raw
//!   requests pipelined on one connection (Redis, etcd, ZooKeeper) or, where the driver's
//!   client has no pipelining, sent one after another on one connection.
//! * `scale_waiters`: `waiters` coordinators block on a lock one holder has; the lock is
//!   then handed down the queue; latency from a release returning to the next acquire
//!   returning, and requests per handoff over the whole chain (a herd shows as requests
//!   per handoff growing with the queue).
//! * `scale_get_members`, `scale_watch_members`: a group of `members` members; the
//!   latency of `get_members`, and of a join event reaching a watcher of that group.
//! * `scale_watch_groups`: one coordinator watches `watched_groups` groups; set-up time,
//!   connections opened, idle requests per second, and the latency of an event in one of
//!   them.

use std::{
    hint::black_box,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use futures_util::future::try_join_all;
use serde_json::{Map, Value, json};
use tokio::sync::{mpsc, oneshot};
use tooz_core::{Coordinator, Lock, Wait};

use crate::{Target, report::percentile, scenarios::wait_event};

/// Concurrent operations per step when building or tearing down state.
const CHUNK: usize = 200;
/// Coordinators started at once.
const COORD_CHUNK: usize = 50;
/// How long a waiter queue is left to settle before the first release (a blocked
/// `acquire` has no observable state to wait for; extra time only makes the queue more
/// complete).
const QUEUE_SETTLE: Duration = Duration::from_millis(500);
/// How long requests are counted while one coordinator watches many idle groups.
const IDLE_WINDOW: Duration = Duration::from_secs(1);
/// How long an expected event or handoff may take before the run fails.
const EVENT_TIMEOUT: Duration = Duration::from_secs(30);

/// The sizes of the scale scenarios.
#[derive(Debug, Clone)]
pub(crate) struct ScaleSizes {
    locks: usize,
    lock_groups: usize,
    beats: usize,
    concurrent: usize,
    rounds: usize,
    waiters: usize,
    members: usize,
    watched_groups: usize,
    samples: usize,
}

impl ScaleSizes {
    /// The sizes.
    pub(crate) fn full() -> Self {
        Self {
            locks: 10_000,
            lock_groups: 1_000,
            beats: 20,
            concurrent: 1_000,
            rounds: 5,
            waiters: 100,
            members: 10_000,
            watched_groups: 1_000,
            samples: 20,
        }
    }

    /// A smoke run (a few seconds per driver on a quiet machine).
    pub(crate) fn quick() -> Self {
        Self {
            locks: 1_000,
            lock_groups: 100,
            beats: 5,
            concurrent: 200,
            rounds: 3,
            waiters: 20,
            members: 1_000,
            watched_groups: 100,
            samples: 5,
        }
    }

    /// The sizes for `driver`, scaled down where its server (as run here) cannot hold
    /// them, with a note saying so for each cap.
    fn for_driver(mut self, driver: &str) -> (Self, Vec<String>) {
        let mut notes = Vec::new();
        let mut cap = |what: &str, size: &mut usize, max: usize, why: &str| {
            if *size > max {
                notes.push(format!(
                    "{driver}: {what} capped at {max} (asked {size}): {why}"
                ));
                *size = max;
            }
        };
        match driver {
            "zookeeper" | "etcd" | "file" | "ipc" => cap(
                "members",
                &mut self.members,
                2_000,
                "a member lives on its coordinator (session, lease, open lock file or \
                 semaphore undo), so each needs a live coordinator in this one process",
            ),
            "postgresql" | "mysql" => {
                cap(
                    "members",
                    &mut self.members,
                    2_000,
                    "each member joins through a coordinator of its own (a connection pool \
                     and a session), ten at a time so the server keeps connection slots: \
                     10,000 took about 3 minutes of set-up here",
                );
                cap(
                    "held locks",
                    &mut self.locks,
                    2_000,
                    "session advisory locks / GET_LOCK names share the server's lock \
                     table (PostgreSQL: max_locks_per_transaction × max_connections \
                     ≈ 12,800 slots here)",
                );
                cap(
                    "waiters",
                    &mut self.waiters,
                    40,
                    "each waiting coordinator uses three connections (pool, session, \
                     the wait's own) and the servers take 200 (PostgreSQL) and 151 \
                     (MariaDB)",
                );
            }
            "memcached" => cap(
                "members",
                &mut self.members,
                2_000,
                "a group is one key holding every member (Python tooz's layout), \
                 rewritten under compare-and-swap by each join: 10,000 joins took 648 s \
                 here, longer than the first members' liveness keys lived",
            ),
            "consul" => {
                cap(
                    "waiters",
                    &mut self.waiters,
                    40,
                    "the agent takes 200 HTTP connections per client address and each \
                 waiting coordinator keeps several (session renewals, a blocking query)",
                );
            }
            _ => {}
        }
        (self, notes)
    }
}

/// One scale scenario's figures.
#[derive(Debug, Clone)]
pub(crate) struct Row {
    name: &'static str,
    size: String,
    median_us: f64,
    p99_us: f64,
    ops_per_s: f64,
    requests_per_op: Option<f64>,
    /// RSS growth per item (bytes), and what an item is.
    rss_per_item: Option<(f64, &'static str)>,
    extra: Map<String, Value>,
}

impl Row {
    fn new(name: &'static str, size: String, samples: &[Duration], per_sample: usize) -> Self {
        let per = per_sample.max(1) as f64;
        let mut us: Vec<f64> = samples
            .iter()
            .map(|d| d.as_secs_f64() * 1e6 / per)
            .collect();
        us.sort_by(f64::total_cmp);
        let total: f64 = samples.iter().map(Duration::as_secs_f64).sum();
        Self {
            name,
            size,
            median_us: percentile(&us, 0.5),
            p99_us: percentile(&us, 0.99),
            ops_per_s: if total > 0.0 {
                samples.len() as f64 * per / total
            } else {
                0.0
            },
            requests_per_op: None,
            rss_per_item: None,
            extra: Map::new(),
        }
    }

    fn extra(&mut self, key: &str, v: impl Into<Value>) {
        self.extra.insert(key.to_owned(), v.into());
    }
}

/// The rows and notes of a scale run.
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    pub(crate) rows: Vec<Row>,
    pub(crate) notes: Vec<String>,
}

/// This process's resident set in bytes (`VmRSS` of /proc/self/status).
pub(crate) fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn rss_per(before: Option<u64>, after: Option<u64>, items: usize) -> Option<f64> {
    let (b, a) = before.zip(after)?;
    Some(a.saturating_sub(b) as f64 / items.max(1) as f64)
}

/// Requests counted since `before` (`None` when nothing is counted).
fn since(t: &Target, before: Option<u64>) -> Option<u64> {
    Some(t.round_trips()? - before?)
}

fn per(n: Option<u64>, ops: usize) -> Option<f64> {
    n.map(|n| n as f64 / ops.max(1) as f64)
}

/// Connections the proxy has accepted so far.
fn connections(t: &Target) -> Option<u64> {
    t.proxy.as_ref().map(crate::proxy::Proxy::connections)
}

/// Runs `f` over `0..n` with at most `chunk` at once, collecting the results in order.
async fn chunked<T, F, Fut>(n: usize, chunk: usize, f: F) -> Result<Vec<T>>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut out = Vec::with_capacity(n);
    let mut i = 0;
    while i < n {
        let end = (i + chunk).min(n);
        out.extend(try_join_all((i..end).map(&f)).await?);
        i = end;
    }
    Ok(out)
}

/// Runs every scale scenario against `t`.
pub(crate) async fn run(t: &Target, quick: bool) -> Result<Outcome> {
    let mut out = Outcome::default();
    if !t.has_driver() {
        out.notes.push(format!(
            "scale: the {} driver is not built into this tooz-bench: no scale scenarios",
            t.driver
        ));
        return Ok(out);
    }
    let base = if quick {
        ScaleSizes::quick()
    } else {
        ScaleSizes::full()
    };
    let (s, caps) = base.for_driver(t.driver);
    out.notes.extend(caps);
    t.set_counting(true);
    let result = run_scenarios(t, &s, &mut out).await;
    t.set_counting(false);
    result?;
    out.notes.push(
        "scale: one pass, measured coordinators (and the floors) through the counting proxy \
         where there is one, so latencies include one loopback hop per round trip; RSS/item \
         = growth of this process's VmRSS across the step that creates the items / items"
            .to_owned(),
    );
    Ok(out)
}

async fn run_scenarios(t: &Target, s: &ScaleSizes, out: &mut Outcome) -> Result<()> {
    macro_rules! step {
        ($name:literal, $body:expr) => {{
            let started = Instant::now();
            let row = $body
                .await
                .with_context(|| format!("scale scenario {}", $name))?;
            eprintln!(
                "tooz-bench: {}: {} ({}): median {:.1} µs, req/op {:?} [{:.1} s]",
                t.driver,
                $name,
                row.size,
                row.median_us,
                row.requests_per_op,
                started.elapsed().as_secs_f64()
            );
            out.rows.push(row);
        }};
    }
    step!("scale_heartbeat", heartbeat(t, s));
    step!("scale_acquire", concurrent_acquire(t, s));
    step!("scale_waiters", waiters(t, s));
    let (get, watch) = members(t, s).await.context("scale scenario members")?;
    eprintln!(
        "tooz-bench: {}: scale_get_members / scale_watch_members ({}): median {:.1} / {:.1} µs",
        t.driver, get.size, get.median_us, watch.median_us
    );
    out.rows.push(get);
    out.rows.push(watch);
    step!("scale_watch_groups", watch_groups(t, s));
    Ok(())
}

async fn heartbeat(t: &Target, s: &ScaleSizes) -> Result<Row> {
    let h = t.coordinator("sc-hb", true).await?;
    let groups: Vec<String> = (0..s.lock_groups)
        .map(|i| t.name(&format!("sc-hb-g{i:05}")))
        .collect();
    let rss0 = rss_bytes();
    chunked(groups.len(), CHUNK, |i| {
        let (h, g) = (&h, groups[i].as_str());
        async move { Ok(h.join_group_create(g, &()).await?) }
    })
    .await?;
    let rss1 = rss_bytes();
    let locks: Vec<Lock> = (0..s.locks)
        .map(|i| h.get_lock(t.name(&format!("sc-hb-l{i:05}")).as_str()))
        .collect::<Result<_, _>>()?;
    let setup = Instant::now();
    // A refused acquire of a lock nobody holds is a driver fault: counted and reported
    // (`uncontended_refused`), not fatal, so the rest of the figures still come out.
    let got = chunked(locks.len(), CHUNK, |i| {
        let l = &locks[i];
        async move { Ok(l.acquire(Wait::No).await?) }
    })
    .await?;
    let setup = setup.elapsed();
    let refused = got.iter().filter(|g| !**g).count();
    let rss2 = rss_bytes();
    h.heartbeat().await?;
    let before = t.round_trips();
    let mut samples = Vec::with_capacity(s.beats);
    for _ in 0..s.beats {
        let start = Instant::now();
        black_box(h.heartbeat().await?);
        samples.push(start.elapsed());
    }
    let reqs = since(t, before);
    let lost = locks.iter().filter(|l| !l.is_held()).count() - refused;
    chunked(locks.len(), CHUNK, |i| {
        let l = &locks[i];
        async move {
            if l.is_held() {
                l.release().await?;
            }
            Ok(())
        }
    })
    .await?;
    chunked(groups.len(), CHUNK, |i| {
        let (h, g) = (&h, groups[i].as_str());
        async move {
            h.leave_group(g).await?;
            let _ = h.delete_group(g).await;
            Ok(())
        }
    })
    .await?;
    h.stop().await?;
    ensure!(
        lost == 0,
        "{lost} held locks were lost during the heartbeats"
    );
    let mut row = Row::new(
        "scale_heartbeat",
        format!("{} locks, {} groups", s.locks, s.lock_groups),
        &samples,
        1,
    );
    row.requests_per_op = per(reqs, s.beats);
    row.rss_per_item = rss_per(rss1, rss2, s.locks).map(|b| (b, "held lock"));
    if refused > 0 {
        row.extra("uncontended_refused", refused as u64);
    }
    row.extra(
        "rss_per_joined_group_bytes",
        rss_per(rss0, rss1, s.lock_groups),
    );
    row.extra(
        "setup_acquire_ops_per_s",
        s.locks as f64 / setup.as_secs_f64().max(1e-9),
    );
    Ok(row)
}

async fn concurrent_acquire(t: &Target, s: &ScaleSizes) -> Result<Row> {
    let c = t.coordinator("sc-cc", true).await?;
    let locks: Vec<Lock> = (0..s.concurrent)
        .map(|i| c.get_lock(t.name(&format!("sc-cc-l{i:05}")).as_str()))
        .collect::<Result<_, _>>()?;
    let rss0 = rss_bytes();
    let mut samples = Vec::with_capacity(s.rounds);
    let mut reqs = Some(0);
    let mut rss1 = None;
    let mut refused = 0;
    for round in 0..s.rounds {
        let before = t.round_trips();
        let start = Instant::now();
        let got = try_join_all(locks.iter().map(|l| l.acquire(Wait::No))).await?;
        samples.push(start.elapsed());
        reqs = reqs.zip(since(t, before)).map(|(a, b)| a + b);
        refused += got.iter().filter(|g| !**g).count();
        if round == 0 {
            rss1 = rss_bytes();
        }
        try_join_all(
            locks
                .iter()
                .zip(&got)
                .filter(|(_, g)| **g)
                .map(|(l, _)| l.release()),
        )
        .await?;
    }
    c.stop().await?;
    let mut row = Row::new(
        "scale_acquire",
        format!("{} at once, one coordinator", s.concurrent),
        &samples,
        s.concurrent,
    );
    row.requests_per_op = per(reqs, s.concurrent * s.rounds);
    row.rss_per_item = rss_per(rss0, rss1, s.concurrent).map(|b| (b, "held lock"));
    if refused > 0 {
        row.extra("uncontended_refused", refused as u64);
    }
    match floor_batch(t, s.concurrent, s.rounds).await? {
        Some((floor, kind)) => {
            let floor_us = floor.as_secs_f64() * 1e6 / s.concurrent as f64;
            row.extra("floor_us_per_op", floor_us);
            row.extra("floor", kind);
            row.extra(
                "ratio_to_floor",
                (floor_us > 0.0).then(|| row.median_us / floor_us),
            );
        }
        None => row.extra("floor", "none (no network)"),
    }
    Ok(row)
}

/// The median time of `n` raw requests of the backend's own client on one connection,
/// pipelined where the client pipelines, over `rounds` rounds; and what that floor is.
async fn floor_batch(t: &Target, n: usize, rounds: usize) -> Result<Option<(Duration, String)>> {
    let mut times = Vec::with_capacity(rounds);
    let kind: String = match t.driver {
        "redis" => {
            let url = format!("redis://{}/", t.raw_addr()?);
            let client = redis::Client::open(url.as_str())?;
            let con = client.get_multiplexed_async_connection().await?;
            for _ in 0..rounds {
                let start = Instant::now();
                try_join_all((0..n).map(|_| {
                    let mut con = con.clone();
                    async move { redis::cmd("PING").query_async::<String>(&mut con).await }
                }))
                .await?;
                times.push(start.elapsed());
            }
            format!("{n} PINGs pipelined on one multiplexed connection")
        }
        #[cfg(feature = "etcd")]
        "etcd" => {
            let endpoint = format!("http://{}", t.raw_addr()?);
            let kv = etcd_client::Client::connect([endpoint.as_str()], None)
                .await?
                .kv_client();
            let key = format!("tooz-bench/{}", t.name("sc-floor"));
            kv.clone().put(key.as_str(), "x", None).await?;
            for _ in 0..rounds {
                let start = Instant::now();
                try_join_all((0..n).map(|_| {
                    let mut kv = kv.clone();
                    let key = key.as_str();
                    async move { kv.get(key, None).await }
                }))
                .await?;
                times.push(start.elapsed());
            }
            kv.clone().delete(key.as_str(), None).await?;
            format!("{n} range reads multiplexed on one HTTP/2 connection")
        }
        #[cfg(feature = "zookeeper")]
        "zookeeper" => {
            let zk = zookeeper_client::Client::connect(&t.raw_addr()?).await?;
            for _ in 0..rounds {
                let start = Instant::now();
                try_join_all((0..n).map(|_| zk.check_stat("/"))).await?;
                times.push(start.elapsed());
            }
            format!("{n} `exists` pipelined on one session")
        }
        #[cfg(feature = "memcached")]
        "memcached" => {
            for _ in 0..rounds {
                times.push(crate::scenarios::mc_get(t, n).await?.samples.iter().sum());
            }
            format!(
                "{n} `mg` one after another on one connection (async-memcached does not pipeline)"
            )
        }
        #[cfg(feature = "consul")]
        "consul" => {
            for _ in 0..rounds {
                times.push(
                    crate::scenarios::consul_kv(t, n, false)
                        .await?
                        .samples
                        .iter()
                        .sum(),
                );
            }
            format!("{n} KV GETs one after another on one HTTP/1.1 connection")
        }
        #[cfg(feature = "postgresql")]
        "postgresql" => {
            for _ in 0..rounds {
                times.push(
                    crate::scenarios::sql_floor::pg(t, n, false)
                        .await?
                        .samples
                        .iter()
                        .sum(),
                );
            }
            format!("{n} `SELECT 1` one after another on one connection (no pipelining in sqlx)")
        }
        #[cfg(feature = "mysql")]
        "mysql" => {
            for _ in 0..rounds {
                times.push(
                    crate::scenarios::sql_floor::mysql(t, n, false)
                        .await?
                        .samples
                        .iter()
                        .sum(),
                );
            }
            format!("{n} `SELECT 1` one after another on one connection (no pipelining in sqlx)")
        }
        _ => return Ok(None),
    };
    times.sort();
    Ok(times.get(times.len() / 2).map(|d| (*d, kind)))
}

/// What a waiter reports when its acquire returns: its index, the result, when, and the
/// channel on which it is told to release.
type Acquired = (usize, tooz_core::Result<bool>, Instant, oneshot::Sender<()>);

async fn waiters(t: &Target, s: &ScaleSizes) -> Result<Row> {
    let name = t.name("sc-waiters");
    let holder = t.coordinator("sc-w-holder", true).await?;
    let held = holder.get_lock(name.as_str())?;
    ensure!(
        held.acquire(Wait::No).await?,
        "the holder could not take the lock"
    );
    let coords: Vec<Coordinator> = chunked(s.waiters, COORD_CHUNK, |i| async move {
        t.coordinator(&format!("sc-w{i:03}"), true).await
    })
    .await?;
    let (tx, mut rx) = mpsc::unbounded_channel::<Acquired>();
    let mut tasks = Vec::with_capacity(s.waiters);
    for (i, c) in coords.iter().enumerate() {
        let lock = c.get_lock(name.as_str())?;
        let tx = tx.clone();
        tasks.push(Some(tokio::spawn(async move {
            let res = lock.acquire(Wait::Forever).await;
            let at = Instant::now();
            let (go, told) = oneshot::channel();
            let won = matches!(res, Ok(true));
            let _ = tx.send((i, res, at, go));
            if !won {
                return Ok(Instant::now());
            }
            let _ = told.await;
            let released = lock.release().await;
            let done = Instant::now();
            ensure!(
                released?,
                "waiter {i}: release of a held lock returned false"
            );
            Ok::<_, anyhow::Error>(done)
        })));
    }
    drop(tx);
    tokio::time::sleep(QUEUE_SETTLE).await;
    let early = tasks.iter().flatten().filter(|h| h.is_finished()).count();
    ensure!(
        early == 0,
        "{early} waiters returned while the lock was held"
    );

    let mut samples = Vec::with_capacity(s.waiters);
    let mut per_handoff = Vec::with_capacity(s.waiters);
    let before = t.round_trips();
    let mut mark = before;
    ensure!(held.release().await?, "the holder's release returned false");
    let mut released = Instant::now();
    for _ in 0..s.waiters {
        let (i, res, at, go) = tokio::time::timeout(EVENT_TIMEOUT, rx.recv())
            .await
            .context("no waiter got the lock after a release")?
            .context("every waiter ended")?;
        ensure!(res?, "waiter {i}'s blocking acquire gave up");
        samples.push(at.saturating_duration_since(released));
        let now = t.round_trips();
        per_handoff.push(now.zip(mark).map(|(a, b)| a - b));
        mark = now;
        let _ = go.send(());
        let task = tasks[i].take().context("a waiter acquired twice")?;
        released = task.await??;
    }
    let reqs = since(t, before);
    holder.stop().await?;
    for chunk in coords.chunks(COORD_CHUNK) {
        try_join_all(chunk.iter().map(Coordinator::stop)).await?;
    }
    let mut row = Row::new(
        "scale_waiters",
        format!("{} waiters on one lock", s.waiters),
        &samples,
        1,
    );
    row.requests_per_op = per(reqs, s.waiters);
    // Requests counted between consecutive acquires: the first handoffs have the whole
    // queue waiting, the last almost none, so a herd shows as a falling series.
    let k = 10.min(s.waiters / 2).max(1);
    let mean = |xs: &[Option<u64>]| {
        let v: Vec<u64> = xs.iter().flatten().copied().collect();
        (!v.is_empty()).then(|| v.iter().sum::<u64>() as f64 / v.len() as f64)
    };
    row.extra("requests_first_handoffs", mean(&per_handoff[..k]));
    row.extra(
        "requests_last_handoffs",
        mean(&per_handoff[per_handoff.len() - k..]),
    );
    let mut us: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e6).collect();
    let (first, last) = us.split_at_mut(k.min(samples.len()));
    first.sort_by(f64::total_cmp);
    row.extra("median_us_first_handoffs", percentile(first, 0.5));
    let tail = last.len().saturating_sub(k);
    let last = &mut last[tail..];
    last.sort_by(f64::total_cmp);
    row.extra("median_us_last_handoffs", percentile(last, 0.5));
    Ok(row)
}

async fn members(t: &Target, s: &ScaleSizes) -> Result<(Row, Row)> {
    let group = t.name("sc-members");
    let n = s.members;
    let reader = t.coordinator("sc-m-reader", true).await?;
    reader.create_group(group.as_str()).await?;
    // Members whose liveness outlasts their coordinator (a key or row with a TTL, a file)
    // are joined by coordinators that are then dropped ("parked"), so set-up holds few
    // connections at once; ZooKeeper, etcd, file and IPC members live on their
    // coordinators.
    let parked = matches!(
        t.driver,
        "redis" | "memcached" | "consul" | "postgresql" | "mysql"
    );
    let chunk = if matches!(t.driver, "postgresql" | "mysql") {
        COORD_CHUNK / 5
    } else {
        COORD_CHUNK
    };
    let started = Instant::now();
    let mut live = Vec::new();
    let mut i = 0;
    while i < n {
        let end = (i + chunk).min(n);
        let batch = try_join_all((i..end).map(|i| {
            let group = group.as_str();
            async move {
                let c = t.coordinator(&format!("sc-m{i:05}"), false).await?;
                c.join_group(group, &()).await?;
                Ok::<_, anyhow::Error>(c)
            }
        }))
        .await?;
        if !parked {
            live.extend(batch);
        }
        i = end;
    }
    let setup = started.elapsed();
    eprintln!(
        "tooz-bench: {}: {n} members joined in {:.1} s",
        t.driver,
        setup.as_secs_f64()
    );

    let result = async {
        let rss0 = rss_bytes();
        let first = reader.get_members(group.as_str()).await?;
        let rss1 = rss_bytes();
        ensure!(
            first.len() == n,
            "expected {n} members, got {}",
            first.len()
        );
        let before = t.round_trips();
        let mut samples = Vec::with_capacity(s.samples);
        for _ in 0..s.samples {
            let start = Instant::now();
            let got = black_box(reader.get_members(group.as_str()).await?);
            samples.push(start.elapsed());
            ensure!(got.len() == n, "member count changed: {}", got.len());
        }
        let reqs = since(t, before);
        drop(first);
        let mut get = Row::new("scale_get_members", format!("{n} members"), &samples, 1);
        get.requests_per_op = per(reqs, s.samples);
        get.rss_per_item = rss_per(rss0, rss1, n).map(|b| (b, "member"));
        get.extra(
            "setup_joins_per_s",
            n as f64 / setup.as_secs_f64().max(1e-9),
        );

        let rss0 = rss_bytes();
        let before = t.round_trips();
        let start = Instant::now();
        let mut events = reader.events(group.as_str()).await?;
        let watch_setup = start.elapsed();
        let setup_reqs = since(t, before);
        let rss1 = rss_bytes();
        let joiner = t.coordinator("sc-m-joiner", true).await?;
        let me = joiner.member_id().clone();
        let mut samples = Vec::with_capacity(s.samples);
        let mut reqs = Some(0);
        for _ in 0..s.samples {
            let before = t.round_trips();
            let start = Instant::now();
            joiner.join_group(group.as_str(), &()).await?;
            wait_event(&mut events, &me, true).await?;
            samples.push(start.elapsed());
            reqs = reqs.zip(since(t, before)).map(|(a, b)| a + b);
            joiner.leave_group(group.as_str()).await?;
            wait_event(&mut events, &me, false).await?;
        }
        drop(events);
        joiner.stop().await?;
        let mut watch = Row::new(
            "scale_watch_members",
            format!("{n} members, join → event"),
            &samples,
            1,
        );
        watch.requests_per_op = per(reqs, s.samples);
        watch.rss_per_item = rss_per(rss0, rss1, n).map(|b| (b, "member"));
        watch.extra("watch_setup_us", watch_setup.as_secs_f64() * 1e6);
        watch.extra("watch_setup_requests", setup_reqs);
        Ok((get, watch))
    }
    .await;
    if parked {
        chunked(n, chunk, |i| {
            let group = group.as_str();
            async move {
                let c = t.coordinator(&format!("sc-m{i:05}"), false).await?;
                c.leave_group(group).await?;
                c.stop().await?;
                Ok(())
            }
        })
        .await?;
    }
    for chunk in live.chunks(COORD_CHUNK) {
        try_join_all(chunk.iter().map(Coordinator::stop)).await?;
    }
    let _ = reader.delete_group(group.as_str()).await;
    reader.stop().await?;
    result
}

async fn watch_groups(t: &Target, s: &ScaleSizes) -> Result<Row> {
    let n = s.watched_groups;
    let groups: Vec<String> = (0..n).map(|i| t.name(&format!("sc-wg{i:05}"))).collect();
    let owner = t.coordinator("sc-wg-owner", false).await?;
    chunked(n, CHUNK, |i| {
        let (o, g) = (&owner, groups[i].as_str());
        async move { Ok(o.create_group(g).await?) }
    })
    .await?;
    let w = t.coordinator("sc-wg-watcher", true).await?;
    let rss0 = rss_bytes();
    let conns0 = connections(t);
    let before = t.round_trips();
    let start = Instant::now();
    // One at a time, so that where a driver runs out of something per watched group
    // (a connection, a listener) the row says after how many, instead of failing.
    let mut streams = Vec::with_capacity(n);
    let mut failed = None;
    for g in &groups {
        match w.events(g.as_str()).await {
            Ok(events) => streams.push(events),
            Err(e) => {
                failed = Some(format!("watch {} of {n} failed: {e}", streams.len() + 1));
                break;
            }
        }
    }
    let watched = streams.len();
    ensure!(watched > 0, "{}", failed.unwrap_or_default());
    let setup = start.elapsed();
    let setup_reqs = since(t, before);
    let conns = connections(t).zip(conns0).map(|(a, b)| a - b);
    let rss1 = rss_bytes();
    let before = t.round_trips();
    tokio::time::sleep(IDLE_WINDOW).await;
    let idle = since(t, before);

    let joiner = t.coordinator("sc-wg-joiner", true).await?;
    let me = joiner.member_id().clone();
    let mut samples = Vec::with_capacity(s.samples);
    let mut reqs = Some(0);
    for k in 0..s.samples {
        let gi = (k * 7919 + watched / 2) % watched;
        let g = groups[gi].as_str();
        let before = t.round_trips();
        let start = Instant::now();
        joiner.join_group(g, &()).await?;
        wait_event(&mut streams[gi], &me, true).await?;
        samples.push(start.elapsed());
        reqs = reqs.zip(since(t, before)).map(|(a, b)| a + b);
        joiner.leave_group(g).await?;
        wait_event(&mut streams[gi], &me, false).await?;
    }
    drop(streams);
    joiner.stop().await?;
    w.stop().await?;
    chunked(n, CHUNK, |i| {
        let (o, g) = (&owner, groups[i].as_str());
        async move {
            let _ = o.delete_group(g).await;
            Ok(())
        }
    })
    .await?;
    owner.stop().await?;
    let mut row = Row::new(
        "scale_watch_groups",
        format!("{watched} groups watched, join → event"),
        &samples,
        1,
    );
    if let Some(f) = failed {
        row.extra("watch_failure", f);
    }
    row.requests_per_op = per(reqs, s.samples);
    row.rss_per_item = rss_per(rss0, rss1, watched).map(|b| (b, "watched group"));
    row.extra("watch_setup_us", setup.as_secs_f64() * 1e6);
    row.extra("watch_setup_requests", setup_reqs);
    row.extra("watch_setup_connections", conns);
    row.extra(
        "idle_requests_per_s",
        idle.map(|r| r as f64 / IDLE_WINDOW.as_secs_f64()),
    );
    Ok(row)
}

fn cell(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.digits$}"))
}

/// The scaling table printed after the main one.
pub(crate) fn table(driver: &str, out: &Outcome) -> String {
    let mut s = format!("tooz-bench: driver {driver}: scale\n");
    s.push_str(&format!(
        "{:<20} | {:<34} | {:>11} | {:>11} | {:>10} | {:>8} | {:>10}\n",
        "scenario", "size", "median µs", "p99 µs", "ops/s", "req/op", "RSS B/item"
    ));
    s.push_str(&format!(
        "{}\n",
        "-".repeat(20 + 34 + 11 * 2 + 10 * 2 + 8 + 18)
    ));
    for r in &out.rows {
        s.push_str(&format!(
            "{:<20} | {:<34} | {:>11.1} | {:>11.1} | {:>10.0} | {:>8} | {:>10}\n",
            r.name,
            r.size,
            r.median_us,
            r.p99_us,
            r.ops_per_s,
            cell(r.requests_per_op, 2),
            cell(r.rss_per_item.map(|(b, _)| b), 0),
        ));
        let extra: Vec<String> = r
            .extra
            .iter()
            .map(|(k, v)| match v {
                Value::Number(n) => format!("{k}={:.2}", n.as_f64().unwrap_or(0.0)),
                Value::String(s) => format!("{k}: {s}"),
                other => format!("{k}={other}"),
            })
            .collect();
        if !extra.is_empty() {
            s.push_str(&format!("    {}\n", extra.join("; ")));
        }
    }
    for n in &out.notes {
        s.push_str(&format!("note: {n}\n"));
    }
    s
}

/// The `"scale"` object of the JSON file.
pub(crate) fn json(out: &Outcome) -> Value {
    let mut scenarios = Map::new();
    for r in &out.rows {
        let mut v = json!({
            "size": r.size,
            "median_us": r.median_us,
            "p99_us": r.p99_us,
            "ops_per_s": r.ops_per_s,
            "requests_per_op": r.requests_per_op,
            "rss_bytes_per_item": r.rss_per_item.map(|(b, _)| b),
            "rss_item": r.rss_per_item.map(|(_, w)| w),
        });
        for (k, x) in &r.extra {
            v[k.as_str()] = x.clone();
        }
        scenarios.insert(r.name.to_owned(), v);
    }
    json!({ "scenarios": scenarios, "notes": out.notes })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_are_noted() {
        let (s, notes) = ScaleSizes::full().for_driver("postgresql");
        assert_eq!((s.members, s.locks, s.waiters), (2_000, 2_000, 40));
        assert_eq!(notes.len(), 3, "{notes:?}");
        assert!(notes[0].contains("capped at 2000"), "{notes:?}");
        let (s, notes) = ScaleSizes::full().for_driver("redis");
        assert_eq!((s.locks, s.members), (10_000, 10_000));
        assert!(notes.is_empty());
        // Quick sizes are below every cap: nothing to note.
        let (_, notes) = ScaleSizes::quick().for_driver("zookeeper");
        assert!(notes.is_empty(), "{notes:?}");
    }

    #[test]
    fn rows_and_json() {
        let mut r = Row::new(
            "scale_acquire",
            "4 at once".into(),
            &[Duration::from_micros(400), Duration::from_micros(800)],
            4,
        );
        r.requests_per_op = Some(1.0);
        r.extra("floor", "x");
        assert!((r.ops_per_s - 6666.67).abs() < 0.1, "{}", r.ops_per_s);
        let out = Outcome {
            rows: vec![r],
            notes: vec!["n".into()],
        };
        let v = json(&out);
        assert_eq!(v["scenarios"]["scale_acquire"]["floor"], "x");
        assert_eq!(v["scenarios"]["scale_acquire"]["requests_per_op"], 1.0);
        let table = table("redis", &out);
        assert!(
            table.contains("scale_acquire") && table.contains("note: n"),
            "{table}"
        );
    }

    #[test]
    fn rss_is_read() {
        assert!(rss_bytes().is_some_and(|b| b > 0));
    }
}
