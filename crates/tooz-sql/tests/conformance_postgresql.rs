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

use tooz_conformance::Setup;
use tooz_conformance::testkit::suite_url;
use tooz_core::Registry;

const URL_ENV: &str = "TOOZ_TEST_POSTGRESQL_URL";

fn main() {
    tooz_conformance::main(Setup {
        driver: "postgresql".into(),
        url: suite_url(
            URL_ENV,
            "postgresql://tooz:tooz@127.0.0.1:5432/tooz",
            "PostgreSQL",
        ),
        registry: Registry::new().with(tooz_sql::POSTGRESQL),
        options: vec![("timeout".into(), "2".into())],
        lease: Duration::from_secs(2),
    })
}
