//! etcd scenarios: Python tooz 9.1.0 (etcd3gw driver, `etcd3+http://…?api_version=v3`)
//! and a Rust coordinator on one etcd server. The scenario itself lives with the driver, as the test
//! `crates/tooz-etcd/tests/python_interop.rs`, which skips unless it is given a Python with
//! tooz; here it is run with the interop virtualenv and the server `backends up` started.
//! It checks, both ways: groups, members, capabilities (byte for byte), exclusive locks
//! (and a Rust shared hold blocking a Python acquirer), member departure, and that
//! Python's and Rust's partitioners agree on owners. Python's etcd3gw driver has no
//! leader election, so leadership is not shared.

use std::path::Path;

use anyhow::Result;

use super::harness::Report;
use crate::{drivers, process};

pub(crate) fn run(root: &Path, python: &Path, report: &mut Report) -> Result<()> {
    let etcd = drivers::DRIVERS
        .iter()
        .copied()
        .filter(|d| d.name == "etcd")
        .collect::<Vec<_>>();
    let env = drivers::start_servers(root, &etcd)?;
    report.scenario("etcd", "python_and_rust_share_one_server", || {
        let mut cmd = process::cargo();
        cmd.args([
            "test",
            "-q",
            "-p",
            "tooz-etcd",
            "--test",
            "python_interop",
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
