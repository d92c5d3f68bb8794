//! Worker mode: the test binary started again by a multi-process case.
//!
//! Commands (arguments after the executable):
//! - `try-lock NAME`: try once; print `acquired true` or `acquired false`; exit.
//! - `hold-lock NAME LOGFILE ITERATIONS`: acquire, mark the hold in `LOGFILE.held`
//!   (created exclusively: finding it present means two holders overlap), record the
//!   hold as `pid start_ns end_ns token` (CLOCK_REALTIME) appended to `LOGFILE`,
//!   release; repeat. Prints `done`.
//! - `hold NAME`: acquire, print `ready`, then wait until killed (or until stdin
//!   closes: a worker never outlives the suite).
//! - `join GROUP MEMBER`: start with heartbeats, join (creating the group if
//!   needed), print `ready`, then wait like `hold`.
//!
//! Exit codes: 0 done, 1 error, 2 usage, 3 overlap detected.

use std::io::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tooz_core::{Coordinator, Wait};

use crate::{Setup, WORKER_URL_ENV};

type WorkerResult = Result<i32, String>;

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn complain(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// Runs the worker command in the process arguments; returns the exit code.
pub(crate) fn main(setup: Setup) -> i32 {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let url = std::env::var(WORKER_URL_ENV).unwrap_or_else(|_| setup.url.clone());
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            complain(&format!("worker: cannot build a runtime: {e}"));
            return 1;
        }
    };
    match rt.block_on(run(&setup, &url, &args)) {
        Ok(code) => code,
        Err(e) => {
            complain(&format!("worker {args:?}: {e}"));
            1
        }
    }
}

/// Waits until the suite closes our stdin (it was killed, or dropped the worker),
/// at most ten minutes.
async fn until_orphaned() {
    use tokio::io::AsyncReadExt;
    let mut stdin = tokio::io::stdin();
    let mut buf = [0_u8; 64];
    let eof = async { while !matches!(stdin.read(&mut buf).await, Ok(0) | Err(_)) {} };
    let _ = tokio::time::timeout(Duration::from_secs(600), eof).await;
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

async fn connect(
    setup: &Setup,
    url: &str,
    member: &str,
    heart: bool,
) -> Result<Coordinator, String> {
    let mut opts = tooz_core::ConnectOptions::new();
    for (k, v) in &setup.options {
        opts = opts.option(k.clone(), v.clone());
    }
    let c = setup
        .registry
        .connect_with(url, member, &opts)
        .map_err(|e| format!("connect: {e}"))?;
    c.start(heart).await.map_err(|e| format!("start: {e}"))?;
    Ok(c)
}

fn default_member() -> String {
    format!("worker-{}-{}", std::process::id(), now_ns() % 1_000_000_007)
}

async fn run(setup: &Setup, url: &str, args: &[String]) -> WorkerResult {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match args.as_slice() {
        ["try-lock", name] => {
            let c = connect(setup, url, &default_member(), false).await?;
            let lock = c.get_lock(*name).map_err(|e| e.to_string())?;
            let got = lock
                .acquire(Wait::No)
                .await
                .map_err(|e| format!("acquire: {e}"))?;
            say(&format!("acquired {got}"));
            if got {
                lock.release().await.map_err(|e| format!("release: {e}"))?;
            }
            c.stop().await.map_err(|e| format!("stop: {e}"))?;
            Ok(0)
        }
        ["hold-lock", name, logfile, iterations] => {
            let n: u32 = iterations
                .parse()
                .map_err(|e| format!("bad ITERATIONS {iterations:?}: {e}"))?;
            hold_lock(setup, url, name, logfile, n).await
        }
        ["hold", name] => {
            let c = connect(setup, url, &default_member(), true).await?;
            let lock = c.get_lock(*name).map_err(|e| e.to_string())?;
            let got = lock
                .acquire(Wait::For(Duration::from_secs(30)))
                .await
                .map_err(|e| format!("acquire: {e}"))?;
            if !got {
                return Err("could not acquire within 30 s".into());
            }
            say("ready");
            until_orphaned().await;
            Ok(0)
        }
        ["join", group, member] => {
            let c = connect(setup, url, member, true).await?;
            c.join_group_create(*group, &())
                .await
                .map_err(|e| format!("join_group_create: {e}"))?;
            say("ready");
            until_orphaned().await;
            Ok(0)
        }
        _ => {
            complain(&format!(
                "usage: try-lock NAME | hold-lock NAME LOGFILE ITERATIONS | hold NAME | join GROUP MEMBER (got {args:?})"
            ));
            Ok(2)
        }
    }
}

async fn hold_lock(setup: &Setup, url: &str, name: &str, logfile: &str, n: u32) -> WorkerResult {
    let c = connect(setup, url, &default_member(), true).await?;
    let lock = c.get_lock(name).map_err(|e| e.to_string())?;
    let marker = format!("{logfile}.held");
    let pid = std::process::id();
    for i in 0..n {
        let got = lock
            .acquire(Wait::For(Duration::from_secs(40)))
            .await
            .map_err(|e| format!("acquire #{i}: {e}"))?;
        if !got {
            return Err(format!("acquire #{i} did not succeed within 40 s"));
        }
        let token = lock.fencing_token().map_or(0, |t| t.0);
        let start = now_ns();
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&marker)
        {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                say(&format!("overlap at acquisition #{i} (token {token})"));
                return Ok(3);
            }
            Err(e) => return Err(format!("creating {marker}: {e}")),
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
        std::fs::remove_file(&marker).map_err(|e| format!("removing {marker}: {e}"))?;
        let end = now_ns();
        let line = format!("{pid} {start} {end} {token}\n");
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(logfile)
            .map_err(|e| format!("opening {logfile}: {e}"))?;
        f.write_all(line.as_bytes())
            .map_err(|e| format!("writing {logfile}: {e}"))?;
        drop(f);
        let released = lock
            .release()
            .await
            .map_err(|e| format!("release #{i}: {e}"))?;
        if !released {
            return Err(format!("release #{i} returned false while holding"));
        }
    }
    c.stop().await.map_err(|e| format!("stop: {e}"))?;
    say("done");
    Ok(0)
}
