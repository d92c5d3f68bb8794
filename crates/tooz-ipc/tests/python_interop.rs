//! Against real Python tooz: a Python process (tooz 9.1 with sysv_ipc 1.2.0) and a
//! Rust coordinator on one host exclude each other on locks, both ways, and list
//! the groups the other side created (and stop listing the ones it deleted); a
//! Python holder that dies without releasing frees the lock for a Rust waiter.
//!
//! This sysv_ipc build has no semaphore timeouts, so Python tooz only takes IPC
//! locks with a blocking `acquire()`: the Python side waits in a thread, and
//! reports whether it got the lock.
//!
//! Needs `TOOZ_TEST_PYTHON` (a Python with `tooz` and `sysv_ipc` installed, e.g.
//! the virtualenv `cargo xtask interop` builds); skipped with a message otherwise
//! (Python is not a backend, as in the other drivers' interop tests). SysV objects
//! are host-wide, so every name carries a suffix unique to the run.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tooz_conformance::python::PythonPeer;
use tooz_core::{Coordinator, GroupId, Registry, Wait};

const PY_ENV: &str = "TOOZ_TEST_PYTHON";

/// The Python side. Each step prints what it saw; `ready` and later lines are
/// paced by the Rust side through stdin.
const SCRIPT: &str = r#"
import sys, threading
from tooz import coordination
sfx = sys.argv[1]
n = lambda s: (s + "-" + sfx).encode()
d = lambda b: b.decode().replace("-" + sfx, "")
out = lambda *a: (print(*a), sys.stdout.flush())
mine = lambda: sorted(d(g) for g in c.get_groups().get() if g.decode().endswith(sfx))
c = coordination.get_coordinator("ipc://", n("py-m"))
c.start()
out("groups", mine())
c.create_group(n("py-g")).get()
# Rust holds rust-lock: a blocking acquire must wait until Rust releases it.
rl = c.get_lock(n("rust-lock"))
got = threading.Event()
def take():
    rl.acquire()
    got.set()
threading.Thread(target=take, daemon=True).start()
out("took-rust-lock-while-held", got.wait(0.5))
out("ready")
sys.stdin.readline()  # Rust released rust-lock
out("took-rust-lock-after-release", got.wait(10))
out("holding")
sys.stdin.readline()  # Rust tried and is waiting
out("released", rl.release())
sys.stdin.readline()  # Rust deleted rust-g
out("groups", mine())
c.delete_group(n("py-g")).get()
# Not c.stop(): Python's stop removes the group list of every process on the host.
out("done")
"#;

fn coordinator(member: &str) -> Coordinator {
    Registry::new()
        .with(tooz_ipc::DRIVER)
        .connect("ipc://", member)
        .unwrap()
}

async fn my_groups(c: &Coordinator, sfx: &str) -> Vec<String> {
    let mut v: Vec<String> = c
        .get_groups()
        .await
        .unwrap()
        .iter()
        .map(GroupId::to_string_lossy)
        .filter(|g| g.ends_with(sfx))
        .map(|g| g.replace(&format!("-{sfx}"), ""))
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn python_and_rust_share_one_host() {
    // Python is not a backend: there is no server here, so `TOOZ_REQUIRE_BACKENDS`
    // has nothing to make fatal (`cargo xtask interop` always sets the interpreter).
    let Ok(python) = std::env::var(PY_ENV) else {
        eprintln!("SKIPPED python_and_rust_share_one_host: {PY_ENV} is not set");
        return;
    };
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let sfx = format!("{}x{nanos:x}", std::process::id());
    let n = |s: &str| format!("{s}-{sfx}");

    let rust = coordinator(&n("rust-m"));
    rust.start(false).await.unwrap();
    rust.create_group(n("rust-g").as_str()).await.unwrap();
    let lock = rust.get_lock(n("rust-lock").as_str()).unwrap();
    assert!(lock.acquire(Wait::No).await.unwrap());

    let mut py = PythonPeer::spawn(&python, SCRIPT, &[&sfx]);
    let seen = py.until_ready().await.lines;
    assert_eq!(
        seen,
        vec![
            "groups ['rust-g']".to_string(),
            "took-rust-lock-while-held False".into(),
        ],
        "Python's view while Rust holds rust-lock"
    );
    // Python's group is listed here.
    assert_eq!(my_groups(&rust, &sfx).await, ["py-g", "rust-g"]);

    // Rust releases: Python's blocked acquire gets the lock.
    assert!(lock.release().await.unwrap());
    py.go().await;
    assert_eq!(py.line().await, "took-rust-lock-after-release True");
    assert_eq!(py.line().await, "holding");

    // Python holds: Rust is excluded, and woken by Python's release.
    assert!(!lock.acquire(Wait::No).await.unwrap());
    let waiter = {
        let lock = lock.clone();
        tokio::spawn(async move { lock.acquire(Wait::For(Duration::from_secs(10))).await })
    };
    py.go().await;
    assert_eq!(py.line().await, "released True");
    assert!(
        waiter.await.unwrap().unwrap(),
        "Rust got the lock Python released"
    );
    assert!(lock.release().await.unwrap());

    // Deletions are seen on the other side too.
    rust.delete_group(n("rust-g").as_str()).await.unwrap();
    py.go().await;
    assert_eq!(py.line().await, "groups ['py-g']");
    assert_eq!(py.line().await, "done");
    py.wait_success().await;
    assert!(my_groups(&rust, &sfx).await.is_empty());
    rust.stop().await.unwrap();
}

/// A Python holder that dies without releasing: the kernel undoes its hold
/// (`SEM_UNDO`) and wakes the Rust waiter.
const CRASH_SCRIPT: &str = r#"
import os, sys
from tooz import coordination
name = sys.argv[1].encode()
c = coordination.get_coordinator("ipc://", b"py-crash")
c.start()
print("holding", c.get_lock(name).acquire())
sys.stdout.flush()
sys.stdin.readline()
os._exit(0)  # no release, no stop
"#;

#[tokio::test]
async fn a_crashed_python_holder_frees_the_lock() {
    let Ok(python) = std::env::var(PY_ENV) else {
        eprintln!("SKIPPED a_crashed_python_holder_frees_the_lock: {PY_ENV} is not set");
        return;
    };
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let name = format!("crash-lock-{}x{nanos:x}", std::process::id());
    let rust = coordinator("rust-crash");
    rust.start(false).await.unwrap();
    let lock = rust.get_lock(name.as_str()).unwrap();

    let mut py = PythonPeer::spawn(&python, CRASH_SCRIPT, &[&name]);
    assert_eq!(py.line().await, "holding True");
    assert!(!lock.acquire(Wait::No).await.unwrap(), "Python holds it");
    let waiter = {
        let lock = lock.clone();
        tokio::spawn(async move { lock.acquire(Wait::For(Duration::from_secs(10))).await })
    };
    py.go().await;
    py.wait_success().await;
    assert!(
        waiter.await.unwrap().unwrap(),
        "the dead holder's semaphore was undone"
    );
    assert!(lock.release().await.unwrap());
    rust.stop().await.unwrap();
}
