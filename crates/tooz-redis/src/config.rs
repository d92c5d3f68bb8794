//! `redis://[USER:PASS@]HOST[:PORT][/DB][?OPTIONS]`: URL and options.
//!
//! The options are Python tooz's (spec §11.4), parsed with the same types;
//! an unknown option is an [`InvalidOption`](tooz_core::ToozError::InvalidOption)
//! error instead of being ignored.

use std::path::PathBuf;
use std::time::Duration;

use tooz_core::options::redact_url;
use tooz_core::{ConnectRequest, Options, Result, ToozError, Url};

/// The driver name, as used in errors.
pub(crate) const NAME: &str = "redis";

/// Every option this driver accepts.
pub const KNOWN_OPTIONS: &[&str] = &[
    "timeout",
    "membership_timeout",
    "lock_timeout",
    "namespace",
    "db",
    "encoding",
    "retry_on_timeout",
    "socket_keepalive",
    "socket_timeout",
    "socket_connect_timeout",
    "health_check_interval",
    "ssl",
    "ssl_certfile",
    "ssl_keyfile",
    "ssl_ca_certs",
    "sentinel",
    "sentinel_fallback",
    "sentinel_username",
    "sentinel_password",
    "sentinel_ssl",
    "executor",
];

/// Python tooz's default for `timeout` (and so for every other timeout).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Python tooz's default key namespace.
pub const DEFAULT_NAMESPACE: &str = "_tooz";

/// The default Redis port.
pub const DEFAULT_PORT: u16 = 6379;

/// Where the Redis server is.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Target {
    /// A TCP address.
    Tcp {
        /// Host name or IP address (IPv6 without brackets).
        host: String,
        /// Port.
        port: u16,
    },
    /// A unix socket (`redis:///path/to/redis.sock`).
    Unix(PathBuf),
    /// A master found through Redis Sentinel (`?sentinel=NAME`).
    Sentinel {
        /// The master's service name.
        master: String,
        /// The sentinels: the URL's host first, then every `sentinel_fallback`.
        sentinels: Vec<(String, u16)>,
        /// `sentinel_username`.
        username: Option<String>,
        /// `sentinel_password`.
        password: Option<String>,
        /// `sentinel_ssl`: talk TLS to the sentinels too.
        ssl: bool,
    },
}

/// TLS settings (`ssl=true` or the `rediss` scheme).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TlsSettings {
    /// `ssl_certfile`: client certificate (PEM).
    pub certfile: Option<PathBuf>,
    /// `ssl_keyfile`: client key (PEM).
    pub keyfile: Option<PathBuf>,
    /// `ssl_ca_certs`: trusted CA certificates (PEM); the system roots otherwise.
    pub ca_certs: Option<PathBuf>,
}

/// Settings of a Redis driver, parsed from its URL and options.
///
/// ```
/// use std::time::Duration;
/// use tooz_redis::RedisConfig;
///
/// let c = RedisConfig::from_url_str("redis://:secret@10.0.0.5:6380/2?timeout=10&namespace=app").unwrap();
/// assert_eq!(c.db, 2);
/// assert_eq!(c.password.as_deref(), Some("secret"));
/// assert_eq!(c.lock_timeout, Duration::from_secs(10));
/// assert_eq!(c.namespace, b"app");
/// ```
#[derive(Clone, PartialEq)]
#[non_exhaustive]
pub struct RedisConfig {
    /// Where the server is.
    pub target: Target,
    /// ACL user name (from the URL).
    pub username: Option<String>,
    /// Password (from the URL).
    pub password: Option<String>,
    /// Database number (`/DB` in the URL path or `?db=`).
    pub db: i64,
    /// Key prefix shared with Python tooz (`namespace`, default `_tooz`).
    pub namespace: Vec<u8>,
    /// How long a member stays listed without heartbeats (`membership_timeout`,
    /// default `timeout`).
    pub membership_timeout: Duration,
    /// How long a lock or a leadership lives without renewal (`lock_timeout`,
    /// default `timeout`).
    pub lock_timeout: Duration,
    /// The longest one request may take before it fails with `Connection`
    /// (`socket_timeout`, default `timeout`).
    pub socket_timeout: Duration,
    /// The longest a connection attempt may take (`socket_connect_timeout`,
    /// default `socket_timeout`).
    pub connect_timeout: Duration,
    /// Retry a request once after it timed out (`retry_on_timeout`).
    pub retry_on_timeout: bool,
    /// TCP keep-alive probes on the connections (`socket_keepalive`).
    pub socket_keepalive: bool,
    /// `health_check_interval` (seconds; accepted for compatibility: a dropped
    /// connection is detected on use and the request retried once).
    pub health_check_interval: Option<Duration>,
    /// TLS, when `ssl=true` or the scheme is `rediss`.
    pub tls: Option<TlsSettings>,
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("target", &redacted_target(&self.target))
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("db", &self.db)
            .field("namespace", &String::from_utf8_lossy(&self.namespace))
            .field("membership_timeout", &self.membership_timeout)
            .field("lock_timeout", &self.lock_timeout)
            .field("socket_timeout", &self.socket_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("retry_on_timeout", &self.retry_on_timeout)
            .field("socket_keepalive", &self.socket_keepalive)
            .field("health_check_interval", &self.health_check_interval)
            .field("tls", &self.tls)
            .finish()
    }
}

fn redacted_target(t: &Target) -> Target {
    match t {
        Target::Sentinel {
            master,
            sentinels,
            username,
            password,
            ssl,
        } => Target::Sentinel {
            master: master.clone(),
            sentinels: sentinels.clone(),
            username: username.clone(),
            password: password.as_ref().map(|_| "***".to_string()),
            ssl: *ssl,
        },
        other => other.clone(),
    }
}

impl RedisConfig {
    /// Parses a `redis://` (or `rediss://`) URL with its query options.
    ///
    /// # Errors
    /// `InvalidUrl` for another scheme or a URL without host and socket path;
    /// `InvalidOption` for an unknown option or a bad value.
    pub fn from_url_str(url: &str) -> Result<Self> {
        let parsed = Url::parse(url).map_err(|e| ToozError::invalid_url(redact_url_str(url), e))?;
        Self::from_url(&parsed, &Options::from_url(&parsed))
    }

    /// Builds the settings from a parsed URL and its (possibly overridden) options.
    ///
    /// # Errors
    /// As [`RedisConfig::from_url_str`].
    pub fn from_url(url: &Url, options: &Options) -> Result<Self> {
        let bad_url = |reason: &str| ToozError::invalid_url(redact_url(url), reason);
        let scheme = url.scheme();
        if scheme != "redis" && scheme != "rediss" {
            return Err(bad_url(&format!(
                "the redis driver serves redis:// and rediss:// URLs, not {scheme}://"
            )));
        }
        options.check_known(NAME, KNOWN_OPTIONS)?;

        let username = match url.username() {
            "" => None,
            u => Some(decode(u)),
        };
        let password = url.password().map(decode);

        let host = match url.host() {
            None => None,
            Some(url::Host::Domain("")) => None,
            Some(url::Host::Domain(d)) => Some(d.to_string()),
            Some(url::Host::Ipv4(a)) => Some(a.to_string()),
            Some(url::Host::Ipv6(a)) => Some(a.to_string()),
        };
        let path = decode(url.path());
        let mut db_from_path = None;
        let target_host = match host {
            Some(h) => {
                let p = path.trim_matches('/');
                if !p.is_empty() {
                    db_from_path = Some(p.parse::<i64>().map_err(|_| {
                        bad_url(&format!(
                            "the path of a redis://HOST URL is the database number, got {p:?}"
                        ))
                    })?);
                }
                Some((h, url.port().unwrap_or(DEFAULT_PORT)))
            }
            None => {
                if path.is_empty() || path == "/" {
                    return Err(bad_url(
                        "expected redis://HOST[:PORT] or redis:///PATH/TO/SOCKET (no host: the path is a unix socket)",
                    ));
                }
                None
            }
        };

        let secs = |key: &str| options.duration_secs(NAME, key);
        // The TTLs of the beat, lock and leader keys: at least the lease floor.
        let tooz_core::options::LeaseTimeouts {
            timeout,
            membership_timeout,
            lock_timeout,
            ..
        } = options.lease_timeouts(NAME, DEFAULT_TIMEOUT)?;
        let socket_timeout = secs("socket_timeout")?.unwrap_or(timeout);
        let connect_timeout = secs("socket_connect_timeout")?.unwrap_or(socket_timeout);
        let health_check_interval = match options.get("health_check_interval") {
            // Python passes 0 to redis-py meaning "never"; accept it.
            Some(v) if v.trim().parse::<f64>().is_ok_and(|x| x == 0.0) => None,
            _ => secs("health_check_interval")?,
        };
        let db = match options.parse::<i64>(NAME, "db", "an integer database number")? {
            Some(d) => d,
            None => db_from_path.unwrap_or(0),
        };
        if db < 0 {
            return Err(ToozError::invalid_option(
                NAME,
                "db",
                format!("expected a database number >= 0, got {db}"),
            ));
        }
        let namespace = options
            .get("namespace")
            .unwrap_or(DEFAULT_NAMESPACE)
            .as_bytes()
            .to_vec();
        if let Some(e) = options.get("executor") {
            const EXECUTORS: &[&str] = &["threaded", "thread", "threading", "synchronous", "sync"];
            if !EXECUTORS.contains(&e) {
                return Err(ToozError::invalid_option(
                    NAME,
                    "executor",
                    format!(
                        "unknown executor {e:?} (accepted, and ignored: {})",
                        EXECUTORS.join(", ")
                    ),
                ));
            }
        }
        let retry_on_timeout = options.bool(NAME, "retry_on_timeout")?.unwrap_or(false);
        let socket_keepalive = options.bool(NAME, "socket_keepalive")?.unwrap_or(false);
        let ssl = options.bool(NAME, "ssl")?.unwrap_or(scheme == "rediss");
        let path_opt = |key: &str| options.get(key).map(PathBuf::from);
        let tls_files = TlsSettings {
            certfile: path_opt("ssl_certfile"),
            keyfile: path_opt("ssl_keyfile"),
            ca_certs: path_opt("ssl_ca_certs"),
        };
        if tls_files.certfile.is_some() != tls_files.keyfile.is_some() {
            let missing = if tls_files.certfile.is_some() {
                "ssl_keyfile"
            } else {
                "ssl_certfile"
            };
            return Err(ToozError::invalid_option(
                NAME,
                missing,
                "ssl_certfile and ssl_keyfile go together (client certificate and its key)",
            ));
        }
        let tls = ssl.then_some(tls_files);
        let sentinel_ssl = options.bool(NAME, "sentinel_ssl")?.unwrap_or(false);

        let target = match (options.get("sentinel"), target_host) {
            (Some(master), Some((host, port))) => {
                let mut sentinels = vec![(host, port)];
                for f in options.get_all("sentinel_fallback") {
                    sentinels.push(parse_host_port(f)?);
                }
                Target::Sentinel {
                    master: master.to_string(),
                    sentinels,
                    username: options.get("sentinel_username").map(str::to_string),
                    password: options.get("sentinel_password").map(str::to_string),
                    ssl: sentinel_ssl,
                }
            }
            (Some(_), None) => {
                return Err(ToozError::invalid_option(
                    NAME,
                    "sentinel",
                    "a sentinel URL names the first sentinel as HOST:PORT, not a unix socket",
                ));
            }
            (None, Some((host, port))) => Target::Tcp { host, port },
            (None, None) => Target::Unix(PathBuf::from(path)),
        };
        if !matches!(target, Target::Sentinel { .. }) {
            for key in [
                "sentinel_fallback",
                "sentinel_username",
                "sentinel_password",
                "sentinel_ssl",
            ] {
                if options.contains(key) {
                    return Err(ToozError::invalid_option(
                        NAME,
                        key,
                        "only meaningful with ?sentinel=MASTER_NAME",
                    ));
                }
            }
        }
        if tls.is_some() && matches!(target, Target::Unix(_)) {
            return Err(ToozError::invalid_option(
                NAME,
                "ssl",
                "TLS over a unix socket is not supported",
            ));
        }

        Ok(RedisConfig {
            target,
            username,
            password,
            db,
            namespace,
            membership_timeout,
            lock_timeout,
            socket_timeout,
            connect_timeout,
            retry_on_timeout,
            socket_keepalive,
            health_check_interval,
            tls,
        })
    }

    pub(crate) fn from_request(req: &ConnectRequest<'_>) -> Result<Self> {
        Self::from_url(req.url, req.options)
    }

    /// The interval `heartbeat` returns: `min(lock_timeout, membership_timeout)`.
    pub fn heartbeat_interval(&self) -> Duration {
        self.lock_timeout.min(self.membership_timeout)
    }
}

fn decode(s: &str) -> String {
    tooz_core::options::percent_decode(s)
}

fn redact_url_str(url: &str) -> String {
    tooz_core::options::redact_url_str(url)
}

/// `HOST:PORT` or `[V6]:PORT` (Python's `netutils.parse_host_port`).
fn parse_host_port(s: &str) -> Result<(String, u16)> {
    let bad = || {
        ToozError::invalid_option(
            NAME,
            "sentinel_fallback",
            format!("expected HOST:PORT or [IPV6]:PORT, got {s:?}"),
        )
    };
    let s = s.trim();
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, p) = rest.split_once(']').ok_or_else(bad)?;
        (h, p.strip_prefix(':').ok_or_else(bad)?)
    } else {
        let (h, p) = s.rsplit_once(':').ok_or_else(bad)?;
        if h.contains(':') {
            return Err(bad());
        }
        (h, p)
    };
    if host.is_empty() {
        return Err(bad());
    }
    let port = port.parse::<u16>().map_err(|_| bad())?;
    Ok((host.to_string(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(url: &str) -> RedisConfig {
        RedisConfig::from_url_str(url).unwrap_or_else(|e| panic!("{url}: {e}"))
    }

    #[test]
    fn defaults_match_python() {
        let c = cfg("redis://localhost");
        assert_eq!(
            c.target,
            Target::Tcp {
                host: "localhost".into(),
                port: 6379
            }
        );
        assert_eq!(c.namespace, b"_tooz");
        assert_eq!(c.membership_timeout, DEFAULT_TIMEOUT);
        assert_eq!(c.lock_timeout, DEFAULT_TIMEOUT);
        assert_eq!(c.socket_timeout, DEFAULT_TIMEOUT);
        assert_eq!(c.connect_timeout, DEFAULT_TIMEOUT);
        assert_eq!(c.db, 0);
        assert!(c.tls.is_none());
        assert_eq!(c.heartbeat_interval(), DEFAULT_TIMEOUT);
    }

    #[test]
    fn timeouts_cascade() {
        let c = cfg("redis://h:1?timeout=2");
        assert_eq!(c.lock_timeout, Duration::from_secs(2));
        assert_eq!(c.membership_timeout, Duration::from_secs(2));
        assert_eq!(c.socket_timeout, Duration::from_secs(2));
        let c = cfg(
            "redis://h:1?timeout=2&lock_timeout=5&membership_timeout=1.5&socket_timeout=3&socket_connect_timeout=0.5",
        );
        assert_eq!(c.lock_timeout, Duration::from_secs(5));
        assert_eq!(c.membership_timeout, Duration::from_millis(1500));
        assert_eq!(c.socket_timeout, Duration::from_secs(3));
        assert_eq!(c.connect_timeout, Duration::from_millis(500));
        assert_eq!(c.heartbeat_interval(), Duration::from_millis(1500));
    }

    #[test]
    fn credentials_db_and_flags() {
        let c = cfg(
            "redis://user:p%40ss@[::1]:7000/3?retry_on_timeout=yes&socket_keepalive=1&health_check_interval=5&encoding=utf8&executor=threaded",
        );
        assert_eq!(c.username.as_deref(), Some("user"));
        assert_eq!(c.password.as_deref(), Some("p@ss"));
        assert_eq!(
            c.target,
            Target::Tcp {
                host: "::1".into(),
                port: 7000
            }
        );
        assert_eq!(c.db, 3);
        assert!(c.retry_on_timeout && c.socket_keepalive);
        assert_eq!(c.health_check_interval, Some(Duration::from_secs(5)));
        assert_eq!(cfg("redis://h/3?db=4").db, 4);
        assert_eq!(
            cfg("redis://h?health_check_interval=0").health_check_interval,
            None
        );
        assert!(!format!("{c:?}").contains("p@ss"));
    }

    #[test]
    fn unix_socket_when_no_host() {
        let c = cfg("redis:///var/run/redis/redis.sock?db=1");
        assert_eq!(c.target, Target::Unix("/var/run/redis/redis.sock".into()));
        assert_eq!(c.db, 1);
    }

    #[test]
    fn sentinel_with_fallbacks() {
        let c = cfg(
            "redis://s1:26379?sentinel=mymaster&sentinel_fallback=s2:26380&sentinel_fallback=[::1]:26381&sentinel_password=pw&sentinel_username=u&sentinel_ssl=false",
        );
        assert_eq!(
            c.target,
            Target::Sentinel {
                master: "mymaster".into(),
                sentinels: vec![
                    ("s1".into(), 26379),
                    ("s2".into(), 26380),
                    ("::1".into(), 26381)
                ],
                username: Some("u".into()),
                password: Some("pw".into()),
                ssl: false,
            }
        );
        assert!(!format!("{c:?}").contains("pw"));
    }

    #[test]
    fn tls_options() {
        let c = cfg("rediss://h");
        assert_eq!(c.tls, Some(TlsSettings::default()));
        let c =
            cfg("redis://h?ssl=true&ssl_ca_certs=/ca.pem&ssl_certfile=/c.pem&ssl_keyfile=/k.pem");
        let t = c.tls.unwrap();
        assert_eq!(t.ca_certs, Some(PathBuf::from("/ca.pem")));
        assert_eq!(t.certfile, Some(PathBuf::from("/c.pem")));
        assert!(cfg("rediss://h?ssl=false").tls.is_none());
    }

    fn invalid_option(url: &str) -> String {
        match RedisConfig::from_url_str(url) {
            Err(ToozError::InvalidOption { option, .. }) => option,
            other => panic!("{url}: expected InvalidOption, got {other:?}"),
        }
    }

    #[test]
    fn rejects_bad_options() {
        assert_eq!(invalid_option("redis://h?bogus=1"), "bogus");
        assert_eq!(invalid_option("redis://h?timeout=abc"), "timeout");
        assert_eq!(invalid_option("redis://h?timeout=-1"), "timeout");
        // Lease-like options have a floor; socket timeouts do not.
        assert_eq!(invalid_option("redis://h?timeout=0.001"), "timeout");
        assert_eq!(invalid_option("redis://h?lock_timeout=0.5"), "lock_timeout");
        assert_eq!(
            invalid_option("redis://h?membership_timeout=0.001"),
            "membership_timeout"
        );
        assert_eq!(
            cfg("redis://h?timeout=1&socket_timeout=0.2").socket_timeout,
            Duration::from_millis(200)
        );
        assert_eq!(invalid_option("redis://h?db=x"), "db");
        assert_eq!(invalid_option("redis://h?ssl=maybe"), "ssl");
        assert_eq!(invalid_option("redis://h?executor=forked"), "executor");
        assert_eq!(
            invalid_option("redis://h?sentinel_fallback=x:1"),
            "sentinel_fallback"
        );
        assert_eq!(
            invalid_option("redis://h?sentinel=m&sentinel_fallback=nope"),
            "sentinel_fallback"
        );
        assert_eq!(
            invalid_option("redis://h?ssl=1&ssl_certfile=/c"),
            "ssl_keyfile"
        );
        assert_eq!(invalid_option("redis:///sock?sentinel=m"), "sentinel");
        assert_eq!(invalid_option("redis:///sock?ssl=1"), "ssl");
    }

    #[test]
    fn rejects_bad_urls() {
        for bad in [
            "redis://",
            "redis:///",
            "redis://h/notadb",
            "http://h",
            "not a url",
        ] {
            assert!(
                matches!(
                    RedisConfig::from_url_str(bad),
                    Err(ToozError::InvalidUrl { .. })
                ),
                "{bad}"
            );
        }
    }
}
