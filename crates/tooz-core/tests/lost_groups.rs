//! The coordinator re-joins groups its heartbeat finds the backend lost
//! (`Renewal::lost_groups`): with the member's last capabilities, creating the
//! group again when it went with the membership, never a group left meanwhile,
//! with `tooz_losses_total{what="membership"}` and `tooz_rejoins_total`.
//!
//! The backend is the memory driver behind a wrapper whose heartbeat checks each
//! joined group, as the Redis, memcached and file drivers do in their one request;
//! "the backend lost it" is a twin session of the same member id leaving (and
//! deleting) the group behind the coordinator's back.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use tooz_core::{
    Capabilities, ConnectRequest, Driver, DriverDescriptor, DriverEventStream, DriverInfo,
    DriverLock, FencingToken, GroupId, Held, LockName, MemberId, MemberInfo, Registry, Renewal,
    Result, ToozError, async_trait, memory,
};

/// The memory driver, whose heartbeat reports the joined groups it no longer
/// lists this member in, plus any group a test forces it to report.
#[derive(Debug)]
struct Checking {
    inner: Arc<dyn Driver>,
    member: MemberId,
}

static FORCED: Mutex<Vec<GroupId>> = Mutex::new(Vec::new());

fn connect(req: &ConnectRequest<'_>) -> Result<Arc<dyn Driver>> {
    Ok(Arc::new(Checking {
        inner: (memory::DRIVER.connect)(req)?,
        member: req.member_id.clone(),
    }))
}

const CHECKING: DriverDescriptor = DriverDescriptor {
    name: "checking",
    schemes: &["memory"],
    connect,
    features: memory::DRIVER.features,
};

#[async_trait]
impl Driver for Checking {
    fn info(&self) -> DriverInfo {
        DriverInfo::new("checking", self.inner.info().characteristics, true)
    }
    async fn start(&self) -> Result<()> {
        self.inner.start().await
    }
    async fn stop(&self) -> Result<()> {
        self.inner.stop().await
    }
    async fn heartbeat(&self, held: &Held<'_>) -> Result<Renewal> {
        let mut r = self.inner.heartbeat(held).await?;
        for g in held.joined {
            let listed = match self.inner.get_members(g).await {
                Ok(m) => m.contains(&self.member),
                Err(ToozError::GroupNotCreated(_)) => false,
                Err(e) => return Err(e),
            };
            if !listed {
                r.lose_group(g.clone());
            }
        }
        for g in FORCED.lock().unwrap().drain(..) {
            r.lose_group(g);
        }
        Ok(r)
    }
    async fn create_group(&self, group: &GroupId) -> Result<()> {
        self.inner.create_group(group).await
    }
    async fn delete_group(&self, group: &GroupId) -> Result<()> {
        self.inner.delete_group(group).await
    }
    async fn get_groups(&self) -> Result<Vec<GroupId>> {
        self.inner.get_groups().await
    }
    async fn join_group(&self, group: &GroupId, capabilities: &Capabilities) -> Result<()> {
        self.inner.join_group(group, capabilities).await
    }
    async fn leave_group(&self, group: &GroupId) -> Result<()> {
        self.inner.leave_group(group).await
    }
    async fn get_members(&self, group: &GroupId) -> Result<BTreeSet<MemberId>> {
        self.inner.get_members(group).await
    }
    async fn get_member_capabilities(
        &self,
        group: &GroupId,
        member: &MemberId,
    ) -> Result<Capabilities> {
        self.inner.get_member_capabilities(group, member).await
    }
    async fn get_members_with_capabilities(
        &self,
        group: &GroupId,
    ) -> Result<Vec<(MemberId, Capabilities)>> {
        self.inner.get_members_with_capabilities(group).await
    }
    async fn get_member_info(&self, group: &GroupId, member: &MemberId) -> Result<MemberInfo> {
        self.inner.get_member_info(group, member).await
    }
    async fn update_capabilities(
        &self,
        group: &GroupId,
        capabilities: &Capabilities,
    ) -> Result<()> {
        self.inner.update_capabilities(group, capabilities).await
    }
    async fn campaign(&self, group: &GroupId) -> Result<Option<FencingToken>> {
        self.inner.campaign(group).await
    }
    async fn resign(&self, group: &GroupId) -> Result<bool> {
        self.inner.resign(group).await
    }
    async fn get_leader(&self, group: &GroupId) -> Result<Option<MemberId>> {
        self.inner.get_leader(group).await
    }
    fn lock(&self, name: &LockName) -> Result<Arc<dyn DriverLock>> {
        self.inner.lock(name)
    }
    async fn watch_group(&self, group: &GroupId) -> Result<Option<DriverEventStream>> {
        self.inner.watch_group(group).await
    }
}

/// Counter totals (a snapshot takes the counts since the last one).
#[derive(Default)]
struct Totals(BTreeMap<(String, String), u64>);

impl Totals {
    fn update(&mut self, snap: &metrics_util::debugging::Snapshotter) -> &Self {
        for (k, _, _, v) in snap.snapshot().into_vec() {
            if let DebugValue::Counter(n) = v {
                let what = k
                    .key()
                    .labels()
                    .find(|l| l.key() == "what")
                    .map(|l| l.value().to_string())
                    .unwrap_or_default();
                *self
                    .0
                    .entry((k.key().name().to_string(), what))
                    .or_default() += n;
            }
        }
        self
    }

    fn get(&self, name: &str, what: &str) -> u64 {
        self.0
            .get(&(name.to_string(), what.to_string()))
            .copied()
            .unwrap_or(0)
    }
}

#[tokio::test(flavor = "current_thread")]
async fn lost_memberships_come_back_after_one_heartbeat() {
    let recorder = DebuggingRecorder::new();
    let snap = recorder.snapshotter();
    let _guard = metrics::set_default_local_recorder(&recorder);
    let mut totals = Totals::default();
    let registry = Registry::new().with(CHECKING);
    let url = format!("memory://lost-{}", std::process::id());
    let a = registry.connect(&url, "a").unwrap();
    a.start(false).await.unwrap();
    for g in ["g", "h", "kept"] {
        a.join_group_create(g, &BTreeMap::from([("w", 1)]))
            .await
            .unwrap();
    }
    a.update_capabilities("g", &BTreeMap::from([("w", 2)]))
        .await
        .unwrap();

    // Behind a's back: its membership of g goes, and h goes altogether.
    let twin = registry.connect(&url, "a").unwrap();
    twin.start(false).await.unwrap();
    twin.leave_group("g").await.unwrap();
    twin.leave_group("h").await.unwrap();
    twin.delete_group("h").await.unwrap();
    assert!(!a.get_members("g").await.unwrap().contains(&"a".into()));

    a.heartbeat().await.unwrap();
    let caps = a.get_member_capabilities("g", "a").await.unwrap();
    assert_eq!(caps.decode::<BTreeMap<String, i32>>().unwrap()["w"], 2);
    let caps = a.get_member_capabilities("h", "a").await.unwrap();
    assert_eq!(caps.decode::<BTreeMap<String, i32>>().unwrap()["w"], 1);
    assert_eq!(a.joined_groups().len(), 3);
    totals.update(&snap);
    assert_eq!(totals.get("tooz_losses_total", "membership"), 2);
    assert_eq!(totals.get("tooz_rejoins_total", ""), 2);

    // Nothing lost: nothing re-joined.
    a.heartbeat().await.unwrap();
    assert_eq!(totals.update(&snap).get("tooz_rejoins_total", ""), 2);

    // A group reported lost after its owner left it is not joined again.
    a.leave_group("g").await.unwrap();
    FORCED.lock().unwrap().push(GroupId::from("g"));
    a.heartbeat().await.unwrap();
    assert!(!a.get_members("g").await.unwrap().contains(&"a".into()));
    assert_eq!(totals.update(&snap).get("tooz_rejoins_total", ""), 2);
    twin.stop().await.unwrap();
    a.stop().await.unwrap();
}

/// With the heartbeat task running, nobody has to call anything: the member is
/// listed again (paused time: the heart's waits pass at once).
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn the_heart_rejoins_on_its_own() {
    let registry = Registry::new().with(CHECKING);
    let url = format!("memory://heart-{}?timeout=3", std::process::id());
    let a = registry.connect(&url, "a").unwrap();
    a.start(true).await.unwrap();
    a.join_group_create("g", &()).await.unwrap();
    let twin = registry.connect(&url, "a").unwrap();
    twin.start(false).await.unwrap();
    twin.leave_group("g").await.unwrap();
    let beats = a.beats();
    let mut back = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if a.get_members("g").await.unwrap().contains(&"a".into()) {
            back = true;
            break;
        }
    }
    assert!(back, "not re-joined after {} beats", a.beats() - beats);
    assert!(a.beats() > beats);
    twin.stop().await.unwrap();
    a.stop().await.unwrap();
}
