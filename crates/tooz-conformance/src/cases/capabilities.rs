//! Capabilities and member info (tooz `test_get_member_capabilities*`,
//! `test_get_members_with_capabilities*`, `test_get_member_info*`,
//! `test_update_capabilities*`).
//!
//! Our choices: an unknown group is `GroupNotCreated` for every call; a member that
//! joined without capabilities reads back `Capabilities::none()`; every driver
//! implements `get_member_info` (with times) and `update_capabilities`.

use std::time::SystemTime;

use super::prelude::*;

async fn joined_with(
    h: &Harness,
    caps: &serde_json::Value,
) -> Result<(Coordinator, GroupId), CaseError> {
    let c = h.started(h.member("a")).await?;
    let g = h.group("g");
    c.create_group(&g).await.ctx("create_group")?;
    c.join_group(&g, caps).await.ctx("join_group")?;
    Ok((c, g))
}

fn nested() -> serde_json::Value {
    json!({
        "type": "the_type",
        "name": "the_name",
        "nested": {"list": [1, 2, "three", {"four": 4.5}], "flag": true, "none": null},
        "empty": {},
    })
}

pub(crate) async fn join_capabilities_round_trip(h: &Harness) -> CaseResult {
    let caps = json!({"data": "test_capabilities"});
    let (c, g) = joined_with(h, &caps).await?;
    let got = c
        .get_member_capabilities(&g, c.member_id())
        .await
        .ctx("get_member_capabilities")?;
    ensure_eq!(got.to_json().ctx("decode")?, caps, "capabilities read back");
    Ok(())
}

pub(crate) async fn nested_capabilities_round_trip(h: &Harness) -> CaseResult {
    let caps = nested();
    let (c, g) = joined_with(h, &caps).await?;
    let got = c
        .get_member_capabilities(&g, c.member_id())
        .await
        .ctx("get_member_capabilities")?;
    ensure_eq!(
        got.to_json().ctx("decode")?,
        caps,
        "nested capabilities read back"
    );
    Ok(())
}

pub(crate) async fn no_capabilities_read_back_none(h: &Harness) -> CaseResult {
    let c = h.started(h.member("a")).await?;
    let g = h.group("g");
    c.create_group(&g).await.ctx("create_group")?;
    c.join_group(&g, &())
        .await
        .ctx("join_group without capabilities")?;
    let got = c
        .get_member_capabilities(&g, c.member_id())
        .await
        .ctx("get_member_capabilities")?;
    ensure_eq!(
        got,
        Capabilities::none(),
        "capabilities of a member that gave none"
    );
    Ok(())
}

pub(crate) async fn members_with_capabilities_maps_member(h: &Harness) -> CaseResult {
    let caps = json!({"host": "10.0.0.1", "port": 8080});
    let (c, g) = joined_with(h, &caps).await?;
    let all = c
        .get_members_with_capabilities(&g)
        .await
        .ctx("get_members_with_capabilities")?;
    ensure_eq!(all.len(), 1, "entries in get_members_with_capabilities");
    let Some(mine) = all.get(c.member_id()) else {
        fail!("own member missing from {all:?}");
    };
    ensure_eq!(mine.to_json().ctx("decode")?, caps, "own capabilities");
    Ok(())
}

pub(crate) async fn members_with_capabilities_multiple(h: &Harness) -> CaseResult {
    let a = h.started(h.member("a")).await?;
    let b = h.started(h.member("b")).await?;
    let g = h.group("g");
    a.create_group(&g).await.ctx("create_group")?;
    a.join_group(&g, &json!({"role": "primary"}))
        .await
        .ctx("a join_group")?;
    b.join_group(&g, &json!({"role": "secondary"}))
        .await
        .ctx("b join_group")?;
    let all = a
        .get_members_with_capabilities(&g)
        .await
        .ctx("get_members_with_capabilities")?;
    ensure_eq!(all.len(), 2, "entries in get_members_with_capabilities");
    let role = |m: &MemberId| -> Result<serde_json::Value, CaseError> {
        match all.get(m) {
            Some(c) => c.to_json().ctx("decode"),
            None => fail!("member {m} missing from {all:?}"),
        }
    };
    ensure_eq!(
        role(a.member_id())?,
        json!({"role": "primary"}),
        "a's capabilities"
    );
    ensure_eq!(
        role(b.member_id())?,
        json!({"role": "secondary"}),
        "b's capabilities"
    );
    Ok(())
}

pub(crate) async fn members_with_capabilities_unknown_group_is_group_not_created(
    h: &Harness,
) -> CaseResult {
    let c = h.started(h.member("a")).await?;
    let g = h.group("never-created");
    expect_err!(
        c.get_members_with_capabilities(&g).await,
        ToozError::GroupNotCreated(x) if x == g,
        "get_members_with_capabilities of an unknown group"
    );
    Ok(())
}

pub(crate) async fn members_with_capabilities_empty_group_is_empty(h: &Harness) -> CaseResult {
    let c = h.started(h.member("a")).await?;
    let g = h.group("g");
    c.create_group(&g).await.ctx("create_group")?;
    let all = c
        .get_members_with_capabilities(&g)
        .await
        .ctx("get_members_with_capabilities")?;
    ensure!(all.is_empty(), "empty group has members: {all:?}");
    Ok(())
}

pub(crate) async fn members_with_capabilities_without_caps_is_none(h: &Harness) -> CaseResult {
    let c = h.started(h.member("a")).await?;
    let g = h.group("g");
    c.create_group(&g).await.ctx("create_group")?;
    c.join_group(&g, &()).await.ctx("join_group")?;
    let all = c
        .get_members_with_capabilities(&g)
        .await
        .ctx("get_members_with_capabilities")?;
    ensure_eq!(
        all.get(c.member_id()).cloned(),
        Some(Capabilities::none()),
        "entry of a member that joined without capabilities"
    );
    Ok(())
}

pub(crate) async fn member_capabilities_unknown_group_is_group_not_created(
    h: &Harness,
) -> CaseResult {
    let c = h.started(h.member("a")).await?;
    let g = h.group("never-created");
    expect_err!(
        c.get_member_capabilities(&g, c.member_id()).await,
        ToozError::GroupNotCreated(x) if x == g,
        "get_member_capabilities in an unknown group"
    );
    Ok(())
}

pub(crate) async fn member_capabilities_not_joined_is_member_not_joined(h: &Harness) -> CaseResult {
    let c = h.started(h.member("a")).await?;
    let g = h.group("g");
    c.create_group(&g).await.ctx("create_group")?;
    let stranger = h.member("stranger");
    expect_err!(
        c.get_member_capabilities(&g, &stranger).await,
        ToozError::MemberNotJoined { member, .. } if member == stranger,
        "get_member_capabilities of a member that never joined"
    );
    Ok(())
}

fn check_times(info: &tooz_core::MemberInfo) -> CaseResult {
    let (Some(created), Some(updated)) = (info.created_at, info.updated_at) else {
        fail!(
            "member info lacks times: created_at {:?}, updated_at {:?}",
            info.created_at,
            info.updated_at
        );
    };
    let now = SystemTime::now();
    let near = |t: SystemTime| {
        let d = now.duration_since(t).unwrap_or_else(|e| e.duration());
        d < Duration::from_secs(600)
    };
    ensure!(
        near(created) && near(updated),
        "member info times are not near now: created {created:?}, updated {updated:?}, now {now:?}"
    );
    ensure!(
        updated >= created,
        "updated_at {updated:?} is before created_at {created:?}"
    );
    Ok(())
}

pub(crate) async fn member_info_has_capabilities_and_times(h: &Harness) -> CaseResult {
    let caps = json!({"data": "info"});
    let (c, g) = joined_with(h, &caps).await?;
    let info = c
        .get_member_info(&g, c.member_id())
        .await
        .ctx("get_member_info")?;
    ensure_eq!(
        info.capabilities.to_json().ctx("decode")?,
        caps,
        "member info capabilities"
    );
    check_times(&info)
}

pub(crate) async fn member_info_nested_capabilities(h: &Harness) -> CaseResult {
    let caps = nested();
    let (c, g) = joined_with(h, &caps).await?;
    let info = c
        .get_member_info(&g, c.member_id())
        .await
        .ctx("get_member_info")?;
    ensure_eq!(
        info.capabilities.to_json().ctx("decode")?,
        caps,
        "member info nested capabilities"
    );
    Ok(())
}

pub(crate) async fn member_info_unknown_group_is_group_not_created(h: &Harness) -> CaseResult {
    let c = h.started(h.member("a")).await?;
    let g = h.group("never-created");
    expect_err!(
        c.get_member_info(&g, c.member_id()).await,
        ToozError::GroupNotCreated(x) if x == g,
        "get_member_info in an unknown group"
    );
    Ok(())
}

pub(crate) async fn member_info_not_joined_is_member_not_joined(h: &Harness) -> CaseResult {
    let c = h.started(h.member("a")).await?;
    let g = h.group("g");
    c.create_group(&g).await.ctx("create_group")?;
    let stranger = h.member("stranger");
    expect_err!(
        c.get_member_info(&g, &stranger).await,
        ToozError::MemberNotJoined { member, .. } if member == stranger,
        "get_member_info of a member that never joined"
    );
    Ok(())
}

pub(crate) async fn update_then_read_back(h: &Harness) -> CaseResult {
    let (c, g) = joined_with(h, &json!({"version": 1})).await?;
    let other = h.started(h.member("observer")).await?;
    let read = |who: Coordinator| {
        let g = g.clone();
        let m = c.member_id().clone();
        async move {
            who.get_member_capabilities(&g, &m)
                .await
                .ctx("get_member_capabilities")?
                .to_json()
                .ctx("decode")
        }
    };
    ensure_eq!(
        read(c.clone()).await?,
        json!({"version": 1}),
        "before update"
    );
    c.update_capabilities(&g, &json!({"version": 2}))
        .await
        .ctx("update_capabilities")?;
    ensure_eq!(
        read(c.clone()).await?,
        json!({"version": 2}),
        "after update (own view)"
    );
    ensure_eq!(
        read(other.clone()).await?,
        json!({"version": 2}),
        "after update (other coordinator)"
    );
    let all = other
        .get_members_with_capabilities(&g)
        .await
        .ctx("get_members_with_capabilities")?;
    let v = match all.get(c.member_id()) {
        Some(x) => x.to_json().ctx("decode")?,
        None => fail!("member missing from get_members_with_capabilities after update"),
    };
    ensure_eq!(
        v,
        json!({"version": 2}),
        "get_members_with_capabilities after update"
    );
    let info = other
        .get_member_info(&g, c.member_id())
        .await
        .ctx("get_member_info")?;
    check_times(&info)
}

pub(crate) async fn update_unknown_group_is_group_not_created(h: &Harness) -> CaseResult {
    let c = h.started(h.member("a")).await?;
    let g = h.group("never-created");
    expect_err!(
        c.update_capabilities(&g, &json!({"v": 1})).await,
        ToozError::GroupNotCreated(x) if x == g,
        "update_capabilities in an unknown group"
    );
    Ok(())
}

pub(crate) async fn update_not_joined_is_member_not_joined(h: &Harness) -> CaseResult {
    let c = h.started(h.member("a")).await?;
    let g = h.group("g");
    c.create_group(&g).await.ctx("create_group")?;
    expect_err!(
        c.update_capabilities(&g, &json!({"v": 1})).await,
        ToozError::MemberNotJoined { .. },
        "update_capabilities in a group not joined"
    );
    Ok(())
}
