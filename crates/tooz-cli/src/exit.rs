//! The exit statuses of `tooz`, in one place. [`HELP`] is printed at the end of
//! `tooz --help` (and of `lock`'s and `leader`'s); the README has the same table.
//!
//! Like timeout(1), `tooz` keeps its own statuses in a high range that commands
//! seldom use: 123 lost, 124 not acquired, 125 `tooz` failed, 126/127 the command
//! could not be run; anything else is the command's own status.

/// A usage error (bad flag or argument), as clap and most tools report it.
pub(crate) const USAGE: i32 = 2;

/// The lock or leadership the command ran under was lost: the command was sent
/// SIGTERM (SIGKILL after the grace), or it had exited and the lock or leadership
/// was found gone when `tooz` released it.
pub(crate) const LOST: i32 = 123;

/// The lock was not acquired within `--wait` (`--wait 0`: it was held); the
/// command did not run. flock(1) uses 1 here, timeout(1) uses 124 for a timeout.
pub(crate) const NOT_ACQUIRED: i32 = 124;

/// `tooz` itself failed: the backend cannot be reached or answered an error, a bad
/// URL or option, an unknown group, a failed release... (timeout(1)'s 125).
pub(crate) const ERROR: i32 = 125;

/// The command was found but could not be run (the shell's status).
pub(crate) const CANNOT_EXECUTE: i32 = 126;

/// The command was not found (the shell's status).
pub(crate) const NOT_FOUND: i32 = 127;

/// Killed by signal N: 128 + N (the command, or `tooz` interrupted while waiting).
pub(crate) const SIGNALLED: i32 = 128;

/// The table shown by `--help`.
pub(crate) const HELP: &str = "\
Exit status:
  N        the command's own status (128+N if signal N killed it)
  123      the lock or leadership was lost while the command ran (the command was
           sent SIGTERM, then SIGKILL after --grace), or was found gone when the
           command exited
  124      lock not acquired within --wait (the command did not run)
  125      tooz failed: backend unreachable or in error, bad URL, unknown group...
           (after the command ran, its own status is kept if it was not 0)
  126/127  the command could not be run / was not found
  128+N    tooz was stopped by signal N before the command ran
  2        usage error
A command may itself exit with 123-125; check stderr (tooz's lines start with
`tooz: `) when that matters.";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_distinct_and_documented() {
        let codes = [USAGE, LOST, NOT_ACQUIRED, ERROR, CANNOT_EXECUTE, NOT_FOUND];
        for (i, a) in codes.iter().enumerate() {
            assert!(codes[i + 1..].iter().all(|b| a != b), "{a} twice");
            assert!(HELP.contains(&format!("  {a} ")) || HELP.contains(&a.to_string()));
        }
        const { assert!(SIGNALLED > NOT_FOUND) };
    }
}
