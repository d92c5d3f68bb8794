//! The Consul lock's waiter queue: a release wakes one waiter (not every blocked
//! coordinator), waiters get the lock first come first served, a waiter that
//! gives up (deadline, future dropped, task aborted, coordinator stopped) leaves
//! the queue and the one behind it still gets the lock, readers queued together
//! are woken together, queued waiters get a lock a Python client held, and junk
//! under the queue prefix changes nothing.
//!
//! ```text
//! TOOZ_TEST_CONSUL_URL=consul://127.0.0.1:8500 cargo test -p tooz-consul --test queue
//! ```
//!
//! Needs `TOOZ_TEST_CONSUL_URL`; skipped with a message otherwise (a failure with
//! `TOOZ_REQUIRE_BACKENDS=1`). Every test works in a namespace of its own.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tooz_conformance::testkit::{self, unique};
use tooz_consul::{ConsulConfig, ConsulDriver};
use tooz_core::{Coordinator, MemberId, Wait};

const URL_ENV: &str = "TOOZ_TEST_CONSUL_URL";

/// The server's URL, or `None` when the test is skipped (a failure instead with
/// `TOOZ_REQUIRE_BACKENDS=1`).
fn base(test: &str) -> Option<String> {
    testkit::backend_url(URL_ENV, test)
}

/// Polls observable state until `f` holds.
async fn wait_for(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(20);
    while !f().await {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A namespace of its own for one test, on sessions that outlive it without
/// heartbeats (none run: nothing is sent but what the test asks for).
struct Space {
    base: String,
    ns: String,
    api: String,
    http: reqwest::Client,
}

impl Space {
    fn new(base: &str, test: &str) -> Space {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let ns = unique(test);
        let api = ConsulConfig::from_url_str(base).unwrap().api_base();
        Space {
            base: base.to_string(),
            ns,
            api,
            http: reqwest::Client::new(),
        }
    }

    fn options(&self) -> String {
        format!("ttl=300&lock_delay=0&timeout=60&namespace={}", self.ns)
    }

    /// A started coordinator straight to the agent.
    async fn coordinator(&self, label: &str) -> Coordinator {
        self.coordinator_at(&format!("{}?{}", self.base, self.options()), label)
            .await
    }

    /// A started coordinator through `proxy`.
    async fn coordinator_via(&self, proxy: &CountingProxy, label: &str) -> Coordinator {
        let url = format!("consul://127.0.0.1:{}?{}", proxy.port, self.options());
        self.coordinator_at(&url, label).await
    }

    async fn coordinator_at(&self, url: &str, label: &str) -> Coordinator {
        let member = MemberId::from(unique(label).as_str());
        let driver =
            ConsulDriver::new(ConsulConfig::from_url_str(url).unwrap(), member.clone()).unwrap();
        let c = Coordinator::new(Arc::new(driver), member, url.to_string());
        c.start(false).await.unwrap();
        c
    }

    /// The agent's address (`host:port`).
    fn agent(&self) -> String {
        let c = ConsulConfig::from_url_str(&self.base).unwrap();
        format!("{}:{}", c.host, c.port)
    }

    /// The keys under the waiter queue of lock `name`.
    async fn queue(&self, name: &str) -> Vec<String> {
        let prefix = format!("{}/lock-queue/{}/", self.ns, hex::encode(name.as_bytes()));
        let r = self
            .http
            .get(format!("{}kv/{prefix}?keys", self.api))
            .send()
            .await
            .unwrap();
        if r.status() == reqwest::StatusCode::NOT_FOUND {
            return Vec::new();
        }
        r.json().await.unwrap()
    }

    /// A raw request (what another client does); the reply's body.
    async fn raw(&self, method: reqwest::Method, path: &str, body: &str) -> String {
        self.http
            .request(method, format!("{}{path}", self.api))
            .body(body.to_string())
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Deletes everything of the namespace.
    async fn clean(&self) {
        self.raw(
            reqwest::Method::DELETE,
            &format!("kv/{}?recurse", self.ns),
            "",
        )
        .await;
    }
}

/// A TCP proxy in front of the agent counting the HTTP requests its client
/// sends: on each connection, one each time the client starts sending after the
/// agent last answered (HTTP/1.1 sends one request at a time per connection). A
/// blocking query counts when it is sent.
struct CountingProxy {
    port: u16,
    sent: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl CountingProxy {
    async fn start(target: String) -> CountingProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let sent = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&sent);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (target, counter) = (target.clone(), Arc::clone(&counter));
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(target.as_str()).await else {
                        return;
                    };
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    // Whether the agent spoke since the client last sent.
                    let answered = AtomicBool::new(true);
                    let up = async {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = match cr.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            if answered.swap(false, Ordering::SeqCst) {
                                counter.fetch_add(1, Ordering::SeqCst);
                            }
                            if sw.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    };
                    let down = async {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = match sr.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            answered.store(true, Ordering::SeqCst);
                            if cw.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    };
                    tokio::select! { () = up => {}, () = down => {} }
                });
            }
        });
        CountingProxy { port, sent, task }
    }

    fn sent(&self) -> u64 {
        self.sent.load(Ordering::SeqCst)
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How many coordinators queue on the lock.
const WAITERS: usize = 12;
/// The most requests one waiter may send for its whole acquire and release,
/// however many waiters were ahead of it: attempt, read the key, queue, wait on
/// the entry ahead, read the queue, read the lock, wait on the lock, attempt,
/// release = 9, plus slack for a blocking query that timed out. Woken by every
/// release, the last waiter would send at least one attempt (and its blocking
/// query one more request) per waiter ahead of it.
const PER_WAITER: u64 = 12;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_release_wakes_one_waiter() {
    let Some(base) = base("one_release_wakes_one_waiter") else {
        return;
    };
    let space = Space::new(&base, "herd");
    let name = unique("herd");
    let holder = space.coordinator("holder").await;
    let held = holder.get_lock(name.as_str()).unwrap();
    assert!(held.acquire(Wait::No).await.unwrap());

    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut waiters = Vec::new();
    for i in 0..WAITERS {
        let proxy = CountingProxy::start(space.agent()).await;
        let c = space.coordinator_via(&proxy, "w").await;
        let lock = c.get_lock(name.as_str()).unwrap();
        let base = proxy.sent();
        let tx = tx.clone();
        let task = tokio::spawn(async move {
            let won = lock.acquire(Wait::Forever).await.unwrap();
            let (go, told) = oneshot::channel::<()>();
            tx.send((i, won, go)).unwrap();
            told.await.unwrap();
            assert!(lock.release().await.unwrap());
        });
        // Blocked: it tried, read the lock, and waits (queued, or subscribed to
        // the lock keys) by a blocking query sent last.
        wait_for("the waiter to block", async || proxy.sent() >= base + 4).await;
        waiters.push((proxy, c, task, base));
    }
    assert!(
        waiters.iter().all(|(_, _, t, _)| !t.is_finished()),
        "a waiter returned while the lock was held"
    );

    assert!(held.release().await.unwrap());
    let mut order = Vec::new();
    for _ in 0..WAITERS {
        let (i, won, go) = tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .expect("no waiter got the lock after a release")
            .unwrap();
        assert!(won);
        order.push(i);
        go.send(()).unwrap();
        let (_, _, task, _) = &mut waiters[i];
        task.await.unwrap();
    }
    let sent: Vec<u64> = waiters.iter().map(|(p, _, _, b)| p.sent() - b).collect();
    eprintln!(
        "requests per waiter (in queue order {order:?}): {sent:?}, {} in all",
        sent.iter().sum::<u64>()
    );
    let most = sent.iter().copied().max().unwrap_or(0);
    assert!(
        most <= PER_WAITER,
        "a waiter sent {most} requests (per waiter: {sent:?}): releases woke waiters not at the head"
    );
    // First come, first served.
    assert_eq!(order, (0..WAITERS).collect::<Vec<_>>());
    assert!(space.queue(&name).await.is_empty(), "entries left behind");
    for (_, c, _, _) in &waiters {
        c.stop().await.unwrap();
    }
    holder.stop().await.unwrap();
    space.clean().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_that_give_up_leave_the_queue() {
    let Some(base) = base("waiters_that_give_up_leave_the_queue") else {
        return;
    };
    let space = Space::new(&base, "leave");
    let name = unique("leave");
    let holder = space.coordinator("holder").await;
    let held = holder.get_lock(name.as_str()).unwrap();
    assert!(held.acquire(Wait::No).await.unwrap());

    // Queued in this order: one whose caller stops waiting (its future dropped in
    // a select), one that waits, one whose task is aborted, one whose coordinator
    // stops.
    let quitter = space.coordinator("quitter").await;
    let ql = quitter.get_lock(name.as_str()).unwrap();
    let (gave_up_tx, gave_up) = oneshot::channel();
    let (quit_tx, quit_rx) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let wait = async {
            let _ = quit_rx.await;
        };
        let r = tokio::select! {
            r = ql.acquire(Wait::Forever) => r,
            () = wait => Ok(false),
        };
        gave_up_tx.send(r.unwrap()).unwrap();
    });
    wait_for("the first entry", async || {
        space.queue(&name).await.len() == 1
    })
    .await;
    let patient = space.coordinator("patient").await;
    let pl = patient.get_lock(name.as_str()).unwrap();
    let pl2 = pl.clone();
    let waiting = tokio::spawn(async move { pl2.acquire(Wait::Forever).await.unwrap() });
    wait_for("the second entry", async || {
        space.queue(&name).await.len() == 2
    })
    .await;
    let dropped = space.coordinator("dropped").await;
    let dl = dropped.get_lock(name.as_str()).unwrap();
    let gone = tokio::spawn(async move { dl.acquire(Wait::Forever).await });
    wait_for("the third entry", async || {
        space.queue(&name).await.len() == 3
    })
    .await;
    let stopping = space.coordinator("stopping").await;
    let sl = stopping.get_lock(name.as_str()).unwrap();
    let stopped = tokio::spawn(async move { sl.acquire(Wait::Forever).await });
    wait_for("the fourth entry", async || {
        space.queue(&name).await.len() == 4
    })
    .await;

    // A wait that runs out.
    let timed = space.coordinator("timed").await;
    let tl = timed.get_lock(name.as_str()).unwrap();
    assert!(
        !tl.acquire(Wait::For(Duration::from_millis(300)))
            .await
            .unwrap()
    );
    assert_eq!(space.queue(&name).await.len(), 4, "the timed-out wait left");

    quit_tx.send(()).unwrap();
    assert!(!gave_up.await.unwrap());
    gone.abort();
    assert!(gone.await.unwrap_err().is_cancelled());
    stopping.stop().await.unwrap();
    assert!(matches!(
        stopped.await.unwrap(),
        Err(tooz_core::ToozError::Stopped)
    ));
    wait_for("the abandoned entries to go", async || {
        space.queue(&name).await.len() == 1
    })
    .await;
    assert!(!waiting.is_finished(), "got the lock while it was held");

    assert!(held.release().await.unwrap());
    let got = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the waiter behind those who left got the lock");
    assert!(got.unwrap());
    assert!(
        space.queue(&name).await.is_empty(),
        "the grant took its entry"
    );
    assert!(pl.release().await.unwrap());
    for c in [&holder, &quitter, &patient, &dropped, &timed] {
        c.stop().await.unwrap();
    }
    space.clean().await;
}

/// Shared waiters behind shared waiters proceed together; an exclusive waiter
/// behind them waits for them, and a shared waiter behind it waits for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_queued_together_are_woken_together() {
    let Some(base) = base("readers_queued_together_are_woken_together") else {
        return;
    };
    let space = Space::new(&base, "rw");
    let name = unique("rw");
    let holder = space.coordinator("holder").await;
    let held = holder.get_lock(name.as_str()).unwrap();
    assert!(held.acquire(Wait::No).await.unwrap());

    let mut coords = Vec::new();
    let mut locks = Vec::new();
    let mut tasks = Vec::new();
    for (i, shared) in [true, true, false, true].into_iter().enumerate() {
        let c = space.coordinator("rw").await;
        let l = c.get_lock(name.as_str()).unwrap();
        let l2 = l.clone();
        tasks.push(tokio::spawn(async move {
            if shared {
                l2.acquire_shared(Wait::Forever).await.unwrap()
            } else {
                l2.acquire(Wait::Forever).await.unwrap()
            }
        }));
        wait_for("the entry", async || {
            space.queue(&name).await.len() == i + 1
        })
        .await;
        coords.push(c);
        locks.push(l);
    }
    let mut tasks = tasks.into_iter();
    let (r1, r2, w, r3) = (
        tasks.next().unwrap(),
        tasks.next().unwrap(),
        tasks.next().unwrap(),
        tasks.next().unwrap(),
    );

    // One release: both readers at the head get the lock, neither releasing.
    assert!(held.release().await.unwrap());
    assert!(r1.await.unwrap());
    assert!(r2.await.unwrap());
    assert!(locks[0].is_still_owner().await.unwrap());
    assert!(locks[1].is_still_owner().await.unwrap());
    assert!(
        !w.is_finished(),
        "the writer got the lock while readers held it"
    );
    assert!(locks[0].release().await.unwrap());
    assert!(locks[1].release().await.unwrap());
    assert!(w.await.unwrap());
    assert!(
        !r3.is_finished(),
        "a reader got the lock while the writer held it"
    );
    assert!(locks[2].release().await.unwrap());
    assert!(r3.await.unwrap());
    assert!(locks[3].release().await.unwrap());
    assert!(space.queue(&name).await.is_empty());
    for c in coords.iter().chain([&holder]) {
        c.stop().await.unwrap();
    }
    space.clean().await;
}

/// A Python client (python-consul's `?acquire=`/`?release=` on the lock key, as
/// tooz 8.1.0 does) holds the lock: queued Rust waiters get it after its release,
/// the head first, and hold it for real (the fencing token is the grant's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_waiters_get_a_lock_python_held() {
    let Some(base) = base("queued_waiters_get_a_lock_python_held") else {
        return;
    };
    let space = Space::new(&base, "py");
    let name = unique("py");
    let key = format!("kv/{}/locks/{name}", space.ns);
    let created = space
        .raw(reqwest::Method::PUT, "session/create", r#"{"TTL":"300s"}"#)
        .await;
    let sid = serde_json::from_str::<serde_json::Value>(&created).unwrap()["ID"]
        .as_str()
        .unwrap()
        .to_string();
    let took = space
        .raw(
            reqwest::Method::PUT,
            &format!("{key}?acquire={sid}"),
            "I got it!",
        )
        .await;
    assert_eq!(took.trim(), "true");

    let a = space.coordinator("a").await;
    let b = space.coordinator("b").await;
    let (la, lb) = (
        a.get_lock(name.as_str()).unwrap(),
        b.get_lock(name.as_str()).unwrap(),
    );
    let la2 = la.clone();
    let first = tokio::spawn(async move { la2.acquire(Wait::Forever).await.unwrap() });
    wait_for("a's entry", async || space.queue(&name).await.len() == 1).await;
    let lb2 = lb.clone();
    let second = tokio::spawn(async move { lb2.acquire_shared(Wait::Forever).await.unwrap() });
    wait_for("b's entry", async || space.queue(&name).await.len() == 2).await;

    // Python releases (the key stays, unlocked): the head gets it, then the one
    // behind.
    let released = space
        .raw(
            reqwest::Method::PUT,
            &format!("{key}?release={sid}"),
            "I got it!",
        )
        .await;
    assert_eq!(released.trim(), "true");
    assert!(first.await.unwrap());
    assert!(
        la.is_still_owner().await.unwrap(),
        "the grant's token is not the key's index"
    );
    assert!(
        !second.is_finished(),
        "a shared waiter got an exclusive hold's lock"
    );
    // Python cannot take it meanwhile.
    let again = space
        .raw(
            reqwest::Method::PUT,
            &format!("{key}?acquire={sid}"),
            "I got it!",
        )
        .await;
    assert_eq!(again.trim(), "false");
    assert!(la.release().await.unwrap());
    assert!(second.await.unwrap());
    assert!(lb.is_still_owner().await.unwrap());
    assert!(lb.release().await.unwrap());
    assert!(space.queue(&name).await.is_empty());
    space
        .raw(reqwest::Method::PUT, &format!("session/destroy/{sid}"), "")
        .await;
    a.stop().await.unwrap();
    b.stop().await.unwrap();
    space.clean().await;
}

/// Keys under the queue prefix that are not live entries of ours (no session, odd
/// names, deeper keys, created before every waiter) are ignored: acquires and
/// releases work, and a waiter still gets the lock on a release.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_in_the_queue_is_ignored() {
    let Some(base) = base("junk_in_the_queue_is_ignored") else {
        return;
    };
    let space = Space::new(&base, "qjunk");
    let name = unique("qjunk");
    let prefix = format!(
        "kv/{}/lock-queue/{}/",
        space.ns,
        hex::encode(name.as_bytes())
    );
    let id = "0".repeat(32);
    for (k, v) in [
        (format!("x{id}"), "stale"),
        (format!("s{id}"), ""),
        ("junk".to_string(), "\u{0}\u{1}"),
        (format!("x{id}/deeper"), "x"),
        (format!("y{id}"), ""),
        (format!("x{}", "z".repeat(32)), ""),
    ] {
        let ok = space
            .raw(reqwest::Method::PUT, &format!("{prefix}{k}"), v)
            .await;
        assert_eq!(ok.trim(), "true", "{k}");
    }
    let junk = space.queue(&name).await.len();
    assert_eq!(junk, 6);

    let a = space.coordinator("a").await;
    let b = space.coordinator("b").await;
    let (la, lb) = (
        a.get_lock(name.as_str()).unwrap(),
        b.get_lock(name.as_str()).unwrap(),
    );
    assert!(la.acquire(Wait::No).await.unwrap());
    let lb2 = lb.clone();
    let waiting = tokio::spawn(async move { lb2.acquire(Wait::Forever).await.unwrap() });
    wait_for("b's entry", async || {
        space.queue(&name).await.len() == junk + 1
    })
    .await;
    assert!(la.release().await.unwrap());
    let got = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the waiter behind the junk got the lock");
    assert!(got.unwrap());
    assert!(!la.acquire(Wait::No).await.unwrap());
    assert!(
        !la.acquire_shared(Wait::For(Duration::from_millis(200)))
            .await
            .unwrap()
    );
    assert!(lb.release().await.unwrap());
    assert!(la.acquire_shared(Wait::No).await.unwrap());
    assert!(la.release().await.unwrap());
    assert_eq!(
        space.queue(&name).await.len(),
        junk,
        "others' keys are left"
    );
    a.stop().await.unwrap();
    b.stop().await.unwrap();
    space.clean().await;
}

/// More acquires blocked at once in one coordinator than it lets wait by blocking
/// queries (96; one HTTP connection each): the rest poll, and every one gets the
/// lock in turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_waiters_than_blocking_queries_all_get_the_lock() {
    let Some(base) = base("more_waiters_than_blocking_queries_all_get_the_lock") else {
        return;
    };
    const MANY: usize = 104;
    let space = Space::new(&base, "many");
    let name = unique("many");
    let holder = space.coordinator("holder").await;
    let held = holder.get_lock(name.as_str()).unwrap();
    assert!(held.acquire(Wait::No).await.unwrap());
    let c = space.coordinator("many").await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    for i in 0..MANY {
        let lock = c.get_lock(name.as_str()).unwrap();
        let tx = tx.clone();
        tokio::spawn(async move {
            let won = lock.acquire(Wait::Forever).await.unwrap();
            tx.send((i, won)).unwrap();
            assert!(lock.release().await.unwrap());
        });
    }
    wait_for("every waiter's entry", async || {
        space.queue(&name).await.len() == MANY
    })
    .await;
    assert!(held.release().await.unwrap());
    let mut got = Vec::new();
    for _ in 0..MANY {
        let (i, won) = tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .expect("a waiter got the lock after a release")
            .unwrap();
        assert!(won);
        got.push(i);
    }
    got.sort_unstable();
    assert_eq!(got, (0..MANY).collect::<Vec<_>>());
    wait_for("an empty queue", async || {
        space.queue(&name).await.is_empty()
    })
    .await;
    c.stop().await.unwrap();
    holder.stop().await.unwrap();
    space.clean().await;
}
