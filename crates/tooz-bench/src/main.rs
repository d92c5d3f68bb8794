//! `tooz-bench`: the benchmark harness behind `cargo xtask bench` (DESIGN.md §8).
//!
//! ```text
//! tooz-bench --driver file|ipc|redis|zookeeper|etcd|memcached|consul|postgresql|mysql [--json-out PATH] [--quick] [--url URL] [--compare-peers]
//! ```
//!
//! Runs the floors and the scenarios against one driver, prints a table and writes
//! `{"driver": ..., "scenarios": {"<name>": {"median_us", "p99_us", "ops_per_s",
//! "requests_per_op", "ratio_to_floor"[, "ratio_to_write_floor"]}}}`.
//!
//! * `file`: the data directory is `$TOOZ_BENCH_DIR/<run>` (default: the system temp
//!   directory), removed afterwards. There is no network, so requests per operation are
//!   `null`.
//! * `redis`: the server is `--url`, else `$TOOZ_TEST_REDIS_URL`. Each scenario runs twice:
//!   a timing pass with every connection straight to the server (median, p99, ops/s), then
//!   a counting pass with a tenth of the iterations in which the measured coordinators talk
//!   through an in-process counting proxy (see [`proxy`]) — requests per operation come
//!   from that pass, so the proxy's extra hop never shows in the latencies. Set-up
//!   coordinators (the 1,000 members, the partitioner's other members) always connect
//!   directly.
//!
//! * `zookeeper`: the server is `--url`, else `$TOOZ_TEST_ZOOKEEPER_URL`; the same two
//!   passes, but the proxy counts ZooKeeper *requests* (frames, without the handshake and
//!   pings), since the driver pipelines some of them. Floors: `floor_rtt` is one `exists`,
//!   `floor_write` one create + delete of an ephemeral znode (the raw client, two round
//!   trips).
//!
//! * `etcd`: the server is `--url`, else `$TOOZ_TEST_ETCD_URL`; the same two passes, the
//!   proxy counting gRPC request messages (a unary call or one message on a stream, such
//!   as a lease keep-alive). Floors: `floor_rtt` is one range read of a key, `floor_write`
//!   one put (which waits for etcd's fsync).
//!
//! * `memcached`: the server is `--url`, else `$TOOZ_TEST_MEMCACHED_URL`, with
//!   `membership_timeout=300` (no heartbeat task); the same two
//!   passes. req/op are client round trips (as for Redis); the proxy also counts memcached
//!   command lines (`commands_per_op` in the JSON, a line under the table). Floor:
//!   `floor_rtt` is one `mg` of a key (async-memcached, an independent client).
//!
//! * `ipc`: the state directory is `$TOOZ_BENCH_DIR/<run>` (default: the system temp
//!   directory), removed afterwards; locks and the group list are host-wide SysV
//!   objects (names are unique per run). No network: req/op is `null`. Floor:
//!   `floor_rtt` is one raw SysV semaphore P + V pair (`semop` with `SEM_UNDO`).
//!
//! * `consul`: the agent is `--url`, else `$TOOZ_TEST_CONSUL_URL`, with `ttl=120` (the
//!   measured coordinators run without a heartbeat task); the same two passes, req/op
//!   are HTTP round trips. Floors: `floor_rtt` is one KV GET of a key, `floor_write`
//!   one KV PUT (Raft-committed), both on reqwest (the driver's client).
//!
//! * `postgresql`, `mysql`: the server is `--url`, else `$TOOZ_TEST_POSTGRESQL_URL` /
//!   `$TOOZ_TEST_MYSQL_URL`, with `timeout=300` added (bench coordinators run no
//!   heartbeat task); the same two passes, req/op are client round trips. Floors (sqlx,
//!   the driver's client library, one dedicated connection): `floor_rtt` is one
//!   `SELECT 1`, `floor_write` one one-row `UPDATE` (autocommit, so it waits for the
//!   commit).
//!
//! Every ratio is a median over the `floor_rtt` median; `ratio_to_write_floor` (file
//! driver) is the median over the `floor_write` median.
//!
//! Every driver also runs the cancellation scenario (see [`peers::cancel`]): scenario
//! `cancel` in the JSON is `{"attempts", "n", "left_behind", "check_grace_ms"}` (`n`
//! acquires dropped mid-flight, `left_behind` of them left a hold another client could
//! not take). With `--compare-peers`, the lock crates a Rust user would pick instead
//! (see [`peers`]) run `lock_pair`, `lock_handoff` and `cancel` on the same server, under
//! `"peers": {"<peer>": {"wake_up", "lock_pair", "lock_handoff", "cancel"}}`.
//! After the main scenarios come the scale scenarios ([`scale`]: 10,000 held locks,
//! 1,000 concurrent acquires, 100 waiters, 10,000 members, 1,000 watched groups; smaller
//! with `--quick`, capped per driver with a note), written under `"scale"` in the JSON;
//! `--no-scale` skips them, `--scale-only` runs only them. `--soak` runs the soak
//! ([`soak`]) instead of the benchmark.

mod peers;
mod proxy;
mod report;
mod scale;
mod scenarios;
mod soak;

use std::{
    path::PathBuf,
    process::ExitCode,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
};

use anyhow::{Context, Result, bail};
use tooz_core::{Coordinator, Registry, Url};

use crate::proxy::{Counting, Proxy};

const USAGE: &str = "usage: tooz-bench --driver file|ipc|redis|zookeeper|etcd|memcached|consul|postgresql|mysql [--json-out PATH] [--quick] [--url URL] [--compare-peers] [--no-scale|--scale-only] [--soak [--seconds N] [--coordinators N]]";

#[derive(Debug)]
struct Args {
    driver: String,
    json_out: Option<PathBuf>,
    quick: bool,
    url: Option<String>,
    compare_peers: bool,
    /// Which of the main scenarios and the scale scenarios ([`scale`]) run.
    scale: ScaleMode,
    /// `--soak`: run the soak ([`soak`]) instead of the benchmark.
    soak: Option<soak::SoakArgs>,
}

/// Whether the scale scenarios run (after the main ones, instead of them, or not at all).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ScaleMode {
    Also,
    Only,
    Skip,
}

fn parse_args() -> Result<Option<Args>> {
    let mut driver = None;
    let mut json_out = None;
    let mut quick = false;
    let mut url = None;
    let mut compare_peers = false;
    let mut scale = ScaleMode::Also;
    let mut soak = false;
    let mut seconds = 60;
    let mut coordinators = 200;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .with_context(|| format!("`{name}` needs a value; {USAGE}"))
        };
        match arg.as_str() {
            "-h" | "--help" => return Ok(None),
            "--driver" => driver = Some(value("--driver")?),
            "--json-out" => json_out = Some(PathBuf::from(value("--json-out")?)),
            "--url" => url = Some(value("--url")?),
            "--quick" => quick = true,
            "--compare-peers" => compare_peers = true,
            "--no-scale" => scale = ScaleMode::Skip,
            "--scale-only" => scale = ScaleMode::Only,
            "--soak" => soak = true,
            "--seconds" => {
                let v = value("--seconds")?;
                seconds =
                    v.parse().ok().filter(|s| *s > 0).with_context(|| {
                        format!("`--seconds` takes a positive number, not `{v}`")
                    })?;
            }
            "--coordinators" => {
                let v = value("--coordinators")?;
                coordinators = v.parse().ok().filter(|n| *n > 0).with_context(|| {
                    format!("`--coordinators` takes a positive number, not `{v}`")
                })?;
            }
            other => bail!("unexpected argument `{other}`; {USAGE}"),
        }
    }
    let Some(driver) = driver else {
        bail!("`--driver` is required; {USAGE}");
    };
    Ok(Some(Args {
        driver,
        json_out,
        quick,
        url,
        compare_peers,
        scale,
        soak: soak.then_some(soak::SoakArgs {
            seconds,
            coordinators,
        }),
    }))
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(Some(args)) => args,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(err) => {
            eprintln!("tooz-bench: {err:#}");
            return ExitCode::from(2);
        }
    };
    if let Some(soak) = args.soak {
        let result = match Target::new(&args).await {
            Ok(target) => {
                let r = soak::run(&target, soak, args.json_out.as_deref()).await;
                target.cleanup();
                r
            }
            Err(err) => Err(err),
        };
        return match result {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(err) => {
                eprintln!("tooz-bench: soak error: {err:#}");
                ExitCode::FAILURE
            }
        };
    }
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("tooz-bench: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<()> {
    let target = Target::new(&args).await?;
    let sizes = if args.quick {
        scenarios::Sizes::quick()
    } else {
        scenarios::Sizes::full()
    };
    let outcome = if args.scale == ScaleMode::Only {
        Ok((Vec::new(), Vec::new()))
    } else {
        scenarios::run_all(&target, &sizes).await
    };
    let peer_sizes = peers::Sizes::new(args.quick);
    let (cancel, peer_results) = match &outcome {
        Ok(_) if target.has_driver() && args.scale != ScaleMode::Only => {
            let cancel = peers::ours_cancel(&target, peer_sizes.cancel).await;
            let peer_results = if args.compare_peers {
                peers::run(&target, peer_sizes).await
            } else {
                Vec::new()
            };
            (Some(cancel), peer_results)
        }
        _ => (None, Vec::new()),
    };
    let scaled = match (&outcome, args.scale) {
        (Ok(_), ScaleMode::Also | ScaleMode::Only) => Some(scale::run(&target, args.quick).await),
        _ => None,
    };
    target.cleanup();
    let (mut figures, notes) = outcome?;
    let cancel = cancel.transpose()?;
    let scaled = scaled.transpose()?;
    report::add_ratios(&mut figures);
    if args.scale != ScaleMode::Only {
        print!("{}", report::table(target.driver, &figures, &notes));
    }
    if let Some(c) = &cancel {
        println!(
            "cancel: {} of {} acquires dropped mid-flight left a hold behind ({} completed first)",
            c.left_behind,
            c.n,
            c.attempts - c.n
        );
    }
    for p in &peer_results {
        println!("{}", p.line());
    }
    if let Some(s) = &scaled {
        print!("{}", scale::table(target.driver, s));
    }
    if let Some(path) = &args.json_out {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let mut doc = report::json(target.driver, &figures, &notes);
        if args.scale == ScaleMode::Only {
            // Keep the main scenarios of an earlier run; replace only its scale figures.
            if let Some(old) = std::fs::read_to_string(path)
                .ok()
                .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
                .filter(|v| v["driver"] == target.driver)
            {
                doc = old;
            }
        }
        if let Some(c) = &cancel {
            doc["scenarios"]["cancel"] = c.json();
        }
        if args.compare_peers {
            let floor = figures
                .iter()
                .find(|f| f.name == "floor_rtt")
                .map(|f| f.median_us);
            let peers: serde_json::Map<String, serde_json::Value> = peer_results
                .iter()
                .map(|p| (p.name.to_owned(), p.json(floor)))
                .collect();
            doc["peers"] = serde_json::Value::Object(peers);
        }
        if let Some(s) = &scaled {
            doc["scale"] = scale::json(s);
        }
        std::fs::write(path, serde_json::to_string_pretty(&doc)? + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// A networked driver: where its test server's URL comes from and what its proxy counts.
#[derive(Debug)]
struct Server {
    driver: &'static str,
    /// The environment variable `cargo xtask backends up` writes the URL to.
    env: &'static str,
    /// The port when the URL has none.
    port: u16,
    counting: Counting,
    /// A `namespace` option added to the URL when it has none.
    namespace: Option<&'static str>,
    /// Other options added to the URL when it lacks them.
    options: &'static [(&'static str, &'static str)],
}

const SERVERS: &[Server] = &[
    Server {
        driver: "redis",
        env: "TOOZ_TEST_REDIS_URL",
        port: 6379,
        counting: Counting::RoundTrips,
        namespace: None,
        options: &[],
    },
    Server {
        driver: "zookeeper",
        env: "TOOZ_TEST_ZOOKEEPER_URL",
        port: 2181,
        counting: Counting::ZookeeperRequests,
        namespace: Some("tooz-bench"),
        options: &[],
    },
    Server {
        driver: "etcd",
        env: "TOOZ_TEST_ETCD_URL",
        port: 2379,
        counting: Counting::GrpcMessages,
        namespace: None,
        options: &[],
    },
    Server {
        driver: "memcached",
        env: "TOOZ_TEST_MEMCACHED_URL",
        port: 11211,
        counting: Counting::MemcachedRoundTrips,
        namespace: None,
        // Coordinators run without a heartbeat task: the scale scenario's parked
        // members must stay alive through a set-up that can outlast the default 30 s
        // on a loaded machine (their liveness keys expired and were pruned).
        options: &[("membership_timeout", "300")],
    },
    Server {
        driver: "consul",
        env: "TOOZ_TEST_CONSUL_URL",
        port: 8500,
        counting: Counting::RoundTrips,
        namespace: Some("tooz-bench"),
        // Coordinators run without a heartbeat task: sessions must outlive the run's
        // set-up and measurements without renewals.
        options: &[("ttl", "120")],
    },
    Server {
        driver: "postgresql",
        env: "TOOZ_TEST_POSTGRESQL_URL",
        port: 5432,
        counting: Counting::RoundTrips,
        namespace: None,
        options: &[("timeout", "300")],
    },
    Server {
        driver: "mysql",
        env: "TOOZ_TEST_MYSQL_URL",
        port: 3306,
        counting: Counting::RoundTrips,
        namespace: None,
        options: &[("timeout", "300")],
    },
];

/// The backend under test and how to reach it.
#[derive(Debug)]
pub(crate) struct Target {
    pub(crate) driver: &'static str,
    registry: Registry,
    /// URL for set-up coordinators (straight to the server).
    direct_url: String,
    /// URL for measured coordinators (through the proxy when there is one).
    measured_url: String,
    /// `host:port` of the server, for networked drivers.
    server_addr: Option<String>,
    proxy: Option<Proxy>,
    /// Whether measured coordinators go through the proxy (the counting pass) or straight
    /// to the server (the timing pass).
    counting: AtomicBool,
    /// memcached command lines counted by [`Window`](crate::scenarios)s closed since the
    /// last [`Target::take_commands`].
    commands_seen: AtomicU64,
    /// Unique per run: prefixes every member, group and lock name.
    run: String,
    /// The file driver's data directory (removed by [`Target::cleanup`]).
    scratch: Option<PathBuf>,
}

impl Target {
    async fn new(args: &Args) -> Result<Self> {
        let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
        let registry = Registry::new().with(tooz_file::DRIVER);
        #[cfg(feature = "redis")]
        let registry = registry.with(tooz_redis::DRIVER);
        #[cfg(feature = "zookeeper")]
        let registry = registry.with(tooz_zookeeper::DRIVER);
        #[cfg(feature = "etcd")]
        let registry = registry.with(tooz_etcd::DRIVER);
        #[cfg(feature = "memcached")]
        let registry = registry.with(tooz_memcached::DRIVER);
        #[cfg(feature = "ipc")]
        let registry = registry.with(tooz_ipc::DRIVER);
        #[cfg(feature = "consul")]
        let registry = registry.with(tooz_consul::DRIVER);
        #[cfg(feature = "postgresql")]
        let registry = registry.with(tooz_sql::POSTGRESQL);
        #[cfg(feature = "mysql")]
        let registry = registry.with(tooz_sql::MYSQL);
        match args.driver.as_str() {
            "ipc" => {
                let base = match &args.url {
                    Some(url) => PathBuf::from(url.strip_prefix("ipc://").unwrap_or(url)),
                    None => std::env::var_os("TOOZ_BENCH_DIR")
                        .map_or_else(std::env::temp_dir, PathBuf::from),
                };
                let dir = std::path::absolute(base.join(format!("tooz-bench-ipc-{run}")))?;
                let url = format!("ipc://{}", dir.display());
                Ok(Self {
                    driver: "ipc",
                    registry,
                    direct_url: url.clone(),
                    measured_url: url,
                    server_addr: None,
                    proxy: None,
                    counting: AtomicBool::new(false),
                    commands_seen: AtomicU64::new(0),
                    run,
                    scratch: Some(dir),
                })
            }
            "file" => {
                let base = match &args.url {
                    Some(url) => PathBuf::from(url.strip_prefix("file://").unwrap_or(url)),
                    None => std::env::var_os("TOOZ_BENCH_DIR")
                        .map_or_else(std::env::temp_dir, PathBuf::from),
                };
                let dir = std::path::absolute(base.join(format!("tooz-bench-{run}")))?;
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
                let url = Url::from_directory_path(&dir)
                    .map_err(|()| anyhow::anyhow!("not a directory path: {}", dir.display()))?
                    .to_string();
                Ok(Self {
                    driver: "file",
                    registry,
                    direct_url: url.clone(),
                    measured_url: url,
                    server_addr: None,
                    proxy: None,
                    counting: AtomicBool::new(false),
                    commands_seen: AtomicU64::new(0),
                    run,
                    scratch: Some(dir),
                })
            }
            name => {
                let Some(server) = SERVERS.iter().find(|s| s.driver == name) else {
                    bail!(
                        "unknown driver `{name}` (tooz-bench knows file, ipc, redis, zookeeper, etcd, memcached, consul, postgresql and mysql)"
                    )
                };
                Self::behind_proxy(server, args, registry, run).await
            }
        }
    }

    /// A target for a networked driver: the server from `--url` or the environment,
    /// and a counting proxy in front of it.
    async fn behind_proxy(
        server: &Server,
        args: &Args,
        registry: Registry,
        run: String,
    ) -> Result<Self> {
        let url = match &args.url {
            Some(url) => url.clone(),
            None => std::env::var(server.env).with_context(|| {
                format!(
                    "no {} server: pass --url or set {} (`cargo xtask backends up --only {}` \
                     writes it)",
                    server.driver, server.env, server.driver
                )
            })?,
        };
        let mut direct = Url::parse(&url).with_context(|| format!("bad URL {url}"))?;
        if let Some(ns) = server.namespace
            && !direct.query_pairs().any(|(k, _)| k == "namespace")
        {
            direct.query_pairs_mut().append_pair("namespace", ns);
        }
        for (k, v) in server.options {
            if !direct.query_pairs().any(|(key, _)| key == *k) {
                direct.query_pairs_mut().append_pair(k, v);
            }
        }
        let addr = format!(
            "{}:{}",
            direct.host_str().unwrap_or("127.0.0.1"),
            direct.port().unwrap_or(server.port)
        );
        let proxy = Proxy::start(addr.clone(), server.counting).await?;
        let mut measured = direct.clone();
        measured
            .set_host(Some("127.0.0.1"))
            .context("cannot rewrite the URL's host")?;
        measured
            .set_port(Some(proxy.addr().port()))
            .map_err(|()| anyhow::anyhow!("cannot rewrite the URL's port"))?;
        Ok(Self {
            driver: server.driver,
            registry,
            direct_url: direct.to_string(),
            measured_url: measured.to_string(),
            server_addr: Some(addr),
            proxy: Some(proxy),
            counting: AtomicBool::new(false),
            commands_seen: AtomicU64::new(0),
            run,
            scratch: None,
        })
    }

    /// Whether the driver can run here (the Redis driver is behind a cargo feature).
    pub(crate) fn has_driver(&self) -> bool {
        self.registry
            .schemes()
            .iter()
            .any(|s| self.direct_url.starts_with(&format!("{s}:")))
    }

    /// Whether this backend has round trips to count (a proxy).
    pub(crate) fn can_count(&self) -> bool {
        self.proxy.is_some()
    }

    /// Switches between the timing pass (direct connections) and the counting pass
    /// (measured coordinators through the proxy, which adds a hop to every round trip).
    pub(crate) fn set_counting(&self, counting: bool) {
        self.counting
            .store(counting && self.can_count(), Ordering::SeqCst);
    }

    fn counting(&self) -> bool {
        self.counting.load(Ordering::SeqCst)
    }

    /// A started coordinator (no heartbeat task, so background traffic stays out of the
    /// counts); in the counting pass `measured` ones go through the proxy.
    pub(crate) async fn coordinator(&self, who: &str, measured: bool) -> Result<Coordinator> {
        let url = if measured && self.counting() {
            &self.measured_url
        } else {
            &self.direct_url
        };
        let coord = self
            .registry
            .connect(url, self.name(who))
            .with_context(|| format!("cannot connect coordinator {who}"))?;
        coord
            .start(false)
            .await
            .with_context(|| format!("cannot start coordinator {who}"))?;
        Ok(coord)
    }

    /// A member, group or lock name unique to this run and pass.
    pub(crate) fn name(&self, what: &str) -> String {
        let pass = if self.counting() { "c" } else { "t" };
        format!("bench-{}{pass}-{what}", self.run)
    }

    /// `host:port` for a raw client of the backend (floors): the proxy in the counting
    /// pass, else the server.
    pub(crate) fn raw_addr(&self) -> Result<String> {
        if self.counting()
            && let Some(p) = &self.proxy
        {
            return Ok(p.addr().to_string());
        }
        self.server_addr
            .clone()
            .context("this driver has no server to reach")
    }

    /// Round trips counted so far (`None` outside the counting pass).
    pub(crate) fn round_trips(&self) -> Option<u64> {
        self.proxy
            .as_ref()
            .filter(|_| self.counting())
            .map(Proxy::round_trips)
    }

    /// memcached command lines counted so far (`None` outside the counting pass and for
    /// the other backends).
    pub(crate) fn commands(&self) -> Option<u64> {
        self.proxy
            .as_ref()
            .filter(|p| self.counting() && p.counting() == Counting::MemcachedRoundTrips)
            .map(Proxy::commands)
    }

    /// Adds command lines a closed window saw.
    pub(crate) fn saw_commands(&self, n: u64) {
        self.commands_seen.fetch_add(n, Ordering::SeqCst);
    }

    /// The command lines windows saw since the last call (and resets the tally).
    pub(crate) fn take_commands(&self) -> u64 {
        self.commands_seen.swap(0, Ordering::SeqCst)
    }

    /// The server URL with the proxy in the counting pass (for raw clients of the
    /// floors that take a URL).
    #[cfg_attr(not(any(feature = "postgresql", feature = "mysql")), allow(dead_code))]
    pub(crate) fn raw_url(&self) -> String {
        if self.counting() {
            self.measured_url.clone()
        } else {
            self.direct_url.clone()
        }
    }

    /// The file driver's data directory.
    pub(crate) fn scratch(&self) -> Option<&std::path::Path> {
        self.scratch.as_deref()
    }

    fn cleanup(&self) {
        if let Some(dir) = &self.scratch {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
