//! Heartbeats (tooz `test_heartbeat`, `test_heartbeat_loop`), plus: a member that
//! keeps beating stays listed well past its lease (tooz's file driver hid live
//! members after its timeout).

use super::prelude::*;

pub(crate) async fn heartbeat_returns_interval(h: &Harness) -> CaseResult {
    let c = h.started_quiet(h.member("a")).await?;
    let g = h.group("g");
    c.join_group_create(&g, &())
        .await
        .ctx("join_group_create")?;
    let next = c.heartbeat().await.ctx("heartbeat")?;
    ensure!(
        next > Duration::ZERO,
        "heartbeat returned a zero interval until the next beat"
    );
    Ok(())
}

pub(crate) async fn heart_runs_only_when_required(h: &Harness) -> CaseResult {
    let c = h.started(h.member("a")).await?;
    if c.requires_beating() {
        wait_until(
            h.lease() + Duration::from_secs(2),
            "the heart beats",
            || {
                let c = c.clone();
                async move { Ok(c.beats() >= 1) }
            },
        )
        .await?;
    } else {
        // A heart would beat within the lease (the branch above allows it that
        // plus 2 s); over the lease, none may.
        stays_true(
            h.lease(),
            "no beats from a driver that does not require beating (no heart should run)",
            || {
                let c = c.clone();
                async move { Ok(c.beats() == 0) }
            },
        )
        .await?;
    }
    Ok(())
}

pub(crate) async fn beating_member_stays_listed(h: &Harness) -> CaseResult {
    let a = h.started(h.member("a")).await?;
    let observer = h.started(h.member("observer")).await?;
    let g = h.group("g");
    a.join_group_create(&g, &())
        .await
        .ctx("join_group_create")?;
    stays_true(
        h.lease() * 2 + Duration::from_millis(500),
        "a beating member stays listed for twice its lease",
        || {
            let (o, g, m) = (observer.clone(), g.clone(), a.member_id().clone());
            async move { Ok(o.get_members(&g).await.ctx("get_members")?.contains(&m)) }
        },
    )
    .await
}
