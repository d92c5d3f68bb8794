//! Against real Python tooz: a Python process and a Rust coordinator on one Redis
//! server see each other's groups, members, capabilities, locks and leaders.
//!
//! Needs `TOOZ_TEST_REDIS_URL` and `TOOZ_TEST_PYTHON` (a Python with `tooz` and
//! `redis` installed, e.g. the virtualenv `cargo xtask interop` builds); skipped
//! with a message otherwise (Python is not a backend: `TOOZ_REQUIRE_BACKENDS` only
//! makes a missing Redis URL fatal).

#![allow(clippy::unwrap_used)]

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use tooz_conformance::python::{Observations, PythonPeer, partition_owners};
use tooz_core::{MemberId, ToozError, Wait};

use support::*;

const PY_ENV: &str = "TOOZ_TEST_PYTHON";

/// The Python side: joins, locks and leads, reports what it sees of the Rust side,
/// then waits for a line on stdin before stopping.
const SCRIPT: &str = r#"
import sys, time
from tooz import coordination
url = sys.argv[1]
c = coordination.get_coordinator(url, b"py-m")
c.start()
out = lambda *a: (print(*a), sys.stdout.flush())
# What Rust left for us.
out("groups", sorted(g.decode() for g in c.get_groups().get()))
out("members", sorted(m.decode() for m in c.get_members(b"shared-g").get()))
out("rust-caps", c.get_member_capabilities(b"shared-g", b"rust-m").get())
out("rust-lock", c.get_lock(b"rust-lock").acquire(blocking=False))
out("rust-shared", c.get_lock(b"rust-shared").acquire(blocking=False))
c.watch_elected_as_leader(b"shared-g", lambda e: out("elected", e.group_id.decode()))
c.run_watchers()
# Ours, for Rust to see.
c.join_group(b"shared-g", {"lang": "python", "blob": b"\x00\x01"}).get()
pl = c.get_lock(b"py-lock")
out("py-lock", pl.acquire(blocking=False))
c.create_group(b"py-g").get()
c.watch_elected_as_leader(b"py-g", lambda e: out("elected", e.group_id.decode()))
c.run_watchers()
# Partitioner: Python's ring over both members (Rust joined part-g with weight 5).
p = c.join_partitioned_group(b"part-g", weight=2)
objs = ["obj-%d" % i for i in range(40)] + ["\u0447\u0443\u043f\u0430\u043a\u0430\u0431\u0440\u0430"]
out("owners", ";".join(
    "%s=%s" % (o, ",".join(sorted(m.decode() for m in p.members_for_object(o, replicas=r))))
    for r in (1, 2) for o in objs))
out("ready")
sys.stdin.readline()
c.heartbeat()
out("after", sorted(m.decode() for m in c.get_members(b"shared-g").get()))
c.stop()
out("stopped")
"#;

#[tokio::test]
async fn python_and_rust_share_one_server() {
    let Some(base) = server_url("python_and_rust_share_one_server") else {
        return;
    };
    let Ok(python) = std::env::var(PY_ENV) else {
        eprintln!("SKIPPED python_and_rust_share_one_server: {PY_ENV} is not set");
        return;
    };
    let ns = unique_ns("py");
    let url = with_query(&base, &format!("namespace={ns}&timeout=30"));
    let rust = coordinator(&url, "rust-m");
    rust.start(true).await.unwrap();
    rust.create_group("shared-g").await.unwrap();
    rust.join_group("shared-g", &BTreeMap::from([("weight", 3)]))
        .await
        .unwrap();
    let lock = rust.get_lock("rust-lock").unwrap();
    assert!(lock.acquire(Wait::No).await.unwrap());
    let shared = rust.get_lock("rust-shared").unwrap();
    assert!(shared.acquire_shared(Wait::No).await.unwrap());
    assert!(rust.try_become_leader("shared-g").await.unwrap().is_some());

    let part = rust.join_partitioned_group("part-g", 5, 32).await.unwrap();
    let mut py = PythonPeer::spawn(&python, SCRIPT, &[&url]);
    let Observations {
        lines: seen,
        owners: py_owners,
    } = py.until_ready().await;
    // What Python saw of us.
    assert_eq!(
        seen,
        vec![
            "groups ['part-g', 'shared-g']".to_string(),
            "members ['rust-m']".into(),
            "rust-caps {'weight': 3}".into(),
            "rust-lock False".into(),
            "rust-shared False".into(),
            "py-lock True".into(),
            "elected py-g".into(),
        ],
        "Python's view"
    );

    // Python's partitioner and ours agree on every owner (weights 2 and 5 read from
    // each other's capabilities).
    part.refresh().await.unwrap();
    assert_eq!(
        partition_owners(&part, ""),
        py_owners,
        "partition owners differ"
    );
    let weights: Vec<(String, u32)> = part
        .members()
        .into_iter()
        .map(|(m, w)| (m.to_string(), w))
        .collect();
    assert_eq!(
        weights,
        vec![("py-m".to_string(), 2), ("rust-m".to_string(), 5)]
    );

    // What we see of Python.
    let members = rust
        .get_members_with_capabilities("shared-g")
        .await
        .unwrap();
    let caps = members.get(&MemberId::from("py-m")).expect("py-m listed");
    // Python's msgpack, byte for byte: a map of str keys, a bin value.
    assert_eq!(
        caps.as_msgpack(),
        b"\x82\xa4lang\xa6python\xa4blob\xc4\x02\x00\x01"
    );
    let py_lock = rust.get_lock("py-lock").unwrap();
    assert!(!py_lock.acquire(Wait::No).await.unwrap());
    assert_eq!(
        rust.get_leader("py-g").await.unwrap(),
        Some(MemberId::from("python-tooz-leader"))
    );
    assert!(rust.try_become_leader("py-g").await.unwrap().is_none());
    // Python's join did not let a second "py-m" in, nor can we overwrite it.
    let twin = coordinator(&url, "py-m");
    twin.start(false).await.unwrap();
    assert!(matches!(
        twin.join_group("shared-g", &()).await,
        Err(ToozError::MemberAlreadyExist { .. })
    ));
    twin.stop().await.unwrap();

    // Python stops: its lock and leadership are released, its member leaves.
    py.go().await;
    let after = py.line().await;
    assert_eq!(after, "after ['py-m', 'rust-m']");
    assert_eq!(py.line().await, "stopped");
    py.wait_success().await;
    assert!(
        py_lock
            .acquire(Wait::For(Duration::from_secs(2)))
            .await
            .unwrap()
    );
    assert!(rust.try_become_leader("py-g").await.unwrap().is_some());
    assert!(py_lock.release().await.unwrap());
    let members = rust.get_members("shared-g").await.unwrap();
    assert!(!members.contains(&MemberId::from("py-m")), "{members:?}");

    assert!(lock.release().await.unwrap());
    assert!(shared.release().await.unwrap());
    rust.leave_partitioned_group(part).await.unwrap();
    rust.stop().await.unwrap();
    purge(&base, &ns).await;
}
