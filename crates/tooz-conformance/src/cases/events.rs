//! Push event streams (`Coordinator::events`): another coordinator's joins,
//! leaves and leadership changes arrive without calling `run_watchers`.
//!
//! Push cases: the streams are read on coordinators from [`Harness::pushing`]
//! (the core's polling fallback slowed to an hour) and every event must arrive
//! within [`PUSH_LATENCY`], so only the driver's push passes them.
//! `stream_ends_on_stop` needs no push.

use super::prelude::*;

pub(crate) async fn stream_sees_other_join_and_leave(h: &Harness) -> CaseResult {
    let a = h.pushing(h.member("a")).await?;
    let b = h.started(h.member("b")).await?;
    let g = h.group("g");
    a.create_group(&g).await.ctx("create_group")?;
    let mut s = a.events(&g).await.ctx("events")?;
    b.join_group(&g, &()).await.ctx("b join_group")?;
    let bm = b.member_id().clone();
    next_matching(
        &mut s,
        PUSH_LATENCY,
        "MemberJoined for b",
        |e| matches!(e, GroupEvent::MemberJoined { member, .. } if *member == bm),
    )
    .await?;
    b.leave_group(&g).await.ctx("b leave_group")?;
    next_matching(
        &mut s,
        PUSH_LATENCY,
        "MemberLeft for b",
        |e| matches!(e, GroupEvent::MemberLeft { member, .. } if *member == bm),
    )
    .await?;
    Ok(())
}

pub(crate) async fn stream_sees_leader_elected_and_lost(h: &Harness) -> CaseResult {
    let a = h.pushing(h.member("a")).await?;
    let b = h.pushing(h.member("b")).await?;
    let g = h.group("g");
    a.create_group(&g).await.ctx("create_group")?;
    let mut sa = a.events(&g).await.ctx("a events")?;
    let mut sb = b.events(&g).await.ctx("b events")?;
    ensure!(
        b.try_become_leader(&g)
            .await
            .ctx("try_become_leader")?
            .is_some(),
        "b did not win a free election"
    );
    let bm = b.member_id().clone();
    let is_elected =
        |e: &GroupEvent| matches!(e, GroupEvent::LeaderElected { member, .. } if *member == bm);
    let is_lost =
        |e: &GroupEvent| matches!(e, GroupEvent::LeadershipLost { member, .. } if *member == bm);
    next_matching(
        &mut sa,
        PUSH_LATENCY,
        "LeaderElected(b) on a's stream",
        is_elected,
    )
    .await?;
    next_matching(
        &mut sb,
        PUSH_LATENCY,
        "LeaderElected(b) on b's own stream",
        is_elected,
    )
    .await?;
    b.stand_down_group_leader(&g).await.ctx("stand down")?;
    next_matching(
        &mut sa,
        PUSH_LATENCY,
        "LeadershipLost(b) on a's stream",
        is_lost,
    )
    .await?;
    next_matching(
        &mut sb,
        PUSH_LATENCY,
        "LeadershipLost(b) on b's own stream",
        is_lost,
    )
    .await?;
    Ok(())
}

pub(crate) async fn stream_of_unknown_group_is_group_not_created(h: &Harness) -> CaseResult {
    let a = h.started(h.member("a")).await?;
    let g = h.group("never-created");
    expect_err!(
        a.events(&g).await,
        ToozError::GroupNotCreated(x) if x == g,
        "events() of an unknown group"
    );
    Ok(())
}

pub(crate) async fn stream_ends_on_stop(h: &Harness) -> CaseResult {
    let a = h.started(h.member("a")).await?;
    let g = h.group("g");
    a.create_group(&g).await.ctx("create_group")?;
    let mut s = a.events(&g).await.ctx("events")?;
    a.stop().await.ctx("stop")?;
    let ended =
        tokio::time::timeout(PROMPT, async { while s.next_event().await.is_some() {} }).await;
    ensure!(
        ended.is_ok(),
        "the event stream did not end within {PROMPT:?} of stop()"
    );
    Ok(())
}
