#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

mod config;
mod driver;
mod layout;
mod lock;
mod ofd;
// `FileWatch` lost its last user when lock waits moved to `AsyncFd` in lock.rs;
// it goes with watch.rs's own `AsyncFd` conversion.
#[cfg_attr(not(test), expect(dead_code, reason = "FileWatch is unused"))]
mod watch;

pub use config::{DEFAULT_TIMEOUT, FileConfig};
pub use driver::FileDriver;

/// The file driver's registry entry: name `"file"`, scheme `file`.
///
/// ```
/// let registry = tooz_core::Registry::new().with(tooz_file::DRIVER);
/// assert_eq!(registry.schemes(), ["file"]);
/// ```
pub const DRIVER: tooz_core::DriverDescriptor = tooz_core::DriverDescriptor {
    name: "file",
    schemes: &["file"],
    connect: FileDriver::connect,
    features: tooz_core::Features::full(
        tooz_core::features::LeaseKind::Process,
        tooz_core::features::FencingSource::Counter,
    ),
};
