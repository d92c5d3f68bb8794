#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

mod config;
mod conn;
mod driver;
mod keys;
mod lock;
mod notify;
mod watch;

pub use config::{DEFAULT_PORT, DEFAULT_TIMEOUT, KNOWN_OPTIONS, MemcachedConfig};
pub use driver::MemcachedDriver;

/// The memcached driver's registry entry: name `"memcached"`, scheme `memcached`.
///
/// ```
/// let registry = tooz_core::Registry::new().with(tooz_memcached::DRIVER);
/// assert!(registry.schemes().contains(&"memcached"));
/// ```
pub const DRIVER: tooz_core::DriverDescriptor = tooz_core::DriverDescriptor {
    name: "memcached",
    schemes: &["memcached"],
    connect: MemcachedDriver::connect,
    features: tooz_core::Features::full(
        tooz_core::features::LeaseKind::TtlKeys,
        tooz_core::features::FencingSource::Counter,
    )
    .polled_watches()
    .polled_lock_wakeups(),
};
