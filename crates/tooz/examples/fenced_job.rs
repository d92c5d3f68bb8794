//! A job under a lock, writing to a resource that rejects stale fencing tokens.
//!
//! ```sh
//! cargo run -p tooz --example fenced_job -- memory://fenced postgresql://tooz:tooz@127.0.0.1:5432/tooz
//! cargo run -p tooz --example fenced_job -- redis://127.0.0.1:6379 postgresql://tooz:tooz@127.0.0.1:5432/tooz
//! ```
//!
//! A lock alone cannot stop a holder that was paused (a GC pause, a frozen VM, a
//! partition) from writing after its lock expired and someone else took it. The
//! resource must check: every grant carries a fencing token that increases with each
//! grant, and the resource (here a PostgreSQL row) accepts a write only with a token
//! above the last one it accepted — one `UPDATE … WHERE token < $token`.
//!
//! The story: worker A takes the lock and is "paused" before writing; its lock goes
//! (here A's guard is released on its behalf, standing in for an expiry); worker B
//! takes the lock with a higher token and writes; then A wakes up and writes with its
//! old token, and PostgreSQL rejects it.

use sqlx::Connection;
use tooz::{FencingToken, Wait};

/// Writes `value` if `token` is newer than the last accepted one; whether it was.
async fn fenced_write(
    db: &mut sqlx::PgConnection,
    token: FencingToken,
    value: &str,
) -> sqlx::Result<bool> {
    let token = i64::try_from(token.0).unwrap_or(i64::MAX);
    let done = sqlx::query(
        "UPDATE tooz_example_resource SET value = $1, token = $2 WHERE id = 1 AND token < $2",
    )
    .bind(value)
    .bind(token)
    .execute(&mut *db)
    .await?;
    Ok(done.rows_affected() == 1)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .unwrap_or_else(|| "memory://fenced-job-example".to_string());
    let pg = args
        .next()
        .or_else(|| std::env::var("TOOZ_TEST_POSTGRESQL_URL").ok())
        .ok_or("usage: fenced_job COORDINATION_URL POSTGRESQL_URL")?;

    let mut db = sqlx::PgConnection::connect(&pg).await?;
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS tooz_example_resource \
         (id int PRIMARY KEY, value text NOT NULL, token bigint NOT NULL)",
    )
    .execute(&mut db)
    .await?;
    // Start from a row that accepts any token (tokens of some backends are large:
    // the memcached and Redis counters start at the server clock in µs).
    sqlx::query(
        "INSERT INTO tooz_example_resource VALUES (1, 'initial', -1) \
         ON CONFLICT (id) DO UPDATE SET value = 'initial', token = -1",
    )
    .execute(&mut db)
    .await?;

    let a = tooz::connect(&url, "worker-a")?;
    let b = tooz::connect(&url, "worker-b")?;
    a.start(true).await?;
    b.start(true).await?;

    let guard_a = a
        .get_lock("nightly-job")?
        .guard(Wait::No)
        .await?
        .ok_or("the lock is taken")?;
    let token_a = guard_a.token();
    println!(
        "A holds the lock with token {}; A pauses before writing",
        token_a.0
    );
    // A's lock goes while it is paused (an expiry would do the same).
    guard_a.release().await?;

    let guard_b = b
        .get_lock("nightly-job")?
        .guard(Wait::No)
        .await?
        .ok_or("the lock is taken")?;
    let token_b = guard_b.token();
    println!("B holds the lock with token {}", token_b.0);
    assert!(token_b > token_a, "tokens increase with each grant");
    let accepted = fenced_write(&mut db, token_b, "written by B").await?;
    println!(
        "B writes: {}",
        if accepted { "accepted" } else { "REJECTED" }
    );
    assert!(accepted);
    guard_b.release().await?;

    let accepted = fenced_write(&mut db, token_a, "written by A after its pause").await?;
    println!(
        "A wakes up and writes with token {}: {}",
        token_a.0,
        if accepted {
            "accepted"
        } else {
            "rejected (stale token)"
        }
    );
    assert!(!accepted, "the stale write must be rejected");

    let value: String = sqlx::query_scalar("SELECT value FROM tooz_example_resource WHERE id = 1")
        .fetch_one(&mut db)
        .await?;
    println!("the resource holds: {value:?}");
    a.stop().await?;
    b.stop().await?;
    Ok(())
}
