//! `cargo xtask interop --driver NAME|all`: Python tooz and Rust pointed at one backend
//! must see each other's groups, members, capabilities, locks and partition owners.
//!
//! Python tooz runs in a virtualenv holding it at the exact version the project matches
//! ([`venv`]). For the file driver a checked-in script (`xtask/interop/file_scenarios.py`)
//! and the `tooz` binary built from this workspace are the two sides ([`file`]); for the
//! networked drivers the scenario is the driver crate's `python_interop` test
//! ([`crate_test`]). Each scenario reports PASS or FAIL with what each side saw; the run
//! ends with `N passed, N failed`.

mod crate_test;
mod file;
mod harness;
pub(crate) mod venv;

use std::{path::PathBuf, process::Stdio};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::{
    drivers::{Driver, DriverSelection},
    flags,
    process::{self, progress},
};

pub(crate) fn run(flags: &flags::Interop) -> Result<()> {
    let root = process::workspace_root();
    let drivers = select(&flags.driver, &root)?;

    // Each driver's scenarios run with its virtualenv (Consul's holds tooz 8.1.0).
    let python_for = |driver: &str| venv::ensure_for(driver, flags.python.as_deref());
    let tooz = build_cli()?;
    let scratch = process::target_dir()
        .join("interop")
        .join(format!("run-{}", std::process::id()));
    harness::fresh_dir(&scratch)?;

    let mut report = harness::Report::default();
    for driver in &drivers {
        let dir = scratch.join(driver.name);
        harness::fresh_dir(&dir)?;
        progress!(
            "interop: driver `{}`: Python tooz vs {} in {}",
            driver.name,
            tooz.display(),
            dir.display()
        );
        let python = python_for(driver.name)?;
        match driver.name {
            "file" => file::run(&root, &python, &tooz, &dir, &mut report)?,
            _ => crate_test::run(&root, &python, driver, &mut report)?,
        }
    }

    println!("{}", report.closing_line());
    let failed = report.failed();
    if failed.is_empty() && !flags.keep {
        let _ = std::fs::remove_dir_all(&scratch);
    } else {
        progress!("interop: scratch directory kept: {}", scratch.display());
    }
    if !failed.is_empty() {
        bail!(
            "{} interop scenario(s) failed: {}",
            failed.len(),
            failed.join(", ")
        );
    }
    Ok(())
}

/// The drivers to run: those selected whose crate exists and that have scenarios.
fn select(selection: &DriverSelection, root: &std::path::Path) -> Result<Vec<Driver>> {
    let present = selection.resolve(root)?;
    let (with, without): (Vec<Driver>, Vec<Driver>) = present.into_iter().partition(|d| d.interop);
    if let DriverSelection::One(name) = selection
        && with.is_empty()
    {
        bail!("driver `{name}` has no interop scenarios yet");
    }
    for driver in &without {
        progress!(
            "interop: driver `{}` has no interop scenarios yet; not run",
            driver.name
        );
    }
    if with.is_empty() {
        bail!("no driver with interop scenarios is present in the workspace");
    }
    Ok(with)
}

/// Builds the `tooz` CLI and returns the path of its executable, as cargo reports it.
fn build_cli() -> Result<PathBuf> {
    progress!("interop: building the tooz CLI (cargo build -p tooz-cli)");
    let mut cmd = process::cargo();
    cmd.args([
        "build",
        "-p",
        "tooz-cli",
        "--message-format=json-render-diagnostics",
    ])
    .stdout(Stdio::piped());
    let line = process::display(&cmd);
    let out = cmd
        .spawn()
        .and_then(|child| child.wait_with_output())
        .with_context(|| format!("could not run `{line}`"))?;
    if !out.status.success() {
        bail!("`{line}` failed ({})", out.status);
    }
    let mut found = None;
    for msg in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<Value>(msg) else {
            continue;
        };
        let is_tooz_bin = msg["reason"] == "compiler-artifact"
            && msg["target"]["name"] == "tooz"
            && msg["target"]["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "bin"));
        if let (true, Some(exe)) = (is_tooz_bin, msg["executable"].as_str()) {
            found = Some(PathBuf::from(exe));
        }
    }
    found.context("`cargo build -p tooz-cli` produced no `tooz` executable")
}
