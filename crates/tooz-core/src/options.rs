//! Backend URLs and their options, parsed the way Python tooz's `get_coordinator` does.
//!
//! The query string is split into a multi-map (repeated keys accumulate, blank values
//! are dropped); options given explicitly replace URL options of the same name. Drivers
//! read typed values with [`Options::parse`], [`Options::duration_secs`] and
//! [`Options::bool`], and reject unknown keys with [`Options::check_known`], so a
//! misspelt option is an error that names it instead of being ignored.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::str::FromStr;
use std::time::Duration;

use url::Url;

use crate::error::{Result, ToozError};

/// The shortest lease (TTL, session timeout) a driver accepts: see [`Options::lease_secs`].
pub const MIN_LEASE: Duration = Duration::from_secs(1);

/// Options of one coordinator: URL query values overridden by explicit ones.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options {
    values: BTreeMap<String, Vec<String>>,
}

impl Options {
    /// Reads the query of a URL (`?a=1&a=2&b=` gives `a: [1, 2]`; `b` is dropped).
    pub fn from_url(url: &Url) -> Self {
        let mut values: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (k, v) in url.query_pairs() {
            if v.is_empty() {
                continue;
            }
            values
                .entry(k.into_owned())
                .or_default()
                .push(v.into_owned());
        }
        Options { values }
    }

    /// Sets an option, replacing every URL value of that name.
    pub fn set(&mut self, key: impl Into<String>, value: impl Into<String>) {
        self.values.insert(key.into(), vec![value.into()]);
    }

    /// Removes an option, returning its values (for options the core reads itself
    /// before the driver sees the rest).
    pub fn remove(&mut self, key: &str) -> Vec<String> {
        self.values.remove(key).unwrap_or_default()
    }

    /// The last value of an option, as Python tooz's `collapse` keeps it.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.values
            .get(key)
            .and_then(|v| v.last())
            .map(String::as_str)
    }

    /// Every value of an option, in order.
    pub fn get_all(&self, key: &str) -> &[String] {
        self.values.get(key).map_or(&[], Vec::as_slice)
    }

    /// Whether the option is present.
    pub fn contains(&self, key: &str) -> bool {
        self.values.contains_key(key)
    }

    /// The option names present.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.values.keys().map(String::as_str)
    }

    /// Parses an option with `FromStr`.
    ///
    /// # Errors
    /// [`ToozError::InvalidOption`] naming the option and the expected type.
    pub fn parse<T>(&self, driver: &str, key: &str, expected: &str) -> Result<Option<T>>
    where
        T: FromStr,
        T::Err: Display,
    {
        match self.get(key) {
            None => Ok(None),
            Some(raw) => raw.trim().parse::<T>().map(Some).map_err(|e| {
                ToozError::invalid_option(
                    driver,
                    key,
                    format!("expected {expected}, got {raw:?} ({e})"),
                )
            }),
        }
    }

    /// Parses a duration given in (possibly fractional) seconds; must be positive.
    ///
    /// # Errors
    /// [`ToozError::InvalidOption`] for a value that is not a positive number.
    pub fn duration_secs(&self, driver: &str, key: &str) -> Result<Option<Duration>> {
        let Some(secs) = self.parse::<f64>(driver, key, "a number of seconds")? else {
            return Ok(None);
        };
        if !secs.is_finite() || secs <= 0.0 || secs > 1e9 {
            return Err(ToozError::invalid_option(
                driver,
                key,
                format!("expected a positive number of seconds, got {secs}"),
            ));
        }
        Ok(Some(Duration::from_secs_f64(secs)))
    }

    /// Parses a lease length in seconds (a TTL, a session timeout): like
    /// [`Options::duration_secs`], and at least [`MIN_LEASE`]. A shorter lease would
    /// make the heartbeat spin and leave no room to signal a loss before the backend
    /// frees what the lease held.
    ///
    /// ```
    /// # use tooz_core::{Options, Url};
    /// let o = Options::from_url(&Url::parse("redis://h/?timeout=0.001&lock_timeout=2").unwrap());
    /// assert!(o.lease_secs("redis", "timeout").is_err());
    /// assert_eq!(o.lease_secs("redis", "lock_timeout").unwrap(), Some(std::time::Duration::from_secs(2)));
    /// ```
    ///
    /// # Errors
    /// [`ToozError::InvalidOption`] for a value that is not a number of seconds of at
    /// least [`MIN_LEASE`].
    pub fn lease_secs(&self, driver: &str, key: &str) -> Result<Option<Duration>> {
        let Some(d) = self.duration_secs(driver, key)? else {
            return Ok(None);
        };
        if d < MIN_LEASE {
            return Err(ToozError::invalid_option(
                driver,
                key,
                format!(
                    "a lease of {}s is too short: at least {}s is needed to renew it and to signal its loss in time",
                    d.as_secs_f64(),
                    MIN_LEASE.as_secs_f64()
                ),
            ));
        }
        Ok(Some(d))
    }

    /// Reads `timeout` (default `default`) and `membership_timeout`/`lock_timeout`
    /// (default: `timeout`), each a lease of at least [`MIN_LEASE`].
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use tooz_core::{Options, Url};
    /// let o = Options::from_url(&Url::parse("redis://h/?timeout=10&lock_timeout=3").unwrap());
    /// let t = o.lease_timeouts("redis", Duration::from_secs(30)).unwrap();
    /// assert_eq!((t.timeout, t.membership_timeout, t.lock_timeout),
    ///            (Duration::from_secs(10), Duration::from_secs(10), Duration::from_secs(3)));
    /// assert_eq!(t.shortest(), Duration::from_secs(3));
    /// ```
    ///
    /// # Errors
    /// [`ToozError::InvalidOption`] naming the option.
    pub fn lease_timeouts(&self, driver: &str, default: Duration) -> Result<LeaseTimeouts> {
        let timeout = self.lease_secs(driver, "timeout")?.unwrap_or(default);
        Ok(LeaseTimeouts {
            timeout,
            membership_timeout: self
                .lease_secs(driver, "membership_timeout")?
                .unwrap_or(timeout),
            lock_timeout: self.lease_secs(driver, "lock_timeout")?.unwrap_or(timeout),
        })
    }

    /// Parses a boolean the way oslo's `strutils.bool_from_string` does
    /// (`1/0`, `true/false`, `yes/no`, `on/off`, `y/n`, `t/f`).
    ///
    /// # Errors
    /// [`ToozError::InvalidOption`] for any other value.
    pub fn bool(&self, driver: &str, key: &str) -> Result<Option<bool>> {
        let Some(raw) = self.get(key) else {
            return Ok(None);
        };
        match raw.trim().to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" | "y" | "t" => Ok(Some(true)),
            "0" | "false" | "no" | "off" | "n" | "f" => Ok(Some(false)),
            _ => Err(ToozError::invalid_option(
                driver,
                key,
                format!("expected a boolean (true/false, yes/no, 1/0), got {raw:?}"),
            )),
        }
    }

    /// Rejects option names not in `known`.
    ///
    /// # Errors
    /// [`ToozError::InvalidOption`] naming the first unknown option and listing the known ones.
    pub fn check_known(&self, driver: &str, known: &[&str]) -> Result<()> {
        for key in self.values.keys() {
            if !known.contains(&key.as_str()) {
                return Err(ToozError::invalid_option(
                    driver,
                    key,
                    format!("unknown option; known options are: {}", known.join(", ")),
                ));
            }
        }
        Ok(())
    }
}

/// The lease options most drivers share with Python tooz: `timeout`, and
/// `membership_timeout` and `lock_timeout` defaulting to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct LeaseTimeouts {
    /// `timeout`.
    pub timeout: Duration,
    /// `membership_timeout` (default: `timeout`).
    pub membership_timeout: Duration,
    /// `lock_timeout` (default: `timeout`).
    pub lock_timeout: Duration,
}

impl LeaseTimeouts {
    /// The shortest of the membership and lock TTLs: what one heartbeat must beat.
    pub fn shortest(&self) -> Duration {
        self.membership_timeout.min(self.lock_timeout)
    }
}

/// Decodes `%XX` escapes of a URL component (user, password, path), keeping any
/// malformed escape as it is; invalid UTF-8 becomes U+FFFD.
///
/// ```
/// assert_eq!(tooz_core::options::percent_decode("p%40ss%2Fw"), "p@ss/w");
/// assert_eq!(tooz_core::options::percent_decode("100%"), "100%");
/// ```
pub fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Some(v) = std::str::from_utf8(&b[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The host of a URL as text (IPv6 without brackets), or `None` when it has none.
///
/// ```
/// let u = tooz_core::Url::parse("redis://[::1]:6379/0").unwrap();
/// assert_eq!(tooz_core::options::host_of(&u).as_deref(), Some("::1"));
/// ```
pub fn host_of(url: &Url) -> Option<String> {
    match url.host()? {
        url::Host::Domain("") => None,
        url::Host::Domain(d) => Some(d.to_string()),
        url::Host::Ipv4(a) => Some(a.to_string()),
        url::Host::Ipv6(a) => Some(a.to_string()),
    }
}

/// Parses a backend URL, also accepting an authority that lists several
/// comma-separated hosts with their own ports (`zookeeper://h1:2181,h2:2182/x`, as
/// Python tooz passes its netloc to kazoo), which URL syntax does not allow: when the
/// plain parse fails and the authority holds a comma, the `:`, `[` and `]` of the host
/// list are percent-encoded, so the whole list becomes the URL's host (`host_str()`
/// returns it encoded, without a port) for the driver to split.
///
/// ```
/// let u = tooz_core::options::parse_backend_url("zookeeper://u:p@h1:2181,h2:2182/x?a=1").unwrap();
/// assert_eq!(u.host_str(), Some("h1%3A2181,h2%3A2182"));
/// assert_eq!((u.username(), u.port(), u.path()), ("u", None, "/x"));
/// assert!(tooz_core::options::parse_backend_url("redis://h:99999").is_err());
/// ```
///
/// # Errors
/// The plain parse's error when the fallback does not apply or does not parse either.
pub fn parse_backend_url(url: &str) -> std::result::Result<Url, url::ParseError> {
    let err = match Url::parse(url) {
        Ok(u) => return Ok(u),
        Err(e) => e,
    };
    let Some(start) = url.find("://").map(|i| i + 3) else {
        return Err(err);
    };
    let rest = &url[start..];
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..end];
    let hosts_at = authority.rfind('@').map_or(0, |i| i + 1);
    let hosts = &authority[hosts_at..];
    if !hosts.contains(',') {
        return Err(err);
    }
    let encoded = hosts
        .replace(':', "%3A")
        .replace('[', "%5B")
        .replace(']', "%5D");
    let rebuilt = format!("{}{encoded}{}", &url[..start + hosts_at], &rest[end..]);
    Url::parse(&rebuilt).map_err(|_| err)
}

/// Renders a URL for messages with its password replaced by `***`.
pub fn redact_url(url: &Url) -> String {
    if url.password().is_some() {
        let mut u = url.clone();
        // Setting a password only fails for URLs that cannot have one.
        let _ = u.set_password(Some("***"));
        u.to_string()
    } else {
        url.to_string()
    }
}

/// Redacts a URL given as text (best effort when it does not parse: whatever
/// follows the first `:` of the user info is hidden).
pub fn redact_url_str(url: &str) -> String {
    if let Ok(u) = Url::parse(url) {
        return redact_url(&u);
    }
    let Some(start) = url.find("://").map(|i| i + 3) else {
        return url.to_string();
    };
    let rest = &url[start..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some(at) = authority.rfind('@') else {
        return url.to_string();
    };
    match authority[..at].find(':') {
        Some(colon) => format!(
            "{}{}:***{}",
            &url[..start],
            &authority[..colon],
            &url[start + at..]
        ),
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_semantics_like_parse_qs() {
        let url = Url::parse("file:///tmp/x?timeout=3&timeout=7&blank=&b=1").unwrap();
        let mut o = Options::from_url(&url);
        assert_eq!(o.get("timeout"), Some("7"));
        assert_eq!(o.get_all("timeout"), ["3", "7"]);
        assert!(!o.contains("blank"));
        o.set("timeout", "5");
        assert_eq!(o.get_all("timeout"), ["5"]);
        assert_eq!(
            o.duration_secs("file", "timeout").unwrap(),
            Some(Duration::from_secs(5))
        );
        assert!(o.check_known("file", &["timeout"]).is_err());
        assert!(o.check_known("file", &["timeout", "b"]).is_ok());
    }

    #[test]
    fn bad_values_name_the_option() {
        let url = Url::parse("redis://h/?timeout=abc&ssl=maybe&t2=-1").unwrap();
        let o = Options::from_url(&url);
        let e = o.duration_secs("redis", "timeout").unwrap_err().to_string();
        assert!(e.contains("timeout") && e.contains("abc"), "{e}");
        assert!(o.bool("redis", "ssl").is_err());
        assert!(o.duration_secs("redis", "t2").is_err());
    }

    #[test]
    fn host_lists_with_ports_parse() {
        let u = parse_backend_url("zookeeper://a:p@ss@h1:1,[::1]:2,h3/c?x=1#f").unwrap();
        assert_eq!(u.host_str(), Some("h1%3A1,%5B%3A%3A1%5D%3A2,h3"));
        assert_eq!((u.username(), u.password()), ("a", Some("p%40ss")));
        assert_eq!((u.path(), u.query()), ("/c", Some("x=1")));
        // Plain URLs are untouched; malformed ones without a host list still fail.
        assert_eq!(parse_backend_url("redis://h:1/0").unwrap().port(), Some(1));
        assert!(parse_backend_url("redis://[::1").is_err());
        assert!(parse_backend_url("not a url").is_err());
    }

    #[test]
    fn redaction() {
        let u = Url::parse("redis://user:secret@h:1/").unwrap();
        assert_eq!(redact_url(&u), "redis://user:***@h:1/");
    }

    #[test]
    fn redaction_of_unparsable_urls() {
        // An invalid port makes the URL unparsable: the password must still go.
        let r = redact_url_str("redis://user:s3cret@h:99999/0");
        assert!(!r.contains("s3cret"), "{r}");
        assert_eq!(r, "redis://user:***@h:99999/0");
        let r = redact_url_str("redis://:p@ss@h:bad/");
        assert!(!r.contains("p@ss"), "{r}");
        assert_eq!(redact_url_str("not a url"), "not a url");
        assert_eq!(redact_url_str("redis://h:bad/x@y"), "redis://h:bad/x@y");
        assert_eq!(redact_url_str("redis://u:p@h:1/"), "redis://u:***@h:1/");
    }
}
