//! The [`ZookeeperDriver`]: groups, membership, leadership and locks in
//! ZooKeeper, laid out as Python tooz's kazoo driver lays them out.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tooz_core::{
    Capabilities, Characteristic, ConnectRequest, Driver, DriverEventStream, DriverInfo,
    DriverLock, FencingToken, GroupId, Held, IdRef, LeaseState, LockName, MemberId, MemberInfo,
    Renewal, Result, ToozError,
};
use zookeeper_client::{AddWatchMode, CreateMode, Error as ZkError, Stat};

use crate::config::ZookeeperConfig;
use crate::contend::{self, Node, Parent, Spot};
use crate::error::zk_err;
use crate::layout::{
    LOCKS_DIR, Layout, check_group_id, check_member_id, contenders, decode_id, encode_id,
    is_member_child,
};
use crate::lock::ZkLock;
use crate::session::{Session, Sessions};
use crate::watch::group_events;

const CHARACTERISTICS: &[Characteristic] = &[
    Characteristic::NonTimeoutBased,
    Characteristic::DistributedAcrossThreads,
    Characteristic::DistributedAcrossProcesses,
    Characteristic::DistributedAcrossHosts,
    Characteristic::Sequential,
];

/// Shared state of a driver and its lock handles.
#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) config: ZookeeperConfig,
    pub(crate) member: MemberId,
    pub(crate) layout: Layout,
    pub(crate) sessions: Arc<Sessions>,
    leaders: Mutex<HashMap<GroupId, Node>>,
}

fn guard<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn millis_to_time(ms: i64) -> Option<SystemTime> {
    u64::try_from(ms)
        .ok()
        .map(|ms| UNIX_EPOCH + Duration::from_millis(ms))
}

impl Drop for Inner {
    /// The last handle went away without `stop`: end the session watcher, which
    /// drops the session (its ephemeral nodes go with it).
    fn drop(&mut self) {
        self.sessions.stop();
    }
}

impl Inner {
    async fn session(&self) -> Result<Arc<Session>> {
        self.sessions
            .get_within(self.sessions.request_timeout())
            .await
    }

    /// With several servers in the URL, a `sync` to send just before a read on the same
    /// session: the server a session is on may lag behind the leader, and a read there
    /// would miss another coordinator's join or leadership written through another
    /// server. The server answers the session's requests in order, so the read that
    /// follows waits for the sync, and both are sent before either answer is awaited
    /// (no extra round trip before the read is sent). One server: nothing to do.
    fn sync_before_read<'a>(
        &self,
        s: &'a Session,
        path: &str,
    ) -> Option<impl std::future::Future<Output = std::result::Result<(), ZkError>> + Send + 'a>
    {
        (self.config.hosts.len() > 1).then(|| s.client.sync(path))
    }

    /// `get_children` of `path`, synced first when there are several servers.
    async fn synced_children(
        &self,
        s: &Session,
        path: &str,
    ) -> std::result::Result<(Vec<String>, Stat), ZkError> {
        let sync = self.sync_before_read(s, path);
        let r = s.client.get_children(path).await;
        if let Some(sync) = sync {
            // Its answer came before the read's; a failed sync (the session broke)
            // shows in the read's result too.
            let _ = sync.await;
        }
        r
    }

    /// `GroupNotCreated` if the group is missing, else `MemberNotJoined`.
    async fn missing_member(&self, s: &Session, g: &GroupId, m: &MemberId) -> ToozError {
        match s.client.check_stat(&self.layout.group(g)).await {
            Ok(None) => ToozError::GroupNotCreated(g.clone()),
            Ok(Some(_)) => ToozError::MemberNotJoined {
                group: g.clone(),
                member: m.clone(),
            },
            Err(e) => zk_err("checking the group", e),
        }
    }

    /// A member's data and stat.
    async fn member_node(&self, g: &GroupId, m: &MemberId) -> Result<(Vec<u8>, Stat)> {
        let s = self.session().await?;
        let path = self.layout.member(g, m);
        let sync = self.sync_before_read(&s, &path);
        let r = s.client.get_data(&path).await;
        if let Some(sync) = sync {
            let _ = sync.await; // answered before the read (see `synced_children`)
        }
        match r {
            Ok(r) => Ok(r),
            Err(ZkError::NoNode) => Err(self.missing_member(&s, g, m).await),
            Err(e) => Err(zk_err("reading a member", e)),
        }
    }

    async fn children(&self, s: &Session, g: &GroupId) -> Result<Vec<String>> {
        match self.synced_children(s, &self.layout.group(g)).await {
            Ok((c, _)) => Ok(c),
            Err(ZkError::NoNode) => Err(ToozError::GroupNotCreated(g.clone())),
            Err(e) => Err(zk_err("listing a group", e)),
        }
    }
}

/// A coordination backend on ZooKeeper (3.5 or newer; persistent watches need
/// 3.6), sharing its znodes with Python tooz's kazoo driver. See the crate
/// documentation for the layout and semantics.
///
/// Most code connects through a [`tooz_core::Registry`] with [`crate::DRIVER`];
/// build one directly to wrap it in a [`tooz_core::Coordinator`] yourself:
///
/// ```no_run
/// use std::sync::Arc;
/// use tooz_core::{Coordinator, MemberId};
/// use tooz_zookeeper::{ZookeeperConfig, ZookeeperDriver};
///
/// let member = MemberId::from("worker-1");
/// let config = ZookeeperConfig::from_url_str("zookeeper://127.0.0.1:2181?timeout=10")?;
/// let driver = ZookeeperDriver::new(config, member.clone())?;
/// let coord = Coordinator::new(Arc::new(driver), member, "zookeeper://127.0.0.1:2181");
/// # Ok::<(), tooz_core::ToozError>(())
/// ```
#[derive(Debug, Clone)]
pub struct ZookeeperDriver {
    inner: Arc<Inner>,
}

impl ZookeeperDriver {
    /// A driver for `member` (nothing is contacted before `start`).
    ///
    /// # Errors
    /// `InvalidId` for the member ids `leader` and `locks` (Python's election and
    /// lock directories).
    pub fn new(config: ZookeeperConfig, member: MemberId) -> Result<Self> {
        check_member_id(&member)?;
        let layout = Layout::new(config.base_path());
        Ok(ZookeeperDriver {
            inner: Arc::new(Inner {
                sessions: Sessions::new(config.clone()),
                config,
                member,
                layout,
                leaders: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The factory registered by [`crate::DRIVER`].
    pub(crate) fn connect(req: &ConnectRequest<'_>) -> Result<Arc<dyn Driver>> {
        let config = ZookeeperConfig::from_request(req)?;
        Ok(Arc::new(ZookeeperDriver::new(
            config,
            req.member_id.clone(),
        )?))
    }

    /// The settings of this driver.
    pub fn config(&self) -> &ZookeeperConfig {
        &self.inner.config
    }

    /// The znode layout of this driver's namespace.
    pub fn layout(&self) -> &Layout {
        &self.inner.layout
    }

    /// The id of the current ZooKeeper session, if one is established (for
    /// diagnostics and tests).
    pub fn session_id(&self) -> Option<i64> {
        self.inner.sessions.get().ok().map(|s| s.id())
    }

    /// Not public API: the current session's credentials, for the crate's tests,
    /// which attach a second client to the session and close it (an expiry on
    /// purpose). May change or go away in any release.
    #[doc(hidden)]
    pub fn session_for_tests(&self) -> Option<zookeeper_client::SessionInfo> {
        self.inner
            .sessions
            .get()
            .ok()
            .map(|s| s.client.session().clone())
    }
}

#[tooz_core::async_trait]
impl Driver for ZookeeperDriver {
    fn info(&self) -> DriverInfo {
        // The client library pings the server to keep the session alive; the
        // heartbeat is only a health check (one `exists`).
        DriverInfo::new("zookeeper", CHARACTERISTICS, false)
    }

    /// `leader` and `locks` are Python's election and lock directories.
    fn check_id(&self, id: IdRef<'_>) -> Result<()> {
        match id {
            IdRef::Group(g) => check_group_id(g),
            IdRef::Member(m) => check_member_id(m),
            _ => Ok(()),
        }
    }

    #[tracing::instrument(level = "debug", skip_all, fields(member = %self.inner.member))]
    async fn start(&self) -> Result<()> {
        self.inner.sessions.start().await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(member = %self.inner.member))]
    async fn stop(&self) -> Result<()> {
        guard(&self.inner.leaders).clear();
        self.inner.sessions.stop();
        Ok(())
    }

    #[tracing::instrument(level = "debug", skip_all)]
    /// One `exists`: everything hangs on the session, which this keeps busy.
    async fn heartbeat(&self, _held: &Held<'_>) -> Result<Renewal> {
        let i = &self.inner;
        let s = i.session().await?;
        s.client
            .check_stat(i.layout.base())
            .await
            .map_err(|e| zk_err("heartbeat", e))?;
        // The negotiated timeout, which the server may have cut below the request.
        Ok(Renewal::new(s.client.session_timeout()))
    }

    fn lease(&self) -> Option<LeaseState> {
        Some(self.inner.sessions.lease())
    }

    #[tracing::instrument(level = "debug", skip_all, fields(group = %group))]
    async fn create_group(&self, group: &GroupId) -> Result<()> {
        let i = &self.inner;
        let s = i.session().await?;
        let path = i.layout.group(group);
        let opts = i.sessions.options(CreateMode::Persistent);
        for attempt in 0..2 {
            match s.client.create(&path, &[], &opts).await {
                Ok(_) => return Ok(()),
                Err(ZkError::NodeExists) => {
                    return Err(ToozError::GroupAlreadyExist(group.clone()));
                }
                Err(ZkError::NoNode) if attempt == 0 => {
                    // Someone removed the namespace: make it again.
                    s.client
                        .mkdir(i.layout.base(), &opts)
                        .await
                        .map_err(|e| zk_err("creating the namespace znode", e))?;
                }
                Err(e) => return Err(zk_err("create_group", e)),
            }
        }
        Err(ToozError::backend_msg(
            "zookeeper",
            format!(
                "the namespace {} vanished while creating group {group}",
                i.layout.base()
            ),
        ))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(group = %group))]
    async fn delete_group(&self, group: &GroupId) -> Result<()> {
        let i = &self.inner;
        let s = i.session().await?;
        let path = i.layout.group(group);
        for _ in 0..3 {
            let children = i.children(&s, group).await?;
            if children.iter().any(|c| is_member_child(c)) {
                return Err(ToozError::GroupNotEmpty(group.clone()));
            }
            // Python's leftover `leader` (and `locks`) directories go with the
            // group, in one transaction; a live contender in them keeps it.
            let mut multi = s.client.new_multi_writer();
            for c in &children {
                multi
                    .add_delete(&format!("{path}/{c}"), None)
                    .map_err(|e| zk_err("delete_group", e))?;
            }
            multi
                .add_delete(&path, None)
                .map_err(|e| zk_err("delete_group", e))?;
            match multi.commit().await {
                Ok(_) => return Ok(()),
                Err(e) => match ZkError::from(e) {
                    ZkError::NotEmpty => {
                        // A member joined, or someone runs for election: look again.
                        let again = i.children(&s, group).await?;
                        if again.iter().any(|c| is_member_child(c)) {
                            return Err(ToozError::GroupNotEmpty(group.clone()));
                        }
                        let leader = i.layout.leader_dir(group);
                        if let Ok((kids, _)) = s.client.get_children(&leader).await
                            && !contenders(&kids).is_empty()
                        {
                            return Err(ToozError::GroupNotEmpty(group.clone()));
                        }
                    }
                    ZkError::NoNode => {
                        if s.client
                            .check_stat(&path)
                            .await
                            .map_err(|e| zk_err("delete_group", e))?
                            .is_none()
                        {
                            return Err(ToozError::GroupNotCreated(group.clone()));
                        }
                    }
                    other => return Err(zk_err("delete_group", other)),
                },
            }
        }
        Err(ToozError::GroupNotEmpty(group.clone()))
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn get_groups(&self) -> Result<Vec<GroupId>> {
        let i = &self.inner;
        let s = i.session().await?;
        let children = match i.synced_children(&s, i.layout.base()).await {
            Ok((c, _)) => c,
            Err(ZkError::NoNode) => Vec::new(),
            Err(e) => return Err(zk_err("get_groups", e)),
        };
        Ok(children
            .into_iter()
            .filter(|c| c != LOCKS_DIR)
            .map(|c| GroupId::new(decode_id(&c)))
            .collect())
    }

    #[tracing::instrument(level = "debug", skip_all, fields(group = %group))]
    async fn join_group(&self, group: &GroupId, capabilities: &Capabilities) -> Result<()> {
        let i = &self.inner;
        let s = i.session().await?;
        let path = i.layout.member(group, &i.member);
        let opts = i.sessions.options(CreateMode::Ephemeral);
        for _ in 0..3 {
            match s
                .client
                .create(&path, capabilities.as_msgpack(), &opts)
                .await
            {
                Ok(_) => return Ok(()),
                Err(ZkError::NoNode) => return Err(ToozError::GroupNotCreated(group.clone())),
                Err(ZkError::NodeExists) => {
                    // A node left by one of our dead sessions goes away soon: replace it.
                    match s.client.check_stat(&path).await {
                        Ok(Some(st)) if i.sessions.is_past_session(st.ephemeral_owner) => {
                            match s.client.delete(&path, Some(st.version)).await {
                                Ok(()) | Err(ZkError::NoNode) | Err(ZkError::BadVersion) => {}
                                Err(e) => return Err(zk_err("join_group", e)),
                            }
                        }
                        Ok(Some(_)) => {
                            return Err(ToozError::MemberAlreadyExist {
                                group: group.clone(),
                                member: i.member.clone(),
                            });
                        }
                        Ok(None) => {}
                        Err(e) => return Err(zk_err("join_group", e)),
                    }
                }
                Err(e) => return Err(zk_err("join_group", e)),
            }
        }
        Err(ToozError::MemberAlreadyExist {
            group: group.clone(),
            member: i.member.clone(),
        })
    }

    #[tracing::instrument(level = "debug", skip_all, fields(group = %group))]
    async fn leave_group(&self, group: &GroupId) -> Result<()> {
        let i = &self.inner;
        let s = i.session().await?;
        match s
            .client
            .delete(&i.layout.member(group, &i.member), None)
            .await
        {
            Ok(()) => Ok(()),
            Err(ZkError::NoNode) => Err(i.missing_member(&s, group, &i.member).await),
            Err(e) => Err(zk_err("leave_group", e)),
        }
    }

    #[tracing::instrument(level = "debug", skip_all, fields(group = %group))]
    async fn get_members(&self, group: &GroupId) -> Result<BTreeSet<MemberId>> {
        let i = &self.inner;
        let s = i.session().await?;
        Ok(i.children(&s, group)
            .await?
            .into_iter()
            .filter(|c| is_member_child(c))
            .map(|c| MemberId::new(decode_id(&c)))
            .collect())
    }

    #[tracing::instrument(level = "debug", skip_all, fields(group = %group, member = %member))]
    async fn get_member_capabilities(
        &self,
        group: &GroupId,
        member: &MemberId,
    ) -> Result<Capabilities> {
        let (data, _) = self.inner.member_node(group, member).await?;
        Ok(Capabilities::from_msgpack(data))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(group = %group))]
    async fn get_members_with_capabilities(
        &self,
        group: &GroupId,
    ) -> Result<Vec<(MemberId, Capabilities)>> {
        let i = &self.inner;
        let s = i.session().await?;
        let names: Vec<String> = i
            .children(&s, group)
            .await?
            .into_iter()
            .filter(|c| is_member_child(c))
            .collect();
        let gpath = i.layout.group(group);
        // Every read is sent before the first answer is awaited: one round trip.
        let reads: Vec<_> = names
            .iter()
            .map(|n| s.client.get_data(&format!("{gpath}/{n}")))
            .collect();
        let results = futures_util::future::join_all(reads).await;
        let mut out = Vec::with_capacity(names.len());
        for (n, r) in names.iter().zip(results) {
            match r {
                Ok((data, _)) => out.push((
                    MemberId::new(decode_id(n)),
                    Capabilities::from_msgpack(data),
                )),
                Err(ZkError::NoNode) => {}
                Err(e) => return Err(zk_err("reading a member", e)),
            }
        }
        Ok(out)
    }

    #[tracing::instrument(level = "debug", skip_all, fields(group = %group, member = %member))]
    async fn get_member_info(&self, group: &GroupId, member: &MemberId) -> Result<MemberInfo> {
        let (data, stat) = self.inner.member_node(group, member).await?;
        Ok(MemberInfo::new(
            Capabilities::from_msgpack(data),
            millis_to_time(stat.ctime),
            millis_to_time(stat.mtime),
        ))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(group = %group))]
    async fn update_capabilities(
        &self,
        group: &GroupId,
        capabilities: &Capabilities,
    ) -> Result<()> {
        let i = &self.inner;
        let s = i.session().await?;
        match s
            .client
            .set_data(
                &i.layout.member(group, &i.member),
                capabilities.as_msgpack(),
                None,
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(ZkError::NoNode) => Err(i.missing_member(&s, group, &i.member).await),
            Err(e) => Err(zk_err("update_capabilities", e)),
        }
    }

    #[tracing::instrument(level = "debug", skip_all, fields(group = %group))]
    async fn campaign(&self, group: &GroupId) -> Result<Option<FencingToken>> {
        let i = &self.inner;
        let held = guard(&i.leaders).get(group).cloned();
        if let Some(node) = held {
            if i.sessions.is_current(node.epoch) {
                return Ok(Some(FencingToken(node.czxid)));
            }
            guard(&i.leaders).remove(group);
        }
        // A campaign that would lose writes nothing: while a contender's node
        // exists (the leader, or a candidate about to find that it is not), look
        // and go away. Creating and deleting a node per losing campaign would wake
        // every watcher of the group each time; a read wakes nobody. The leader's
        // node going away is a change of the group that wakes waiting candidates
        // (the recursive group watch covers the election directory).
        let dir = i.layout.leader_dir(group);
        let s = i.session().await?;
        match i.synced_children(&s, &dir).await {
            Ok((kids, _)) if !contenders(&kids).is_empty() => return Ok(None),
            Ok(_) | Err(ZkError::NoNode) => {}
            Err(e) => return Err(zk_err("listing the election candidates", e)),
        }
        drop(s);
        let spot = Spot {
            dir,
            shared: false,
            data: i.member.as_bytes().to_vec(),
            parent: Parent::GroupChild(group.clone()),
        };
        let won = contend::acquire(Arc::clone(&i.sessions), spot, None, true).await?;
        Ok(won.map(|node| {
            let token = FencingToken(node.czxid);
            guard(&i.leaders).insert(group.clone(), node);
            token
        }))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(group = %group))]
    async fn resign(&self, group: &GroupId) -> Result<bool> {
        let i = &self.inner;
        let Some(node) = guard(&i.leaders).remove(group) else {
            return Ok(false);
        };
        contend::delete_node(&i.sessions, &node).await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(group = %group))]
    async fn get_leader(&self, group: &GroupId) -> Result<Option<MemberId>> {
        let i = &self.inner;
        let s = i.session().await?;
        let dir = i.layout.leader_dir(group);
        for _ in 0..5 {
            let children = match i.synced_children(&s, &dir).await {
                Ok((c, _)) => c,
                Err(ZkError::NoNode) => return Ok(None),
                Err(e) => return Err(zk_err("get_leader", e)),
            };
            let Some(first) = contenders(&children).first().map(|c| c.name.to_string()) else {
                return Ok(None);
            };
            match s.client.get_data(&format!("{dir}/{first}")).await {
                Ok((data, _)) if data.is_empty() => return Ok(None),
                Ok((data, _)) => return Ok(Some(MemberId::new(data))),
                // The leader just stepped down: look again.
                Err(ZkError::NoNode) => {}
                Err(e) => return Err(zk_err("get_leader", e)),
            }
        }
        Ok(None)
    }

    fn lock(&self, name: &LockName) -> Result<Arc<dyn DriverLock>> {
        // Every name the core accepts has a znode name (see `layout::encode_id`).
        Ok(Arc::new(ZkLock::new(Arc::clone(&self.inner), name.clone())))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(group = %group))]
    async fn watch_group(&self, group: &GroupId) -> Result<Option<DriverEventStream>> {
        let i = &self.inner;
        let s = i.session().await?;
        let path = i.layout.group(group);
        let watcher = match s
            .client
            .watch(&path, AddWatchMode::PersistentRecursive)
            .await
        {
            Ok(w) => Some(w),
            // Servers before 3.6 have no persistent watches: the core polls.
            Err(ZkError::Unimplemented) => {
                tracing::warn!(group = %group, "zookeeper: the server has no persistent watches (ZooKeeper < 3.6); group events will be polled");
                None
            }
            Err(e) => return Err(zk_err("watching a group", e)),
        };
        let exists = s
            .client
            .check_stat(&path)
            .await
            .map_err(|e| zk_err("watching a group", e))?;
        if exists.is_none() {
            return Err(ToozError::GroupNotCreated(group.clone()));
        }
        let Some(watcher) = watcher else {
            return Ok(None);
        };
        Ok(Some(group_events(
            Arc::clone(&i.sessions),
            i.layout.clone(),
            path,
            encode_id(group.as_bytes()),
            watcher,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_member_ids_are_refused() {
        let c = ZookeeperConfig::from_url_str("zookeeper://localhost").unwrap();
        for m in ["leader", "locks"] {
            assert!(matches!(
                ZookeeperDriver::new(c.clone(), m.into()),
                Err(ToozError::InvalidId {
                    kind: "member id",
                    ..
                })
            ));
        }
    }

    #[test]
    fn info_is_pythons_characteristics() {
        let c = ZookeeperConfig::from_url_str("zookeeper://localhost").unwrap();
        let d = ZookeeperDriver::new(c, "m".into()).unwrap();
        let info = d.info();
        assert_eq!(info.name, "zookeeper");
        assert!(!info.requires_beating);
        assert!(info.lease_bound_holds);
        assert_eq!(info.characteristics, CHARACTERISTICS);
    }
}
