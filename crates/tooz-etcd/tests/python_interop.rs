//! Against real Python tooz (etcd3gw driver): a Python process and a Rust
//! coordinator on one etcd see each other's groups, members, capabilities and
//! locks, and their partitioners agree.
//!
//! Needs `TOOZ_TEST_ETCD_URL` and `TOOZ_TEST_PYTHON` (a Python with `tooz` and
//! `etcd3gw`, e.g. the virtualenv `cargo xtask interop` builds); skipped with a
//! message otherwise (`TOOZ_REQUIRE_BACKENDS=1` makes a missing etcd URL fatal).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tooz_conformance::python::{Observations, PythonPeer, partition_owners};
use tooz_core::{Coordinator, MemberId, Registry, ToozError, Wait};

const PY_ENV: &str = "TOOZ_TEST_PYTHON";

/// The Python side; every name carries the prefix given as argv[2].
const SCRIPT: &str = r#"
import sys
from tooz import coordination
url, p = sys.argv[1], sys.argv[2]
b = lambda s: (p + s).encode()
c = coordination.get_coordinator(url, b("py-m"))
c.start()
out = lambda *a: (print(*a), sys.stdout.flush())
groups = [g.decode() for g in c.get_groups().get()]
out("groups", sorted(g[len(p):] for g in groups if g.startswith(p + "shared") or g.startswith(p + "part")))
out("members", sorted(m.decode()[len(p):] for m in c.get_members(b("shared-g")).get()))
out("rust-caps", c.get_member_capabilities(b("shared-g"), b("rust-m")).get())
out("rust-lock", c.get_lock(b("rust-lock")).acquire(blocking=False))
out("rust-shared", c.get_lock(b("rust-shared")).acquire(blocking=False))
c.join_group(b("shared-g"), {"lang": "python", "blob": b"\x00\x01"}).get()
pl = c.get_lock(b("py-lock"))
out("py-lock", pl.acquire(blocking=False))
pm = b("part-g")
part = c.join_partitioned_group(pm, weight=2)
objs = ["obj-%d" % i for i in range(40)] + ["\u0447\u0443\u043f\u0430\u043a\u0430\u0431\u0440\u0430"]
out("owners", ";".join(
    "%s=%s" % (o, ",".join(sorted(m.decode()[len(p):] for m in part.members_for_object(o, replicas=r))))
    for r in (1, 2) for o in objs))
out("ready")
sys.stdin.readline()
c.heartbeat()
out("after", sorted(m.decode()[len(p):] for m in c.get_members(b("shared-g")).get()))
out("rust-lock-after", c.get_lock(b("rust-lock")).acquire(blocking=False))
pl.release()
c.leave_partitioned_group(part)
c.leave_group(b("shared-g")).get()
c.stop()
out("stopped")
"#;

fn coordinator(url: &str, member: &str) -> Coordinator {
    Registry::new()
        .with(tooz_etcd::DRIVER)
        .connect(url, member)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_and_rust_share_one_server() {
    let base = match std::env::var("TOOZ_TEST_ETCD_URL") {
        Ok(u) if !u.trim().is_empty() => u.trim().to_string(),
        _ => {
            assert!(
                std::env::var("TOOZ_REQUIRE_BACKENDS").as_deref() != Ok("1"),
                "TOOZ_TEST_ETCD_URL is not set and TOOZ_REQUIRE_BACKENDS=1"
            );
            eprintln!("SKIPPED python_and_rust_share_one_server: TOOZ_TEST_ETCD_URL is not set");
            return;
        }
    };
    let Ok(python) = std::env::var(PY_ENV) else {
        eprintln!("SKIPPED python_and_rust_share_one_server: {PY_ENV} is not set");
        return;
    };
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let p = format!("ia{:x}-", nanos & 0xffff_ffff_ffff);
    let n = |s: &str| format!("{p}{s}");
    // Python's etcd3gw URL form, with the api_version option the gateway needs.
    let sep = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{sep}api_version=v3&timeout=30");
    let rust = coordinator(&url, &n("rust-m"));
    rust.start(true).await.unwrap();
    rust.create_group(n("shared-g")).await.unwrap();
    rust.join_group(n("shared-g"), &BTreeMap::from([("weight", 3)]))
        .await
        .unwrap();
    let lock = rust.get_lock(n("rust-lock")).unwrap();
    assert!(lock.acquire(Wait::No).await.unwrap());
    let shared = rust.get_lock(n("rust-shared")).unwrap();
    assert!(shared.acquire_shared(Wait::No).await.unwrap());
    let part = rust
        .join_partitioned_group(n("part-g"), 5, 32)
        .await
        .unwrap();

    let mut py = PythonPeer::spawn(&python, SCRIPT, &[&url, &p]);
    let Observations {
        lines: seen,
        owners: py_owners,
    } = py.until_ready().await;
    // What Python saw of us. (Python's get_groups also lists bogus `group/member`
    // entries; the filter keeps the real ones and those bogus entries that start
    // like them, so this also pins that bug's shape.)
    assert_eq!(
        seen[1..],
        [
            "members ['rust-m']".to_string(),
            "rust-caps {'weight': 3}".into(),
            "rust-lock False".into(),
            "rust-shared False".into(),
            "py-lock True".into(),
        ],
        "Python's view"
    );
    assert!(
        seen[0].contains("'shared-g'") && seen[0].contains("'part-g'"),
        "Python's groups: {}",
        seen[0]
    );
    // Our get_groups lists only real groups.
    let groups = rust.get_groups().await.unwrap();
    assert!(groups.contains(&n("shared-g").as_str().into()));
    assert!(
        groups.iter().all(|g| !g.as_bytes().contains(&b'/')),
        "{groups:?}"
    );

    // Partitioners agree (weights 2 and 5 read from each other's capabilities).
    part.refresh().await.unwrap();
    assert_eq!(
        partition_owners(&part, &p),
        py_owners,
        "partition owners differ"
    );

    // What we see of Python: its member and capabilities byte for byte, its lock.
    let members = rust
        .get_members_with_capabilities(n("shared-g"))
        .await
        .unwrap();
    let caps = members
        .get(&MemberId::from(n("py-m")))
        .expect("py-m listed");
    assert_eq!(
        caps.as_msgpack(),
        b"\x82\xa4lang\xa6python\xa4blob\xc4\x02\x00\x01"
    );
    let py_lock = rust.get_lock(n("py-lock")).unwrap();
    assert!(
        !py_lock.acquire(Wait::No).await.unwrap(),
        "took Python's lock"
    );
    let twin = coordinator(&url, &n("py-m"));
    twin.start(false).await.unwrap();
    assert!(matches!(
        twin.join_group(n("shared-g"), &()).await,
        Err(ToozError::MemberAlreadyExist { .. })
    ));
    twin.stop().await.unwrap();

    // Rust releases its lock; Python then takes it, releases its own, and leaves.
    assert!(lock.release().await.unwrap());
    py.go().await;
    let after = py.line().await;
    assert_eq!(after, "after ['py-m', 'rust-m']");
    assert_eq!(py.line().await, "rust-lock-after True");
    assert_eq!(py.line().await, "stopped");
    py.wait_success().await;
    // Python released py-lock: our waiter gets it.
    assert!(
        py_lock
            .acquire(Wait::For(Duration::from_secs(5)))
            .await
            .unwrap(),
        "Python's released lock was not acquirable"
    );
    assert!(py_lock.release().await.unwrap());
    let members = rust.get_members(n("shared-g")).await.unwrap();
    assert!(!members.contains(&MemberId::from(n("py-m"))), "{members:?}");
    assert!(shared.release().await.unwrap());
    rust.leave_partitioned_group(part).await.unwrap();
    rust.leave_group(n("shared-g")).await.unwrap();
    rust.delete_group(n("shared-g")).await.unwrap();
    rust.stop().await.unwrap();
}
