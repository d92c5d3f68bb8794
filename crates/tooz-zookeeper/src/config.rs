//! `zookeeper://[USER:PASS@]HOST[:PORT][/CHROOT][?OPTIONS]` (alias `kazoo://`):
//! URL and options.
//!
//! The options are Python tooz's (spec §11.5). An unknown option is an
//! [`InvalidOption`](tooz_core::ToozError::InvalidOption) error instead of being
//! ignored.

use std::time::Duration;

use tooz_core::options::{parse_backend_url, redact_url, redact_url_str};
use tooz_core::{ConnectRequest, Options, Result, ToozError, Url};

/// The driver name, as used in errors.
pub(crate) const NAME: &str = "zookeeper";

/// Every option this driver accepts.
pub const KNOWN_OPTIONS: &[&str] = &[
    "timeout",
    "namespace",
    "hosts",
    "handler",
    "randomize_hosts",
    "connection_retry",
    "command_retry",
    "use_ssl",
    "verify_certs",
    "ca",
    "certfile",
    "keyfile",
    "keyfile_password",
    "container_parents",
];

/// Python tooz's default `timeout`: the session timeout asked of the server and
/// the longest `start` waits for a session.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Python tooz's default namespace (the top znode, `/tooz`).
pub const DEFAULT_NAMESPACE: &str = "tooz";

/// The default ZooKeeper client port.
pub const DEFAULT_PORT: u16 = 2181;

/// The `handler` values Python tooz accepts (ignored here: the client is async).
const HANDLERS: &[&str] = &["threading", "eventlet"];

/// Settings of a ZooKeeper driver, parsed from its URL and options.
///
/// ```
/// use std::time::Duration;
/// use tooz_zookeeper::ZookeeperConfig;
///
/// let c = ZookeeperConfig::from_url_str(
///     "zookeeper://zk1:2181,zk2:2182/apps?timeout=5&namespace=billing&hosts=zk3:2183",
/// )
/// .unwrap();
/// assert_eq!(c.hosts, ["zk1:2181", "zk2:2182", "zk3:2183"]);
/// assert_eq!(c.chroot, "/apps");
/// assert_eq!(c.namespace, "billing");
/// assert_eq!(c.timeout, Duration::from_secs(5));
/// assert_eq!(c.base_path(), "/apps/billing");
/// ```
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ZookeeperConfig {
    /// `host:port` of every server: the URL's host list, then every `hosts` option.
    pub hosts: Vec<String>,
    /// The chroot from the URL path (`""` for none, else `/a/b`).
    pub chroot: String,
    /// The top znode under the chroot (`namespace`, default `tooz`).
    pub namespace: String,
    /// Session timeout asked of the server, and the longest `start` waits (`timeout`).
    pub timeout: Duration,
    /// `USER:PASS` from the URL: digest authentication, and znodes created with an
    /// ACL that grants everything to that user only.
    pub digest: Option<(String, String)>,
    /// Whether lock and election directories are made as CONTAINER znodes, which
    /// the server deletes once they are empty (`container_parents`, default
    /// `true`); `false` makes them persistent, as Python's kazoo does.
    pub container_parents: bool,
}

impl std::fmt::Debug for ZookeeperConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZookeeperConfig")
            .field("hosts", &self.hosts)
            .field("chroot", &self.chroot)
            .field("namespace", &self.namespace)
            .field("timeout", &self.timeout)
            .field("digest", &self.digest.as_ref().map(|(u, _)| (u, "***")))
            .field("container_parents", &self.container_parents)
            .finish()
    }
}

fn decode(s: &str) -> String {
    tooz_core::options::percent_decode(s)
}

/// Checks a `/`-separated znode path made of user text: no empty, `.` or `..`
/// segments, no characters ZooKeeper refuses.
fn check_path_text(what: &str, text: &str) -> std::result::Result<(), String> {
    for seg in text.split('/') {
        if seg.is_empty() {
            return Err(format!("{what} {text:?} has an empty path segment"));
        }
        if seg == "." || seg == ".." {
            return Err(format!("{what} {text:?} has a relative segment {seg:?}"));
        }
        if let Some(c) = seg.chars().find(|c| !crate::layout::is_allowed_char(*c)) {
            return Err(format!(
                "{what} {text:?} has a character ZooKeeper refuses in paths ({c:?})"
            ));
        }
    }
    Ok(())
}

fn host_port(item: &str, default_port: u16) -> std::result::Result<String, String> {
    let item = item.trim();
    if item.is_empty() {
        return Err("empty host".into());
    }
    if item.starts_with('[') {
        // [v6]:port
        let end = item
            .find(']')
            .ok_or_else(|| format!("unterminated IPv6 address in {item:?}"))?;
        let rest = &item[end + 1..];
        return match rest.strip_prefix(':') {
            Some(p) => {
                let port: u16 = p.parse().map_err(|_| format!("bad port in {item:?}"))?;
                Ok(format!("{}:{port}", &item[..=end]))
            }
            None if rest.is_empty() => Ok(format!("{}:{default_port}", &item[..=end])),
            None => Err(format!("bad address {item:?}")),
        };
    }
    match item.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => {
            if h.is_empty() {
                return Err(format!("empty host in {item:?}"));
            }
            let port: u16 = p
                .parse()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("bad port in {item:?}"))?;
            Ok(format!("{h}:{port}"))
        }
        Some(_) => Ok(format!("[{item}]:{default_port}")),
        None => Ok(format!("{item}:{default_port}")),
    }
}

impl ZookeeperConfig {
    /// Parses a `zookeeper://` (or `kazoo://`) URL with its query options.
    ///
    /// # Errors
    /// `InvalidUrl` for another scheme or a bad host list or chroot;
    /// `InvalidOption` for an unknown option or a bad value.
    pub fn from_url_str(url: &str) -> Result<Self> {
        let parsed =
            parse_backend_url(url).map_err(|e| ToozError::invalid_url(redact_url_str(url), e))?;
        Self::from_url(&parsed, &Options::from_url(&parsed))
    }

    /// The factory's entry point.
    pub(crate) fn from_request(req: &ConnectRequest<'_>) -> Result<Self> {
        Self::from_url(req.url, req.options)
    }

    /// Builds the settings from a parsed URL and its (possibly overridden) options.
    ///
    /// # Errors
    /// As [`ZookeeperConfig::from_url_str`].
    pub fn from_url(url: &Url, options: &Options) -> Result<Self> {
        let bad_url = |reason: &str| ToozError::invalid_url(redact_url(url), reason);
        let scheme = url.scheme();
        if scheme != "zookeeper" && scheme != "kazoo" {
            return Err(bad_url(&format!(
                "the zookeeper driver serves zookeeper:// and kazoo:// URLs, not {scheme}://"
            )));
        }
        options.check_known(NAME, KNOWN_OPTIONS)?;

        let mut hosts = Vec::new();
        if let Some(h) = url.host_str().filter(|h| !h.is_empty()) {
            // A host list with several ports arrives percent-encoded (see
            // `tooz_core::options::parse_backend_url`).
            let h = decode(h);
            let items: Vec<&str> = h.split(',').collect();
            let last = items.len() - 1;
            for (i, item) in items.iter().enumerate() {
                let item = if i == last {
                    match url.port() {
                        Some(p) => format!("{item}:{p}"),
                        None => (*item).to_string(),
                    }
                } else {
                    (*item).to_string()
                };
                hosts.push(host_port(&item, DEFAULT_PORT).map_err(|e| bad_url(&e))?);
            }
        }
        for extra in options.get_all("hosts") {
            for item in extra.split(',').filter(|s| !s.trim().is_empty()) {
                hosts.push(
                    host_port(item, DEFAULT_PORT)
                        .map_err(|e| ToozError::invalid_option(NAME, "hosts", e))?,
                );
            }
        }
        if hosts.is_empty() {
            hosts.push(format!("localhost:{DEFAULT_PORT}"));
        }

        let path = decode(url.path());
        let trimmed = path.trim_end_matches('/');
        let chroot = if trimmed.is_empty() {
            String::new()
        } else {
            check_path_text("chroot", &trimmed[1..]).map_err(|e| bad_url(&e))?;
            trimmed.to_string()
        };

        let timeout = options
            .lease_secs(NAME, "timeout")?
            .unwrap_or(DEFAULT_TIMEOUT);
        let namespace = options
            .get("namespace")
            .unwrap_or(DEFAULT_NAMESPACE)
            .trim_matches('/')
            .to_string();
        if namespace.is_empty() {
            return Err(ToozError::invalid_option(
                NAME,
                "namespace",
                "expected a non-empty znode name",
            ));
        }
        check_path_text("namespace", &namespace)
            .map_err(|e| ToozError::invalid_option(NAME, "namespace", e))?;
        if let Some(h) = options.get("handler")
            && !HANDLERS.contains(&h)
        {
            return Err(ToozError::invalid_option(
                NAME,
                "handler",
                format!(
                    "unknown handler {h:?}; valid handlers are {} (accepted and ignored: this client is async)",
                    HANDLERS.join(", ")
                ),
            ));
        }
        options.bool(NAME, "randomize_hosts")?;
        options.bool(NAME, "verify_certs")?;
        if options.bool(NAME, "use_ssl")?.unwrap_or(false) {
            return Err(ToozError::invalid_option(
                NAME,
                "use_ssl",
                "TLS connections to ZooKeeper are not supported by this driver yet",
            ));
        }

        let container_parents = options.bool(NAME, "container_parents")?.unwrap_or(true);

        let digest = match (url.username(), url.password()) {
            ("", _) | (_, None) => None,
            (u, Some(p)) => Some((decode(u), decode(p))),
        };
        Ok(ZookeeperConfig {
            hosts,
            chroot,
            namespace,
            timeout,
            digest,
            container_parents,
        })
    }

    /// The connect string handed to the client (`h1:p1,h2:p2`).
    pub fn connect_string(&self) -> String {
        self.hosts.join(",")
    }

    /// The absolute path of the namespace znode (`<chroot>/<namespace>`).
    pub fn base_path(&self) -> String {
        format!("{}/{}", self.chroot, self.namespace)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_pythons() {
        let c = ZookeeperConfig::from_url_str("zookeeper://").unwrap();
        assert_eq!(c.hosts, ["localhost:2181"]);
        assert_eq!(c.base_path(), "/tooz");
        assert_eq!(c.timeout, DEFAULT_TIMEOUT);
        assert!(c.digest.is_none());
        assert!(c.container_parents);
        let p = ZookeeperConfig::from_url_str("zookeeper://h?container_parents=false").unwrap();
        assert!(!p.container_parents);
        let k = ZookeeperConfig::from_url_str("kazoo://127.0.0.1:2182").unwrap();
        assert_eq!(k.hosts, ["127.0.0.1:2182"]);
    }

    #[test]
    fn hosts_auth_and_chroot() {
        let c = ZookeeperConfig::from_url_str(
            "zookeeper://u:p%40ss@a,b:2190/x/y/?hosts=c&hosts=[::1]:7",
        )
        .unwrap();
        assert_eq!(c.hosts, ["a:2181", "b:2190", "c:2181", "[::1]:7"]);
        assert_eq!(c.chroot, "/x/y");
        assert_eq!(c.digest, Some(("u".into(), "p@ss".into())));
        assert!(!format!("{c:?}").contains("p@ss"));
        assert_eq!(c.connect_string(), "a:2181,b:2190,c:2181,[::1]:7");
        let m =
            ZookeeperConfig::from_url_str("zookeeper://u:p@h1:2181,[::1]:2182,h3/chroot").unwrap();
        assert_eq!(m.hosts, ["h1:2181", "[::1]:2182", "h3:2181"]);
        assert_eq!(m.chroot, "/chroot");
        assert_eq!(m.digest, Some(("u".into(), "p".into())));
    }

    #[test]
    fn bad_input_is_named() {
        let e = ZookeeperConfig::from_url_str("zookeeper://h?bogus=1").unwrap_err();
        assert!(matches!(e, ToozError::InvalidOption { ref option, .. } if option == "bogus"));
        let e = ZookeeperConfig::from_url_str("zookeeper://h?timeout=abc").unwrap_err();
        assert!(matches!(e, ToozError::InvalidOption { ref option, .. } if option == "timeout"));
        // A session shorter than tooz_core::options::MIN_LEASE is refused.
        let e = ZookeeperConfig::from_url_str("zookeeper://h?timeout=0.001").unwrap_err();
        assert!(matches!(e, ToozError::InvalidOption { ref option, .. } if option == "timeout"));
        let c = ZookeeperConfig::from_url_str("zookeeper://h?timeout=1").unwrap();
        assert_eq!(c.timeout, tooz_core::options::MIN_LEASE);
        let e = ZookeeperConfig::from_url_str("zookeeper://h?handler=gevent").unwrap_err();
        assert!(matches!(e, ToozError::InvalidOption { ref option, .. } if option == "handler"));
        let e = ZookeeperConfig::from_url_str("zookeeper://h?hosts=x:notaport").unwrap_err();
        assert!(matches!(e, ToozError::InvalidOption { ref option, .. } if option == "hosts"));
        let e = ZookeeperConfig::from_url_str("zookeeper://h/a%01b").unwrap_err();
        assert!(matches!(e, ToozError::InvalidUrl { .. }), "{e}");
        let e = ZookeeperConfig::from_url_str("zookeeper://h?namespace=a//b").unwrap_err();
        assert!(matches!(e, ToozError::InvalidOption { ref option, .. } if option == "namespace"));
        let e = ZookeeperConfig::from_url_str("redis://h").unwrap_err();
        assert!(matches!(e, ToozError::InvalidUrl { .. }));
        assert!(
            ZookeeperConfig::from_url_str("zookeeper://h?handler=threading&randomize_hosts=false")
                .is_ok()
        );
    }
}
