//! `cargo xtask soak [--driver NAME|all] [--seconds N] [--coordinators N] [--release]`:
//! the bounded load run of issue 17 (`tooz-bench --soak`, see its `soak` module).
//!
//! Per driver: hundreds of coordinators in one process joining, heartbeating, watching
//! and locking for `--seconds`; prints errors, latencies per operation kind and the RSS,
//! tokio task count and open file descriptors, and fails on an error or on growth past
//! the stated tolerance after warm-up. Writes `target/soak/<driver>.json`. A debug build
//! by default (what CI has built already); `--release` for figures.

use std::fs;

use anyhow::{Context, Result, bail};

use crate::{
    drivers::DriverSelection,
    flags,
    process::{self, progress},
};

/// Drivers `tooz-bench --soak` knows (the bench's drivers).
const SOAK_DRIVERS: &[&str] = &[
    "file",
    "ipc",
    "redis",
    "zookeeper",
    "etcd",
    "memcached",
    "consul",
    "postgresql",
    "mysql",
];

pub(crate) fn run(flags: &flags::Soak) -> Result<()> {
    let root = process::workspace_root();
    if let DriverSelection::One(name) = &flags.driver
        && !SOAK_DRIVERS.contains(&name.as_str())
    {
        bail!(
            "no soak for driver `{name}`; soaked drivers: {}",
            SOAK_DRIVERS.join(", ")
        );
    }
    let mut drivers = flags.driver.resolve(&root)?;
    drivers.retain(|d| SOAK_DRIVERS.contains(&d.name));
    if drivers.is_empty() {
        bail!("no soaked driver is present in this workspace");
    }
    let env = crate::drivers::start_servers(&root, &drivers)?;
    let out_dir = process::target_dir().join("soak");
    fs::create_dir_all(&out_dir).with_context(|| format!("cannot create {}", out_dir.display()))?;
    let profile: &[&str] = if flags.release { &["--release"] } else { &[] };
    process::run(
        process::cargo()
            .args(["build", "-q", "-p", "tooz-bench"])
            .args(profile),
    )?;
    let mut failed = Vec::new();
    for driver in &drivers {
        progress!(
            "soak {}: {} coordinators for {} s",
            driver.name,
            flags.coordinators,
            flags.seconds
        );
        let mut cmd = process::cargo();
        cmd.args(["run", "-q", "-p", "tooz-bench"])
            .args(profile)
            .args(["--", "--soak", "--driver", driver.name])
            .args(["--seconds", &flags.seconds.to_string()])
            .args(["--coordinators", &flags.coordinators.to_string()])
            .arg("--json-out")
            .arg(out_dir.join(format!("{}.json", driver.name)))
            .env("TOOZ_BENCH_DIR", out_dir.join("scratch"))
            .envs(env.iter().map(|(k, v)| (k, v)));
        if let Err(err) = process::run(&mut cmd) {
            progress!("soak {}: {err:#}", driver.name);
            failed.push(driver.name);
        }
    }
    if !failed.is_empty() {
        bail!("soak failed for: {}", failed.join(", "));
    }
    Ok(())
}
