//! Crashes and expiry (tooz `test_timeout`, plus ours): a member process killed
//! with SIGKILL leaves its groups within the lease and event streams report it; a
//! lock holder killed the same way frees the lock; a live member that does not
//! heartbeat expires exactly when the driver is not `NON_TIMEOUT_BASED`.

use tooz_core::Characteristic;

use super::prelude::*;

pub(crate) async fn crashed_member_leaves(h: &Harness) -> CaseResult {
    let a = h.started(h.member("observer")).await?;
    let g = h.group("g");
    a.create_group(&g).await.ctx("create_group")?;
    let mut stream = a.events(&g).await.ctx("events")?;
    let m = h.member("crashy");
    let (gs, ms) = (g.to_string(), m.to_string());
    let mut w = h.spawn_worker(&["join", &gs, &ms])?;
    w.expect_line("ready", Duration::from_secs(30)).await?;
    next_matching(
        &mut stream,
        PROMPT,
        "MemberJoined for the worker",
        |e| matches!(e, GroupEvent::MemberJoined { member, .. } if *member == m),
    )
    .await?;
    // Alive and beating: it must stay listed past its lease.
    tokio::time::sleep(h.lease() + Duration::from_millis(500)).await;
    ensure!(
        a.get_members(&g).await.ctx("get_members")?.contains(&m),
        "the live worker expired although it heartbeats"
    );
    w.kill().await?;
    let t0 = Instant::now();
    let deadline = h.expiry_deadline();
    let gone = wait_until(deadline, "the killed member leaves get_members", || {
        let (a, g, m) = (a.clone(), g.clone(), m.clone());
        async move { Ok(!a.get_members(&g).await.ctx("get_members")?.contains(&m)) }
    })
    .await?;
    let left = deadline.saturating_sub(t0.elapsed()) + Duration::from_secs(1);
    next_matching(
        &mut stream,
        left,
        "MemberLeft for the killed worker",
        |e| matches!(e, GroupEvent::MemberLeft { member, .. } if *member == m),
    )
    .await
    .map_err(|e| match e {
        CaseError::Failed(msg) => CaseError::Failed(format!(
            "{msg} (get_members dropped it {gone:?} after the kill)"
        )),
        other => other,
    })?;
    Ok(())
}

pub(crate) async fn crashed_holder_frees_lock(h: &Harness) -> CaseResult {
    let a = h.started(h.member("a")).await?;
    let name = h.name("lock");
    let mut w = h.spawn_worker(&["hold", &name])?;
    w.expect_line("ready", Duration::from_secs(30)).await?;
    let l = a.get_lock(name.as_str()).ctx("get_lock")?;
    ensure!(
        !l.acquire(Wait::No)
            .await
            .ctx("acquire while the worker holds")?,
        "acquired a lock another process holds"
    );
    w.kill().await?;
    let t0 = Instant::now();
    let got = l
        .acquire(Wait::For(h.expiry_deadline()))
        .await
        .ctx("acquire after the holder was killed")?;
    ensure!(
        got,
        "the lock of a killed holder was not freed within {:?}",
        h.expiry_deadline()
    );
    let took = t0.elapsed();
    ensure!(
        took <= h.expiry_deadline(),
        "the killed holder's lock took {took:?} to free"
    );
    ensure!(l.release().await.ctx("release")?, "release returned false");
    Ok(())
}

pub(crate) async fn silent_member_matches_timeout_characteristic(h: &Harness) -> CaseResult {
    let silent = h.started_quiet(h.member("silent")).await?;
    let observer = h.started(h.member("observer")).await?;
    let g = h.group("g");
    silent
        .join_group_create(&g, &())
        .await
        .ctx("join_group_create")?;
    let leaves = Seen::new();
    observer
        .watch_leave_group(&g, leaves.callback())
        .await
        .ctx("watch_leave_group")?;
    let timeout_based = silent.requires_beating()
        && !silent
            .characteristics()
            .contains(&Characteristic::NonTimeoutBased);
    let m = silent.member_id().clone();
    if timeout_based {
        wait_until(
            h.expiry_deadline(),
            "a member that never heartbeats expires (the driver is timeout-based)",
            || {
                let (o, g, m) = (observer.clone(), g.clone(), m.clone());
                async move { Ok(!o.get_members(&g).await.ctx("get_members")?.contains(&m)) }
            },
        )
        .await?;
        poll_watchers_until(
            &observer,
            &leaves,
            1,
            PROMPT,
            "leave event of the expired member",
        )
        .await?;
        ensure_eq!(
            leaves.events(),
            vec![GroupEvent::MemberLeft {
                group: g.clone(),
                member: m,
            }],
            "leave events"
        );
    } else {
        tokio::time::sleep(h.expiry_deadline()).await;
        let members = observer.get_members(&g).await.ctx("get_members")?;
        ensure!(
            members.contains(&m),
            "a live member that does not heartbeat expired, but the driver declares {} (requires_beating = {})",
            if silent.requires_beating() {
                "NON_TIMEOUT_BASED"
            } else {
                "no heartbeats needed"
            },
            silent.requires_beating()
        );
        observer.run_watchers(None).await.ctx("run_watchers")?;
        ensure_eq!(leaves.len(), 0, "leave events for a live member");
    }
    Ok(())
}
