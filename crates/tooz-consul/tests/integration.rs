//! What the driver does when Consul invalidates its session (an operator's
//! `session destroy`, a partition longer than the TTL), and the key layout Python
//! tooz 8.1.0 reads.
//!
//! Needs `TOOZ_TEST_CONSUL_URL`; skipped with a message otherwise (a failure with
//! `TOOZ_REQUIRE_BACKENDS=1`).

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;
use tooz_consul::{ConsulConfig, ConsulDriver};
use tooz_core::{Coordinator, Liveness, MemberId, Registry, Wait};

const URL_ENV: &str = "TOOZ_TEST_CONSUL_URL";

fn base(test: &str) -> Option<String> {
    match std::env::var(URL_ENV) {
        Ok(u) if !u.trim().is_empty() => Some(u.trim().to_string()),
        _ => {
            assert!(
                std::env::var("TOOZ_REQUIRE_BACKENDS").as_deref() != Ok("1"),
                "{URL_ENV} is not set and TOOZ_REQUIRE_BACKENDS=1"
            );
            eprintln!("SKIPPED {test}: {URL_ENV} is not set");
            None
        }
    }
}

fn unique(s: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{s}-{}-{nanos:x}", std::process::id())
}

/// A raw HTTP call to the agent (what an operator or another client does).
async fn http(url: &str, method: reqwest::Method, path: &str) -> String {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let c = ConsulConfig::from_url_str(url).unwrap();
    reqwest::Client::new()
        .request(method, format!("{}{path}", c.api_base()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

async fn wait_for(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(10);
    while !f().await {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn an_invalidated_session_is_lost_then_replaced_and_groups_rejoined() {
    let Some(base) = base("an_invalidated_session_is_lost_then_replaced_and_groups_rejoined")
    else {
        return;
    };
    let url = format!("{base}?ttl=10&lock_delay=1");
    let member = MemberId::from(unique("victim").as_str());
    let driver =
        ConsulDriver::new(ConsulConfig::from_url_str(&url).unwrap(), member.clone()).unwrap();
    let coord = Coordinator::new(Arc::new(driver.clone()), member.clone(), url.clone());
    coord.start(false).await.unwrap();
    let observer = Registry::new()
        .with(tooz_consul::DRIVER)
        .connect(&url, unique("observer").as_str())
        .unwrap();
    observer.start(false).await.unwrap();
    let g = unique("g");
    coord.join_group_create(g.as_str(), &()).await.unwrap();
    let guard = coord
        .get_lock(unique("l").as_str())
        .unwrap()
        .guard(Wait::No)
        .await
        .unwrap()
        .unwrap();
    let first = driver.session_id().unwrap();

    // An operator destroys the session: Consul deletes the member and lock keys.
    http(
        &url,
        reqwest::Method::PUT,
        &format!("session/destroy/{first}"),
    )
    .await;
    assert!(
        !observer
            .get_members(g.as_str())
            .await
            .unwrap()
            .contains(&member)
    );
    // The next heartbeat finds the session gone: the hold is lost, a new session
    // replaces the old one, and the coordinator joins its group again on it
    // (through the 1 s lock delay Consul puts on the deleted member key).
    coord.heartbeat().await.unwrap();
    wait_for("the lock's loss signal", async || guard.lost().is_lost()).await;
    let second = driver.session_id().unwrap();
    assert_ne!(first, second);
    wait_for("the re-join on the new session", async || {
        observer
            .get_members(g.as_str())
            .await
            .unwrap()
            .contains(&member)
    })
    .await;
    assert_eq!(*coord.liveness().borrow(), Liveness::Alive);
    let info = http(
        &url,
        reqwest::Method::GET,
        &format!("session/info/{second}"),
    )
    .await;
    assert!(info.contains(&second), "{info}");

    // Locks are not re-acquired by themselves, but can be taken again.
    drop(guard);
    coord.leave_group(g.as_str()).await.unwrap();
    coord.delete_group(g.as_str()).await.unwrap();
    coord.stop().await.unwrap();
    observer.stop().await.unwrap();
}

#[tokio::test]
async fn the_layout_is_python_tooz_8s() {
    let Some(base) = base("the_layout_is_python_tooz_8s") else {
        return;
    };
    let ns = unique("ns");
    let url = format!("{base}?ttl=10&namespace={ns}");
    let c = Registry::new()
        .with(tooz_consul::DRIVER)
        .connect(&url, "m1")
        .unwrap();
    c.start(false).await.unwrap();
    c.join_group_create("g", &()).await.unwrap();
    let l = c.get_lock("l").unwrap();
    assert!(l.acquire(Wait::No).await.unwrap());
    c.try_become_leader("g").await.unwrap().unwrap();
    let listing = http(&url, reqwest::Method::GET, &format!("kv/{ns}?recurse")).await;
    let v: serde_json::Value = serde_json::from_str(&listing).unwrap();
    let mut keys: Vec<(String, bool)> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            (
                k["Key"].as_str().unwrap().to_string(),
                k.get("Session").is_some_and(|s| s.is_string()),
            )
        })
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        vec![
            (format!("{ns}/groups/g/"), false),
            (format!("{ns}/groups/g/m1"), true),
            (format!("{ns}/leaders/g"), true),
            (format!("{ns}/locks/l"), true),
        ]
    );
    assert!(l.release().await.unwrap());
    c.leave_group("g").await.unwrap();
    c.delete_group("g").await.unwrap();
    c.stop().await.unwrap();
    let left = http(&url, reqwest::Method::GET, &format!("kv/{ns}?recurse")).await;
    assert!(left.trim().is_empty(), "keys left behind: {left}");
}

#[tokio::test]
async fn a_reader_keeps_the_shared_marker_when_its_holder_dies() {
    let Some(base) = base("a_reader_keeps_the_shared_marker_when_its_holder_dies") else {
        return;
    };
    let ns = unique("ns");
    let url = format!("{base}?ttl=10&lock_delay=1&namespace={ns}");
    let member_a = MemberId::from("reader-a");
    let da =
        ConsulDriver::new(ConsulConfig::from_url_str(&url).unwrap(), member_a.clone()).unwrap();
    let a = Coordinator::new(Arc::new(da.clone()), member_a, url.clone());
    a.start(false).await.unwrap();
    let member_b = MemberId::from("reader-b");
    let db =
        ConsulDriver::new(ConsulConfig::from_url_str(&url).unwrap(), member_b.clone()).unwrap();
    let b = Coordinator::new(Arc::new(db.clone()), member_b, url.clone());
    b.start(false).await.unwrap();
    let la = a.get_lock("l").unwrap();
    let lb = b.get_lock("l").unwrap();
    assert!(la.acquire_shared(Wait::No).await.unwrap());
    assert!(lb.acquire_shared(Wait::No).await.unwrap());
    let holder = async |url: &str| {
        let got = http(url, reqwest::Method::GET, &format!("kv/{ns}/locks/l")).await;
        serde_json::from_str::<serde_json::Value>(&got)
            .ok()
            .and_then(|v| v[0]["Session"].as_str().map(str::to_string))
    };
    assert_eq!(
        holder(&url).await,
        da.session_id(),
        "the first reader holds the marker"
    );

    // a dies: Consul deletes its reader key and the marker with its session.
    let sa = da.session_id().unwrap();
    http(&url, reqwest::Method::PUT, &format!("session/destroy/{sa}")).await;
    // b still reads: its keeper puts the marker back on b's session once the lock
    // delay of a's session has passed.
    let sb = db.session_id();
    wait_for("the marker back on b's session", async || {
        holder(&url).await == sb
    })
    .await;
    // A Python-style exclusive acquire (PUT ?acquire=) by another session fails.
    let other = http(&url, reqwest::Method::PUT, "session/create").await;
    let other: serde_json::Value = serde_json::from_str(&other).unwrap();
    let other = other["ID"].as_str().unwrap();
    let c = ConsulConfig::from_url_str(&url).unwrap();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let got = reqwest::Client::new()
        .put(format!("{}kv/{ns}/locks/l?acquire={other}", c.api_base()))
        .body("I got it!")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(got.trim(), "false");
    http(
        &url,
        reqwest::Method::PUT,
        &format!("session/destroy/{other}"),
    )
    .await;
    // And a Rust exclusive acquirer (a again, on a new session) waits too, until b
    // leaves.
    a.heartbeat().await.unwrap();
    assert_ne!(da.session_id().as_deref(), Some(sa.as_str()));
    let ex = a.get_lock("l").unwrap();
    assert!(!ex.acquire(Wait::No).await.unwrap());
    assert!(lb.release().await.unwrap());
    assert!(holder(&url).await.is_none());
    assert!(ex.acquire(Wait::No).await.unwrap());
    assert!(ex.release().await.unwrap());
    b.stop().await.unwrap();
    a.stop().await.unwrap();
}

/// Groups watched beyond the first few share one blocking query on every group's
/// prefix: a join and a leave in the first and in the last of 10 watched groups
/// reach the right streams, and only those.
#[tokio::test]
async fn many_watched_groups_share_one_blocking_query() {
    let Some(base) = base("many_watched_groups_share_one_blocking_query") else {
        return;
    };
    let url = format!("{base}?ttl=30");
    let watcher = Registry::new()
        .with(tooz_consul::DRIVER)
        .connect(&url, unique("watcher").as_str())
        .unwrap();
    watcher.start(false).await.unwrap();
    let joiner = Registry::new()
        .with(tooz_consul::DRIVER)
        .connect(&url, unique("joiner").as_str())
        .unwrap();
    joiner.start(false).await.unwrap();
    let groups: Vec<String> = (0..10).map(|i| unique(&format!("wg{i}"))).collect();
    let mut streams = Vec::new();
    for g in &groups {
        watcher.create_group(g.as_str()).await.unwrap();
        streams.push(watcher.events(g.as_str()).await.unwrap());
    }
    for gi in [0, 9] {
        let g = groups[gi].as_str();
        joiner.join_group(g, &()).await.unwrap();
        let ev = tokio::time::timeout(Duration::from_secs(10), streams[gi].next_event())
            .await
            .expect("the join arrives");
        assert_eq!(
            ev.unwrap(),
            tooz_core::GroupEvent::MemberJoined {
                group: g.into(),
                member: joiner.member_id().clone(),
            }
        );
        joiner.leave_group(g).await.unwrap();
        let ev = tokio::time::timeout(Duration::from_secs(10), streams[gi].next_event())
            .await
            .expect("the leave arrives");
        assert_eq!(
            ev.unwrap(),
            tooz_core::GroupEvent::MemberLeft {
                group: g.into(),
                member: joiner.member_id().clone(),
            }
        );
    }
    for (i, s) in streams.iter_mut().enumerate() {
        if i != 0 && i != 9 {
            use futures_util::FutureExt;
            assert!(
                s.next_event().now_or_never().is_none(),
                "group {i} saw another group's event"
            );
        }
    }
    drop(streams);
    for g in &groups {
        watcher.delete_group(g.as_str()).await.unwrap();
    }
    joiner.stop().await.unwrap();
    watcher.stop().await.unwrap();
}
