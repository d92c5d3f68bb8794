//! Bad data another client wrote (property tests against the shared server): junk
//! capabilities and member-time records, odd keys under a group's prefix, junk in
//! the leader key. The rule: a clear error or a sensible value, never a panic or a
//! hang, and the rest of the group stays readable.
//!
//! Needs `TOOZ_TEST_ETCD_URL`; skipped (printing why) without it unless
//! `TOOZ_REQUIRE_BACKENDS=1`.

#![allow(clippy::unwrap_used)]

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use tooz_conformance::testkit::{Backend, unique};
use tooz_core::MemberId;

/// Backend-touching properties run few cases.
const CASES: u32 = 32;

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

/// A member-times record: junk, or numbers at the edges.
fn junk_times() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        junk_bytes(),
        (any::<u64>(), any::<u64>()).prop_map(|(a, b)| format!("{a} {b}").into_bytes()),
        Just(b"-1 -1".to_vec()),
        Just(b"18446744073709551615 18446744073709551615".to_vec()),
    ]
}

#[test]
fn junk_members_leave_the_group_readable() {
    let Some(etcd) = Backend::from_env(
        support::URL_ENV,
        tooz_etcd::DRIVER,
        "junk_members_leave_the_group_readable",
    ) else {
        return;
    };
    // Each call has a deadline: a hang is a failure, not a stuck CI job.
    let etcd = etcd.limit(Duration::from_secs(10)).with_query("timeout=5");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let group = unique("junk-g");
    let (a, raw) = rt.block_on(async {
        let a = etcd.started("good").await;
        a.join_group_create(group.as_str(), &BTreeMap::from([("weight", 3)]))
            .await
            .unwrap();
        (a, support::raw(etcd.url()).await)
    });
    let p = rt
        .block_on(tooz_core::Partitioner::new(&a, group.as_str(), 8))
        .unwrap();
    let gk = format!("tooz/groups/{group}/");
    let strategy = (
        junk_bytes(),
        prop::collection::vec(any::<u8>(), 1..24),
        junk_times(),
        junk_bytes(),
    );
    let mut runner = TestRunner::new(Config::with_cases(CASES));
    runner
        .run(&strategy, |(caps, suffix, times, leader)| {
            let mut kv = raw.kv_client();
            rt.block_on(async {
                // A junk member, a member key with any bytes (including `/`)
                // after the group prefix, junk times for the good member, a junk
                // leader record.
                kv.put(format!("{gk}junk"), caps.clone(), None)
                    .await
                    .unwrap();
                let mut odd = gk.clone().into_bytes();
                odd.extend_from_slice(&suffix);
                kv.put(odd.clone(), caps.clone(), None).await.unwrap();
                kv.put(format!("tooz/member-times/{group}/good"), times, None)
                    .await
                    .unwrap();
                kv.put(format!("tooz/leaders/{group}"), leader.clone(), None)
                    .await
                    .unwrap();

                let members = etcd
                    .timed("get_members", a.get_members(group.as_str()))
                    .await
                    .unwrap();
                assert!(members.contains(&MemberId::from("good")), "{members:?}");
                assert!(members.contains(&MemberId::from("junk")), "{members:?}");
                let all = etcd
                    .timed("with caps", a.get_members_with_capabilities(group.as_str()))
                    .await
                    .unwrap();
                assert_eq!(all[&MemberId::from("good")].weight(), 3);
                assert_eq!(
                    all[&MemberId::from("junk")].as_msgpack(),
                    if caps.is_empty() {
                        &[0xc0][..]
                    } else {
                        &caps[..]
                    }
                );
                let info = etcd
                    .timed("info", a.get_member_info(group.as_str(), "good"))
                    .await
                    .unwrap();
                assert_eq!(info.capabilities.weight(), 3);
                etcd.timed("refresh", p.refresh()).await.unwrap();
                let weights: BTreeMap<_, _> = p.members().into_iter().collect();
                assert_eq!(weights[&MemberId::from("good")], 3);
                assert_eq!(weights[&MemberId::from("junk")], 1);
                let groups = etcd.timed("get_groups", a.get_groups()).await.unwrap();
                assert!(groups.iter().any(|g| g.as_bytes() == group.as_bytes()));
                let leader_seen = etcd
                    .timed("get_leader", a.get_leader(group.as_str()))
                    .await
                    .unwrap();
                assert_eq!(leader_seen.map(|m| m.as_bytes().to_vec()), Some(leader));
                kv.delete(odd, None).await.unwrap();
            });
            Ok(())
        })
        .unwrap();
    rt.block_on(async {
        p.stop();
        let mut kv = raw.kv_client();
        for prefix in [
            gk.clone(),
            format!("tooz/member-times/{group}/"),
            format!("tooz/leaders/{group}"),
        ] {
            kv.delete(
                prefix,
                Some(etcd_client::DeleteOptions::new().with_prefix()),
            )
            .await
            .unwrap();
        }
        a.stop().await.unwrap();
    });
}
