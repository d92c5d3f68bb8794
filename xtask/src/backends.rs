//! `cargo xtask backends up|down|status [--only NAME...]`: the test-server harness.
//!
//! `up` installs what is missing (Debian packages with apt-get; etcd 3.5 from trixie and Consul
//! from bullseye through a private apt configuration whose mirror is read from the system's own
//! apt sources), then starts every selected server on 127.0.0.1 in a data directory this harness
//! owns, waits until each one answers its protocol, records its pid (+ `/proc` start time) and
//! writes the URLs to an env file the tests read (see [`env_file_path`] and [`read_env`]).
//! `down` stops only what `up` started (recorded pid whose start time still matches; never by
//! name), in reverse order. `status` prints a table.
//!
//! Layout (`STATE` = `<root>/target/backends`, always):
//! * `STATE/state.json` pids, start times and the data root; `STATE/lock` serialises commands;
//! * `STATE/env` the URLs (`TOOZ_TEST_*_URL=...`), `STATE/logs/<server>.log` server output;
//! * data root: `STATE` itself when the `postgres` and `mysql` users can traverse its path,
//!   otherwise `/tmp/tooz-backends`; it holds `redis/`, `mariadb/`, `postgres/`, `etcd-3.5/`,
//!   `zookeeper/` and `consul/`;
//! * `/var/cache/tooz-backends` (or `$TOOZ_BACKENDS_CACHE`): private apt state, the downloaded
//!   `.deb`s of etcd and Consul, and their unpacked trees under `opt/` (survives `cargo clean`).
//!
//! Settings: `TOOZ_BACKENDS_TIMEOUT` (seconds each server may take to come up, default 60),
//! `TOOZ_BACKENDS_CACHE` (see above). Nothing here reads or sets `ETCD_*`/`ETCDCTL_*`
//! variables: etcd treats every one of them as a flag, so they are removed from the
//! environment of every process this harness starts.
//!
//! Only `std`, `anyhow` and `serde_json` are used, and no `unsafe`.

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Map, Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

mod cluster;

// ---------------------------------------------------------------------------------------------
// Public surface
// ---------------------------------------------------------------------------------------------

fn root() -> PathBuf {
    crate::process::workspace_root()
}

/// The env file `up` writes: one `TOOZ_TEST_<NAME>_URL=<url>` line per running server.
pub fn env_file_path(root: &Path) -> PathBuf {
    state_dir(root).join("env")
}

/// The `(name, value)` pairs of the env file, in file order. A missing file (nothing was
/// ever brought up, or the target directory was cleaned) gives an empty list.
pub fn read_env(root: &Path) -> Result<Vec<(String, String)>> {
    let path = env_file_path(root);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let mut out = Vec::new();
    for (no, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let (k, v) = line.split_once('=').ok_or_else(|| {
            anyhow!(
                "{}:{}: expected NAME=VALUE, found {line:?}",
                path.display(),
                no + 1
            )
        })?;
        let v = v.trim();
        let v = v
            .strip_prefix('"')
            .and_then(|x| x.strip_suffix('"'))
            .or_else(|| v.strip_prefix('\'').and_then(|x| x.strip_suffix('\'')))
            .unwrap_or(v);
        out.push((k.trim().to_string(), v.to_string()));
    }
    Ok(out)
}

/// The `ci` step `cluster` (see the `cluster` module).
pub(crate) fn cluster_ci() -> Result<()> {
    cluster::ci()
}

/// Entry point: `args` is what follows `backends` on the command line.
pub fn main(args: &[String]) -> Result<()> {
    let Some((cmd, rest)) = args.split_first() else {
        print!("{USAGE}");
        bail!("backends: missing command (up, down or status)");
    };
    match cmd.as_str() {
        "-h" | "--help" | "help" => {
            print!("{USAGE}");
            Ok(())
        }
        "up" => up(&parse_sel(rest)?),
        "down" => down(&parse_sel(rest)?),
        "status" => status(&parse_sel(rest)?),
        "node" => cluster::node_main(rest),
        other => {
            print!("{USAGE}");
            bail!("backends: unknown command {other:?} (expected up, down, status or node)")
        }
    }
}

const USAGE: &str = "\
usage: cargo xtask backends up|down|status [--only NAME...] [--cluster|--cluster-only]
       cargo xtask backends node kill NAME | start NAME [--wipe] | leader GROUP | list

  up      install what is missing, start the servers on 127.0.0.1, wait until they answer,
          write their URLs to target/backends/env (idempotent)
  down    stop the servers `up` started (reverse order; only recorded pids)
  status  table of name, pid, port, state and URL

  NAME    redis, memcached, mariadb (mysql), postgresql (postgres), etcd, zookeeper (zk),
          consul; several may follow one --only, or be comma-separated. Default: all seven.

  --cluster       also the clusters on loopback: 3-member etcd (etcd-1..3, clients
                  23791-23793), 3-server ZooKeeper (zookeeper-1..3, 21811-21813), Redis
                  primary + replica (redis-1/2, 16379/16380) and three Sentinels
                  (sentinel-1..3, 26379-26381, master `tooz`); their URLs go to the env
                  file as TOOZ_CLUSTER_{ETCD,ZOOKEEPER,REDIS}_URL. With `up --cluster`, a
                  single server whose ports another process (not ours) holds is left
                  alone with a note instead of failing the command (e.g. in a second
                  worktree while the main one's servers run). `down --cluster` and
                  `status --cluster` without --only: the clusters only.
  --cluster-only  the clusters and no single server (up, down, status)
  node ...        kill/start one node, print a cluster's leader, list the nodes
                  (`backends node --help`)
";

/// What `up`/`down`/`status` act on.
#[derive(Debug, PartialEq, Eq)]
struct Sel {
    kinds: Vec<Kind>,
    cluster: bool,
    /// `--only` was given.
    only: bool,
}

impl Sel {
    /// `down`/`status`: `--cluster` without `--only` means the clusters alone; no option at
    /// all means everything.
    fn singles_and_cluster(&self) -> (&[Kind], bool) {
        if self.cluster && !self.only {
            (&[], true)
        } else {
            (&self.kinds, self.cluster || !self.only)
        }
    }
}

fn parse_sel(rest: &[String]) -> Result<Sel> {
    let mut cluster = false;
    let mut cluster_only = false;
    let mut others = Vec::new();
    for a in rest {
        match a.as_str() {
            "--cluster" => cluster = true,
            "--cluster-only" => cluster_only = true,
            _ => others.push(a.clone()),
        }
    }
    let has_only = others
        .iter()
        .any(|a| a == "--only" || a.starts_with("--only="));
    if cluster_only && has_only {
        bail!("backends: --cluster-only excludes --only (use --cluster --only NAME)");
    }
    let kinds = parse_only(&others)?;
    Ok(Sel {
        kinds: if cluster_only { Vec::new() } else { kinds },
        cluster: cluster || cluster_only,
        only: has_only,
    })
}

// ---------------------------------------------------------------------------------------------
// The servers
// ---------------------------------------------------------------------------------------------

const HOST: &str = "127.0.0.1";
const TMP_DATA_ROOT: &str = "/tmp/tooz-backends";
const DEFAULT_CACHE: &str = "/var/cache/tooz-backends";
const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";
const ETCD_SUITE: &str = "trixie";
const CONSUL_SUITE: &str = "bullseye";
const ETCD_OPT: &str = "etcd-3.5";
const CONSUL_OPT: &str = "consul";
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
const APT_TIMEOUT: Duration = Duration::from_secs(20 * 60);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Redis,
    Memcached,
    Mariadb,
    Postgresql,
    Etcd,
    Zookeeper,
    Consul,
}

/// Start order; `down` uses the reverse.
const ALL: [Kind; 7] = [
    Kind::Redis,
    Kind::Memcached,
    Kind::Mariadb,
    Kind::Postgresql,
    Kind::Etcd,
    Kind::Zookeeper,
    Kind::Consul,
];

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Redis => "redis",
            Kind::Memcached => "memcached",
            Kind::Mariadb => "mariadb",
            Kind::Postgresql => "postgresql",
            Kind::Etcd => "etcd",
            Kind::Zookeeper => "zookeeper",
            Kind::Consul => "consul",
        }
    }

    fn parse(s: &str) -> Option<Kind> {
        Some(match s.to_ascii_lowercase().as_str() {
            "redis" => Kind::Redis,
            "memcached" | "memcache" => Kind::Memcached,
            "mariadb" | "mysql" => Kind::Mariadb,
            "postgresql" | "postgres" | "pg" => Kind::Postgresql,
            "etcd" | "etcd3" => Kind::Etcd,
            "zookeeper" | "zk" => Kind::Zookeeper,
            "consul" => Kind::Consul,
            _ => return None,
        })
    }

    fn port(self) -> u16 {
        match self {
            Kind::Redis => 6379,
            Kind::Memcached => 11211,
            Kind::Mariadb => 3306,
            Kind::Postgresql => 5432,
            Kind::Etcd => 2379,
            Kind::Zookeeper => 2181,
            Kind::Consul => 8500,
        }
    }

    /// Other TCP ports the server opens (all must be free before it starts).
    fn extra_tcp(self) -> &'static [u16] {
        match self {
            Kind::Etcd => &[2380],
            // `consul agent -dev` always opens server RPC, serf LAN/WAN, gRPC and DNS.
            Kind::Consul => &[8300, 8301, 8302, 8502, 8600],
            _ => &[],
        }
    }

    fn extra_udp(self) -> &'static [u16] {
        match self {
            Kind::Consul => &[8301, 8302, 8600],
            _ => &[],
        }
    }

    fn env_key(self) -> &'static str {
        match self {
            Kind::Redis => "TOOZ_TEST_REDIS_URL",
            Kind::Memcached => "TOOZ_TEST_MEMCACHED_URL",
            Kind::Mariadb => "TOOZ_TEST_MYSQL_URL",
            Kind::Postgresql => "TOOZ_TEST_POSTGRESQL_URL",
            Kind::Etcd => "TOOZ_TEST_ETCD_URL",
            Kind::Zookeeper => "TOOZ_TEST_ZOOKEEPER_URL",
            Kind::Consul => "TOOZ_TEST_CONSUL_URL",
        }
    }

    fn url(self) -> String {
        let p = self.port();
        match self {
            Kind::Redis => format!("redis://{HOST}:{p}"),
            Kind::Memcached => format!("memcached://{HOST}:{p}"),
            Kind::Mariadb => format!("mysql://tooz:tooz@{HOST}:{p}/tooz"),
            Kind::Postgresql => format!("postgresql://tooz:tooz@{HOST}:{p}/tooz"),
            Kind::Etcd => format!("etcd3+http://{HOST}:{p}"),
            Kind::Zookeeper => format!("zookeeper://{HOST}:{p}"),
            Kind::Consul => format!("consul://{HOST}:{p}"),
        }
    }

    /// Debian packages from the system's own suites (PostgreSQL is handled apart: any
    /// installed major version will do).
    fn apt_packages(self) -> &'static [&'static str] {
        match self {
            Kind::Redis => &["redis-server", "redis-tools"],
            Kind::Memcached => &["memcached"],
            Kind::Mariadb => &["mariadb-server", "mariadb-client"],
            Kind::Postgresql => &["postgresql"],
            Kind::Zookeeper => &["zookeeper"],
            Kind::Etcd | Kind::Consul => &[],
        }
    }

    /// Postgres: SIGINT is "fast shutdown"; SIGTERM would wait for clients to disconnect.
    fn stop_signal(self) -> &'static str {
        match self {
            Kind::Postgresql => "INT",
            _ => "TERM",
        }
    }
}

fn parse_only(rest: &[String]) -> Result<Vec<Kind>> {
    let mut chosen = BTreeSet::new();
    let mut seen_only = false;
    let mut in_only = false;
    let add = |list: &str, chosen: &mut BTreeSet<Kind>| -> Result<()> {
        for n in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let k = Kind::parse(n).ok_or_else(|| {
                let names: Vec<&str> = ALL.iter().map(|k| k.name()).collect();
                anyhow!(
                    "backends: unknown server {n:?} (known: {})",
                    names.join(", ")
                )
            })?;
            chosen.insert(k);
        }
        Ok(())
    };
    for a in rest {
        if a == "--only" {
            seen_only = true;
            in_only = true;
        } else if let Some(v) = a.strip_prefix("--only=") {
            seen_only = true;
            in_only = true;
            add(v, &mut chosen)?;
        } else if a.starts_with('-') {
            bail!("backends: unknown option {a:?}\n{USAGE}");
        } else if in_only {
            add(a, &mut chosen)?;
        } else {
            bail!("backends: unexpected argument {a:?} (server names follow --only)\n{USAGE}");
        }
    }
    if seen_only && chosen.is_empty() {
        bail!("backends: --only needs at least one server name");
    }
    if !seen_only {
        return Ok(ALL.to_vec());
    }
    Ok(chosen.into_iter().collect())
}

// ---------------------------------------------------------------------------------------------
// Paths, state, env file
// ---------------------------------------------------------------------------------------------

fn state_dir(root: &Path) -> PathBuf {
    root.join("target").join("backends")
}

fn cache_dir() -> PathBuf {
    std::env::var_os("TOOZ_BACKENDS_CACHE")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CACHE))
}

fn wait_timeout() -> Duration {
    let secs = std::env::var("TOOZ_BACKENDS_TIMEOUT")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|s| *s > 0)
        .unwrap_or(60);
    Duration::from_secs(secs)
}

#[derive(Clone, Debug)]
struct Rec {
    pid: u32,
    start_ticks: u64,
    boot_id: String,
    port: u16,
    started_unix: u64,
    log: PathBuf,
}

#[derive(Debug, Default)]
struct State {
    data_root: Option<PathBuf>,
    servers: BTreeMap<String, Rec>,
}

impl State {
    fn path(sd: &Path) -> PathBuf {
        sd.join("state.json")
    }

    fn load(sd: &Path) -> Result<State> {
        let path = State::path(sd);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(State::default()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let v: Value = serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is corrupt; check that none of the servers it lists still runs, then remove it",
                path.display()
            )
        })?;
        let mut st = State {
            data_root: v
                .get("data_root")
                .and_then(Value::as_str)
                .map(PathBuf::from),
            servers: BTreeMap::new(),
        };
        if let Some(m) = v.get("servers").and_then(Value::as_object) {
            for (name, r) in m {
                let rec = (|| {
                    Some(Rec {
                        pid: u32::try_from(r.get("pid")?.as_u64()?).ok()?,
                        start_ticks: r.get("start_ticks")?.as_u64()?,
                        boot_id: r.get("boot_id")?.as_str()?.to_string(),
                        port: u16::try_from(r.get("port")?.as_u64()?).ok()?,
                        started_unix: r.get("started_unix")?.as_u64()?,
                        log: PathBuf::from(r.get("log")?.as_str()?),
                    })
                })()
                .ok_or_else(|| anyhow!("{}: bad record for {name}", path.display()))?;
                st.servers.insert(name.clone(), rec);
            }
        }
        Ok(st)
    }

    fn save(&self, sd: &Path) -> Result<()> {
        let mut servers = Map::new();
        for (name, r) in &self.servers {
            servers.insert(
                name.clone(),
                json!({
                    "pid": r.pid,
                    "start_ticks": r.start_ticks,
                    "boot_id": r.boot_id,
                    "port": r.port,
                    "started_unix": r.started_unix,
                    "log": r.log.to_string_lossy(),
                }),
            );
        }
        let v = json!({
            "data_root": self.data_root.as_ref().map(|p| p.to_string_lossy().into_owned()),
            "servers": servers,
        });
        let text = serde_json::to_string_pretty(&v)? + "\n";
        write_atomic(&State::path(sd), text.as_bytes())
    }
}

fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, data).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

fn write_env(sd: &Path, st: &State) -> Result<()> {
    let mut s = String::from(
        "# Written by `cargo xtask backends up|down`: the URLs of the test servers it started\n\
         # and that are running. Rewritten on every up/down; do not edit.\n",
    );
    for k in ALL {
        if st.servers.get(k.name()).is_some_and(rec_alive) {
            let _ = writeln!(s, "{}={}", k.env_key(), k.url());
        }
    }
    cluster::env_lines(st, &mut s);
    write_atomic(&sd.join("env"), s.as_bytes())
}

/// Holds `STATE/lock` for the duration of an `up` or `down`.
fn lock_state(sd: &Path) -> Result<File> {
    let path = sd.join("lock");
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match f.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            println!("backends: waiting for another `backends` command to finish ...");
            f.lock()
                .with_context(|| format!("locking {}", path.display()))?;
        }
        Err(fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("locking {}", path.display()));
        }
    }
    Ok(f)
}

fn ensure_dir(p: &Path, mode: u32) -> Result<()> {
    fs::create_dir_all(p).with_context(|| format!("creating {}", p.display()))?;
    fs::set_permissions(p, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {mode:o} {}", p.display()))
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// Process bookkeeping (/proc)
// ---------------------------------------------------------------------------------------------

struct ProcStat {
    state: char,
    session: i64,
    start_ticks: u64,
}

fn proc_stat(pid: u32) -> Option<ProcStat> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    let rest = s.get(s.rfind(')')? + 1..)?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // f[0] is field 3 (state), f[3] field 6 (session), f[19] field 22 (starttime).
    Some(ProcStat {
        state: f.first()?.chars().next()?,
        session: f.get(3)?.parse().ok()?,
        start_ticks: f.get(19)?.parse().ok()?,
    })
}

fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Alive = same boot, same pid *and* same start time, and not a zombie. A recycled pid or a
/// reboot therefore never counts as "our" server.
fn rec_alive(r: &Rec) -> bool {
    if r.boot_id != boot_id() {
        return false;
    }
    match proc_stat(r.pid) {
        Some(ps) => ps.start_ticks == r.start_ticks && !matches!(ps.state, 'Z' | 'X' | 'x'),
        None => false,
    }
}

fn proc_comm(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into())
}

fn send_signal(pid: u32, sig: &str) -> Result<()> {
    let out = run(
        Command::new("kill").args(["-s", sig, "--", &pid.to_string()]),
        None,
        Duration::from_secs(5),
    )?;
    if !out.status.success() {
        bail!("kill -s {sig} {pid} failed: {}", out.text());
    }
    Ok(())
}

fn euid() -> Option<u32> {
    let s = fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

fn require_root(what: &str) -> Result<()> {
    if euid() != Some(0) {
        bail!(
            "backends {what} must run as root (it installs packages with apt-get, drops privileges \
             to the postgres/mysql/memcache users and signals their processes)"
        );
    }
    Ok(())
}

/// `(uid, gid)` of a system user, `None` if it does not exist.
fn lookup_user(name: &str) -> Option<(u32, u32)> {
    let out = run(
        Command::new("getent").args(["passwd", name]),
        None,
        Duration::from_secs(5),
    )
    .ok()?;
    if !out.status.success() {
        return None;
    }
    let f: Vec<&str> = out.stdout.trim().split(':').collect();
    Some((f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?))
}

fn chown_to(p: &Path, user: &str) -> Result<()> {
    let (uid, gid) =
        lookup_user(user).ok_or_else(|| anyhow!("system user {user} does not exist"))?;
    std::os::unix::fs::chown(p, Some(uid), Some(gid))
        .with_context(|| format!("chown {user} {}", p.display()))
}

// ---------------------------------------------------------------------------------------------
// Running commands
// ---------------------------------------------------------------------------------------------

/// Removes variables that would change what a server or client does: etcd/etcdctl treat
/// every `ETCD_*`/`ETCDCTL_*` as a flag, libpq reads `PG*`, the MariaDB client `MYSQL_*`.
fn sanitize_env(cmd: &mut Command) {
    for (k, _) in std::env::vars_os() {
        let ks = k.to_string_lossy();
        if ["ETCD_", "ETCDCTL_", "PG", "MYSQL_", "MARIADB_"]
            .iter()
            .any(|p| ks.starts_with(p))
        {
            cmd.env_remove(&k);
        }
    }
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

struct Out {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Out {
    fn text(&self) -> String {
        let mut t = self.stdout.trim().to_string();
        let e = self.stderr.trim();
        if !e.is_empty() {
            if !t.is_empty() {
                t.push('\n');
            }
            t.push_str(e);
        }
        t
    }
}

/// Runs a short command with captured output, bounded by `timeout`.
fn run(cmd: &mut Command, input: Option<&str>, timeout: Duration) -> Result<Out> {
    sanitize_env(cmd);
    let what = describe(cmd);
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("could not run `{what}`"))?;
    if let (Some(text), Some(mut sin)) = (input, child.stdin.take()) {
        let _ = sin.write_all(text.as_bytes());
    }
    let reader = |s: Option<Box<dyn Read + Send>>| {
        thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut s) = s {
                let _ = s.read_to_end(&mut buf);
            }
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let out_t = reader(
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let err_t = reader(
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("`{what}` did not finish within {} s", timeout.as_secs());
        }
        thread::sleep(Duration::from_millis(10));
    };
    let stdout = out_t.join().unwrap_or_default();
    let stderr = err_t.join().unwrap_or_default();
    Ok(Out {
        status,
        stdout,
        stderr,
    })
}

fn log_offset(log: &Path) -> u64 {
    fs::metadata(log).map(|m| m.len()).unwrap_or(0)
}

/// The last `n` lines written to `log` after `offset`, indented, for error messages.
fn log_tail(log: &Path, offset: u64, n: usize) -> String {
    let Ok(bytes) = fs::read(log) else {
        return format!("    (no log at {})", log.display());
    };
    let start = usize::try_from(offset).unwrap_or(0);
    let slice = if start <= bytes.len() {
        &bytes[start..]
    } else {
        &bytes[..]
    };
    let text = String::from_utf8_lossy(slice);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.is_empty() {
        return "    (log is empty)".into();
    }
    let from = lines.len().saturating_sub(n);
    lines[from..]
        .iter()
        .map(|l| format!("    | {}\n", redact_hosts(l)))
        .collect::<String>()
        .trim_end()
        .to_string()
}

/// Replaces the host of every non-loopback `scheme://host` in `line` with `<host>`: apt's
/// output names the mirror, and no message of ours should.
fn redact_hosts(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while let Some(i) = rest.find("://") {
        out.push_str(&rest[..i + 3]);
        rest = &rest[i + 3..];
        let end = rest
            .find(['/', ' ', '"', '\'', ']', ')'])
            .unwrap_or(rest.len());
        let host = &rest[..end];
        if host.starts_with("127.0.0.1") || host.starts_with("localhost") || host.is_empty() {
            out.push_str(host);
        } else {
            out.push_str("<host>");
        }
        rest = &rest[end..];
    }
    out.push_str(rest);
    out
}

/// Runs a (possibly long) command with its output appended to `log`.
fn run_logged(cmd: &mut Command, log: &Path, timeout: Duration) -> Result<()> {
    sanitize_env(cmd);
    let what = describe(cmd);
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    writeln!(f, "\n=== backends {}: $ {what}", now_unix())?;
    let offset = log_offset(log);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(f.try_clone()?)
        .stderr(f)
        .spawn()
        .with_context(|| format!("could not run `{what}`"))?;
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "`{what}` did not finish within {} s; last lines of {}:\n{}",
                timeout.as_secs(),
                log.display(),
                log_tail(log, offset, 20)
            );
        }
        thread::sleep(Duration::from_millis(20));
    };
    if !status.success() {
        bail!(
            "`{what}` failed ({status}); last lines of {}:\n{}",
            log.display(),
            log_tail(log, offset, 20)
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Ports
// ---------------------------------------------------------------------------------------------

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Who holds a listening TCP (or bound UDP) socket on `port`: "pid 123 (redis-server)".
fn port_holder(port: u16, udp: bool) -> Option<String> {
    let files: &[&str] = if udp {
        &["/proc/net/udp", "/proc/net/udp6"]
    } else {
        &["/proc/net/tcp", "/proc/net/tcp6"]
    };
    let mut inodes = BTreeSet::new();
    for f in files {
        let Ok(text) = fs::read_to_string(f) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let c: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(st), Some(inode)) = (c.get(1), c.get(3), c.get(9)) else {
                continue;
            };
            let p = local
                .rsplit(':')
                .next()
                .and_then(|h| u16::from_str_radix(h, 16).ok());
            let bound = if udp { *st == "07" } else { *st == "0A" };
            if p == Some(port) && bound && *inode != "0" {
                inodes.insert(format!("socket:[{inode}]"));
            }
        }
    }
    if inodes.is_empty() {
        return None;
    }
    let procs = fs::read_dir("/proc").ok()?;
    for e in procs.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = fs::read_dir(e.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(target) = fs::read_link(fd.path())
                && inodes.contains(target.to_string_lossy().as_ref())
            {
                return Some(format!("pid {pid} ({})", proc_comm(pid)));
            }
        }
    }
    Some("a process this harness cannot see".into())
}

/// Ports of `k` that something else already holds, described for an error message.
fn port_conflicts(k: Kind) -> Vec<String> {
    let mut bad = Vec::new();
    for p in std::iter::once(k.port()).chain(k.extra_tcp().iter().copied()) {
        if TcpListener::bind(addr(p)).is_err() {
            let who = port_holder(p, false).unwrap_or_else(|| "an unknown process".into());
            bad.push(format!("tcp {p} (held by {who})"));
        }
    }
    for &p in k.extra_udp() {
        if UdpSocket::bind(addr(p)).is_err() {
            let who = port_holder(p, true).unwrap_or_else(|| "an unknown process".into());
            bad.push(format!("udp {p} (held by {who})"));
        }
    }
    bad
}

fn conflict_message(k: Kind, bad: &[String]) -> String {
    format!(
        "cannot start {}: port(s) already in use by something this harness did not start: {}; \
         stop it or free the port, then run `backends up` again",
        k.name(),
        bad.join(", ")
    )
}

// ---------------------------------------------------------------------------------------------
// Protocol probes (one attempt each; the callers retry until a deadline)
// ---------------------------------------------------------------------------------------------

const PROBE_IO: Duration = Duration::from_secs(2);

fn connect(port: u16) -> Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr(port), PROBE_IO)
        .with_context(|| format!("connect to {HOST}:{port}"))?;
    s.set_read_timeout(Some(PROBE_IO))?;
    s.set_write_timeout(Some(PROBE_IO))?;
    Ok(s)
}

/// Sends `req`, reads until a newline, EOF or `min` bytes.
fn exchange(port: u16, req: &[u8], min: usize) -> Result<String> {
    let mut s = connect(port)?;
    s.write_all(req)?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 512];
    loop {
        let n = s
            .read(&mut chunk)
            .with_context(|| format!("reading from {HOST}:{port}"))?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.contains(&b'\n') || buf.len() >= min {
            break;
        }
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

fn http_get(port: u16, path: &str) -> Result<(u16, String)> {
    let mut s = connect(port)?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {HOST}:{port}\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)
        .with_context(|| format!("reading HTTP answer from {HOST}:{port}"))?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((text.as_str(), ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| {
            anyhow!(
                "not an HTTP answer: {:?}",
                head.lines().next().unwrap_or("")
            )
        })?;
    Ok((code, body.to_string()))
}

fn probe(k: Kind, ctx: &Ctx) -> Result<()> {
    let port = k.port();
    match k {
        Kind::Redis => {
            let r = exchange(port, b"PING\r\n", 64)?;
            if !r.starts_with("+PONG") {
                bail!("PING answered {:?}", r.trim());
            }
        }
        Kind::Memcached => {
            let r = exchange(port, b"version\r\n", 128)?;
            if !r.starts_with("VERSION ") {
                bail!("version answered {:?}", r.trim());
            }
        }
        Kind::Zookeeper => {
            let r = exchange(port, b"ruok", 4)?;
            if r.trim() != "imok" {
                bail!(
                    "ruok answered {:?} (is ruok in 4lw.commands.whitelist?)",
                    r.trim()
                );
            }
        }
        Kind::Etcd => {
            let (code, body) = http_get(port, "/health")?;
            if code != 200 || !body.replace(' ', "").contains("\"health\":\"true\"") {
                bail!("GET /health answered {code} {:?}", body.trim());
            }
        }
        Kind::Consul => {
            let (code, body) = http_get(port, "/v1/status/leader")?;
            let b = body.trim();
            if code != 200 || b.is_empty() || b == "\"\"" {
                bail!("GET /v1/status/leader answered {code} {b:?} (no leader yet)");
            }
        }
        Kind::Mariadb => {
            // Over the socket as root (unix_socket auth). Bare TCP probes are no good here:
            // before `tooz@%` exists the greeting is error 1130 "Host '127.0.0.1' is not
            // allowed" (--skip-name-resolve), and every unauthenticated connection is logged
            // as aborted and counts toward max_connect_errors.
            let out = run(
                Command::new(mariadb_client()?)
                    .arg("--no-defaults")
                    .arg(format!("--socket={}", ctx.mariadb_socket().display()))
                    .args(["-uroot", "--batch", "--skip-column-names", "-e", "select 1"]),
                None,
                Duration::from_secs(5),
            )?;
            if !out.status.success() || out.stdout.trim() != "1" {
                bail!("select 1 as root over the socket: {}", out.text());
            }
        }
        Kind::Postgresql => {
            drop(connect(port)?);
            let out = run(
                Command::new(ctx.pg_tool("pg_isready")).args([
                    "-q",
                    "-h",
                    HOST,
                    "-p",
                    &port.to_string(),
                    "-t",
                    "2",
                ]),
                None,
                Duration::from_secs(5),
            )?;
            if !out.status.success() {
                bail!("pg_isready: {} {}", out.status, out.text());
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Installation
// ---------------------------------------------------------------------------------------------

/// Leaves an existing `/usr/sbin/policy-rc.d` alone; otherwise installs one that forbids
/// package scripts to start daemons (they would take our ports) and removes it on drop.
struct PolicyRcGuard {
    created: bool,
}

impl PolicyRcGuard {
    fn install() -> Result<PolicyRcGuard> {
        let p = Path::new(POLICY_RC_D);
        if p.exists() {
            return Ok(PolicyRcGuard { created: false });
        }
        fs::write(p, "#!/bin/sh\n# Temporary, from `cargo xtask backends up`: no daemon starts during apt-get.\nexit 101\n")
            .with_context(|| format!("writing {POLICY_RC_D}"))?;
        fs::set_permissions(p, fs::Permissions::from_mode(0o755))?;
        println!(
            "backends: installed a temporary {POLICY_RC_D} so package scripts start no daemons"
        );
        Ok(PolicyRcGuard { created: true })
    }
}

impl Drop for PolicyRcGuard {
    fn drop(&mut self) {
        if self.created {
            let _ = fs::remove_file(POLICY_RC_D);
        }
    }
}

fn dpkg_installed(pkgs: &[&str]) -> BTreeSet<String> {
    let mut cmd = Command::new("dpkg-query");
    cmd.args(["-W", "-f=${Package}\t${db:Status-Status}\n"])
        .args(pkgs);
    let mut set = BTreeSet::new();
    if let Ok(out) = run(&mut cmd, None, Duration::from_secs(30)) {
        for line in out.stdout.lines() {
            if let Some((p, s)) = line.split_once('\t')
                && s.trim() == "installed"
            {
                set.insert(p.split(':').next().unwrap_or(p).to_string());
            }
        }
    }
    set
}

/// The newest `/usr/lib/postgresql/<major>/bin` holding `postgres` and `initdb`.
fn pg_bin_dir() -> Option<PathBuf> {
    let mut best: Option<(u32, PathBuf)> = None;
    for e in fs::read_dir("/usr/lib/postgresql").ok()?.flatten() {
        let Some(v) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let bin = e.path().join("bin");
        if bin.join("postgres").exists()
            && bin.join("initdb").exists()
            && best.as_ref().is_none_or(|(b, _)| v > *b)
        {
            best = Some((v, bin));
        }
    }
    best.map(|(_, b)| b)
}

fn apt_env(cmd: &mut Command) -> &mut Command {
    cmd.env("DEBIAN_FRONTEND", "noninteractive")
        .env("APT_LISTCHANGES_FRONTEND", "none")
        .env("LC_ALL", "C")
}

/// System packages: one `apt-get update` + one `apt-get install`, only when something is missing.
fn ensure_packages(to_start: &[Kind], selected: &[Kind], logs: &Path) -> Result<()> {
    let mut wanted: Vec<&str> = Vec::new();
    for &k in to_start {
        if k == Kind::Postgresql {
            if pg_bin_dir().is_none() {
                wanted.push("postgresql");
            }
        } else {
            wanted.extend(k.apt_packages());
        }
    }
    // protoc and the protobuf well-known types are needed by the etcd client build; they
    // ride along with any apt step, and are installed on their own when etcd is selected.
    const PROTOBUF: [&str; 2] = ["protobuf-compiler", "libprotobuf-dev"];
    let mut probe_list = wanted.clone();
    probe_list.extend(PROTOBUF);
    let installed = dpkg_installed(&probe_list);
    let mut missing: Vec<&str> = wanted
        .iter()
        .copied()
        .filter(|p| !installed.contains(*p))
        .collect();
    for pkg in PROTOBUF {
        if !installed.contains(pkg) && (!missing.is_empty() || selected.contains(&Kind::Etcd)) {
            missing.push(pkg);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let log = logs.join("apt.log");
    let _guard = PolicyRcGuard::install()?;
    println!(
        "backends: installing {} ... (log: {})",
        missing.join(" "),
        log.display()
    );
    let t = Instant::now();
    run_logged(
        apt_env(Command::new("apt-get").args(["update", "-q"])),
        &log,
        APT_TIMEOUT,
    )
    .context("backends: apt-get update failed")?;
    let t_update = t.elapsed();
    run_logged(
        apt_env(Command::new("apt-get").args([
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
            "-o",
            "Dpkg::Options::=--force-confdef",
            "-o",
            "Dpkg::Options::=--force-confold",
        ]))
        .args(&missing),
        &log,
        APT_TIMEOUT,
    )
    .with_context(|| format!("backends: apt-get install {} failed", missing.join(" ")))?;
    println!(
        "backends: installed {} (apt-get update {:.1} s, install {:.1} s)",
        missing.join(" "),
        t_update.as_secs_f64(),
        (t.elapsed() - t_update).as_secs_f64()
    );
    Ok(())
}

/// The mirror URI of the system's own Debian suite, read from its apt sources.
fn system_mirror() -> Result<String> {
    let codename = fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                l.strip_prefix("VERSION_CODENAME=")
                    .map(|v| v.trim_matches('"').to_string())
            })
        })
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| "bookworm".into());
    let mut deb822: Vec<PathBuf> = Vec::new();
    let mut oneline: Vec<PathBuf> = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(rd) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut v: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
        v.sort();
        for p in v {
            match p.extension().and_then(|e| e.to_str()) {
                Some("sources") => deb822.push(p),
                Some("list") => oneline.push(p),
                _ => {}
            }
        }
    }
    // (uri, exact suite match)
    let mut candidates: Vec<(String, bool)> = Vec::new();
    for p in &deb822 {
        let Ok(text) = fs::read_to_string(p) else {
            continue;
        };
        let mut fields: BTreeMap<String, String> = BTreeMap::new();
        let mut last_key = String::new();
        let mut flush = |fields: &mut BTreeMap<String, String>| {
            let enabled = fields
                .get("enabled")
                .is_none_or(|v| !v.trim().eq_ignore_ascii_case("no"));
            let is_deb = fields
                .get("types")
                .is_some_and(|v| v.split_whitespace().any(|t| t == "deb"));
            if enabled
                && is_deb
                && let (Some(uris), Some(suites)) = (fields.get("uris"), fields.get("suites"))
            {
                let exact = suites.split_whitespace().any(|s| s == codename);
                let related = suites
                    .split_whitespace()
                    .any(|s| s.starts_with(&codename) && !s.contains("security"));
                if let Some(uri) = uris.split_whitespace().next()
                    && (exact || related)
                {
                    candidates.push((uri.to_string(), exact));
                }
            }
            fields.clear();
        };
        for line in text.lines() {
            if line.trim_start().starts_with('#') {
                continue;
            }
            if line.trim().is_empty() {
                flush(&mut fields);
                continue;
            }
            if line.starts_with([' ', '\t']) {
                if let Some(v) = fields.get_mut(&last_key) {
                    v.push(' ');
                    v.push_str(line.trim());
                }
                continue;
            }
            if let Some((k, v)) = line.split_once(':') {
                last_key = k.trim().to_ascii_lowercase();
                fields.insert(last_key.clone(), v.trim().to_string());
            }
        }
        flush(&mut fields);
    }
    for p in &oneline {
        let Ok(text) = fs::read_to_string(p) else {
            continue;
        };
        for line in text.lines() {
            let line = line.split('#').next().unwrap_or("").trim();
            let Some(rest) = line
                .strip_prefix("deb ")
                .or_else(|| line.strip_prefix("deb\t"))
            else {
                continue;
            };
            let rest = rest.trim_start();
            let rest = if rest.starts_with('[') {
                rest.split_once(']')
                    .map(|(_, r)| r.trim_start())
                    .unwrap_or("")
            } else {
                rest
            };
            let mut t = rest.split_whitespace();
            if let (Some(uri), Some(suite)) = (t.next(), t.next()) {
                let exact = suite == codename;
                if exact || (suite.starts_with(&codename) && !suite.contains("security")) {
                    candidates.push((uri.to_string(), exact));
                }
            }
        }
    }
    candidates.sort_by_key(|(_, exact)| !*exact);
    candidates
        .into_iter()
        .next()
        .map(|(u, _)| u.trim_end_matches('/').to_string())
        .ok_or_else(|| {
            anyhow!(
                "could not find the Debian mirror for {codename} in /etc/apt/sources.list.d/*.sources \
                 or /etc/apt/sources.list (needed to fetch etcd from {ETCD_SUITE} and Consul from {CONSUL_SUITE})"
            )
        })
}

fn private_apt_opts(cache: &Path) -> Vec<String> {
    let apt = cache.join("apt");
    let opts = [
        format!(
            "Dir::Etc::SourceList={}",
            apt.join("sources.list").display()
        ),
        "Dir::Etc::SourceParts=/dev/null".into(),
        "Dir::Etc::Preferences=/dev/null".into(),
        "Dir::Etc::PreferencesParts=/dev/null".into(),
        format!("Dir::State::Lists={}", apt.join("lists").display()),
        format!("Dir::Cache={}", apt.join("cache").display()),
        "APT::Sandbox::User=root".into(),
        "Acquire::Languages=none".into(),
        "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false".into(),
    ];
    opts.into_iter()
        .flat_map(|o| ["-o".to_string(), o])
        .collect()
}

struct PrivatePkg {
    kind: Kind,
    suite: &'static str,
    packages: &'static [&'static str],
    /// Deb file-name prefix that pins the major version ("etcd-server_3.5.").
    version_prefix: &'static str,
    opt: &'static str,
    bins: &'static [&'static str],
}

const PRIVATE: [PrivatePkg; 2] = [
    PrivatePkg {
        kind: Kind::Etcd,
        suite: ETCD_SUITE,
        packages: &["etcd-server", "etcd-client"],
        version_prefix: "3.5.",
        opt: ETCD_OPT,
        bins: &["usr/bin/etcd", "usr/bin/etcdctl"],
    },
    PrivatePkg {
        kind: Kind::Consul,
        suite: CONSUL_SUITE,
        packages: &["consul"],
        version_prefix: "",
        opt: CONSUL_OPT,
        bins: &["usr/bin/consul"],
    },
];

fn cached_deb(debs: &Path, package: &str, version_prefix: &str) -> Option<PathBuf> {
    let prefix = format!("{package}_{version_prefix}");
    let mut found: Vec<PathBuf> = fs::read_dir(debs)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
        })
        .collect();
    found.sort();
    found.pop()
}

/// etcd 3.5 (trixie) and Consul (bullseye): `.deb`s fetched once with a private apt
/// configuration, cached, and unpacked with `dpkg -x` into `<cache>/opt/<name>`.
fn ensure_private(to_start: &[Kind], cache: &Path, logs: &Path) -> Result<()> {
    let opt_root = cache.join("opt");
    let debs = cache.join("debs");
    let needed: Vec<&PrivatePkg> = PRIVATE
        .iter()
        .filter(|p| to_start.contains(&p.kind))
        .filter(|p| !p.bins.iter().all(|b| opt_root.join(p.opt).join(b).exists()))
        .collect();
    if needed.is_empty() {
        return Ok(());
    }
    ensure_dir(&debs, 0o755)?;
    let log = logs.join("apt-private.log");
    let mut to_download: Vec<(String, &'static str)> = Vec::new();
    let mut suites: BTreeSet<&str> = BTreeSet::new();
    for p in &needed {
        for pkg in p.packages {
            if cached_deb(&debs, pkg, p.version_prefix).is_none() {
                to_download.push((format!("{pkg}/{}", p.suite), p.suite));
                suites.insert(p.suite);
            }
        }
    }
    if !to_download.is_empty() {
        let names: Vec<&str> = to_download.iter().map(|(n, _)| n.as_str()).collect();
        println!(
            "backends: downloading {} with a private apt configuration (log: {}) ...",
            names.join(" "),
            log.display()
        );
        let t = Instant::now();
        let mirror = system_mirror()?;
        let apt = cache.join("apt");
        ensure_dir(&apt.join("lists").join("partial"), 0o755)?;
        ensure_dir(&apt.join("cache").join("archives").join("partial"), 0o755)?;
        let mut list = String::from(
            "# Private source list of the tooz backends harness (`cargo xtask backends up`).\n\
             # The mirror is copied from this system's own apt sources at run time.\n",
        );
        for s in &suites {
            let _ = writeln!(list, "deb {mirror} {s} main");
        }
        fs::write(apt.join("sources.list"), list)?;
        let opts = private_apt_opts(cache);
        run_logged(
            apt_env(Command::new("apt-get").args(&opts).args(["update", "-q"])),
            &log,
            APT_TIMEOUT,
        )
        .context("backends: private apt-get update failed")?;
        run_logged(
            apt_env(
                Command::new("apt-get")
                    .args(&opts)
                    .arg("download")
                    .args(&names)
                    .current_dir(&debs),
            ),
            &log,
            APT_TIMEOUT,
        )
        .context("backends: private apt-get download failed")?;
        // The private lists are only good for this download; the .debs are what we keep.
        let _ = fs::remove_dir_all(apt.join("lists"));
        println!(
            "backends: downloaded {} ({:.1} s)",
            names.join(" "),
            t.elapsed().as_secs_f64()
        );
    }
    for p in &needed {
        let dest = opt_root.join(p.opt);
        let tmp = opt_root.join(format!("{}.partial", p.opt));
        if tmp.exists() {
            fs::remove_dir_all(&tmp)?;
        }
        ensure_dir(&tmp, 0o755)?;
        for pkg in p.packages {
            let deb = cached_deb(&debs, pkg, p.version_prefix).ok_or_else(|| {
                anyhow!(
                    "backends: no {pkg}_{}*.deb in {} after the download (does {} still ship it?)",
                    p.version_prefix,
                    debs.display(),
                    p.suite
                )
            })?;
            run_logged(
                Command::new("dpkg").arg("-x").arg(&deb).arg(&tmp),
                &log,
                Duration::from_secs(300),
            )?;
        }
        if dest.exists() {
            fs::remove_dir_all(&dest)?;
        }
        fs::rename(&tmp, &dest)?;
        for b in p.bins {
            if !dest.join(b).exists() {
                bail!("backends: {} has no {b} after unpacking", dest.display());
            }
        }
        println!(
            "backends: unpacked {} into {}",
            p.packages.join(" + "),
            dest.display()
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Data root
// ---------------------------------------------------------------------------------------------

/// Can `user` reach `dir` (search permission on every component)? Checked by really trying
/// as that user; a user that does not exist yet is held to world-search permission.
fn traversable_by(dir: &Path, user: &str) -> bool {
    match lookup_user(user) {
        Some((_, gid)) => run(
            Command::new("setpriv")
                .arg(format!("--reuid={user}"))
                .arg(format!("--regid={gid}"))
                .arg("--init-groups")
                .arg("--")
                .arg("test")
                .arg("-x")
                .arg(dir),
            None,
            Duration::from_secs(5),
        )
        .is_ok_and(|o| o.status.success()),
        None => dir
            .ancestors()
            .all(|a| fs::metadata(a).is_ok_and(|m| m.permissions().mode() & 0o001 != 0)),
    }
}

fn choose_data_root(sd: &Path, st: &State) -> Result<PathBuf> {
    if let Some(r) = &st.data_root
        && st.servers.values().any(rec_alive)
    {
        return Ok(r.clone()); // servers started from it still run
    }
    // Unix socket paths are limited to 107 bytes; keep room for ".../postgres/run/.s.PGSQL.5432".
    let short_enough = sd.as_os_str().len() + 40 < 107;
    if short_enough && ["postgres", "mysql"].iter().all(|u| traversable_by(sd, u)) {
        return Ok(sd.to_path_buf());
    }
    let tmp = PathBuf::from(TMP_DATA_ROOT);
    match fs::symlink_metadata(&tmp) {
        Ok(m) => {
            if !m.is_dir() || m.file_type().is_symlink() || Some(m.uid()) != euid() {
                bail!(
                    "backends: {} exists but is not a directory owned by us; remove it",
                    tmp.display()
                );
            }
        }
        Err(_) => fs::create_dir(&tmp).with_context(|| format!("creating {}", tmp.display()))?,
    }
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755))?;
    println!(
        "backends: the postgres/mysql users cannot reach {} (or its path is too long for sockets); data goes to {}",
        sd.display(),
        tmp.display()
    );
    Ok(tmp)
}

// ---------------------------------------------------------------------------------------------
// Per-server preparation, command lines and post-start setup
// ---------------------------------------------------------------------------------------------

struct Ctx {
    data: PathBuf,
    logs: PathBuf,
    cache: PathBuf,
    pg_bin: Option<PathBuf>,
    timeout: Duration,
}

impl Ctx {
    fn pg_tool(&self, name: &str) -> PathBuf {
        match &self.pg_bin {
            Some(b) if b.join(name).exists() => b.join(name),
            _ => PathBuf::from(name),
        }
    }

    fn mariadb_socket(&self) -> PathBuf {
        self.data.join("mariadb").join("run").join("mysqld.sock")
    }

    fn pg_socket_dir(&self) -> PathBuf {
        self.data.join("postgres").join("run")
    }

    fn log(&self, k: Kind) -> PathBuf {
        self.logs.join(format!("{}.log", k.name()))
    }
}

struct Launch {
    program: PathBuf,
    args: Vec<OsString>,
    cwd: PathBuf,
}

fn os(v: &[&str]) -> Vec<OsString> {
    v.iter().map(OsString::from).collect()
}

fn first_existing(paths: &[&str]) -> Result<PathBuf> {
    paths
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .ok_or_else(|| anyhow!("none of {} is installed", paths.join(", ")))
}

/// Creates what the server needs on disk (running `mariadb-install-db` / `initdb` on first
/// use) and returns its command line.
fn prepare(k: Kind, ctx: &Ctx) -> Result<Launch> {
    let d = &ctx.data;
    let log = ctx.log(k);
    let port = k.port().to_string();
    Ok(match k {
        Kind::Redis => {
            let dir = d.join("redis");
            ensure_dir(&dir, 0o755)?;
            let mut args = os(&["--bind", HOST, "--port", &port, "--dir"]);
            args.push(dir.clone().into());
            args.extend(os(&[
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--protected-mode",
                "yes",
            ]));
            Launch {
                program: first_existing(&["/usr/bin/redis-server"])?,
                args,
                cwd: dir,
            }
        }
        Kind::Memcached => {
            let args = os(&[
                "-l", HOST, "-p", &port, "-U", "0", "-m", "64", "-c", "1024", "-u", "memcache",
            ]);
            Launch {
                program: first_existing(&["/usr/bin/memcached"])?,
                args,
                cwd: d.clone(),
            }
        }
        Kind::Mariadb => {
            let base = d.join("mariadb");
            let data = base.join("data");
            let run_dir = base.join("run");
            let marker = base.join(".initialized");
            ensure_dir(&base, 0o755)?;
            ensure_dir(&run_dir, 0o755)?;
            chown_to(&run_dir, "mysql")?;
            if !marker.exists() {
                let t = Instant::now();
                if data.exists() {
                    fs::remove_dir_all(&data)?;
                }
                ensure_dir(&data, 0o750)?;
                chown_to(&data, "mysql")?;
                let install_db =
                    first_existing(&["/usr/bin/mariadb-install-db", "/usr/bin/mysql_install_db"])?;
                run_logged(
                    Command::new(install_db)
                        .arg("--no-defaults")
                        .arg("--user=mysql")
                        .arg(format!("--datadir={}", data.display()))
                        .arg("--auth-root-authentication-method=socket")
                        .arg("--skip-test-db")
                        .arg("--innodb-log-file-size=16M")
                        .current_dir(&base),
                    &log,
                    Duration::from_secs(120),
                )
                .context("mariadb-install-db failed")?;
                fs::write(&marker, "")?;
                println!(
                    "backends: mariadb: created data directory {} ({:.1} s)",
                    data.display(),
                    t.elapsed().as_secs_f64()
                );
            }
            let mut args: Vec<OsString> = os(&["--no-defaults", "--user=mysql"]);
            args.push(format!("--datadir={}", data.display()).into());
            args.push(format!("--socket={}", ctx.mariadb_socket().display()).into());
            args.push(format!("--pid-file={}", run_dir.join("mysqld.pid").display()).into());
            args.extend(os(&[
                "--bind-address=127.0.0.1",
                &format!("--port={port}"),
                "--skip-name-resolve",
                "--innodb-buffer-pool-size=64M",
                "--innodb-log-file-size=16M",
                "--character-set-server=utf8mb4",
                "--collation-server=utf8mb4_general_ci",
            ]));
            Launch {
                program: first_existing(&["/usr/sbin/mariadbd", "/usr/sbin/mysqld"])?,
                args,
                cwd: base,
            }
        }
        Kind::Postgresql => {
            let bin = ctx
                .pg_bin
                .clone()
                .ok_or_else(|| anyhow!("no PostgreSQL server under /usr/lib/postgresql"))?;
            let base = d.join("postgres");
            let data = base.join("data");
            let sock = ctx.pg_socket_dir();
            let marker = base.join(".initialized");
            ensure_dir(&base, 0o755)?;
            ensure_dir(&sock, 0o755)?;
            chown_to(&sock, "postgres")?;
            let bin_major = bin
                .parent()
                .and_then(|p| p.file_name())
                .map(|s| s.to_string_lossy().into_owned());
            let data_major = fs::read_to_string(data.join("PG_VERSION"))
                .ok()
                .map(|s| s.trim().to_string());
            if marker.exists() && data_major.is_some() && data_major != bin_major {
                println!(
                    "backends: postgresql: data directory is for version {} but the server is {}; re-creating it",
                    data_major.as_deref().unwrap_or("?"),
                    bin_major.as_deref().unwrap_or("?")
                );
                fs::remove_file(&marker)?;
            }
            if !marker.exists() {
                let t = Instant::now();
                if data.exists() {
                    fs::remove_dir_all(&data)?;
                }
                ensure_dir(&data, 0o700)?;
                chown_to(&data, "postgres")?;
                let (_, gid) =
                    lookup_user("postgres").ok_or_else(|| anyhow!("no postgres user"))?;
                run_logged(
                    Command::new("setpriv")
                        .arg("--reuid=postgres")
                        .arg(format!("--regid={gid}"))
                        .arg("--init-groups")
                        .arg("--")
                        .arg(bin.join("initdb"))
                        .arg("-D")
                        .arg(&data)
                        .args([
                            "-U",
                            "postgres",
                            "-E",
                            "UTF8",
                            "--locale=C",
                            "--auth-local=trust",
                        ])
                        .args(["--auth-host=scram-sha-256", "--no-sync"])
                        .current_dir(&base),
                    &log,
                    Duration::from_secs(120),
                )
                .context("initdb failed")?;
                fs::write(&marker, "")?;
                println!(
                    "backends: postgresql: created cluster {} ({:.1} s)",
                    data.display(),
                    t.elapsed().as_secs_f64()
                );
            }
            let (_, gid) = lookup_user("postgres").ok_or_else(|| anyhow!("no postgres user"))?;
            // setpriv *execs* (su/runuser would fork), so the recorded pid is the postmaster's.
            let mut args: Vec<OsString> = vec![
                "--reuid=postgres".into(),
                format!("--regid={gid}").into(),
                "--init-groups".into(),
                "--".into(),
                bin.join("postgres").into(),
                "-D".into(),
                data.into(),
            ];
            for c in [
                "listen_addresses=127.0.0.1".to_string(),
                format!("port={port}"),
                format!("unix_socket_directories={}", sock.display()),
                "max_connections=200".to_string(),
            ] {
                args.push("-c".into());
                args.push(c.into());
            }
            Launch {
                program: first_existing(&["/usr/bin/setpriv", "/bin/setpriv"])?,
                args,
                cwd: base,
            }
        }
        Kind::Etcd => {
            let dir = d.join("etcd-3.5");
            ensure_dir(&dir, 0o700)?;
            let client = format!("http://{HOST}:{port}");
            let peer = format!("http://{HOST}:2380");
            let mut args = os(&["--name", "tooz", "--data-dir"]);
            args.push(dir.clone().into());
            args.extend(os(&[
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
                "--initial-cluster",
                &format!("tooz={peer}"),
                "--enable-v2=true",
                // One member, no peers: a short election timeout only shortens the wait for
                // its own leadership after a restart (about 1 s with the default 1000 ms).
                "--heartbeat-interval=100",
                "--election-timeout=500",
                "--logger",
                "zap",
                "--log-level",
                "warn",
            ]));
            Launch {
                program: ctx.cache.join("opt").join(ETCD_OPT).join("usr/bin/etcd"),
                args,
                cwd: dir,
            }
        }
        Kind::Zookeeper => {
            let base = d.join("zookeeper");
            let conf = base.join("conf");
            let data = base.join("data");
            ensure_dir(&conf, 0o755)?;
            ensure_dir(&data, 0o755)?;
            let cfg = format!(
                "# Written by `cargo xtask backends up` on every start.\n\
                 tickTime=2000\ninitLimit=10\nsyncLimit=5\n\
                 dataDir={}\n\
                 clientPort={port}\nclientPortAddress={HOST}\nmaxClientCnxns=0\n\
                 admin.enableServer=false\n\
                 4lw.commands.whitelist=ruok,srvr,stat,mntr,conf,isro,envi\n\
                 autopurge.snapRetainCount=3\nautopurge.purgeInterval=1\n",
                data.display()
            );
            fs::write(conf.join("zoo.cfg"), cfg)?;
            fs::write(
                conf.join("log4j.properties"),
                "log4j.rootLogger=INFO, CONSOLE\n\
                 log4j.appender.CONSOLE=org.apache.log4j.ConsoleAppender\n\
                 log4j.appender.CONSOLE.layout=org.apache.log4j.PatternLayout\n\
                 log4j.appender.CONSOLE.layout.ConversionPattern=%d{ISO8601} %-5p [%t:%C{1}@%L] - %m%n\n",
            )?;
            let jar = first_existing(&["/usr/share/java/zookeeper.jar"])?;
            // Debian's zookeeper.jar finds its libraries through its manifest Class-Path, except
            // the log4j binding for slf4j, which must be added by hand.
            let mut cp = vec![conf.display().to_string(), jar.display().to_string()];
            for extra in [
                "/usr/share/java/slf4j-log4j12.jar",
                "/usr/share/java/log4j-1.2.jar",
            ] {
                if Path::new(extra).exists() {
                    cp.push(extra.to_string());
                }
            }
            let mut args = os(&["-Xms32m", "-Xmx256m", "-XX:+UseSerialGC"]);
            args.push(format!("-Dzookeeper.log.dir={}", base.display()).into());
            args.push(
                format!(
                    "-Dlog4j.configuration=file:{}",
                    conf.join("log4j.properties").display()
                )
                .into(),
            );
            args.push("-cp".into());
            args.push(cp.join(":").into());
            args.push("org.apache.zookeeper.server.quorum.QuorumPeerMain".into());
            args.push(conf.join("zoo.cfg").into());
            Launch {
                program: first_existing(&["/usr/bin/java"])?,
                args,
                cwd: base,
            }
        }
        Kind::Consul => {
            let dir = d.join("consul");
            ensure_dir(&dir, 0o755)?;
            let args = os(&[
                "agent",
                "-dev",
                "-client",
                HOST,
                "-bind",
                HOST,
                "-node",
                "tooz-dev",
                "-log-level",
                "warn",
                "-hcl",
                "disable_update_check = true",
            ]);
            Launch {
                program: ctx
                    .cache
                    .join("opt")
                    .join(CONSUL_OPT)
                    .join("usr/bin/consul"),
                args,
                cwd: dir,
            }
        }
    })
}

fn remaining(deadline: Instant) -> Duration {
    deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_secs(5))
}

fn mariadb_client() -> Result<PathBuf> {
    first_existing(&["/usr/bin/mariadb", "/usr/bin/mysql"])
}

/// After the protocol answers: create users/databases (idempotent), then prove a real TCP
/// login with the credentials of the URL.
fn setup(k: Kind, ctx: &Ctx, deadline: Instant) -> Result<()> {
    create_accounts(k, ctx, deadline)?;
    login_check(k, ctx, remaining(deadline))
}

fn create_accounts(k: Kind, ctx: &Ctx, deadline: Instant) -> Result<()> {
    match k {
        Kind::Mariadb => {
            let client = mariadb_client()?;
            // root@localhost authenticates with unix_socket, i.e. as the OS user root.
            let sql = "DELETE FROM mysql.global_priv WHERE User='';\n\
                       CREATE DATABASE IF NOT EXISTS tooz;\n\
                       CREATE USER IF NOT EXISTS 'tooz'@'%' IDENTIFIED BY 'tooz';\n\
                       CREATE USER IF NOT EXISTS 'tooz'@'localhost' IDENTIFIED BY 'tooz';\n\
                       GRANT ALL ON tooz.* TO 'tooz'@'%';\n\
                       GRANT ALL ON tooz.* TO 'tooz'@'localhost';\n\
                       FLUSH PRIVILEGES;\n";
            let out = run(
                Command::new(&client)
                    .arg("--no-defaults")
                    .arg(format!("--socket={}", ctx.mariadb_socket().display()))
                    .args(["-uroot", "--batch"]),
                Some(sql),
                remaining(deadline),
            )?;
            if !out.status.success() {
                bail!(
                    "creating the tooz user/database as root over the socket failed: {}",
                    out.text()
                );
            }
        }
        Kind::Postgresql => {
            let psql = ctx.pg_tool("psql");
            let sql = "SELECT 'CREATE ROLE tooz LOGIN PASSWORD ''tooz''' \
                       WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'tooz')\\gexec\n\
                       SELECT 'CREATE DATABASE tooz OWNER tooz' \
                       WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = 'tooz')\\gexec\n";
            let out = run(
                Command::new(&psql)
                    .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h"])
                    .arg(ctx.pg_socket_dir())
                    .args([
                        "-p",
                        &k.port().to_string(),
                        "-U",
                        "postgres",
                        "-d",
                        "postgres",
                    ]),
                Some(sql),
                remaining(deadline),
            )?;
            if !out.status.success() {
                bail!(
                    "creating role/database tooz as postgres over the socket failed: {}",
                    out.text()
                );
            }
        }
        _ => {}
    }
    Ok(())
}

/// A real login over TCP with the URL's credentials (MariaDB and PostgreSQL; a no-op for
/// the others). `mysqladmin ping` would succeed even on "access denied".
fn login_check(k: Kind, ctx: &Ctx, timeout: Duration) -> Result<()> {
    let port = k.port().to_string();
    let out = match k {
        Kind::Mariadb => run(
            Command::new(mariadb_client()?)
                .args(["--no-defaults", "-h", HOST, "-P", &port, "-utooz", "-ptooz"])
                .args(["--connect-timeout=5", "--batch", "--skip-column-names"])
                .args(["-e", "select 1", "tooz"]),
            None,
            timeout,
        )?,
        Kind::Postgresql => run(
            Command::new(ctx.pg_tool("psql"))
                .args(["-X", "-h", HOST, "-p", &port, "-U", "tooz", "-d", "tooz"])
                .args(["-tAc", "select 1"])
                .env("PGPASSWORD", "tooz")
                .env("PGCONNECT_TIMEOUT", "5"),
            None,
            timeout,
        )?,
        _ => return Ok(()),
    };
    if !out.status.success() || out.stdout.trim() != "1" {
        bail!("TCP login as tooz/tooz failed: {}", out.text());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// up
// ---------------------------------------------------------------------------------------------

/// Starts `l` in its own session (setsid execs, so the pid is the server's), detached, with
/// stdout/stderr appended to `log`. Returns the child and the log offset before it started.
fn spawn_server(l: &Launch, log: &Path) -> Result<(Child, u64)> {
    // Logs are appended across restarts; keep one previous generation once they get big.
    if fs::metadata(log).is_ok_and(|m| m.len() > 8 << 20) {
        let _ = fs::rename(log, log.with_extension("log.old"));
    }
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let mut line = l.program.display().to_string();
    for a in &l.args {
        line.push(' ');
        line.push_str(&a.to_string_lossy());
    }
    writeln!(f, "\n=== backends {}: starting: {line}", now_unix())?;
    let offset = log_offset(log);
    let setsid = Path::new("/usr/bin/setsid");
    let mut cmd = if setsid.exists() {
        // Not a process-group leader when spawned, so setsid(1) does not fork.
        let mut c = Command::new(setsid);
        c.arg("--").arg(&l.program);
        c
    } else {
        let mut c = Command::new(&l.program);
        c.process_group(0);
        c
    };
    cmd.args(&l.args)
        .current_dir(&l.cwd)
        .stdin(Stdio::null())
        .stdout(f.try_clone()?)
        .stderr(f);
    sanitize_env(&mut cmd);
    let child = cmd
        .spawn()
        .with_context(|| format!("could not start {}", l.program.display()))?;
    Ok((child, offset))
}

/// Terminates a child we just started and that did not come up.
fn kill_child(child: &mut Child, sig: &str) {
    let _ = send_signal(child.id(), sig);
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        thread::sleep(Duration::from_millis(25));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn wait_ready(
    k: Kind,
    ctx: &Ctx,
    deadline: Instant,
    mut gone: impl FnMut() -> Option<String>,
) -> Result<()> {
    let mut delay = Duration::from_millis(20);
    loop {
        if let Some(why) = gone() {
            bail!("{why}");
        }
        let err = match probe(k, ctx) {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            bail!(
                "not answering after {} s; last check: {err:#}",
                ctx.timeout.as_secs()
            );
        }
        thread::sleep(delay);
        delay = (delay * 2).min(Duration::from_millis(250));
    }
}

fn start_one(k: Kind, ctx: &Ctx, state: &Mutex<State>, sd: &Path) -> Result<()> {
    let log = ctx.log(k);
    let bad = port_conflicts(k);
    if !bad.is_empty() {
        bail!("{}", conflict_message(k, &bad));
    }
    let launch = prepare(k, ctx)
        .with_context(|| format!("{} did not come up: preparing it failed", k.name()))?;
    let t = Instant::now();
    let (mut child, offset) = spawn_server(&launch, &log)?;
    let pid = child.id();
    let ps = proc_stat(pid);
    let rec = Rec {
        pid,
        start_ticks: ps.as_ref().map(|p| p.start_ticks).unwrap_or(0),
        boot_id: boot_id(),
        port: k.port(),
        started_unix: now_unix(),
        log: log.clone(),
    };
    {
        let mut st = state.lock().map_err(|_| anyhow!("state lock poisoned"))?;
        st.servers.insert(k.name().to_string(), rec);
        st.save(sd)?;
    }
    let deadline = t + ctx.timeout;
    let res = wait_ready(k, ctx, deadline, || match child.try_wait() {
        Ok(Some(status)) => Some(format!("exited during start-up ({status})")),
        Ok(None) => None,
        Err(e) => Some(format!("cannot watch pid {pid}: {e}")),
    })
    .and_then(|()| setup(k, ctx, deadline));
    match res {
        Ok(()) => {
            if let Some(ps) = proc_stat(pid)
                && i64::from(pid) != ps.session
            {
                eprintln!(
                    "backends: warning: {} (pid {pid}) is not a session leader",
                    k.name()
                );
            }
            println!(
                "backends: {} up on {HOST}:{} ({:.1} s)",
                k.name(),
                k.port(),
                t.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Err(e) => {
            kill_child(&mut child, k.stop_signal());
            if let Ok(mut st) = state.lock() {
                st.servers.remove(k.name());
                let _ = st.save(sd);
            }
            Err(anyhow!(
                "{} did not come up on {HOST}:{}: {e:#}\n  last lines of {}:\n{}",
                k.name(),
                k.port(),
                log.display(),
                log_tail(&log, offset, 25)
            ))
        }
    }
}

fn check_running(k: Kind, ctx: &Ctx, rec: &Rec) -> Result<()> {
    let deadline = Instant::now() + ctx.timeout;
    let r = rec.clone();
    wait_ready(k, ctx, deadline, || {
        (!rec_alive(&r)).then(|| format!("pid {} exited", r.pid))
    })
    .and_then(|()| login_check(k, ctx, remaining(deadline)))
    .map_err(|e| {
        anyhow!(
            "{} (pid {}, started earlier by this harness) is running but not answering: {e:#}; \
             try `backends down --only {}` then `up` (log: {})",
            k.name(),
            rec.pid,
            k.name(),
            rec.log.display()
        )
    })?;
    println!(
        "backends: {} already up on {HOST}:{} (pid {})",
        k.name(),
        k.port(),
        rec.pid
    );
    Ok(())
}

fn up(sel: &Sel) -> Result<()> {
    require_root("up")?;
    let t0 = Instant::now();
    let root = root();
    let sd = state_dir(&root);
    ensure_dir(&sd, 0o755)?;
    let logs = sd.join("logs");
    ensure_dir(&logs, 0o755)?;
    let _lock = lock_state(&sd)?;
    let mut st = State::load(&sd)?;

    // Forget records whose process is gone (crashed, killed, or the machine rebooted).
    let dead: Vec<(String, u32)> = st
        .servers
        .iter()
        .filter(|(_, r)| !rec_alive(r))
        .map(|(n, r)| (n.clone(), r.pid))
        .collect();
    for (name, pid) in dead {
        println!(
            "backends: {name}: recorded pid {pid} is gone (or is now another process); forgetting it"
        );
        st.servers.remove(&name);
    }
    st.save(&sd)?;

    let mut selected = sel.kinds.clone();
    let (running, mut to_start): (Vec<Kind>, Vec<Kind>) = selected
        .iter()
        .partition(|k| st.servers.contains_key(k.name()));

    // Fail before installing anything if a port is taken by a process we did not start.
    // With --cluster, such a single server is left alone instead (another worktree's).
    let mut conflicts = Vec::new();
    for &k in &to_start {
        let bad = port_conflicts(k);
        if bad.is_empty() {
            continue;
        }
        if sel.cluster {
            println!(
                "backends: {}: left alone, not started: {}",
                k.name(),
                bad.join(", ")
            );
            selected.retain(|x| *x != k);
        } else {
            conflicts.push(conflict_message(k, &bad));
        }
    }
    to_start.retain(|k| selected.contains(k));
    if !conflicts.is_empty() {
        write_env(&sd, &st)?;
        bail!("backends: {}", conflicts.join("\nbackends: "));
    }

    // The clusters need the Redis, ZooKeeper and etcd binaries.
    let mut install = to_start.clone();
    if sel.cluster {
        install.extend([Kind::Redis, Kind::Zookeeper, Kind::Etcd]);
        install.sort_unstable();
        install.dedup();
    }
    let mut install_sel = selected.clone();
    install_sel.extend(install.iter().copied());
    install_sel.sort_unstable();
    install_sel.dedup();
    ensure_packages(&install, &install_sel, &logs)?;
    let cache = cache_dir();
    ensure_private(&install, &cache, &logs)?;

    let data = choose_data_root(&sd, &st)?;
    ensure_dir(&data, 0o755)?;
    st.data_root = Some(data.clone());
    st.save(&sd)?;

    let ctx = Ctx {
        data,
        logs,
        cache,
        pg_bin: pg_bin_dir(),
        timeout: wait_timeout(),
    };
    let state = Mutex::new(st);
    let results: Vec<(Kind, Result<()>)> = thread::scope(|s| {
        let mut handles = Vec::new();
        for &k in &selected {
            let (ctx, state, sd) = (&ctx, &state, &sd);
            let rec = if running.contains(&k) {
                state
                    .lock()
                    .ok()
                    .and_then(|st| st.servers.get(k.name()).cloned())
            } else {
                None
            };
            handles.push((
                k,
                s.spawn(move || match rec {
                    Some(rec) => check_running(k, ctx, &rec),
                    None => start_one(k, ctx, state, sd),
                }),
            ));
        }
        handles
            .into_iter()
            .map(|(k, h)| {
                (
                    k,
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow!("{}: start-up thread panicked", k.name()))),
                )
            })
            .collect()
    });
    // The clusters once the single servers are up (or failed).
    let cluster_res = if sel.cluster {
        Some(cluster::up(&ctx, &state, &sd))
    } else {
        None
    };
    let st = state
        .into_inner()
        .map_err(|_| anyhow!("state lock poisoned"))?;
    st.save(&sd)?;
    write_env(&sd, &st)?;
    if let Some(r) = cluster_res {
        r?;
    }

    let failed: Vec<String> = results
        .iter()
        .filter_map(|(_, r)| r.as_ref().err().map(|e| format!("{e:#}")))
        .collect();
    let n_up = results.len() - failed.len();
    if !failed.is_empty() {
        let names: Vec<&str> = results
            .iter()
            .filter(|(_, r)| r.is_err())
            .map(|(k, _)| k.name())
            .collect();
        bail!(
            "backends: {} did not come up ({n_up} of {} up; the others stay up, see `backends status`):\n{}",
            names.join(", "),
            results.len(),
            failed.join("\n")
        );
    }
    println!(
        "backends: {n_up} server(s) up in {:.1} s; URLs in {}",
        t0.elapsed().as_secs_f64(),
        env_file_path(&root).display()
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// down
// ---------------------------------------------------------------------------------------------

fn wait_gone(rec: &Rec, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if !rec_alive(rec) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(25));
    }
}

fn down(sel: &Sel) -> Result<()> {
    let (selected, with_cluster) = sel.singles_and_cluster();
    require_root("down")?;
    let t0 = Instant::now();
    let root = root();
    let sd = state_dir(&root);
    if !sd.exists() {
        println!(
            "backends: nothing was started here ({} does not exist)",
            sd.display()
        );
        return Ok(());
    }
    let _lock = lock_state(&sd)?;
    let mut st = State::load(&sd)?;
    let mut errors = Vec::new();
    let mut stopped = 0;
    if with_cluster {
        stopped += cluster::down(&mut st, &sd, &mut errors)?;
    }
    for &k in selected.iter().rev() {
        let Some(rec) = st.servers.get(k.name()).cloned() else {
            if let Some(who) = port_holder(k.port(), false) {
                println!(
                    "backends: {}: not started by this harness; {who} holds port {} and is left alone",
                    k.name(),
                    k.port()
                );
            }
            continue;
        };
        if !rec_alive(&rec) {
            println!(
                "backends: {}: recorded pid {} is gone (or is now another process); forgetting it",
                k.name(),
                rec.pid
            );
            st.servers.remove(k.name());
            st.save(&sd)?;
            continue;
        }
        let t = Instant::now();
        match cluster::stop_rec(&rec, k.stop_signal()) {
            Ok(how) => {
                stopped += 1;
                println!(
                    "backends: {} stopped (pid {}, {how}, {:.1} s)",
                    k.name(),
                    rec.pid,
                    t.elapsed().as_secs_f64()
                );
                st.servers.remove(k.name());
                st.save(&sd)?;
            }
            Err(e) => errors.push(format!("{}: {e:#}", k.name())),
        }
    }
    write_env(&sd, &st)?;
    if !errors.is_empty() {
        bail!("backends: could not stop: {}", errors.join("; "));
    }
    println!(
        "backends: {stopped} server(s) stopped in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// status
// ---------------------------------------------------------------------------------------------

fn status(sel: &Sel) -> Result<()> {
    let (selected, with_cluster) = sel.singles_and_cluster();
    let root = root();
    let sd = state_dir(&root);
    let st = State::load(&sd)?;
    let ctx = Ctx {
        data: st.data_root.clone().unwrap_or_else(|| sd.clone()),
        logs: sd.join("logs"),
        cache: cache_dir(),
        pg_bin: pg_bin_dir(),
        timeout: Duration::from_secs(2),
    };
    let mut rows = vec![[
        "NAME".to_string(),
        "PID".into(),
        "PORT".into(),
        "STATE".into(),
        "URL".into(),
    ]];
    for &k in selected {
        let (pid, state) = match st.servers.get(k.name()) {
            Some(r) if rec_alive(r) => {
                // MariaDB/PostgreSQL: the TCP login with the URL's credentials (works without
                // root); the others: their protocol probe.
                let check = match k {
                    Kind::Mariadb | Kind::Postgresql => {
                        login_check(k, &ctx, Duration::from_secs(5))
                    }
                    _ => probe(k, &ctx),
                };
                let s = match check {
                    Ok(()) => "up".to_string(),
                    Err(e) => format!("running, not answering ({e:#})"),
                };
                (r.pid.to_string(), s)
            }
            Some(r) => (r.pid.to_string(), "dead (stale record)".into()),
            None => match port_holder(k.port(), false) {
                Some(who) => ("-".into(), format!("down; port held by {who}, not ours")),
                None => ("-".into(), "down".into()),
            },
        };
        rows.push([
            k.name().to_string(),
            pid,
            k.port().to_string(),
            state,
            k.url(),
        ]);
    }
    let any_node = cluster::NODES
        .iter()
        .any(|nd| st.servers.contains_key(&nd.name()));
    if with_cluster && (sel.cluster || any_node) {
        rows.extend(cluster::status_rows(&st));
    }
    let mut w = [0usize; 4];
    for r in &rows {
        for (i, c) in r.iter().take(4).enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    for r in &rows {
        println!(
            "{:<w0$}  {:<w1$}  {:<w2$}  {:<w3$}  {}",
            r[0],
            r[1],
            r[2],
            r[3],
            r[4],
            w0 = w[0],
            w1 = w[1],
            w2 = w[2],
            w3 = w[3]
        );
    }
    println!(
        "data: {}   env: {}   logs: {}",
        st.data_root
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "(none yet)".into()),
        env_file_path(&root).display(),
        sd.join("logs").display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_parsing() {
        let a = |v: &[&str]| parse_only(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(a(&[]).unwrap(), ALL.to_vec());
        assert_eq!(
            a(&["--only", "zk", "mysql"]).unwrap(),
            vec![Kind::Mariadb, Kind::Zookeeper]
        );
        assert_eq!(
            a(&["--only=consul,redis", "--only", "pg"]).unwrap(),
            vec![Kind::Redis, Kind::Postgresql, Kind::Consul]
        );
        assert!(a(&["--only"]).is_err());
        assert!(a(&["--only", "nope"]).is_err());
        assert!(a(&["redis"]).is_err());
        assert!(a(&["--force"]).is_err());
    }

    #[test]
    fn cluster_selection() {
        let a = |v: &[&str]| parse_sel(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let plain = a(&[]).unwrap();
        assert_eq!((plain.kinds.len(), plain.cluster), (ALL.len(), false));
        // down/status without options: singles and the clusters.
        assert_eq!(plain.singles_and_cluster(), (&ALL[..], true));
        let c = a(&["--cluster"]).unwrap();
        assert_eq!((c.kinds.len(), c.cluster), (ALL.len(), true));
        assert_eq!(c.singles_and_cluster(), (&[][..], true));
        let co = a(&["--cluster-only"]).unwrap();
        assert!(co.kinds.is_empty() && co.cluster);
        let cr = a(&["--cluster", "--only", "redis"]).unwrap();
        assert_eq!(cr.singles_and_cluster(), (&[Kind::Redis][..], true));
        let r = a(&["--only", "redis"]).unwrap();
        assert_eq!(r.singles_and_cluster(), (&[Kind::Redis][..], false));
        assert!(a(&["--cluster-only", "--only", "redis"]).is_err());
        assert!(a(&["--clusters"]).is_err());
    }

    #[test]
    fn env_file_round_trip() {
        let root = std::env::temp_dir().join(format!("tooz-backends-test-{}", std::process::id()));
        assert!(read_env(&root).unwrap().is_empty());
        fs::create_dir_all(state_dir(&root)).unwrap();
        fs::write(
            env_file_path(&root),
            "# c\n\nTOOZ_TEST_REDIS_URL=redis://127.0.0.1:6379\nexport A=\"b c\"\n",
        )
        .unwrap();
        assert_eq!(
            read_env(&root).unwrap(),
            vec![
                (
                    "TOOZ_TEST_REDIS_URL".to_string(),
                    "redis://127.0.0.1:6379".to_string()
                ),
                ("A".to_string(), "b c".to_string()),
            ]
        );
        fs::write(env_file_path(&root), "garbage\n").unwrap();
        assert!(read_env(&root).is_err());
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn urls_and_ports() {
        assert_eq!(Kind::Mariadb.url(), "mysql://tooz:tooz@127.0.0.1:3306/tooz");
        assert_eq!(Kind::Etcd.url(), "etcd3+http://127.0.0.1:2379");
        let mut ports: Vec<u16> = ALL.iter().map(|k| k.port()).collect();
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), ALL.len());
    }

    #[test]
    fn hosts_are_redacted() {
        assert_eq!(
            redact_hosts("Err:1 http://mirror.example/debian trixie InRelease"),
            "Err:1 http://<host>/debian trixie InRelease"
        );
        assert_eq!(
            redact_hosts("GET http://127.0.0.1:2379/health"),
            "GET http://127.0.0.1:2379/health"
        );
    }

    #[test]
    fn own_process_is_alive_and_others_are_not() {
        let me = std::process::id();
        let ps = proc_stat(me).unwrap();
        let rec = Rec {
            pid: me,
            start_ticks: ps.start_ticks,
            boot_id: boot_id(),
            port: 1,
            started_unix: 0,
            log: PathBuf::new(),
        };
        assert!(rec_alive(&rec));
        assert!(!rec_alive(&Rec {
            start_ticks: ps.start_ticks + 1,
            ..rec.clone()
        }));
        assert!(!rec_alive(&Rec {
            boot_id: "other-boot".into(),
            ..rec
        }));
    }
}
