//! End-to-end tests of the `tooz` binary on the file driver, each in its own
//! temporary directory. Waits use generous timeouts and files or output lines as
//! synchronisation points, never sleeps whose length matters.

// Helpers below are test code too; a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_tooz");

/// The documented exit statuses (src/exit.rs, `tooz --help`, the README).
const LOST: i32 = 123;
const NOT_ACQUIRED: i32 = 124;
const ERROR: i32 = 125;
const USAGE: i32 = 2;

/// Far longer than anything here should take; only a hang reaches it.
const PATIENCE: Duration = Duration::from_secs(30);

/// A scratch directory holding one test's backend, removed on drop.
struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn new(name: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        let dir = std::env::temp_dir().join(format!(
            "tooz-cli-{name}-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch { dir }
    }

    fn url(&self) -> String {
        format!("file://{}", self.dir.join("backend").display())
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// `tooz ARGS` with this backend in `$TOOZ_URL` (so commands it runs that call
    /// `tooz` again, found through `$TOOZ`, use it too).
    fn tooz<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut c = Command::new(BIN);
        c.args(args)
            .current_dir(&self.dir)
            .env("TOOZ_URL", self.url())
            .env("TOOZ", BIN)
            .env_remove("TOOZ_MEMBER_ID")
            .stdin(Stdio::null());
        c
    }

    fn run<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let child = self
            .tooz(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        output_within(child, PATIENCE)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A background process of a test, killed if the test ends (or fails) first.
struct Proc(Child);

impl std::ops::Deref for Proc {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Proc {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Waits for a child (reading its output) or kills it and fails the test.
fn output_within(child: Child, limit: Duration) -> Output {
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            panic!("tooz (pid {pid}) did not finish within {limit:?}");
        }
    }
}

fn wait_within(child: &mut Child, limit: Duration) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("process {} did not exit within {limit:?}", child.id());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Lines of a child's stdout, delivered through a channel (for timeouts).
fn lines_of(child: &mut Child) -> mpsc::Receiver<String> {
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn assert_ok(o: &Output) {
    assert!(
        o.status.success(),
        "status {:?}\nstdout: {}\nstderr: {}",
        o.status,
        stdout(o),
        stderr(o)
    );
}

/// A failure of `tooz` itself: non-zero, one `tooz: ` line on stderr, no panic.
fn assert_one_line_error(o: &Output, needle: &str) {
    assert!(!o.status.success(), "unexpected success: {}", stdout(o));
    let err = stderr(o);
    assert_eq!(err.lines().count(), 1, "not one line: {err:?}");
    assert!(err.starts_with("tooz: "), "{err:?}");
    assert!(err.contains(needle), "{err:?} lacks {needle:?}");
    assert!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "{err}"
    );
}

/// A shell loop that waits until `file` exists (the test's release signal).
fn wait_for_file(file: &Path) -> String {
    // Bounded (about 30 s) so that a failed test leaves nothing running.
    format!(
        "i=0; while [ ! -e '{}' ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done",
        file.display()
    )
}

fn members_json(s: &Scratch, group: &str) -> Vec<Value> {
    let o = s.run(["--json", "group", "members", group]);
    assert_ok(&o);
    match serde_json::from_str::<Value>(&stdout(&o)).unwrap() {
        Value::Array(v) => v,
        other => panic!("not an array: {other}"),
    }
}

#[test]
fn version_and_completions_need_no_backend() {
    let s = Scratch::new("completions");
    let o = s.run(["--version"]);
    assert_ok(&o);
    assert_eq!(
        stdout(&o).trim(),
        format!("tooz {}", env!("CARGO_PKG_VERSION"))
    );
    let o = s.run(["completions", "bash"]);
    assert_ok(&o);
    let script = stdout(&o);
    assert!(
        script.contains("complete ") && script.contains("partition"),
        "{script}"
    );
    let o = s.run(["completions", "fish"]);
    assert_ok(&o);
    assert!(stdout(&o).contains("complete -c tooz"));
    // No backend was contacted: the file backend's directory was not created.
    assert!(!s.path("backend").exists());
    assert_eq!(s.run(["completions", "tcsh"]).status.code(), Some(2));
}

#[test]
fn group_create_list_delete() {
    let s = Scratch::new("groups");
    assert_ok(&s.run(["group", "create", "alpha"]));
    assert_ok(&s.run(["group", "create", "beta"]));
    let o = s.run(["group", "list"]);
    assert_ok(&o);
    let listed: Vec<String> = stdout(&o).lines().map(str::to_string).collect();
    assert_eq!(listed, ["alpha", "beta"]);

    let o = s.run(["--json", "group", "list"]);
    assert_ok(&o);
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v, serde_json::json!(["alpha", "beta"]));

    assert_one_line_error(&s.run(["group", "create", "alpha"]), "already exists");
    assert_ok(&s.run(["group", "delete", "alpha"]));
    assert_one_line_error(&s.run(["group", "delete", "alpha"]), "alpha");
    let o = s.run(["group", "list"]);
    assert_eq!(stdout(&o).trim(), "beta");
    assert!(members_json(&s, "beta").is_empty());
}

#[test]
fn join_lists_member_while_command_runs() {
    let s = Scratch::new("join");
    let script = r#"echo "$("$TOOZ" group members workers)"; "$TOOZ" --json group members workers"#;
    let o = s.run([
        "--member-id",
        "alice",
        "group",
        "join",
        "workers",
        "--capabilities",
        r#"{"weight": 2, "host": "10.0.0.1"}"#,
        "--",
        "sh",
        "-c",
        script,
    ]);
    assert_ok(&o);
    let out = stdout(&o);
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("alice"));
    let v: Value = serde_json::from_str(lines.next().unwrap()).unwrap();
    assert_eq!(
        v,
        serde_json::json!([{
            "member_id": "alice",
            "capabilities": {"weight": 2, "host": "10.0.0.1"},
        }])
    );
    // Gone once the command exited; the group stays.
    assert!(members_json(&s, "workers").is_empty());
    assert_eq!(stdout(&s.run(["group", "list"])).trim(), "workers");
}

#[test]
fn command_gets_the_backend_url() {
    let s = Scratch::new("url-env");
    let url = s.url();
    let o = s
        .tooz([
            "--url",
            &url,
            "--member-id",
            "carol",
            "group",
            "join",
            "g",
            "--",
            "sh",
            "-c",
            r#"echo "$TOOZ_URL"; "$TOOZ" group members g"#,
        ])
        .env_remove("TOOZ_URL")
        .output()
        .unwrap();
    assert_ok(&o);
    assert_eq!(stdout(&o), format!("{url}\ncarol\n"));
}

#[test]
fn join_without_command_stays_until_interrupted() {
    let s = Scratch::new("join-wait");
    assert_ok(&s.run(["group", "create", "g"]));
    let mut child = s
        .tooz(["--member-id", "bob", "group", "join", "g"])
        .spawn()
        .map(Proc)
        .unwrap();
    let deadline = Instant::now() + PATIENCE;
    while members_json(&s, "g").is_empty() {
        assert!(Instant::now() < deadline, "bob never joined");
        std::thread::sleep(Duration::from_millis(50));
    }
    kill(Pid::from_raw(child.id() as i32), Signal::SIGINT).unwrap();
    assert!(wait_within(&mut child, PATIENCE).success());
    assert!(members_json(&s, "g").is_empty());
}

#[test]
fn exit_status_of_the_command_propagates() {
    let s = Scratch::new("status");
    let o = s.run(["lock", "x", "--", "sh", "-c", "exit 7"]);
    assert_eq!(o.status.code(), Some(7), "{}", stderr(&o));
    assert!(o.stderr.is_empty(), "{}", stderr(&o));
    let o = s.run(["group", "join", "g", "--", "sh", "-c", "exit 3"]);
    assert_eq!(o.status.code(), Some(3));
    let o = s.run(["leader", "g", "--", "sh", "-c", "exit 5"]);
    assert_eq!(o.status.code(), Some(5));
    // Killed by a signal: 128 + its number, as shells report it.
    let o = s.run(["lock", "x", "--", "sh", "-c", "kill -KILL $$"]);
    assert_eq!(o.status.code(), Some(128 + 9));
    // A command that cannot be run.
    let o = s.run(["lock", "x", "--", "/nonexistent/command"]);
    assert_eq!(o.status.code(), Some(127));
    assert_one_line_error(&o, "/nonexistent/command");
}

#[test]
fn lock_excludes_a_second_holder() {
    let s = Scratch::new("lock");
    let release = s.path("release");
    let script = format!("echo held; {}", wait_for_file(&release));
    let mut first = s
        .tooz(["lock", "shared-resource", "--", "sh", "-c", &script])
        .stdout(Stdio::piped())
        .spawn()
        .map(Proc)
        .unwrap();
    let lines = lines_of(&mut first);
    assert_eq!(lines.recv_timeout(PATIENCE).unwrap(), "held");

    let marker = s.path("second-ran");
    let touch = format!("touch '{}'", marker.display());
    let o = s.run([
        "lock",
        "shared-resource",
        "--wait",
        "0",
        "--",
        "sh",
        "-c",
        &touch,
    ]);
    assert_eq!(o.status.code(), Some(NOT_ACQUIRED));
    assert_one_line_error(&o, "lock shared-resource not acquired within 0s");
    assert!(!marker.exists(), "the command ran without the lock");

    // A bounded wait that runs out says so too.
    let o = s.run(["lock", "shared-resource", "--wait", "0.2", "--", "true"]);
    assert_one_line_error(&o, "not acquired within 0.2s");
    assert_eq!(o.status.code(), Some(NOT_ACQUIRED));

    std::fs::write(&release, b"").unwrap();
    assert!(wait_within(&mut first, PATIENCE).success());
    // Free again.
    let o = s.run([
        "lock",
        "shared-resource",
        "--wait",
        "0",
        "--",
        "sh",
        "-c",
        &touch,
    ]);
    assert_ok(&o);
    assert!(marker.exists());
}

#[test]
fn waiting_lock_runs_after_release() {
    let s = Scratch::new("lock-wait");
    let release = s.path("release");
    let script = format!("echo held; {}", wait_for_file(&release));
    let mut first = s
        .tooz(["lock", "L", "--", "sh", "-c", &script])
        .stdout(Stdio::piped())
        .spawn()
        .map(Proc)
        .unwrap();
    assert_eq!(lines_of(&mut first).recv_timeout(PATIENCE).unwrap(), "held");
    let mut second = s
        .tooz(["lock", "L", "--", "echo", "second"])
        .stdout(Stdio::piped())
        .spawn()
        .map(Proc)
        .unwrap();
    let second_lines = lines_of(&mut second);
    std::fs::write(&release, b"").unwrap();
    assert_eq!(second_lines.recv_timeout(PATIENCE).unwrap(), "second");
    assert!(wait_within(&mut first, PATIENCE).success());
    assert!(wait_within(&mut second, PATIENCE).success());
}

#[test]
fn fencing_token_is_set_and_increases() {
    let s = Scratch::new("fencing");
    let token = |args: &[&str]| -> u64 {
        let o = s.run(args);
        assert_ok(&o);
        stdout(&o).trim().parse().unwrap()
    };
    let echo = ["--", "sh", "-c", "echo $TOOZ_FENCING_TOKEN"];
    let a = token(&[&["lock", "tok"][..], &echo].concat());
    let b = token(&[&["lock", "tok"][..], &echo].concat());
    assert!(b > a, "{b} after {a}");
    let c = token(&[&["leader", "tokens"][..], &echo].concat());
    let d = token(&[&["leader", "tokens"][..], &echo].concat());
    assert!(d > c, "{d} after {c}");
}

#[test]
fn signal_is_forwarded_and_lock_freed() {
    let s = Scratch::new("signal");
    let mut child = s
        .tooz([
            "lock",
            "sig",
            "--",
            "sh",
            "-c",
            "echo started; exec sleep 60",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .map(Proc)
        .unwrap();
    assert_eq!(
        lines_of(&mut child).recv_timeout(PATIENCE).unwrap(),
        "started"
    );
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let status = wait_within(&mut child, PATIENCE);
    assert_eq!(status.code(), Some(128 + 15));
    assert_ok(&s.run(["lock", "sig", "--wait", "0", "--", "true"]));
}

#[test]
fn bad_urls_are_one_line_errors() {
    let s = Scratch::new("urls");
    for url in ["bogus://x", "not a url", "file://relative/dir?timeout=abc"] {
        let o = s.run(["--url", url, "group", "list"]);
        assert_one_line_error(&o, "");
        assert_eq!(o.status.code(), Some(ERROR), "{url}: {}", stderr(&o));
    }
    let o = s.run(["--url", "bogus://x", "group", "list"]);
    assert_one_line_error(&o, "bogus");
    // Usage errors are one line too, with status 2.
    let o = s.run(["lock", "x"]);
    assert_eq!(o.status.code(), Some(USAGE));
    assert_one_line_error(&o, "CMD");
    let o = s.run(["lock", "x", "--wait", "soon", "--", "true"]);
    assert_one_line_error(&o, "soon");
    let o = s.run(["group", "join", "g", "--capabilities", "{", "--", "true"]);
    assert_one_line_error(&o, "JSON");
}

#[test]
fn default_url_is_a_directory_in_the_working_directory() {
    let s = Scratch::new("default");
    let o = s
        .tooz(["group", "create", "here"])
        .env_remove("TOOZ_URL")
        .output()
        .unwrap();
    assert_ok(&o);
    assert!(s.path(".tooz").is_dir());
    let o = s
        .tooz(["group", "list"])
        .env_remove("TOOZ_URL")
        .output()
        .unwrap();
    assert_eq!(stdout(&o).trim(), "here");
    // $TOOZ_URL names another backend, which does not have it.
    assert_eq!(stdout(&s.run(["group", "list"])).trim(), "");
}

#[test]
fn partition_maps_objects_to_live_members() {
    let s = Scratch::new("partition");
    let release = s.path("release");
    let mut members = Vec::new();
    for (id, weight) in [("a", 1), ("b", 3)] {
        let caps = format!(r#"{{"weight": {weight}}}"#);
        let script = format!("echo joined; {}", wait_for_file(&release));
        let mut child = s
            .tooz([
                "--member-id",
                id,
                "group",
                "join",
                "ring",
                "--capabilities",
                &caps,
                "--",
                "sh",
                "-c",
                &script,
            ])
            .stdout(Stdio::piped())
            .spawn()
            .map(Proc)
            .unwrap();
        assert_eq!(
            lines_of(&mut child).recv_timeout(PATIENCE).unwrap(),
            "joined"
        );
        members.push(child);
    }
    let objects = ["o1", "o2", "o3", "o4", "o5"];
    let o = s.run([&["partition", "ring"][..], &objects, &["--replicas", "2"]].concat());
    assert_ok(&o);
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), objects.len(), "{out}");
    for (line, obj) in lines.iter().zip(objects) {
        let (name, owners) = line.split_once('\t').unwrap();
        assert_eq!(name, obj);
        let mut owners: Vec<&str> = owners.split(',').collect();
        owners.sort_unstable();
        assert_eq!(owners, ["a", "b"], "{line}");
    }
    // One replica: a single owner, and the same primary as above.
    let o = s.run([&["partition", "ring"][..], &objects].concat());
    let single = stdout(&o);
    for (l1, l2) in single.lines().zip(&lines) {
        let primary = l2.split_once('\t').unwrap().1.split(',').next().unwrap();
        assert_eq!(l1.split_once('\t').unwrap().1, primary);
    }
    // JSON form.
    let o = s.run(["--json", "partition", "ring", "o1"]);
    let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v[0]["object"], "o1");
    assert_eq!(v[0]["members"].as_array().unwrap().len(), 1);

    std::fs::write(&release, b"").unwrap();
    for mut m in members {
        assert!(wait_within(&mut m, PATIENCE).success());
    }
    assert_one_line_error(&s.run(["partition", "ring", "o1"]), "no live members");
}

#[test]
fn leader_runs_the_command() {
    let s = Scratch::new("leader");
    let o = s.run(["leader", "chiefs", "--", "sh", "-c", "echo leading"]);
    assert_ok(&o);
    assert_eq!(stdout(&o), "leading\n");
}

#[test]
fn leader_waits_for_the_current_leader() {
    let s = Scratch::new("leader-wait");
    let release = s.path("release");
    let script = format!("echo first; {}", wait_for_file(&release));
    let mut first = s
        .tooz([
            "--member-id",
            "one",
            "leader",
            "chiefs",
            "--",
            "sh",
            "-c",
            &script,
        ])
        .stdout(Stdio::piped())
        .spawn()
        .map(Proc)
        .unwrap();
    assert_eq!(
        lines_of(&mut first).recv_timeout(PATIENCE).unwrap(),
        "first"
    );
    let mut second = s
        .tooz([
            "--member-id",
            "two",
            "leader",
            "chiefs",
            "--",
            "echo",
            "second",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .map(Proc)
        .unwrap();
    let second_lines = lines_of(&mut second);
    std::fs::write(&release, b"").unwrap();
    assert_eq!(second_lines.recv_timeout(PATIENCE).unwrap(), "second");
    assert!(wait_within(&mut first, PATIENCE).success());
    assert!(wait_within(&mut second, PATIENCE).success());
}

#[test]
fn watch_prints_joins_and_exits_on_ctrl_c() {
    let s = Scratch::new("watch");
    assert_ok(&s.run(["group", "create", "watched"]));
    for json in [false, true] {
        let mut args = vec!["watch", "watched"];
        if json {
            args.insert(0, "--json");
        }
        let mut watch = s
            .tooz(&args)
            .stdout(Stdio::piped())
            .spawn()
            .map(Proc)
            .unwrap();
        let lines = lines_of(&mut watch);
        // The watch may not be subscribed yet when the first join happens: join
        // (briefly) until it reports one.
        let joiner = if json { "jay" } else { "jo" };
        // A subscription that starts during a join sees only its leave, so look
        // for the join among the lines printed.
        let expected = if json {
            serde_json::json!({"event": "joined", "group": "watched", "member": joiner}).to_string()
        } else {
            format!("joined {joiner}")
        };
        let mut printed = Vec::new();
        'attempts: for _ in 0..15 {
            let o = s.run([
                "--member-id",
                joiner,
                "group",
                "join",
                "watched",
                "--",
                "sleep",
                "0.3",
            ]);
            assert_ok(&o);
            while let Ok(line) = lines.recv_timeout(Duration::from_secs(2)) {
                if json {
                    // Every line is one JSON object.
                    let _: Value = serde_json::from_str(&line).unwrap();
                }
                printed.push(line.clone());
                if line == expected {
                    break 'attempts;
                }
            }
        }
        assert!(printed.contains(&expected), "{printed:?}");
        kill(Pid::from_raw(watch.id() as i32), Signal::SIGINT).unwrap();
        assert!(wait_within(&mut watch, PATIENCE).success());
    }
}

#[test]
fn watch_of_a_missing_group_fails_clearly() {
    let s = Scratch::new("watch-missing");
    assert_one_line_error(&s.run(["watch", "nowhere"]), "nowhere");
}

// ----- exit statuses, process groups --------------------------------------------

/// Whether a process of group `pgid` is running. Zombies do not count: an
/// orphaned grandchild that died stays a zombie for as long as init does not
/// reap it.
fn group_running(pgid: i32) -> bool {
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
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
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.get(2).and_then(|p| p.parse::<i32>().ok()) == Some(pgid)
            && !matches!(fields.first(), Some(&("Z" | "X")))
        {
            return true;
        }
    }
    false
}

/// Whether process `pid` runs (not a zombie).
fn process_running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| !matches!(state, "Z" | "X"))
    })
}

/// Waits (up to `PATIENCE`) until `file` exists and holds a full line; returns it.
fn read_when_written(file: &Path) -> String {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Ok(text) = std::fs::read_to_string(file)
            && text.ends_with('\n')
        {
            return text.trim().to_string();
        }
        assert!(
            Instant::now() < deadline,
            "{} never written",
            file.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn exit_statuses_are_as_documented() {
    let s = Scratch::new("exit-codes");
    let help = s.run(["--help"]);
    assert_ok(&help);
    for needle in ["Exit status:", "123", "124", "125", "126/127"] {
        assert!(
            stdout(&help).contains(needle),
            "{needle}: {}",
            stdout(&help)
        );
    }
    let lock_help = stdout(&s.run(["lock", "--help"]));
    assert!(
        lock_help.contains("--grace") && lock_help.contains("124"),
        "{lock_help}"
    );

    // The command's own status.
    let o = s.run(["lock", "x", "--", "sh", "-c", "exit 42"]);
    assert_eq!(o.status.code(), Some(42), "{}", stderr(&o));
    assert!(o.stderr.is_empty(), "{}", stderr(&o));

    // Not acquired within --wait: the command does not run.
    let release = s.path("release");
    let script = format!("echo held; {}", wait_for_file(&release));
    let mut holder = s
        .tooz(["lock", "x", "--", "sh", "-c", &script])
        .stdout(Stdio::piped())
        .spawn()
        .map(Proc)
        .unwrap();
    assert_eq!(
        lines_of(&mut holder).recv_timeout(PATIENCE).unwrap(),
        "held"
    );
    let marker = s.path("ran");
    let touch = format!("touch '{}'", marker.display());
    for wait in ["0", "0.3"] {
        let o = s.run(["lock", "x", "--wait", wait, "--", "sh", "-c", &touch]);
        assert_eq!(o.status.code(), Some(NOT_ACQUIRED), "{}", stderr(&o));
        assert_one_line_error(&o, "not acquired");
    }
    assert!(!marker.exists(), "the command ran without the lock");
    std::fs::write(&release, b"").unwrap();
    assert!(wait_within(&mut holder, PATIENCE).success());

    // A failure of tooz itself, and a usage error.
    let o = s.run(["--url", "bogus://x", "lock", "x", "--", "true"]);
    assert_eq!(o.status.code(), Some(ERROR), "{}", stderr(&o));
    let o = s.run(["lock", "x", "--grace", "-1", "--", "true"]);
    assert_eq!(o.status.code(), Some(USAGE), "{}", stderr(&o));
}

/// SIGTERM to `tooz` reaches the whole process group: a grandchild started by
/// `sh -c` gets it too, and nothing of the group is left when `tooz` exits.
#[test]
fn signals_reach_the_grandchildren() {
    let s = Scratch::new("group-signal");
    let d = s.dir.display().to_string();
    let script = format!(
        r#"echo $$ > '{d}/pgid'
sh -c 'trap "echo got > {d}/got-term; exit 0" TERM; echo $$ > {d}/gc; while :; do sleep 0.05; done' &
wait"#
    );
    let mut child = s
        .tooz(["lock", "sig", "--", "sh", "-c", &script])
        .spawn()
        .map(Proc)
        .unwrap();
    let pgid: i32 = read_when_written(&s.path("pgid")).parse().unwrap();
    read_when_written(&s.path("gc"));
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let status = wait_within(&mut child, PATIENCE);
    assert_eq!(status.code(), Some(128 + 15));
    assert_eq!(read_when_written(&s.path("got-term")), "got");
    assert!(!group_running(pgid), "the command's group outlived tooz");
    assert_ok(&s.run(["lock", "sig", "--wait", "0", "--", "true"]));
}

/// What the command leaves running in its group when it exits is stopped before
/// `tooz` releases the lock and exits.
#[test]
fn leftovers_of_the_command_are_stopped() {
    let s = Scratch::new("leftovers");
    let bg = s.path("bg");
    // The background job ignores SIGTERM: it takes the SIGKILL after the grace.
    let script = format!(
        "sh -c 'trap \"\" TERM; exec sleep 60' & echo $! > '{}'; exit 3",
        bg.display()
    );
    let started = Instant::now();
    let o = s.run(["lock", "left", "--grace", "0.2", "--", "sh", "-c", &script]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    let pid: i32 = read_when_written(&bg).parse().unwrap();
    assert!(!process_running(pid), "the background job outlived tooz");
    assert!(started.elapsed() < Duration::from_secs(20));
}

/// The command dies with `tooz`, even when `tooz` is killed with SIGKILL
/// (Linux's parent-death signal). Grandchildren are not covered by it.
#[test]
fn command_dies_with_tooz() {
    let s = Scratch::new("pdeathsig");
    let pid_file = s.path("pid");
    let script = format!(
        "echo $$ > '{}'; while :; do sleep 0.05; done",
        pid_file.display()
    );
    let mut child = s
        .tooz(["lock", "orphan", "--", "sh", "-c", &script])
        .spawn()
        .map(Proc)
        .unwrap();
    let pid: i32 = read_when_written(&pid_file).parse().unwrap();
    assert!(process_running(pid));
    kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).unwrap();
    let _ = wait_within(&mut child, PATIENCE);
    wait_until("the command to die with tooz", || !process_running(pid));
}

// ----- partitions against real servers --------------------------------------------

fn backends_required() -> bool {
    std::env::var("TOOZ_REQUIRE_BACKENDS").is_ok_and(|v| v == "1")
}

/// The server URL in `$env`, or `None` (after printing why) when the test is
/// skipped; panics when `TOOZ_REQUIRE_BACKENDS=1` and it is not set.
fn backend_url(test: &str, env: &str) -> Option<String> {
    match std::env::var(env) {
        Ok(u) if !u.trim().is_empty() => Some(u.trim().to_string()),
        _ => {
            assert!(
                !backends_required(),
                "{test}: {env} is not set and TOOZ_REQUIRE_BACKENDS=1"
            );
            eprintln!("SKIPPED {test}: {env} is not set");
            None
        }
    }
}

fn with_option(url: &str, option: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{option}")
}

fn wall_clock() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn read_time(file: &Path) -> f64 {
    read_when_written(file).parse().unwrap()
}

/// What a partition run measured, in seconds after the freeze.
#[derive(Debug)]
struct PartitionRun {
    /// The second command started (it held the lock or leadership).
    waiter_started: f64,
    /// The first command's process group was gone (observed).
    holder_stopped: f64,
    /// The first command's grandchild got SIGTERM.
    holder_sigterm: f64,
}

impl PartitionRun {
    /// Both commands running at once; must be ≤ 0.
    fn overlap(&self) -> f64 {
        self.holder_stopped - self.waiter_started
    }
}

/// `tooz lock` (or `leader`) through a proxy that is frozen while the command
/// runs; a second `tooz` against the server directly must not start its command
/// before the first command's whole process group (a `sh -c` with a grandchild
/// that traps SIGTERM and one that ignores it) is gone. The first `tooz` exits
/// with the "lost" status.
fn partition_case(test: &str, url: &str, timeout: u32, leader: bool) -> PartitionRun {
    use tooz_conformance::fault::{FaultProxy, proxied_url, url_target};

    let s = Scratch::new(test);
    let d = s.dir.display().to_string();
    let name = format!(
        "cli-partition-{}-{}",
        std::process::id(),
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let direct = with_option(url, &format!("timeout={timeout}"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let proxy = rt
        .block_on(FaultProxy::start(url_target(url).unwrap()))
        .unwrap();
    let proxied = proxied_url(&direct, &proxy).unwrap();

    let holder_script = format!(
        r#"echo $$ > '{d}/pgid'
sh -c 'trap "date +%s.%N > {d}/term; exit 0" TERM; while :; do sleep 0.02; done' &
sh -c 'trap "" TERM; while :; do date +%s.%N > {d}/alive.tmp && mv {d}/alive.tmp {d}/alive; sleep 0.02; done' &
date +%s.%N > '{d}/start'
wait"#
    );
    let verb: &[&str] = if leader {
        &["leader", &name]
    } else {
        &["lock", &name]
    };
    let mut holder = s
        .tooz(
            [
                &["--url", &proxied, "--member-id", "holder"][..],
                verb,
                &["--", "sh", "-c", &holder_script],
            ]
            .concat(),
        )
        .stderr(Stdio::piped())
        .spawn()
        .map(Proc)
        .unwrap();
    let pgid: i32 = read_when_written(&s.path("pgid")).parse().unwrap();
    read_time(&s.path("start"));
    // Let a renewal or two go through the proxy.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(group_running(pgid));

    // Watch the holder's group from now on.
    let (gone_tx, gone_rx) = mpsc::channel();
    std::thread::spawn(move || {
        while group_running(pgid) {
            std::thread::sleep(Duration::from_millis(2));
        }
        let _ = gone_tx.send(wall_clock());
    });
    proxy.freeze();
    let frozen = wall_clock();

    let waiter_verb: &[&str] = if leader {
        &["leader", &name]
    } else {
        &["lock", &name, "--wait", "60"]
    };
    let waiter_script = format!("date +%s.%N > '{d}/second'");
    let mut waiter = s
        .tooz(
            [
                &["--url", &direct, "--member-id", "waiter"][..],
                waiter_verb,
                &["--", "sh", "-c", &waiter_script],
            ]
            .concat(),
        )
        .spawn()
        .map(Proc)
        .unwrap();
    let waiter_status = wait_within(&mut waiter, Duration::from_secs(90));
    assert!(waiter_status.success(), "waiter: {waiter_status:?}");
    let second = read_time(&s.path("second"));
    let stopped = gone_rx
        .recv_timeout(PATIENCE)
        .expect("the holder's process group never went away");

    // Let the holder finish (its stop talks to the server).
    proxy.cut_all();
    proxy.heal();
    let status = wait_within(&mut holder, PATIENCE);
    let mut err = String::new();
    if let Some(mut e) = holder.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut err);
    }
    assert_eq!(
        status.code(),
        Some(LOST),
        "holder: {status:?}, stderr: {err}"
    );
    assert!(err.contains("lost"), "{err}");
    let term = read_time(&s.path("term"));
    let alive = read_time(&s.path("alive"));
    assert!(
        alive <= stopped,
        "recorded alive after the group was seen gone"
    );
    drop(proxy);
    rt.shutdown_background();
    PartitionRun {
        waiter_started: second - frozen,
        holder_stopped: stopped - frozen,
        holder_sigterm: term - frozen,
    }
}

/// A partition test of a driver this build left out: fails under
/// `TOOZ_REQUIRE_BACKENDS=1`, else says it was skipped.
#[cfg(any(
    not(feature = "etcd"),
    not(feature = "postgresql"),
    not(feature = "mysql")
))]
fn without_feature(test: &str, feature: &str) {
    assert!(
        !backends_required(),
        "{test}: TOOZ_REQUIRE_BACKENDS=1 but tooz-cli was built without the {feature} feature (cargo test -p tooz-cli --features {feature})"
    );
    eprintln!("SKIPPED {test}: built without the {feature} feature");
}

fn partition_table(test: &str, env: &str, timeout: u32) {
    let Some(url) = backend_url(test, env) else {
        return;
    };
    // A grace longer than the loss margin is allowed, with a warning.
    let s = Scratch::new(test);
    let direct = with_option(&url, &format!("timeout={timeout}"));
    let o = s.run([
        "--url",
        &direct,
        "lock",
        "cli-grace-warning",
        "--grace",
        "30",
        "--",
        "true",
    ]);
    assert_ok(&o);
    assert!(
        stderr(&o).contains("may outlive the lock"),
        "{}",
        stderr(&o)
    );
    for leader in [false, true] {
        let run = partition_case(test, &url, timeout, leader);
        eprintln!(
            "{test} ({}, timeout={timeout}): waiter started {:.3}s after the partition, holder's command got SIGTERM at {:.3}s and was gone at {:.3}s; both running at once: {:.3}s",
            if leader { "leader" } else { "lock" },
            run.waiter_started,
            run.holder_sigterm,
            run.holder_stopped,
            run.overlap(),
        );
        assert!(
            run.overlap() <= 0.0,
            "{test}: both commands ran at once for {:.3}s: {run:?}",
            run.overlap()
        );
        assert!(run.holder_sigterm <= run.holder_stopped + 0.05, "{run:?}");
    }
}

#[test]
fn partition_redis() {
    partition_table("partition_redis", "TOOZ_TEST_REDIS_URL", 2);
}

#[cfg(feature = "etcd")]
#[test]
fn partition_etcd() {
    partition_table("partition_etcd", "TOOZ_TEST_ETCD_URL", 3);
}

#[cfg(not(feature = "etcd"))]
#[test]
fn partition_etcd() {
    without_feature("partition_etcd", "etcd");
}

#[test]
fn partition_zookeeper() {
    partition_table("partition_zookeeper", "TOOZ_TEST_ZOOKEEPER_URL", 4);
}

/// Consul: `timeout` is the per-request timeout there; the session keeps its default
/// `ttl` (15 s) and lock delay (15 s), so the waiter gets the lock up to 2 × 15 + 15 s
/// after the partition, well after the holder's command was stopped.
#[test]
fn partition_consul() {
    partition_table("partition_consul", "TOOZ_TEST_CONSUL_URL", 3);
}

#[test]
fn partition_memcached() {
    partition_table("partition_memcached", "TOOZ_TEST_MEMCACHED_URL", 2);
}

/// PostgreSQL: the session connection holds the advisory lock; the server ends a
/// session idle for `timeout` (`idle_session_timeout`, PostgreSQL ≥ 14), which frees it.
#[cfg(feature = "postgresql")]
#[test]
fn partition_postgresql() {
    partition_table("partition_postgresql", "TOOZ_TEST_POSTGRESQL_URL", 3);
}

#[cfg(not(feature = "postgresql"))]
#[test]
fn partition_postgresql() {
    without_feature("partition_postgresql", "postgresql");
}

/// MySQL/MariaDB: the session connection holds the `GET_LOCK` name; the server ends
/// a session idle for `timeout` (`wait_timeout`), which frees it.
#[cfg(feature = "mysql")]
#[test]
fn partition_mysql() {
    partition_table("partition_mysql", "TOOZ_TEST_MYSQL_URL", 3);
}

#[cfg(not(feature = "mysql"))]
#[test]
fn partition_mysql() {
    without_feature("partition_mysql", "mysql");
}
