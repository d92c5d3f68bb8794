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
