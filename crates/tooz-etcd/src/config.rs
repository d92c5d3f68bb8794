//! `etcd3+http://HOST[:PORT][?OPTIONS]`, `etcd3+https://…` and `etcd://…`: URL
//! and options (spec §11.6).
//!
//! Several members may be listed as `etcd3+http://h1:2379,h2:2379,h3:2379` (an
//! extension: Python tooz's etcd3gw driver takes one host); `start` connects to the
//! first of them that answers, in order, so a coordinator can start while a minority
//! of the members is down. When that member stops answering, the next heartbeat moves
//! to the next member that answers and renews the lease there (it survives when this
//! happens within its TTL); requests in flight at that moment fail, and watch streams
//! opened on the old member are not moved.
//!
//! An unknown option is an [`InvalidOption`](tooz_core::ToozError::InvalidOption)
//! error instead of being ignored.

use std::path::PathBuf;
use std::time::Duration;

use tooz_core::options::{parse_backend_url, percent_decode, redact_url, redact_url_str};
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
///
/// let c = EtcdConfig::from_url_str("etcd3+http://10.0.0.5:2379,10.0.0.6,[::1]:2381").unwrap();
/// assert_eq!(
///     c.endpoints(),
///     ["http://10.0.0.5:2379", "http://10.0.0.6:2379", "http://[::1]:2381"]
/// );
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct EtcdConfig {
    /// Host name or IP address (IPv6 without brackets).
    pub host: String,
    /// Port.
    pub port: u16,
    /// The further members of a host list (`h1:p1,h2:p2,…`) after the first
    /// (`host`, `port`): host (IPv6 without brackets) and port.
    pub more_hosts: Vec<(String, u16)>,
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
        let parsed =
            parse_backend_url(url).map_err(|e| ToozError::invalid_url(redact_url_str(url), e))?;
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
        let (host, port, more_hosts) = match url.host_str().filter(|h| h.contains(',')) {
            // A host list arrives percent-encoded (see `parse_backend_url`).
            Some(list) => {
                let mut hosts = Vec::new();
                for item in percent_decode(list).split(',') {
                    hosts.push(host_port(item).map_err(|e| bad_url(&e))?);
                }
                let mut it = hosts.into_iter();
                let (h, p) = it.next().ok_or_else(|| bad_url("empty host list"))?;
                (h, p, it.collect())
            }
            None => (
                tooz_core::options::host_of(url).unwrap_or_else(|| DEFAULT_HOST.to_string()),
                url.port().unwrap_or(DEFAULT_PORT),
                Vec::new(),
            ),
        };
        // Every one of them is (also) the TTL of the coordinator's lease.
        let t = options.lease_timeouts(NAME, DEFAULT_TIMEOUT)?;
        let path_opt = |key: &str| options.get(key).map(PathBuf::from);
        Ok(EtcdConfig {
            host,
            port,
            more_hosts,
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

    /// The gRPC endpoint of the first host for `etcd-client` (`http://HOST:PORT` or
    /// `https://…`).
    pub fn endpoint(&self) -> String {
        self.endpoint_of(&self.host, self.port)
    }

    /// Every member's gRPC endpoint, the first one first.
    pub fn endpoints(&self) -> Vec<String> {
        std::iter::once(self.endpoint())
            .chain(self.more_hosts.iter().map(|(h, p)| self.endpoint_of(h, *p)))
            .collect()
    }

    fn endpoint_of(&self, host: &str, port: u16) -> String {
        let proto = if self.https { "https" } else { "http" };
        if host.contains(':') {
            format!("{proto}://[{host}]:{port}")
        } else {
            format!("{proto}://{host}:{port}")
        }
    }
}

/// One `host[:port]` or `[v6][:port]` of a host list.
fn host_port(item: &str) -> std::result::Result<(String, u16), String> {
    let item = item.trim();
    let port_of = |p: &str| {
        p.parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("bad port in host list item {item:?}"))
    };
    if let Some(v6) = item.strip_prefix('[') {
        let (h, rest) = v6
            .split_once(']')
            .ok_or_else(|| format!("unterminated IPv6 address in {item:?}"))?;
        return match rest.strip_prefix(':') {
            Some(p) => Ok((h.to_string(), port_of(p)?)),
            None if rest.is_empty() => Ok((h.to_string(), DEFAULT_PORT)),
            None => Err(format!("bad host list item {item:?}")),
        };
    }
    let (h, p) = match item.rsplit_once(':') {
        Some((h, p)) => (h, port_of(p)?),
        None => (item, DEFAULT_PORT),
    };
    if h.is_empty() || h.contains([':', '/', '@', '?', '#', '[', ']']) {
        return Err(format!("bad host in host list item {item:?}"));
    }
    Ok((h.to_string(), p))
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
    fn host_list() {
        let c = EtcdConfig::from_url_str("etcd3+http://a:1,b,[::1]:3?timeout=5")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((c.host.as_str(), c.port), ("a", 1));
        assert_eq!(
            c.endpoints(),
            ["http://a:1", "http://b:2379", "http://[::1]:3"]
        );
        assert_eq!(c.timeout, Duration::from_secs(5));
        let one = EtcdConfig::from_url_str("etcd3+http://a:1").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(one.endpoints(), ["http://a:1"]);
        for bad in [
            "etcd3+http://a:1,,b:2",
            "etcd3+http://a:1,b:0",
            "etcd3+http://a:1,b:x",
            "etcd3+http://a:1,[::1",
        ] {
            assert!(
                matches!(
                    EtcdConfig::from_url_str(bad),
                    Err(ToozError::InvalidUrl { .. })
                ),
                "{bad}"
            );
        }
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
