//! The partitioner (tooz `test_partitioner.py`: `test_join_partitioned_group`,
//! `test_hashring_size`, `test_hashring_weight`, `test_stop`,
//! `test_members_of_object_and_others`), plus: owners agree across coordinators,
//! lookups match Python tooz's ring, and a leave for a member the ring never had is
//! not an error (tooz raised `UnknownNode` from `run_watchers`).

use tooz_core::Partitioner;

use super::prelude::*;

type Ring = BTreeSet<(MemberId, u32)>;

async fn ring_becomes(c: &Coordinator, p: &Partitioner, want: &Ring, what: &str) -> CaseResult {
    let t0 = Instant::now();
    loop {
        c.run_watchers(None).await.ctx("run_watchers")?;
        let now = p.members();
        if now == *want {
            return Ok(());
        }
        if t0.elapsed() > PROMPT {
            fail!(
                "{what}: ring of {} is {now:?}, expected {want:?}",
                c.member_id()
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

fn ring_of(members: &[(&Coordinator, u32)]) -> Ring {
    members
        .iter()
        .map(|(c, w)| (c.member_id().clone(), *w))
        .collect()
}

pub(crate) async fn join_partitioned_group_lists_self(h: &Harness) -> CaseResult {
    let a = h.started(h.member("a")).await?;
    let g = h.group("g");
    let p = a
        .join_partitioned_group(&g, 1, 32)
        .await
        .ctx("join_partitioned_group")?;
    ensure_eq!(p.members(), ring_of(&[(&a, 1)]), "ring after joining");
    ensure_eq!(
        p.members_for_object("anything", &[], 1),
        vec![a.member_id().clone()],
        "owner of an object in a one-member ring"
    );
    ensure!(
        p.belongs_to_self("anything", 1),
        "belongs_to_self in a one-member ring"
    );
    ensure!(
        a.get_members(&g)
            .await
            .ctx("get_members")?
            .contains(a.member_id()),
        "join_partitioned_group did not join the group"
    );
    a.leave_partitioned_group(p)
        .await
        .ctx("leave_partitioned_group")?;
    ensure!(
        !a.get_members(&g)
            .await
            .ctx("get_members")?
            .contains(a.member_id()),
        "leave_partitioned_group did not leave the group"
    );
    Ok(())
}

pub(crate) async fn ring_follows_joins_and_leaves(h: &Harness) -> CaseResult {
    let a = h.started(h.member("a")).await?;
    let g = h.group("g");
    let pa = a
        .join_partitioned_group(&g, 1, 32)
        .await
        .ctx("join_partitioned_group")?;
    ensure_eq!(pa.members().len(), 1, "ring size alone");
    let mut others = Vec::new();
    for name in ["b", "c", "d"] {
        let c = h.started(h.member(name)).await?;
        let p = c
            .join_partitioned_group(&g, 1, 32)
            .await
            .ctx("join_partitioned_group")?;
        others.push((c, p));
        let mut want = ring_of(&[(&a, 1)]);
        want.extend(others.iter().map(|(c, _)| (c.member_id().clone(), 1)));
        ring_becomes(&a, &pa, &want, &format!("after {name} joined")).await?;
    }
    for (c, p) in others {
        drop(p);
        c.stop().await.ctx("stop")?;
    }
    ring_becomes(&a, &pa, &ring_of(&[(&a, 1)]), "after the others stopped").await
}

pub(crate) async fn weights_come_from_capabilities(h: &Harness) -> CaseResult {
    let a = h.started(h.member("a")).await?;
    let b = h.started(h.member("b")).await?;
    let g = h.group("g");
    let pa = a
        .join_partitioned_group(&g, 5, 32)
        .await
        .ctx("join_partitioned_group weight 5")?;
    ensure_eq!(
        pa.members(),
        ring_of(&[(&a, 5)]),
        "ring with one member of weight 5"
    );
    let pb = b
        .join_partitioned_group(&g, 10, 32)
        .await
        .ctx("join_partitioned_group weight 10")?;
    let want = ring_of(&[(&a, 5), (&b, 10)]);
    ensure_eq!(pb.members(), want, "ring of the member that joined second");
    ring_becomes(&a, &pa, &want, "after a member of weight 10 joined").await
}

pub(crate) async fn owners_agree_across_coordinators(h: &Harness) -> CaseResult {
    let g = h.group("g");
    let mut nodes = Vec::new();
    for name in ["a", "b", "c", "d"] {
        let c = h.started(h.member(name)).await?;
        let p = c
            .join_partitioned_group(&g, 1, 32)
            .await
            .ctx("join_partitioned_group")?;
        nodes.push((c, p));
    }
    let want: Ring = nodes
        .iter()
        .map(|(c, _)| (c.member_id().clone(), 1))
        .collect();
    for (c, p) in &nodes {
        ring_becomes(c, p, &want, "all four members").await?;
    }
    let mut objects: Vec<String> = (0..20).map(|i| format!("object-{i}")).collect();
    objects.push("чупакабра".into());
    objects.push(42.to_string());
    for o in &objects {
        let owners: Vec<Vec<MemberId>> = nodes
            .iter()
            .map(|(_, p)| p.members_for_object(o.as_str(), &[], 1))
            .collect();
        let first = &owners[0];
        ensure_eq!(first.len(), 1, "owners of {o:?}");
        for (i, other) in owners.iter().enumerate() {
            ensure_eq!(other, first, "owner of {o:?} seen by member #{i} vs #0");
        }
        let owner = &first[0];
        for (c, p) in &nodes {
            ensure!(
                p.belongs_to_member(o.as_str(), owner, 1),
                "belongs_to_member({o:?}, owner) is false"
            );
            ensure_eq!(
                p.belongs_to_self(o.as_str(), 1),
                c.member_id() == owner,
                "belongs_to_self({o:?}) of {}",
                c.member_id()
            );
        }
        let two = nodes[0].1.members_for_object(o.as_str(), &[], 2);
        ensure!(
            two.len() == 2 && two[0] == *owner && two[0] != two[1],
            "two replicas of {o:?}: {two:?} (primary first, then another member)"
        );
        let without = nodes[0]
            .1
            .members_for_object(o.as_str(), std::slice::from_ref(owner), 1);
        ensure!(
            without.len() == 1 && without[0] != *owner,
            "owner of {o:?} ignoring {owner}: {without:?}"
        );
    }
    let int_owner = nodes[0].1.members_for_object(&42_i64, &[], 1);
    let text_owner = nodes[0].1.members_for_object("42", &[], 1);
    ensure_eq!(
        int_owner,
        text_owner,
        "an integer hashes as its decimal text (as in tooz)"
    );
    Ok(())
}

pub(crate) async fn hash_compatible_with_python_tooz(h: &Harness) -> CaseResult {
    let g = h.group("g");
    let mut nodes = Vec::new();
    for id in ["member-1", "member-2", "member-3"] {
        let c = h.started(id).await?;
        let p = c
            .join_partitioned_group(&g, 1, 32)
            .await
            .ctx("join_partitioned_group")?;
        nodes.push((c, p));
    }
    let want: Ring = ["member-1", "member-2", "member-3"]
        .into_iter()
        .map(|m| (MemberId::from(m), 1))
        .collect();
    let (c, p) = &nodes[0];
    ring_becomes(c, p, &want, "the three members").await?;
    let m = |s: &str| MemberId::from(s);
    let set = |v: Vec<MemberId>| v.into_iter().collect::<BTreeSet<_>>();
    // Lookups computed by Python tooz 9.1.0 (md5, 32 partitions per weight unit).
    for (key, one, two) in [
        ("foo", "member-3", ["member-1", "member-3"]),
        ("bar", "member-3", ["member-2", "member-3"]),
        ("baz", "member-2", ["member-1", "member-2"]),
        ("object-42", "member-3", ["member-2", "member-3"]),
    ] {
        ensure_eq!(
            p.members_for_object(key, &[], 1),
            vec![m(one)],
            "owner of {key:?}"
        );
        ensure_eq!(
            set(p.members_for_object(key, &[], 2)),
            set(two.iter().map(|x| m(x)).collect()),
            "two owners of {key:?}"
        );
    }
    ensure_eq!(
        p.members_for_object("foo", &[m("member-1")], 1),
        vec![m("member-3")],
        "owner of \"foo\" ignoring member-1"
    );
    Ok(())
}

pub(crate) async fn leave_of_unknown_member_is_not_an_error(h: &Harness) -> CaseResult {
    let a = h.started(h.member("a")).await?;
    let b = h.started(h.member("b")).await?;
    let g = h.group("g");
    let pa = a
        .join_partitioned_group(&g, 1, 32)
        .await
        .ctx("join_partitioned_group")?;
    let pb = b
        .join_partitioned_group(&g, 1, 32)
        .await
        .ctx("join_partitioned_group")?;
    ring_becomes(&a, &pa, &ring_of(&[(&a, 1), (&b, 1)]), "both members").await?;
    b.leave_partitioned_group(pb)
        .await
        .ctx("leave_partitioned_group")?;
    // The ring forgets b before the watcher cache does: the coming leave event names
    // a member the ring does not have (tooz raised UnknownNode here).
    pa.refresh().await.ctx("refresh")?;
    ensure_eq!(pa.members(), ring_of(&[(&a, 1)]), "ring after refresh");
    let events = a
        .run_watchers(None)
        .await
        .ctx("run_watchers with a leave for a member the ring lacks")?;
    ensure!(
        events.contains(&GroupEvent::MemberLeft {
            group: g.clone(),
            member: b.member_id().clone(),
        }),
        "run_watchers did not report b leaving: {events:?}"
    );
    ensure_eq!(pa.members(), ring_of(&[(&a, 1)]), "ring after the leave");
    Ok(())
}

pub(crate) async fn stopped_partitioner_stops_following(h: &Harness) -> CaseResult {
    let a = h.started(h.member("a")).await?;
    let b = h.started(h.member("b")).await?;
    let g = h.group("g");
    let p = a
        .join_partitioned_group(&g, 1, 32)
        .await
        .ctx("join_partitioned_group")?;
    p.stop();
    ensure_eq!(
        a.watch_counts(&g),
        (0, 0, 0),
        "hooks after the partitioner stopped"
    );
    b.join_group(&g, &()).await.ctx("b join_group")?;
    let events = a.run_watchers(None).await.ctx("run_watchers")?;
    ensure!(
        events.is_empty(),
        "a stopped partitioner still follows the group: {events:?}"
    );
    ensure_eq!(
        p.members(),
        ring_of(&[(&a, 1)]),
        "ring of a stopped partitioner"
    );
    Ok(())
}
