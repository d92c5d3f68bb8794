//! What the run knows about each driver: the short-lease options it connects with, how
//! long the server may take to free a dead holder's lock, and which faults make sense.

use std::time::Duration;

/// The chaos profile of one driver.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Profile {
    /// The `--driver` name.
    pub(crate) name: &'static str,
    /// Options every coordinator of the run connects with (short leases).
    pub(crate) options: &'static [(&'static str, &'static str)],
    /// The lease as the client counts it: a paused or cut-off client stays out this
    /// long plus a second, so that the server expires its hold.
    pub(crate) lease: Duration,
    /// The longest the server may take to free a crashed holder's lock (check (d)),
    /// before a fixed slack for scheduling on a loaded machine.
    pub(crate) free_bound: Duration,
    /// Whether the clients talk TCP to a server (so a FaultProxy can sit in between).
    pub(crate) proxy: bool,
    /// The node name of the standard single server (`xtask backends node kill NAME`).
    pub(crate) node: Option<&'static str>,
    /// Whether the server may be restarted empty (`node start NAME --wipe`).
    pub(crate) wipe: bool,
    /// `xtask backends node leader KIND` for `--cluster` runs.
    pub(crate) cluster_kind: Option<&'static str>,
}

const fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

const PROFILES: &[Profile] = &[
    Profile {
        name: "redis",
        options: &[("timeout", "2")],
        lease: secs(2),
        free_bound: secs(2),
        proxy: true,
        node: Some("redis"),
        wipe: true,
        cluster_kind: Some("redis"),
    },
    Profile {
        name: "etcd",
        options: &[("timeout", "2")],
        lease: secs(2),
        free_bound: secs(2),
        proxy: true,
        node: Some("etcd"),
        wipe: false,
        cluster_kind: Some("etcd"),
    },
    Profile {
        name: "zookeeper",
        // The shortest session a default server grants: twice its 2 s tick.
        options: &[("timeout", "4")],
        lease: secs(4),
        // Sessions expire on the server's tick: up to one tick late. Measured here,
        // a killed holder's lock was free 7.2-7.3 s after the kill (the probe's own
        // session start and the server's logged close of the dead session on top of
        // the 6 s), and one CI run saw a lock not free within 6 + 2 s of slack:
        // one more tick of headroom.
        free_bound: secs(8),
        proxy: true,
        node: Some("zookeeper"),
        wipe: false,
        cluster_kind: Some("zookeeper"),
    },
    Profile {
        name: "memcached",
        options: &[("timeout", "2")],
        lease: secs(2),
        // Keys are written with `T4` for a 2 s lease (memcached's coarse clock), and
        // expire when the server's whole-seconds reading has advanced by 4.
        free_bound: secs(4),
        proxy: true,
        node: Some("memcached"),
        wipe: true,
        cluster_kind: None,
    },
    Profile {
        name: "consul",
        // Consul's shortest session TTL; its servers invalidate up to 2 × TTL late, and
        // the lock delay follows.
        options: &[("ttl", "10"), ("lock_delay", "1"), ("timeout", "3")],
        lease: secs(10),
        free_bound: secs(21),
        proxy: true,
        node: Some("consul"),
        wipe: false,
        cluster_kind: None,
    },
    Profile {
        name: "postgresql",
        options: &[("timeout", "2")],
        lease: secs(2),
        free_bound: secs(2),
        proxy: true,
        node: Some("postgresql"),
        wipe: false,
        cluster_kind: None,
    },
    Profile {
        name: "mysql",
        // MySQL's wait_timeout is whole seconds, rounded up: 2 s stays 2 s.
        options: &[("timeout", "2")],
        lease: secs(2),
        free_bound: secs(2),
        proxy: true,
        node: Some("mariadb"),
        wipe: false,
        cluster_kind: None,
    },
    Profile {
        name: "file",
        options: &[("timeout", "2")],
        lease: secs(2),
        // The kernel drops a dead process's record locks at once.
        free_bound: secs(2),
        proxy: false,
        node: None,
        wipe: false,
        cluster_kind: None,
    },
    Profile {
        name: "ipc",
        options: &[("timeout", "2")],
        lease: secs(2),
        free_bound: secs(2),
        proxy: false,
        node: None,
        wipe: false,
        cluster_kind: None,
    },
];

/// The profile of `driver`.
pub(crate) fn profile(driver: &str) -> Option<&'static Profile> {
    PROFILES.iter().find(|p| p.name == driver)
}

/// Every driver with a profile.
pub(crate) fn names() -> Vec<&'static str> {
    PROFILES.iter().map(|p| p.name).collect()
}
