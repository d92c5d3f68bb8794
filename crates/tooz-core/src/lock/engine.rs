//! The wait loop every attempt-level driver shares: try, and while the lock is held,
//! wait for a wake-up (or, without one, a jittered backoff) and try again, until the
//! deadline. An attempt in flight is never dropped: a stop is only noticed between
//! attempts, so a grant is never lost in the middle of its request.

use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::driver::{Attempt, DriverLock, WakeStream};
use crate::error::{Result, ToozError};
use crate::lock::{FencingToken, Mode, Wait};

/// Shortest pause between polling attempts.
const MIN_POLL: Duration = Duration::from_millis(5);
/// Longest pause between polling attempts.
const MAX_POLL: Duration = Duration::from_millis(250);

/// A random factor in [0.5, 1.0), so that pollers drift apart instead of
/// retrying in step.
fn jitter(d: Duration) -> Duration {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    let r = (h.finish() >> 11) as f64 / (1u64 << 53) as f64;
    d.mul_f64(0.5 + r / 2.0)
}

/// Acquires `lock` in `mode`, waiting as `wait` says; `Ok(None)` when the wait ran
/// out, `Err(Stopped)` when `stop` fires while waiting.
#[cfg(test)]
pub(crate) async fn acquire<L: DriverLock + ?Sized>(
    lock: &L,
    mode: Mode,
    wait: Wait,
    stop: &CancellationToken,
) -> Result<Option<FencingToken>> {
    acquire_loop(lock, mode, wait, stop, &mut false).await
}

/// [`acquire`], counting an acquisition that had to wait in the metrics of
/// `driver` (`tooz_lock_waits_total`, `tooz_lock_wait_seconds`; see
/// [`crate::observe`]).
pub(crate) async fn acquire_in<L: DriverLock + ?Sized>(
    driver: &'static str,
    lock: &L,
    mode: Mode,
    wait: Wait,
    stop: &CancellationToken,
) -> Result<Option<FencingToken>> {
    let started = Instant::now();
    let mut waited = false;
    let out = acquire_loop(lock, mode, wait, stop, &mut waited).await;
    if waited {
        metrics::counter!("tooz_lock_waits_total", "driver" => driver).increment(1);
        metrics::histogram!("tooz_lock_wait_seconds", "driver" => driver)
            .record(started.elapsed().as_secs_f64());
    }
    out
}

async fn acquire_loop<L: DriverLock + ?Sized>(
    lock: &L,
    mode: Mode,
    wait: Wait,
    stop: &CancellationToken,
    waited: &mut bool,
) -> Result<Option<FencingToken>> {
    let deadline = wait.deadline();
    let mut wakes: Option<WakeStream> = None;
    let mut subscribed = false;
    let mut poll = MIN_POLL;
    let mut last_try = false;
    loop {
        let (expires_in, notifies) = match lock.try_acquire(mode).await? {
            Attempt::Granted(token) => return Ok(Some(token)),
            Attempt::Held {
                expires_in,
                notifies,
            } => (expires_in, notifies),
        };
        if wait == Wait::No || last_try {
            return Ok(None);
        }
        if stop.is_cancelled() {
            return Err(ToozError::Stopped);
        }
        *waited = true;
        if !subscribed {
            subscribed = true;
            match lock.wakeups().await {
                Ok(Some(w)) => {
                    // Subscribed: a release from now on wakes us. Try again at once
                    // in case it came before the subscription (unless the wake-ups
                    // start from the failed attempt).
                    wakes = Some(w);
                    if !lock.wakeups_cover_last_attempt() {
                        continue;
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::debug!(lock = %lock.name(), error = %e, "no release notifications; polling");
                }
            }
        }
        let pause = if wakes.is_some() && notifies {
            // The holder announces its release; its hold ends by itself at the latest
            // when it expires.
            expires_in.map(|t| t + Duration::from_millis(1))
        } else {
            let p = jitter(poll);
            poll = (poll * 2).min(MAX_POLL);
            Some(expires_in.map_or(p, |t| p.min(t + Duration::from_millis(1))))
        };
        let now = Instant::now();
        let until = match (pause.and_then(|p| now.checked_add(p)), deadline) {
            (Some(p), Some(d)) => Some(p.min(d)),
            (p, d) => p.or(d),
        };
        let woke = async {
            match wakes.as_mut() {
                Some(w) => w.next().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            w = woke => {
                if w.is_none() {
                    tracing::debug!(lock = %lock.name(), "release notifications ended; polling");
                    wakes = None;
                }
                poll = MIN_POLL;
            }
            () = sleep_until_opt(until) => {}
            _ = stop.cancelled() => return Err(ToozError::Stopped),
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            // One last attempt at the deadline.
            last_try = true;
        }
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU32, Ordering};

    use tokio::sync::mpsc;

    use super::*;
    use crate::ids::LockName;

    /// Held for the first `held_for` attempts; counts attempts; wakes through a
    /// channel when `push` is set.
    #[derive(Debug)]
    struct Scripted {
        name: LockName,
        held_for: u32,
        attempts: AtomicU32,
        expires_in: Option<Duration>,
        notifies: bool,
        push: Mutex<Option<mpsc::UnboundedReceiver<()>>>,
    }

    impl Scripted {
        fn new(held_for: u32) -> Self {
            Scripted {
                name: LockName::from("l"),
                held_for,
                attempts: AtomicU32::new(0),
                expires_in: None,
                notifies: true,
                push: Mutex::new(None),
            }
        }
    }

    #[async_trait::async_trait]
    impl DriverLock for Scripted {
        fn name(&self) -> &LockName {
            &self.name
        }
        async fn try_acquire(&self, _mode: Mode) -> Result<Attempt> {
            let n = self.attempts.fetch_add(1, Ordering::SeqCst);
            Ok(if n >= self.held_for {
                Attempt::Granted(FencingToken(u64::from(n)))
            } else {
                Attempt::Held {
                    expires_in: self.expires_in,
                    notifies: self.notifies,
                }
            })
        }
        async fn wakeups(&self) -> Result<Option<WakeStream>> {
            Ok(self.push.lock().unwrap().take().map(|rx| {
                Box::pin(futures_util::stream::unfold(rx, |mut rx| async move {
                    rx.recv().await.map(|()| ((), rx))
                })) as WakeStream
            }))
        }
        async fn release(&self) -> Result<bool> {
            Ok(true)
        }
        async fn heartbeat(&self) -> Result<bool> {
            Ok(true)
        }
        async fn is_still_owner(&self) -> Result<bool> {
            Ok(true)
        }
        async fn break_lock(&self) -> Result<bool> {
            Ok(false)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn no_wait_tries_once() {
        let l = Scripted::new(5);
        let stop = CancellationToken::new();
        assert_eq!(
            acquire(&l, Mode::Exclusive, Wait::No, &stop).await.unwrap(),
            None
        );
        assert_eq!(l.attempts.load(Ordering::SeqCst), 1);
    }

    /// Without wake-ups: jittered, doubling polls capped at 250 ms, and a last
    /// attempt at the deadline.
    #[tokio::test(start_paused = true)]
    async fn polls_with_backoff_until_the_deadline() {
        let l = Scripted::new(u32::MAX);
        let stop = CancellationToken::new();
        let t0 = Instant::now();
        let r = acquire(
            &l,
            Mode::Exclusive,
            Wait::For(Duration::from_secs(2)),
            &stop,
        )
        .await;
        assert_eq!(r.unwrap(), None);
        assert_eq!(Instant::now() - t0, Duration::from_secs(2));
        let n = l.attempts.load(Ordering::SeqCst);
        // 5+10+...+250 ms doubling (halved at most by jitter), then 250 ms steps.
        assert!((9..=40).contains(&n), "{n} attempts in 2 s");
    }

    /// With wake-ups from a holder that notifies: no polling at all, one attempt
    /// per wake-up.
    #[tokio::test(start_paused = true)]
    async fn waits_for_wakeups_without_polling() {
        let l = Scripted::new(3);
        let (tx, rx) = mpsc::unbounded_channel();
        *l.push.lock().unwrap() = Some(rx);
        let stop = CancellationToken::new();
        let task = {
            let stop = stop.clone();
            let l = std::sync::Arc::new(l);
            let l2 = std::sync::Arc::clone(&l);
            (
                tokio::spawn(
                    async move { acquire(&*l2, Mode::Exclusive, Wait::Forever, &stop).await },
                ),
                l,
            )
        };
        // Held, subscribed, held again: two attempts, then it waits.
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert_eq!(task.1.attempts.load(Ordering::SeqCst), 2);
        tx.send(()).unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(
            task.1.attempts.load(Ordering::SeqCst),
            3,
            "one attempt per wake-up"
        );
        tx.send(()).unwrap();
        let got = task.0.await.unwrap().unwrap();
        assert_eq!(got, Some(FencingToken(3)));
    }

    /// A holder that never notifies is polled for even with wake-ups; a known
    /// expiry caps the wait.
    #[tokio::test(start_paused = true)]
    async fn silent_holders_are_polled_and_expiry_caps_the_wait() {
        let mut l = Scripted::new(2);
        l.notifies = true;
        l.expires_in = Some(Duration::from_secs(7));
        let (_tx, rx) = mpsc::unbounded_channel();
        *l.push.lock().unwrap() = Some(rx);
        let stop = CancellationToken::new();
        let t0 = Instant::now();
        let r = acquire(&l, Mode::Exclusive, Wait::Forever, &stop)
            .await
            .unwrap();
        assert_eq!(r, Some(FencingToken(2)));
        // Attempt, subscribe + attempt, then the expiry (7 s + 1 ms).
        assert_eq!(Instant::now() - t0, Duration::from_millis(7001));

        let mut l = Scripted::new(4);
        l.notifies = false;
        let (_tx, rx) = mpsc::unbounded_channel();
        *l.push.lock().unwrap() = Some(rx);
        let t0 = Instant::now();
        let r = acquire(&l, Mode::Exclusive, Wait::Forever, &stop)
            .await
            .unwrap();
        assert_eq!(r, Some(FencingToken(4)));
        assert!(
            Instant::now() - t0 < Duration::from_millis(100),
            "polled, not waited"
        );
    }

    /// A stop while waiting ends the wait; it never interrupts an attempt.
    #[tokio::test(start_paused = true)]
    async fn stop_ends_the_wait() {
        let l = std::sync::Arc::new(Scripted::new(u32::MAX));
        let stop = CancellationToken::new();
        let task = {
            let (l, stop) = (std::sync::Arc::clone(&l), stop.clone());
            tokio::spawn(async move { acquire(&*l, Mode::Exclusive, Wait::Forever, &stop).await })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        stop.cancel();
        assert!(matches!(task.await.unwrap(), Err(ToozError::Stopped)));
    }
}
