//! etcd-specific behaviour the shared suite cannot provoke: the coordinator's
//! lease revoked behind its back, replies lost after the server applied a request
//! (a test-local proxy swallows them), and the shared-lock marker outliving the
//! reader whose lease it was created on.
//!
//! ```text
//! TOOZ_TEST_ETCD_URL=etcd3+http://127.0.0.1:2379 cargo test -p tooz-etcd --test integration
//! ```
//!
//! Skipped with a message without `TOOZ_TEST_ETCD_URL`; fails instead when
//! `TOOZ_REQUIRE_BACKENDS=1`.

#![allow(clippy::unwrap_used)]

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

// ----- lost replies ------------------------------------------------------------

/// Forward everything.
const FORWARD: u8 = 0;
/// Forward requests, drop the server's replies.
const SWALLOW: u8 = 1;
/// Close new connections at once.
const REFUSE: u8 = 2;

/// A TCP proxy in front of etcd that can lose replies: in `SWALLOW` mode a
/// request reaches the server but its reply never comes back; `cut` then breaks
/// every open connection.
struct LossyProxy {
    port: u16,
    mode: Arc<std::sync::atomic::AtomicU8>,
    conns: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    task: tokio::task::JoinHandle<()>,
}

impl LossyProxy {
    async fn start(target: String) -> LossyProxy {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mode = Arc::new(std::sync::atomic::AtomicU8::new(FORWARD));
        let conns = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (m, cs) = (Arc::clone(&mode), Arc::clone(&conns));
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if m.load(Ordering::SeqCst) == REFUSE {
                    continue;
                }
                let (target, m) = (target.clone(), Arc::clone(&m));
                let conn = tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(target.as_str()).await else {
                        return;
                    };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let up = tokio::io::copy(&mut cr, &mut sw);
                    let down = async {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = match sr.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            if m.load(Ordering::SeqCst) == FORWARD
                                && cw.write_all(&buf[..n]).await.is_err()
                            {
                                return;
                            }
                        }
                    };
                    tokio::select! { _ = up => {}, _ = down => {} }
                });
                cs.lock().unwrap().push(conn.abort_handle());
            }
        });
        LossyProxy {
            port,
            mode,
            conns,
            task,
        }
    }

    fn set(&self, mode: u8) {
        self.mode.store(mode, std::sync::atomic::Ordering::SeqCst);
    }

    /// Breaks every open connection (and refuses new ones until `set(FORWARD)`).
    fn cut(&self) {
        self.set(REFUSE);
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }
}

impl Drop for LossyProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.cut();
    }
}

type Raw = etcd_client::Client;

/// The key-values under `key` (a prefix when `prefix`).
async fn kvs(raw: &Raw, key: &[u8], prefix: bool) -> Vec<etcd_client::KeyValue> {
    let opts = prefix.then(|| etcd_client::GetOptions::new().with_prefix());
    raw.clone().get(key, opts).await.unwrap().kvs().to_vec()
}

/// Runs `op` with the server's reply swallowed, breaks the connection once `key`
/// shows that the server applied the request (on `lease`), and returns what
/// `op` returned.
async fn with_lost_reply<T: Send + 'static>(
    proxy: &LossyProxy,
    raw: &Raw,
    (key, prefix): (&[u8], bool),
    lease: i64,
    op: impl std::future::Future<Output = T> + Send + 'static,
) -> T {
    proxy.set(SWALLOW);
    let task = tokio::spawn(op);
    wait_for(
        "the request to be applied",
        Duration::from_secs(10),
        || async { !kvs(raw, key, prefix).await.is_empty() },
    )
    .await;
    proxy.cut();
    assert!(
        kvs(raw, key, prefix)
            .await
            .iter()
            .all(|kv| kv.lease() == lease),
        "written on the coordinator's lease"
    );
    let out = task.await.unwrap();
    proxy.set(FORWARD);
    out
}

/// How long a freed hold may take to disappear: far less than the lease's TTL.
const FREED_WITHIN: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_replies_leave_no_hold_on_the_lease() {
    let Some(base) = url() else { return };
    let direct = EtcdConfig::from_url_str(&format!("{base}?timeout=30")).unwrap();
    let raw = Raw::connect([direct.endpoint()], None).await.unwrap();
    let target = direct.endpoint().trim_start_matches("http://").to_string();
    let proxy = LossyProxy::start(target).await;
    let proxied = format!("etcd3+http://127.0.0.1:{}?timeout=30", proxy.port);
    let member = MemberId::from(unique("a"));
    let driver = EtcdDriver::new(EtcdConfig::from_url_str(&proxied).unwrap(), member.clone());
    let a = Coordinator::new(Arc::new(driver.clone()), member, proxied.clone());
    a.start(true).await.unwrap();
    let lease = driver.lease_id().unwrap();
    let other = MemberId::from(unique("b"));
    let b = Coordinator::new(
        Arc::new(EtcdDriver::new(direct.clone(), other.clone())),
        other,
        base.clone(),
    );
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
    let key = [b"/tooz/locks".as_slice(), name.as_bytes()].concat();
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
        gone(key, false),
    )
    .await;
    let theirs = b.get_lock(name.as_str()).unwrap();
    assert!(theirs.acquire(Wait::No).await.unwrap());
    assert!(theirs.release().await.unwrap());

    // Shared lock: the reader key and the marker.
    let name = unique("s");
    let key = [b"/tooz/locks".as_slice(), name.as_bytes()].concat();
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
        gone(readers, true),
    )
    .await;
    wait_for("the marker to be freed", FREED_WITHIN, gone(key, false)).await;
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
    wait_for("the leadership to be freed", FREED_WITHIN, gone(key, false)).await;
    assert!(b.try_become_leader(group.as_str()).await.unwrap().is_some());
    assert!(b.stand_down_group_leader(group.as_str()).await.unwrap());

    // A release whose request cannot be sent is retried until it goes through.
    let name = unique("r");
    let key = [b"/tooz/locks".as_slice(), name.as_bytes()].concat();
    let lock = a.get_lock(name.as_str()).unwrap();
    assert!(lock.acquire(Wait::No).await.unwrap());
    proxy.cut();
    assert!(lock.release().await.is_err());
    assert_eq!(kvs(&raw, &key, false).await.len(), 1);
    proxy.set(FORWARD);
    wait_for(
        "the failed release to be retried",
        FREED_WITHIN,
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

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A Python etcd3gw exclusive acquire: create the lock key if it is absent.
async fn python_acquire(raw: &Raw, key: &[u8]) -> bool {
    use etcd_client::{Compare, CompareOp, Txn, TxnOp};
    let r = raw
        .clone()
        .txn(
            Txn::new()
                .when(vec![Compare::create_revision(key, CompareOp::Equal, 0)])
                .and_then(vec![TxnOp::put(key, b"python".to_vec(), None)]),
        )
        .await
        .unwrap();
    r.succeeded()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_marker_stays_on_a_remaining_readers_lease() {
    let Some(base) = url() else { return };
    let config = EtcdConfig::from_url_str(&format!("{base}?timeout=10")).unwrap();
    let raw = Raw::connect([config.endpoint()], None).await.unwrap();
    let start = |label: &str| {
        let member = MemberId::from(unique(label));
        let driver = EtcdDriver::new(config.clone(), member.clone());
        let coord = Coordinator::new(Arc::new(driver.clone()), member, base.clone());
        (driver, coord)
    };
    let marker = |kv: &etcd_client::KeyValue| kv.value() == b"tooz-rs:shared";

    // The first reader stops (releasing gracefully): the marker moves, in the same
    // transaction, to the remaining reader's lease.
    let name = unique("m1");
    let key = [b"/tooz/locks".as_slice(), name.as_bytes()].concat();
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
    let key = [b"/tooz/locks".as_slice(), name.as_bytes()].concat();
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
