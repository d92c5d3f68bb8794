//! Against real Python tooz (kazoo): a Python process and a Rust coordinator on
//! one ZooKeeper server see each other's groups, members, capabilities, locks,
//! leaders and partition owners.
//!
//! Needs `TOOZ_TEST_ZOOKEEPER_URL` and `TOOZ_TEST_PYTHON` (a Python with `tooz`
//! and `kazoo` installed, e.g. the virtualenv `cargo xtask interop` builds);
//! skipped with a message otherwise (Python is not a backend:
//! `TOOZ_REQUIRE_BACKENDS` only makes a missing ZooKeeper URL fatal).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tooz_conformance::python::{Observations, PythonPeer, partition_owners};
use tooz_core::{Coordinator, MemberId, Registry, ToozError, Wait};
use zookeeper_client::Client;

const URL_ENV: &str = "TOOZ_TEST_ZOOKEEPER_URL";
const PY_ENV: &str = "TOOZ_TEST_PYTHON";

/// The Python side: reports what it sees of the Rust side, joins, locks and
/// leads, then waits for a line on stdin, takes the lock Rust released (waiting
/// on Rust's node) and stops.
const SCRIPT: &str = r#"
import sys
from tooz import coordination
url = sys.argv[1]
c = coordination.get_coordinator(url, b"py-m")
c.start()
out = lambda *a: (print(*a), sys.stdout.flush())
# What Rust left for us (Python lists its `locks` tree and `leader` directories).
out("groups", sorted(g.decode() for g in c.get_groups().get()))
out("members", sorted(m.decode() for m in c.get_members(b"shared-g").get()))
out("rust-caps", c.get_member_capabilities(b"shared-g", b"rust-m").get())
out("rust-leader", c.get_leader(b"shared-g").get())
out("rust-lock", c.get_lock(b"rust-lock").acquire(blocking=False))
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
# Rust released rust-lock: a blocked Python waiter on Rust's node gets it.
rl = c.get_lock(b"rust-lock")
out("rust-lock-after", rl.acquire(blocking=5))
rl.release()
out("after", sorted(m.decode() for m in c.get_members(b"shared-g").get()))
c.stop()
out("stopped")
"#;

fn unique_ns(label: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("tooz-test-{label}-{}-{nanos:x}", std::process::id())
}

fn coordinator(url: &str, member: &str) -> Coordinator {
    Registry::new()
        .with(tooz_zookeeper::DRIVER)
        .connect(url, member)
        .unwrap()
}

async fn raw(base: &str) -> Client {
    let u = tooz_core::Url::parse(base).unwrap();
    let hp = format!("{}:{}", u.host_str().unwrap(), u.port().unwrap_or(2181));
    Client::connect(&hp).await.unwrap()
}

/// Removes a namespace and everything below it.
async fn purge(base: &str, ns: &str) {
    let zk = raw(base).await;
    let mut stack = vec![format!("/{ns}")];
    let mut order = Vec::new();
    while let Some(p) = stack.pop() {
        if let Ok((kids, _)) = zk.get_children(&p).await {
            stack.extend(kids.into_iter().map(|k| format!("{p}/{k}")));
        }
        order.push(p);
    }
    for p in order.into_iter().rev() {
        let _ = zk.delete(&p, None).await;
    }
}

#[tokio::test]
async fn python_and_rust_share_one_server() {
    let base = match std::env::var(URL_ENV) {
        Ok(u) if !u.trim().is_empty() => u.trim().to_string(),
        _ => {
            assert!(
                !std::env::var("TOOZ_REQUIRE_BACKENDS").is_ok_and(|v| v == "1"),
                "{URL_ENV} is not set and TOOZ_REQUIRE_BACKENDS=1"
            );
            eprintln!("SKIPPED python_and_rust_share_one_server: {URL_ENV} is not set");
            return;
        }
    };
    let Ok(python) = std::env::var(PY_ENV) else {
        eprintln!("SKIPPED python_and_rust_share_one_server: {PY_ENV} is not set");
        return;
    };
    let ns = unique_ns("py");
    let url = format!("{base}?namespace={ns}&timeout=10");
    let rust = coordinator(&url, "rust-m");
    rust.start(true).await.unwrap();
    rust.create_group("shared-g").await.unwrap();
    rust.join_group("shared-g", &BTreeMap::from([("weight", 3)]))
        .await
        .unwrap();
    let lock = rust.get_lock("rust-lock").unwrap();
    assert!(lock.acquire(Wait::No).await.unwrap());
    assert!(rust.try_become_leader("shared-g").await.unwrap().is_some());

    let part = rust.join_partitioned_group("part-g", 5, 32).await.unwrap();
    let mut py = PythonPeer::spawn(&python, SCRIPT, &[&url]);
    let Observations {
        lines: seen,
        owners: py_owners,
    } = py.until_ready().await;
    // What Python saw of us, with its own quirks: the `locks` tree listed as a
    // group, the election directory listed as a member.
    assert_eq!(
        seen,
        vec![
            "groups ['locks', 'part-g', 'shared-g']".to_string(),
            "members ['leader', 'rust-m']".into(),
            "rust-caps {'weight': 3}".into(),
            "rust-leader b'rust-m'".into(),
            "rust-lock False".into(),
            "py-lock True".into(),
            "elected py-g".into(),
        ],
        "Python's view"
    );

    // Python's partitioner and ours agree on every owner.
    part.refresh().await.unwrap();
    assert_eq!(
        partition_owners(&part, ""),
        py_owners,
        "partition owners differ"
    );

    // What we see of Python: no `leader` pseudo-member, Python's msgpack byte for byte.
    let members = rust
        .get_members_with_capabilities("shared-g")
        .await
        .unwrap();
    assert_eq!(
        members.keys().map(|m| m.to_string()).collect::<Vec<_>>(),
        ["py-m", "rust-m"]
    );
    let caps = &members[&MemberId::from("py-m")];
    assert_eq!(
        caps.as_msgpack(),
        b"\x82\xa4lang\xa6python\xa4blob\xc4\x02\x00\x01"
    );
    let info = rust.get_member_info("shared-g", "py-m").await.unwrap();
    assert!(info.created_at.is_some() && info.updated_at.is_some());
    let py_lock = rust.get_lock("py-lock").unwrap();
    assert!(!py_lock.acquire(Wait::No).await.unwrap());
    // Python's holder node is numbered by the same counter as ours (its czxid).
    let zk = raw(&base).await;
    let dir = format!("/{ns}/locks/py-lock");
    let (kids, _) = zk.get_children(&dir).await.unwrap();
    assert_eq!(kids.len(), 1, "{kids:?}");
    assert!(kids[0].contains("__lock__"), "{kids:?}");
    let (data, py_stat) = zk.get_data(&format!("{dir}/{}", kids[0])).await.unwrap();
    assert_eq!(data, b"py-m");
    assert_eq!(
        rust.get_leader("py-g").await.unwrap(),
        Some(MemberId::from("py-m"))
    );
    assert!(rust.try_become_leader("py-g").await.unwrap().is_none());
    let groups = rust.get_groups().await.unwrap();
    assert!(
        !groups.iter().any(|g| g.as_bytes() == b"locks"),
        "{groups:?}"
    );
    // Python's join did not let a second "py-m" in.
    let twin = coordinator(&url, "py-m");
    twin.start(false).await.unwrap();
    assert!(matches!(
        twin.join_group("shared-g", &()).await,
        Err(ToozError::MemberAlreadyExist { .. })
    ));
    twin.stop().await.unwrap();

    // Rust waits on Python's lock (watching Python's node) while Python takes
    // ours after we release it.
    let waiter = {
        let l = py_lock.clone();
        tokio::spawn(async move { l.acquire(Wait::For(Duration::from_secs(20))).await })
    };
    assert!(lock.release().await.unwrap());
    py.go().await;
    assert_eq!(py.line().await, "rust-lock-after True");
    assert_eq!(py.line().await, "after ['leader', 'py-m', 'rust-m']");
    assert_eq!(py.line().await, "stopped");
    py.wait_success().await;
    // Python stopped: its lock goes to the Rust waiter, its leadership to us.
    assert!(
        waiter.await.unwrap().unwrap(),
        "the Rust waiter did not get py-lock"
    );
    let token = py_lock.fencing_token().expect("a held lock has a token");
    assert!(
        token.0 > u64::try_from(py_stat.czxid).unwrap(),
        "the Rust holder's token {token} does not follow the Python holder's czxid {}",
        py_stat.czxid
    );
    assert!(rust.try_become_leader("py-g").await.unwrap().is_some());
    assert!(py_lock.release().await.unwrap());
    let members = rust.get_members("shared-g").await.unwrap();
    assert!(!members.contains(&MemberId::from("py-m")), "{members:?}");

    rust.leave_partitioned_group(part).await.unwrap();
    rust.stop().await.unwrap();
    purge(&base, &ns).await;
}
