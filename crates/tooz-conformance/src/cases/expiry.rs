//! Crashes and expiry (tooz `test_timeout`, plus ours): a member process killed
//! with SIGKILL leaves its groups within the lease and event streams report it; a
//! lock holder killed the same way frees the lock; a live member that does not
//! heartbeat expires exactly when the driver is not `NON_TIMEOUT_BASED`.
//!
//! `crashed_member_leaves` is a push case: its observer polls only every hour (see
//! [`Harness::pushing`]), so the stream must push the crash's leave.

use tooz_core::Characteristic;

use super::prelude::*;

pub(crate) async fn crashed_member_leaves(h: &Harness) -> CaseResult {
    // Push case: the observer's stream must report the join and the crash's leave
    // by itself (its core polls only every hour).
    let a = h.pushing(h.member("observer")).await?;
    let g = h.group("g");
    a.create_group(&g).await.ctx("create_group")?;
    let mut stream = a.events(&g).await.ctx("events")?;
    let m = h.member("crashy");
    let (gs, ms) = (g.to_string(), m.to_string());
    let mut w = h.spawn_worker(&["join", &gs, &ms])?;
    w.expect_line("ready", Duration::from_secs(30)).await?;
    next_matching(
        &mut stream,
        PUSH_LATENCY,
        "MemberJoined for the worker",
        |e| matches!(e, GroupEvent::MemberJoined { member, .. } if *member == m),
    )
    .await?;
    // Alive and beating: it must stay listed past its lease.
    stays_true(
        h.lease() + Duration::from_millis(500),
        "the live (heartbeating) worker stays listed past its lease",
        || {
            let (a, g, m) = (a.clone(), g.clone(), m.clone());
            async move { Ok(a.get_members(&g).await.ctx("get_members")?.contains(&m)) }
        },
    )
    .await?;
    w.kill().await?;
    let deadline = h.expiry_deadline();
    let gone = wait_until(deadline, "the killed member leaves get_members", || {
        let (a, g, m) = (a.clone(), g.clone(), m.clone());
        async move { Ok(!a.get_members(&g).await.ctx("get_members")?.contains(&m)) }
    })
    .await?;
    // get_members dropped the member `gone` after the kill; the stream must have
    // said so by then or within the push latency after.
    next_matching(
        &mut stream,
        PUSH_LATENCY,
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
    // While the holder lives it keeps the lock past its lease (it renews).
    let past_lease = h.lease() + Duration::from_millis(500);
    ensure!(
        !l.acquire(Wait::For(past_lease))
            .await
            .ctx("acquire while the worker holds")?,
        "acquired within {past_lease:?} a lock a live process holds"
    );
    // The crash happens at the signal: measure from just before it.
    let crashed = Instant::now();
    w.kill().await?;
    // Wait well past the deadline, so that a late release is measured (and told
    // apart from one that never comes).
    let deadline = h.expiry_deadline();
    let got = l
        .acquire(Wait::For(deadline + PROMPT))
        .await
        .ctx("acquire after the holder was killed")?;
    let took = crashed.elapsed();
    ensure!(
        got,
        "the lock of a killed holder was still held {took:?} after the kill"
    );
    ensure!(
        took <= deadline,
        "the killed holder's lock was freed only {took:?} after the kill (lease {:?}, limit {deadline:?})",
        h.lease()
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
        let why = format!(
            "a live member that does not heartbeat stays listed for the expiry deadline {:?} (the driver declares {}, requires_beating = {})",
            h.expiry_deadline(),
            if silent.requires_beating() {
                "NON_TIMEOUT_BASED"
            } else {
                "no heartbeats needed"
            },
            silent.requires_beating()
        );
        stays_true(h.expiry_deadline(), &why, || {
            let (o, g, m) = (observer.clone(), g.clone(), m.clone());
            async move { Ok(o.get_members(&g).await.ctx("get_members")?.contains(&m)) }
        })
        .await?;
        observer.run_watchers(None).await.ctx("run_watchers")?;
        ensure_eq!(leaves.len(), 0, "leave events for a live member");
    }
    Ok(())
}
