//! `file://DIRECTORY[?timeout=SECS]`: URL and options.

use std::path::PathBuf;
use std::time::Duration;

use tooz_core::options::{redact_url, redact_url_str};
use tooz_core::{ConnectRequest, Options, Result, ToozError, Url};

/// The driver name, as used in errors.
pub(crate) const NAME: &str = "file";

/// Options this driver accepts (`executor` is Python's and ignored).
const KNOWN: &[&str] = &["timeout", "executor"];

/// The default membership timeout (Python tooz: 10 seconds).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Settings of a file driver.
///
/// ```
/// use std::time::Duration;
/// use tooz_file::FileConfig;
///
/// let c = FileConfig::from_url_str("file:///var/lib/app/tooz?timeout=5").unwrap();
/// assert_eq!(c.directory.to_str(), Some("/var/lib/app/tooz"));
/// assert_eq!(c.timeout, Duration::from_secs(5));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct FileConfig {
    /// The shared coordination directory.
    pub directory: PathBuf,
    /// How long a Python member stays visible without heartbeating; also the
    /// heartbeat interval this driver asks for (beats are sent at half of it).
    pub timeout: Duration,
}

impl FileConfig {
    /// Settings for `directory` with the default timeout.
    pub fn new(directory: impl Into<PathBuf>) -> Self {
        FileConfig {
            directory: directory.into(),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Sets the timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Parses a `file://` URL with its query options.
    ///
    /// # Errors
    /// `InvalidUrl` for another scheme, a host name or an empty path;
    /// `InvalidOption` for an unknown option or a bad `timeout` (not a number of
    /// seconds, or shorter than [`tooz_core::options::MIN_LEASE`]).
    pub fn from_url_str(url: &str) -> Result<Self> {
        let parsed = Url::parse(url).map_err(|e| ToozError::invalid_url(redact_url_str(url), e))?;
        Self::from_url(&parsed, &Options::from_url(&parsed))
    }

    /// Builds the settings from a parsed URL and its (possibly overridden) options.
    ///
    /// # Errors
    /// As [`FileConfig::from_url_str`].
    pub fn from_url(url: &Url, options: &Options) -> Result<Self> {
        if url.scheme() != "file" {
            return Err(ToozError::invalid_url(
                redact_url(url),
                format!(
                    "the file driver serves file:// URLs, not {}://",
                    url.scheme()
                ),
            ));
        }
        let directory = url.to_file_path().map_err(|()| {
            ToozError::invalid_url(
                redact_url(url),
                "expected file:///ABSOLUTE/DIRECTORY (three slashes, no host name)",
            )
        })?;
        if directory.as_os_str().is_empty() || directory == std::path::Path::new("/") {
            return Err(ToozError::invalid_url(
                redact_url(url),
                "the URL must name a directory other than /",
            ));
        }
        options.check_known(NAME, KNOWN)?;
        let timeout = options
            .lease_secs(NAME, "timeout")?
            .unwrap_or(DEFAULT_TIMEOUT);
        Ok(FileConfig { directory, timeout })
    }

    pub(crate) fn from_request(req: &ConnectRequest<'_>) -> Result<Self> {
        Self::from_url(req.url, req.options)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_url_and_options() {
        let c = FileConfig::from_url_str("file:///tmp/x").unwrap();
        assert_eq!(c, FileConfig::new("/tmp/x"));
        let c =
            FileConfig::from_url_str("file:///tmp/a%20b?timeout=2.5&executor=threaded").unwrap();
        assert_eq!(c.directory, PathBuf::from("/tmp/a b"));
        assert_eq!(c.timeout, Duration::from_millis(2500));
        // The lease floor is accepted.
        let c = FileConfig::from_url_str("file:///tmp/x?timeout=1").unwrap();
        assert_eq!(c.timeout, Duration::from_secs(1));
    }

    #[test]
    fn rejects_bad_input() {
        let e = FileConfig::from_url_str("file:///tmp/x?timout=3").unwrap_err();
        assert!(
            matches!(&e, ToozError::InvalidOption { option, .. } if option == "timout"),
            "{e}"
        );
        for bad in [
            "file:///tmp/x?timeout=abc",
            "file:///tmp/x?timeout=-1",
            "file:///tmp/x?timeout=0.001",
            "file:///tmp/x?timeout=0",
        ] {
            assert!(
                matches!(
                    FileConfig::from_url_str(bad),
                    Err(ToozError::InvalidOption { .. })
                ),
                "{bad}"
            );
        }
        for bad in ["file://host/tmp/x", "file:///", "redis://h/x", "not a url"] {
            assert!(
                matches!(
                    FileConfig::from_url_str(bad),
                    Err(ToozError::InvalidUrl { .. })
                ),
                "{bad}"
            );
        }
    }
}
