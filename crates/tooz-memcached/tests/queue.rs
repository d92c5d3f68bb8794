//! The memcached lock's waiter queue: a release wakes one waiter (not every
//! blocked coordinator), waiters are served first come first served, a waiter
//! that gives up or is dropped leaves the queue (and the one behind it moves up),
//! a crashed waiter's entry expires, queued waiters still get a lock a Python
//! client held, and junk in the queue's keys never fails an acquire.
//!
//! ```text
//! TOOZ_TEST_MEMCACHED_URL=memcached://127.0.0.1:11211 cargo test -p tooz-memcached --test queue
//! ```
//!
//! Skipped with a message without `TOOZ_TEST_MEMCACHED_URL`; fails instead when
//! `TOOZ_REQUIRE_BACKENDS=1`.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tooz_core::{Coordinator, Registry, Wait};

const URL_ENV: &str = "TOOZ_TEST_MEMCACHED_URL";

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

fn hostport(base: &str) -> String {
    base.trim_start_matches("memcached://")
        .trim_end_matches('/')
        .to_string()
}

fn unique(label: &str) -> String {
    let n = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("q-{label}-{}-{n:x}", std::process::id())
}

/// A started coordinator on `url` (no heartbeat task: nothing is sent but what
/// the test asks for).
async fn coordinator(url: &str, label: &str) -> Coordinator {
    let c = Registry::new()
        .with(tooz_memcached::DRIVER)
        .connect(&format!("{url}?timeout=5"), unique(label).as_str())
        .unwrap();
    c.start(false).await.unwrap();
    c
}

/// A raw meta-protocol connection (another client: Python, an operator, junk).
struct Raw(BufReader<TcpStream>);

impl Raw {
    async fn connect(base: &str) -> Raw {
        Raw(BufReader::new(
            TcpStream::connect(hostport(base)).await.unwrap(),
        ))
    }

    /// Sends one meta command (with `data` for `ms`); returns the reply line and
    /// the value of a `VA` reply.
    async fn meta(&mut self, line: &[u8], data: Option<&[u8]>) -> (String, Option<Vec<u8>>) {
        let mut req = line.to_vec();
        req.extend_from_slice(b"\r\n");
        if let Some(d) = data {
            req.extend_from_slice(d);
            req.extend_from_slice(b"\r\n");
        }
        self.0.get_mut().write_all(&req).await.unwrap();
        let mut head = String::new();
        self.0.read_line(&mut head).await.unwrap();
        let head = head.trim_end().to_string();
        let value = match head.strip_prefix("VA ") {
            Some(rest) => {
                let len: usize = rest.split(' ').next().unwrap().parse().unwrap();
                let mut v = vec![0; len + 2];
                self.0.read_exact(&mut v).await.unwrap();
                v.truncate(len);
                Some(v)
            }
            None => None,
        };
        (head, value)
    }

    async fn set(&mut self, key: &[u8], data: &[u8], flags: &str) {
        let line = [
            b"ms ".as_slice(),
            key,
            format!(" {} {flags}", data.len()).as_bytes(),
        ]
        .concat();
        let (head, _) = self.meta(&line, Some(data)).await;
        assert_eq!(head, "HD", "storing {}", String::from_utf8_lossy(key));
    }

    async fn get(&mut self, key: &[u8]) -> Option<Vec<u8>> {
        let line = [b"mg ".as_slice(), key, b" v"].concat();
        self.meta(&line, None).await.1
    }

    async fn delete(&mut self, key: &[u8]) {
        let line = [b"md ".as_slice(), key].concat();
        self.meta(&line, None).await;
    }
}

fn counter_key(name: &str) -> Vec<u8> {
    [b"__TOOZ_Q_".as_slice(), name.as_bytes()].concat()
}

fn entry_key(name: &str, ticket: u64) -> Vec<u8> {
    [
        b"__TOOZ_Q".as_slice(),
        format!("{ticket:016x}").as_bytes(),
        name.as_bytes(),
    ]
    .concat()
}

/// The tickets of the live entries of the lock's queue (the last 64 tickets).
async fn queue(raw: &mut Raw, name: &str) -> Vec<u64> {
    let Some(top) = raw.get(&counter_key(name)).await else {
        return Vec::new();
    };
    let top: u64 = String::from_utf8_lossy(&top).trim().parse().unwrap();
    let mut live = Vec::new();
    for t in top.saturating_sub(63)..=top {
        if raw.get(&entry_key(name, t)).await.as_deref() == Some(b"tooz-waiter".as_slice()) {
            live.push(t);
        }
    }
    live
}

/// Polls the lock's queue until `f` holds for its live tickets.
async fn wait_queue(raw: &mut Raw, name: &str, what: &str, f: impl Fn(&[u64]) -> bool) {
    let end = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let q = queue(raw, name).await;
        if f(&q) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "timed out waiting for {what} (queue {q:?})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls until `key` exists.
async fn wait_entry(raw: &mut Raw, key: &[u8], what: &str) {
    let end = tokio::time::Instant::now() + Duration::from_secs(20);
    while raw.get(key).await.is_none() {
        assert!(
            tokio::time::Instant::now() < end,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A TCP proxy in front of memcached counting its client's round trips: a burst
/// of client bytes after the server last spoke counts one (a pipeline, or
/// concurrent requests written together, is one round trip).
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
                    let Ok(server) = TcpStream::connect(target.as_str()).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let spoke = AtomicBool::new(true);
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let up = async {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = match cr.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            if spoke.swap(false, Ordering::SeqCst) {
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
                            spoke.store(true, Ordering::SeqCst);
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
const WAITERS: usize = 16;
/// The most round trips one waiter may make from the first release to its own
/// release, however many waiters were ahead of it: reading the queue again when
/// the one ahead leaves, an attempt or two as the head (a release marker, a poll
/// while the one ahead holds the lock), the grant, leaving the queue, its release
/// = 6, plus slack for polls on a slow machine. Woken by every release, as before
/// the queue, the last waiter makes at least one attempt per waiter ahead of it.
const PER_WAITER: u64 = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_release_wakes_one_waiter() {
    let Some(base) = base("one_release_wakes_one_waiter") else {
        return;
    };
    let target = hostport(&base);
    let name = unique("herd");
    let holder = coordinator(&base, "holder").await;
    let held = holder.get_lock(name.as_str()).unwrap();
    assert!(held.acquire(Wait::No).await.unwrap());

    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut waiters = Vec::new();
    let mut raw = Raw::connect(&base).await;
    for i in 0..WAITERS {
        let proxy = CountingProxy::start(target.clone()).await;
        let c = coordinator(&format!("memcached://127.0.0.1:{}", proxy.port), "w").await;
        let lock = c.get_lock(name.as_str()).unwrap();
        let tx = tx.clone();
        let task = tokio::spawn(async move {
            let won = lock.acquire(Wait::Forever).await.unwrap();
            let (go, told) = oneshot::channel::<()>();
            tx.send((i, won, go)).unwrap();
            told.await.unwrap();
            assert!(lock.release().await.unwrap());
        });
        // Blocked: it tried and joined the queue behind the ones before it.
        wait_queue(&mut raw, &name, "the waiter to queue", |q| q.len() == i + 1).await;
        waiters.push((proxy, c, task));
    }
    assert!(
        waiters.iter().all(|(_, _, t)| !t.is_finished()),
        "a waiter returned while the lock was held"
    );

    let base_counts: Vec<u64> = waiters.iter().map(|(p, _, _)| p.sent()).collect();
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
        let (_, _, task) = &mut waiters[i];
        task.await.unwrap();
    }
    // Each waiter's last request (leaving the queue) is in flight or done.
    wait_queue(&mut raw, &name, "the queue to empty", |q| q.is_empty()).await;
    let sent: Vec<u64> = waiters
        .iter()
        .zip(&base_counts)
        .map(|((p, _, _), b)| p.sent() - b)
        .collect();
    let total: u64 = sent.iter().sum();
    eprintln!(
        "round trips per waiter from the first release (in queue order {order:?}): {sent:?}; {:.2} per handoff",
        total as f64 / WAITERS as f64
    );
    let most = sent.iter().copied().max().unwrap_or(0);
    assert!(
        most <= PER_WAITER,
        "a waiter made {most} round trips (per waiter: {sent:?}): releases woke waiters not at the head"
    );
    // First come, first served.
    assert_eq!(order, (0..WAITERS).collect::<Vec<_>>());
    for (_, c, _) in &waiters {
        c.stop().await.unwrap();
    }
    holder.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_that_give_up_leave_the_queue() {
    let Some(base) = base("waiters_that_give_up_leave_the_queue") else {
        return;
    };
    let mut raw = Raw::connect(&base).await;
    let name = unique("leave");
    let holder = coordinator(&base, "holder").await;
    let held = holder.get_lock(name.as_str()).unwrap();
    assert!(held.acquire(Wait::No).await.unwrap());

    // Queued in this order: one whose caller stops waiting (its future dropped in a
    // select), one that waits, one whose task is aborted.
    let quitter = coordinator(&base, "quitter").await;
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
    wait_queue(&mut raw, &name, "the first entry", |q| q.len() == 1).await;
    let patient = coordinator(&base, "patient").await;
    let pl = patient.get_lock(name.as_str()).unwrap();
    let pl2 = pl.clone();
    let waiting = tokio::spawn(async move { pl2.acquire(Wait::Forever).await.unwrap() });
    wait_queue(&mut raw, &name, "the second entry", |q| q.len() == 2).await;
    let dropped = coordinator(&base, "dropped").await;
    let dl = dropped.get_lock(name.as_str()).unwrap();
    let gone = tokio::spawn(async move { dl.acquire(Wait::Forever).await });
    wait_queue(&mut raw, &name, "the third entry", |q| q.len() == 3).await;
    let entries = queue(&mut raw, &name).await;

    // A wait that runs out leaves.
    let timed = coordinator(&base, "timed").await;
    let tl = timed.get_lock(name.as_str()).unwrap();
    assert!(
        !tl.acquire(Wait::For(Duration::from_millis(300)))
            .await
            .unwrap()
    );
    wait_queue(&mut raw, &name, "the timed-out wait to leave", |q| {
        q == entries
    })
    .await;

    quit_tx.send(()).unwrap();
    assert!(!gave_up.await.unwrap());
    gone.abort();
    assert!(gone.await.unwrap_err().is_cancelled());
    wait_queue(&mut raw, &name, "the abandoned entries to go", |q| {
        q == [entries[1]]
    })
    .await;
    assert!(!waiting.is_finished(), "got the lock while it was held");

    // The one left behind those who left is now the head: a release reaches it.
    assert!(held.release().await.unwrap());
    let won = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the waiter behind those who left got no wake-up")
        .unwrap();
    assert!(won);
    wait_queue(&mut raw, &name, "the grant to take its entry", |q| {
        q.is_empty()
    })
    .await;
    assert!(pl.release().await.unwrap());
    for c in [&holder, &quitter, &patient, &dropped, &timed] {
        c.stop().await.unwrap();
    }
}

/// A Python client takes the lock by its own path (an `add`, no queue) and
/// releases with a plain delete (no release marker): the head of the queue sees it
/// by polling, then the one behind gets it after the head's release.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_waiters_get_a_lock_python_held() {
    let Some(base) = base("queued_waiters_get_a_lock_python_held") else {
        return;
    };
    let mut raw = Raw::connect(&base).await;
    let name = unique("py");
    let key = [b"__TOOZ_LOCK_".as_slice(), name.as_bytes()].concat();
    raw.set(&key, b"python-member", "F1 T30 ME").await;
    let a = coordinator(&base, "a").await;
    let b = coordinator(&base, "b").await;
    let (la, lb) = (
        a.get_lock(name.as_str()).unwrap(),
        b.get_lock(name.as_str()).unwrap(),
    );
    let la2 = la.clone();
    let first = tokio::spawn(async move { la2.acquire(Wait::Forever).await.unwrap() });
    wait_queue(&mut raw, &name, "a's entry", |q| q.len() == 1).await;
    let lb2 = lb.clone();
    let second = tokio::spawn(async move { lb2.acquire_shared(Wait::Forever).await.unwrap() });
    wait_queue(&mut raw, &name, "b's entry", |q| q.len() == 2).await;
    // Python releases: the head gets it, then the one behind.
    raw.delete(&key).await;
    assert!(
        tokio::time::timeout(Duration::from_secs(10), first)
            .await
            .expect("the head never saw the Python release")
            .unwrap()
    );
    assert!(
        !second.is_finished(),
        "a shared waiter got an exclusive hold's lock"
    );
    assert!(la.release().await.unwrap());
    assert!(
        tokio::time::timeout(Duration::from_secs(10), second)
            .await
            .expect("the second waiter never got the lock")
            .unwrap()
    );
    assert!(lb.release().await.unwrap());
    wait_queue(&mut raw, &name, "the queue to empty", |q| q.is_empty()).await;
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

/// A waiter that crashed leaves an entry nobody refreshes: it expires, and the
/// waiter behind it gets the lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_waiters_entry_expires() {
    let Some(base) = base("a_crashed_waiters_entry_expires") else {
        return;
    };
    let mut raw = Raw::connect(&base).await;
    let name = unique("crash");
    let holder = coordinator(&base, "holder").await;
    let held = holder.get_lock(name.as_str()).unwrap();
    assert!(held.acquire(Wait::No).await.unwrap());
    // The crashed waiter: a ticket and an entry with two seconds to live.
    let (head, value) = raw
        .meta(
            &[b"ma ".as_slice(), &counter_key(&name), b" N3600 J1000 v"].concat(),
            None,
        )
        .await;
    assert!(head.starts_with("VA"), "{head}");
    let ticket: u64 = String::from_utf8(value.unwrap()).unwrap().parse().unwrap();
    raw.set(&entry_key(&name, ticket), b"tooz-waiter", "T2 F0")
        .await;
    // It waits longer than its lease without heartbeats: it beats.
    let w = Registry::new()
        .with(tooz_memcached::DRIVER)
        .connect(&format!("{base}?timeout=5"), unique("w").as_str())
        .unwrap();
    w.start(true).await.unwrap();
    let wl = w.get_lock(name.as_str()).unwrap();
    let wl2 = wl.clone();
    let waiting = tokio::spawn(async move { wl2.acquire(Wait::Forever).await.unwrap() });
    wait_entry(
        &mut raw,
        &entry_key(&name, ticket + 1),
        "the waiter's entry",
    )
    .await;
    assert!(held.release().await.unwrap());
    // The entry expires within two seconds; the waiter looks at it every six.
    assert!(
        tokio::time::timeout(Duration::from_secs(20), waiting)
            .await
            .expect("the crashed waiter's entry blocked the queue")
            .unwrap()
    );
    assert!(wl.release().await.unwrap());
    w.stop().await.unwrap();
    holder.stop().await.unwrap();
}

/// Junk in the queue's keys (a counter that is no number, entries another client
/// wrote without a TTL or with another value) never fails an acquire: the waiter
/// skips the entries, or waits without the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_in_the_queue_never_fails_an_acquire() {
    let Some(base) = base("junk_in_the_queue_never_fails_an_acquire") else {
        return;
    };
    let mut raw = Raw::connect(&base).await;
    for junk_counter in [true, false] {
        let name = unique("junk");
        let holder = coordinator(&base, "holder").await;
        let held = holder.get_lock(name.as_str()).unwrap();
        assert!(held.acquire(Wait::No).await.unwrap());
        if junk_counter {
            raw.set(&counter_key(&name), b"not a number", "F0").await;
        } else {
            raw.set(&counter_key(&name), b"1000", "F0").await;
            // The tickets just below the next waiter's: junk values, a real
            // value without a TTL, an empty value.
            raw.set(&entry_key(&name, 1000), b"tooz-waiter", "F0").await;
            raw.set(&entry_key(&name, 999), &[0xc1, 0xff, 0], "F7 T60")
                .await;
            raw.set(&entry_key(&name, 998), b"", "F0 T60").await;
        }
        let w = coordinator(&base, "w").await;
        let wl = w.get_lock(name.as_str()).unwrap();
        let wl2 = wl.clone();
        let waiting = tokio::spawn(async move { wl2.acquire(Wait::Forever).await });
        if !junk_counter {
            wait_entry(&mut raw, &entry_key(&name, 1001), "the waiter's entry").await;
        }
        assert!(held.release().await.unwrap());
        let got = tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("junk in the queue blocked the waiter")
            .unwrap();
        assert!(got.unwrap(), "junk counter {junk_counter}");
        assert!(wl.release().await.unwrap());
        w.stop().await.unwrap();
        holder.stop().await.unwrap();
        for k in [998, 999, 1000] {
            raw.delete(&entry_key(&name, k)).await;
        }
        raw.delete(&counter_key(&name)).await;
    }
}
