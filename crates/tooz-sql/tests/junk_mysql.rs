//! Bad data another client wrote into the shared tables (property tests against
//! the MySQL/MariaDB server), as `junk_postgresql.rs` does for PostgreSQL: junk
//! capabilities and times in a member row, junk leader rows, fencing counters at
//! any `BIGINT` (negative, `i64::MAX`), and junk rows in `tooz_readers` (the
//! shared-hold registry only this crate writes). The rule: a clear error or a
//! sensible value; never a panic or a hang; tokens never go back (a counter that
//! cannot advance restarts); the rest of the group stays readable; nothing stays
//! held after a grant. The property is `support/junk.rs`.
//!
//! Needs `TOOZ_TEST_MYSQL_URL`; skipped (printing why) without it unless
//! `TOOZ_REQUIRE_BACKENDS=1`.

#![allow(clippy::unwrap_used)]

#[path = "support/junk.rs"]
mod junk;

#[test]
fn junk_rows() {
    junk::junk_rows(junk::Dialect::Mysql, "junk_rows");
}
