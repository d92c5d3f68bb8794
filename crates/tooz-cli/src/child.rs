//! Running the user's command: spawning it in a process group of its own,
//! forwarding our signals to that group, and stopping the group when the lock or
//! leadership it runs under is lost.
//!
//! What stops the command, and what cannot:
//!
//! * Every signal (forwarded, SIGTERM on a loss, SIGKILL after the grace) goes to
//!   the command's process group, so `sh -c` and whatever it starts get it too
//!   (unless they moved to another group or session themselves).
//! * On Linux the command gets SIGKILL when `tooz` dies (`PR_SET_PDEATHSIG`, set
//!   between fork and exec). That covers only the command itself: the kernel
//!   clears it for the processes the command starts. Those are killed by `tooz`
//!   on its way out (normal exit, error, panic); when `tooz` itself is killed
//!   with SIGKILL nothing of it runs, and a grandchild keeps running (its parent
//!   died, and nothing signals it).
//! * Processes left in the group when the command exits are stopped (SIGTERM,
//!   then SIGKILL after the grace) before `tooz` releases the lock.

use std::ffi::OsString;
use std::future::Future;
use std::os::unix::process::{CommandExt as _, ExitStatusExt as _};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::Command;
use tokio::signal::unix::{SignalKind, signal};
use tokio::time::Instant;

use crate::exit;
use crate::failure::Failure;

/// The grace after SIGTERM when the loss margin is unknown (no lease: the file
/// backend) and `--grace` was not given.
pub(crate) const DEFAULT_GRACE: Duration = Duration::from_secs(1);

/// How often the process group is checked while waiting for it to empty.
const GROUP_POLL: Duration = Duration::from_millis(10);

/// How long to wait for a group sent SIGKILL to disappear before giving up
/// (a process stuck in the kernel).
const KILL_WAIT: Duration = Duration::from_secs(2);

/// A timer that never fires in practice.
const FAR: Duration = Duration::from_secs(365 * 86400);

/// The process group of the running command (0: none). Read by the panic hook
/// and on the way out of `main`, which kill what is left of it.
static GROUP: AtomicI32 = AtomicI32::new(0);

/// Sends SIGKILL to the command's process group if one may still be running: for
/// exit paths that did not wait for it (an error, a panic). Idempotent.
pub(crate) fn kill_leftovers() {
    let pgid = GROUP.swap(0, Ordering::SeqCst);
    if pgid > 0 {
        let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
    }
}

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
            sig = self.recv() => Err(Failure::silent(exit::SIGNALLED + sig as i32)),
        }
    }
}

/// How the user's command ended.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// It exited on its own (or after a forwarded signal) with this status.
    Exited(i32),
    /// It was stopped because `reason` (a lock or leadership was lost).
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
        (None, Some(sig)) => exit::SIGNALLED + sig,
        (None, None) => exit::ERROR,
    }
}

/// Runs `argv` with `env` added to its environment, in a process group of its
/// own, forwarding our signals to the group. When `abort` resolves (with the
/// reason), the group gets SIGTERM, and SIGKILL `grace()` later if anything of it
/// still runs (`grace` is read at that moment: the loss margin may have changed).
///
/// Returns once the whole group is gone (or SIGKILL could not end it within
/// [`KILL_WAIT`]): nothing the command started outlives this call.
pub(crate) async fn run(
    argv: &[OsString],
    env: &[(&str, String)],
    signals: &mut Signals,
    abort: impl Future<Output = String>,
    grace: &dyn Fn() -> Duration,
) -> Result<Outcome, Failure> {
    let Some((program, args)) = argv.split_first() else {
        return Err(Failure::new("no command given after --"));
    };
    let mut command = std::process::Command::new(program);
    command
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .process_group(0);
    die_with_parent(&mut command);
    let mut child = Command::from(command).spawn().map_err(|e| {
        let code = if e.kind() == std::io::ErrorKind::NotFound {
            exit::NOT_FOUND
        } else {
            exit::CANNOT_EXECUTE
        };
        Failure::with_code(
            code,
            format!("cannot run {}: {e}", program.to_string_lossy()),
        )
    })?;
    // `process_group(0)`: the group's id is the child's pid. `spawn` returns once
    // the child has exec'd, so the group exists by now.
    let Some(pgid) = child.id().and_then(|id| i32::try_from(id).ok()) else {
        return Err(Failure::new("the command's process id is unknown"));
    };
    GROUP.store(pgid, Ordering::SeqCst);
    // On any early return (an error below), kill the group.
    let group = Group(pgid);

    tokio::pin!(abort);
    let mut aborted: Option<String> = None;
    let mut kill_at: Option<Instant> = None;
    let mut killed = false;
    let mut signalled = false;
    let timer = tokio::time::sleep(FAR);
    tokio::pin!(timer);
    let status = loop {
        tokio::select! {
            status = child.wait() => {
                break status.map_err(|e| Failure::new(format!("waiting for the command failed: {e}")))?;
            }
            sig = signals.recv() => {
                signalled = true;
                group.send(sig);
            }
            reason = &mut abort, if aborted.is_none() => {
                aborted = Some(reason);
                group.send(Signal::SIGTERM);
                let at = Instant::now() + grace();
                kill_at = Some(at);
                timer.as_mut().reset(at);
            }
            () = &mut timer, if kill_at.is_some() && !killed => {
                group.send(Signal::SIGKILL);
                killed = true;
            }
        }
    };
    // The command exited; what it started may not have. Leftovers of a command
    // that was neither stopped nor signalled get SIGTERM now.
    if !killed {
        let at = match kill_at {
            Some(at) => at,
            None => {
                if !signalled && group.alive() {
                    group.send(Signal::SIGTERM);
                }
                Instant::now() + grace()
            }
        };
        group.wait_until_gone(at).await;
    }
    group.kill_and_wait().await;
    Ok(match aborted {
        Some(reason) => Outcome::Aborted { reason },
        None => Outcome::Exited(status_code(status)),
    })
}

/// The command's process group, killed (SIGKILL) when dropped.
struct Group(i32);

impl Group {
    fn pgid(&self) -> Pid {
        Pid::from_raw(self.0)
    }

    fn send(&self, sig: Signal) {
        // ESRCH: everything in it exited already.
        let _ = killpg(self.pgid(), sig);
    }

    /// Whether a process of the group is still running (zombies do not count:
    /// an orphaned grandchild that died may stay a zombie for long when the
    /// system's init does not reap).
    fn alive(&self) -> bool {
        match killpg(self.pgid(), None) {
            Err(Errno::ESRCH) => false,
            // EPERM: a member we may not signal (setuid); it runs.
            Err(_) => true,
            Ok(()) => running_members(self.0),
        }
    }

    /// Waits until the group is gone or `deadline` passes.
    async fn wait_until_gone(&self, deadline: Instant) {
        while self.alive() && Instant::now() < deadline {
            tokio::time::sleep(GROUP_POLL.min(deadline.saturating_duration_since(Instant::now())))
                .await;
        }
    }

    /// SIGKILL to whatever is left, and waits (at most [`KILL_WAIT`]) for it to go.
    async fn kill_and_wait(&self) {
        if self.alive() {
            self.send(Signal::SIGKILL);
            self.wait_until_gone(Instant::now() + KILL_WAIT).await;
        }
        if !self.alive() {
            // Gone: nothing for the exit paths to kill.
            let _ = GROUP.compare_exchange(self.0, 0, Ordering::SeqCst, Ordering::SeqCst);
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        if GROUP.load(Ordering::SeqCst) == self.0 {
            kill_leftovers();
        }
    }
}

/// Whether a process of group `pgid` is running, from /proc (a zombie is not).
#[cfg(target_os = "linux")]
fn running_members(pgid: i32) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return true;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // `pid (comm) state ppid pgrp ...`; comm may hold spaces and parentheses.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let state = fields.next().unwrap_or("Z");
        let pgrp = fields.nth(1).and_then(|p| p.parse::<i32>().ok());
        if pgrp == Some(pgid) && !matches!(state, "Z" | "X" | "x") {
            return true;
        }
    }
    false
}

#[cfg(not(target_os = "linux"))]
fn running_members(_pgid: i32) -> bool {
    true
}

/// Linux: the command gets SIGKILL if `tooz` dies (even by SIGKILL). The death
/// signal fires when the *thread* that forked exits; `tooz` spawns from its main
/// thread (the runtime is single-threaded), which lives as long as the process.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
fn die_with_parent(command: &mut std::process::Command) {
    let parent = nix::unistd::getpid();
    // SAFETY: the closure runs in the child between fork and exec, where only
    // async-signal-safe calls are allowed: it calls prctl(2) and getppid(2) and
    // allocates nothing (an `io::Error` from an errno does not allocate).
    unsafe {
        command.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)?;
            // `tooz` died before the death signal was armed.
            if nix::unistd::getppid() != parent {
                return Err(std::io::Error::from(Errno::ESRCH));
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_parent(_command: &mut std::process::Command) {}
