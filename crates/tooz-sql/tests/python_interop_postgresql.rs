//! Against real Python tooz 9.1 (psycopg2): a Python process and a Rust coordinator
//! on one PostgreSQL database exclude each other's locks both ways (our shared holds
//! included), and a waiter on either side gets the lock when the other releases it.
//!
//! Needs `TOOZ_TEST_POSTGRESQL_URL` and `TOOZ_TEST_PYTHON` (a Python with `tooz` and
//! `psycopg2`, e.g. the virtualenv `cargo xtask interop` builds); skipped otherwise.

#![allow(clippy::unwrap_used)]

#[path = "support/interop.rs"]
mod interop;

#[tokio::test]
async fn python_and_rust_locks() {
    interop::python_and_rust_locks(tooz_sql::POSTGRESQL, "TOOZ_TEST_POSTGRESQL_URL", true, true)
        .await;
}
