#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

mod config;
mod driver;
mod fence;
mod grouplist;
mod keys;
mod lock;
mod sem;
mod state;
mod sys;
mod watch;

pub use config::{DEFAULT_TIMEOUT, IpcConfig};
pub use driver::IpcDriver;
pub use state::default_root as default_state_dir;

/// The IPC driver's registry entry: name `"ipc"`, scheme `ipc`.
///
/// ```
/// let registry = tooz_core::Registry::new().with(tooz_ipc::DRIVER);
/// assert_eq!(registry.schemes(), ["ipc"]);
/// ```
pub const DRIVER: tooz_core::DriverDescriptor = tooz_core::DriverDescriptor {
    name: "ipc",
    schemes: &["ipc"],
    connect: IpcDriver::connect,
    features: tooz_core::Features::full(
        tooz_core::features::LeaseKind::Process,
        tooz_core::features::FencingSource::Counter,
    ),
};
