//! MySQL/MariaDB watches: one poller reads every group a coordinator watches, so an
//! idle watch of many groups costs one statement per `poll_interval` (not two per
//! group), and a join, a leave, a new leader or an expiry in any one of them still
//! reaches that group's stream (the core's own polling fallback is not involved: the
//! driver's stream is the only source).
//!
//! Needs `TOOZ_TEST_MYSQL_URL`; skipped (printing why) without it unless
//! `TOOZ_REQUIRE_BACKENDS=1`.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tooz_conformance::fault::{FaultProxy, proxied_url, url_target};
use tooz_conformance::testkit::{Backend, backend_url, unique, with_query};
use tooz_core::{EventStream, GroupEvent, MemberId};

const URL_ENV: &str = "TOOZ_TEST_MYSQL_URL";

/// Groups the watching coordinator watches.
const GROUPS: usize = 100;

/// How long an event may take to arrive (many poll intervals).
const EVENT: Duration = Duration::from_secs(10);

/// Counts the commands of a client's MySQL byte stream: packets with sequence id 0
/// (every command starts one; the handshake's reply is sequence 1).
#[derive(Default)]
struct Commands {
    header: Vec<u8>,
    /// Payload bytes of the current packet still to skip.
    rest: usize,
}

impl Commands {
    fn feed(&mut self, mut bytes: &[u8]) -> u64 {
        let mut n = 0;
        while !bytes.is_empty() {
            if self.rest > 0 {
                let k = self.rest.min(bytes.len());
                self.rest -= k;
                bytes = &bytes[k..];
                continue;
            }
            let k = (4 - self.header.len()).min(bytes.len());
            self.header.extend_from_slice(&bytes[..k]);
            bytes = &bytes[k..];
            if self.header.len() == 4 {
                let h = std::mem::take(&mut self.header);
                self.rest = usize::from(h[0]) | usize::from(h[1]) << 8 | usize::from(h[2]) << 16;
                if h[3] == 0 {
                    n += 1;
                }
            }
        }
        n
    }
}

#[test]
fn commands_are_counted_across_reads() {
    // COM_QUERY "SELECT 1" (9 bytes), then COM_PING, split at awkward places.
    let mut bytes = vec![9, 0, 0, 0, 3];
    bytes.extend_from_slice(b"SELECT 1");
    bytes.extend_from_slice(&[1, 0, 0, 0, 14]);
    // A handshake reply (sequence 1) is not a command.
    bytes.extend_from_slice(&[2, 0, 0, 1, 7, 7]);
    for cut in 0..bytes.len() {
        let mut c = Commands::default();
        let n = c.feed(&bytes[..cut]) + c.feed(&bytes[cut..]);
        assert_eq!(n, 2, "cut at {cut}");
    }
}

/// The next event on `s` that `want` accepts, within [`EVENT`].
async fn next_matching(
    s: &mut EventStream,
    what: &str,
    want: impl Fn(&GroupEvent) -> bool,
) -> GroupEvent {
    tokio::time::timeout(EVENT, async {
        loop {
            match s.next_event().await {
                Some(e) if want(&e) => return e,
                Some(_) => {}
                None => panic!("the stream ended before {what}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {what} within {EVENT:?}"))
}

fn joined(m: &MemberId) -> impl Fn(&GroupEvent) -> bool + '_ {
    move |e| matches!(e, GroupEvent::MemberJoined { member, .. } if member == m)
}

fn left(m: &MemberId) -> impl Fn(&GroupEvent) -> bool + '_ {
    move |e| matches!(e, GroupEvent::MemberLeft { member, .. } if member == m)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_poller_serves_every_watched_group() {
    let Some(url) = backend_url(URL_ENV, "one_poller_serves_every_watched_group") else {
        return;
    };
    let url = with_query(&url, "poll_interval=0.1");
    let sent = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&sent);
    let proxy = FaultProxy::start_tapped(url_target(&url).unwrap(), move || {
        let (counter, mut commands) = (Arc::clone(&counter), Commands::default());
        move |bytes: &[u8]| {
            counter.fetch_add(commands.feed(bytes), Ordering::SeqCst);
        }
    })
    .await
    .unwrap();
    let limit = Duration::from_secs(30);
    let watched = Backend::new(tooz_sql::MYSQL, proxied_url(&url, &proxy).unwrap()).limit(limit);
    let direct = Backend::new(tooz_sql::MYSQL, url.clone()).limit(limit);

    let p = unique("my-watch");
    let groups: Vec<String> = (0..GROUPS).map(|i| format!("{p}-{i}")).collect();
    let b = direct.started("b").await;
    for g in &groups {
        b.create_group(g.as_str()).await.unwrap();
    }
    // Started without heartbeats: nothing goes through the proxy but what the
    // watches send.
    let a = watched.started("a").await;
    let mut streams = Vec::with_capacity(GROUPS);
    for g in &groups {
        streams.push(a.events(g.as_str()).await.unwrap());
    }

    // Idle: 20 poll intervals. One statement per interval for all 100 groups;
    // re-reading each group every interval would be 2 × 100 × 20 = 4,000.
    let before = sent.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = sent.load(Ordering::SeqCst) - before;
    assert!(
        (3..=40).contains(&idle),
        "{idle} statements in 2 s of watching {GROUPS} idle groups (one poll every 0.1 s)"
    );

    // Changes in single groups still reach their streams.
    let bm = b.member_id().clone();
    b.join_group(groups[7].as_str(), &()).await.unwrap();
    next_matching(&mut streams[7], "MemberJoined(b) in group 7", joined(&bm)).await;
    assert!(
        b.try_become_leader(groups[42].as_str())
            .await
            .unwrap()
            .is_some()
    );
    next_matching(
        &mut streams[42],
        "LeaderElected(b) in group 42",
        |e| matches!(e, GroupEvent::LeaderElected { member, .. } if *member == bm),
    )
    .await;
    b.leave_group(groups[7].as_str()).await.unwrap();
    next_matching(&mut streams[7], "MemberLeft(b) in group 7", left(&bm)).await;

    // An expiry, which nobody announces: c joins with a 2 s lease and no heartbeat.
    let c = direct.with_query("timeout=2").started("c").await;
    let cm = c.member_id().clone();
    c.join_group(groups[99].as_str(), &()).await.unwrap();
    next_matching(&mut streams[99], "MemberJoined(c) in group 99", joined(&cm)).await;
    next_matching(
        &mut streams[99],
        "MemberLeft(c) after its lease ran out",
        left(&cm),
    )
    .await;
    assert!(
        c.get_members(groups[99].as_str()).await.unwrap().is_empty(),
        "c's lease had not run out when its MemberLeft arrived"
    );
}
