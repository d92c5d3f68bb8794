//! `memory://`: the whole API in one process, no server (the role zake plays for
//! Python tooz). For unit tests of code that uses tooz, and for running the
//! conformance suite in a plain `cargo test`.
//!
//! Coordinators connected with the same URL in one process share one store; the store
//! lives while any of its coordinators (or their locks) does. `memory://NAME` names a
//! store; `memory://` is the default one. Option: `timeout` (seconds, the interval
//! `heartbeat` returns; default 30).
//!
//! Membership, leadership and locks last until they are left, given up or released,
//! or until the coordinator's driver is dropped (which is how a test simulates a
//! crash): nothing expires on a timer. Joins, leaves and leader changes are pushed to
//! event streams, and a blocked lock acquirer is woken by the release.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> tooz_core::Result<()> {
//! use tooz_core::{Registry, Wait};
//!
//! let registry = Registry::new().with(tooz_core::memory::DRIVER);
//! let a = registry.connect("memory://doc-example", "a")?;
//! let b = registry.connect("memory://doc-example", "b")?;
//! a.start(false).await?;
//! b.start(false).await?;
//! a.join_group_create("workers", &()).await?;
//! assert!(b.get_members("workers").await?.contains(&"a".into()));
//! let lock = a.get_lock("job")?;
//! assert!(lock.acquire(Wait::No).await?);
//! assert!(!b.get_lock("job")?.acquire(Wait::No).await?);
//! a.stop().await?;
//! b.stop().await?;
//! # Ok(()) }
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime};

use tokio::sync::{broadcast, watch};

use crate::capabilities::{Capabilities, MemberInfo};
use crate::characteristic::Characteristic;
use crate::driver::{
    Attempt, Driver, DriverEvent, DriverEventStream, DriverInfo, DriverLock, Held, Renewal,
    WakeStream,
};
use crate::error::{Result, ToozError};
use crate::features::{Features, FencingSource, LeaseKind};
use crate::ids::{GroupId, LockName, MemberId};
use crate::lock::{FencingToken, Mode};
use crate::registry::{ConnectRequest, DriverDescriptor};

/// The driver name.
pub const NAME: &str = "memory";

/// Registers `memory://` with a [`Registry`](crate::Registry).
pub const DRIVER: DriverDescriptor = DriverDescriptor {
    name: NAME,
    schemes: &["memory"],
    connect,
    features: Features::full(LeaseKind::Process, FencingSource::Counter)
        .without_python_interop()
        .in_process(),
};

const CHARACTERISTICS: &[Characteristic] = &[
    Characteristic::DistributedAcrossThreads,
    Characteristic::NonTimeoutBased,
    Characteristic::Linearizable,
    Characteristic::Sequential,
    Characteristic::Serializable,
    Characteristic::SameViewAcrossClients,
];

static STORES: LazyLock<Mutex<HashMap<String, Weak<Store>>>> = LazyLock::new(Default::default);

fn guard<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn connect(req: &ConnectRequest<'_>) -> Result<Arc<dyn Driver>> {
    req.options.check_known(NAME, &["timeout"])?;
    let interval = req
        .options
        .lease_secs(NAME, "timeout")?
        .unwrap_or(Duration::from_secs(30));
    let mut key = req.url.clone();
    key.set_query(None);
    key.set_fragment(None);
    let store = {
        let mut stores = guard(&STORES);
        stores.retain(|_, w| w.strong_count() > 0);
        match stores.get(key.as_str()).and_then(Weak::upgrade) {
            Some(s) => s,
            None => {
                let s = Arc::new(Store::default());
                stores.insert(key.to_string(), Arc::downgrade(&s));
                s
            }
        }
    };
    Ok(Arc::new(MemoryDriver {
        session: store.next_id.fetch_add(1, Ordering::Relaxed) + 1,
        store,
        member: req.member_id.clone(),
        interval,
    }))
}

#[derive(Debug)]
struct Member {
    caps: Capabilities,
    created: SystemTime,
    updated: SystemTime,
    session: u64,
}

#[derive(Debug, Default)]
struct Group {
    members: BTreeMap<MemberId, Member>,
}

#[derive(Debug, Default)]
struct LockRec {
    /// Holding handles with their mode and session.
    holders: BTreeMap<u64, (Mode, u64)>,
    fence: u64,
    /// Bumped on every release, for waiters.
    released: Option<watch::Sender<u64>>,
}

#[derive(Debug)]
struct Leader {
    member: MemberId,
    session: u64,
    token: FencingToken,
}

#[derive(Debug, Default)]
struct State {
    groups: BTreeMap<GroupId, Group>,
    leaders: HashMap<GroupId, Leader>,
    leader_fences: HashMap<GroupId, u64>,
    locks: HashMap<LockName, LockRec>,
    events: HashMap<GroupId, broadcast::Sender<DriverEvent>>,
}

impl State {
    fn publish(&self, group: &GroupId, ev: DriverEvent) {
        if let Some(tx) = self.events.get(group) {
            let _ = tx.send(ev);
        }
    }

    fn group(&self, g: &GroupId) -> Result<&Group> {
        self.groups
            .get(g)
            .ok_or_else(|| ToozError::GroupNotCreated(g.clone()))
    }

    fn group_mut(&mut self, g: &GroupId) -> Result<&mut Group> {
        self.groups
            .get_mut(g)
            .ok_or_else(|| ToozError::GroupNotCreated(g.clone()))
    }

    fn notify_release(&mut self, name: &LockName) {
        if let Some(tx) = self.locks.get(name).and_then(|l| l.released.as_ref()) {
            tx.send_modify(|v| *v += 1);
        }
    }
}

/// One `memory://` store.
#[derive(Debug, Default)]
struct Store {
    state: Mutex<State>,
    next_id: AtomicU64,
}

impl Store {
    fn state(&self) -> MutexGuard<'_, State> {
        guard(&self.state)
    }

    /// Everything a session had goes, as if its process died.
    fn end_session(&self, session: u64) {
        let mut st = self.state();
        let mut left = Vec::new();
        for (g, grp) in &mut st.groups {
            grp.members.retain(|m, rec| {
                let mine = rec.session == session;
                if mine {
                    left.push((g.clone(), m.clone()));
                }
                !mine
            });
        }
        for (g, m) in left {
            st.publish(&g, DriverEvent::Left(m));
        }
        let led: Vec<GroupId> = st
            .leaders
            .iter()
            .filter(|(_, l)| l.session == session)
            .map(|(g, _)| g.clone())
            .collect();
        for g in led {
            st.leaders.remove(&g);
            st.publish(&g, DriverEvent::Changed);
        }
        let names: Vec<LockName> = st
            .locks
            .iter()
            .filter(|(_, l)| l.holders.values().any(|(_, s)| *s == session))
            .map(|(n, _)| n.clone())
            .collect();
        for n in names {
            if let Some(l) = st.locks.get_mut(&n) {
                l.holders.retain(|_, (_, s)| *s != session);
            }
            st.notify_release(&n);
        }
    }
}

/// A coordinator's session on a `memory://` store.
#[derive(Debug)]
pub struct MemoryDriver {
    store: Arc<Store>,
    session: u64,
    member: MemberId,
    interval: Duration,
}

impl Drop for MemoryDriver {
    fn drop(&mut self) {
        self.store.end_session(self.session);
    }
}

#[crate::async_trait]
impl Driver for MemoryDriver {
    fn info(&self) -> DriverInfo {
        DriverInfo::new(NAME, CHARACTERISTICS, false)
    }

    async fn start(&self) -> Result<()> {
        Ok(())
    }

    async fn stop(&self) -> Result<()> {
        self.store.end_session(self.session);
        Ok(())
    }

    /// Nothing expires in memory: every hold is still there unless released.
    async fn heartbeat(&self, _held: &Held<'_>) -> Result<Renewal> {
        Ok(Renewal::new(self.interval))
    }

    async fn create_group(&self, group: &GroupId) -> Result<()> {
        let mut st = self.store.state();
        if st.groups.contains_key(group) {
            return Err(ToozError::GroupAlreadyExist(group.clone()));
        }
        st.groups.insert(group.clone(), Group::default());
        Ok(())
    }

    async fn delete_group(&self, group: &GroupId) -> Result<()> {
        let mut st = self.store.state();
        if !st.group(group)?.members.is_empty() {
            return Err(ToozError::GroupNotEmpty(group.clone()));
        }
        st.groups.remove(group);
        st.publish(group, DriverEvent::Changed);
        Ok(())
    }

    async fn get_groups(&self) -> Result<Vec<GroupId>> {
        Ok(self.store.state().groups.keys().cloned().collect())
    }

    async fn join_group(&self, group: &GroupId, capabilities: &Capabilities) -> Result<()> {
        let mut st = self.store.state();
        let member = self.member.clone();
        let g = st.group_mut(group)?;
        if g.members.contains_key(&member) {
            return Err(ToozError::MemberAlreadyExist {
                group: group.clone(),
                member,
            });
        }
        let now = SystemTime::now();
        g.members.insert(
            member.clone(),
            Member {
                caps: capabilities.clone(),
                created: now,
                updated: now,
                session: self.session,
            },
        );
        st.publish(group, DriverEvent::Joined(member));
        Ok(())
    }

    async fn leave_group(&self, group: &GroupId) -> Result<()> {
        let mut st = self.store.state();
        let g = st.group_mut(group)?;
        if g.members.remove(&self.member).is_none() {
            return Err(ToozError::MemberNotJoined {
                group: group.clone(),
                member: self.member.clone(),
            });
        }
        st.publish(group, DriverEvent::Left(self.member.clone()));
        Ok(())
    }

    async fn get_members(&self, group: &GroupId) -> Result<BTreeSet<MemberId>> {
        Ok(self
            .store
            .state()
            .group(group)?
            .members
            .keys()
            .cloned()
            .collect())
    }

    async fn get_members_with_capabilities(
        &self,
        group: &GroupId,
    ) -> Result<Vec<(MemberId, Capabilities)>> {
        Ok(self
            .store
            .state()
            .group(group)?
            .members
            .iter()
            .map(|(m, r)| (m.clone(), r.caps.clone()))
            .collect())
    }

    async fn get_member_info(&self, group: &GroupId, member: &MemberId) -> Result<MemberInfo> {
        let st = self.store.state();
        let rec =
            st.group(group)?
                .members
                .get(member)
                .ok_or_else(|| ToozError::MemberNotJoined {
                    group: group.clone(),
                    member: member.clone(),
                })?;
        Ok(MemberInfo::new(
            rec.caps.clone(),
            Some(rec.created),
            Some(rec.updated),
        ))
    }

    async fn update_capabilities(
        &self,
        group: &GroupId,
        capabilities: &Capabilities,
    ) -> Result<()> {
        let mut st = self.store.state();
        let g = st.group_mut(group)?;
        let rec = g
            .members
            .get_mut(&self.member)
            .ok_or_else(|| ToozError::MemberNotJoined {
                group: group.clone(),
                member: self.member.clone(),
            })?;
        rec.caps = capabilities.clone();
        rec.updated = SystemTime::now();
        Ok(())
    }

    async fn campaign(&self, group: &GroupId) -> Result<Option<FencingToken>> {
        let mut st = self.store.state();
        if let Some(l) = st.leaders.get(group) {
            return Ok((l.session == self.session).then_some(l.token));
        }
        let fence = st.leader_fences.entry(group.clone()).or_default();
        *fence += 1;
        let token = FencingToken(*fence);
        st.leaders.insert(
            group.clone(),
            Leader {
                member: self.member.clone(),
                session: self.session,
                token,
            },
        );
        st.publish(group, DriverEvent::Changed);
        Ok(Some(token))
    }

    async fn resign(&self, group: &GroupId) -> Result<bool> {
        let mut st = self.store.state();
        if st
            .leaders
            .get(group)
            .is_some_and(|l| l.session == self.session)
        {
            st.leaders.remove(group);
            st.publish(group, DriverEvent::Changed);
            Ok(true)
        } else {
            Ok(false)
        }
    }

    async fn get_leader(&self, group: &GroupId) -> Result<Option<MemberId>> {
        Ok(self
            .store
            .state()
            .leaders
            .get(group)
            .map(|l| l.member.clone()))
    }

    fn lock(&self, name: &LockName) -> Result<Arc<dyn DriverLock>> {
        Ok(Arc::new(MemoryLock {
            name: name.clone(),
            store: Arc::clone(&self.store),
            session: self.session,
            handle: self.store.next_id.fetch_add(1, Ordering::Relaxed) + 1,
        }))
    }

    async fn watch_group(&self, group: &GroupId) -> Result<Option<DriverEventStream>> {
        let mut st = self.store.state();
        st.group(group)?;
        let rx = st
            .events
            .entry(group.clone())
            .or_insert_with(|| broadcast::channel(1024).0)
            .subscribe();
        Ok(Some(Box::pin(futures_util::stream::unfold(
            rx,
            |mut rx| async move {
                match rx.recv().await {
                    Ok(ev) => Some((ev, rx)),
                    // Missed events: the core re-reads the group.
                    Err(broadcast::error::RecvError::Lagged(_)) => Some((DriverEvent::Changed, rx)),
                    Err(broadcast::error::RecvError::Closed) => None,
                }
            },
        ))))
    }
}

/// A lock handle on a `memory://` store.
#[derive(Debug)]
struct MemoryLock {
    name: LockName,
    store: Arc<Store>,
    session: u64,
    handle: u64,
}

impl MemoryLock {
    fn holds(&self) -> bool {
        self.store
            .state()
            .locks
            .get(&self.name)
            .is_some_and(|l| l.holders.contains_key(&self.handle))
    }
}

#[crate::async_trait]
impl DriverLock for MemoryLock {
    fn name(&self) -> &LockName {
        &self.name
    }

    async fn try_acquire(&self, mode: Mode) -> Result<Attempt> {
        let mut st = self.store.state();
        let rec = st.locks.entry(self.name.clone()).or_default();
        let free = match mode {
            Mode::Exclusive => rec.holders.is_empty(),
            Mode::Shared => rec.holders.values().all(|(m, _)| *m == Mode::Shared),
        };
        if !free {
            return Ok(Attempt::held());
        }
        rec.fence += 1;
        rec.holders.insert(self.handle, (mode, self.session));
        Ok(Attempt::Granted(FencingToken(rec.fence)))
    }

    async fn wakeups(&self) -> Result<Option<WakeStream>> {
        let mut st = self.store.state();
        let rec = st.locks.entry(self.name.clone()).or_default();
        let rx = rec
            .released
            .get_or_insert_with(|| watch::channel(0).0)
            .subscribe();
        Ok(Some(Box::pin(futures_util::stream::unfold(
            rx,
            |mut rx| async move { rx.changed().await.ok().map(|()| ((), rx)) },
        ))))
    }

    async fn release(&self) -> Result<bool> {
        let mut st = self.store.state();
        let was = st
            .locks
            .get_mut(&self.name)
            .is_some_and(|l| l.holders.remove(&self.handle).is_some());
        if was {
            st.notify_release(&self.name);
        }
        Ok(was)
    }

    async fn heartbeat(&self) -> Result<bool> {
        Ok(self.holds())
    }

    async fn is_still_owner(&self) -> Result<bool> {
        Ok(self.holds())
    }

    async fn break_lock(&self) -> Result<bool> {
        let mut st = self.store.state();
        let was = st
            .locks
            .get_mut(&self.name)
            .is_some_and(|l| !std::mem::take(&mut l.holders).is_empty());
        if was {
            st.notify_release(&self.name);
        }
        Ok(was)
    }
}
