//! Push event streams of groups.

use std::collections::BTreeSet;
use std::sync::{Arc, Weak};

use super::*;

impl Coordinator {
    // ----- push events --------------------------------------------------------

    /// A stream of `group`'s events (joins, leaves, leadership changes), pushed by
    /// the backend where it can push and polled otherwise. Events that happen after
    /// this call returns are delivered.
    ///
    /// # Errors
    /// `GroupNotCreated`, `NotStarted`, backend errors.
    pub async fn events(&self, group: impl Into<GroupId>) -> Result<EventStream> {
        let g = self.shared.group(group)?;
        let stop = self.shared.stop_token()?;
        if let Some(tx) = lock(&self.shared.streams).get(&g) {
            return Ok(EventStream::new(g, tx.subscribe()));
        }
        let push = self.shared.driver.watch_group(&g).await?;
        let members = self.shared.driver.get_members(&g).await?;
        let leader = self.shared.driver.get_leader(&g).await.ok().flatten();
        let rx = {
            let mut streams = lock(&self.shared.streams);
            if let Some(tx) = streams.get(&g) {
                return Ok(EventStream::new(g, tx.subscribe()));
            }
            // `broadcast::channel` panics on a zero capacity.
            let (tx, rx) = broadcast::channel(self.shared.config.event_buffer.max(1));
            streams.insert(g.clone(), tx.clone());
            tokio::spawn(group_watch_task(
                Arc::downgrade(&self.shared),
                g.clone(),
                tx,
                push,
                members,
                leader,
                stop,
            ));
            rx
        };
        Ok(EventStream::new(g, rx))
    }
}

/// Whether a group stream lost its last receiver; if so, unpublishes it, under
/// the lock `events` subscribes with, so no subscriber can get a dead stream.
fn stream_unused(
    shared: &Weak<Shared>,
    group: &GroupId,
    tx: &broadcast::Sender<GroupEvent>,
) -> bool {
    let Some(s) = shared.upgrade() else {
        return true;
    };
    let mut streams = lock(&s.streams);
    if tx.receiver_count() > 0 {
        return false;
    }
    if streams.get(group).is_some_and(|t| t.same_channel(tx)) {
        streams.remove(group);
    }
    true
}

#[allow(clippy::too_many_arguments)]
async fn group_watch_task(
    shared: Weak<Shared>,
    group: GroupId,
    tx: broadcast::Sender<GroupEvent>,
    mut push: Option<crate::driver::DriverEventStream>,
    mut members: BTreeSet<MemberId>,
    mut leader: Option<MemberId>,
    stop: CancellationToken,
) {
    use futures_util::StreamExt;
    let (poll, hints_only) = match shared.upgrade() {
        Some(s) => (s.config.poll_interval, s.driver.watch_needs_polling()),
        None => return,
    };
    loop {
        let ev = tokio::select! {
            _ = stop.cancelled() => break,
            () = tx.closed() => {
                if stream_unused(&shared, &group, &tx) {
                    return;
                }
                continue;
            }
            ev = async {
                match push.as_mut() {
                    Some(p) if hints_only => tokio::select! {
                        e = p.next() => e,
                        () = tokio::time::sleep(poll) => Some(DriverEvent::Changed),
                    },
                    Some(p) => p.next().await,
                    None => {
                        tokio::time::sleep(poll).await;
                        Some(DriverEvent::Changed)
                    }
                }
            } => ev,
        };
        let Some(s) = shared.upgrade() else { break };
        if stream_unused(&shared, &group, &tx) {
            return;
        }
        let mut out = Vec::new();
        match ev {
            None => {
                // The push source ended: fall back to polling.
                push = None;
                continue;
            }
            Some(DriverEvent::Joined(m)) => {
                if members.insert(m.clone()) {
                    out.push(GroupEvent::MemberJoined {
                        group: group.clone(),
                        member: m,
                    });
                }
            }
            Some(DriverEvent::Left(m)) => {
                if members.remove(&m) {
                    out.push(GroupEvent::MemberLeft {
                        group: group.clone(),
                        member: m,
                    });
                }
            }
            Some(DriverEvent::Changed) => {
                let now = match s.driver.get_members(&group).await {
                    Ok(m) => m,
                    Err(ToozError::GroupNotCreated(_)) => BTreeSet::new(),
                    Err(e) => {
                        tracing::debug!(group = %group, error = %e, "event stream re-read failed");
                        continue;
                    }
                };
                for m in now.difference(&members) {
                    out.push(GroupEvent::MemberJoined {
                        group: group.clone(),
                        member: m.clone(),
                    });
                }
                for m in members.difference(&now) {
                    out.push(GroupEvent::MemberLeft {
                        group: group.clone(),
                        member: m.clone(),
                    });
                }
                members = now;
                let new_leader = s.driver.get_leader(&group).await.ok().flatten();
                if new_leader != leader {
                    let me = &s.member_id;
                    if let Some(old) = leader.take().filter(|old| old != me) {
                        out.push(GroupEvent::LeadershipLost {
                            group: group.clone(),
                            member: old,
                        });
                    }
                    if let Some(new) = new_leader.as_ref().filter(|new| *new != me) {
                        out.push(GroupEvent::LeaderElected {
                            group: group.clone(),
                            member: new.clone(),
                        });
                    }
                    leader = new_leader;
                }
            }
        }
        for e in out {
            let _ = tx.send(e);
        }
    }
    if let Some(s) = shared.upgrade() {
        let mut streams = lock(&s.streams);
        if streams.get(&group).is_some_and(|t| t.same_channel(&tx)) {
            streams.remove(&group);
        }
    }
}
