//! tooz's watch callbacks and `run_watchers`.

use std::collections::BTreeSet;
use std::sync::{Arc, Weak};
use std::time::Duration;

use super::*;

impl Coordinator {
    // ----- watchers (tooz semantics) -----------------------------------------

    /// Calls `callback` with a `MemberJoined` event for each member that joins
    /// `group`, detected by [`Coordinator::run_watchers`].
    ///
    /// # Errors
    /// `GroupNotCreated` (and no callback is registered).
    pub async fn watch_join_group<F>(
        &self,
        group: impl Into<GroupId>,
        callback: F,
    ) -> Result<WatchId>
    where
        F: Fn(&GroupEvent) + Send + Sync + 'static,
    {
        self.watch_members(group.into(), WatchKind::Join, Arc::new(callback))
            .await
    }

    /// Calls `callback` with a `MemberLeft` event for each member that leaves or
    /// expires, detected by [`Coordinator::run_watchers`].
    ///
    /// # Errors
    /// `GroupNotCreated` (and no callback is registered).
    pub async fn watch_leave_group<F>(
        &self,
        group: impl Into<GroupId>,
        callback: F,
    ) -> Result<WatchId>
    where
        F: Fn(&GroupEvent) + Send + Sync + 'static,
    {
        self.watch_members(group.into(), WatchKind::Leave, Arc::new(callback))
            .await
    }

    /// Runs for leadership of `group`: each [`Coordinator::run_watchers`] (or
    /// [`Coordinator::run_elect_coordinator`]) campaigns, and `callback` gets one
    /// `LeaderElected` event per won election.
    ///
    /// # Errors
    /// `InvalidId`, `NotStarted`.
    pub fn watch_elected_as_leader<F>(
        &self,
        group: impl Into<GroupId>,
        callback: F,
    ) -> Result<WatchId>
    where
        F: Fn(&GroupEvent) + Send + Sync + 'static,
    {
        let g = self.shared.group(group)?;
        let mut w = lock(&self.shared.watchers);
        w.next_id += 1;
        let id = w.next_id;
        w.hooks.push(Hook {
            id,
            group: g,
            kind: WatchKind::Elected,
            cb: Arc::new(callback),
        });
        Ok(WatchId(id))
    }

    pub(super) async fn watch_members(
        &self,
        group: GroupId,
        kind: WatchKind,
        cb: Callback,
    ) -> Result<WatchId> {
        let g = self.shared.group(group)?;
        let cached = lock(&self.shared.watchers).cache.contains_key(&g);
        let snapshot = if cached {
            None
        } else {
            Some(self.shared.driver.get_members(&g).await?)
        };
        let mut w = lock(&self.shared.watchers);
        if let Some(s) = snapshot {
            w.cache.entry(g.clone()).or_insert(s);
        }
        w.next_id += 1;
        let id = w.next_id;
        w.hooks.push(Hook {
            id,
            group: g,
            kind,
            cb,
        });
        Ok(WatchId(id))
    }

    /// Unregisters a watch callback of any kind.
    ///
    /// # Errors
    /// `WatchCallbackNotFound`.
    pub fn unwatch(&self, id: WatchId) -> Result<()> {
        self.unwatch_matching(None, None, id)
    }

    /// Unregisters a join callback of `group` (tooz `unwatch_join_group`).
    ///
    /// # Errors
    /// `WatchCallbackNotFound` when `id` is not a join watch of `group`.
    pub fn unwatch_join_group(&self, group: impl Into<GroupId>, id: WatchId) -> Result<()> {
        self.unwatch_matching(Some(group.into()), Some(WatchKind::Join), id)
    }

    /// Unregisters a leave callback of `group` (tooz `unwatch_leave_group`).
    ///
    /// # Errors
    /// `WatchCallbackNotFound` when `id` is not a leave watch of `group`.
    pub fn unwatch_leave_group(&self, group: impl Into<GroupId>, id: WatchId) -> Result<()> {
        self.unwatch_matching(Some(group.into()), Some(WatchKind::Leave), id)
    }

    /// Stops running for leadership through this callback (tooz
    /// `unwatch_elected_as_leader`).
    ///
    /// # Errors
    /// `WatchCallbackNotFound` when `id` is not a leader watch of `group`.
    pub fn unwatch_elected_as_leader(&self, group: impl Into<GroupId>, id: WatchId) -> Result<()> {
        self.unwatch_matching(Some(group.into()), Some(WatchKind::Elected), id)
    }

    pub(super) fn unwatch_matching(
        &self,
        group: Option<GroupId>,
        kind: Option<WatchKind>,
        id: WatchId,
    ) -> Result<()> {
        let mut w = lock(&self.shared.watchers);
        let pos = w.hooks.iter().position(|h| {
            h.id == id.0
                && group.as_ref().is_none_or(|g| *g == h.group)
                && kind.is_none_or(|k| k == h.kind)
        });
        let Some(pos) = pos else {
            return Err(ToozError::WatchCallbackNotFound {
                group: group.unwrap_or_else(|| GroupId::from("*")),
                watch: id.0,
            });
        };
        let hook = w.hooks.remove(pos);
        w.forget_unwatched(&hook.group);
        Ok(())
    }

    /// How many callbacks of each kind are registered for `group`:
    /// `(join, leave, elected)`.
    pub fn watch_counts(&self, group: impl Into<GroupId>) -> (usize, usize, usize) {
        let g = group.into();
        let w = lock(&self.shared.watchers);
        let count = |k| {
            w.hooks
                .iter()
                .filter(|h| h.group == g && h.kind == k)
                .count()
        };
        (
            count(WatchKind::Join),
            count(WatchKind::Leave),
            count(WatchKind::Elected),
        )
    }

    /// Polls every watched group once: fires join/leave callbacks for the
    /// differences since the last call, updates partitioners, then campaigns in
    /// groups with leader callbacks. Returns the events dispatched.
    ///
    /// A coordinator that believes it joined a group but is not among its members
    /// any more ("booted out") forgets that it joined.
    ///
    /// # Errors
    /// `OperationTimedOut` when `timeout` runs out, backend errors.
    pub async fn run_watchers(&self, timeout: Option<Duration>) -> Result<Vec<GroupEvent>> {
        self.shared.ensure_started()?;
        let fut = self.run_watchers_inner();
        match timeout {
            None => fut.await,
            Some(t) => tokio::time::timeout(t, fut).await.map_err(|_| {
                ToozError::OperationTimedOut(format!("run_watchers took more than {t:?}"))
            })?,
        }
    }

    pub(super) async fn run_watchers_inner(&self) -> Result<Vec<GroupEvent>> {
        let groups: Vec<GroupId> = {
            let w = lock(&self.shared.watchers);
            w.cache.keys().cloned().collect()
        };
        let me = self.shared.member_id.clone();
        let mut all = Vec::new();
        for g in groups {
            let members = match self.shared.driver.get_members(&g).await {
                Ok(m) => m,
                Err(ToozError::GroupNotCreated(_)) => BTreeSet::new(),
                Err(e) => return Err(e),
            };
            {
                let mut run = lock(&self.shared.run);
                if run.joined.contains_key(&g)
                    && !members.contains(&me)
                    && !self.shared.rejoin_pending.load(Ordering::SeqCst)
                    && !lock(&self.shared.restoring).contains(&g)
                {
                    tracing::info!(group = %g, "booted out of the group");
                    run.joined.remove(&g);
                }
            }
            let (events, calls, parts) = {
                let mut w = lock(&self.shared.watchers);
                let Some(old) = w.cache.get(&g).cloned() else {
                    continue;
                };
                let mut events = Vec::new();
                for m in members.difference(&old) {
                    events.push(GroupEvent::MemberJoined {
                        group: g.clone(),
                        member: m.clone(),
                    });
                }
                for m in old.difference(&members) {
                    events.push(GroupEvent::MemberLeft {
                        group: g.clone(),
                        member: m.clone(),
                    });
                }
                w.cache.insert(g.clone(), members);
                let mut calls: Vec<(Callback, GroupEvent)> = Vec::new();
                for ev in &events {
                    let kind = match ev {
                        GroupEvent::MemberJoined { .. } => WatchKind::Join,
                        _ => WatchKind::Leave,
                    };
                    for h in w.hooks.iter().filter(|h| h.group == g && h.kind == kind) {
                        calls.push((Arc::clone(&h.cb), ev.clone()));
                    }
                }
                w.partitioners.retain(|p| p.strong_count() > 0);
                let parts: Vec<Arc<PartitionerState>> = w
                    .partitioners
                    .iter()
                    .filter_map(Weak::upgrade)
                    .filter(|p| p.group == g)
                    .collect();
                (events, calls, parts)
            };
            for (cb, ev) in calls {
                cb(&ev);
            }
            if !events.is_empty() {
                for p in parts {
                    p.apply(self, &events).await?;
                }
            }
            all.extend(events);
        }
        all.extend(self.run_elect_coordinator().await?);
        Ok(all)
    }
}
