//! Bad data another client wrote (property tests against the shared server): junk
//! member data, znode names that are not ours under a group, a lock directory and
//! an election directory, junk election data. The rule: a clear error or a sensible
//! value; never a panic or a hang; the rest of the group stays readable.
//!
//! Needs `TOOZ_TEST_ZOOKEEPER_URL`; skipped (printing why) without it unless
//! `TOOZ_REQUIRE_BACKENDS=1`.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use tooz_core::{Coordinator, MemberId, Registry, Wait};
use zookeeper_client::{Acls, Client, CreateMode};

const URL_ENV: &str = "TOOZ_TEST_ZOOKEEPER_URL";
/// Backend-touching properties run few cases.
const CASES: u32 = 32;

fn server_url(test: &str) -> Option<String> {
    match std::env::var(URL_ENV) {
        Ok(u) if !u.trim().is_empty() => Some(u.trim().to_string()),
        _ => {
            assert!(
                !std::env::var("TOOZ_REQUIRE_BACKENDS").is_ok_and(|v| v == "1"),
                "{test}: {URL_ENV} is not set and TOOZ_REQUIRE_BACKENDS=1"
            );
            eprintln!("SKIPPED {test}: {URL_ENV} is not set");
            None
        }
    }
}

fn unique_ns(label: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("tooz-junk-{label}-{}-{nanos:x}", std::process::id())
}

fn host_port(url: &str) -> String {
    let u = tooz_core::Url::parse(url).unwrap();
    format!("{}:{}", u.host_str().unwrap(), u.port().unwrap_or(2181))
}

/// Each call has a deadline: a hang is a failure, not a stuck CI job.
async fn timed<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .unwrap_or_else(|_| panic!("{what} hung"))
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

/// Znode names another client could create: junk, bad percent-encodings, and
/// near-misses of contender names.
fn junk_name() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z0-9_%.-]{1,24}",
        prop::sample::select(vec![
            "%",
            "%z",
            "%zz",
            "%ff%fe",
            "%2",
            "x__lock__",
            "__lock__",
            "__lock__0000000001",
            "x__lock__abc",
            "x__lock__-99999999999",
            "x__rlock__2147483648",
            "x__lock__ 1",
            "x__lock__0000000001__lock__",
            "leader",
            "locks",
        ])
        .prop_map(str::to_string),
        "[^/\u{0}-\u{1f}]{1,12}",
    ]
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn junk_znodes_leave_groups_locks_and_elections_usable() {
    let Some(base) = server_url("junk_znodes_leave_groups_locks_and_elections_usable") else {
        return;
    };
    let rt = runtime();
    let ns = unique_ns("zk");
    let url = format!("{base}?namespace={ns}&timeout=5");
    let (a, zk) = rt.block_on(async {
        let a: Coordinator = Registry::new()
            .with(tooz_zookeeper::DRIVER)
            .connect(&url, "good")
            .unwrap();
        timed("start", a.start(false)).await.unwrap();
        a.join_group_create("g", &BTreeMap::from([("weight", 3)]))
            .await
            .unwrap();
        // The lock and election directories exist once used.
        let l = a.get_lock("l").unwrap();
        assert!(l.acquire(Wait::No).await.unwrap());
        assert!(l.release().await.unwrap());
        (a, Client::connect(&host_port(&base)).await.unwrap())
    });
    let persistent = CreateMode::Persistent.with_acls(Acls::anyone_all());
    let strategy = (junk_bytes(), junk_name(), junk_bytes());
    let mut runner = TestRunner::new(Config::with_cases(CASES));
    runner
        .run(&strategy, |(data, name, leader_data)| {
            rt.block_on(async {
                let mut made = Vec::new();
                // Junk data in a member znode, and a znode of any name in the
                // group, in the lock directory and in the election directory.
                for path in [
                    format!("/{ns}/g/junk"),
                    format!("/{ns}/g/{name}"),
                    format!("/{ns}/locks/l/{name}"),
                ] {
                    if zk.create(&path, &data, &persistent).await.is_ok() {
                        made.push(path);
                    }
                }
                let _ = zk
                    .create(&format!("/{ns}/g/leader"), &[], &persistent)
                    .await;
                let leader_node = format!("/{ns}/g/leader/{name}");
                if zk
                    .create(&leader_node, &leader_data, &persistent)
                    .await
                    .is_ok()
                {
                    made.push(leader_node);
                }

                let members = timed("get_members", a.get_members("g")).await.unwrap();
                assert!(members.contains(&MemberId::from("good")), "{members:?}");
                assert!(members.contains(&MemberId::from("junk")), "{members:?}");
                let all = timed("with caps", a.get_members_with_capabilities("g"))
                    .await
                    .unwrap();
                assert_eq!(all[&MemberId::from("good")].weight(), 3);
                for c in all.values() {
                    let _ = format!("{c:?}");
                    assert!(c.weight() >= 1);
                }
                let caps = timed("caps", a.get_member_capabilities("g", "good"))
                    .await
                    .unwrap();
                assert_eq!(caps.weight(), 3);
                let _ = timed("get_groups", a.get_groups()).await.unwrap();
                let _ = timed("get_leader", a.get_leader("g")).await.unwrap();
                // The lock: free, or held by the junk node if it looks like an
                // earlier contender; never an error or a hang.
                let l = a.get_lock("l").unwrap();
                if timed("acquire", l.acquire(Wait::No)).await.unwrap() {
                    assert!(l.release().await.unwrap());
                }
                if let Some(lead) = timed("campaign", a.try_become_leader("g")).await.unwrap() {
                    let _ = lead.token();
                    assert!(a.stand_down_group_leader("g").await.unwrap());
                }
                for path in made {
                    zk.delete(&path, None).await.unwrap();
                }
            });
            Ok(())
        })
        .unwrap();
    rt.block_on(async { a.stop().await.unwrap() });
}
