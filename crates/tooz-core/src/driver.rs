//! The traits backend crates implement.
//!
//! A driver holds only the backend primitives, on bytes: groups, members and
//! capabilities, heartbeats, leadership, locks and an optional push source of
//! membership changes. Everything that is the same for every backend (start/stop
//! state, the heartbeat task, watcher diffing, event streams, lock bookkeeping,
//! loss signals, capability encoding, partitioners) lives in
//! [`Coordinator`](crate::Coordinator).
//!
//! The core also owns what drivers used to repeat: the lock wait loop and its
//! cancel safety (a driver implements one [`DriverLock::try_acquire`] attempt and,
//! where it can, [`DriverLock::wakeups`]), the held set (handed to
//! [`Driver::heartbeat`] so one request renews everything), the lease's loss
//! deadline ([`crate::lease::LeaseState`]) and id rules ([`Driver::check_id`], applied
//! once per call). Methods with a default (`lease`, `check_id`, `watch_group`,
//! `get_member_capabilities`, the lock's `wakeups`) are optional; a driver that
//! cannot do something required says so with
//! [`ToozError::NotImplemented`], which the
//! conformance suite counts as a gap.

use std::collections::BTreeSet;
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::capabilities::{Capabilities, MemberInfo};
use crate::characteristic::Characteristic;
use crate::error::{Result, ToozError};
use crate::ids::{GroupId, LockName, MemberId};
use crate::lease::LeaseState;
use crate::lock::{FencingToken, Mode, Wait};
use async_trait::async_trait;
use futures_util::Stream;

/// A boxed, `'static` stream of driver events.
pub type DriverEventStream = Pin<Box<dyn Stream<Item = DriverEvent> + Send + 'static>>;

/// A change reported by a driver's push mechanism for one group.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DriverEvent {
    /// This member joined.
    Joined(MemberId),
    /// This member left (or expired).
    Left(MemberId),
    /// Something changed; the core re-reads the member list and the leader.
    Changed,
}

/// The health of a coordinator's lease (session, TTL key, lock file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Liveness {
    /// Renewed on time; everything held is held.
    Alive,
    /// The backend cannot be reached; held locks and memberships may be lost soon.
    AtRisk,
    /// The lease expired: locks, memberships and leaderships that hung on it are gone.
    Lost,
}

/// What a driver says about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct DriverInfo {
    /// Driver name (`"file"`, `"redis"`, ...).
    pub name: &'static str,
    /// Guarantees, with tooz's names.
    pub characteristics: &'static [Characteristic],
    /// Whether `heartbeat` must be called regularly to stay alive.
    pub requires_beating: bool,
    /// Whether locks and leaderships hang on the lease the heartbeat renews, so
    /// that a lost lease (`Liveness::Lost`) means they are lost too. `false` for
    /// backends whose holds live as long as the process or its connection (the file
    /// driver's open-file-description locks). Default `true`.
    pub lease_bound_holds: bool,
}

impl DriverInfo {
    /// Describes a driver.
    pub const fn new(
        name: &'static str,
        characteristics: &'static [Characteristic],
        requires_beating: bool,
    ) -> Self {
        DriverInfo {
            name,
            characteristics,
            requires_beating,
            lease_bound_holds: true,
        }
    }

    /// Marks locks and leaderships as independent of the heartbeat lease (see
    /// [`DriverInfo::lease_bound_holds`]).
    pub const fn with_holds_independent_of_lease(mut self) -> Self {
        self.lease_bound_holds = false;
        self
    }
}

/// What a heartbeat renews: everything the coordinator holds.
#[derive(Debug)]
#[non_exhaustive]
pub struct Held<'a> {
    /// The groups this member joined.
    pub joined: &'a [GroupId],
    /// The locks held, with their mode and grant.
    pub locks: &'a [HeldLock],
    /// The leaderships held, with their grant.
    pub leading: &'a [(GroupId, FencingToken)],
}

impl<'a> Held<'a> {
    /// Describes what is held.
    pub fn new(
        joined: &'a [GroupId],
        locks: &'a [HeldLock],
        leading: &'a [(GroupId, FencingToken)],
    ) -> Self {
        Held {
            joined,
            locks,
            leading,
        }
    }
}

/// One held lock, as the heartbeat sees it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct HeldLock {
    /// The driver's handle (downcast it to the driver's own type, through
    /// `&dyn Any`, to reach what renewing it needs).
    pub lock: Arc<dyn DriverLock>,
    /// The mode of the hold.
    pub mode: Mode,
    /// The grant's fencing token.
    pub token: FencingToken,
}

impl HeldLock {
    /// Describes a hold.
    pub fn new(lock: Arc<dyn DriverLock>, mode: Mode, token: FencingToken) -> Self {
        HeldLock { lock, mode, token }
    }

    /// The handle as the driver's own type, if it is one.
    pub fn downcast<T: DriverLock>(&self) -> Option<&T> {
        let any: &dyn std::any::Any = self.lock.as_ref();
        any.downcast_ref::<T>()
    }
}

/// What a heartbeat found.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Renewal {
    /// The lease TTL: the time until the next heartbeat is due.
    pub ttl: Duration,
    /// Positions in [`Held::locks`] of the holds found lost.
    pub lost_locks: Vec<usize>,
    /// Leaderships found lost.
    pub lost_leaderships: Vec<GroupId>,
    /// Groups of [`Held::joined`] in which the backend no longer has this member,
    /// although its lease is alive: the backend lost an acknowledged membership (a
    /// failover with asynchronous replication, a restart without persistence, a
    /// record deleted behind the driver's back). The core re-joins them with the
    /// member's last capabilities. A driver reports this only where checking costs
    /// no extra request.
    pub lost_groups: Vec<GroupId>,
}

impl Renewal {
    /// Everything renewed; the lease lasts `ttl`.
    pub fn new(ttl: Duration) -> Self {
        Renewal {
            ttl,
            lost_locks: Vec::new(),
            lost_leaderships: Vec::new(),
            lost_groups: Vec::new(),
        }
    }

    /// Marks the hold at `index` of [`Held::locks`] lost.
    pub fn lose_lock(&mut self, index: usize) -> &mut Self {
        self.lost_locks.push(index);
        self
    }

    /// Marks the leadership of `group` lost.
    pub fn lose_leadership(&mut self, group: GroupId) -> &mut Self {
        self.lost_leaderships.push(group);
        self
    }

    /// Marks the membership in `group` (one of [`Held::joined`]) lost by the
    /// backend: the core re-joins it.
    pub fn lose_group(&mut self, group: GroupId) -> &mut Self {
        self.lost_groups.push(group);
        self
    }
}

/// An id handed to [`Driver::check_id`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum IdRef<'a> {
    /// A group id.
    Group(&'a GroupId),
    /// A member id (this coordinator's, or one asked about).
    Member(&'a MemberId),
    /// A lock name.
    Lock(&'a LockName),
}

/// A coordination backend, bound to one member id.
///
/// Ids handed to a driver have passed the core's validation (non-empty, at most
/// [`MAX_ID_LEN`](crate::ids::MAX_ID_LEN) bytes); drivers add their own rules.
#[async_trait]
pub trait Driver: Send + Sync + fmt::Debug + 'static {
    /// Name, characteristics and heartbeat requirement.
    fn info(&self) -> DriverInfo;

    /// The driver's own rules for ids, beyond the core's (non-empty, at most
    /// [`MAX_ID_LEN`](crate::ids::MAX_ID_LEN) bytes): a reserved name, a character
    /// its layout cannot store. The core applies it once per call, before the
    /// driver sees the id (and to this coordinator's member id when it connects),
    /// so driver methods can take their ids as valid. Default: no further rule.
    ///
    /// # Errors
    /// [`ToozError::InvalidId`] naming the id and the rule.
    fn check_id(&self, id: IdRef<'_>) -> Result<()> {
        let _ = id;
        Ok(())
    }

    /// Connects (and creates what the layout needs).
    async fn start(&self) -> Result<()>;

    /// Releases driver-level resources (connections, liveness files). The core has
    /// already left the joined groups and released the locks it knows about.
    async fn stop(&self) -> Result<()>;

    /// Renews everything this coordinator holds, in as few requests as the backend
    /// allows (one, where it can): its membership in `held.joined`, the locks in
    /// `held.locks` and the leaderships in `held.leading`. Returns the lease TTL
    /// (the time until the next heartbeat is due) and what it found lost (a lock
    /// key expired or taken, a leader key gone), which the core signals, and, where
    /// the same request can tell, the groups whose membership the backend lost
    /// ([`Renewal::lost_groups`]), which the core re-joins.
    ///
    /// # Errors
    /// Backend errors (the core reports the lease at risk and retries).
    async fn heartbeat(&self, held: &Held<'_>) -> Result<Renewal>;

    /// The state of the lease this driver's memberships and holds hang on, for a
    /// driver that feeds it itself (see [`crate::lease`]): a driver with a session of
    /// its own reports each answered request's send time, its connection state and a
    /// replaced session; a driver whose lease the heartbeat renews reports its TTL
    /// when it starts (`renewed(start_sent, ttl)`), and the coordinator reports each
    /// heartbeat. `None` (the default): the coordinator keeps the lease state itself,
    /// from heartbeats alone. Return the same state (a clone) on every call.
    fn lease(&self) -> Option<LeaseState> {
        None
    }

    /// Creates a group. `GroupAlreadyExist` if present.
    async fn create_group(&self, group: &GroupId) -> Result<()>;
    /// Deletes an empty group. `GroupNotCreated`, `GroupNotEmpty`.
    async fn delete_group(&self, group: &GroupId) -> Result<()>;
    /// Lists groups.
    async fn get_groups(&self) -> Result<Vec<GroupId>>;
    /// Joins a group with capabilities. `GroupNotCreated`, `MemberAlreadyExist`.
    async fn join_group(&self, group: &GroupId, capabilities: &Capabilities) -> Result<()>;
    /// Leaves a group. `GroupNotCreated`, `MemberNotJoined`.
    async fn leave_group(&self, group: &GroupId) -> Result<()>;
    /// Live members of a group. `GroupNotCreated`.
    async fn get_members(&self, group: &GroupId) -> Result<BTreeSet<MemberId>>;
    /// One member's capabilities. `GroupNotCreated`, `MemberNotJoined`. Default:
    /// from [`Driver::get_member_info`].
    async fn get_member_capabilities(
        &self,
        group: &GroupId,
        member: &MemberId,
    ) -> Result<Capabilities> {
        Ok(self.get_member_info(group, member).await?.capabilities)
    }
    /// Every live member with its capabilities. `GroupNotCreated`.
    async fn get_members_with_capabilities(
        &self,
        group: &GroupId,
    ) -> Result<Vec<(MemberId, Capabilities)>>;
    /// Capabilities plus creation/update times. `GroupNotCreated`, `MemberNotJoined`.
    async fn get_member_info(&self, group: &GroupId, member: &MemberId) -> Result<MemberInfo>;
    /// Replaces this member's capabilities. `GroupNotCreated`, `MemberNotJoined`.
    async fn update_capabilities(&self, group: &GroupId, capabilities: &Capabilities)
    -> Result<()>;

    /// Tries once, without waiting, to become the group's leader. `Some(token)` when
    /// this member leads (newly or still), `None` when another member does.
    /// Leadership does not require group membership (as in tooz).
    async fn campaign(&self, group: &GroupId) -> Result<Option<FencingToken>>;
    /// Gives up leadership. `true` if this member was leading.
    async fn resign(&self, group: &GroupId) -> Result<bool>;
    /// The current leader, if any.
    async fn get_leader(&self, group: &GroupId) -> Result<Option<MemberId>>;

    /// A new, independent lock handle. Two handles of one name exclude each other,
    /// even from the same coordinator. Validates the name (`InvalidId`).
    fn lock(&self, name: &LockName) -> Result<Arc<dyn DriverLock>>;

    /// A push source of membership changes for `group`, or `None` when the backend
    /// cannot push (the core then polls). `GroupNotCreated` for an unknown group.
    /// Default: `None` once the group is known to exist (`get_members`).
    async fn watch_group(&self, group: &GroupId) -> Result<Option<DriverEventStream>> {
        self.get_members(group).await?;
        Ok(None)
    }

    /// Whether the stream [`watch_group`](Driver::watch_group) returns is only a
    /// hint (some changes, such as expiries, never appear on it), so the core keeps
    /// polling at its `poll_interval` as well and a hint only makes it look sooner.
    /// Default `false`: the stream carries every change.
    fn watch_needs_polling(&self) -> bool {
        false
    }
}

/// The outcome of one lock attempt ([`DriverLock::try_acquire`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Attempt {
    /// Granted, with the grant's fencing token.
    Granted(FencingToken),
    /// Held by someone else (or excluded by the requested mode).
    Held {
        /// How long the current hold can last at most without a renewal (a TTL),
        /// if known: the core tries again no later than that.
        expires_in: Option<Duration>,
        /// Whether the holder announces its release through
        /// [`DriverLock::wakeups`]; `false` for a holder that never does (a Python
        /// process), which the core then polls for with jittered backoff.
        notifies: bool,
    },
}

impl Attempt {
    /// Held by a holder that announces its release, with no expiry known.
    pub const fn held() -> Self {
        Attempt::Held {
            expires_in: None,
            notifies: true,
        }
    }
}

/// Wake-ups for a waiter: each item means the lock may have been released. The
/// stream ending means wake-ups stopped (the core then polls).
pub type WakeStream = Pin<Box<dyn Stream<Item = ()> + Send + 'static>>;

/// One lock handle of a driver.
///
/// A driver implements the lock at the level of one **attempt**:
/// [`try_acquire`](DriverLock::try_acquire) tries once,
/// [`release`](DriverLock::release) and [`heartbeat`](DriverLock::heartbeat) release
/// and renew by owner, and [`wakeups`](DriverLock::wakeups) says, where the backend
/// can, when a waiter should try again. The core owns the rest: the deadline and
/// [`Wait`] modes, jittered backoff when there are no wake-ups, cancel safety (an
/// attempt is never dropped in flight, and a grant that arrives after the caller gave
/// up is released), releases that complete when the caller goes away, and the
/// bookkeeping of what is held. A recipe that is more than an attempt (ZooKeeper's
/// queue of sequential nodes) overrides [`acquire`](DriverLock::acquire) and
/// returns `true` from [`queues`](DriverLock::queues) instead.
///
/// The core serialises calls on one handle (it never runs two acquisitions on the
/// same handle at once) and never acquires a held handle.
#[async_trait]
pub trait DriverLock: std::any::Any + Send + Sync + fmt::Debug + 'static {
    /// The lock name.
    fn name(&self) -> &LockName;

    /// Tries once, without waiting. A driver must resolve an unknown outcome itself
    /// (a request whose reply was lost after the backend may have granted it):
    /// find out and give the hold back, or adopt it, before returning.
    ///
    /// The core awaits this future to completion (it is never dropped in flight).
    ///
    /// # Errors
    /// Backend errors; the default is `NotImplemented` (for a driver that
    /// [`queues`](DriverLock::queues)).
    async fn try_acquire(&self, mode: Mode) -> Result<Attempt> {
        let _ = mode;
        Err(ToozError::NotImplemented {
            driver: "driver".into(),
            operation: "lock attempts".into(),
        })
    }

    /// Subscribes to release notifications of this lock. The core calls it after a
    /// failed attempt and tries again at once, so a release in between is not
    /// missed. `Ok(None)` (the default): the backend cannot push; the core polls.
    ///
    /// # Errors
    /// Backend errors (the core then polls).
    async fn wakeups(&self) -> Result<Option<WakeStream>> {
        Ok(None)
    }

    /// Whether the wake-ups [`wakeups`](DriverLock::wakeups) returns cover every
    /// release since the last failed attempt (an etcd watch from that attempt's
    /// revision), so the core need not try again right after subscribing. Default
    /// `false`.
    fn wakeups_cover_last_attempt(&self) -> bool {
        false
    }

    /// One attempt made synchronously, without blocking, for a driver whose attempt
    /// is a few local system calls (SysV semaphores): the core calls it inline
    /// before it hands an acquisition to a task, so an uncontended acquisition
    /// costs no task hop. `Some(Ok(Some(token)))` granted, `Some(Ok(None))` held by
    /// someone else (the core then waits as usual), `None` (the default): no such
    /// attempt, the core goes the usual way.
    ///
    /// It must never block or wait: it runs on the caller's task.
    fn try_acquire_local(&self, mode: Mode) -> Option<Result<Option<FencingToken>>> {
        let _ = mode;
        None
    }

    /// Releases synchronously, without blocking, for a driver whose release is a
    /// few local system calls: the core calls it instead of handing the release to
    /// a task. `None` (the default): the core calls [`DriverLock::release`].
    fn release_local(&self) -> Option<Result<bool>> {
        None
    }

    /// Whether this lock waits by itself ([`DriverLock::acquire`]) instead of
    /// being driven attempt by attempt. Default `false`.
    fn queues(&self) -> bool {
        false
    }

    /// Acquires in `mode`, waiting as `wait` says, for a driver that
    /// [`queues`](DriverLock::queues). `Ok(Some(token))` when acquired, `Ok(None)`
    /// when the wait ran out; a blocked acquire must wake on a release notification.
    ///
    /// # Cancel safety
    /// Must be cancel-safe: the core drops this future when the coordinator stops
    /// and when the caller of `Lock::acquire` goes away (its future dropped).
    /// Dropping it must never leave the lock held.
    ///
    /// # Errors
    /// Backend errors; the default is `NotImplemented`.
    async fn acquire(&self, mode: Mode, wait: Wait) -> Result<Option<FencingToken>> {
        let _ = (mode, wait);
        Err(ToozError::NotImplemented {
            driver: "driver".into(),
            operation: "queued lock acquisition".into(),
        })
    }

    /// Releases the hold of this handle. `false` if it did not hold the lock (or lost
    /// it); never frees another holder's lock.
    async fn release(&self) -> Result<bool>;

    /// Renews this one hold where the backend needs it (`Lock::heartbeat`; the
    /// coordinator's heartbeat renews every hold at once through
    /// [`Driver::heartbeat`]). `false` if not held (any more).
    async fn heartbeat(&self) -> Result<bool>;

    /// Whether this handle still holds the lock, according to the backend.
    async fn is_still_owner(&self) -> Result<bool>;

    /// Forcibly frees the lock whoever holds it (an operator's tool). `true` if it was held.
    async fn break_lock(&self) -> Result<bool>;
}
