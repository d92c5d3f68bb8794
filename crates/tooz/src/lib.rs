#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

// The application API at the root; what a driver author implements under `backend`.
pub use tooz_core::{
    BoxError, Capabilities, Characteristic, ConnectOptions, Coordinator, CoordinatorConfig,
    DriverDescriptor, EventStream, Features, FencingToken, GroupEvent, GroupId, HashRing,
    Leadership, LeasePolicy, Liveness, Lock, LockGuard, LockName, LostSignal, MemberId, MemberInfo,
    Mode, Partitioner, Registry, Result, ToozError, ToozHash, Url, Wait, WatchId,
};
/// Modules of the application API (their items are also at the crate root).
pub use tooz_core::{
    capabilities, characteristic, coordinator, error, events, features, fencing, hashring, ids,
    lock, memory, partitioner,
};

/// For driver authors: the traits a backend implements and the helpers the core
/// gives it (as OpenDAL's `raw` module). Applications need none of this; a driver
/// crate usually depends on `tooz-core` directly.
pub mod backend {
    pub use tooz_core::{
        Attempt, ConnectRequest, Driver, DriverEvent, DriverEventStream, DriverInfo, DriverLock,
        Held, HeldLock, IdRef, LeaseState, Options, Renewal, WakeStream, async_trait, driver,
        lease, options, util,
    };
}

/// Declares the drivers of this facade: each entry is a cargo feature and the
/// descriptor [`registry()`] registers when it is on.
macro_rules! drivers {
    ($($feature:literal => $krate:ident :: $desc:ident),* $(,)?) => {
        /// The descriptors of the enabled drivers, in registration order.
        const ENABLED: &[DriverDescriptor] = &[
            $(
                #[cfg(feature = $feature)]
                $krate::$desc,
            )*
        ];
    };
}

/// The driver crates enabled by cargo features, re-exported.
///
/// Use them to reach driver-specific items; connecting by URL through
/// [`connect`] needs none of them.
pub mod drivers {
    /// The `consul` driver (cargo feature `consul`).
    #[cfg(feature = "consul")]
    pub use tooz_consul;
    /// The `etcd` driver (cargo feature `etcd`).
    #[cfg(feature = "etcd")]
    pub use tooz_etcd;
    /// The `file` driver (cargo feature `file`).
    #[cfg(feature = "file")]
    pub use tooz_file;
    /// The `ipc` driver (cargo feature `ipc`).
    #[cfg(feature = "ipc")]
    pub use tooz_ipc;
    /// The `memcached` driver (cargo feature `memcached`).
    #[cfg(feature = "memcached")]
    pub use tooz_memcached;
    /// The `redis` driver (cargo feature `redis`).
    #[cfg(feature = "redis")]
    pub use tooz_redis;
    /// The `postgresql` and `mysql` drivers (cargo features `postgresql`, `mysql`).
    #[cfg(any(feature = "postgresql", feature = "mysql"))]
    pub use tooz_sql;
    /// The `zookeeper` driver (cargo feature `zookeeper`).
    #[cfg(feature = "zookeeper")]
    pub use tooz_zookeeper;
}

// One line per driver (plus its feature and optional dependency in Cargo.toml, and
// its re-export in `drivers` above).
drivers! {
    "file" => tooz_file::DRIVER,
    "redis" => tooz_redis::DRIVER,
    "zookeeper" => tooz_zookeeper::DRIVER,
    "memcached" => tooz_memcached::DRIVER,
    "ipc" => tooz_ipc::DRIVER,
    "consul" => tooz_consul::DRIVER,
    "etcd" => tooz_etcd::DRIVER,
    "postgresql" => tooz_sql::POSTGRESQL,
    "mysql" => tooz_sql::MYSQL,
}

/// The descriptors of every driver enabled by this build's cargo features.
///
/// ```
/// let names: Vec<&str> = tooz::enabled_drivers().iter().map(|d| d.name).collect();
/// # #[cfg(feature = "file")]
/// assert!(names.contains(&"file"));
/// ```
pub fn enabled_drivers() -> &'static [DriverDescriptor] {
    ENABLED
}

/// A [`Registry`] with every enabled driver registered.
///
/// Use it to list the accepted URL schemes or to add a third-party driver before
/// connecting; [`connect`] is `registry().connect(..)`.
///
/// ```
/// let registry = tooz::registry();
/// # #[cfg(feature = "file")]
/// assert!(registry.schemes().contains(&"file"));
/// // registry.with(my_driver::DRIVER).connect("my://...", "member-1")
/// ```
pub fn registry() -> Registry {
    // `memory://` lives in tooz-core: always there.
    let mut registry = Registry::new().with(tooz_core::memory::DRIVER);
    for driver in ENABLED {
        registry.register(*driver);
    }
    registry
}

/// Builds an unstarted [`Coordinator`] for `url`, as Python tooz's
/// `get_coordinator(url, member_id)` does; call [`Coordinator::start`] next.
///
/// The URL's scheme picks the driver (`file:///var/lib/app/tooz`); its query
/// string holds the driver's options (`?timeout=10`).
///
/// # Errors
/// [`ToozError::InvalidUrl`] for a malformed URL or a scheme no enabled driver
/// serves (the message lists the registered schemes), [`ToozError::InvalidOption`]
/// for an unknown or malformed option, [`ToozError::InvalidId`] for a bad member id.
///
/// ```
/// # #[cfg(feature = "file")]
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> tooz::Result<()> {
/// let dir = std::env::temp_dir().join(format!("tooz-connect-doc-{}", std::process::id()));
/// let coord = tooz::connect(&format!("file://{}", dir.display()), "worker-1")?;
/// coord.start(true).await?;
/// coord.create_group("jobs").await?;
/// assert!(coord.get_groups().await?.contains(&"jobs".into()));
/// coord.delete_group("jobs").await?;
/// coord.stop().await?;
/// # let _ = std::fs::remove_dir_all(&dir);
/// # Ok(()) }
/// # #[cfg(not(feature = "file"))]
/// # fn main() {}
/// ```
///
/// A URL no driver serves is an error that says which schemes are available:
///
/// ```
/// let err = tooz::connect("bogus://host", "worker-1").unwrap_err();
/// assert!(matches!(err, tooz::ToozError::InvalidUrl { .. }));
/// ```
pub fn connect(url: &str, member_id: impl Into<MemberId>) -> Result<Coordinator> {
    registry().connect(url, member_id)
}

/// Like [`connect`], with explicit options (which replace URL query options of
/// the same name, as tooz's keyword arguments do), required characteristics and
/// coordinator tuning.
///
/// # Errors
/// As [`connect`], plus [`ToozError::DriverChosenPoorly`] when the driver lacks a
/// required characteristic.
///
/// ```no_run
/// # fn demo() -> tooz::Result<()> {
/// use tooz::ConnectOptions;
///
/// let opts = ConnectOptions::new().option("timeout", "30");
/// let coord = tooz::connect_with("file:///var/lib/myapp/tooz", "worker-1", &opts)?;
/// # Ok(()) }
/// ```
pub fn connect_with(
    url: &str,
    member_id: impl Into<MemberId>,
    options: &ConnectOptions,
) -> Result<Coordinator> {
    registry().connect_with(url, member_id, options)
}

/// A member id unique to this process on this host: `<hostname>-<pid>`.
///
/// The host name comes from `/proc/sys/kernel/hostname`, else the `HOSTNAME`
/// environment variable, else `localhost`. Pass your own id when a member must
/// keep its identity across restarts (a service instance name).
///
/// ```
/// let id = tooz::default_member_id();
/// assert!(id.ends_with(&format!("-{}", std::process::id())));
/// ```
pub fn default_member_id() -> String {
    format!("{}-{}", hostname(), std::process::id())
}

fn hostname() -> String {
    let from_proc = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string());
    let from_env = || std::env::var("HOSTNAME").ok().map(|s| s.trim().to_string());
    from_proc
        .filter(|s| !s.is_empty())
        .or_else(|| from_env().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "localhost".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_scheme_lists_registered_ones() {
        let err = connect("bogus://x", "m").unwrap_err().to_string();
        assert!(err.contains("bogus"), "{err}");
        #[cfg(feature = "file")]
        assert!(err.contains("file"), "{err}");
    }

    #[test]
    fn member_id_shape() {
        let id = default_member_id();
        let (host, pid) = id.rsplit_once('-').unwrap_or_default();
        assert!(!host.is_empty());
        assert_eq!(pid, std::process::id().to_string());
    }

    #[test]
    fn registry_has_every_enabled_driver() {
        let schemes = registry().schemes();
        for d in enabled_drivers() {
            for s in d.schemes {
                assert!(schemes.contains(s));
            }
        }
    }
}
