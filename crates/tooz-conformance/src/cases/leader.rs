//! Leader election (tooz `test_run_for_election*`, `test_get_leader`,
//! `test_run_for_election_multiple_clients_stand_down`), plus: fencing tokens of
//! leadership grants increase, `become_leader` takes over when the leader stops
//! (a push case: the waiting candidate polls only every hour, see
//! [`Harness::pushing`]).
//!
//! Our choices: election needs no membership; `stand_down_group_leader` returns
//! whether this member was leading and never unseats another leader.

use super::prelude::*;

fn elected(g: &GroupId, m: &MemberId) -> GroupEvent {
    GroupEvent::LeaderElected {
        group: g.clone(),
        member: m.clone(),
    }
}

pub(crate) async fn run_for_election_elects_self(h: &Harness) -> CaseResult {
    let a = h.started(h.member("a")).await?;
    let g = h.group("g");
    a.create_group(&g).await.ctx("create_group")?;
    let seen = Seen::new();
    a.watch_elected_as_leader(&g, seen.callback())
        .ctx("watch_elected_as_leader")?;
    let returned = a.run_watchers(None).await.ctx("run_watchers")?;
    let want = elected(&g, a.member_id());
    ensure_eq!(seen.events(), vec![want.clone()], "elected callback events");
    ensure!(
        returned.contains(&want),
        "run_watchers did not return the election: {returned:?}"
    );
    ensure_eq!(
        a.get_leader(&g).await.ctx("get_leader")?,
        Some(a.member_id().clone()),
        "get_leader after winning"
    );
    ensure!(
        a.leadership_token(&g).is_some(),
        "no leadership token after winning"
    );
    Ok(())
}

pub(crate) async fn elected_callback_fires_once_per_win(h: &Harness) -> CaseResult {
    let a = h.started(h.member("a")).await?;
    let g = h.group("g");
    a.create_group(&g).await.ctx("create_group")?;
    let seen = Seen::new();
    a.watch_elected_as_leader(&g, seen.callback())
        .ctx("watch_elected_as_leader")?;
    for _ in 0..3 {
        a.run_watchers(None).await.ctx("run_watchers")?;
    }
    ensure_eq!(
        seen.len(),
        1,
        "elected callbacks over three polls while leading"
    );
    Ok(())
}

pub(crate) async fn get_leader_none_until_elected(h: &Harness) -> CaseResult {
    let a = h.started(h.member("a")).await?;
    let g = h.group("g");
    a.create_group(&g).await.ctx("create_group")?;
    ensure_eq!(
        a.get_leader(&g).await.ctx("get_leader")?,
        None,
        "leader of a new group"
    );
    a.join_group(&g, &()).await.ctx("join_group")?;
    ensure_eq!(
        a.get_leader(&g).await.ctx("get_leader")?,
        None,
        "leader after a join (joining is not running for election)"
    );
    a.watch_elected_as_leader(&g, |_| {})
        .ctx("watch_elected_as_leader")?;
    a.run_watchers(None).await.ctx("run_watchers")?;
    ensure_eq!(
        a.get_leader(&g).await.ctx("get_leader")?,
        Some(a.member_id().clone()),
        "leader after winning"
    );
    Ok(())
}

pub(crate) async fn second_candidate_wins_after_leader_stops(h: &Harness) -> CaseResult {
    let a = h.started(h.member("a")).await?;
    let b = h.started(h.member("b")).await?;
    let g = h.group("g");
    a.create_group(&g).await.ctx("create_group")?;
    let seen_a = Seen::new();
    let seen_b = Seen::new();
    a.watch_elected_as_leader(&g, seen_a.callback())
        .ctx("a watch_elected_as_leader")?;
    a.run_watchers(None).await.ctx("a run_watchers")?;
    ensure_eq!(seen_a.len(), 1, "a's elections");
    b.watch_elected_as_leader(&g, seen_b.callback())
        .ctx("b watch_elected_as_leader")?;
    b.run_watchers(None).await.ctx("b run_watchers")?;
    ensure_eq!(seen_b.len(), 0, "b's elections while a leads");
    ensure_eq!(
        b.get_leader(&g).await.ctx("get_leader")?,
        Some(a.member_id().clone()),
        "leader seen by b"
    );
    a.stop().await.ctx("a stop")?;
    poll_watchers_until(&b, &seen_b, 1, PROMPT, "b's election after a stopped").await?;
    ensure_eq!(
        seen_b.events(),
        vec![elected(&g, b.member_id())],
        "b's elected events"
    );
    ensure_eq!(
        b.get_leader(&g).await.ctx("get_leader")?,
        Some(b.member_id().clone()),
        "leader after handover"
    );
    Ok(())
}

pub(crate) async fn stand_down_hands_over_both_ways(h: &Harness) -> CaseResult {
    let a = h.started(h.member("a")).await?;
    let b = h.started(h.member("b")).await?;
    let g = h.group("g");
    a.create_group(&g).await.ctx("create_group")?;
    let seen_a = Seen::new();
    let seen_b = Seen::new();
    a.watch_elected_as_leader(&g, seen_a.callback())
        .ctx("a watch_elected_as_leader")?;
    b.watch_elected_as_leader(&g, seen_b.callback())
        .ctx("b watch_elected_as_leader")?;
    a.run_watchers(None).await.ctx("a run_watchers")?;
    b.run_watchers(None).await.ctx("b run_watchers")?;
    ensure_eq!(
        (seen_a.len(), seen_b.len()),
        (1, 0),
        "elections (a, b) at first"
    );
    ensure!(
        a.stand_down_group_leader(&g).await.ctx("a stand down")?,
        "a's stand down returned false while leading"
    );
    poll_watchers_until(&b, &seen_b, 1, PROMPT, "b's election after a stood down").await?;
    ensure_eq!(
        b.get_leader(&g).await.ctx("get_leader")?,
        Some(b.member_id().clone()),
        "leader after a stood down"
    );
    ensure!(
        b.stand_down_group_leader(&g).await.ctx("b stand down")?,
        "b's stand down returned false while leading"
    );
    poll_watchers_until(&a, &seen_a, 2, PROMPT, "a's second election").await?;
    ensure_eq!(
        seen_a.events(),
        vec![elected(&g, a.member_id()), elected(&g, a.member_id())],
        "a's elected events"
    );
    ensure_eq!(seen_b.len(), 1, "b's elections");
    Ok(())
}

pub(crate) async fn stand_down_reports_whether_leading(h: &Harness) -> CaseResult {
    let a = h.started(h.member("a")).await?;
    let b = h.started(h.member("b")).await?;
    let g = h.group("g");
    a.create_group(&g).await.ctx("create_group")?;
    ensure!(
        !a.stand_down_group_leader(&g)
            .await
            .ctx("stand down without a leader")?,
        "stand down returned true with nobody leading"
    );
    ensure!(
        a.try_become_leader(&g)
            .await
            .ctx("try_become_leader")?
            .is_some(),
        "a did not win an uncontested election"
    );
    ensure!(
        !b.stand_down_group_leader(&g)
            .await
            .ctx("stand down by a non-leader")?,
        "b's stand down returned true while a leads"
    );
    ensure_eq!(
        b.get_leader(&g).await.ctx("get_leader")?,
        Some(a.member_id().clone()),
        "leader after a non-leader stood down (must still be a)"
    );
    ensure!(
        a.stand_down_group_leader(&g)
            .await
            .ctx("stand down by the leader")?,
        "the leader's stand down returned false"
    );
    ensure!(
        !a.stand_down_group_leader(&g)
            .await
            .ctx("second stand down")?,
        "a second stand down returned true"
    );
    ensure_eq!(
        a.get_leader(&g).await.ctx("get_leader")?,
        None,
        "leader after the leader stood down"
    );
    Ok(())
}

pub(crate) async fn unwatched_candidate_does_not_campaign(h: &Harness) -> CaseResult {
    let a = h.started(h.member("a")).await?;
    let g = h.group("g");
    a.create_group(&g).await.ctx("create_group")?;
    let seen = Seen::new();
    let id = a
        .watch_elected_as_leader(&g, seen.callback())
        .ctx("watch_elected_as_leader")?;
    a.unwatch_elected_as_leader(&g, id)
        .ctx("unwatch_elected_as_leader")?;
    let returned = a.run_watchers(None).await.ctx("run_watchers")?;
    ensure!(returned.is_empty(), "run_watchers returned {returned:?}");
    ensure_eq!(seen.len(), 0, "elections after unwatching");
    ensure_eq!(
        a.get_leader(&g).await.ctx("get_leader")?,
        None,
        "leader after an unwatched candidate polled"
    );
    Ok(())
}

pub(crate) async fn leadership_tokens_increase(h: &Harness) -> CaseResult {
    let a = h.started(h.member("a")).await?;
    let b = h.started(h.member("b")).await?;
    let g = h.group("g");
    a.create_group(&g).await.ctx("create_group")?;
    let mut tokens = Vec::new();
    for (round, c) in [&a, &b, &a, &b].into_iter().enumerate() {
        let Some(l) = c.try_become_leader(&g).await.ctx("try_become_leader")? else {
            fail!(
                "round {round}: {} did not win a free election",
                c.member_id()
            );
        };
        let t = l.token();
        tokens.push(t.0);
        let again = c
            .try_become_leader(&g)
            .await
            .ctx("try_become_leader while leading")?
            .map(|l| l.token());
        ensure_eq!(again, Some(t), "token when campaigning again while leading");
        ensure_eq!(c.leadership_token(&g), Some(t), "leadership_token()");
        ensure!(
            c.stand_down_group_leader(&g).await.ctx("stand down")?,
            "stand down returned false while leading"
        );
        ensure!(
            l.is_lost(),
            "standing down did not signal the leadership's loss"
        );
    }
    strictly_increasing(&tokens, "leadership grants")
}

pub(crate) async fn become_leader_takes_over_when_leader_stops(h: &Harness) -> CaseResult {
    let a = h.started(h.member("a")).await?;
    // Push case: b campaigns again when its event stream reports a's leadership
    // lost; its core would otherwise retry only every hour.
    let b = h.pushing(h.member("b")).await?;
    let g = h.group("g");
    a.create_group(&g).await.ctx("create_group")?;
    let t1 = tokio::time::timeout(PROMPT, a.become_leader(&g))
        .await
        .ctx("a become_leader on a free group")?
        .ctx("a become_leader")?
        .token();
    let waiter = {
        let b = b.clone();
        let g = g.clone();
        tokio::spawn(async move {
            let r = b.become_leader(&g).await;
            (r, Instant::now())
        })
    };
    // b's campaign gets 500 ms to lose its first attempt and start waiting (nothing
    // outside the coordinator shows that it waits); throughout, a stays the leader
    // the backend names and b's campaign does not return.
    stays_true(
        Duration::from_millis(500),
        "a stays the leader while b campaigns",
        || {
            let (b, g, am) = (b.clone(), g.clone(), a.member_id().clone());
            let done = waiter.is_finished();
            async move { Ok(!done && b.get_leader(&g).await.ctx("get_leader")? == Some(am)) }
        },
    )
    .await?;
    let t0 = Instant::now();
    a.stop().await.ctx("a stop")?;
    let (r, at) = tokio::time::timeout(PUSH_LATENCY, waiter)
        .await
        .ctx("b taking over after a stopped (pushed leadership loss)")?
        .map_err(|e| CaseError::Failed(format!("waiter task: {e}")))?;
    let t2 = r.ctx("b become_leader")?.token();
    let took = at.saturating_duration_since(t0);
    ensure!(
        took < PUSH_LATENCY,
        "b took {took:?} to take over after a stopped"
    );
    ensure!(t2 > t1, "leadership token went from {t1} to {t2}");
    ensure_eq!(
        b.get_leader(&g).await.ctx("get_leader")?,
        Some(b.member_id().clone()),
        "leader after takeover"
    );
    Ok(())
}
