//! Mutual exclusion under contention: many tasks (each with its own coordinator)
//! and several OS processes hammer one lock while a checker records every hold and
//! verifies that no two overlap and that fencing tokens follow the order of holds.
//! Plus: a blocked waiter wakes promptly when the holder releases (a push case).

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::prelude::*;

const TASKS: usize = 8;
const ROUNDS_PER_TASK: usize = 20;
const WORKERS: usize = 3;
const ROUNDS_PER_WORKER: usize = 15;

/// One recorded hold: start, end, fencing token, who.
type Hold = (Instant, Instant, u64, String);

pub(crate) async fn tasks_never_overlap(h: &Harness) -> CaseResult {
    let name = h.lock_name("hot");
    let inside = Arc::new(AtomicUsize::new(0));
    let overlaps = Arc::new(AtomicUsize::new(0));
    let holds: Arc<Mutex<Vec<Hold>>> = Arc::default();
    let mut tasks = Vec::new();
    for i in 0..TASKS {
        let c = h.started(h.member(&format!("t{i}"))).await?;
        let (name, inside, overlaps, holds) = (
            name.clone(),
            Arc::clone(&inside),
            Arc::clone(&overlaps),
            Arc::clone(&holds),
        );
        tasks.push(tokio::spawn(async move {
            let lock = c.get_lock(&name).ctx("get_lock")?;
            for k in 0..ROUNDS_PER_TASK {
                let got = lock
                    .acquire(Wait::For(Duration::from_secs(40)))
                    .await
                    .ctx("acquire")?;
                if !got {
                    fail!("task {i} round {k}: no hold within 40 s");
                }
                let start = Instant::now();
                if inside.fetch_add(1, Ordering::SeqCst) != 0 {
                    overlaps.fetch_add(1, Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
                inside.fetch_sub(1, Ordering::SeqCst);
                let end = Instant::now();
                let token = lock.fencing_token().map_or(0, |t| t.0);
                holds.lock().unwrap_or_else(|p| p.into_inner()).push((
                    start,
                    end,
                    token,
                    format!("task {i} round {k}"),
                ));
                if !lock.release().await.ctx("release")? {
                    fail!("task {i} round {k}: release returned false while holding");
                }
            }
            Ok::<(), CaseError>(())
        }));
    }
    for t in tasks {
        t.await
            .map_err(|e| CaseError::Failed(format!("contending task: {e}")))??;
    }
    ensure_eq!(
        overlaps.load(Ordering::SeqCst),
        0,
        "holds that began while another was inside"
    );
    let mut holds = std::mem::take(&mut *holds.lock().unwrap_or_else(|p| p.into_inner()));
    ensure_eq!(holds.len(), TASKS * ROUNDS_PER_TASK, "recorded holds");
    holds.sort_by_key(|x| x.0);
    let tokens: Vec<u64> = holds.iter().map(|x| x.2).collect();
    no_overlap(
        holds
            .into_iter()
            .map(|(s, e, _, who)| (s, e, who))
            .collect(),
        "tasks contending for one lock",
    )?;
    strictly_increasing(&tokens, "holds in time order")
}

pub(crate) async fn processes_never_overlap(h: &Harness) -> CaseResult {
    let name = h.name("hot");
    let log = h.temp_path("holds.log");
    let marker = std::path::PathBuf::from(format!("{}.held", log.display()));
    let _ = std::fs::remove_file(&marker);
    let log_arg = log.display().to_string();
    let rounds = ROUNDS_PER_WORKER.to_string();
    let mut workers = Vec::new();
    for _ in 0..WORKERS {
        workers.push(h.spawn_worker(&["hold-lock", &name, &log_arg, &rounds])?);
    }
    let mut problems = Vec::new();
    for w in workers {
        let exit = w.finish(Duration::from_secs(50)).await?;
        if !exit.status.success() {
            problems.push(format!(
                "worker exited with {}: stdout {:?}, stderr {}",
                exit.status, exit.stdout, exit.stderr
            ));
        }
    }
    let _ = std::fs::remove_file(&marker);
    if !problems.is_empty() {
        fail!("{}", problems.join("; "));
    }
    let text = std::fs::read_to_string(&log).ctx("reading the hold log")?;
    let mut holds: Vec<(u128, u128, u64, String)> = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let parsed = match f.as_slice() {
            [pid, s, e, t] => s
                .parse::<u128>()
                .ok()
                .zip(e.parse::<u128>().ok())
                .zip(t.parse::<u64>().ok())
                .map(|((s, e), t)| (s, e, t, format!("pid {pid}"))),
            _ => None,
        };
        match parsed {
            Some(x) => holds.push(x),
            None => fail!("malformed hold log line {line:?}"),
        }
    }
    ensure_eq!(holds.len(), WORKERS * ROUNDS_PER_WORKER, "recorded holds");
    holds.sort_by_key(|x| x.0);
    let tokens: Vec<u64> = holds.iter().map(|x| x.2).collect();
    no_overlap(
        holds
            .into_iter()
            .map(|(s, e, _, who)| (s, e, who))
            .collect(),
        "processes contending for one lock (CLOCK_REALTIME ns)",
    )?;
    strictly_increasing(&tokens, "holds in time order across processes")
}

/// How long the holder keeps the lock while the waiter waits: long enough for a
/// waiter that re-checks on a growing back-off (instead of being woken) to be
/// re-checking only every second or so by the release.
const WAITER_WAITS: Duration = Duration::from_secs(2);

/// How soon after the release returns the waiter must hold the lock.
const WAKE_LIMIT: Duration = Duration::from_millis(500);

pub(crate) async fn waiter_wakes_promptly_on_release(h: &Harness) -> CaseResult {
    let a = h.started(h.member("a")).await?;
    // Push case (see `Harness::pushing`): the waiter.
    let b = h.pushing(h.member("b")).await?;
    let c = h.started(h.member("c")).await?;
    let name = h.lock_name("lock");
    let la = a.get_lock(&name).ctx("get_lock")?;
    let lb = b.get_lock(&name).ctx("get_lock")?;
    let lc = c.get_lock(&name).ctx("get_lock")?;
    let mut wakes = Vec::new();
    for round in 0..3 {
        ensure!(
            la.acquire(Wait::For(PROMPT)).await.ctx("a acquire")?,
            "round {round}: a acquire returned false"
        );
        let waiter = {
            let lb = lb.clone();
            tokio::spawn(async move {
                let r = lb.acquire(Wait::Forever).await;
                (r, Instant::now())
            })
        };
        // While b waits, a third coordinator cannot get the lock either: it is
        // still held (by a; b's waiter has not returned).
        ensure!(
            !lc.acquire(Wait::For(WAITER_WAITS))
                .await
                .ctx("c acquire while a holds")?,
            "round {round}: c acquired while a holds"
        );
        ensure!(
            !waiter.is_finished(),
            "round {round}: b's acquire returned while a holds"
        );
        ensure!(
            la.release().await.ctx("a release")?,
            "a release returned false"
        );
        let released_at = Instant::now();
        let (r, at) = tokio::time::timeout(PROMPT, waiter)
            .await
            .ctx("the waiter after release")?
            .map_err(|e| CaseError::Failed(format!("waiter task: {e}")))?;
        ensure!(r.ctx("b acquire")?, "b's blocking acquire returned false");
        wakes.push(at.saturating_duration_since(released_at));
        ensure!(
            lb.release().await.ctx("b release")?,
            "b release returned false"
        );
    }
    ensure!(
        wakes.iter().all(|w| *w < WAKE_LIMIT),
        "a blocked waiter took {wakes:?} to get a released lock (limit {WAKE_LIMIT:?}: it must be woken by the release, not find it on a later re-check)"
    );
    Ok(())
}
