//! Unit tests of the coordinator's lock, lease and leadership machinery, on an
//! in-memory test driver with controllable timing.

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};

use super::*;
use crate::capabilities::{Capabilities, MemberInfo};
use crate::coordinator::Coordinator;
use crate::driver::{Driver, DriverEventStream, DriverInfo, Liveness};
use crate::ids::{GroupId, MemberId};

type Hook = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// One lock name in memory: `held` counts grants not yet released; `hook`
/// runs inside `acquire` before the grant is returned.
#[derive(Default)]
struct Mem {
    held: AtomicU64,
    tokens: AtomicU64,
    hook: Mutex<Option<Hook>>,
    /// Set when a push stream of `watch_group` is dropped.
    push_dropped: Arc<std::sync::atomic::AtomicBool>,
    /// Session health this driver pushes (`None`: none).
    lease: Mutex<Option<crate::lease::LeaseState>>,
    /// Declares holds independent of the lease.
    independent: std::sync::atomic::AtomicBool,
    /// How `heartbeat` answers: 0 at once with `ttl_ms`, 1 never, 2 an error.
    beat_mode: std::sync::atomic::AtomicU8,
    /// The TTL `heartbeat` returns, in ms (0: 20 ms).
    ttl_ms: AtomicU64,
    /// The leader token `campaign` grants (0: none, someone else leads).
    leader_token: AtomicU64,
    /// What `lost_leaderships` reports next.
    lost_leaders: Mutex<Vec<GroupId>>,
    /// `resign` calls.
    resigns: AtomicU64,
    /// `heartbeat` reports every held lock lost.
    lose_locks: std::sync::atomic::AtomicBool,
    /// How many locks the last `heartbeat` was given.
    beat_locks: AtomicU64,
    /// Locks wait by themselves (`queues`), for ever, setting `wait_dropped` when
    /// their wait is dropped.
    queue: std::sync::atomic::AtomicBool,
    wait_dropped: Arc<std::sync::atomic::AtomicBool>,
    /// A queued wait fails once the driver is stopped (its session gone, as a
    /// Consul queue entry vanishes with the session), instead of waiting for ever.
    wait_fails_on_stop: std::sync::atomic::AtomicBool,
    /// Cancelled by the driver's `stop`.
    session_end: tokio_util::sync::CancellationToken,
}

/// A push source that never reports anything.
struct Silent(Arc<std::sync::atomic::AtomicBool>);

impl futures_util::Stream for Silent {
    type Item = crate::driver::DriverEvent;
    fn poll_next(
        self: Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        std::task::Poll::Pending
    }
}

impl Drop for Silent {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

struct MemLock {
    name: LockName,
    mem: Arc<Mem>,
    mine: Mutex<bool>,
}

#[async_trait::async_trait]
impl DriverLock for MemLock {
    fn name(&self) -> &LockName {
        &self.name
    }
    fn queues(&self) -> bool {
        self.mem.queue.load(Ordering::SeqCst)
    }
    async fn acquire(&self, _mode: Mode, _wait: Wait) -> Result<Option<FencingToken>> {
        struct Flag(Arc<std::sync::atomic::AtomicBool>);
        impl Drop for Flag {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let _flag = Flag(Arc::clone(&self.mem.wait_dropped));
        if self.mem.wait_fails_on_stop.load(Ordering::SeqCst) {
            self.mem.session_end.cancelled().await;
            return Err(ToozError::backend_msg(
                "mem",
                "the wait's queue entry vanished with the session",
            ));
        }
        std::future::pending().await
    }
    async fn try_acquire(&self, _mode: Mode) -> Result<crate::driver::Attempt> {
        let hook = self.mem.hook.lock().unwrap().clone();
        if let Some(h) = hook {
            h().await;
        }
        *self.mine.lock().unwrap() = true;
        self.mem.held.fetch_add(1, Ordering::SeqCst);
        Ok(crate::driver::Attempt::Granted(FencingToken(
            self.mem.tokens.fetch_add(1, Ordering::SeqCst) + 1,
        )))
    }
    async fn release(&self) -> Result<bool> {
        // A backend round trip: lets other tasks run meanwhile.
        tokio::task::yield_now().await;
        let was = std::mem::take(&mut *self.mine.lock().unwrap());
        if was {
            self.mem.held.fetch_sub(1, Ordering::SeqCst);
        }
        Ok(was)
    }
    async fn heartbeat(&self) -> Result<bool> {
        Ok(*self.mine.lock().unwrap())
    }
    async fn is_still_owner(&self) -> Result<bool> {
        Ok(*self.mine.lock().unwrap())
    }
    async fn break_lock(&self) -> Result<bool> {
        Ok(false)
    }
}

struct MemDriver(Arc<Mem>, bool);

impl fmt::Debug for MemDriver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MemDriver")
    }
}

impl fmt::Debug for MemLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MemLock")
    }
}

fn nope<T>() -> Result<T> {
    Err(ToozError::NotImplemented {
        driver: "mem".into(),
        operation: "groups".into(),
    })
}

#[async_trait::async_trait]
impl Driver for MemDriver {
    fn info(&self) -> DriverInfo {
        let info = DriverInfo::new("mem", &[], self.1);
        if self.0.independent.load(Ordering::SeqCst) {
            info.with_holds_independent_of_lease()
        } else {
            info
        }
    }
    async fn start(&self) -> Result<()> {
        Ok(())
    }
    async fn stop(&self) -> Result<()> {
        self.0.session_end.cancel();
        Ok(())
    }
    async fn heartbeat(&self, held: &crate::driver::Held<'_>) -> Result<crate::driver::Renewal> {
        let ttl = match self.0.beat_mode.load(Ordering::SeqCst) {
            1 => std::future::pending().await,
            2 => return Err(ToozError::backend_msg("mem", "unreachable")),
            _ => match self.0.ttl_ms.load(Ordering::SeqCst) {
                0 => Duration::from_millis(20),
                ms => Duration::from_millis(ms),
            },
        };
        let mut r = crate::driver::Renewal::new(ttl);
        self.0
            .beat_locks
            .store(held.locks.len() as u64, Ordering::SeqCst);
        if self.0.lose_locks.load(Ordering::SeqCst) {
            for i in 0..held.locks.len() {
                r.lose_lock(i);
            }
        }
        for g in std::mem::take(&mut *self.0.lost_leaders.lock().unwrap()) {
            r.lose_leadership(g);
        }
        Ok(r)
    }
    fn lease(&self) -> Option<crate::lease::LeaseState> {
        self.0.lease.lock().unwrap().clone()
    }
    async fn create_group(&self, _: &GroupId) -> Result<()> {
        nope()
    }
    async fn delete_group(&self, _: &GroupId) -> Result<()> {
        nope()
    }
    async fn get_groups(&self) -> Result<Vec<GroupId>> {
        nope()
    }
    async fn join_group(&self, _: &GroupId, _: &Capabilities) -> Result<()> {
        nope()
    }
    async fn leave_group(&self, _: &GroupId) -> Result<()> {
        nope()
    }
    async fn get_members(&self, _: &GroupId) -> Result<BTreeSet<MemberId>> {
        Ok(BTreeSet::new())
    }
    async fn get_member_capabilities(&self, _: &GroupId, _: &MemberId) -> Result<Capabilities> {
        nope()
    }
    async fn get_members_with_capabilities(
        &self,
        _: &GroupId,
    ) -> Result<Vec<(MemberId, Capabilities)>> {
        nope()
    }
    async fn get_member_info(&self, _: &GroupId, _: &MemberId) -> Result<MemberInfo> {
        nope()
    }
    async fn update_capabilities(&self, _: &GroupId, _: &Capabilities) -> Result<()> {
        nope()
    }
    async fn campaign(&self, _: &GroupId) -> Result<Option<FencingToken>> {
        let hook = self.0.hook.lock().unwrap().clone();
        if let Some(h) = hook {
            h().await;
        }
        Ok(match self.0.leader_token.load(Ordering::SeqCst) {
            0 => None,
            t => Some(FencingToken(t)),
        })
    }
    async fn resign(&self, _: &GroupId) -> Result<bool> {
        self.0.resigns.fetch_add(1, Ordering::SeqCst);
        Ok(true)
    }
    async fn get_leader(&self, _: &GroupId) -> Result<Option<MemberId>> {
        Ok(None)
    }
    fn lock(&self, name: &LockName) -> Result<Arc<dyn DriverLock>> {
        Ok(Arc::new(MemLock {
            name: name.clone(),
            mem: Arc::clone(&self.0),
            mine: Mutex::new(false),
        }))
    }
    async fn watch_group(&self, _: &GroupId) -> Result<Option<DriverEventStream>> {
        Ok(Some(Box::pin(Silent(Arc::clone(&self.0.push_dropped)))))
    }
}

/// A started coordinator whose locks wait by themselves (`queues`).
async fn queueing(mem: &Arc<Mem>) -> Coordinator {
    mem.queue.store(true, Ordering::SeqCst);
    let c = Coordinator::new(
        Arc::new(MemDriver(Arc::clone(mem), false)),
        "m".into(),
        "mem://",
    );
    c.start(false).await.unwrap();
    c
}

async fn coordinator() -> (Coordinator, Arc<Mem>) {
    let mem = Arc::new(Mem::default());
    let c = Coordinator::new(
        Arc::new(MemDriver(Arc::clone(&mem), false)),
        "m".into(),
        "mem://",
    );
    c.start(false).await.unwrap();
    (c, mem)
}

/// A lost lease signals lock loss, unless the driver's holds do not hang on it.
#[tokio::test]
async fn lease_loss_signals_holds_only_when_they_hang_on_it() {
    for independent in [false, true] {
        let mem = Arc::new(Mem::default());
        mem.independent.store(independent, Ordering::SeqCst);
        let lease = crate::lease::LeaseState::new();
        *mem.lease.lock().unwrap() = Some(lease.clone());
        let c = Coordinator::new(
            Arc::new(MemDriver(Arc::clone(&mem), false)),
            "m".into(),
            "mem://",
        );
        c.start(false).await.unwrap();
        let lock = c.get_lock("l").unwrap();
        assert!(lock.acquire(Wait::No).await.unwrap());
        let lost = lock.lost().unwrap();
        let mut live = c.liveness();
        lease.lost();
        live.wait_for(|l| *l == Liveness::Lost).await.unwrap();
        // The loss is signalled by the same step that reports `Lost`.
        assert_eq!(lost.is_lost(), !independent, "independent={independent}");
        c.stop().await.unwrap();
    }
}

/// A lease replaced behind a `Lost` the core never read still signals lock loss.
#[tokio::test]
async fn replaced_lease_signals_loss_without_an_observed_lost() {
    let mem = Arc::new(Mem::default());
    let lease = crate::lease::LeaseState::new();
    *mem.lease.lock().unwrap() = Some(lease.clone());
    let c = Coordinator::new(
        Arc::new(MemDriver(Arc::clone(&mem), false)),
        "m".into(),
        "mem://",
    );
    c.start(false).await.unwrap();
    let lock = c.get_lock("l").unwrap();
    assert!(lock.acquire(Wait::No).await.unwrap());
    let lost = lock.lost().unwrap();
    // No await in between: the monitor can only ever read the new lease.
    lease.lost();
    lease.replaced(Instant::now(), Duration::from_secs(30));
    lost.clone().lost().await;
    assert!(!lock.is_held(), "the lost hold was cleared");
    let mut live = c.liveness();
    live.wait_for(|l| *l == Liveness::Alive).await.unwrap();
    // A later update without a new lease is no loss: a new hold stays.
    let again = c.get_lock("l2").unwrap();
    assert!(again.acquire(Wait::No).await.unwrap());
    let kept = again.lost().unwrap();
    lease.at_risk();
    live.wait_for(|l| *l == Liveness::AtRisk).await.unwrap();
    lease.renewed(Instant::now(), Duration::from_secs(30));
    live.wait_for(|l| *l == Liveness::Alive).await.unwrap();
    assert!(!kept.is_lost());
    c.stop().await.unwrap();
}

const TTL: Duration = Duration::from_secs(8);

async fn beating(mem: &Arc<Mem>, heart: bool, config: crate::CoordinatorConfig) -> Coordinator {
    mem.ttl_ms.store(TTL.as_millis() as u64, Ordering::SeqCst);
    let c = Coordinator::with_config(
        Arc::new(MemDriver(Arc::clone(mem), true)),
        "m".into(),
        "mem://",
        config,
    );
    c.start(heart).await.unwrap();
    c
}

/// The loss fires at the send time of the last successful renewal plus the TTL
/// minus the margin, while the next renewal hangs (paused time: the instant is
/// exact).
#[tokio::test(start_paused = true)]
async fn loss_fires_at_the_deadline_while_a_renewal_hangs() {
    let mem = Arc::new(Mem::default());
    let c = beating(&mem, true, crate::CoordinatorConfig::default()).await;
    let mut live = c.liveness();
    while c.beats() == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let lock = c.get_lock("l").unwrap();
    assert!(lock.acquire(Wait::No).await.unwrap());
    let lost = lock.lost().unwrap();
    // From now on every renewal hangs; the last success was sent at `last`.
    mem.beat_mode.store(1, Ordering::SeqCst);
    let last = c.lease().unwrap().expires_no_earlier_than.unwrap() - TTL;
    live.wait_for(|l| *l == Liveness::AtRisk).await.unwrap();
    lost.clone().lost().await;
    let at = Instant::now() - last;
    // Margin: a quarter of 8 s, at most 2 s.
    assert_eq!(
        at,
        TTL - Duration::from_secs(2),
        "lost {at:?} after the last renewal was sent"
    );
    assert_eq!(*c.liveness().borrow(), Liveness::Lost);
    assert!(!lock.is_held());
    // Renewals succeed again: alive, and the lock stays given up.
    mem.beat_mode.store(0, Ordering::SeqCst);
    live.wait_for(|l| *l == Liveness::Alive).await.unwrap();
    assert!(!lock.is_held());
    c.stop().await.unwrap();
}

/// A configured margin moves the deadline; the at-risk-is-lost policy makes
/// the first failed renewal a loss.
#[tokio::test(start_paused = true)]
async fn margin_and_policy_are_honoured() {
    let mem = Arc::new(Mem::default());
    let config = crate::CoordinatorConfig {
        loss_margin: Some(Duration::from_millis(300)),
        ..Default::default()
    };
    let c = beating(&mem, false, config).await;
    let t0 = Instant::now();
    c.heartbeat().await.unwrap();
    assert_eq!(c.loss_margin(), Some(Duration::from_millis(300)));
    let mut live = c.liveness();
    live.wait_for(|l| *l == Liveness::Lost).await.unwrap();
    assert_eq!(Instant::now() - t0, TTL - Duration::from_millis(300));
    c.stop().await.unwrap();

    let mem = Arc::new(Mem::default());
    let config = crate::CoordinatorConfig {
        lease_policy: crate::LeasePolicy::AtRiskIsLost,
        ..Default::default()
    };
    let c = beating(&mem, false, config).await;
    c.heartbeat().await.unwrap();
    let lock = c.get_lock("l").unwrap();
    assert!(lock.acquire(Wait::No).await.unwrap());
    let t0 = Instant::now();
    mem.beat_mode.store(2, Ordering::SeqCst);
    assert!(c.heartbeat().await.is_err());
    lock.lost().unwrap().lost().await;
    assert_eq!(Instant::now(), t0, "lost as soon as a renewal failed");
    c.stop().await.unwrap();
}

/// Without the heartbeat task, manual heartbeats keep the lease: a failure is
/// `AtRisk`, the deadline of the last success is `Lost`.
#[tokio::test(start_paused = true)]
async fn manual_heartbeats_drive_the_lease() {
    let mem = Arc::new(Mem::default());
    let c = beating(&mem, false, crate::CoordinatorConfig::default()).await;
    let mut live = c.liveness();
    let t0 = Instant::now();
    c.heartbeat().await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    mem.beat_mode.store(2, Ordering::SeqCst);
    assert!(c.heartbeat().await.is_err());
    live.wait_for(|l| *l == Liveness::AtRisk).await.unwrap();
    live.wait_for(|l| *l == Liveness::Lost).await.unwrap();
    assert_eq!(Instant::now() - t0, TTL - Duration::from_secs(2));
    mem.beat_mode.store(0, Ordering::SeqCst);
    c.heartbeat().await.unwrap();
    live.wait_for(|l| *l == Liveness::Alive).await.unwrap();
    c.stop().await.unwrap();
}

/// The heartbeat is handed every hold at once; a hold it reports lost is
/// signalled and given up.
#[tokio::test(start_paused = true)]
async fn heartbeat_renews_every_hold_and_reports_losses() {
    let mem = Arc::new(Mem::default());
    let c = beating(&mem, false, crate::CoordinatorConfig::default()).await;
    let locks: Vec<Lock> = (0..3)
        .map(|i| c.get_lock(format!("l{i}")).unwrap())
        .collect();
    for l in &locks {
        assert!(l.acquire(Wait::No).await.unwrap());
    }
    c.heartbeat().await.unwrap();
    assert_eq!(
        mem.beat_locks.load(Ordering::SeqCst),
        3,
        "one call with every hold"
    );
    assert!(locks.iter().all(Lock::is_held));
    mem.lose_locks.store(true, Ordering::SeqCst);
    c.heartbeat().await.unwrap();
    for l in &locks {
        assert!(!l.is_held(), "a hold the heartbeat found gone is given up");
    }
    c.stop().await.unwrap();
}

/// Leaderships carry a loss signal: a lease loss, a heartbeat finding the
/// leadership gone, standing down; a grant that arrives after `stop` began is
/// given back.
#[tokio::test(start_paused = true)]
async fn leaderships_signal_their_loss() {
    let mem = Arc::new(Mem::default());
    mem.leader_token.store(7, Ordering::SeqCst);
    let c = beating(&mem, false, crate::CoordinatorConfig::default()).await;
    c.heartbeat().await.unwrap();
    let l = c.become_leader("g").await.unwrap();
    assert_eq!(l.token(), FencingToken(7));
    assert!(!l.is_lost());
    // The heartbeat finds it gone.
    mem.lost_leaders.lock().unwrap().push(GroupId::from("g"));
    c.heartbeat().await.unwrap();
    assert!(l.is_lost());
    assert!(c.leadership("g").is_none());
    // Re-elected; then the lease deadline passes.
    let l2 = c.become_leader("g").await.unwrap();
    let t = Instant::now();
    l2.lost().lost().await;
    assert!(Instant::now() - t <= TTL - Duration::from_secs(2));
    assert!(
        mem.resigns.load(Ordering::SeqCst) >= 1,
        "the lost leadership was given back"
    );
    c.heartbeat().await.unwrap();
    let mut live = c.liveness();
    live.wait_for(|l| *l == Liveness::Alive).await.unwrap();
    // Standing down.
    let l3 = c.become_leader("g").await.unwrap();
    assert!(c.stand_down_group_leader("g").await.unwrap());
    assert!(l3.is_lost());
    // A grant racing `stop`.
    let resigns = mem.resigns.load(Ordering::SeqCst);
    let gate = Arc::new(tokio::sync::Notify::new());
    let g2 = Arc::clone(&gate);
    *mem.hook.lock().unwrap() = Some(Arc::new(move || {
        let g = Arc::clone(&g2);
        Box::pin(async move { g.notified().await })
    }));
    let c2 = c.clone();
    let campaign = tokio::spawn(async move { c2.try_become_leader("g").await });
    tokio::task::yield_now().await;
    let stopping = tokio::spawn({
        let c = c.clone();
        async move { c.stop().await }
    });
    tokio::task::yield_now().await;
    gate.notify_one();
    let r = campaign.await.unwrap();
    assert!(matches!(r, Err(ToozError::Stopped)), "{r:?}");
    stopping.await.unwrap().unwrap();
    assert!(
        mem.resigns.load(Ordering::SeqCst) > resigns,
        "the late grant was given back"
    );
}

/// Dropping every handle of a held lock releases it.
#[tokio::test]
async fn dropping_a_held_lock_releases_it() {
    let (c, mem) = coordinator().await;
    let lock = c.get_lock("l").unwrap();
    assert!(lock.acquire(Wait::No).await.unwrap());
    assert_eq!(mem.held.load(Ordering::SeqCst), 1);
    drop(lock);
    for _ in 0..50 {
        if mem.held.load(Ordering::SeqCst) == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(
        mem.held.load(Ordering::SeqCst),
        0,
        "a dropped lock stayed held"
    );
    c.stop().await.unwrap();
}

/// A shared acquisition whose caller went away must give back only its own
/// count, not that of another handle that joined the hold meanwhile.
#[tokio::test]
async fn dropped_shared_acquire_keeps_other_shared_holds() {
    for _ in 0..20 {
        let (c, mem) = coordinator().await;
        let lock = c.get_lock("l").unwrap();
        let gate = Arc::new(Notify::new());
        let g = Arc::clone(&gate);
        *mem.hook.lock().unwrap() = Some(Arc::new(move || {
            let g = Arc::clone(&g);
            Box::pin(async move { g.notified().await })
        }));
        let first = tokio::spawn({
            let lock = lock.clone();
            async move { lock.acquire_shared(Wait::Forever).await }
        });
        tokio::task::yield_now().await;
        let second = tokio::spawn({
            let lock = lock.clone();
            async move { lock.acquire_shared(Wait::Forever).await }
        });
        tokio::task::yield_now().await;
        *mem.hook.lock().unwrap() = None;
        first.abort();
        let _ = first.await;
        gate.notify_waiters();
        assert!(second.await.unwrap().unwrap());
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(lock.is_held(), "the second shared hold was released");
        assert_eq!(mem.held.load(Ordering::SeqCst), 1);
        assert!(lock.release().await.unwrap());
        assert_eq!(mem.held.load(Ordering::SeqCst), 0);
        c.stop().await.unwrap();
    }
}

/// The backend grants the lock while `stop` runs: the caller gets `Stopped`
/// and nothing stays held.
#[tokio::test]
async fn grant_racing_stop_is_released() {
    for _ in 0..20 {
        let (c, mem) = coordinator().await;
        let lock = c.get_lock("l").unwrap();
        let stopper = c.clone();
        *mem.hook.lock().unwrap() = Some(Arc::new(move || {
            let c = stopper.clone();
            // `stop` completes (finding nothing held) before the grant returns.
            Box::pin(async move {
                tokio::spawn(async move { c.stop().await.unwrap() })
                    .await
                    .unwrap();
            })
        }));
        let res = lock.acquire(Wait::Forever).await;
        assert!(matches!(res, Err(ToozError::Stopped)), "{res:?}");
        assert!(!lock.is_held());
        assert_eq!(mem.held.load(Ordering::SeqCst), 0, "leaked after stop");
    }
}

/// A guard of an earlier hold (released by `stop`) must not release a later
/// hold of the same lock object, whether dropped or released explicitly.
#[tokio::test]
async fn stale_guard_leaves_a_later_hold_alone() {
    let (c, mem) = coordinator().await;
    let lock = c.get_lock("l").unwrap();
    let g1 = lock.guard(Wait::No).await.unwrap().unwrap();
    let g2 = lock.guard_with(Mode::Exclusive, Wait::No).await.unwrap();
    assert!(g2.is_none());
    c.stop().await.unwrap();
    assert!(!lock.is_held());
    c.start(false).await.unwrap();
    assert!(lock.acquire(Wait::No).await.unwrap());
    let t2 = lock.fencing_token().unwrap();
    assert!(t2 > g1.token());
    assert!(g1.lost().is_lost(), "g1's hold is gone");
    assert!(!lock.lost().unwrap().is_lost());
    drop(g1);
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert_eq!(lock.fencing_token(), Some(t2));
    assert_eq!(mem.held.load(Ordering::SeqCst), 1);
    assert!(lock.release().await.unwrap());

    let g3 = lock.guard(Wait::No).await.unwrap().unwrap();
    c.stop().await.unwrap();
    c.start(false).await.unwrap();
    assert!(lock.acquire(Wait::No).await.unwrap());
    assert!(!g3.release().await.unwrap());
    assert!(lock.is_held());
    assert!(lock.release().await.unwrap());
    assert_eq!(mem.held.load(Ordering::SeqCst), 0);
    c.stop().await.unwrap();
}

/// The acquire future is dropped after the grant was sent to it but before it
/// read it (a `select!` whose other branch won): the hold must not leak.
#[tokio::test]
async fn grant_sent_to_a_dropped_acquire_is_released() {
    let (c, mem) = coordinator().await;
    let lock = c.get_lock("l").unwrap();
    {
        let mut fut = Box::pin(lock.acquire(Wait::Forever));
        // One poll: the acquire task is spawned and the future waits for it.
        assert!(futures_util::poll!(fut.as_mut()).is_pending());
        // The task runs, is granted and sends the result...
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(mem.held.load(Ordering::SeqCst), 1);
        // ...which nobody reads.
    }
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert!(!lock.is_held(), "the unread grant is still held");
    assert_eq!(mem.held.load(Ordering::SeqCst), 0, "leaked");
    c.stop().await.unwrap();
}

/// A huge `Wait::For` waits (like `Forever`) instead of panicking.
#[tokio::test]
async fn huge_wait_does_not_panic() {
    let (c, _mem) = coordinator().await;
    let lock = c.get_lock("l").unwrap();
    assert!(lock.acquire(Wait::For(Duration::MAX)).await.unwrap());
    let other = c.get_lock("l").unwrap();
    // The in-memory backend does not exclude: check the local gate instead.
    let same = lock.clone();
    let waiter = tokio::spawn(async move { same.acquire(Wait::For(Duration::MAX)).await });
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(!waiter.is_finished());
    c.stop().await.unwrap();
    assert!(matches!(waiter.await.unwrap(), Err(ToozError::Stopped)));
    drop(other);
}

/// Successful heartbeats keep reporting `Alive`, which is no change: a
/// liveness receiver must not wake for them.
#[tokio::test]
async fn steady_heartbeats_do_not_signal_liveness_changes() {
    let mem = Arc::new(Mem::default());
    let c = Coordinator::new(Arc::new(MemDriver(mem, true)), "m".into(), "mem://");
    c.start(true).await.unwrap();
    let mut rx = c.liveness();
    rx.borrow_and_update();
    let before = c.beats();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(c.beats() >= before + 3, "the heart beats");
    assert!(!rx.has_changed().unwrap(), "no change was signalled");
    assert_eq!(*rx.borrow(), Liveness::Alive);
    c.stop().await.unwrap();
}

/// A group stream whose receivers are all gone stops its task (and drops the
/// driver's push source) even if the backend never reports anything; a new
/// `events` call then gets a live stream.
#[tokio::test]
async fn unused_group_stream_task_ends_without_events() {
    let (c, mem) = coordinator().await;
    let s1 = c.events("g").await.unwrap();
    let s2 = c.events("g").await.unwrap();
    drop(s1);
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(
        !mem.push_dropped.load(Ordering::SeqCst),
        "one receiver is left"
    );
    drop(s2);
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(
        mem.push_dropped.load(Ordering::SeqCst),
        "the task still runs"
    );
    mem.push_dropped.store(false, Ordering::SeqCst);
    let mut s3 = c.events("g").await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(50), s3.next_event())
            .await
            .is_err(),
        "a fresh stream is open"
    );
    c.stop().await.unwrap();
    assert_eq!(s3.next_event().await, None, "stop ends the stream");
    assert!(mem.push_dropped.load(Ordering::SeqCst));
}

/// A zero event buffer is taken as 1 instead of panicking in `events`.
#[tokio::test]
async fn zero_event_buffer_does_not_panic() {
    let config = crate::coordinator::CoordinatorConfig {
        event_buffer: 0,
        ..Default::default()
    };
    let c = Coordinator::with_config(
        Arc::new(MemDriver(Arc::new(Mem::default()), false)),
        "m".into(),
        "mem://",
        config,
    );
    c.start(false).await.unwrap();
    let _events = c.events("g").await.unwrap();
    c.stop().await.unwrap();
}

/// A caller that drops its `acquire` future ends a queueing driver's wait (the wait
/// is not left running until a grant that nobody wants).
#[tokio::test]
async fn dropped_acquire_ends_a_queued_wait() {
    let mem = Arc::new(Mem::default());
    let c = queueing(&mem).await;
    let lock = c.get_lock("l").unwrap();
    let waited = tokio::time::timeout(
        std::time::Duration::from_millis(50),
        lock.acquire(Wait::Forever),
    )
    .await;
    assert!(waited.is_err(), "the wait cannot end by itself");
    for _ in 0..100 {
        if mem.wait_dropped.load(Ordering::SeqCst) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert!(
        mem.wait_dropped.load(Ordering::SeqCst),
        "the driver's wait outlived its caller"
    );
    c.stop().await.unwrap();
}

/// `stop` ends the driver's session after it cancelled the coordinator's waits; a
/// queued wait that fails because of that (both ready before the waiting task next
/// runs, as on a busy machine) still reports `Stopped`, not the driver's error.
#[tokio::test]
async fn queued_wait_failing_because_of_stop_is_stopped() {
    let mem = Arc::new(Mem::default());
    mem.wait_fails_on_stop.store(true, Ordering::SeqCst);
    let c = queueing(&mem).await;
    // Several waits: on this single-threaded runtime none runs between the
    // cancellation and the session's end inside `stop`, so each task finds both
    // its wait's error and the stop ready, and each chooses between them.
    let waiters: Vec<_> = (0..16)
        .map(|i| {
            let lock = c.get_lock(format!("l{i}")).unwrap();
            tokio::spawn(async move { lock.acquire(Wait::Forever).await })
        })
        .collect();
    // Every waiter reaches the driver's wait.
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    c.stop().await.unwrap();
    for w in waiters {
        let r = w.await.unwrap();
        assert!(
            matches!(r, Err(ToozError::Stopped)),
            "a wait ended by stop returned {r:?}"
        );
    }
}
