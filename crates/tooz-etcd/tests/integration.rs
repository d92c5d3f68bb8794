//! etcd-specific behaviour the shared suite cannot provoke: the coordinator's
//! lease revoked behind its back, replies lost after the server applied a request
//! (a `tooz_conformance::fault::FaultProxy` swallows them), and the shared-lock
//! marker outliving the reader whose lease it was created on.
//!
//! ```text
//! TOOZ_TEST_ETCD_URL=etcd3+http://127.0.0.1:2379 cargo test -p tooz-etcd --test integration
//! ```
//!
//! Skipped with a message without `TOOZ_TEST_ETCD_URL`; fails instead when
//! `TOOZ_REQUIRE_BACKENDS=1`.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use support::{Raw, coordinator_on, hex, kvs, lock_key, python_acquire, raw};
use tooz_conformance::fault::{FaultProxy, proxied_url, url_target};
use tooz_conformance::testkit::{unique, wait_for};
use tooz_core::{Liveness, Wait};

/// How often the tests poll what they wait for.
const POLL: Duration = Duration::from_millis(50);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_lease_is_reported_lost_memberships_rejoined_locks_not_reacquired() {
    let Some(base) =
        support::url("revoked_lease_is_reported_lost_memberships_rejoined_locks_not_reacquired")
    else {
        return;
    };
    let short = format!("{base}?timeout=2");
    let (driver, coord) = coordinator_on(&short, "m");
    let member = coord.member_id().clone();
    coord.start(true).await.unwrap();
    let group = unique("g");
    coord.join_group_create(group.as_str(), &()).await.unwrap();
    let lock = coord.get_lock(unique("l").as_str()).unwrap();
    assert!(lock.acquire(Wait::No).await.unwrap());
    let lost = lock.lost().expect("a held lock has a loss signal");
    let mut liveness = coord.liveness();
    let old = driver.lease_id().expect("a started driver has a lease");

    // Revoke the lease behind the coordinator's back.
    let mut raw = raw(&base).await;
    raw.lease_revoke(old).await.unwrap();

    tokio::time::timeout(
        Duration::from_secs(5),
        liveness.wait_for(|l| *l == Liveness::Lost),
    )
    .await
    .expect("liveness turned Lost within 5 s")
    .unwrap();
    tokio::time::timeout(Duration::from_secs(1), lost.clone().lost())
        .await
        .expect("the lock's loss signal fired");
    assert!(lost.is_lost());
    // A new lease, and the membership re-joined on it.
    wait_for("a new lease", Duration::from_secs(5), POLL, || {
        let d = driver.clone();
        async move { d.lease_id().is_some_and(|l| l != old) }
    })
    .await;
    wait_for("the member re-joined", Duration::from_secs(5), POLL, || {
        let (c, g, m) = (coord.clone(), group.clone(), member.clone());
        async move {
            c.get_members(g.as_str())
                .await
                .is_ok_and(|s| s.contains(&m))
        }
    })
    .await;
    tokio::time::timeout(
        Duration::from_secs(5),
        liveness.wait_for(|l| *l == Liveness::Alive),
    )
    .await
    .expect("liveness back to Alive")
    .unwrap();
    // The lock is not re-acquired behind the user's back: another coordinator gets it.
    let (_, other) = coordinator_on(&short, "o");
    other.start(true).await.unwrap();
    let theirs = other.get_lock(lock.name().clone()).unwrap();
    assert!(
        theirs.acquire(Wait::No).await.unwrap(),
        "the lost lock is free"
    );
    assert!(
        !lock.release().await.unwrap_or(false),
        "the old hold is gone"
    );
    assert!(theirs.release().await.unwrap());
    other.stop().await.unwrap();
    coord.leave_group(group.as_str()).await.unwrap();
    coord.delete_group(group.as_str()).await.unwrap();
    coord.stop().await.unwrap();
}

// ----- lost replies ------------------------------------------------------------

/// Runs `op` with the server's replies swallowed, breaks the connections (and
/// refuses new ones) once `key` shows that the server applied the request (on
/// `lease`), and returns what `op` returned.
async fn with_lost_reply<T: Send + 'static>(
    proxy: &FaultProxy,
    raw: &Raw,
    (key, prefix): (&[u8], bool),
    lease: i64,
    op: impl std::future::Future<Output = T> + Send + 'static,
) -> T {
    proxy.swallow_replies();
    let task = tokio::spawn(op);
    wait_for(
        "the request to be applied",
        Duration::from_secs(10),
        POLL,
        || async { !kvs(raw, key, prefix).await.is_empty() },
    )
    .await;
    proxy.refuse();
    proxy.cut_all();
    assert!(
        kvs(raw, key, prefix)
            .await
            .iter()
            .all(|kv| kv.lease() == lease),
        "written on the coordinator's lease"
    );
    let out = task.await.unwrap();
    proxy.clear();
    out
}

/// How long a freed hold may take to disappear: far less than the lease's TTL.
const FREED_WITHIN: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_replies_leave_no_hold_on_the_lease() {
    let Some(base) = support::url("lost_replies_leave_no_hold_on_the_lease") else {
        return;
    };
    let direct = format!("{base}?timeout=30");
    let raw = raw(&base).await;
    let proxy = FaultProxy::start(url_target(&base).unwrap()).await.unwrap();
    let proxied = proxied_url(&direct, &proxy).unwrap();
    let (driver, a) = coordinator_on(&proxied, "a");
    a.start(true).await.unwrap();
    let lease = driver.lease_id().unwrap();
    let (_, b) = coordinator_on(&direct, "b");
    b.start(true).await.unwrap();
    let gone = |key: Vec<u8>, prefix: bool| {
        let raw = raw.clone();
        move || {
            let (raw, key) = (raw.clone(), key.clone());
            async move { kvs(&raw, &key, prefix).await.is_empty() }
        }
    };

    // Exclusive lock.
    let name = unique("x");
    let key = lock_key(&name);
    let lock = a.get_lock(name.as_str()).unwrap();
    let l = lock.clone();
    let res = with_lost_reply(&proxy, &raw, (&key, false), lease, async move {
        l.acquire(Wait::No).await
    })
    .await;
    assert!(res.is_err(), "{res:?}");
    wait_for(
        "the exclusive hold to be freed",
        FREED_WITHIN,
        POLL,
        gone(key, false),
    )
    .await;
    let theirs = b.get_lock(name.as_str()).unwrap();
    assert!(theirs.acquire(Wait::No).await.unwrap());
    assert!(theirs.release().await.unwrap());

    // Shared lock: the reader key and the marker.
    let name = unique("s");
    let key = lock_key(&name);
    let readers = format!("tooz/lock-readers/{}/", hex(name.as_bytes())).into_bytes();
    let lock = a.get_lock(name.as_str()).unwrap();
    let l = lock.clone();
    let res = with_lost_reply(&proxy, &raw, (&readers, true), lease, async move {
        l.acquire_shared(Wait::No).await
    })
    .await;
    assert!(res.is_err(), "{res:?}");
    wait_for(
        "the reader key to be freed",
        FREED_WITHIN,
        POLL,
        gone(readers, true),
    )
    .await;
    wait_for(
        "the marker to be freed",
        FREED_WITHIN,
        POLL,
        gone(key, false),
    )
    .await;
    let theirs = b.get_lock(name.as_str()).unwrap();
    assert!(theirs.acquire(Wait::No).await.unwrap());
    assert!(theirs.release().await.unwrap());

    // Leadership.
    let group = unique("g");
    let key = format!("tooz/leaders/{group}").into_bytes();
    let (c, g) = (a.clone(), group.clone());
    let res = with_lost_reply(&proxy, &raw, (&key, false), lease, async move {
        c.try_become_leader(g.as_str()).await
    })
    .await;
    assert!(res.is_err(), "{res:?}");
    wait_for(
        "the leadership to be freed",
        FREED_WITHIN,
        POLL,
        gone(key, false),
    )
    .await;
    assert!(b.try_become_leader(group.as_str()).await.unwrap().is_some());
    assert!(b.stand_down_group_leader(group.as_str()).await.unwrap());

    // A release whose request cannot be sent is retried until it goes through.
    let name = unique("r");
    let key = lock_key(&name);
    let lock = a.get_lock(name.as_str()).unwrap();
    assert!(lock.acquire(Wait::No).await.unwrap());
    proxy.refuse();
    proxy.cut_all();
    assert!(lock.release().await.is_err());
    assert_eq!(kvs(&raw, &key, false).await.len(), 1);
    proxy.clear();
    wait_for(
        "the failed release to be retried",
        FREED_WITHIN,
        POLL,
        gone(key, false),
    )
    .await;

    // All of it while the coordinator's lease lived on.
    assert_eq!(driver.lease_id(), Some(lease));
    let ttl = raw.clone().lease_time_to_live(lease, None).await.unwrap();
    assert!(ttl.ttl() > 0, "the lease is alive");
    b.stop().await.unwrap();
    a.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_marker_stays_on_a_remaining_readers_lease() {
    let Some(base) = support::url("shared_marker_stays_on_a_remaining_readers_lease") else {
        return;
    };
    let url = format!("{base}?timeout=10");
    let raw = raw(&base).await;
    let start = |label: &str| coordinator_on(&url, label);
    let marker = |kv: &etcd_client::KeyValue| kv.value() == b"tooz-rs:shared";

    // The first reader stops (releasing gracefully): the marker moves, in the same
    // transaction, to the remaining reader's lease.
    let name = unique("m1");
    let key = lock_key(&name);
    let (da, a) = start("a");
    let (db, b) = start("b");
    a.start(true).await.unwrap();
    b.start(true).await.unwrap();
    let la = a.get_lock(name.as_str()).unwrap();
    assert!(la.acquire_shared(Wait::No).await.unwrap());
    let lb = b.get_lock(name.as_str()).unwrap();
    assert!(lb.acquire_shared(Wait::No).await.unwrap());
    let kv = kvs(&raw, &key, false).await;
    assert!(marker(&kv[0]) && kv[0].lease() == da.lease_id().unwrap());
    a.stop().await.unwrap();
    let kv = kvs(&raw, &key, false).await;
    assert_eq!(kv.len(), 1, "the marker is still there");
    assert!(marker(&kv[0]));
    assert_eq!(
        Some(kv[0].lease()),
        db.lease_id(),
        "on the remaining reader's lease"
    );
    assert!(!python_acquire(&raw, &key).await, "a Python writer waits");
    assert!(lb.release().await.unwrap());
    assert!(
        kvs(&raw, &key, false).await.is_empty(),
        "the last reader removes it"
    );
    assert!(python_acquire(&raw, &key).await);
    raw.clone().delete(key.clone(), None).await.unwrap();

    // The first reader's lease dies under it: the remaining reader sees the
    // marker go and puts it back on its own lease.
    let name = unique("m2");
    let key = lock_key(&name);
    let (da, a) = start("a");
    a.start(true).await.unwrap();
    let la = a.get_lock(name.as_str()).unwrap();
    assert!(la.acquire_shared(Wait::No).await.unwrap());
    let lb = b.get_lock(name.as_str()).unwrap();
    assert!(lb.acquire_shared(Wait::No).await.unwrap());
    let first = da.lease_id().unwrap();
    assert_eq!(kvs(&raw, &key, false).await[0].lease(), first);
    raw.clone().lease_revoke(first).await.unwrap();
    let theirs = db.lease_id().unwrap();
    wait_for(
        "the marker on the remaining reader's lease",
        Duration::from_secs(5),
        POLL,
        || async {
            kvs(&raw, &key, false)
                .await
                .first()
                .is_some_and(|kv| marker(kv) && kv.lease() == theirs)
        },
    )
    .await;
    assert!(!python_acquire(&raw, &key).await, "a Python writer waits");
    assert!(lb.is_still_owner().await.unwrap());
    assert!(lb.release().await.unwrap());
    assert!(kvs(&raw, &key, false).await.is_empty());
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}
