//! Running the user's command: spawning it, forwarding our signals to it, and
//! stopping it when the lock or leadership it runs under is lost.

use std::ffi::OsString;
use std::future::Future;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::Command;
use tokio::signal::unix::{SignalKind, signal};

use crate::failure::Failure;

/// How long a command stopped because its lock or leadership was lost gets to
/// exit after SIGTERM before it is killed.
const TERM_GRACE: Duration = Duration::from_secs(10);

/// A timer that never fires in practice.
const FAR: Duration = Duration::from_secs(365 * 86400);

/// The signals that end the `tooz` command: forwarded to a running command, or
/// ending a wait (for a lock, a leadership, Ctrl-C) cleanly.
#[derive(Debug)]
pub(crate) struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
}

impl Signals {
    /// Installs the handlers (from now on these signals no longer kill `tooz`).
    pub(crate) fn install() -> Result<Self, Failure> {
        let make = |kind: SignalKind| {
            signal(kind).map_err(|e| Failure::new(format!("cannot install a signal handler: {e}")))
        };
        Ok(Signals {
            interrupt: make(SignalKind::interrupt())?,
            terminate: make(SignalKind::terminate())?,
            hangup: make(SignalKind::hangup())?,
        })
    }

    /// Waits for the next signal.
    pub(crate) async fn recv(&mut self) -> Signal {
        tokio::select! {
            Some(()) = self.interrupt.recv() => Signal::SIGINT,
            Some(()) = self.terminate.recv() => Signal::SIGTERM,
            Some(()) = self.hangup.recv() => Signal::SIGHUP,
            else => std::future::pending().await,
        }
    }

    /// Runs `fut` unless a signal arrives first, which becomes a silent failure
    /// with the shell's status for that signal (128 + its number).
    pub(crate) async fn interruptible<T>(
        &mut self,
        fut: impl Future<Output = T>,
    ) -> Result<T, Failure> {
        tokio::select! {
            v = fut => Ok(v),
            sig = self.recv() => Err(Failure::silent(128 + sig as i32)),
        }
    }
}

/// How the user's command ended.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// It exited on its own (or after a forwarded signal) with this status.
    Exited(i32),
    /// It was terminated because `reason` (a lock or leadership was lost).
    Aborted {
        /// What was lost.
        reason: String,
    },
}

/// The shell's view of an exit status: the exit code, or 128 + the signal that
/// killed the process.
pub(crate) fn status_code(status: ExitStatus) -> i32 {
    match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(sig)) => 128 + sig,
        (None, None) => 1,
    }
}

/// Runs `argv` with `env` added to its environment, forwarding our signals to it.
/// When `abort` resolves (with the reason), the command gets SIGTERM, and SIGKILL
/// if it is still running [`TERM_GRACE`] later.
pub(crate) async fn run(
    argv: &[OsString],
    env: &[(&str, String)],
    signals: &mut Signals,
    abort: impl Future<Output = String>,
) -> Result<Outcome, Failure> {
    let Some((program, args)) = argv.split_first() else {
        return Err(Failure::new("no command given after --"));
    };
    let mut child = Command::new(program)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .spawn()
        .map_err(|e| {
            // The shell's statuses: 127 not found, 126 found but not runnable.
            let code = if e.kind() == std::io::ErrorKind::NotFound {
                127
            } else {
                126
            };
            Failure::with_code(
                code,
                format!("cannot run {}: {e}", program.to_string_lossy()),
            )
        })?;
    let pid = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .map(Pid::from_raw);
    let send = |sig: Signal| {
        if let Some(pid) = pid {
            // ESRCH: it exited already; we reap it below.
            let _ = kill(pid, sig);
        }
    };

    tokio::pin!(abort);
    let mut aborted: Option<String> = None;
    let grace = tokio::time::sleep(FAR);
    tokio::pin!(grace);
    let status = loop {
        tokio::select! {
            status = child.wait() => {
                break status.map_err(|e| Failure::new(format!("waiting for the command failed: {e}")))?;
            }
            sig = signals.recv() => send(sig),
            reason = &mut abort, if aborted.is_none() => {
                aborted = Some(reason);
                send(Signal::SIGTERM);
                grace.as_mut().reset(tokio::time::Instant::now() + TERM_GRACE);
            }
            () = &mut grace, if aborted.is_some() => {
                send(Signal::SIGKILL);
                grace.as_mut().reset(tokio::time::Instant::now() + FAR);
            }
        }
    };
    Ok(match aborted {
        Some(reason) => Outcome::Aborted { reason },
        None => Outcome::Exited(status_code(status)),
    })
}
