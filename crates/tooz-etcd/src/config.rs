//! `etcd3+http://HOST[:PORT][?OPTIONS]`, `etcd3+https://…` and `etcd://…`: URL
//! and options (spec §11.6).
//!
//! An unknown option is an [`InvalidOption`](tooz_core::ToozError::InvalidOption)
//! error instead of being ignored.

use std::path::PathBuf;
use std::time::Duration;

use tooz_core::options::{redact_url, redact_url_str};
use tooz_core::{Options, Result, ToozError, Url};

/// The driver name, as used in errors.
pub(crate) const NAME: &str = "etcd3";

/// The URL schemes served: `etcd3+http`, `etcd3+https` and the alias `etcd`.
pub const SCHEMES: &[&str] = &["etcd3+http", "etcd3+https", "etcd"];

/// Every option this driver accepts.
pub const KNOWN_OPTIONS: &[&str] = &[
    "api_version",
    "timeout",
    "lock_timeout",
    "membership_timeout",
    "ca_cert",
    "cert_key",
    "cert_cert",
    "executor",
];

/// Python tooz's default for `timeout` (and so for every other timeout).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// The default host.
pub const DEFAULT_HOST: &str = "localhost";
/// The default etcd client port.
pub const DEFAULT_PORT: u16 = 2379;

/// Settings of an etcd driver, parsed from its URL and options.
///
/// ```
/// use std::time::Duration;
/// use tooz_etcd::EtcdConfig;
///
/// let c = EtcdConfig::from_url_str("etcd3+http://10.0.0.5:2380?timeout=10&api_version=v3").unwrap();
/// assert_eq!(c.endpoint(), "http://10.0.0.5:2380");
/// assert_eq!(c.lock_timeout, Duration::from_secs(10));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct EtcdConfig {
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    /// Port.
    pub port: u16,
    /// TLS (`etcd3+https`).
    pub https: bool,
    /// Request timeout (`timeout`, default 30 s).
    pub timeout: Duration,
    /// TTL of the coordinator's lease for memberships (`membership_timeout`,
    /// default `timeout`).
    pub membership_timeout: Duration,
    /// TTL for locks and leaderships (`lock_timeout`, default `timeout`).
    pub lock_timeout: Duration,
    /// `ca_cert`: trusted CA certificate (PEM).
    pub ca_cert: Option<PathBuf>,
    /// `cert_key`: client key (PEM).
    pub cert_key: Option<PathBuf>,
    /// `cert_cert`: client certificate (PEM).
    pub cert_cert: Option<PathBuf>,
}

impl EtcdConfig {
    /// Parses a URL with its query options.
    ///
    /// # Errors
    /// `InvalidUrl` for another scheme or a path; `InvalidOption` for an unknown
    /// option or a bad value.
    pub fn from_url_str(url: &str) -> Result<Self> {
        let parsed = Url::parse(url).map_err(|e| ToozError::invalid_url(redact_url_str(url), e))?;
        Self::from_url(&parsed, &Options::from_url(&parsed))
    }

    /// Builds the settings from a parsed URL and its (possibly overridden) options.
    ///
    /// # Errors
    /// As [`EtcdConfig::from_url_str`].
    pub fn from_url(url: &Url, options: &Options) -> Result<Self> {
        let bad_url = |reason: &str| ToozError::invalid_url(redact_url(url), reason);
        let scheme = url.scheme();
        if !SCHEMES.contains(&scheme) {
            return Err(bad_url(&format!(
                "the etcd driver serves etcd3+http://, etcd3+https:// and etcd:// URLs, not {scheme}://"
            )));
        }
        options.check_known(NAME, KNOWN_OPTIONS)?;
        let path = url.path();
        if !(path.is_empty() || path == "/") {
            return Err(bad_url("expected etcd3+http://HOST[:PORT] without a path"));
        }
        let host = tooz_core::options::host_of(url).unwrap_or_else(|| DEFAULT_HOST.to_string());
        // Every one of them is (also) the TTL of the coordinator's lease.
        let t = options.lease_timeouts(NAME, DEFAULT_TIMEOUT)?;
        let path_opt = |key: &str| options.get(key).map(PathBuf::from);
        Ok(EtcdConfig {
            host,
            port: url.port().unwrap_or(DEFAULT_PORT),
            https: scheme.ends_with("https"),
            timeout: t.timeout,
            membership_timeout: t.membership_timeout,
            lock_timeout: t.lock_timeout,
            ca_cert: path_opt("ca_cert"),
            cert_key: path_opt("cert_key"),
            cert_cert: path_opt("cert_cert"),
        })
    }

    /// The TTL of the coordinator's lease, on which memberships, locks and
    /// leaderships all hang: `min(membership_timeout, lock_timeout)`.
    pub fn lease_ttl(&self) -> Duration {
        self.membership_timeout.min(self.lock_timeout)
    }

    /// The gRPC endpoint for `etcd-client` (`http://HOST:PORT` or `https://…`).
    pub fn endpoint(&self) -> String {
        let proto = if self.https { "https" } else { "http" };
        if self.host.contains(':') {
            format!("{proto}://[{}]:{}", self.host, self.port)
        } else {
            format!("{proto}://{}:{}", self.host, self.port)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let c = EtcdConfig::from_url_str("etcd3+http://").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.endpoint(), "http://localhost:2379");
        assert_eq!(c.timeout, DEFAULT_TIMEOUT);
        assert_eq!(c.membership_timeout, DEFAULT_TIMEOUT);
    }

    #[test]
    fn https_alias_and_options() {
        let c = EtcdConfig::from_url_str(
            "etcd3+https://[::1]:1234?timeout=5&lock_timeout=7&ca_cert=/ca.pem&executor=x",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(c.https);
        assert_eq!(c.endpoint(), "https://[::1]:1234");
        assert_eq!(c.lock_timeout, Duration::from_secs(7));
        assert_eq!(c.membership_timeout, Duration::from_secs(5));
        assert_eq!(c.ca_cert, Some(PathBuf::from("/ca.pem")));
        let e = EtcdConfig::from_url_str("etcd://h").unwrap_or_else(|e| panic!("{e}"));
        assert!(!e.https);
    }

    #[test]
    fn rejects() {
        assert!(matches!(
            EtcdConfig::from_url_str("etcd3+http://h?bogus=1"),
            Err(ToozError::InvalidOption { .. })
        ));
        for key in ["timeout", "lock_timeout", "membership_timeout"] {
            assert!(
                matches!(
                    EtcdConfig::from_url_str(&format!("etcd3+http://h?{key}=0.001")),
                    Err(ToozError::InvalidOption { .. })
                ),
                "{key}=0.001 is shorter than the lease floor"
            );
        }
        assert!(EtcdConfig::from_url_str("etcd3+http://h?timeout=1").is_ok());
        assert!(matches!(
            EtcdConfig::from_url_str("redis://h"),
            Err(ToozError::InvalidUrl { .. })
        ));
    }
}
