//! `tooz-chaos`: a Jepsen-style fault run for one tooz driver (issue 17, item 2).
//!
//! ```text
//! tooz-chaos run --driver D --url U --seconds N --seed S --out DIR [--clients K] [--cluster] [--node-cmd ARGS...]
//! tooz-chaos client ...   (spawned by `run`, one process per client)
//! ```
//!
//! `run` is the orchestrator: it serves the fenced register and the event log (a line
//! protocol on loopback, [`register`]), spawns K copies of this binary as clients (each
//! behind its own [`tooz_conformance::fault::FaultProxy`] when the backend is a TCP
//! server), injects seeded faults ([`nemesis`]), and checks the recorded history
//! ([`checker`]). Every timestamp is `CLOCK_MONOTONIC`, which is one clock for every
//! process of a Linux host. `cargo xtask chaos` runs it per driver.

mod checker;
mod client;
mod nemesis;
mod orchestrator;
mod profile;
mod register;

use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

/// Nanoseconds on `CLOCK_MONOTONIC`: system-wide on Linux, so the clients' and the
/// orchestrator's timestamps are on one clock.
pub(crate) fn now_ns() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(ts) => {
            let secs = u64::try_from(ts.tv_sec()).unwrap_or(0);
            let nanos = u64::try_from(ts.tv_nsec()).unwrap_or(0);
            secs * 1_000_000_000 + nanos
        }
        // CLOCK_MONOTONIC always exists on Linux; 0 would show up as a huge interval.
        Err(_) => 0,
    }
}

/// One line of the history: a client's or the nemesis's observation.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub(crate) struct Event {
    /// `CLOCK_MONOTONIC` nanoseconds when it was observed.
    pub(crate) t: u64,
    /// Client id, or `nemesis` / `orchestrator`.
    pub(crate) c: String,
    /// What happened (see [`client`] and [`nemesis`] for the kinds).
    pub(crate) ev: String,
    /// A lock name, or `leader` for the leadership register key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) lock: Option<String>,
    /// The nemesis's target: a client id or a node name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) target: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) token: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) seq: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) ok: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) detail: Option<String>,
}

impl Event {
    pub(crate) fn new(c: &str, ev: &str) -> Self {
        Event {
            t: now_ns(),
            c: c.to_owned(),
            ev: ev.to_owned(),
            ..Event::default()
        }
    }
    pub(crate) fn lock(mut self, lock: &str) -> Self {
        self.lock = Some(lock.to_owned());
        self
    }
    pub(crate) fn target(mut self, target: &str) -> Self {
        self.target = Some(target.to_owned());
        self
    }
    pub(crate) fn token(mut self, token: u64) -> Self {
        self.token = Some(token);
        self
    }
    pub(crate) fn seq(mut self, seq: u64) -> Self {
        self.seq = Some(seq);
        self
    }
    pub(crate) fn ok(mut self, ok: bool) -> Self {
        self.ok = Some(ok);
        self
    }
    pub(crate) fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }
}

const USAGE: &str = "usage: tooz-chaos run --driver D --url U --seconds N --seed S --out DIR \
[--clients K] [--cluster] [--keep] [--node-cmd ARGS...]";

/// Options of `tooz-chaos run`.
#[derive(Debug, Clone)]
pub(crate) struct RunArgs {
    pub(crate) driver: String,
    pub(crate) url: String,
    pub(crate) seconds: u64,
    pub(crate) seed: u64,
    pub(crate) out: std::path::PathBuf,
    pub(crate) clients: usize,
    pub(crate) cluster: bool,
    /// Keep the history and logs of a clean run too.
    pub(crate) keep: bool,
    /// The node-control command prefix (`xtask backends node`), empty for none.
    pub(crate) node_cmd: Vec<String>,
}

fn parse_run(args: &[String]) -> Result<RunArgs> {
    let mut run = RunArgs {
        driver: String::new(),
        url: String::new(),
        seconds: 20,
        seed: 1,
        out: std::path::PathBuf::from("target/chaos"),
        clients: 4,
        cluster: false,
        keep: false,
        node_cmd: Vec::new(),
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .with_context(|| format!("`{flag}` needs a value; {USAGE}"))
        };
        match flag.as_str() {
            "--driver" => run.driver = value()?,
            "--url" => run.url = value()?,
            "--seconds" => {
                run.seconds = value()?
                    .parse()
                    .context("--seconds: a whole number of seconds")?;
            }
            "--seed" => run.seed = value()?.parse().context("--seed: an unsigned integer")?,
            "--out" => run.out = value()?.into(),
            "--clients" => {
                run.clients = value()?
                    .parse()
                    .context("--clients: a number of client processes")?;
            }
            "--cluster" => run.cluster = true,
            "--keep" => run.keep = true,
            "--node-cmd" => {
                run.node_cmd = it.by_ref().cloned().collect();
            }
            other => bail!("unknown option `{other}`; {USAGE}"),
        }
    }
    if run.driver.is_empty() || run.url.is_empty() {
        bail!("--driver and --url are required; {USAGE}");
    }
    if profile::profile(&run.driver).is_none() {
        bail!(
            "no chaos profile for driver `{}`; known: {}",
            run.driver,
            profile::names().join(", ")
        );
    }
    if !(2..=16).contains(&run.clients) {
        bail!("--clients must be between 2 and 16, not {}", run.clients);
    }
    if run.seconds < 5 {
        bail!("--seconds must be at least 5, not {}", run.seconds);
    }
    Ok(run)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tooz-chaos: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match args.first().map(String::as_str) {
        Some("run") => match parse_run(&args[1..]) {
            Ok(run) => rt.block_on(orchestrator::run(run)),
            Err(e) => Err(e),
        },
        Some("client") => match client::parse(&args[1..]) {
            Ok(c) => rt.block_on(client::run(c)).map(|()| true),
            Err(e) => Err(e),
        },
        _ => Err(anyhow::anyhow!("{USAGE}")),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("tooz-chaos: {e:#}");
            ExitCode::from(2)
        }
    }
}
