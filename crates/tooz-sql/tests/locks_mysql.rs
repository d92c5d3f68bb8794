//! Concurrent acquires from one MySQL/MariaDB coordinator. Attempts that queue for
//! the session connection are served in batches (one round trip and one commit per
//! batch): every free name is granted, one name is still exclusive within the
//! coordinator, another client cannot take what the batch granted, and each grant's
//! fencing token is larger than the name's previous one.
//!
//! Needs `TOOZ_TEST_MYSQL_URL`; skipped (printing why) without it unless
//! `TOOZ_REQUIRE_BACKENDS=1`.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use futures_util::future::try_join_all;
use tooz_conformance::testkit::{Backend, unique};
use tooz_core::Wait;

const URL_ENV: &str = "TOOZ_TEST_MYSQL_URL";

/// The server, or `None` when the test is skipped; every call bounded by 30 s.
fn server(test: &str) -> Option<Backend> {
    Backend::from_env(URL_ENV, tooz_sql::MYSQL, test).map(|b| b.limit(Duration::from_secs(30)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_acquires_from_one_coordinator() {
    let Some(db) = server("concurrent_acquires_from_one_coordinator") else {
        return;
    };
    let p = unique("my-cc");
    let names: Vec<String> = (0..300).map(|i| format!("{p}-{i}")).collect();
    let a = db.started("a").await;
    let b = db.started("b").await;
    // Each name twice: two handles of one name in one coordinator exclude each other.
    let locks: Vec<_> = names
        .iter()
        .chain(names.iter())
        .map(|n| a.get_lock(n.as_str()).unwrap())
        .collect();
    let n = names.len();
    let mut last = vec![0u64; n];
    for round in 0..3 {
        let guards = db
            .timed(
                "acquires",
                try_join_all(locks.iter().map(|l| l.guard(Wait::No))),
            )
            .await
            .unwrap();
        for i in 0..n {
            let (g1, g2) = (&guards[i], &guards[n + i]);
            assert!(
                g1.is_some() != g2.is_some(),
                "round {round}, {}: exactly one of two handles holds it ({}, {})",
                names[i],
                g1.is_some(),
                g2.is_some()
            );
            let t = g1.as_ref().or(g2.as_ref()).unwrap().token().0;
            assert!(
                t > last[i],
                "round {round}, {}: token {t} after {}",
                names[i],
                last[i]
            );
            last[i] = t;
        }
        // Another client gets none of them while they are held.
        for name in names.iter().step_by(37) {
            let l = b.get_lock(name.as_str()).unwrap();
            assert!(!db.timed("b", l.acquire(Wait::No)).await.unwrap(), "{name}");
        }
        for g in guards.into_iter().flatten() {
            assert!(g.release().await.unwrap());
        }
    }
    // All given back.
    for name in names.iter().step_by(37) {
        let l = b.get_lock(name.as_str()).unwrap();
        assert!(db.timed("b", l.acquire(Wait::No)).await.unwrap(), "{name}");
        assert!(l.release().await.unwrap());
    }
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}
