//! The Python side's virtualenv: `target/interop-venv` with Python tooz pinned exactly,
//! created on first use and reused while its recorded requirements match.

use std::{fs, path::PathBuf, process::Command};

use anyhow::{Context, Result, bail};

use crate::process::{self, progress};

/// What the virtualenv holds. tooz's file driver needs msgpack (its record format) and
/// fasteners (its inter-process locks); both are tooz requirements and are named here so
/// the intent survives a change in tooz's own dependency list.
const REQUIREMENTS: &[&str] = &[
    "tooz==9.1.0",
    "msgpack",
    "fasteners",
    "redis==8.1.0",
    "kazoo==2.11.0",
    "etcd3gw==2.7.0",
    "pymemcache==4.0.0",
    "psycopg2-binary==2.9.13",
    "PyMySQL==1.2.4",
];

/// The exact tooz version the scenarios are written against.
const TOOZ_VERSION: &str = "9.1.0";

/// Returns the virtualenv's interpreter, creating the virtualenv if needed.
///
/// The interpreter that creates it is `python` if given, else `$TOOZ_INTEROP_PYTHON`, else
/// `python3`.
pub(crate) fn ensure(python: Option<&str>) -> Result<PathBuf> {
    let dir = process::target_dir().join("interop-venv");
    let venv_python = dir.join("bin").join("python");
    let stamp = dir.join(".xtask-requirements");
    let wanted = REQUIREMENTS.join(" ");

    if venv_python.is_file()
        && fs::read_to_string(&stamp).is_ok_and(|s| s == wanted)
        && check(&venv_python).is_ok()
    {
        progress!("interop: reusing Python virtualenv {}", dir.display());
        return Ok(venv_python);
    }

    let base = python
        .map(str::to_owned)
        .or_else(|| std::env::var("TOOZ_INTEROP_PYTHON").ok())
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "python3".to_owned());
    progress!(
        "interop: creating Python virtualenv {} with {base} ({wanted})",
        dir.display()
    );
    if dir.exists() {
        fs::remove_dir_all(&dir)
            .with_context(|| format!("could not remove the stale virtualenv {}", dir.display()))?;
    }
    process::run(Command::new(&base).arg("-m").arg("venv").arg(&dir)).with_context(|| {
        format!(
            "`{base} -m venv` failed; on Debian install python3-venv (`apt-get install \
             python3-venv`, as .ci/run does), or pass another interpreter with --python"
        )
    })?;
    process::run(
        Command::new(&venv_python)
            .args(["-m", "pip", "install", "--disable-pip-version-check", "-q"])
            .args(REQUIREMENTS),
    )
    .context("could not install Python tooz into the interop virtualenv")?;
    check(&venv_python)?;
    fs::write(&stamp, &wanted).with_context(|| format!("could not write {}", stamp.display()))?;
    Ok(venv_python)
}

/// Verifies that the virtualenv imports what the scenarios use, at the pinned version.
fn check(python: &PathBuf) -> Result<()> {
    let script = format!(
        "import importlib.metadata as m, tooz.coordination, tooz.drivers.file, \
         tooz.partitioner\nv = m.version('tooz')\nassert v == '{TOOZ_VERSION}', v"
    );
    let out = Command::new(python)
        .args(["-c", &script])
        .output()
        .with_context(|| format!("could not run {}", python.display()))?;
    if !out.status.success() {
        bail!(
            "the interop virtualenv is unusable: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
