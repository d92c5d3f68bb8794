//! The shared conformance suite (`tooz-conformance`) against the etcd driver.
//!
//! ```text
//! TOOZ_TEST_ETCD_URL=etcd3+http://127.0.0.1:2379 cargo test -p tooz-etcd --test conformance
//! ```
//!
//! Without `TOOZ_TEST_ETCD_URL` the run is skipped with a message (and fails when
//! `TOOZ_REQUIRE_BACKENDS=1`). Every name the suite makes carries a random prefix
//! per run, so runs on a shared etcd do not collide; timeouts are short
//! (`timeout=2`). Name filters work as with libtest (`-- locks::`).

use std::time::Duration;

use tooz_conformance::Setup;
use tooz_conformance::testkit::suite_url;
use tooz_core::Registry;

const URL_ENV: &str = "TOOZ_TEST_ETCD_URL";

fn main() {
    tooz_conformance::main(Setup {
        driver: "etcd3".into(),
        url: suite_url(URL_ENV, "etcd3+http://127.0.0.1:2379", "etcd"),
        registry: Registry::new().with(tooz_etcd::DRIVER),
        options: vec![("timeout".into(), "2".into())],
        lease: Duration::from_secs(2),
    })
}
