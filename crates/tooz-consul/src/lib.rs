#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

mod client;
mod config;
mod driver;
mod keys;
mod lock;
mod watch;

pub use config::{
    ConsulConfig, DEFAULT_LOCK_DELAY, DEFAULT_NAMESPACE, DEFAULT_PORT, DEFAULT_TIMEOUT,
    DEFAULT_TTL, KNOWN_OPTIONS,
};
pub use driver::ConsulDriver;

/// The Consul driver's registry entry: name `"consul"`, scheme `consul`.
///
/// ```
/// let registry = tooz_core::Registry::new().with(tooz_consul::DRIVER);
/// assert!(registry.schemes().contains(&"consul"));
/// ```
pub const DRIVER: tooz_core::DriverDescriptor = tooz_core::DriverDescriptor {
    name: "consul",
    schemes: &["consul"],
    connect: ConsulDriver::connect,
    features: tooz_core::Features::full(
        tooz_core::features::LeaseKind::Lease,
        tooz_core::features::FencingSource::BackendRevision,
    ),
};
