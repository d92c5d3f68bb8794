//! `cargo xtask ci`: the whole check, in the order a reviewer would run it, stopping at the
//! first failure. `.ci/run` calls exactly this.
//!
//! The `backends` step starts the servers the present drivers need (none for the file
//! driver) and the test steps read their URLs from its env file.
//!
//! The `cluster` step starts the clusters on loopback (`backends up --cluster-only`: 3-node
//! etcd, 3-node ZooKeeper, Redis primary + replica + 3 Sentinels), runs the etcd, ZooKeeper
//! and Redis conformance suites against their multi-host URLs, checks that a lock held
//! through the etcd or ZooKeeper member its client is on survives that member's SIGKILL,
//! and a failover smoke (kill each cluster's leader, see another one elected, start the
//! node again).
//!
//! `msrv` checks the workspace with the toolchain of its `rust-version` (installed by
//! rustup when missing). `examples` runs the facade's examples against the servers started for the tests.
//! `docs` builds the library crates' docs with `-D warnings`; `features` builds every
//! publishable crate with no default features and with each feature alone (what
//! `cargo hack --each-feature` does); `package` runs `cargo package --workspace` with
//! its verification build.
//!
//! `chaos` runs `cargo xtask chaos` for every driver (12 s each, the clock's seed,
//! printed) after the tests, then the `--cluster` variants when the pipeline has a
//! `cluster` step that brought the clusters up.
//!
//! `soak` runs `cargo xtask soak` for every driver for a few seconds each ([`CI_SOAK`]):
//! 200 coordinators (fewer where a server takes fewer connections), failing on an error
//! or on resources growing after warm-up.
//!
//! Conformance is not a step of its own: every driver crate's `tests/conformance.rs` is a
//! test target, so `cargo test --workspace` already runs it.

use std::{process::Command, time::Instant};

use anyhow::{Result, bail};

use crate::{
    flags, interop,
    process::{self, progress},
};

/// The `soak` step: every driver, briefly (a debug build, as the tests).
const CI_SOAK: flags::Soak = flags::Soak {
    driver: crate::drivers::DriverSelection::All,
    seconds: 8,
    coordinators: 200,
    release: false,
};

/// One step of the pipeline.
struct Step {
    name: &'static str,
    run: fn() -> Result<()>,
}

const STEPS: &[Step] = &[
    Step {
        name: "fmt",
        run: || process::run(process::cargo().args(["fmt", "--all", "--check"])),
    },
    Step {
        name: "clippy",
        run: || {
            process::run(process::cargo().args([
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]))
        },
    },
    Step {
        name: "docs",
        run: || {
            // Library crates only: xtask and the bench are not published, and the
            // `tooz` binary's docs would collide with the `tooz` library's.
            process::run(
                process::cargo()
                    .args(["doc", "--workspace", "--no-deps"])
                    .args(["--exclude", "xtask", "--exclude", "tooz-bench"])
                    .args(["--exclude", "tooz-cli", "--exclude", "tooz-chaos"])
                    .env("RUSTDOCFLAGS", "-D warnings"),
            )
        },
    },
    Step {
        name: "features",
        run: crate::features::check_each,
    },
    Step {
        name: "msrv",
        run: crate::features::check_msrv,
    },
    Step {
        name: "backends",
        run: || {
            let root = process::workspace_root();
            let drivers = crate::drivers::DriverSelection::All.resolve(&root)?;
            crate::drivers::start_servers(&root, &drivers).map(drop)
        },
    },
    Step {
        name: "test",
        run: || process::run(&mut test_command(&["test", "--workspace"])),
    },
    Step {
        name: "soak",
        run: || crate::soak::run(&CI_SOAK),
    },
    Step {
        name: "cluster",
        run: crate::backends::cluster_ci,
    },
    Step {
        name: "chaos",
        run: run_chaos,
    },
    Step {
        name: "doctest",
        run: || process::run(&mut test_command(&["test", "--workspace", "--doc"])),
    },
    Step {
        name: "examples",
        run: run_examples,
    },
    Step {
        name: "interop",
        run: || interop::run(&flags::Interop::all()),
    },
    Step {
        name: "package",
        run: || {
            // Every publishable crate packaged and its package built on its own, as
            // crates.io would receive it (workspace path dependencies resolved
            // from the packages themselves).
            forget_extracted_packages();
            process::run(
                process::cargo()
                    .args(["package", "--workspace", "--allow-dirty"])
                    .args(["--exclude", "tooz-bench", "--exclude", "xtask"])
                    .args(["--exclude", "tooz-chaos"]),
            )
        },
    },
];

/// Removes the copies of this workspace's packages that earlier `cargo package` runs
/// extracted under `$CARGO_HOME/registry/src`: cargo does not extract a package again
/// when its `name-version` directory exists, so verification would build a later
/// package against an earlier run's sources of the same version.
fn forget_extracted_packages() {
    let home = std::env::var_os("CARGO_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".cargo")));
    let Some(home) = home else { return };
    let Ok(registries) = std::fs::read_dir(home.join("registry").join("src")) else {
        return;
    };
    for reg in registries.flatten() {
        let Ok(entries) = std::fs::read_dir(reg.path()) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if (name.starts_with("tooz-") || name.starts_with("tooz_"))
                && name.ends_with(concat!("-", env!("CARGO_PKG_VERSION")))
                && std::fs::remove_dir_all(e.path()).is_ok()
            {
                progress!(
                    "package: removed the stale extracted {}",
                    e.path().display()
                );
            }
        }
    }
}

/// Seconds of chaos per driver in CI: with the start, the final membership check and
/// Consul's 2 × TTL probe, about 20 s a driver.
const CI_CHAOS_SECONDS: u64 = 12;

/// `chaos` for every driver; then, when the pipeline has the `cluster` step (which
/// brings the clusters up), the cluster variants. The seed is the clock's, printed:
/// a failure names the seed that reproduces it.
fn run_chaos() -> Result<()> {
    let mut flags = flags::Chaos::all();
    flags.seconds = CI_CHAOS_SECONDS;
    crate::chaos::run(&flags)?;
    let position = |name: &str| STEPS.iter().position(|s| s.name == name);
    if let Some(cluster) = position("cluster") {
        if position("chaos").is_some_and(|chaos| chaos < cluster) {
            bail!(
                "the `chaos` step must come after the `cluster` step (which brings the clusters up)"
            );
        }
        flags.cluster = true;
        crate::chaos::run(&flags)?;
    } else {
        progress!("chaos: no `cluster` step in this pipeline: cluster variants not run");
    }
    Ok(())
}

/// The facade's examples against the servers `backends up` started (built by the test
/// step already): each asserts what it prints about.
fn run_examples() -> Result<()> {
    let env = crate::backends::read_env(&process::workspace_root()).unwrap_or_default();
    let url = |name: &str| {
        env.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .ok_or_else(|| anyhow::anyhow!("{name} is not in the backends' env file"))
    };
    let runs = [
        ("worker_pool", url("TOOZ_TEST_REDIS_URL")?),
        ("scheduler", url("TOOZ_TEST_ETCD_URL")?),
        ("observability", "memory://ci-observability".to_owned()),
        ("fenced_job", url("TOOZ_TEST_REDIS_URL")?),
    ];
    let postgresql = url("TOOZ_TEST_POSTGRESQL_URL")?;
    for (example, url) in runs {
        progress!("example {example} against {url}");
        let mut cmd = process::cargo();
        cmd.args(["run", "-q", "-p", "tooz", "--example", example, "--"])
            .arg(&url);
        if example == "fenced_job" {
            cmd.arg(&postgresql);
        }
        process::run(&mut cmd)?;
    }
    Ok(())
}

fn test_command(args: &[&str]) -> Command {
    let mut cmd = process::cargo();
    cmd.args(args).env("TOOZ_REQUIRE_BACKENDS", "1");
    // The URLs of the servers `backends up` started (none when no driver needs one).
    if let Ok(env) = crate::backends::read_env(&process::workspace_root()) {
        cmd.envs(env);
    }
    cmd
}

pub(crate) fn run() -> Result<()> {
    let started = Instant::now();
    let mut done: Vec<(&str, f64)> = Vec::new();
    // For working on one step: `XTASK_CI_STEPS=docs,features cargo xtask ci`.
    let only = std::env::var("XTASK_CI_STEPS").ok();
    for (i, step) in STEPS.iter().enumerate() {
        if let Some(only) = &only
            && !only.split(',').any(|s| s.trim() == step.name)
        {
            continue;
        }
        progress!("==== ci step {}/{}: {} ====", i + 1, STEPS.len(), step.name);
        let step_started = Instant::now();
        let result = (step.run)();
        let secs = step_started.elapsed().as_secs_f64();
        if let Err(err) = result {
            summary(&done, Some((step.name, secs)), started);
            bail!("ci step `{}` failed: {err:#}", step.name);
        }
        done.push((step.name, secs));
    }
    summary(&done, None, started);
    Ok(())
}

fn summary(done: &[(&str, f64)], failed: Option<(&str, f64)>, started: Instant) {
    progress!("==== ci summary ====");
    for (name, secs) in done {
        progress!("  ok      {name:<9} {secs:>7.1}s");
    }
    if let Some((name, secs)) = failed {
        progress!("  FAILED  {name:<9} {secs:>7.1}s");
    }
    let ran =
        |name: &str| done.iter().any(|(n, _)| *n == name) || failed.is_some_and(|(n, _)| n == name);
    for step in STEPS.iter().filter(|s| !ran(s.name)) {
        progress!("  not run {:<9}", step.name);
    }
    let total = started.elapsed().as_secs_f64();
    match failed {
        None => progress!("ci passed: {} steps in {total:.1}s", done.len()),
        Some((name, _)) => progress!("ci FAILED at step `{name}` after {total:.1}s"),
    }
}
