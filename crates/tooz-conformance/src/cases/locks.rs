//! Locks (tooz `test_get_lock*`, `test_ensure_acquire_release_return`,
//! `test_acquire_twice_no_deadlock_releasing`, `test_get_multiple_locks_with_same_coord`,
//! `test_get_lock_concurrency_*`, `test_get_lock_serial_locking_two_lock_process`,
//! `test_get_lock_release_broken`, `test_heartbeat_lock_not_acquired`,
//! `test_lock_context_manager_*`, `test_get_shared_lock*`), plus fencing tokens.
//!
//! Our choices: release of a lock not held is `Ok(false)` and never frees another
//! holder; a timed wait that runs out is `Ok(false)`, not an error; guards replace
//! `with lock:`; every lock object excludes every other, whichever coordinator,
//! task or process it belongs to.

use super::prelude::*;

async fn pair(h: &Harness) -> Result<(Coordinator, Coordinator, LockName), CaseError> {
    let a = h.started(h.member("a")).await?;
    let b = h.started(h.member("b")).await?;
    Ok((a, b, h.lock_name("lock")))
}

pub(crate) async fn acquire_release_then_release_again_false(h: &Harness) -> CaseResult {
    let a = h.started(h.member("a")).await?;
    let l = a.get_lock(h.lock_name("lock")).ctx("get_lock")?;
    ensure!(
        l.acquire(Wait::No).await.ctx("acquire")?,
        "acquire of a free lock returned false"
    );
    ensure!(l.is_held(), "is_held() false after acquiring");
    ensure!(
        l.release().await.ctx("release")?,
        "release of a held lock returned false"
    );
    ensure!(
        !l.release().await.ctx("second release")?,
        "second release returned true"
    );
    let g = l.guard(Wait::Forever).await.ctx("guard")?;
    let Some(g) = g else {
        fail!("guard(Forever) on a free lock returned None");
    };
    ensure!(
        g.release().await.ctx("guard release")?,
        "guard release returned false"
    );
    Ok(())
}

pub(crate) async fn release_not_held_is_false(h: &Harness) -> CaseResult {
    let (a, b, name) = pair(h).await?;
    let fresh = a.get_lock(&name).ctx("get_lock")?;
    ensure!(
        !fresh
            .release()
            .await
            .ctx("release of a never-acquired lock")?,
        "release of a lock never acquired returned true"
    );
    let held = b.get_lock(&name).ctx("get_lock")?;
    ensure!(
        held.acquire(Wait::No).await.ctx("b acquire")?,
        "b could not acquire"
    );
    ensure!(
        !fresh.release().await.ctx("release while another holds")?,
        "release by a non-holder returned true"
    );
    let third = a.get_lock(&name).ctx("get_lock")?;
    ensure!(
        !third.acquire(Wait::No).await.ctx("acquire")?,
        "a non-holder's release freed b's lock"
    );
    ensure!(
        held.release().await.ctx("b release")?,
        "b's release returned false"
    );
    Ok(())
}

pub(crate) async fn two_objects_same_coordinator_exclude(h: &Harness) -> CaseResult {
    let a = h.started(h.member("a")).await?;
    let name = h.lock_name("lock");
    let l1 = a.get_lock(&name).ctx("get_lock")?;
    let l2 = a.get_lock(&name).ctx("get_lock")?;
    ensure!(
        l1.acquire(Wait::No).await.ctx("l1 acquire")?,
        "l1 acquire returned false"
    );
    ensure!(
        !l2.acquire(Wait::No).await.ctx("l2 acquire")?,
        "a second lock object of the same name acquired while l1 holds"
    );
    ensure!(
        !l2.release().await.ctx("l2 release")?,
        "l2 release returned true"
    );
    ensure!(
        l1.release().await.ctx("l1 release")?,
        "l1 release returned false"
    );
    ensure!(
        !l2.release().await.ctx("l2 release")?,
        "l2 release returned true"
    );
    Ok(())
}

pub(crate) async fn same_object_is_not_reentrant(h: &Harness) -> CaseResult {
    let a = h.started(h.member("a")).await?;
    let l = a.get_lock(h.lock_name("lock")).ctx("get_lock")?;
    ensure!(
        l.acquire(Wait::No).await.ctx("acquire")?,
        "acquire returned false"
    );
    ensure!(
        !l.acquire(Wait::No).await.ctx("second acquire")?,
        "a held lock object acquired again (locks are not re-entrant)"
    );
    ensure!(l.release().await.ctx("release")?, "release returned false");
    Ok(())
}

pub(crate) async fn third_object_same_coordinator_excluded(h: &Harness) -> CaseResult {
    let a = h.started(h.member("a")).await?;
    let name = h.lock_name("lock");
    let l1 = a.get_lock(&name).ctx("get_lock")?;
    ensure!(
        l1.acquire(Wait::No).await.ctx("acquire")?,
        "acquire returned false"
    );
    for i in 2..=3 {
        let other = a.get_lock(&name).ctx("get_lock")?;
        ensure!(
            !other.acquire(Wait::No).await.ctx("acquire")?,
            "lock object #{i} acquired while #1 holds"
        );
    }
    ensure!(l1.release().await.ctx("release")?, "release returned false");
    Ok(())
}

pub(crate) async fn other_task_same_coordinator_excluded(h: &Harness) -> CaseResult {
    let (a, b, name) = pair(h).await?;
    let l = a.get_lock(&name).ctx("get_lock")?;
    ensure!(
        l.acquire(Wait::No).await.ctx("acquire")?,
        "acquire returned false"
    );
    let same = {
        let (a, name) = (a.clone(), name.clone());
        tokio::spawn(async move { a.get_lock(&name)?.acquire(Wait::No).await })
    };
    let other = {
        let (b, name) = (b.clone(), name.clone());
        tokio::spawn(async move { b.get_lock(&name)?.acquire(Wait::No).await })
    };
    let join = |r: Result<tooz_core::Result<bool>, tokio::task::JoinError>| {
        r.map_err(|e| CaseError::Failed(format!("task: {e}")))
    };
    ensure!(
        !join(same.await)?.ctx("acquire from another task, same coordinator")?,
        "another task of the same coordinator acquired a held lock"
    );
    ensure!(
        !join(other.await)?.ctx("acquire from another task, other coordinator")?,
        "another coordinator's task acquired a held lock"
    );
    ensure!(l.release().await.ctx("release")?, "release returned false");
    Ok(())
}

pub(crate) async fn other_coordinator_excluded_then_acquires(h: &Harness) -> CaseResult {
    let (a, b, name) = pair(h).await?;
    let la = a.get_lock(&name).ctx("get_lock")?;
    let lb = b.get_lock(&name).ctx("get_lock")?;
    ensure!(
        la.acquire(Wait::No).await.ctx("a acquire")?,
        "a acquire returned false"
    );
    ensure!(
        !lb.acquire(Wait::No).await.ctx("b acquire")?,
        "b acquired while a holds"
    );
    ensure!(
        la.release().await.ctx("a release")?,
        "a release returned false"
    );
    let got = tokio::time::timeout(PROMPT, lb.acquire(Wait::Forever))
        .await
        .ctx("b blocking acquire of a free lock")?
        .ctx("b acquire")?;
    ensure!(got, "b blocking acquire returned false");
    ensure!(
        lb.release().await.ctx("b release")?,
        "b release returned false"
    );
    Ok(())
}

pub(crate) async fn waiter_on_same_object_acquires_after_release(h: &Harness) -> CaseResult {
    let a = h.started(h.member("a")).await?;
    let l = a.get_lock(h.lock_name("lock")).ctx("get_lock")?;
    ensure!(
        l.acquire(Wait::No).await.ctx("acquire")?,
        "acquire returned false"
    );
    let waiter = {
        let l = l.clone();
        tokio::spawn(async move { l.acquire(Wait::Forever).await })
    };
    // The waiter gets 300 ms to start waiting; meanwhile the object stays held: a
    // timed acquire on it waits them out and returns false.
    ensure!(
        !l.acquire(Wait::For(Duration::from_millis(300)))
            .await
            .ctx("timed acquire on the held object")?,
        "a timed acquire on the held lock object returned true"
    );
    ensure!(
        !waiter.is_finished(),
        "a blocking acquire on the held lock object returned before the release"
    );
    ensure!(l.release().await.ctx("release")?, "release returned false");
    let got = tokio::time::timeout(PROMPT, waiter)
        .await
        .ctx("waiter after release")?
        .map_err(|e| CaseError::Failed(format!("waiter task: {e}")))?
        .ctx("waiter acquire")?;
    ensure!(got, "the waiter's acquire returned false");
    ensure!(
        l.release().await.ctx("release")?,
        "waiter's release returned false"
    );
    Ok(())
}

pub(crate) async fn holding_one_lock_survives_taking_another(h: &Harness) -> CaseResult {
    let (a, b, name) = pair(h).await?;
    let other_name = h.lock_name("other");
    let la = a.get_lock(&name).ctx("get_lock")?;
    ensure!(
        la.acquire(Wait::No).await.ctx("acquire A")?,
        "acquire A returned false"
    );
    let task = {
        let a = a.clone();
        tokio::spawn(async move {
            let lb = a.get_lock(&other_name)?;
            let got = lb.acquire(Wait::No).await?;
            let released = lb.release().await?;
            Ok::<_, ToozError>((got, released))
        })
    };
    let (got, released) = task
        .await
        .map_err(|e| CaseError::Failed(format!("task: {e}")))?
        .ctx("taking lock B")?;
    ensure!(
        got && released,
        "lock B: acquired {got}, released {released}"
    );
    ensure!(
        la.is_held(),
        "lock A is not held after taking and releasing B"
    );
    ensure!(
        !b.get_lock(&name)
            .ctx("get_lock")?
            .acquire(Wait::No)
            .await
            .ctx("b acquire A")?,
        "taking lock B released lock A"
    );
    ensure!(
        la.release().await.ctx("release A")?,
        "release A returned false"
    );
    Ok(())
}

pub(crate) async fn timed_wait_returns_false(h: &Harness) -> CaseResult {
    let (a, b, name) = pair(h).await?;
    let la = a.get_lock(&name).ctx("get_lock")?;
    ensure!(
        la.acquire(Wait::No).await.ctx("a acquire")?,
        "a acquire returned false"
    );
    let lb = b.get_lock(&name).ctx("get_lock")?;
    let t0 = Instant::now();
    let got = lb
        .acquire(Wait::For(Duration::from_millis(500)))
        .await
        .ctx("timed acquire of a held lock (must be Ok(false))")?;
    let took = t0.elapsed();
    ensure!(!got, "timed acquire of a held lock returned true");
    ensure!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(5),
        "a 500 ms wait took {took:?}"
    );
    let g = lb
        .guard(Wait::For(Duration::from_millis(200)))
        .await
        .ctx("timed guard of a held lock")?;
    ensure!(g.is_none(), "timed guard of a held lock returned a guard");
    let got = lb
        .acquire(Wait::from_secs_f64(0.2))
        .await
        .ctx("acquire with a numeric wait (tooz blocking=0.2)")?;
    ensure!(!got, "numeric wait on a held lock returned true");
    ensure!(
        la.release().await.ctx("a release")?,
        "a release returned false"
    );
    Ok(())
}

pub(crate) async fn timed_guard_acquires_free_lock(h: &Harness) -> CaseResult {
    let a = h.started(h.member("a")).await?;
    let l = a.get_lock(h.lock_name("lock")).ctx("get_lock")?;
    let t0 = Instant::now();
    let g = l
        .guard(Wait::from_secs_f64(10.12))
        .await
        .ctx("guard(10.12 s) of a free lock")?;
    let took = t0.elapsed();
    let Some(g) = g else {
        fail!("guard(10.12 s) of a free lock returned None");
    };
    ensure!(
        took < Duration::from_secs(2),
        "acquiring a free lock took {took:?}"
    );
    ensure!(g.release().await.ctx("release")?, "release returned false");
    Ok(())
}

pub(crate) async fn guard_or_fail_is_lock_acquire_failed(h: &Harness) -> CaseResult {
    let (a, b, name) = pair(h).await?;
    let la = a.get_lock(&name).ctx("get_lock")?;
    ensure!(
        la.acquire(Wait::No).await.ctx("a acquire")?,
        "a acquire returned false"
    );
    let lb = b.get_lock(&name).ctx("get_lock")?;
    expect_err!(
        lb.guard_or_fail(Wait::No).await,
        ToozError::LockAcquireFailed(n) if n == name,
        "guard_or_fail on a held lock"
    );
    ensure!(
        la.release().await.ctx("a release")?,
        "a release returned false"
    );
    Ok(())
}

pub(crate) async fn guard_exposes_lock_and_token(h: &Harness) -> CaseResult {
    let a = h.started(h.member("a")).await?;
    let name = h.lock_name("lock");
    let l = a.get_lock(&name).ctx("get_lock")?;
    let Some(g) = l.guard(Wait::No).await.ctx("guard")? else {
        fail!("guard of a free lock returned None");
    };
    ensure_eq!(g.lock().name(), &name, "guard.lock().name()");
    ensure_eq!(
        Some(g.token()),
        l.fencing_token(),
        "guard token vs lock token"
    );
    ensure_eq!(l.mode(), Some(Mode::Exclusive), "mode of the hold");
    ensure!(!g.lost().is_lost(), "a fresh hold reports lost");
    ensure!(
        g.release().await.ctx("guard release")?,
        "guard release returned false"
    );
    ensure!(!l.is_held(), "lock still held after guard release");
    ensure_eq!(l.fencing_token(), None, "token after release");
    Ok(())
}

pub(crate) async fn release_inside_guard_then_drop_is_harmless(h: &Harness) -> CaseResult {
    let (a, b, name) = pair(h).await?;
    let c = h.started(h.member("c")).await?;
    let la = a.get_lock(&name).ctx("get_lock")?;
    let Some(g) = la.guard(Wait::No).await.ctx("guard")? else {
        fail!("guard of a free lock returned None");
    };
    ensure!(
        la.release().await.ctx("release inside the guard")?,
        "release inside the guard returned false"
    );
    let lb = b.get_lock(&name).ctx("get_lock")?;
    ensure!(
        lb.acquire(Wait::No).await.ctx("b acquire")?,
        "b could not take the released lock"
    );
    drop(g);
    // A dropped guard releases in the background within GUARD_DROP_RELEASE (see
    // lifecycle::guard_drop_releases): for that long b's lock must stay b's.
    ensure!(
        !c.get_lock(&name)
            .ctx("get_lock")?
            .acquire(Wait::For(GUARD_DROP_RELEASE))
            .await
            .ctx("c acquire")?,
        "dropping the already-released guard freed b's lock"
    );
    ensure!(
        lb.release().await.ctx("b release")?,
        "b release returned false"
    );
    Ok(())
}

pub(crate) async fn break_lock_frees_and_old_holder_release_false(h: &Harness) -> CaseResult {
    let (a, b, name) = pair(h).await?;
    let c = h.started(h.member("c")).await?;
    let l1 = a.get_lock(&name).ctx("get_lock")?;
    let l2 = b.get_lock(&name).ctx("get_lock")?;
    ensure!(
        l1.acquire(Wait::No).await.ctx("l1 acquire")?,
        "l1 acquire returned false"
    );
    ensure!(
        !l2.acquire(Wait::No).await.ctx("l2 acquire")?,
        "l2 acquired a held lock"
    );
    ensure!(
        l2.break_lock().await.ctx("break_lock")?,
        "break_lock of a held lock returned false"
    );
    ensure!(
        l2.acquire(Wait::No).await.ctx("l2 acquire after break")?,
        "l2 could not acquire a broken lock"
    );
    ensure!(
        !l1.is_still_owner().await.ctx("l1 is_still_owner")?,
        "the broken holder still thinks it owns the lock"
    );
    ensure!(
        !l1.release().await.ctx("l1 release after break")?,
        "the broken holder's release returned true"
    );
    ensure!(
        !c.get_lock(&name)
            .ctx("get_lock")?
            .acquire(Wait::No)
            .await
            .ctx("c acquire")?,
        "the broken holder's release freed l2's lock"
    );
    ensure!(
        l2.release().await.ctx("l2 release")?,
        "l2 release returned false"
    );
    Ok(())
}

pub(crate) async fn heartbeat_not_held_is_false(h: &Harness) -> CaseResult {
    let a = h.started(h.member("a")).await?;
    let l = a.get_lock(h.lock_name("lock")).ctx("get_lock")?;
    ensure!(
        !l.heartbeat().await.ctx("heartbeat of an unheld lock")?,
        "lock heartbeat returned true while not held"
    );
    ensure!(
        l.acquire(Wait::No).await.ctx("acquire")?,
        "acquire returned false"
    );
    ensure!(
        l.heartbeat().await.ctx("heartbeat of a held lock")?,
        "lock heartbeat returned false while held"
    );
    ensure!(l.release().await.ctx("release")?, "release returned false");
    Ok(())
}

pub(crate) async fn other_process_cannot_take_held_lock(h: &Harness) -> CaseResult {
    let a = h.started(h.member("a")).await?;
    let name = h.name("lock");
    let l = a.get_lock(name.as_str()).ctx("get_lock")?;
    ensure!(
        l.acquire(Wait::No).await.ctx("acquire")?,
        "acquire returned false"
    );
    let mut w = h.spawn_worker(&["try-lock", &name])?;
    let line = w.next_line(Duration::from_secs(30)).await?;
    let exit = w.finish(Duration::from_secs(30)).await?;
    ensure_eq!(
        line.as_deref(),
        Some("acquired false"),
        "another process trying a held lock (stderr: {})",
        exit.stderr
    );
    ensure!(l.release().await.ctx("release")?, "release returned false");
    Ok(())
}

pub(crate) async fn other_process_takes_released_lock(h: &Harness) -> CaseResult {
    let a = h.started(h.member("a")).await?;
    let name = h.name("lock");
    let l = a.get_lock(name.as_str()).ctx("get_lock")?;
    ensure!(
        l.acquire(Wait::No).await.ctx("acquire")?,
        "acquire returned false"
    );
    ensure!(l.release().await.ctx("release")?, "release returned false");
    let mut w = h.spawn_worker(&["try-lock", &name])?;
    let line = w.next_line(Duration::from_secs(30)).await?;
    let exit = w.finish(Duration::from_secs(30)).await?;
    ensure_eq!(
        line.as_deref(),
        Some("acquired true"),
        "another process trying a released lock (stderr: {})",
        exit.stderr
    );
    ensure!(
        exit.status.success(),
        "worker exited with {}: {}",
        exit.status,
        exit.stderr
    );
    Ok(())
}

pub(crate) async fn shared_acquire_release(h: &Harness) -> CaseResult {
    let a = h.started(h.member("a")).await?;
    let l = a.get_lock(h.lock_name("lock")).ctx("get_lock")?;
    ensure!(
        l.acquire_shared(Wait::No).await.ctx("acquire_shared")?,
        "shared acquire returned false"
    );
    ensure_eq!(l.mode(), Some(Mode::Shared), "mode of the hold");
    ensure!(l.release().await.ctx("release")?, "release returned false");
    let Some(g) = l
        .guard_with(Mode::Shared, Wait::No)
        .await
        .ctx("shared guard")?
    else {
        fail!("shared guard of a free lock returned None");
    };
    ensure!(
        g.release().await.ctx("guard release")?,
        "shared guard release returned false"
    );
    Ok(())
}

pub(crate) async fn shared_same_object_twice_needs_two_releases(h: &Harness) -> CaseResult {
    let a = h.started(h.member("a")).await?;
    let b = h.started(h.member("b")).await?;
    let name = h.lock_name("lock");
    let l = a.get_lock(&name).ctx("get_lock")?;
    ensure!(
        l.acquire_shared(Wait::No)
            .await
            .ctx("first acquire_shared")?,
        "first shared acquire returned false"
    );
    ensure!(
        l.acquire_shared(Wait::No)
            .await
            .ctx("second acquire_shared")?,
        "second shared acquire returned false"
    );
    ensure!(
        l.release().await.ctx("first release")?,
        "first release returned false"
    );
    ensure!(
        !b.get_lock(&name)
            .ctx("get_lock")?
            .acquire(Wait::No)
            .await
            .ctx("exclusive acquire")?,
        "one release freed a lock held shared twice"
    );
    ensure!(
        l.release().await.ctx("second release")?,
        "second release returned false"
    );
    ensure!(
        !l.release().await.ctx("third release")?,
        "third release returned true"
    );
    Ok(())
}

pub(crate) async fn shared_two_coordinators_share(h: &Harness) -> CaseResult {
    let (a, b, name) = pair(h).await?;
    let la = a.get_lock(&name).ctx("get_lock")?;
    let lb = b.get_lock(&name).ctx("get_lock")?;
    ensure!(
        la.acquire_shared(Wait::No).await.ctx("a acquire_shared")?,
        "a shared acquire returned false"
    );
    ensure!(
        lb.acquire_shared(Wait::No).await.ctx("b acquire_shared")?,
        "b could not share a lock a holds shared"
    );
    ensure!(
        la.release().await.ctx("a release")?,
        "a release returned false"
    );
    ensure!(
        lb.release().await.ctx("b release")?,
        "b release returned false"
    );
    Ok(())
}

pub(crate) async fn shared_excludes_exclusive(h: &Harness) -> CaseResult {
    let (a, b, name) = pair(h).await?;
    let la = a.get_lock(&name).ctx("get_lock")?;
    let lb = b.get_lock(&name).ctx("get_lock")?;
    ensure!(
        la.acquire_shared(Wait::No).await.ctx("a acquire_shared")?,
        "a shared acquire returned false"
    );
    ensure!(
        !lb.acquire(Wait::No).await.ctx("b exclusive acquire")?,
        "exclusive acquire succeeded while the lock is held shared"
    );
    ensure!(
        la.release().await.ctx("a release")?,
        "a release returned false"
    );
    ensure!(
        !lb.release().await.ctx("b release")?,
        "b's release returned true without a hold"
    );
    ensure!(
        lb.acquire(Wait::No)
            .await
            .ctx("b exclusive acquire after release")?,
        "exclusive acquire failed after the shared holder released"
    );
    ensure!(
        lb.release().await.ctx("b release")?,
        "b release returned false"
    );
    Ok(())
}

pub(crate) async fn exclusive_excludes_shared(h: &Harness) -> CaseResult {
    let (a, b, name) = pair(h).await?;
    let la = a.get_lock(&name).ctx("get_lock")?;
    let lb = b.get_lock(&name).ctx("get_lock")?;
    ensure!(
        la.acquire(Wait::No).await.ctx("a acquire")?,
        "a acquire returned false"
    );
    ensure!(
        !lb.acquire_shared(Wait::No).await.ctx("b acquire_shared")?,
        "shared acquire succeeded while the lock is held exclusively"
    );
    ensure!(
        la.release().await.ctx("a release")?,
        "a release returned false"
    );
    ensure!(
        lb.acquire_shared(Wait::No)
            .await
            .ctx("b acquire_shared after release")?,
        "shared acquire failed after the exclusive holder released"
    );
    ensure!(
        lb.release().await.ctx("b release")?,
        "b release returned false"
    );
    Ok(())
}

pub(crate) async fn fencing_tokens_increase_across_holders(h: &Harness) -> CaseResult {
    let name = h.lock_name("lock");
    let mut coords = Vec::new();
    for i in 0..4 {
        coords.push(h.started(h.member(&format!("c{i}"))).await?);
    }
    let mut tokens = Vec::new();
    for round in 0..3 {
        for c in &coords {
            let l = c.get_lock(&name).ctx("get_lock")?;
            let Some(g) = l.guard(Wait::For(PROMPT)).await.ctx("guard")? else {
                fail!(
                    "round {round}: {} could not acquire a free lock",
                    c.member_id()
                );
            };
            tokens.push(g.token().0);
            ensure!(g.release().await.ctx("release")?, "release returned false");
        }
    }
    strictly_increasing(&tokens, "successive holders of one lock")
}
