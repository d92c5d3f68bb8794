//! Smoke test of the file driver through the public API: groups, membership,
//! locks, leadership, event streams, and a member whose process is killed.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tooz_core::{Coordinator, GroupEvent, MemberId, Registry, ToozError, Wait};

const CHILD_ENV: &str = "TOOZ_FILE_SMOKE_CHILD_DIR";

fn temp_dir() -> PathBuf {
    std::env::temp_dir().join(format!("tooz-file-smoke-{}", uuid::Uuid::new_v4()))
}

fn connect(dir: &std::path::Path, member: &str) -> Coordinator {
    connect_with_timeout(dir, member, 2)
}

fn connect_with_timeout(dir: &std::path::Path, member: &str, timeout: u32) -> Coordinator {
    Registry::new()
        .with(tooz_file::DRIVER)
        .connect(
            &format!("file://{}?timeout={timeout}", dir.display()),
            member,
        )
        .unwrap()
}

async fn next_event(events: &mut tooz_core::EventStream, within: Duration) -> Option<GroupEvent> {
    tokio::time::timeout(within, events.next_event())
        .await
        .ok()
        .flatten()
}

#[tokio::test]
async fn groups_locks_and_leadership() {
    let dir = temp_dir();
    let a = connect(&dir, "m1");
    let b = connect(&dir, "m2");
    a.start(true).await.unwrap();
    b.start(true).await.unwrap();
    assert_eq!(a.driver_name(), "file");
    assert!(a.requires_beating());

    a.create_group("g1").await.unwrap();
    assert!(matches!(
        b.create_group("g1").await,
        Err(ToozError::GroupAlreadyExist(_))
    ));
    assert_eq!(b.get_groups().await.unwrap(), ["g1".into()]);
    let mut events = b.events("g1").await.unwrap();

    a.join_group("g1", &BTreeMap::from([("weight", 2)]))
        .await
        .unwrap();
    assert!(
        dir.join("groups/a46e558d11cb2400bab09c1ca969e615142ef3d6/ae23b94ccaf714337e4ce5ba99ef3dc257e300df.raw")
            .is_file()
    );
    let joined = next_event(&mut events, Duration::from_secs(5)).await;
    assert!(
        matches!(&joined, Some(GroupEvent::MemberJoined { member, .. }) if member == &MemberId::from("m1")),
        "{joined:?}"
    );
    assert!(matches!(
        a.join_group("g1", &()).await,
        Err(ToozError::MemberAlreadyExist { .. })
    ));
    b.join_group("g1", &()).await.unwrap();
    let members = a.get_members("g1").await.unwrap();
    assert_eq!(members.len(), 2);
    assert_eq!(
        b.get_member_capabilities("g1", "m1")
            .await
            .unwrap()
            .weight(),
        2
    );
    a.update_capabilities("g1", &BTreeMap::from([("weight", 7)]))
        .await
        .unwrap();
    let info = b.get_member_info("g1", "m1").await.unwrap();
    assert_eq!(info.capabilities.weight(), 7);
    assert!(info.created_at.is_some() && info.updated_at.is_some());
    assert!(
        b.get_member_capabilities("g1", "m2")
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(
        b.get_members_with_capabilities("g1").await.unwrap().len(),
        2
    );
    assert!(matches!(
        a.get_members("nope").await,
        Err(ToozError::GroupNotCreated(_))
    ));
    assert!(matches!(
        a.get_member_capabilities("g1", "nobody").await,
        Err(ToozError::MemberNotJoined { .. })
    ));
    assert!(matches!(
        a.delete_group("g1").await,
        Err(ToozError::GroupNotEmpty(_))
    ));

    // Locks: exclusive across coordinators, fencing tokens increase.
    let la = a.get_lock("jobs/nightly").unwrap();
    let lb = b.get_lock("jobs/nightly").unwrap();
    assert!(la.acquire(Wait::No).await.unwrap());
    let t1 = la.fencing_token().unwrap();
    assert!(!lb.acquire(Wait::No).await.unwrap());
    let started = Instant::now();
    let waiter = tokio::spawn(async move {
        let ok = lb.acquire(Wait::For(Duration::from_secs(10))).await;
        (lb, ok)
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(la.release().await.unwrap());
    let (lb, ok) = waiter.await.unwrap();
    assert!(ok.unwrap());
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(lb.fencing_token().unwrap() > t1);
    assert!(lb.release().await.unwrap());
    assert!(matches!(
        a.get_lock("../escape"),
        Err(ToozError::InvalidId { .. })
    ));
    assert!(matches!(
        a.get_lock(".tooz/x"),
        Err(ToozError::InvalidId { .. })
    ));

    // Shared locks coexist, exclusive waits.
    let s1 = a.get_lock("shared").unwrap();
    let s2 = b.get_lock("shared").unwrap();
    assert!(s1.acquire_shared(Wait::No).await.unwrap());
    assert!(s2.acquire_shared(Wait::No).await.unwrap());
    let x = a.get_lock("shared").unwrap();
    assert!(!x.acquire(Wait::No).await.unwrap());
    assert!(s1.release().await.unwrap() && s2.release().await.unwrap());
    assert!(x.acquire(Wait::No).await.unwrap());
    assert!(x.release().await.unwrap());

    // Leadership.
    assert_eq!(a.get_leader("g1").await.unwrap(), None);
    let lt = a.try_become_leader("g1").await.unwrap().unwrap();
    assert!(b.try_become_leader("g1").await.unwrap().is_none());
    assert_eq!(b.get_leader("g1").await.unwrap(), Some("m1".into()));
    assert!(a.stand_down_group_leader("g1").await.unwrap());
    let lt2 = b.try_become_leader("g1").await.unwrap().unwrap();
    assert!(lt2.token() > lt.token());
    assert_eq!(a.get_leader("g1").await.unwrap(), Some("m2".into()));

    // Stop: b's membership and leadership go away with it.
    b.stop().await.unwrap();
    assert_eq!(a.get_leader("g1").await.unwrap(), None);
    assert_eq!(a.get_members("g1").await.unwrap().len(), 1);
    a.leave_group("g1").await.unwrap();
    assert!(matches!(
        a.leave_group("g1").await,
        Err(ToozError::MemberNotJoined { .. })
    ));
    a.delete_group("g1").await.unwrap();
    assert!(a.get_groups().await.unwrap().is_empty());
    a.stop().await.unwrap();
    // A restart in the same directory works.
    a.start(false).await.unwrap();
    a.join_group_create("g2", &()).await.unwrap();
    a.stop().await.unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

/// Runs as the child of [`killed_member_disappears_at_once`]: joins and waits to
/// be killed. Does nothing in a normal test run.
#[tokio::test]
async fn child_member() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let c = connect_with_timeout(std::path::Path::new(&dir), "child", 60);
    c.start(false).await.unwrap();
    c.join_group("crash", &()).await.unwrap();
    let l = c.get_lock("held-by-child").unwrap();
    assert!(l.acquire(Wait::No).await.unwrap());
    println!("CHILD-READY");
    tokio::time::sleep(Duration::from_secs(120)).await;
}

#[tokio::test]
async fn killed_member_disappears_at_once() {
    let dir = temp_dir();
    // A long timeout: the child must disappear through its liveness lock, not
    // through the modification-time rule.
    let a = connect_with_timeout(&dir, "watcher", 60);
    a.start(false).await.unwrap();
    a.create_group("crash").await.unwrap();
    let mut events = a.events("crash").await.unwrap();

    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_member", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, &dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let ready = tokio::task::spawn_blocking(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .any(|l| l.contains("CHILD-READY"))
    })
    .await
    .unwrap();
    assert!(ready, "the child did not start");
    assert_eq!(
        a.get_members("crash").await.unwrap(),
        [MemberId::from("child")].into()
    );
    let joined = next_event(&mut events, Duration::from_secs(5)).await;
    assert!(
        matches!(joined, Some(GroupEvent::MemberJoined { .. })),
        "{joined:?}"
    );
    let lock = a.get_lock("held-by-child").unwrap();
    assert!(!lock.acquire(Wait::No).await.unwrap());

    child.kill().unwrap();
    child.wait().unwrap();
    let killed = Instant::now();
    // Long before `timeout` (60 s): the kernel released the child's liveness lock.
    let left = next_event(&mut events, Duration::from_secs(10)).await;
    assert!(
        matches!(&left, Some(GroupEvent::MemberLeft { member, .. }) if member == &MemberId::from("child")),
        "{left:?}"
    );
    assert!(
        killed.elapsed() < Duration::from_secs(1),
        "{:?}",
        killed.elapsed()
    );
    assert!(a.get_members("crash").await.unwrap().is_empty());
    assert!(
        lock.acquire(Wait::For(Duration::from_secs(5)))
            .await
            .unwrap()
    );
    assert!(lock.release().await.unwrap());
    // The dead member's record does not block deletion.
    a.delete_group("crash").await.unwrap();
    a.stop().await.unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}
