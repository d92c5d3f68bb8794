//! ZooKeeper scenarios: Python tooz 9.1.0 (with kazoo) and a Rust coordinator on one
//! ZooKeeper server. The scenario itself lives with the driver, as the test
//! `crates/tooz-zookeeper/tests/python_interop.rs`, which skips unless it is given a Python
//! with tooz and kazoo; here it is run with the interop virtualenv and the server
//! `backends up` started. It checks, both ways: groups, members, capabilities (byte for
//! byte), member info times, locks (each side blocked by the other's holder, and a waiter
//! on each side woken by the other's release, a Rust holder's fencing token above the
//! Python holder's czxid), leadership (`get_leader` names the Python
//! leader; a Python leader blocks a Rust candidate and the reverse), member departure on
//! stop, and that Python's and Rust's partitioners agree on owners.

use std::path::Path;

use anyhow::Result;

use super::harness::Report;
use crate::{drivers, process};

pub(crate) fn run(root: &Path, python: &Path, report: &mut Report) -> Result<()> {
    let zookeeper = drivers::DRIVERS
        .iter()
        .copied()
        .filter(|d| d.name == "zookeeper")
        .collect::<Vec<_>>();
    let env = drivers::start_servers(root, &zookeeper)?;
    report.scenario("zookeeper", "python_and_rust_share_one_server", || {
        let mut cmd = process::cargo();
        cmd.args([
            "test",
            "-q",
            "-p",
            "tooz-zookeeper",
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
