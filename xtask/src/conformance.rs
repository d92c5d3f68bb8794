//! `cargo xtask conformance --driver NAME|all`: runs each selected driver crate's
//! `tests/conformance.rs` (`tests/conformance_<driver>.rs` in a crate serving several
//! drivers; a `harness = false` binary printing the suite's table) with its
//! output streamed, and fails if any of them failed.

use anyhow::{Result, bail};

use crate::{
    drivers::Driver,
    flags,
    process::{self, progress},
};

pub(crate) fn run(flags: &flags::Conformance) -> Result<()> {
    let root = process::workspace_root();
    let drivers = flags.driver.resolve(&root)?;
    if drivers.is_empty() {
        bail!("no driver crate is present in the workspace; nothing to run");
    }
    let mut failed = Vec::new();
    for driver in &drivers {
        progress!(
            "conformance: driver `{}` (crate {})",
            driver.name,
            driver.krate
        );
        if let Err(err) = run_one(&root, driver) {
            progress!("conformance: driver `{}` FAILED: {err:#}", driver.name);
            failed.push(driver.name);
        }
    }
    let names: Vec<_> = drivers.iter().map(|d| d.name).collect();
    if failed.is_empty() {
        progress!("conformance: all passed ({})", names.join(", "));
        Ok(())
    } else {
        bail!(
            "conformance failed for {} of {} driver(s): {}",
            failed.len(),
            drivers.len(),
            failed.join(", ")
        )
    }
}

fn run_one(root: &std::path::Path, driver: &Driver) -> Result<()> {
    let target = driver.test_target("conformance");
    let test = driver
        .manifest_dir(root)
        .join("tests")
        .join(format!("{target}.rs"));
    if !test.is_file() {
        bail!(
            "crate {} has no conformance test ({} is missing)",
            driver.krate,
            test.display()
        );
    }
    let env = crate::drivers::start_servers(root, std::slice::from_ref(driver))?;
    let mut cmd = process::cargo();
    cmd.args(["test", "-p", driver.krate, "--test", &target]);
    cmd.envs(env);
    // Asking for a driver's suite means running it: a missing backend fails rather than
    // skips, unless the caller chose otherwise.
    if std::env::var_os("TOOZ_REQUIRE_BACKENDS").is_none() {
        cmd.env("TOOZ_REQUIRE_BACKENDS", "1");
    }
    process::run(&mut cmd)
}
