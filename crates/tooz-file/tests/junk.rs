//! Bad data another process wrote into the directory (property tests): junk and
//! torn member records, junk group metadata, junk fencing counters. The rule: a
//! clear error naming the file, or the junk skipped; never a panic or a hang; the
//! rest of the group stays readable.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use tooz_core::{Coordinator, MemberId, Registry, ToozError, Wait};

const CASES: u32 = 64;

fn temp_dir() -> PathBuf {
    std::env::temp_dir().join(format!("tooz-file-junk-{}", uuid::Uuid::new_v4()))
}

fn connect(dir: &Path, member: &str) -> Coordinator {
    Registry::new()
        .with(tooz_file::DRIVER)
        .connect(&format!("file://{}?timeout=5", dir.display()), member)
        .unwrap()
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
        prop::collection::vec(any::<u8>(), 0..64),
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
        // A map whose `capabilities` nest deeper than any decoder should go.
        (1usize..3000).prop_map(|n| {
            let mut v = vec![0x82, 0xa9];
            v.extend_from_slice(b"member_id");
            v.extend_from_slice(&[0xa1, b'x', 0xac]);
            v.extend_from_slice(b"capabilities");
            v.extend(std::iter::repeat_n(0x91, n));
            v.push(0xc0);
            v
        }),
    ]
}

/// The files in `dir` whose names end with `suffix`.
fn files(dir: &Path, suffix: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file() && p.to_string_lossy().ends_with(suffix))
        .collect();
    out.sort();
    out
}

#[test]
fn junk_and_torn_member_records() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = temp_dir();
    let (good, victim) = rt.block_on(async {
        let good = connect(&dir, "good");
        let victim = connect(&dir, "victim");
        for c in [&good, &victim] {
            timed("start", c.start(false)).await.unwrap();
        }
        good.join_group_create("g", &BTreeMap::from([("weight", 3)]))
            .await
            .unwrap();
        victim
            .join_group("g", &BTreeMap::from([("weight", 2)]))
            .await
            .unwrap();
        (good, victim)
    });
    // The victim's record: the one that is not `good`'s (read while both are valid).
    let group_dir = std::fs::read_dir(dir.join("groups"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let records = files(&group_dir, ".raw");
    assert_eq!(records.len(), 2);
    let victim_record = records
        .iter()
        .find(|p| std::fs::read(p).unwrap().windows(6).any(|w| w == b"victim"))
        .unwrap()
        .clone();
    let original = std::fs::read(&victim_record).unwrap();

    let torn = (0..original.len()).prop_map({
        let original = original.clone();
        move |n| original[..n].to_vec()
    });
    let strategy = prop_oneof![junk_bytes(), torn];
    let mut runner = TestRunner::new(Config::with_cases(CASES));
    runner
        .run(&strategy, |junk| {
            std::fs::write(&victim_record, &junk).unwrap();
            rt.block_on(async {
                let members = timed("get_members", good.get_members("g")).await.unwrap();
                assert!(members.contains(&MemberId::from("good")), "{members:?}");
                let all = timed("with caps", good.get_members_with_capabilities("g"))
                    .await
                    .unwrap();
                assert_eq!(all[&MemberId::from("good")].weight(), 3);
                for c in all.values() {
                    let _ = format!("{c:?}");
                }
                let caps = timed("caps", good.get_member_capabilities("g", "good"))
                    .await
                    .unwrap();
                assert_eq!(caps.weight(), 3);
                // Reading the damaged member directly: an error naming its file
                // (or, for bytes that happen to be a valid record, an answer).
                match timed("caps", good.get_member_capabilities("g", "victim")).await {
                    Ok(_) | Err(ToozError::MemberNotJoined { .. }) => {}
                    Err(e) => assert!(
                        e.to_string().contains(&victim_record.display().to_string()),
                        "{e}"
                    ),
                }
            });
            Ok(())
        })
        .unwrap();
    // The damaged member can update its record again, which repairs it.
    std::fs::write(&victim_record, b"\xc1junk").unwrap();
    rt.block_on(async {
        victim
            .update_capabilities("g", &BTreeMap::from([("weight", 2)]))
            .await
            .unwrap();
        let all = good.get_members_with_capabilities("g").await.unwrap();
        assert_eq!(all[&MemberId::from("victim")].weight(), 2);
        victim.stop().await.unwrap();
        good.stop().await.unwrap();
    });
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn junk_group_metadata_and_fencing_counters() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = temp_dir();
    let a = connect(&dir, "a");
    rt.block_on(async {
        timed("start", a.start(false)).await.unwrap();
        a.create_group("good").await.unwrap();
        a.create_group("bad").await.unwrap();
        let l = a.get_lock("l").unwrap();
        let g = l.guard_or_fail(Wait::No).await.unwrap();
        g.release().await.unwrap();
    });
    let metas: Vec<PathBuf> = std::fs::read_dir(dir.join("groups"))
        .unwrap()
        .map(|e| e.unwrap().path().join(".metadata"))
        .collect();
    let bad_meta = metas
        .iter()
        .find(|p| std::fs::read(p).unwrap().windows(3).any(|w| w == b"bad"))
        .unwrap()
        .clone();
    // The exclusive lock's fencing counter is the start of its lock file (decimal text).
    let fence = dir.join("l");
    let stored = std::fs::read(&fence).unwrap();
    assert!(
        stored.trim_ascii().len() > 1 && stored.trim_ascii().iter().all(u8::is_ascii_digit),
        "the lock file starts with its counter: {stored:?}"
    );
    let counter = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..24),
        any::<i64>().prop_map(|i| i.to_string().into_bytes()),
        Just(b"18446744073709551615".to_vec()),
        Just(b"99999999999999999999999".to_vec()),
        Just(b"1.5".to_vec()),
    ];
    let mut runner = TestRunner::new(Config::with_cases(CASES));
    runner
        .run(&(junk_bytes(), counter), |(meta, counter)| {
            std::fs::write(&bad_meta, &meta).unwrap();
            std::fs::write(&fence, &counter).unwrap();
            rt.block_on(async {
                // A group whose metadata is junk is left out of the list (or
                // listed, if the bytes happen to be valid); the others are listed.
                let groups = timed("get_groups", a.get_groups()).await.unwrap();
                assert!(groups.iter().any(|g| g.as_bytes() == b"good"), "{groups:?}");
                // A junk counter: a grant still gets a token (the counter restarts
                // above the clock), or an error naming the counter; tokens increase
                // afterwards.
                let l = a.get_lock("l").unwrap();
                match timed("acquire", l.guard_or_fail(Wait::No)).await {
                    Ok(g) => {
                        let t1 = g.token();
                        g.release().await.unwrap();
                        let g2 = timed("acquire", l.guard_or_fail(Wait::No)).await.unwrap();
                        assert!(g2.token() > t1, "{counter:?}: {t1} then {}", g2.token());
                        g2.release().await.unwrap();
                    }
                    Err(e) => {
                        println!("counter {:?}: {e}", String::from_utf8_lossy(&counter));
                        assert!(e.to_string().contains("fencing counter"), "{e}");
                    }
                }
            });
            Ok(())
        })
        .unwrap();
    rt.block_on(async { a.stop().await.unwrap() });
    std::fs::remove_dir_all(&dir).unwrap();
}
