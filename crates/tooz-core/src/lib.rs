#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

pub mod capabilities;
pub mod characteristic;
pub mod coordinator;
pub mod driver;
pub mod error;
pub mod events;
pub mod features;
pub mod fencing;
pub mod hashring;
pub mod ids;
pub mod lease;
pub mod lock;
pub mod memory;
pub mod observe;
pub mod options;
pub mod partitioner;
pub mod registry;
pub mod util;

pub use capabilities::{Capabilities, MemberInfo};
pub use characteristic::Characteristic;
pub use coordinator::{Coordinator, CoordinatorConfig};
pub use driver::{
    Attempt, Driver, DriverEvent, DriverEventStream, DriverInfo, DriverLock, Held, HeldLock, IdRef,
    Liveness, Renewal, WakeStream,
};
pub use error::{BoxError, Result, ToozError};
pub use events::{EventStream, GroupEvent, WatchId};
pub use features::Features;
pub use hashring::HashRing;
pub use ids::{GroupId, LockName, MemberId};
pub use lease::{LeasePolicy, LeaseState};
pub use lock::{FencingToken, Leadership, Lock, LockGuard, LostSignal, Mode, Wait};
pub use options::Options;
pub use partitioner::{Partitioner, ToozHash};
pub use registry::{ConnectOptions, ConnectRequest, DriverDescriptor, Registry};

/// Re-exported so driver crates use the same version.
pub use async_trait::async_trait;
pub use url::Url;
