//! Groups: create, list, delete (tooz `test_create_group`, `test_get_groups`,
//! `test_delete_group*`, `test_get_groups_str_group_id`).
//!
//! Ids are bytes: a text id and a non-UTF-8 id both come back byte-exact.

use super::prelude::*;

pub(crate) async fn create_then_listed(h: &Harness) -> CaseResult {
    let c = h.started(h.member("a")).await?;
    let g = h.group("g");
    c.create_group(&g).await.ctx("create_group")?;
    let groups = c.get_groups().await.ctx("get_groups")?;
    ensure!(
        groups.contains(&g),
        "get_groups after create_group does not list {g}: {groups:?}"
    );
    Ok(())
}

pub(crate) async fn create_existing_is_group_already_exist(h: &Harness) -> CaseResult {
    let c = h.started(h.member("a")).await?;
    let g = h.group("g");
    c.create_group(&g).await.ctx("first create_group")?;
    expect_err!(
        c.create_group(&g).await,
        ToozError::GroupAlreadyExist(x) if x == g,
        "second create_group"
    );
    Ok(())
}

pub(crate) async fn get_groups_lists_every_created_group(h: &Harness) -> CaseResult {
    let c = h.started(h.member("a")).await?;
    let mut made = Vec::new();
    for i in 0..5 {
        let g = h.group(&format!("g{i}"));
        c.create_group(&g).await.ctx("create_group")?;
        made.push(g);
    }
    let groups = c.get_groups().await.ctx("get_groups")?;
    for g in &made {
        ensure!(groups.contains(g), "get_groups misses {g}: {groups:?}");
    }
    Ok(())
}

pub(crate) async fn text_group_id_round_trips(h: &Harness) -> CaseResult {
    let c = h.started(h.member("a")).await?;
    let text = h.name("grüße-группа");
    let g = GroupId::from(text.as_str());
    h.track_group(g.clone());
    c.create_group(text.as_str()).await.ctx("create_group")?;
    let groups = c.get_groups().await.ctx("get_groups")?;
    let back = groups.iter().find(|x| x.as_bytes() == text.as_bytes());
    ensure!(
        back.is_some_and(|x| x.as_str() == Some(text.as_str())),
        "text group id {text:?} does not come back from get_groups: {groups:?}"
    );
    Ok(())
}

pub(crate) async fn non_utf8_group_id_round_trips(h: &Harness) -> CaseResult {
    let c = h.started(h.member("a")).await?;
    let mut raw = h.name("bin-").into_bytes();
    raw.extend_from_slice(&[0xff, 0xfe, 0x80, b'z']);
    let g = GroupId::from(raw.clone());
    h.track_group(g.clone());
    c.create_group(&g)
        .await
        .ctx("create_group (non-UTF-8 id)")?;
    let groups = c.get_groups().await.ctx("get_groups")?;
    ensure!(
        groups.iter().any(|x| x.as_bytes() == raw.as_slice()),
        "non-UTF-8 group id {g} is not listed byte-exact: {groups:?}"
    );
    c.join_group(&g, &())
        .await
        .ctx("join_group (non-UTF-8 group)")?;
    let members = c.get_members(&g).await.ctx("get_members")?;
    ensure!(
        members.contains(c.member_id()),
        "member not listed in non-UTF-8 group: {members:?}"
    );
    c.leave_group(&g).await.ctx("leave_group")?;
    c.delete_group(&g).await.ctx("delete_group")?;
    Ok(())
}

pub(crate) async fn delete_then_unlisted_and_join_fails(h: &Harness) -> CaseResult {
    let c = h.started(h.member("a")).await?;
    let g = h.group("g");
    c.create_group(&g).await.ctx("create_group")?;
    ensure!(
        c.get_groups().await.ctx("get_groups")?.contains(&g),
        "created group not listed"
    );
    c.delete_group(&g).await.ctx("delete_group")?;
    let groups = c.get_groups().await.ctx("get_groups")?;
    ensure!(
        !groups.contains(&g),
        "deleted group {g} still listed: {groups:?}"
    );
    expect_err!(
        c.join_group(&g, &()).await,
        ToozError::GroupNotCreated(x) if x == g,
        "join_group on a deleted group"
    );
    Ok(())
}

pub(crate) async fn delete_unknown_is_group_not_created(h: &Harness) -> CaseResult {
    let c = h.started(h.member("a")).await?;
    let g = h.group("never-created");
    expect_err!(
        c.delete_group(&g).await,
        ToozError::GroupNotCreated(x) if x == g,
        "delete_group of an unknown group"
    );
    Ok(())
}

pub(crate) async fn delete_non_empty_is_group_not_empty(h: &Harness) -> CaseResult {
    let c = h.started(h.member("a")).await?;
    let g = h.group("g");
    c.create_group(&g).await.ctx("create_group")?;
    c.join_group(&g, &()).await.ctx("join_group")?;
    expect_err!(
        c.delete_group(&g).await,
        ToozError::GroupNotEmpty(x) if x == g,
        "delete_group with a member"
    );
    c.leave_group(&g).await.ctx("leave_group")?;
    c.delete_group(&g)
        .await
        .ctx("delete_group after the member left")?;
    Ok(())
}
