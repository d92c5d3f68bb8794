//! One client process of the run: the workload.
//!
//! Until its deadline it loops over, at random (seeded):
//! - **lock**: take one of three locks (waiting up to a second), hold it a little while
//!   watching its loss signal, write to the fenced register with the grant's token
//!   unless the hold was lost, release. Events: `acquired` (token), then `lost` or
//!   `released` — the interval in between is when this client believed it held the lock;
//!   the register logs the `write` and whether it was accepted.
//! - **caps**: update its capabilities in the members group to a new sequence number;
//!   `cap_ack` once the update returned success.
//! - **leader**: campaign once in the leader group; when granted (`leader`, token), hold
//!   a little while, write to the register's `leader` key with the token unless lost, and
//!   stand down (`leader_end`, or `leader_lost`).
//! - **rejoin**: leave the members group and join it again with the next sequence number.
//!
//! A client stops writing once it sees a loss (DESIGN §5). Every backend call is bounded;
//! a failure is an `error` event (counted, not a violation). At the deadline it reports
//! `idle` (its last acknowledged sequence and whether it is joined), waits for `bye`,
//! leaves and stops.

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context, Result, bail};
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines},
    net::{
        TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
};
use tooz::{ConnectOptions, Coordinator, ToozError, Wait};

use crate::{Event, now_ns, profile};

/// Options of `tooz-chaos client`.
#[derive(Debug)]
pub(crate) struct ClientArgs {
    id: String,
    driver: String,
    url: String,
    register: SocketAddr,
    deadline_ns: u64,
    seed: u64,
    run: String,
}

pub(crate) fn parse(args: &[String]) -> Result<ClientArgs> {
    let mut c = ClientArgs {
        id: String::new(),
        driver: String::new(),
        url: String::new(),
        register: SocketAddr::from(([127, 0, 0, 1], 0)),
        deadline_ns: 0,
        seed: 0,
        run: String::new(),
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it
            .next()
            .with_context(|| format!("client: `{flag}` needs a value"))?;
        match flag.as_str() {
            "--id" => c.id.clone_from(value),
            "--driver" => c.driver.clone_from(value),
            "--url" => c.url.clone_from(value),
            "--register" => c.register = value.parse().context("client: --register")?,
            "--deadline-ns" => c.deadline_ns = value.parse().context("client: --deadline-ns")?,
            "--seed" => c.seed = value.parse().context("client: --seed")?,
            "--run" => c.run.clone_from(value),
            other => bail!("client: unknown option `{other}`"),
        }
    }
    if c.id.is_empty() || c.url.is_empty() || c.run.is_empty() || c.deadline_ns == 0 {
        bail!("client: --id, --url, --run and --deadline-ns are required");
    }
    Ok(c)
}

/// The capabilities every member publishes.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct Caps {
    pub(crate) client: String,
    pub(crate) seq: u64,
}

/// The names a run uses, shared by the orchestrator.
pub(crate) fn members_group(run: &str) -> String {
    format!("chaos-{run}-members")
}
pub(crate) fn leader_group(run: &str) -> String {
    format!("chaos-{run}-leader")
}
pub(crate) fn lock_name(run: &str, i: u32) -> String {
    format!("chaos-{run}-lock-{i}")
}
/// How many locks the clients share.
pub(crate) const LOCKS: u32 = 3;

/// Connects a coordinator with the driver's chaos options.
pub(crate) fn connect(driver: &str, url: &str, id: &str) -> Result<Coordinator> {
    let p = profile::profile(driver).with_context(|| format!("no chaos profile for {driver}"))?;
    let mut opts = ConnectOptions::new();
    for (k, v) in p.options {
        opts = opts.option(*k, *v);
    }
    tooz::connect_with(url, id, &opts).with_context(|| format!("cannot connect to {url}"))
}

struct Link {
    id: String,
    lines: Lines<BufReader<OwnedReadHalf>>,
    write: OwnedWriteHalf,
}

impl Link {
    async fn send(&mut self, mut ev: Event) -> Result<()> {
        ev.c.clone_from(&self.id);
        let mut line = serde_json::to_string(&ev)?;
        line.push('\n');
        self.write
            .write_all(line.as_bytes())
            .await
            .context("the orchestrator went away")
    }

    async fn reply(&mut self) -> Result<String> {
        self.lines
            .next_line()
            .await?
            .context("the orchestrator closed the register connection")
    }

    /// A fenced write; whether the register accepted it.
    async fn fenced_write(&mut self, key: &str, token: u64) -> Result<bool> {
        self.send(Event::new("", "write").lock(key).token(token))
            .await?;
        Ok(self.reply().await? == "ok")
    }

    /// Records a failed operation, then paces the loop: a client whose server is down
    /// retries at most ten times a second, as an application would.
    async fn error(&mut self, op: &str, e: impl std::fmt::Display) -> Result<()> {
        self.send(Event::new("", "error").detail(format!("{op}: {e}")))
            .await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
        Ok(())
    }
}

struct Client {
    coord: Coordinator,
    link: Link,
    rng: StdRng,
    run: String,
    op_timeout: Duration,
    seq: u64,
    acked: u64,
    joined: bool,
}

pub(crate) async fn run(args: ClientArgs) -> Result<()> {
    let stream = TcpStream::connect(args.register)
        .await
        .with_context(|| format!("cannot reach the orchestrator at {}", args.register))?;
    let (read, write) = stream.into_split();
    let mut link = Link {
        id: args.id.clone(),
        lines: BufReader::new(read).lines(),
        write,
    };
    let p = profile::profile(&args.driver).context("no chaos profile")?;
    let op_timeout = p.lease * 2 + Duration::from_secs(2);
    let coord = connect(&args.driver, &args.url, &args.id)?;
    match tokio::time::timeout(op_timeout * 2, coord.start(true)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            link.error("start", &e).await?;
            bail!("start: {e}");
        }
        Err(_) => {
            link.error("start", "timed out").await?;
            bail!("start timed out");
        }
    }
    link.send(Event::new("", "started")).await?;
    let mut c = Client {
        coord,
        link,
        rng: StdRng::seed_from_u64(args.seed),
        run: args.run.clone(),
        op_timeout,
        seq: 0,
        acked: 0,
        joined: false,
    };
    c.join().await?;
    let leader_group = leader_group(&c.run);
    if let Err(e) = bounded(op_timeout, c.coord.join_group(leader_group.as_str(), &())).await {
        c.link.error("join leader group", e).await?;
    }

    while now_ns() < args.deadline_ns {
        let r = c.rng.random_range(0..100u32);
        if r < 55 {
            c.lock_op().await?;
        } else if r < 75 {
            c.caps_op().await?;
        } else if r < 92 {
            c.leader_op(&leader_group).await?;
        } else {
            c.rejoin_op().await?;
        }
    }
    // Recovery, after the last fault: one more acknowledged update (which finds out
    // whether the membership survived), and a member that is not joined joins again.
    let before = c.acked;
    for _ in 0..3 {
        c.caps_op().await?;
        if c.joined && c.acked > before {
            break;
        }
    }
    let acked = c.acked;
    let joined = c.joined;
    c.link
        .send(Event::new("", "idle").seq(acked).ok(joined))
        .await?;
    let bye = c.link.reply().await?;
    if bye != "bye" {
        bail!("expected `bye` from the orchestrator, got {bye:?}");
    }
    let _ = bounded(
        op_timeout,
        c.coord.leave_group(members_group(&c.run).as_str()),
    )
    .await;
    let _ = bounded(op_timeout, c.coord.stop()).await;
    Ok(())
}

/// A failed call: its message, and whether it says this member is not (or no longer)
/// in the group.
#[derive(Debug)]
struct OpError {
    message: String,
    not_joined: bool,
}

impl From<ToozError> for OpError {
    fn from(e: ToozError) -> Self {
        OpError {
            not_joined: matches!(
                e,
                ToozError::MemberNotJoined { .. } | ToozError::GroupNotCreated(_)
            ),
            message: e.to_string(),
        }
    }
}

/// A backend call bounded by `limit`: a timeout is an error like any other.
async fn bounded<T>(
    limit: Duration,
    f: impl std::future::Future<Output = tooz::Result<T>>,
) -> std::result::Result<T, String> {
    match tokio::time::timeout(limit, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("timed out after {limit:?}")),
    }
}

impl Client {
    fn caps(&self, seq: u64) -> Caps {
        Caps {
            client: self.link.id.clone(),
            seq,
        }
    }

    async fn join(&mut self) -> Result<()> {
        self.seq += 1;
        let caps = self.caps(self.seq);
        let group = members_group(&self.run);
        match tokio::time::timeout(
            self.op_timeout,
            self.coord.join_group_create(group.as_str(), &caps),
        )
        .await
        {
            Ok(Ok(())) | Ok(Err(ToozError::MemberAlreadyExist { .. })) => {
                // Already a member (a rejoin after a loss): publish the new sequence.
                if let Ok(Err(e)) = tokio::time::timeout(
                    self.op_timeout,
                    self.coord.update_capabilities(group.as_str(), &caps),
                )
                .await
                {
                    self.link.error("join: update", e).await?;
                    return Ok(());
                }
                self.joined = true;
                self.acked = self.seq;
                self.link
                    .send(Event::new("", "cap_ack").seq(self.seq).detail("join"))
                    .await?;
            }
            Ok(Err(e)) => self.link.error("join", e).await?,
            Err(_) => self.link.error("join", "timed out").await?,
        }
        Ok(())
    }

    async fn lock_op(&mut self) -> Result<()> {
        let name = lock_name(&self.run, self.rng.random_range(0..LOCKS));
        let lock = match self.coord.get_lock(name.as_str()) {
            Ok(l) => l,
            Err(e) => return self.link.error("get_lock", e).await,
        };
        let guard = match bounded(
            self.op_timeout,
            lock.guard(Wait::For(Duration::from_secs(1))),
        )
        .await
        {
            Ok(Some(g)) => g,
            Ok(None) => {
                return self.link.send(Event::new("", "busy").lock(&name)).await;
            }
            Err(e) => return self.link.error("acquire", e).await,
        };
        let token = guard.token().0;
        self.link
            .send(Event::new("", "acquired").lock(&name).token(token))
            .await?;
        let lost = guard.lost();
        let hold = Duration::from_millis(self.rng.random_range(20..200));
        let lost_early = tokio::select! {
            () = lost.clone().lost() => true,
            () = tokio::time::sleep(hold) => false,
        };
        if lost_early || lost.is_lost() {
            self.link
                .send(Event::new("", "lost").lock(&name).token(token))
                .await?;
            drop(guard);
            return Ok(());
        }
        self.link.fenced_write(&name, token).await?;
        // The client stops believing it holds the lock when it decides to release (it
        // writes no more): the end of its interval. The release returning is later by
        // a round trip, during which the server may already have granted the lock.
        let release_called = now_ns();
        let release = tokio::time::timeout(self.op_timeout, guard.release());
        tokio::pin!(release);
        let end = tokio::select! {
            biased;
            r = &mut release => match r {
                Ok(Ok(_)) => Event::new("", "released").ok(true),
                Ok(Err(e)) => Event::new("", "released").ok(false).detail(e.to_string()),
                Err(_) => Event::new("", "released").ok(false).detail("timed out"),
            },
            // The release itself ends the hold, which resolves the signal too.
            () = lost.clone().lost() => Event::new("", "released").detail("loss signalled during release"),
        };
        let mut end = end.lock(&name).token(token);
        end.t = release_called;
        self.link.send(end).await
    }

    async fn caps_op(&mut self) -> Result<()> {
        if !self.joined {
            return self.join().await;
        }
        self.seq += 1;
        let caps = self.caps(self.seq);
        let group = members_group(&self.run);
        match tokio::time::timeout(
            self.op_timeout,
            self.coord.update_capabilities(group.as_str(), &caps),
        )
        .await
        .map_err(|_| OpError {
            message: format!("timed out after {:?}", self.op_timeout),
            not_joined: false,
        })
        .and_then(|r| r.map_err(OpError::from))
        {
            Ok(()) => {
                self.acked = self.seq;
                self.link
                    .send(Event::new("", "cap_ack").seq(self.seq))
                    .await
            }
            Err(e) => {
                if e.not_joined {
                    // The membership (or the group: a server restarted empty) is gone:
                    // join again, as an application would.
                    self.joined = false;
                }
                self.link.error("update_capabilities", e.message).await
            }
        }
    }

    async fn rejoin_op(&mut self) -> Result<()> {
        if self.joined {
            let group = members_group(&self.run);
            match bounded(self.op_timeout, self.coord.leave_group(group.as_str())).await {
                Ok(()) => {
                    self.joined = false;
                    self.link.send(Event::new("", "left")).await?;
                }
                Err(e) => return self.link.error("leave", e).await,
            }
        }
        self.join().await
    }

    async fn leader_op(&mut self, group: &str) -> Result<()> {
        let leadership = match bounded(self.op_timeout, self.coord.try_become_leader(group)).await {
            Ok(Some(l)) => l,
            Ok(None) => return self.link.send(Event::new("", "follower")).await,
            Err(e) => return self.link.error("campaign", e).await,
        };
        let token = leadership.token().0;
        self.link
            .send(Event::new("", "leader").lock("leader").token(token))
            .await?;
        let lost = leadership.lost();
        let hold = Duration::from_millis(self.rng.random_range(50..300));
        let lost_early = tokio::select! {
            () = lost.clone().lost() => true,
            () = tokio::time::sleep(hold) => false,
        };
        if lost_early || lost.is_lost() {
            return self
                .link
                .send(Event::new("", "leader_lost").lock("leader").token(token))
                .await;
        }
        self.link.fenced_write("leader", token).await?;
        let stand_down_called = now_ns();
        let end = match bounded(self.op_timeout, self.coord.stand_down_group_leader(group)).await {
            Ok(_) => Event::new("", "leader_end").ok(true),
            Err(e) => Event::new("", "leader_end").ok(false).detail(e),
        };
        let mut end = end.lock("leader").token(token);
        end.t = stand_down_called;
        self.link.send(end).await
    }
}
