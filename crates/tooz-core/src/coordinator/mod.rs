//! The [`Coordinator`]: what applications hold. Its parts: lifecycle, locks and
//! partitioners here; `membership` (groups, members, capabilities), `watchers`
//! (tooz callbacks), `leadership`, `events` (push streams) and `heart`
//! (heartbeat, lease monitor, loss handling).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

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

impl Watchers {
    /// Drops the member cache of `group` once no join/leave hook or partitioner
    /// follows it any more.
    fn forget_unwatched(&mut self, group: &GroupId) {
        let watched = self
            .hooks
            .iter()
            .any(|h| h.group == *group && h.kind != WatchKind::Elected)
            || self
                .partitioners
                .iter()
                .filter_map(Weak::upgrade)
                .any(|p| p.group == *group);
        if !watched {
            self.cache.remove(group);
        }
    }
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

impl Shared {
    /// The driver's name (metrics labels).
    pub(crate) fn driver_name(&self) -> &'static str {
        self.info.name
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
    /// Groups the heartbeat found lost by the backend and not yet re-joined:
    /// meanwhile our member missing from them is that loss, not a boot-out.
    restoring: Mutex<BTreeSet<GroupId>>,
    /// Serialises leaving groups (`leave_group`, `stop`) with re-joining them, so
    /// a re-join never brings back a membership its owner has just left.
    membership: tokio::sync::Mutex<()>,
    /// A task re-joining lost groups is running.
    restoring_now: AtomicBool,
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
        // Every backend operation gets a span and metrics (crate::observe).
        let driver = crate::observe::Observed::wrap(driver, member_id.clone());
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
                restoring: Mutex::new(BTreeSet::new()),
                membership: tokio::sync::Mutex::new(()),
                restoring_now: AtomicBool::new(false),
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
        let membership = self.shared.membership.lock().await;
        for g in joined.keys() {
            if let Err(e) = d.leave_group(g).await {
                tracing::debug!(group = %g, error = %e, "leave on stop failed");
            }
        }
        drop(membership);
        lock(&self.shared.restoring).clear();
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
    /// next heartbeat is due. Groups the backend is found to have lost this member
    /// from ([`Renewal::lost_groups`](crate::driver::Renewal::lost_groups)) are
    /// re-joined, with the member's last capabilities, before it returns.
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
                Ok((ttl, _)) => lease.renewed(sent, *ttl),
                Err(_) => lease.at_risk(),
            }
        }
        let (ttl, lost) = res?;
        if !lost.is_empty() {
            self.shared.restore_groups(lost).await;
        }
        Ok(ttl)
    }

    // ----- locks --------------------------------------------------------------

    /// A lock of this name. Each call returns an independent lock object.
    ///
    /// # Errors
    /// `InvalidId` for an empty, oversized or reserved name.
    pub fn get_lock(&self, name: impl Into<LockName>) -> Result<Lock> {
        let name = name.into();
        name.validate()?;
        self.shared
            .driver
            .check_id(crate::driver::IdRef::Lock(&name))?;
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
        w.forget_unwatched(&p.group);
    }

    pub(crate) fn driver(&self) -> &Arc<dyn Driver> {
        &self.shared.driver
    }
}

mod events;
mod heart;
use heart::{heart_loop, lease_monitor};
mod leadership;
mod membership;
mod watchers;
