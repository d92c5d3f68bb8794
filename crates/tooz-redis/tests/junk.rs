//! Bad data another client wrote (property tests against the shared server): junk
//! capabilities, keys of the wrong type, junk fencing counters and leader keys. The
//! rule: a clear error naming the key, or a sensible value; never a panic or a hang;
//! the rest of the group stays readable.
//!
//! Needs `TOOZ_TEST_REDIS_URL`; skipped (printing why) without it unless
//! `TOOZ_REQUIRE_BACKENDS=1`.

#![allow(clippy::unwrap_used)]

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use redis::AsyncCommands;
use support::*;
use tooz_core::{Coordinator, MemberId, Wait};

/// Backend-touching properties run few cases.
const CASES: u32 = 32;

/// Each call has a deadline: a hang is a failure, not a stuck CI job.
async fn timed<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .unwrap_or_else(|_| panic!("{what} hung"))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Arbitrary bytes, plus msgpack headers claiming up to 4 GiB and deep nesting.
fn junk_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..48),
        (
            prop::sample::select(vec![0xc6u8, 0xdb, 0xdd, 0xdf]),
            any::<u32>(),
            prop::collection::vec(any::<u8>(), 0..8)
        )
            .prop_map(|(m, n, t)| {
                let mut v = vec![m];
                v.extend_from_slice(&n.to_be_bytes());
                v.extend(t);
                v
            }),
        (1usize..5000).prop_map(|n| vec![0x91; n]),
    ]
}

async fn started(url: &str, member: &str) -> Coordinator {
    let c = coordinator(url, member);
    timed("start", c.start(false)).await.unwrap();
    c
}

#[test]
fn junk_capabilities_leave_the_group_readable() {
    let Some(base) = server_url("junk_capabilities_leave_the_group_readable") else {
        return;
    };
    let rt = runtime();
    let ns = unique_ns("junk-caps");
    let url = with_query(&base, &format!("namespace={ns}&timeout=5"));
    let (a, p, mut r) = rt.block_on(async {
        let a = started(&url, "good").await;
        a.join_group_create("g", &BTreeMap::from([("weight", 3)]))
            .await
            .unwrap();
        let p = tooz_core::Partitioner::new(&a, "g", 16).await.unwrap();
        (a, p, raw(&base).await)
    });
    let group_key = format!("{ns}_group:g");
    let mut runner = TestRunner::new(Config::with_cases(CASES));
    runner
        .run(&junk_bytes(), |junk| {
            let mut r = r.clone();
            rt.block_on(async {
                let _: () = r.hset(&group_key, "junk", &junk[..]).await.unwrap();
                let _: () = r
                    .pset_ex(format!("{ns}_beats:junk"), "Not dead!", 5000)
                    .await
                    .unwrap();
                let members = timed("get_members", a.get_members("g")).await.unwrap();
                assert!(members.contains(&MemberId::from("good")), "{members:?}");
                assert!(members.contains(&MemberId::from("junk")), "{members:?}");
                let all = timed("with caps", a.get_members_with_capabilities("g"))
                    .await
                    .unwrap();
                assert_eq!(all[&MemberId::from("good")].weight(), 3);
                // The junk member's bytes come back as they are; decoding them is
                // the caller's, and fails cleanly (or succeeds, for valid msgpack).
                let caps = &all[&MemberId::from("junk")];
                let _ = caps.to_value();
                let _ = format!("{caps:?}");
                assert!(caps.weight() >= 1);
                let good = timed("caps", a.get_member_capabilities("g", "good"))
                    .await
                    .unwrap();
                assert_eq!(good.weight(), 3);
                // The partitioner decodes every member's weight: junk weighs 1.
                timed("refresh", p.refresh()).await.unwrap();
                let weights: BTreeMap<_, _> = p.members().into_iter().collect();
                assert_eq!(weights[&MemberId::from("good")], 3);
                assert_eq!(weights[&MemberId::from("junk")], 1);
            });
            Ok(())
        })
        .unwrap();
    rt.block_on(async {
        p.stop();
        let _: () = r.del(&group_key).await.unwrap();
        a.stop().await.unwrap();
    });
}

/// Every key the driver reads, set to a value of the wrong Redis type: each
/// operation reading it fails with an error (naming the key), or treats it as
/// absent; nothing panics or hangs, and other groups and locks still work.
#[tokio::test]
async fn keys_of_the_wrong_type() {
    let Some(base) = server_url("keys_of_the_wrong_type") else {
        return;
    };
    let ns = unique_ns("wrongtype");
    let url = with_query(&base, &format!("namespace={ns}&timeout=5"));
    let a = started(&url, "m1").await;
    let mut r = raw(&base).await;
    a.create_group("ok").await.unwrap();

    // A group key holding a list instead of a hash.
    let _: () = r.rpush(format!("{ns}_group:bad"), "x").await.unwrap();
    let _: () = r.sadd(format!("{ns}_groups"), "bad").await.unwrap();
    let e = timed("get_members", a.get_members("bad"))
        .await
        .unwrap_err();
    println!("get_members of a list: {e}");
    assert!(e.to_string().contains(&format!("{ns}_group:bad")), "{e}");
    let e = timed("join", a.join_group("bad", &())).await.unwrap_err();
    assert!(e.to_string().contains(&format!("{ns}_group:bad")), "{e}");
    let e = timed("caps", a.get_members_with_capabilities("bad"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains(&format!("{ns}_group:bad")), "{e}");
    // The group list still lists both; the good group works.
    let groups = timed("get_groups", a.get_groups()).await.unwrap();
    assert!(groups.len() == 2, "{groups:?}");
    a.join_group("ok", &()).await.unwrap();
    assert_eq!(a.get_members("ok").await.unwrap().len(), 1);

    // The group list itself of the wrong type.
    let _: () = r.del(format!("{ns}_groups")).await.unwrap();
    let _: () = r.set(format!("{ns}_groups"), "junk").await.unwrap();
    let e = timed("get_groups", a.get_groups()).await.unwrap_err();
    println!("get_groups of a string: {e}");
    assert!(e.to_string().contains(&format!("{ns}_groups")), "{e}");
    assert_eq!(a.get_members("ok").await.unwrap().len(), 1);

    // A lock key holding a hash, a fencing counter holding a list.
    let _: () = r.hset(format!("{ns}_l1_lock"), "a", "b").await.unwrap();
    let e = timed("acquire", a.get_lock("l1").unwrap().acquire(Wait::No))
        .await
        .unwrap_err();
    println!("acquire over a hash: {e}");
    assert!(e.to_string().contains(&format!("{ns}_l1_lock")), "{e}");
    let _: () = r.rpush(format!("{ns}_l2_lock:fence"), "1").await.unwrap();
    // (The counter is replaced: a failure after the script's first write would
    // leave the lock taken by nobody until it expires.)
    let l2 = a.get_lock("l2").unwrap();
    let g = timed("acquire", l2.guard_or_fail(Wait::No)).await.unwrap();
    assert!(g.token().0 > 0);
    g.release().await.unwrap();
    let l3 = a.get_lock("l3").unwrap();
    assert!(timed("acquire", l3.acquire(Wait::No)).await.unwrap());
    assert!(l3.release().await.unwrap());

    // Junk in the waiter queue and registrations: a blocked acquire still
    // waits, gets the lock once it is free, and releases it (the waiter is just
    // not queued).
    let _: () = r.set(format!("{ns}_l4_lock:queue"), "junk").await.unwrap();
    let _: () = r
        .rpush(format!("{ns}_l4_lock:waiters"), "junk")
        .await
        .unwrap();
    let _: () = r
        .set(format!("{ns}_l4_lock"), "0123456789abcdef0123456789abcdef")
        .await
        .unwrap();
    let l4 = a.get_lock("l4").unwrap();
    let waiting = {
        let l4 = l4.clone();
        tokio::spawn(async move { l4.acquire(Wait::For(Duration::from_secs(10))).await })
    };
    // The waiter is blocked (it tried, subscribed and tried again) before the
    // Python-style holder lets go.
    let chan = format!("{ns}_l4_lock");
    timed("the waiter subscribing", async {
        loop {
            let subs: Vec<(String, u64)> = redis::cmd("PUBSUB")
                .arg("NUMSUB")
                .arg(&chan)
                .query_async(&mut r)
                .await
                .unwrap();
            if subs.first().is_some_and(|(_, n)| *n > 0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let _: () = r.del(format!("{ns}_l4_lock")).await.unwrap();
    assert!(
        timed("blocked acquire", async { waiting.await.unwrap() })
            .await
            .unwrap()
    );
    assert!(timed("release", l4.release()).await.unwrap());

    // A leader key holding a set.
    let _: () = r
        .sadd(format!("{ns}_leader_of_ok_lock"), "x")
        .await
        .unwrap();
    // (MGET reads it as absent: no leader.)
    let leader = timed("get_leader", a.get_leader("ok")).await.unwrap();
    assert_eq!(leader, None);

    a.stop().await.unwrap();
    let keys: Vec<String> = r.keys(format!("{ns}*")).await.unwrap();
    if !keys.is_empty() {
        let _: () = r.del(keys).await.unwrap();
    }
}

/// Junk in a fencing counter (text, negative, fractional, beyond u64): the next
/// grant still gets a token, and tokens keep increasing afterwards.
#[test]
fn junk_fencing_counters() {
    let Some(base) = server_url("junk_fencing_counters") else {
        return;
    };
    let rt = runtime();
    let ns = unique_ns("junk-fence");
    let url = with_query(&base, &format!("namespace={ns}&timeout=5"));
    let (a, mut r) = rt.block_on(async {
        let a = started(&url, "m1").await;
        a.join_group_create("g", &()).await.unwrap();
        (a, raw(&base).await)
    });
    let counter = prop_oneof![
        "[^0-9]{1,8}",
        any::<i64>().prop_map(|i| i.to_string()),
        any::<f64>().prop_map(|f| f.to_string()),
        Just("1e300".to_string()),
        Just("18446744073709551616".to_string()),
        Just("99999999999999999999999999".to_string()),
        Just("-0".to_string()),
        Just("nan".to_string()),
        Just("inf".to_string()),
    ];
    // The corners first, then random ones.
    let fixed = prop::sample::select(vec![
        "inf",
        "nan",
        "-inf",
        "1e300",
        "-5",
        "1.5",
        "abc",
        "",
        "9007199254740993",
        "18446744073709551616",
        "99999999999999999999999999",
        "0x10",
        " 7",
    ])
    .prop_map(str::to_string);
    let mut runner = TestRunner::new(Config::with_cases(CASES));
    runner
        .run(&prop_oneof![fixed, counter], |junk| {
            let mut r = r.clone();
            rt.block_on(async {
                // A lock's counter.
                let fence = format!("{ns}_l_lock:fence");
                let _: () = r.set(&fence, &junk).await.unwrap();
                let l = a.get_lock("l").unwrap();
                let g = timed("acquire", l.guard_or_fail(Wait::No)).await.unwrap();
                let t1 = g.token();
                g.release().await.unwrap();
                let g2 = timed("acquire", l.guard_or_fail(Wait::No)).await.unwrap();
                assert!(g2.token() > t1, "{junk:?}: {t1} then {}", g2.token());
                g2.release().await.unwrap();
                // A group leadership's counter.
                let _: () = r
                    .set(format!("{ns}_leader_of_g_lock:fence"), &junk)
                    .await
                    .unwrap();
                let lead = timed("campaign", a.try_become_leader("g"))
                    .await
                    .unwrap()
                    .expect("nobody else runs");
                let t1 = lead.token();
                assert!(
                    timed("stand down", a.stand_down_group_leader("g"))
                        .await
                        .unwrap()
                );
                let lead = timed("campaign", a.try_become_leader("g"))
                    .await
                    .unwrap()
                    .expect("nobody else runs");
                assert!(lead.token() > t1, "{junk:?}: {t1} then {}", lead.token());
                assert!(a.stand_down_group_leader("g").await.unwrap());
            });
            Ok(())
        })
        .unwrap();
    rt.block_on(async {
        a.stop().await.unwrap();
        let keys: Vec<String> = r.keys(format!("{ns}*")).await.unwrap();
        if !keys.is_empty() {
            let _: () = r.del(keys).await.unwrap();
        }
    });
}

/// Junk in a group's leader key and its owner record: `get_leader` returns a
/// leader (the Python placeholder, or the member a well-formed owner names) and
/// campaigning waits for the key to expire; no panic.
#[test]
fn junk_leader_keys() {
    let Some(base) = server_url("junk_leader_keys") else {
        return;
    };
    let rt = runtime();
    let ns = unique_ns("junk-leader");
    let url = with_query(&base, &format!("namespace={ns}&timeout=5"));
    let (a, mut r) = rt.block_on(async {
        let a = started(&url, "m1").await;
        a.join_group_create("g", &()).await.unwrap();
        (a, raw(&base).await)
    });
    let mut runner = TestRunner::new(Config::with_cases(CASES));
    runner
        .run(&(junk_bytes(), junk_bytes()), |(token, owner)| {
            let mut r = r.clone();
            rt.block_on(async {
                let _: () = r
                    .set(format!("{ns}_leader_of_g_lock"), &token[..])
                    .await
                    .unwrap();
                let _: () = r
                    .set(format!("{ns}_leader_of_g_lock:owner"), &owner[..])
                    .await
                    .unwrap();
                let leader = timed("get_leader", a.get_leader("g")).await.unwrap();
                assert!(leader.is_some());
                assert_eq!(a.get_members("g").await.unwrap().len(), 1);
            });
            Ok(())
        })
        .unwrap();
    rt.block_on(async {
        a.stop().await.unwrap();
        let keys: Vec<String> = r.keys(format!("{ns}*")).await.unwrap();
        if !keys.is_empty() {
            let _: () = r.del(keys).await.unwrap();
        }
    });
}
