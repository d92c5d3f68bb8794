//! ZooKeeper-specific behaviour: Python's znode layout, the session as the
//! coordinator's lease (expired on purpose, cut for less and for more than the
//! session timeout through a local proxy), and requests per operation.
//!
//! Tests read `TOOZ_TEST_ZOOKEEPER_URL`. Without it they print why and pass,
//! unless `TOOZ_REQUIRE_BACKENDS=1`, where they fail.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, watch};
use tooz_core::{
    Coordinator, CoordinatorConfig, GroupEvent, Liveness, MemberId, Registry, ToozError, Wait,
};
use tooz_zookeeper::{ZookeeperConfig, ZookeeperDriver};
use zookeeper_client::{AddWatchMode, Client, CreateMode};

const URL_ENV: &str = "TOOZ_TEST_ZOOKEEPER_URL";

fn server_url(test: &str) -> Option<String> {
    match std::env::var(URL_ENV) {
        Ok(u) if !u.trim().is_empty() => Some(u.trim().to_string()),
        _ => {
            assert!(
                !std::env::var("TOOZ_REQUIRE_BACKENDS").is_ok_and(|v| v == "1"),
                "{test}: {URL_ENV} is not set and TOOZ_REQUIRE_BACKENDS=1"
            );
            eprintln!("SKIPPED {test}: {URL_ENV} is not set");
            None
        }
    }
}

fn unique_ns(label: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("tooz-test-{label}-{}-{nanos:x}", std::process::id())
}

fn with_query(url: &str, query: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{query}")
}

fn host_port(url: &str) -> String {
    let u = tooz_core::Url::parse(url).unwrap();
    format!("{}:{}", u.host_str().unwrap(), u.port().unwrap_or(2181))
}

/// A coordinator on a driver the test keeps a handle to.
fn coordinator(url: &str, member: &str) -> (Coordinator, ZookeeperDriver) {
    let config = ZookeeperConfig::from_url_str(url).unwrap();
    let driver = ZookeeperDriver::new(config, MemberId::from(member)).unwrap();
    let c = Coordinator::new(Arc::new(driver.clone()), MemberId::from(member), url);
    (c, driver)
}

async fn raw(url: &str) -> Client {
    Client::connect(&host_port(url)).await.unwrap()
}

async fn wait_liveness(rx: &mut watch::Receiver<Liveness>, want: Liveness, within: Duration) {
    tokio::time::timeout(within, rx.wait_for(|l| *l == want))
        .await
        .unwrap_or_else(|_| panic!("liveness did not become {want:?} within {within:?}"))
        .unwrap();
}

/// Expires a session on purpose: while the victim's connection is cut, a second
/// client attaches to its session and closes it; the victim learns that its
/// session expired when it reconnects.
async fn expire(url: &str, driver: &ZookeeperDriver, proxy: &Proxy) {
    let info = driver.session_for_tests().expect("a live session");
    proxy.cut();
    let other = Client::connector()
        .with_session(info)
        .with_session_timeout(Duration::from_secs(4))
        .connect(&host_port(url))
        .await
        .unwrap();
    other.sync("/").await.unwrap();
    drop(other);
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.restore();
}

#[tokio::test]
async fn python_layout() {
    let Some(base) = server_url("python_layout") else {
        return;
    };
    let ns = unique_ns("layout");
    let url = with_query(&base, &format!("namespace={ns}&timeout=4"));
    let (a, _) = coordinator(&url, "m1");
    a.start(false).await.unwrap();
    a.create_group("g1").await.unwrap();
    a.join_group("g1", &BTreeMap::from([("weight", 5)]))
        .await
        .unwrap();
    let lock = a.get_lock("res").unwrap();
    let token = lock.guard(Wait::No).await.unwrap().unwrap();
    a.try_become_leader("g1").await.unwrap().unwrap();

    let zk = raw(&base).await;
    let (data, stat) = zk.get_data(&format!("/{ns}/g1/m1")).await.unwrap();
    assert_eq!(data, b"\x81\xa6weight\x05");
    assert_ne!(stat.ephemeral_owner, 0, "members are ephemeral");
    let (locks, _) = zk.get_children(&format!("/{ns}/locks/res")).await.unwrap();
    assert_eq!(locks.len(), 1);
    assert!(locks[0].contains("__lock__"), "{locks:?}");
    let (data, stat) = zk
        .get_data(&format!("/{ns}/locks/res/{}", locks[0]))
        .await
        .unwrap();
    assert_eq!(data, b"m1");
    assert_eq!(token.token().0, u64::try_from(stat.czxid).unwrap());
    let (leader, _) = zk.get_children(&format!("/{ns}/g1/leader")).await.unwrap();
    assert_eq!(leader.len(), 1);
    assert_eq!(
        zk.get_data(&format!("/{ns}/g1/leader/{}", leader[0]))
            .await
            .unwrap()
            .0,
        b"m1"
    );

    // `leader` and `locks` are neither members nor groups; the leftover
    // election directory does not block delete_group.
    let members = a.get_members("g1").await.unwrap();
    assert_eq!(members.len(), 1, "{members:?}");
    let groups = a.get_groups().await.unwrap();
    assert_eq!(groups, vec![tooz_core::GroupId::from("g1")]);
    a.stand_down_group_leader("g1").await.unwrap();
    a.leave_group("g1").await.unwrap();
    a.delete_group("g1").await.unwrap();
    assert!(zk.check_stat(&format!("/{ns}/g1")).await.unwrap().is_none());

    // Reserved member ids.
    let reg = Registry::new().with(tooz_zookeeper::DRIVER);
    for m in ["leader", "locks"] {
        assert!(matches!(
            reg.connect(&url, m),
            Err(ToozError::InvalidId { .. })
        ));
    }
    token.release().await.unwrap();
    a.stop().await.unwrap();
}

#[tokio::test]
async fn session_expiry_loses_everything_and_rejoins() {
    let Some(base) = server_url("session_expiry_loses_everything_and_rejoins") else {
        return;
    };
    let ns = unique_ns("expiry");
    let proxy = Proxy::start(host_port(&base)).await;
    let url = format!(
        "zookeeper://127.0.0.1:{}?namespace={ns}&timeout=4",
        proxy.port
    );
    let direct = with_query(&base, &format!("namespace={ns}&timeout=4"));
    let (a, driver) = coordinator(&url, "victim");
    let (b, _) = coordinator(&direct, "observer");
    a.start(true).await.unwrap();
    b.start(true).await.unwrap();
    a.join_group_create("g", &BTreeMap::from([("weight", 2)]))
        .await
        .unwrap();
    let mut events = a.events("g").await.unwrap();
    let lock = a.get_lock("held").unwrap();
    let guard = lock.guard(Wait::No).await.unwrap().unwrap();
    let lost = guard.lost();
    a.try_become_leader("g").await.unwrap().unwrap();
    let mut live = a.liveness();
    let old_session = driver.session_id().unwrap();

    expire(&base, &driver, &proxy).await;

    wait_liveness(&mut live, Liveness::Lost, Duration::from_secs(10)).await;
    tokio::time::timeout(Duration::from_secs(2), lost.lost())
        .await
        .expect("the lock reports its loss");
    let mut saw_leadership_lost = false;
    while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_secs(2), events.next_event()).await
    {
        if matches!(ev, GroupEvent::LeadershipLost { ref member, .. } if member.as_bytes() == b"victim")
        {
            saw_leadership_lost = true;
            break;
        }
    }
    assert!(
        saw_leadership_lost,
        "no LeadershipLost after the session expired"
    );

    // A new session, the group re-joined on it, nothing else re-taken.
    wait_liveness(&mut live, Liveness::Alive, Duration::from_secs(10)).await;
    let new_session = driver.session_id().unwrap();
    assert_ne!(old_session, new_session);
    let zk = raw(&base).await;
    let mut rejoined = false;
    for _ in 0..50 {
        if let Ok((data, stat)) = zk.get_data(&format!("/{ns}/g/victim")).await
            && stat.ephemeral_owner == new_session
        {
            assert_eq!(data, b"\x81\xa6weight\x02");
            rejoined = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(rejoined, "the member was not re-joined on the new session");
    assert!(
        b.get_members("g")
            .await
            .unwrap()
            .contains(&MemberId::from("victim"))
    );
    assert!(
        !lock.is_still_owner().await.unwrap(),
        "a lock of the expired session still reads as owned"
    );
    assert!(
        !guard.release().await.unwrap(),
        "releasing a lost lock returned true"
    );
    let other = b.get_lock("held").unwrap();
    assert!(
        other.acquire(Wait::No).await.unwrap(),
        "the lock of the expired session is still taken"
    );
    assert_eq!(b.get_leader("g").await.unwrap(), None);
    other.release().await.unwrap();
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

/// A TCP proxy the test can cut, counting the ZooKeeper requests relayed (request
/// frames, without each connection's handshake and the pings).
struct Proxy {
    port: u16,
    up: Arc<AtomicBool>,
    cut: broadcast::Sender<()>,
    requests: Arc<AtomicU64>,
    creates: Creates,
}

/// The create requests relayed: opcode and path.
type Creates = Arc<std::sync::Mutex<Vec<(i32, String)>>>;

/// ZooKeeper's opcode of a CONTAINER create.
const OP_CREATE_CONTAINER: i32 = 19;

/// The opcode and, for a create request (`create`, `create2`,
/// `createContainer`, `createTTL`), the path of a request frame.
fn create_request(frame: &[u8]) -> Option<(i32, String)> {
    let op = i32::from_be_bytes(frame.get(4..8)?.try_into().ok()?);
    if ![1, 15, OP_CREATE_CONTAINER, 21].contains(&op) {
        return None;
    }
    let len = usize::try_from(i32::from_be_bytes(frame.get(8..12)?.try_into().ok()?)).ok()?;
    let path = String::from_utf8(frame.get(12..12 + len)?.to_vec()).ok()?;
    Some((op, path))
}

/// Relays client bytes upstream, counting request frames.
async fn relay_counting(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    requests: Arc<AtomicU64>,
    creates: Creates,
) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut pending = Vec::new();
    let mut handshake_seen = false;
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        pending.extend_from_slice(&buf[..n]);
        let mut at = 0;
        while let Some(len) = pending.get(at..at + 4) {
            let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
            let Some(frame) = pending.get(at + 4..at + 4 + len) else {
                break;
            };
            if handshake_seen {
                if frame.get(..4) != Some(&(-2i32).to_be_bytes()[..]) {
                    requests.fetch_add(1, Ordering::SeqCst);
                    if let Some(c) = create_request(frame) {
                        creates.lock().unwrap().push(c);
                    }
                }
            } else {
                handshake_seen = true;
            }
            at += 4 + len;
        }
        pending.drain(..at);
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

impl Proxy {
    async fn start(target: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(true));
        let requests = Arc::new(AtomicU64::new(0));
        let (cut, _) = broadcast::channel(4);
        let creates = Creates::default();
        let (up2, cut2, requests2) = (Arc::clone(&up), cut.clone(), Arc::clone(&requests));
        let creates2 = Arc::clone(&creates);
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                if !up2.load(Ordering::SeqCst) {
                    let _ = inbound.shutdown().await;
                    continue;
                }
                let target = target.clone();
                let mut stop = cut2.subscribe();
                let requests = Arc::clone(&requests2);
                let creates = Arc::clone(&creates2);
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(&target).await else {
                        return;
                    };
                    let (in_r, mut in_w) = inbound.into_split();
                    let (mut out_r, out_w) = outbound.into_split();
                    tokio::select! {
                        () = relay_counting(in_r, out_w, requests, creates) => {}
                        _ = tokio::io::copy(&mut out_r, &mut in_w) => {}
                        _ = stop.recv() => {}
                    }
                });
            }
        });
        Proxy {
            port,
            up,
            cut,
            requests,
            creates,
        }
    }

    /// Drops every relayed connection and refuses new ones until [`Proxy::restore`].
    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        let _ = self.cut.send(());
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }

    /// The opcodes of the create requests relayed for `path`.
    fn creates_of(&self, path: &str) -> Vec<i32> {
        self.creates
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, p)| p == path)
            .map(|(op, _)| *op)
            .collect()
    }

    /// ZooKeeper requests relayed so far.
    fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }
}

/// Each waiter watches only its predecessor: when the holder releases, the second
/// waiter (behind the first) sends nothing; it moves only when its own predecessor goes.
#[tokio::test]
async fn waiters_watch_only_their_predecessor() {
    let Some(base) = server_url("waiters_watch_only_their_predecessor") else {
        return;
    };
    let proxy = Proxy::start(host_port(&base)).await;
    let ns = unique_ns("herd");
    let direct = with_query(&base, &format!("namespace={ns}&timeout=10"));
    let counted = format!(
        "zookeeper://127.0.0.1:{}?namespace={ns}&timeout=10",
        proxy.port
    );
    let (holder, _) = coordinator(&direct, "holder");
    let (first, _) = coordinator(&direct, "first");
    let (second, _) = coordinator(&counted, "second");
    for c in [&holder, &first, &second] {
        c.start(false).await.unwrap();
    }
    let lh = holder.get_lock("l").unwrap();
    assert!(lh.acquire(Wait::No).await.unwrap());
    let l1 = first.get_lock("l").unwrap();
    let w1 = tokio::spawn(async move { (l1.acquire(Wait::Forever).await, l1) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let l2 = second.get_lock("l").unwrap();
    let w2 = tokio::spawn(async move { (l2.acquire(Wait::Forever).await, l2) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!w1.is_finished() && !w2.is_finished());

    let before = proxy.requests();
    assert!(lh.release().await.unwrap());
    let (r1, l1) = w1.await.unwrap();
    assert!(r1.unwrap(), "the first waiter did not get the lock");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        proxy.requests(),
        before,
        "the second waiter woke up on a release that was not its predecessor's"
    );
    assert!(!w2.is_finished());

    // Its predecessor goes: now it acquires, with one listing.
    assert!(l1.release().await.unwrap());
    let (r2, l2) = w2.await.unwrap();
    assert!(r2.unwrap(), "the second waiter did not get the lock");
    assert_eq!(
        proxy.requests(),
        before + 1,
        "one listing after the wake-up"
    );
    assert!(l2.release().await.unwrap());
    for c in [&holder, &first, &second] {
        c.stop().await.unwrap();
    }
}

#[tokio::test]
async fn short_disconnect_keeps_everything_long_one_loses_it() {
    let Some(base) = server_url("short_disconnect_keeps_everything_long_one_loses_it") else {
        return;
    };
    let proxy = Proxy::start(host_port(&base)).await;
    let ns = unique_ns("disconnect");
    let url = format!(
        "zookeeper://127.0.0.1:{}?namespace={ns}&timeout=4",
        proxy.port
    );
    let direct = with_query(&base, &format!("namespace={ns}&timeout=4"));
    let (a, driver) = coordinator(&url, "flaky");
    let (b, _) = coordinator(&direct, "steady");
    a.start(true).await.unwrap();
    b.start(true).await.unwrap();
    a.join_group_create("g", &()).await.unwrap();
    let lock = a.get_lock("l").unwrap();
    let guard = lock.guard(Wait::No).await.unwrap().unwrap();
    let lost = guard.lost();
    let mut live = a.liveness();
    let session = driver.session_id().unwrap();

    // Cut for a moment: at risk, then alive again, same session, nothing lost.
    proxy.cut();
    wait_liveness(&mut live, Liveness::AtRisk, Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.restore();
    wait_liveness(&mut live, Liveness::Alive, Duration::from_secs(5)).await;
    assert_eq!(driver.session_id(), Some(session));
    assert!(!lost.is_lost());
    assert!(lock.is_still_owner().await.unwrap());
    assert!(
        b.get_members("g")
            .await
            .unwrap()
            .contains(&MemberId::from("flaky"))
    );

    // Cut for longer than the session timeout: lost on the local clock, a margin
    // (1 s for a 4 s timeout) before the server can expire the session, counted
    // from the last answered probe (sent at most a third of the timeout before
    // the cut).
    proxy.cut();
    let t0 = tokio::time::Instant::now();
    wait_liveness(&mut live, Liveness::Lost, Duration::from_secs(10)).await;
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(1500) && took <= Duration::from_millis(3200),
        "lost after {took:?} with a 4 s session timeout"
    );
    tokio::time::timeout(Duration::from_secs(2), lost.lost())
        .await
        .expect("the lock reports its loss");
    assert!(!lock.is_held());
    // Keep the cut past the session timeout, so that the session is gone.
    tokio::time::sleep_until(t0 + Duration::from_secs(5)).await;
    proxy.restore();
    wait_liveness(&mut live, Liveness::Alive, Duration::from_secs(15)).await;
    assert_ne!(driver.session_id(), Some(session));
    let mut back = false;
    for _ in 0..80 {
        if b.get_members("g")
            .await
            .unwrap()
            .contains(&MemberId::from("flaky"))
        {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(back, "the member was not re-joined on the new session");
    assert!(!guard.release().await.unwrap());
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

#[tokio::test]
async fn several_hosts_in_the_url() {
    let Some(base) = server_url("several_hosts_in_the_url") else {
        return;
    };
    // A dead server first, each host with its own port, as Python passes them to kazoo.
    let ns = unique_ns("hosts");
    let url = format!(
        "zookeeper://127.0.0.1:1,{}/tooz-test-chroot?namespace={ns}&timeout=4",
        host_port(&base)
    );
    let c = Registry::new()
        .with(tooz_zookeeper::DRIVER)
        .connect(&url, "m")
        .unwrap();
    c.start(false).await.unwrap();
    c.join_group_create("g", &()).await.unwrap();
    let zk = raw(&base).await;
    assert!(
        zk.check_stat(&format!("/tooz-test-chroot/{ns}/g/m"))
            .await
            .unwrap()
            .is_some(),
        "the chroot and namespace are not where Python puts them"
    );
    c.leave_group("g").await.unwrap();
    c.delete_group("g").await.unwrap();
    c.stop().await.unwrap();
    zk.delete(&format!("/tooz-test-chroot/{ns}"), None)
        .await
        .unwrap();
}

#[tokio::test]
async fn digest_credentials_protect_the_znodes() {
    let Some(base) = server_url("digest_credentials_protect_the_znodes") else {
        return;
    };
    let ns = unique_ns("digest");
    let url = format!(
        "zookeeper://alice:s%40cret@{}?namespace={ns}&timeout=4",
        host_port(&base)
    );
    let c = Registry::new()
        .with(tooz_zookeeper::DRIVER)
        .connect(&url, "m")
        .unwrap();
    c.start(false).await.unwrap();
    c.join_group_create("g", &BTreeMap::from([("k", 1)]))
        .await
        .unwrap();
    // Python's make_digest_acl(user, password, all=True): everything to alice only.
    let alice = Client::connector()
        .with_auth("digest", b"alice:s@cret")
        .connect(&host_port(&base))
        .await
        .unwrap();
    let (acl, _) = alice.get_acl(&format!("/{ns}/g/m")).await.unwrap();
    assert_eq!(acl.len(), 1, "{acl:?}");
    assert_eq!(acl[0].scheme(), "digest");
    assert!(acl[0].id().starts_with("alice:"), "{acl:?}");
    let anon = raw(&base).await;
    assert_eq!(
        anon.get_data(&format!("/{ns}/g/m")).await.unwrap_err(),
        zookeeper_client::Error::NoAuth
    );
    c.leave_group("g").await.unwrap();
    c.delete_group("g").await.unwrap();
    c.stop().await.unwrap();
    alice.delete(&format!("/{ns}"), None).await.unwrap();
}

/// A waiter whose connection drops (and comes back within the session timeout)
/// keeps its place, and gets the lock released while it was cut off.
#[tokio::test]
async fn waiter_survives_a_short_disconnect() {
    let Some(base) = server_url("waiter_survives_a_short_disconnect") else {
        return;
    };
    let proxy = Proxy::start(host_port(&base)).await;
    let ns = unique_ns("waitcut");
    let direct = with_query(&base, &format!("namespace={ns}&timeout=4"));
    let cut_url = format!(
        "zookeeper://127.0.0.1:{}?namespace={ns}&timeout=4",
        proxy.port
    );
    let (holder, _) = coordinator(&direct, "holder");
    let (waiter, driver) = coordinator(&cut_url, "waiter");
    holder.start(false).await.unwrap();
    waiter.start(false).await.unwrap();
    let session = driver.session_id();
    let lh = holder.get_lock("l").unwrap();
    assert!(lh.acquire(Wait::No).await.unwrap());
    let lw = waiter.get_lock("l").unwrap();
    let w = tokio::spawn(async move { (lw.acquire(Wait::Forever).await, lw) });
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.cut();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(lh.release().await.unwrap());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!w.is_finished(), "the waiter acquired while cut off");
    proxy.restore();
    let (got, lw) = tokio::time::timeout(Duration::from_secs(6), w)
        .await
        .expect("the waiter did not wake after the reconnection")
        .unwrap();
    assert!(got.unwrap(), "the waiter gave up");
    assert_eq!(driver.session_id(), session, "the session changed");
    assert!(lw.is_still_owner().await.unwrap());
    assert!(
        !lh.acquire(Wait::No).await.unwrap(),
        "the holder took the lock back from the waiter"
    );
    assert!(lw.release().await.unwrap());
    holder.stop().await.unwrap();
    waiter.stop().await.unwrap();
}

/// A driver-level acquire dropped at any point, even before its create's reply
/// arrived, leaves no contender node behind: the lock is free once its holder
/// releases. (The coordinator never drops a driver acquire short of `stop`; this is
/// the `DriverLock` contract for callers that use the driver directly.)
#[tokio::test]
async fn cancelled_driver_acquires_leave_no_node() {
    use tooz_core::{Driver, Mode};
    let Some(base) = server_url("cancelled_driver_acquires_leave_no_node") else {
        return;
    };
    let ns = unique_ns("cancel");
    let url = with_query(&base, &format!("namespace={ns}&timeout=10"));
    let (holder, _) = coordinator(&url, "holder");
    let (other, driver) = coordinator(&url, "other");
    holder.start(false).await.unwrap();
    other.start(false).await.unwrap();
    let lh = holder.get_lock("l").unwrap();
    assert!(lh.acquire(Wait::No).await.unwrap());
    let zk = raw(&base).await;
    let dir = format!("/{ns}/locks/l");
    // Dropped after 0 to ~2 round trips: before the create is sent, while its reply is
    // in flight, and while waiting on the holder.
    for i in 0..30u64 {
        let lock = driver.lock(&"l".into()).unwrap();
        let cut = Duration::from_micros(i * 50);
        assert!(
            tokio::time::timeout(cut, lock.acquire(Mode::Exclusive, Wait::Forever))
                .await
                .is_err(),
            "acquired a held lock"
        );
    }
    let mut left = Vec::new();
    for _ in 0..100 {
        left = zk.get_children(&dir).await.unwrap().0;
        if left.len() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(left.len(), 1, "contender nodes left behind: {left:?}");
    assert!(lh.release().await.unwrap());
    let lo = other.get_lock("l").unwrap();
    assert!(
        lo.acquire(Wait::For(Duration::from_secs(2))).await.unwrap(),
        "an orphan node still blocks the lock"
    );
    assert!(lo.release().await.unwrap());
    holder.stop().await.unwrap();
    other.stop().await.unwrap();
}

/// Campaigns that lose while someone leads write nothing: no node created and
/// deleted, so no watch event for the members of the group (who would each
/// re-read the group on every one).
#[tokio::test]
async fn losing_campaigns_write_nothing() {
    let Some(base) = server_url("losing_campaigns_write_nothing") else {
        return;
    };
    let ns = unique_ns("quiet");
    let url = with_query(&base, &format!("namespace={ns}&timeout=10"));
    let (leader, _) = coordinator(&url, "boss");
    leader.start(false).await.unwrap();
    leader.create_group("g").await.unwrap();
    assert!(leader.try_become_leader("g").await.unwrap().is_some());
    let candidates: Vec<Coordinator> = (0..4)
        .map(|i| coordinator(&url, &format!("c{i}")).0)
        .collect();
    for c in &candidates {
        c.start(false).await.unwrap();
    }

    let zk = raw(&base).await;
    let group = format!("/{ns}/g");
    let dir = format!("{group}/leader");
    let mut watcher = zk
        .watch(&group, AddWatchMode::PersistentRecursive)
        .await
        .unwrap();
    let before = zk.check_stat(&dir).await.unwrap().unwrap();
    let rounds = 5;
    for _ in 0..rounds {
        for c in &candidates {
            assert!(c.try_become_leader("g").await.unwrap().is_none());
        }
    }
    let after = zk.check_stat(&dir).await.unwrap().unwrap();
    assert_eq!(
        (after.cversion, after.pzxid),
        (before.cversion, before.pzxid),
        "{} losing campaigns changed the election directory",
        rounds * candidates.len()
    );
    assert_eq!(after.num_children, 1);

    // No watch event before the sentinel the test writes afterwards.
    let sentinel = format!("{group}/sentinel");
    zk.create(
        &sentinel,
        &[],
        &CreateMode::Ephemeral.with_acls(zookeeper_client::Acls::anyone_all()),
    )
    .await
    .unwrap();
    let mut seen = Vec::new();
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(10), watcher.changed())
            .await
            .expect("the sentinel's event did not arrive");
        if ev.path == sentinel {
            break;
        }
        seen.push((ev.event_type, ev.path));
    }
    assert!(
        seen.is_empty(),
        "losing campaigns made watch events: {seen:?}"
    );
    assert_eq!(
        candidates[0].get_leader("g").await.unwrap(),
        Some(MemberId::from("boss"))
    );
    for c in candidates.iter().chain([&leader]) {
        c.stop().await.unwrap();
    }
}

/// A candidate waiting in `become_leader` is elected as soon as the leader
/// resigns: woken by the group's event stream (the leader node's deletion), not
/// by polling (its polling interval here is a minute). While it waits it sends
/// nothing.
#[tokio::test]
async fn waiting_candidate_is_elected_when_the_leader_resigns() {
    let Some(base) = server_url("waiting_candidate_is_elected_when_the_leader_resigns") else {
        return;
    };
    let proxy = Proxy::start(host_port(&base)).await;
    let ns = unique_ns("wake");
    let direct = with_query(&base, &format!("namespace={ns}&timeout=10"));
    let counted = format!(
        "zookeeper://127.0.0.1:{}?namespace={ns}&timeout=10",
        proxy.port
    );
    let (leader, _) = coordinator(&direct, "boss");
    leader.start(false).await.unwrap();
    leader.create_group("g").await.unwrap();
    assert!(leader.try_become_leader("g").await.unwrap().is_some());

    let member = MemberId::from("waiter");
    let config = ZookeeperConfig::from_url_str(&counted).unwrap();
    let driver = ZookeeperDriver::new(config, member.clone()).unwrap();
    let mut tuning = CoordinatorConfig::default();
    tuning.poll_interval = Duration::from_secs(60);
    let waiter = Coordinator::with_config(Arc::new(driver), member, &counted, tuning);
    waiter.start(false).await.unwrap();
    // The group's event stream is up (become_leader shares it) and a first
    // campaign lost.
    let _events = waiter.events("g").await.unwrap();
    assert!(waiter.try_become_leader("g").await.unwrap().is_none());

    let quiet = proxy.requests();
    let w = waiter.clone();
    let campaign = tokio::spawn(async move { w.become_leader("g").await });
    // Its first campaign: one listing, then it waits.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while proxy.requests() == quiet {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no campaign was sent"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        leader.get_leader("g").await.unwrap(),
        Some(MemberId::from("boss"))
    );
    assert_eq!(proxy.requests(), quiet + 1, "a losing campaign is one read");
    assert!(!campaign.is_finished());

    let resigned = std::time::Instant::now();
    assert!(leader.stand_down_group_leader("g").await.unwrap());
    let token = tokio::time::timeout(Duration::from_secs(10), campaign)
        .await
        .expect("the waiting candidate was not elected within 10 s")
        .unwrap()
        .unwrap();
    let took = resigned.elapsed();
    eprintln!("waiting candidate elected {took:?} after the resignation");
    assert!(took < Duration::from_secs(5), "elected after {took:?}");
    assert_eq!(waiter.leadership_token("g"), Some(token.token()));
    assert_eq!(
        leader.get_leader("g").await.unwrap(),
        Some(MemberId::from("waiter"))
    );
    waiter.stop().await.unwrap();
    leader.stop().await.unwrap();
}

/// Lock directories and election directories are made as CONTAINER znodes (the
/// server removes them once empty; a client cannot tell a container from its
/// stat, so the test reads the create requests through the proxy), groups and
/// the lock tree persistent; a directory that went away (as a container does)
/// is made again, and one Python made persistent (with makepath) serves as well.
#[tokio::test]
async fn lock_and_election_directories_are_containers() {
    let Some(base) = server_url("lock_and_election_directories_are_containers") else {
        return;
    };
    let proxy = Proxy::start(host_port(&base)).await;
    let ns = unique_ns("container");
    let url = format!(
        "zookeeper://127.0.0.1:{}?namespace={ns}&timeout=10",
        proxy.port
    );
    let (a, _) = coordinator(&url, "a");
    a.start(false).await.unwrap();
    a.create_group("g").await.unwrap();
    let zk = raw(&base).await;

    let lock = a.get_lock("res").unwrap();
    assert!(lock.acquire(Wait::No).await.unwrap());
    assert!(lock.release().await.unwrap());
    assert!(a.try_become_leader("g").await.unwrap().is_some());
    for dir in [format!("/{ns}/locks/res"), format!("/{ns}/g/leader")] {
        let ops = proxy.creates_of(&dir);
        assert!(
            !ops.is_empty() && ops.iter().all(|op| *op == OP_CREATE_CONTAINER),
            "{dir}: {ops:?}"
        );
    }
    for persistent in [format!("/{ns}/locks"), format!("/{ns}/g")] {
        let ops = proxy.creates_of(&persistent);
        assert!(
            !ops.is_empty() && !ops.contains(&OP_CREATE_CONTAINER),
            "{persistent}: {ops:?}"
        );
    }

    // The server removed the empty containers: they are made again.
    assert!(a.stand_down_group_leader("g").await.unwrap());
    zk.delete(&format!("/{ns}/g/leader"), None).await.unwrap();
    zk.delete(&format!("/{ns}/locks/res"), None).await.unwrap();
    assert!(lock.acquire(Wait::No).await.unwrap());
    assert!(a.try_become_leader("g").await.unwrap().is_some());
    assert!(lock.release().await.unwrap());
    assert!(a.stand_down_group_leader("g").await.unwrap());
    // Even the lock tree itself.
    zk.delete(&format!("/{ns}/locks/res"), None).await.unwrap();
    zk.delete(&format!("/{ns}/locks"), None).await.unwrap();
    assert!(lock.acquire(Wait::No).await.unwrap());
    assert!(lock.release().await.unwrap());
    // A group that is gone is still GroupNotCreated.
    assert!(matches!(
        a.try_become_leader("nope").await,
        Err(ToozError::GroupNotCreated(_))
    ));

    // A directory Python made (persistent, with makepath) is used as it is.
    let persistent = CreateMode::Persistent.with_acls(zookeeper_client::Acls::anyone_all());
    zk.create(&format!("/{ns}/locks/py"), &[], &persistent)
        .await
        .unwrap();
    let py = a.get_lock("py").unwrap();
    assert!(py.acquire(Wait::No).await.unwrap());
    assert!(py.release().await.unwrap());
    assert!(proxy.creates_of(&format!("/{ns}/locks/py")).is_empty());

    // `container_parents=false` makes them persistent, as Python does.
    let (b, _) = coordinator(&with_query(&url, "container_parents=false"), "b");
    b.start(false).await.unwrap();
    b.create_group("h").await.unwrap();
    let l = b.get_lock("res-b").unwrap();
    assert!(l.acquire(Wait::No).await.unwrap());
    assert!(l.release().await.unwrap());
    assert!(b.try_become_leader("h").await.unwrap().is_some());
    for dir in [format!("/{ns}/locks/res-b"), format!("/{ns}/h/leader")] {
        let ops = proxy.creates_of(&dir);
        assert!(
            !ops.is_empty() && !ops.contains(&OP_CREATE_CONTAINER),
            "{dir}: {ops:?}"
        );
    }
    b.stop().await.unwrap();
    a.stop().await.unwrap();
}
