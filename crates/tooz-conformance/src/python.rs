//! Helpers for a driver crate's `tests/python_interop.rs`: a Python tooz process run
//! beside a Rust coordinator on one server.
//!
//! The Python side is a script the test passes to `python -c`. It prints one line per
//! observation, a line `owners <list>` with its partitioner's answers in the format of
//! [`partition_owners`] for the objects of [`partition_objects`], then `ready`; it then
//! waits for a line on stdin ([`PythonPeer::go`]) before its second half.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout};
use tooz_core::Partitioner;

/// How long the Python side may stay silent before the test fails.
const SILENCE: Duration = Duration::from_secs(30);

/// A running Python script, read line by line. Killed when dropped.
#[derive(Debug)]
pub struct PythonPeer {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
}

/// What the Python side printed before `ready`.
#[derive(Debug, Default)]
pub struct Observations {
    /// Every line except the `owners` one, in order.
    pub lines: Vec<String>,
    /// The payload of the `owners` line (empty when there was none).
    pub owners: String,
}

impl PythonPeer {
    /// Starts `python -c script args…` with piped stdin and stdout (stderr inherited).
    ///
    /// # Panics
    /// When the interpreter cannot be started (a test helper).
    pub fn spawn(python: &str, script: &str, args: &[&str]) -> Self {
        let mut child = tokio::process::Command::new(python)
            .arg("-c")
            .arg(script)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {python}: {e}"));
        let stdout = child.stdout.take().expect("stdout is piped");
        Self {
            child,
            lines: BufReader::new(stdout).lines(),
        }
    }

    /// The next line.
    ///
    /// # Panics
    /// When Python stays silent for 30 s or exits.
    pub async fn line(&mut self) -> String {
        tokio::time::timeout(SILENCE, self.lines.next_line())
            .await
            .expect("python stayed silent")
            .expect("cannot read python's output")
            .expect("python exited early")
    }

    /// The lines up to `ready`, with the `owners` line set apart.
    ///
    /// # Panics
    /// As [`PythonPeer::line`].
    pub async fn until_ready(&mut self) -> Observations {
        let mut seen = Observations::default();
        loop {
            let line = self.line().await;
            if line == "ready" {
                return seen;
            }
            match line.strip_prefix("owners ") {
                Some(owners) => seen.owners = owners.to_string(),
                None => seen.lines.push(line),
            }
        }
    }

    /// Lets the script go on past its `ready` (writes a line to its stdin).
    ///
    /// # Panics
    /// When the pipe is closed.
    pub async fn go(&mut self) {
        let stdin = self.child.stdin.as_mut().expect("stdin is piped");
        stdin.write_all(b"go\n").await.expect("write to python");
        stdin.flush().await.expect("flush python's stdin");
    }

    /// Waits for the script to end and asserts it succeeded.
    ///
    /// # Panics
    /// When it failed.
    pub async fn wait_success(mut self) {
        let status = self.child.wait().await.expect("wait for python");
        assert!(status.success(), "python failed: {status}");
    }
}

/// The objects both sides place: `obj-0` … `obj-39` and one non-ASCII name (the
/// scripts build the same list).
pub fn partition_objects() -> Vec<String> {
    let mut objs: Vec<String> = (0..40).map(|i| format!("obj-{i}")).collect();
    objs.push("\u{447}\u{443}\u{43f}\u{430}\u{43a}\u{430}\u{431}\u{440}\u{430}".to_string());
    objs
}

/// The owners of every [`partition_objects`] object with 1 then 2 replicas, as
/// `obj=m1,m2;…` with each object's members sorted and `strip` removed from the front
/// of member ids: the format the Python scripts print after `owners `.
pub fn partition_owners(part: &Partitioner, strip: &str) -> String {
    let mut out = Vec::new();
    for replicas in [1usize, 2] {
        for obj in partition_objects() {
            let mut owners: Vec<String> = part
                .members_for_object(obj.as_str(), &[], replicas)
                .iter()
                .map(|m| {
                    let m = m.to_string();
                    m.strip_prefix(strip).map_or(m.clone(), str::to_string)
                })
                .collect();
            owners.sort();
            out.push(format!("{obj}={}", owners.join(",")));
        }
    }
    out.join(";")
}
