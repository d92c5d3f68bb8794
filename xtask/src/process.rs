//! Running child processes: the workspace's `cargo`, progress lines, and commands whose
//! output streams straight to the terminal.

use std::{
    env,
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result, bail};

/// Prints a progress line, `xtask: ...`, on stderr.
macro_rules! progress {
    ($($arg:tt)*) => {
        eprintln!("xtask: {}", format_args!($($arg)*))
    };
}
pub(crate) use progress;

/// The workspace root: the parent of xtask's own manifest directory.
pub(crate) fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf()
}

/// Cargo's target directory: `$CARGO_TARGET_DIR` if set, else `<root>/target`.
pub(crate) fn target_dir() -> PathBuf {
    let root = workspace_root();
    match env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => root.join(dir),
        _ => root.join("target"),
    }
}

/// A `cargo` command (the one that runs xtask, via `$CARGO`) started at the workspace root.
pub(crate) fn cargo() -> Command {
    let cargo = env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root());
    cmd
}

/// The command line of `cmd`, for messages.
pub(crate) fn display(cmd: &Command) -> String {
    let mut out = cmd.get_program().to_string_lossy().into_owned();
    if let Some(name) = Path::new(&out).file_name() {
        out = name.to_string_lossy().into_owned();
    }
    for arg in cmd.get_args() {
        out.push(' ');
        out.push_str(&arg.to_string_lossy());
    }
    out
}

/// Runs `cmd` with inherited stdio, failing unless it exits successfully.
pub(crate) fn run(cmd: &mut Command) -> Result<()> {
    let line = display(cmd);
    let started = Instant::now();
    progress!("running `{line}`");
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{line}`"))?;
    if !status.success() {
        bail!(
            "`{line}` failed ({status}) after {:.1}s",
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
