#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

mod config;
mod driver;
mod error;
mod keys;
mod lock;
mod watch;

pub use config::{DEFAULT_HOST, DEFAULT_PORT, DEFAULT_TIMEOUT, EtcdConfig, KNOWN_OPTIONS, SCHEMES};
pub use driver::EtcdDriver;

/// The etcd driver's registry entry: name `"etcd3"`, schemes [`SCHEMES`]
/// (`etcd3+http`, `etcd3+https`, `etcd`).
///
/// ```
/// let registry = tooz_core::Registry::new().with(tooz_etcd::DRIVER);
/// assert!(registry.schemes().contains(&"etcd3+http"));
/// ```
pub const DRIVER: tooz_core::DriverDescriptor = tooz_core::DriverDescriptor {
    name: "etcd3",
    schemes: SCHEMES,
    connect: EtcdDriver::connect,
    features: tooz_core::Features::full(
        tooz_core::features::LeaseKind::Lease,
        tooz_core::features::FencingSource::BackendRevision,
    ),
};
