//! Start/stop and cancellation (tooz `test_get_started_status`, `test_stop_first`),
//! plus DESIGN §5a: `stop()` releases locks, leaves groups, wakes waiters with
//! `Stopped` and fires loss signals; dropping an acquire future leaks nothing;
//! dropping a guard releases.

use super::prelude::*;

pub(crate) async fn started_status(h: &Harness) -> CaseResult {
    let c = h.connect(h.member("a")).ctx("connect")?;
    ensure!(!c.is_started(), "is_started() before start");
    c.start(true).await.ctx("start")?;
    ensure!(c.is_started(), "is_started() false after start");
    c.stop().await.ctx("stop")?;
    ensure!(!c.is_started(), "is_started() true after stop");
    Ok(())
}

pub(crate) async fn stop_before_start_is_not_started(h: &Harness) -> CaseResult {
    let c = h.connect(h.member("a")).ctx("connect")?;
    expect_err!(
        c.stop().await,
        ToozError::NotStarted,
        "stop of a never-started coordinator"
    );
    Ok(())
}

pub(crate) async fn start_twice_is_already_started(h: &Harness) -> CaseResult {
    let c = h.started(h.member("a")).await?;
    expect_err!(
        c.start(true).await,
        ToozError::AlreadyStarted,
        "second start"
    );
    ensure!(
        c.is_started(),
        "the failed second start stopped the coordinator"
    );
    Ok(())
}

pub(crate) async fn calls_before_start_are_not_started(h: &Harness) -> CaseResult {
    let c = h.connect(h.member("a")).ctx("connect")?;
    let g = h.group("g");
    expect_err!(
        c.get_groups().await,
        ToozError::NotStarted,
        "get_groups before start"
    );
    expect_err!(
        c.create_group(&g).await,
        ToozError::NotStarted,
        "create_group before start"
    );
    expect_err!(
        c.join_group(&g, &()).await,
        ToozError::NotStarted,
        "join_group before start"
    );
    expect_err!(
        c.heartbeat().await,
        ToozError::NotStarted,
        "heartbeat before start"
    );
    expect_err!(
        c.events(&g).await,
        ToozError::NotStarted,
        "events before start"
    );
    let l = c
        .get_lock(h.lock_name("lock"))
        .ctx("get_lock before start")?;
    expect_err!(
        l.acquire(Wait::No).await,
        ToozError::NotStarted,
        "acquire before start"
    );
    Ok(())
}

pub(crate) async fn restart_after_stop(h: &Harness) -> CaseResult {
    let c = h.started(h.member("a")).await?;
    let g = h.group("g");
    c.join_group_create(&g, &())
        .await
        .ctx("join_group_create")?;
    c.stop().await.ctx("stop")?;
    c.start(true).await.ctx("start again")?;
    ensure!(
        c.joined_groups().is_empty(),
        "joined_groups() after a restart: {:?}",
        c.joined_groups()
    );
    c.join_group(&g, &())
        .await
        .ctx("join_group after restart")?;
    ensure!(
        c.get_members(&g)
            .await
            .ctx("get_members")?
            .contains(c.member_id()),
        "member not listed after re-joining"
    );
    let l = c.get_lock(h.lock_name("lock")).ctx("get_lock")?;
    ensure!(
        l.acquire(Wait::No).await.ctx("acquire after restart")?,
        "acquire after restart returned false"
    );
    ensure!(l.release().await.ctx("release")?, "release returned false");
    Ok(())
}

pub(crate) async fn stop_releases_locks(h: &Harness) -> CaseResult {
    let a = h.started(h.member("a")).await?;
    let b = h.started(h.member("b")).await?;
    let (n1, n2) = (h.lock_name("one"), h.lock_name("two"));
    let l1 = a.get_lock(&n1).ctx("get_lock")?;
    let l2 = a.get_lock(&n2).ctx("get_lock")?;
    ensure!(
        l1.acquire(Wait::No).await.ctx("acquire one")?,
        "acquire one returned false"
    );
    ensure!(
        l2.acquire_shared(Wait::No)
            .await
            .ctx("acquire two shared")?,
        "shared acquire two returned false"
    );
    a.stop().await.ctx("stop")?;
    ensure!(
        !l1.is_held() && !l2.is_held(),
        "lock objects still report holds after stop"
    );
    for n in [&n1, &n2] {
        let l = b.get_lock(n).ctx("get_lock")?;
        ensure!(
            l.acquire(Wait::No)
                .await
                .ctx("acquire after the holder stopped")?,
            "{n} still held right after its holder stopped"
        );
        ensure!(l.release().await.ctx("release")?, "release returned false");
    }
    Ok(())
}

pub(crate) async fn stop_leaves_groups(h: &Harness) -> CaseResult {
    let a = h.started(h.member("a")).await?;
    let b = h.started(h.member("b")).await?;
    let (g1, g2) = (h.group("one"), h.group("two"));
    for g in [&g1, &g2] {
        a.join_group_create(g, &()).await.ctx("join_group_create")?;
    }
    a.stop().await.ctx("stop")?;
    for g in [&g1, &g2] {
        let members = b.get_members(g).await.ctx("get_members")?;
        ensure!(
            !members.contains(a.member_id()),
            "a stopped member is still listed in {g}: {members:?}"
        );
    }
    Ok(())
}

pub(crate) async fn stop_wakes_waiter_with_stopped(h: &Harness) -> CaseResult {
    let a = h.started(h.member("a")).await?;
    let b = h.started(h.member("b")).await?;
    let c = h.started(h.member("c")).await?;
    let name = h.lock_name("lock");
    let la = a.get_lock(&name).ctx("get_lock")?;
    ensure!(
        la.acquire(Wait::No).await.ctx("a acquire")?,
        "a acquire returned false"
    );
    let waiter = {
        let lb = b.get_lock(&name).ctx("get_lock")?;
        tokio::spawn(async move { (lb.acquire(Wait::Forever).await, Instant::now()) })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    ensure!(!waiter.is_finished(), "b acquired while a holds");
    let t0 = Instant::now();
    b.stop().await.ctx("b stop")?;
    let (r, at) = tokio::time::timeout(PROMPT, waiter)
        .await
        .ctx("the waiter after stop()")?
        .map_err(|e| CaseError::Failed(format!("waiter task: {e}")))?;
    expect_err!(
        r,
        ToozError::Stopped,
        "acquire waiting while its coordinator stopped"
    );
    let took = at.saturating_duration_since(t0);
    ensure!(
        took < Duration::from_secs(2),
        "the waiter took {took:?} to see the stop"
    );
    ensure!(
        la.release().await.ctx("a release")?,
        "a release returned false"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let lc = c.get_lock(&name).ctx("get_lock")?;
    ensure!(
        lc.acquire(Wait::For(Duration::from_secs(2)))
            .await
            .ctx("c acquire")?,
        "the stopped waiter left the lock held"
    );
    ensure!(
        lc.release().await.ctx("c release")?,
        "c release returned false"
    );
    Ok(())
}

pub(crate) async fn dropped_acquire_does_not_leak(h: &Harness) -> CaseResult {
    let a = h.started(h.member("a")).await?;
    let b = h.started(h.member("b")).await?;
    let c = h.started(h.member("c")).await?;
    let name = h.lock_name("lock");
    let la = a.get_lock(&name).ctx("get_lock")?;
    let lb = b.get_lock(&name).ctx("get_lock")?;
    ensure!(
        la.acquire(Wait::No).await.ctx("a acquire")?,
        "a acquire returned false"
    );
    let r = tokio::time::timeout(Duration::from_millis(300), lb.acquire(Wait::Forever)).await;
    ensure!(r.is_err(), "b's acquire finished while a holds: {r:?}");
    ensure!(
        la.release().await.ctx("a release")?,
        "a release returned false"
    );
    let lc = c.get_lock(&name).ctx("get_lock")?;
    let got = lc
        .acquire(Wait::For(h.lease() + Duration::from_secs(3)))
        .await
        .ctx("c acquire")?;
    ensure!(
        got,
        "the lock stayed held after b dropped its acquire future (leaked)"
    );
    ensure!(
        !lb.is_held(),
        "b's lock object reports a hold it never returned"
    );
    ensure!(
        lc.release().await.ctx("c release")?,
        "c release returned false"
    );
    Ok(())
}

pub(crate) async fn guard_drop_releases(h: &Harness) -> CaseResult {
    let a = h.started(h.member("a")).await?;
    let b = h.started(h.member("b")).await?;
    let name = h.lock_name("lock");
    let Some(g) = a
        .get_lock(&name)
        .ctx("get_lock")?
        .guard(Wait::No)
        .await
        .ctx("guard")?
    else {
        fail!("guard of a free lock returned None");
    };
    let lb = b.get_lock(&name).ctx("get_lock")?;
    ensure!(
        !lb.acquire(Wait::No).await.ctx("b acquire")?,
        "b acquired a guarded lock"
    );
    drop(g);
    let t0 = Instant::now();
    ensure!(
        lb.acquire(Wait::For(PROMPT))
            .await
            .ctx("b acquire after drop")?,
        "dropping the guard did not release the lock"
    );
    let took = t0.elapsed();
    ensure!(
        took < Duration::from_secs(2),
        "the dropped guard's release took {took:?}"
    );
    ensure!(
        lb.release().await.ctx("b release")?,
        "b release returned false"
    );
    Ok(())
}

pub(crate) async fn guard_release_reports(h: &Harness) -> CaseResult {
    let a = h.started(h.member("a")).await?;
    let l = a.get_lock(h.lock_name("lock")).ctx("get_lock")?;
    let Some(g) = l.guard(Wait::No).await.ctx("guard")? else {
        fail!("guard of a free lock returned None");
    };
    ensure!(
        g.release().await.ctx("guard release")?,
        "guard.release() of a held lock returned false"
    );
    ensure!(
        !l.release().await.ctx("release after guard release")?,
        "release after the guard released returned true"
    );
    Ok(())
}

pub(crate) async fn lost_fires_on_stop(h: &Harness) -> CaseResult {
    let a = h.started(h.member("a")).await?;
    let l = a.get_lock(h.lock_name("lock")).ctx("get_lock")?;
    ensure!(l.lost().is_none(), "lost() of an unheld lock is Some");
    let Some(g) = l.guard(Wait::No).await.ctx("guard")? else {
        fail!("guard of a free lock returned None");
    };
    let lost = g.lost();
    ensure!(!lost.is_lost(), "a fresh hold reports lost");
    a.stop().await.ctx("stop")?;
    tokio::time::timeout(PROMPT, lost.lost())
        .await
        .ctx("the loss signal after stop()")?;
    drop(g);
    Ok(())
}
