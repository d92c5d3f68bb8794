#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

mod config;
mod conn;
mod driver;
mod keys;
mod lock;
#[cfg(feature = "tls")]
mod tls;
mod watch;

pub use config::{
    DEFAULT_NAMESPACE, DEFAULT_PORT, DEFAULT_TIMEOUT, KNOWN_OPTIONS, RedisConfig, Target,
    TlsSettings,
};
pub use driver::RedisDriver;

/// The URL schemes this build serves: `redis`, plus `rediss` (TLS) when the `tls`
/// feature is enabled.
#[cfg(feature = "tls")]
pub const SCHEMES: &[&str] = &["redis", "rediss"];
/// The URL schemes this build serves: `redis`, plus `rediss` (TLS) when the `tls`
/// feature is enabled.
#[cfg(not(feature = "tls"))]
pub const SCHEMES: &[&str] = &["redis"];

/// The redis driver's registry entry: name `"redis"`, schemes [`SCHEMES`].
///
/// ```
/// let registry = tooz_core::Registry::new().with(tooz_redis::DRIVER);
/// assert!(registry.schemes().contains(&"redis"));
/// ```
pub const DRIVER: tooz_core::DriverDescriptor = tooz_core::DriverDescriptor {
    name: "redis",
    schemes: SCHEMES,
    connect: RedisDriver::connect,
    features: tooz_core::Features::full(
        tooz_core::features::LeaseKind::TtlKeys,
        tooz_core::features::FencingSource::Counter,
    ),
};
