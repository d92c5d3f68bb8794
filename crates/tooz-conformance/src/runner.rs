//! Running cases: the [`Case`] table entry, [`run`], the [`Report`] and [`main`].

use std::fmt;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use libtest_mimic::{Arguments, Completion, FormatSetting, Trial};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tooz_core::ToozError;

use crate::check::{CaseError, CaseResult};
use crate::harness::Harness;
use crate::{CASES, JSON_REPORT_ENV, REQUIRE_BACKENDS_ENV, Setup, WORKER_ENV};

/// How long one case may run before it is reported as failed ("timed out").
pub const CASE_TIMEOUT: Duration = Duration::from_secs(60);

/// How many cases run at once unless `--test-threads` says otherwise.
pub const DEFAULT_CONCURRENCY: usize = 6;

/// One named case of the suite.
#[derive(Clone, Copy)]
pub struct Case {
    /// `topic::what_it_checks`, e.g. `locks::release_not_held_is_false`.
    pub name: &'static str,
    /// The case body.
    pub run: for<'a> fn(&'a Harness) -> BoxFuture<'a, CaseResult>,
}

impl fmt::Debug for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Case").field("name", &self.name).finish()
    }
}

/// The result of one case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The driver behaved as the contract says.
    Passed,
    /// It did not; the message says how.
    Failed(String),
    /// The driver lacks what the case needs (a gap to close, never a pass).
    Unsupported(String),
}

impl Outcome {
    /// A short label: `ok`, `FAILED` or `unsupported`.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Passed => "ok",
            Outcome::Failed(_) => "FAILED",
            Outcome::Unsupported(_) => "unsupported",
        }
    }

    /// The failure message or unsupported reason.
    pub fn message(&self) -> Option<&str> {
        match self {
            Outcome::Passed => None,
            Outcome::Failed(m) | Outcome::Unsupported(m) => Some(m),
        }
    }
}

impl From<CaseResult> for Outcome {
    fn from(r: CaseResult) -> Self {
        match r {
            Ok(()) => Outcome::Passed,
            Err(CaseError::Failed(m)) => Outcome::Failed(m),
            Err(CaseError::Unsupported(m)) => Outcome::Unsupported(m),
        }
    }
}

/// One line of a [`Report`].
#[derive(Debug, Clone)]
pub struct Row {
    /// The case name.
    pub name: &'static str,
    /// What happened.
    pub outcome: Outcome,
    /// How long the case took (cleanup excluded).
    pub duration: Duration,
}

/// The results of a run, in table order. `Display` prints the table, the details of
/// every failed and unsupported case, and the closing line
/// `N passed, N failed, N unsupported`.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// The driver the suite ran against.
    pub driver: String,
    /// One row per case that ran.
    pub rows: Vec<Row>,
}

impl Report {
    fn count(&self, f: impl Fn(&Outcome) -> bool) -> usize {
        self.rows.iter().filter(|r| f(&r.outcome)).count()
    }

    /// Cases that passed.
    pub fn passed(&self) -> usize {
        self.count(|o| matches!(o, Outcome::Passed))
    }

    /// Cases that failed.
    pub fn failed(&self) -> usize {
        self.count(|o| matches!(o, Outcome::Failed(_)))
    }

    /// Cases the driver could not run.
    pub fn unsupported(&self) -> usize {
        self.count(|o| matches!(o, Outcome::Unsupported(_)))
    }

    /// Whether nothing failed.
    pub fn is_success(&self) -> bool {
        self.failed() == 0
    }

    /// `N passed, N failed, N unsupported`.
    pub fn summary_line(&self) -> String {
        format!(
            "{} passed, {} failed, {} unsupported",
            self.passed(),
            self.failed(),
            self.unsupported()
        )
    }

    /// The report as JSON: `{driver, passed, failed, unsupported, cases: [{name,
    /// outcome, message, seconds}]}`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "driver": self.driver,
            "passed": self.passed(),
            "failed": self.failed(),
            "unsupported": self.unsupported(),
            "cases": self.rows.iter().map(|r| serde_json::json!({
                "name": r.name,
                "outcome": r.outcome.label(),
                "message": r.outcome.message(),
                "seconds": r.duration.as_secs_f64(),
            })).collect::<Vec<_>>(),
        })
    }
}

fn one_line(s: &str, max: usize) -> String {
    let flat: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if flat.chars().count() > max {
        let cut: String = flat.chars().take(max.saturating_sub(1)).collect();
        format!("{cut}…")
    } else {
        flat
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let w = self
            .rows
            .iter()
            .map(|r| r.name.len())
            .max()
            .unwrap_or(4)
            .max(4);
        writeln!(f, "{:<w$} | {:<11} | {:>8}", "case", "outcome", "duration")?;
        writeln!(
            f,
            "{}-+-{}-+-{}",
            "-".repeat(w),
            "-".repeat(11),
            "-".repeat(8)
        )?;
        for r in &self.rows {
            write!(
                f,
                "{:<w$} | {:<11} | {:>7.2}s",
                r.name,
                r.outcome.label(),
                r.duration.as_secs_f64()
            )?;
            if let Outcome::Unsupported(m) = &r.outcome {
                write!(f, "  ({})", one_line(m, 100))?;
            }
            writeln!(f)?;
        }
        let details: Vec<&Row> = self
            .rows
            .iter()
            .filter(|r| matches!(r.outcome, Outcome::Failed(_)))
            .collect();
        if !details.is_empty() {
            writeln!(f)?;
            writeln!(f, "failures:")?;
            for r in details {
                writeln!(f, "  {}: {}", r.name, r.outcome.message().unwrap_or(""))?;
            }
        }
        writeln!(f)?;
        writeln!(f, "{}", self.summary_line())
    }
}

/// Whether a case applies to the driver (see `cases::not_applicable`).
fn applies(case: &Case, harness: &Harness) -> bool {
    crate::cases::not_applicable(case.name, harness).is_none()
}

/// Which cases to run: libtest-style substring filters.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Run cases whose name contains one of these (all cases when empty).
    pub patterns: Vec<String>,
    /// Patterns must equal the name instead.
    pub exact: bool,
    /// Skip cases whose name contains one of these.
    pub skip: Vec<String>,
}

impl Filter {
    /// Whether the case `name` is selected.
    pub fn matches(&self, name: &str) -> bool {
        let selected = self.patterns.is_empty()
            || self.patterns.iter().any(|p| {
                if self.exact {
                    name == p
                } else {
                    name.contains(p.as_str())
                }
            });
        selected && !self.skip.iter().any(|s| name.contains(s.as_str()))
    }
}

/// Runs one case in its own scope of `harness` under [`CASE_TIMEOUT`], then
/// cleans the scope up.
async fn run_case(harness: &Harness, idx: usize, case: Case) -> Row {
    let h = harness.scoped(&format!("{idx:03}"));
    let t0 = Instant::now();
    let body = {
        let h = h.clone();
        tokio::spawn(async move { (case.run)(&h).await })
    };
    let abort = body.abort_handle();
    let outcome = match tokio::time::timeout(CASE_TIMEOUT, body).await {
        Ok(Ok(r)) => Outcome::from(r),
        Ok(Err(e)) if e.is_panic() => {
            let p = e.into_panic();
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| (*s).to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-text panic payload".into());
            Outcome::Failed(format!("panicked: {msg}"))
        }
        Ok(Err(e)) => Outcome::Failed(format!("case task failed: {e}")),
        Err(_) => {
            abort.abort();
            Outcome::Failed(format!("timed out after {CASE_TIMEOUT:?}"))
        }
    };
    let duration = t0.elapsed();
    h.cleanup().await;
    Row {
        name: case.name,
        outcome,
        duration,
    }
}

/// Runs the selected cases against `harness`'s backend, at most `concurrency` at
/// once, each in its own scope and under [`CASE_TIMEOUT`]. Rows follow the table
/// order of [`CASES`]. Progress goes to stderr.
///
/// This is the library entry point (no command line); [`main`] runs the same
/// cases through libtest-mimic instead.
pub async fn run(harness: &Harness, filter: &Filter, concurrency: usize) -> Report {
    let selected: Vec<(usize, Case)> = CASES
        .iter()
        .copied()
        .enumerate()
        .filter(|(_, c)| filter.matches(c.name))
        .filter(|(_, c)| applies(c, harness))
        .collect();
    let total = selected.len();
    let sem = Arc::new(Semaphore::new(concurrency.max(1)));
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut handles = Vec::with_capacity(total);
    for (idx, case) in selected {
        let harness = harness.clone();
        let sem = Arc::clone(&sem);
        let done = Arc::clone(&done);
        handles.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await;
            let row = run_case(&harness, idx, case).await;
            let n = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            let _ = writeln!(
                std::io::stderr().lock(),
                "[{n:>3}/{total}] {:<11} {} ({:.2}s)",
                row.outcome.label(),
                row.name,
                row.duration.as_secs_f64()
            );
            row
        }));
    }
    let mut rows = Vec::with_capacity(total);
    for handle in handles {
        match handle.await {
            Ok(row) => rows.push(row),
            Err(e) => rows.push(Row {
                name: "<runner>",
                outcome: Outcome::Failed(format!("runner task failed: {e}")),
                duration: Duration::ZERO,
            }),
        }
    }
    Report {
        driver: harness.driver().to_string(),
        rows,
    }
}

/// The command line, parsed by libtest-mimic as libtest (and cargo-nextest) would
/// pass it: `--list`, `--format terse`, one substring filter, `--exact`, `--skip`
/// (repeatable), `--test-threads`, `--ignored`, `--include-ignored`, `--nocapture`
/// and the rest of what libtest-mimic accepts. Unknown flags are an error, as
/// with libtest.
fn parse_args(args: impl IntoIterator<Item = String>) -> Arguments {
    let mut a = Arguments::from_iter(args);
    // Cases mostly wait on the backend, so more run at once than there are cores.
    if a.test_threads.is_none() {
        a.test_threads = Some(DEFAULT_CONCURRENCY);
    }
    a
}

/// A trial standing for `name` in listings and filtering (libtest-mimic's
/// filter semantics: a substring of the name, or the whole name with `--exact`).
fn placeholder(name: &str) -> Trial {
    Trial::test(name, || Ok(()))
}

/// Whether the command line selects the case `name`.
fn selects(args: &Arguments, name: &str) -> bool {
    !args.is_filtered_out(&placeholder(name))
}

fn out(text: &str) {
    let mut o = std::io::stdout().lock();
    let _ = o.write_all(text.as_bytes());
    let _ = o.flush();
}

/// Whether an error at start means "the backend is not there" rather than a bug.
fn is_unreachable(e: &ToozError) -> bool {
    matches!(
        e,
        ToozError::Connection { .. } | ToozError::OperationTimedOut(_)
    )
}

/// The entry point of a driver's `tests/conformance.rs` (`harness = false`).
///
/// - With `TOOZ_CONFORMANCE_WORKER` set, acts as a worker process for a
///   multi-process case and exits.
/// - The command line is libtest's, parsed by [libtest-mimic](libtest_mimic):
///   `--list [--format terse]` prints `<case>: test` per case that applies to the
///   backend (cargo-nextest lists tests this way and then runs each with `--exact
///   <case>`); a positional argument filters by substring (`--exact` for a whole
///   name, `--skip S` to exclude, repeatable); `--test-threads N` bounds how many
///   cases run at once ([`DEFAULT_CONCURRENCY`] unless given); `--ignored` runs
///   nothing (no case is ignored). Unlike libtest, only one filter is accepted.
/// - Otherwise checks the backend is reachable, then runs the cases through
///   libtest-mimic, which prints `test <case> ... ok` lines and its own summary
///   (an unsupported case shows as `ignored, <reason>`), and then prints our table
///   and the closing line `N passed, N failed, N unsupported`, writes the JSON
///   report to `$TOOZ_CONFORMANCE_JSON` if set, and exits 0 iff nothing failed.
///
/// How the cases run: libtest-mimic's worker threads (one per `--test-threads`)
/// each take a case and block on one shared multi-threaded tokio runtime, where
/// the case body runs as a task under [`CASE_TIMEOUT`] and its scope is cleaned up
/// after; so up to `--test-threads` cases run concurrently on that one runtime,
/// and worker processes are this binary re-run with `TOOZ_CONFORMANCE_WORKER`.
///
/// An unreachable backend fails every case when `TOOZ_REQUIRE_BACKENDS=1`; otherwise
/// the run is skipped with a message and exits 0.
pub fn main(setup: Setup) -> ! {
    if std::env::var_os(WORKER_ENV).is_some() {
        let code = crate::worker::main(setup);
        std::process::exit(code);
    }
    let args = parse_args(std::env::args());
    let harness = Harness::new(setup);
    let cases: Vec<(usize, Case)> = CASES
        .iter()
        .copied()
        .enumerate()
        .filter(|(_, c)| applies(c, &harness))
        .collect();
    if args.list {
        let trials = cases.iter().map(|(_, c)| placeholder(c.name)).collect();
        let _listed = libtest_mimic::run(&args, trials);
        std::process::exit(0);
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            out(&format!("cannot build a tokio runtime: {e}\n"));
            std::process::exit(1);
        }
    };
    let selected = cases.iter().filter(|(_, c)| selects(&args, c.name)).count();
    let require = std::env::var(REQUIRE_BACKENDS_ENV).is_ok_and(|v| v == "1");
    let mut cannot_run = None;
    if selected > 0 {
        announce(&harness);
        if let Err(e) = rt.block_on(probe(&harness)) {
            if is_unreachable(&e) && !require {
                out(&format!(
                    "SKIPPED: the {} backend at {} is unreachable ({e}); none of the {selected} cases ran. \
                     Start it (cargo xtask backends up) or set {REQUIRE_BACKENDS_ENV}=1 to make this a failure.\n",
                    harness.driver(),
                    harness.url(),
                ));
                std::process::exit(0);
            }
            cannot_run = Some(if is_unreachable(&e) {
                format!("backend unreachable: {e}")
            } else {
                format!("cannot start a coordinator: {e}")
            });
        }
    }
    let rows: Arc<Mutex<Vec<(usize, Row)>>> = Arc::default();
    let trials = cases
        .iter()
        .map(|&(idx, case)| {
            let (handle, harness, rows) = (rt.handle().clone(), harness.clone(), Arc::clone(&rows));
            let cannot_run = cannot_run.clone();
            Trial::ignorable_test(case.name, move || {
                let row = match cannot_run {
                    Some(why) => Row {
                        name: case.name,
                        outcome: Outcome::Failed(why),
                        duration: Duration::ZERO,
                    },
                    None => handle.block_on(run_case(&harness, idx, case)),
                };
                let outcome = row.outcome.clone();
                lock(&rows).push((idx, row));
                match outcome {
                    Outcome::Passed => Ok(Completion::Completed),
                    Outcome::Unsupported(m) => Ok(Completion::ignored_with(format!(
                        "unsupported: {}",
                        one_line(&m, 100)
                    ))),
                    Outcome::Failed(m) => Err(m.into()),
                }
            })
        })
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    let mut rows = std::mem::take(&mut *lock(&rows));
    rows.sort_by_key(|(idx, _)| *idx);
    let report = Report {
        driver: harness.driver().to_string(),
        rows: rows.into_iter().map(|(_, r)| r).collect(),
    };
    let json_output = matches!(args.format, Some(FormatSetting::Json));
    finish(&report, json_output);
    let code = i32::from(conclusion.has_failed() || !report.is_success());
    let _ = std::io::stdout().flush();
    std::process::exit(code)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The header: what the suite runs against, and which cases do not apply.
fn announce(harness: &Harness) {
    out(&format!(
        "tooz conformance: driver {} at {} (lease {:?}, namespace {})\n",
        harness.driver(),
        harness.url(),
        harness.lease(),
        harness.namespace()
    ));
    let mut skipped: std::collections::BTreeMap<&str, usize> = std::collections::BTreeMap::new();
    for c in CASES {
        if let Some(why) = crate::cases::not_applicable(c.name, harness) {
            *skipped.entry(why).or_default() += 1;
        }
    }
    for (why, n) in skipped {
        out(&format!(
            "{n} case(s) do not apply to this driver ({why})\n"
        ));
    }
}

/// Prints the table and closing line (to stderr when stdout carries
/// libtest-mimic's JSON) and writes the JSON report if asked.
fn finish(report: &Report, json_output: bool) {
    if json_output {
        let _ = write!(std::io::stderr().lock(), "\n{report}");
    } else {
        out(&format!("\n{report}"));
    }
    if let Ok(path) = std::env::var(JSON_REPORT_ENV)
        && let Err(e) = std::fs::write(&path, report.to_json().to_string())
    {
        out(&format!("cannot write the JSON report to {path}: {e}\n"));
    }
}

/// Connects and starts one coordinator to see whether the backend is there.
async fn probe(h: &Harness) -> tooz_core::Result<()> {
    let c = h
        .registry()
        .connect_with(h.url(), h.name("probe"), &h.connect_options())?;
    match tokio::time::timeout(Duration::from_secs(20), c.start(false)).await {
        Ok(Ok(())) => {
            let _ = c.stop().await;
            Ok(())
        }
        Ok(Err(e)) => Err(e),
        Err(_) => Err(ToozError::OperationTimedOut(
            "starting a coordinator took more than 20 s".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Arguments {
        parse_args(
            std::iter::once("conformance")
                .chain(v.iter().copied())
                .map(String::from),
        )
    }

    #[test]
    fn libtest_flags() {
        // What cargo-nextest passes to list, then to run one case.
        let a = args(&["--list", "--format", "terse"]);
        assert!(a.list);
        assert!(a.filter.is_none());
        assert!(selects(&a, "locks::a"));
        let a = args(&["--list", "--format", "terse", "--ignored"]);
        assert!(a.list && a.ignored);
        assert!(!selects(&a, "locks::a"), "no case is ignored");
        let a = args(&["--exact", "locks::a", "--nocapture"]);
        assert!(selects(&a, "locks::a"));
        assert!(!selects(&a, "locks::ab"));
        // What cargo test passes.
        let a = args(&["locks::", "--test-threads", "2", "-q"]);
        assert_eq!(a.filter.as_deref(), Some("locks::"));
        assert_eq!(a.test_threads, Some(2));
        assert!(selects(&a, "locks::a"));
        assert!(!selects(&a, "groups::a"));
        let a = args(&["--test-threads=3", "--skip", "slow", "--skip", "b::", "x"]);
        assert_eq!(a.test_threads, Some(3));
        assert_eq!(a.skip, ["slow", "b::"]);
        assert!(selects(&a, "a::x"));
        assert!(!selects(&a, "a::x_slow"));
        assert!(!selects(&a, "b::x"));
        assert!(!selects(&a, "a::y"));
        // Without --test-threads, six cases at once.
        assert_eq!(args(&[]).test_threads, Some(DEFAULT_CONCURRENCY));
    }

    #[test]
    fn filters() {
        let f = Filter {
            patterns: vec!["locks::".into()],
            ..Filter::default()
        };
        assert!(f.matches("locks::a"));
        assert!(!f.matches("groups::a"));
        let f = Filter {
            patterns: vec!["locks::a".into()],
            exact: true,
            skip: vec![],
        };
        assert!(f.matches("locks::a"));
        assert!(!f.matches("locks::ab"));
    }

    #[test]
    fn summary_line_format() {
        let r = Report {
            driver: "x".into(),
            rows: vec![
                Row {
                    name: "a::b",
                    outcome: Outcome::Passed,
                    duration: Duration::from_millis(5),
                },
                Row {
                    name: "a::c",
                    outcome: Outcome::Unsupported("no".into()),
                    duration: Duration::ZERO,
                },
            ],
        };
        assert_eq!(r.summary_line(), "1 passed, 0 failed, 1 unsupported");
        let text = r.to_string();
        assert!(text.ends_with("\n1 passed, 0 failed, 1 unsupported\n"));
        assert!(r.is_success());
    }

    #[test]
    fn case_names_are_unique_and_shaped() {
        let mut names: Vec<&str> = CASES.iter().map(|c| c.name).collect();
        for n in &names {
            assert!(n.contains("::"), "{n}");
        }
        names.sort_unstable();
        let before = names.len();
        names.dedup();
        assert_eq!(before, names.len());
    }
}
