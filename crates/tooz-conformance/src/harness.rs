//! The [`Harness`] handed to every case, and [`Worker`] processes.

use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};
use tokio::task::JoinHandle;
use tooz_core::{
    ConnectOptions, Coordinator, CoordinatorConfig, GroupId, LockName, MemberId, Registry,
};

use crate::check::{CaseError, CaseResult, Ctx};
use crate::{Setup, WORKER_ENV, WORKER_URL_ENV};

struct Context {
    setup: Setup,
    /// Random per run, so reruns on a shared backend do not collide.
    prefix: String,
}

#[derive(Default)]
struct Scope {
    ns: String,
    coords: Mutex<Vec<Coordinator>>,
    groups: Mutex<Vec<GroupId>>,
    files: Mutex<Vec<PathBuf>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The core's polling interval (`CoordinatorConfig::poll_interval`) of the
/// coordinators [`Harness::pushing`] connects: far longer than any case, so that an
/// event a push case waits for can only come from the driver's push, never from the
/// core's polling fallback.
pub const PUSH_CASE_POLL_INTERVAL: Duration = Duration::from_secs(3600);

/// What a case gets: coordinators on the backend under test, unique names, worker
/// processes and the lease length.
///
/// Each case runs with its own scope: names it makes are unique to the case and to
/// the run (a random prefix per run), and the coordinators it connects are stopped
/// (and the groups it named deleted, best effort) after it ends, even when it fails
/// or times out.
///
/// ```no_run
/// # async fn case(h: &tooz_conformance::Harness) -> tooz_conformance::CaseResult {
/// use tooz_conformance::Ctx;
///
/// let a = h.started(h.member("a")).await?;
/// let g = h.group("g");
/// a.create_group(&g).await.ctx("create_group")?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Harness {
    ctx: Arc<Context>,
    scope: Arc<Scope>,
}

impl fmt::Debug for Harness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Harness")
            .field("driver", &self.ctx.setup.driver)
            .field("url", &self.ctx.setup.url)
            .field("namespace", &self.scope.ns)
            .finish()
    }
}

fn random_prefix() -> String {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    h.write_u128(nanos);
    h.write_u32(std::process::id());
    format!("{:08x}", h.finish() & 0xffff_ffff)
}

impl Harness {
    /// A harness for one run of the suite, with a fresh random name prefix.
    pub fn new(setup: Setup) -> Self {
        let prefix = random_prefix();
        Harness {
            scope: Arc::new(Scope {
                ns: format!("t{prefix}"),
                ..Scope::default()
            }),
            ctx: Arc::new(Context { setup, prefix }),
        }
    }

    /// A harness sharing this run's setup with a scope of its own: names carry
    /// `label` and coordinators are tracked separately for [`Harness::cleanup`].
    pub fn scoped(&self, label: &str) -> Self {
        Harness {
            ctx: Arc::clone(&self.ctx),
            scope: Arc::new(Scope {
                ns: format!("t{}-{label}", self.ctx.prefix),
                ..Scope::default()
            }),
        }
    }

    /// The driver name under test.
    pub fn driver(&self) -> &str {
        &self.ctx.setup.driver
    }

    /// The backend URL.
    pub fn url(&self) -> &str {
        &self.ctx.setup.url
    }

    /// The registry the run connects through.
    pub fn registry(&self) -> &Registry {
        &self.ctx.setup.registry
    }

    /// The options applied to every coordinator.
    pub fn options(&self) -> &[(String, String)] {
        &self.ctx.setup.options
    }

    /// The membership/lock lease the options configure.
    pub fn lease(&self) -> Duration {
        self.ctx.setup.lease
    }

    /// How long after a lease should have run out an expiry may still be pending
    /// (renewal happens at half the lease, clocks tick coarsely): `lease + max(lease, 2 s)`.
    pub fn expiry_deadline(&self) -> Duration {
        let lease = self.lease();
        lease + lease.max(Duration::from_secs(2))
    }

    /// The namespace of this scope (a prefix of every name it makes).
    pub fn namespace(&self) -> &str {
        &self.scope.ns
    }

    /// A unique name `<namespace>-<label>`.
    pub fn name(&self, label: &str) -> String {
        format!("{}-{label}", self.scope.ns)
    }

    /// A unique member id.
    pub fn member(&self, label: &str) -> MemberId {
        MemberId::from(self.name(label))
    }

    /// A unique group id; the group is deleted (best effort) when the case ends.
    pub fn group(&self, label: &str) -> GroupId {
        let g = GroupId::from(self.name(label));
        self.track_group(g.clone());
        g
    }

    /// Registers a group made by other means for best-effort deletion.
    pub fn track_group(&self, group: GroupId) {
        lock(&self.scope.groups).push(group);
    }

    /// A unique lock name.
    pub fn lock_name(&self, label: &str) -> LockName {
        LockName::from(self.name(label))
    }

    /// A unique path in the temporary directory, removed when the case ends.
    pub fn temp_path(&self, label: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("tooz-conformance-{}", self.name(label)));
        lock(&self.scope.files).push(p.clone());
        p
    }

    /// The options every coordinator of the run is connected with.
    pub fn connect_options(&self) -> ConnectOptions {
        let mut o = ConnectOptions::new();
        for (k, v) in self.options() {
            o = o.option(k.clone(), v.clone());
        }
        o
    }

    /// An unstarted coordinator on the backend under test. It is stopped when the
    /// case ends.
    ///
    /// # Errors
    /// Whatever the registry returns (`InvalidId`, `InvalidUrl`, `InvalidOption`).
    pub fn connect(&self, member: impl Into<MemberId>) -> tooz_core::Result<Coordinator> {
        let c = self
            .registry()
            .connect_with(self.url(), member, &self.connect_options())?;
        lock(&self.scope.coords).push(c.clone());
        Ok(c)
    }

    /// The options of the coordinators [`Harness::pushing`] connects: those of
    /// [`Harness::connect_options`] with the core's polling fallback slowed to
    /// [`PUSH_CASE_POLL_INTERVAL`] when the driver publishes pushed watches
    /// ([`Features::push_watches`](tooz_core::Features)); unchanged otherwise.
    pub fn push_connect_options(&self) -> ConnectOptions {
        if !self.features().is_some_and(|f| f.push_watches) {
            return self.connect_options();
        }
        let mut config = CoordinatorConfig::default();
        config.poll_interval = PUSH_CASE_POLL_INTERVAL;
        self.connect_options().config(config)
    }

    /// A coordinator started with heartbeats for a *push case*: for a driver that
    /// publishes pushed watches ([`Features::push_watches`](tooz_core::Features)),
    /// its core polls only every [`PUSH_CASE_POLL_INTERVAL`] (an hour).
    ///
    /// The push cases (event streams delivering another member's joins, leaves,
    /// crash and leadership changes; `become_leader` taking over) connect their
    /// observing coordinators here, and keep their limits at a second or two. For a
    /// driver that says it pushes they pass only when it does: the core's polling
    /// fallback would take an hour. A driver that says it polls keeps the default
    /// poll interval (500 ms) and must meet the same limits by polling.
    ///
    /// Lock wake-ups come from the core's wait loop over the driver's
    /// [`DriverLock::wakeups`](tooz_core::DriverLock::wakeups); without them it polls
    /// with a backoff capped at 250 ms, and the waking case bounds the wake-up.
    ///
    /// # Errors
    /// A failed connect or start, as a [`CaseError`].
    pub async fn pushing(&self, member: impl Into<MemberId>) -> Result<Coordinator, CaseError> {
        let member = member.into();
        let c = self
            .registry()
            .connect_with(self.url(), member.clone(), &self.push_connect_options())
            .ctx(&format!("connect as {member} (push case)"))?;
        lock(&self.scope.coords).push(c.clone());
        c.start(true)
            .await
            .ctx(&format!("start as {member} (push case)"))?;
        Ok(c)
    }

    /// A coordinator started with heartbeats (`start(true)`).
    ///
    /// # Errors
    /// A failed connect or start, as a [`CaseError`].
    pub async fn started(&self, member: impl Into<MemberId>) -> Result<Coordinator, CaseError> {
        let member = member.into();
        let c = self
            .connect(member.clone())
            .ctx(&format!("connect as {member}"))?;
        c.start(true).await.ctx(&format!("start as {member}"))?;
        Ok(c)
    }

    /// The features the driver under test publishes (`None` if its scheme is not
    /// in the registry).
    pub fn features(&self) -> Option<tooz_core::Features> {
        self.registry().driver_for(self.url()).map(|d| d.features)
    }

    /// Whether the backend is reached over TCP (its URL names a `host:port`), so
    /// that the `faults::` cases can put a [`FaultProxy`](crate::fault::FaultProxy)
    /// between a coordinator and it.
    pub fn networked(&self) -> bool {
        crate::fault::url_target(self.url()).is_ok()
    }

    /// Whether the URL names several servers the client may fail over between: a
    /// host list (`h1:p1,h2:p2`) or Redis Sentinels (`?sentinel=`). A
    /// [`FaultProxy`](crate::fault::FaultProxy) in front of the first host cannot
    /// cut such a client off, nor does an unreachable first host make the backend
    /// unreachable.
    pub fn multi_host(&self) -> bool {
        crate::fault::names_several_servers(self.url())
    }

    /// A fault-injecting proxy in front of the backend, and a coordinator started
    /// with heartbeats that reaches the backend through it (stopped when the case
    /// ends; the proxy goes when its last handle is dropped).
    ///
    /// # Errors
    /// A backend that is not reached over TCP (see [`Harness::networked`]), or a
    /// failed connect or start.
    pub async fn started_behind_proxy(
        &self,
        member: impl Into<MemberId>,
    ) -> Result<(Coordinator, crate::fault::FaultProxy), CaseError> {
        let member = member.into();
        let target = crate::fault::url_target(self.url())
            .map_err(|e| CaseError::Unsupported(format!("no TCP address in the URL: {e}")))?;
        let proxy = crate::fault::FaultProxy::start(target)
            .await
            .ctx("starting the fault proxy")?;
        let url = crate::fault::proxied_url(self.url(), &proxy).ctx("proxied URL")?;
        let c = self
            .registry()
            .connect_with(&url, member.clone(), &self.connect_options())
            .ctx(&format!("connect as {member} through the proxy"))?;
        lock(&self.scope.coords).push(c.clone());
        c.start(true)
            .await
            .ctx(&format!("start as {member} through the proxy"))?;
        Ok((c, proxy))
    }

    /// A coordinator started without heartbeats (`start(false)`).
    ///
    /// # Errors
    /// A failed connect or start, as a [`CaseError`].
    pub async fn started_quiet(
        &self,
        member: impl Into<MemberId>,
    ) -> Result<Coordinator, CaseError> {
        let member = member.into();
        let c = self
            .connect(member.clone())
            .ctx(&format!("connect as {member}"))?;
        c.start(false).await.ctx(&format!("start as {member}"))?;
        Ok(c)
    }

    /// Starts this test binary again as a worker process (see the crate docs for the
    /// commands) on the same backend URL. The process is killed when the [`Worker`]
    /// is dropped.
    ///
    /// # Errors
    /// The executable cannot be found or started.
    pub fn spawn_worker(&self, args: &[&str]) -> Result<Worker, CaseError> {
        let exe = std::env::current_exe().ctx("locating the test executable")?;
        let mut cmd = tokio::process::Command::new(exe);
        cmd.args(args)
            .env(WORKER_ENV, "1")
            .env(WORKER_URL_ENV, self.url())
            // The worker exits when this pipe closes, so no worker outlives the
            // suite even if the suite process is killed.
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .ctx(&format!("spawning worker {}", args.join(" ")))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| CaseError::Failed("worker stdout is not piped".into()))?;
        let stdin = child.stdin.take();
        let stderr = child.stderr.take();
        let stderr = tokio::spawn(async move {
            let mut s = String::new();
            if let Some(mut e) = stderr {
                let _ = e.read_to_string(&mut s).await;
            }
            s
        });
        Ok(Worker {
            describe: args.join(" "),
            child,
            _stdin: stdin,
            stdout: BufReader::new(stdout).lines(),
            stderr,
        })
    }

    /// Stops every coordinator this scope connected, deletes the groups it named
    /// (best effort) and removes its temporary files. The runner calls it after
    /// each case.
    pub async fn cleanup(&self) {
        let coords = std::mem::take(&mut *lock(&self.scope.coords));
        for c in &coords {
            if c.is_started() {
                let _ = tokio::time::timeout(Duration::from_secs(10), c.stop()).await;
            }
        }
        let groups = std::mem::take(&mut *lock(&self.scope.groups));
        if !groups.is_empty()
            && let Ok(c) = self.registry().connect_with(
                self.url(),
                self.name("cleanup"),
                &self.connect_options(),
            )
        {
            let work = async {
                if c.start(false).await.is_ok() {
                    for g in &groups {
                        let _ = c.delete_group(g).await;
                    }
                    let _ = c.stop().await;
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(10), work).await;
        }
        for f in std::mem::take(&mut *lock(&self.scope.files)) {
            let _ = std::fs::remove_file(&f);
        }
    }
}

/// A worker process started by [`Harness::spawn_worker`].
pub struct Worker {
    describe: String,
    child: Child,
    /// Held open for the worker's lifetime (see `spawn_worker`).
    _stdin: Option<ChildStdin>,
    stdout: Lines<BufReader<ChildStdout>>,
    stderr: JoinHandle<String>,
}

impl fmt::Debug for Worker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Worker")
            .field("command", &self.describe)
            .field("pid", &self.child.id())
            .finish()
    }
}

/// How a worker ended.
#[derive(Debug)]
pub struct WorkerExit {
    /// Its exit status.
    pub status: ExitStatus,
    /// Lines it printed on stdout that were not read before.
    pub stdout: Vec<String>,
    /// Everything it printed on stderr.
    pub stderr: String,
}

impl Worker {
    /// The OS process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// The next line the worker prints, `None` at end of output.
    ///
    /// # Errors
    /// Nothing was printed within `timeout`.
    pub async fn next_line(&mut self, timeout: Duration) -> Result<Option<String>, CaseError> {
        match tokio::time::timeout(timeout, self.stdout.next_line()).await {
            Ok(Ok(line)) => Ok(line),
            Ok(Err(e)) => fail!("reading from worker `{}`: {e}", self.describe),
            Err(_) => fail!(
                "worker `{}` printed nothing within {timeout:?}",
                self.describe
            ),
        }
    }

    /// Waits for the worker to print exactly `expected` on a line (other lines are
    /// skipped).
    ///
    /// # Errors
    /// The worker exited or stayed silent, with its stderr in the message.
    pub async fn expect_line(&mut self, expected: &str, timeout: Duration) -> CaseResult {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(left, self.stdout.next_line()).await {
                Ok(Ok(Some(line))) if line.trim() == expected => return Ok(()),
                Ok(Ok(Some(line))) => seen.push(line),
                Ok(Ok(None)) | Ok(Err(_)) => {
                    let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
                    let err = self.stderr_text().await;
                    fail!(
                        "worker `{}` ended before printing {expected:?}; stdout {seen:?}; stderr: {err}",
                        self.describe
                    )
                }
                Err(_) => fail!(
                    "worker `{}` did not print {expected:?} within {timeout:?}; stdout so far {seen:?}",
                    self.describe
                ),
            }
        }
    }

    async fn stderr_text(&mut self) -> String {
        match tokio::time::timeout(Duration::from_secs(2), &mut self.stderr).await {
            Ok(Ok(s)) => s.trim().to_string(),
            _ => "<unavailable>".into(),
        }
    }

    /// Kills the worker with SIGKILL (a crash: it cannot clean up) and reaps it.
    ///
    /// # Errors
    /// The signal could not be sent.
    pub async fn kill(&mut self) -> CaseResult {
        self.child.start_kill().ctx("killing the worker")?;
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
        Ok(())
    }

    /// Waits for the worker to exit and collects its remaining output.
    ///
    /// # Errors
    /// It did not exit within `timeout` (it is killed then).
    pub async fn finish(mut self, timeout: Duration) -> Result<WorkerExit, CaseError> {
        let status = match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => fail!("waiting for worker `{}`: {e}", self.describe),
            Err(_) => {
                let _ = self.child.start_kill();
                let err = self.stderr_text().await;
                fail!(
                    "worker `{}` did not finish within {timeout:?}; stderr: {err}",
                    self.describe
                )
            }
        };
        let mut stdout = Vec::new();
        while let Ok(Ok(Some(line))) =
            tokio::time::timeout(Duration::from_secs(2), self.stdout.next_line()).await
        {
            stdout.push(line);
        }
        let stderr = self.stderr_text().await;
        Ok(WorkerExit {
            status,
            stdout,
            stderr,
        })
    }
}
