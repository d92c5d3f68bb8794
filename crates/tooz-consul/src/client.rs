//! A thin client for the few Consul HTTP endpoints the driver needs: sessions
//! (create, renew, destroy), KV reads (one key, a prefix, blocking queries with
//! `index`/`wait`) and the transaction endpoint for every write (`lock`,
//! `unlock`, `cas`, `check-*`, `delete-cas`), which also returns the written
//! entry's indexes.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::Deserialize;
use serde_json::{Value, json};
use tooz_core::{Result, ToozError};

use crate::config::{ConsulConfig, NAME};

/// One KV entry as Consul returns it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct Kv {
    pub(crate) key: String,
    #[serde(default)]
    pub(crate) value: Option<String>,
    #[serde(default)]
    pub(crate) flags: u64,
    #[serde(default)]
    pub(crate) session: Option<String>,
    #[serde(default)]
    pub(crate) create_index: u64,
    #[serde(default)]
    pub(crate) modify_index: u64,
}

impl Kv {
    /// The decoded value (empty for none).
    pub(crate) fn bytes(&self) -> Vec<u8> {
        self.value
            .as_deref()
            .and_then(|v| B64.decode(v).ok())
            .unwrap_or_default()
    }

    /// The session holding the key, if any.
    pub(crate) fn holder(&self) -> Option<&str> {
        self.session.as_deref().filter(|s| !s.is_empty())
    }
}

/// The outcome of a transaction: applied (with the entries its ops returned), or
/// rolled back (with the index of each failed op and Consul's reason).
#[derive(Debug)]
pub(crate) enum Txn {
    Applied(Vec<Kv>),
    Failed(Vec<(usize, String)>),
}

impl Txn {
    /// Whether Consul refused the transaction because a session it names does not
    /// exist (any more).
    pub(crate) fn invalid_session(&self) -> bool {
        matches!(self, Txn::Failed(e) if e.iter().any(|(_, w)| w.contains("invalid session")))
    }

    /// Whether the op at `index` is among the failed ones.
    pub(crate) fn failed_at(&self, index: usize) -> bool {
        matches!(self, Txn::Failed(e) if e.iter().any(|(i, _)| *i == index))
    }
}

/// Transaction operations (Consul's KV verbs).
pub(crate) mod op {
    use super::*;

    fn kv(verb: &str, key: &str) -> Value {
        json!({ "KV": { "Verb": verb, "Key": key } })
    }

    fn with(mut v: Value, field: &str, x: Value) -> Value {
        if let Some(o) = v.get_mut("KV").and_then(Value::as_object_mut) {
            o.insert(field.to_string(), x);
        }
        v
    }

    /// Acquires `key` for `session`, writing `value`.
    pub(crate) fn lock(key: &str, value: &[u8], session: &str, flags: u64) -> Value {
        let v = with(kv("lock", key), "Value", json!(B64.encode(value)));
        let v = with(v, "Flags", json!(flags));
        with(v, "Session", json!(session))
    }
    /// Releases `key` held by `session`.
    pub(crate) fn unlock(key: &str, session: &str) -> Value {
        with(kv("unlock", key), "Session", json!(session))
    }
    /// Writes `value` if the key's modify index is `index` (0: absent).
    pub(crate) fn cas(key: &str, value: &[u8], index: u64) -> Value {
        let v = with(kv("cas", key), "Value", json!(B64.encode(value)));
        with(v, "Index", json!(index))
    }
    /// Fails unless the key exists (and returns it).
    pub(crate) fn get(key: &str) -> Value {
        kv("get", key)
    }
    /// Every key under `prefix`.
    pub(crate) fn get_tree(prefix: &str) -> Value {
        kv("get-tree", prefix)
    }
    /// Fails if the key exists.
    pub(crate) fn check_not_exists(key: &str) -> Value {
        kv("check-not-exists", key)
    }
    /// Fails unless the key's modify index is `index`.
    pub(crate) fn check_index(key: &str, index: u64) -> Value {
        with(kv("check-index", key), "Index", json!(index))
    }
    /// Fails unless `session` holds the key.
    pub(crate) fn check_session(key: &str, session: &str) -> Value {
        with(kv("check-session", key), "Session", json!(session))
    }
    /// Deletes every key under `prefix`.
    pub(crate) fn delete_tree(prefix: &str) -> Value {
        kv("delete-tree", prefix)
    }
    /// Deletes the key.
    pub(crate) fn delete(key: &str) -> Value {
        kv("delete", key)
    }
}

/// Percent-encodes a key for a URL path (keeps `/` and unreserved characters).
fn path_escape(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The HTTP client of one coordinator.
#[derive(Debug, Clone)]
pub(crate) struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
    timeout: Duration,
    /// Permits for requests in flight: HTTP/1.1 needs a connection per request in
    /// flight, and an agent takes at most 200 connections per client address
    /// (`limits.http_max_conns_per_client`) and closes the rest, so one busy
    /// coordinator must not open hundreds at once. Blocking queries and session
    /// renewals do not take one (a renewal must never queue behind a burst).
    inflight: Arc<tokio::sync::Semaphore>,
    /// Permits for lock waits' blocking queries (one connection each, held while
    /// the lock is waited for), so that many blocked acquires do not take all the
    /// agent's connections for this address; a wait without one polls.
    waits: Arc<tokio::sync::Semaphore>,
}

/// Requests in flight at once per coordinator, besides blocking queries and
/// session renewals.
const MAX_IN_FLIGHT: usize = 64;

/// Lock waits per coordinator that wait by a blocking query; further ones poll.
pub(crate) const MAX_WAITS: usize = 96;

fn build_http(config: &ConsulConfig) -> Result<reqwest::Client> {
    // reqwest without a default TLS provider needs rustls' ring provider
    // installed before any client is built (even for plain http).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut b = reqwest::Client::builder()
        .connect_timeout(config.timeout)
        .pool_idle_timeout(Duration::from_secs(30));
    if let Some(ca) = &config.ca_cert {
        let pem = std::fs::read(ca).map_err(|e| {
            ToozError::invalid_option(
                NAME,
                "ca_cert",
                format!("cannot read {}: {e}", ca.display()),
            )
        })?;
        let cert = reqwest::Certificate::from_pem(&pem).map_err(|e| {
            ToozError::invalid_option(NAME, "ca_cert", format!("not a PEM certificate: {e}"))
        })?;
        b = b.add_root_certificate(cert);
    }
    b.build()
        .map_err(|e| ToozError::backend(NAME, "building the HTTP client", e))
}

impl Client {
    pub(crate) fn new(config: &ConsulConfig) -> Result<Self> {
        Ok(Client {
            http: build_http(config)?,
            base: config.api_base(),
            token: config.acl_token.clone(),
            timeout: config.timeout,
            inflight: Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT)),
            waits: Arc::new(tokio::sync::Semaphore::new(MAX_WAITS)),
        })
    }

    fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        timeout: Duration,
    ) -> reqwest::RequestBuilder {
        let mut r = self
            .http
            .request(method, format!("{}{path}", self.base))
            .timeout(timeout);
        if let Some(t) = &self.token {
            r = r.header("X-Consul-Token", t);
        }
        r
    }

    fn transport(&self, what: &str, e: reqwest::Error) -> ToozError {
        if e.is_timeout() {
            ToozError::OperationTimedOut(format!(
                "consul: {what}: no answer from the agent at {} within {:?}",
                self.base, self.timeout
            ))
        } else {
            ToozError::connection(
                NAME,
                format!(
                    "{what}: cannot reach the Consul agent at {} (is it running, and is the URL's host and port right?)",
                    self.base
                ),
                e,
            )
        }
    }

    async fn send(
        &self,
        what: &str,
        r: reqwest::RequestBuilder,
    ) -> Result<(
        reqwest::StatusCode,
        reqwest::header::HeaderMap,
        bytes_body::Body,
    )> {
        // The semaphore is never closed, so acquiring only waits.
        let _permit = self.inflight.acquire().await.ok();
        self.send_unbounded(what, r).await
    }

    /// [`send`](Self::send) without taking an in-flight permit.
    async fn send_unbounded(
        &self,
        what: &str,
        r: reqwest::RequestBuilder,
    ) -> Result<(
        reqwest::StatusCode,
        reqwest::header::HeaderMap,
        bytes_body::Body,
    )> {
        let resp = r.send().await.map_err(|e| self.transport(what, e))?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp.bytes().await.map_err(|e| self.transport(what, e))?;
        Ok((status, headers, bytes_body::Body(body.to_vec())))
    }

    fn http_error(what: &str, status: reqwest::StatusCode, body: &[u8]) -> ToozError {
        let text = String::from_utf8_lossy(body).trim().to_string();
        let hint = if status == reqwest::StatusCode::FORBIDDEN {
            " (ACL denied: check the acl_token option)"
        } else {
            ""
        };
        ToozError::Backend {
            driver: NAME,
            message: format!("{what}: the agent answered {status}: {text}{hint}"),
            source: None,
            retryable: status.is_server_error(),
        }
    }

    fn json<T: for<'de> Deserialize<'de>>(what: &str, body: &[u8]) -> Result<T> {
        serde_json::from_slice(body).map_err(|e| {
            ToozError::backend(NAME, format!("{what}: unexpected reply from the agent"), e)
        })
    }

    /// Creates a session; returns its id. A refused TTL is an `InvalidOption`.
    pub(crate) async fn session_create(
        &self,
        name: &str,
        ttl: Duration,
        lock_delay: Duration,
    ) -> Result<String> {
        let body = json!({
            "Name": name,
            "TTL": format!("{}s", ttl.as_secs().max(1)),
            "Behavior": "delete",
            "LockDelay": format!("{}ms", lock_delay.as_millis()),
        });
        let r = self
            .request(reqwest::Method::PUT, "session/create", self.timeout)
            .json(&body);
        let (status, _, b) = self.send("creating a session", r).await?;
        if status == reqwest::StatusCode::BAD_REQUEST
            && String::from_utf8_lossy(&b.0).contains("TTL")
        {
            return Err(ToozError::invalid_option(
                NAME,
                "ttl",
                format!(
                    "the agent refused a session TTL of {}s: {}",
                    ttl.as_secs(),
                    String::from_utf8_lossy(&b.0).trim()
                ),
            ));
        }
        if !status.is_success() {
            return Err(Self::http_error("creating a session", status, &b.0));
        }
        #[derive(Deserialize)]
        struct Created {
            #[serde(rename = "ID")]
            id: String,
        }
        Ok(Self::json::<Created>("creating a session", &b.0)?.id)
    }

    /// Renews a session: `Ok(false)` when Consul no longer knows it.
    pub(crate) async fn session_renew(&self, id: &str) -> Result<bool> {
        let r = self.request(
            reqwest::Method::PUT,
            &format!("session/renew/{}", path_escape(id)),
            self.timeout,
        );
        let (status, _, b) = self.send_unbounded("renewing the session", r).await?;
        if status == reqwest::StatusCode::NOT_FOUND {
            return Ok(false);
        }
        if !status.is_success() {
            return Err(Self::http_error("renewing the session", status, &b.0));
        }
        Ok(true)
    }

    /// Destroys a session (its keys are deleted: `Behavior` is `delete`).
    pub(crate) async fn session_destroy(&self, id: &str) -> Result<()> {
        let r = self.request(
            reqwest::Method::PUT,
            &format!("session/destroy/{}", path_escape(id)),
            self.timeout,
        );
        let (status, _, b) = self.send("destroying the session", r).await?;
        if !status.is_success() {
            return Err(Self::http_error("destroying the session", status, &b.0));
        }
        Ok(())
    }

    /// One key, if present.
    pub(crate) async fn get(&self, what: &str, key: &str) -> Result<Option<Kv>> {
        let r = self.request(
            reqwest::Method::GET,
            &format!("kv/{}", path_escape(key)),
            self.timeout,
        );
        let (status, _, b) = self.send(what, r).await?;
        if status == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !status.is_success() {
            return Err(Self::http_error(what, status, &b.0));
        }
        Ok(Self::json::<Vec<Kv>>(what, &b.0)?.into_iter().next())
    }

    /// A permit to wait for a lock by a blocking query, if any is left.
    pub(crate) fn wait_permit(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        Arc::clone(&self.waits).try_acquire_owned().ok()
    }

    /// A blocking query on one key: the key once its modify index passes `index`
    /// (it is written or deleted; one already changed answers at once), or as it
    /// is after `wait`. Takes no in-flight permit (it is a wait, not load).
    pub(crate) async fn get_blocking(
        &self,
        what: &str,
        key: &str,
        index: u64,
        wait: Duration,
    ) -> Result<Option<Kv>> {
        let wait = wait.max(Duration::from_millis(1));
        let r = self.request(
            reqwest::Method::GET,
            &format!(
                "kv/{}?index={}&wait={}ms",
                path_escape(key),
                index.max(1),
                wait.as_millis()
            ),
            // Consul adds up to wait/16 of jitter.
            self.timeout + wait + wait / 16,
        );
        let (status, _, b) = self.send_unbounded(what, r).await?;
        if status == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !status.is_success() {
            return Err(Self::http_error(what, status, &b.0));
        }
        Ok(Self::json::<Vec<Kv>>(what, &b.0)?.into_iter().next())
    }

    /// Deletes `key` if its modify index is `index` (the plain KV endpoint, a
    /// little cheaper than a transaction): whether it did.
    pub(crate) async fn delete_cas(&self, what: &str, key: &str, index: u64) -> Result<bool> {
        let r = self.request(
            reqwest::Method::DELETE,
            &format!("kv/{}?cas={index}", path_escape(key)),
            self.timeout,
        );
        let (status, _, b) = self.send(what, r).await?;
        if !status.is_success() {
            return Err(Self::http_error(what, status, &b.0));
        }
        Ok(String::from_utf8_lossy(&b.0).trim() == "true")
    }

    /// The names of every key under `prefix` (no values).
    pub(crate) async fn keys(&self, what: &str, prefix: &str) -> Result<Vec<String>> {
        let r = self.request(
            reqwest::Method::GET,
            &format!("kv/{}?keys", path_escape(prefix)),
            self.timeout,
        );
        let (status, _, b) = self.send(what, r).await?;
        if status == reqwest::StatusCode::NOT_FOUND {
            return Ok(Vec::new());
        }
        if !status.is_success() {
            return Err(Self::http_error(what, status, &b.0));
        }
        Self::json(what, &b.0)
    }

    /// Every key under `prefix`, and the index the read was served at.
    pub(crate) async fn list(&self, what: &str, prefix: &str) -> Result<(Vec<Kv>, u64)> {
        self.list_blocking(what, prefix, 0, Duration::ZERO).await
    }

    /// A blocking query: every key under `prefix` once the prefix's index passes
    /// `index` (or after `wait`); `index` 0 answers at once.
    pub(crate) async fn list_blocking(
        &self,
        what: &str,
        prefix: &str,
        index: u64,
        wait: Duration,
    ) -> Result<(Vec<Kv>, u64)> {
        self.list_blocking_as(what, prefix, index, wait, false)
            .await
    }

    /// [`list_blocking`](Self::list_blocking), or with `keys_only` the key names
    /// alone (`?keys`: no values, sessions nor indexes; a much smaller reply).
    pub(crate) async fn list_blocking_as(
        &self,
        what: &str,
        prefix: &str,
        index: u64,
        wait: Duration,
        keys_only: bool,
    ) -> Result<(Vec<Kv>, u64)> {
        let mut path = if keys_only {
            format!("kv/{}?keys", path_escape(prefix))
        } else {
            format!("kv/{}?recurse", path_escape(prefix))
        };
        let mut timeout = self.timeout;
        if index > 0 {
            path.push_str(&format!("&index={index}&wait={}ms", wait.as_millis()));
            // Consul adds up to wait/16 of jitter.
            timeout += wait + wait / 16;
        }
        let r = self.request(reqwest::Method::GET, &path, timeout);
        let (status, headers, b) = if index > 0 {
            self.send_unbounded(what, r).await?
        } else {
            self.send(what, r).await?
        };
        let at = headers
            .get("X-Consul-Index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        if status == reqwest::StatusCode::NOT_FOUND {
            return Ok((Vec::new(), at));
        }
        if !status.is_success() {
            return Err(Self::http_error(what, status, &b.0));
        }
        if keys_only {
            let keys: Vec<String> = Self::json(what, &b.0)?;
            let kvs = keys
                .into_iter()
                .map(|key| Kv {
                    key,
                    value: None,
                    flags: 0,
                    session: None,
                    create_index: 0,
                    modify_index: 0,
                })
                .collect();
            return Ok((kvs, at));
        }
        Ok((Self::json(what, &b.0)?, at))
    }

    /// Runs a transaction.
    pub(crate) async fn txn(&self, what: &str, ops: Vec<Value>) -> Result<Txn> {
        let r = self
            .request(reqwest::Method::PUT, "txn", self.timeout)
            .json(&Value::Array(ops));
        let (status, _, b) = self.send(what, r).await?;
        #[derive(Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct Res {
            #[serde(rename = "KV")]
            kv: Option<Kv>,
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct Err {
            op_index: usize,
            what: String,
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct Reply {
            results: Option<Vec<Res>>,
            errors: Option<Vec<Err>>,
        }
        match status.as_u16() {
            200 => {
                let r: Reply = Self::json(what, &b.0)?;
                Ok(Txn::Applied(
                    r.results
                        .unwrap_or_default()
                        .into_iter()
                        .filter_map(|r| r.kv)
                        .collect(),
                ))
            }
            409 => {
                let r: Reply = Self::json(what, &b.0)?;
                Ok(Txn::Failed(
                    r.errors
                        .unwrap_or_default()
                        .into_iter()
                        .map(|e| (e.op_index, e.what))
                        .collect(),
                ))
            }
            _ => Err(Self::http_error(what, status, &b.0)),
        }
    }
}

mod bytes_body {
    /// A response body.
    pub(crate) struct Body(pub(crate) Vec<u8>);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-shot HTTP server: answers `reply` and hands back the request it read.
    async fn one_shot(reply: &'static str) -> (String, tokio::task::JoinHandle<String>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = vec![0u8; 8192];
            let mut req = Vec::new();
            // Until the end of the headers (or a TLS handshake record).
            while req.first() != Some(&0x16) && !String::from_utf8_lossy(&req).contains("\r\n\r\n")
            {
                let n = s.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                req.extend_from_slice(&buf[..n]);
            }
            s.write_all(reply.as_bytes()).await.unwrap();
            String::from_utf8_lossy(&req).to_string()
        });
        (format!("consul://{addr}"), task)
    }

    #[tokio::test]
    async fn the_acl_token_is_a_header() {
        let body = r#"{"ID":"abc"}"#;
        let reply: &'static str = Box::leak(
            format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\ncontent-type: application/json\r\n\r\n{body}",
                body.len()
            )
            .into_boxed_str(),
        );
        let (url, server) = one_shot(reply).await;
        let c =
            ConsulConfig::from_url_str(&format!("{url}?acl_token=s3cret&ttl=12&lock_delay=0.5"))
                .unwrap();
        let id = Client::new(&c)
            .unwrap()
            .session_create("m", c.ttl, c.lock_delay)
            .await
            .unwrap();
        assert_eq!(id, "abc");
        let req = server.await.unwrap().to_ascii_lowercase();
        assert!(req.starts_with("put /v1/session/create "), "{req}");
        assert!(req.contains("x-consul-token: s3cret"), "{req}");
    }

    #[tokio::test]
    async fn https_to_a_plain_port_is_a_connection_error() {
        let (url, _server) = one_shot("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await;
        let c = ConsulConfig::from_url_str(&format!("{url}?scheme=https&timeout=2")).unwrap();
        match Client::new(&c).unwrap().session_renew("x").await {
            Err(ToozError::Connection { message, .. }) => {
                assert!(message.contains("https://127.0.0.1:"), "{message}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_refused_ttl_is_an_invalid_option() {
        let (url, _server) = one_shot(
            "HTTP/1.1 400 Bad Request\r\ncontent-length: 50\r\n\r\nInvalid Session TTL '1000000000', must be between ",
        )
        .await;
        let c = ConsulConfig::from_url_str(&format!("{url}?ttl=1")).unwrap();
        match Client::new(&c)
            .unwrap()
            .session_create("m", c.ttl, c.lock_delay)
            .await
        {
            Err(ToozError::InvalidOption { option, .. }) => assert_eq!(option, "ttl"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn escapes_paths() {
        assert_eq!(path_escape("tooz/groups/a b/"), "tooz/groups/a%20b/");
        assert_eq!(path_escape("x/../y?z"), "x/%2E%2E/y%3Fz");
    }
}
