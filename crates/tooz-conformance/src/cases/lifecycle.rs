//! Start/stop and cancellation (tooz `test_get_started_status`, `test_stop_first`),
//! plus DESIGN §5a: `stop()` releases locks, leaves groups, wakes waiters with
//! `Stopped` and fires loss signals; dropping an acquire future leaks nothing,
//! even when it is dropped the instant the backend grants it or while its request
//! is still in flight (a queue entry, a write not yet answered); dropping a guard
//! releases.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};

use super::prelude::*;

pub(crate) async fn started_status(h: &Harness) -> CaseResult {
    let c = h.connect(h.member("a")).ctx("connect")?;
    ensure!(!c.is_started(), "is_started() before start");
    c.start(true).await.ctx("start")?;
    ensure!(c.is_started(), "is_started() false after start");
    c.stop().await.ctx("stop")?;
    ensure!(!c.is_started(), "is_started() true after stop");
    Ok(())
}

pub(crate) async fn stop_before_start_is_not_started(h: &Harness) -> CaseResult {
    let c = h.connect(h.member("a")).ctx("connect")?;
    expect_err!(
        c.stop().await,
        ToozError::NotStarted,
        "stop of a never-started coordinator"
    );
    Ok(())
}

pub(crate) async fn start_twice_is_already_started(h: &Harness) -> CaseResult {
    let c = h.started(h.member("a")).await?;
    expect_err!(
        c.start(true).await,
        ToozError::AlreadyStarted,
        "second start"
    );
    ensure!(
        c.is_started(),
        "the failed second start stopped the coordinator"
    );
    Ok(())
}

pub(crate) async fn calls_before_start_are_not_started(h: &Harness) -> CaseResult {
    let c = h.connect(h.member("a")).ctx("connect")?;
    let g = h.group("g");
    expect_err!(
        c.get_groups().await,
        ToozError::NotStarted,
        "get_groups before start"
    );
    expect_err!(
        c.create_group(&g).await,
        ToozError::NotStarted,
        "create_group before start"
    );
    expect_err!(
        c.join_group(&g, &()).await,
        ToozError::NotStarted,
        "join_group before start"
    );
    expect_err!(
        c.heartbeat().await,
        ToozError::NotStarted,
        "heartbeat before start"
    );
    expect_err!(
        c.events(&g).await,
        ToozError::NotStarted,
        "events before start"
    );
    let l = c
        .get_lock(h.lock_name("lock"))
        .ctx("get_lock before start")?;
    expect_err!(
        l.acquire(Wait::No).await,
        ToozError::NotStarted,
        "acquire before start"
    );
    Ok(())
}

pub(crate) async fn restart_after_stop(h: &Harness) -> CaseResult {
    let c = h.started(h.member("a")).await?;
    let g = h.group("g");
    c.join_group_create(&g, &())
        .await
        .ctx("join_group_create")?;
    c.stop().await.ctx("stop")?;
    c.start(true).await.ctx("start again")?;
    ensure!(
        c.joined_groups().is_empty(),
        "joined_groups() after a restart: {:?}",
        c.joined_groups()
    );
    c.join_group(&g, &())
        .await
        .ctx("join_group after restart")?;
    ensure!(
        c.get_members(&g)
            .await
            .ctx("get_members")?
            .contains(c.member_id()),
        "member not listed after re-joining"
    );
    let l = c.get_lock(h.lock_name("lock")).ctx("get_lock")?;
    ensure!(
        l.acquire(Wait::No).await.ctx("acquire after restart")?,
        "acquire after restart returned false"
    );
    ensure!(l.release().await.ctx("release")?, "release returned false");
    Ok(())
}

pub(crate) async fn stop_releases_locks(h: &Harness) -> CaseResult {
    let a = h.started(h.member("a")).await?;
    let b = h.started(h.member("b")).await?;
    let (n1, n2) = (h.lock_name("one"), h.lock_name("two"));
    let l1 = a.get_lock(&n1).ctx("get_lock")?;
    let l2 = a.get_lock(&n2).ctx("get_lock")?;
    ensure!(
        l1.acquire(Wait::No).await.ctx("acquire one")?,
        "acquire one returned false"
    );
    ensure!(
        l2.acquire_shared(Wait::No)
            .await
            .ctx("acquire two shared")?,
        "shared acquire two returned false"
    );
    a.stop().await.ctx("stop")?;
    ensure!(
        !l1.is_held() && !l2.is_held(),
        "lock objects still report holds after stop"
    );
    for n in [&n1, &n2] {
        let l = b.get_lock(n).ctx("get_lock")?;
        ensure!(
            l.acquire(Wait::No)
                .await
                .ctx("acquire after the holder stopped")?,
            "{n} still held right after its holder stopped"
        );
        ensure!(l.release().await.ctx("release")?, "release returned false");
    }
    Ok(())
}

pub(crate) async fn stop_leaves_groups(h: &Harness) -> CaseResult {
    let a = h.started(h.member("a")).await?;
    let b = h.started(h.member("b")).await?;
    let (g1, g2) = (h.group("one"), h.group("two"));
    for g in [&g1, &g2] {
        a.join_group_create(g, &()).await.ctx("join_group_create")?;
    }
    a.stop().await.ctx("stop")?;
    for g in [&g1, &g2] {
        let members = b.get_members(g).await.ctx("get_members")?;
        ensure!(
            !members.contains(a.member_id()),
            "a stopped member is still listed in {g}: {members:?}"
        );
    }
    Ok(())
}

pub(crate) async fn stop_wakes_waiter_with_stopped(h: &Harness) -> CaseResult {
    let a = h.started(h.member("a")).await?;
    let b = h.started(h.member("b")).await?;
    let c = h.started(h.member("c")).await?;
    let name = h.lock_name("lock");
    let la = a.get_lock(&name).ctx("get_lock")?;
    ensure!(
        la.acquire(Wait::No).await.ctx("a acquire")?,
        "a acquire returned false"
    );
    let waiter = {
        let lb = b.get_lock(&name).ctx("get_lock")?;
        tokio::spawn(async move { (lb.acquire(Wait::Forever).await, Instant::now()) })
    };
    let lc = c.get_lock(&name).ctx("get_lock")?;
    // b's waiter gets 300 ms to start waiting; meanwhile the lock stays held (c
    // cannot take it either) and b's acquire does not return.
    ensure!(
        !lc.acquire(Wait::For(Duration::from_millis(300)))
            .await
            .ctx("c acquire while a holds")?,
        "c acquired while a holds"
    );
    ensure!(!waiter.is_finished(), "b acquired while a holds");
    let t0 = Instant::now();
    b.stop().await.ctx("b stop")?;
    let (r, at) = tokio::time::timeout(PROMPT, waiter)
        .await
        .ctx("the waiter after stop()")?
        .map_err(|e| CaseError::Failed(format!("waiter task: {e}")))?;
    expect_err!(
        r,
        ToozError::Stopped,
        "acquire waiting while its coordinator stopped"
    );
    let took = at.saturating_duration_since(t0);
    ensure!(
        took < Duration::from_secs(2),
        "the waiter took {took:?} to see the stop"
    );
    ensure!(
        la.release().await.ctx("a release")?,
        "a release returned false"
    );
    // Shorter than the lease: a hold the stopped waiter left behind would still be
    // there (where nothing renews it, it would expire only after the lease).
    let leftover = h.lease() / 2;
    ensure!(
        lc.acquire(Wait::For(leftover)).await.ctx("c acquire")?,
        "the stopped waiter left the lock held (c waited {leftover:?} after a released)"
    );
    ensure!(
        lc.release().await.ctx("c release")?,
        "c release returned false"
    );
    Ok(())
}

/// When `dropped_acquire_does_not_leak` drops the waiting acquire future.
#[derive(Debug, Clone, Copy)]
enum DropAt {
    /// At its first wake-up once the holder's release is under way: the moment
    /// the grant (or any news) reaches the future, before it can read it.
    FirstWake,
    /// This long after the holder's release returned (the grant may be on its way,
    /// done, or not yet made).
    After(Duration),
}

/// The rounds of `dropped_acquire_does_not_leak`: the grant-at-drop window hit
/// exactly, and drops spread over the milliseconds around the grant.
const DROPS: [DropAt; 12] = [
    DropAt::FirstWake,
    DropAt::After(Duration::ZERO),
    DropAt::FirstWake,
    DropAt::After(Duration::from_millis(1)),
    DropAt::FirstWake,
    DropAt::After(Duration::from_millis(2)),
    DropAt::FirstWake,
    DropAt::After(Duration::from_millis(5)),
    DropAt::FirstWake,
    DropAt::After(Duration::from_millis(10)),
    DropAt::FirstWake,
    DropAt::After(Duration::from_millis(20)),
];

/// Records wake-ups of the future [`drop_on_wake`] drives and passes them on.
#[derive(Default)]
struct WakeFlag {
    woken: AtomicBool,
    outer: std::sync::Mutex<Option<Waker>>,
}

impl Wake for WakeFlag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::SeqCst);
        if let Some(w) = self
            .outer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            w.wake_by_ref();
        }
    }
}

/// Drives `fut` to completion (`Some`), unless it is woken once `armed` is set:
/// then it is dropped at once, without being polled again (`None`).
async fn drop_on_wake<F: Future>(fut: F, armed: Arc<AtomicBool>) -> Option<F::Output> {
    let flag = Arc::new(WakeFlag::default());
    let waker = Waker::from(Arc::clone(&flag));
    let mut fut = Box::pin(fut);
    std::future::poll_fn(move |cx| {
        *flag.outer.lock().unwrap_or_else(|p| p.into_inner()) = Some(cx.waker().clone());
        if flag.woken.swap(false, Ordering::SeqCst) && armed.load(Ordering::SeqCst) {
            return Poll::Ready(None);
        }
        fut.as_mut()
            .poll(&mut Context::from_waker(&waker))
            .map(Some)
    })
    .await
}

pub(crate) async fn dropped_acquire_does_not_leak(h: &Harness) -> CaseResult {
    let a = h.started(h.member("a")).await?;
    let b = h.started(h.member("b")).await?;
    let c = h.started(h.member("c")).await?;
    // Shorter than the lease: a leaked hold (granted by the backend, never handed
    // to anyone) would still be there; where nothing renews it, it would expire
    // only after the lease, and where the session keeps it, never.
    let leftover = h.lease() / 2;
    let mut dropped = 0;
    for (round, at) in DROPS.into_iter().enumerate() {
        // A lock per round: an abandoned acquisition of an earlier round (which
        // may still be contending in the background) cannot interfere.
        let name = h.lock_name(&format!("lock{round}"));
        let la = a.get_lock(&name).ctx("get_lock")?;
        let lb = b.get_lock(&name).ctx("get_lock")?;
        let lc = c.get_lock(&name).ctx("get_lock")?;
        ensure!(
            la.acquire(Wait::No).await.ctx("a acquire")?,
            "round {round}: a acquire returned false"
        );
        let armed = Arc::new(AtomicBool::new(false));
        let mut waiter = {
            let (lb, armed) = (lb.clone(), Arc::clone(&armed));
            tokio::spawn(drop_on_wake(
                async move { lb.acquire(Wait::Forever).await },
                armed,
            ))
        };
        // The waiter gets 100 ms to start waiting; the lock stays held meanwhile.
        ensure!(
            !lc.acquire(Wait::For(Duration::from_millis(100)))
                .await
                .ctx("c acquire while a holds")?,
            "round {round}: c acquired while a holds"
        );
        ensure!(
            !waiter.is_finished(),
            "round {round}: b's acquire returned while a holds"
        );
        let released = match at {
            DropAt::FirstWake => {
                armed.store(true, Ordering::SeqCst);
                la.release().await
            }
            DropAt::After(d) => {
                let r = la.release().await;
                tokio::time::sleep(d).await;
                waiter.abort();
                r
            }
        };
        ensure!(
            released.ctx("a release")?,
            "round {round}: a release returned false"
        );
        let Ok(joined) = tokio::time::timeout(PROMPT, &mut waiter).await else {
            waiter.abort();
            fail!(
                "round {round}: b's waiting acquire saw nothing within {PROMPT:?} of the release"
            );
        };
        let finished = match joined {
            Ok(Some(r)) => Some(r.ctx("b acquire")?),
            Ok(None) => None,
            Err(e) if e.is_cancelled() => None,
            Err(e) => fail!("round {round}: waiter task: {e}"),
        };
        match finished {
            // The acquire finished before the drop: not the race, but its hold
            // is b's to release.
            Some(true) => ensure!(
                lb.release().await.ctx("b release")?,
                "round {round}: b release returned false"
            ),
            Some(false) => fail!("round {round}: b's blocking acquire returned false"),
            None => dropped += 1,
        }
        ensure!(
            lc.acquire(Wait::For(leftover))
                .await
                .ctx("c acquire after the drop")?,
            "round {round}: the lock stayed held {leftover:?} after b's acquire future was dropped ({at:?}): a leaked hold"
        );
        // c holds it now, so whatever b's dropped acquire was granted has been
        // given back (a grant found at the drop is released in the background, so
        // b's object may report it for an instant right after the drop).
        ensure!(
            !lb.is_held(),
            "round {round}: b's lock object reports a hold its dropped acquire ({at:?}) never returned"
        );
        ensure!(
            lc.release().await.ctx("c release")?,
            "round {round}: c release returned false"
        );
        // The lock object whose acquire was dropped is usable again.
        ensure!(
            lb.acquire(Wait::For(leftover))
                .await
                .ctx("b acquire again")?,
            "round {round}: b's lock object could not acquire the free lock after its dropped acquire ({at:?})"
        );
        ensure!(
            lb.release().await.ctx("b release")?,
            "round {round}: b release returned false"
        );
    }
    ensure!(
        dropped * 2 >= DROPS.len(),
        "only {dropped} of {} acquire futures were dropped before they finished: the race was not exercised",
        DROPS.len()
    );
    Ok(())
}

/// Runs `fut` and drops it once `delay` has passed; `Some` if it finished first. The
/// deadline is watched by yielding to the scheduler until then (busy, but precise to
/// microseconds: an acquire on a fast backend takes tens of them, far below tokio's
/// millisecond timer).
async fn drop_after<T>(delay: Duration, fut: impl Future<Output = T>) -> Option<T> {
    let deadline = Instant::now() + delay;
    let expired = async {
        while Instant::now() < deadline {
            tokio::task::yield_now().await;
        }
    };
    tokio::select! {
        biased;
        r = fut => Some(r),
        () = expired => None,
    }
}

/// Acquires of [`acquire_dropped_in_flight_leaves_no_hold`], half of them contended.
const IN_FLIGHT_DROPS: usize = 96;

pub(crate) async fn acquire_dropped_in_flight_leaves_no_hold(h: &Harness) -> CaseResult {
    let a = h.started(h.member("a")).await?;
    let b = h.started(h.member("b")).await?;
    // As in `dropped_acquire_does_not_leak`: a leaked hold would outlast this.
    let leftover = h.lease() / 2;
    // How long an uncontended acquire takes here: the drops are spread over it.
    let mut took = Vec::new();
    for i in 0..5 {
        let l = a
            .get_lock(h.lock_name(&format!("warm{i}")))
            .ctx("get_lock")?;
        let start = Instant::now();
        ensure!(
            l.acquire(Wait::No).await.ctx("warm-up acquire")?,
            "a warm-up acquire of a free lock returned false"
        );
        took.push(start.elapsed());
        ensure!(l.release().await.ctx("release")?, "release returned false");
    }
    took.sort();
    let typical = took[took.len() / 2];
    let mut names = Vec::with_capacity(IN_FLIGHT_DROPS);
    let mut dropped = 0;
    for i in 0..IN_FLIGHT_DROPS {
        // Even attempts are free locks: the drop lands while the request is on its
        // way, being served, or its grant on the way back (0 to 1.2 typical
        // acquires). Odd ones wait behind b's hold: the drop lands while the waiter
        // registers or waits (0 to 2.4), and b releases after it.
        let contended = i % 2 == 1;
        let steps = (IN_FLIGHT_DROPS / 2) as u32;
        let span = if contended {
            typical * 12 / 5
        } else {
            typical * 6 / 5
        };
        let delay = span * (i / 2) as u32 / steps;
        let name = h.lock_name(&format!("inflight{i}"));
        let la = a.get_lock(&name).ctx("get_lock")?;
        let lb = b.get_lock(&name).ctx("get_lock")?;
        if contended {
            ensure!(
                lb.acquire(Wait::No).await.ctx("b acquire")?,
                "attempt {i}: b could not take a free lock"
            );
        }
        match drop_after(delay, la.acquire(Wait::Forever)).await {
            Some(Ok(true)) => {
                ensure!(
                    !contended,
                    "attempt {i}: a's acquire returned true while b held the lock"
                );
                ensure!(
                    la.release().await.ctx("a release")?,
                    "attempt {i}: a release returned false"
                );
            }
            Some(Ok(false)) => fail!("attempt {i}: a's blocking acquire returned false"),
            Some(Err(e)) => return Err(e).ctx("a acquire"),
            None => dropped += 1,
        }
        if contended {
            ensure!(
                lb.release().await.ctx("b release")?,
                "attempt {i}: b release returned false"
            );
        }
        names.push(name);
    }
    // Another client takes every lock, one after another (one at a time, so that
    // where lock names share slots, as PostgreSQL's Python-compatible 65,536 keys
    // do, this case does not crowd out the cases running beside it): whatever a's
    // dropped acquires were granted or queued must have been given back.
    let mut left = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let l = b.get_lock(name).ctx("get_lock")?;
        if l.acquire(Wait::For(leftover)).await.ctx("b acquire")? {
            ensure!(
                l.release().await.ctx("b release")?,
                "b release returned false"
            );
        } else {
            left.push(i);
        }
    }
    ensure!(
        left.is_empty(),
        "attempts {left:?} (of {IN_FLIGHT_DROPS}; {dropped} acquires dropped before they returned, \
         typical acquire {typical:?}) left their lock held for {leftover:?} after the drop: leaked holds"
    );
    ensure!(
        dropped * 2 >= IN_FLIGHT_DROPS,
        "only {dropped} of {IN_FLIGHT_DROPS} acquire futures were dropped before they finished"
    );
    Ok(())
}

pub(crate) async fn guard_drop_releases(h: &Harness) -> CaseResult {
    let a = h.started(h.member("a")).await?;
    let b = h.started(h.member("b")).await?;
    let name = h.lock_name("lock");
    let Some(g) = a
        .get_lock(&name)
        .ctx("get_lock")?
        .guard(Wait::No)
        .await
        .ctx("guard")?
    else {
        fail!("guard of a free lock returned None");
    };
    let lb = b.get_lock(&name).ctx("get_lock")?;
    ensure!(
        !lb.acquire(Wait::No).await.ctx("b acquire")?,
        "b acquired a guarded lock"
    );
    drop(g);
    let t0 = Instant::now();
    ensure!(
        lb.acquire(Wait::For(PROMPT))
            .await
            .ctx("b acquire after drop")?,
        "dropping the guard did not release the lock"
    );
    let took = t0.elapsed();
    ensure!(
        took < GUARD_DROP_RELEASE,
        "the dropped guard's release took {took:?}"
    );
    ensure!(
        lb.release().await.ctx("b release")?,
        "b release returned false"
    );
    Ok(())
}

pub(crate) async fn guard_release_reports(h: &Harness) -> CaseResult {
    let a = h.started(h.member("a")).await?;
    let l = a.get_lock(h.lock_name("lock")).ctx("get_lock")?;
    let Some(g) = l.guard(Wait::No).await.ctx("guard")? else {
        fail!("guard of a free lock returned None");
    };
    ensure!(
        g.release().await.ctx("guard release")?,
        "guard.release() of a held lock returned false"
    );
    ensure!(
        !l.release().await.ctx("release after guard release")?,
        "release after the guard released returned true"
    );
    Ok(())
}

pub(crate) async fn lost_fires_on_stop(h: &Harness) -> CaseResult {
    let a = h.started(h.member("a")).await?;
    let l = a.get_lock(h.lock_name("lock")).ctx("get_lock")?;
    ensure!(l.lost().is_none(), "lost() of an unheld lock is Some");
    let Some(g) = l.guard(Wait::No).await.ctx("guard")? else {
        fail!("guard of a free lock returned None");
    };
    let lost = g.lost();
    ensure!(!lost.is_lost(), "a fresh hold reports lost");
    a.stop().await.ctx("stop")?;
    tokio::time::timeout(PROMPT, lost.lost())
        .await
        .ctx("the loss signal after stop()")?;
    drop(g);
    Ok(())
}
