//! The soak run (issue 17, item 4): `tooz-bench --driver NAME --soak [--seconds N]
//! [--coordinators N]`, driven by `cargo xtask soak`.
//!
//! Hundreds of coordinators in this one process, each with its heartbeat task, join one
//! of [`GROUPS`] groups and then, once a [`CYCLE`] each (their starts spread over the
//! first cycle, after one priming acquire all at once), run one round of: an explicit `heartbeat()`, a lock acquire (a lock
//! shared with three other coordinators, waiting at most [`LOCK_WAIT`]) and release, a
//! capability update, a `get_members`, and every [`REJOIN_EVERY`]th round a leave and
//! rejoin. One coordinator in [`WATCH_EVERY`] also drains an event stream of a group.
//!
//! Reported: per operation kind the count, errors, median, p99 and maximum latency (a
//! fixed-size histogram, so the bookkeeping does not grow the process); and the resident
//! set (`VmRSS`), tokio's alive tasks (`num_alive_tasks`) and open file descriptors
//! (`/proc/self/fd`) before set-up, after set-up, after warm-up, at the end, and after
//! every coordinator stopped. The run fails on any operation error, on a watcher's stream
//! ending, or when a resource grew between warm-up and end beyond [`Tolerance`].
//! An acquire that runs out of its wait is counted (`lock_timeouts`), not an error.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use futures_util::future::try_join_all;
use serde_json::{Value, json};
use tooz_core::Wait;

use crate::Target;

/// Groups the coordinators spread over.
const GROUPS: usize = 10;
/// How often each coordinator runs one round of operations.
const CYCLE: Duration = Duration::from_secs(1);
/// The longest an acquire waits for a lock shared with other coordinators.
const LOCK_WAIT: Duration = Duration::from_secs(2);
/// Every how many rounds a coordinator leaves and rejoins its group.
const REJOIN_EVERY: u64 = 5;
/// One coordinator in this many also watches a group.
const WATCH_EVERY: usize = 10;
/// Coordinators started at once.
const START_CHUNK: usize = 20;
/// How often RSS, tasks and fds are sampled during the run.
const SAMPLE_EVERY: Duration = Duration::from_millis(250);
/// The window over which the least of each resource is taken (after warm-up, at the end).
const WINDOW: Duration = Duration::from_secs(1);
/// Error messages kept per operation kind.
const KEEP_ERRORS: usize = 3;

/// The operation kinds measured.
const KINDS: [&str; 6] = [
    "heartbeat",
    "acquire",
    "release",
    "update_capabilities",
    "get_members",
    "leave_rejoin",
];

/// What may grow between the warm-up sample and the end sample.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tolerance {
    /// RSS: this fraction of the warm-up figure, plus `rss_slack` bytes.
    rss_fraction: f64,
    rss_slack: u64,
    /// Tasks and file descriptors: this many, or this fraction of the warm-up figure
    /// when that is larger.
    count_slack: u64,
    count_fraction: f64,
}

const TOLERANCE: Tolerance = Tolerance {
    rss_fraction: 0.25,
    rss_slack: 16 << 20,
    count_slack: 16,
    count_fraction: 0.10,
};

impl Tolerance {
    fn rss_limit(&self, warm: u64) -> u64 {
        warm + (warm as f64 * self.rss_fraction) as u64 + self.rss_slack
    }

    fn count_limit(&self, warm: u64) -> u64 {
        warm + self
            .count_slack
            .max((warm as f64 * self.count_fraction) as u64)
    }

    fn describe(&self) -> String {
        format!(
            "RSS may grow by {:.0}% + {} MiB, tasks and fds by max({}, {:.0}%) between \
             warm-up and end (each the least over one second of samples)",
            self.rss_fraction * 100.0,
            self.rss_slack >> 20,
            self.count_slack,
            self.count_fraction * 100.0
        )
    }
}

/// The soak's options.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SoakArgs {
    pub(crate) seconds: u64,
    pub(crate) coordinators: usize,
}

/// A fixed-size latency histogram: exact below 64 µs, then 32 buckets per power of two
/// (about 3% resolution) up to ~2^37 µs.
struct Histogram {
    buckets: Vec<u64>,
    count: u64,
    max_us: u64,
}

const SUB: u64 = 32;

impl Histogram {
    fn new() -> Self {
        Self {
            buckets: vec![0; 64 + 32 * SUB as usize],
            count: 0,
            max_us: 0,
        }
    }

    fn index(us: u64) -> usize {
        if us < 64 {
            return us as usize;
        }
        let exp = 63 - u64::from(us.leading_zeros()); // ≥ 6
        let sub = (us >> (exp - 5)) & (SUB - 1);
        (64 + (exp - 6) * SUB + sub).min(64 + 32 * SUB - 1) as usize
    }

    /// The lowest value of a bucket.
    fn value(index: usize) -> u64 {
        let i = index as u64;
        if i < 64 {
            return i;
        }
        let exp = (i - 64) / SUB + 6;
        let sub = (i - 64) % SUB;
        (1 << exp) + (sub << (exp - 5))
    }

    fn record(&mut self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.buckets[Self::index(us)] += 1;
        self.count += 1;
        self.max_us = self.max_us.max(us);
    }

    fn quantile(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let rank = ((q * self.count as f64).ceil() as u64).clamp(1, self.count);
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Self::value(i).min(self.max_us);
            }
        }
        self.max_us
    }
}

/// Latencies and errors per operation kind, shared by every coordinator's task.
struct Stats {
    hist: Vec<Histogram>,
    errors: Vec<u64>,
    messages: Vec<Vec<String>>,
}

impl Stats {
    fn new() -> Self {
        Self {
            hist: KINDS.iter().map(|_| Histogram::new()).collect(),
            errors: vec![0; KINDS.len()],
            messages: vec![Vec::new(); KINDS.len()],
        }
    }
}

struct Shared {
    stats: Mutex<Stats>,
    lock_timeouts: AtomicU64,
    events: AtomicU64,
    stream_ends: AtomicU64,
}

impl Shared {
    /// Times `f` as an operation of kind `k`; an error is counted and kept, not returned.
    async fn time<T>(
        &self,
        k: usize,
        f: impl std::future::Future<Output = tooz_core::Result<T>>,
    ) -> Option<T> {
        let start = Instant::now();
        let res = f.await;
        let took = start.elapsed();
        let mut s = self
            .stats
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        s.hist[k].record(took);
        match res {
            Ok(v) => Some(v),
            Err(e) => {
                s.errors[k] += 1;
                if s.messages[k].len() < KEEP_ERRORS {
                    s.messages[k].push(format!("{e}"));
                }
                None
            }
        }
    }
}

/// RSS, tokio tasks and open file descriptors at one moment.
#[derive(Debug, Clone, Copy)]
struct Resources {
    rss: u64,
    tasks: u64,
    fds: u64,
}

/// The least of each resource over `samples` (`None` when there are none).
fn least(samples: impl Iterator<Item = Resources>) -> Option<Resources> {
    samples.reduce(|a, b| Resources {
        rss: a.rss.min(b.rss),
        tasks: a.tasks.min(b.tasks),
        fds: a.fds.min(b.fds),
    })
}

fn resources() -> Resources {
    let fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64);
    Resources {
        rss: crate::scale::rss_bytes().unwrap_or(0),
        tasks: tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks() as u64,
        fds,
    }
}

/// Coordinators the driver's test server can take, with the reason when `asked` is more.
fn cap(driver: &str, asked: usize) -> (usize, Option<String>) {
    let (max, why) = match driver {
        "postgresql" | "mysql" => (
            40,
            "each coordinator keeps two or more connections (pool, session, a lock wait's \
             own) and the servers take 200 (PostgreSQL) and 151 (MariaDB)",
        ),
        "consul" => (
            50,
            "the agent takes 200 HTTP connections per client address and each coordinator \
             keeps several (session renewals, blocking queries)",
        ),
        "ipc" | "file" => (
            50,
            "every group write (capability update, join, leave) takes one lock file \
             (ipc: host-wide; file: per group), so writers queue behind each other: 200 \
             coordinators writing every second overload it (p99 of seconds, 10 s \
             state-lock timeouts) on this machine",
        ),
        _ => return (asked, None),
    };
    if asked > max {
        (
            max,
            Some(format!(
                "{driver}: coordinators capped at {max} (asked {asked}): {why}"
            )),
        )
    } else {
        (asked, None)
    }
}

/// Runs the soak; `Ok(false)` when it ran but failed its checks (the report says why).
pub(crate) async fn run(
    t: &Target,
    args: SoakArgs,
    json_out: Option<&std::path::Path>,
) -> Result<bool> {
    if !t.has_driver() {
        bail!("the {} driver is not built into this tooz-bench", t.driver);
    }
    let (n, capped) = cap(t.driver, args.coordinators);
    if let Some(note) = &capped {
        println!("soak: note: {note}");
    }
    let duration = Duration::from_secs(args.seconds.max(1));
    let warm = (duration / 4)
        .max(CYCLE * 3)
        .min(duration.saturating_sub(WINDOW * 2));
    let start_res = resources();
    let groups: Vec<String> = (0..GROUPS).map(|g| t.name(&format!("soak-g{g}"))).collect();
    let shared = Arc::new(Shared {
        stats: Mutex::new(Stats::new()),
        lock_timeouts: AtomicU64::new(0),
        events: AtomicU64::new(0),
        stream_ends: AtomicU64::new(0),
    });

    let setup = Instant::now();
    let mut coords = Vec::with_capacity(n);
    let mut i = 0;
    while i < n {
        let end = (i + START_CHUNK).min(n);
        let batch = try_join_all((i..end).map(|i| {
            let group = groups[i % GROUPS].as_str();
            async move {
                let c = t
                    .registry
                    .connect(&t.direct_url, t.name(&format!("soak-c{i:04}")))
                    .with_context(|| format!("cannot connect coordinator {i}"))?;
                c.start(true)
                    .await
                    .with_context(|| format!("cannot start coordinator {i}"))?;
                c.join_group_create(group, &0u64)
                    .await
                    .with_context(|| format!("coordinator {i} cannot join {group}"))?;
                Ok::<_, anyhow::Error>(Arc::new(c))
            }
        }))
        .await?;
        coords.extend(batch);
        i = end;
    }
    let setup = setup.elapsed();
    let after_setup = resources();
    println!(
        "soak: {}: {n} coordinators started and joined in {:.1} s; running {} s (warm-up {} s)",
        t.driver,
        setup.as_secs_f64(),
        duration.as_secs(),
        warm.as_secs()
    );

    let began = tokio::time::Instant::now();
    let deadline = began + duration;
    let locks = (n / 4).max(1);
    let mut tasks = Vec::with_capacity(n);
    for (i, c) in coords.iter().enumerate() {
        let c = Arc::clone(c);
        let shared = Arc::clone(&shared);
        let group = groups[i % GROUPS].clone();
        let watched = groups[(i / WATCH_EVERY) % GROUPS].clone();
        let lock = c.get_lock(t.name(&format!("soak-l{}", i % locks)).as_str())?;
        let offset = CYCLE.mul_f64(i as f64 / n as f64);
        tasks.push(tokio::spawn(async move {
            let watcher = if i.is_multiple_of(WATCH_EVERY) {
                match c.events(watched.as_str()).await {
                    Ok(mut events) => {
                        let shared = Arc::clone(&shared);
                        Some(tokio::spawn(async move {
                            while events.next_event().await.is_some() {
                                shared.events.fetch_add(1, Ordering::Relaxed);
                            }
                            shared.stream_ends.fetch_add(1, Ordering::Relaxed);
                        }))
                    }
                    Err(e) => {
                        let mut s = shared
                            .stats
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner);
                        s.errors[4] += 1;
                        s.messages[4].push(format!("events({watched}): {e}"));
                        None
                    }
                }
            } else {
                None
            };
            // A priming acquire, every coordinator at once: three of each lock's four
            // users must wait, so what a driver creates lazily for a wait (a
            // subscription, a connection) exists before the warm-up sample.
            if shared.time(1, lock.acquire(Wait::For(LOCK_WAIT))).await == Some(false) {
                shared.lock_timeouts.fetch_add(1, Ordering::Relaxed);
            } else if lock.is_held() {
                shared.time(2, lock.release()).await;
            }
            let mut next = began + offset;
            let mut round = 0u64;
            while next < deadline {
                tokio::time::sleep_until(next).await;
                next += CYCLE;
                round += 1;
                // Each step starts only before the deadline, so an overloaded backend
                // (rounds of seconds) does not stretch the run by whole rounds.
                let open = || tokio::time::Instant::now() < deadline;
                shared.time(0, c.heartbeat()).await;
                if !open() {
                    break;
                }
                if shared.time(1, lock.acquire(Wait::For(LOCK_WAIT))).await == Some(false) {
                    shared.lock_timeouts.fetch_add(1, Ordering::Relaxed);
                } else if lock.is_held() {
                    shared.time(2, lock.release()).await;
                }
                if !open() {
                    break;
                }
                shared
                    .time(3, c.update_capabilities(group.as_str(), &round))
                    .await;
                if !open() {
                    break;
                }
                shared.time(4, c.get_members(group.as_str())).await;
                if open() && round.is_multiple_of(REJOIN_EVERY) {
                    shared
                        .time(5, async {
                            c.leave_group(group.as_str()).await?;
                            c.join_group(group.as_str(), &round).await
                        })
                        .await;
                }
            }
            if let Some(w) = watcher {
                w.abort();
            }
        }));
    }

    // Samples every SAMPLE_EVERY; the warm-up and end figures are the least of each
    // resource over one second (after warm-up, and before the deadline), so what is only
    // in flight at one instant (a wait's connection, a request's socket) does not count
    // as growth.
    let mut series: Vec<(Duration, Resources)> = Vec::new();
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    let mut warm_stats = None;
    loop {
        let at = tick.tick().await;
        if at >= deadline {
            break;
        }
        series.push((at - began, resources()));
        if warm_stats.is_none() && at >= began + warm {
            warm_stats = Some(snapshot_counts(&shared));
        }
    }
    let warm_stats = warm_stats.unwrap_or(0);
    let window = |from: Duration| {
        least(
            series
                .iter()
                .filter(|(at, _)| *at >= from && *at < from + WINDOW)
                .map(|(_, r)| *r),
        )
    };
    let warm_res = window(warm).unwrap_or_else(resources);
    let end_res = window(duration.saturating_sub(WINDOW)).unwrap_or_else(resources);
    for task in tasks {
        task.await.context("a soak task panicked")?;
    }
    let ran = began.elapsed();
    let mut stop_errors = Vec::new();
    for chunk in coords.chunks(START_CHUNK) {
        for (c, res) in chunk
            .iter()
            .zip(futures_util::future::join_all(chunk.iter().map(|c| c.stop())).await)
        {
            if let Err(e) = res {
                stop_errors.push(format!("{}: {e}", c.member_id()));
            }
        }
    }
    drop(coords);
    // Leave nothing behind: the IPC driver's group list is host-wide and fixed in size
    // (Python tooz's 1 KiB segment), so groups left by every soak would fill it.
    let cleaner = t.coordinator("soak-cleaner", false).await?;
    for g in &groups {
        match cleaner.delete_group(g.as_str()).await {
            Ok(()) | Err(tooz_core::ToozError::GroupNotCreated(_)) => {}
            Err(e) => stop_errors.push(format!("delete group {g}: {e}")),
        }
    }
    cleaner
        .stop()
        .await
        .context("stopping the soak's cleaner")?;
    // Reported, not checked: closed connections and aborted tasks may still be winding
    // down.
    let stopped_res = resources();

    let stats = shared
        .stats
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut failures = Vec::new();
    let total_errors: u64 = stats.errors.iter().sum();
    if total_errors > 0 {
        failures.push(format!("{total_errors} operation errors"));
    }
    if !stop_errors.is_empty() {
        failures.push(format!(
            "{} coordinators failed to stop (first: {})",
            stop_errors.len(),
            stop_errors[0]
        ));
    }
    let ends = shared.stream_ends.load(Ordering::Relaxed);
    if ends > 0 {
        failures.push(format!("{ends} event streams ended while watching"));
    }
    let tol = TOLERANCE;
    if end_res.rss > tol.rss_limit(warm_res.rss) {
        failures.push(format!(
            "RSS grew from {} to {} MiB after warm-up",
            warm_res.rss >> 20,
            end_res.rss >> 20
        ));
    }
    if end_res.tasks > tol.count_limit(warm_res.tasks) {
        failures.push(format!(
            "tasks grew from {} to {} after warm-up",
            warm_res.tasks, end_res.tasks
        ));
    }
    if end_res.fds > tol.count_limit(warm_res.fds) {
        failures.push(format!(
            "file descriptors grew from {} to {} after warm-up",
            warm_res.fds, end_res.fds
        ));
    }

    let mut out = format!(
        "soak: driver {}: {n} coordinators, {:.0} s ({} groups, {} locks, {} watchers)\n",
        t.driver,
        ran.as_secs_f64(),
        GROUPS,
        locks,
        n.div_ceil(WATCH_EVERY)
    );
    out.push_str(&format!(
        "{:<20} | {:>8} | {:>6} | {:>10} | {:>10} | {:>10}\n{}\n",
        "operation",
        "count",
        "errors",
        "median µs",
        "p99 µs",
        "max µs",
        "-".repeat(20 + 8 + 6 + 30 + 15)
    ));
    let mut ops = serde_json::Map::new();
    for (k, name) in KINDS.iter().enumerate() {
        let h = &stats.hist[k];
        out.push_str(&format!(
            "{name:<20} | {:>8} | {:>6} | {:>10} | {:>10} | {:>10}\n",
            h.count,
            stats.errors[k],
            h.quantile(0.5),
            h.quantile(0.99),
            h.max_us
        ));
        ops.insert(
            (*name).to_owned(),
            json!({"count": h.count, "errors": stats.errors[k], "median_us": h.quantile(0.5),
                   "p99_us": h.quantile(0.99), "max_us": h.max_us, "first_errors": stats.messages[k]}),
        );
    }
    let lock_timeouts = shared.lock_timeouts.load(Ordering::Relaxed);
    out.push_str(&format!(
        "lock acquires that ran out of their {} s wait: {lock_timeouts}; events seen by watchers: {}; \
         operations after warm-up: {}\n",
        LOCK_WAIT.as_secs(),
        shared.events.load(Ordering::Relaxed),
        stats.hist.iter().map(|h| h.count).sum::<u64>() - warm_stats
    ));
    out.push_str(&format!(
        "{:<12} | {:>9} | {:>7} | {:>6}\n",
        "sample", "RSS MiB", "tasks", "fds"
    ));
    let samples = [
        ("start", start_res),
        ("after setup", after_setup),
        ("warm-up", warm_res),
        ("end", end_res),
        ("stopped", stopped_res),
    ];
    for (name, r) in samples {
        out.push_str(&format!(
            "{name:<12} | {:>9.1} | {:>7} | {:>6}\n",
            r.rss as f64 / f64::from(1 << 20),
            r.tasks,
            r.fds
        ));
    }
    out.push_str(&format!("tolerance: {}\n", tol.describe()));
    for (k, name) in KINDS.iter().enumerate() {
        for m in &stats.messages[k] {
            out.push_str(&format!("error: {name}: {m}\n"));
        }
    }
    let ok = failures.is_empty();
    if ok {
        out.push_str(&format!("soak {}: PASS\n", t.driver));
    } else {
        out.push_str(&format!(
            "soak {}: FAIL: {}\n",
            t.driver,
            failures.join("; ")
        ));
    }
    print!("{out}");

    if let Some(path) = json_out {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let res = |r: Resources| json!({"rss_bytes": r.rss, "tasks": r.tasks, "fds": r.fds});
        let doc: Value = json!({
            "driver": t.driver,
            "coordinators": n,
            "coordinators_note": capped,
            "seconds": ran.as_secs_f64(),
            "operations": ops,
            "lock_timeouts": lock_timeouts,
            "events_seen": shared.events.load(Ordering::Relaxed),
            "resources": samples.iter().map(|(k, r)| ((*k).to_owned(), res(*r))).collect::<serde_json::Map<_, _>>(),
            "tolerance": tol.describe(),
            "pass": ok,
            "failures": failures,
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc)? + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(ok)
}

fn snapshot_counts(shared: &Shared) -> u64 {
    let s = shared
        .stats
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    s.hist.iter().map(|h| h.count).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles_are_close() {
        let mut h = Histogram::new();
        for us in 1..=10_000u64 {
            h.record(Duration::from_micros(us));
        }
        let p50 = h.quantile(0.5) as f64;
        let p99 = h.quantile(0.99) as f64;
        assert!((p50 - 5000.0).abs() / 5000.0 < 0.04, "{p50}");
        assert!((p99 - 9900.0).abs() / 9900.0 < 0.04, "{p99}");
        assert_eq!(h.max_us, 10_000);
        assert_eq!(Histogram::new().quantile(0.99), 0);
        // Every bucket's lowest value maps back to that bucket.
        for i in 0..(64 + 32 * SUB as usize - 1) {
            assert_eq!(Histogram::index(Histogram::value(i)), i);
        }
        // Huge values land in the last bucket instead of out of range.
        h.record(Duration::from_secs(u64::MAX / 2));
    }

    #[test]
    fn tolerance_limits() {
        let t = TOLERANCE;
        assert_eq!(t.count_limit(100), 116);
        assert_eq!(t.count_limit(1000), 1100);
        assert_eq!(t.rss_limit(64 << 20), (80 << 20) + (16 << 20));
        assert!(t.describe().contains("25%"));
    }

    #[test]
    fn least_takes_each_minimum() {
        let r = |rss, tasks, fds| Resources { rss, tasks, fds };
        let l = least([r(5, 1, 9), r(3, 4, 8), r(7, 2, 10)].into_iter()).unwrap();
        assert_eq!((l.rss, l.tasks, l.fds), (3, 1, 8));
        assert!(least(std::iter::empty()).is_none());
    }

    #[test]
    fn caps() {
        assert_eq!(cap("redis", 200), (200, None));
        let (n, note) = cap("postgresql", 200);
        assert_eq!(n, 40);
        assert!(note.is_some_and(|n| n.contains("capped at 40")));
        assert_eq!(cap("mysql", 10), (10, None));
    }
}
