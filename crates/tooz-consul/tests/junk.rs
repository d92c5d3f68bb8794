//! Bad data another client wrote (property tests against the shared agent): junk
//! member values and `Flags` (our join/update times), odd keys under a group, junk
//! leader values. The rule: a clear error or a sensible value; never a panic or a
//! hang; the rest of the group stays readable.
//!
//! Needs `TOOZ_TEST_CONSUL_URL`; skipped with a message otherwise (a failure with
//! `TOOZ_REQUIRE_BACKENDS=1`).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use tooz_consul::ConsulConfig;
use tooz_core::{Coordinator, MemberId, Registry};

const URL_ENV: &str = "TOOZ_TEST_CONSUL_URL";
/// Backend-touching properties run few cases.
const CASES: u32 = 32;

fn base(test: &str) -> Option<String> {
    match std::env::var(URL_ENV) {
        Ok(u) if !u.trim().is_empty() => Some(u.trim().to_string()),
        _ => {
            assert!(
                std::env::var("TOOZ_REQUIRE_BACKENDS").as_deref() != Ok("1"),
                "{URL_ENV} is not set and TOOZ_REQUIRE_BACKENDS=1"
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

/// A raw KV write, as another client would make it.
async fn put(http: &reqwest::Client, api: &str, key: &str, flags: u64, body: Vec<u8>) {
    let ok = http
        .put(format!("{api}kv/{key}?flags={flags}"))
        .body(body)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(ok.trim(), "true", "{key}");
}

#[test]
fn junk_members_and_leaders() {
    let Some(base) = base("junk_members_and_leaders") else {
        return;
    };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let ns = unique("junk");
    let url = format!("{base}?ttl=10&namespace={ns}");
    let api = ConsulConfig::from_url_str(&url).unwrap().api_base();
    let http = reqwest::Client::new();
    let a: Coordinator = rt.block_on(async {
        let a = Registry::new()
            .with(tooz_consul::DRIVER)
            .connect(&url, "good")
            .unwrap();
        timed("start", a.start(false)).await.unwrap();
        a.join_group_create("g", &BTreeMap::from([("weight", 3)]))
            .await
            .unwrap();
        a
    });
    let p = rt
        .block_on(tooz_core::Partitioner::new(&a, "g", 8))
        .unwrap();
    let strategy = (
        junk_bytes(),
        any::<u64>(),
        // (Not `.` or `..`: HTTP clients normalise them out of the path.)
        "[a-zA-Z0-9_-][a-zA-Z0-9_.-]{0,11}(/[a-z]{1,4})?",
        junk_bytes(),
    );
    let mut runner = TestRunner::new(Config::with_cases(CASES));
    runner
        .run(&strategy, |(caps, flags, odd, leader)| {
            rt.block_on(async {
                put(
                    &http,
                    &api,
                    &format!("{ns}/groups/g/junk"),
                    flags,
                    caps.clone(),
                )
                .await;
                put(
                    &http,
                    &api,
                    &format!("{ns}/groups/g/{odd}"),
                    flags,
                    caps.clone(),
                )
                .await;
                put(&http, &api, &format!("{ns}/leaders/g"), flags, leader).await;

                let members = timed("get_members", a.get_members("g")).await.unwrap();
                assert!(members.contains(&MemberId::from("good")), "{members:?}");
                assert!(members.contains(&MemberId::from("junk")), "{members:?}");
                let all = timed("with caps", a.get_members_with_capabilities("g"))
                    .await
                    .unwrap();
                assert_eq!(all[&MemberId::from("good")].weight(), 3);
                for c in all.values() {
                    let _ = format!("{c:?}");
                }
                let info = timed("info", a.get_member_info("g", "junk")).await.unwrap();
                let _ = (info.created_at, info.updated_at);
                let good = timed("caps", a.get_member_capabilities("g", "good"))
                    .await
                    .unwrap();
                assert_eq!(good.weight(), 3);
                timed("refresh", p.refresh()).await.unwrap();
                let weights: BTreeMap<_, _> = p.members().into_iter().collect();
                assert_eq!(weights[&MemberId::from("good")], 3);
                let _ = timed("get_leader", a.get_leader("g")).await.unwrap();
                let _ = timed("get_groups", a.get_groups()).await.unwrap();
                http.delete(format!("{api}kv/{ns}/groups/g/{odd}"))
                    .send()
                    .await
                    .unwrap();
            });
            Ok(())
        })
        .unwrap();
    rt.block_on(async {
        p.stop();
        a.stop().await.unwrap();
        http.delete(format!("{api}kv/{ns}?recurse"))
            .send()
            .await
            .unwrap();
    });
}
