//! etcd-specific behaviour the shared suite cannot provoke: the coordinator's
//! lease revoked behind its back.
//!
//! ```text
//! TOOZ_TEST_ETCD_URL=etcd3+http://127.0.0.1:2379 cargo test -p tooz-etcd --test integration
//! ```
//!
//! Skipped with a message without `TOOZ_TEST_ETCD_URL`; fails instead when
//! `TOOZ_REQUIRE_BACKENDS=1`.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tooz_core::{Coordinator, Liveness, MemberId, Wait};
use tooz_etcd::{EtcdConfig, EtcdDriver};

fn url() -> Option<String> {
    match std::env::var("TOOZ_TEST_ETCD_URL") {
        Ok(u) if !u.trim().is_empty() => Some(u.trim().to_string()),
        _ => {
            assert!(
                std::env::var("TOOZ_REQUIRE_BACKENDS").as_deref() != Ok("1"),
                "TOOZ_TEST_ETCD_URL is not set and TOOZ_REQUIRE_BACKENDS=1"
            );
            eprintln!("SKIPPED: TOOZ_TEST_ETCD_URL is not set");
            None
        }
    }
}

fn unique(label: &str) -> String {
    let n = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("it-{label}-{}-{n:x}", std::process::id())
}

async fn wait_for<F, Fut>(what: &str, limit: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = tokio::time::Instant::now() + limit;
    while !f().await {
        assert!(
            tokio::time::Instant::now() < end,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_lease_is_reported_lost_memberships_rejoined_locks_not_reacquired() {
    let Some(base) = url() else { return };
    let config = EtcdConfig::from_url_str(&format!("{base}?timeout=2")).unwrap();
    let member = MemberId::from(unique("m"));
    let driver = EtcdDriver::new(config.clone(), member.clone());
    let coord = Coordinator::new(Arc::new(driver.clone()), member.clone(), base.clone());
    coord.start(true).await.unwrap();
    let group = unique("g");
    coord.join_group_create(group.as_str(), &()).await.unwrap();
    let lock = coord.get_lock(unique("l").as_str()).unwrap();
    assert!(lock.acquire(Wait::No).await.unwrap());
    let lost = lock.lost().expect("a held lock has a loss signal");
    let mut liveness = coord.liveness();
    let old = driver.lease_id().expect("a started driver has a lease");

    // Revoke the lease behind the coordinator's back.
    let mut raw = etcd_client::Client::connect([config.endpoint()], None)
        .await
        .unwrap();
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
    wait_for("a new lease", Duration::from_secs(5), || {
        let d = driver.clone();
        async move { d.lease_id().is_some_and(|l| l != old) }
    })
    .await;
    wait_for("the member re-joined", Duration::from_secs(5), || {
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
    let other = Coordinator::new(
        Arc::new(EtcdDriver::new(config.clone(), MemberId::from(unique("o")))),
        MemberId::from(unique("o")),
        base.clone(),
    );
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
