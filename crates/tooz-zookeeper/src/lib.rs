#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

mod config;
mod contend;
mod driver;
mod error;
mod layout;
mod lock;
mod session;
mod watch;

pub use config::{
    DEFAULT_NAMESPACE, DEFAULT_PORT, DEFAULT_TIMEOUT, KNOWN_OPTIONS, ZookeeperConfig,
};
pub use driver::ZookeeperDriver;

/// The URL schemes this driver serves: `zookeeper` and Python's alias `kazoo`.
pub const SCHEMES: &[&str] = &["zookeeper", "kazoo"];

/// The zookeeper driver's registry entry: name `"zookeeper"`, schemes [`SCHEMES`].
///
/// ```
/// let registry = tooz_core::Registry::new().with(tooz_zookeeper::DRIVER);
/// assert!(registry.schemes().contains(&"kazoo"));
/// ```
pub const DRIVER: tooz_core::DriverDescriptor = tooz_core::DriverDescriptor {
    name: "zookeeper",
    schemes: SCHEMES,
    connect: ZookeeperDriver::connect,
    features: tooz_core::Features::full(
        tooz_core::features::LeaseKind::Session,
        tooz_core::features::FencingSource::BackendRevision,
    ),
};
