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

/// The floor `cargo xtask bench --driver ipc` compares against: one raw SysV
/// semaphore P + V pair (`semop`, with `SEM_UNDO`) on a private semaphore, the
/// least any lock on this host can cost. Not part of the driver's API.
#[doc(hidden)]
pub mod floor {
    use std::time::{Duration, Instant};

    /// Times `n` P + V pairs on a private semaphore; one sample per pair.
    ///
    /// # Errors
    /// When the semaphore cannot be made or operated.
    pub fn semaphore_pairs(n: usize) -> std::io::Result<Vec<Duration>> {
        let id = crate::sys::sem_private()?;
        let res = (|| {
            crate::sys::sem_setval(id, 1)?;
            let mut samples = Vec::with_capacity(n);
            for _ in 0..n {
                let start = Instant::now();
                crate::sys::sem_op(id, -1, libc::SEM_UNDO | libc::IPC_NOWAIT, None)?;
                crate::sys::sem_op(id, 1, libc::SEM_UNDO | libc::IPC_NOWAIT, None)?;
                samples.push(start.elapsed());
            }
            Ok(samples)
        })();
        let _ = crate::sys::sem_remove(id);
        res
    }
}
