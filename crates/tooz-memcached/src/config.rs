//! `memcached://[HOST[:PORT]][?options]`, with Python tooz's options.

use std::time::Duration;

use tooz_core::{ConnectRequest, Options, Result, ToozError, Url};

pub(crate) const NAME: &str = "memcached";

/// The default memcached port.
pub const DEFAULT_PORT: u16 = 11211;

/// Python tooz's default for `timeout` (and so for every other timeout).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Every option the driver accepts (Python tooz 9.1's, same names).
pub const KNOWN_OPTIONS: &[&str] = &[
    "timeout",
    "membership_timeout",
    "lock_timeout",
    "leader_timeout",
    "max_pool_size",
    "use_ssl",
    "ca_cert",
    "ssl_key",
    "ssl_key_password",
    "ssl_cert",
    "ssl_ciphers",
    "ssl_check_hostname",
    "executor",
    "mutation_log",
    "watch_interval",
];

const TLS_FILE_OPTIONS: &[&str] = &[
    "ca_cert",
    "ssl_key",
    "ssl_key_password",
    "ssl_cert",
    "ssl_ciphers",
];

/// The settings of one memcached coordinator.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct MemcachedConfig {
    /// Server host (default `localhost`).
    pub host: String,
    /// Server port (default 11211).
    pub port: u16,
    /// Socket and connect timeout of each request (`timeout`, default 30 s).
    pub timeout: Duration,
    /// TTL of the member's liveness key (`membership_timeout`, default `timeout`).
    pub membership_timeout: Duration,
    /// TTL of lock keys (`lock_timeout`, default `timeout`).
    pub lock_timeout: Duration,
    /// TTL of leader keys (`leader_timeout`, default `timeout`).
    pub leader_timeout: Duration,
    /// Most shared-lock renewals a heartbeat runs at once (`max_pool_size`,
    /// default 8; every request shares one multiplexed connection).
    pub max_pool_size: usize,
    /// How often the one poller of a coordinator's watched groups reads them all
    /// (`watch_interval`, seconds, default 0.5: the core's default
    /// `poll_interval`; an extension over Python tooz).
    pub watch_interval: Duration,
    /// Whether waiters and group watches read memcached's mutation log
    /// (`watch mutations`) for wake-up hints (`mutation_log`, default `true`;
    /// not a Python option).
    pub mutation_log: bool,
}

impl MemcachedConfig {
    /// Parses a `memcached://` URL (Python tooz's form and options).
    ///
    /// ```
    /// let c = tooz_memcached::MemcachedConfig::from_url_str("memcached://cache:11311?timeout=5&lock_timeout=10")?;
    /// assert_eq!((c.host.as_str(), c.port), ("cache", 11311));
    /// assert_eq!(c.lock_timeout, std::time::Duration::from_secs(10));
    /// assert_eq!(c.membership_timeout, std::time::Duration::from_secs(5));
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
                url,
                "the memcached driver serves memcached:// URLs",
            ));
        }
        options.check_known(NAME, KNOWN_OPTIONS)?;
        let host = match url.host() {
            None => "localhost".to_string(),
            Some(url::Host::Domain("")) => "localhost".to_string(),
            Some(url::Host::Domain(d)) => d.to_string(),
            Some(url::Host::Ipv4(a)) => a.to_string(),
            Some(url::Host::Ipv6(a)) => format!("[{a}]"),
        };
        let port = url.port().unwrap_or(DEFAULT_PORT);
        let timeout = options
            .lease_secs(NAME, "timeout")?
            .unwrap_or(DEFAULT_TIMEOUT);
        let lease = |key: &str| -> Result<Duration> {
            Ok(options.lease_secs(NAME, key)?.unwrap_or(timeout))
        };
        let max_pool_size =
            match options.parse::<usize>(NAME, "max_pool_size", "a positive integer")? {
                Some(0) => {
                    return Err(ToozError::invalid_option(
                        NAME,
                        "max_pool_size",
                        "expected a positive integer, got 0",
                    ));
                }
                Some(n) => n,
                None => 8,
            };
        let watch_interval =
            match options.parse::<f64>(NAME, "watch_interval", "a positive number of seconds")? {
                None => Duration::from_millis(500),
                Some(v) => Duration::try_from_secs_f64(v)
                    .ok()
                    .filter(|d| !d.is_zero())
                    .ok_or_else(|| {
                        ToozError::invalid_option(
                            NAME,
                            "watch_interval",
                            format!("expected a positive number of seconds, got {v}"),
                        )
                    })?,
            };
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
        // ssl_check_hostname is accepted when it is a valid boolean and TLS is off.
        options.bool(NAME, "ssl_check_hostname")?;
        if options.bool(NAME, "use_ssl")?.unwrap_or(false) {
            return Err(ToozError::invalid_option(
                NAME,
                "use_ssl",
                "TLS to memcached is not implemented by this driver; use a plain connection on a trusted network or a TLS tunnel",
            ));
        }
        if let Some(k) = TLS_FILE_OPTIONS.iter().find(|k| options.contains(k)) {
            return Err(ToozError::invalid_option(
                NAME,
                k,
                "TLS to memcached is not implemented by this driver, so TLS settings cannot be honoured",
            ));
        }
        Ok(MemcachedConfig {
            host,
            port,
            timeout,
            membership_timeout: lease("membership_timeout")?,
            lock_timeout: lease("lock_timeout")?,
            leader_timeout: lease("leader_timeout")?,
            max_pool_size,
            watch_interval,
            mutation_log: options.bool(NAME, "mutation_log")?.unwrap_or(true),
        })
    }

    /// The lease the heartbeat keeps: the shortest of the three TTLs (Python's
    /// heartbeat interval).
    pub fn heartbeat_interval(&self) -> Duration {
        self.membership_timeout
            .min(self.lock_timeout)
            .min(self.leader_timeout)
    }

    pub(crate) fn address(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// The TTL written for a lease of `d`: whole seconds, plus two, so that a key
/// written with it outlives `sent + d` on the server. memcached's clock is a
/// whole-seconds reading that a timer of its main thread refreshes about once a
/// second, and an item written with `T<n>` expires when that reading reaches the
/// one at the write plus `n`. The reading at the write can be stale by up to a
/// second in the steady state (`n - 1` seconds of life), and by up to two when
/// the timer, which re-arms itself a second after it runs, drifts across a
/// second boundary or runs late on a loaded machine (`n - 2`; a CLI partition
/// test caught a leader key dropped 1.7 s after a renewal written with `T3`).
pub(crate) fn ttl_arg(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0) + 2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_options() {
        let c = MemcachedConfig::from_url_str("memcached://").unwrap();
        assert_eq!((c.host.as_str(), c.port), ("localhost", DEFAULT_PORT));
        assert_eq!(c.heartbeat_interval(), DEFAULT_TIMEOUT);
        let c = MemcachedConfig::from_url_str(
            "memcached://h?timeout=4&leader_timeout=3&executor=sync&max_pool_size=2",
        )
        .unwrap();
        assert_eq!(c.heartbeat_interval(), Duration::from_secs(3));
        assert_eq!(c.max_pool_size, 2);
        assert_eq!(c.watch_interval, Duration::from_millis(500));
        let c = MemcachedConfig::from_url_str("memcached://h?watch_interval=0.1").unwrap();
        assert_eq!(c.watch_interval, Duration::from_millis(100));
    }

    #[test]
    fn refusals_name_the_option() {
        for (url, opt) in [
            ("memcached://h?use_ssl=true", "use_ssl"),
            ("memcached://h?ca_cert=/x", "ca_cert"),
            ("memcached://h?executor=eventlet", "executor"),
            ("memcached://h?timeout=0.1", "timeout"),
            ("memcached://h?bogus=1", "bogus"),
            ("memcached://h?watch_interval=0", "watch_interval"),
            ("memcached://h?watch_interval=-1", "watch_interval"),
            ("memcached://h?watch_interval=soon", "watch_interval"),
        ] {
            match MemcachedConfig::from_url_str(url) {
                Err(ToozError::InvalidOption { option, .. }) => assert_eq!(option, opt, "{url}"),
                other => panic!("{url}: {other:?}"),
            }
        }
        assert!(MemcachedConfig::from_url_str("memcached://h?use_ssl=false").is_ok());
    }

    #[test]
    fn ttls_cover_the_clock_tick() {
        assert_eq!(ttl_arg(Duration::from_secs(2)), 4);
        assert_eq!(ttl_arg(Duration::from_millis(1500)), 4);
    }
}
