//! The Python side's virtualenvs: `target/interop-venv` with Python tooz pinned exactly,
//! and `target/interop-venv-consul` with tooz 8.1.0 (the last release with a Consul
//! driver), each created on first use and reused while its recorded requirements match.

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
    // tooz's ipc driver; 1.2.0 fixes the key bounds tooz-ipc derives its keys with.
    "sysv_ipc==1.2.0",
    "psycopg2-binary==2.9.13",
    "PyMySQL==1.2.4",
];

/// The exact tooz version the scenarios are written against.
const TOOZ_VERSION: &str = "9.1.0";

/// The Consul scenarios' virtualenv: tooz 8.1.0 is the last release with a Consul
/// driver, on python-consul2 0.1.5 (its client; both install and import on Python 3.11).
const CONSUL_REQUIREMENTS: &[&str] = &["tooz==8.1.0", "python-consul2==0.1.5", "msgpack"];

/// One virtualenv: its directory under the target dir, what it holds, and what
/// proves it usable.
struct Venv {
    dir: &'static str,
    requirements: &'static [&'static str],
    modules: &'static str,
    tooz_version: &'static str,
}

const MAIN: Venv = Venv {
    dir: "interop-venv",
    requirements: REQUIREMENTS,
    modules: "tooz.coordination, tooz.drivers.file, tooz.partitioner",
    tooz_version: TOOZ_VERSION,
};

const CONSUL: Venv = Venv {
    dir: "interop-venv-consul",
    requirements: CONSUL_REQUIREMENTS,
    modules: "tooz.coordination, tooz.drivers.consul, consul",
    tooz_version: "8.1.0",
};

/// The interpreter of the virtualenv `driver`'s scenarios use (the Consul one for
/// `consul`, the main one otherwise), creating it if needed.
pub(crate) fn ensure_for(driver: &str, python: Option<&str>) -> Result<PathBuf> {
    match driver {
        "consul" => ensure_venv(&CONSUL, python),
        _ => ensure(python),
    }
}

/// Returns the virtualenv's interpreter, creating the virtualenv if needed.
///
/// The interpreter that creates it is `python` if given, else `$TOOZ_INTEROP_PYTHON`, else
/// `python3`.
pub(crate) fn ensure(python: Option<&str>) -> Result<PathBuf> {
    ensure_venv(&MAIN, python)
}

fn ensure_venv(venv: &Venv, python: Option<&str>) -> Result<PathBuf> {
    let dir = process::target_dir().join(venv.dir);
    let venv_python = dir.join("bin").join("python");
    let stamp = dir.join(".xtask-requirements");
    let wanted = venv.requirements.join(" ");

    if venv_python.is_file()
        && fs::read_to_string(&stamp).is_ok_and(|s| s == wanted)
        && check(venv, &venv_python).is_ok()
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
            .args(venv.requirements),
    )
    .context("could not install Python tooz into the interop virtualenv")?;
    check(venv, &venv_python)?;
    fs::write(&stamp, &wanted).with_context(|| format!("could not write {}", stamp.display()))?;
    Ok(venv_python)
}

/// Verifies that the virtualenv imports what the scenarios use, at the pinned version.
fn check(venv: &Venv, python: &PathBuf) -> Result<()> {
    let script = format!(
        "import importlib.metadata as m, {}\nv = m.version('tooz')\nassert v == '{}', v",
        venv.modules, venv.tooz_version
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
