//! `backends up|down|status --cluster` and `backends node ...`: the clusters on loopback.
//!
//! Besides the standard single servers, `--cluster` runs
//! * a 3-member etcd 3.5 (`etcd-1..3`: clients 23791-23793, peers 23801-23803),
//! * a 3-server ZooKeeper ensemble (`zookeeper-1..3`: clients 21811-21813, quorum
//!   28881-28883, election 29881-29883; `-Xmx128m` each),
//! * a Redis primary and a replica (`redis-1` on 16379 starts as the primary, `redis-2` on
//!   16380 as its replica; no persistence) watched by three Sentinels (`sentinel-1..3` on
//!   26379-26381, master name `tooz`, `down-after-milliseconds` 1000, `failover-timeout`
//!   3000).
//!
//! Every node has its own data directory `DATA/cluster/<name>/`, its log
//! `STATE/logs/<name>.log` and a record in `STATE/state.json` next to the single servers,
//! so `down` stops them with the rest. Node names belong to a process slot and stay the same
//! across failovers: `node leader redis` says which slot is the primary now.
//!
//! `node kill|start|leader|list` is the interface the chaos run drives (as a subprocess of
//! the xtask executable): see `NODE_USAGE`.

use super::*;

pub(super) const NODE_USAGE: &str = "\
usage: cargo xtask backends node kill NAME | start NAME [--wipe] | leader GROUP | list

  kill NAME     SIGKILL the node (recorded as down); exits 0 once its pid is gone
  start NAME    start it again with its existing data dir and wait until it answers
                (idempotent: exits 0 at once when it is up); --wipe empties its data first
                where that is safe: redis-1/2, the single redis and memcached (no
                persistence: always empty anyway) and the single etcd (a new one-member
                cluster); refused for etcd-N, zookeeper(-N), sentinel-N, mariadb, postgresql,
                and for a node that is running (kill it first)
  leader GROUP  GROUP = etcd, zookeeper or redis (the clusters): prints the name of the
                current leader (etcd: the member whose status says it leads; ZooKeeper:
                `srvr` Mode: leader; Redis: the primary the Sentinels agree on); exit 1 if none
  list          one `NAME PID PORT STATE` line per node (single servers and cluster nodes)

  NAME          etcd-1..3, zookeeper-1..3, redis-1, redis-2, sentinel-1..3, or a single
                server: redis, memcached, mariadb, postgresql, etcd, zookeeper, consul
";

/// The Sentinel master name.
pub(super) const MASTER: &str = "tooz";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Group {
    Etcd,
    Zookeeper,
    Redis,
    Sentinel,
}

impl Group {
    fn prefix(self) -> &'static str {
        match self {
            Group::Etcd => "etcd",
            Group::Zookeeper => "zookeeper",
            Group::Redis => "redis",
            Group::Sentinel => "sentinel",
        }
    }
}

/// One cluster node: a group and its slot (1-based).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Node {
    group: Group,
    slot: u16,
}

const fn n(group: Group, slot: u16) -> Node {
    Node { group, slot }
}

/// Start order; `down` uses the reverse (Sentinels first, so no failover starts while the
/// Redis nodes stop).
pub(super) const NODES: [Node; 11] = [
    n(Group::Etcd, 1),
    n(Group::Etcd, 2),
    n(Group::Etcd, 3),
    n(Group::Zookeeper, 1),
    n(Group::Zookeeper, 2),
    n(Group::Zookeeper, 3),
    n(Group::Redis, 1),
    n(Group::Redis, 2),
    n(Group::Sentinel, 1),
    n(Group::Sentinel, 2),
    n(Group::Sentinel, 3),
];

impl Node {
    pub(super) fn name(self) -> String {
        format!("{}-{}", self.group.prefix(), self.slot)
    }

    pub(super) fn parse(s: &str) -> Option<Node> {
        let (prefix, slot) = s
            .trim()
            .to_ascii_lowercase()
            .rsplit_once('-')
            .map(|(a, b)| (a.to_string(), b.parse::<u16>().ok()))?;
        NODES
            .iter()
            .copied()
            .find(|nd| nd.group.prefix() == prefix && Some(nd.slot) == slot)
    }

    pub(super) fn port(self) -> u16 {
        match self.group {
            Group::Etcd => 23790 + self.slot,
            Group::Zookeeper => 21810 + self.slot,
            Group::Redis => 16378 + self.slot,
            Group::Sentinel => 26378 + self.slot,
        }
    }

    fn peer_port(self) -> u16 {
        23800 + self.slot
    }

    fn extra_tcp(self) -> Vec<u16> {
        match self.group {
            Group::Etcd => vec![self.peer_port()],
            Group::Zookeeper => vec![28880 + self.slot, 29880 + self.slot],
            Group::Redis | Group::Sentinel => Vec::new(),
        }
    }

    fn members(group: Group) -> impl Iterator<Item = Node> {
        NODES.into_iter().filter(move |nd| nd.group == group)
    }
}

/// The env file lines of the clusters that have at least one node running. The values are
/// single-quoted: the Redis URL holds `&`, and the file is also sourced by shells
/// (`set -a; . target/backends/env`); [`read_env`] strips the quotes.
pub(super) fn env_lines(st: &State, s: &mut String) {
    let alive =
        |g: Group| Node::members(g).any(|nd| st.servers.get(&nd.name()).is_some_and(rec_alive));
    if alive(Group::Etcd) {
        let _ = writeln!(s, "TOOZ_CLUSTER_ETCD_URL='{}'", etcd_url());
    }
    if alive(Group::Zookeeper) {
        let _ = writeln!(s, "TOOZ_CLUSTER_ZOOKEEPER_URL='{}'", zookeeper_url());
    }
    if alive(Group::Redis) || alive(Group::Sentinel) {
        let _ = writeln!(s, "TOOZ_CLUSTER_REDIS_URL='{}'", redis_url());
    }
}

fn host_list(group: Group) -> String {
    Node::members(group)
        .map(|nd| format!("{HOST}:{}", nd.port()))
        .collect::<Vec<_>>()
        .join(",")
}

/// Every member, in the host-list form tooz-etcd parses.
pub(super) fn etcd_url() -> String {
    format!("etcd3+http://{}", host_list(Group::Etcd))
}

pub(super) fn zookeeper_url() -> String {
    format!("zookeeper://{}", host_list(Group::Zookeeper))
}

pub(super) fn redis_url() -> String {
    let mut sentinels = Node::members(Group::Sentinel);
    let first = sentinels.next().map(Node::port).unwrap_or(26379);
    let mut url = format!("redis://{HOST}:{first}?sentinel={MASTER}");
    for nd in sentinels {
        let _ = write!(url, "&sentinel_fallback={HOST}:{}", nd.port());
    }
    url
}

// ---------------------------------------------------------------------------------------------
// Probes
// ---------------------------------------------------------------------------------------------

/// Sends `req` and reads until the server closes the connection (ZooKeeper's four-letter
/// words) or `PROBE_IO` passes.
fn exchange_all(port: u16, req: &[u8]) -> Result<String> {
    let mut s = connect(port)?;
    s.write_all(req)?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)
        .with_context(|| format!("reading from {HOST}:{port}"))?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

fn http_post(port: u16, path: &str, body: &str) -> Result<(u16, String)> {
    let mut s = connect(port)?;
    write!(
        s,
        "POST {path} HTTP/1.0\r\nHost: {HOST}:{port}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
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

/// `redis-cli -p PORT --raw ARGS...`: the reply's lines.
fn redis_cli(port: u16, args: &[&str]) -> Result<Vec<String>> {
    let cli = first_existing(&["/usr/bin/redis-cli"])?;
    let out = run(
        Command::new(cli)
            .args(["-h", HOST, "-p", &port.to_string(), "--raw"])
            .args(args),
        None,
        PROBE_IO + Duration::from_secs(1),
    )?;
    if !out.status.success() {
        bail!("redis-cli -p {port} {}: {}", args.join(" "), out.text());
    }
    let lines: Vec<String> = out.stdout.lines().map(|l| l.trim().to_string()).collect();
    if let Some(first) = lines.first()
        && (first.starts_with("ERR") || first.starts_with("Could not connect"))
    {
        bail!("redis-cli -p {port} {}: {first}", args.join(" "));
    }
    Ok(lines)
}

/// `srvr`'s `Mode:` line (`leader`, `follower`, `standalone`), or an error when the server
/// does not serve (no quorum).
fn zk_mode(port: u16) -> Result<String> {
    let r = exchange_all(port, b"srvr")?;
    r.lines()
        .find_map(|l| l.strip_prefix("Mode:").map(|m| m.trim().to_string()))
        .ok_or_else(|| anyhow!("srvr answered {:?} (not serving yet)", r.trim()))
}

/// etcd `maintenance/status` over the JSON gateway: `(member_id, leader_id)`.
fn etcd_status(port: u16) -> Result<(String, String)> {
    let (code, body) = http_post(port, "/v3/maintenance/status", "{}")?;
    if code != 200 {
        bail!(
            "POST /v3/maintenance/status answered {code} {:?}",
            body.trim()
        );
    }
    let v: Value = serde_json::from_str(body.trim())
        .with_context(|| format!("status is not JSON: {:?}", body.trim()))?;
    let id = |x: Option<&Value>| {
        x.and_then(|v| match v {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        })
    };
    let member = id(v.get("header").and_then(|h| h.get("member_id")))
        .ok_or_else(|| anyhow!("status without header.member_id: {:?}", body.trim()))?;
    let leader = id(v.get("leader")).unwrap_or_default();
    Ok((member, leader))
}

/// One readiness check of one node.
fn probe_node(nd: Node) -> Result<()> {
    let port = nd.port();
    match nd.group {
        Group::Etcd => {
            let (code, body) = http_get(port, "/health")?;
            if code != 200 || !body.replace(' ', "").contains("\"health\":\"true\"") {
                bail!("GET /health answered {code} {:?}", body.trim());
            }
        }
        Group::Zookeeper => {
            zk_mode(port)?;
        }
        Group::Redis | Group::Sentinel => {
            let r = exchange(port, b"PING\r\n", 64)?;
            if !r.starts_with("+PONG") {
                bail!("PING answered {:?}", r.trim());
            }
        }
    }
    Ok(())
}

fn wait_node(nd: Node, deadline: Instant, mut gone: impl FnMut() -> Option<String>) -> Result<()> {
    let mut delay = Duration::from_millis(50);
    loop {
        if let Some(why) = gone() {
            bail!("{why}");
        }
        let err = match probe_node(nd) {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            bail!("not answering in time; last check: {err:#}");
        }
        thread::sleep(delay);
        delay = (delay * 2).min(Duration::from_millis(250));
    }
}

// ---------------------------------------------------------------------------------------------
// Leaders
// ---------------------------------------------------------------------------------------------

pub(super) fn parse_group(s: &str) -> Result<Group> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "etcd" | "etcd3" => Group::Etcd,
        "zookeeper" | "zk" => Group::Zookeeper,
        "redis" | "sentinel" => Group::Redis,
        other => {
            bail!("backends node leader: unknown cluster {other:?} (etcd, zookeeper or redis)")
        }
    })
}

/// The current leader of a cluster, or why there is none.
pub(super) fn leader(group: Group, st: &State) -> Result<Node> {
    match group {
        Group::Etcd => {
            let mut statuses = Vec::new();
            let mut errors = Vec::new();
            for nd in Node::members(Group::Etcd) {
                match etcd_status(nd.port()) {
                    Ok(s) => statuses.push((nd, s)),
                    Err(e) => errors.push(format!("{}: {e:#}", nd.name())),
                }
            }
            statuses
                .iter()
                .find(|(_, (member, leader))| !leader.is_empty() && member == leader)
                .map(|(nd, _)| *nd)
                .ok_or_else(|| {
                    anyhow!(
                        "no etcd member says it leads (answers: {}; unreachable: {})",
                        statuses.len(),
                        if errors.is_empty() {
                            "none".into()
                        } else {
                            errors.join("; ")
                        }
                    )
                })
        }
        Group::Zookeeper => {
            let mut leaders = Vec::new();
            for nd in Node::members(Group::Zookeeper) {
                if zk_mode(nd.port()).is_ok_and(|m| m == "leader") {
                    leaders.push(nd);
                }
            }
            match leaders.as_slice() {
                [one] => Ok(*one),
                [] => bail!("no ZooKeeper server is in Mode: leader"),
                many => bail!(
                    "several ZooKeeper servers say they lead: {}",
                    many.iter().map(|n| n.name()).collect::<Vec<_>>().join(", ")
                ),
            }
        }
        Group::Redis | Group::Sentinel => {
            let port = sentinel_master_port()?;
            let nd = Node::members(Group::Redis)
                .find(|nd| nd.port() == port)
                .ok_or_else(|| {
                    anyhow!("the Sentinels name 127.0.0.1:{port}, not a node of ours")
                })?;
            if !st.servers.get(&nd.name()).is_some_and(rec_alive) {
                bail!(
                    "the Sentinels still name {} (port {port}) as the primary, but it is down \
                     (failover not done yet)",
                    nd.name()
                );
            }
            Ok(nd)
        }
    }
}

/// The primary's port the Sentinels agree on (a majority of those answering; one answer
/// is enough when only one answers).
fn sentinel_master_port() -> Result<u16> {
    let mut answers: Vec<u16> = Vec::new();
    let mut errors = Vec::new();
    for s in Node::members(Group::Sentinel) {
        match redis_cli(s.port(), &["SENTINEL", "get-master-addr-by-name", MASTER]) {
            Ok(lines) => match lines.get(1).and_then(|p| p.parse::<u16>().ok()) {
                Some(p) => answers.push(p),
                None => errors.push(format!("{}: answered {lines:?}", s.name())),
            },
            Err(e) => errors.push(format!("{}: {e:#}", s.name())),
        }
    }
    if answers.is_empty() {
        bail!("no Sentinel answered: {}", errors.join("; "));
    }
    let mut counts: BTreeMap<u16, usize> = BTreeMap::new();
    for p in &answers {
        *counts.entry(*p).or_default() += 1;
    }
    let (port, votes) = counts
        .iter()
        .max_by_key(|(_, c)| **c)
        .map(|(p, c)| (*p, *c))
        .unwrap_or((0, 0));
    if answers.len() > 1 && votes * 2 <= answers.len() {
        bail!("the Sentinels disagree on the primary: ports {answers:?}");
    }
    Ok(port)
}

/// The primary a restarted Redis node follows. When the Sentinels still name the node
/// itself (it was the primary and they have not failed over yet), wait for the failover
/// first, bounded: started at once, the node would come back as an empty second primary
/// that clients can reach until the Sentinels demote it about ten seconds later, and
/// every write it acknowledged meanwhile would then be wiped (a split brain the harness
/// would have caused, not one a real restart causes where the node's configuration
/// follows the Sentinels).
fn redis_rejoin_primary(nd: Node) -> u16 {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match sentinel_master_port() {
            Ok(p) if p != nd.port() => return p,
            Ok(_) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(100));
            }
            Ok(p) => {
                println!(
                    "backends: {}: the Sentinels still name it the primary after 15 s; starting it as the primary",
                    nd.name()
                );
                return p;
            }
            Err(_) => return n(Group::Redis, 1).port(),
        }
    }
}

/// Whether every Sentinel names the same primary and counts a healthy replica and the two
/// other Sentinels.
fn sentinels_settled() -> Result<()> {
    let mut masters = BTreeSet::new();
    for s in Node::members(Group::Sentinel) {
        let lines = redis_cli(s.port(), &["SENTINEL", "get-master-addr-by-name", MASTER])?;
        masters.insert(lines.get(1).cloned().unwrap_or_default());
        let m = redis_cli(s.port(), &["SENTINEL", "master", MASTER])?;
        let field = |k: &str| {
            m.iter()
                .position(|l| l == k)
                .and_then(|i| m.get(i + 1))
                .cloned()
                .unwrap_or_default()
        };
        if field("num-other-sentinels") != "2" {
            bail!(
                "{} knows {} other Sentinels, not 2",
                s.name(),
                field("num-other-sentinels")
            );
        }
        let reps = redis_cli(s.port(), &["SENTINEL", "replicas", MASTER])?;
        let healthy = reps
            .windows(2)
            .filter(|w| w[0] == "flags" && w[1] == "slave")
            .count();
        if healthy < 1 {
            bail!("{} sees no healthy replica yet", s.name());
        }
    }
    if masters.len() != 1 {
        bail!("the Sentinels name different primaries: {masters:?}");
    }
    Ok(())
}

fn group_ready(group: Group, st: &State) -> Result<()> {
    match group {
        Group::Etcd | Group::Zookeeper => {
            for nd in Node::members(group) {
                probe_node(nd).with_context(|| nd.name())?;
            }
            leader(group, st).map(drop)
        }
        Group::Redis | Group::Sentinel => sentinels_settled(),
    }
}

// ---------------------------------------------------------------------------------------------
// Preparing and starting nodes
// ---------------------------------------------------------------------------------------------

fn node_dir(ctx: &Ctx, nd: Node) -> PathBuf {
    ctx.data.join("cluster").join(nd.name())
}

fn node_log(ctx: &Ctx, nd: Node) -> PathBuf {
    ctx.logs.join(format!("{}.log", nd.name()))
}

fn sentinel_conf(ctx: &Ctx, nd: Node) -> PathBuf {
    node_dir(ctx, nd).join("sentinel.conf")
}

/// How a node starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// The whole cluster starts: Sentinels get a new configuration, `redis-1` is the
    /// primary and `redis-2` its replica.
    Bootstrap,
    /// One node (re)joins a running cluster: a Redis node follows the primary the
    /// Sentinels name; a Sentinel keeps its (rewritten) configuration.
    Rejoin,
}

fn prepare_node(nd: Node, ctx: &Ctx, mode: Mode) -> Result<Launch> {
    let dir = node_dir(ctx, nd);
    let port = nd.port().to_string();
    Ok(match nd.group {
        Group::Etcd => {
            ensure_dir(&dir, 0o700)?;
            let data = dir.join("data");
            let client = format!("http://{HOST}:{port}");
            let peer = format!("http://{HOST}:{}", nd.peer_port());
            let initial = Node::members(Group::Etcd)
                .map(|m| format!("{}=http://{HOST}:{}", m.name(), m.peer_port()))
                .collect::<Vec<_>>()
                .join(",");
            let mut args = os(&["--name", &nd.name(), "--data-dir"]);
            args.push(data.into());
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
                &initial,
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                "tooz-cluster",
                "--heartbeat-interval=100",
                "--election-timeout=1000",
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
        Group::Zookeeper => {
            let conf = dir.join("conf");
            let data = dir.join("data");
            ensure_dir(&conf, 0o755)?;
            ensure_dir(&data, 0o755)?;
            fs::write(data.join("myid"), format!("{}\n", nd.slot))?;
            let mut cfg = format!(
                "# Written by `cargo xtask backends up --cluster` on every start.\n\
                 tickTime=1000\ninitLimit=10\nsyncLimit=5\n\
                 dataDir={}\n\
                 clientPort={port}\nclientPortAddress={HOST}\nmaxClientCnxns=0\n\
                 admin.enableServer=false\n\
                 4lw.commands.whitelist=ruok,srvr,stat,mntr,conf,isro,envi\n\
                 autopurge.snapRetainCount=3\nautopurge.purgeInterval=1\n",
                data.display()
            );
            for m in Node::members(Group::Zookeeper) {
                let _ = writeln!(
                    cfg,
                    "server.{}={HOST}:{}:{}",
                    m.slot,
                    28880 + m.slot,
                    29880 + m.slot
                );
            }
            fs::write(conf.join("zoo.cfg"), cfg)?;
            fs::write(
                conf.join("log4j.properties"),
                "log4j.rootLogger=WARN, CONSOLE\n\
                 log4j.appender.CONSOLE=org.apache.log4j.ConsoleAppender\n\
                 log4j.appender.CONSOLE.layout=org.apache.log4j.PatternLayout\n\
                 log4j.appender.CONSOLE.layout.ConversionPattern=%d{ISO8601} %-5p [%t:%C{1}@%L] - %m%n\n",
            )?;
            let jar = first_existing(&["/usr/share/java/zookeeper.jar"])?;
            let mut cp = vec![conf.display().to_string(), jar.display().to_string()];
            for extra in [
                "/usr/share/java/slf4j-log4j12.jar",
                "/usr/share/java/log4j-1.2.jar",
            ] {
                if Path::new(extra).exists() {
                    cp.push(extra.to_string());
                }
            }
            let mut args = os(&["-Xms32m", "-Xmx128m", "-XX:+UseSerialGC"]);
            args.push(format!("-Dzookeeper.log.dir={}", dir.display()).into());
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
                cwd: dir,
            }
        }
        Group::Redis => {
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
                "no",
            ]));
            let primary = match mode {
                Mode::Bootstrap => n(Group::Redis, 1).port(),
                // Follow the primary the Sentinels name; when none answers, the slot's
                // initial role.
                Mode::Rejoin => redis_rejoin_primary(nd),
            };
            if primary != nd.port() {
                args.extend(os(&["--replicaof", HOST, &primary.to_string()]));
            }
            Launch {
                program: first_existing(&["/usr/bin/redis-server"])?,
                args,
                cwd: dir,
            }
        }
        Group::Sentinel => {
            ensure_dir(&dir, 0o755)?;
            let conf = sentinel_conf(ctx, nd);
            if mode == Mode::Bootstrap || !conf.exists() {
                let primary = n(Group::Redis, 1).port();
                let text = format!(
                    "# Written by `cargo xtask backends up --cluster`; the Sentinel rewrites it.\n\
                     port {port}\nbind {HOST}\nprotected-mode no\ndaemonize no\n\
                     dir \"{}\"\n\
                     sentinel monitor {MASTER} {HOST} {primary} 2\n\
                     sentinel down-after-milliseconds {MASTER} 1000\n\
                     sentinel failover-timeout {MASTER} 3000\n\
                     sentinel parallel-syncs {MASTER} 1\n",
                    dir.display()
                );
                fs::write(&conf, text)?;
            }
            let mut args: Vec<OsString> = vec![conf.into()];
            args.push("--sentinel".into());
            Launch {
                program: first_existing(&["/usr/bin/redis-sentinel", "/usr/bin/redis-server"])?,
                args,
                cwd: dir,
            }
        }
    })
}

fn node_conflicts(nd: Node) -> Vec<String> {
    let mut bad = Vec::new();
    for p in std::iter::once(nd.port()).chain(nd.extra_tcp()) {
        if TcpListener::bind(addr(p)).is_err() {
            let who = port_holder(p, false).unwrap_or_else(|| "an unknown process".into());
            bad.push(format!("tcp {p} (held by {who})"));
        }
    }
    bad
}

/// Starts one node and waits until it answers; records it in the state file.
fn start_node(nd: Node, ctx: &Ctx, state: &Mutex<State>, sd: &Path, mode: Mode) -> Result<()> {
    let name = nd.name();
    let log = node_log(ctx, nd);
    let bad = node_conflicts(nd);
    if !bad.is_empty() {
        bail!(
            "cannot start {name}: port(s) already in use by something this harness did not \
             start: {}",
            bad.join(", ")
        );
    }
    let launch = prepare_node(nd, ctx, mode)
        .with_context(|| format!("{name} did not come up: preparing it failed"))?;
    let t = Instant::now();
    let (mut child, offset) = spawn_server(&launch, &log)?;
    let pid = child.id();
    let rec = Rec {
        pid,
        start_ticks: proc_stat(pid).map(|p| p.start_ticks).unwrap_or(0),
        boot_id: boot_id(),
        port: nd.port(),
        started_unix: now_unix(),
        log: log.clone(),
    };
    {
        let mut st = state.lock().map_err(|_| anyhow!("state lock poisoned"))?;
        st.servers.insert(name.clone(), rec);
        st.save(sd)?;
    }
    let res = wait_node(nd, t + ctx.timeout, || match child.try_wait() {
        Ok(Some(status)) => Some(format!("exited during start-up ({status})")),
        Ok(None) => None,
        Err(e) => Some(format!("cannot watch pid {pid}: {e}")),
    });
    match res {
        Ok(()) => {
            println!(
                "backends: {name} up on {HOST}:{} (pid {pid}, {:.1} s)",
                nd.port(),
                t.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Err(e) => {
            kill_child(&mut child, "TERM");
            if let Ok(mut st) = state.lock() {
                st.servers.remove(&name);
                let _ = st.save(sd);
            }
            Err(anyhow!(
                "{name} did not come up on {HOST}:{}: {e:#}\n  last lines of {}:\n{}",
                nd.port(),
                log.display(),
                log_tail(&log, offset, 25)
            ))
        }
    }
}

/// `up --cluster`: starts every cluster node that is not running (all of them at once, so
/// etcd and ZooKeeper find their quorum), then waits until each cluster has a leader and the
/// Sentinels agree. `st` has had its dead records removed already.
pub(super) fn up(ctx: &Ctx, state: &Mutex<State>, sd: &Path) -> Result<()> {
    let t0 = Instant::now();
    let (running, to_start): (Vec<Node>, Vec<Node>) = {
        let st = state.lock().map_err(|_| anyhow!("state lock poisoned"))?;
        NODES
            .iter()
            .partition(|nd| st.servers.get(&nd.name()).is_some_and(rec_alive))
    };
    for nd in &running {
        println!("backends: {} already up (port {})", nd.name(), nd.port());
    }
    let conflicts: Vec<String> = to_start
        .iter()
        .filter_map(|&nd| {
            let bad = node_conflicts(nd);
            (!bad.is_empty()).then(|| format!("{}: {}", nd.name(), bad.join(", ")))
        })
        .collect();
    if !conflicts.is_empty() {
        bail!(
            "backends: cluster port(s) in use by something this harness did not start:\n  {}",
            conflicts.join("\n  ")
        );
    }
    let redis_running = running
        .iter()
        .any(|nd| matches!(nd.group, Group::Redis | Group::Sentinel));
    let mode = if redis_running {
        Mode::Rejoin
    } else {
        Mode::Bootstrap
    };
    let results: Vec<(Node, Result<()>)> = thread::scope(|s| {
        // etcd and ZooKeeper members in parallel (none is ready before a quorum runs);
        // the Redis nodes before the Sentinels, in one thread.
        let mut handles = Vec::new();
        for &nd in to_start
            .iter()
            .filter(|nd| matches!(nd.group, Group::Etcd | Group::Zookeeper))
        {
            handles.push(s.spawn(move || vec![(nd, start_node(nd, ctx, state, sd, mode))]));
        }
        let redis: Vec<Node> = to_start
            .iter()
            .copied()
            .filter(|nd| matches!(nd.group, Group::Redis | Group::Sentinel))
            .collect();
        handles.push(s.spawn(move || {
            redis
                .into_iter()
                .map(|nd| (nd, start_node(nd, ctx, state, sd, mode)))
                .collect()
        }));
        handles
            .into_iter()
            .flat_map(|h| {
                h.join()
                    .unwrap_or_else(|_| vec![(NODES[0], Err(anyhow!("start-up thread panicked")))])
            })
            .collect()
    });
    let failed: Vec<String> = results
        .iter()
        .filter_map(|(_, r)| r.as_ref().err().map(|e| format!("{e:#}")))
        .collect();
    if !failed.is_empty() {
        bail!(
            "backends: cluster nodes did not come up (the others stay up; `backends down \
             --cluster` stops them):\n{}",
            failed.join("\n")
        );
    }
    // Cluster-level readiness.
    let deadline = Instant::now() + ctx.timeout;
    for g in [Group::Etcd, Group::Zookeeper, Group::Redis] {
        let t = Instant::now();
        let mut delay = Duration::from_millis(100);
        loop {
            let st = state.lock().map_err(|_| anyhow!("state lock poisoned"))?;
            let r = group_ready(g, &st);
            drop(st);
            match r {
                Ok(()) => break,
                Err(e) if Instant::now() >= deadline => bail!(
                    "backends: the {} cluster is not ready after {} s: {e:#}",
                    g.prefix(),
                    ctx.timeout.as_secs()
                ),
                Err(_) => {
                    thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_millis(500));
                }
            }
        }
        let st = state.lock().map_err(|_| anyhow!("state lock poisoned"))?;
        let lead = leader(g, &st)
            .map(|n| n.name())
            .unwrap_or_else(|e| format!("? ({e:#})"));
        println!(
            "backends: {} cluster ready (leader {lead}; waited {:.1} s)",
            g.prefix(),
            t.elapsed().as_secs_f64()
        );
    }
    println!(
        "backends: cluster up in {:.1} s: {}, {}, {}",
        t0.elapsed().as_secs_f64(),
        etcd_url(),
        zookeeper_url(),
        redis_url()
    );
    Ok(())
}

/// SIGTERM (then SIGKILL after `STOP_TIMEOUT`) one recorded process; how it went.
pub(super) fn stop_rec(rec: &Rec, sig: &str) -> Result<String> {
    let mut how = format!("SIG{sig}");
    send_signal(rec.pid, sig)?;
    if wait_gone(rec, STOP_TIMEOUT) {
        return Ok(how);
    }
    // Re-checked just before: still the very process we started.
    if rec_alive(rec) {
        how = format!("SIG{sig}, then SIGKILL after {} s", STOP_TIMEOUT.as_secs());
        send_signal(rec.pid, "KILL")?;
    }
    if wait_gone(rec, Duration::from_secs(5)) {
        Ok(how)
    } else {
        bail!("pid {} is still alive after SIGKILL", rec.pid)
    }
}

/// `down` of the cluster nodes (reverse start order). Returns how many were stopped.
pub(super) fn down(st: &mut State, sd: &Path, errors: &mut Vec<String>) -> Result<usize> {
    let mut stopped = 0;
    for nd in NODES.iter().rev() {
        let name = nd.name();
        let Some(rec) = st.servers.get(&name).cloned() else {
            continue;
        };
        if !rec_alive(&rec) {
            println!(
                "backends: {name}: recorded pid {} is gone; forgetting it",
                rec.pid
            );
            st.servers.remove(&name);
            st.save(sd)?;
            continue;
        }
        let t = Instant::now();
        match stop_rec(&rec, "TERM") {
            Ok(how) => {
                stopped += 1;
                println!(
                    "backends: {name} stopped (pid {}, {how}, {:.1} s)",
                    rec.pid,
                    t.elapsed().as_secs_f64()
                );
                st.servers.remove(&name);
                st.save(sd)?;
            }
            Err(e) => errors.push(format!("{name}: {e:#}")),
        }
    }
    Ok(stopped)
}

/// Role of a running node, for `status`.
fn role(nd: Node) -> String {
    match nd.group {
        Group::Etcd => match etcd_status(nd.port()) {
            Ok((m, l)) if m == l => "leader".into(),
            Ok((_, l)) if l.is_empty() || l == "0" => "no leader".into(),
            Ok(_) => "follower".into(),
            Err(_) => "?".into(),
        },
        Group::Zookeeper => zk_mode(nd.port()).unwrap_or_else(|_| "not serving".into()),
        Group::Redis => redis_cli(nd.port(), &["ROLE"])
            .ok()
            .and_then(|l| l.first().cloned())
            .map(|r| match r.as_str() {
                "master" => "primary".into(),
                "slave" => "replica".into(),
                _ => r,
            })
            .unwrap_or_else(|| "?".into()),
        Group::Sentinel => "sentinel".into(),
    }
}

/// `status`: the cluster nodes' rows (name, pid, port, state with role).
pub(super) fn status_rows(st: &State) -> Vec<[String; 5]> {
    NODES
        .iter()
        .map(|&nd| {
            let name = nd.name();
            let (pid, state) = match st.servers.get(&name) {
                Some(r) if rec_alive(r) => match probe_node(nd) {
                    Ok(()) => (r.pid.to_string(), format!("up, {}", role(nd))),
                    Err(e) => (r.pid.to_string(), format!("running, not answering ({e:#})")),
                },
                Some(r) => (r.pid.to_string(), "dead (stale record)".into()),
                None => ("-".into(), "down".into()),
            };
            let url = match nd.group {
                Group::Etcd => "TOOZ_CLUSTER_ETCD_URL",
                Group::Zookeeper => "TOOZ_CLUSTER_ZOOKEEPER_URL",
                Group::Redis | Group::Sentinel => "TOOZ_CLUSTER_REDIS_URL",
            };
            [name, pid, nd.port().to_string(), state, url.to_string()]
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// `node ...`
// ---------------------------------------------------------------------------------------------

/// A node name on the command line: a cluster node or a single server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Target {
    Cluster(Node),
    Single(Kind),
}

impl Target {
    pub(super) fn parse(s: &str) -> Result<Target> {
        if let Some(nd) = Node::parse(s) {
            return Ok(Target::Cluster(nd));
        }
        if let Some(k) = Kind::parse(s) {
            return Ok(Target::Single(k));
        }
        let mut names: Vec<String> = NODES.iter().map(|n| n.name()).collect();
        names.extend(ALL.iter().map(|k| k.name().to_string()));
        bail!(
            "backends node: unknown node {s:?} (known: {})",
            names.join(", ")
        )
    }

    fn name(self) -> String {
        match self {
            Target::Cluster(nd) => nd.name(),
            Target::Single(k) => k.name().to_string(),
        }
    }

    fn port(self) -> u16 {
        match self {
            Target::Cluster(nd) => nd.port(),
            Target::Single(k) => k.port(),
        }
    }
}

pub(super) fn node_main(args: &[String]) -> Result<()> {
    let Some((cmd, rest)) = args.split_first() else {
        print!("{NODE_USAGE}");
        bail!("backends node: missing command (kill, start, leader or list)");
    };
    let one_name = |what: &str, allowed: &[&str]| -> Result<(String, Vec<String>)> {
        let mut name = None;
        let mut flags = Vec::new();
        for a in rest {
            if a.starts_with('-') {
                if !allowed.contains(&a.as_str()) {
                    bail!("backends node {what}: unknown option {a:?}\n{NODE_USAGE}");
                }
                flags.push(a.clone());
            } else if name.is_some() {
                bail!("backends node {what}: one name only, found {a:?} too");
            } else {
                name = Some(a.clone());
            }
        }
        let name =
            name.ok_or_else(|| anyhow!("backends node {what}: missing NAME\n{NODE_USAGE}"))?;
        Ok((name, flags))
    };
    match cmd.as_str() {
        "-h" | "--help" | "help" => {
            print!("{NODE_USAGE}");
            Ok(())
        }
        "kill" => {
            let (name, _) = one_name("kill", &[])?;
            node_kill(Target::parse(&name)?)
        }
        "start" => {
            let (name, flags) = one_name("start", &["--wipe"])?;
            node_start(Target::parse(&name)?, flags.iter().any(|f| f == "--wipe"))
        }
        "leader" => {
            let (name, _) = one_name("leader", &[])?;
            let g = parse_group(&name)?;
            let st = State::load(&state_dir(&root()))?;
            let nd = leader(g, &st)?;
            println!("{}", nd.name());
            Ok(())
        }
        "list" => {
            if let Some(a) = rest.first() {
                bail!("backends node list: unexpected argument {a:?}");
            }
            node_list()
        }
        other => {
            print!("{NODE_USAGE}");
            bail!("backends node: unknown command {other:?} (expected kill, start, leader or list)")
        }
    }
}

fn node_kill(t: Target) -> Result<()> {
    require_root("node kill")?;
    let sd = state_dir(&root());
    ensure_dir(&sd, 0o755)?;
    let _lock = lock_state(&sd)?;
    let mut st = State::load(&sd)?;
    let name = t.name();
    let Some(rec) = st.servers.get(&name).cloned() else {
        if let Some(who) = port_holder(t.port(), false) {
            bail!(
                "backends node kill: {name} was not started by this harness ({who} holds port {}; \
                 left alone)",
                t.port()
            );
        }
        println!("backends: {name} is already down");
        return Ok(());
    };
    if rec_alive(&rec) {
        let tm = Instant::now();
        send_signal(rec.pid, "KILL")?;
        if !wait_gone(&rec, STOP_TIMEOUT) {
            bail!(
                "backends node kill: pid {} of {name} is still alive after SIGKILL",
                rec.pid
            );
        }
        println!(
            "backends: {name} killed (pid {}, SIGKILL, gone after {:.2} s)",
            rec.pid,
            tm.elapsed().as_secs_f64()
        );
    } else {
        println!("backends: {name} (pid {}) was already gone", rec.pid);
    }
    st.servers.remove(&name);
    st.save(&sd)?;
    write_env(&sd, &st)
}

fn node_start(t: Target, wipe: bool) -> Result<()> {
    require_root("node start")?;
    let root = root();
    let sd = state_dir(&root);
    ensure_dir(&sd, 0o755)?;
    let logs = sd.join("logs");
    ensure_dir(&logs, 0o755)?;
    let _lock = lock_state(&sd)?;
    let mut st = State::load(&sd)?;
    let name = t.name();
    if wipe {
        let ok = match t {
            Target::Cluster(nd) => nd.group == Group::Redis,
            Target::Single(k) => matches!(k, Kind::Redis | Kind::Memcached | Kind::Etcd),
        };
        if !ok {
            bail!(
                "backends node start {name} --wipe: refused: an empty data dir is not safe here \
                 ({}); start it without --wipe",
                match t {
                    Target::Cluster(nd) if nd.group == Group::Etcd =>
                        "an etcd member with an empty data dir cannot rejoin its cluster without \
                         `member remove/add`",
                    Target::Cluster(nd) if nd.group == Group::Zookeeper =>
                        "a ZooKeeper server with an empty data dir could form a quorum that \
                         loses committed transactions",
                    Target::Cluster(_) => "a Sentinel's configuration holds the failover state",
                    _ => "its data dir holds the accounts and databases the tests use",
                }
            );
        }
    }
    if let Some(rec) = st.servers.get(&name).cloned() {
        if rec_alive(&rec) {
            if wipe {
                bail!(
                    "backends node start {name} --wipe: it is running (pid {}); kill it first",
                    rec.pid
                );
            }
            let deadline = Instant::now() + wait_timeout();
            match t {
                Target::Cluster(nd) => wait_node(nd, deadline, || {
                    (!rec_alive(&rec)).then(|| format!("pid {} exited", rec.pid))
                })?,
                Target::Single(k) => {
                    let ctx = single_ctx(&sd, &st)?;
                    wait_ready(k, &ctx, deadline, || {
                        (!rec_alive(&rec)).then(|| format!("pid {} exited", rec.pid))
                    })?
                }
            }
            println!("backends: {name} already up (pid {})", rec.pid);
            return Ok(());
        }
        st.servers.remove(&name);
    }
    let cache = cache_dir();
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
    if wipe {
        let dir = match t {
            Target::Cluster(nd) => node_dir(&ctx, nd),
            Target::Single(Kind::Redis) => ctx.data.join("redis"),
            Target::Single(Kind::Etcd) => ctx.data.join(ETCD_OPT),
            Target::Single(_) => PathBuf::new(),
        };
        if !dir.as_os_str().is_empty() && dir.exists() {
            fs::remove_dir_all(&dir).with_context(|| format!("wiping {}", dir.display()))?;
            println!("backends: {name}: wiped {}", dir.display());
        }
    }
    if let Target::Single(Kind::Postgresql) = t {
        clear_stale_postmaster_pid(
            &ctx.data.join("postgres").join("data"),
            &ctx.pg_socket_dir(),
        )?;
    }
    let state = Mutex::new(st);
    let res = match t {
        Target::Cluster(nd) => start_node(nd, &ctx, &state, &sd, Mode::Rejoin),
        Target::Single(k) => start_one(k, &ctx, &state, &sd),
    };
    let st = state
        .into_inner()
        .map_err(|_| anyhow!("state lock poisoned"))?;
    st.save(&sd)?;
    write_env(&sd, &st)?;
    res
}

/// After a SIGKILL, PostgreSQL's `postmaster.pid` still names the killed postmaster, and
/// where nobody reaps it (a container whose init does not) that pid stays a zombie that
/// `kill(pid, 0)` calls alive: a restart refuses to start ("lock file already exists").
/// Remove the file when its pid is gone or a zombie, once the old server's backends
/// (which exit on their postmaster's death) are gone too, bounded.
fn clear_stale_postmaster_pid(data: &Path, socket_dir: &Path) -> Result<()> {
    let file = data.join("postmaster.pid");
    let Ok(text) = fs::read_to_string(&file) else {
        return Ok(());
    };
    let Some(pid) = text
        .lines()
        .next()
        .and_then(|l| l.trim().parse::<u32>().ok())
    else {
        return Ok(());
    };
    let dead = |pid: u32| proc_stat(pid).is_none_or(|p| p.state == 'Z');
    if !dead(pid) {
        return Ok(());
    }
    // The old backends (reparented when their postmaster died; they exit on noticing
    // it): processes titled `postgres: ...`. Bounded: this only waits.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let children = fs::read_dir("/proc")
            .map(|d| {
                d.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
                    .filter(|p| {
                        fs::read(format!("/proc/{p}/cmdline"))
                            .is_ok_and(|c| c.starts_with(b"postgres: "))
                    })
                    .filter(|p| !dead(*p))
                    .count()
            })
            .unwrap_or(0);
        if children == 0 || Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    fs::remove_file(&file).with_context(|| format!("removing stale {}", file.display()))?;
    // The Unix socket's lock file names the same postmaster.
    if let Ok(dir) = fs::read_dir(socket_dir) {
        for e in dir.flatten() {
            let path = e.path();
            let is_lock = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(".s.PGSQL.") && n.ends_with(".lock"));
            let same = fs::read_to_string(&path)
                .ok()
                .and_then(|t| t.lines().next().and_then(|l| l.trim().parse::<u32>().ok()))
                == Some(pid);
            if is_lock && same {
                fs::remove_file(&path)
                    .with_context(|| format!("removing stale {}", path.display()))?;
            }
        }
    }
    println!("backends: postgresql: removed the stale postmaster.pid of killed pid {pid}");
    Ok(())
}

fn single_ctx(sd: &Path, st: &State) -> Result<Ctx> {
    Ok(Ctx {
        data: st.data_root.clone().unwrap_or_else(|| sd.to_path_buf()),
        logs: sd.join("logs"),
        cache: cache_dir(),
        pg_bin: pg_bin_dir(),
        timeout: wait_timeout(),
    })
}

fn node_list() -> Result<()> {
    let st = State::load(&state_dir(&root()))?;
    let mut rows: Vec<(String, u16)> = ALL
        .iter()
        .map(|k| (k.name().to_string(), k.port()))
        .collect();
    rows.extend(NODES.iter().map(|nd| (nd.name(), nd.port())));
    for (name, port) in rows {
        let (pid, state) = match st.servers.get(&name) {
            Some(r) if rec_alive(r) => (r.pid.to_string(), "up"),
            _ => ("-".to_string(), "down"),
        };
        println!("{name} {pid} {port} {state}");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// CI: the drivers' conformance suites against the clusters, and a failover smoke
// ---------------------------------------------------------------------------------------------

/// The driver crates run against the clusters: crate, the URL variable its conformance
/// suite reads, the cluster URL.
fn suites() -> [(&'static str, &'static str, String); 3] {
    [
        ("tooz-etcd", "TOOZ_TEST_ETCD_URL", etcd_url()),
        ("tooz-zookeeper", "TOOZ_TEST_ZOOKEEPER_URL", zookeeper_url()),
        ("tooz-redis", "TOOZ_TEST_REDIS_URL", redis_url()),
    ]
}

/// `ci` step `cluster`: brings the clusters up (the single servers are the `backends`
/// step's), runs the etcd, ZooKeeper and Redis conformance suites against the cluster
/// URLs, checks that a lock survives the SIGKILL of the etcd/ZooKeeper member its client
/// is on, then for each cluster kills its leader, waits for another one and starts the
/// killed node again. The clusters stay up (like the single servers).
pub(crate) fn ci() -> Result<()> {
    let t = Instant::now();
    super::up(&Sel {
        kinds: Vec::new(),
        cluster: true,
        only: false,
    })?;
    let mut times = vec![("cluster up".to_string(), t.elapsed().as_secs_f64())];
    for (krate, key, url) in suites() {
        let t = Instant::now();
        crate::process::progress!("conformance of {krate} against {url}");
        crate::process::run(
            crate::process::cargo()
                .args(["test", "-p", krate, "--test", "conformance"])
                .env("TOOZ_REQUIRE_BACKENDS", "1")
                .env(key, &url),
        )?;
        times.push((format!("{krate} conformance"), t.elapsed().as_secs_f64()));
    }
    for g in [Group::Etcd, Group::Zookeeper] {
        let t = Instant::now();
        member_kill_keeps_lock(g)?;
        times.push((
            format!("{} member kill, lock kept", g.prefix()),
            t.elapsed().as_secs_f64(),
        ));
    }
    for g in [Group::Etcd, Group::Zookeeper, Group::Redis] {
        let t = Instant::now();
        let (old, new, elected) = failover(g)?;
        crate::process::progress!(
            "{} failover: killed leader {old}, {new} elected after {elected:.1} s, {old} back",
            g.prefix()
        );
        times.push((
            format!("{} failover smoke", g.prefix()),
            t.elapsed().as_secs_f64(),
        ));
    }
    for (what, secs) in times {
        crate::process::progress!("  {what:<28} {secs:>6.1}s");
    }
    Ok(())
}

/// The `tooz` CLI (built by the `test` step; built here when missing).
fn tooz_cli() -> Result<PathBuf> {
    let bin = crate::process::target_dir().join("debug").join("tooz");
    if !bin.exists() {
        crate::process::run(crate::process::cargo().args(["build", "-p", "tooz-cli"]))?;
    }
    Ok(bin)
}

/// A lock held across a SIGKILL of the member its client talks to: `tooz lock` (lease
/// TTL 5 s) runs a command that marks the lock held and sleeps 12 s while the first
/// listed node (the one the client is on: etcd starts on the first member that answers,
/// ZooKeeper is told not to shuffle its hosts) is killed. Exit 0 means the lock was
/// never lost (123 would say it was): the client moved to another member in time.
fn member_kill_keeps_lock(g: Group) -> Result<()> {
    let first = Node::members(g)
        .next()
        .ok_or_else(|| anyhow!("no {} node", g.prefix()))?;
    let url = match g {
        Group::Etcd => format!("{}?timeout=5", etcd_url()),
        _ => format!("{}?timeout=5&randomize_hosts=false", zookeeper_url()),
    };
    node_start(Target::Cluster(first), false)?;
    let tooz = tooz_cli()?;
    let marker = state_dir(&root()).join(format!("{}-lock-held", g.prefix()));
    let _ = fs::remove_file(&marker);
    let script = format!("touch '{}' && sleep 12", marker.display());
    let mut child = Command::new(&tooz)
        .args(["--url", &url, "lock", "xtask-cluster-member-kill", "--"])
        .args(["sh", "-c", &script])
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("could not run {}", tooz.display()))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !marker.exists() {
        if let Some(st) = child.try_wait()? {
            bail!("tooz lock against {url} ended ({st}) before it held the lock");
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("tooz lock against {url} did not get the lock within 30 s");
        }
        thread::sleep(Duration::from_millis(50));
    }
    node_kill(Target::Cluster(first))?;
    let deadline = Instant::now() + Duration::from_secs(40);
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "tooz lock against {url} still runs 40 s after {} was killed",
                first.name()
            );
        }
        thread::sleep(Duration::from_millis(50));
    };
    let _ = fs::remove_file(&marker);
    node_start(Target::Cluster(first), false)?;
    match status.code() {
        Some(0) => {
            crate::process::progress!(
                "{}: a lock held through {} survived its SIGKILL",
                g.prefix(),
                first.name()
            );
            Ok(())
        }
        Some(123) => bail!(
            "{}: the lock was lost when {} (the member its client was on) was killed",
            g.prefix(),
            first.name()
        ),
        _ => bail!(
            "{}: tooz lock against {url} ended with {status}",
            g.prefix()
        ),
    }
}

/// Kills the leader of `g`, waits (bounded) until another live node leads, starts the
/// killed node again and waits until the cluster is settled. Returns the old and new
/// leader and how long the election took.
fn failover(g: Group) -> Result<(String, String, f64)> {
    let sd = state_dir(&root());
    let old = leader(g, &State::load(&sd)?)?;
    node_kill(Target::Cluster(old))?;
    let t = Instant::now();
    let limit = Duration::from_secs(30);
    let new = loop {
        let st = State::load(&sd)?;
        match leader(g, &st) {
            Ok(nd) if nd != old => break nd,
            Ok(_) | Err(_) if t.elapsed() < limit => thread::sleep(Duration::from_millis(100)),
            Ok(nd) => bail!(
                "{}: {} still leads {} s after its kill",
                g.prefix(),
                nd.name(),
                limit.as_secs()
            ),
            Err(e) => bail!(
                "{}: no new leader {} s after killing {}: {e:#}",
                g.prefix(),
                limit.as_secs(),
                old.name()
            ),
        }
    };
    let elected = t.elapsed().as_secs_f64();
    node_start(Target::Cluster(old), false)?;
    let deadline = Instant::now() + wait_timeout();
    loop {
        let st = State::load(&sd)?;
        match group_ready(g, &st) {
            Ok(()) => break,
            Err(e) if Instant::now() >= deadline => {
                bail!(
                    "{}: not settled after {} came back: {e:#}",
                    g.prefix(),
                    old.name()
                )
            }
            Err(_) => thread::sleep(Duration::from_millis(200)),
        }
    }
    Ok((old.name(), new.name(), elected))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_ports_and_urls() {
        let names: Vec<String> = NODES.iter().map(|n| n.name()).collect();
        assert_eq!(
            names,
            [
                "etcd-1",
                "etcd-2",
                "etcd-3",
                "zookeeper-1",
                "zookeeper-2",
                "zookeeper-3",
                "redis-1",
                "redis-2",
                "sentinel-1",
                "sentinel-2",
                "sentinel-3"
            ]
        );
        for nd in NODES {
            assert_eq!(Node::parse(&nd.name()), Some(nd));
        }
        assert_eq!(Node::parse("redis-3"), None);
        assert_eq!(Node::parse("etcd"), None);
        assert_eq!(Target::parse("etcd").unwrap(), Target::Single(Kind::Etcd));
        assert_eq!(
            Target::parse("Sentinel-2").unwrap(),
            Target::Cluster(n(Group::Sentinel, 2))
        );
        assert!(Target::parse("redis-primary").is_err());
        // No cluster port collides with another one or with a single server's.
        let mut ports: Vec<u16> = NODES
            .iter()
            .flat_map(|nd| std::iter::once(nd.port()).chain(nd.extra_tcp()))
            .collect();
        for k in ALL {
            ports.push(k.port());
            ports.extend(k.extra_tcp());
        }
        let len = ports.len();
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), len);
        assert_eq!(
            zookeeper_url(),
            "zookeeper://127.0.0.1:21811,127.0.0.1:21812,127.0.0.1:21813"
        );
        assert_eq!(
            redis_url(),
            "redis://127.0.0.1:26379?sentinel=tooz&sentinel_fallback=127.0.0.1:26380\
             &sentinel_fallback=127.0.0.1:26381"
        );
        assert_eq!(
            etcd_url(),
            "etcd3+http://127.0.0.1:23791,127.0.0.1:23792,127.0.0.1:23793"
        );
    }
}
