//! The driver both databases share: the lease row, the session connection that
//! holds locks taken without waiting and renews the lease, the heartbeat.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::time::Instant;
use tooz_core::lease::LeaseState;
use tooz_core::{
    Capabilities, Characteristic, Driver, DriverEventStream, DriverInfo, DriverLock, FencingToken,
    GroupId, Held, LockName, MemberId, MemberInfo, Mode, Renewal, Result,
};

use crate::backend::{Backend, is_broken, member_set, to_tooz};
use crate::lock::{HoldState, SqlLock};

const CHARACTERISTICS: &[Characteristic] = &[
    Characteristic::DistributedAcrossThreads,
    Characteristic::DistributedAcrossProcesses,
    Characteristic::DistributedAcrossHosts,
];

pub(crate) fn guard<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The coordinator's session connection: it renews the lease and holds every lock
/// taken without waiting (session locks are counted per connection, so `held`
/// keeps two handles of one lock name from sharing a hold the server would count
/// twice).
///
/// `held` is kept per server key *and* lock name: distinct names can share a key
/// (PostgreSQL's keys have 65,536 slots, as Python tooz's), and a second name on a
/// key this session already holds is granted by the server (it counts the key
/// again); only the same name in a conflicting mode is refused here.
pub(crate) struct Session<B: Backend> {
    pub(crate) conn: Option<(B::Conn, i64)>,
    /// Bumped each time the connection is found broken: holds of an older
    /// generation are gone.
    pub(crate) generation: u64,
    pub(crate) held: HashMap<B::Key, HashMap<LockName, (Mode, u32)>>,
}

impl<B: Backend> Session<B> {
    /// The connection, connected if needed.
    pub(crate) async fn conn(&mut self, inner: &Inner<B>) -> Result<&mut B::Conn> {
        if self.conn.is_none() {
            let c = inner
                .db
                .connect_holder()
                .await
                .map_err(|e| to_tooz(B::NAME, "connecting the session", e))?;
            self.conn = Some(c);
        }
        match self.conn.as_mut() {
            Some((c, _)) => Ok(c),
            None => unreachable!("connected above"),
        }
    }

    /// The connection is gone, and with it every lock it held.
    pub(crate) fn broken(&mut self, inner: &Inner<B>) {
        if let Some(c) = self.conn.take() {
            inner.bury(c.0);
        }
        self.held.clear();
        self.generation += 1;
    }

    /// Whether a hold of generation `g` is still on the live connection.
    pub(crate) fn is_live(&self, g: u64) -> bool {
        self.generation == g && self.conn.is_some()
    }

    /// Whether a handle of this session holds `name` in a mode that excludes `mode`.
    pub(crate) fn conflicts(&self, key: &B::Key, name: &LockName, mode: Mode) -> bool {
        self.held
            .get(key)
            .and_then(|names| names.get(name))
            .is_some_and(|(m, _)| mode == Mode::Exclusive || *m == Mode::Exclusive)
    }

    /// Whether some handle accounts for a hold of `key` in `mode` (whatever its name).
    pub(crate) fn accounts_for(&self, key: &B::Key, mode: Mode) -> bool {
        self.held
            .get(key)
            .is_some_and(|names| names.values().any(|(m, _)| *m == mode))
    }

    pub(crate) fn add(&mut self, key: &B::Key, name: &LockName, mode: Mode) {
        let e = self
            .held
            .entry(key.clone())
            .or_default()
            .entry(name.clone())
            .or_insert((mode, 0));
        e.1 += 1;
    }

    pub(crate) fn remove(&mut self, key: &B::Key, name: &LockName) {
        let Some(names) = self.held.get_mut(key) else {
            return;
        };
        if let Some(e) = names.get_mut(name) {
            e.1 = e.1.saturating_sub(1);
            if e.1 == 0 {
                names.remove(name);
            }
        }
        if names.is_empty() {
            self.held.remove(key);
        }
    }
}

/// What the driver and its lock handles share.
pub(crate) struct Inner<B: Backend> {
    pub(crate) db: B,
    pub(crate) member: MemberId,
    lease_id: AtomicI64,
    pub(crate) lease: LeaseState,
    pub(crate) session: tokio::sync::Mutex<Session<B>>,
    /// Attempts waiting for the session: whoever gets it next serves them all, in
    /// one batch where the database can (see [`crate::lock`]).
    pub(crate) pending: Mutex<Vec<crate::lock::Pending<B>>>,
    /// Connections holding nothing, kept for the next wait.
    spares: Mutex<Vec<(B::Conn, i64, Instant)>>,
    /// Broken connections kept open until the heartbeat has reported their holds
    /// lost (a closed socket frees them on the server at once); `true` once reported.
    graveyard: Mutex<Vec<(B::Conn, bool)>>,
    readers: AtomicU64,
}

impl<B: Backend> Inner<B> {
    pub(crate) fn lease_id(&self) -> i64 {
        self.lease_id.load(Ordering::SeqCst)
    }

    /// A unique name for a shared hold (MySQL's reader locks): at most 64 bytes.
    pub(crate) fn reader_name(&self) -> String {
        format!(
            "tooz-r:{:x}:{:x}",
            self.lease_id() as u64,
            self.readers.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// A connection for a server-side wait: a spare, or a new one.
    pub(crate) async fn waiter_conn(&self) -> Result<(B::Conn, i64)> {
        let max_idle = self.db.ttl() / 2;
        loop {
            let spare = guard(&self.spares).pop();
            match spare {
                Some((c, id, at)) if at.elapsed() < max_idle => return Ok((c, id)),
                Some((c, _, _)) => drop(c),
                None => break,
            }
        }
        self.db
            .connect_holder()
            .await
            .map_err(|e| to_tooz(B::NAME, "connecting for a lock wait", e))
    }

    /// Keeps a connection that holds nothing for the next wait.
    pub(crate) fn spare(&self, conn: B::Conn, id: i64) {
        let mut s = guard(&self.spares);
        if s.len() < 4 {
            s.push((conn, id, Instant::now()));
        }
    }

    /// Keeps a broken connection open until its holds were reported lost.
    pub(crate) fn bury(&self, conn: B::Conn) {
        guard(&self.graveyard).push((conn, false));
    }
}

/// A coordinator's driver on PostgreSQL or MySQL.
pub struct SqlDriver<B: Backend> {
    pub(crate) inner: Arc<Inner<B>>,
}

impl<B: Backend> fmt::Debug for SqlDriver<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlDriver")
            .field("driver", &B::NAME)
            .field("member", &self.inner.member)
            .finish()
    }
}

impl<B: Backend> SqlDriver<B> {
    pub(crate) fn new(db: B, member: MemberId) -> Self {
        SqlDriver {
            inner: Arc::new(Inner {
                db,
                member,
                lease_id: AtomicI64::new(0),
                lease: LeaseState::new(),
                session: tokio::sync::Mutex::new(Session {
                    conn: None,
                    generation: 0,
                    held: HashMap::new(),
                }),
                pending: Mutex::new(Vec::new()),
                spares: Mutex::new(Vec::new()),
                graveyard: Mutex::new(Vec::new()),
                readers: AtomicU64::new(0),
            }),
        }
    }

    fn new_lease_id() -> i64 {
        loop {
            let id = rand::random::<i64>();
            if id != 0 {
                return id;
            }
        }
    }

    /// Renews the lease on the session connection (one statement); reconnects once
    /// if the connection broke (its locks are lost). The session generation after.
    async fn renew_session(&self) -> Result<(bool, u64)> {
        let inner = &self.inner;
        let mut s = inner.session.lock().await;
        for attempt in 0..2 {
            let lease = inner.lease_id();
            let conn = match s.conn(inner).await {
                Ok(c) => c,
                Err(e) => return Err(e),
            };
            match inner.db.renew(conn, lease).await {
                Ok(alive) => return Ok((alive, s.generation)),
                Err(e) if is_broken(&e) && attempt == 0 => {
                    tracing::info!(driver = B::NAME, error = %e, "session connection lost: its locks are lost; reconnecting");
                    s.broken(inner);
                }
                Err(e) => {
                    if is_broken(&e) {
                        s.broken(inner);
                    }
                    return Err(to_tooz(B::NAME, "renewing the lease", e));
                }
            }
        }
        Err(tooz_core::ToozError::backend_msg(
            B::NAME,
            "renewing the lease failed",
        ))
    }
}

#[tooz_core::async_trait]
impl<B: Backend> Driver for SqlDriver<B> {
    fn info(&self) -> DriverInfo {
        DriverInfo::new(B::NAME, CHARACTERISTICS, true)
    }

    fn lease(&self) -> Option<LeaseState> {
        Some(self.inner.lease.clone())
    }

    async fn start(&self) -> Result<()> {
        let inner = &self.inner;
        inner.db.prepare().await?;
        let sent = Instant::now();
        let id = Self::new_lease_id();
        inner.db.open_lease(id, &inner.member).await?;
        inner.lease_id.store(id, Ordering::SeqCst);
        {
            let mut s = inner.session.lock().await;
            if s.conn.is_none() {
                s.conn(inner).await?;
            }
        }
        inner.lease.renewed(sent, inner.db.ttl());
        Ok(())
    }

    async fn stop(&self) -> Result<()> {
        let inner = &self.inner;
        let res = inner.db.end_lease(inner.lease_id()).await;
        let conn = {
            let mut s = inner.session.lock().await;
            s.held.clear();
            s.generation += 1;
            s.conn.take()
        };
        if let Some((c, _)) = conn {
            inner.db.close(c).await;
        }
        let spares: Vec<_> = guard(&inner.spares).drain(..).collect();
        for (c, _, _) in spares {
            inner.db.close(c).await;
        }
        guard(&inner.graveyard).clear();
        inner.db.disconnect();
        res
    }

    async fn heartbeat(&self, held: &Held<'_>) -> Result<Renewal> {
        let inner = &self.inner;
        let sent = Instant::now();
        // Connections whose holds the previous heartbeat reported lost can go.
        guard(&inner.graveyard).retain(|(_, reported)| !reported);
        let mine: Vec<(usize, &SqlLock<B>)> = held
            .locks
            .iter()
            .enumerate()
            .filter_map(|(i, h)| h.downcast::<SqlLock<B>>().map(|l| (i, l)))
            .collect();
        // Locks won by waiting live on connections of their own: one ping each,
        // alongside the one statement on the session.
        let pings = futures_util::future::join_all(
            mine.iter()
                .map(|(i, l)| async move { (*i, l.renew_own().await) }),
        );
        let (states, session) = tokio::join!(pings, self.renew_session());
        let (alive, generation) = session?;
        let mut renewal = Renewal::new(inner.db.ttl());
        for (i, state) in states {
            let lost = match state {
                HoldState::Own(ok) => !ok,
                HoldState::Session(g) => g != generation,
                HoldState::None => false,
            };
            if lost {
                renewal.lose_lock(i);
            }
        }
        if !alive {
            // The lease expired (this process was silent too long): whatever was on
            // it is gone. A new lease; the coordinator signals the loss and re-joins.
            let id = Self::new_lease_id();
            inner.db.open_lease(id, &inner.member).await?;
            inner.lease_id.store(id, Ordering::SeqCst);
            inner.lease.replaced(sent, inner.db.ttl());
            tracing::warn!(
                driver = B::NAME,
                "the lease had expired; a new one replaces it"
            );
        }
        for g in guard(&inner.graveyard).iter_mut() {
            g.1 = true;
        }
        Ok(renewal)
    }

    async fn create_group(&self, group: &GroupId) -> Result<()> {
        self.inner.db.create_group(group).await
    }

    async fn delete_group(&self, group: &GroupId) -> Result<()> {
        self.inner.db.delete_group(group).await
    }

    async fn get_groups(&self) -> Result<Vec<GroupId>> {
        self.inner.db.get_groups().await
    }

    async fn join_group(&self, group: &GroupId, capabilities: &Capabilities) -> Result<()> {
        let inner = &self.inner;
        inner
            .db
            .join_group(inner.lease_id(), group, &inner.member, capabilities)
            .await
    }

    async fn leave_group(&self, group: &GroupId) -> Result<()> {
        self.inner.db.leave_group(group, &self.inner.member).await
    }

    async fn get_members(&self, group: &GroupId) -> Result<BTreeSet<MemberId>> {
        Ok(member_set(self.inner.db.members(group, false).await?))
    }

    async fn get_members_with_capabilities(
        &self,
        group: &GroupId,
    ) -> Result<Vec<(MemberId, Capabilities)>> {
        self.inner.db.members(group, true).await
    }

    async fn get_member_info(&self, group: &GroupId, member: &MemberId) -> Result<MemberInfo> {
        self.inner.db.member_info(group, member).await
    }

    async fn update_capabilities(
        &self,
        group: &GroupId,
        capabilities: &Capabilities,
    ) -> Result<()> {
        self.inner
            .db
            .update_capabilities(group, &self.inner.member, capabilities)
            .await
    }

    async fn campaign(&self, group: &GroupId) -> Result<Option<FencingToken>> {
        let inner = &self.inner;
        Ok(inner
            .db
            .campaign(inner.lease_id(), group, &inner.member)
            .await?
            .map(FencingToken))
    }

    async fn resign(&self, group: &GroupId) -> Result<bool> {
        self.inner.db.resign(self.inner.lease_id(), group).await
    }

    async fn get_leader(&self, group: &GroupId) -> Result<Option<MemberId>> {
        self.inner.db.get_leader(group).await
    }

    fn lock(&self, name: &LockName) -> Result<Arc<dyn DriverLock>> {
        Ok(Arc::new(SqlLock::new(
            name.clone(),
            Arc::clone(&self.inner),
        )))
    }

    async fn watch_group(&self, group: &GroupId) -> Result<Option<DriverEventStream>> {
        self.inner.db.watch(group).await
    }
}
