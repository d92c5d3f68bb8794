//! Callback registration by `WatchId` (tooz `TestHook`: `test_register_hook`,
//! `test_unregister_hook`). Closures cannot be compared, so every registration
//! returns an id and unwatching takes it.

use super::prelude::*;

pub(crate) async fn registered_callback_runs_once(h: &Harness) -> CaseResult {
    let a = h.started(h.member("a")).await?;
    let b = h.started(h.member("b")).await?;
    let g = h.group("g");
    a.create_group(&g).await.ctx("create_group")?;
    let seen = Seen::new();
    a.watch_join_group(&g, seen.callback())
        .await
        .ctx("watch_join_group")?;
    b.join_group(&g, &()).await.ctx("b join_group")?;
    let returned = poll_watchers_until(&a, &seen, 1, PROMPT, "join event").await?;
    ensure_eq!(seen.len(), 1, "callback calls");
    ensure_eq!(returned.len(), 1, "events returned by run_watchers");
    let again = a.run_watchers(None).await.ctx("run_watchers")?;
    ensure!(again.is_empty(), "second run_watchers returned {again:?}");
    ensure_eq!(seen.len(), 1, "callback calls after a quiet poll");
    Ok(())
}

pub(crate) async fn nothing_to_report_is_empty(h: &Harness) -> CaseResult {
    let a = h.started(h.member("a")).await?;
    let none = a
        .run_watchers(None)
        .await
        .ctx("run_watchers without hooks")?;
    ensure!(
        none.is_empty(),
        "run_watchers without hooks returned {none:?}"
    );
    let g = h.group("g");
    a.create_group(&g).await.ctx("create_group")?;
    a.watch_join_group(&g, |_| {})
        .await
        .ctx("watch_join_group")?;
    let quiet = a
        .run_watchers(Some(Duration::from_secs(10)))
        .await
        .ctx("run_watchers with a timeout")?;
    ensure!(
        quiet.is_empty(),
        "run_watchers on a quiet group returned {quiet:?}"
    );
    Ok(())
}

pub(crate) async fn unwatched_callback_is_not_called(h: &Harness) -> CaseResult {
    let a = h.started(h.member("a")).await?;
    let b = h.started(h.member("b")).await?;
    let g = h.group("g");
    a.create_group(&g).await.ctx("create_group")?;
    let seen = Seen::new();
    let id = a
        .watch_join_group(&g, seen.callback())
        .await
        .ctx("watch_join_group")?;
    a.unwatch(id).ctx("unwatch")?;
    b.join_group(&g, &()).await.ctx("b join_group")?;
    let returned = a.run_watchers(None).await.ctx("run_watchers")?;
    ensure!(
        returned.is_empty(),
        "run_watchers after unwatch returned {returned:?}"
    );
    ensure_eq!(seen.len(), 0, "calls of an unwatched callback");
    Ok(())
}

pub(crate) async fn unwatch_twice_is_not_found(h: &Harness) -> CaseResult {
    let a = h.started(h.member("a")).await?;
    let g = h.group("g");
    a.create_group(&g).await.ctx("create_group")?;
    let id = a
        .watch_join_group(&g, |_| {})
        .await
        .ctx("watch_join_group")?;
    a.unwatch(id).ctx("first unwatch")?;
    expect_err!(
        a.unwatch(id),
        ToozError::WatchCallbackNotFound { .. },
        "second unwatch of the same id"
    );
    Ok(())
}

pub(crate) async fn unwatch_wrong_kind_or_group_is_not_found(h: &Harness) -> CaseResult {
    let a = h.started(h.member("a")).await?;
    let g = h.group("g");
    let other = h.group("other");
    a.create_group(&g).await.ctx("create_group")?;
    a.create_group(&other).await.ctx("create_group")?;
    let id = a
        .watch_join_group(&g, |_| {})
        .await
        .ctx("watch_join_group")?;
    expect_err!(
        a.unwatch_leave_group(&g, id),
        ToozError::WatchCallbackNotFound { .. },
        "unwatch_leave_group with a join watch id"
    );
    expect_err!(
        a.unwatch_join_group(&other, id),
        ToozError::WatchCallbackNotFound { .. },
        "unwatch_join_group naming another group"
    );
    ensure_eq!(
        a.watch_counts(&g),
        (1, 0, 0),
        "the join hook survives failed unwatches"
    );
    a.unwatch_join_group(&g, id).ctx("unwatch_join_group")?;
    Ok(())
}
