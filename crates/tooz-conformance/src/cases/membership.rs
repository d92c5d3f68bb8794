//! Membership: join, leave, list (tooz `test_join_group*`, `test_leave_group*`,
//! `test_get_members*`, `test_disconnect_leave_group`).
//!
//! Our choices: an unknown group is `GroupNotCreated` for leave too;
//! `join_group_create` does not sleep; member ids are bytes and round-trip exactly.

use super::prelude::*;

pub(crate) async fn join_then_listed(h: &Harness) -> CaseResult {
    let c = h.started(h.member("a")).await?;
    let g = h.group("g");
    c.create_group(&g).await.ctx("create_group")?;
    c.join_group(&g, &()).await.ctx("join_group")?;
    let members = c.get_members(&g).await.ctx("get_members")?;
    ensure!(
        members.contains(c.member_id()),
        "joined member missing from get_members: {members:?}"
    );
    ensure!(
        c.joined_groups().contains(&g),
        "joined_groups() does not list the joined group"
    );
    Ok(())
}

pub(crate) async fn join_unknown_group_is_group_not_created(h: &Harness) -> CaseResult {
    let c = h.started(h.member("a")).await?;
    let g = h.group("never-created");
    expect_err!(
        c.join_group(&g, &()).await,
        ToozError::GroupNotCreated(x) if x == g,
        "join_group on an unknown group"
    );
    Ok(())
}

pub(crate) async fn join_group_create_lists_member(h: &Harness) -> CaseResult {
    let c = h.started(h.member("a")).await?;
    let g = h.group("g");
    c.join_group_create(&g, &())
        .await
        .ctx("join_group_create")?;
    let members = c.get_members(&g).await.ctx("get_members")?;
    ensure!(
        members.contains(c.member_id()),
        "member missing after join_group_create: {members:?}"
    );
    ensure!(
        c.get_groups().await.ctx("get_groups")?.contains(&g),
        "join_group_create did not create the group"
    );
    Ok(())
}

pub(crate) async fn join_group_create_existing_group_joins(h: &Harness) -> CaseResult {
    let a = h.started(h.member("a")).await?;
    let b = h.started(h.member("b")).await?;
    let g = h.group("g");
    a.join_group_create(&g, &())
        .await
        .ctx("a join_group_create")?;
    b.join_group_create(&g, &())
        .await
        .ctx("b join_group_create on an existing group")?;
    let members = a.get_members(&g).await.ctx("get_members")?;
    ensure_eq!(
        members,
        BTreeSet::from([a.member_id().clone(), b.member_id().clone()]),
        "members after two join_group_create"
    );
    Ok(())
}

pub(crate) async fn join_group_create_does_not_sleep(h: &Harness) -> CaseResult {
    let c = h.started(h.member("a")).await?;
    let g = h.group("g");
    let t0 = Instant::now();
    c.join_group_create(&g, &())
        .await
        .ctx("join_group_create")?;
    let took = t0.elapsed();
    ensure!(
        took < Duration::from_millis(750),
        "join_group_create on a new group took {took:?} (tooz sleeps 1 s; we must not)"
    );
    Ok(())
}

pub(crate) async fn join_twice_is_member_already_exist(h: &Harness) -> CaseResult {
    let c = h.started(h.member("a")).await?;
    let g = h.group("g");
    c.create_group(&g).await.ctx("create_group")?;
    c.join_group(&g, &()).await.ctx("join_group")?;
    expect_err!(
        c.join_group(&g, &()).await,
        ToozError::MemberAlreadyExist { group, member } if group == g && &member == c.member_id(),
        "second join_group by the same coordinator"
    );
    Ok(())
}

pub(crate) async fn same_member_id_elsewhere_is_member_already_exist(h: &Harness) -> CaseResult {
    let m = h.member("twin");
    let a = h.started(m.clone()).await?;
    let b = h.started(m.clone()).await?;
    let g = h.group("g");
    a.create_group(&g).await.ctx("create_group")?;
    a.join_group(&g, &json!({"who": "a"}))
        .await
        .ctx("first join_group")?;
    expect_err!(
        b.join_group(&g, &json!({"who": "b"})).await,
        ToozError::MemberAlreadyExist { member, .. } if member == m,
        "join_group by another coordinator with the same member id"
    );
    let caps = a
        .get_member_capabilities(&g, &m)
        .await
        .ctx("get_member_capabilities")?;
    ensure_eq!(
        caps.to_json().ctx("decode capabilities")?,
        json!({"who": "a"}),
        "capabilities after the refused duplicate join (must not be overwritten)"
    );
    Ok(())
}

pub(crate) async fn leave_then_unlisted(h: &Harness) -> CaseResult {
    let c = h.started(h.member("a")).await?;
    let g = h.group("g");
    c.create_group(&g).await.ctx("create_group")?;
    c.join_group(&g, &()).await.ctx("join_group")?;
    c.leave_group(&g).await.ctx("leave_group")?;
    let members = c.get_members(&g).await.ctx("get_members")?;
    ensure!(
        !members.contains(c.member_id()),
        "member still listed after leave_group: {members:?}"
    );
    ensure!(
        !c.joined_groups().contains(&g),
        "joined_groups() still lists the group after leave_group"
    );
    Ok(())
}

pub(crate) async fn leave_unknown_group_is_group_not_created(h: &Harness) -> CaseResult {
    let c = h.started(h.member("a")).await?;
    let g = h.group("never-created");
    expect_err!(
        c.leave_group(&g).await,
        ToozError::GroupNotCreated(x) if x == g,
        "leave_group of an unknown group"
    );
    Ok(())
}

pub(crate) async fn leave_not_joined_is_member_not_joined(h: &Harness) -> CaseResult {
    let c = h.started(h.member("a")).await?;
    let g = h.group("g");
    c.create_group(&g).await.ctx("create_group")?;
    expect_err!(
        c.leave_group(&g).await,
        ToozError::MemberNotJoined { group, member } if group == g && &member == c.member_id(),
        "leave_group of a group never joined"
    );
    Ok(())
}

pub(crate) async fn get_members_is_exact(h: &Harness) -> CaseResult {
    let a = h.started(h.member("a")).await?;
    let b = h.started(h.member("b")).await?;
    let g = h.group("g");
    a.create_group(&g).await.ctx("create_group")?;
    a.join_group(&g, &()).await.ctx("a join_group")?;
    b.join_group(&g, &()).await.ctx("b join_group")?;
    let expected = BTreeSet::from([a.member_id().clone(), b.member_id().clone()]);
    ensure_eq!(
        a.get_members(&g).await.ctx("get_members")?,
        expected,
        "get_members seen by a"
    );
    ensure_eq!(
        b.get_members(&g).await.ctx("get_members")?,
        expected,
        "get_members seen by b"
    );
    Ok(())
}

pub(crate) async fn non_utf8_member_id_round_trips(h: &Harness) -> CaseResult {
    let mut raw = h.name("m-").into_bytes();
    raw.extend_from_slice(&[0xc3, 0x28, 0xff, b'!']);
    let m = MemberId::from(raw.clone());
    let c = h.started(m.clone()).await?;
    let other = h.started(h.member("observer")).await?;
    let g = h.group("g");
    c.create_group(&g).await.ctx("create_group")?;
    c.join_group(&g, &json!({"k": "v"}))
        .await
        .ctx("join_group with a non-UTF-8 member id")?;
    let members = other.get_members(&g).await.ctx("get_members")?;
    ensure!(
        members.iter().any(|x| x.as_bytes() == raw.as_slice()),
        "non-UTF-8 member id {m} not listed byte-exact: {members:?}"
    );
    let caps = other
        .get_member_capabilities(&g, &m)
        .await
        .ctx("get_member_capabilities of the non-UTF-8 member")?;
    ensure_eq!(
        caps.to_json().ctx("decode")?,
        json!({"k": "v"}),
        "capabilities of the non-UTF-8 member"
    );
    let with_caps = other
        .get_members_with_capabilities(&g)
        .await
        .ctx("get_members_with_capabilities")?;
    ensure!(
        with_caps.contains_key(&m),
        "get_members_with_capabilities misses the non-UTF-8 member: {with_caps:?}"
    );
    c.leave_group(&g).await.ctx("leave_group")?;
    ensure!(
        !other.get_members(&g).await.ctx("get_members")?.contains(&m),
        "non-UTF-8 member still listed after leaving"
    );
    Ok(())
}

pub(crate) async fn stopped_member_is_gone(h: &Harness) -> CaseResult {
    let a = h.started(h.member("a")).await?;
    let b = h.started(h.member("b")).await?;
    let g = h.group("g");
    a.create_group(&g).await.ctx("create_group")?;
    a.join_group(&g, &()).await.ctx("a join_group")?;
    b.join_group(&g, &()).await.ctx("b join_group")?;
    b.stop().await.ctx("b stop")?;
    let members = a.get_members(&g).await.ctx("get_members")?;
    ensure_eq!(
        members,
        BTreeSet::from([a.member_id().clone()]),
        "members right after b stopped"
    );
    Ok(())
}
