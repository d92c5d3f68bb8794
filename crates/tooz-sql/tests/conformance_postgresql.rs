//! The shared conformance suite (`tooz-conformance`) against the PostgreSQL driver.
//!
//! ```text
//! TOOZ_TEST_POSTGRESQL_URL=postgresql://tooz:tooz@127.0.0.1:5432/tooz cargo test -p tooz-sql --test conformance_postgresql
//! ```
//!
//! Without `TOOZ_TEST_POSTGRESQL_URL` the run is skipped with a message (and fails
//! when `TOOZ_REQUIRE_BACKENDS=1`). The suite gives every case unique group, member
//! and lock names. Short lease (`timeout=2`). Name filters work as with libtest
//! (`-- locks::`).

use std::time::Duration;

use tooz_conformance::{REQUIRE_BACKENDS_ENV, Setup, WORKER_ENV};
use tooz_core::Registry;

const URL_ENV: &str = "TOOZ_TEST_POSTGRESQL_URL";

fn main() {
    let listing = std::env::args().any(|a| a == "--list");
    let worker = std::env::var_os(WORKER_ENV).is_some();
    let url = match std::env::var(URL_ENV) {
        Ok(u) if !u.trim().is_empty() => u.trim().to_string(),
        _ if listing || worker => "postgresql://tooz:tooz@127.0.0.1:5432/tooz".to_string(),
        _ => {
            if std::env::var(REQUIRE_BACKENDS_ENV).is_ok_and(|v| v == "1") {
                println!(
                    "FAILED: {URL_ENV} is not set and {REQUIRE_BACKENDS_ENV}=1: no PostgreSQL server to run the conformance suite against"
                );
                std::process::exit(1);
            }
            println!(
                "SKIPPED: {URL_ENV} is not set; no conformance case ran. Set it (e.g. postgresql://tooz:tooz@127.0.0.1:5432/tooz) or start the backends with cargo xtask backends up."
            );
            std::process::exit(0);
        }
    };
    tooz_conformance::main(Setup {
        driver: "postgresql".into(),
        url,
        registry: Registry::new().with(tooz_sql::POSTGRESQL),
        options: vec![("timeout".into(), "2".into())],
        lease: Duration::from_secs(2),
    })
}
