//! The error taxonomy shared by every driver.
//!
//! Every fallible call of this library returns [`ToozError`]. Variants name the
//! situation a caller acts on (the group does not exist, the member already joined,
//! the backend is unreachable) and carry the subject they are about. Use
//! [`ToozError::is_retryable`] to decide whether trying again can help.

use std::fmt;

use crate::ids::{GroupId, LockName, MemberId};

/// A boxed error from a backend client library.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The result type of this library.
pub type Result<T, E = ToozError> = std::result::Result<T, E>;

/// Everything that can go wrong when talking to a coordination backend.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ToozError {
    /// The group does not exist (create it first, or use `join_group_create`).
    #[error("group {0} does not exist")]
    GroupNotCreated(GroupId),
    /// `create_group` on a group that already exists.
    #[error("group {0} already exists")]
    GroupAlreadyExist(GroupId),
    /// `delete_group` on a group that still has members.
    #[error("group {0} is not empty")]
    GroupNotEmpty(GroupId),
    /// The member id already joined the group (possibly from another coordinator).
    #[error("member {member} has already joined group {group}")]
    MemberAlreadyExist {
        /// The group.
        group: GroupId,
        /// The member.
        member: MemberId,
    },
    /// The member is not part of the group.
    #[error("member {member} has not joined group {group}")]
    MemberNotJoined {
        /// The group.
        group: GroupId,
        /// The member.
        member: MemberId,
    },
    /// `unwatch_*` with a watch id that is not registered (for that group and kind).
    #[error("watch callback {watch} is not registered on group {group}")]
    WatchCallbackNotFound {
        /// The group named in the call.
        group: GroupId,
        /// The watch id that was not found.
        watch: u64,
    },
    /// A lock could not be acquired where acquiring was required (a guard or `lock` helper).
    #[error("acquiring lock {0} failed")]
    LockAcquireFailed(LockName),
    /// The lock was held but is no longer (lease expired, broken by someone else).
    #[error("lock {0} was lost")]
    LockLost(LockName),
    /// The operation did not finish in time.
    #[error("operation timed out: {0}")]
    OperationTimedOut(String),
    /// The backend cannot be reached. Retrying later may help.
    #[error("cannot reach the {} backend: {message}", driver_label(driver))]
    Connection {
        /// The driver that failed (`""` when unknown).
        driver: &'static str,
        /// What failed.
        message: String,
        /// The underlying error.
        #[source]
        source: Option<BoxError>,
    },
    /// The coordinator has not been started (call `start` first).
    #[error("the coordinator is not started")]
    NotStarted,
    /// `start` on a coordinator that is already started.
    #[error("the coordinator is already started")]
    AlreadyStarted,
    /// The coordinator was stopped while the call waited.
    #[error("the coordinator was stopped")]
    Stopped,
    /// The driver lacks characteristics the caller required.
    #[error(
        "driver {driver} does not offer the required characteristics: missing {missing:?} (desired {desired:?}, available {available:?})"
    )]
    DriverChosenPoorly {
        /// The driver name.
        driver: String,
        /// What was asked for.
        desired: Vec<String>,
        /// What the driver offers.
        available: Vec<String>,
        /// What is missing.
        missing: Vec<String>,
    },
    /// The backend URL is malformed or names no registered driver.
    #[error("invalid URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as given (password removed).
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An option (URL query or explicit) is unknown or has a bad value.
    #[error("invalid option {option:?} for driver {driver}: {reason}")]
    InvalidOption {
        /// The driver name.
        driver: String,
        /// The option name.
        option: String,
        /// What was expected.
        reason: String,
    },
    /// An id (group, member, lock name) the backend cannot store safely.
    #[error("invalid {kind} {id}: {reason}")]
    InvalidId {
        /// "group id", "member id" or "lock name".
        kind: &'static str,
        /// The offending id (lossless display).
        id: String,
        /// Why it is refused.
        reason: String,
    },
    /// Encoding or decoding of stored data failed.
    #[error("serialization failed: {message}")]
    Serialization {
        /// What failed.
        message: String,
        /// The underlying error.
        #[source]
        source: Option<BoxError>,
    },
    /// The driver lacks this operation. None of this project's drivers returns it.
    #[error("{operation} is not implemented by driver {driver}")]
    NotImplemented {
        /// The driver name.
        driver: String,
        /// The operation.
        operation: String,
    },
    /// Any other backend failure.
    #[error("{} backend error: {message}", driver_label(driver))]
    Backend {
        /// The driver that failed (`""` when unknown).
        driver: &'static str,
        /// What failed.
        message: String,
        /// The underlying error.
        #[source]
        source: Option<BoxError>,
        /// Whether retrying may help.
        retryable: bool,
    },
}

/// `redis` in "cannot reach the redis backend"; nothing for an unknown driver.
fn driver_label(driver: &str) -> &str {
    driver
}

impl ToozError {
    /// The driver a [`Connection`](ToozError::Connection) or
    /// [`Backend`](ToozError::Backend) error came from, if known.
    pub fn driver(&self) -> Option<&'static str> {
        match self {
            ToozError::Connection { driver, .. } | ToozError::Backend { driver, .. }
                if !driver.is_empty() =>
            {
                Some(driver)
            }
            _ => None,
        }
    }

    /// Whether retrying the same call later can succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            ToozError::Connection { .. } | ToozError::OperationTimedOut(_) => true,
            ToozError::Backend { retryable, .. } => *retryable,
            _ => false,
        }
    }

    /// A [`ToozError::Connection`] of `driver` from a message and a cause.
    pub fn connection(
        driver: &'static str,
        message: impl fmt::Display,
        source: impl Into<BoxError>,
    ) -> Self {
        ToozError::Connection {
            driver,
            message: message.to_string(),
            source: Some(source.into()),
        }
    }

    /// A non-retryable [`ToozError::Backend`] of `driver` from a message and a cause.
    pub fn backend(
        driver: &'static str,
        message: impl fmt::Display,
        source: impl Into<BoxError>,
    ) -> Self {
        ToozError::Backend {
            driver,
            message: message.to_string(),
            source: Some(source.into()),
            retryable: false,
        }
    }

    /// A [`ToozError::Backend`] of `driver` carrying only a message.
    pub fn backend_msg(driver: &'static str, message: impl fmt::Display) -> Self {
        ToozError::Backend {
            driver,
            message: message.to_string(),
            source: None,
            retryable: false,
        }
    }

    /// A [`ToozError::Serialization`] from a message and a cause.
    pub fn serialization(message: impl fmt::Display, source: impl Into<BoxError>) -> Self {
        ToozError::Serialization {
            message: message.to_string(),
            source: Some(source.into()),
        }
    }

    /// A [`ToozError::InvalidOption`].
    pub fn invalid_option(
        driver: impl fmt::Display,
        option: impl fmt::Display,
        reason: impl fmt::Display,
    ) -> Self {
        ToozError::InvalidOption {
            driver: driver.to_string(),
            option: option.to_string(),
            reason: reason.to_string(),
        }
    }

    /// A [`ToozError::InvalidUrl`].
    pub fn invalid_url(url: impl fmt::Display, reason: impl fmt::Display) -> Self {
        ToozError::InvalidUrl {
            url: url.to_string(),
            reason: reason.to_string(),
        }
    }
}

impl From<std::io::Error> for ToozError {
    fn from(e: std::io::Error) -> Self {
        ToozError::Backend {
            driver: "",
            message: e.to_string(),
            source: Some(Box::new(e)),
            retryable: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retryable_classification() {
        assert!(ToozError::connection("redis", "x", std::io::Error::other("y")).is_retryable());
        assert!(!ToozError::GroupNotCreated("g".into()).is_retryable());
        let msg = ToozError::MemberNotJoined {
            group: "g".into(),
            member: "m".into(),
        }
        .to_string();
        assert_eq!(msg, "member m has not joined group g");
    }

    #[test]
    fn backend_errors_name_their_driver() {
        let e = ToozError::connection("redis", "at h:1", std::io::Error::other("refused"));
        assert_eq!(e.driver(), Some("redis"));
        assert_eq!(e.to_string(), "cannot reach the redis backend: at h:1");
        let e = ToozError::backend_msg("etcd3", "odd reply");
        assert_eq!(e.driver(), Some("etcd3"));
        assert_eq!(e.to_string(), "etcd3 backend error: odd reply");
        let e = ToozError::from(std::io::Error::other("disk"));
        assert_eq!(e.driver(), None);
    }
}
