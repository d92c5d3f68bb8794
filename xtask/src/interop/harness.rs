//! What the interop scenarios are built from: child processes with captured output and a
//! deadline, background holders that are always cleaned up, polling with a deadline, the
//! scenario context (the Python script, the `tooz` binary, the shared backend URL), and the
//! report that collects each scenario's outcome as a value.

use std::{
    fmt::Write as _,
    fs,
    io::{BufRead as _, BufReader, Read},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, ExitStatus, Stdio},
    sync::{
        Arc, Mutex,
        mpsc::{self, Receiver, RecvTimeoutError},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;

/// How long a one-shot command (a Python query, a `tooz` call) may take.
pub(crate) const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// Lines of a child's output quoted in an error.
const TAIL_LINES: usize = 15;

/// Everything a scenario needs to drive both sides against one backend.
#[derive(Debug, Clone)]
pub(crate) struct Ctx {
    /// The virtualenv's interpreter.
    pub(crate) python: PathBuf,
    /// The Python side's script for this driver.
    pub(crate) script: PathBuf,
    /// The built `tooz` CLI.
    pub(crate) tooz: PathBuf,
    /// Scratch space of this driver's run (markers, gates, the backend directory).
    pub(crate) dir: PathBuf,
    /// The backend URL both sides use.
    pub(crate) url: String,
}

impl Ctx {
    /// `python SCRIPT SUBCOMMAND URL MEMBER ARGS...`
    pub(crate) fn py(&self, sub: &str, member: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.python);
        cmd.arg(&self.script)
            .args([sub, &self.url, member])
            .args(args)
            .env("PYTHONUNBUFFERED", "1");
        cmd
    }

    /// Runs a Python subcommand that must succeed and print one JSON value last.
    pub(crate) fn py_json(&self, sub: &str, member: &str, args: &[&str]) -> Result<Value> {
        let done = run(&format!("python {sub}"), self.py(sub, member, args))?;
        done.success()?;
        done.last_json()
    }

    /// Runs a Python subcommand that must succeed; returns its last stdout line.
    pub(crate) fn py_ok(&self, sub: &str, member: &str, args: &[&str]) -> Result<String> {
        let done = run(&format!("python {sub}"), self.py(sub, member, args))?;
        done.success()?;
        Ok(done.last_line().to_owned())
    }

    /// Starts a long-lived Python subcommand (`join`, `hold-lock`).
    pub(crate) fn py_bg(&self, sub: &str, member: &str, args: &[&str]) -> Result<Proc> {
        Proc::spawn(
            &format!("python {sub} ({member})"),
            self.py(sub, member, args),
        )
    }

    /// `tooz --url URL --member-id MEMBER ARGS...`
    pub(crate) fn tooz(&self, member: &str, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.tooz);
        cmd.args(["--url", &self.url, "--member-id", member])
            .args(args);
        cmd
    }

    /// Runs the `tooz` CLI to completion, whatever its exit status.
    pub(crate) fn tooz_run(&self, member: &str, args: &[&str]) -> Result<Done> {
        run(&format!("tooz {}", args.join(" ")), self.tooz(member, args))
    }

    /// Runs the `tooz` CLI, which must succeed; returns its stdout.
    pub(crate) fn tooz_ok(&self, member: &str, args: &[&str]) -> Result<String> {
        let done = self.tooz_run(member, args)?;
        done.success()?;
        Ok(done.stdout)
    }

    /// Starts the `tooz` CLI in the background.
    pub(crate) fn tooz_bg(&self, member: &str, args: &[&str]) -> Result<Proc> {
        Proc::spawn(&format!("tooz {}", args.join(" ")), self.tooz(member, args))
    }

    /// A fresh path under the scratch directory (not created).
    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// A finished one-shot command.
#[derive(Debug)]
pub(crate) struct Done {
    pub(crate) label: String,
    pub(crate) status: ExitStatus,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

impl Done {
    /// Fails, quoting the output, unless the command exited with 0.
    pub(crate) fn success(&self) -> Result<()> {
        if self.status.success() {
            Ok(())
        } else {
            Err(anyhow!("{}", self.describe("failed")))
        }
    }

    /// The last non-empty line of stdout.
    pub(crate) fn last_line(&self) -> &str {
        self.stdout
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
            .trim()
    }

    /// The last stdout line, parsed as JSON.
    pub(crate) fn last_json(&self) -> Result<Value> {
        serde_json::from_str(self.last_line())
            .with_context(|| self.describe("printed no JSON on its last line"))
    }

    /// `LABEL WHAT (STATUS)` followed by the tails of stdout and stderr.
    pub(crate) fn describe(&self, what: &str) -> String {
        let mut out = format!("`{}` {what} ({})", self.label, self.status);
        push_tail(&mut out, "stdout", &self.stdout);
        push_tail(&mut out, "stderr", &self.stderr);
        out
    }
}

fn push_tail(out: &mut String, name: &str, text: &str) {
    let lines: Vec<&str> = text.lines().collect();
    if lines.is_empty() {
        return;
    }
    let skip = lines.len().saturating_sub(TAIL_LINES);
    let _ = write!(out, "\n    {name}:");
    if skip > 0 {
        let _ = write!(out, "\n      ... ({skip} lines)");
    }
    for line in &lines[skip..] {
        let _ = write!(out, "\n      {line}");
    }
}

/// Runs `cmd` to completion (stdin closed at once) within [`COMMAND_TIMEOUT`].
pub(crate) fn run(label: &str, cmd: Command) -> Result<Done> {
    let mut proc = Proc::spawn(label, cmd)?;
    proc.close_stdin();
    let status = proc.wait(COMMAND_TIMEOUT)?;
    Ok(proc.done(status))
}

/// A child process in its own process group, with stdout and stderr captured line by line.
/// Dropping it ends the whole group if the child is still running.
#[derive(Debug)]
pub(crate) struct Proc {
    label: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    stdout: Captured,
    stderr: Captured,
    status: Option<ExitStatus>,
}

#[derive(Debug)]
struct Captured {
    text: Arc<Mutex<String>>,
    reader: Option<JoinHandle<()>>,
}

impl Captured {
    fn start(stream: impl Read + Send + 'static, lines: Option<mpsc::Sender<String>>) -> Self {
        let text = Arc::new(Mutex::new(String::new()));
        let sink = Arc::clone(&text);
        let reader = thread::spawn(move || {
            let mut reader = BufReader::new(stream);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf).into_owned();
                        if let Ok(mut text) = sink.lock() {
                            text.push_str(&line);
                        }
                        if let Some(tx) = &lines {
                            let _ = tx.send(line.trim_end().to_owned());
                        }
                    }
                }
            }
        });
        Self {
            text,
            reader: Some(reader),
        }
    }

    fn snapshot(&self) -> String {
        self.text.lock().map(|t| t.clone()).unwrap_or_default()
    }

    /// Waits (briefly) for the stream to reach EOF, then returns all of it.
    fn finish(&mut self) -> String {
        if let Some(reader) = self.reader.take() {
            let deadline = Instant::now() + Duration::from_secs(2);
            while !reader.is_finished() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(10));
            }
            if reader.is_finished() {
                let _ = reader.join();
            }
        }
        self.snapshot()
    }
}

impl Proc {
    /// Starts `cmd` with piped stdio in a new process group.
    pub(crate) fn spawn(label: &str, mut cmd: Command) -> Result<Self> {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("could not start `{label}` ({cmd:?})"))?;
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().context("child stdout is not piped")?;
        let stderr = child.stderr.take().context("child stderr is not piped")?;
        Ok(Self {
            label: label.to_owned(),
            stdin: child.stdin.take(),
            stdout: Captured::start(stdout, Some(tx)),
            stderr: Captured::start(stderr, None),
            child,
            lines,
            status: None,
        })
    }

    /// Waits until the child prints `want` as a whole line on stdout.
    pub(crate) fn wait_line(&mut self, want: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.trim() == want => return Ok(()),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => bail!(
                    "{}",
                    self.describe(&format!("did not print `{want}` within {timeout:?}"))
                ),
                Err(RecvTimeoutError::Disconnected) => {
                    let _ = self.try_status();
                    bail!(
                        "{}",
                        self.describe(&format!("closed its stdout before printing `{want}`"))
                    )
                }
            }
        }
    }

    /// Whether the child printed `line` (as a whole line) so far, without waiting.
    pub(crate) fn printed(&self, line: &str) -> bool {
        self.stdout.snapshot().lines().any(|l| l.trim() == line)
    }

    /// Closes the child's stdin (the release signal of the Python holders).
    pub(crate) fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// The exit status, if the child has exited.
    pub(crate) fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Waits for the child to exit; past `timeout` the group is killed and this fails.
    pub(crate) fn wait(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status() {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                self.kill_group();
                bail!(
                    "{}",
                    self.describe(&format!("was still running after {timeout:?}; killed"))
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the child to exit with status 0.
    pub(crate) fn wait_success(&mut self, timeout: Duration) -> Result<()> {
        let status = self.wait(timeout)?;
        if !status.success() {
            bail!("{}", self.describe("failed"));
        }
        Ok(())
    }

    /// The finished command's outcome.
    fn done(mut self, status: ExitStatus) -> Done {
        Done {
            label: self.label.clone(),
            status,
            stdout: self.stdout.finish(),
            stderr: self.stderr.finish(),
        }
    }

    /// `LABEL WHAT (STATUS)` followed by the tails of its output so far.
    pub(crate) fn describe(&self, what: &str) -> String {
        let status = match self.status {
            Some(s) => s.to_string(),
            None => "still running".to_owned(),
        };
        let mut out = format!("`{}` {what} ({status})", self.label);
        push_tail(&mut out, "stdout", &self.stdout.snapshot());
        push_tail(&mut out, "stderr", &self.stderr.snapshot());
        out
    }

    /// SIGKILL to the child alone (not its group): a crash of the process under test,
    /// while whatever it started keeps running.
    pub(crate) fn crash(&mut self) -> Result<()> {
        if self.try_status().is_some() {
            bail!(
                "{}",
                self.describe("had already exited before it could be crashed")
            );
        }
        self.child
            .kill()
            .with_context(|| format!("could not kill `{}`", self.label))?;
        self.status = Some(self.child.wait()?);
        Ok(())
    }

    /// SIGTERM to the child's process group, then SIGKILL if it has not exited within 2 s.
    fn kill_group(&mut self) {
        if self.try_status().is_some() {
            return;
        }
        let pgid = self.child.id();
        signal_group(pgid, "TERM");
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if self.try_status().is_some() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        signal_group(pgid, "KILL");
        let _ = self.child.kill();
        self.status = self.child.wait().ok();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stdin = None;
        self.kill_group();
    }
}

/// Sends `signal` to the process group `pgid` (which this harness created).
fn signal_group(pgid: u32, signal: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg("--")
        .arg(format!("-{pgid}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// A command line for the Rust side to run while it holds something (a lock, a
/// membership): it writes `$TOOZ_FENCING_TOKEN` to a ready file, then waits for a stop
/// file, so the scenario decides when the hold ends.
#[derive(Debug)]
pub(crate) struct Gate {
    ready: PathBuf,
    stop: PathBuf,
}

/// The longest a gate holds if nobody opens it.
const GATE_MAX_SECS: u32 = 120;

impl Gate {
    pub(crate) fn new(ctx: &Ctx, name: &str) -> Self {
        Self {
            ready: ctx.path(&format!("{name}.ready")),
            stop: ctx.path(&format!("{name}.stop")),
        }
    }

    /// The child command: `sh -c SCRIPT sh READY STOP`.
    pub(crate) fn command(&self) -> Vec<String> {
        let script = format!(
            "printf %s \"${{TOOZ_FENCING_TOKEN:-}}\" > \"$1.tmp\" && mv \"$1.tmp\" \"$1\"; \
             i=0; while [ ! -e \"$2\" ] && [ $i -lt {} ]; do sleep 0.05; i=$((i+1)); done",
            GATE_MAX_SECS * 20
        );
        vec![
            "sh".to_owned(),
            "-c".to_owned(),
            script,
            "sh".to_owned(),
            self.ready.display().to_string(),
            self.stop.display().to_string(),
        ]
    }

    /// Waits until the command runs (the hold is taken); returns the fencing token it saw.
    pub(crate) fn wait_ready(&self, holder: &mut Proc, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(token) = fs::read_to_string(&self.ready) {
                return Ok(token);
            }
            if holder.try_status().is_some() {
                bail!("{}", holder.describe("exited before running its command"));
            }
            if Instant::now() >= deadline {
                bail!(
                    "{}",
                    holder.describe(&format!("did not run its command within {timeout:?}"))
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Lets the command finish.
    pub(crate) fn open(&self) -> Result<()> {
        fs::write(&self.stop, b"")
            .with_context(|| format!("could not write {}", self.stop.display()))
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        let _ = fs::write(&self.stop, b"");
    }
}

/// Evaluates `probe` until it returns `Ok(Ok(value))` or `timeout` passes. `Ok(Err(seen))`
/// means "not yet" and describes what was seen; `Err` is a hard failure and ends the wait.
pub(crate) fn eventually<T>(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> Result<std::result::Result<T, String>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        match probe()? {
            Ok(value) => return Ok(value),
            Err(seen) if Instant::now() >= deadline => {
                bail!("{what}: not true after {timeout:?}; last seen: {seen}")
            }
            Err(_) => thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Outcomes of the scenarios, collected as values and printed as they finish.
#[derive(Debug, Default)]
pub(crate) struct Report {
    passed: usize,
    failed: Vec<String>,
}

impl Report {
    /// Runs one scenario and records its outcome.
    pub(crate) fn scenario(&mut self, driver: &str, name: &str, f: impl FnOnce() -> Result<()>) {
        let started = Instant::now();
        let result = f();
        let secs = started.elapsed().as_secs_f64();
        let full = format!("{driver}/{name}");
        match result {
            Ok(()) => {
                println!("PASS  {full:<44} {secs:>6.1}s");
                self.passed += 1;
            }
            Err(err) => {
                println!("FAIL  {full:<44} {secs:>6.1}s");
                for line in format!("{err:#}").lines() {
                    println!("      {line}");
                }
                self.failed.push(full);
            }
        }
    }

    /// Number of failed scenarios.
    pub(crate) fn failed(&self) -> &[String] {
        &self.failed
    }

    /// The closing line.
    pub(crate) fn closing_line(&self) -> String {
        format!("{} passed, {} failed", self.passed, self.failed.len())
    }
}

/// Creates `dir` afresh.
pub(crate) fn fresh_dir(dir: &Path) -> Result<()> {
    if dir.exists() {
        fs::remove_dir_all(dir).with_context(|| format!("could not remove {}", dir.display()))?;
    }
    fs::create_dir_all(dir).with_context(|| format!("could not create {}", dir.display()))
}
