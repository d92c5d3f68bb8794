//! Helpers shared by the cases.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tooz_core::{Coordinator, EventStream, GroupEvent};

use crate::check::{CaseError, CaseResult, Ctx};

/// How often polling helpers look again.
pub(crate) const POLL: Duration = Duration::from_millis(50);

/// A generous bound for things that should be prompt (a reply, a handoff that
/// needs no push).
pub(crate) const PROMPT: Duration = Duration::from_secs(5);

/// How long a push may take: what the push cases wait for an event before they
/// fail. Their observers poll only every
/// [`PUSH_CASE_POLL_INTERVAL`](crate::PUSH_CASE_POLL_INTERVAL) (an hour), so only
/// a push meets it.
pub(crate) const PUSH_LATENCY: Duration = Duration::from_secs(2);

/// How long the release a dropped guard starts (in the background) may take.
pub(crate) const GUARD_DROP_RELEASE: Duration = Duration::from_secs(2);

/// Polls `check` until it returns `Ok(true)`, or fails after `timeout` saying `what`.
pub(crate) async fn wait_until<F, Fut>(
    timeout: Duration,
    what: &str,
    mut check: F,
) -> Result<Duration, CaseError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool, CaseError>>,
{
    let t0 = Instant::now();
    loop {
        if check().await? {
            return Ok(t0.elapsed());
        }
        if t0.elapsed() >= timeout {
            fail!("{what}: still not true after {timeout:?}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Checks `check` every [`POLL`] for `period`, failing (saying `what`) the first time
/// it is false: how a case shows that something does *not* happen within a stated
/// bound, where a bare sleep would only assume it.
pub(crate) async fn stays_true<F, Fut>(period: Duration, what: &str, mut check: F) -> CaseResult
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool, CaseError>>,
{
    let t0 = Instant::now();
    loop {
        if !check().await? {
            fail!("{what}: stopped being true after {:?}", t0.elapsed());
        }
        let left = period.saturating_sub(t0.elapsed());
        if left.is_zero() {
            return Ok(());
        }
        tokio::time::sleep(left.min(POLL)).await;
    }
}

/// Events collected by a watch callback.
#[derive(Clone, Default)]
pub(crate) struct Seen(Arc<Mutex<Vec<GroupEvent>>>);

impl Seen {
    pub(crate) fn new() -> Self {
        Seen::default()
    }

    /// A callback recording every event it gets.
    pub(crate) fn callback(&self) -> impl Fn(&GroupEvent) + Send + Sync + 'static {
        let s = self.clone();
        move |ev: &GroupEvent| {
            s.0.lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(ev.clone())
        }
    }

    pub(crate) fn events(&self) -> Vec<GroupEvent> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub(crate) fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// Calls `run_watchers` until a callback recorded something (or `timeout`).
/// Returns every event `run_watchers` returned meanwhile.
pub(crate) async fn poll_watchers_until(
    c: &Coordinator,
    seen: &Seen,
    min: usize,
    timeout: Duration,
    what: &str,
) -> Result<Vec<GroupEvent>, CaseError> {
    let t0 = Instant::now();
    let mut returned = Vec::new();
    loop {
        returned.extend(c.run_watchers(None).await.ctx("run_watchers")?);
        if seen.len() >= min {
            return Ok(returned);
        }
        if t0.elapsed() >= timeout {
            fail!(
                "{what}: callbacks saw {:?} after polling run_watchers for {timeout:?} (returned {returned:?})",
                seen.events()
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Reads the stream until an event satisfies `want`; fails after `timeout` listing
/// what it saw instead.
pub(crate) async fn next_matching(
    stream: &mut EventStream,
    timeout: Duration,
    what: &str,
    want: impl Fn(&GroupEvent) -> bool,
) -> Result<(GroupEvent, Duration), CaseError> {
    let t0 = Instant::now();
    let mut other = Vec::new();
    loop {
        let left = timeout.saturating_sub(t0.elapsed());
        match tokio::time::timeout(left, stream.next_event()).await {
            Ok(Some(ev)) if want(&ev) => return Ok((ev, t0.elapsed())),
            Ok(Some(ev)) => other.push(ev.to_string()),
            Ok(None) => fail!("{what}: the event stream ended; it delivered {other:?}"),
            Err(_) => {
                fail!("{what}: not delivered within {timeout:?}; the stream delivered {other:?}")
            }
        }
    }
}

/// Checks that a list of tokens strictly increases.
pub(crate) fn strictly_increasing(tokens: &[u64], what: &str) -> Result<(), CaseError> {
    for w in tokens.windows(2) {
        if w[1] <= w[0] {
            fail!("{what}: fencing tokens do not strictly increase: {tokens:?}");
        }
    }
    Ok(())
}

/// Half-open intervals (start, end, label) must not overlap once sorted by start.
pub(crate) fn no_overlap<T: PartialOrd + Copy + std::fmt::Debug>(
    mut intervals: Vec<(T, T, String)>,
    what: &str,
) -> Result<(), CaseError> {
    intervals.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap_or(std::cmp::Ordering::Equal));
    for w in intervals.windows(2) {
        if w[1].0 < w[0].1 {
            fail!(
                "{what}: holds overlap: {} held {:?}..{:?} and {} started at {:?}",
                w[0].2,
                w[0].0,
                w[0].1,
                w[1].2,
                w[1].0
            );
        }
    }
    Ok(())
}
