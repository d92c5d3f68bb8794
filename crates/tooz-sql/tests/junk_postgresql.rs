//! Bad data another client wrote into the shared tables (property tests against
//! the PostgreSQL server): junk capabilities and times in a member row, junk
//! leader rows, fencing counters at any `bigint` (negative, `i64::MAX`). The rule:
//! a clear error or a sensible value; never a panic or a hang; tokens never go
//! back; the rest of the group stays readable. The property is `support/junk.rs`,
//! which `junk_mysql.rs` runs too.
//!
//! Needs `TOOZ_TEST_POSTGRESQL_URL`; skipped (printing why) without it unless
//! `TOOZ_REQUIRE_BACKENDS=1`.

#![allow(clippy::unwrap_used)]

#[path = "support/junk.rs"]
mod junk;

#[test]
fn junk_rows() {
    junk::junk_rows(junk::Dialect::Postgresql, "junk_rows");
}
