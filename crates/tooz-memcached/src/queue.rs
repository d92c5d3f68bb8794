//! The waiter queue of a lock: a release wakes one waiter, not every blocked
//! acquirer.
//!
//! A blocked acquire (after its first failed attempt; `Wait::No` never queues)
//! draws a ticket from the lock's counter `__TOOZ_Q_<name>` (`ma`, created at the
//! server's time in µs, so tickets keep increasing after an eviction) and keeps an
//! entry `__TOOZ_Q<ticket as 16 hex digits><name>` with a TTL of a few seconds,
//! refreshed (`mg … T`, which the mutation log does not report) while it waits: a
//! crashed waiter's entry is gone within [`ENTRY_TTL`]. A waiter waits behind the
//! nearest live entry below its ticket (one pipelined read of [`WINDOW`] tickets);
//! with none, it is the **head**, the only waiter that looks at the lock. Leaving
//! the queue (granted, given up, dropped) stores the entry once more and deletes it
//! in the same round trip: the store is the mutation-log line that wakes the one
//! waiter behind it, which reads again (its own refresh, the window and the lock
//! key: one round trip) and so moves up.
//!
//! The head wakes on a Rust holder's release marker and polls the lock with
//! jittered backoff (10 ms doubling to 250 ms: Python holders, expiries and
//! evictions write nothing to the log); the others poll only the entry ahead, every
//! [`REFRESH`] with the log, with backoff without it. Each wake-up only tells the
//! core to make an attempt (the lock itself is the same `add` as ever), so Python
//! clients, which never queue, still get the lock, a stale or junk entry can only
//! delay a waiter (entries are live only with our value and a TTL), and any
//! failure here falls back to the core's polling.

use std::hash::{BuildHasher, Hasher};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::{FutureExt, Stream, StreamExt};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tooz_core::util::Backoff;
use tooz_core::{Mode, Result, ToozError};

use crate::config::NAME;
use crate::conn::{Cmd, Item, Status};
use crate::driver::Inner;
use crate::keys::{self, LockValue};
use crate::notify;

/// Lifetime of a waiter's queue entry (refreshed while it waits).
pub(crate) const ENTRY_TTL: Duration = Duration::from_secs(20);
/// How often a waiter refreshes its entry, and how often a waiter two or more
/// places behind the head looks at the entry ahead when the mutation log is
/// read (the one right behind the head looks as often as the head polls).
pub(crate) const REFRESH: Duration = Duration::from_secs(6);
/// How many tickets below its own a waiter reads to find the one ahead.
pub(crate) const WINDOW: u64 = 48;
/// Lifetime of the ticket counter (re-created above every ticket it gave).
const COUNTER_TTL_SECS: u64 = 86_400;
/// The head's polling of the lock.
const HEAD_POLL: (Duration, Duration) = (Duration::from_millis(10), Duration::from_millis(250));
/// The polling of the entry ahead without the mutation log.
const BEHIND_POLL: (Duration, Duration) = (Duration::from_millis(10), Duration::from_millis(500));
/// The slowest polling of the entry ahead without the mutation log grows with
/// the square of the number of waiters ahead (times this).
const BEHIND_STEP: Duration = Duration::from_millis(25);
/// How long after the mutation log failed a waiter tries to read it again.
const RESUBSCRIBE: Duration = Duration::from_secs(5);

/// A random factor in [0.5, 1.0), so that pollers drift apart.
fn jitter(d: Duration) -> Duration {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    let r = (h.finish() >> 11) as f64 / (1u64 << 53) as f64;
    d.mul_f64(0.5 + r / 2.0)
}

/// The commands that take entry `key` out of the queue: a store (the log line
/// that wakes the waiter behind) and the delete.
fn leave_cmds(key: &[u8]) -> [Cmd; 2] {
    [
        Cmd::set(key, b"", vec!["T1".into(), "F0".into()]),
        Cmd::delete(key, Vec::new()),
    ]
}

/// The command that (re)writes entry `key`.
fn register_cmd(key: &[u8]) -> Cmd {
    Cmd::set(
        key,
        keys::WAITER,
        vec![format!("T{}", ENTRY_TTL.as_secs()), "F0".into()],
    )
}

/// The command that refreshes entry `key` (`HD`, or `EN` when it is gone).
fn refresh_cmd(key: &[u8]) -> Cmd {
    Cmd::get(key, &[&format!("T{}", ENTRY_TTL.as_secs())])
}

/// Whether a read entry (`mg … v t`) is a live waiter's: our value, and a TTL
/// no longer than an entry's (anything else is junk or a leaver's last store).
fn live(item: Item) -> bool {
    item.hit().is_some_and(|i| {
        i.data.as_deref() == Some(keys::WAITER)
            && i.ttl_remaining
                .is_some_and(|t| (0..=ENTRY_TTL.as_secs() as i64 + 1).contains(&t))
    })
}

/// One waiter's place in a queue. Leaving (once) stops its task and removes the
/// entry in the background.
#[derive(Debug)]
pub(crate) struct Entry {
    inner: Arc<Inner>,
    key: Vec<u8>,
    task: AbortHandle,
    left: AtomicBool,
    /// The head's last wake-up was a release marker (or the lock read free).
    hint: Arc<AtomicBool>,
}

impl Entry {
    /// Whether the waiter left already.
    pub(crate) fn has_left(&self) -> bool {
        self.left.load(Ordering::SeqCst)
    }

    /// For an attempt that likely succeeds (the head woken by a release): the
    /// commands that leave the queue, to send with it, so that the waiter behind
    /// moves up while the grant is on its way. After such an attempt, call
    /// [`Entry::left_with`] or [`Entry::rejoin`].
    pub(crate) fn leave_with_attempt(&self) -> Option<[Cmd; 2]> {
        (!self.has_left() && self.hint.swap(false, Ordering::SeqCst)).then(|| leave_cmds(&self.key))
    }

    /// The attempt that carried [`Entry::leave_with_attempt`]'s commands was granted.
    pub(crate) fn left_with(&self) {
        if !self.left.swap(true, Ordering::SeqCst) {
            self.task.abort();
        }
    }

    /// The attempt that carried [`Entry::leave_with_attempt`]'s commands failed: its
    /// entry is written again (the waiter behind, woken, reads it and waits again).
    pub(crate) async fn rejoin(&self) {
        if self.has_left() {
            return;
        }
        if let Err(e) = self
            .inner
            .pool
            .pipeline("joining the lock queue", &[register_cmd(&self.key)])
            .await
        {
            // Its task writes it again when it finds it gone.
            tracing::debug!(error = %e, "memcached: writing the lock queue entry again failed");
        }
    }

    /// Leaves the queue (granted, or the wait ended): the waiter behind is woken.
    pub(crate) fn leave(&self) {
        if self.left.swap(true, Ordering::SeqCst) {
            return;
        }
        self.task.abort();
        let key = self.key.clone();
        self.inner
            .spawn_cleanup("leaving the lock queue", move |i| {
                let key = key.clone();
                async move {
                    i.pool
                        .pipeline("leaving the lock queue", &leave_cmds(&key))
                        .await
                        .map(|_| true)
                }
            });
    }
}

/// The wake-ups of a queued waiter: each item asks the core for an attempt.
/// Dropped (the acquisition ended), the waiter leaves the queue.
#[derive(Debug)]
pub(crate) struct QueueWakes {
    rx: mpsc::Receiver<()>,
    entry: Arc<Entry>,
}

impl Stream for QueueWakes {
    type Item = ();

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<()>> {
        self.get_mut().rx.poll_recv(cx)
    }
}

impl Drop for QueueWakes {
    fn drop(&mut self) {
        self.entry.leave();
    }
}

/// Queues a blocked acquire of lock `name` (key `lock_key`) in `mode`: draws a
/// ticket (one round trip) and starts the waiter's task.
///
/// # Errors
/// Backend errors, a counter that does not hold a number.
pub(crate) async fn enqueue(
    inner: &Arc<Inner>,
    name: &[u8],
    lock_key: &[u8],
    mode: Mode,
) -> Result<(Arc<Entry>, QueueWakes)> {
    let counter = keys::queue_counter(name);
    let mut ticket = None;
    // Two waiters creating the counter at once: one of them gets no value.
    for _ in 0..2 {
        let flags = vec![
            format!("N{COUNTER_TTL_SECS}"),
            format!("J{}", inner.server_micros()),
            "v".to_string(),
        ];
        let reply = inner
            .pool
            .pipeline("lock queue ticket", &[Cmd::arith(&counter, flags)])
            .await?;
        if let Some(t) = reply
            .first()
            .and_then(|r| r.counter("lock queue ticket").ok())
        {
            ticket = Some(t);
            break;
        }
    }
    let ticket = ticket.ok_or_else(|| {
        ToozError::backend_msg(NAME, "lock queue ticket: no counter value in the reply")
    })?;
    let me = keys::queue_entry(name, ticket);
    let (tx, rx) = mpsc::channel(1);
    let hint = Arc::new(AtomicBool::new(false));
    let waiter = Waiter {
        hint: Arc::clone(&hint),
        inner: Arc::clone(inner),
        name: name.to_vec(),
        lock_key: lock_key.to_vec(),
        mode,
        ticket,
        me: me.clone(),
        tx,
    };
    let task = tokio::spawn(waiter.run());
    let entry = Arc::new(Entry {
        inner: Arc::clone(inner),
        key: me,
        task: task.abort_handle(),
        left: AtomicBool::new(false),
        hint,
    });
    Ok((Arc::clone(&entry), QueueWakes { rx, entry }))
}

/// Where a waiter stands after a read of its window.
enum Place {
    /// Behind the entry at this index of the watched keys, with this many live
    /// entries ahead in the window.
    Behind(usize, u32),
    /// At the head; whether the lock looked free (worth an attempt at once).
    Head { free: bool },
}

type Keyed = Pin<Box<dyn Stream<Item = usize> + Send>>;

/// A queued waiter's task.
struct Waiter {
    inner: Arc<Inner>,
    name: Vec<u8>,
    lock_key: Vec<u8>,
    mode: Mode,
    ticket: u64,
    me: Vec<u8>,
    tx: mpsc::Sender<()>,
    hint: Arc<AtomicBool>,
}

impl Waiter {
    /// The keys it may wake on: the entries of the [`WINDOW`] tickets below its
    /// own (index `d - 1` is ticket − `d`), then the lock's release marker.
    fn watched(&self) -> Vec<Vec<u8>> {
        let mut keys: Vec<Vec<u8>> = (1..=WINDOW)
            .map_while(|d| self.ticket.checked_sub(d))
            .map(|t| keys::queue_entry(&self.name, t))
            .collect();
        keys.push(notify::marker(&self.lock_key));
        keys
    }

    /// Asks the core for an attempt that likely succeeds; `false` when the
    /// acquisition is over.
    fn fire_hinted(&self) -> bool {
        self.hint.store(true, Ordering::SeqCst);
        self.fire()
    }

    /// Asks the core for an attempt; `false` when the acquisition is over.
    fn fire(&self) -> bool {
        !matches!(
            self.tx.try_send(()),
            Err(mpsc::error::TrySendError::Closed(()))
        )
    }

    async fn subscribe(&self, keys: &[Vec<u8>]) -> Option<Keyed> {
        let s = self.inner.notifier.subscribe_keyed(keys).await?;
        Some(Box::pin(s))
    }

    /// One round trip: writes (`register`) or refreshes its entry, reads the
    /// window and the lock key.
    async fn scan(&self, watched: &[Vec<u8>], register: bool) -> Result<(Place, bool)> {
        let lock_at = watched.len() - 1;
        let mut cmds = Vec::with_capacity(watched.len() + 1);
        cmds.push(if register {
            register_cmd(&self.me)
        } else {
            refresh_cmd(&self.me)
        });
        for k in &watched[..lock_at] {
            cmds.push(Cmd::get(k, &["v", "t"]));
        }
        cmds.push(Cmd::get(&self.lock_key, &["v", "f"]));
        let mut replies = self
            .inner
            .pool
            .pipeline("reading the lock queue", &cmds)
            .await?
            .into_iter();
        let own = replies.next();
        let still_in = if register {
            own.is_some_and(|r| r.status == Status::Done)
        } else {
            own.is_some_and(|r| r.status != Status::Miss)
        };
        let mut ahead = None;
        let mut waiting = 0u32;
        for (i, r) in replies.by_ref().take(lock_at).enumerate() {
            if live(r) {
                waiting += 1;
                if ahead.is_none() {
                    ahead = Some(i);
                }
            }
        }
        let place = match ahead {
            Some(i) => Place::Behind(i, waiting),
            None => {
                let free = match replies.next().and_then(Item::hit) {
                    None => true,
                    Some(v) => {
                        self.mode == Mode::Shared
                            && matches!(
                                LockValue::read(
                                    &self.lock_key,
                                    v.flags,
                                    v.data.as_deref().unwrap_or(&[])
                                ),
                                Ok(LockValue::Readers(_))
                            )
                    }
                };
                Place::Head { free }
            }
        };
        Ok((place, still_in))
    }

    /// Refreshes its entry (and reads the one ahead): whether each is still there.
    async fn look(&self, ahead: Option<&[u8]>) -> Result<(bool, bool)> {
        let mut cmds = vec![refresh_cmd(&self.me)];
        if let Some(k) = ahead {
            cmds.push(Cmd::get(k, &["v", "t"]));
        }
        let mut replies = self
            .inner
            .pool
            .pipeline("refreshing the lock queue entry", &cmds)
            .await?
            .into_iter();
        let mine = replies.next().is_some_and(|r| r.status != Status::Miss);
        let theirs = replies.next().is_some_and(live);
        Ok((mine, theirs))
    }

    async fn run(self) {
        let watched = self.watched();
        let lock_at = watched.len() - 1;
        let mut wakes = self.subscribe(&watched).await;
        let mut subscribed_at = Instant::now();
        let mut errors = Backoff::new(Duration::from_millis(20), Duration::from_secs(1));
        let mut register = true;
        let mut head_poll = Backoff::new(HEAD_POLL.0, HEAD_POLL.1);
        loop {
            if wakes.is_none() && subscribed_at.elapsed() >= RESUBSCRIBE {
                wakes = self.subscribe(&watched).await;
                subscribed_at = Instant::now();
            }
            // What happened before this read is in it.
            drain(&mut wakes);
            let registering = register;
            let (place, still_in) = match self.scan(&watched, register).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(error = %e, "memcached: reading the lock queue failed");
                    tokio::time::sleep(errors.next_delay()).await;
                    continue;
                }
            };
            register = !still_in;
            if register && registering {
                tokio::time::sleep(errors.next_delay()).await;
            } else {
                errors.reset();
            }
            match place {
                Place::Behind(ahead, waiting) if !register => {
                    register = self
                        .behind(&watched, (ahead, waiting), &mut wakes, &mut subscribed_at)
                        .await;
                }
                Place::Behind(..) => {}
                Place::Head { free } => {
                    if free && !self.fire_hinted() {
                        return;
                    }
                    match self
                        .head(
                            lock_at,
                            &mut wakes,
                            &mut subscribed_at,
                            &mut head_poll,
                            register,
                        )
                        .await
                    {
                        Some(r) => register = r,
                        None => return,
                    }
                }
            }
        }
    }

    /// Waits behind the entry at `ahead` until it leaves (or the log says
    /// something about it, or the log ended); whether its own entry must be
    /// written again.
    async fn behind(
        &self,
        watched: &[Vec<u8>],
        (ahead, waiting): (usize, u32),
        wakes: &mut Option<Keyed>,
        subscribed_at: &mut Instant,
    ) -> bool {
        let mut poll = Backoff::new(BEHIND_POLL.0, BEHIND_POLL.1);
        let pause = |wakes: &Option<Keyed>, poll: &mut Backoff| {
            Instant::now()
                + if wakes.is_some() && waiting > 1 {
                    REFRESH
                } else if wakes.is_some() {
                    // Right behind the head: the head's leave line may be one
                    // the log dropped, and the lock may then be free; look as
                    // often as the head looks at the lock.
                    jitter(poll.next_delay().min(HEAD_POLL.1))
                } else {
                    // Without the log (memcached serves 20 log readers), the
                    // farther from the head, the slower: n waiters ahead, at
                    // least n² × 25 ms.
                    jitter(
                        poll.next_delay()
                            .max(BEHIND_STEP * waiting.saturating_mul(waiting)),
                    )
                    .min(REFRESH)
                }
        };
        let mut poll_at = pause(wakes, &mut poll);
        loop {
            let woke = tokio::select! {
                w = next(wakes) => match w {
                    Some(i) if i == ahead => true,
                    // Another key of the window: not the one it waits behind.
                    Some(_) => continue,
                    None => {
                        *wakes = None;
                        *subscribed_at = Instant::now();
                        true
                    }
                },
                () = tokio::time::sleep_until(poll_at) => false,
            };
            if woke {
                return false;
            }
            // A poll: the entry ahead, and its own entry's refresh.
            match self.look(Some(&watched[ahead])).await {
                Ok((mine, theirs)) => {
                    if !theirs || !mine {
                        return !mine;
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "memcached: reading the lock queue failed");
                }
            }
            poll_at = pause(wakes, &mut poll);
        }
    }

    /// The head: the only waiter that looks at the lock. Asks for an attempt on
    /// each release marker (or store) of the lock key and each poll; returns when
    /// an entry of the window was written (a waiter that took its ticket earlier
    /// registered late: read again), with whether its own entry must be written
    /// again; `None` when the acquisition is over.
    async fn head(
        &self,
        lock_at: usize,
        wakes: &mut Option<Keyed>,
        subscribed_at: &mut Instant,
        poll: &mut Backoff,
        mut register: bool,
    ) -> Option<bool> {
        let mut poll_at = Instant::now() + jitter(poll.next_delay());
        let mut refresh_at = Instant::now() + REFRESH;
        loop {
            if register || Instant::now() >= refresh_at {
                let done = if register {
                    self.inner
                        .pool
                        .pipeline("joining the lock queue", &[register_cmd(&self.me)])
                        .await
                        .map(|r| r.first().is_some_and(|r| r.status == Status::Done))
                } else {
                    self.look(None).await.map(|(mine, _)| mine)
                };
                refresh_at = Instant::now() + REFRESH;
                match done {
                    Ok(mine) => register = !mine,
                    Err(e) => {
                        tracing::debug!(error = %e, "memcached: refreshing the lock queue entry failed");
                    }
                }
            }
            if wakes.is_none() && subscribed_at.elapsed() >= RESUBSCRIBE {
                return Some(register);
            }
            tokio::select! {
                w = next(wakes) => match w {
                    Some(i) if i == lock_at => {
                        // A Rust holder's release marker.
                        poll.reset();
                        poll_at = Instant::now() + jitter(poll.next_delay());
                        if !self.fire_hinted() {
                            return None;
                        }
                    }
                    Some(_) => return Some(register),
                    None => {
                        *wakes = None;
                        *subscribed_at = Instant::now();
                    }
                },
                () = tokio::time::sleep_until(poll_at.min(refresh_at)) => {
                    if Instant::now() >= poll_at {
                        poll_at = Instant::now() + jitter(poll.next_delay());
                        if !self.fire() {
                            return None;
                        }
                    }
                }
            }
        }
    }
}

/// Drops the wake-ups already delivered; forgets a stream that ended.
fn drain(wakes: &mut Option<Keyed>) {
    let mut ended = false;
    if let Some(w) = wakes.as_mut() {
        while let Some(item) = w.next().now_or_never() {
            if item.is_none() {
                ended = true;
                break;
            }
        }
    }
    if ended {
        *wakes = None;
    }
}

async fn next(wakes: &mut Option<Keyed>) -> Option<usize> {
    match wakes.as_mut() {
        Some(w) => w.next().await,
        None => std::future::pending().await,
    }
}
