//! The subcommands, each on a started coordinator.

use std::ffi::{OsStr, OsString};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::time::Duration;

use serde_json::{Value, json};
use tooz::{Coordinator, GroupEvent, GroupId, Leadership, LockName, Partitioner, ToozError, Wait};

use crate::child::{self, Outcome, Signals};
use crate::cli::{Command, GroupCommand};
use crate::exit;
use crate::failure::Failure;

/// How often `leader` re-checks that it still leads.
const LEADER_CHECK: Duration = Duration::from_secs(1);

/// Points per unit of weight of the partitioner's ring (tooz's default).
const PARTITIONS: u32 = 32;

/// Runs one subcommand; returns the exit status.
///
/// `url` is the backend URL, passed on to commands run by `tooz` in `$TOOZ_URL`
/// so that a `tooz` they call uses the same backend.
pub(crate) async fn dispatch(
    coord: &Coordinator,
    url: &str,
    command: Command,
    json: bool,
    signals: &mut Signals,
) -> Result<i32, Failure> {
    match command {
        Command::Group(GroupCommand::Create { group }) => {
            signals
                .interruptible(coord.create_group(group_id(&group)))
                .await??;
            Ok(0)
        }
        Command::Group(GroupCommand::Delete { group }) => {
            signals
                .interruptible(coord.delete_group(group_id(&group)))
                .await??;
            Ok(0)
        }
        Command::Group(GroupCommand::List) => {
            let groups = signals.interruptible(coord.get_groups()).await??;
            let mut out = Output::new();
            if json {
                let list: Vec<String> = groups.iter().map(ToString::to_string).collect();
                out.line(&Value::from(list).to_string())?;
            } else {
                for g in groups {
                    out.line(&g.to_string())?;
                }
            }
            Ok(0)
        }
        Command::Group(GroupCommand::Members { group }) => {
            let g = group_id(&group);
            let mut out = Output::new();
            if json {
                let members = signals
                    .interruptible(coord.get_members_with_capabilities(g))
                    .await??;
                let list: Vec<Value> = members
                    .iter()
                    .map(|(m, caps)| {
                        json!({
                            "member_id": m.to_string(),
                            "capabilities": caps.to_json().unwrap_or(Value::Null),
                        })
                    })
                    .collect();
                out.line(&Value::from(list).to_string())?;
            } else {
                for m in signals.interruptible(coord.get_members(g)).await?? {
                    out.line(&m.to_string())?;
                }
            }
            Ok(0)
        }
        Command::Group(GroupCommand::Join {
            group,
            capabilities,
            command,
        }) => {
            join(
                coord,
                url,
                &group,
                capabilities.as_deref(),
                &command,
                signals,
            )
            .await
        }
        Command::Lock {
            name,
            wait,
            grace,
            command,
        } => {
            let grace = Grace::new(coord, grace);
            lock(coord, url, &name, wait, &grace, &command, signals).await
        }
        Command::Leader {
            group,
            grace,
            command,
        } => {
            let grace = Grace::new(coord, grace);
            leader(coord, url, &group, &grace, &command, signals).await
        }
        Command::Watch { group } => watch(coord, &group, json, signals).await,
        Command::Partition {
            group,
            objects,
            replicas,
        } => partition(coord, &group, &objects, replicas.into(), json, signals).await,
        // Handled before any backend is contacted (main.rs).
        Command::Completions { .. } => Ok(0),
    }
}

fn group_id(group: &OsStr) -> GroupId {
    GroupId::from(group.as_bytes())
}

/// How long a command stopped after a loss gets between SIGTERM and SIGKILL:
/// `--grace`, else half the coordinator's loss margin (read when needed: the lease
/// TTL may change), else [`child::DEFAULT_GRACE`].
struct Grace {
    coord: Coordinator,
    requested: Option<Duration>,
}

impl Grace {
    /// Warns (on stderr) when the requested grace exceeds the loss margin: the
    /// command may then run on after the server freed the lock.
    fn new(coord: &Coordinator, requested_secs: Option<f64>) -> Self {
        let requested = requested_secs.map(Duration::from_secs_f64);
        if let (Some(grace), Some(margin)) = (requested, coord.loss_margin())
            && grace > margin
        {
            let _ = writeln!(
                io::stderr(),
                "tooz: warning: --grace {}s exceeds the loss margin ({}s): after a loss the command may outlive the lock",
                grace.as_secs_f64(),
                margin.as_secs_f64()
            );
        }
        Grace {
            coord: coord.clone(),
            requested,
        }
    }

    fn now(&self) -> Duration {
        self.requested.unwrap_or_else(|| {
            self.coord
                .loss_margin()
                .map_or(child::DEFAULT_GRACE, |m| m / 2)
        })
    }
}

async fn join(
    coord: &Coordinator,
    url: &str,
    group: &OsStr,
    capabilities: Option<&str>,
    command: &[OsString],
    signals: &mut Signals,
) -> Result<i32, Failure> {
    let g = group_id(group);
    let caps: Value = match capabilities {
        Some(text) => serde_json::from_str(text)
            .map_err(|e| Failure::with_code(2, format!("--capabilities is not valid JSON: {e}")))?,
        None => Value::Null,
    };
    signals
        .interruptible(coord.join_group_create(g, &caps))
        .await??;
    if command.is_empty() {
        // Member until Ctrl-C (or SIGTERM/SIGHUP); the coordinator's heartbeat
        // keeps the membership alive and re-joins after a lost lease.
        signals.recv().await;
        return Ok(0);
    }
    let env = [("TOOZ_URL", url.to_string())];
    let grace = Grace::new(coord, None);
    match child::run(command, &env, signals, std::future::pending(), &|| {
        grace.now()
    })
    .await?
    {
        Outcome::Exited(code) => Ok(code),
        Outcome::Aborted { reason } => Err(Failure::with_code(exit::LOST, reason)),
    }
}

async fn lock(
    coord: &Coordinator,
    url: &str,
    name: &OsStr,
    wait_secs: Option<f64>,
    grace: &Grace,
    command: &[OsString],
    signals: &mut Signals,
) -> Result<i32, Failure> {
    let lock_name = LockName::from(name.as_bytes());
    let lock = coord.get_lock(lock_name.clone())?;
    let wait = match wait_secs {
        None => Wait::Forever,
        Some(secs) if secs <= 0.0 => Wait::No,
        Some(secs) => Wait::For(Duration::from_secs_f64(secs)),
    };
    let Some(guard) = signals.interruptible(lock.guard(wait)).await?? else {
        return Err(Failure::with_code(
            exit::NOT_ACQUIRED,
            format!(
                "lock {lock_name} not acquired within {}s",
                wait_secs.unwrap_or_default()
            ),
        ));
    };
    let token = guard.token();
    let lost = guard.lost();
    if lost.is_lost() {
        return Err(Failure::with_code(
            exit::LOST,
            format!("lock {lock_name} was lost before the command started"),
        ));
    }
    let abort = {
        let lock_name = lock_name.clone();
        async move {
            lost.lost().await;
            format!("lock {lock_name} was lost; the command was stopped")
        }
    };
    let env = [
        ("TOOZ_FENCING_TOKEN", token.to_string()),
        ("TOOZ_URL", url.to_string()),
    ];
    match child::run(command, &env, signals, abort, &|| grace.now()).await? {
        Outcome::Exited(code) => {
            let lost_meanwhile = guard.lost().is_lost();
            match guard.release().await {
                Ok(true) if !lost_meanwhile => Ok(code),
                // Gone by the time the command exited: it may have run without it.
                Ok(_) => Err(Failure::with_code(
                    exit::LOST,
                    format!(
                        "lock {lock_name} was lost before the command exited (with status {code})"
                    ),
                )),
                Err(e) => Err(Failure::from(e).keeping_status(code)),
            }
        }
        Outcome::Aborted { reason } => Err(Failure::with_code(exit::LOST, reason)),
    }
}

async fn leader(
    coord: &Coordinator,
    url: &str,
    group: &OsStr,
    grace: &Grace,
    command: &[OsString],
    signals: &mut Signals,
) -> Result<i32, Failure> {
    let g = group_id(group);
    let leadership = signals.interruptible(campaign(coord, &g)).await??;
    let token = leadership.token();
    if leadership.is_lost() {
        return Err(Failure::with_code(
            exit::LOST,
            format!("leadership of group {g} was lost before the command started"),
        ));
    }
    let abort = leadership_lost(coord.clone(), leadership.clone());
    let env = [
        ("TOOZ_FENCING_TOKEN", token.to_string()),
        ("TOOZ_URL", url.to_string()),
    ];
    match child::run(command, &env, signals, abort, &|| grace.now()).await? {
        Outcome::Exited(code) => {
            let lost_meanwhile = leadership.is_lost();
            match coord.stand_down_group_leader(&g).await {
                Ok(true) if !lost_meanwhile => Ok(code),
                Ok(_) => Err(Failure::with_code(
                    exit::LOST,
                    format!(
                        "leadership of group {g} was lost before the command exited (with status {code})"
                    ),
                )),
                Err(e) => Err(Failure::from(e).keeping_status(code)),
            }
        }
        Outcome::Aborted { reason } => Err(Failure::with_code(exit::LOST, reason)),
    }
}

/// Campaigns until elected. Election does not need the group to exist, but a
/// backend that keeps leadership inside the group wants it: create it then.
async fn campaign(coord: &Coordinator, g: &GroupId) -> Result<tooz::Leadership, ToozError> {
    match coord.become_leader(g).await {
        Err(ToozError::GroupNotCreated(_)) => {
            match coord.create_group(g).await {
                Ok(()) | Err(ToozError::GroupAlreadyExist(_)) => {}
                Err(e) => return Err(e),
            }
            coord.become_leader(g).await
        }
        other => other,
    }
}

/// Resolves (with the reason) once this member no longer leads under
/// `leadership`'s token: its loss signal fired (the lease was lost, a heartbeat
/// found it gone), or the check made every second finds another leader or
/// another token (the command's token is then stale).
///
/// The check runs as its own branch of the `select!`: a check stuck on an
/// unreachable backend never delays the loss signal, which the coordinator fires
/// from its lease timer.
async fn leadership_lost(coord: Coordinator, leadership: Leadership) -> String {
    let g = leadership.group().clone();
    let token = leadership.token();
    let lost = leadership.lost();
    let recheck = async {
        let mut tick = tokio::time::interval(LEADER_CHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            match coord.try_become_leader(&g).await {
                Ok(Some(l)) if l.token() == token => {}
                Ok(Some(l)) => {
                    return format!(
                        "leadership of group {g} was granted again with token {} (the command's {token} is stale); the command was stopped",
                        l.token()
                    );
                }
                Ok(None) => {
                    return format!(
                        "leadership of group {g} was lost (another member leads); the command was stopped"
                    );
                }
                // A backend hiccup: the lease timer decides when it is a loss.
                Err(_) => {}
            }
        }
    };
    tokio::select! {
        () = lost.lost() => format!(
            "leadership of group {g} was lost (lease lost or leadership gone); the command was stopped"
        ),
        reason = recheck => reason,
    }
}

async fn watch(
    coord: &Coordinator,
    group: &OsStr,
    json: bool,
    signals: &mut Signals,
) -> Result<i32, Failure> {
    let g = group_id(group);
    let mut events = signals.interruptible(coord.events(g.clone())).await??;
    let mut out = Output::new();
    loop {
        let ev = tokio::select! {
            ev = events.next_event() => ev,
            _ = signals.recv() => return Ok(0),
        };
        let Some(ev) = ev else {
            return Err(Failure::new(format!("the event stream of group {g} ended")));
        };
        let line = if json {
            event_json(&ev).to_string()
        } else {
            event_text(&ev)
        };
        // A closed pipe (`tooz watch G | head -1`) ends the watch silently, status 0.
        out.line(&line)?;
    }
}

fn event_parts(ev: &GroupEvent) -> (&'static str, Value) {
    match ev {
        GroupEvent::MemberJoined { member, .. } => ("joined", member.to_string().into()),
        GroupEvent::MemberLeft { member, .. } => ("left", member.to_string().into()),
        GroupEvent::LeaderElected { member, .. } => ("leader", member.to_string().into()),
        GroupEvent::LeadershipLost { member, .. } => ("leader-lost", member.to_string().into()),
        GroupEvent::Lagged { missed, .. } => ("lagged", (*missed).into()),
        other => ("other", other.to_string().into()),
    }
}

fn event_text(ev: &GroupEvent) -> String {
    match event_parts(ev) {
        (kind, Value::String(s)) => format!("{kind} {s}"),
        (kind, v) => format!("{kind} {v}"),
    }
}

fn event_json(ev: &GroupEvent) -> Value {
    let (kind, value) = event_parts(ev);
    let key = match ev {
        GroupEvent::Lagged { .. } => "missed",
        e if e.member().is_some() => "member",
        _ => "description",
    };
    json!({"event": kind, "group": ev.group().to_string(), key: value})
}

async fn partition(
    coord: &Coordinator,
    group: &OsStr,
    objects: &[OsString],
    replicas: usize,
    json: bool,
    signals: &mut Signals,
) -> Result<i32, Failure> {
    let g = group_id(group);
    let p = signals
        .interruptible(Partitioner::new(coord, g.clone(), PARTITIONS))
        .await??;
    if p.ring().node_count() == 0 {
        return Err(Failure::new(format!("group {g} has no live members")));
    }
    let mut out = Output::new();
    let mut rows = Vec::new();
    for obj in objects {
        let owners: Vec<String> = p
            .members_for_object(obj.as_bytes(), &[], replicas)
            .iter()
            .map(ToString::to_string)
            .collect();
        let obj = obj.to_string_lossy();
        if json {
            rows.push(json!({"object": obj, "members": owners}));
        } else {
            out.line(&format!("{obj}\t{}", owners.join(",")))?;
        }
    }
    if json {
        out.line(&Value::from(rows).to_string())?;
    }
    Ok(0)
}

/// Standard output, line by line, flushed after each line (for pipes). A
/// closed pipe is a silent end with status 0, as for other filters.
struct Output {
    stdout: io::Stdout,
}

impl Output {
    fn new() -> Self {
        Output {
            stdout: io::stdout(),
        }
    }

    fn line(&mut self, text: &str) -> Result<(), Failure> {
        let mut lock = self.stdout.lock();
        let res = writeln!(lock, "{text}").and_then(|()| lock.flush());
        res.map_err(|e| {
            if e.kind() == io::ErrorKind::BrokenPipe {
                Failure::silent(0)
            } else {
                Failure::new(format!("cannot write to standard output: {e}"))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_lines() {
        let j = GroupEvent::MemberJoined {
            group: "g".into(),
            member: "m1".into(),
        };
        assert_eq!(event_text(&j), "joined m1");
        assert_eq!(
            event_json(&j),
            json!({"event": "joined", "group": "g", "member": "m1"})
        );
        let l = GroupEvent::Lagged {
            group: "g".into(),
            missed: 3,
        };
        assert_eq!(event_text(&l), "lagged 3");
        assert_eq!(
            event_json(&l),
            json!({"event": "lagged", "group": "g", "missed": 3})
        );
        let lost = GroupEvent::LeadershipLost {
            group: "g".into(),
            member: "m2".into(),
        };
        assert_eq!(event_text(&lost), "leader-lost m2");
    }
}
