//! The scenario both SQL interop tests run: a Python tooz 9.1 process and a Rust
//! coordinator on one database exclude each other's locks both ways, and a waiter on
//! either side gets the lock when the other side releases it.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tooz_conformance::python::PythonPeer;
use tooz_core::{Coordinator, DriverDescriptor, Registry, Wait};

const PY_ENV: &str = "TOOZ_TEST_PYTHON";

/// The Python side. `long` is a lock name of 100 bytes (MariaDB takes it as it is;
/// `-` when the server would refuse it).
const SCRIPT: &str = r#"
import sys, time
from tooz import coordination
url, sfx, long = sys.argv[1], sys.argv[2], sys.argv[3]
n = lambda s: (s + "-" + sfx).encode()
out = lambda *a: (print(*a), sys.stdout.flush())
c = coordination.get_coordinator(url, n("py-m"))
c.start()
out("rust-lock", c.get_lock(n("rust-lock")).acquire(blocking=False))
if sys.argv[4] == "shared":
    out("rust-shared", c.get_lock(n("rust-shared")).acquire(blocking=False))
pl = c.get_lock(n("py-lock"))
out("py-lock", pl.acquire(blocking=False))
if long != "-":
    ll = c.get_lock(long.encode())
    out("py-long", ll.acquire(blocking=False))
out("ready")
sys.stdin.readline()
# Rust waits for py-lock: release it.
pl.release()
if long != "-":
    ll.release()
out("released")
# Now wait for rust-lock, which Rust holds.
w = c.get_lock(n("rust-lock"))
out("waiting")
out("got-rust-lock", w.acquire(blocking=True))
sys.stdin.readline()
w.release()
c.stop()
out("stopped")
"#;

pub async fn python_and_rust_locks(
    driver: DriverDescriptor,
    url_env: &str,
    long_names: bool,
    rust_shared_excludes_python: bool,
) {
    let Some(base) = std::env::var(url_env).ok().filter(|u| !u.trim().is_empty()) else {
        eprintln!("SKIPPED python_and_rust_locks: {url_env} is not set");
        return;
    };
    let Ok(python) = std::env::var(PY_ENV) else {
        eprintln!("SKIPPED python_and_rust_locks: {PY_ENV} is not set");
        return;
    };
    let base = base.trim().to_string();
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let sfx = format!("{}x{nanos:x}", std::process::id());
    let n = |s: &str| format!("{s}-{sfx}");
    let long = if long_names {
        format!("{:x<100}", format!("long-{sfx}-"))
    } else {
        "-".to_string()
    };
    let url = format!("{base}?timeout=10");
    let rust: Coordinator = Registry::new()
        .with(driver)
        .connect(&url, n("rust-m"))
        .unwrap();
    rust.start(true).await.unwrap();

    let lock = rust.get_lock(n("rust-lock").as_str()).unwrap();
    assert!(lock.acquire(Wait::No).await.unwrap());
    let shared = rust.get_lock(n("rust-shared").as_str()).unwrap();
    assert!(shared.acquire_shared(Wait::No).await.unwrap());

    let mut py = PythonPeer::spawn(
        &python,
        SCRIPT,
        &[
            &base,
            &sfx,
            &long,
            if rust_shared_excludes_python {
                "shared"
            } else {
                "-"
            },
        ],
    );
    let seen = py.until_ready().await.lines;
    let mut want = vec!["rust-lock False".to_string()];
    if rust_shared_excludes_python {
        want.push("rust-shared False".into());
    }
    want.push("py-lock True".into());
    if long_names {
        want.push("py-long True".into());
    }
    assert_eq!(seen, want, "Python's view");

    // Python's locks exclude ours.
    let py_lock = rust.get_lock(n("py-lock").as_str()).unwrap();
    assert!(!py_lock.acquire(Wait::No).await.unwrap());
    assert!(!py_lock.acquire_shared(Wait::No).await.unwrap());
    let long_lock = long_names.then(|| rust.get_lock(long.as_str()).unwrap());
    if let Some(l) = &long_lock {
        assert!(
            !l.acquire(Wait::No).await.unwrap(),
            "a long name Python holds"
        );
    }

    // A Rust waiter gets py-lock as soon as Python releases it (server-side wait).
    let waiter = {
        let l = py_lock.clone();
        tokio::spawn(async move {
            let got = l.acquire(Wait::For(Duration::from_secs(20))).await.unwrap();
            (got, Instant::now())
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiter.is_finished(),
        "Rust got py-lock while Python held it"
    );
    py.go().await;
    assert_eq!(py.line().await, "released");
    let released = Instant::now();
    let (got, at) = waiter.await.unwrap();
    assert!(got, "the Rust waiter did not get py-lock");
    let handoff = at.saturating_duration_since(released);
    eprintln!("python release -> rust waiter: {handoff:?} (measured after Python's line)");
    assert!(handoff < Duration::from_secs(2), "handoff took {handoff:?}");
    if let Some(l) = &long_lock {
        assert!(
            l.acquire(Wait::For(Duration::from_secs(5))).await.unwrap(),
            "the long name Python released"
        );
        assert!(l.release().await.unwrap());
    }

    // A Python waiter gets rust-lock when Rust releases it, not before.
    assert_eq!(py.line().await, "waiting");
    assert!(
        tokio::time::timeout(Duration::from_millis(500), py.line())
            .await
            .is_err(),
        "Python got rust-lock while Rust held it"
    );
    assert!(lock.release().await.unwrap());
    let t0 = Instant::now();
    assert_eq!(py.line().await, "got-rust-lock True");
    eprintln!("rust release -> python waiter: {:?}", t0.elapsed());
    // Python holds it now: Rust is excluded.
    assert!(!lock.acquire(Wait::No).await.unwrap());
    py.go().await;
    assert_eq!(py.line().await, "stopped");
    py.wait_success().await;
    assert!(
        lock.acquire(Wait::For(Duration::from_secs(5)))
            .await
            .unwrap()
    );
    assert!(lock.release().await.unwrap());
    assert!(py_lock.release().await.unwrap());
    assert!(shared.release().await.unwrap());
    rust.stop().await.unwrap();
}
