//! Watch callbacks driven by `run_watchers` (tooz `test_watch_group_join`,
//! `test_watch_leave_group`, `test_watch_*_non_existent`,
//! `test_watch_join_group_booted_out`, `test_unwatch_*`).
//!
//! Unwatching is by the `WatchId` returned at registration.

use super::prelude::*;

pub(crate) async fn join_watch_sees_other_member(h: &Harness) -> CaseResult {
    let a = h.started(h.member("a")).await?;
    let b = h.started(h.member("b")).await?;
    let g = h.group("g");
    a.create_group(&g).await.ctx("create_group")?;
    let seen = Seen::new();
    let id = a
        .watch_join_group(&g, seen.callback())
        .await
        .ctx("watch_join_group")?;
    b.join_group(&g, &()).await.ctx("b join_group")?;
    let returned = poll_watchers_until(&a, &seen, 1, PROMPT, "join event").await?;
    let expected = GroupEvent::MemberJoined {
        group: g.clone(),
        member: b.member_id().clone(),
    };
    ensure_eq!(
        seen.events(),
        vec![expected.clone()],
        "join callback events"
    );
    ensure_eq!(returned, vec![expected], "events returned by run_watchers");
    a.unwatch_join_group(&g, id).ctx("unwatch_join_group")?;
    b.leave_group(&g).await.ctx("b leave_group")?;
    b.join_group(&g, &()).await.ctx("b join_group again")?;
    let after = a.run_watchers(None).await.ctx("run_watchers")?;
    ensure!(
        after.is_empty(),
        "run_watchers after unwatch returned {after:?}"
    );
    ensure_eq!(seen.len(), 1, "callback calls after unwatch");
    Ok(())
}

pub(crate) async fn leave_watch_sees_other_member(h: &Harness) -> CaseResult {
    let a = h.started(h.member("a")).await?;
    let b = h.started(h.member("b")).await?;
    let g = h.group("g");
    a.create_group(&g).await.ctx("create_group")?;
    let joins = Seen::new();
    let leaves = Seen::new();
    let jid = a
        .watch_join_group(&g, joins.callback())
        .await
        .ctx("watch_join_group")?;
    let lid = a
        .watch_leave_group(&g, leaves.callback())
        .await
        .ctx("watch_leave_group")?;
    b.join_group(&g, &()).await.ctx("b join_group")?;
    poll_watchers_until(&a, &joins, 1, PROMPT, "join event").await?;
    ensure_eq!(leaves.len(), 0, "leave callbacks after a join");
    b.leave_group(&g).await.ctx("b leave_group")?;
    poll_watchers_until(&a, &leaves, 1, PROMPT, "leave event").await?;
    ensure_eq!(
        leaves.events(),
        vec![GroupEvent::MemberLeft {
            group: g.clone(),
            member: b.member_id().clone(),
        }],
        "leave callback events"
    );
    ensure_eq!(joins.len(), 1, "join callbacks");
    a.unwatch_join_group(&g, jid).ctx("unwatch_join_group")?;
    a.unwatch_leave_group(&g, lid).ctx("unwatch_leave_group")?;
    b.join_group(&g, &()).await.ctx("b join_group again")?;
    b.leave_group(&g).await.ctx("b leave_group again")?;
    let after = a.run_watchers(None).await.ctx("run_watchers")?;
    ensure!(
        after.is_empty(),
        "run_watchers after unwatch returned {after:?}"
    );
    ensure_eq!(
        (joins.len(), leaves.len()),
        (1, 1),
        "callback calls after unwatch"
    );
    Ok(())
}

pub(crate) async fn watch_join_unknown_group_is_group_not_created(h: &Harness) -> CaseResult {
    let a = h.started(h.member("a")).await?;
    let g = h.group("never-created");
    expect_err!(
        a.watch_join_group(&g, |_| {}).await,
        ToozError::GroupNotCreated(x) if x == g,
        "watch_join_group on an unknown group"
    );
    ensure_eq!(
        a.watch_counts(&g),
        (0, 0, 0),
        "hooks registered after the refusal"
    );
    Ok(())
}

pub(crate) async fn watch_leave_unknown_group_is_group_not_created(h: &Harness) -> CaseResult {
    let a = h.started(h.member("a")).await?;
    let g = h.group("never-created");
    expect_err!(
        a.watch_leave_group(&g, |_| {}).await,
        ToozError::GroupNotCreated(x) if x == g,
        "watch_leave_group on an unknown group"
    );
    ensure_eq!(
        a.watch_counts(&g),
        (0, 0, 0),
        "hooks registered after the refusal"
    );
    Ok(())
}

pub(crate) async fn booted_out_member_forgets_group(h: &Harness) -> CaseResult {
    let m = h.member("booted");
    // No heart: a heartbeat must not be what notices (or undoes) the removal.
    let a = h.started_quiet(m.clone()).await?;
    let g = h.group("g");
    a.create_group(&g).await.ctx("create_group")?;
    a.join_group(&g, &()).await.ctx("join_group")?;
    a.watch_join_group(&g, |_| {})
        .await
        .ctx("watch_join_group")?;
    let twin = h.started_quiet(m.clone()).await?;
    twin.leave_group(&g)
        .await
        .ctx("leave_group by another coordinator with the same member id")?;
    ensure!(
        a.joined_groups().contains(&g),
        "the group left the joined set before run_watchers looked"
    );
    a.run_watchers(None).await.ctx("run_watchers")?;
    ensure!(
        !a.joined_groups().contains(&g),
        "after run_watchers saw the member gone, joined_groups() still lists {g}"
    );
    Ok(())
}

pub(crate) async fn deleted_group_is_not_an_error(h: &Harness) -> CaseResult {
    let a = h.started(h.member("a")).await?;
    let b = h.started(h.member("b")).await?;
    let g = h.group("g");
    a.create_group(&g).await.ctx("create_group")?;
    let leaves = Seen::new();
    a.watch_leave_group(&g, leaves.callback())
        .await
        .ctx("watch_leave_group")?;
    b.join_group(&g, &()).await.ctx("b join_group")?;
    a.run_watchers(None).await.ctx("run_watchers")?;
    b.leave_group(&g).await.ctx("b leave_group")?;
    a.delete_group(&g).await.ctx("delete_group")?;
    poll_watchers_until(&a, &leaves, 1, PROMPT, "leave event from a deleted group").await?;
    let again = a
        .run_watchers(None)
        .await
        .ctx("run_watchers on a deleted group")?;
    ensure!(again.is_empty(), "unexpected events {again:?}");
    Ok(())
}

pub(crate) async fn unwatch_join_unknown_id_is_not_found(h: &Harness) -> CaseResult {
    let a = h.started(h.member("a")).await?;
    let g = h.group("g");
    a.create_group(&g).await.ctx("create_group")?;
    let id = a
        .watch_join_group(&g, |_| {})
        .await
        .ctx("watch_join_group")?;
    a.unwatch_join_group(&g, id).ctx("unwatch_join_group")?;
    expect_err!(
        a.unwatch_join_group(&g, id),
        ToozError::WatchCallbackNotFound { .. },
        "unwatch_join_group of an unregistered id"
    );
    Ok(())
}

pub(crate) async fn unwatch_leave_unknown_id_is_not_found(h: &Harness) -> CaseResult {
    let a = h.started(h.member("a")).await?;
    let g = h.group("g");
    a.create_group(&g).await.ctx("create_group")?;
    let id = a
        .watch_leave_group(&g, |_| {})
        .await
        .ctx("watch_leave_group")?;
    a.unwatch_leave_group(&g, id).ctx("unwatch_leave_group")?;
    expect_err!(
        a.unwatch_leave_group(&g, id),
        ToozError::WatchCallbackNotFound { .. },
        "unwatch_leave_group of an unregistered id"
    );
    Ok(())
}

pub(crate) async fn unwatch_leave_empties_table(h: &Harness) -> CaseResult {
    let a = h.started(h.member("a")).await?;
    let g = h.group("g");
    a.create_group(&g).await.ctx("create_group")?;
    let id = a
        .watch_leave_group(&g, |_| {})
        .await
        .ctx("watch_leave_group")?;
    ensure_eq!(
        a.watch_counts(&g),
        (0, 1, 0),
        "hooks after watch_leave_group"
    );
    a.unwatch_leave_group(&g, id).ctx("unwatch_leave_group")?;
    ensure_eq!(
        a.watch_counts(&g),
        (0, 0, 0),
        "hooks after unwatch_leave_group"
    );
    Ok(())
}

pub(crate) async fn unwatch_elected_unknown_id_is_not_found(h: &Harness) -> CaseResult {
    let a = h.started(h.member("a")).await?;
    let g = h.group("g");
    a.create_group(&g).await.ctx("create_group")?;
    let id = a
        .watch_elected_as_leader(&g, |_| {})
        .ctx("watch_elected_as_leader")?;
    a.unwatch_elected_as_leader(&g, id)
        .ctx("unwatch_elected_as_leader")?;
    expect_err!(
        a.unwatch_elected_as_leader(&g, id),
        ToozError::WatchCallbackNotFound { .. },
        "unwatch_elected_as_leader of an unregistered id"
    );
    Ok(())
}

pub(crate) async fn unwatch_elected_empties_table(h: &Harness) -> CaseResult {
    let a = h.started(h.member("a")).await?;
    let g = h.group("g");
    a.create_group(&g).await.ctx("create_group")?;
    let id = a
        .watch_elected_as_leader(&g, |_| {})
        .ctx("watch_elected_as_leader")?;
    ensure_eq!(
        a.watch_counts(&g),
        (0, 0, 1),
        "hooks after watch_elected_as_leader"
    );
    a.unwatch_elected_as_leader(&g, id)
        .ctx("unwatch_elected_as_leader")?;
    ensure_eq!(a.watch_counts(&g), (0, 0, 0), "hooks after unwatch");
    Ok(())
}
