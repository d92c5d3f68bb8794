//! `consul://HOST[:PORT][?options]`, with Python tooz's options (`ttl`,
//! `namespace`, `acl_token`) and ours (`lock_delay`, `timeout`, `scheme`,
//! `ca_cert`).

use std::path::PathBuf;
use std::time::Duration;

use tooz_core::{ConnectRequest, Options, Result, ToozError, Url};

pub(crate) const NAME: &str = "consul";

/// The default Consul HTTP port.
pub const DEFAULT_PORT: u16 = 8500;
/// Python tooz's default session TTL.
pub const DEFAULT_TTL: Duration = Duration::from_secs(15);
/// Consul's own default lock delay.
pub const DEFAULT_LOCK_DELAY: Duration = Duration::from_secs(15);
/// The default per-request timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Python tooz's default namespace (the first segment of every key).
pub const DEFAULT_NAMESPACE: &str = "tooz";

/// Every option the driver accepts.
pub const KNOWN_OPTIONS: &[&str] = &[
    "ttl",
    "namespace",
    "acl_token",
    "lock_delay",
    "timeout",
    "scheme",
    "ca_cert",
];

/// The settings of one Consul coordinator.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConsulConfig {
    /// Agent host (default `localhost`).
    pub host: String,
    /// Agent HTTP port (default 8500).
    pub port: u16,
    /// `https` when `scheme=https`.
    pub https: bool,
    /// A PEM CA bundle to trust for `https` (`ca_cert`), besides the system roots.
    pub ca_cert: Option<PathBuf>,
    /// Session TTL (`ttl`, seconds, default 15). Consul refuses less than its
    /// `session_ttl_min` (10 s by default) and may keep a session up to twice the
    /// TTL after its last renewal.
    pub ttl: Duration,
    /// The first segment of every key (`namespace`, default `tooz`).
    pub namespace: String,
    /// ACL token, sent as `X-Consul-Token` (`acl_token`).
    pub acl_token: Option<String>,
    /// Consul's lock delay for this coordinator's session (`lock_delay`, seconds,
    /// default 15, `0` disables it).
    pub lock_delay: Duration,
    /// Per-request timeout (`timeout`, seconds, default 10).
    pub timeout: Duration,
}

impl std::fmt::Debug for ConsulConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsulConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("https", &self.https)
            .field("ttl", &self.ttl)
            .field("namespace", &self.namespace)
            .field("acl_token", &self.acl_token.as_ref().map(|_| "<redacted>"))
            .field("lock_delay", &self.lock_delay)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl ConsulConfig {
    /// Parses a `consul://` URL.
    ///
    /// ```
    /// let c = tooz_consul::ConsulConfig::from_url_str("consul://agent:8501?ttl=20&namespace=app&lock_delay=1")?;
    /// assert_eq!((c.host.as_str(), c.port, c.namespace.as_str()), ("agent", 8501, "app"));
    /// assert_eq!(c.ttl, std::time::Duration::from_secs(20));
    /// assert_eq!(c.lock_delay, std::time::Duration::from_secs(1));
    /// # Ok::<(), tooz_core::ToozError>(())
    /// ```
    ///
    /// # Errors
    /// `InvalidUrl`, or `InvalidOption` naming the option.
    pub fn from_url_str(url: &str) -> Result<Self> {
        let u = Url::parse(url).map_err(|e| ToozError::invalid_url(url, e))?;
        Self::from_parts(&u, &Options::from_url(&u))
    }

    pub(crate) fn from_request(req: &ConnectRequest<'_>) -> Result<Self> {
        Self::from_parts(req.url, req.options)
    }

    fn from_parts(url: &Url, options: &Options) -> Result<Self> {
        if url.scheme() != NAME {
            return Err(ToozError::invalid_url(
                tooz_core::options::redact_url(url),
                "the consul driver serves consul:// URLs",
            ));
        }
        options.check_known(NAME, KNOWN_OPTIONS)?;
        let host = match url.host() {
            None | Some(url::Host::Domain("")) => "localhost".to_string(),
            Some(url::Host::Domain(d)) => d.to_string(),
            Some(url::Host::Ipv4(a)) => a.to_string(),
            Some(url::Host::Ipv6(a)) => format!("[{a}]"),
        };
        let ttl = options.lease_secs(NAME, "ttl")?.unwrap_or(DEFAULT_TTL);
        let lock_delay = match options.get("lock_delay") {
            Some(v) if v.trim().parse::<f64>() == Ok(0.0) => Duration::ZERO,
            _ => options
                .duration_secs(NAME, "lock_delay")?
                .unwrap_or(DEFAULT_LOCK_DELAY),
        };
        let timeout = options
            .duration_secs(NAME, "timeout")?
            .unwrap_or(DEFAULT_TIMEOUT);
        let namespace = match options.get("namespace") {
            None => DEFAULT_NAMESPACE.to_string(),
            Some(ns) => {
                let ns = ns.trim_matches('/');
                if ns.is_empty() || ns.split('/').any(|p| p.is_empty() || p == "." || p == "..") {
                    return Err(ToozError::invalid_option(
                        NAME,
                        "namespace",
                        format!(
                            "expected a non-empty key prefix without empty, `.` or `..` segments, got {ns:?}"
                        ),
                    ));
                }
                ns.to_string()
            }
        };
        let https = match options
            .get("scheme")
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None | Some("http") => false,
            Some("https") => true,
            Some(other) => {
                return Err(ToozError::invalid_option(
                    NAME,
                    "scheme",
                    format!("expected http or https, got {other:?}"),
                ));
            }
        };
        let ca_cert = options.get("ca_cert").map(PathBuf::from);
        if ca_cert.is_some() && !https {
            return Err(ToozError::invalid_option(
                NAME,
                "ca_cert",
                "a CA certificate only applies with scheme=https",
            ));
        }
        let acl_token = options
            .get("acl_token")
            .filter(|t| !t.is_empty())
            .map(str::to_string);
        Ok(ConsulConfig {
            host,
            port: url.port().unwrap_or(DEFAULT_PORT),
            https,
            ca_cert,
            ttl,
            namespace,
            acl_token,
            lock_delay,
            timeout,
        })
    }

    /// The agent's HTTP API base, `http[s]://HOST:PORT/v1/`.
    pub fn api_base(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://{}:{}/v1/", self.host, self.port)
    }

    /// How long Consul may keep the session after its last renewal: twice the TTL
    /// (its servers wait `2 × TTL` before invalidating), plus the lock delay
    /// before anyone else can acquire what the session held.
    pub fn worst_case_release(&self) -> Duration {
        self.ttl * 2 + self.lock_delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let c = ConsulConfig::from_url_str("consul://").unwrap();
        assert_eq!((c.host.as_str(), c.port), ("localhost", DEFAULT_PORT));
        assert_eq!((c.ttl, c.lock_delay), (DEFAULT_TTL, DEFAULT_LOCK_DELAY));
        assert_eq!(c.namespace, "tooz");
        assert_eq!(c.api_base(), "http://localhost:8500/v1/");
        let c = ConsulConfig::from_url_str("consul://h?scheme=https&acl_token=s3cret&lock_delay=0")
            .unwrap();
        assert_eq!(c.api_base(), "https://h:8500/v1/");
        assert_eq!(c.lock_delay, Duration::ZERO);
        assert!(!format!("{c:?}").contains("s3cret"));
    }

    #[test]
    fn refusals_name_the_option() {
        for (url, opt) in [
            ("consul://h?bogus=1", "bogus"),
            ("consul://h?ttl=abc", "ttl"),
            ("consul://h?ttl=0.1", "ttl"),
            ("consul://h?lock_delay=-1", "lock_delay"),
            ("consul://h?scheme=ftp", "scheme"),
            ("consul://h?namespace=a//b", "namespace"),
            ("consul://h?ca_cert=/x", "ca_cert"),
            ("consul://h?timeout=x", "timeout"),
        ] {
            match ConsulConfig::from_url_str(url) {
                Err(ToozError::InvalidOption { option, .. }) => assert_eq!(option, opt, "{url}"),
                other => panic!("{url}: {other:?}"),
            }
        }
        assert!(matches!(
            ConsulConfig::from_url_str("redis://h"),
            Err(ToozError::InvalidUrl { .. })
        ));
    }
}
