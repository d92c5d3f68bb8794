//! The driver table: which driver name lives in which crate, and which drivers have
//! Python interop scenarios. `--driver all` means every row whose crate is in the workspace.

use std::{fmt, path::Path, str::FromStr};

use anyhow::{Result, bail};

/// One row of the driver table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Driver {
    /// The name used with `--driver`.
    pub(crate) name: &'static str,
    /// The crate that implements it; its `tests/conformance.rs` runs the suite.
    pub(crate) krate: &'static str,
    /// Whether `cargo xtask interop` has scenarios for it.
    pub(crate) interop: bool,
    /// The suffix of its crate's test targets when the crate serves several drivers
    /// (`tests/conformance_<suffix>.rs`, `tests/python_interop_<suffix>.rs`); `None`
    /// for `tests/conformance.rs` and `tests/python_interop.rs`.
    pub(crate) tests: Option<&'static str>,
}

/// Every driver the project plans, whether or not its crate exists yet.
pub(crate) const DRIVERS: &[Driver] = &[
    Driver {
        name: "file",
        krate: "tooz-file",
        interop: true,
        tests: None,
    },
    Driver {
        name: "ipc",
        krate: "tooz-ipc",
        interop: true,
        tests: None,
    },
    Driver {
        name: "redis",
        krate: "tooz-redis",
        interop: true,
        tests: None,
    },
    Driver {
        name: "etcd",
        krate: "tooz-etcd",
        interop: true,
        tests: None,
    },
    Driver {
        name: "zookeeper",
        krate: "tooz-zookeeper",
        interop: true,
        tests: None,
    },
    Driver {
        name: "consul",
        krate: "tooz-consul",
        interop: true,
        tests: None,
    },
    Driver {
        name: "postgresql",
        krate: "tooz-sql",
        interop: true,
        tests: Some("postgresql"),
    },
    Driver {
        name: "mysql",
        krate: "tooz-sql",
        interop: true,
        tests: Some("mysql"),
    },
    Driver {
        name: "memcached",
        krate: "tooz-memcached",
        interop: true,
        tests: None,
    },
];

impl Driver {
    /// Whether the driver's crate is present in the workspace rooted at `root`.
    pub(crate) fn exists(&self, root: &Path) -> bool {
        self.manifest_dir(root).join("Cargo.toml").is_file()
    }

    /// The backend servers (names of `cargo xtask backends`) its tests need.
    pub(crate) fn servers(&self) -> &'static [&'static str] {
        match self.name {
            "redis" => &["redis"],
            "etcd" => &["etcd"],
            "zookeeper" => &["zookeeper"],
            "consul" => &["consul"],
            "postgresql" => &["postgresql"],
            "mysql" => &["mariadb"],
            "memcached" => &["memcached"],
            _ => &[],
        }
    }

    /// The name of its crate's test target `base` (`conformance`, `python_interop`):
    /// `base_<suffix>` for a crate that serves several drivers.
    pub(crate) fn test_target(&self, base: &str) -> String {
        match self.tests {
            Some(suffix) => format!("{base}_{suffix}"),
            None => base.to_owned(),
        }
    }

    /// `crates/<crate>` under `root`.
    pub(crate) fn manifest_dir(&self, root: &Path) -> std::path::PathBuf {
        root.join("crates").join(self.krate)
    }
}

/// What `--driver` selected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum DriverSelection {
    /// Every driver in [`DRIVERS`] whose crate exists.
    All,
    /// One driver, by a name known to be in [`DRIVERS`].
    One(String),
}

impl FromStr for DriverSelection {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        if s == "all" {
            return Ok(Self::All);
        }
        if DRIVERS.iter().any(|d| d.name == s) {
            return Ok(Self::One(s.to_owned()));
        }
        bail!(
            "unknown driver `{s}`; known drivers: {}, or `all`",
            known_names()
        )
    }
}

impl fmt::Display for DriverSelection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::All => f.write_str("all"),
            Self::One(name) => f.write_str(name),
        }
    }
}

impl DriverSelection {
    /// The selected drivers whose crates exist. Naming one whose crate is absent is an error.
    pub(crate) fn resolve(&self, root: &Path) -> Result<Vec<Driver>> {
        match self {
            Self::All => Ok(DRIVERS.iter().copied().filter(|d| d.exists(root)).collect()),
            Self::One(name) => {
                let Some(driver) = DRIVERS.iter().find(|d| d.name == name) else {
                    bail!("unknown driver `{name}`; known drivers: {}", known_names())
                };
                if !driver.exists(root) {
                    bail!(
                        "driver `{name}` has no crate in this workspace yet ({} is missing); \
                         drivers present: {}",
                        driver.manifest_dir(root).join("Cargo.toml").display(),
                        present_names(root)
                    );
                }
                Ok(vec![*driver])
            }
        }
    }
}

/// Starts (idempotently) the servers `drivers` need and returns the environment the
/// tests read (`TOOZ_TEST_<DRIVER>_URL=...`). Starts nothing when no server is needed.
pub(crate) fn start_servers(root: &Path, drivers: &[Driver]) -> Result<Vec<(String, String)>> {
    let mut servers: Vec<&str> = drivers.iter().flat_map(|d| d.servers()).copied().collect();
    servers.sort_unstable();
    servers.dedup();
    if !servers.is_empty() {
        crate::process::progress!("backends: starting {}", servers.join(", "));
        let mut args = vec!["up".to_owned(), "--only".to_owned()];
        args.extend(servers.iter().map(|s| (*s).to_owned()));
        crate::backends::main(&args)?;
    }
    crate::backends::read_env(root)
}

fn known_names() -> String {
    DRIVERS
        .iter()
        .map(|d| d.name)
        .collect::<Vec<_>>()
        .join(", ")
}

fn present_names(root: &Path) -> String {
    let present: Vec<_> = DRIVERS
        .iter()
        .filter(|d| d.exists(root))
        .map(|d| d.name)
        .collect();
    if present.is_empty() {
        "none".to_owned()
    } else {
        present.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_test_targets_are_unique() {
        for (i, a) in DRIVERS.iter().enumerate() {
            for b in &DRIVERS[i + 1..] {
                assert_ne!(a.name, b.name);
                if a.krate == b.krate {
                    assert_ne!(a.test_target("conformance"), b.test_target("conformance"));
                }
            }
        }
    }

    #[test]
    fn sql_drivers_name_their_tests() {
        let pg = DRIVERS.iter().find(|d| d.name == "postgresql").unwrap();
        assert_eq!(pg.test_target("conformance"), "conformance_postgresql");
        let redis = DRIVERS.iter().find(|d| d.name == "redis").unwrap();
        assert_eq!(redis.test_target("python_interop"), "python_interop");
    }

    #[test]
    fn file_driver_is_present() {
        let root = crate::process::workspace_root();
        let drivers = DriverSelection::All.resolve(&root).unwrap();
        assert!(drivers.iter().any(|d| d.name == "file"), "{drivers:?}");
    }
}
