//! Leader election: campaigns, leaderships and their loss signals.

use std::collections::BTreeSet;
use std::sync::Arc;

use super::*;

impl Coordinator {
    /// Campaigns once in every group with leader callbacks; fires them for each
    /// election won. Returns the `LeaderElected`/`LeadershipLost` events.
    ///
    /// # Errors
    /// Backend errors.
    pub async fn run_elect_coordinator(&self) -> Result<Vec<GroupEvent>> {
        let groups: BTreeSet<GroupId> = {
            let w = lock(&self.shared.watchers);
            w.hooks
                .iter()
                .filter(|h| h.kind == WatchKind::Elected)
                .map(|h| h.group.clone())
                .collect()
        };
        let mut out = Vec::new();
        for g in groups {
            out.extend(self.campaign_once(&g).await?.1);
        }
        Ok(out)
    }

    /// Campaigns once; returns the leadership if leading and the events it caused.
    pub(super) async fn campaign_once(
        &self,
        g: &GroupId,
    ) -> Result<(Option<Leadership>, Vec<GroupEvent>)> {
        let stop = self.shared.stop_token()?;
        let res = self.shared.driver.campaign(g).await?;
        if let Some(tok) = res {
            // Granted after `stop` began, or on a lease already declared lost: this
            // grant's loss signal could never fire, so it is given back.
            let refused = if stop.is_cancelled() {
                Some(ToozError::Stopped)
            } else if self.shared.lease_lost() {
                Some(ToozError::backend_msg(
                    self.shared.info.name,
                    format!("leadership of group {g} was granted on a lease already declared lost"),
                ))
            } else {
                None
            };
            if let Some(err) = refused {
                let known = lock(&self.shared.watchers)
                    .leading
                    .get(g)
                    .is_some_and(|l| l.token == tok);
                if !known && let Err(e) = self.shared.driver.resign(g).await {
                    tracing::debug!(group = %g, error = %e, "giving back a late leadership failed");
                }
                return Err(err);
            }
        }
        let me = self.shared.member_id.clone();
        let mut events = Vec::new();
        let mut handle = None;
        let calls: Vec<Callback> = {
            let mut w = lock(&self.shared.watchers);
            match res {
                Some(tok) => {
                    let same = w.leading.get(g).is_some_and(|l| l.token == tok);
                    let calls = if same {
                        Vec::new()
                    } else {
                        // A new grant (a re-grant under another token makes the old
                        // handle's token stale: that leadership is lost).
                        let fresh = w
                            .leading
                            .insert(
                                g.clone(),
                                Leading {
                                    token: tok,
                                    lost: watch::channel(false).0,
                                },
                            )
                            .is_none();
                        if fresh {
                            events.push(GroupEvent::LeaderElected {
                                group: g.clone(),
                                member: me,
                            });
                            w.hooks
                                .iter()
                                .filter(|h| h.group == *g && h.kind == WatchKind::Elected)
                                .map(|h| Arc::clone(&h.cb))
                                .collect()
                        } else {
                            Vec::new()
                        }
                    };
                    handle = w.leading.get(g).map(|l| l.handle(g));
                    calls
                }
                None => {
                    if w.leading.remove(g).is_some() {
                        events.push(GroupEvent::LeadershipLost {
                            group: g.clone(),
                            member: me,
                        });
                    }
                    Vec::new()
                }
            }
        };
        for ev in &events {
            for cb in &calls {
                cb(ev);
            }
            self.shared.publish(ev.clone());
        }
        Ok((handle, events))
    }

    /// Tries once to become (or stay) the leader of `group`. Returns the leadership
    /// (its fencing token and loss signal) when this member leads.
    ///
    /// # Errors
    /// `NotStarted`, `Stopped` (granted while stopping: given back), backend errors.
    pub async fn try_become_leader(&self, group: impl Into<GroupId>) -> Result<Option<Leadership>> {
        let g = self.shared.group(group)?;
        Ok(self.campaign_once(&g).await?.0)
    }

    /// Campaigns until this member leads `group`, waking on the group's events
    /// (and at the polling interval); returns the leadership.
    ///
    /// # Errors
    /// `Stopped` when the coordinator stops, backend errors.
    pub async fn become_leader(&self, group: impl Into<GroupId>) -> Result<Leadership> {
        let g = self.shared.group(group)?;
        let stop = self.shared.stop_token()?;
        let mut events = self.events(&g).await.ok();
        // Whether the last leadership event seen said nobody leads. A backend may
        // announce "no leader" before the old leader's hold is free, and announce
        // nothing when it is: while vacant, a lost campaign is retried soon, with a
        // short growing pause, instead of waiting for the next event.
        let mut vacant = false;
        let mut vacancy_pause = Duration::from_millis(5);
        loop {
            let attempt = tokio::select! {
                r = self.campaign_once(&g) => r?.0,
                _ = stop.cancelled() => return Err(ToozError::Stopped),
            };
            if let Some(l) = attempt {
                return Ok(l);
            }
            let pause = if vacant {
                let p = vacancy_pause;
                vacancy_pause = (vacancy_pause * 2).min(Duration::from_millis(250));
                p
            } else {
                vacancy_pause = Duration::from_millis(5);
                self.shared.config.poll_interval * 2
            };
            let wait = async {
                match events.as_mut() {
                    Some(s) => match tokio::time::timeout(pause, s.next_event()).await {
                        Ok(Some(GroupEvent::LeadershipLost { .. })) => vacant = true,
                        Ok(Some(GroupEvent::LeaderElected { .. })) => vacant = false,
                        Ok(Some(_)) | Err(_) => {}
                        // The stream ended: poll from now on, instead of
                        // campaigning in a tight loop.
                        Ok(None) => events = None,
                    },
                    None => tokio::time::sleep(pause.min(self.shared.config.poll_interval)).await,
                }
            };
            tokio::select! {
                _ = wait => {}
                _ = stop.cancelled() => return Err(ToozError::Stopped),
            }
        }
    }

    /// The fencing token of this member's leadership of `group`, if it leads
    /// (local view, as of the last campaign).
    pub fn leadership_token(&self, group: impl Into<GroupId>) -> Option<FencingToken> {
        lock(&self.shared.watchers)
            .leading
            .get(&group.into())
            .map(|l| l.token)
    }

    /// This member's leadership of `group`, if it leads (local view, as of the last
    /// campaign).
    pub fn leadership(&self, group: impl Into<GroupId>) -> Option<Leadership> {
        let g = group.into();
        lock(&self.shared.watchers)
            .leading
            .get(&g)
            .map(|l| l.handle(&g))
    }

    /// The group's leader, if any.
    ///
    /// # Errors
    /// `NotStarted`, backend errors.
    pub async fn get_leader(&self, group: impl Into<GroupId>) -> Result<Option<MemberId>> {
        let g = self.shared.group(group)?;
        self.shared.driver.get_leader(&g).await
    }

    /// Gives up leadership of `group` so another candidate can win. `Ok(true)` if
    /// this member was leading.
    ///
    /// # Errors
    /// `NotStarted`, backend errors.
    pub async fn stand_down_group_leader(&self, group: impl Into<GroupId>) -> Result<bool> {
        let g = self.shared.group(group)?;
        let was = self.shared.driver.resign(&g).await?;
        if lock(&self.shared.watchers).leading.remove(&g).is_some() {
            self.shared.publish(GroupEvent::LeadershipLost {
                group: g,
                member: self.shared.member_id.clone(),
            });
        }
        Ok(was)
    }
}
