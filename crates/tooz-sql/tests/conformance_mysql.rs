//! The shared conformance suite (`tooz-conformance`) against the MySQL (MariaDB) driver.
//!
//! ```text
//! TOOZ_TEST_MYSQL_URL=mysql://tooz:tooz@127.0.0.1:3306/tooz cargo test -p tooz-sql --test conformance_mysql
//! ```
//!
//! Without `TOOZ_TEST_MYSQL_URL` the run is skipped with a message (and fails
//! when `TOOZ_REQUIRE_BACKENDS=1`). The suite gives every case unique group, member
//! and lock names. Short lease (`timeout=2`). Name filters work as with libtest
//! (`-- locks::`).

use std::time::Duration;

use tooz_conformance::Setup;
use tooz_conformance::testkit::suite_url;
use tooz_core::Registry;

const URL_ENV: &str = "TOOZ_TEST_MYSQL_URL";

fn main() {
    tooz_conformance::main(Setup {
        driver: "mysql".into(),
        url: suite_url(URL_ENV, "mysql://tooz:tooz@127.0.0.1:3306/tooz", "MySQL"),
        registry: Registry::new().with(tooz_sql::MYSQL),
        options: vec![("timeout".into(), "2".into())],
        lease: Duration::from_secs(2),
    })
}
