//! `tooz`: distributed coordination from the shell.
//!
//! ```text
//! tooz [--url URL] [--member-id ID] [--json] COMMAND
//!   group create G | group delete G | group list | group members G
//!   group join G [--capabilities JSON] [-- CMD ARGS...]
//!   lock NAME [--wait SECONDS] -- CMD ARGS...
//!   leader G -- CMD ARGS...
//!   watch G
//!   partition G OBJECT... [--replicas N]
//!   completions bash|zsh|fish|elvish|powershell
//! ```
//!
//! Errors are one line on stderr, prefixed `tooz: `; the exit statuses are in
//! [`exit`] (the command's own, or 123 lost, 124 not acquired, 125 a failure of
//! `tooz` itself, 2 a usage error).

use std::io::Write as _;
use std::path::Path;
use std::process::ExitCode;

use clap::Parser;
use clap::error::ErrorKind;

mod child;
mod cli;
mod commands;
mod exit;
mod failure;

use child::Signals;
use cli::Cli;
use failure::Failure;

fn main() -> ExitCode {
    // A panic must not leave the command's process group running.
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        child::kill_leftovers();
        report(info);
    }));
    let code = tooz_main();
    // Every way out: nothing of the command may outlive `tooz` (normally it is
    // gone already and this does nothing).
    child::kill_leftovers();
    code
}

fn tooz_main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(&e),
    };
    if let cli::Command::Completions { shell } = cli.command {
        let mut cmd = <Cli as clap::CommandFactory>::command();
        clap_complete::generate(shell, &mut cmd, "tooz", &mut std::io::stdout());
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(&Failure::new(format!("cannot start the runtime: {e}"))),
    };
    let result = runtime.block_on(run(cli));
    // Do not wait for background tasks (a heartbeat stuck on a dead backend).
    runtime.shutdown_background();
    match result {
        Ok(code) => exit_code(code),
        Err(f) => fail(&f),
    }
}

async fn run(cli: Cli) -> Result<i32, Failure> {
    let mut signals = Signals::install()?;
    let url = match cli.url.filter(|u| !u.is_empty()) {
        Some(url) => url,
        None => default_url()?,
    };
    let member_id = match cli.member_id.filter(|m| !m.is_empty()) {
        Some(m) => tooz::MemberId::from(std::os::unix::ffi::OsStrExt::as_bytes(m.as_os_str())),
        None => tooz::MemberId::from(tooz::default_member_id()),
    };
    let coord = tooz::connect(&url, member_id)?;
    signals.interruptible(coord.start(true)).await??;
    let result = commands::dispatch(&coord, &url, cli.command, cli.json, &mut signals).await;
    // Always leave groups, release locks and resign before exiting; a second
    // signal while stopping exits at once.
    let stopped = signals.interruptible(coord.stop()).await;
    match (result, stopped) {
        (Err(f), _) => Err(f),
        (Ok(_), Err(interrupted)) => Err(interrupted),
        (Ok(code), Ok(Err(e))) => Err(Failure::from(e).keeping_status(code)),
        (Ok(code), Ok(Ok(()))) => Ok(code),
    }
}

/// `file://<absolute working directory>/.tooz`, creating the directory.
fn default_url() -> Result<String, Failure> {
    let cwd = std::env::current_dir()
        .map_err(|e| Failure::new(format!("cannot read the working directory: {e}")))?;
    let dir = cwd.join(".tooz");
    std::fs::create_dir_all(&dir)
        .map_err(|e| Failure::new(format!("cannot create {}: {e}", dir.display())))?;
    file_url(&dir)
}

fn file_url(dir: &Path) -> Result<String, Failure> {
    tooz::Url::from_file_path(dir)
        .map(|u| u.to_string())
        .map_err(|()| {
            Failure::new(format!(
                "cannot make a file:// URL of {}; pass --url",
                dir.display()
            ))
        })
}

/// Help and version go to stdout as clap prints them; any other usage error is
/// one line on stderr and status 2.
fn usage_error(e: &clap::Error) -> ExitCode {
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        let _ = e.print();
        return ExitCode::SUCCESS;
    }
    let rendered = e.render().to_string();
    let mut parts = Vec::new();
    for line in rendered.lines() {
        let line = line.trim();
        if line.starts_with("Usage:") || line.starts_with("For more information") {
            break;
        }
        if !line.is_empty() {
            parts.push(line.strip_prefix("error: ").unwrap_or(line));
        }
    }
    let message = format!("{} (see 'tooz --help')", parts.join(" "));
    fail(&Failure::with_code(exit::USAGE, message))
}

fn fail(f: &Failure) -> ExitCode {
    if let Some(line) = f.line() {
        let _ = writeln!(std::io::stderr(), "{line}");
    }
    exit_code(f.code)
}

fn exit_code(code: i32) -> ExitCode {
    let fallback = u8::try_from(exit::ERROR).unwrap_or(1);
    ExitCode::from(u8::try_from(code).unwrap_or(fallback))
}
