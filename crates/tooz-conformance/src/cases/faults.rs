//! Lease safety through network faults (ours; tooz has no such tests). A coordinator
//! reaches the backend through a [`FaultProxy`](crate::fault::FaultProxy); the other
//! talks to the backend directly. The rule checked: a hold's loss is signalled before
//! the backend can grant it to anyone else (compared on one monotonic clock), and an
//! operation whose reply was lost leaves nothing held behind. These cases run only for
//! backends reached over TCP.

use super::prelude::*;

/// Long enough for the backend to free a partitioned holder's lease, with room.
fn takeover_wait(h: &Harness) -> Duration {
    h.lease() * 3 + Duration::from_secs(5)
}

/// Shorter than the lease: a hold left behind by a lost reply would still block
/// for at least this long (for ever where the lease is kept alive).
fn leftover_wait(h: &Harness) -> Duration {
    h.lease() / 2
}

pub(crate) async fn lock_loss_is_signalled_before_another_holder_gets_it(
    h: &Harness,
) -> CaseResult {
    let (a, proxy) = h.started_behind_proxy(h.member("a")).await?;
    let b = h.started(h.member("b")).await?;
    let name = h.lock_name("l");
    let guard = a
        .get_lock(name.clone())
        .ctx("get_lock")?
        .guard(Wait::No)
        .await
        .ctx("a acquire")?
        .ok_or_else(|| CaseError::Failed("a did not get a free lock".into()))?;
    let lost = guard.lost();
    let lost_at = tokio::spawn(async move {
        lost.lost().await;
        Instant::now()
    });
    proxy.freeze();
    let frozen = Instant::now();
    let got = b
        .get_lock(name)
        .ctx("get_lock")?
        .acquire(Wait::For(takeover_wait(h)))
        .await
        .ctx("b acquire")?;
    let b_at = Instant::now();
    ensure!(
        got,
        "b did not get the lock of a partitioned holder within {:?}",
        takeover_wait(h)
    );
    ensure!(
        lost_at.is_finished(),
        "b got the lock {:?} after the partition and a's hold was not reported lost yet",
        b_at - frozen
    );
    let lost_at = lost_at
        .await
        .map_err(|e| CaseError::Failed(format!("loss task: {e}")))?;
    ensure!(
        lost_at < b_at,
        "a's loss came {:?} after b's grant",
        lost_at - b_at
    );
    proxy.cut_all();
    proxy.heal();
    drop(guard);
    Ok(())
}

pub(crate) async fn leadership_loss_is_signalled_before_another_leader_is_elected(
    h: &Harness,
) -> CaseResult {
    let (a, proxy) = h.started_behind_proxy(h.member("a")).await?;
    let b = h.started(h.member("b")).await?;
    let g = h.group("g");
    b.create_group(&g).await.ctx("create_group")?;
    let leadership = tokio::time::timeout(Duration::from_secs(10), a.become_leader(&g))
        .await
        .ctx("a become_leader")?
        .ctx("a become_leader")?;
    let lost = leadership.lost();
    let lost_at = tokio::spawn(async move {
        lost.lost().await;
        Instant::now()
    });
    proxy.freeze();
    let elected = tokio::time::timeout(takeover_wait(h), b.become_leader(&g))
        .await
        .ctx("b taking over from a partitioned leader")?
        .ctx("b become_leader")?;
    let b_at = Instant::now();
    ensure!(
        elected.token() > leadership.token(),
        "the new leadership's token {} does not follow {}",
        elected.token(),
        leadership.token()
    );
    ensure!(
        lost_at.is_finished(),
        "b was elected and a's leadership was not reported lost yet"
    );
    let lost_at = lost_at
        .await
        .map_err(|e| CaseError::Failed(format!("loss task: {e}")))?;
    ensure!(
        lost_at < b_at,
        "a's loss came {:?} after b's election",
        lost_at - b_at
    );
    proxy.cut_all();
    proxy.heal();
    Ok(())
}

pub(crate) async fn acquire_whose_reply_was_lost_leaves_no_hold(h: &Harness) -> CaseResult {
    let (a, proxy) = h.started_behind_proxy(h.member("a")).await?;
    let b = h.started(h.member("b")).await?;
    let name = h.lock_name("l");
    let la = a.get_lock(name.clone()).ctx("get_lock")?;
    let lb = b.get_lock(name).ctx("get_lock")?;
    // The fault hits the next request on the proxy; if that was some other
    // request (a heartbeat), try again. A driver may resolve the unknown outcome
    // either way: give the hold back and fail, or find it is ours and adopt it.
    let mut hit = false;
    for _ in 0..5 {
        let before = proxy.stats().replies_dropped;
        proxy.drop_next_reply();
        let res = la.acquire(Wait::No).await;
        proxy.disarm();
        let dropped = proxy.stats().replies_dropped > before;
        match res {
            Ok(true) if dropped => {
                // Adopted: it must really be ours, and really free after release.
                ensure!(
                    !lb.acquire(Wait::No).await.ctx("b acquire")?,
                    "b got the lock a adopted"
                );
                ensure!(
                    la.release().await.ctx("release")?,
                    "a's adopted hold was not held"
                );
                hit = true;
            }
            Ok(true) => {
                la.release().await.ctx("release")?;
                continue;
            }
            Ok(false) => fail!("a free lock was reported held"),
            Err(_) if dropped => {
                ensure!(
                    !la.is_held(),
                    "a failed acquire left the lock object holding"
                );
                hit = true;
            }
            Err(e) => fail!("acquire failed without the fault firing: {e}"),
        }
        break;
    }
    ensure!(hit, "the fault never hit an acquire");
    ensure!(
        lb.acquire(Wait::For(leftover_wait(h)))
            .await
            .ctx("b acquire")?,
        "the lock stayed held for {:?} after an acquire whose reply was lost",
        leftover_wait(h)
    );
    Ok(())
}

pub(crate) async fn release_whose_reply_was_lost_frees_the_lock(h: &Harness) -> CaseResult {
    let (a, proxy) = h.started_behind_proxy(h.member("a")).await?;
    let b = h.started(h.member("b")).await?;
    let name = h.lock_name("l");
    let la = a.get_lock(name.clone()).ctx("get_lock")?;
    let lb = b.get_lock(name).ctx("get_lock")?;
    let mut hit = false;
    for _ in 0..5 {
        ensure!(
            la.acquire(Wait::No).await.ctx("a acquire")?,
            "a did not get a free lock"
        );
        let before = proxy.stats().replies_dropped;
        proxy.drop_next_reply();
        let _ = la.release().await;
        proxy.disarm();
        hit = proxy.stats().replies_dropped > before;
        ensure!(!la.is_held(), "a still holds after its release");
        ensure!(
            lb.acquire(Wait::For(leftover_wait(h)))
                .await
                .ctx("b acquire")?,
            "the lock stayed held for {:?} after a release (fault fired: {hit})",
            leftover_wait(h)
        );
        lb.release().await.ctx("b release")?;
        if hit {
            break;
        }
    }
    ensure!(hit, "the fault never hit a release");
    Ok(())
}

pub(crate) async fn short_cut_within_the_margin_loses_nothing(h: &Harness) -> CaseResult {
    let (a, proxy) = h.started_behind_proxy(h.member("a")).await?;
    let b = h.started(h.member("b")).await?;
    let name = h.lock_name("l");
    let g = h.group("g");
    b.create_group(&g).await.ctx("create_group")?;
    let guard = a
        .get_lock(name.clone())
        .ctx("get_lock")?
        .guard(Wait::No)
        .await
        .ctx("a acquire")?
        .ok_or_else(|| CaseError::Failed("a did not get a free lock".into()))?;
    let leadership = a.become_leader(&g).await.ctx("a become_leader")?;
    let margin = a
        .loss_margin()
        .ok_or_else(|| CaseError::Failed("no loss margin with a lease".into()))?;
    // A cut shorter than the margin, several times over a few renewals.
    for _ in 0..3 {
        proxy.freeze();
        tokio::time::sleep(margin / 2).await;
        proxy.heal();
        tokio::time::sleep(h.lease() / 3).await;
    }
    ensure!(
        !guard.lost().is_lost(),
        "the lock was reported lost after short cuts"
    );
    ensure!(
        !leadership.is_lost(),
        "the leadership was reported lost after short cuts"
    );
    ensure!(
        guard.lock().is_still_owner().await.ctx("is_still_owner")?,
        "the backend no longer has a's hold"
    );
    ensure!(
        !b.get_lock(name)
            .ctx("get_lock")?
            .acquire(Wait::No)
            .await
            .ctx("b acquire")?,
        "b got a's lock"
    );
    ensure!(
        b.try_become_leader(&g).await.ctx("b campaign")?.is_none(),
        "b was elected while a leads"
    );
    guard.release().await.ctx("release")?;
    Ok(())
}
