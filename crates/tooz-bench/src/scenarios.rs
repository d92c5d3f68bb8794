//! The floors and the scenarios, generic over [`Coordinator`].

use std::{
    hint::black_box,
    io::Write as _,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use futures_util::future::try_join_all;
use tooz_core::{Coordinator, GroupEvent, MemberId, Wait};

use crate::{
    Target,
    report::{Figures, Measured},
};

/// Iterations per scenario.
#[derive(Debug, Clone)]
pub(crate) struct Sizes {
    floor: usize,
    lock_pair: usize,
    lock_handoff: usize,
    join_leave: usize,
    get_members: usize,
    members: usize,
    heartbeat: usize,
    watch: usize,
    partition: Duration,
}

impl Sizes {
    /// The sizes of a real run (well under a minute per driver).
    pub(crate) fn full() -> Self {
        Self {
            floor: 2000,
            lock_pair: 2000,
            lock_handoff: 200,
            join_leave: 1000,
            get_members: 200,
            members: 1000,
            heartbeat: 200,
            watch: 200,
            partition: Duration::from_secs(1),
        }
    }

    /// A smoke run: a tenth of the iterations, same group size.
    pub(crate) fn quick() -> Self {
        Self {
            floor: 200,
            lock_pair: 200,
            lock_handoff: 20,
            join_leave: 100,
            get_members: 20,
            members: 1000,
            heartbeat: 20,
            watch: 20,
            partition: Duration::from_millis(200),
        }
    }
}

/// How long B sits in its blocking acquire before A releases.
const HANDOFF_WAIT: Duration = Duration::from_millis(20);
/// How long a watcher may take to see an event before the run fails.
const EVENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Coordinators started at once while building the 1,000-member group.
const SETUP_CHUNK: usize = 50;

/// Counts round trips over a window (and, for memcached, command lines, handed to the
/// target's tally).
struct Window(Option<u64>, Option<u64>);

impl Window {
    fn open(t: &Target) -> Self {
        Self(t.round_trips(), t.commands())
    }

    fn close(self, t: &Target) -> Option<u64> {
        if let Some((now, then)) = t.commands().zip(self.1) {
            t.saw_commands(now - then);
        }
        Some(t.round_trips()? - self.0?)
    }
}

fn add(total: &mut Option<u64>, more: Option<u64>) {
    *total = total.zip(more).map(|(a, b)| a + b);
}

/// Runs every floor and scenario, in the order of the table.
pub(crate) async fn run_all(t: &Target, sizes: &Sizes) -> Result<(Vec<Figures>, Vec<String>)> {
    let mut figures = Vec::new();
    let mut notes = Vec::new();
    // Times a scenario (direct connections); then, where there are round trips to count,
    // runs it again with `$count` iterations through the proxy for requests per operation.
    macro_rules! scenario {
        ($name:expr, $full:expr, $count:expr, |$n:ident| $body:expr) => {{
            t.set_counting(false);
            let $n = $full;
            let mut f = $body.await?.figures($name);
            if t.can_count() {
                t.set_counting(true);
                t.take_commands();
                let $n = $count;
                let counted = $body.await;
                t.set_counting(false);
                let counted = counted?;
                f.requests_per_op = counted.figures($name).requests_per_op;
                let commands = t.take_commands();
                if t.driver == "memcached" {
                    f.commands_per_op = Some(commands as f64 / counted.ops().max(1) as f64);
                }
            }
            eprintln!(
                "tooz-bench: {}: {}: median {:.2} µs, req/op {:?}, cmd/op {:?}",
                t.driver, $name, f.median_us, f.requests_per_op, f.commands_per_op
            );
            figures.push(f);
        }};
    }
    let count = |n: usize| (n / 10).max(5);
    match t.driver {
        "redis" => {
            scenario!(
                "floor_rtt",
                sizes.floor,
                count(sizes.floor),
                |n| redis_ping(t, n)
            );
            notes.push(
                "floor_rtt = one Redis PING (redis crate, multiplexed connection); timings use \
                 direct connections; req/op = client round trips counted by an in-process \
                 proxy in a second pass of a tenth of the iterations"
                    .to_owned(),
            );
        }
        #[cfg(feature = "zookeeper")]
        "zookeeper" => {
            scenario!("floor_rtt", sizes.floor, count(sizes.floor), |n| zk_exists(
                t, n
            ));
            scenario!("floor_write", sizes.floor, count(sizes.floor), |n| {
                zk_create_delete(t, n)
            });
            notes.push(
                "zookeeper: floor_rtt = one `exists` (zookeeper-client); floor_write = create \
                 + delete of an ephemeral znode (two round trips, each write waits for the \
                 server's log); req/op = ZooKeeper requests (not round trips) counted by an \
                 in-process proxy that parses the client's frames, in a second pass of a \
                 tenth of the iterations"
                    .to_owned(),
            );
        }
        #[cfg(feature = "etcd")]
        "etcd" => {
            scenario!(
                "floor_rtt",
                sizes.floor,
                count(sizes.floor),
                |n| etcd_range(t, n)
            );
            scenario!("floor_write", sizes.floor, count(sizes.floor), |n| {
                etcd_put(t, n)
            });
            notes.push(
                "etcd: floor_rtt = one range read of a key (etcd-client); floor_write = one \
                 put (waits for etcd's fsync); req/op = gRPC request messages (unary calls and \
                 stream messages such as keep-alives) counted by an in-process proxy that \
                 follows the client's HTTP/2 frames, in a second pass of a tenth of the \
                 iterations"
                    .to_owned(),
            );
        }
        #[cfg(feature = "memcached")]
        "memcached" => {
            scenario!("floor_rtt", sizes.floor, count(sizes.floor), |n| mc_get(
                t, n
            ));
            notes.push(
                "memcached: floor_rtt = one `mg <key> v` of a stored key (async-memcached, an \
                 independent client); req/op = client round trips counted by an \
                 in-process proxy in a second pass of a tenth of the iterations (a pipeline \
                 of meta commands written at once is one round trip; concurrent requests on \
                 separate connections count one each); the proxy also counts command lines \
                 (every `mg`/`ms`/`md`/`ma`/… line, not `mn`)"
                    .to_owned(),
            );
        }
        #[cfg(feature = "consul")]
        "consul" => {
            scenario!("floor_rtt", sizes.floor, count(sizes.floor), |n| {
                consul_kv(t, n, false)
            });
            scenario!("floor_write", sizes.floor, count(sizes.floor), |n| {
                consul_kv(t, n, true)
            });
            notes.push(
                "consul: floor_rtt = one KV GET of a key; floor_write = one KV PUT (committed \
                 through Raft); both plain HTTP/1.1 on reqwest, the driver's client; req/op = \
                 HTTP round trips counted by an in-process proxy in a second pass of a tenth \
                 of the iterations (a blocking query counts once, when it is sent)"
                    .to_owned(),
            );
        }
        #[cfg(feature = "postgresql")]
        "postgresql" => {
            scenario!("floor_rtt", sizes.floor, count(sizes.floor), |n| {
                sql_floor::pg(t, n, false)
            });
            scenario!("floor_write", sizes.floor, count(sizes.floor), |n| {
                sql_floor::pg(t, n, true)
            });
            notes.push(
                "postgresql: floor_rtt = one `SELECT 1`, floor_write = one one-row `UPDATE` \
                 (autocommit: it waits for the commit), both on one dedicated sqlx connection \
                 (the driver's client library); req/op = client round trips counted by an \
                 in-process proxy in a second pass of a tenth of the iterations"
                    .to_owned(),
            );
        }
        #[cfg(feature = "mysql")]
        "mysql" => {
            scenario!("floor_rtt", sizes.floor, count(sizes.floor), |n| {
                sql_floor::mysql(t, n, false)
            });
            scenario!("floor_write", sizes.floor, count(sizes.floor), |n| {
                sql_floor::mysql(t, n, true)
            });
            notes.push(
                "mysql: floor_rtt = one `SELECT 1`, floor_write = one one-row `UPDATE` \
                 (autocommit, InnoDB), both on one dedicated sqlx connection (the driver's \
                 client library); req/op = client round trips counted by an in-process proxy \
                 in a second pass of a tenth of the iterations"
                    .to_owned(),
            );
        }
        "file" => {
            let dir = t
                .scratch()
                .context("the file driver has no data directory")?;
            scenario!("floor_rtt", sizes.floor, 0, |n| async {
                file_lock_floor(dir, n)
            });
            scenario!("floor_write", sizes.floor, 0, |n| async {
                file_write_floor(dir, n)
            });
            notes.push(
                "file: no network, so req/op is n/a; floor_rtt = one fcntl F_OFD_SETLK \
                 write-lock + unlock of an open file; floor_write = create + write 64 bytes \
                 + rename (what the driver does per join, no fsync)"
                    .to_owned(),
            );
        }
        "ipc" => {
            scenario!("floor_rtt", sizes.floor, 0, |n| async { ipc_floor(n) });
            notes.push(
                "ipc: no network, so req/op is n/a; floor_rtt = one raw SysV semaphore P + V \
                 pair (semop with SEM_UNDO, IPC_NOWAIT) on a private semaphore"
                    .to_owned(),
            );
        }
        _ => {}
    }
    if !t.has_driver() {
        notes.push(format!(
            "the {} driver is not built into this tooz-bench (cargo feature off): floors only",
            t.driver
        ));
        return Ok((figures, notes));
    }
    scenario!("lock_pair", sizes.lock_pair, count(sizes.lock_pair), |n| {
        lock_pair(t, n)
    });
    scenario!(
        "lock_handoff",
        sizes.lock_handoff,
        count(sizes.lock_handoff),
        |n| lock_handoff(t, n)
    );
    scenario!(
        "join_leave",
        sizes.join_leave,
        count(sizes.join_leave),
        |n| { join_leave(t, n) }
    );
    scenario!(
        "get_members_1000",
        sizes.get_members,
        count(sizes.get_members),
        |n| get_members(t, sizes.members, n)
    );
    scenario!(
        "heartbeat_100",
        sizes.heartbeat,
        count(sizes.heartbeat),
        |n| { heartbeat(t, 100, n) }
    );
    scenario!("watch_latency", sizes.watch, count(sizes.watch), |n| {
        watch_latency(t, n)
    });
    scenario!(
        "partition_lookup",
        sizes.partition,
        sizes.partition / 10,
        |n| partition_lookup(t, n)
    );
    notes.push(format!(
        "lock_handoff: B waits {} ms in acquire(Wait::Forever); time from A's release \
         returning to B's acquire returning; req/op counted over that window only",
        HANDOFF_WAIT.as_millis()
    ));
    notes.push(
        "watch_latency: from the start of join_group to the watcher's event stream yielding \
         the member; req/op counts both coordinators over that window"
            .to_owned(),
    );
    notes.push(
        "ops/s = operations / summed operation time (1 / mean latency); ×floor = median / \
         floor_rtt median"
            .to_owned(),
    );
    Ok((figures, notes))
}

async fn redis_ping(t: &Target, n: usize) -> Result<Measured> {
    let url = format!("redis://{}/", t.raw_addr()?);
    let client = redis::Client::open(url.as_str())?;
    let mut con = client
        .get_multiplexed_async_connection()
        .await
        .context("raw Redis connection")?;
    for _ in 0..10 {
        let _: String = redis::cmd("PING").query_async(&mut con).await?;
    }
    let w = Window::open(t);
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        let pong: String = redis::cmd("PING").query_async(&mut con).await?;
        samples.push(start.elapsed());
        ensure!(pong == "PONG", "PING answered {pong:?}");
    }
    Ok(Measured {
        samples,
        ops_per_sample: 1,
        round_trips: w.close(t),
    })
}

#[cfg(feature = "zookeeper")]
async fn zk_client(t: &Target) -> Result<zookeeper_client::Client> {
    let hosts = t.raw_addr()?;
    zookeeper_client::Client::connect(&hosts)
        .await
        .with_context(|| format!("raw ZooKeeper connection to {hosts}"))
}

#[cfg(feature = "zookeeper")]
async fn zk_exists(t: &Target, n: usize) -> Result<Measured> {
    let zk = zk_client(t).await?;
    for _ in 0..10 {
        zk.check_stat("/").await?;
    }
    let w = Window::open(t);
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        let stat = zk.check_stat("/").await?;
        samples.push(start.elapsed());
        ensure!(stat.is_some(), "the root znode does not exist");
    }
    Ok(Measured {
        samples,
        ops_per_sample: 1,
        round_trips: w.close(t),
    })
}

#[cfg(feature = "zookeeper")]
async fn zk_create_delete(t: &Target, n: usize) -> Result<Measured> {
    use zookeeper_client::{Acls, CreateMode};
    let zk = zk_client(t).await?;
    let path = format!("/{}", t.name("floor-write"));
    let opts = CreateMode::Ephemeral.with_acls(Acls::anyone_all());
    for _ in 0..10 {
        zk.create(&path, b"", &opts).await?;
        zk.delete(&path, None).await?;
    }
    let w = Window::open(t);
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        zk.create(&path, b"", &opts).await?;
        zk.delete(&path, None).await?;
        samples.push(start.elapsed());
    }
    Ok(Measured {
        samples,
        ops_per_sample: 1,
        round_trips: w.close(t),
    })
}

#[cfg(feature = "etcd")]
async fn etcd_client(t: &Target) -> Result<etcd_client::Client> {
    let endpoint = format!("http://{}", t.raw_addr()?);
    etcd_client::Client::connect([endpoint.as_str()], None)
        .await
        .with_context(|| format!("raw etcd connection to {endpoint}"))
}

#[cfg(feature = "etcd")]
async fn etcd_range(t: &Target, n: usize) -> Result<Measured> {
    let mut kv = etcd_client(t).await?.kv_client();
    let key = format!("tooz-bench/{}", t.name("floor-read"));
    kv.put(key.as_str(), "x", None).await?;
    for _ in 0..10 {
        kv.get(key.as_str(), None).await?;
    }
    let w = Window::open(t);
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        let got = kv.get(key.as_str(), None).await?;
        samples.push(start.elapsed());
        ensure!(got.kvs().len() == 1, "the floor key vanished");
    }
    let round_trips = w.close(t);
    kv.delete(key.as_str(), None).await?;
    Ok(Measured {
        samples,
        ops_per_sample: 1,
        round_trips,
    })
}

#[cfg(feature = "etcd")]
async fn etcd_put(t: &Target, n: usize) -> Result<Measured> {
    let mut kv = etcd_client(t).await?.kv_client();
    let key = format!("tooz-bench/{}", t.name("floor-write"));
    for _ in 0..10 {
        kv.put(key.as_str(), "x", None).await?;
    }
    let w = Window::open(t);
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        kv.put(key.as_str(), "x", None).await?;
        samples.push(start.elapsed());
    }
    let round_trips = w.close(t);
    kv.delete(key.as_str(), None).await?;
    Ok(Measured {
        samples,
        ops_per_sample: 1,
        round_trips,
    })
}

#[cfg(feature = "memcached")]
pub(crate) async fn mc_get(t: &Target, n: usize) -> Result<Measured> {
    use async_memcached::{Client, MetaProtocol};
    let addr = t.raw_addr()?;
    let mut mc = Client::new(format!("tcp://{addr}"))
        .await
        .with_context(|| format!("raw memcached connection to {addr}"))?;
    let key = format!("tooz-bench/{}", t.name("floor-read"));
    mc.meta_set(key.as_bytes(), "x", false, None, Some(&["T300"]))
        .await?;
    for _ in 0..10 {
        mc.meta_get(key.as_bytes(), false, None, Some(&["v"]))
            .await?;
    }
    let w = Window::open(t);
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        let got = mc
            .meta_get(key.as_bytes(), false, None, Some(&["v"]))
            .await?;
        samples.push(start.elapsed());
        ensure!(got.and_then(|v| v.data).is_some(), "the floor key vanished");
    }
    let round_trips = w.close(t);
    mc.meta_delete(key.as_bytes(), false, None, None).await?;
    Ok(Measured {
        samples,
        ops_per_sample: 1,
        round_trips,
    })
}

#[cfg(feature = "consul")]
pub(crate) async fn consul_kv(t: &Target, n: usize, write: bool) -> Result<Measured> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = reqwest::Client::new();
    let url = format!(
        "http://{}/v1/kv/tooz-bench/{}",
        t.raw_addr()?,
        t.name(if write { "floor-write" } else { "floor-read" })
    );
    let once = |put: bool| {
        let r = if put {
            http.put(&url).body("x")
        } else {
            http.get(&url)
        };
        async move {
            let resp = r.send().await?;
            ensure!(
                resp.status().is_success(),
                "the agent answered {}",
                resp.status()
            );
            resp.bytes().await?;
            Ok::<_, anyhow::Error>(())
        }
    };
    once(true).await?;
    for _ in 0..10 {
        once(write).await?;
    }
    let w = Window::open(t);
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        once(write).await?;
        samples.push(start.elapsed());
    }
    let round_trips = w.close(t);
    http.delete(&url).send().await?;
    Ok(Measured {
        samples,
        ops_per_sample: 1,
        round_trips,
    })
}

/// The SQL floors: `SELECT 1` and a one-row `UPDATE` on one sqlx connection.
#[cfg(any(feature = "postgresql", feature = "mysql"))]
pub(crate) mod sql_floor {
    use std::time::Instant;

    use anyhow::{Context, Result};
    use sqlx::Connection;

    use crate::{Target, report::Measured};

    use super::Window;

    /// Times `$sql` on the connection `$c` (the same code for both databases; sqlx's
    /// executor traits do not make a generic function easy).
    macro_rules! run {
        ($t:expr, $c:expr, $n:expr, $sql:expr) => {{
            let (t, mut c, n, sql) = ($t, $c, $n, $sql);
            for _ in 0..10 {
                sqlx::query(sql).execute(&mut c).await?;
            }
            let w = Window::open(t);
            let mut samples = Vec::with_capacity(n);
            for _ in 0..n {
                let start = Instant::now();
                sqlx::query(sql).execute(&mut c).await?;
                samples.push(start.elapsed());
            }
            let round_trips = w.close(t);
            c.close().await?;
            Ok(Measured {
                samples,
                ops_per_sample: 1,
                round_trips,
            })
        }};
    }

    #[cfg(feature = "postgresql")]
    pub(crate) async fn pg(t: &Target, n: usize, write: bool) -> Result<Measured> {
        let url = t.raw_url();
        let opts = tooz_sql::PgConfig::from_url_str(&url)?.connect;
        let mut c = sqlx::PgConnection::connect_with(&opts)
            .await
            .with_context(|| format!("raw PostgreSQL connection to {url}"))?;
        if !write {
            return run!(t, c, n, "SELECT 1");
        }
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS tooz_bench_floor (id int PRIMARY KEY, v bigint NOT NULL)",
        )
        .execute(&mut c)
        .await?;
        sqlx::query(
            "INSERT INTO tooz_bench_floor (id, v) VALUES (1, 0) ON CONFLICT (id) DO NOTHING",
        )
        .execute(&mut c)
        .await?;
        run!(
            t,
            c,
            n,
            "UPDATE tooz_bench_floor SET v = v + 1 WHERE id = 1"
        )
    }

    #[cfg(feature = "mysql")]
    pub(crate) async fn mysql(t: &Target, n: usize, write: bool) -> Result<Measured> {
        let url = t.raw_url();
        let opts = tooz_sql::MySqlConfig::from_url_str(&url)?.connect;
        let mut c = sqlx::MySqlConnection::connect_with(&opts)
            .await
            .with_context(|| format!("raw MySQL connection to {url}"))?;
        if !write {
            return run!(t, c, n, "SELECT 1");
        }
        sqlx::query("CREATE TABLE IF NOT EXISTS tooz_bench_floor (id INT PRIMARY KEY, v BIGINT NOT NULL) ENGINE=InnoDB")
            .execute(&mut c)
            .await?;
        sqlx::query("INSERT IGNORE INTO tooz_bench_floor (id, v) VALUES (1, 0)")
            .execute(&mut c)
            .await?;
        run!(
            t,
            c,
            n,
            "UPDATE tooz_bench_floor SET v = v + 1 WHERE id = 1"
        )
    }
}

fn ofd(file: &std::fs::File, l_type: libc::c_int) -> Result<()> {
    let fl = libc::flock {
        l_type: l_type as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    };
    nix::fcntl::fcntl(file, nix::fcntl::FcntlArg::F_OFD_SETLK(&fl))?;
    Ok(())
}

#[cfg(feature = "ipc")]
fn ipc_floor(n: usize) -> Result<Measured> {
    Ok(Measured {
        samples: tooz_ipc::floor::semaphore_pairs(n)?,
        ops_per_sample: 1,
        round_trips: None,
    })
}

#[cfg(not(feature = "ipc"))]
fn ipc_floor(_n: usize) -> Result<Measured> {
    anyhow::bail!("tooz-bench was built without the ipc feature")
}

fn file_lock_floor(dir: &std::path::Path, n: usize) -> Result<Measured> {
    let file = std::fs::File::create(dir.join("floor.lock"))?;
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        ofd(&file, libc::F_WRLCK)?;
        ofd(&file, libc::F_UNLCK)?;
        samples.push(start.elapsed());
    }
    Ok(Measured {
        samples,
        ops_per_sample: 1,
        round_trips: None,
    })
}

fn file_write_floor(dir: &std::path::Path, n: usize) -> Result<Measured> {
    let target = dir.join("floor.data");
    let data = [0x5au8; 64];
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let tmp = dir.join(format!("floor.tmp.{i}"));
        let start = Instant::now();
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        f.write_all(&data)?;
        drop(f);
        std::fs::rename(&tmp, &target)?;
        samples.push(start.elapsed());
    }
    Ok(Measured {
        samples,
        ops_per_sample: 1,
        round_trips: None,
    })
}

async fn lock_pair(t: &Target, n: usize) -> Result<Measured> {
    let c = t.coordinator("lock-pair", true).await?;
    let lock = c.get_lock(t.name("lock-pair"))?;
    for _ in 0..10 {
        ensure!(
            lock.acquire(Wait::Forever).await?,
            "uncontended acquire failed"
        );
        lock.release().await?;
    }
    let w = Window::open(t);
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        ensure!(
            lock.acquire(Wait::Forever).await?,
            "uncontended acquire failed"
        );
        ensure!(
            lock.release().await?,
            "release of a held lock returned false"
        );
        samples.push(start.elapsed());
    }
    let round_trips = w.close(t);
    c.stop().await?;
    Ok(Measured {
        samples,
        ops_per_sample: 1,
        round_trips,
    })
}

async fn lock_handoff(t: &Target, n: usize) -> Result<Measured> {
    let a = t.coordinator("handoff-a", true).await?;
    let b = t.coordinator("handoff-b", true).await?;
    let name = t.name("handoff");
    let la = a.get_lock(name.as_str())?;
    let mut lb = Some(b.get_lock(name.as_str())?);
    let mut samples = Vec::with_capacity(n);
    let mut round_trips = Some(0);
    for _ in 0..n {
        ensure!(
            la.acquire(Wait::Forever).await?,
            "A could not take the lock"
        );
        let l = lb.take().context("B's lock went missing")?;
        let waiter = tokio::spawn(async move {
            let res = l.acquire(Wait::Forever).await;
            let at = Instant::now();
            (l, res, at)
        });
        tokio::time::sleep(HANDOFF_WAIT).await;
        ensure!(!waiter.is_finished(), "B acquired a lock A holds");
        let w = Window::open(t);
        ensure!(la.release().await?, "A's release returned false");
        let released = Instant::now();
        let (l, res, acquired) = waiter.await?;
        add(&mut round_trips, w.close(t));
        ensure!(res?, "B's blocking acquire gave up");
        samples.push(acquired.saturating_duration_since(released));
        l.release().await?;
        lb = Some(l);
    }
    a.stop().await?;
    b.stop().await?;
    Ok(Measured {
        samples,
        ops_per_sample: 1,
        round_trips,
    })
}

async fn join_leave(t: &Target, n: usize) -> Result<Measured> {
    let group = t.name("join-leave");
    let owner = t.coordinator("join-leave-owner", false).await?;
    owner.create_group(group.as_str()).await?;
    let j = t.coordinator("join-leave", true).await?;
    for _ in 0..10 {
        j.join_group(group.as_str(), &()).await?;
        j.leave_group(group.as_str()).await?;
    }
    let w = Window::open(t);
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        j.join_group(group.as_str(), &()).await?;
        j.leave_group(group.as_str()).await?;
        samples.push(start.elapsed());
    }
    let round_trips = w.close(t);
    j.stop().await?;
    let _ = owner.delete_group(group.as_str()).await;
    owner.stop().await?;
    Ok(Measured {
        samples,
        ops_per_sample: 1,
        round_trips,
    })
}

async fn stop_all(coords: Vec<Coordinator>) -> Result<()> {
    for chunk in coords.chunks(SETUP_CHUNK) {
        try_join_all(chunk.iter().map(Coordinator::stop)).await?;
    }
    Ok(())
}

async fn get_members(t: &Target, members: usize, n: usize) -> Result<Measured> {
    let group = t.name("members");
    let reader = t.coordinator("members-reader", true).await?;
    reader.create_group(group.as_str()).await?;
    // memcached: the test server takes 1,024 connections (`-c 1024`) and every started
    // coordinator keeps its pooled connection open, so 1,000 of them would exhaust it.
    // A member stays in the group while its liveness key lives (`membership_timeout`, 30 s,
    // far longer than set-up plus measurement), so each chunk of members is dropped
    // (closing its connections) once joined, and reconnected in chunks afterwards to leave.
    // Consul: the agent takes 200 concurrent HTTP connections per client address
    // (`http_max_conns_per_client`); members live on their sessions (`ttl=120`, no
    // heartbeat needed meanwhile), so they are parked the same way. The SQL servers
    // take 200 (PostgreSQL here) and 151 (MariaDB) connections, and every started
    // coordinator keeps a session connection: the same parking, the members staying
    // while their lease rows live (`timeout=300`).
    let parked = matches!(t.driver, "memcached" | "consul" | "postgresql" | "mysql");
    // Two connections per SQL coordinator (its pool and its session): fewer at once.
    let chunk_size = if matches!(t.driver, "postgresql" | "mysql") {
        SETUP_CHUNK / 5
    } else {
        SETUP_CHUNK
    };
    let started = Instant::now();
    let mut coords = Vec::with_capacity(members);
    for chunk in (0..members).collect::<Vec<_>>().chunks(chunk_size) {
        let batch = try_join_all(chunk.iter().map(|i| {
            let group = group.as_str();
            async move {
                let c = t.coordinator(&format!("m{i:04}"), false).await?;
                c.join_group(group, &()).await?;
                Ok::<_, anyhow::Error>(c)
            }
        }))
        .await?;
        if !parked {
            coords.extend(batch);
        }
    }
    eprintln!(
        "tooz-bench: {}: {members} members joined in {:.1} s",
        t.driver,
        started.elapsed().as_secs_f64()
    );

    let result = async {
        let got = reader.get_members(group.as_str()).await?.len();
        ensure!(got == members, "expected {members} members, got {got}");
        let w = Window::open(t);
        let mut samples = Vec::with_capacity(n);
        for _ in 0..n {
            let start = Instant::now();
            let got = black_box(reader.get_members(group.as_str()).await?);
            samples.push(start.elapsed());
            ensure!(got.len() == members, "member count changed: {}", got.len());
        }
        Ok(Measured {
            samples,
            ops_per_sample: 1,
            round_trips: w.close(t),
        })
    }
    .await;
    if parked {
        for chunk in (0..members).collect::<Vec<_>>().chunks(chunk_size) {
            try_join_all(chunk.iter().map(|i| {
                let group = group.as_str();
                async move {
                    let c = t.coordinator(&format!("m{i:04}"), false).await?;
                    c.leave_group(group).await?;
                    c.stop().await?;
                    Ok::<_, anyhow::Error>(())
                }
            }))
            .await?;
        }
    }
    stop_all(coords).await?;
    let _ = reader.delete_group(group.as_str()).await;
    reader.stop().await?;
    result
}

async fn heartbeat(t: &Target, count: usize, n: usize) -> Result<Measured> {
    let h = t.coordinator("heartbeat", true).await?;
    let mut locks = Vec::with_capacity(count);
    for i in 0..count {
        h.join_group_create(t.name(&format!("hb-g{i:03}")).as_str(), &())
            .await?;
        let lock = h.get_lock(t.name(&format!("hb-l{i:03}")).as_str())?;
        ensure!(lock.acquire(Wait::No).await?, "could not take lock {i}");
        locks.push(lock);
    }
    let w = Window::open(t);
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        black_box(h.heartbeat().await?);
        samples.push(start.elapsed());
    }
    let round_trips = w.close(t);
    for lock in &locks {
        lock.release().await?;
    }
    for i in 0..count {
        let g = t.name(&format!("hb-g{i:03}"));
        h.leave_group(g.as_str()).await?;
        let _ = h.delete_group(g.as_str()).await;
    }
    h.stop().await?;
    Ok(Measured {
        samples,
        ops_per_sample: 1,
        round_trips,
    })
}

/// Waits for `want` about `member` on `events`, skipping anything else.
pub(crate) async fn wait_event(
    events: &mut tooz_core::EventStream,
    member: &MemberId,
    joined: bool,
) -> Result<()> {
    let deadline = Instant::now() + EVENT_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(ev) = tokio::time::timeout(left, events.next_event()).await else {
            bail!(
                "no {} event for {member} within {EVENT_TIMEOUT:?}",
                if joined { "join" } else { "leave" }
            );
        };
        match ev {
            None => bail!("the event stream ended"),
            Some(GroupEvent::MemberJoined { member: m, .. }) if joined && m == *member => {
                return Ok(());
            }
            Some(GroupEvent::MemberLeft { member: m, .. }) if !joined && m == *member => {
                return Ok(());
            }
            Some(_) => {}
        }
    }
}

async fn watch_latency(t: &Target, n: usize) -> Result<Measured> {
    let group = t.name("watch");
    let watcher = t.coordinator("watcher", true).await?;
    watcher.create_group(group.as_str()).await?;
    let mut events = watcher.events(group.as_str()).await?;
    let joiner = t.coordinator("watch-joiner", true).await?;
    let me = joiner.member_id().clone();
    let mut samples = Vec::with_capacity(n);
    let mut round_trips = Some(0);
    for _ in 0..n {
        let w = Window::open(t);
        let start = Instant::now();
        joiner.join_group(group.as_str(), &()).await?;
        wait_event(&mut events, &me, true).await?;
        samples.push(start.elapsed());
        add(&mut round_trips, w.close(t));
        joiner.leave_group(group.as_str()).await?;
        wait_event(&mut events, &me, false).await?;
        // Coordinators here run without a heartbeat task; on a polled backend (memcached)
        // the run outlasts the liveness TTL, and a member whose key expired is not seen.
        joiner.heartbeat().await?;
    }
    drop(events);
    joiner.stop().await?;
    let _ = watcher.delete_group(group.as_str()).await;
    watcher.stop().await?;
    Ok(Measured {
        samples,
        ops_per_sample: 1,
        round_trips,
    })
}

async fn partition_lookup(t: &Target, run_for: Duration) -> Result<Measured> {
    const BATCH: usize = 1000;
    let group = t.name("partition");
    let mut coords = Vec::new();
    let mut partitioners = Vec::new();
    for i in 0..10 {
        let c = t.coordinator(&format!("p{i}"), i == 0).await?;
        partitioners.push(c.join_partitioned_group(group.as_str(), 1, 32).await?);
        coords.push(c);
    }
    let p = &partitioners[0];
    p.refresh().await?;
    ensure!(
        p.members().len() == 10,
        "partitioner sees {} members",
        p.members().len()
    );
    let keys: Vec<String> = (0..4096).map(|i| format!("object-{i}")).collect();
    let w = Window::open(t);
    let mut samples = Vec::new();
    let started = Instant::now();
    let mut k = 0;
    while started.elapsed() < run_for {
        let start = Instant::now();
        for _ in 0..BATCH {
            black_box(p.members_for_object(keys[k].as_str(), &[], 1));
            k = (k + 1) % keys.len();
        }
        samples.push(start.elapsed());
    }
    let round_trips = w.close(t);
    for (c, p) in coords.iter().zip(partitioners) {
        c.leave_partitioned_group(p).await?;
    }
    let _ = coords[0].delete_group(group.as_str()).await;
    stop_all(coords).await?;
    Ok(Measured {
        samples,
        ops_per_sample: BATCH as u64,
        round_trips,
    })
}
