//! Against real Python tooz: a Python process (tooz 8.1.0, the last release with a
//! Consul driver, on python-consul2 0.1.5) and a Rust coordinator on one Consul
//! agent, in the default namespace `tooz`, see each other's groups, members and
//! capabilities; a group with a Python member cannot be deleted from Rust; locks
//! exclude both ways (exclusive and shared on our side).
//!
//! Needs `TOOZ_TEST_CONSUL_URL` and `TOOZ_TEST_PYTHON` (a Python with tooz 8.1.0
//! and python-consul2, e.g. the virtualenv `target/interop-venv-consul` that
//! `cargo xtask interop --driver consul` builds); skipped with a message otherwise
//! (`TOOZ_REQUIRE_BACKENDS=1` makes a missing Consul URL fatal; Python is not a
//! backend). Every name carries a suffix unique to the run.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tooz_conformance::python::PythonPeer;
use tooz_core::{Coordinator, MemberId, Registry, ToozError, Wait};

const URL_ENV: &str = "TOOZ_TEST_CONSUL_URL";
const PY_ENV: &str = "TOOZ_TEST_PYTHON";

/// The Python side: reports what it sees of the Rust side, joins, creates a
/// group with itself in it and takes a lock, then waits for a line on stdin
/// before leaving, releasing and stopping.
const SCRIPT: &str = r#"
import sys, warnings
warnings.simplefilter("ignore")
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
out("rust-lock", c.get_lock(n("rust-lock")).acquire(blocking=False))
out("rust-shared", c.get_lock(n("rust-shared")).acquire(blocking=False))
# Ours, for Rust to see.
c.join_group(n("shared-g"), {"lang": "python", "blob": b"\x00\x01"}).get()
c.create_group(n("py-g")).get()
c.join_group(n("py-g"), b"").get()
pl = c.get_lock(n("py-lock"))
out("py-lock", pl.acquire(blocking=False))
out("ready")
sys.stdin.readline()
out("after", sorted(d(m) for m in c.get_members(n("shared-g")).get()))
out("released", pl.release())
c.leave_group(n("shared-g")).get()
c.leave_group(n("py-g")).get()
c.stop()
out("stopped")
"#;

fn coordinator(url: &str, member: &str) -> Coordinator {
    Registry::new()
        .with(tooz_consul::DRIVER)
        .connect(url, member)
        .unwrap()
}

#[tokio::test]
async fn python_and_rust_share_one_agent() {
    let base = match std::env::var(URL_ENV) {
        Ok(u) if !u.trim().is_empty() => u.trim().to_string(),
        _ => {
            assert!(
                std::env::var("TOOZ_REQUIRE_BACKENDS").as_deref() != Ok("1"),
                "{URL_ENV} is not set and TOOZ_REQUIRE_BACKENDS=1"
            );
            eprintln!("SKIPPED python_and_rust_share_one_agent: {URL_ENV} is not set");
            return;
        }
    };
    let Ok(python) = std::env::var(PY_ENV) else {
        eprintln!("SKIPPED python_and_rust_share_one_agent: {PY_ENV} is not set");
        return;
    };
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let sfx = format!("{}x{nanos:x}", std::process::id());
    let n = |s: &str| format!("{s}-{sfx}");
    let url = format!("{base}?ttl=10&lock_delay=1");

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

    let mut py = PythonPeer::spawn(&python, SCRIPT, &[&base, &sfx]);
    let seen = py.until_ready().await.lines;
    // What Python saw of us.
    assert_eq!(
        seen,
        vec![
            "groups ['shared-g']".to_string(),
            "members ['rust-m']".into(),
            "rust-caps {'weight': 3}".into(),
            "rust-lock False".into(),
            "rust-shared False".into(),
            "py-lock True".into(),
        ],
        "Python's view"
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
    let groups = rust.get_groups().await.unwrap();
    assert!(groups.contains(&n("py-g").as_str().into()), "{groups:?}");
    // A group with a Python member cannot be deleted from Rust.
    assert!(matches!(
        rust.delete_group(n("py-g").as_str()).await,
        Err(ToozError::GroupNotEmpty(_))
    ));
    // Python's lock excludes us, exclusive and shared.
    let py_lock = rust.get_lock(n("py-lock").as_str()).unwrap();
    assert!(!py_lock.acquire(Wait::No).await.unwrap());
    assert!(!py_lock.acquire_shared(Wait::No).await.unwrap());
    // Python's member id is taken in the group.
    let twin = coordinator(&url, &n("py-m"));
    twin.start(false).await.unwrap();
    assert!(matches!(
        twin.join_group(n("shared-g").as_str(), &()).await,
        Err(ToozError::MemberAlreadyExist { .. })
    ));
    twin.stop().await.unwrap();

    // Python releases, leaves and stops: the lock is ours to take (woken by the
    // blocking query), its members are gone, and py-g can go.
    let waiter = {
        let py_lock = py_lock.clone();
        tokio::spawn(async move { py_lock.acquire(Wait::For(Duration::from_secs(10))).await })
    };
    py.go().await;
    assert_eq!(py.line().await, "after ['py-m', 'rust-m']");
    assert_eq!(py.line().await, "released True");
    assert_eq!(py.line().await, "stopped");
    py.wait_success().await;
    assert!(waiter.await.unwrap().unwrap());
    assert!(py_lock.fencing_token().is_some());
    assert!(py_lock.release().await.unwrap());
    let members = rust.get_members(n("shared-g").as_str()).await.unwrap();
    assert!(
        !members.contains(&MemberId::from(n("py-m").as_str())),
        "{members:?}"
    );
    rust.delete_group(n("py-g").as_str()).await.unwrap();

    assert!(lock.release().await.unwrap());
    assert!(shared.release().await.unwrap());
    rust.leave_group(n("shared-g").as_str()).await.unwrap();
    rust.delete_group(n("shared-g").as_str()).await.unwrap();
    rust.stop().await.unwrap();
}
