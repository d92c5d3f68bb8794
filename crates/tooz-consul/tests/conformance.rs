//! The shared conformance suite (`tooz-conformance`) against the Consul driver.
//!
//! ```text
//! TOOZ_TEST_CONSUL_URL=consul://127.0.0.1:8500 cargo test -p tooz-consul --test conformance
//! ```
//!
//! Without `TOOZ_TEST_CONSUL_URL` the run is skipped with a message (and fails
//! when `TOOZ_REQUIRE_BACKENDS=1`). The suite gives every case unique group,
//! member and lock names. Sessions get Consul's shortest TTL (`ttl=10`; the agent
//! refuses less) and a 1 s lock delay; Consul may keep a session up to twice its
//! TTL, so the suite's lease is 20 s. Name filters work as with libtest
//! (`-- locks::`).

use std::time::Duration;

use tooz_conformance::{REQUIRE_BACKENDS_ENV, Setup, WORKER_ENV};
use tooz_core::Registry;

const URL_ENV: &str = "TOOZ_TEST_CONSUL_URL";

fn main() {
    let listing = std::env::args().any(|a| a == "--list");
    let worker = std::env::var_os(WORKER_ENV).is_some();
    let url = match std::env::var(URL_ENV) {
        Ok(u) if !u.trim().is_empty() => u.trim().to_string(),
        _ if listing || worker => "consul://127.0.0.1:8500".to_string(),
        _ => {
            if std::env::var(REQUIRE_BACKENDS_ENV).is_ok_and(|v| v == "1") {
                println!(
                    "FAILED: {URL_ENV} is not set and {REQUIRE_BACKENDS_ENV}=1: no Consul agent to run the conformance suite against"
                );
                std::process::exit(1);
            }
            println!(
                "SKIPPED: {URL_ENV} is not set; no conformance case ran. Set it (e.g. consul://127.0.0.1:8500) or start the backends with cargo xtask backends up."
            );
            std::process::exit(0);
        }
    };
    tooz_conformance::main(Setup {
        driver: "consul".into(),
        url,
        registry: Registry::new().with(tooz_consul::DRIVER),
        options: vec![
            ("ttl".into(), "10".into()),
            ("lock_delay".into(), "1".into()),
            ("timeout".into(), "3".into()),
        ],
        lease: Duration::from_secs(20),
    })
}
