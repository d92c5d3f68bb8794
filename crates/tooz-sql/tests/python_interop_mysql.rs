//! Against real Python tooz 9.1 (PyMySQL): a Python process and a Rust coordinator
//! on one MySQL/MariaDB database exclude each other's locks both ways (a 100-byte
//! name too: MariaDB takes it as it is), and a waiter on either side gets the lock
//! when the other releases it.
//!
//! Needs `TOOZ_TEST_MYSQL_URL` (a MariaDB server) and `TOOZ_TEST_PYTHON` (a Python
//! with `tooz` and `PyMySQL`, e.g. the virtualenv `cargo xtask interop` builds);
//! skipped otherwise.

#![allow(clippy::unwrap_used)]

#[path = "support/interop.rs"]
mod interop;

#[tokio::test]
async fn python_and_rust_locks() {
    interop::python_and_rust_locks(tooz_sql::MYSQL, "TOOZ_TEST_MYSQL_URL", true, false).await;
}
