//! What the etcd integration tests (`integration.rs`, `junk.rs`, `queue.rs`) share
//! on top of `tooz_conformance::testkit`: the server's URL with the skip-or-fail
//! rule, coordinators over an [`EtcdDriver`] the test keeps a handle on, a raw
//! etcd client for what another client would see or write, and Python's lock.

// Each test binary uses a part of this.
#![allow(dead_code, clippy::unwrap_used)]

use std::sync::Arc;

use tooz_conformance::testkit;
use tooz_core::{Coordinator, MemberId};
use tooz_etcd::{EtcdConfig, EtcdDriver};

/// Where the tests find the server.
pub const URL_ENV: &str = "TOOZ_TEST_ETCD_URL";

/// A raw etcd client.
pub type Raw = etcd_client::Client;

/// The server's URL, or `None` when the test `test` is skipped (a failure
/// instead with `TOOZ_REQUIRE_BACKENDS=1`).
pub fn url(test: &str) -> Option<String> {
    testkit::backend_url(URL_ENV, test)
}

/// An unstarted coordinator for a fresh member `<label>-…` over an etcd driver
/// configured from `url`, and the driver (to read its lease).
pub fn coordinator_on(url: &str, label: &str) -> (EtcdDriver, Coordinator) {
    let member = MemberId::from(testkit::unique(label));
    let driver = EtcdDriver::new(EtcdConfig::from_url_str(url).unwrap(), member.clone());
    let coord = Coordinator::new(Arc::new(driver.clone()), member, url.to_string());
    (driver, coord)
}

/// A raw client of the server `url` names.
pub async fn raw(url: &str) -> Raw {
    let config = EtcdConfig::from_url_str(url).unwrap();
    Raw::connect([config.endpoint()], None).await.unwrap()
}

/// The key-values under `key` (a prefix when `prefix`).
pub async fn kvs(raw: &Raw, key: &[u8], prefix: bool) -> Vec<etcd_client::KeyValue> {
    let opts = prefix.then(|| etcd_client::GetOptions::new().with_prefix());
    raw.clone().get(key, opts).await.unwrap().kvs().to_vec()
}

/// The exclusive lock key of `name` (Python tooz's layout).
pub fn lock_key(name: &str) -> Vec<u8> {
    [b"/tooz/locks".as_slice(), name.as_bytes()].concat()
}

/// Lower-case hex of `b` (the driver's key segments for arbitrary names).
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A Python etcd3gw exclusive acquire: create the lock key if it is absent
/// (released by deleting the key).
pub async fn python_acquire(raw: &Raw, key: &[u8]) -> bool {
    use etcd_client::{Compare, CompareOp, Txn, TxnOp};
    let r = raw
        .clone()
        .txn(
            Txn::new()
                .when(vec![Compare::create_revision(key, CompareOp::Equal, 0)])
                .and_then(vec![TxnOp::put(key, b"python".to_vec(), None)]),
        )
        .await
        .unwrap();
    r.succeeded()
}
