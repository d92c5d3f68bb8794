//! Bad data another client wrote into the shared tables (property tests against
//! the PostgreSQL server): junk capabilities and times in a member row, junk
//! leader rows, fencing counters at any `bigint` (negative, `i64::MAX`). The rule:
//! a clear error or a sensible value; never a panic or a hang; tokens never go
//! back; the rest of the group stays readable.
//!
//! Needs `TOOZ_TEST_POSTGRESQL_URL`; skipped (printing why) without it unless
//! `TOOZ_REQUIRE_BACKENDS=1`.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use sqlx::Connection;
use tooz_core::{Coordinator, MemberId, Registry, Wait};

const URL_ENV: &str = "TOOZ_TEST_POSTGRESQL_URL";
/// Backend-touching properties run few cases.
const CASES: u32 = 32;

fn server_url(test: &str) -> Option<String> {
    match std::env::var(URL_ENV) {
        Ok(u) if !u.trim().is_empty() => Some(u.trim().to_string()),
        _ => {
            assert!(
                std::env::var("TOOZ_REQUIRE_BACKENDS").as_deref() != Ok("1"),
                "{test}: {URL_ENV} is not set and TOOZ_REQUIRE_BACKENDS=1"
            );
            eprintln!("SKIPPED {test}: {URL_ENV} is not set");
            None
        }
    }
}

fn unique(s: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{s}-{}-{nanos:x}", std::process::id())
}

/// Each call has a deadline: a hang is a failure, not a stuck CI job.
async fn timed<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(15), f)
        .await
        .unwrap_or_else(|_| panic!("{what} hung"))
}

fn junk_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..48),
        (
            prop::sample::select(vec![0xc6u8, 0xdb, 0xdd, 0xdf]),
            any::<u32>()
        )
            .prop_map(|(m, n)| [vec![m], n.to_be_bytes().to_vec()].concat()),
        (1usize..5000).prop_map(|n| vec![0x91; n]),
    ]
}

/// A leadership token another client wrote: any `bigint` short of the two
/// largest (a grant over those fails with "bigint out of range", cleanly).
fn leader_counter() -> impl Strategy<Value = i64> {
    prop_oneof![
        (i64::MIN..i64::MAX - 1),
        Just(i64::MAX - 2),
        Just(i64::MIN),
        Just(-2),
        Just(-1),
        Just(0),
    ]
}

/// A lock fence another client wrote: any `bigint`, the largest included (a grant
/// over `i64::MAX` restarts the counter from the server clock).
fn fence_counter() -> impl Strategy<Value = i64> {
    prop_oneof![
        any::<i64>(),
        Just(i64::MAX),
        Just(i64::MAX - 1),
        Just(i64::MAX - 2),
        Just(i64::MIN),
        Just(-2),
        Just(-1),
        Just(0),
    ]
}

#[test]
fn junk_rows() {
    let Some(url) = server_url("junk_rows") else {
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let group = unique("junk-g");
    let lock = unique("junk-l");
    let (a, b, raw) = rt.block_on(async {
        let a: Coordinator = Registry::new()
            .with(tooz_sql::POSTGRESQL)
            .connect(&url, "good")
            .unwrap();
        timed("start", a.start(false)).await.unwrap();
        // Another client, to see that nothing stays held after a grant.
        let b: Coordinator = Registry::new()
            .with(tooz_sql::POSTGRESQL)
            .connect(&url, "other")
            .unwrap();
        timed("start", b.start(false)).await.unwrap();
        a.join_group_create(group.as_str(), &BTreeMap::from([("weight", 3)]))
            .await
            .unwrap();
        let raw = sqlx::PgConnection::connect(url.split('?').next().unwrap())
            .await
            .unwrap();
        (a, b, tokio::sync::Mutex::new(raw))
    });
    let strategy = (
        junk_bytes(),
        any::<i64>(),
        leader_counter(),
        fence_counter(),
        junk_bytes(),
    );
    let mut runner = TestRunner::new(Config::with_cases(CASES));
    runner
        .run(&strategy, |(caps, at, lead_token, fence, leader_member)| {
            rt.block_on(async {
                let mut db = raw.lock().await;
                // A junk member on the good member's (live) lease.
                sqlx::query(
                    "INSERT INTO tooz_members (group_id, member_id, lease_id, capabilities, joined_us, updated_us) \
                     SELECT group_id, 'junk'::bytea, lease_id, $2, $3, $3 FROM tooz_members \
                     WHERE group_id = $1 AND member_id = 'good'::bytea \
                     ON CONFLICT (group_id, member_id) DO UPDATE SET capabilities = $2, joined_us = $3, updated_us = $3",
                )
                .bind(group.as_bytes())
                .bind(&caps)
                .bind(at)
                .execute(&mut *db)
                .await
                .unwrap();
                // A leader row nobody holds, with any token and member; a lock
                // fence at any value.
                sqlx::query(
                    "INSERT INTO tooz_leaders (group_id, member_id, lease_id, token) VALUES ($1, $2, NULL, $3) \
                     ON CONFLICT (group_id) DO UPDATE SET member_id = $2, lease_id = NULL, token = $3",
                )
                .bind(group.as_bytes())
                .bind(&leader_member)
                .bind(lead_token)
                .execute(&mut *db)
                .await
                .unwrap();
                sqlx::query(
                    "INSERT INTO tooz_fences (kind, name, token) VALUES (0, $1, $2) \
                     ON CONFLICT (kind, name) DO UPDATE SET token = $2",
                )
                .bind(lock.as_bytes())
                .bind(fence)
                .execute(&mut *db)
                .await
                .unwrap();
                drop(db);

                let members = timed("get_members", a.get_members(group.as_str())).await.unwrap();
                assert!(members.contains(&MemberId::from("good")), "{members:?}");
                assert!(members.contains(&MemberId::from("junk")), "{members:?}");
                let all = timed("with caps", a.get_members_with_capabilities(group.as_str()))
                    .await
                    .unwrap();
                assert_eq!(all[&MemberId::from("good")].weight(), 3);
                for c in all.values() {
                    let _ = format!("{c:?}");
                }
                let _ = timed("info", a.get_member_info(group.as_str(), "junk")).await.unwrap();
                let _ = timed("get_leader", a.get_leader(group.as_str())).await.unwrap();

                // Leadership over a junk token: granted with a token, and the next
                // grant's is larger; or an error saying why.
                match timed("campaign", a.try_become_leader(group.as_str())).await {
                    Ok(Some(l)) => {
                        let t1 = l.token();
                        assert!(timed("stand down", a.stand_down_group_leader(group.as_str())).await.unwrap());
                        let l2 = timed("campaign", a.try_become_leader(group.as_str()))
                            .await
                            .unwrap()
                            .expect("nobody else runs");
                        assert!(l2.token() > t1, "leader token {lead_token}: {t1} then {}", l2.token());
                        assert!(a.stand_down_group_leader(group.as_str()).await.unwrap());
                    }
                    Ok(None) => panic!("nobody holds it: {lead_token}"),
                    Err(e) => {
                        println!("leader token {lead_token}: {e}");
                        assert!(e.to_string().contains("token"), "{e}");
                    }
                }
                // A lock over a junk fence.
                let l = a.get_lock(lock.as_str()).unwrap();
                match timed("acquire", l.guard_or_fail(Wait::No)).await {
                    Ok(g) => {
                        let t1 = g.token();
                        g.release().await.unwrap();
                        let g2 = timed("acquire", l.guard_or_fail(Wait::No)).await.unwrap();
                        if t1.0 == i64::MAX as u64 {
                            // Nothing follows the largest token: the counter restarts
                            // from the server clock.
                            assert!(g2.token().0 > 0, "fence {fence}: {t1} then {}", g2.token());
                        } else {
                            assert!(g2.token() > t1, "fence {fence}: {t1} then {}", g2.token());
                        }
                        g2.release().await.unwrap();
                    }
                    Err(e) => {
                        println!("fence {fence}: {e}");
                        assert!(e.to_string().contains("fenc"), "{e}");
                        // Nothing stays held by the failed grant.
                        let mut db = raw.lock().await;
                        sqlx::query("DELETE FROM tooz_fences WHERE kind = 0 AND name = $1")
                            .bind(lock.as_bytes())
                            .execute(&mut *db)
                            .await
                            .unwrap();
                        drop(db);
                        let g = timed("acquire", l.guard_or_fail(Wait::No)).await.unwrap();
                        g.release().await.unwrap();
                    }
                }
                // Whatever happened, the lock is free for another client now.
                let other = b.get_lock(lock.as_str()).unwrap();
                let g = timed("acquire elsewhere", other.guard_or_fail(Wait::No))
                    .await
                    .unwrap_or_else(|e| panic!("fence {fence}: the lock stayed held: {e}"));
                g.release().await.unwrap();
            });
            Ok(())
        })
        .unwrap();
    rt.block_on(async {
        let mut db = raw.lock().await;
        for q in [
            "DELETE FROM tooz_members WHERE group_id = $1",
            "DELETE FROM tooz_leaders WHERE group_id = $1",
            "DELETE FROM tooz_groups WHERE group_id = $1",
        ] {
            sqlx::query(q)
                .bind(group.as_bytes())
                .execute(&mut *db)
                .await
                .unwrap();
        }
        sqlx::query("DELETE FROM tooz_fences WHERE name = $1")
            .bind(lock.as_bytes())
            .execute(&mut *db)
            .await
            .unwrap();
        drop(db);
        a.stop().await.unwrap();
        b.stop().await.unwrap();
    });
}
