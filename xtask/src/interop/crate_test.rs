//! Networked drivers (redis, zookeeper, etcd, memcached, postgresql, mysql): the scenario lives
//! with the driver, as its crate's test `tests/python_interop.rs` (`python_interop_<driver>.rs`
//! in a crate serving several drivers), which drives Python tooz 9.1.0 (with the
//! driver's Python client library) and a Rust coordinator on one server and checks both
//! ways what the two share (each test's header lists it). The test skips unless it is
//! given a Python with tooz; here it runs with the interop virtualenv, against the server
//! `backends up` started.

use std::path::Path;

use anyhow::{Result, bail};

use super::harness::Report;
use crate::{
    drivers::{self, Driver},
    process,
};

pub(crate) fn run(root: &Path, python: &Path, driver: &Driver, report: &mut Report) -> Result<()> {
    let target = driver.test_target("python_interop");
    let test = driver
        .manifest_dir(root)
        .join("tests")
        .join(format!("{target}.rs"));
    if !test.is_file() {
        bail!(
            "the driver table marks `{}` as having interop scenarios, but {} is missing",
            driver.name,
            test.display()
        );
    }
    let env = drivers::start_servers(root, std::slice::from_ref(driver))?;
    report.scenario(driver.name, "python_and_rust_share_one_server", || {
        let mut cmd = process::cargo();
        cmd.args([
            "test",
            "-q",
            "-p",
            driver.krate,
            "--test",
            &target,
            "--",
            "--nocapture",
        ])
        .envs(env.iter().cloned())
        .env("TOOZ_TEST_PYTHON", python)
        .env("TOOZ_REQUIRE_BACKENDS", "1");
        process::run(&mut cmd)
    });
    Ok(())
}
