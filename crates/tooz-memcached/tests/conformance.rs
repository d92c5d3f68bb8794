//! The shared conformance suite (`tooz-conformance`) against the memcached driver.
//!
//! ```text
//! TOOZ_TEST_MEMCACHED_URL=memcached://127.0.0.1:11211 cargo test -p tooz-memcached --test conformance
//! ```
//!
//! Without `TOOZ_TEST_MEMCACHED_URL` the run is skipped with a message (and fails
//! when `TOOZ_REQUIRE_BACKENDS=1`). memcached has no namespaces (nor has Python
//! tooz's layout): the suite gives every case unique group, member and lock names.
//! Short timeouts (`timeout=2`). Name filters work as with libtest (`-- locks::`).

use std::time::Duration;

use tooz_conformance::{REQUIRE_BACKENDS_ENV, Setup, WORKER_ENV};
use tooz_core::Registry;

const URL_ENV: &str = "TOOZ_TEST_MEMCACHED_URL";

fn main() {
    let listing = std::env::args().any(|a| a == "--list");
    let worker = std::env::var_os(WORKER_ENV).is_some();
    let url = match std::env::var(URL_ENV) {
        Ok(u) if !u.trim().is_empty() => u.trim().to_string(),
        _ if listing || worker => "memcached://127.0.0.1:11211".to_string(),
        _ => {
            if std::env::var(REQUIRE_BACKENDS_ENV).is_ok_and(|v| v == "1") {
                println!(
                    "FAILED: {URL_ENV} is not set and {REQUIRE_BACKENDS_ENV}=1: no memcached server to run the conformance suite against"
                );
                std::process::exit(1);
            }
            println!(
                "SKIPPED: {URL_ENV} is not set; no conformance case ran. Set it (e.g. memcached://127.0.0.1:11211) or start the backends with cargo xtask backends up."
            );
            std::process::exit(0);
        }
    };
    tooz_conformance::main(Setup {
        driver: "memcached".into(),
        url,
        registry: Registry::new().with(tooz_memcached::DRIVER),
        options: vec![("timeout".into(), "2".into())],
        // How long a member or holder that stopped renewing may still be seen: its
        // keys are written with `T4` for `timeout=2` (two seconds for memcached's
        // coarse clock) and go when the server's clock reading reaches the one at
        // the write plus 4, up to a second after 4 s.
        lease: Duration::from_secs(4),
    })
}
