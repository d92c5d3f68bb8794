//! Helpers for a driver crate's own integration tests: the tests beside
//! `tests/conformance.rs` that provoke what only that backend can (a key evicted, a
//! lease revoked, junk rows written by another client).
//!
//! They all start the same way, and this module is that start, once:
//!
//! - [`Backend::from_env`]: the server's URL from `TOOZ_TEST_<X>_URL` ([`url_env`]),
//!   or `None` after printing `SKIPPED <test>: …` when it is not set; with
//!   `TOOZ_REQUIRE_BACKENDS=1` ([`backends_required`]) a missing URL is a failure
//!   (a panic naming the test and the variable), never a skip. [`backend_url`] is
//!   the same rule for a test that connects some other way.
//!   [`suite_url`] is the rule of a driver's `tests/conformance.rs`, which ends
//!   the binary (exit code 0 or 1) instead.
//! - [`Backend::connect`] / [`Backend::started`]: a coordinator on that server, the
//!   start bounded by the backend's [`limit`](Backend::limit).
//! - [`timed`] (and [`Backend::timed`]): one call under a deadline, so that a hang
//!   is a failure naming the call rather than a stuck CI job.
//! - [`wait_for`]: polls observable state until it holds, within a limit.
//! - [`unique`]: a name no other run (and no other test of this run) uses.
//! - [`host_port`] and [`with_query`]: the server's address in a URL (for a raw
//!   client or a [`FaultProxy`](crate::fault::FaultProxy) beside the driver), and
//!   options appended to a URL.
//!
//! Every helper panics when something goes wrong: they are meant for tests, where
//! the panic is the failure.
//!
//! ```no_run
//! use std::time::Duration;
//! use tooz_conformance::testkit::{Backend, unique};
//! use tooz_core::Wait;
//!
//! # // Stands for the driver crate's own `DRIVER`.
//! # fn driver() -> tooz_core::DriverDescriptor { tooz_core::memory::DRIVER }
//! // A test of the driver crate, run under `#[tokio::test]`.
//! async fn a_lock_is_exclusive() {
//!     let Some(backend) = Backend::from_env("TOOZ_TEST_MYDRIVER_URL", driver(), "a_lock_is_exclusive")
//!     else {
//!         return; // skipped (a failure instead with TOOZ_REQUIRE_BACKENDS=1)
//!     };
//!     let backend = backend.limit(Duration::from_secs(20));
//!     let (a, b) = (backend.started("a").await, backend.started("b").await);
//!     let name = unique("lock");
//!     let held = a.get_lock(name.as_str()).unwrap();
//!     assert!(backend.timed("acquire", held.acquire(Wait::No)).await.unwrap());
//!     let other = b.get_lock(name.as_str()).unwrap();
//!     assert!(!backend.timed("acquire", other.acquire(Wait::No)).await.unwrap());
//!     a.stop().await.unwrap();
//!     b.stop().await.unwrap();
//! }
//! ```

use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tooz_core::{ConnectOptions, Coordinator, DriverDescriptor, MemberId, Registry};

use crate::REQUIRE_BACKENDS_ENV;

/// The limit [`Backend::timed`] and [`Backend::started`] put on one call unless
/// [`Backend::limit`] says otherwise.
pub const DEFAULT_LIMIT: Duration = Duration::from_secs(15);

/// Whether `TOOZ_REQUIRE_BACKENDS=1`: a test that cannot reach its backend must
/// then fail, not skip.
pub fn backends_required() -> bool {
    std::env::var(REQUIRE_BACKENDS_ENV).is_ok_and(|v| v == "1")
}

/// The variable holding a backend's test URL: `TOOZ_TEST_<BACKEND>_URL`, upper-cased
/// (`url_env("etcd")` is `TOOZ_TEST_ETCD_URL`).
pub fn url_env(backend: &str) -> String {
    format!("TOOZ_TEST_{}_URL", backend.to_ascii_uppercase())
}

/// The URL in the variable `env` (trimmed), or `None` when it is unset or blank:
/// the test `test` is then skipped, after printing `SKIPPED <test>: <env> is not set`
/// on stderr.
///
/// # Panics
/// When `env` is unset or blank and [`backends_required`]: the message names the
/// test and the variable.
pub fn backend_url(env: &str, test: &str) -> Option<String> {
    url_or_skip(std::env::var(env).ok(), backends_required(), env, test)
}

/// [`backend_url`]'s rule, given the variable's value and whether backends are
/// required.
fn url_or_skip(value: Option<String>, required: bool, env: &str, test: &str) -> Option<String> {
    match value {
        Some(u) if !u.trim().is_empty() => Some(u.trim().to_string()),
        _ => {
            assert!(
                !required,
                "{test}: {env} is not set and {REQUIRE_BACKENDS_ENV}=1"
            );
            eprintln!("SKIPPED {test}: {env} is not set");
            None
        }
    }
}

/// The backend URL of a driver's `tests/conformance.rs`, the `harness = false`
/// binary whose `main` hands a [`Setup`](crate::Setup) to [`main`](crate::main):
/// the trimmed value of `env` (`TOOZ_TEST_<X>_URL`). When it is unset or blank,
/// `example` while the binary only lists its cases (`--list`) or runs as a worker
/// process; otherwise the binary ends here, printing why: `FAILED: …` with exit
/// code 1 when [`backends_required`], `SKIPPED: …` with exit code 0 otherwise.
/// `server` names the server in those messages (`"etcd"`, `"PostgreSQL"`).
pub fn suite_url(env: &str, example: &str, server: &str) -> String {
    let listing = std::env::args().any(|a| a == "--list");
    let worker = std::env::var_os(crate::WORKER_ENV).is_some();
    match std::env::var(env) {
        Ok(u) if !u.trim().is_empty() => u.trim().to_string(),
        _ if listing || worker => example.to_string(),
        _ => {
            if backends_required() {
                println!(
                    "FAILED: {env} is not set and {REQUIRE_BACKENDS_ENV}=1: no {server} server to run the conformance suite against"
                );
                std::process::exit(1);
            }
            println!(
                "SKIPPED: {env} is not set; no conformance case ran. Set it (e.g. {example}) or start the backends with cargo xtask backends up."
            );
            std::process::exit(0);
        }
    }
}

/// A name no other run uses, nor another call of this run: `<label>-<pid>-<ns>`,
/// where `<ns>` is the wall clock in nanoseconds (hex).
pub fn unique(label: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{label}-{}-{nanos:x}", std::process::id())
}

/// `f`'s output, if it comes within `limit`.
///
/// # Panics
/// When it does not: `<what> hung`.
pub async fn timed<T>(limit: Duration, what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, f)
        .await
        .unwrap_or_else(|_| panic!("{what} hung"))
}

/// Polls `check` every `every` until it returns `true`.
///
/// For state another client (or the server) changes, which the test can only
/// observe: the wait ends as soon as the state is seen, not after a fixed sleep.
///
/// # Panics
/// When `check` still returns `false` after `limit`: `timed out waiting for <what>`.
pub async fn wait_for<F, Fut>(what: &str, limit: Duration, every: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let end = tokio::time::Instant::now() + limit;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < end,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(every).await;
    }
}

/// The first `host:port` of a URL (`user:password@` left out), as
/// [`proxied_url`](crate::fault::proxied_url) reads it: where a raw client of the
/// backend connects.
///
/// # Panics
/// When the URL has no `scheme://` or no host.
pub fn host_port(url: &str) -> &str {
    let (start, end) = crate::fault::first_host_span(url)
        .unwrap_or_else(|e| panic!("no host:port in {url:?}: {e}"));
    &url[start..end]
}

/// `url` with `query` (`k=v[&k=v…]`) appended, after `?` or `&` as the URL needs.
pub fn with_query(url: &str, query: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{query}")
}

/// A backend under test: a driver and the URL of its server, with the deadline of
/// one call.
#[derive(Debug, Clone)]
pub struct Backend {
    driver: DriverDescriptor,
    url: String,
    limit: Duration,
}

impl Backend {
    /// `driver` on the server `url`, with calls bounded by [`DEFAULT_LIMIT`].
    pub fn new(driver: DriverDescriptor, url: impl Into<String>) -> Self {
        Backend {
            driver,
            url: url.into(),
            limit: DEFAULT_LIMIT,
        }
    }

    /// `driver` on the server whose URL is in `env` (`TOOZ_TEST_<X>_URL`), or `None`
    /// when the test `test` is to be skipped: the rule of [`backend_url`].
    ///
    /// # Panics
    /// When `env` is unset or blank and [`backends_required`].
    pub fn from_env(env: &str, driver: DriverDescriptor, test: &str) -> Option<Self> {
        backend_url(env, test).map(|url| Backend::new(driver, url))
    }

    /// The same backend with `query` appended to its URL ([`with_query`]), e.g.
    /// `timeout=5` for a short lease.
    #[must_use]
    pub fn with_query(&self, query: &str) -> Self {
        Backend {
            url: with_query(&self.url, query),
            ..self.clone()
        }
    }

    /// The same backend with calls bounded by `limit`.
    #[must_use]
    pub fn limit(self, limit: Duration) -> Self {
        Backend { limit, ..self }
    }

    /// The server's URL, as the test's environment gave it (plus what
    /// [`Backend::with_query`] appended).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The server's first `host:port` ([`host_port`]).
    pub fn host_port(&self) -> &str {
        host_port(&self.url)
    }

    /// The driver.
    pub fn driver(&self) -> DriverDescriptor {
        self.driver
    }

    /// The deadline of one call ([`Backend::timed`]).
    pub fn call_limit(&self) -> Duration {
        self.limit
    }

    /// A registry holding the driver.
    pub fn registry(&self) -> Registry {
        Registry::new().with(self.driver)
    }

    /// An unstarted coordinator on the server.
    ///
    /// # Panics
    /// When the registry refuses the URL or the member id.
    pub fn connect(&self, member: impl Into<MemberId>) -> Coordinator {
        self.connect_with(member, &ConnectOptions::default())
    }

    /// An unstarted coordinator on the server, with `options`.
    ///
    /// # Panics
    /// When the registry refuses the URL, the member id or the options.
    pub fn connect_with(
        &self,
        member: impl Into<MemberId>,
        options: &ConnectOptions,
    ) -> Coordinator {
        let member = member.into();
        self.registry()
            .connect_with(&self.url, member.clone(), options)
            .unwrap_or_else(|e| panic!("connect {member} to {}: {e}", self.url))
    }

    /// A coordinator on the server, started without heartbeats (`start(false)`:
    /// nothing is sent but what the test asks for); the start is bounded by the
    /// backend's limit.
    ///
    /// # Panics
    /// When the connect or the start fails, or the start hangs.
    pub async fn started(&self, member: impl Into<MemberId>) -> Coordinator {
        start(self.connect(member), self.limit).await
    }

    /// Like [`Backend::started`], connected with `options`.
    ///
    /// # Panics
    /// When the connect or the start fails, or the start hangs.
    pub async fn started_with(
        &self,
        member: impl Into<MemberId>,
        options: &ConnectOptions,
    ) -> Coordinator {
        start(self.connect_with(member, options), self.limit).await
    }

    /// `f`'s output, if it comes within the backend's limit ([`timed`]).
    ///
    /// # Panics
    /// When it does not: `<what> hung`.
    pub async fn timed<T>(&self, what: &str, f: impl Future<Output = T>) -> T {
        timed(self.limit, what, f).await
    }
}

async fn start(c: Coordinator, limit: Duration) -> Coordinator {
    let member = c.member_id().clone();
    timed(limit, "start", c.start(false))
        .await
        .unwrap_or_else(|e| panic!("start {member}: {e}"));
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_names_and_urls() {
        assert_eq!(url_env("etcd"), "TOOZ_TEST_ETCD_URL");
        assert_eq!(url_env("PostgreSQL"), "TOOZ_TEST_POSTGRESQL_URL");
        assert_eq!(
            host_port("mysql://tooz:tooz@127.0.0.1:3306/tooz"),
            "127.0.0.1:3306"
        );
        assert_eq!(host_port("memcached://127.0.0.1:11211/"), "127.0.0.1:11211");
        assert_eq!(
            host_port("etcd3+http://127.0.0.1:2379?timeout=2"),
            "127.0.0.1:2379"
        );
        assert_eq!(
            with_query("redis://h:1", "timeout=5"),
            "redis://h:1?timeout=5"
        );
        assert_eq!(
            with_query("redis://h:1?db=2", "timeout=5"),
            "redis://h:1?db=2&timeout=5"
        );
    }

    #[test]
    fn unique_names_differ() {
        let (a, b) = (unique("x"), unique("x"));
        assert!(a.starts_with(&format!("x-{}-", std::process::id())), "{a}");
        assert_ne!(a, b);
    }

    #[test]
    fn a_missing_url_skips_unless_backends_are_required() {
        let env = "TOOZ_TEST_X_URL";
        let url = Some(" x://h:1 ".to_string());
        assert_eq!(
            url_or_skip(url.clone(), false, env, "t").as_deref(),
            Some("x://h:1")
        );
        assert_eq!(url_or_skip(url, true, env, "t").as_deref(), Some("x://h:1"));
        assert_eq!(url_or_skip(None, false, env, "t"), None);
        assert_eq!(url_or_skip(Some("  ".into()), false, env, "t"), None);
        for blank in [None, Some(String::new())] {
            let failed = std::panic::catch_unwind(|| url_or_skip(blank, true, env, "t"))
                .expect_err("a missing URL fails when backends are required");
            assert_eq!(
                failed.downcast_ref::<String>().map(String::as_str),
                Some("t: TOOZ_TEST_X_URL is not set and TOOZ_REQUIRE_BACKENDS=1")
            );
        }
    }

    #[tokio::test]
    async fn timed_and_wait_for() {
        assert_eq!(timed(Duration::from_secs(1), "ready", async { 7 }).await, 7);
        let hung = tokio::spawn(timed(
            Duration::from_millis(20),
            "never",
            std::future::pending::<()>(),
        ))
        .await;
        let msg = hung.unwrap_err().into_panic();
        assert_eq!(
            msg.downcast_ref::<String>().map(String::as_str),
            Some("never hung")
        );
        let mut n = 0;
        wait_for(
            "three polls",
            Duration::from_secs(1),
            Duration::from_millis(10),
            || {
                n += 1;
                std::future::ready(n == 3)
            },
        )
        .await;
        assert_eq!(n, 3);
    }
}
