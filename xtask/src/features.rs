//! The `features` and `msrv` steps of `cargo xtask ci`.
//!
//! `features`: every publishable crate of the workspace
//! checked with no default features, then with each of its features alone (the
//! equivalent of `cargo hack check --each-feature --no-dev-deps`), so that a code path
//! only some feature set compiles (the Redis driver without `tls`, the facade with one
//! driver) cannot rot unseen.

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::process::{self, progress};

/// One crate and the feature sets to check it with.
struct Plan {
    name: String,
    features: Vec<String>,
}

fn plans() -> Result<Vec<Plan>> {
    let out = process::cargo()
        .args(["metadata", "--no-deps", "--format-version", "1"])
        .output()
        .context("cargo metadata failed to start")?;
    if !out.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let meta: Value = serde_json::from_slice(&out.stdout).context("cargo metadata: not JSON")?;
    let mut plans = Vec::new();
    for pkg in meta["packages"].as_array().into_iter().flatten() {
        // `publish = false` is an empty registry list.
        if pkg["publish"].as_array().is_some_and(Vec::is_empty) {
            continue;
        }
        let name = pkg["name"].as_str().unwrap_or_default().to_owned();
        let mut features: Vec<String> = pkg["features"]
            .as_object()
            .map(|f| f.keys().filter(|k| *k != "default").cloned().collect())
            .unwrap_or_default();
        features.sort();
        plans.push(Plan { name, features });
    }
    Ok(plans)
}

pub(crate) fn check_each() -> Result<()> {
    let plans = plans()?;
    let total: usize = plans.iter().map(|p| 1 + p.features.len()).sum();
    let mut n = 0;
    for plan in &plans {
        let sets = std::iter::once(None).chain(plan.features.iter().map(Some));
        for set in sets {
            n += 1;
            let label = set.map_or("no default features".to_owned(), |f| {
                format!("feature `{f}` alone")
            });
            progress!("features {n}/{total}: {} with {label}", plan.name);
            let mut cmd = process::cargo();
            cmd.args([
                "check",
                "--quiet",
                "-p",
                &plan.name,
                "--no-default-features",
            ]);
            if let Some(f) = set {
                cmd.args(["--features", f]);
            }
            process::run(&mut cmd).with_context(|| format!("{} with {label}", plan.name))?;
        }
    }
    Ok(())
}

/// The workspace's `rust-version` (`[workspace.package]` of the root manifest).
fn rust_version() -> Result<String> {
    let manifest = process::workspace_root().join("Cargo.toml");
    let text = std::fs::read_to_string(&manifest)
        .with_context(|| format!("cannot read {}", manifest.display()))?;
    text.lines()
        .find_map(|l| {
            let v = l
                .trim()
                .strip_prefix("rust-version")?
                .trim()
                .strip_prefix('=')?;
            Some(v.trim().trim_matches('"').to_owned())
        })
        .context("no rust-version in the workspace manifest")
}

/// The `msrv` step: `cargo +<rust-version> check --workspace --all-targets`, after
/// `rustup toolchain install <rust-version> --profile minimal` if that toolchain is
/// missing.
pub(crate) fn check_msrv() -> Result<()> {
    let version = rust_version()?;
    let installed = std::process::Command::new("rustup")
        .args(["run", &version, "rustc", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !installed {
        progress!("msrv: installing Rust {version} with rustup");
        process::run(std::process::Command::new("rustup").args([
            "toolchain",
            "install",
            &version,
            "--profile",
            "minimal",
        ]))?;
    }
    progress!("msrv: cargo +{version} check --workspace --all-targets");
    let mut cmd = std::process::Command::new("rustup");
    cmd.args([
        "run",
        &version,
        "cargo",
        "check",
        "--workspace",
        "--all-targets",
    ])
    .current_dir(process::workspace_root())
    // The toolchain running xtask must not leak into the older one.
    .env_remove("CARGO")
    .env_remove("RUSTC")
    .env_remove("RUSTUP_TOOLCHAIN");
    process::run(&mut cmd)
}
