//! etcd-client errors classified by gRPC status code, and mapped to tooz errors.
//!
//! | etcd-client error | [`Kind`] | tooz error |
//! |---|---|---|
//! | transport, I/O, endpoint, URI errors | `Connection` | `Connection` (retryable) |
//! | status `Unavailable`, `Cancelled`, `Unknown` | `Connection` | `Connection` (retryable) |
//! | status `DeadlineExceeded` | `Timeout` | `OperationTimedOut` (retryable) |
//! | status `NotFound` + etcd's lease reason | `LeaseNotFound` | `Backend` |
//! | keep-alive refused for a lease with TTL ≤ 0 | `LeaseNotFound` | `Backend` |
//! | keep-alive request channel closed | `Connection` | `Connection` (retryable) |
//! | anything else | `Other` | `Backend` |
//!
//! etcd answers `Unavailable` for "no leader", "leader changed", "request timed
//! out" and a stopping server, and tonic reports a broken HTTP/2 connection as
//! `Unavailable`, `Cancelled` or `Unknown`: all of them are worth a retry.
//!
//! # A lease that is gone
//!
//! The code alone does not say it: etcd also answers `NotFound` for an unknown
//! cluster member, so a lease is taken as gone when the code is `NotFound` *and*
//! the status carries etcd's reason for it, `etcdserver: requested lease not
//! found` ([`LEASE_NOT_FOUND`]). That is how etcd's Go client recognises it too
//! (`rpctypes.Error` maps the description to `ErrLeaseNotFound`).
//!
//! A keep-alive never gets that status: etcd answers a keep-alive of an unknown
//! lease with a TTL of 0, and etcd-client's `lease_keep_alive` turns such a first
//! answer into `LeaseKeepAliveError("lease not found")` ([`KEEPER_LEASE_NOT_FOUND`]),
//! a string without a status. That one variant is recognised by its exact text;
//! its only other use is a failed send into the keep-alive request channel, which
//! means the stream is gone (`Connection`).

use etcd_client::Error as E;
use tonic::{Code, Status};
use tooz_core::ToozError;

/// etcd's description of `ErrGRPCLeaseNotFound` (status code `NotFound`).
pub(crate) const LEASE_NOT_FOUND: &str = "etcdserver: requested lease not found";

/// What etcd-client's `lease_keep_alive` reports for a lease with a TTL ≤ 0.
pub(crate) const KEEPER_LEASE_NOT_FOUND: &str = "lease not found";

/// What an etcd-client error means to the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// The server could not be reached or the call was cut: retry later.
    Connection,
    /// The call's deadline passed.
    Timeout,
    /// The lease the request named has expired or was revoked.
    LeaseNotFound,
    /// The request itself failed.
    Other,
}

/// Classifies a gRPC status by its code (and etcd's reason for `NotFound`).
pub(crate) fn classify_status(s: &Status) -> Kind {
    match s.code() {
        Code::Unavailable | Code::Cancelled | Code::Unknown => Kind::Connection,
        Code::DeadlineExceeded => Kind::Timeout,
        Code::NotFound if s.message() == LEASE_NOT_FOUND => Kind::LeaseNotFound,
        _ => Kind::Other,
    }
}

/// Classifies an etcd-client error.
pub(crate) fn classify(e: &E) -> Kind {
    match e {
        E::TransportError(_) | E::IoError(_) | E::EndpointError(_) | E::InvalidUri(_) => {
            Kind::Connection
        }
        E::GRpcStatus(s) => classify_status(s),
        E::LeaseKeepAliveError(m) if m == KEEPER_LEASE_NOT_FOUND => Kind::LeaseNotFound,
        E::LeaseKeepAliveError(_) => Kind::Connection,
        _ => Kind::Other,
    }
}

/// Whether `e` says that the lease a request named is gone.
pub(crate) fn lease_not_found(e: &E) -> bool {
    classify(e) == Kind::LeaseNotFound
}

/// Maps an etcd-client error to a tooz error; `what` names the operation.
pub(crate) fn map_err(what: &str, e: E) -> ToozError {
    let msg = format!("{what}: {e}");
    match classify(&e) {
        Kind::Connection => ToozError::connection("etcd3", msg, e),
        // No driver field on timeouts: the message names it.
        Kind::Timeout => ToozError::OperationTimedOut(format!("etcd: {msg}")),
        Kind::LeaseNotFound | Kind::Other => ToozError::backend("etcd3", msg, e),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn status(code: Code, msg: &str) -> E {
        E::GRpcStatus(Status::new(code, msg))
    }

    #[test]
    fn statuses_by_code() {
        for c in [Code::Unavailable, Code::Cancelled, Code::Unknown] {
            assert_eq!(
                classify(&status(c, "etcdserver: no leader")),
                Kind::Connection
            );
            assert!(map_err("x", status(c, "")).is_retryable());
        }
        let e = status(Code::DeadlineExceeded, "context deadline exceeded");
        assert_eq!(classify(&e), Kind::Timeout);
        assert!(matches!(
            map_err("put", e),
            ToozError::OperationTimedOut(m) if m.starts_with("etcd: put: ")
        ));
        for c in [
            Code::InvalidArgument,
            Code::FailedPrecondition,
            Code::PermissionDenied,
            Code::Unauthenticated,
            Code::OutOfRange,
            Code::ResourceExhausted,
            Code::Internal,
        ] {
            assert_eq!(classify(&status(c, "")), Kind::Other, "{c:?}");
            assert!(!map_err("x", status(c, "")).is_retryable(), "{c:?}");
        }
        // The text does not decide: a message that reads like a connection
        // problem under another code is not one.
        assert_eq!(
            classify(&status(Code::InvalidArgument, "unavailable")),
            Kind::Other
        );
    }

    #[test]
    fn lease_not_found_needs_code_and_reason() {
        assert!(lease_not_found(&status(Code::NotFound, LEASE_NOT_FOUND)));
        // Same reason, another code; same code, another reason.
        assert!(!lease_not_found(&status(Code::Unknown, LEASE_NOT_FOUND)));
        assert!(!lease_not_found(&status(
            Code::NotFound,
            "etcdserver: member not found"
        )));
        assert_eq!(
            classify(&status(Code::NotFound, "etcdserver: member not found")),
            Kind::Other
        );
        assert!(!map_err("x", status(Code::NotFound, LEASE_NOT_FOUND)).is_retryable());
    }

    #[test]
    fn keep_alive_errors() {
        assert!(lease_not_found(&E::LeaseKeepAliveError(
            KEEPER_LEASE_NOT_FOUND.into()
        )));
        let closed = E::LeaseKeepAliveError("channel closed".into());
        assert_eq!(classify(&closed), Kind::Connection);
        assert!(map_err("lease keep-alive", closed).is_retryable());
    }

    #[test]
    fn transport_errors_are_connection_errors() {
        let io = E::IoError(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(classify(&io), Kind::Connection);
        assert!(matches!(
            map_err("connecting", io),
            ToozError::Connection { .. }
        ));
        assert_eq!(classify(&E::EndpointError("x".into())), Kind::Connection);
        assert_eq!(classify(&E::InvalidArgs("x".into())), Kind::Other);
        assert_eq!(classify(&E::WatchError("x".into())), Kind::Other);
    }

    /// Against a live etcd (`TOOZ_TEST_ETCD_URL`): the statuses etcd really sends
    /// for a lease that does not exist are recognised on both paths.
    #[tokio::test]
    async fn live_lease_not_found() {
        let url = match std::env::var("TOOZ_TEST_ETCD_URL") {
            Ok(u) if !u.trim().is_empty() => u.trim().to_string(),
            _ => {
                assert!(
                    std::env::var("TOOZ_REQUIRE_BACKENDS").as_deref() != Ok("1"),
                    "TOOZ_TEST_ETCD_URL is not set and TOOZ_REQUIRE_BACKENDS=1"
                );
                eprintln!("SKIPPED: TOOZ_TEST_ETCD_URL is not set");
                return;
            }
        };
        let endpoint = crate::EtcdConfig::from_url_str(&url).unwrap().endpoint();
        let mut c = etcd_client::Client::connect([endpoint.as_str()], None)
            .await
            .unwrap();
        // A lease id nobody granted (ids are positive; this one is far above any
        // a test server hands out).
        let bogus = 0x7a11_0000_0000_0001_i64;
        let put = c
            .put(
                "tooz-rs-error-test",
                "x",
                Some(etcd_client::PutOptions::new().with_lease(bogus)),
            )
            .await
            .unwrap_err();
        assert_eq!(classify(&put), Kind::LeaseNotFound, "{put:?}");
        let keep = c.lease_keep_alive(bogus).await.map(|_| ()).unwrap_err();
        assert_eq!(classify(&keep), Kind::LeaseNotFound, "{keep:?}");
    }
}
