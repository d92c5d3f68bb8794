//! What each driver can do, published with its [`DriverDescriptor`](crate::DriverDescriptor)
//! (in the spirit of OpenDAL's `Capability`): the conformance suite runs the cases
//! that apply to a driver by these, and the README's driver table is generated from
//! them.
//!
//! ```
//! use tooz_core::features::{Features, FencingSource, LeaseKind};
//!
//! let f = tooz_core::memory::DRIVER.features;
//! assert!(f.push_watches && f.shared_locks && !f.shared_across_processes);
//! assert_eq!(f.lease, LeaseKind::Process);
//! assert_eq!(f.fencing, FencingSource::Counter);
//! ```

use std::fmt;

/// Where a driver's fencing tokens come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FencingSource {
    /// The backend numbers every write (etcd create revision, ZooKeeper czxid):
    /// holders of any language are numbered.
    BackendRevision,
    /// A counter the driver advances on every grant (only our holders advance it).
    Counter,
}

impl fmt::Display for FencingSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FencingSource::BackendRevision => "backend revision",
            FencingSource::Counter => "counter",
        })
    }
}

/// What memberships and holds hang on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LeaseKind {
    /// Keys with a TTL that the heartbeat renews (Redis, memcached).
    TtlKeys,
    /// One backend lease per coordinator (etcd, Consul sessions).
    Lease,
    /// The client's session (ZooKeeper).
    Session,
    /// The process, or its connection (file locks, database session locks,
    /// `memory://`): nothing expires while it lives.
    Process,
}

impl fmt::Display for LeaseKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LeaseKind::TtlKeys => "TTL keys",
            LeaseKind::Lease => "lease",
            LeaseKind::Session => "session",
            LeaseKind::Process => "process",
        })
    }
}

/// A driver's published feature set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct Features {
    /// Membership and leader changes are pushed by the backend (no polling).
    pub push_watches: bool,
    /// A blocked lock acquirer is woken by the release (no polling).
    pub push_lock_wakeups: bool,
    /// Shared (reader) locks.
    pub shared_locks: bool,
    /// Leader election (`get_leader`, `stand_down_group_leader`, campaigns).
    pub leader_election: bool,
    /// Where fencing tokens come from.
    pub fencing: FencingSource,
    /// What memberships and holds hang on.
    pub lease: LeaseKind,
    /// `break_lock`.
    pub break_lock: bool,
    /// A Python tooz process on the same backend sees the same state.
    pub python_interop: bool,
    /// Coordinators in several processes share state (false for `memory://`).
    pub shared_across_processes: bool,
    /// The state lives outside the process (a server or a filesystem), so the
    /// backend can be unreachable.
    pub external_state: bool,
}

impl Features {
    /// Everything, for a server-backed driver with a TTL-key lease and a counter
    /// for fencing; adjust with the `with_*`/field updates.
    pub const fn full(lease: LeaseKind, fencing: FencingSource) -> Self {
        Features {
            push_watches: true,
            push_lock_wakeups: true,
            shared_locks: true,
            leader_election: true,
            fencing,
            lease,
            break_lock: true,
            python_interop: true,
            shared_across_processes: true,
            external_state: true,
        }
    }

    /// The same, without Python interoperability.
    pub const fn without_python_interop(mut self) -> Self {
        self.python_interop = false;
        self
    }

    /// The same, confined to one process (no state outside it).
    pub const fn in_process(mut self) -> Self {
        self.shared_across_processes = false;
        self.external_state = false;
        self
    }

    /// The same, with membership and leader changes polled instead of pushed.
    pub const fn polled_watches(mut self) -> Self {
        self.push_watches = false;
        self
    }

    /// The same, with lock waiters polling instead of being woken.
    pub const fn polled_lock_wakeups(mut self) -> Self {
        self.push_lock_wakeups = false;
        self
    }
}
