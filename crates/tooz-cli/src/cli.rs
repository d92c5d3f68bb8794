//! The command line.
//!
//! The doc comments below are the help texts `tooz --help` prints, where
//! `<placeholders>` are plain text, not HTML.
#![allow(rustdoc::invalid_html_tags)]

use std::ffi::OsString;

use clap::{Parser, Subcommand};

use crate::exit;

/// Distributed coordination from the shell: locks, leader election, groups,
/// watches and partitioning over any tooz backend.
///
/// The backend is picked by URL, as Python tooz's `get_coordinator` does
/// (`file:///var/lib/app/tooz`, ...). Without --url or $TOOZ_URL, `tooz` uses the
/// directory `.tooz` of the working directory (created if needed).
#[derive(Debug, Parser)]
#[command(name = "tooz", version, max_term_width = 100, after_help = exit::HELP)]
pub(crate) struct Cli {
    /// Backend URL [default: file://<working directory>/.tooz]
    #[arg(long, env = "TOOZ_URL", global = true, value_name = "URL")]
    pub(crate) url: Option<String>,

    /// This process's member id [default: <hostname>-<pid>]
    #[arg(long, env = "TOOZ_MEMBER_ID", global = true, value_name = "ID")]
    pub(crate) member_id: Option<OsString>,

    /// Print machine-readable JSON
    #[arg(long, global = true)]
    pub(crate) json: bool,

    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Create, delete, list, inspect and join groups
    #[command(subcommand)]
    Group(GroupCommand),

    /// Hold a lock while a command runs (like flock(1))
    ///
    /// The command gets the lock's fencing token in $TOOZ_FENCING_TOKEN (and the
    /// backend URL in $TOOZ_URL). It runs in a process group of its own, which
    /// gets the signals `tooz` forwards (INT, TERM, HUP).
    ///
    /// If the lock is lost while the command runs (the lease cannot be renewed:
    /// `tooz` declares the loss a margin before the server can free the lock),
    /// the whole group gets SIGTERM at once and SIGKILL after --grace, and `tooz`
    /// exits with status 123. A lock not acquired within --wait: the command
    /// does not run, status 124. Otherwise `tooz` exits with the command's status
    /// (128 + N if signal N killed it).
    ///
    /// The command gets SIGKILL if `tooz` dies (Linux parent-death signal). That
    /// does not reach the processes it started: `tooz` kills its group on every
    /// way out it controls (exit, error, panic) and stops leftovers of the group
    /// before releasing the lock, but if `tooz` itself is killed with SIGKILL,
    /// processes started by the command keep running.
    #[command(after_help = exit::HELP)]
    Lock {
        /// The lock name
        name: OsString,
        /// Wait at most this many seconds for the lock (0: try once) [default: forever]
        #[arg(long, value_name = "SECONDS", value_parser = parse_wait)]
        wait: Option<f64>,
        /// After a loss, SIGKILL the command this long after SIGTERM [default:
        /// half the loss margin (a quarter of the lease TTL, at most 2 s); 1 s
        /// without a lease]. Longer than the margin: the command may outlive the lock
        #[arg(long, value_name = "SECONDS", value_parser = parse_grace)]
        grace: Option<f64>,
        /// The command to run while holding the lock
        #[arg(last = true, required = true, value_name = "CMD")]
        command: Vec<OsString>,
    },

    /// Run a command while this process leads a group
    ///
    /// Campaigns until elected, then runs the command with the leadership's
    /// fencing token in $TOOZ_FENCING_TOKEN (and the backend URL in $TOOZ_URL),
    /// in a process group of its own. The group is created if needed.
    ///
    /// The leadership is lost when the lease is lost, or when the check made every
    /// second finds another leader or another token: the command's group then gets
    /// SIGTERM at once and SIGKILL after --grace, and `tooz` exits with status
    /// 123. Processes, signals and `tooz`'s death are handled as for `lock`.
    #[command(after_help = exit::HELP)]
    Leader {
        /// The group
        group: OsString,
        /// After a loss, SIGKILL the command this long after SIGTERM [default:
        /// half the loss margin; 1 s without a lease]
        #[arg(long, value_name = "SECONDS", value_parser = parse_grace)]
        grace: Option<f64>,
        /// The command to run while leading
        #[arg(last = true, required = true, value_name = "CMD")]
        command: Vec<OsString>,
    },

    /// Print a group's membership and leader events as they happen
    ///
    /// Lines are `joined M`, `left M`, `leader M`, `leader-lost M` and `lagged N`
    /// (N events were missed); with --json one object per line, e.g.
    /// {"event":"joined","group":"G","member":"M"}. Stops on Ctrl-C.
    Watch {
        /// The group (it must exist)
        group: OsString,
    },

    /// Print the members owning each object, as the group's partitioner sees it
    ///
    /// One line per object: OBJECT<TAB>member[,member...], primary owner first,
    /// computed from the group's live members and their `weight` capabilities.
    /// `tooz` observes the group; it does not join it.
    Partition {
        /// The group
        group: OsString,
        /// The objects to place
        #[arg(required = true, value_name = "OBJECT")]
        objects: Vec<OsString>,
        /// Owners per object
        #[arg(long, default_value_t = 1, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
        replicas: u16,
    },

    /// Print a shell completion script
    ///
    /// For example `tooz completions bash > /etc/bash_completion.d/tooz`, or
    /// `tooz completions zsh > "${fpath[1]}/_tooz"`. Contacts no backend.
    Completions {
        /// The shell
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum GroupCommand {
    /// Create a group
    Create {
        /// The group
        group: OsString,
    },
    /// Delete an empty group
    Delete {
        /// The group
        group: OsString,
    },
    /// List the groups, one per line
    List,
    /// List a group's members, one per line (--json: with capabilities)
    Members {
        /// The group
        group: OsString,
    },
    /// Join a group (creating it if needed) while a command runs, or until Ctrl-C
    ///
    /// The command gets the backend URL in $TOOZ_URL. `tooz` leaves the group
    /// when the command exits, and exits with its status.
    Join {
        /// The group
        group: OsString,
        /// This member's capabilities, as JSON (e.g. '{"weight": 2}')
        #[arg(long, value_name = "JSON")]
        capabilities: Option<String>,
        /// The command to run while a member
        #[arg(last = true, value_name = "CMD")]
        command: Vec<OsString>,
    },
}

fn parse_wait(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(secs) if (0.0..=1e9).contains(&secs) => Ok(secs),
        _ => Err(format!(
            "expected a number of seconds (0 or more), got {text:?}"
        )),
    }
}

fn parse_grace(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(secs) if (0.0..=86400.0).contains(&secs) => Ok(secs),
        _ => Err(format!(
            "expected a number of seconds (0 to 86400), got {text:?}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn wait_values() {
        assert_eq!(parse_wait("0"), Ok(0.0));
        assert_eq!(parse_wait("1.5"), Ok(1.5));
        assert!(parse_wait("-1").is_err());
        assert!(parse_wait("nan").is_err());
        assert!(parse_wait("soon").is_err());
        assert_eq!(parse_grace("0.25"), Ok(0.25));
        assert!(parse_grace("-1").is_err());
        assert!(parse_grace("inf").is_err());
    }

    #[test]
    fn command_after_double_dash() {
        let cli =
            Cli::try_parse_from(["tooz", "lock", "x", "--wait", "0", "--", "ls", "-l"]).unwrap();
        match cli.command {
            Command::Lock {
                name,
                wait,
                grace,
                command,
            } => {
                assert_eq!(name, "x");
                assert_eq!(wait, Some(0.0));
                assert_eq!(grace, None);
                assert_eq!(command, ["ls", "-l"]);
            }
            other => panic!("{other:?}"),
        }
        assert!(Cli::try_parse_from(["tooz", "lock", "x"]).is_err());
    }
}
