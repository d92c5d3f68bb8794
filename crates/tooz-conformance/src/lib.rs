#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

#[macro_use]
mod check;

mod cases;
pub mod fault;
mod harness;
pub mod python;
mod runner;
pub mod testkit;
mod worker;

use std::time::Duration;

use tooz_core::Registry;

pub use cases::CASES;
pub use check::{CaseError, CaseResult, Ctx};
pub use harness::{Harness, PUSH_CASE_POLL_INTERVAL, Worker, WorkerExit};
pub use runner::{
    CASE_TIMEOUT, Case, DEFAULT_CONCURRENCY, Filter, Outcome, Report, Row, main, run,
};

/// Environment variable that turns the test binary into a worker process (set by
/// [`Harness::spawn_worker`]; not meant to be set by hand).
pub const WORKER_ENV: &str = "TOOZ_CONFORMANCE_WORKER";

/// Environment variable carrying the backend URL to a worker process.
pub const WORKER_URL_ENV: &str = "TOOZ_CONFORMANCE_URL";

/// Environment variable that makes an unreachable backend a failure instead of a skip.
pub const REQUIRE_BACKENDS_ENV: &str = "TOOZ_REQUIRE_BACKENDS";

/// Environment variable naming a file where [`main`] writes the report as JSON.
pub const JSON_REPORT_ENV: &str = "TOOZ_CONFORMANCE_JSON";

/// What the suite runs against: one driver, one backend URL.
///
/// A driver's `tests/conformance.rs` builds one and hands it to [`main`] (here for
/// `memory://`, as `crates/tooz-core/tests/conformance.rs` does):
///
/// ```no_run
/// use std::time::Duration;
/// use tooz_conformance::Setup;
/// use tooz_core::Registry;
///
/// fn main() {
///     tooz_conformance::main(Setup {
///         driver: "memory".into(),
///         url: std::env::var("TOOZ_TEST_MEMORY_URL")
///             .unwrap_or_else(|_| "memory://conformance".into()),
///         registry: Registry::new().with(tooz_core::memory::DRIVER),
///         // Short leases so expiry cases finish quickly.
///         options: vec![("timeout".into(), "2".into())],
///         lease: Duration::from_secs(2),
///     })
/// }
/// ```
#[derive(Debug, Clone)]
pub struct Setup {
    /// The driver name, as shown in the report.
    pub driver: String,
    /// The backend URL every coordinator of the run connects to.
    pub url: String,
    /// A registry holding (at least) the driver serving `url`.
    pub registry: Registry,
    /// Options applied to every coordinator (they override URL options), typically
    /// short timeouts so that expiry happens within seconds.
    pub options: Vec<(String, String)>,
    /// The membership/lock lease those options configure: how long a member or a
    /// holder that stopped renewing (or crashed) may still be seen. Expiry cases wait
    /// this long plus some slack.
    pub lease: Duration,
}
