//! The lease: the heartbeat task, the lease monitor, loss handling and re-joins.

use std::sync::{Arc, Weak};
use std::time::Duration;

use super::*;
use crate::driver::{Held, HeldLock, IdRef};

impl Shared {
    pub(super) fn ensure_started(&self) -> Result<()> {
        if lock(&self.run).started {
            Ok(())
        } else {
            Err(ToozError::NotStarted)
        }
    }

    pub(crate) fn stop_token(&self) -> Result<CancellationToken> {
        let run = lock(&self.run);
        if run.started {
            Ok(run.stop.clone())
        } else {
            Err(ToozError::NotStarted)
        }
    }

    pub(super) fn group(&self, group: impl Into<GroupId>) -> Result<GroupId> {
        let g = group.into();
        g.validate()?;
        self.driver.check_id(IdRef::Group(&g))?;
        self.ensure_started()?;
        Ok(g)
    }

    /// Validates a member id asked about (the core's rules, then the driver's).
    pub(super) fn member(&self, member: MemberId) -> Result<MemberId> {
        member.validate()?;
        self.driver.check_id(IdRef::Member(&member))?;
        Ok(member)
    }

    pub(crate) fn register_lock(&self, l: &Arc<LockInner>) {
        let mut locks = lock(&self.locks);
        locks.retain(|w| w.upgrade().is_some_and(|x| x.is_held()));
        if !locks
            .iter()
            .any(|w| std::ptr::eq(w.as_ptr(), Arc::as_ptr(l)))
        {
            locks.push(Arc::downgrade(l));
        }
    }

    pub(super) fn held_locks(&self) -> Vec<Arc<LockInner>> {
        let mut locks = lock(&self.locks);
        locks.retain(|w| w.upgrade().is_some_and(|x| x.is_held()));
        locks.iter().filter_map(Weak::upgrade).collect()
    }

    pub(super) fn publish(&self, ev: GroupEvent) {
        if let Some(tx) = lock(&self.streams).get(ev.group()) {
            let _ = tx.send(ev);
        }
    }

    /// One heartbeat: renews everything held, signals the holds and leaderships
    /// found lost, and returns the TTL with the groups the backend lost this member
    /// from (still joined as far as the coordinator knows), for
    /// [`Shared::restore_groups`].
    pub(super) async fn beat(&self) -> Result<(Duration, Vec<GroupId>)> {
        let joined: Vec<GroupId> = lock(&self.run).joined.keys().cloned().collect();
        let inners = self.held_locks();
        let locks: Vec<HeldLock> = inners.iter().filter_map(|l| l.held_lock()).collect();
        let leading: Vec<(GroupId, FencingToken)> = lock(&self.watchers)
            .leading
            .iter()
            .map(|(g, l)| (g.clone(), l.token))
            .collect();
        let renewal = self
            .driver
            .heartbeat(&Held::new(&joined, &locks, &leading))
            .await?;
        for i in &renewal.lost_locks {
            if let Some(h) = locks.get(*i)
                && let Some(l) = inners.iter().find(|l| l.is_hold(h))
            {
                tracing::info!(lock = %h.lock.name(), "lock lost (found gone by the heartbeat)");
                l.lose();
            }
        }
        for g in renewal.lost_leaderships {
            let gone = lock(&self.watchers).leading.remove(&g);
            if gone.is_some() {
                crate::observe::lost(self.info.name, "leadership");
            }
            if gone.is_some() {
                tracing::info!(group = %g, "leadership lost (found gone by the heartbeat)");
                drop(gone);
                self.publish(GroupEvent::LeadershipLost {
                    group: g,
                    member: self.member_id.clone(),
                });
            }
        }
        let mut lost = Vec::new();
        if !renewal.lost_groups.is_empty() {
            let run = lock(&self.run);
            let mut restoring = lock(&self.restoring);
            for g in renewal.lost_groups {
                // A group left meanwhile, or reported twice, is not re-joined.
                if run.joined.contains_key(&g) && !lost.contains(&g) {
                    if restoring.insert(g.clone()) {
                        crate::observe::lost(self.info.name, "membership");
                        tracing::warn!(
                            group = %g,
                            "membership lost by the backend (found gone by the heartbeat); re-joining"
                        );
                    }
                    lost.push(g);
                }
            }
        }
        self.beats.fetch_add(1, Ordering::Relaxed);
        Ok((renewal.ttl, lost))
    }

    /// Re-joins groups the backend lost this member from, with its last
    /// capabilities; a group gone with the membership is created again (a group
    /// with a live member cannot have been deleted, so its absence is the same
    /// loss). Serialised with `leave_group` and `stop`: a group left meanwhile is
    /// not re-joined. A failure is logged; the next heartbeat reports the group
    /// again.
    pub(super) async fn restore_groups(&self, groups: Vec<GroupId>) {
        for g in groups {
            let _membership = self.membership.lock().await;
            let caps = lock(&self.run).joined.get(&g).cloned();
            let Some(caps) = caps else {
                lock(&self.restoring).remove(&g);
                continue;
            };
            let mut res = self.driver.join_group(&g, &caps).await;
            if let Err(ToozError::GroupNotCreated(_)) = res {
                match self.driver.create_group(&g).await {
                    Ok(()) | Err(ToozError::GroupAlreadyExist(_)) => {
                        res = self.driver.join_group(&g, &caps).await;
                    }
                    Err(e) => res = Err(e),
                }
            }
            match res {
                Ok(()) => {
                    metrics::counter!("tooz_rejoins_total", "driver" => self.info.name)
                        .increment(1);
                    tracing::info!(group = %g, "re-joined a group the backend had lost");
                    lock(&self.restoring).remove(&g);
                }
                // Back already (an update or another re-join put it there).
                Err(ToozError::MemberAlreadyExist { .. }) => {
                    lock(&self.restoring).remove(&g);
                }
                Err(e) => {
                    tracing::warn!(group = %g, error = %e, "re-joining a group the backend lost failed; the next heartbeat retries");
                }
            }
        }
    }

    /// Whether the lease is currently declared lost (holds granted now would have
    /// no loss signal).
    pub(crate) fn lease_lost(&self) -> bool {
        self.info.lease_bound_holds && *self.liveness.borrow() == Liveness::Lost
    }

    /// The lease is gone: signal every hold and leadership, then give back in the
    /// background whatever the backend may still have of them (ownership-checked).
    pub(super) fn on_lost(&self) {
        self.rejoin_pending.store(true, Ordering::SeqCst);
        if !self.info.lease_bound_holds {
            // Locks and leaderships live as long as the process: nothing is lost.
            return;
        }
        for l in self.held_locks() {
            l.lose();
        }
        let leading: Vec<(GroupId, Leading)> = lock(&self.watchers).leading.drain().collect();
        let mut groups = Vec::new();
        for (g, l) in leading {
            drop(l);
            self.publish(GroupEvent::LeadershipLost {
                group: g.clone(),
                member: self.member_id.clone(),
            });
            groups.push(g);
        }
        if !groups.is_empty()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            let driver = Arc::clone(&self.driver);
            rt.spawn(async move {
                for g in groups {
                    if let Err(e) = driver.resign(&g).await {
                        tracing::debug!(group = %g, error = %e, "resigning a lost leadership failed");
                    }
                }
            });
        }
    }

    /// After a loss, re-join the groups on the new lease (locks are not
    /// re-acquired), in a task of its own so the lease monitor never waits on it.
    pub(super) fn spawn_rejoin(self: &Arc<Self>) {
        if self.rejoining.swap(true, Ordering::SeqCst) {
            return;
        }
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let joined: Vec<(GroupId, Capabilities)> = lock(&me.run)
                .joined
                .iter()
                .map(|(g, c)| (g.clone(), c.clone()))
                .collect();
            for (g, caps) in joined {
                // Not a group left since (see `restore_groups`).
                let _membership = me.membership.lock().await;
                if !lock(&me.run).joined.contains_key(&g) {
                    continue;
                }
                match me.driver.join_group(&g, &caps).await {
                    Ok(()) | Err(ToozError::MemberAlreadyExist { .. }) => {}
                    Err(e) => {
                        tracing::warn!(group = %g, error = %e, "re-joining after lease loss failed")
                    }
                }
            }
            me.rejoin_pending.store(false, Ordering::SeqCst);
            me.rejoining.store(false, Ordering::SeqCst);
        });
    }

    pub(super) fn set_liveness(&self, new: Liveness) -> Liveness {
        // Only a change is sent: every successful beat reports `Alive`, and
        // receivers waiting on `changed()` must not wake for nothing.
        let mut old = new;
        self.liveness.send_if_modified(|v| {
            old = std::mem::replace(v, new);
            old != new
        });
        if new == Liveness::Lost && old != Liveness::Lost {
            crate::observe::lost(self.info.name, "lease");
            self.on_lost();
        }
        old
    }
}

/// Renews the lease: every third of the TTL, each attempt cut off after a quarter
/// of it (so a renewal hung on a dead connection never delays the next one), retried
/// soon after a failure. It only reports to the lease state; [`lease_monitor`]
/// decides when the lease is lost.
pub(super) async fn heart_loop(shared: Weak<Shared>, lease: LeaseState, stop: CancellationToken) {
    let mut ttl = lease.view().ttl.unwrap_or(Duration::from_secs(10));
    loop {
        let Some(s) = shared.upgrade() else { return };
        let sent = Instant::now();
        let cut = (ttl / 4).max(Duration::from_millis(10));
        let res = tokio::select! {
            r = tokio::time::timeout(cut, s.beat()) => r,
            _ = stop.cancelled() => return,
        };
        let pause = match res {
            Ok(Ok((interval, lost))) => {
                ttl = interval;
                lease.renewed(sent, interval);
                if !lost.is_empty() && !s.restoring_now.swap(true, Ordering::SeqCst) {
                    // In a task of its own: the next renewal never waits on it.
                    let me = Arc::clone(&s);
                    tokio::spawn(async move {
                        me.restore_groups(lost).await;
                        me.restoring_now.store(false, Ordering::SeqCst);
                    });
                }
                (interval / 3).saturating_sub(sent.elapsed())
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "heartbeat failed; retrying");
                lease.at_risk();
                (ttl / 10).min(Duration::from_millis(500))
            }
            Err(_) => {
                tracing::warn!(?cut, "heartbeat got no answer in time; retrying");
                lease.at_risk();
                (ttl / 10).min(Duration::from_millis(500))
            }
        };
        drop(s);
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// Turns the lease state into the coordinator's liveness: `Lost` at the loss
/// deadline (a timer that waits on no request), on the driver's word, on a replaced
/// lease, or when at risk under [`LeasePolicy::AtRiskIsLost`]; `Alive` again (and a
/// re-join) once a renewal succeeds in time.
pub(super) async fn lease_monitor(
    shared: Weak<Shared>,
    lease: LeaseState,
    stop: CancellationToken,
) {
    let mut rx = lease.subscribe();
    let mut generation = rx.borrow().generation;
    loop {
        let view = *rx.borrow_and_update();
        let Some(s) = shared.upgrade() else { return };
        if view.generation != generation {
            // Whatever hung on the old lease is gone, even if its `Lost` was never
            // reported (a flapping connection).
            generation = view.generation;
            s.set_liveness(Liveness::Lost);
        }
        let (now, deadline) = judge(
            &view,
            Instant::now(),
            s.config.loss_margin,
            s.config.lease_policy,
        );
        if s.set_liveness(now) == Liveness::Lost && now == Liveness::Alive {
            s.spawn_rejoin();
        }
        drop(s);
        let wake = if now == Liveness::Lost {
            None
        } else {
            deadline
        };
        tokio::select! {
            r = rx.changed() => if r.is_err() { return },
            () = sleep_until_opt(wake) => {}
            _ = stop.cancelled() => return,
        }
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}
