//! Against real Python tooz: a Python process (tooz 9.1 with pymemcache) and a Rust
//! coordinator on one memcached server see each other's groups, members,
//! capabilities, locks and leaders, and their partitioners agree.
//!
//! Needs `TOOZ_TEST_MEMCACHED_URL` and `TOOZ_TEST_PYTHON` (a Python with `tooz` and
//! `pymemcache` installed, e.g. the virtualenv `cargo xtask interop` builds); skipped
//! with a message otherwise. memcached has no namespaces, so every name carries a
//! suffix unique to the run.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tooz_conformance::python::{Observations, PythonPeer, partition_owners};
use tooz_core::{Coordinator, MemberId, Registry, ToozError, Wait};

const URL_ENV: &str = "TOOZ_TEST_MEMCACHED_URL";
const PY_ENV: &str = "TOOZ_TEST_PYTHON";

/// The Python side: joins, locks and leads, reports what it sees of the Rust side,
/// then waits for a line on stdin before stopping.
const SCRIPT: &str = r#"
import sys
from tooz import coordination
url, sfx = sys.argv[1], sys.argv[2]
n = lambda s: (s + "-" + sfx).encode()
d = lambda b: b.decode().replace("-" + sfx, "")
c = coordination.get_coordinator(url, n("py-m"))
c.start()
out = lambda *a: (print(*a), sys.stdout.flush())
# What Rust left for us.
out("groups", sorted(d(g) for g in c.get_groups().get() if g.decode().endswith(sfx)))
out("members", sorted(d(m) for m in c.get_members(n("shared-g")).get()))
out("rust-caps", c.get_member_capabilities(n("shared-g"), n("rust-m")).get())
out("rust-leader", d(c.get_leader(n("shared-g")).get()))
out("rust-lock", c.get_lock(n("rust-lock")).acquire(blocking=False))
out("rust-shared", c.get_lock(n("rust-shared")).acquire(blocking=False))
c.watch_elected_as_leader(n("shared-g"), lambda e: out("elected", d(e.group_id)))
c.run_watchers()
# Ours, for Rust to see.
c.join_group(n("shared-g"), {"lang": "python", "blob": b"\x00\x01"}).get()
pl = c.get_lock(n("py-lock"))
out("py-lock", pl.acquire(blocking=False))
c.create_group(n("py-g")).get()
c.watch_elected_as_leader(n("py-g"), lambda e: out("elected", d(e.group_id)))
c.run_watchers()
# Partitioner: Python's ring over both members (Rust joined part-g with weight 5).
p = c.join_partitioned_group(n("part-g"), weight=2)
objs = ["obj-%d" % i for i in range(40)] + ["\u0447\u0443\u043f\u0430\u043a\u0430\u0431\u0440\u0430"]
out("owners", ";".join(
    "%s=%s" % (o, ",".join(sorted(m.decode() for m in p.members_for_object(o, replicas=r))))
    for r in (1, 2) for o in objs))
out("ready")
sys.stdin.readline()
c.heartbeat()
out("after", sorted(d(m) for m in c.get_members(n("shared-g")).get()))
c.stop()
out("stopped")
"#;

fn coordinator(url: &str, member: &str) -> Coordinator {
    Registry::new()
        .with(tooz_memcached::DRIVER)
        .connect(url, member)
        .unwrap()
}

#[tokio::test]
async fn python_and_rust_share_one_server() {
    let Some(base) = std::env::var(URL_ENV).ok().filter(|u| !u.trim().is_empty()) else {
        eprintln!("SKIPPED python_and_rust_share_one_server: {URL_ENV} is not set");
        return;
    };
    let Ok(python) = std::env::var(PY_ENV) else {
        eprintln!("SKIPPED python_and_rust_share_one_server: {PY_ENV} is not set");
        return;
    };
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let sfx = format!("{}x{nanos:x}", std::process::id());
    let n = |s: &str| format!("{s}-{sfx}");
    let url = format!("{}?timeout=30", base.trim());

    let rust = coordinator(&url, &n("rust-m"));
    rust.start(true).await.unwrap();
    rust.create_group(n("shared-g").as_str()).await.unwrap();
    rust.join_group(n("shared-g").as_str(), &BTreeMap::from([("weight", 3)]))
        .await
        .unwrap();
    let lock = rust.get_lock(n("rust-lock").as_str()).unwrap();
    assert!(lock.acquire(Wait::No).await.unwrap());
    let shared = rust.get_lock(n("rust-shared").as_str()).unwrap();
    assert!(shared.acquire_shared(Wait::No).await.unwrap());
    assert!(
        rust.try_become_leader(n("shared-g").as_str())
            .await
            .unwrap()
            .is_some()
    );
    let part = rust
        .join_partitioned_group(n("part-g").as_str(), 5, 32)
        .await
        .unwrap();

    let mut py = PythonPeer::spawn(&python, SCRIPT, &[&url, &sfx]);
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
            "rust-leader rust-m".into(),
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

    // What we see of Python.
    let members = rust
        .get_members_with_capabilities(n("shared-g").as_str())
        .await
        .unwrap();
    let caps = members
        .get(&MemberId::from(n("py-m").as_str()))
        .expect("py-m listed");
    // Python's msgpack, byte for byte: a map of str keys, a bin value.
    assert_eq!(
        caps.as_msgpack(),
        b"\x82\xa4lang\xa6python\xa4blob\xc4\x02\x00\x01"
    );
    let py_lock = rust.get_lock(n("py-lock").as_str()).unwrap();
    assert!(!py_lock.acquire(Wait::No).await.unwrap());
    assert!(!py_lock.acquire_shared(Wait::No).await.unwrap());
    assert_eq!(
        rust.get_leader(n("py-g").as_str()).await.unwrap(),
        Some(MemberId::from(n("py-m").as_str()))
    );
    assert!(
        rust.try_become_leader(n("py-g").as_str())
            .await
            .unwrap()
            .is_none()
    );
    // Python's join did not let a second py-m in.
    let twin = coordinator(&url, &n("py-m"));
    twin.start(false).await.unwrap();
    assert!(matches!(
        twin.join_group(n("shared-g").as_str(), &()).await,
        Err(ToozError::MemberAlreadyExist { .. })
    ));
    twin.stop().await.unwrap();

    // Python stops: its lock and leadership are released, its member leaves.
    py.go().await;
    assert_eq!(py.line().await, "after ['py-m', 'rust-m']");
    assert_eq!(py.line().await, "stopped");
    py.wait_success().await;
    assert!(
        py_lock
            .acquire(Wait::For(Duration::from_secs(2)))
            .await
            .unwrap()
    );
    assert!(
        rust.try_become_leader(n("py-g").as_str())
            .await
            .unwrap()
            .is_some()
    );
    assert!(py_lock.release().await.unwrap());
    let members = rust.get_members(n("shared-g").as_str()).await.unwrap();
    assert!(
        !members.contains(&MemberId::from(n("py-m").as_str())),
        "{members:?}"
    );

    assert!(lock.release().await.unwrap());
    assert!(shared.release().await.unwrap());
    rust.leave_partitioned_group(part).await.unwrap();
    rust.leave_group(n("shared-g").as_str()).await.unwrap();
    rust.stop().await.unwrap();
    let admin = coordinator(&url, &n("admin"));
    admin.start(false).await.unwrap();
    for g in ["shared-g", "py-g", "part-g"] {
        admin.delete_group(n(g).as_str()).await.unwrap();
    }
    admin.stop().await.unwrap();
}
