//! The nemesis: one fault at a time, chosen by a seeded RNG, each logged as a `fault`
//! event when it starts and a `heal` event when it ends (same `detail` = kind).
//!
//! | kind | what | drivers |
//! |---|---|---|
//! | `pause` | SIGSTOP a client for lease + 1 s, then SIGCONT | all |
//! | `partition` | freeze the client's proxy for lease + 1 s, then heal | TCP servers |
//! | `cut` | reset every connection of the client's proxy | TCP servers |
//! | `kill-client` | SIGKILL a client holding a lock, start a new one; a probe measures when the lock is free (check d) | all |
//! | `kill-node` | SIGKILL the server (or the cluster leader / Redis primary) and start it again | with `--node-cmd` |
//! | `wipe-node` | SIGKILL the server and start it empty | Redis, memcached, with `--node-cmd` |

use std::{sync::Arc, time::Duration};

use anyhow::{Context, Result, bail};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use rand::{Rng, SeedableRng, rngs::StdRng};
use tokio::task::JoinHandle;
use tooz::Wait;

use crate::{Event, client, now_ns, orchestrator::Fleet};

/// Slack on the (d) bound for scheduling on a loaded machine.
pub(crate) const FREE_SLACK: Duration = Duration::from_secs(2);

fn log(fleet: &Fleet, ev: Event) {
    eprintln!(
        "tooz-chaos: nemesis {} {} {}",
        ev.ev,
        ev.detail.as_deref().unwrap_or(""),
        ev.target.as_deref().unwrap_or("")
    );
    fleet.shared.record(ev);
}

/// The fault kinds this run can inject.
fn kinds(fleet: &Fleet) -> Vec<&'static str> {
    let mut k = vec!["pause", "kill-client"];
    if fleet.profile.proxy && !fleet.args.cluster {
        k.extend(["partition", "cut"]);
    }
    if !fleet.args.node_cmd.is_empty() {
        let has_node = if fleet.args.cluster {
            fleet.profile.cluster_kind.is_some()
        } else {
            fleet.profile.node.is_some()
        };
        if has_node {
            k.push("kill-node");
            if fleet.profile.wipe && !fleet.args.cluster {
                k.push("wipe-node");
            }
        }
    }
    k
}

/// Runs faults until the deadline; returns the (d) probes still running.
pub(crate) async fn run(fleet: Arc<Fleet>) -> Vec<JoinHandle<()>> {
    let mut rng = StdRng::seed_from_u64(fleet.args.seed);
    let kinds = kinds(&fleet);
    let out = fleet.profile.lease + Duration::from_secs(1);
    let mut probes = Vec::new();
    // Let the clients start and take their first locks.
    tokio::time::sleep(Duration::from_secs(2)).await;
    loop {
        // A fault must be over before the deadline: pick among those that fit.
        let room = fleet.deadline_ns.saturating_sub(now_ns());
        let probing = probes.iter().any(|p: &JoinHandle<()>| !p.is_finished());
        let fits: Vec<&'static str> = kinds
            .iter()
            .copied()
            .filter(|k| {
                let needs = match *k {
                    "pause" | "partition" => out,
                    "kill-node" | "wipe-node" => Duration::from_secs(4),
                    _ => Duration::from_secs(1),
                };
                u128::from(room) >= (needs + Duration::from_millis(500)).as_nanos()
                    // A server fault while a (d) probe runs would time the outage,
                    // not the expiry.
                    && !(probing && k.ends_with("-node"))
            })
            .collect();
        if fits.is_empty() {
            if probing && u128::from(room) > Duration::from_secs(5).as_nanos() {
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            break;
        }
        let kind = fits[rng.random_range(0..fits.len())];
        if let Err(e) = fault(&fleet, kind, &mut rng, out, &mut probes).await {
            log(
                &fleet,
                Event::new("nemesis", "nemesis-error").detail(format!("{kind}: {e:#}")),
            );
        }
        let gap = Duration::from_millis(rng.random_range(300..1500));
        tokio::time::sleep(gap).await;
    }
    probes
}

async fn fault(
    fleet: &Arc<Fleet>,
    kind: &'static str,
    rng: &mut StdRng,
    out: Duration,
    probes: &mut Vec<JoinHandle<()>>,
) -> Result<()> {
    match kind {
        "pause" => {
            let (id, pid) = {
                let slots = fleet.slots.lock().await;
                let s = &slots[rng.random_range(0..slots.len())];
                (s.id.clone(), s.pid().context("the client has exited")?)
            };
            kill(Pid::from_raw(pid), Signal::SIGSTOP).context("SIGSTOP")?;
            log(
                fleet,
                Event::new("nemesis", "fault").detail(kind).target(&id),
            );
            tokio::time::sleep(out).await;
            kill(Pid::from_raw(pid), Signal::SIGCONT).context("SIGCONT")?;
            log(
                fleet,
                Event::new("nemesis", "heal").detail(kind).target(&id),
            );
        }
        "partition" | "cut" => {
            let (id, proxy) = {
                let slots = fleet.slots.lock().await;
                let s = &slots[rng.random_range(0..slots.len())];
                (s.id.clone(), s.proxy.clone().context("no proxy")?)
            };
            if kind == "partition" {
                proxy.freeze();
                log(
                    fleet,
                    Event::new("nemesis", "fault").detail(kind).target(&id),
                );
                tokio::time::sleep(out).await;
                proxy.heal();
            } else {
                proxy.cut_all();
                log(
                    fleet,
                    Event::new("nemesis", "fault").detail(kind).target(&id),
                );
            }
            log(
                fleet,
                Event::new("nemesis", "heal").detail(kind).target(&id),
            );
        }
        "kill-client" => {
            // A holder if there is one: that is what (d) is about.
            let holders = fleet.shared.holders();
            let (index, lock) = {
                let slots = fleet.slots.lock().await;
                let held: Vec<(usize, String)> = slots
                    .iter()
                    .enumerate()
                    .filter_map(|(i, s)| holders.get(&s.id).map(|l| (i, l.clone())))
                    .collect();
                if held.is_empty() {
                    (rng.random_range(0..slots.len()), None)
                } else {
                    let (i, l) = held[rng.random_range(0..held.len())].clone();
                    (i, Some(l))
                }
            };
            let (killed, killed_at) = fleet.replace(index).await?;
            let mut ev = Event::new("nemesis", "fault").detail(kind).target(&killed);
            // The fault is the SIGKILL, not the respawn that followed.
            ev.t = killed_at;
            if let Some(l) = &lock {
                ev = ev.lock(l);
            }
            log(fleet, ev);
            fleet
                .killed
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(killed.clone());
            log(
                fleet,
                Event::new("nemesis", "heal").detail(kind).target(&killed),
            );
            if let Some(lock) = lock {
                let fleet = Arc::clone(fleet);
                probes.push(tokio::spawn(async move { probe(&fleet, &lock).await }));
            }
        }
        "kill-node" | "wipe-node" => {
            let node = if fleet.args.cluster {
                let k = fleet.profile.cluster_kind.context("no cluster kind")?;
                node_cmd(fleet, &["leader", k]).await?
            } else {
                fleet.profile.node.context("no node")?.to_owned()
            };
            // Logged first: the fault starts with the kill, whatever the command's latency.
            log(
                fleet,
                Event::new("nemesis", "fault").detail(kind).target(&node),
            );
            node_cmd(fleet, &["kill", &node]).await?;
            tokio::time::sleep(Duration::from_millis(rng.random_range(500..2000))).await;
            if kind == "wipe-node" {
                node_cmd(fleet, &["start", &node, "--wipe"]).await?;
            } else {
                node_cmd(fleet, &["start", &node]).await?;
            }
            log(
                fleet,
                Event::new("nemesis", "heal").detail(kind).target(&node),
            );
        }
        other => bail!("unknown fault kind {other}"),
    }
    Ok(())
}

/// Runs the node-control command (`xtask backends node ARGS`); its stdout, trimmed.
async fn node_cmd(fleet: &Fleet, args: &[&str]) -> Result<String> {
    let (program, prefix) = fleet.args.node_cmd.split_first().context("no --node-cmd")?;
    let output = tokio::process::Command::new(program)
        .args(prefix)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .with_context(|| format!("cannot run {program}"))?;
    if !output.status.success() {
        bail!(
            "`{} {}` failed ({}): {}",
            fleet.args.node_cmd.join(" "),
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// Check (d)'s probe: how soon after its holder was killed can `lock` be taken?
/// Records a `probe` event when it got the lock (`ok`), or gave up.
async fn probe(fleet: &Fleet, lock: &str) {
    let id = format!("chaos-{}-probe-{}", fleet.run, now_ns());
    let wait = fleet.profile.free_bound + FREE_SLACK;
    let result = async {
        let coord = client::connect(&fleet.args.driver, &fleet.args.url, &id)?;
        coord.start(true).await?;
        let l = coord.get_lock(lock)?;
        // Tries every 50 ms rather than waiting in `acquire`: an expiry publishes no
        // release, so a waiter would notice it only at its next backoff tick, and this
        // measures when the server freed the lock, not the waiter's backoff.
        let give_up = tokio::time::Instant::now() + wait;
        let mut got = false;
        while !got && tokio::time::Instant::now() < give_up {
            // An error (a connection still settling) is tried again like a refusal.
            got = matches!(l.acquire(Wait::No).await, Ok(true));
            if !got {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let t = now_ns();
        if got {
            let _ = l.release().await;
        }
        let _ = coord.stop().await;
        anyhow::Ok((got, t))
    }
    .await;
    let ev = match result {
        Ok((got, t)) => {
            let mut ev = Event::new("nemesis", "probe").lock(lock).ok(got);
            ev.t = t;
            ev
        }
        Err(e) => Event::new("nemesis", "probe")
            .lock(lock)
            .detail(format!("{e:#}")),
    };
    fleet.shared.record(ev);
}
