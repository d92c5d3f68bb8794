//! Observability of every backend operation, whatever the driver.
//!
//! The coordinator wraps its driver in an observing wrapper, so each call into the backend
//! runs in a `tracing` span named `tooz.backend` (level `debug`) with the fields
//! `driver`, `op`, `member`, and where they apply `group`, `lock`, `token`, then
//! `elapsed_us` (the operation's round-trip time) and `error`. The same calls feed the
//! [`metrics`] facade; without an installed recorder these are no-ops.
//!
//! | metric | kind | labels | what |
//! |---|---|---|---|
//! | `tooz_backend_op_seconds` | histogram | `driver`, `op` | time of each backend operation |
//! | `tooz_backend_errors_total` | counter | `driver`, `op` | operations that failed |
//! | `tooz_heartbeat_seconds` | histogram | `driver` | time of each heartbeat (every hold renewed) |
//! | `tooz_lock_acquisitions_total` | counter | `driver`, `mode` | locks granted |
//! | `tooz_lock_waits_total` | counter | `driver` | acquisitions that found the lock held and waited |
//! | `tooz_lock_wait_seconds` | histogram | `driver` | time from the first attempt to the grant or give-up, for waits |
//! | `tooz_losses_total` | counter | `driver`, `what` (`lease`, `lock`, `leadership`, `membership`) | loss signals fired; `membership`: a group the heartbeat found the backend had lost this member from |
//! | `tooz_rejoins_total` | counter | `driver` | groups re-joined after the backend lost the membership |
//! | `tooz_lease_replaced_total` | counter | – | sessions or leases replaced after a loss (reconnects) |
//!
//! `examples/observability.rs` of the `tooz` crate prints both.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use tracing::{Instrument, Span, field};

use crate::capabilities::{Capabilities, MemberInfo};
use crate::driver::{Driver, DriverEventStream, DriverInfo, DriverLock, Held, IdRef, Renewal};
use crate::error::Result;
use crate::ids::{GroupId, LockName, MemberId};
use crate::lease::LeaseState;
use crate::lock::FencingToken;

/// A driver whose every backend operation is traced and measured.
pub(crate) struct Observed {
    inner: Arc<dyn Driver>,
    name: &'static str,
    member: MemberId,
}

impl std::fmt::Debug for Observed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Observed")
            .field("driver", &self.name)
            .finish_non_exhaustive()
    }
}

impl Observed {
    pub(crate) fn wrap(inner: Arc<dyn Driver>, member: MemberId) -> Arc<dyn Driver> {
        let name = inner.info().name;
        Arc::new(Observed {
            inner,
            name,
            member,
        })
    }

    fn span(&self, op: &'static str) -> Span {
        tracing::debug_span!(
            "tooz.backend",
            driver = self.name,
            op,
            member = %self.member,
            group = field::Empty,
            lock = field::Empty,
            token = field::Empty,
            elapsed_us = field::Empty,
            error = field::Empty,
        )
    }

    fn group_span(&self, op: &'static str, group: &GroupId) -> Span {
        let span = self.span(op);
        span.record("group", field::display(group));
        span
    }

    async fn timed<T>(
        &self,
        op: &'static str,
        span: Span,
        fut: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        let started = Instant::now();
        let out = fut.instrument(span.clone()).await;
        let secs = started.elapsed().as_secs_f64();
        span.record("elapsed_us", (secs * 1e6) as u64);
        metrics::histogram!("tooz_backend_op_seconds", "driver" => self.name, "op" => op)
            .record(secs);
        if let Err(e) = &out {
            span.record("error", field::display(e));
            metrics::counter!("tooz_backend_errors_total", "driver" => self.name, "op" => op)
                .increment(1);
        }
        out
    }
}

#[async_trait]
impl Driver for Observed {
    fn info(&self) -> DriverInfo {
        self.inner.info()
    }

    fn check_id(&self, id: IdRef<'_>) -> Result<()> {
        self.inner.check_id(id)
    }

    async fn start(&self) -> Result<()> {
        self.timed("start", self.span("start"), self.inner.start())
            .await
    }

    async fn stop(&self) -> Result<()> {
        self.timed("stop", self.span("stop"), self.inner.stop())
            .await
    }

    async fn heartbeat(&self, held: &Held<'_>) -> Result<Renewal> {
        let started = Instant::now();
        let out = self
            .timed(
                "heartbeat",
                self.span("heartbeat"),
                self.inner.heartbeat(held),
            )
            .await;
        metrics::histogram!("tooz_heartbeat_seconds", "driver" => self.name)
            .record(started.elapsed().as_secs_f64());
        out
    }

    fn lease(&self) -> Option<LeaseState> {
        self.inner.lease()
    }

    async fn create_group(&self, group: &GroupId) -> Result<()> {
        let span = self.group_span("create_group", group);
        self.timed("create_group", span, self.inner.create_group(group))
            .await
    }

    async fn delete_group(&self, group: &GroupId) -> Result<()> {
        let span = self.group_span("delete_group", group);
        self.timed("delete_group", span, self.inner.delete_group(group))
            .await
    }

    async fn get_groups(&self) -> Result<Vec<GroupId>> {
        self.timed(
            "get_groups",
            self.span("get_groups"),
            self.inner.get_groups(),
        )
        .await
    }

    async fn join_group(&self, group: &GroupId, capabilities: &Capabilities) -> Result<()> {
        let span = self.group_span("join_group", group);
        self.timed(
            "join_group",
            span,
            self.inner.join_group(group, capabilities),
        )
        .await
    }

    async fn leave_group(&self, group: &GroupId) -> Result<()> {
        let span = self.group_span("leave_group", group);
        self.timed("leave_group", span, self.inner.leave_group(group))
            .await
    }

    async fn get_members(&self, group: &GroupId) -> Result<BTreeSet<MemberId>> {
        let span = self.group_span("get_members", group);
        self.timed("get_members", span, self.inner.get_members(group))
            .await
    }

    async fn get_member_capabilities(
        &self,
        group: &GroupId,
        member: &MemberId,
    ) -> Result<Capabilities> {
        let span = self.group_span("get_member_capabilities", group);
        self.timed(
            "get_member_capabilities",
            span,
            self.inner.get_member_capabilities(group, member),
        )
        .await
    }

    async fn get_members_with_capabilities(
        &self,
        group: &GroupId,
    ) -> Result<Vec<(MemberId, Capabilities)>> {
        let span = self.group_span("get_members_with_capabilities", group);
        self.timed(
            "get_members_with_capabilities",
            span,
            self.inner.get_members_with_capabilities(group),
        )
        .await
    }

    async fn get_member_info(&self, group: &GroupId, member: &MemberId) -> Result<MemberInfo> {
        let span = self.group_span("get_member_info", group);
        self.timed(
            "get_member_info",
            span,
            self.inner.get_member_info(group, member),
        )
        .await
    }

    async fn update_capabilities(
        &self,
        group: &GroupId,
        capabilities: &Capabilities,
    ) -> Result<()> {
        let span = self.group_span("update_capabilities", group);
        self.timed(
            "update_capabilities",
            span,
            self.inner.update_capabilities(group, capabilities),
        )
        .await
    }

    async fn campaign(&self, group: &GroupId) -> Result<Option<FencingToken>> {
        let span = self.group_span("campaign", group);
        let out = self
            .timed("campaign", span.clone(), self.inner.campaign(group))
            .await;
        if let Ok(Some(t)) = &out {
            span.record("token", t.0);
        }
        out
    }

    async fn resign(&self, group: &GroupId) -> Result<bool> {
        let span = self.group_span("resign", group);
        self.timed("resign", span, self.inner.resign(group)).await
    }

    async fn get_leader(&self, group: &GroupId) -> Result<Option<MemberId>> {
        let span = self.group_span("get_leader", group);
        self.timed("get_leader", span, self.inner.get_leader(group))
            .await
    }

    /// Lock handles are the driver's own (the driver's heartbeat downcasts them);
    /// their attempts are traced by the core's lock layer.
    fn lock(&self, name: &LockName) -> Result<Arc<dyn DriverLock>> {
        self.inner.lock(name)
    }

    async fn watch_group(&self, group: &GroupId) -> Result<Option<DriverEventStream>> {
        let span = self.group_span("watch_group", group);
        self.timed("watch_group", span, self.inner.watch_group(group))
            .await
    }

    fn watch_needs_polling(&self) -> bool {
        self.inner.watch_needs_polling()
    }
}

/// A span for one attempt or release of a lock (the lock layer's part of the
/// backend operations).
pub(crate) fn lock_span(driver: &'static str, op: &'static str, lock: &LockName) -> Span {
    tracing::debug_span!(
        "tooz.backend",
        driver,
        op,
        lock = %lock,
        token = field::Empty,
        elapsed_us = field::Empty,
        error = field::Empty,
    )
}

/// Counts a granted lock.
pub(crate) fn granted(driver: &'static str, mode: crate::lock::Mode) {
    let mode = match mode {
        crate::lock::Mode::Shared => "shared",
        _ => "exclusive",
    };
    metrics::counter!("tooz_lock_acquisitions_total", "driver" => driver, "mode" => mode)
        .increment(1);
}

/// Counts a fired loss signal.
pub(crate) fn lost(driver: &'static str, what: &'static str) {
    metrics::counter!("tooz_losses_total", "driver" => driver, "what" => what).increment(1);
}

/// Records the end of a lock operation on its span and in the metrics.
pub(crate) fn lock_done<T>(
    driver: &'static str,
    op: &'static str,
    span: &Span,
    started: Instant,
    out: &Result<T>,
) {
    let secs = started.elapsed().as_secs_f64();
    span.record("elapsed_us", (secs * 1e6) as u64);
    metrics::histogram!("tooz_backend_op_seconds", "driver" => driver, "op" => op).record(secs);
    if let Err(e) = out {
        span.record("error", field::display(e));
        metrics::counter!("tooz_backend_errors_total", "driver" => driver, "op" => op).increment(1);
    }
}
