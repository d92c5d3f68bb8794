//! `cargo xtask chaos --driver NAME|all [--cluster] [--seconds N] [--seed S] [--clients K]
//! [--client-faults-only]`: the fault run of issue 17 (crates/tooz-chaos).
//!
//! Builds `tooz-chaos`, takes each driver's URL from the environment or else from the
//! backends' env file (`TOOZ_TEST_<DRIVER>_URL`, or `TOOZ_CLUSTER_<DRIVER>_URL` with
//! `--cluster`; file and ipc use a directory under `target/chaos/`), and runs
//! `tooz-chaos run` per driver with this executable's `backends node` as the node-control
//! command (kill -9 / restart the server, or the cluster's leader). Each run prints its
//! table and `N ops, N faults, N violations`; a run with violations keeps its history
//! and logs under `target/chaos/<driver>/` and fails the command.

use std::{path::Path, process::Command};

use anyhow::{Context, Result, bail};

use crate::{
    flags,
    process::{self, progress},
};

/// Drivers `tooz-chaos` has a profile for.
const CHAOS_DRIVERS: &[&str] = &[
    "redis",
    "etcd",
    "zookeeper",
    "memcached",
    "consul",
    "postgresql",
    "mysql",
    "file",
    "ipc",
];

/// Drivers with a `--cluster` variant (the `cluster` backends).
const CLUSTER_DRIVERS: &[&str] = &["etcd", "zookeeper", "redis"];

/// The seed when none is given: the clock, printed so that a run can be repeated.
fn default_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_secs())
}

pub(crate) fn run(flags: &flags::Chaos) -> Result<()> {
    let root = process::workspace_root();
    let mut drivers: Vec<&'static str> = flags
        .driver
        .resolve(&root)?
        .into_iter()
        .map(|d| d.name)
        .filter(|n| CHAOS_DRIVERS.contains(n))
        .collect();
    if flags.cluster {
        if let crate::drivers::DriverSelection::One(name) = &flags.driver
            && !CLUSTER_DRIVERS.contains(&name.as_str())
        {
            bail!(
                "no cluster variant for driver `{name}`; cluster drivers: {}",
                CLUSTER_DRIVERS.join(", ")
            );
        }
        drivers.retain(|d| CLUSTER_DRIVERS.contains(d));
    }
    if drivers.is_empty() {
        bail!("no driver with a chaos profile is selected");
    }
    let seed = flags.seed.unwrap_or_else(default_seed);
    let env = crate::backends::read_env(&root)?;
    let url_of = |var: &str| -> Result<String> {
        if let Ok(v) = std::env::var(var)
            && !v.trim().is_empty()
        {
            return Ok(v.trim().to_owned());
        }
        env.iter()
            .find(|(k, _)| k == var)
            .map(|(_, v)| v.clone())
            .with_context(|| {
                format!(
                    "{var} is neither set nor in the backends' env file: run `cargo xtask backends up{}` first",
                    if flags.cluster { " --cluster" } else { "" }
                )
            })
    };
    let chaos_dir = process::target_dir().join("chaos");
    std::fs::create_dir_all(&chaos_dir)
        .with_context(|| format!("cannot create {}", chaos_dir.display()))?;
    process::run(process::cargo().args(["build", "-q", "-p", "tooz-chaos"]))?;
    let exe = process::target_dir().join("debug").join("tooz-chaos");
    let xtask = std::env::current_exe().context("cannot find the xtask executable")?;

    let mut failed = Vec::new();
    for driver in &drivers {
        let url = match *driver {
            "file" => format!("file://{}", chaos_dir.join("file-data").display()),
            "ipc" => format!("ipc://{}", chaos_dir.join("ipc-data").display()),
            d => {
                let prefix = if flags.cluster {
                    "TOOZ_CLUSTER"
                } else {
                    "TOOZ_TEST"
                };
                url_of(&format!("{prefix}_{}_URL", d.to_uppercase()))?
            }
        };
        let name = if flags.cluster {
            format!("{driver}-cluster")
        } else {
            (*driver).to_owned()
        };
        progress!("chaos {name}: {}s, seed {seed}", flags.seconds);
        let mut cmd = Command::new(&exe);
        cmd.current_dir(&root)
            .args(["run", "--driver", driver, "--url", &url])
            .args(["--seconds", &flags.seconds.to_string()])
            .args(["--seed", &seed.to_string()])
            .args(["--clients", &flags.clients.to_string()])
            .arg("--out")
            .arg(chaos_dir.join(&name));
        if flags.cluster {
            cmd.arg("--cluster");
        }
        if !flags.client_faults_only && !matches!(*driver, "file" | "ipc") {
            cmd.arg("--node-cmd").arg(&xtask).args(["backends", "node"]);
        }
        if let Err(e) = run_one(&mut cmd, &chaos_dir.join(&name)) {
            progress!("chaos {name}: {e:#}");
            failed.push(name);
        }
    }
    if !failed.is_empty() {
        bail!(
            "chaos failed for: {} (reproduce with --seed {seed})",
            failed.join(", ")
        );
    }
    Ok(())
}

fn run_one(cmd: &mut Command, out: &Path) -> Result<()> {
    let line = process::display(cmd);
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{line}`"))?;
    match status.code() {
        Some(0) => Ok(()),
        Some(1) => bail!("violations found; history and logs in {}", out.display()),
        _ => bail!("`{line}` failed ({status})"),
    }
}
