//! Helpers for driver authors: deadlines and backoff for waits that cannot be
//! woken by a notification.

use std::time::Duration;

use tokio::time::Instant;

use crate::lock::Wait;

/// Exponential backoff between `min` and `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    cur: Duration,
}

impl Backoff {
    /// Starts at `min`, doubles up to `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff { min, max, cur: min }
    }

    /// The next pause.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.cur;
        self.cur = (self.cur * 2).min(self.max);
        d
    }

    /// Back to `min` (after progress).
    pub fn reset(&mut self) {
        self.cur = self.min;
    }
}

/// Sleeps for `pause`, but not past `deadline`. Returns `false` when the deadline
/// has passed (the wait is over).
pub async fn sleep_within(pause: Duration, deadline: Option<Instant>) -> bool {
    let until = Instant::now().checked_add(pause);
    match (deadline, until) {
        (Some(d), _) if d <= Instant::now() => false,
        (Some(d), Some(u)) => {
            tokio::time::sleep_until(u.min(d)).await;
            true
        }
        (Some(d), None) => {
            tokio::time::sleep_until(d).await;
            true
        }
        (None, Some(u)) => {
            tokio::time::sleep_until(u).await;
            true
        }
        (None, None) => std::future::pending().await,
    }
}

/// Runs `op` in a background task until it succeeds, for what must not be left
/// behind when a request's outcome is unknown or a release failed: an owner-checked
/// delete of a hold whose grant reply was lost, a release retried after a broken
/// connection. Failures are retried with backoff (20 ms doubling to 1 s) until
/// `deadline` (when whatever `op` frees expires by itself anyway), and abandoned after
/// five errors in a row that retrying cannot help ([`ToozError::is_retryable`](crate::ToozError::is_retryable)).
/// `op` returns `Ok(())` also when there turns out to be nothing to do. Outside a
/// tokio runtime nothing is spawned.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicU32, Ordering};
///
/// let tries = Arc::new(AtomicU32::new(0));
/// let t = Arc::clone(&tries);
/// tooz_core::util::spawn_cleanup("doc", "example", None, move || {
///     let t = Arc::clone(&t);
///     async move {
///         match t.fetch_add(1, Ordering::SeqCst) {
///             0 => Err(tooz_core::ToozError::connection("doc", "down", std::io::Error::other("x"))),
///             _ => Ok(()),
///         }
///     }
/// });
/// while tries.load(Ordering::SeqCst) < 2 {
///     tokio::task::yield_now().await;
/// }
/// # }
/// ```
pub fn spawn_cleanup<F, Fut>(
    driver: &'static str,
    what: &'static str,
    deadline: Option<Instant>,
    mut op: F,
) where
    F: FnMut() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = crate::Result<()>> + Send + 'static,
{
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    rt.spawn(async move {
        let mut backoff = Backoff::new(Duration::from_millis(20), Duration::from_secs(1));
        let mut hopeless = 0;
        loop {
            let e = match op().await {
                Ok(()) => {
                    tracing::debug!(driver, what, "cleanup done");
                    return;
                }
                Err(e) => e,
            };
            hopeless = if e.is_retryable() { 0 } else { hopeless + 1 };
            if hopeless >= 5 || !sleep_within(backoff.next_delay(), deadline).await {
                tracing::warn!(driver, what, error = %e, "giving up a cleanup; what it would free stays until it expires");
                return;
            }
            tracing::debug!(driver, what, error = %e, "cleanup failed; retrying");
        }
    });
}

/// A write of an acquire (an attempt, a queue entry) that a dropped acquire must
/// not cut off mid-flight. A request whose future is dropped may still reach the
/// server, and on a backend that serves concurrent requests in any order (etcd,
/// Consul) it may land *after* the clean-up that was meant to undo it: the
/// clean-up reads nothing to remove, then the write lands and stays on a live
/// lease, a hold or queue entry nobody owns. [`InFlight::send`] runs the write in
/// a task of its own, so it completes even when the acquire is dropped, and
/// [`InFlight::landed`] gives the clean-up something to await first.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> tooz_core::Result<()> {
/// use tooz_core::util::InFlight;
///
/// let mut writes = InFlight::default();
/// let n = writes.send("doc", async { Ok::<_, tooz_core::ToozError>(7) }).await?;
/// assert_eq!(n, 7);
/// // In a `Drop` of the acquire's state: hand this to the clean-up task.
/// let landed = writes.landed();
/// landed.wait().await; // nothing in flight: returns at once
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Default)]
pub struct InFlight(Option<tokio::sync::watch::Receiver<()>>);

impl InFlight {
    /// Runs `write` in a task of its own and returns its result. Until it has
    /// one, [`InFlight::landed`] of this value waits for it.
    pub async fn send<T, F>(&mut self, driver: &'static str, write: F) -> crate::Result<T>
    where
        T: Send + 'static,
        F: std::future::Future<Output = crate::Result<T>> + Send + 'static,
    {
        let (done, rx) = tokio::sync::watch::channel(());
        self.0 = Some(rx);
        let r = tokio::spawn(async move {
            let r = write.await;
            drop(done);
            r
        })
        .await;
        self.0 = None;
        r.map_err(|e| crate::ToozError::backend_msg(driver, format!("a write's task ended: {e}")))?
    }

    /// What the clean-up of a dropped acquire awaits before it removes anything:
    /// the end of the write in flight, if there is one. Takes it out of `self`.
    pub fn landed(&mut self) -> Landed {
        Landed(self.0.take())
    }
}

/// The end of a write sent by [`InFlight::send`] (see [`InFlight::landed`]).
#[derive(Debug, Clone, Default)]
pub struct Landed(Option<tokio::sync::watch::Receiver<()>>);

impl Landed {
    /// Returns once the write has its reply (or failed); at once if there was none.
    pub async fn wait(self) {
        if let Some(mut rx) = self.0 {
            // Nothing is ever sent: the channel closes when the write is done.
            while rx.changed().await.is_ok() {}
        }
    }
}

/// The deadline of a wait (`None` for `Wait::Forever`, and for a wait too long
/// to be represented as an instant; now for `Wait::No`).
pub fn deadline_of(wait: Wait) -> Option<Instant> {
    match wait {
        Wait::No => Some(Instant::now()),
        Wait::Forever => None,
        Wait::For(d) => Instant::now().checked_add(d),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_waits_do_not_overflow() {
        assert_eq!(deadline_of(Wait::For(Duration::MAX)), None);
        assert_eq!(Wait::For(Duration::MAX).deadline(), None);
        assert!(deadline_of(Wait::For(Duration::from_secs(1))).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_send_completes_and_landed_waits_for_it() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, Ordering};

        let done = Arc::new(AtomicBool::new(false));
        let mut writes = InFlight::default();
        let d = Arc::clone(&done);
        let send = writes.send("test", async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            d.store(true, Ordering::SeqCst);
            Ok(())
        });
        // The acquire is dropped while its write is on its way.
        assert!(
            tokio::time::timeout(Duration::from_millis(10), send)
                .await
                .is_err()
        );
        let landed = writes.landed();
        assert!(!done.load(Ordering::SeqCst));
        let t0 = Instant::now();
        landed.wait().await;
        assert!(
            done.load(Ordering::SeqCst),
            "landed returned before the write ended"
        );
        assert!(t0.elapsed() >= Duration::from_millis(990));
        // Nothing in flight any more.
        writes.landed().wait().await;
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let mut b = Backoff::new(Duration::from_millis(10), Duration::from_millis(35));
        assert_eq!(b.next_delay(), Duration::from_millis(10));
        assert_eq!(b.next_delay(), Duration::from_millis(20));
        assert_eq!(b.next_delay(), Duration::from_millis(35));
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(10));
    }
}
