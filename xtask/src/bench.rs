//! `cargo xtask bench [--driver NAME|all] [--compare-python] [--quick]`: the benchmark
//! harness of DESIGN.md §8.
//!
//! Builds `tooz-bench` in release mode (the partitioner lookups are CPU-bound), starts the
//! servers the drivers need, and runs it per driver; it prints its table and writes
//! `target/bench/<driver>.json`. With `--compare-python`, `xtask/bench/python_bench.py`
//! runs the same scenarios through Python tooz 9.1.0 (the interop virtualenv) against the
//! same server, writes `target/bench/<driver>-python.json`, and a side-by-side table follows.
//! With `--compare-peers`, tooz-bench also runs the peer lock crates (its `peers` module)
//! and a "compared with peers" table follows: lock_pair, handoff, wake-up style and holds
//! left behind by dropped acquires, ours against each peer.
//! The scale scenarios (tooz-bench's `scale` module) run too unless `--no-scale`; their
//! figures go under `"scale"` in the JSON, and a table across drivers closes the run.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::{
    drivers::{Driver, DriverSelection},
    flags,
    process::{self, progress},
};

use crate::interop::venv;

/// Drivers `tooz-bench` knows; later drivers add themselves here and in tooz-bench.
const BENCH_DRIVERS: &[&str] = &[
    "file",
    "ipc",
    "redis",
    "zookeeper",
    "etcd",
    "memcached",
    "consul",
    "postgresql",
    "mysql",
];

/// The scenarios in the order tooz-bench prints them.
const ORDER: &[&str] = &[
    "floor_rtt",
    "floor_write",
    "lock_pair",
    "lock_handoff",
    "join_leave",
    "get_members_1000",
    "heartbeat_100",
    "watch_latency",
    "partition_lookup",
];

pub(crate) fn run(flags: &flags::Bench) -> Result<()> {
    let root = process::workspace_root();
    let mut drivers = flags.driver.resolve(&root)?;
    if let DriverSelection::One(name) = &flags.driver
        && !BENCH_DRIVERS.contains(&name.as_str())
    {
        bail!(
            "no benchmark for driver `{name}` yet; benchmarked drivers: {}",
            BENCH_DRIVERS.join(", ")
        );
    }
    drivers.retain(|d| BENCH_DRIVERS.contains(&d.name));
    if drivers.is_empty() {
        bail!("no benchmarked driver is present in this workspace");
    }
    let env = crate::drivers::start_servers(&root, &drivers)?;
    let out_dir = process::target_dir().join("bench");
    fs::create_dir_all(&out_dir).with_context(|| format!("cannot create {}", out_dir.display()))?;
    process::run(process::cargo().args(["build", "--release", "-p", "tooz-bench"]))?;
    let python = if flags.compare_python && flags.scale != flags::ScaleRun::Only {
        Some(venv::ensure(None)?)
    } else {
        None
    };

    let mut failed = Vec::new();
    for driver in &drivers {
        if let Err(err) = run_one(
            driver,
            &env,
            &out_dir,
            (flags.quick, flags.scale, flags.compare_peers),
            python.as_deref(),
        ) {
            progress!("bench {}: {err:#}", driver.name);
            failed.push(driver.name);
        }
    }
    if flags.scale != flags::ScaleRun::Skip {
        let docs: Vec<(&str, Value)> = drivers
            .iter()
            .filter_map(|d| {
                let doc = read_json(&out_dir.join(format!("{}.json", d.name))).ok()?;
                Some((d.name, doc))
            })
            .collect();
        print!("{}", scaling_table(&docs));
    }
    if !failed.is_empty() {
        bail!("bench failed for: {}", failed.join(", "));
    }
    Ok(())
}

/// The scaling table across drivers, from each driver's `"scale"` figures: per scale
/// scenario the median latency (µs per operation) and requests per operation, and the
/// concurrent acquires' ratio to their floor.
fn scaling_table(docs: &[(&str, Value)]) -> String {
    let mut out = format!(
        "\nbench: scaling (medians; req = requests per operation; see each driver's table for sizes and caps)\n\
         {:<10} | {:>17} | {:>22} | {:>17} | {:>17} | {:>17} | {:>17} | {:>7}\n{}\n",
        "driver",
        "heartbeat µs/req",
        "1k acquires µs/op ×fl",
        "handoff µs/req",
        "get_members µs/req",
        "watch 10k µs/req",
        "watch 1k grp µs/req",
        "conns",
        "-".repeat(10 + 17 * 5 + 22 + 7 + 21)
    );
    let pair = |s: &Value, name: &str| {
        let r = &s[name];
        format!(
            "{} / {}",
            cell(r["median_us"].as_f64(), 0),
            cell(r["requests_per_op"].as_f64(), 1)
        )
    };
    for (driver, doc) in docs {
        let s = &doc["scale"]["scenarios"];
        if s.is_null() {
            continue;
        }
        let acq = &s["scale_acquire"];
        out.push_str(&format!(
            "{driver:<10} | {:>17} | {:>22} | {:>17} | {:>17} | {:>17} | {:>17} | {:>7}\n",
            pair(s, "scale_heartbeat"),
            format!(
                "{} / {}",
                cell(acq["median_us"].as_f64(), 1),
                cell(acq["ratio_to_floor"].as_f64(), 1)
            ),
            pair(s, "scale_waiters"),
            pair(s, "scale_get_members"),
            pair(s, "scale_watch_members"),
            pair(s, "scale_watch_groups"),
            cell(
                s["scale_watch_groups"]["watch_setup_connections"].as_f64(),
                0
            ),
        ));
    }
    out.push_str(
        "conns = connections the watcher opened to watch every group (0: it reused its own)\n",
    );
    out
}

fn run_one(
    driver: &Driver,
    env: &[(String, String)],
    out_dir: &Path,
    (quick, scale, compare_peers): (bool, flags::ScaleRun, bool),
    python: Option<&Path>,
) -> Result<()> {
    let rust_json = out_dir.join(format!("{}.json", driver.name));
    let mut cmd = process::cargo();
    cmd.args(["run", "--release", "-q", "-p", "tooz-bench", "--"])
        .args(["--driver", driver.name, "--json-out"])
        .arg(&rust_json)
        .env("TOOZ_BENCH_DIR", out_dir.join("scratch"))
        .envs(env.iter().map(|(k, v)| (k, v)));
    if quick {
        cmd.arg("--quick");
    }
    if compare_peers {
        cmd.arg("--compare-peers");
    }
    match scale {
        flags::ScaleRun::Both => {}
        flags::ScaleRun::Skip => {
            cmd.arg("--no-scale");
        }
        flags::ScaleRun::Only => {
            cmd.arg("--scale-only");
        }
    }
    process::run(&mut cmd)?;
    if compare_peers {
        print!("{}", peers_table(driver.name, &read_json(&rust_json)?));
    }

    let Some(python) = python else {
        return Ok(());
    };
    if driver.name == "consul" {
        // Python tooz 9.1.0 has no Consul driver (8.1.0 had it, in its own virtualenv).
        progress!("bench consul: no Python comparison (tooz 9.1.0 has no Consul driver)");
        return Ok(());
    }
    let py_json = out_dir.join(format!("{}-python.json", driver.name));
    let _ = fs::remove_file(&py_json);
    let from_env = |var: &str| {
        env.iter()
            .find(|(k, _)| k == var)
            .map(|(_, v)| v.clone())
            .with_context(|| format!("backends did not report {var}"))
    };
    let url = match driver.name {
        "redis" => from_env("TOOZ_TEST_REDIS_URL")?,
        "zookeeper" => from_env("TOOZ_TEST_ZOOKEEPER_URL")?,
        "etcd" => from_env("TOOZ_TEST_ETCD_URL")?,
        "memcached" => from_env("TOOZ_TEST_MEMCACHED_URL")?,
        "ipc" => "ipc://".to_owned(),
        "postgresql" => from_env("TOOZ_TEST_POSTGRESQL_URL")?,
        "mysql" => from_env("TOOZ_TEST_MYSQL_URL")?,
        _ => {
            let dir = out_dir.join("scratch").join("python-file");
            format!("file://{}", dir.display())
        }
    };
    let script = process::workspace_root()
        .join("xtask")
        .join("bench")
        .join("python_bench.py");
    let mut cmd = Command::new(python);
    cmd.arg(&script)
        .args(["--driver", driver.name, "--url", &url, "--json-out"])
        .arg(&py_json);
    if quick {
        cmd.arg("--quick");
    }
    // A failed Python scenario is n/a in its JSON, with the reason as a note under the
    // table. The peer's failure is reported, not the Rust side's: the run goes on.
    let python_run = process::run(&mut cmd);
    if py_json.is_file() {
        print!("{}", side_by_side(driver.name, &rust_json, &py_json)?);
    }
    if let Err(err) = python_run {
        progress!(
            "bench {}: the Python side failed ({err:#}); its failed scenarios show n/a, \
             with the reason under the table. The Rust figures stand.",
            driver.name
        );
    }
    Ok(())
}

fn read_json(path: &PathBuf) -> Result<Value> {
    let text =
        fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))
}

fn cell(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.digits$}"))
}

/// The Rust | Python | ratio table (ratio = Python median / Rust median: how many times
/// longer Python takes).
fn side_by_side(driver: &str, rust: &PathBuf, python: &PathBuf) -> Result<String> {
    let rust = read_json(rust)?;
    let python = read_json(python)?;
    Ok(render(driver, &rust, &python))
}

fn render(driver: &str, rust: &Value, python: &Value) -> String {
    let mut out = format!(
        "\nbench {driver}: Rust vs Python tooz 9.1.0 (same server, same run)\n{:<18} | {:>14} | {:>14} | {:>9} | {:>12} | {:>12}\n{}\n",
        "scenario",
        "Rust median µs",
        "Py median µs",
        "Py/Rust",
        "Rust ops/s",
        "Py ops/s",
        "-".repeat(18 + 14 * 2 + 9 + 12 * 2 + 15)
    );
    let empty = serde_json::Map::new();
    let rs = rust["scenarios"].as_object().unwrap_or(&empty);
    let ps = python["scenarios"].as_object().unwrap_or(&empty);
    // The table's order (JSON objects come back sorted by name), then anything else.
    let mut names: Vec<&str> = ORDER
        .iter()
        .copied()
        .filter(|n| rs.contains_key(*n))
        .collect();
    // Only timed scenarios (`cancel` is a count, shown by the peers table).
    names.extend(
        rs.keys()
            .map(String::as_str)
            .filter(|n| !ORDER.contains(n) && rs[*n]["median_us"].is_number()),
    );
    for name in names {
        let r = &rs[name];
        let p = ps.get(name).unwrap_or(&Value::Null);
        let rm = r["median_us"].as_f64();
        let pm = p["median_us"].as_f64();
        let ratio = rm.zip(pm).filter(|(r, _)| *r > 0.0).map(|(r, p)| p / r);
        out.push_str(&format!(
            "{name:<18} | {:>14} | {:>14} | {:>9} | {:>12} | {:>12}\n",
            cell(rm, 2),
            cell(pm, 2),
            cell(ratio, 2),
            cell(r["ops_per_s"].as_f64(), 0),
            cell(p["ops_per_s"].as_f64(), 0),
        ));
    }
    for note in python["notes"].as_array().into_iter().flatten() {
        if let Some(n) = note.as_str() {
            out.push_str(&format!("python note: {n}\n"));
        }
    }
    out
}

/// How our lock's blocked acquire learns of a release, per driver (the peers report
/// their own in the JSON).
fn our_wake_up(driver: &str) -> &'static str {
    match driver {
        "redis" => "pub/sub",
        "etcd" | "zookeeper" => "watch",
        _ => "-",
    }
}

fn cancel_cell(c: &Value) -> String {
    match (c["left_behind"].as_u64(), c["n"].as_u64()) {
        (Some(left), Some(n)) => format!("{left} of {n}"),
        _ => c["error"]
            .as_str()
            .map_or_else(|| "n/a".to_owned(), |_| "failed".to_owned()),
    }
}

/// The "compared with peers" table: ours (the `scenarios` of the JSON) and every entry of
/// its `peers`, then whether the targets hold in this run.
fn peers_table(driver: &str, doc: &Value) -> String {
    let mut out = format!(
        "\nbench {driver}: compared with peers (same server, same run; medians, µs)\n{:<18} | {:>12} | {:>12} | {:<32} | {:>14}\n{}\n",
        "lock",
        "lock_pair",
        "handoff",
        "wake-up",
        "left behind",
        "-".repeat(18 + 12 * 2 + 32 + 14 + 12)
    );
    let sc = &doc["scenarios"];
    let ours_pair = sc["lock_pair"]["median_us"].as_f64();
    let ours_handoff = sc["lock_handoff"]["median_us"].as_f64();
    out.push_str(&format!(
        "{:<18} | {:>12} | {:>12} | {:<32} | {:>14}\n",
        "ours",
        cell(ours_pair, 0),
        cell(ours_handoff, 0),
        our_wake_up(driver),
        cancel_cell(&sc["cancel"]),
    ));
    let empty = serde_json::Map::new();
    let peers = doc["peers"].as_object().unwrap_or(&empty);
    let mut failures = Vec::new();
    let (mut best_pair, mut best_handoff): (Option<f64>, Option<f64>) = (None, None);
    for (name, p) in peers {
        let pair = p["lock_pair"]["median_us"].as_f64();
        let handoff = p["lock_handoff"]["median_us"].as_f64();
        best_pair = match (best_pair, pair) {
            (Some(b), Some(v)) => Some(b.min(v)),
            (b, v) => b.or(v),
        };
        best_handoff = match (best_handoff, handoff) {
            (Some(b), Some(v)) => Some(b.min(v)),
            (b, v) => b.or(v),
        };
        out.push_str(&format!(
            "{name:<18} | {:>12} | {:>12} | {:<32} | {:>14}\n",
            cell(pair, 0),
            cell(handoff, 0),
            p["wake_up"].as_str().unwrap_or("-"),
            cancel_cell(&p["cancel"]),
        ));
        for what in ["lock_pair", "lock_handoff", "cancel"] {
            if let Some(e) = p[what]["error"].as_str() {
                failures.push(format!("peer {name} {what} failed: {e}"));
            }
        }
    }
    let verdict = |ours: Option<f64>, peer: Option<f64>| match (ours, peer) {
        (Some(o), Some(p)) if o <= p => format!("met ({o:.0} ≤ {p:.0})"),
        (Some(o), Some(p)) => format!("NOT met ({o:.0} > {p:.0}, ×{:.2})", o / p),
        _ => "n/a".to_owned(),
    };
    if !peers.is_empty() {
        out.push_str(&format!(
            "targets: lock_pair ≤ best peer's: {}; handoff ≤ every peer's: {}\n",
            verdict(ours_pair, best_pair),
            verdict(ours_handoff, best_handoff),
        ));
    }
    if sc["cancel"]["left_behind"].as_u64().is_some_and(|n| n > 0) {
        out.push_str("WARNING: our lock left a hold behind after a dropped acquire (DESIGN §5a)\n");
    }
    for f in failures {
        out.push_str(&format!("{f}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_table_and_targets() {
        let doc = serde_json::json!({"driver": "redis",
            "scenarios": {
                "lock_pair": {"median_us": 250.0},
                "lock_handoff": {"median_us": 230.0},
                "cancel": {"n": 40, "left_behind": 0, "attempts": 48}},
            "peers": {
                "rslock": {"wake_up": "polls", "lock_pair": {"median_us": 200.0},
                    "lock_handoff": {"median_us": 90000.0},
                    "cancel": {"n": 44, "left_behind": 7}},
                "redis-setnx": {"wake_up": "polls (10 ms)",
                    "lock_pair": {"error": "boom"},
                    "lock_handoff": {"median_us": 6000.0},
                    "cancel": {"error": "boom"}}}});
        let table = peers_table("redis", &doc);
        assert!(table.contains("pub/sub"), "{table}");
        assert!(table.contains("7 of 44"), "{table}");
        assert!(table.contains("0 of 40"), "{table}");
        assert!(
            table.contains("lock_pair ≤ best peer's: NOT met (250 > 200"),
            "{table}"
        );
        assert!(
            table.contains("handoff ≤ every peer's: met (230 ≤ 6000)"),
            "{table}"
        );
        assert!(
            table.contains("peer redis-setnx lock_pair failed: boom"),
            "{table}"
        );
        assert!(!table.contains("WARNING"), "{table}");
    }

    #[test]
    fn side_by_side_ratio() {
        let rust = serde_json::json!({"driver": "redis", "scenarios": {
            "lock_pair": {"median_us": 100.0, "ops_per_s": 10000.0},
            "get_members_1000": {"median_us": 50.0, "ops_per_s": 20000.0}}});
        let python = serde_json::json!({"driver": "redis", "scenarios": {
            "lock_pair": {"median_us": 250.0, "ops_per_s": 4000.0},
            "get_members_1000": {"median_us": null, "ops_per_s": null}},
            "notes": ["x"]});
        let table = render("redis", &rust, &python);
        assert!(table.contains("2.50"), "{table}");
        assert!(table.contains("n/a"), "{table}");
        assert!(table.contains("python note: x"), "{table}");
        let lock = table.find("lock_pair").unwrap();
        let members = table.find("get_members_1000").unwrap();
        assert!(lock < members, "{table}");
    }

    #[test]
    fn scaling_table_rows() {
        let doc = serde_json::json!({"driver": "redis", "scale": {"scenarios": {
            "scale_heartbeat": {"median_us": 812.4, "requests_per_op": 2.0},
            "scale_acquire": {"median_us": 3.25, "ratio_to_floor": 1.5},
            "scale_watch_groups": {"median_us": 300.0, "requests_per_op": 4.0,
                                   "watch_setup_connections": 1}}}});
        let none = serde_json::json!({"driver": "file"});
        let table = scaling_table(&[("redis", doc), ("file", none)]);
        assert!(table.contains("812 / 2.0"), "{table}");
        assert!(
            table.contains("3.2 / 1.5") || table.contains("3.3 / 1.5"),
            "{table}"
        );
        assert!(table.contains("300 / 4.0"), "{table}");
        assert!(!table.contains("\nfile "), "{table}");
    }
}
