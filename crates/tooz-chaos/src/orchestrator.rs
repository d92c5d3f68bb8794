//! `tooz-chaos run`: sets the run up, spawns the clients, runs the nemesis, waits for
//! the clients (killing stragglers), checks the final membership, and hands the history
//! to the checker.

use std::{
    collections::BTreeMap,
    fs,
    net::SocketAddr,
    path::Path,
    process::Stdio,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result};
use tokio::{net::TcpListener, process::Child};
use tooz::ToozError;
use tooz_conformance::fault::{FaultProxy, proxied_url, url_target};

use crate::{
    Event, RunArgs, checker,
    client::{self, Caps},
    nemesis, now_ns,
    profile::{self, Profile},
    register::{self, Shared},
};

/// One client process and the proxy in front of it.
#[derive(Debug)]
pub(crate) struct Slot {
    pub(crate) id: String,
    pub(crate) generation: u32,
    pub(crate) child: Child,
    pub(crate) proxy: Option<FaultProxy>,
    /// The URL it connects with (through its proxy).
    url: String,
}

impl Slot {
    pub(crate) fn pid(&self) -> Option<i32> {
        self.child.id().and_then(|p| i32::try_from(p).ok())
    }
}

/// Everything the nemesis needs to reach the clients.
#[derive(Debug)]
pub(crate) struct Fleet {
    pub(crate) args: RunArgs,
    pub(crate) profile: &'static Profile,
    pub(crate) shared: Arc<Shared>,
    pub(crate) run: String,
    pub(crate) deadline_ns: u64,
    register: SocketAddr,
    pub(crate) slots: tokio::sync::Mutex<Vec<Slot>>,
    /// Clients killed by the nemesis, for the final accounting.
    pub(crate) killed: Mutex<Vec<String>>,
}

impl Fleet {
    /// Starts client `index` of generation `generation` with `url`.
    pub(crate) fn spawn(&self, index: usize, generation: u32, url: &str) -> Result<Child> {
        let id = client_id(index, generation);
        let exe = std::env::current_exe().context("cannot find the tooz-chaos executable")?;
        let log = fs::File::create(self.args.out.join(format!("{id}.log")))
            .with_context(|| format!("cannot create the log of {id}"))?;
        let log2 = log.try_clone()?;
        let seed = self
            .args
            .seed
            .wrapping_mul(1000)
            .wrapping_add((index as u64) * 31 + u64::from(generation));
        tokio::process::Command::new(exe)
            .arg("client")
            .args(["--id", &id, "--driver", &self.args.driver, "--url", url])
            .args(["--register", &self.register.to_string()])
            .args(["--deadline-ns", &self.deadline_ns.to_string()])
            .args(["--seed", &seed.to_string(), "--run", &self.run])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start client {id}"))
    }

    /// Kills client `index` and starts its next generation (same proxy). Returns the
    /// killed client's id and when the SIGKILL was sent.
    pub(crate) async fn replace(&self, index: usize) -> Result<(String, u64)> {
        let mut slots = self.slots.lock().await;
        let slot = slots
            .get_mut(index)
            .with_context(|| format!("no client slot {index}"))?;
        let killed_at = now_ns();
        let _ = slot.child.start_kill();
        let _ = slot.child.wait().await;
        let generation = slot.generation + 1;
        let child = self.spawn(index, generation, &slot.url)?;
        let old = std::mem::replace(&mut slot.id, client_id(index, generation));
        slot.child = child;
        slot.generation = generation;
        Ok((old, killed_at))
    }
}

/// The last line of a client's log, for a violation's message.
fn log_tail(out: &Path, id: &str) -> String {
    fs::read_to_string(out.join(format!("{id}.log")))
        .ok()
        .and_then(|t| t.lines().last().map(str::to_owned))
        .unwrap_or_else(|| "(empty log)".to_owned())
}

fn client_id(index: usize, generation: u32) -> String {
    format!("c{index}g{generation}")
}

fn prepare_out(out: &Path) -> Result<()> {
    if out.exists() {
        fs::remove_dir_all(out).with_context(|| format!("cannot clear {}", out.display()))?;
    }
    fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))
}

/// Creates the run's groups (an existing group is fine).
async fn setup_groups(args: &RunArgs, run: &str) -> Result<()> {
    let coord = client::connect(&args.driver, &args.url, &format!("chaos-{run}-setup"))?;
    coord.start(false).await.context("setup: start")?;
    for g in [client::members_group(run), client::leader_group(run)] {
        match coord.create_group(g.as_str()).await {
            Ok(()) | Err(ToozError::GroupAlreadyExist(_)) => {}
            Err(e) => return Err(e).with_context(|| format!("setup: create group {g}")),
        }
    }
    coord.stop().await.context("setup: stop")?;
    Ok(())
}

/// What the final membership check found.
#[derive(Debug, Default)]
pub(crate) struct MembershipCheck {
    pub(crate) problems: Vec<String>,
    pub(crate) waited: Duration,
}

/// Check (e): after the faults, every client that says it is joined is a member exactly
/// once, with capabilities at least as new as its last acknowledged update, and no
/// killed client lingers. Polled until it holds or `limit` passes (recovery time).
async fn check_membership(fleet: &Fleet, limit: Duration) -> MembershipCheck {
    let started = std::time::Instant::now();
    let idle = fleet.shared.idle();
    let killed: Vec<String> = fleet
        .killed
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let group = client::members_group(&fleet.run);
    let coord = match client::connect(
        &fleet.args.driver,
        &fleet.args.url,
        &format!("chaos-{}-checker", fleet.run),
    ) {
        Ok(c) => c,
        Err(e) => {
            return MembershipCheck {
                problems: vec![format!("cannot connect the checker: {e:#}")],
                waited: started.elapsed(),
            };
        }
    };
    let mut problems = vec!["the checker did not start".to_owned()];
    if let Err(e) = coord.start(false).await {
        problems = vec![format!("the checker cannot start: {e}")];
    } else {
        loop {
            problems = match coord.get_members_with_capabilities(group.as_str()).await {
                Err(e) => vec![format!("get_members_with_capabilities: {e}")],
                Ok(members) => judge_members(&members, &idle, &killed),
            };
            if problems.is_empty() || started.elapsed() >= limit {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let _ = coord.stop().await;
    }
    MembershipCheck {
        problems,
        waited: started.elapsed(),
    }
}

fn judge_members(
    members: &BTreeMap<tooz::MemberId, tooz::Capabilities>,
    idle: &std::collections::HashMap<String, Event>,
    killed: &[String],
) -> Vec<String> {
    let mut problems = Vec::new();
    for (id, ev) in idle {
        if ev.ok != Some(true) {
            continue;
        }
        let acked = ev.seq.unwrap_or(0);
        let found: Vec<_> = members
            .iter()
            .filter(|(m, _)| m.to_string() == *id)
            .collect();
        match found.as_slice() {
            [] => problems.push(format!(
                "{id} is joined (last ack seq {acked}) but not a member"
            )),
            [(_, caps)] => match caps.decode::<Caps>() {
                Ok(c) if c.client == *id && c.seq >= acked => {}
                Ok(c) => problems.push(format!(
                    "{id}: capabilities {c:?} older than its acknowledged seq {acked}"
                )),
                Err(e) => problems.push(format!("{id}: capabilities unreadable: {e}")),
            },
            more => problems.push(format!("{id} listed {} times", more.len())),
        }
    }
    for k in killed {
        if members.keys().any(|m| m.to_string() == *k) {
            problems.push(format!("killed client {k} is still a member"));
        }
    }
    problems
}

pub(crate) async fn run(args: RunArgs) -> Result<bool> {
    let profile = profile::profile(&args.driver).context("no profile")?;
    prepare_out(&args.out)?;
    let run = format!("{}x{}", args.seed, std::process::id());
    let shared = Shared::new();
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .context("cannot listen for the clients")?;
    let register = listener.local_addr()?;
    tokio::spawn(register::serve(listener, Arc::clone(&shared)));
    setup_groups(&args, &run).await?;

    let started_ns = now_ns();
    let deadline_ns = started_ns + args.seconds * 1_000_000_000;
    let fleet = Arc::new(Fleet {
        args: args.clone(),
        profile,
        shared: Arc::clone(&shared),
        run: run.clone(),
        deadline_ns,
        register,
        slots: tokio::sync::Mutex::new(Vec::new()),
        killed: Mutex::new(Vec::new()),
    });
    // The proxies go in front of the first host only; a cluster client would fail
    // over around it, so cluster runs connect directly.
    let use_proxy = profile.proxy && !args.cluster;
    {
        let mut slots = fleet.slots.lock().await;
        for index in 0..args.clients {
            let (proxy, url) = if use_proxy {
                let target = url_target(&args.url)
                    .with_context(|| format!("no host:port in {}", args.url))?;
                let proxy = FaultProxy::start(target).await?;
                let url = proxied_url(&args.url, &proxy)?;
                (Some(proxy), url)
            } else {
                (None, args.url.clone())
            };
            let child = fleet.spawn(index, 0, &url)?;
            slots.push(Slot {
                id: client_id(index, 0),
                generation: 0,
                child,
                proxy,
                url,
            });
        }
    }
    eprintln!(
        "tooz-chaos: {} on {} for {}s, seed {}, {} clients{}; run {}",
        args.driver,
        args.url,
        args.seconds,
        args.seed,
        args.clients,
        if args.cluster { " (cluster)" } else { "" },
        run
    );

    let probes = nemesis::run(Arc::clone(&fleet)).await;

    // (f) every client reports the end of its workload by the deadline + grace.
    let op_timeout = profile.lease * 2 + Duration::from_secs(2);
    let grace = op_timeout * 4 + Duration::from_secs(5);
    let hard_ns = deadline_ns + u64::try_from(grace.as_nanos()).unwrap_or(u64::MAX);
    let mut exited: Vec<String> = Vec::new();
    loop {
        let waiting = {
            let mut slots = fleet.slots.lock().await;
            let idle = shared.idle();
            let mut waiting = false;
            for s in slots.iter_mut() {
                if idle.contains_key(&s.id) || exited.contains(&s.id) {
                    continue;
                }
                // A client that exited before its `idle` failed: say so now, with
                // the end of its log, instead of waiting for the grace to pass.
                if let Ok(Some(status)) = s.child.try_wait() {
                    shared.record(
                        Event::new("orchestrator", "client-failed")
                            .target(&s.id)
                            .detail(format!(
                                "exited with {status} before the end of its workload: {}",
                                log_tail(&args.out, &s.id)
                            )),
                    );
                    exited.push(s.id.clone());
                    continue;
                }
                waiting = true;
            }
            waiting
        };
        if !waiting || now_ns() >= hard_ns {
            break;
        }
        let notified = shared.changed.notified();
        let _ = tokio::time::timeout(Duration::from_millis(500), notified).await;
    }
    for p in probes {
        let _ = p.await;
    }

    // (e) the final membership, after recovery.
    let membership = check_membership(&fleet, profile.lease * 3 + Duration::from_secs(5)).await;
    for p in &membership.problems {
        shared.record(Event::new("orchestrator", "membership-violation").detail(p.clone()));
    }
    shared.say_bye();

    // Wait for the clients to leave; kill stragglers.
    let mut slots = std::mem::take(&mut *fleet.slots.lock().await);
    let idle = shared.idle();
    for slot in &mut slots {
        if exited.contains(&slot.id) {
            continue;
        }
        if !idle.contains_key(&slot.id) {
            let _ = slot.child.start_kill();
            let _ = slot.child.wait().await;
            shared.record(
                Event::new("orchestrator", "hung")
                    .target(&slot.id)
                    .detail(format!("no `idle` by the deadline + {grace:?}: killed")),
            );
            continue;
        }
        match tokio::time::timeout(op_timeout * 2, slot.child.wait()).await {
            Ok(Ok(status)) if status.success() => {}
            Ok(Ok(status)) => shared.record(
                Event::new("orchestrator", "client-failed")
                    .target(&slot.id)
                    .detail(format!("exited with {status}; see {}.log", slot.id)),
            ),
            Ok(Err(e)) => shared.record(
                Event::new("orchestrator", "client-failed")
                    .target(&slot.id)
                    .detail(format!("cannot wait: {e}")),
            ),
            Err(_) => {
                let _ = slot.child.start_kill();
                shared.record(
                    Event::new("orchestrator", "hung")
                        .target(&slot.id)
                        .detail("did not exit after `bye`: killed"),
                );
            }
        }
    }

    let history = shared.history();
    let mut out = String::new();
    for ev in &history {
        out.push_str(&serde_json::to_string(ev)?);
        out.push('\n');
    }
    fs::write(args.out.join("history.jsonl"), out)?;
    let report = checker::check(&history, profile, started_ns);
    fs::write(args.out.join("nemesis.log"), report.nemesis_log.clone())?;
    print!("{}", report.render(&args.driver, args.cluster));
    if membership.waited > Duration::from_secs(1) {
        println!(
            "membership settled after {:.1}s of recovery",
            membership.waited.as_secs_f64()
        );
    }
    if report.violations.is_empty() && !args.keep {
        // A clean run keeps nothing but its summary.
        let _ = fs::remove_dir_all(&args.out);
        Ok(true)
    } else {
        println!("history and logs kept in {}", args.out.display());
        Ok(report.violations.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(client: &str, seq: u64) -> tooz::Capabilities {
        tooz::Capabilities::encode(&Caps {
            client: client.to_owned(),
            seq,
        })
        .unwrap_or_else(|e| panic!("encode: {e}"))
    }

    fn idle(seq: u64, joined: bool) -> Event {
        Event::new("x", "idle").seq(seq).ok(joined)
    }

    #[test]
    fn membership_judged_against_acknowledged_updates() {
        let mut members = BTreeMap::new();
        members.insert(tooz::MemberId::from("a"), caps("a", 5));
        members.insert(tooz::MemberId::from("b"), caps("b", 2));
        members.insert(tooz::MemberId::from("dead"), caps("dead", 1));
        let mut idles = std::collections::HashMap::new();
        idles.insert("a".to_owned(), idle(5, true));
        idles.insert("b".to_owned(), idle(3, true));
        idles.insert("c".to_owned(), idle(1, true));
        // Not joined at the end: neither required nor forbidden.
        idles.insert("d".to_owned(), idle(1, false));
        let problems = judge_members(&members, &idles, &["dead".to_owned()]);
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems.iter().any(|p| p.starts_with("b: capabilities")));
        assert!(problems.iter().any(|p| p.starts_with("c is joined")));
        assert!(problems.iter().any(|p| p.contains("killed client dead")));

        members.remove(&tooz::MemberId::from("dead"));
        members.insert(tooz::MemberId::from("b"), caps("b", 3));
        members.insert(tooz::MemberId::from("c"), caps("c", 1));
        assert!(judge_members(&members, &idles, &["dead".to_owned()]).is_empty());
    }
}
