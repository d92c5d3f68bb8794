//! The checker over the recorded history (all times on `CLOCK_MONOTONIC`).
//!
//! Violations (the run fails): (a) an accepted fenced write whose token is not above
//! the key's previous accepted one; (c) two clients granted leadership with the same
//! token; (d) a killed holder's lock not free within the driver's bound + slack;
//! (e) the final membership wrong (missing, duplicated, stale capabilities, a killed
//! member lingering); (f) a client that hung or failed; and a nemesis that could not
//! inject or heal its fault (the run proves nothing then).
//!
//! Reported, not failed: (b) how often and how long two clients believed they held one
//! lock (or led) at once, from `acquired` to `released`/`lost`, per fault kind; and the
//! stale writes the register rejected (what fencing prevented).

use std::{collections::BTreeMap, fmt::Write as _, time::Duration};

use crate::{Event, nemesis::FREE_SLACK, profile::Profile};

/// One injected fault.
#[derive(Debug, Clone)]
struct Fault {
    kind: String,
    start: u64,
    end: u64,
}

/// Figures for one fault kind (or `none`: outside every fault's window).
#[derive(Debug, Default, Clone)]
struct Row {
    faults: u64,
    overlaps: u64,
    overlap_max_ns: u64,
    overlap_total_ns: u64,
    leader_overlaps: u64,
    stale_rejected: u64,
    errors: u64,
}

/// The checker's result.
#[derive(Debug, Default)]
pub(crate) struct Report {
    rows: BTreeMap<String, Row>,
    ops: u64,
    faults: u64,
    /// (d): seconds from each kill to the lock being free.
    free_times: Vec<f64>,
    free_bound: Duration,
    pub(crate) violations: Vec<String>,
    pub(crate) nemesis_log: String,
}

/// An interval during which `client` believed it held `key` with `token`.
#[derive(Debug)]
struct Hold {
    client: String,
    key: String,
    start: u64,
    end: u64,
}

const OPS: &[&str] = &[
    "acquired", "busy", "cap_ack", "leader", "follower", "left", "write", "error",
];

pub(crate) fn check(history: &[Event], profile: &Profile, started_ns: u64) -> Report {
    let mut h: Vec<&Event> = history.iter().collect();
    h.sort_by_key(|e| e.t);
    let last_t = h.last().map_or(started_ns, |e| e.t);
    let mut r = Report {
        free_bound: profile.free_bound + FREE_SLACK,
        ..Report::default()
    };
    let secs = |t: u64| t.saturating_sub(started_ns) as f64 / 1e9;

    // Faults, paired fault → heal by kind and target; and their log.
    let mut faults: Vec<Fault> = Vec::new();
    let mut open: Vec<(String, String, usize)> = Vec::new();
    let mut kills: Vec<(u64, String, Option<String>)> = Vec::new();
    for e in &h {
        if e.c != "nemesis" && e.c != "orchestrator" {
            continue;
        }
        let kind = e.detail.clone().unwrap_or_default();
        let target = e.target.clone().unwrap_or_default();
        let _ = writeln!(
            r.nemesis_log,
            "+{:8.3}s {} {} {} {}",
            secs(e.t),
            e.ev,
            kind,
            target,
            e.lock.as_deref().unwrap_or("")
        );
        match e.ev.as_str() {
            "fault" => {
                open.push((kind.clone(), target.clone(), faults.len()));
                if kind == "kill-client" {
                    kills.push((e.t, target.clone(), e.lock.clone()));
                }
                faults.push(Fault {
                    kind,
                    start: e.t,
                    end: e.t,
                });
            }
            "heal" => {
                if let Some(pos) = open.iter().position(|(k, t, _)| *k == kind && *t == target) {
                    let (_, _, i) = open.remove(pos);
                    faults[i].end = e.t;
                }
            }
            _ => {}
        }
    }
    for (kind, target, _) in &open {
        r.violations.push(format!(
            "nemesis: the {kind} fault on {target} was never healed"
        ));
    }
    r.faults = faults.len() as u64;
    for f in &faults {
        r.rows.entry(f.kind.clone()).or_default().faults += 1;
    }
    r.rows.entry("none".into()).or_default();
    // An observation belongs to the latest fault that started before it, while the
    // effects can last: up to two leases after the heal.
    let window =
        u64::try_from((profile.lease * 2 + Duration::from_secs(1)).as_nanos()).unwrap_or(u64::MAX);
    let attribute = |t: u64| -> String {
        faults
            .iter()
            .rev()
            .find(|f| f.start <= t && t <= f.end.saturating_add(window))
            .map_or_else(|| "none".to_owned(), |f| f.kind.clone())
    };

    // Holds and leaderships as intervals; writes; errors; other violations.
    let mut holds: Vec<Hold> = Vec::new();
    let mut open_holds: BTreeMap<(String, String, u64), usize> = BTreeMap::new();
    let mut fenced: BTreeMap<String, (u64, String)> = BTreeMap::new();
    let mut leader_tokens: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for e in &h {
        if OPS.contains(&e.ev.as_str()) {
            r.ops += 1;
        }
        let key = e.lock.clone().unwrap_or_default();
        let token = e.token.unwrap_or(0);
        match e.ev.as_str() {
            "acquired" | "leader" => {
                if e.ev == "leader" {
                    let who = leader_tokens.entry(token).or_default();
                    if !who.contains(&e.c) {
                        who.push(e.c.clone());
                    }
                }
                if let std::collections::btree_map::Entry::Vacant(slot) =
                    open_holds.entry((e.c.clone(), key.clone(), token))
                {
                    slot.insert(holds.len());
                    holds.push(Hold {
                        client: e.c.clone(),
                        key,
                        start: e.t,
                        end: last_t,
                    });
                }
            }
            "released" | "lost" | "leader_end" | "leader_lost" => {
                if let Some(i) = open_holds.remove(&(e.c.clone(), key, token)) {
                    holds[i].end = e.t;
                }
            }
            "write" => {
                if e.ok == Some(true) {
                    if let Some((last, writer)) = fenced.get(&key)
                        && !(token > *last || (token == *last && *writer == e.c))
                    {
                        r.violations.push(format!(
                            "(a) {key}: write by {} with token {token} accepted after token {last}",
                            e.c
                        ));
                    }
                    fenced.insert(key, (token, e.c.clone()));
                } else {
                    r.rows.entry(attribute(e.t)).or_default().stale_rejected += 1;
                }
            }
            "error" => r.rows.entry(attribute(e.t)).or_default().errors += 1,
            "membership-violation" => r.violations.push(format!(
                "(e) {}",
                e.detail.as_deref().unwrap_or("membership wrong")
            )),
            "hung" | "client-failed" => r.violations.push(format!(
                "(f) {}: {}",
                e.target.as_deref().unwrap_or("?"),
                e.detail.as_deref().unwrap_or("")
            )),
            "nemesis-error" | "bad-line" => r.violations.push(format!(
                "nemesis/orchestrator: {}",
                e.detail.as_deref().unwrap_or("")
            )),
            _ => {}
        }
    }
    // A killed client's holds end with it.
    for (t, client, _) in &kills {
        for hold in holds.iter_mut().filter(|x| x.client == *client) {
            if hold.end > *t {
                hold.end = *t;
            }
        }
    }

    // (b) overlaps of holds of one key by different clients.
    for (i, a) in holds.iter().enumerate() {
        for b in &holds[i + 1..] {
            if a.key != b.key || a.client == b.client {
                continue;
            }
            let start = a.start.max(b.start);
            let end = a.end.min(b.end);
            if end > start {
                let row = r.rows.entry(attribute(start)).or_default();
                if a.key == "leader" {
                    row.leader_overlaps += 1;
                } else {
                    row.overlaps += 1;
                    row.overlap_max_ns = row.overlap_max_ns.max(end - start);
                    row.overlap_total_ns += end - start;
                }
            }
        }
    }

    // (c) one leader per token.
    for (token, who) in &leader_tokens {
        if who.len() > 1 {
            r.violations.push(format!(
                "(c) leadership token {token} granted to {}",
                who.join(", ")
            ));
        }
    }

    // (d) a killed holder's lock is free within the bound.
    let bound_ns = u64::try_from(r.free_bound.as_nanos()).unwrap_or(u64::MAX);
    for (t_kill, client, lock) in &kills {
        let Some(lock) = lock else { continue };
        // A server down during the window times the outage, not the expiry.
        if faults
            .iter()
            .any(|f| f.kind.ends_with("-node") && f.start <= t_kill + bound_ns && f.end >= *t_kill)
        {
            continue;
        }
        let free = h
            .iter()
            .filter(|e| e.t > *t_kill && e.lock.as_deref() == Some(lock.as_str()))
            .find(|e| {
                (e.ev == "acquired" && e.c != *client) || (e.ev == "probe" && e.ok == Some(true))
            })
            .map(|e| e.t - t_kill);
        match free {
            Some(ns) => {
                let s = ns as f64 / 1e9;
                r.free_times.push(s);
                if s > r.free_bound.as_secs_f64() {
                    r.violations.push(format!(
                        "(d) {lock}: free {s:.2}s after its holder {client} was killed (bound {:.1}s)",
                        r.free_bound.as_secs_f64()
                    ));
                }
            }
            None => r.violations.push(format!(
                "(d) {lock}: never free after its holder {client} was killed (waited {:.1}s)",
                r.free_bound.as_secs_f64()
            )),
        }
    }
    r
}

impl Report {
    /// The table, the (d) figures, the violations and the closing line.
    pub(crate) fn render(&self, driver: &str, cluster: bool) -> String {
        let mut out = String::new();
        let title = if cluster {
            format!("{driver} (cluster)")
        } else {
            driver.to_owned()
        };
        let _ = writeln!(
            out,
            "\nchaos {title}: per fault kind (b = two clients believed they held one lock at once)"
        );
        let _ = writeln!(
            out,
            "{:<12} | {:>6} | {:>10} | {:>12} | {:>14} | {:>13} | {:>14} | {:>6}",
            "fault",
            "faults",
            "b overlaps",
            "b max ms",
            "b total ms",
            "leader overlp",
            "stale rejected",
            "errors"
        );
        let _ = writeln!(out, "{}", "-".repeat(110));
        for (kind, row) in &self.rows {
            let _ = writeln!(
                out,
                "{:<12} | {:>6} | {:>10} | {:>12.1} | {:>14.1} | {:>13} | {:>14} | {:>6}",
                kind,
                row.faults,
                row.overlaps,
                row.overlap_max_ns as f64 / 1e6,
                row.overlap_total_ns as f64 / 1e6,
                row.leader_overlaps,
                row.stale_rejected,
                row.errors
            );
        }
        if !self.free_times.is_empty() {
            let max = self.free_times.iter().copied().fold(0.0, f64::max);
            let _ = writeln!(
                out,
                "(d) killed holder's lock free after: max {max:.2}s over {} kills (bound {:.1}s)",
                self.free_times.len(),
                self.free_bound.as_secs_f64()
            );
        }
        for v in &self.violations {
            let _ = writeln!(out, "VIOLATION {v}");
        }
        let _ = writeln!(
            out,
            "{} ops, {} faults, {} violations",
            self.ops,
            self.faults,
            self.violations.len()
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(t: u64, c: &str, ev: &str, lock: &str, token: u64) -> Event {
        let mut e = Event::new(c, ev).lock(lock).token(token);
        e.t = t;
        e
    }

    fn profile() -> &'static Profile {
        crate::profile::profile("redis").unwrap_or_else(|| unreachable!())
    }

    #[test]
    fn overlap_and_stale_write_are_counted_not_failed() {
        let s = 1_000_000_000;
        let mut pause = Event::new("nemesis", "fault").detail("pause").target("a");
        pause.t = s;
        let mut heal = Event::new("nemesis", "heal").detail("pause").target("a");
        heal.t = 4 * s;
        let h = vec![
            ev(s / 2, "a", "acquired", "l", 10),
            pause,
            ev(3 * s, "b", "acquired", "l", 11),
            ev(3 * s + 1, "b", "write", "l", 11).ok(true),
            heal,
            ev(4 * s + 1, "a", "write", "l", 10).ok(false),
            ev(4 * s + 2, "a", "lost", "l", 10),
            ev(5 * s, "b", "released", "l", 11),
        ];
        let r = check(&h, profile(), 0);
        assert!(r.violations.is_empty(), "{:?}", r.violations);
        let row = &r.rows["pause"];
        assert_eq!(row.overlaps, 1);
        assert_eq!(row.overlap_max_ns, s + 2);
        assert_eq!(row.stale_rejected, 1);
        assert!(r.render("redis", false).contains("0 violations"));
    }

    #[test]
    fn accepted_stale_write_and_shared_leader_token_fail() {
        let h = vec![
            ev(1, "a", "write", "l", 5).ok(true),
            ev(2, "b", "write", "l", 4).ok(true),
            ev(3, "a", "leader", "leader", 7),
            ev(4, "b", "leader", "leader", 7),
        ];
        let r = check(&h, profile(), 0);
        assert_eq!(r.violations.len(), 2, "{:?}", r.violations);
        assert!(r.violations[0].starts_with("(a)"));
        assert!(r.violations[1].starts_with("(c)"));
    }

    #[test]
    fn killed_holder_lock_must_come_free() {
        let s = 1_000_000_000;
        let mut kill = Event::new("nemesis", "fault")
            .detail("kill-client")
            .target("a")
            .lock("l");
        kill.t = s;
        let mut heal = Event::new("nemesis", "heal")
            .detail("kill-client")
            .target("a");
        heal.t = s + 1;
        let late = vec![
            ev(0, "a", "acquired", "l", 1),
            kill.clone(),
            heal.clone(),
            ev(10 * s, "b", "acquired", "l", 2),
        ];
        let r = check(&late, profile(), 0);
        assert!(
            r.violations.iter().any(|v| v.starts_with("(d)")),
            "{:?}",
            r.violations
        );
        let soon = vec![
            ev(0, "a", "acquired", "l", 1),
            kill,
            heal,
            ev(3 * s, "b", "acquired", "l", 2),
        ];
        let r = check(&soon, profile(), 0);
        assert!(r.violations.is_empty(), "{:?}", r.violations);
        assert_eq!(r.free_times, vec![2.0]);
    }
}
