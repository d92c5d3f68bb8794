//! `ipc://[/STATE/DIRECTORY][?timeout=SECS]`: URL and options.

use std::path::PathBuf;
use std::time::Duration;

use tooz_core::options::{redact_url, redact_url_str};
use tooz_core::{Options, Result, ToozError, Url};

/// The driver name, as used in errors.
pub(crate) const NAME: &str = "ipc";

/// Options this driver accepts (`executor` is Python's and ignored).
const KNOWN: &[&str] = &["timeout", "executor"];

/// The default heartbeat interval (nothing expires: this only paces the heart).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Settings of an IPC driver.
///
/// ```
/// use std::time::Duration;
/// use tooz_ipc::IpcConfig;
///
/// let c = IpcConfig::from_url_str("ipc://").unwrap();
/// assert_eq!(c.state_dir, tooz_ipc::default_state_dir());
/// let c = IpcConfig::from_url_str("ipc:///run/app/tooz?timeout=5").unwrap();
/// assert_eq!(c.state_dir.to_str(), Some("/run/app/tooz"));
/// assert_eq!(c.timeout, Duration::from_secs(5));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct IpcConfig {
    /// Where members, leaders and liveness files live (see the crate docs).
    pub state_dir: PathBuf,
    /// The interval `heartbeat` returns. Nothing expires on a timer.
    pub timeout: Duration,
}

impl IpcConfig {
    /// Parses an `ipc://` URL with its query options.
    ///
    /// # Errors
    /// `InvalidUrl` for another scheme, a host name or a relative path;
    /// `InvalidOption` for an unknown option or a bad `timeout`.
    pub fn from_url_str(url: &str) -> Result<Self> {
        let parsed = Url::parse(url).map_err(|e| ToozError::invalid_url(redact_url_str(url), e))?;
        Self::from_url(&parsed, &Options::from_url(&parsed))
    }

    /// Builds the settings from a parsed URL and its (possibly overridden) options.
    ///
    /// # Errors
    /// As [`IpcConfig::from_url_str`].
    pub fn from_url(url: &Url, options: &Options) -> Result<Self> {
        if url.scheme() != NAME {
            return Err(ToozError::invalid_url(
                redact_url(url),
                format!("the ipc driver serves ipc:// URLs, not {}://", url.scheme()),
            ));
        }
        if url.host_str().is_some_and(|h| !h.is_empty()) || url.port().is_some() {
            return Err(ToozError::invalid_url(
                redact_url(url),
                "ipc:// takes no host (one host only): use ipc:// or ipc:///STATE/DIRECTORY",
            ));
        }
        let path = url.path();
        let state_dir = if path.is_empty() || path == "/" {
            crate::state::default_root()
        } else {
            url.to_file_path().map_err(|()| {
                ToozError::invalid_url(redact_url(url), "the state directory must be absolute")
            })?
        };
        options.check_known(NAME, KNOWN)?;
        let timeout = options
            .lease_secs(NAME, "timeout")?
            .unwrap_or(DEFAULT_TIMEOUT);
        Ok(IpcConfig { state_dir, timeout })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_input() {
        for bad in ["ipc://host/x", "ipc://:5", "file:///tmp", "not a url"] {
            assert!(
                matches!(
                    IpcConfig::from_url_str(bad),
                    Err(ToozError::InvalidUrl { .. })
                ),
                "{bad}"
            );
        }
        for bad in ["ipc://?timeout=x", "ipc://?timeout=0", "ipc://?bogus=1"] {
            assert!(
                matches!(
                    IpcConfig::from_url_str(bad),
                    Err(ToozError::InvalidOption { .. })
                ),
                "{bad}"
            );
        }
        assert!(IpcConfig::from_url_str("ipc://?executor=threaded").is_ok());
    }
}
