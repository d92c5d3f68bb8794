//! What the driver does when memcached drops its keys (eviction, a restart, an
//! operator's delete), and the layout Python reads.
//!
//! Needs `TOOZ_TEST_MEMCACHED_URL`; skipped with a message otherwise (a failure with
//! `TOOZ_REQUIRE_BACKENDS=1`).

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use async_memcached::{Client, MetaProtocol};
use tooz_conformance::testkit::{self, Backend, unique};
use tooz_core::{Capabilities, ConnectOptions, Coordinator, CoordinatorConfig, MemberId, Wait};

const URL_ENV: &str = "TOOZ_TEST_MEMCACHED_URL";

/// The server's URL, or `None` when the test is skipped (a failure instead with
/// `TOOZ_REQUIRE_BACKENDS=1`).
fn base(test: &str) -> Option<String> {
    testkit::backend_url(URL_ENV, test)
}

/// A key of Python tooz's layout (the crate README's table): prefix + id.
fn key(prefix: &str, id: &[u8]) -> Vec<u8> {
    [prefix.as_bytes(), id].concat()
}

/// The set-up of every test: a coordinator started without heartbeats on the
/// server, with the URL options `query` and the connect `options`.
async fn started(
    base: &str,
    query: &str,
    member: impl Into<MemberId>,
    options: &ConnectOptions,
) -> Coordinator {
    Backend::new(tooz_memcached::DRIVER, base)
        .with_query(query)
        .started_with(member, options)
        .await
}

async fn coordinator(base: &str, member: &str) -> Coordinator {
    started(base, "timeout=5", member, &ConnectOptions::default()).await
}

/// A started coordinator for a fresh member `<label>-…`, in a fresh group it
/// created and joined with `caps`: the member id, the coordinator and the group.
async fn member_of_new_group(
    base: &str,
    label: &str,
    caps: Capabilities,
) -> (String, Coordinator, String) {
    let member = unique(label);
    let c = coordinator(base, &member).await;
    let group = unique("g");
    c.create_group(group.as_str()).await.unwrap();
    c.join_group_raw(group.as_str(), caps).await.unwrap();
    (member, c, group)
}

/// A watcher whose core polls only once an hour: events reach it from the driver
/// alone.
async fn hourly_watcher(base: &str, query: &str) -> Coordinator {
    let mut config = CoordinatorConfig::default();
    config.poll_interval = Duration::from_secs(3600);
    let options = ConnectOptions::default().config(config);
    started(base, query, unique("watcher"), &options).await
}

/// A raw client on the same server, standing in for eviction.
async fn raw(base: &str) -> Client {
    Client::new(format!("tcp://{}", testkit::host_port(base)))
        .await
        .unwrap()
}

async fn evict(base: &str, key: &[u8]) {
    let mut c = raw(base).await;
    c.meta_delete(key, false, None, None).await.unwrap();
}

#[tokio::test]
async fn an_evicted_lock_is_reported_lost_by_the_next_heartbeat() {
    let Some(base) = base("an_evicted_lock_is_reported_lost_by_the_next_heartbeat") else {
        return;
    };
    let a = coordinator(&base, &unique("a")).await;
    let name = unique("lock");
    let guard = a
        .get_lock(name.as_str())
        .unwrap()
        .guard(Wait::No)
        .await
        .unwrap()
        .unwrap();
    a.heartbeat().await.unwrap();
    assert!(!guard.lost().is_lost());
    evict(&base, &key("__TOOZ_LOCK_", name.as_bytes())).await;
    a.heartbeat().await.unwrap();
    tokio::time::timeout(Duration::from_secs(2), guard.lost().lost())
        .await
        .expect("the lost signal fires after the heartbeat found the key gone");
    // Someone else may now take it; our release does not free theirs.
    let b = coordinator(&base, &unique("b")).await;
    let theirs = b.get_lock(name.as_str()).unwrap();
    assert!(theirs.acquire(Wait::No).await.unwrap());
    assert!(!guard.release().await.unwrap());
    assert!(
        !a.get_lock(name.as_str())
            .unwrap()
            .acquire(Wait::No)
            .await
            .unwrap()
    );
    assert!(theirs.release().await.unwrap());
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

#[tokio::test]
async fn an_evicted_leader_key_loses_the_leadership() {
    let Some(base) = base("an_evicted_leader_key_loses_the_leadership") else {
        return;
    };
    let a = coordinator(&base, &unique("a")).await;
    let g = unique("g");
    let lead = a.try_become_leader(g.as_str()).await.unwrap().unwrap();
    evict(&base, &key("__TOOZ_LOCK__TOOZ_GROUP_LEADER_", g.as_bytes())).await;
    a.heartbeat().await.unwrap();
    tokio::time::timeout(Duration::from_secs(2), lead.lost().lost())
        .await
        .expect("leadership loss signalled");
    a.stop().await.unwrap();
}

#[tokio::test]
async fn a_vanished_member_key_means_booted_out() {
    let Some(base) = base("a_vanished_member_key_means_booted_out") else {
        return;
    };
    let (am, a, g) = member_of_new_group(&base, "a", Capabilities::none()).await;
    let b = coordinator(&base, &unique("b")).await;
    b.join_group(g.as_str(), &()).await.unwrap();
    assert_eq!(b.get_members(g.as_str()).await.unwrap().len(), 2);
    evict(&base, &key("_TOOZ_MEMBER_", am.as_bytes())).await;
    // b prunes a (as Python does); a's next heartbeat brings its key back, but
    // not its membership.
    let seen = b.get_members(g.as_str()).await.unwrap();
    assert!(!seen.contains(&MemberId::from(am.as_str())), "{seen:?}");
    a.heartbeat().await.unwrap();
    let seen = a.get_members(g.as_str()).await.unwrap();
    assert!(!seen.contains(&MemberId::from(am.as_str())), "{seen:?}");
    b.leave_group(g.as_str()).await.unwrap();
    a.delete_group(g.as_str()).await.unwrap();
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

/// A group key lost by the server (a restart, an eviction) takes the memberships
/// with it: the next heartbeat sees the key gone in its own pipeline, and the
/// coordinator creates the group again and re-joins with its capabilities.
#[tokio::test]
async fn a_lost_group_key_is_rejoined_by_the_next_heartbeat() {
    let Some(base) = base("a_lost_group_key_is_rejoined_by_the_next_heartbeat") else {
        return;
    };
    let caps = Capabilities::encode(&std::collections::BTreeMap::from([("w", 3)])).unwrap();
    let (am, a, g) = member_of_new_group(&base, "a", caps).await;
    evict(&base, &key("_TOOZ_GROUP_", g.as_bytes())).await;
    assert!(
        a.get_members(g.as_str()).await.is_err(),
        "the group is gone"
    );
    a.heartbeat().await.unwrap();
    let caps = a
        .get_member_capabilities(g.as_str(), am.as_str())
        .await
        .unwrap();
    assert_eq!(caps.as_msgpack(), &b"\x81\xa1w\x03"[..]);
    assert!(
        a.get_groups()
            .await
            .unwrap()
            .iter()
            .any(|x| x.as_str() == Some(g.as_str()))
    );
    a.leave_group(g.as_str()).await.unwrap();
    a.delete_group(g.as_str()).await.unwrap();
    a.stop().await.unwrap();
}

#[tokio::test]
async fn fencing_never_goes_backwards_when_the_counter_is_evicted() {
    let Some(base) = base("fencing_never_goes_backwards_when_the_counter_is_evicted") else {
        return;
    };
    let a = coordinator(&base, &unique("a")).await;
    let name = unique("lock");
    let lock = a.get_lock(name.as_str()).unwrap();
    assert!(lock.acquire(Wait::No).await.unwrap());
    let first = lock.fencing_token().unwrap();
    assert!(lock.release().await.unwrap());
    assert!(lock.acquire(Wait::No).await.unwrap());
    let second = lock.fencing_token().unwrap();
    assert!(second > first);
    assert!(lock.release().await.unwrap());
    let key = key("__TOOZ_FENCE__TOOZ_LOCK_", name.as_bytes());
    evict(&base, &key).await;
    // The counter restarts at the server's time in µs (at least a second later
    // than the first seed, memcached's clock ticks in seconds).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(lock.acquire(Wait::No).await.unwrap());
    let third = lock.fencing_token().unwrap();
    assert!(third > second, "{third:?} after {second:?}");
    assert!(lock.release().await.unwrap());
    a.stop().await.unwrap();
}

#[tokio::test]
async fn keys_and_flags_are_pythons() {
    let Some(base) = base("keys_and_flags_are_pythons") else {
        return;
    };
    let (m, a, g) = member_of_new_group(&base, "m", Capabilities::none()).await;
    let lock = a.get_lock(g.as_str()).unwrap();
    assert!(lock.acquire(Wait::No).await.unwrap());
    let mut c = raw(&base).await;
    let alive = c
        .meta_get(
            key("_TOOZ_MEMBER_", m.as_bytes()),
            false,
            None,
            Some(&["v", "f", "t"]),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(alive.data.as_deref(), Some(&b"It's alive!"[..]));
    assert_eq!(alive.flags, Some(1));
    let held = c
        .meta_get(
            key("__TOOZ_LOCK_", g.as_bytes()),
            false,
            None,
            Some(&["v", "f"]),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(held.data.as_deref(), Some(m.as_bytes()));
    assert_eq!(held.flags, Some(1));
    let group = c
        .meta_get(
            key("_TOOZ_GROUP_", g.as_bytes()),
            false,
            None,
            Some(&["v", "f"]),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(group.flags, Some(2));
    // {bin(m): {bin("capabilities"): nil, ...}}
    let data = group.data.unwrap();
    assert_eq!(data[0], 0x81);
    assert!(data.windows(14).any(|w| w == b"\xc4\x0ccapabilities"));
    assert!(lock.release().await.unwrap());
    a.leave_group(g.as_str()).await.unwrap();
    a.delete_group(g.as_str()).await.unwrap();
    a.stop().await.unwrap();
}

/// A group watch hears a join through the mutation log: the observer's core and
/// its driver's group poller read only once an hour here, so the event can come
/// from nowhere else.
#[tokio::test]
async fn a_join_is_seen_through_the_mutation_log_without_polling() {
    let Some(base) = base("a_join_is_seen_through_the_mutation_log_without_polling") else {
        return;
    };
    let watcher = hourly_watcher(&base, "timeout=5&watch_interval=3600").await;
    let joiner = coordinator(&base, &unique("joiner")).await;
    let g = unique("group");
    watcher.create_group(g.as_str()).await.unwrap();
    let mut events = watcher.events(g.as_str()).await.unwrap();
    joiner.join_group(g.as_str(), &()).await.unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(10), events.next_event())
        .await
        .expect("the join arrives within 10 s although the core polls hourly");
    assert_eq!(
        ev.unwrap(),
        tooz_core::GroupEvent::MemberJoined {
            group: g.as_str().into(),
            member: joiner.member_id().clone(),
        }
    );
}

/// A lock's wake-up stream fires on another coordinator's release (its marker
/// key in the mutation log); nothing polls here.
#[tokio::test]
async fn a_release_wakes_the_lock_wakeup_stream() {
    use futures_util::StreamExt;
    use tooz_core::Driver;
    let Some(base) = base("a_release_wakes_the_lock_wakeup_stream") else {
        return;
    };
    let name = unique("lock");
    let holder = coordinator(&base, &unique("holder")).await;
    let guard = holder
        .get_lock(name.as_str())
        .unwrap()
        .guard(Wait::No)
        .await
        .unwrap()
        .unwrap();
    let config =
        tooz_memcached::MemcachedConfig::from_url_str(&format!("{base}?timeout=5")).unwrap();
    let driver = tooz_memcached::MemcachedDriver::new(config, MemberId::new(unique("waiter")));
    let lock = driver.lock(&name.as_str().into()).unwrap();
    let mut wakes = lock
        .wakeups()
        .await
        .unwrap()
        .expect("memcached 1.6 serves `watch mutations`");
    guard.release().await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), wakes.next())
        .await
        .expect("the release wakes the stream")
        .expect("the stream is open");
}

/// Many watched groups share one poller: with the mutation log off and the core
/// polling hourly, a join in one of 30 watched groups, and a member of it whose
/// liveness key vanished, still reach that group's stream (from the driver's one
/// pipelined poll of every watched group).
#[tokio::test]
async fn one_poller_serves_every_watched_group() {
    let Some(base) = base("one_poller_serves_every_watched_group") else {
        return;
    };
    let watcher = hourly_watcher(&base, "timeout=5&mutation_log=false").await;
    let joiner = coordinator(&base, &unique("joiner")).await;
    let groups: Vec<String> = (0..30).map(|i| unique(&format!("wg{i}"))).collect();
    let mut streams = Vec::new();
    for g in &groups {
        watcher.create_group(g.as_str()).await.unwrap();
        streams.push(watcher.events(g.as_str()).await.unwrap());
    }
    let g = groups[17].as_str();
    joiner.join_group(g, &()).await.unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(10), streams[17].next_event())
        .await
        .expect("the join arrives within 10 s although the core polls hourly");
    assert_eq!(
        ev.unwrap(),
        tooz_core::GroupEvent::MemberJoined {
            group: g.into(),
            member: joiner.member_id().clone(),
        }
    );
    evict(&base, &key("_TOOZ_MEMBER_", joiner.member_id().as_bytes())).await;
    let ev = tokio::time::timeout(Duration::from_secs(10), streams[17].next_event())
        .await
        .expect("the vanished member's leave arrives within 10 s");
    assert_eq!(
        ev.unwrap(),
        tooz_core::GroupEvent::MemberLeft {
            group: g.into(),
            member: joiner.member_id().clone(),
        }
    );
    drop(streams);
    for g in &groups {
        let _ = joiner.leave_group(g.as_str()).await;
        watcher.delete_group(g.as_str()).await.unwrap();
    }
    watcher.stop().await.unwrap();
}

/// Every group lives in the one group-list key: groups created at once by one
/// coordinator must not fight over it (each used to retry its own
/// compare-and-swap, and with hundreds at once some ran out of attempts).
#[tokio::test]
async fn many_groups_created_at_once_are_all_listed() {
    const GROUPS: usize = 300;
    let Some(base) = base("many_groups_created_at_once_are_all_listed") else {
        return;
    };
    let c = coordinator(&base, &unique("lister")).await;
    let prefix = unique("many");
    let names: Vec<String> = (0..GROUPS).map(|i| format!("{prefix}-{i}")).collect();
    let created =
        futures_util::future::join_all(names.iter().map(|g| c.create_group(g.as_str()))).await;
    let failed: Vec<_> = created.iter().filter(|r| r.is_err()).collect();
    assert!(
        failed.is_empty(),
        "{} creates failed: {:?}",
        failed.len(),
        failed.first()
    );
    let listed = c.get_groups().await.unwrap();
    let missing = names
        .iter()
        .filter(|g| !listed.iter().any(|l| l.as_bytes() == g.as_bytes()))
        .count();
    assert_eq!(missing, 0, "groups created but not listed");
    let deleted =
        futures_util::future::join_all(names.iter().map(|g| c.delete_group(g.as_str()))).await;
    assert!(deleted.iter().all(Result::is_ok), "a delete failed");
    let listed = c.get_groups().await.unwrap();
    assert!(
        !listed
            .iter()
            .any(|l| l.as_bytes().starts_with(prefix.as_bytes())),
        "deleted groups still listed"
    );
    c.stop().await.unwrap();
}
