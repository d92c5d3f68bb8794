//! Lease state, and the rule that makes a loss signal safe.
//!
//! Locks, memberships and leaderships of most backends hang on a lease: a TTL key
//! renewed by the heartbeat (Redis), an etcd lease, a ZooKeeper session. The server
//! frees what a lease held once it has not been renewed for its TTL. A holder that
//! learns of the loss only afterwards may still be acting on the hold while somebody
//! else already has it.
//!
//! The rule: a renewal *sent* at instant `sent` that succeeded means the server cannot
//! free the lease before `sent + ttl` (it received the renewal after we sent it, and
//! counts the TTL from then). So the coordinator declares the lease
//! [`Liveness::Lost`] at `sent + ttl - margin` on the local monotonic clock, from a
//! timer that never waits on a request in flight. The margin leaves time for whatever
//! the application hangs on the loss signal (the `tooz` command stops its child) and
//! for clock rate differences. What a paused process cannot see (it is frozen past its
//! deadline and resumes), fencing tokens cover.
//!
//! Drivers feed a [`LeaseState`]: a driver whose lease the core's heartbeat renews
//! (Redis) only declares its TTL when it starts; the coordinator's heartbeat task and
//! [`Coordinator::heartbeat`](crate::Coordinator::heartbeat) report each renewal's
//! send time. A driver with a session of its own (ZooKeeper) reports the send time of
//! each request the server answered, its connection state, and a replaced session.
//!
//! ```
//! use std::time::Duration;
//! use tokio::time::Instant;
//! use tooz_core::lease::{LeaseState, Health};
//!
//! let lease = LeaseState::new();
//! let sent = Instant::now();
//! lease.renewed(sent, Duration::from_secs(10));
//! let view = lease.view();
//! assert_eq!(view.health, Health::Alive);
//! assert_eq!(view.expires_no_earlier_than, Some(sent + Duration::from_secs(10)));
//! ```

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::driver::Liveness;

/// The most margin the default takes: the loss is signalled at most this long before
/// the server can free the lease (see [`default_margin`]).
pub const DEFAULT_MAX_MARGIN: Duration = Duration::from_secs(2);

/// The margin used when none is configured: a quarter of the TTL, at most
/// [`DEFAULT_MAX_MARGIN`]. For the default TTL of 30 s that is 2 s; for a 2 s TTL,
/// 500 ms.
///
/// ```
/// use std::time::Duration;
/// assert_eq!(tooz_core::lease::default_margin(Duration::from_secs(30)), Duration::from_secs(2));
/// assert_eq!(tooz_core::lease::default_margin(Duration::from_secs(2)), Duration::from_millis(500));
/// ```
pub fn default_margin(ttl: Duration) -> Duration {
    (ttl / 4).min(DEFAULT_MAX_MARGIN)
}

/// The margin in force for `ttl`: the configured one (at most half the TTL, so that
/// a healthy lease is not declared lost between two renewals), else
/// [`default_margin`].
pub fn effective_margin(configured: Option<Duration>, ttl: Duration) -> Duration {
    match configured {
        Some(m) => m.min(ttl / 2),
        None => default_margin(ttl),
    }
}

/// How the coordinator treats a lease it cannot renew (Curator's two connection
/// state policies).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum LeasePolicy {
    /// Disconnected means [`Liveness::AtRisk`]: holds are kept (and renewed again
    /// once the backend answers) until the loss deadline passes. Curator's standard
    /// policy. URL option `lease_policy=standard`.
    #[default]
    Standard,
    /// Disconnected means [`Liveness::Lost`] at once: every hold is given up as soon
    /// as one renewal fails or the connection drops. Safer for work that must never
    /// overlap, at the price of losing holds on short network blips. Curator's
    /// `SessionConnectionStateErrorPolicy`. URL option `lease_policy=at_risk_is_lost`.
    AtRiskIsLost,
}

impl LeasePolicy {
    /// The option value (`standard`, `at_risk_is_lost`).
    pub fn as_str(self) -> &'static str {
        match self {
            LeasePolicy::Standard => "standard",
            LeasePolicy::AtRiskIsLost => "at_risk_is_lost",
        }
    }
}

impl fmt::Display for LeasePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for LeasePolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().replace('-', "_").as_str() {
            "standard" => Ok(LeasePolicy::Standard),
            "at_risk_is_lost" => Ok(LeasePolicy::AtRiskIsLost),
            other => Err(format!(
                "expected standard or at_risk_is_lost, got {other:?}"
            )),
        }
    }
}

/// What a driver knows of its connection to the lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Health {
    /// The last exchange with the backend succeeded.
    Alive,
    /// The backend is unreachable or the last renewal failed.
    AtRisk,
    /// The backend said the lease is gone (expired session, unknown lease).
    Lost,
}

/// A snapshot of a [`LeaseState`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct LeaseView {
    /// Increases each time the driver replaces its lease (a new session or lease):
    /// whatever hung on the old one is gone, whether or not `Lost` was seen.
    pub generation: u64,
    /// The earliest instant the server may free the lease: the send time of the
    /// last successful renewal plus the TTL. `None` until the lease is known.
    pub expires_no_earlier_than: Option<Instant>,
    /// The lease's TTL (session timeout), as of the last renewal.
    pub ttl: Option<Duration>,
    /// The connection state the driver reports.
    pub health: Health,
    /// How many renewals (and answered requests) were reported.
    pub renewals: u64,
}

/// The state of one lease, fed by a driver and by the coordinator's heartbeat, read
/// by the coordinator. Cheap to clone; clones share the state.
#[derive(Clone)]
pub struct LeaseState {
    tx: std::sync::Arc<watch::Sender<LeaseView>>,
}

impl fmt::Debug for LeaseState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("LeaseState").field(&self.view()).finish()
    }
}

impl Default for LeaseState {
    fn default() -> Self {
        LeaseState::new()
    }
}

impl LeaseState {
    /// A lease not yet established (no deadline, `Alive`).
    pub fn new() -> Self {
        let view = LeaseView {
            generation: 0,
            expires_no_earlier_than: None,
            ttl: None,
            health: Health::Alive,
            renewals: 0,
        };
        LeaseState {
            tx: std::sync::Arc::new(watch::channel(view).0),
        }
    }

    /// The current state.
    pub fn view(&self) -> LeaseView {
        *self.tx.borrow()
    }

    /// A receiver that sees every change.
    pub fn subscribe(&self) -> watch::Receiver<LeaseView> {
        self.tx.subscribe()
    }

    /// A renewal (or any request the server answered on the lease's session) that
    /// was sent at `sent` succeeded: the server cannot free the lease before
    /// `sent + ttl`. Renewals answered out of order never move the bound back.
    pub fn renewed(&self, sent: Instant, ttl: Duration) {
        let until = sent.checked_add(ttl);
        self.tx.send_modify(|v| {
            v.health = Health::Alive;
            v.ttl = Some(ttl);
            v.renewals += 1;
            if let Some(u) = until {
                v.expires_no_earlier_than = Some(v.expires_no_earlier_than.map_or(u, |e| e.max(u)));
            }
        });
    }

    /// A renewal failed or the connection dropped: the lease may be lost soon.
    pub fn at_risk(&self) {
        self.tx.send_if_modified(|v| {
            let changed = v.health == Health::Alive;
            if changed {
                v.health = Health::AtRisk;
            }
            changed
        });
    }

    /// The backend said the lease is gone.
    pub fn lost(&self) {
        self.tx.send_if_modified(|v| {
            let changed = v.health != Health::Lost;
            v.health = Health::Lost;
            changed
        });
    }

    /// The driver replaced the lease (a new session or lease) whose first grant was
    /// sent at `sent`: everything on the old one is gone.
    pub fn replaced(&self, sent: Instant, ttl: Duration) {
        metrics::counter!("tooz_lease_replaced_total").increment(1);
        self.tx.send_modify(|v| {
            v.generation += 1;
            v.health = Health::Alive;
            v.ttl = Some(ttl);
            v.renewals += 1;
            v.expires_no_earlier_than = sent.checked_add(ttl);
        });
    }

    /// The lease generation (see [`LeaseView::generation`]).
    pub fn generation(&self) -> u64 {
        self.tx.borrow().generation
    }
}

/// How the coordinator judges a lease view at `now`: the liveness to report and
/// the instant at which it will become `Lost` if nothing changes.
///
/// ```
/// use std::time::Duration;
/// use tokio::time::Instant;
/// use tooz_core::Liveness;
/// use tooz_core::lease::{judge, LeasePolicy, LeaseState};
///
/// let lease = LeaseState::new();
/// let t0 = Instant::now();
/// lease.renewed(t0, Duration::from_secs(8));
/// // Margin 2 s: lost at t0 + 6 s.
/// let (now, deadline) = judge(&lease.view(), t0, None, LeasePolicy::Standard);
/// assert_eq!((now, deadline), (Liveness::Alive, Some(t0 + Duration::from_secs(6))));
/// let (later, _) = judge(&lease.view(), t0 + Duration::from_secs(6), None, LeasePolicy::Standard);
/// assert_eq!(later, Liveness::Lost);
/// ```
pub fn judge(
    view: &LeaseView,
    now: Instant,
    margin: Option<Duration>,
    policy: LeasePolicy,
) -> (Liveness, Option<Instant>) {
    let deadline = match (view.expires_no_earlier_than, view.ttl) {
        (Some(until), Some(ttl)) => Some(
            until
                .checked_sub(effective_margin(margin, ttl))
                .unwrap_or(until),
        ),
        _ => None,
    };
    let past = deadline.is_some_and(|d| now >= d);
    let liveness = match view.health {
        Health::Lost => Liveness::Lost,
        _ if past => Liveness::Lost,
        Health::AtRisk if policy == LeasePolicy::AtRiskIsLost => Liveness::Lost,
        Health::AtRisk => Liveness::AtRisk,
        Health::Alive => Liveness::Alive,
    };
    (liveness, deadline)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn margins() {
        assert_eq!(default_margin(30 * S), 2 * S);
        assert_eq!(default_margin(4 * S), S);
        assert_eq!(effective_margin(Some(5 * S), 4 * S), 2 * S);
        assert_eq!(effective_margin(Some(S / 10), 4 * S), S / 10);
    }

    #[test]
    fn policy_parses() {
        assert_eq!("standard".parse(), Ok(LeasePolicy::Standard));
        assert_eq!("At-Risk-Is-Lost".parse(), Ok(LeasePolicy::AtRiskIsLost));
        assert!("sometimes".parse::<LeasePolicy>().is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_follows_the_send_time_of_the_last_success() {
        let lease = LeaseState::new();
        let t0 = Instant::now();
        assert_eq!(
            judge(&lease.view(), t0, None, LeasePolicy::Standard),
            (Liveness::Alive, None)
        );
        lease.renewed(t0, 4 * S);
        // An earlier renewal answered late does not move the bound back.
        lease.renewed(t0 - S, 4 * S);
        let (l, d) = judge(&lease.view(), t0, None, LeasePolicy::Standard);
        assert_eq!((l, d), (Liveness::Alive, Some(t0 + 3 * S)));
        lease.at_risk();
        let (l, d) = judge(&lease.view(), t0 + 2 * S, None, LeasePolicy::Standard);
        assert_eq!((l, d), (Liveness::AtRisk, Some(t0 + 3 * S)));
        let (l, _) = judge(&lease.view(), t0 + 2 * S, None, LeasePolicy::AtRiskIsLost);
        assert_eq!(l, Liveness::Lost);
        let (l, _) = judge(&lease.view(), t0 + 3 * S, None, LeasePolicy::Standard);
        assert_eq!(l, Liveness::Lost);
        // A configured margin.
        let (l, d) = judge(&lease.view(), t0, Some(S / 2), LeasePolicy::Standard);
        assert_eq!((l, d), (Liveness::AtRisk, Some(t0 + 4 * S - S / 2)));
    }

    #[tokio::test(start_paused = true)]
    async fn replacement_and_loss() {
        let lease = LeaseState::new();
        let t0 = Instant::now();
        lease.renewed(t0, 4 * S);
        lease.lost();
        assert_eq!(lease.view().health, Health::Lost);
        assert_eq!(
            judge(&lease.view(), t0, None, LeasePolicy::Standard).0,
            Liveness::Lost
        );
        lease.replaced(t0 + S, 4 * S);
        let v = lease.view();
        assert_eq!((v.generation, v.health), (1, Health::Alive));
        assert_eq!(v.expires_no_earlier_than, Some(t0 + 5 * S));
    }
}
