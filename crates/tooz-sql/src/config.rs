//! `postgresql://` (`postgres://`) and `mysql://` URLs, with Python tooz 9.1's options
//! and this driver's own.

use std::time::Duration;

use tooz_core::options::{host_of, percent_decode};
use tooz_core::{Options, Result, ToozError, Url};

/// Python tooz's default for `timeout` in every driver that has one; here the lease of
/// memberships, leaderships and lock sessions.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// How often MySQL's watch poller looks (`poll_interval`, default 0.5 s).
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(500);

/// Options of `postgresql://` URLs: Python tooz's (`host`, `port`, `dbname`), ours
/// (`timeout`, `connect_timeout`) and libpq's TLS settings through sqlx's rustls.
pub const PG_OPTIONS: &[&str] = &[
    "host",
    "port",
    "dbname",
    "timeout",
    "connect_timeout",
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
];

/// Options of `mysql://` URLs: Python tooz's (`unix_socket`, `ssl_*`) and ours
/// (`timeout`, `connect_timeout`, `poll_interval`).
pub const MYSQL_OPTIONS: &[&str] = &[
    "unix_socket",
    "ssl_ca",
    "ssl_capath",
    "ssl_cert",
    "ssl_key",
    "ssl_cipher",
    "ssl_verify_mode",
    "ssl_check_hostname",
    "timeout",
    "connect_timeout",
    "poll_interval",
];

/// What every SQL coordinator is tuned by.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Common {
    /// The lease (`timeout`, seconds, default 30): a member, a leader or a lock's
    /// database session that has not been renewed for this long is gone.
    pub timeout: Duration,
    /// How long connecting may take (`connect_timeout`, default 10 s).
    pub connect_timeout: Duration,
    /// MySQL's watch poller reads every watched group this often (`poll_interval`,
    /// default 0.5 s).
    pub poll_interval: Duration,
}

fn common(driver: &str, options: &Options) -> Result<Common> {
    Ok(Common {
        timeout: options
            .lease_secs(driver, "timeout")?
            .unwrap_or(DEFAULT_TIMEOUT),
        connect_timeout: options
            .duration_secs(driver, "connect_timeout")?
            .unwrap_or(Duration::from_secs(10)),
        poll_interval: options
            .duration_secs(driver, "poll_interval")?
            .unwrap_or(DEFAULT_POLL_INTERVAL),
    })
}

fn user_pass(url: &Url) -> (Option<String>, Option<String>) {
    let user = (!url.username().is_empty()).then(|| percent_decode(url.username()));
    let pass = url.password().map(percent_decode);
    (user, pass)
}

/// A parsed `postgresql://` URL.
#[cfg(feature = "postgres")]
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PgConfig {
    /// The connection settings.
    pub connect: sqlx::postgres::PgConnectOptions,
    /// Lease and timing.
    pub common: Common,
}

#[cfg(feature = "postgres")]
impl PgConfig {
    /// Parses `postgresql://[USER[:PASS]@]HOST[:PORT][/DB][?options]` (also
    /// `postgres://`): `host`, `port`, `dbname` override the URL's parts, as in Python
    /// tooz.
    ///
    /// ```
    /// let c = tooz_sql::PgConfig::from_url_str("postgresql://u:p@db:5433/app?timeout=5")?;
    /// assert_eq!(c.common.timeout, std::time::Duration::from_secs(5));
    /// assert_eq!(c.connect.get_port(), 5433);
    /// assert_eq!(c.connect.get_database(), Some("app"));
    /// # Ok::<(), tooz_core::ToozError>(())
    /// ```
    ///
    /// # Errors
    /// `InvalidUrl`, or `InvalidOption` naming the option.
    pub fn from_url_str(url: &str) -> Result<Self> {
        let u = Url::parse(url).map_err(|e| ToozError::invalid_url(url, e))?;
        Self::from_parts(&u, &Options::from_url(&u))
    }

    pub(crate) fn from_parts(url: &Url, options: &Options) -> Result<Self> {
        use sqlx::postgres::{PgConnectOptions, PgSslMode};
        const NAME: &str = crate::PG_NAME;
        if !matches!(url.scheme(), "postgresql" | "postgres") {
            return Err(ToozError::invalid_url(
                url,
                "the postgresql driver serves postgresql:// and postgres:// URLs",
            ));
        }
        options.check_known(NAME, PG_OPTIONS)?;
        let common = common(NAME, options)?;
        let mut c = PgConnectOptions::new();
        if let Some(h) = options
            .get("host")
            .map(str::to_string)
            .or_else(|| host_of(url))
        {
            c = c.host(&h);
        }
        let port = match options.parse::<u16>(NAME, "port", "a port number")? {
            Some(p) => Some(p),
            None => url.port(),
        };
        if let Some(p) = port {
            c = c.port(p);
        }
        let db = options.get("dbname").map(str::to_string).or_else(|| {
            let p = url.path().trim_start_matches('/');
            (!p.is_empty()).then(|| percent_decode(p))
        });
        if let Some(db) = db {
            c = c.database(&db);
        }
        let (user, pass) = user_pass(url);
        if let Some(u) = user {
            c = c.username(&u);
        }
        if let Some(p) = pass {
            c = c.password(&p);
        }
        if let Some(m) = options.get("sslmode") {
            let mode: PgSslMode = m.parse().map_err(|_| {
                ToozError::invalid_option(
                    NAME,
                    "sslmode",
                    format!(
                        "expected disable, allow, prefer, require, verify-ca or verify-full, got {m:?}"
                    ),
                )
            })?;
            c = c.ssl_mode(mode);
        }
        if let Some(p) = options.get("sslrootcert") {
            c = c.ssl_root_cert(p);
        }
        if let Some(p) = options.get("sslcert") {
            c = c.ssl_client_cert(p);
        }
        if let Some(p) = options.get("sslkey") {
            c = c.ssl_client_key(p);
        }
        c = c.application_name("tooz");
        Ok(PgConfig { connect: c, common })
    }
}

/// A parsed `mysql://` URL.
#[cfg(feature = "mysql")]
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct MySqlConfig {
    /// The connection settings.
    pub connect: sqlx::mysql::MySqlConnectOptions,
    /// Lease and timing.
    pub common: Common,
}

#[cfg(feature = "mysql")]
impl MySqlConfig {
    /// Parses `mysql://USER:PASS@HOST[:PORT]/DBNAME[?options]` with Python tooz's
    /// options (`unix_socket`, `ssl_ca`, `ssl_cert`, `ssl_key`, `ssl_verify_mode`,
    /// `ssl_check_hostname`; `ssl_capath` and `ssl_cipher` are refused: sqlx's rustls
    /// cannot honour them).
    ///
    /// ```
    /// let c = tooz_sql::MySqlConfig::from_url_str("mysql://u:p@db/app?poll_interval=0.2")?;
    /// assert_eq!(c.common.poll_interval, std::time::Duration::from_millis(200));
    /// # Ok::<(), tooz_core::ToozError>(())
    /// ```
    ///
    /// # Errors
    /// `InvalidUrl`, or `InvalidOption` naming the option.
    pub fn from_url_str(url: &str) -> Result<Self> {
        let u = Url::parse(url).map_err(|e| ToozError::invalid_url(url, e))?;
        Self::from_parts(&u, &Options::from_url(&u))
    }

    pub(crate) fn from_parts(url: &Url, options: &Options) -> Result<Self> {
        use sqlx::mysql::{MySqlConnectOptions, MySqlSslMode};
        const NAME: &str = crate::MYSQL_NAME;
        if url.scheme() != "mysql" {
            return Err(ToozError::invalid_url(
                url,
                "the mysql driver serves mysql:// URLs",
            ));
        }
        options.check_known(NAME, MYSQL_OPTIONS)?;
        let common = common(NAME, options)?;
        for k in ["ssl_capath", "ssl_cipher"] {
            if options.contains(k) {
                return Err(ToozError::invalid_option(
                    NAME,
                    k,
                    "not supported by this driver (sqlx's rustls takes a CA file, ssl_ca, and its own cipher suites)",
                ));
            }
        }
        let mut c = MySqlConnectOptions::new()
            .host(host_of(url).as_deref().unwrap_or("localhost"))
            .port(url.port().unwrap_or(3306))
            .charset("utf8mb4");
        if let Some(s) = options.get("unix_socket") {
            c = c.socket(s);
        }
        let db = url.path().trim_start_matches('/');
        if !db.is_empty() {
            c = c.database(&percent_decode(db));
        }
        let (user, pass) = user_pass(url);
        if let Some(u) = user {
            c = c.username(&u);
        }
        if let Some(p) = pass {
            c = c.password(&p);
        }
        let tls = ["ssl_ca", "ssl_cert", "ssl_key", "ssl_verify_mode"]
            .iter()
            .any(|k| options.contains(k));
        let check_hostname = options.bool(NAME, "ssl_check_hostname")?;
        if let Some(p) = options.get("ssl_ca") {
            c = c.ssl_ca(p);
        }
        if let Some(p) = options.get("ssl_cert") {
            c = c.ssl_client_cert(p);
        }
        if let Some(p) = options.get("ssl_key") {
            c = c.ssl_client_key(p);
        }
        // PyMySQL: verify_mode none/optional/required (or a boolean); check_hostname
        // defaults to true once TLS is on.
        let verify = match options
            .get("ssl_verify_mode")
            .map(|v| v.trim().to_ascii_lowercase())
        {
            None => None,
            Some(v) => Some(match v.as_str() {
                "none" | "cert_none" | "false" | "0" | "no" | "off" => false,
                "optional" | "cert_optional" | "required" | "cert_required" | "true" | "1"
                | "yes" | "on" => true,
                _ => {
                    return Err(ToozError::invalid_option(
                        NAME,
                        "ssl_verify_mode",
                        format!("expected none, optional or required, got {v:?}"),
                    ));
                }
            }),
        };
        if tls {
            let mode = match (verify.unwrap_or(options.contains("ssl_ca")), check_hostname) {
                (false, _) => MySqlSslMode::Required,
                (true, Some(false)) => MySqlSslMode::VerifyCa,
                (true, _) => MySqlSslMode::VerifyIdentity,
            };
            c = c.ssl_mode(mode);
        }
        Ok(MySqlConfig { connect: c, common })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "postgres")]
    #[test]
    fn pg_urls() {
        let c = PgConfig::from_url_str("postgresql://u@h:1/db?dbname=other&port=2&host=x").unwrap();
        assert_eq!(c.connect.get_port(), 2);
        assert_eq!(c.connect.get_host(), "x");
        assert_eq!(c.connect.get_database(), Some("other"));
        assert_eq!(c.common.timeout, DEFAULT_TIMEOUT);
        assert!(PgConfig::from_url_str("postgres://h/db").is_ok());
        for (url, opt) in [
            ("postgresql://h/db?bogus=1", "bogus"),
            ("postgresql://h/db?timeout=abc", "timeout"),
            ("postgresql://h/db?timeout=0.2", "timeout"),
            ("postgresql://h/db?sslmode=sometimes", "sslmode"),
            ("postgresql://h/db?port=x", "port"),
        ] {
            match PgConfig::from_url_str(url) {
                Err(ToozError::InvalidOption { option, .. }) => assert_eq!(option, opt, "{url}"),
                other => panic!("{url}: {other:?}"),
            }
        }
    }

    #[cfg(feature = "mysql")]
    #[test]
    fn mysql_urls() {
        let c = MySqlConfig::from_url_str(
            "mysql://u:p%40ss@h/db?ssl_ca=/ca.pem&ssl_check_hostname=false&timeout=3",
        )
        .unwrap();
        assert_eq!(c.common.timeout, Duration::from_secs(3));
        for (url, opt) in [
            ("mysql://h/db?ssl_capath=/x", "ssl_capath"),
            ("mysql://h/db?ssl_cipher=AES", "ssl_cipher"),
            ("mysql://h/db?ssl_verify_mode=maybe", "ssl_verify_mode"),
            (
                "mysql://h/db?ssl_check_hostname=perhaps",
                "ssl_check_hostname",
            ),
            ("mysql://h/db?nope=1", "nope"),
        ] {
            match MySqlConfig::from_url_str(url) {
                Err(ToozError::InvalidOption { option, .. }) => assert_eq!(option, opt, "{url}"),
                other => panic!("{url}: {other:?}"),
            }
        }
    }
}
