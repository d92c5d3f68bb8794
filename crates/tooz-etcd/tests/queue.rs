//! The etcd lock's waiter queue: a release wakes one waiter (not every blocked
//! coordinator), a waiter that gives up or is dropped leaves the queue (and the
//! one behind it moves up), and queued waiters still get a lock a Python client
//! held.
//!
//! ```text
//! TOOZ_TEST_ETCD_URL=etcd3+http://127.0.0.1:2379 cargo test -p tooz-etcd --test queue
//! ```
//!
//! Skipped with a message without `TOOZ_TEST_ETCD_URL`; fails instead when
//! `TOOZ_REQUIRE_BACKENDS=1`.

#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use support::{Raw, coordinator_on, hex, lock_key, python_acquire, raw};
use tokio::sync::{mpsc, oneshot};
use tooz_conformance::fault::{FaultProxy, proxied_url, url_target};
use tooz_conformance::testkit::{unique, wait_for};
use tooz_core::{Coordinator, Wait};

/// How long the tests wait for what they poll, and how often they poll.
const WAIT: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(20);

/// A started coordinator on `url` (no heartbeat task: nothing is sent but what the
/// test asks for; the lease outlives the test).
async fn coordinator(url: &str, label: &str) -> Coordinator {
    let (_, c) = coordinator_on(&format!("{url}?timeout=30"), label);
    c.start(false).await.unwrap();
    c
}

/// Counts the non-empty DATA frames of a client's HTTP/2 byte stream.
#[derive(Default)]
struct Frames {
    preface_seen: usize,
    pending: Vec<u8>,
}

impl Frames {
    const PREFACE: usize = 24;

    fn feed(&mut self, mut bytes: &[u8]) -> u64 {
        if self.preface_seen < Self::PREFACE {
            let n = (Self::PREFACE - self.preface_seen).min(bytes.len());
            self.preface_seen += n;
            bytes = &bytes[n..];
        }
        self.pending.extend_from_slice(bytes);
        let mut data = 0;
        loop {
            let Some(h) = self.pending.get(..9) else {
                return data;
            };
            let len = (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
            let kind = h[3];
            if self.pending.len() < 9 + len {
                return data;
            }
            if kind == 0 && len > 0 {
                data += 1;
            }
            self.pending.drain(..9 + len);
        }
    }
}

/// A [`FaultProxy`] in front of etcd counting the gRPC messages its clients send:
/// the HTTP/2 DATA frames with a payload (one per request message: a unary call,
/// a watch create or cancel), after the connection preface.
struct CountingProxy {
    proxy: FaultProxy,
    sent: Arc<AtomicU64>,
}

impl CountingProxy {
    async fn start(base: &str) -> CountingProxy {
        let sent = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&sent);
        let proxy = FaultProxy::start_tapped(url_target(base).unwrap(), move || {
            let (counter, mut frames) = (Arc::clone(&counter), Frames::default());
            move |bytes: &[u8]| {
                counter.fetch_add(frames.feed(bytes), Ordering::SeqCst);
            }
        })
        .await
        .unwrap();
        CountingProxy { proxy, sent }
    }

    /// The server's URL through the proxy.
    fn url(&self, base: &str) -> String {
        proxied_url(base, &self.proxy).unwrap()
    }

    fn sent(&self) -> u64 {
        self.sent.load(Ordering::SeqCst)
    }
}

#[test]
fn frames_are_counted_across_reads() {
    let mut f = Frames::default();
    let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    // SETTINGS (type 4, 6 bytes), DATA with 3 bytes, empty DATA, DATA with 1 byte.
    bytes.extend([0, 0, 6, 4, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6]);
    bytes.extend([0, 0, 3, 0, 0, 0, 0, 0, 1, 7, 7, 7]);
    bytes.extend([0, 0, 0, 0, 1, 0, 0, 0, 1]);
    bytes.extend([0, 0, 1, 0, 0, 0, 0, 0, 3, 9]);
    let total: u64 = bytes.chunks(5).map(|c| f.feed(c)).sum();
    assert_eq!(total, 2);
}

/// How many coordinators queue on the lock.
const WAITERS: usize = 16;
/// The most requests one waiter may send for its whole acquire and release
/// however many waiters were ahead of it: enqueue, watch the entry ahead, look
/// for the next one ahead, attempt, watch the lock, attempt, release = 7, plus
/// slack for a watch re-opened or cancelled. Woken by every release, the last
/// waiter would send at least one attempt per waiter ahead of it.
const PER_WAITER: u64 = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_release_wakes_one_waiter() {
    let Some(base) = support::url("one_release_wakes_one_waiter") else {
        return;
    };
    let name = unique("herd");
    let holder = coordinator(&base, "holder").await;
    let held = holder.get_lock(name.as_str()).unwrap();
    assert!(held.acquire(Wait::No).await.unwrap());

    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut waiters = Vec::new();
    for i in 0..WAITERS {
        let proxy = CountingProxy::start(&base).await;
        let c = coordinator(&proxy.url(&base), "w").await;
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
        // Blocked: it has tried (or queued) and watches something.
        wait_for("the waiter to block", WAIT, POLL, || async {
            proxy.sent() >= base + 2
        })
        .await;
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
    eprintln!("requests per waiter (in queue order {order:?}): {sent:?}");
    let most = sent.iter().copied().max().unwrap_or(0);
    assert!(
        most <= PER_WAITER,
        "a waiter sent {most} requests (per waiter: {sent:?}): releases woke waiters not at the head"
    );
    // First come, first served.
    assert_eq!(order, (0..WAITERS).collect::<Vec<_>>());
    for (_, c, _, _) in &waiters {
        c.stop().await.unwrap();
    }
    holder.stop().await.unwrap();
}

/// The keys of the lock's waiter queue.
async fn queue(raw: &Raw, name: &str) -> Vec<Vec<u8>> {
    let prefix = format!("tooz/lock-queue/{}/", hex(name.as_bytes()));
    let r = raw
        .clone()
        .get(
            prefix,
            Some(
                etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_keys_only(),
            ),
        )
        .await
        .unwrap();
    r.kvs().iter().map(|kv| kv.key().to_vec()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_that_give_up_leave_the_queue() {
    let Some(base) = support::url("waiters_that_give_up_leave_the_queue") else {
        return;
    };
    let raw = raw(&base).await;
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
    wait_for("the first entry", WAIT, POLL, || async {
        queue(&raw, &name).await.len() == 1
    })
    .await;
    let patient = coordinator(&base, "patient").await;
    let pl = patient.get_lock(name.as_str()).unwrap();
    let pl2 = pl.clone();
    let waiting = tokio::spawn(async move { pl2.acquire(Wait::Forever).await.unwrap() });
    wait_for("the second entry", WAIT, POLL, || async {
        queue(&raw, &name).await.len() == 2
    })
    .await;
    let dropped = coordinator(&base, "dropped").await;
    let dl = dropped.get_lock(name.as_str()).unwrap();
    let gone = tokio::spawn(async move { dl.acquire(Wait::Forever).await });
    wait_for("the third entry", WAIT, POLL, || async {
        queue(&raw, &name).await.len() == 3
    })
    .await;

    // A wait that runs out.
    let timed = coordinator(&base, "timed").await;
    let tl = timed.get_lock(name.as_str()).unwrap();
    assert!(
        !tl.acquire(Wait::For(Duration::from_millis(200)))
            .await
            .unwrap()
    );
    assert_eq!(queue(&raw, &name).await.len(), 3, "the timed-out wait left");

    quit_tx.send(()).unwrap();
    assert!(!gave_up.await.unwrap());
    gone.abort();
    assert!(gone.await.unwrap_err().is_cancelled());
    wait_for("the abandoned entries to go", WAIT, POLL, || async {
        queue(&raw, &name).await.len() == 1
    })
    .await;
    assert!(!waiting.is_finished(), "got the lock while it was held");

    assert!(held.release().await.unwrap());
    assert!(waiting.await.unwrap(), "the waiter behind those who left");
    assert!(
        queue(&raw, &name).await.is_empty(),
        "the grant took its entry"
    );
    assert!(pl.release().await.unwrap());
    for c in [&holder, &quitter, &patient, &dropped, &timed] {
        c.stop().await.unwrap();
    }
}

/// A Python etcd3gw client: creates the lock key if absent (its own path, no queue),
/// releases by deleting it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_waiters_get_a_lock_python_held() {
    let Some(base) = support::url("queued_waiters_get_a_lock_python_held") else {
        return;
    };
    let raw = raw(&base).await;
    let name = unique("py");
    let key = lock_key(&name);
    assert!(python_acquire(&raw, &key).await);
    let a = coordinator(&base, "a").await;
    let b = coordinator(&base, "b").await;
    let (la, lb) = (
        a.get_lock(name.as_str()).unwrap(),
        b.get_lock(name.as_str()).unwrap(),
    );
    let la2 = la.clone();
    let first = tokio::spawn(async move { la2.acquire(Wait::Forever).await.unwrap() });
    wait_for("a's entry", WAIT, POLL, || async {
        queue(&raw, &name).await.len() == 1
    })
    .await;
    let lb2 = lb.clone();
    let second = tokio::spawn(async move { lb2.acquire_shared(Wait::Forever).await.unwrap() });
    wait_for("b's entry", WAIT, POLL, || async {
        queue(&raw, &name).await.len() == 2
    })
    .await;
    // Python releases: the head gets it, then the one behind.
    raw.clone().delete(key.clone(), None).await.unwrap();
    assert!(first.await.unwrap());
    assert!(
        !second.is_finished(),
        "a shared waiter got an exclusive hold's lock"
    );
    assert!(la.release().await.unwrap());
    assert!(second.await.unwrap());
    assert!(lb.release().await.unwrap());
    assert!(queue(&raw, &name).await.is_empty());
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

/// Shared waiters behind shared waiters proceed together; an exclusive waiter
/// behind them waits for them, and a shared waiter behind it waits for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_behind_readers_proceed_together() {
    let Some(base) = support::url("readers_behind_readers_proceed_together") else {
        return;
    };
    let raw = raw(&base).await;
    let name = unique("rw");
    let holder = coordinator(&base, "holder").await;
    let held = holder.get_lock(name.as_str()).unwrap();
    assert!(held.acquire(Wait::No).await.unwrap());

    let mut coords = Vec::new();
    let mut locks = Vec::new();
    let mut tasks = Vec::new();
    for (i, shared) in [true, true, false, true].into_iter().enumerate() {
        let c = coordinator(&base, "rw").await;
        let l = c.get_lock(name.as_str()).unwrap();
        let l2 = l.clone();
        tasks.push(tokio::spawn(async move {
            if shared {
                l2.acquire_shared(Wait::Forever).await.unwrap()
            } else {
                l2.acquire(Wait::Forever).await.unwrap()
            }
        }));
        wait_for("the entry", WAIT, POLL, || async {
            queue(&raw, &name).await.len() == i + 1
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

    assert!(held.release().await.unwrap());
    assert!(r1.await.unwrap());
    assert!(r2.await.unwrap());
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
    assert!(queue(&raw, &name).await.is_empty());
    for c in coords.iter().chain([&holder]) {
        c.stop().await.unwrap();
    }
}
