//! ZooKeeper client errors as [`ToozError`]s.

use tooz_core::ToozError;
use zookeeper_client::Error;

/// A client error that is not one of the expected outcomes of an operation.
pub(crate) fn zk_err(what: &str, e: Error) -> ToozError {
    match e {
        Error::Timeout => ToozError::OperationTimedOut(format!("zookeeper: {what}")),
        Error::ConnectionLoss | Error::NoHosts => {
            ToozError::connection("zookeeper", what.to_string(), e)
        }
        Error::SessionExpired | Error::ClientClosed | Error::SessionMoved => {
            ToozError::Connection {
                driver: "zookeeper",
                message: format!("{what}: the session ended ({e}); a new one is being opened"),
                source: Some(Box::new(e)),
            }
        }
        Error::Throttled => ToozError::Backend {
            driver: "zookeeper",
            message: what.to_string(),
            source: Some(Box::new(e)),
            retryable: true,
        },
        other => ToozError::backend("zookeeper", what.to_string(), other),
    }
}
