//! PostgreSQL lock keys shared by distinct names. A lock name's advisory key is the
//! first two bytes of its MD5 (Python tooz's key: 65,536 slots), so among 1,000 names
//! a handful share a key. One coordinator must still get every free name (it used to
//! refuse the second name of a key its session already held: 6 of 1,000 concurrent
//! acquires in the bench's `scale_concurrent`), while one name stays exclusive and
//! another client still cannot take a key this coordinator holds.
//!
//! Needs `TOOZ_TEST_POSTGRESQL_URL`; skipped (printing why) without it unless
//! `TOOZ_REQUIRE_BACKENDS=1`.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::time::Duration;

use futures_util::future::try_join_all;
use md5::{Digest, Md5};
use tooz_conformance::testkit::{Backend, unique};
use tooz_core::Wait;

const URL_ENV: &str = "TOOZ_TEST_POSTGRESQL_URL";

/// Python tooz's advisory key of a name.
fn key(name: &str) -> (u8, u8) {
    let d = Md5::digest(name.as_bytes());
    (d[0], d[1])
}

/// `n` names `{prefix}-{i}`, and two of them (indices) that share a key.
fn names_with_collision(prefix: &str, n: usize) -> (Vec<String>, usize, usize) {
    let mut seen: HashMap<(u8, u8), usize> = HashMap::new();
    let mut names = Vec::new();
    let mut pair = None;
    for i in 0.. {
        let name = format!("{prefix}-{i}");
        if let Some(&j) = seen.get(&key(&name)) {
            if pair.is_none() {
                pair = Some((j, i));
            }
        } else {
            seen.insert(key(&name), i);
        }
        names.push(name);
        if names.len() >= n
            && let Some((a, b)) = pair
        {
            return (names, a, b);
        }
    }
    unreachable!("the loop returns")
}

/// The server, or `None` when the test is skipped; every call bounded by 20 s.
fn server(test: &str) -> Option<Backend> {
    Backend::from_env(URL_ENV, tooz_sql::POSTGRESQL, test).map(|b| b.limit(Duration::from_secs(20)))
}

#[tokio::test]
async fn names_sharing_a_key_on_one_coordinator() {
    let Some(db) = server("names_sharing_a_key_on_one_coordinator") else {
        return;
    };
    let (names, i, j) = names_with_collision(&unique("pg-key"), 0);
    let (n1, n2) = (&names[i], &names[j]);
    assert_eq!(key(n1), key(n2));
    let a = db.started("a").await;
    let b = db.started("b").await;
    let a1 = a.get_lock(n1.as_str()).unwrap();
    let a2 = a.get_lock(n2.as_str()).unwrap();
    let a1_again = a.get_lock(n1.as_str()).unwrap();
    let (b1, b2) = (
        b.get_lock(n1.as_str()).unwrap(),
        b.get_lock(n2.as_str()).unwrap(),
    );

    let g1 = db.timed("a1", a1.guard_or_fail(Wait::No)).await.unwrap();
    let g2 = db.timed("a2", a2.guard_or_fail(Wait::No)).await.unwrap();
    // One name is still exclusive within the coordinator.
    assert!(
        !db.timed("a1 again", a1_again.acquire(Wait::No))
            .await
            .unwrap()
    );
    // Another client cannot take either name (they share the key a holds).
    assert!(!db.timed("b1", b1.acquire(Wait::No)).await.unwrap());
    assert!(!db.timed("b2", b2.acquire(Wait::No)).await.unwrap());
    // Giving back one name keeps the key held for the other.
    assert!(g1.release().await.unwrap());
    assert!(!db.timed("b1", b1.acquire(Wait::No)).await.unwrap());
    // The first name is free again within the coordinator.
    let g1 = db
        .timed("a1 again", a1_again.guard_or_fail(Wait::No))
        .await
        .unwrap();
    assert!(g1.release().await.unwrap());
    assert!(g2.release().await.unwrap());
    // Both names given back: the key is free.
    assert!(db.timed("b1", b1.acquire(Wait::No)).await.unwrap());
    assert!(b1.release().await.unwrap());
    assert!(db.timed("b2", b2.acquire(Wait::No)).await.unwrap());
    assert!(b2.release().await.unwrap());
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

/// The bench's `scale_concurrent` in small: concurrent acquires of distinct free
/// names (two of them sharing a key) from one coordinator are all granted.
#[tokio::test]
async fn concurrent_distinct_names_all_granted() {
    let Some(db) = server("concurrent_distinct_names_all_granted") else {
        return;
    };
    let (names, _, _) = names_with_collision(&unique("pg-cc"), 200);
    let c = db.started("cc").await;
    let locks: Vec<_> = names
        .iter()
        .map(|n| c.get_lock(n.as_str()).unwrap())
        .collect();
    for _ in 0..2 {
        let got = db
            .timed(
                "acquires",
                try_join_all(locks.iter().map(|l| l.acquire(Wait::No))),
            )
            .await
            .unwrap();
        let refused: Vec<&String> = names
            .iter()
            .zip(&got)
            .filter(|(_, g)| !**g)
            .map(|(n, _)| n)
            .collect();
        assert!(refused.is_empty(), "free locks refused: {refused:?}");
        let released = db
            .timed("releases", try_join_all(locks.iter().map(|l| l.release())))
            .await
            .unwrap();
        assert!(released.iter().all(|r| *r));
    }
    c.stop().await.unwrap();
}
