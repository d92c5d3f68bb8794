//! Interop scenarios for the file driver: Python tooz 9.1.0 (`xtask/interop/file_scenarios.py`)
//! and the `tooz` CLI share one directory.
//!
//! Both sides use the same `?timeout=` (Python tooz hides members whose file is older than
//! it). Python ids are `str`; ids written by Rust come back to Python as `bytes` and the
//! script normalises them.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};

use super::harness::{Ctx, Gate, Report, eventually};

/// The `timeout` option both sides use (seconds): membership staleness window.
const TIMEOUT_SECS: u32 = 10;

/// How long a background holder may take to start and take what it holds.
const START: Duration = Duration::from_secs(30);

/// How long a change made by one side may take to show on the other.
const SETTLE: Duration = Duration::from_secs(10);

/// One scenario: drives both sides, returns what differed.
type Scenario = fn(&Ctx) -> Result<()>;

/// The scenarios, in the order they run.
const SCENARIOS: &[(&str, Scenario)] = &[
    ("python_member_seen_by_rust", python_member_seen_by_rust),
    ("rust_member_seen_by_python", rust_member_seen_by_python),
    ("python_lock_excludes_rust", python_lock_excludes_rust),
    ("rust_lock_excludes_python", rust_lock_excludes_python),
    ("partitioner_owners_agree", partitioner_owners_agree),
    ("groups_shared_both_ways", groups_shared_both_ways),
    ("heartbeats_and_expiry_agree", heartbeats_and_expiry_agree),
];

/// Runs every file-driver scenario against a fresh directory under `dir`.
pub(crate) fn run(
    root: &Path,
    python: &Path,
    tooz: &Path,
    dir: &Path,
    report: &mut Report,
) -> Result<()> {
    let ctx = Ctx {
        python: python.to_path_buf(),
        script: root.join("xtask").join("interop").join("file_scenarios.py"),
        tooz: tooz.to_path_buf(),
        dir: dir.to_path_buf(),
        url: file_url(&dir.join("backend"), TIMEOUT_SECS)?,
    };
    for (name, scenario) in SCENARIOS {
        report.scenario("file", name, || scenario(&ctx));
    }
    Ok(())
}

/// `file://DIR?timeout=SECS` for a fresh directory `dir`.
fn file_url(dir: &Path, timeout_secs: u32) -> Result<String> {
    std::fs::create_dir_all(dir).with_context(|| format!("could not create {}", dir.display()))?;
    let path = dir.display().to_string();
    if !path
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-+".contains(c))
    {
        bail!("the interop directory {path} would need URL escaping; use a plain target dir path");
    }
    Ok(format!("file://{path}?timeout={timeout_secs}"))
}

/// (a) Python creates a group and joins with capabilities; Rust lists the member with
/// those capabilities, and stops listing it once Python leaves.
fn python_member_seen_by_rust(ctx: &Ctx) -> Result<()> {
    let group = "interop-a";
    let caps = json!({"weight": 3, "host": "py"});
    let mut py = ctx.py_bg(
        "join",
        "py-a",
        &[group, "--create", "--caps", &caps.to_string()],
    )?;
    py.wait_line("joined", START)?;

    let members = eventually("Rust lists Python's member py-a", SETTLE, || {
        let members = rust_members(ctx, group)?;
        Ok(if members.contains_key("py-a") {
            Ok(members)
        } else {
            Err(format!(
                "`tooz group members {group} --json` -> {members:?}"
            ))
        })
    })?;
    ensure!(
        members.len() == 1,
        "Python joined only py-a to {group}; Rust lists {members:?}"
    );
    ensure!(
        members["py-a"] == caps,
        "Python joined py-a with capabilities {caps}; Rust reports {}",
        members["py-a"]
    );

    py.close_stdin();
    py.wait_line("left", START)?;
    py.wait_success(START)?;
    eventually("Rust stops listing py-a after Python left", SETTLE, || {
        let members = rust_members(ctx, group)?;
        Ok(if members.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "`tooz group members {group} --json` -> {members:?}"
            ))
        })
    })
}

/// (b) Rust joins with capabilities (while its command runs); Python's `get_members` and
/// `get_member_capabilities` see it, and stop seeing it once Rust's command ends.
fn rust_member_seen_by_python(ctx: &Ctx) -> Result<()> {
    let group = "interop-b";
    ctx.tooz_ok("rust-b", &["group", "create", group])?;
    let gate = Gate::new(ctx, "b-join");
    let mut args = vec![
        "group",
        "join",
        group,
        "--capabilities",
        r#"{"weight":2}"#,
        "--",
    ];
    let command = gate.command();
    args.extend(command.iter().map(String::as_str));
    let mut rust = ctx.tooz_bg("rust-b", &args)?;
    gate.wait_ready(&mut rust, START)?;

    let members = eventually("Python lists Rust's member rust-b", SETTLE, || {
        let members = python_members(ctx, group)?;
        Ok(if members.contains_key("rust-b") {
            Ok(members)
        } else {
            Err(format!("Python get_members({group:?}) -> {members:?}"))
        })
    })?;
    ensure!(
        members.len() == 1,
        "only rust-b joined {group}; Python get_members lists {members:?}"
    );
    let seen = &members["rust-b"]["capabilities"];
    ensure!(
        *seen == json!({"weight": 2}),
        "Rust joined rust-b with capabilities {{\"weight\":2}}; Python \
         get_member_capabilities returns {seen} (member record {})",
        members["rust-b"]
    );

    gate.open()?;
    rust.wait_success(START)?;
    eventually(
        "Python stops listing rust-b after Rust left",
        SETTLE,
        || {
            let members = python_members(ctx, group)?;
            Ok(if members.is_empty() {
                Ok(())
            } else {
                Err(format!("Python get_members({group:?}) -> {members:?}"))
            })
        },
    )
}

/// (c, Python holds) Rust cannot take a lock Python holds, a waiting Rust process gets it
/// when Python releases, and afterwards both sides can acquire it.
fn python_lock_excludes_rust(ctx: &Ctx) -> Result<()> {
    let name = "interop-lock-c1";
    let mut py = ctx.py_bg("hold-lock", "py-c1", &[name])?;
    py.wait_line("held", START)?;

    let ran = ctx.path("c1-ran");
    let ran_s = ran.display().to_string();
    let done = ctx.tooz_run(
        "rust-c1",
        &["lock", name, "--wait", "0", "--", "touch", &ran_s],
    )?;
    ensure!(
        !done.status.success() && !ran.exists(),
        "Python holds lock {name:?} (acquire() returned True), yet Rust {}",
        done.describe(if ran.exists() {
            "ran its command"
        } else {
            "exited 0 without running its command"
        })
    );

    let waited = ctx.path("c1-waited");
    let waited_s = waited.display().to_string();
    let mut waiter = ctx.tooz_bg(
        "rust-c1w",
        &["lock", name, "--wait", "30", "--", "touch", &waited_s],
    )?;
    thread::sleep(Duration::from_secs(1));
    ensure!(
        !waited.exists(),
        "a Rust waiter ran its command while Python still held {name:?}"
    );

    py.close_stdin();
    py.wait_line("released", START)?;
    py.wait_success(START)?;
    waiter
        .wait_success(START)
        .context("the waiting Rust process did not get the lock after Python released it")?;
    ensure!(
        waited.exists(),
        "{}",
        waiter.describe("exited 0 but did not run its command")
    );

    ctx.tooz_ok("rust-c1", &["lock", name, "--wait", "0", "--", "true"])
        .context("Rust could not take the lock after Python released it")?;
    expect_python_try_lock(ctx, name, true, "after both released it")
}

/// (c, Rust holds) Python's non-blocking acquire fails while Rust holds a lock, a blocked
/// Python acquire gets it when Rust releases, and afterwards both sides can acquire it.
fn rust_lock_excludes_python(ctx: &Ctx) -> Result<()> {
    let name = "interop-lock-c2";
    let gate = Gate::new(ctx, "c2-lock");
    let mut args = vec!["lock", name, "--"];
    let command = gate.command();
    args.extend(command.iter().map(String::as_str));
    let mut rust = ctx.tooz_bg("rust-c2", &args)?;
    let token = gate.wait_ready(&mut rust, START)?;
    ensure!(
        token.trim().parse::<u128>().is_ok(),
        "the command run under `tooz lock` got TOOZ_FENCING_TOKEN={token:?}, not a number"
    );

    expect_python_try_lock(ctx, name, false, "while Rust holds it")?;

    let mut py_waiter = ctx.py_bg("hold-lock", "py-c2w", &[name])?;
    py_waiter.wait_line("acquiring", START)?;
    thread::sleep(Duration::from_secs(1));
    ensure!(
        !py_waiter.printed("held"),
        "a blocking Python acquire({name:?}) succeeded while Rust held the lock"
    );
    gate.open()?;
    rust.wait_success(START)?;
    py_waiter
        .wait_line("held", START)
        .context("the blocked Python acquire did not get the lock after Rust released it")?;

    let done = ctx.tooz_run("rust-c2", &["lock", name, "--wait", "0", "--", "true"])?;
    ensure!(
        !done.status.success(),
        "Python holds {name:?} again, yet Rust {}",
        done.describe("took it")
    );

    py_waiter.close_stdin();
    py_waiter.wait_line("released", START)?;
    py_waiter.wait_success(START)?;
    ctx.tooz_ok("rust-c2", &["lock", name, "--wait", "0", "--", "true"])
        .context("Rust could not take the lock after Python released it")?;
    expect_python_try_lock(ctx, name, true, "after both released it")
}

fn expect_python_try_lock(ctx: &Ctx, name: &str, want: bool, when: &str) -> Result<()> {
    let got = ctx.py_json("try-lock", "py-try", &[name])?;
    ensure!(
        got["acquired"] == json!(want),
        "Python lock({name:?}).acquire(blocking=False) {when}: expected {want}, got {got}"
    );
    Ok(())
}

/// A member of the partitioned group: id, capabilities JSON (None: the side's default),
/// and the weight the partitioner must give it.
struct Member {
    id: &'static str,
    caps: Option<&'static str>,
    weight: u64,
}

/// (d) A group with members of different weights joined from both sides: Python's
/// `Partitioner` and `tooz partition` give every object the same owners, for 1 and 2
/// replicas.
fn partitioner_owners_agree(ctx: &Ctx) -> Result<()> {
    let group = "interop-d";
    let py_spec = [
        Member {
            id: "py-d1",
            caps: Some(r#"{"weight": 1}"#),
            weight: 1,
        },
        Member {
            id: "py-d2",
            caps: Some(r#"{"weight": 3, "host": "py"}"#),
            weight: 3,
        },
        Member {
            id: "py-d3",
            caps: None,
            weight: 1,
        },
    ];
    let rs_spec = [
        Member {
            id: "rust-d1",
            caps: Some(r#"{"weight":2}"#),
            weight: 2,
        },
        Member {
            id: "rust-d2",
            caps: Some(r#"{"weight":4,"host":"rs"}"#),
            weight: 4,
        },
        Member {
            id: "rust-d3",
            caps: None,
            weight: 1,
        },
    ];
    ctx.py_ok("create-group", "py-d0", &[group])?;

    let mut holders = Vec::new();
    for m in &py_spec {
        let mut args = vec![group];
        if let Some(caps) = m.caps {
            args.extend(["--caps", caps]);
        }
        let mut proc = ctx.py_bg("join", m.id, &args)?;
        proc.wait_line("joined", START)?;
        holders.push(proc);
    }
    let mut gates = Vec::new();
    for m in &rs_spec {
        let gate = Gate::new(ctx, &format!("d-{}", m.id));
        let mut args = vec!["group", "join", group];
        if let Some(caps) = m.caps {
            args.extend(["--capabilities", caps]);
        }
        args.push("--");
        let command = gate.command();
        args.extend(command.iter().map(String::as_str));
        let mut proc = ctx.tooz_bg(m.id, &args)?;
        gate.wait_ready(&mut proc, START)?;
        holders.push(proc);
        gates.push(gate);
    }

    let expected: BTreeMap<String, u64> = py_spec
        .iter()
        .chain(&rs_spec)
        .map(|m| (m.id.to_owned(), m.weight))
        .collect();
    let ids: BTreeSet<String> = expected.keys().cloned().collect();
    eventually("Python lists all six members", SETTLE, || {
        let seen: BTreeSet<String> = python_members(ctx, group)?.into_keys().collect();
        Ok(if seen == ids {
            Ok(())
        } else {
            Err(format!("Python get_members -> {seen:?}"))
        })
    })?;
    eventually("Rust lists all six members", SETTLE, || {
        let seen: BTreeSet<String> = rust_members(ctx, group)?.into_keys().collect();
        Ok(if seen == ids {
            Ok(())
        } else {
            Err(format!("`tooz group members --json` -> {seen:?}"))
        })
    })?;

    let objects = objects();
    let objects: Vec<&str> = objects.iter().map(String::as_str).collect();
    let mut problems = Vec::new();
    for replicas in [1, 2] {
        let replicas_s = replicas.to_string();
        let mut py_args = vec![group, "--replicas", &replicas_s];
        py_args.extend(&objects);
        let py = ctx.py_json("partition", "py-reader", &py_args)?;
        let weights: BTreeMap<String, u64> = serde_json::from_value(py["weights"].clone())
            .with_context(|| format!("Python partition printed no weights: {py}"))?;
        ensure!(
            weights == expected,
            "Python's Partitioner ring has weights {weights:?}; the members were joined with \
             {expected:?} (Python side misread the capabilities)"
        );
        let py_owners: BTreeMap<String, BTreeSet<String>> =
            serde_json::from_value(py["owners"].clone())
                .with_context(|| format!("Python partition printed no owners: {py}"))?;

        let mut rs_args = vec!["partition", group];
        rs_args.extend(&objects);
        rs_args.extend(["--replicas", &replicas_s]);
        let rs_out = ctx.tooz_ok("rust-reader", &rs_args)?;
        let rs_owners = parse_partition(&rs_out)?;

        for obj in &objects {
            let py = py_owners.get(*obj);
            let rs = rs_owners.get(*obj);
            if py != rs || py.is_none_or(|s| s.len() != replicas) {
                problems.push(format!(
                    "replicas={replicas} {obj:?}: Python {}, Rust {}",
                    owners_text(py),
                    owners_text(rs)
                ));
            }
        }
        for obj in rs_owners.keys() {
            if !py_owners.contains_key(obj) {
                problems.push(format!(
                    "replicas={replicas}: Rust printed an object not asked for: {obj:?}"
                ));
            }
        }
    }

    for gate in &gates {
        gate.open()?;
    }
    for mut holder in holders {
        holder.close_stdin();
        holder.wait_success(START)?;
    }
    if !problems.is_empty() {
        let n = problems.len();
        problems.truncate(12);
        bail!(
            "{n} owner mismatch(es) between Python Partitioner and `tooz partition` \
             (weights {expected:?}):\n{}",
            problems.join("\n")
        );
    }
    Ok(())
}

fn owners_text(owners: Option<&BTreeSet<String>>) -> String {
    match owners {
        None => "(not printed)".to_owned(),
        Some(set) => format!("{{{}}}", set.iter().cloned().collect::<Vec<_>>().join(", ")),
    }
}

/// Fifty object names, including non-ASCII ones (hashed as UTF-8 by both sides).
fn objects() -> Vec<String> {
    let mut objects: Vec<String> = (0..44).map(|i| format!("object-{i}")).collect();
    objects.extend(
        ["42", "чупакабра", "ünïcödé", "a.b/c", "fake-again", "x"]
            .into_iter()
            .map(str::to_owned),
    );
    objects
}

/// (e) Each side's group records are readable by the other: both list both groups, each
/// side deletes the group the other created, and creating an existing group fails on
/// either side.
fn groups_shared_both_ways(ctx: &Ctx) -> Result<()> {
    let py_group = "interop-e-py";
    let rs_group = "interop-e-rust";
    let created = ctx.py_ok("create-group", "py-e", &[py_group])?;
    ensure!(
        created == "created",
        "Python create_group({py_group:?}) -> {created}"
    );
    ctx.tooz_ok("rust-e", &["group", "create", rs_group])?;

    let py_groups = python_groups(ctx)?;
    let rs_groups = rust_groups(ctx)?;
    for g in [py_group, rs_group] {
        ensure!(
            py_groups.contains(g),
            "Python get_groups() lacks {g:?}: {py_groups:?}"
        );
        ensure!(
            rs_groups.contains(g),
            "`tooz group list` lacks {g:?}: {rs_groups:?}"
        );
    }

    let again = ctx.py_ok("create-group", "py-e", &[rs_group])?;
    ensure!(
        again == "exists",
        "Python create_group({rs_group:?}) on the group Rust created -> {again} \
         (expected GroupAlreadyExist)"
    );
    let done = ctx.tooz_run("rust-e", &["group", "create", py_group])?;
    ensure!(
        !done.status.success(),
        "{}",
        done.describe(&format!(
            "succeeded on the group Python created ({py_group:?} exists)"
        ))
    );

    ctx.tooz_ok("rust-e", &["group", "delete", py_group])
        .context("Rust could not delete the (empty) group Python created")?;
    let deleted = ctx.py_ok("delete-group", "py-e", &[rs_group])?;
    ensure!(
        deleted == "deleted",
        "Python delete_group({rs_group:?}) -> {deleted}"
    );

    let py_groups = python_groups(ctx)?;
    let rs_groups = rust_groups(ctx)?;
    for g in [py_group, rs_group] {
        ensure!(
            !py_groups.contains(g),
            "Python get_groups() still lists deleted {g:?}: {py_groups:?}"
        );
        ensure!(
            !rs_groups.contains(g),
            "`tooz group list` still lists deleted {g:?}: {rs_groups:?}"
        );
    }
    Ok(())
}

/// The staleness window of the expiry scenario (seconds): short, so that it spans several.
const EXPIRY_TIMEOUT_SECS: u32 = 2;

/// (f) With a short staleness window, a member of each side stays visible to both sides
/// for several windows while its process runs (each side's heartbeat is seen by the
/// other), and a crashed member of either side drops out of both sides' views.
fn heartbeats_and_expiry_agree(ctx: &Ctx) -> Result<()> {
    let ctx = Ctx {
        url: file_url(&ctx.path("backend-expiry"), EXPIRY_TIMEOUT_SECS)?,
        ..ctx.clone()
    };
    let ctx = &ctx;
    let group = "interop-f";
    ctx.py_ok("create-group", "py-f0", &[group])?;
    let mut py = ctx.py_bg("join", "py-f", &[group])?;
    py.wait_line("joined", START)?;
    let gate = Gate::new(ctx, "f-join");
    let mut args = vec!["group", "join", group, "--"];
    let command = gate.command();
    args.extend(command.iter().map(String::as_str));
    let mut rust = ctx.tooz_bg("rust-f", &args)?;
    gate.wait_ready(&mut rust, START)?;

    let views = || -> Result<(BTreeSet<String>, BTreeSet<String>)> {
        Ok((
            python_members(ctx, group)?.into_keys().collect(),
            rust_members(ctx, group)?.into_keys().collect(),
        ))
    };
    let both: BTreeSet<String> = ["py-f", "rust-f"].map(str::to_owned).into();
    let window = Duration::from_secs(EXPIRY_TIMEOUT_SECS.into());
    let until = Instant::now() + 3 * window;
    let started = Instant::now();
    while Instant::now() < until {
        let (py_view, rs_view) = views()?;
        ensure!(
            py_view == both && rs_view == both,
            "{:.1}s after both joined (timeout={EXPIRY_TIMEOUT_SECS}s, both processes \
             running): Python lists {py_view:?}, Rust lists {rs_view:?}",
            started.elapsed().as_secs_f64()
        );
        thread::sleep(Duration::from_millis(400));
    }

    py.crash()?;
    let only_rust: BTreeSet<String> = ["rust-f"].map(str::to_owned).into();
    eventually("both sides drop the crashed Python member", SETTLE, || {
        let (py_view, rs_view) = views()?;
        Ok(if py_view == only_rust && rs_view == only_rust {
            Ok(())
        } else {
            Err(format!("Python lists {py_view:?}, Rust lists {rs_view:?}"))
        })
    })?;

    // Only the `tooz` process dies; the command it started keeps running.
    rust.crash()?;
    eventually("both sides drop the crashed Rust member", SETTLE, || {
        let (py_view, rs_view) = views()?;
        Ok(if py_view.is_empty() && rs_view.is_empty() {
            Ok(())
        } else {
            Err(format!("Python lists {py_view:?}, Rust lists {rs_view:?}"))
        })
    })
}

// ---- reading each side ------------------------------------------------------------------

/// Python's view of a group: member id → `{"capabilities": …, "id_type": "str"|"bytes"}`.
fn python_members(ctx: &Ctx, group: &str) -> Result<BTreeMap<String, Value>> {
    let value = ctx.py_json("members", "py-reader", &[group])?;
    serde_json::from_value(value).context("Python members printed something other than a map")
}

fn python_groups(ctx: &Ctx) -> Result<BTreeSet<String>> {
    let value = ctx.py_json("groups", "py-reader", &[])?;
    serde_json::from_value(value).context("Python groups printed something other than a list")
}

/// Rust's view of a group: member id → capabilities, from `tooz group members G --json`.
fn rust_members(ctx: &Ctx, group: &str) -> Result<BTreeMap<String, Value>> {
    let out = ctx.tooz_ok("rust-reader", &["group", "members", group, "--json"])?;
    let value: Value = serde_json::from_str(out.trim())
        .with_context(|| format!("`tooz group members --json` printed invalid JSON: {out}"))?;
    parse_members(&value)
        .with_context(|| format!("unexpected shape of `tooz group members --json`: {out}"))
}

/// Accepts `{"id": caps}` or `[{"member_id"|"member"|"id": …, "capabilities"|"caps": …}]`.
fn parse_members(value: &Value) -> Result<BTreeMap<String, Value>> {
    match value {
        Value::Object(map) => Ok(map.clone().into_iter().collect()),
        Value::Array(items) => items
            .iter()
            .map(|item| {
                let id = ["member_id", "member", "id"]
                    .iter()
                    .find_map(|k| item[*k].as_str())
                    .context("a member entry has no id")?;
                let caps = ["capabilities", "caps"]
                    .iter()
                    .map(|k| &item[*k])
                    .find(|v| !v.is_null())
                    .cloned()
                    .unwrap_or(Value::Null);
                Ok((id.to_owned(), caps))
            })
            .collect(),
        _ => bail!("neither an object nor an array"),
    }
}

fn rust_groups(ctx: &Ctx) -> Result<BTreeSet<String>> {
    let out = ctx.tooz_ok("rust-reader", &["group", "list"])?;
    Ok(out
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect())
}

/// Parses `OBJ<TAB>m1,m2` lines; an object printed twice is an error.
fn parse_partition(out: &str) -> Result<BTreeMap<String, BTreeSet<String>>> {
    let mut owners = BTreeMap::new();
    for line in out.lines().filter(|l| !l.trim().is_empty()) {
        let (obj, members) = line
            .split_once('\t')
            .with_context(|| format!("`tooz partition` printed a line without a tab: {line:?}"))?;
        let set: BTreeSet<String> = members
            .split(',')
            .map(str::trim)
            .filter(|m| !m.is_empty())
            .map(str::to_owned)
            .collect();
        if owners.insert(obj.to_owned(), set).is_some() {
            bail!("`tooz partition` printed {obj:?} twice");
        }
    }
    Ok(owners)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_partition_output() {
        let owners = parse_partition("a\tm1\nчупакабра\tm2,m1\n").unwrap();
        assert_eq!(owners["a"], BTreeSet::from(["m1".to_owned()]));
        assert_eq!(owners["чупакабра"].len(), 2);
        assert!(parse_partition("a m1\n").is_err());
        assert!(parse_partition("a\tm1\na\tm2\n").is_err());
    }

    #[test]
    fn parses_member_shapes() {
        let map = parse_members(&json!({"m1": {"weight": 2}})).unwrap();
        assert_eq!(map["m1"], json!({"weight": 2}));
        let list =
            parse_members(&json!([{"member_id": "m1", "capabilities": {"weight": 2}}])).unwrap();
        assert_eq!(list, map);
        assert!(parse_members(&json!("m1")).is_err());
    }

    #[test]
    fn fifty_distinct_objects() {
        let objects: BTreeSet<String> = objects().into_iter().collect();
        assert_eq!(objects.len(), 50);
    }
}
