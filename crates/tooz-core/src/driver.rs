//! The traits backend crates implement.
//!
//! A driver holds only the backend primitives, on bytes: groups, members and
//! capabilities, heartbeats, leadership, locks and an optional push source of
//! membership changes. Everything that is the same for every backend (start/stop
//! state, the heartbeat task, watcher diffing, event streams, lock bookkeeping,
//! loss signals, capability encoding, partitioners) lives in
//! [`Coordinator`](crate::Coordinator).
//!
//! Every method is required: a driver that cannot do something must say so with
//! [`ToozError::NotImplemented`](crate::ToozError::NotImplemented), which the
//! conformance suite counts as a gap.

use std::collections::BTreeSet;
use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::capabilities::{Capabilities, MemberInfo};
use crate::characteristic::Characteristic;
use crate::error::Result;
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

/// A coordination backend, bound to one member id.
///
/// Ids handed to a driver have passed the core's validation (non-empty, at most
/// [`MAX_ID_LEN`](crate::ids::MAX_ID_LEN) bytes); drivers add their own rules.
#[async_trait]
pub trait Driver: Send + Sync + fmt::Debug + 'static {
    /// Name, characteristics and heartbeat requirement.
    fn info(&self) -> DriverInfo;

    /// Connects (and creates what the layout needs).
    async fn start(&self) -> Result<()>;

    /// Releases driver-level resources (connections, liveness files). The core has
    /// already left the joined groups and released the locks it knows about.
    async fn stop(&self) -> Result<()>;

    /// Renews liveness for this member in `joined` groups and for held locks the
    /// driver tracks; returns the time until the next heartbeat is due (the lease TTL).
    async fn heartbeat(&self, joined: &[GroupId]) -> Result<Duration>;

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

    /// Leaderships this driver found lost since it was last asked (a heartbeat saw
    /// the leader key gone or taken by another member). The coordinator asks after
    /// each heartbeat and signals their loss. Default: none.
    fn lost_leaderships(&self) -> Vec<GroupId> {
        Vec::new()
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
    /// One member's capabilities. `GroupNotCreated`, `MemberNotJoined`.
    async fn get_member_capabilities(
        &self,
        group: &GroupId,
        member: &MemberId,
    ) -> Result<Capabilities>;
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
    async fn watch_group(&self, group: &GroupId) -> Result<Option<DriverEventStream>>;
}

/// One lock handle of a driver.
///
/// The core serialises calls on one handle (it never runs two `acquire`s on the
/// same handle at once) and never calls `acquire` on a held handle.
#[async_trait]
pub trait DriverLock: Send + Sync + fmt::Debug + 'static {
    /// The lock name.
    fn name(&self) -> &LockName;

    /// Acquires in `mode`, waiting as `wait` says. `Ok(Some(token))` when acquired,
    /// `Ok(None)` when the wait ran out. A blocked acquire must wake on a release
    /// notification where the backend offers one.
    ///
    /// # Cancel safety
    /// Must be cancel-safe: the core drops this future when the coordinator stops.
    /// Dropping it must never leave the lock held.
    async fn acquire(&self, mode: Mode, wait: Wait) -> Result<Option<FencingToken>>;

    /// Releases the hold of this handle. `false` if it did not hold the lock (or lost
    /// it); never frees another holder's lock.
    async fn release(&self) -> Result<bool>;

    /// Renews the hold where the backend needs it. `false` if not held (any more).
    async fn heartbeat(&self) -> Result<bool>;

    /// Whether this handle still holds the lock, according to the backend.
    async fn is_still_owner(&self) -> Result<bool>;

    /// Forcibly frees the lock whoever holds it (an operator's tool). `true` if it was held.
    async fn break_lock(&self) -> Result<bool>;
}

#[async_trait]
impl<T: Driver + ?Sized> Driver for Arc<T> {
    fn info(&self) -> DriverInfo {
        (**self).info()
    }
    async fn start(&self) -> Result<()> {
        (**self).start().await
    }
    async fn stop(&self) -> Result<()> {
        (**self).stop().await
    }
    async fn heartbeat(&self, joined: &[GroupId]) -> Result<Duration> {
        (**self).heartbeat(joined).await
    }
    fn lease(&self) -> Option<LeaseState> {
        (**self).lease()
    }
    fn lost_leaderships(&self) -> Vec<GroupId> {
        (**self).lost_leaderships()
    }
    async fn create_group(&self, group: &GroupId) -> Result<()> {
        (**self).create_group(group).await
    }
    async fn delete_group(&self, group: &GroupId) -> Result<()> {
        (**self).delete_group(group).await
    }
    async fn get_groups(&self) -> Result<Vec<GroupId>> {
        (**self).get_groups().await
    }
    async fn join_group(&self, group: &GroupId, capabilities: &Capabilities) -> Result<()> {
        (**self).join_group(group, capabilities).await
    }
    async fn leave_group(&self, group: &GroupId) -> Result<()> {
        (**self).leave_group(group).await
    }
    async fn get_members(&self, group: &GroupId) -> Result<BTreeSet<MemberId>> {
        (**self).get_members(group).await
    }
    async fn get_member_capabilities(
        &self,
        group: &GroupId,
        member: &MemberId,
    ) -> Result<Capabilities> {
        (**self).get_member_capabilities(group, member).await
    }
    async fn get_members_with_capabilities(
        &self,
        group: &GroupId,
    ) -> Result<Vec<(MemberId, Capabilities)>> {
        (**self).get_members_with_capabilities(group).await
    }
    async fn get_member_info(&self, group: &GroupId, member: &MemberId) -> Result<MemberInfo> {
        (**self).get_member_info(group, member).await
    }
    async fn update_capabilities(
        &self,
        group: &GroupId,
        capabilities: &Capabilities,
    ) -> Result<()> {
        (**self).update_capabilities(group, capabilities).await
    }
    async fn campaign(&self, group: &GroupId) -> Result<Option<FencingToken>> {
        (**self).campaign(group).await
    }
    async fn resign(&self, group: &GroupId) -> Result<bool> {
        (**self).resign(group).await
    }
    async fn get_leader(&self, group: &GroupId) -> Result<Option<MemberId>> {
        (**self).get_leader(group).await
    }
    fn lock(&self, name: &LockName) -> Result<Arc<dyn DriverLock>> {
        (**self).lock(name)
    }
    async fn watch_group(&self, group: &GroupId) -> Result<Option<DriverEventStream>> {
        (**self).watch_group(group).await
    }
}
