//! Every subcommand and option of `cargo xtask`, parsed in this one place.
//!
//! The parser is deliberately small: a subcommand word followed by long options. Anything it
//! does not know is an error that names the offending word and points at `--help`.

use anyhow::{Result, bail};

use crate::drivers::DriverSelection;

/// The text `cargo xtask --help` prints.
pub(crate) const HELP: &str = "\
cargo xtask: developer tasks for tooz for Rust

Usage: cargo xtask <COMMAND> [OPTIONS]

Commands:
  conformance [--driver NAME|all]
        Run a driver's conformance suite (`cargo test -p <crate> --test conformance`)
        and stream its table. `all` (the default) runs every driver crate present in
        the workspace. Exits non-zero if any case failed.
  interop [--driver NAME|all] [--keep] [--python PYTHON]
        Run the Python tooz interop scenarios: Python tooz 9.1.0 (in a virtualenv under
        target/interop-venv, created once and reused) and the `tooz` CLI share one
        backend and must see each other's groups, members, capabilities, locks and
        partition owners. Prints PASS/FAIL per scenario and `N passed, N failed`.
          --keep           keep the scratch directory of the run (printed at the end)
          --python PYTHON  interpreter that creates the virtualenv (default: $TOOZ_INTEROP_PYTHON,
                           else python3)
  backends up|down|status [--only NAME...]
        Install (Debian packages) and start on 127.0.0.1, stop, or list the servers the
        drivers test against: redis, memcached, mariadb, postgresql, etcd (3.5), zookeeper,
        consul. `up` is idempotent and writes the URLs to target/backends/env
        (TOOZ_TEST_<DRIVER>_URL=...), which the tests and the other commands read; `down`
        stops only what `up` started. Run `backends down` before `cargo clean`.
          --cluster       also the clusters on loopback: 3-node etcd (etcd-1..3), 3-node
                          ZooKeeper (zookeeper-1..3), Redis primary + replica (redis-1/2)
                          with three Sentinels (sentinel-1..3, master `tooz`); URLs in the
                          env file as TOOZ_CLUSTER_{ETCD,ZOOKEEPER,REDIS}_URL. `up --cluster`
                          leaves a single server whose ports another process holds alone;
                          `down|status --cluster` without --only: the clusters only
          --cluster-only  the clusters and no single server
  backends node kill NAME | start NAME [--wipe] | leader etcd|zookeeper|redis | list
        One node of the clusters or a single server: SIGKILL it; start it again with its
        data (or empty with --wipe where that is safe) and wait until it answers; print
        the cluster's current leader (exit 1 if none); list `NAME PID PORT STATE`.
  bench [--driver NAME|all] [--compare-python] [--compare-peers] [--quick]
        [--no-scale|--scale-only]
        Run the benchmark harness (crates/tooz-bench, release build) per driver: floors
        (one raw round trip / write of the same client library) and the scenarios
        lock_pair, lock_handoff, join_leave, get_members_1000, heartbeat_100,
        watch_latency, partition_lookup, with median, p99, ops/s, requests per operation
        and the ratio to the floor. Prints a table per driver and writes
        target/bench/<driver>.json. `all` (the default) runs every benchmarked driver present.
          --compare-python  also run the scenarios through Python tooz 9.1.0 (the interop
                            virtualenv) against the same server, print both side by side
                            and write target/bench/<driver>-python.json
          --compare-peers   also run lock_pair, lock_handoff and the cancellation scenario
                            with the lock crates a Rust user would pick instead (redis:
                            rslock, a hand-written SET NX lock; etcd: etcd-client's Lock
                            and Election services; zookeeper: zookeeper-client's lock
                            recipe) on the same server, print them against ours and add
                            them to target/bench/<driver>.json under `peers`. Every run
                            has the scenario `cancel` (acquires dropped mid-flight, holds
                            left behind) for our lock.
          --quick           a tenth of the iterations (a smoke run); smaller scale sizes
          --no-scale        skip the scale scenarios (held locks, concurrent acquires,
                            waiters, 10,000 members, 1,000 watched groups; see
                            crates/tooz-bench/src/scale.rs), which run by default and go
                            under `scale` in the JSON, with a table across drivers at the end
          --scale-only      run only the scale scenarios (the JSON keeps the main figures
                            of an earlier run)
  soak [--driver NAME|all] [--seconds N] [--coordinators N] [--release]
        A bounded load run per driver (tooz-bench --soak): N coordinators (default 200;
        fewer where the server takes fewer connections, said in the output) in one
        process join groups, heartbeat, watch, lock and update capabilities for N
        seconds (default 60). Prints per-operation counts, errors, median/p99/max
        latencies, and RSS, tokio tasks and open fds at start, warm-up, end and after
        stop; fails on any error or on growth after warm-up past the printed tolerance.
        Writes target/soak/<driver>.json.
          --release         build tooz-bench in release mode (default: debug, as CI)
  chaos [--driver NAME|all] [--cluster] [--seconds N] [--seed S] [--clients K]
        [--client-faults-only]
        Fault run (crates/tooz-chaos): K client processes (default 4) lock and write to a
        fenced register, update capabilities, rejoin and campaign for leadership for N
        seconds (default 20) while a seeded nemesis pauses clients (SIGSTOP), cuts them
        off through a fault proxy, kills lock holders, and kills -9 / restarts the server
        (`backends node`; Redis and memcached also restarted empty). A checker then
        verifies the history: no stale fenced write accepted, one leader per token, a
        dead holder's lock free within its TTL bound, every acknowledged capability
        visible, no client hung; and reports how long two clients believed they held one
        lock at once, per fault kind. Prints a table per driver and
        `N ops, N faults, N violations`; exits non-zero on violations (history kept in
        target/chaos/<driver>/). URLs come from TOOZ_TEST_<DRIVER>_URL (environment, else
        the backends' env file).
          --cluster              the cluster variants (etcd, zookeeper, redis Sentinel:
                                 `backends up --cluster`); the leader / primary is killed
          --seed S               the nemesis's and workload's seed (default: the clock;
                                 printed, to repeat a run)
          --client-faults-only   no server kill (for servers shared with other runs)
  ci
        What .ci/run runs, in order, stopping at the first failure:
        cargo fmt --all --check; cargo clippy --workspace --all-targets -- -D warnings;
        cargo doc of the library crates with -D warnings; cargo check of every
        publishable crate with no default features and with each feature alone;
        cargo check --workspace --all-targets with the rust-version toolchain (MSRV,
        installed with rustup when missing);
        backends up (only the servers the present drivers need);
        cargo test --workspace (conformance included); soak --driver all --seconds 8
        (debug build); cluster (backends up --cluster-only, the etcd, ZooKeeper and Redis conformance
        suites against the cluster URLs, a lock that survives the SIGKILL of the etcd or
        ZooKeeper member its client is on, kill each cluster's leader and see another one
        elected); chaos --driver all --seconds 12, then chaos --cluster for etcd,
        ZooKeeper and Redis Sentinel; cargo test --workspace --doc;
        the tooz crate's examples (worker_pool on Redis, scheduler on etcd,
        observability on memory://, fenced_job on Redis
        and PostgreSQL); interop --driver all; cargo package --workspace (with its verification
        build). Tests run with TOOZ_REQUIRE_BACKENDS=1.
  readme
        Regenerate the README's driver feature table from each driver's published
        Features (`cargo test -p tooz --test readme_table` with TOOZ_BLESS_README=1; the
        same test fails in `ci` when the table is stale).
  help
        Print this help.

Options:
  -h, --help   Print this help (also accepted after a command)
";

/// A parsed command line.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Command {
    /// Print [`HELP`].
    Help,
    /// `conformance`.
    Conformance(Conformance),
    /// `interop`.
    Interop(Interop),
    /// `backends ...` (arguments parsed by the backends module).
    Backends(Vec<String>),
    /// `bench`.
    Bench(Bench),
    /// `chaos`.
    Chaos(Chaos),
    /// `soak`.
    Soak(Soak),
    /// `ci`.
    Ci,
    /// `readme`.
    Readme,
}

/// Options of `cargo xtask conformance`.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Conformance {
    /// Which drivers to run.
    pub(crate) driver: DriverSelection,
}

/// Options of `cargo xtask interop`.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Interop {
    /// Which drivers to run.
    pub(crate) driver: DriverSelection,
    /// Keep the scratch directory instead of removing it after a run.
    pub(crate) keep: bool,
    /// Interpreter that creates the virtualenv, when given on the command line.
    pub(crate) python: Option<String>,
}

/// Options of `cargo xtask bench`.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Bench {
    /// Which drivers to benchmark.
    pub(crate) driver: DriverSelection,
    /// Also run the scenarios through Python tooz and compare.
    pub(crate) compare_python: bool,
    /// Also run the lock scenarios with the peer lock crates and compare.
    pub(crate) compare_peers: bool,
    /// A tenth of the iterations.
    pub(crate) quick: bool,
    /// `--no-scale` / `--scale-only`: which of the main and the scale scenarios run.
    pub(crate) scale: ScaleRun,
}

/// Which scenarios `bench` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ScaleRun {
    /// The main scenarios, then the scale ones.
    Both,
    /// Only the main scenarios.
    Skip,
    /// Only the scale scenarios.
    Only,
}

/// Options of `cargo xtask soak`.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Soak {
    /// Which drivers to soak.
    pub(crate) driver: DriverSelection,
    /// How long each driver runs.
    pub(crate) seconds: u64,
    /// Coordinators in the process.
    pub(crate) coordinators: usize,
    /// Build tooz-bench in release mode.
    pub(crate) release: bool,
}

/// Options of `cargo xtask chaos`.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Chaos {
    /// Which drivers to run.
    pub(crate) driver: DriverSelection,
    /// The cluster variants.
    pub(crate) cluster: bool,
    /// Seconds of workload per driver.
    pub(crate) seconds: u64,
    /// The seed; `None` takes the clock.
    pub(crate) seed: Option<u64>,
    /// Client processes.
    pub(crate) clients: usize,
    /// No server kills.
    pub(crate) client_faults_only: bool,
}

impl Chaos {
    /// The defaults: every driver, 20 s, 4 clients, every fault.
    pub(crate) fn all() -> Self {
        Self {
            driver: DriverSelection::All,
            cluster: false,
            seconds: 20,
            seed: None,
            clients: 4,
            client_faults_only: false,
        }
    }
}

impl Interop {
    /// The options `ci` uses.
    pub(crate) fn all() -> Self {
        Self {
            driver: DriverSelection::All,
            keep: false,
            python: None,
        }
    }
}

/// Parses the arguments after `cargo xtask`.
pub(crate) fn parse(args: impl IntoIterator<Item = String>) -> Result<Command> {
    let mut args = args.into_iter();
    let Some(command) = args.next() else {
        return Ok(Command::Help);
    };
    let rest: Vec<String> = args.collect();
    if rest.iter().any(|a| a == "-h" || a == "--help") {
        return Ok(Command::Help);
    }
    match command.as_str() {
        "-h" | "--help" | "help" => Ok(Command::Help),
        "conformance" => {
            let mut driver = DriverSelection::All;
            let mut opts = Options::new("conformance", rest);
            while let Some(flag) = opts.next_flag()? {
                match flag.as_str() {
                    "--driver" => driver = opts.value(&flag)?.parse()?,
                    _ => return Err(opts.unknown(&flag)),
                }
            }
            Ok(Command::Conformance(Conformance { driver }))
        }
        "interop" => {
            let mut interop = Interop::all();
            let mut opts = Options::new("interop", rest);
            while let Some(flag) = opts.next_flag()? {
                match flag.as_str() {
                    "--driver" => interop.driver = opts.value(&flag)?.parse()?,
                    "--keep" => interop.keep = true,
                    "--python" => interop.python = Some(opts.value(&flag)?),
                    _ => return Err(opts.unknown(&flag)),
                }
            }
            Ok(Command::Interop(interop))
        }
        "backends" => Ok(Command::Backends(rest)),
        "bench" => {
            let mut bench = Bench {
                driver: DriverSelection::All,
                compare_python: false,
                compare_peers: false,
                quick: false,
                scale: ScaleRun::Both,
            };
            let mut opts = Options::new("bench", rest);
            while let Some(flag) = opts.next_flag()? {
                match flag.as_str() {
                    "--driver" => bench.driver = opts.value(&flag)?.parse()?,
                    "--compare-python" => bench.compare_python = true,
                    "--compare-peers" => bench.compare_peers = true,
                    "--quick" => bench.quick = true,
                    "--no-scale" => bench.scale = ScaleRun::Skip,
                    "--scale-only" => bench.scale = ScaleRun::Only,
                    _ => return Err(opts.unknown(&flag)),
                }
            }
            Ok(Command::Bench(bench))
        }
        "chaos" => {
            let mut chaos = Chaos::all();
            let mut opts = Options::new("chaos", rest);
            while let Some(flag) = opts.next_flag()? {
                match flag.as_str() {
                    "--driver" => chaos.driver = opts.value(&flag)?.parse()?,
                    "--cluster" => chaos.cluster = true,
                    "--seconds" => {
                        let v = opts.value(&flag)?;
                        chaos.seconds = match v.parse() {
                            Ok(n @ 5..=3600) => n,
                            _ => bail!("--seconds: a whole number from 5 to 3600, not `{v}`"),
                        };
                    }
                    "--seed" => {
                        let v = opts.value(&flag)?;
                        chaos.seed = Some(v.parse().map_err(|_| {
                            anyhow::anyhow!("--seed: an unsigned integer, not `{v}`")
                        })?);
                    }
                    "--clients" => {
                        let v = opts.value(&flag)?;
                        chaos.clients = match v.parse() {
                            Ok(n @ 2..=16) => n,
                            _ => bail!("--clients: a number from 2 to 16, not `{v}`"),
                        };
                    }
                    "--client-faults-only" => chaos.client_faults_only = true,
                    _ => return Err(opts.unknown(&flag)),
                }
            }
            Ok(Command::Chaos(chaos))
        }
        "soak" => {
            let mut soak = Soak {
                driver: DriverSelection::All,
                seconds: 60,
                coordinators: 200,
                release: false,
            };
            let mut opts = Options::new("soak", rest);
            while let Some(flag) = opts.next_flag()? {
                match flag.as_str() {
                    "--driver" => soak.driver = opts.value(&flag)?.parse()?,
                    "--seconds" => soak.seconds = opts.positive(&flag)?,
                    "--coordinators" => soak.coordinators = opts.positive(&flag)?,
                    "--release" => soak.release = true,
                    _ => return Err(opts.unknown(&flag)),
                }
            }
            Ok(Command::Soak(soak))
        }
        "ci" => {
            let mut opts = Options::new("ci", rest);
            match opts.next_flag()? {
                None => Ok(Command::Ci),
                Some(flag) => Err(opts.unknown(&flag)),
            }
        }
        "readme" => {
            let mut opts = Options::new("readme", rest);
            match opts.next_flag()? {
                None => Ok(Command::Readme),
                Some(flag) => Err(opts.unknown(&flag)),
            }
        }
        other => bail!("unknown command `{other}`; run `cargo xtask --help` for the list"),
    }
}

/// The options after a subcommand, consumed left to right.
struct Options {
    command: &'static str,
    args: std::vec::IntoIter<String>,
}

impl Options {
    fn new(command: &'static str, args: Vec<String>) -> Self {
        Self {
            command,
            args: args.into_iter(),
        }
    }

    /// The next option name; `--name=value` is split and the value kept for [`Self::value`].
    fn next_flag(&mut self) -> Result<Option<String>> {
        let Some(arg) = self.args.next() else {
            return Ok(None);
        };
        if !arg.starts_with("--") {
            bail!(
                "unexpected argument `{arg}` for `cargo xtask {}`; run `cargo xtask --help`",
                self.command
            );
        }
        if let Some((flag, value)) = arg.split_once('=') {
            let mut rest = vec![value.to_owned()];
            rest.extend(self.args.by_ref());
            self.args = rest.into_iter();
            return Ok(Some(flag.to_owned()));
        }
        Ok(Some(arg))
    }

    fn value(&mut self, flag: &str) -> Result<String> {
        match self.args.next() {
            Some(v) => Ok(v),
            None => bail!("`{flag}` needs a value (cargo xtask {})", self.command),
        }
    }

    /// A value that must be a positive integer.
    fn positive<T: std::str::FromStr + PartialOrd + Default>(&mut self, flag: &str) -> Result<T> {
        let v = self.value(flag)?;
        match v.parse::<T>() {
            Ok(n) if n > T::default() => Ok(n),
            _ => bail!(
                "`{flag}` takes a positive integer, not `{v}` (cargo xtask {})",
                self.command
            ),
        }
    }

    fn unknown(&self, flag: &str) -> anyhow::Error {
        anyhow::anyhow!(
            "unknown option `{flag}` for `cargo xtask {}`; run `cargo xtask --help`",
            self.command
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(s: &str) -> Result<Command> {
        parse(s.split_whitespace().map(str::to_owned))
    }

    #[test]
    fn parses_commands() {
        assert_eq!(parse_str("").unwrap(), Command::Help);
        assert_eq!(parse_str("--help").unwrap(), Command::Help);
        assert_eq!(parse_str("interop --help").unwrap(), Command::Help);
        assert_eq!(parse_str("ci").unwrap(), Command::Ci);
        assert_eq!(parse_str("readme").unwrap(), Command::Readme);
        assert!(parse_str("readme --bogus").is_err());
        assert_eq!(
            parse_str("conformance --driver file").unwrap(),
            Command::Conformance(Conformance {
                driver: DriverSelection::One("file".into())
            })
        );
        assert_eq!(
            parse_str("interop --driver=all --keep --python python3.11").unwrap(),
            Command::Interop(Interop {
                driver: DriverSelection::All,
                keep: true,
                python: Some("python3.11".into()),
            })
        );
    }

    #[test]
    fn parses_bench() {
        assert_eq!(
            parse_str("bench").unwrap(),
            Command::Bench(Bench {
                driver: DriverSelection::All,
                compare_python: false,
                compare_peers: false,
                quick: false,
                scale: ScaleRun::Both,
            })
        );
        assert_eq!(
            parse_str("bench --driver redis --compare-python --quick").unwrap(),
            Command::Bench(Bench {
                driver: DriverSelection::One("redis".into()),
                compare_python: true,
                compare_peers: false,
                quick: true,
                scale: ScaleRun::Both,
            })
        );
        assert_eq!(
            parse_str("bench --scale-only").unwrap(),
            Command::Bench(Bench {
                driver: DriverSelection::All,
                compare_python: false,
                compare_peers: false,
                quick: false,
                scale: ScaleRun::Only,
            })
        );
        assert_eq!(
            parse_str("bench --driver etcd --compare-peers").unwrap(),
            Command::Bench(Bench {
                driver: DriverSelection::One("etcd".into()),
                compare_python: false,
                compare_peers: true,
                quick: false,
                scale: ScaleRun::Both,
            })
        );
        assert!(parse_str("bench --driver nosuch").is_err());
        assert!(parse_str("bench --python x").is_err());
    }

    #[test]
    fn parses_chaos() {
        assert_eq!(parse_str("chaos").unwrap(), Command::Chaos(Chaos::all()));
        assert_eq!(
            parse_str("chaos --driver redis --cluster --seconds 30 --seed 7 --clients 3 --client-faults-only")
                .unwrap(),
            Command::Chaos(Chaos {
                driver: DriverSelection::One("redis".into()),
                cluster: true,
                seconds: 30,
                seed: Some(7),
                clients: 3,
                client_faults_only: true,
            })
        );
        assert!(parse_str("chaos --seconds 2").is_err());
        assert!(parse_str("chaos --seconds x").is_err());
        assert!(parse_str("chaos --seed -1").is_err());
        assert!(parse_str("chaos --clients 1").is_err());
        assert!(parse_str("chaos --driver nosuch").is_err());
    }

    #[test]
    fn parses_soak() {
        assert_eq!(
            parse_str("soak").unwrap(),
            Command::Soak(Soak {
                driver: DriverSelection::All,
                seconds: 60,
                coordinators: 200,
                release: false,
            })
        );
        assert_eq!(
            parse_str("soak --driver redis --seconds 5 --coordinators=300 --release").unwrap(),
            Command::Soak(Soak {
                driver: DriverSelection::One("redis".into()),
                seconds: 5,
                coordinators: 300,
                release: true,
            })
        );
        for bad in [
            "soak --seconds 0",
            "soak --seconds x",
            "soak --coordinators -3",
            "soak --quick",
        ] {
            assert!(parse_str(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn rejects_bad_input() {
        assert!(parse_str("conformance --driver nosuch").is_err());
        assert!(parse_str("conformance --driver").is_err());
        assert!(parse_str("conformance --frobnicate").is_err());
        assert!(parse_str("ci --driver file").is_err());
        assert_eq!(
            parse_str("backends up --only redis").unwrap(),
            Command::Backends(vec!["up".into(), "--only".into(), "redis".into()])
        );
        assert!(parse_str("interop file").is_err());
    }

    #[test]
    fn unknown_driver_lists_known_ones() {
        let err = parse_str("conformance --driver nosuch")
            .unwrap_err()
            .to_string();
        assert!(err.contains("nosuch") && err.contains("file"), "{err}");
    }
}
