//! The [`Coordinator`]: what applications hold.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::capabilities::{Capabilities, MemberInfo};
use crate::characteristic::Characteristic;
use crate::driver::{Driver, DriverEvent, DriverInfo, Liveness};
use crate::error::{Result, ToozError};
use crate::events::{EventStream, GroupEvent, WatchId};
use crate::ids::{GroupId, LockName, MemberId};
use crate::lease::{LeasePolicy, LeaseState, LeaseView, effective_margin, judge};
use crate::lock::{FencingToken, Leadership, Lock, LockInner};
use crate::partitioner::{Partitioner, PartitionerState};

type Callback = Arc<dyn Fn(&GroupEvent) + Send + Sync + 'static>;

/// Which kind of watch a callback is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WatchKind {
    Join,
    Leave,
    Elected,
}

struct Hook {
    id: u64,
    group: GroupId,
    kind: WatchKind,
    cb: Callback,
}

#[derive(Default)]
struct Watchers {
    next_id: u64,
    hooks: Vec<Hook>,
    /// Member sets cached by `run_watchers`, per group with join/leave hooks.
    cache: HashMap<GroupId, BTreeSet<MemberId>>,
    /// Groups this coordinator leads, with the grant's token and loss signal.
    leading: HashMap<GroupId, Leading>,
    partitioners: Vec<Weak<PartitionerState>>,
}

/// A leadership held: its token and the sender of its loss signal.
struct Leading {
    token: FencingToken,
    lost: watch::Sender<bool>,
}

impl Leading {
    fn handle(&self, group: &GroupId) -> Leadership {
        Leadership {
            group: group.clone(),
            token: self.token,
            lost: self.lost.subscribe(),
        }
    }
}

impl Drop for Leading {
    /// A leadership forgotten is a leadership lost: whoever holds its handle hears it.
    fn drop(&mut self) {
        self.lost.send_replace(true);
    }
}

struct RunState {
    started: bool,
    stop: CancellationToken,
    joined: BTreeMap<GroupId, Capabilities>,
    tasks: Vec<JoinHandle<()>>,
    /// The lease of this run, when the driver has one (see [`crate::lease`]).
    lease: Option<LeaseState>,
}

/// Tuning of the coordinator's own machinery.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct CoordinatorConfig {
    /// Polling interval of event streams for drivers that cannot push.
    pub poll_interval: Duration,
    /// Capacity of each group's event stream buffer before `Lagged` is reported
    /// (at least 1).
    pub event_buffer: usize,
    /// How long before the backend can free a lease the coordinator declares it
    /// [`Liveness::Lost`] (see [`crate::lease`]). `None`: a quarter of the TTL, at
    /// most 2 s. A margin above half the TTL is cut to half. URL option
    /// `loss_margin=SECONDS`.
    pub loss_margin: Option<Duration>,
    /// Whether an unreachable backend counts as a lost lease at once. URL option
    /// `lease_policy=standard|at_risk_is_lost`.
    pub lease_policy: LeasePolicy,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        CoordinatorConfig {
            poll_interval: Duration::from_millis(500),
            event_buffer: 1024,
            loss_margin: None,
            lease_policy: LeasePolicy::Standard,
        }
    }
}

pub(crate) struct Shared {
    driver: Arc<dyn Driver>,
    info: DriverInfo,
    member_id: MemberId,
    url: String,
    config: CoordinatorConfig,
    run: Mutex<RunState>,
    watchers: Mutex<Watchers>,
    liveness: watch::Sender<Liveness>,
    locks: Mutex<Vec<Weak<LockInner>>>,
    streams: Mutex<HashMap<GroupId, broadcast::Sender<GroupEvent>>>,
    beats: AtomicU64,
    /// Set from a lease loss until the groups are re-joined: meanwhile our member
    /// missing from a group is the loss, not a boot-out.
    rejoin_pending: AtomicBool,
    /// A re-join task is running.
    rejoining: AtomicBool,
    /// Serialises `start` and `stop`, so a `start` cannot slip in while `stop` is
    /// still leaving groups and disconnecting the driver.
    lifecycle: tokio::sync::Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A member's connection to a coordination backend: groups, membership,
/// capabilities, watches, leader election, locks and partitioners.
///
/// Cheap to clone (an `Arc` inside); every clone is the same coordinator.
///
/// ```no_run
/// # async fn demo(coord: tooz_core::Coordinator) -> tooz_core::Result<()> {
/// use std::collections::BTreeMap;
///
/// coord.start(true).await?;
/// coord.join_group_create("workers", &BTreeMap::from([("weight", 2)])).await?;
/// for member in coord.get_members("workers").await? {
///     println!("{member}");
/// }
/// coord.stop().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Coordinator {
    shared: Arc<Shared>,
}

impl fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Coordinator")
            .field("driver", &self.shared.info.name)
            .field("member_id", &self.shared.member_id)
            .field("url", &self.shared.url)
            .finish()
    }
}

impl Coordinator {
    /// Wraps a driver. Most code uses a [`Registry`](crate::Registry) or the `tooz`
    /// facade's `connect` instead.
    pub fn new(driver: Arc<dyn Driver>, member_id: MemberId, url: impl Into<String>) -> Self {
        Coordinator::with_config(driver, member_id, url, CoordinatorConfig::default())
    }

    /// Like [`Coordinator::new`] with explicit tuning.
    pub fn with_config(
        driver: Arc<dyn Driver>,
        member_id: MemberId,
        url: impl Into<String>,
        config: CoordinatorConfig,
    ) -> Self {
        let info = driver.info();
        let mut config = config;
        // A zero interval would make polling streams spin.
        config.poll_interval = config.poll_interval.max(Duration::from_millis(1));
        let token = CancellationToken::new();
        token.cancel();
        Coordinator {
            shared: Arc::new(Shared {
                driver,
                info,
                member_id,
                url: url.into(),
                config,
                run: Mutex::new(RunState {
                    started: false,
                    stop: token,
                    joined: BTreeMap::new(),
                    tasks: Vec::new(),
                    lease: None,
                }),
                watchers: Mutex::new(Watchers::default()),
                liveness: watch::channel(Liveness::Alive).0,
                locks: Mutex::new(Vec::new()),
                streams: Mutex::new(HashMap::new()),
                beats: AtomicU64::new(0),
                rejoin_pending: AtomicBool::new(false),
                rejoining: AtomicBool::new(false),
                lifecycle: tokio::sync::Mutex::new(()),
            }),
        }
    }

    // ----- identity -----------------------------------------------------------

    /// This coordinator's member id.
    pub fn member_id(&self) -> &MemberId {
        &self.shared.member_id
    }

    /// The driver name (`"file"`, `"redis"`, ...).
    pub fn driver_name(&self) -> &'static str {
        self.shared.info.name
    }

    /// The backend URL, with any password redacted.
    pub fn url(&self) -> &str {
        &self.shared.url
    }

    /// The guarantees of the driver.
    pub fn characteristics(&self) -> &'static [Characteristic] {
        self.shared.info.characteristics
    }

    /// Whether the driver needs heartbeats (`start(true)` runs them).
    pub fn requires_beating(&self) -> bool {
        self.shared.info.requires_beating
    }

    /// Whether the coordinator is started.
    pub fn is_started(&self) -> bool {
        lock(&self.shared.run).started
    }

    /// How many heartbeats succeeded since the coordinator was created.
    pub fn beats(&self) -> u64 {
        self.shared.beats.load(Ordering::Relaxed)
    }

    /// The health of the coordinator's lease: `Alive`, `AtRisk` (backend
    /// unreachable) or `Lost` (past the lease TTL; locks and leaderships are gone).
    pub fn liveness(&self) -> watch::Receiver<Liveness> {
        self.shared.liveness.subscribe()
    }

    /// The lease's current state, when the driver has a lease (see [`crate::lease`]).
    pub fn lease(&self) -> Option<LeaseView> {
        lock(&self.shared.run).lease.as_ref().map(LeaseState::view)
    }

    /// How long before the backend can free the lease its loss is signalled, for the
    /// lease's current TTL: what an application that stops work on a loss signal has
    /// to finish stopping. `None` while no lease TTL is known.
    pub fn loss_margin(&self) -> Option<Duration> {
        let ttl = self.lease()?.ttl?;
        Some(effective_margin(self.shared.config.loss_margin, ttl))
    }

    /// The groups this coordinator joined (and has not left or been booted out of).
    pub fn joined_groups(&self) -> Vec<GroupId> {
        lock(&self.shared.run).joined.keys().cloned().collect()
    }

    // ----- lifecycle ----------------------------------------------------------

    /// Connects to the backend. With `start_heart` and a driver that requires
    /// beating, a background task heartbeats at half the interval the driver returns,
    /// retrying failures.
    ///
    /// # Errors
    /// `AlreadyStarted`, or `Connection` when the backend cannot be reached.
    pub async fn start(&self, start_heart: bool) -> Result<()> {
        let _lifecycle = self.shared.lifecycle.lock().await;
        if self.is_started() {
            return Err(ToozError::AlreadyStarted);
        }
        self.shared.driver.start().await?;
        self.shared.rejoin_pending.store(false, Ordering::SeqCst);
        let stop = CancellationToken::new();
        let mut tasks = Vec::new();
        let driver_lease = self.shared.driver.lease();
        let lease = match driver_lease {
            Some(l) => Some(l),
            None if self.shared.info.requires_beating => Some(LeaseState::new()),
            None => None,
        };
        if let Some(lease) = &lease {
            if start_heart && self.shared.info.requires_beating {
                tasks.push(tokio::spawn(heart_loop(
                    Arc::downgrade(&self.shared),
                    lease.clone(),
                    stop.clone(),
                )));
            }
            tasks.push(tokio::spawn(lease_monitor(
                Arc::downgrade(&self.shared),
                lease.clone(),
                stop.clone(),
            )));
        }
        self.shared.liveness.send_replace(Liveness::Alive);
        let mut run = lock(&self.shared.run);
        if run.started {
            stop.cancel();
            return Err(ToozError::AlreadyStarted);
        }
        run.started = true;
        run.stop = stop;
        run.joined.clear();
        run.tasks = tasks;
        run.lease = lease;
        Ok(())
    }

    /// Leaves every joined group, releases every held lock, gives up leaderships,
    /// stops the heartbeat and disconnects. Calls waiting in `acquire` return
    /// `Stopped`. A stopped coordinator can be started again.
    ///
    /// # Errors
    /// `NotStarted` if it was not started; errors while leaving and releasing are
    /// logged, not returned.
    pub async fn stop(&self) -> Result<()> {
        let _lifecycle = self.shared.lifecycle.lock().await;
        let (joined, tasks) = {
            let mut run = lock(&self.shared.run);
            if !run.started {
                return Err(ToozError::NotStarted);
            }
            run.started = false;
            run.stop.cancel();
            (
                std::mem::take(&mut run.joined),
                std::mem::take(&mut run.tasks),
            )
        };
        for t in tasks {
            let _ = t.await;
        }
        let d = &self.shared.driver;
        for g in joined.keys() {
            if let Err(e) = d.leave_group(g).await {
                tracing::debug!(group = %g, error = %e, "leave on stop failed");
            }
        }
        for l in self.shared.held_locks() {
            if let Err(e) = l.release_hold(true, None).await {
                tracing::warn!(error = %e, "releasing a lock on stop failed");
            }
        }
        let leading: Vec<(GroupId, Leading)> =
            lock(&self.shared.watchers).leading.drain().collect();
        for (g, l) in leading {
            drop(l);
            if let Err(e) = d.resign(&g).await {
                tracing::debug!(group = %g, error = %e, "resign on stop failed");
            }
            self.shared.publish(GroupEvent::LeadershipLost {
                group: g.clone(),
                member: self.shared.member_id.clone(),
            });
        }
        lock(&self.shared.streams).clear();
        lock(&self.shared.run).lease = None;
        d.stop().await
    }

    /// Renews liveness once (membership, held locks) and returns the time until the
    /// next heartbeat is due.
    ///
    /// # Errors
    /// `NotStarted`, or a backend error.
    ///
    /// A coordinator started without the heartbeat task keeps its lease state
    /// from these calls: a failure reports [`Liveness::AtRisk`], and the lease is
    /// declared [`Liveness::Lost`] when the deadline of the last successful call
    /// passes (see [`crate::lease`]).
    pub async fn heartbeat(&self) -> Result<Duration> {
        self.shared.ensure_started()?;
        let lease = lock(&self.shared.run).lease.clone();
        let sent = Instant::now();
        let res = self.shared.beat().await;
        if let Some(lease) = lease {
            match &res {
                Ok(ttl) => lease.renewed(sent, *ttl),
                Err(_) => lease.at_risk(),
            }
        }
        res
    }

    // ----- groups -------------------------------------------------------------

    /// Creates a group.
    ///
    /// # Errors
    /// `GroupAlreadyExist`, `InvalidId`, `NotStarted`, backend errors.
    pub async fn create_group(&self, group: impl Into<GroupId>) -> Result<()> {
        let g = self.shared.group(group)?;
        self.shared.driver.create_group(&g).await
    }

    /// Deletes an empty group.
    ///
    /// # Errors
    /// `GroupNotCreated`, `GroupNotEmpty`, backend errors.
    pub async fn delete_group(&self, group: impl Into<GroupId>) -> Result<()> {
        let g = self.shared.group(group)?;
        self.shared.driver.delete_group(&g).await
    }

    /// Lists the groups.
    ///
    /// # Errors
    /// `NotStarted`, backend errors.
    pub async fn get_groups(&self) -> Result<Vec<GroupId>> {
        self.shared.ensure_started()?;
        let mut v = self.shared.driver.get_groups().await?;
        v.sort();
        v.dedup();
        Ok(v)
    }

    // ----- membership ---------------------------------------------------------

    /// Joins a group with capabilities (any serde value; `&()` for none).
    ///
    /// # Errors
    /// `GroupNotCreated`, `MemberAlreadyExist` (also when another coordinator uses
    /// the same member id), `Serialization`, backend errors.
    pub async fn join_group<C: Serialize + ?Sized>(
        &self,
        group: impl Into<GroupId>,
        capabilities: &C,
    ) -> Result<()> {
        let caps = Capabilities::encode(capabilities)?;
        self.join_group_raw(group, caps).await
    }

    /// Joins with already-encoded capabilities.
    ///
    /// # Errors
    /// As [`Coordinator::join_group`].
    pub async fn join_group_raw(
        &self,
        group: impl Into<GroupId>,
        capabilities: Capabilities,
    ) -> Result<()> {
        let g = self.shared.group(group)?;
        self.shared.driver.join_group(&g, &capabilities).await?;
        lock(&self.shared.run).joined.insert(g, capabilities);
        Ok(())
    }

    /// Joins a group, creating it first if needed (no sleep, unlike tooz).
    ///
    /// # Errors
    /// As [`Coordinator::join_group`], except `GroupNotCreated`.
    pub async fn join_group_create<C: Serialize + ?Sized>(
        &self,
        group: impl Into<GroupId>,
        capabilities: &C,
    ) -> Result<()> {
        let caps = Capabilities::encode(capabilities)?;
        self.join_group_create_raw(group, caps).await
    }

    /// Like [`Coordinator::join_group_create`] with already-encoded capabilities.
    ///
    /// # Errors
    /// As [`Coordinator::join_group`], except `GroupNotCreated`.
    pub async fn join_group_create_raw(
        &self,
        group: impl Into<GroupId>,
        caps: Capabilities,
    ) -> Result<()> {
        let g = self.shared.group(group)?;
        let mut attempts = 0;
        loop {
            match self.join_group_raw(&g, caps.clone()).await {
                Err(ToozError::GroupNotCreated(_)) if attempts < 10 => {
                    attempts += 1;
                    match self.shared.driver.create_group(&g).await {
                        Ok(()) | Err(ToozError::GroupAlreadyExist(_)) => {}
                        Err(e) => return Err(e),
                    }
                }
                other => return other,
            }
        }
    }

    /// Leaves a group.
    ///
    /// # Errors
    /// `GroupNotCreated` (unknown group), `MemberNotJoined`, backend errors.
    pub async fn leave_group(&self, group: impl Into<GroupId>) -> Result<()> {
        let g = self.shared.group(group)?;
        let res = self.shared.driver.leave_group(&g).await;
        if matches!(res, Ok(()) | Err(ToozError::MemberNotJoined { .. })) {
            lock(&self.shared.run).joined.remove(&g);
        }
        res
    }

    /// The live members of a group.
    ///
    /// # Errors
    /// `GroupNotCreated`, backend errors.
    pub async fn get_members(&self, group: impl Into<GroupId>) -> Result<BTreeSet<MemberId>> {
        let g = self.shared.group(group)?;
        self.shared.driver.get_members(&g).await
    }

    /// One member's capabilities ([`Capabilities::decode`] them).
    ///
    /// # Errors
    /// `GroupNotCreated` (unknown group), `MemberNotJoined`, backend errors.
    pub async fn get_member_capabilities(
        &self,
        group: impl Into<GroupId>,
        member: impl Into<MemberId>,
    ) -> Result<Capabilities> {
        let g = self.shared.group(group)?;
        let m = member.into();
        m.validate()?;
        self.shared.driver.get_member_capabilities(&g, &m).await
    }

    /// Every live member with its capabilities, in one call.
    ///
    /// # Errors
    /// `GroupNotCreated`, backend errors.
    pub async fn get_members_with_capabilities(
        &self,
        group: impl Into<GroupId>,
    ) -> Result<BTreeMap<MemberId, Capabilities>> {
        let g = self.shared.group(group)?;
        Ok(self
            .shared
            .driver
            .get_members_with_capabilities(&g)
            .await?
            .into_iter()
            .collect())
    }

    /// Capabilities plus creation and update times.
    ///
    /// # Errors
    /// `GroupNotCreated` (unknown group), `MemberNotJoined`, backend errors.
    pub async fn get_member_info(
        &self,
        group: impl Into<GroupId>,
        member: impl Into<MemberId>,
    ) -> Result<MemberInfo> {
        let g = self.shared.group(group)?;
        let m = member.into();
        m.validate()?;
        self.shared.driver.get_member_info(&g, &m).await
    }

    /// Replaces this member's capabilities in a group.
    ///
    /// # Errors
    /// `GroupNotCreated` (unknown group), `MemberNotJoined`, backend errors.
    pub async fn update_capabilities<C: Serialize + ?Sized>(
        &self,
        group: impl Into<GroupId>,
        capabilities: &C,
    ) -> Result<()> {
        let g = self.shared.group(group)?;
        let caps = Capabilities::encode(capabilities)?;
        self.shared.driver.update_capabilities(&g, &caps).await?;
        if let Some(c) = lock(&self.shared.run).joined.get_mut(&g) {
            *c = caps;
        }
        Ok(())
    }

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

    async fn watch_members(
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

    fn unwatch_matching(
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
        let still_watched = w
            .hooks
            .iter()
            .any(|h| h.group == hook.group && h.kind != WatchKind::Elected)
            || w.partitioners
                .iter()
                .filter_map(Weak::upgrade)
                .any(|p| p.group == hook.group);
        if !still_watched {
            w.cache.remove(&hook.group);
        }
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

    async fn run_watchers_inner(&self) -> Result<Vec<GroupEvent>> {
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
    async fn campaign_once(&self, g: &GroupId) -> Result<(Option<Leadership>, Vec<GroupEvent>)> {
        let stop = self.shared.stop_token()?;
        let res = self.shared.driver.campaign(g).await?;
        if let Some(tok) = res {
            // Granted after `stop` began, or on a lease already declared lost: this
            // grant's loss signal could never fire, so it is given back.
            let refused = if stop.is_cancelled() {
                Some(ToozError::Stopped)
            } else if self.shared.lease_lost() {
                Some(ToozError::backend_msg(format!(
                    "leadership of group {g} was granted on a lease already declared lost"
                )))
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
        loop {
            let attempt = tokio::select! {
                r = self.campaign_once(&g) => r?.0,
                _ = stop.cancelled() => return Err(ToozError::Stopped),
            };
            if let Some(l) = attempt {
                return Ok(l);
            }
            let wait = async {
                match events.as_mut() {
                    Some(s) => {
                        let next = tokio::time::timeout(
                            self.shared.config.poll_interval * 2,
                            s.next_event(),
                        )
                        .await;
                        if let Ok(None) = next {
                            // The stream ended: poll from now on, instead of
                            // campaigning in a tight loop.
                            events = None;
                        }
                    }
                    None => tokio::time::sleep(self.shared.config.poll_interval).await,
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

    // ----- locks --------------------------------------------------------------

    /// A lock of this name. Each call returns an independent lock object.
    ///
    /// # Errors
    /// `InvalidId` for an empty, oversized or reserved name.
    pub fn get_lock(&self, name: impl Into<LockName>) -> Result<Lock> {
        let name = name.into();
        name.validate()?;
        let dl = self.shared.driver.lock(&name)?;
        Ok(Lock::new(name, dl, Arc::downgrade(&self.shared)))
    }

    // ----- partitioner --------------------------------------------------------

    /// Joins `group` (creating it if needed) with capabilities `{"weight": weight}`
    /// and returns a partitioner over its members.
    ///
    /// # Errors
    /// As [`Coordinator::join_group_create`].
    pub async fn join_partitioned_group(
        &self,
        group: impl Into<GroupId>,
        weight: u32,
        partitions: u32,
    ) -> Result<Partitioner> {
        let g = self.shared.group(group)?;
        self.join_group_create(&g, &BTreeMap::from([("weight", weight)]))
            .await?;
        Partitioner::new(self, g, partitions).await
    }

    /// Leaves the partitioner's group and stops the partitioner.
    ///
    /// # Errors
    /// As [`Coordinator::leave_group`].
    pub async fn leave_partitioned_group(&self, partitioner: Partitioner) -> Result<()> {
        let g = partitioner.group_id().clone();
        partitioner.stop();
        self.leave_group(g).await
    }

    pub(crate) async fn register_partitioner(&self, p: &Arc<PartitionerState>) -> Result<()> {
        let g = p.group.clone();
        let cached = lock(&self.shared.watchers).cache.contains_key(&g);
        let snapshot = if cached {
            None
        } else {
            Some(self.shared.driver.get_members(&g).await?)
        };
        let mut w = lock(&self.shared.watchers);
        if let Some(s) = snapshot {
            w.cache.entry(g).or_insert(s);
        }
        w.partitioners.push(Arc::downgrade(p));
        Ok(())
    }

    pub(crate) fn unregister_partitioner(&self, p: &PartitionerState) {
        let mut w = lock(&self.shared.watchers);
        w.partitioners.retain(|x| {
            x.upgrade()
                .is_some_and(|x| !std::ptr::eq(Arc::as_ptr(&x), p))
        });
        let still = w
            .hooks
            .iter()
            .any(|h| h.group == p.group && h.kind != WatchKind::Elected)
            || w.partitioners
                .iter()
                .filter_map(Weak::upgrade)
                .any(|x| x.group == p.group);
        if !still {
            w.cache.remove(&p.group);
        }
    }

    pub(crate) fn driver(&self) -> &Arc<dyn Driver> {
        &self.shared.driver
    }
}

impl Shared {
    fn ensure_started(&self) -> Result<()> {
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

    fn group(&self, group: impl Into<GroupId>) -> Result<GroupId> {
        let g = group.into();
        g.validate()?;
        self.ensure_started()?;
        Ok(g)
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

    fn held_locks(&self) -> Vec<Arc<LockInner>> {
        let mut locks = lock(&self.locks);
        locks.retain(|w| w.upgrade().is_some_and(|x| x.is_held()));
        locks.iter().filter_map(Weak::upgrade).collect()
    }

    fn publish(&self, ev: GroupEvent) {
        if let Some(tx) = lock(&self.streams).get(ev.group()) {
            let _ = tx.send(ev);
        }
    }

    async fn beat(&self) -> Result<Duration> {
        let joined: Vec<GroupId> = lock(&self.run).joined.keys().cloned().collect();
        let interval = self.driver.heartbeat(&joined).await?;
        for l in self.held_locks() {
            if let Err(e) = l.heartbeat().await {
                tracing::warn!(error = %e, "lock heartbeat failed");
            }
        }
        for g in self.driver.lost_leaderships() {
            let gone = lock(&self.watchers).leading.remove(&g);
            if gone.is_some() {
                tracing::info!(group = %g, "leadership lost (found gone by the heartbeat)");
                drop(gone);
                self.publish(GroupEvent::LeadershipLost {
                    group: g,
                    member: self.member_id.clone(),
                });
            }
        }
        self.beats.fetch_add(1, Ordering::Relaxed);
        Ok(interval)
    }

    /// Whether the lease is currently declared lost (holds granted now would have
    /// no loss signal).
    pub(crate) fn lease_lost(&self) -> bool {
        self.info.lease_bound_holds && *self.liveness.borrow() == Liveness::Lost
    }

    /// The lease is gone: signal every hold and leadership, then give back in the
    /// background whatever the backend may still have of them (ownership-checked).
    fn on_lost(&self) {
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
    fn spawn_rejoin(self: &Arc<Self>) {
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

    fn set_liveness(&self, new: Liveness) -> Liveness {
        // Only a change is sent: every successful beat reports `Alive`, and
        // receivers waiting on `changed()` must not wake for nothing.
        let mut old = new;
        self.liveness.send_if_modified(|v| {
            old = std::mem::replace(v, new);
            old != new
        });
        if new == Liveness::Lost && old != Liveness::Lost {
            self.on_lost();
        }
        old
    }
}

/// Renews the lease: every third of the TTL, each attempt cut off after a quarter
/// of it (so a renewal hung on a dead connection never delays the next one), retried
/// soon after a failure. It only reports to the lease state; [`lease_monitor`]
/// decides when the lease is lost.
async fn heart_loop(shared: Weak<Shared>, lease: LeaseState, stop: CancellationToken) {
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
            Ok(Ok(interval)) => {
                ttl = interval;
                lease.renewed(sent, interval);
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
async fn lease_monitor(shared: Weak<Shared>, lease: LeaseState, stop: CancellationToken) {
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
    let poll = match shared.upgrade() {
        Some(s) => s.config.poll_interval,
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
