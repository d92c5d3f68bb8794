#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

mod backend;
mod config;
mod driver;
mod layout;
mod lock;
#[cfg(feature = "mysql")]
mod mysql;
#[cfg(feature = "postgres")]
mod pg;

#[cfg(feature = "mysql")]
pub use config::MySqlConfig;
#[cfg(feature = "postgres")]
pub use config::PgConfig;
pub use config::{Common, DEFAULT_POLL_INTERVAL, DEFAULT_TIMEOUT, MYSQL_OPTIONS, PG_OPTIONS};

use std::sync::Arc;

use tooz_core::features::{FencingSource, LeaseKind};
use tooz_core::{ConnectRequest, Driver, DriverDescriptor, Features, Result};

/// The PostgreSQL driver's name.
pub const PG_NAME: &str = "postgresql";

/// The MySQL/MariaDB driver's name.
pub const MYSQL_NAME: &str = "mysql";

/// The PostgreSQL driver's registry entry: name `"postgresql"`, schemes
/// `postgresql` and `postgres`.
///
/// ```
/// let registry = tooz_core::Registry::new().with(tooz_sql::POSTGRESQL);
/// assert!(registry.schemes().contains(&"postgres"));
/// ```
#[cfg(feature = "postgres")]
pub const POSTGRESQL: DriverDescriptor = DriverDescriptor {
    name: PG_NAME,
    schemes: &["postgresql", "postgres"],
    connect: connect_pg,
    features: Features::full(LeaseKind::Session, FencingSource::Counter),
};

/// The MySQL/MariaDB driver's registry entry: name `"mysql"`, scheme `mysql`.
/// Membership and leader changes are polled (`poll_interval`), one statement per
/// interval for every group the coordinator watches; a lock waiter still
/// waits server-side (`GET_LOCK`), so it is woken by the release.
///
/// ```
/// let registry = tooz_core::Registry::new().with(tooz_sql::MYSQL);
/// assert!(registry.schemes().contains(&"mysql"));
/// ```
#[cfg(feature = "mysql")]
pub const MYSQL: DriverDescriptor = DriverDescriptor {
    name: MYSQL_NAME,
    schemes: &["mysql"],
    connect: connect_mysql,
    features: Features::full(LeaseKind::Session, FencingSource::Counter).polled_watches(),
};

#[cfg(feature = "postgres")]
fn connect_pg(req: &ConnectRequest<'_>) -> Result<Arc<dyn Driver>> {
    let cfg = PgConfig::from_parts(req.url, req.options)?;
    Ok(Arc::new(driver::SqlDriver::new(
        pg::Pg::new(cfg),
        req.member_id.clone(),
    )))
}

#[cfg(feature = "mysql")]
fn connect_mysql(req: &ConnectRequest<'_>) -> Result<Arc<dyn Driver>> {
    let cfg = MySqlConfig::from_parts(req.url, req.options)?;
    Ok(Arc::new(driver::SqlDriver::new(
        mysql::MySql::new(cfg),
        req.member_id.clone(),
    )))
}
