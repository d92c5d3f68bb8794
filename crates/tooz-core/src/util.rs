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
    let until = Instant::now() + pause;
    match deadline {
        Some(d) if d <= Instant::now() => false,
        Some(d) => {
            tokio::time::sleep_until(until.min(d)).await;
            true
        }
        None => {
            tokio::time::sleep_until(until).await;
            true
        }
    }
}

/// The deadline of a wait (`None` for `Wait::Forever`; now for `Wait::No`).
pub fn deadline_of(wait: Wait) -> Option<Instant> {
    match wait {
        Wait::No => Some(Instant::now()),
        Wait::Forever => None,
        Wait::For(d) => Some(Instant::now() + d),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
