//! The shared conformance suite (`tooz-conformance`) against the zookeeper driver.
//!
//! ```text
//! TOOZ_TEST_ZOOKEEPER_URL=zookeeper://127.0.0.1:2181 cargo test -p tooz-zookeeper --test conformance
//! ```
//!
//! Without `TOOZ_TEST_ZOOKEEPER_URL` the run is skipped with a message (and fails
//! when `TOOZ_REQUIRE_BACKENDS=1`). Every run uses a fresh namespace znode, put in
//! the URL so that worker processes share it, and the shortest session timeout a
//! default server grants (`timeout=4`: twice its 2 s tick). Name filters work as
//! with libtest (`-- locks::`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tooz_conformance::{REQUIRE_BACKENDS_ENV, Setup, WORKER_ENV};
use tooz_core::Registry;

const URL_ENV: &str = "TOOZ_TEST_ZOOKEEPER_URL";

fn with_namespace(base: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let sep = if base.contains('?') { '&' } else { '?' };
    format!(
        "{base}{sep}namespace=tooz-conformance-{}-{:x}",
        std::process::id(),
        nanos
    )
}

fn main() {
    let listing = std::env::args().any(|a| a == "--list");
    let worker = std::env::var_os(WORKER_ENV).is_some();
    let url = match std::env::var(URL_ENV) {
        Ok(u) if !u.trim().is_empty() => with_namespace(u.trim()),
        _ if listing || worker => "zookeeper://127.0.0.1:2181".to_string(),
        _ => {
            if std::env::var(REQUIRE_BACKENDS_ENV).is_ok_and(|v| v == "1") {
                println!(
                    "FAILED: {URL_ENV} is not set and {REQUIRE_BACKENDS_ENV}=1: no ZooKeeper server to run the conformance suite against"
                );
                std::process::exit(1);
            }
            println!(
                "SKIPPED: {URL_ENV} is not set; no conformance case ran. Set it (e.g. zookeeper://127.0.0.1:2181) or start the backends with cargo xtask backends up."
            );
            std::process::exit(0);
        }
    };
    tooz_conformance::main(Setup {
        driver: "zookeeper".into(),
        url,
        registry: Registry::new().with(tooz_zookeeper::DRIVER),
        options: vec![("timeout".into(), "4".into())],
        lease: Duration::from_secs(4),
    })
}
