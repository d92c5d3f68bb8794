//! The [`Driver`] implementation.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use tooz_core::capabilities::{Capabilities, MemberInfo};
use tooz_core::characteristic::Characteristic;
use tooz_core::driver::{Driver, DriverEventStream, DriverInfo, DriverLock, Held, Renewal};
use tooz_core::{ConnectRequest, FencingToken, GroupId, LockName, MemberId, Result, ToozError};

use crate::config::{IpcConfig, NAME};
use crate::grouplist::GroupList;
use crate::lock::IpcLock;
use crate::sem::InternalLock;
use crate::state::{Alive, DirState, Layout, LeaderRecord, MemberRecord, remove_opt};
use crate::{fence, keys, sem, watch};

const CHARACTERISTICS: &[Characteristic] = &[
    Characteristic::NonTimeoutBased,
    Characteristic::DistributedAcrossThreads,
    Characteristic::DistributedAcrossProcesses,
];

/// How long a state change waits for the state lock or tooz's internal lock.
const SERIAL_WAIT: Duration = Duration::from_secs(10);

fn io_err(what: impl std::fmt::Display, e: io::Error) -> ToozError {
    if e.kind() == io::ErrorKind::TimedOut {
        ToozError::OperationTimedOut(format!("{what}: {e}"))
    } else {
        ToozError::backend(NAME, what, e)
    }
}

/// An `ipc://` coordinator's driver.
#[derive(Debug)]
pub struct IpcDriver {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: IpcConfig,
    layout: Layout,
    member: MemberId,
    alive: Mutex<Option<Alive>>,
}

impl Inner {
    fn alive(&self) -> MutexGuard<'_, Option<Alive>> {
        self.alive.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn alive_id(&self) -> Result<String> {
        self.alive()
            .as_ref()
            .map(|a| a.id.clone())
            .ok_or(ToozError::NotStarted)
    }

    fn serial(&self) -> Result<crate::state::Serial> {
        self.layout
            .serial(SERIAL_WAIT)
            .map_err(|e| io_err("cannot take the state lock", e))
    }

    fn python_groups(&self) -> Result<(GroupList, Vec<GroupId>)> {
        let list = GroupList::attach().map_err(|e| io_err("cannot attach the group list", e))?;
        let groups = list
            .read()
            .map_err(|e| io_err("cannot read the group list", e))?;
        Ok((list, groups))
    }

    fn dir_state(&self, g: &GroupId) -> Result<DirState> {
        Layout::dir_state(&self.layout.group_dir(g))
            .map_err(|e| io_err(format_args!("cannot read group {g}"), e))
    }

    /// Whether the group exists, given its directory's state and whether it is in
    /// Python's list.
    fn exists_with(ds: DirState, listed: bool) -> bool {
        ds == DirState::RustOnly || listed
    }

    /// Whether the group exists (takes tooz's internal lock unless the group
    /// lives outside Python's list).
    fn exists(&self, g: &GroupId) -> Result<bool> {
        let ds = self.dir_state(g)?;
        if ds == DirState::RustOnly {
            return Ok(true);
        }
        let _lock = InternalLock::take(SERIAL_WAIT).map_err(|e| io_err("internal lock", e))?;
        Ok(Self::exists_with(ds, self.python_groups()?.1.contains(g)))
    }

    /// Gives an existing group a directory for its members (a group Python
    /// created, listed in its list).
    fn ensure_dir(&self, g: &GroupId) -> Result<()> {
        if self.dir_state(g)? == DirState::None {
            self.layout
                .make_group_dir(g, true)
                .map_err(|e| io_err(format_args!("cannot create group {g}"), e))?;
        }
        Ok(())
    }

    fn require(&self, g: &GroupId) -> Result<()> {
        if self.exists(g)? {
            Ok(())
        } else {
            Err(ToozError::GroupNotCreated(g.clone()))
        }
    }

    fn live(&self, alive: &str) -> Result<bool> {
        self.layout
            .is_alive(alive)
            .map_err(|e| io_err("cannot probe a liveness file", e))
    }

    fn live_records(&self, g: &GroupId) -> Result<Vec<MemberRecord>> {
        self.require(g)?;
        let records = self
            .layout
            .member_records(g)
            .map_err(|e| io_err(format_args!("cannot list group {g}"), e))?;
        let mut out = Vec::with_capacity(records.len());
        for r in records {
            if self.live(&r.alive)? {
                out.push(r);
            }
        }
        Ok(out)
    }

    /// This member's live record in `g`, or `MemberNotJoined`.
    fn live_record(&self, g: &GroupId, m: &MemberId) -> Result<MemberRecord> {
        self.require(g)?;
        let rec = self
            .layout
            .member_record(g, m)
            .map_err(|e| io_err(format_args!("cannot read member {m} of {g}"), e))?;
        match rec {
            Some(r) if self.live(&r.alive)? => Ok(r),
            _ => Err(ToozError::MemberNotJoined {
                group: g.clone(),
                member: m.clone(),
            }),
        }
    }

    fn write_member(&self, g: &GroupId, r: &MemberRecord) -> Result<()> {
        let data = r
            .encode()
            .map_err(|e| ToozError::serialization("member record", e))?;
        self.layout
            .write_atomic(&self.layout.member_file(g, &r.member), &data)
            .map_err(|e| io_err(format_args!("cannot write member {} of {g}", r.member), e))
    }

    fn leader(&self, g: &GroupId) -> Result<Option<LeaderRecord>> {
        let rec = self
            .layout
            .leader_record(g)
            .map_err(|e| io_err(format_args!("cannot read the leader of {g}"), e))?;
        match rec {
            Some(r) if self.live(&r.alive)? => Ok(Some(r)),
            _ => Ok(None),
        }
    }
}

impl IpcDriver {
    /// Builds a driver (no I/O until `start`).
    pub fn new(config: IpcConfig, member: MemberId) -> Self {
        IpcDriver {
            inner: Arc::new(Inner {
                layout: Layout::new(config.state_dir.clone()),
                config,
                member,
                alive: Mutex::new(None),
            }),
        }
    }

    pub(crate) fn connect(req: &ConnectRequest<'_>) -> Result<Arc<dyn Driver>> {
        let config = IpcConfig::from_url(req.url, req.options)?;
        Ok(Arc::new(IpcDriver::new(config, req.member_id.clone())))
    }

    /// Runs `f` on a blocking thread (file and SysV calls that may wait).
    async fn blocking<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| ToozError::backend(NAME, "a blocking task failed", e))?
    }
}

#[tooz_core::async_trait]
impl Driver for IpcDriver {
    fn info(&self) -> DriverInfo {
        DriverInfo::new(NAME, CHARACTERISTICS, false).with_holds_independent_of_lease()
    }

    async fn start(&self) -> Result<()> {
        self.blocking(|i| {
            let unreachable = |what: &str, e: io::Error| {
                ToozError::connection(NAME, format!("{what} {}", i.layout.root.display()), e)
            };
            i.layout
                .create()
                .map_err(|e| unreachable("cannot create the state directory", e))?;
            let alive = i
                .layout
                .make_alive()
                .map_err(|e| unreachable("cannot create a liveness file in", e))?;
            // Python's start creates the group list segment.
            GroupList::attach().map_err(|e| {
                ToozError::connection(NAME, "cannot attach tooz's group list segment", e)
            })?;
            i.layout.prune();
            *i.alive() = Some(alive);
            Ok(())
        })
        .await
    }

    /// Ends this coordinator's liveness. Python's `stop` also removes the group
    /// list segment, for every process on the host; we do not.
    async fn stop(&self) -> Result<()> {
        let alive = self.inner.alive().take();
        drop(alive);
        Ok(())
    }

    async fn heartbeat(&self, held: &Held<'_>) -> Result<Renewal> {
        let mut renewal = Renewal::new(self.inner.config.timeout);
        for (i, l) in held.locks.iter().enumerate() {
            if let Some(lock) = l.downcast::<IpcLock>()
                && let Some(h) = lock.holding()
                && !sem::still_held(h).map_err(|e| io_err("cannot check a lock", e))?
            {
                renewal.lose_lock(i);
            }
        }
        if !held.leading.is_empty() {
            let leading: Vec<(GroupId, FencingToken)> = held.leading.to_vec();
            let lost = self
                .blocking(move |i| {
                    let mine = i.alive_id()?;
                    let mut lost = Vec::new();
                    for (g, token) in leading {
                        let still = i
                            .leader(&g)?
                            .is_some_and(|r| r.alive == mine && r.token == token.0);
                        if !still {
                            lost.push(g);
                        }
                    }
                    Ok(lost)
                })
                .await?;
            for g in lost {
                renewal.lose_leadership(g);
            }
        }
        Ok(renewal)
    }

    #[tracing::instrument(level = "debug", skip_all, fields(group = %group))]
    async fn create_group(&self, group: &GroupId) -> Result<()> {
        let g = group.clone();
        self.blocking(move |i| {
            let _serial = i.serial()?;
            let _lock = InternalLock::take(SERIAL_WAIT).map_err(|e| io_err("internal lock", e))?;
            let (list, mut groups) = i.python_groups()?;
            let ds = i.dir_state(&g)?;
            if Inner::exists_with(ds, groups.contains(&g)) {
                return Err(ToozError::GroupAlreadyExist(g));
            }
            if ds == DirState::Mirrored {
                // Left over from a group Python deleted: start afresh.
                fs::remove_dir_all(i.layout.group_dir(&g))
                    .map_err(|e| io_err(format_args!("cannot clear group {g}"), e))?;
            }
            groups.push(g.clone());
            let mirrored = list
                .write(&groups)
                .map_err(|e| io_err("cannot write the group list", e))?;
            if !mirrored {
                tracing::warn!(group = %g, "tooz's 1 KiB group list is full: Python processes will not list this group");
            }
            i.layout
                .make_group_dir(&g, mirrored)
                .map_err(|e| io_err(format_args!("cannot create group {g}"), e))
        })
        .await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(group = %group))]
    async fn delete_group(&self, group: &GroupId) -> Result<()> {
        let g = group.clone();
        self.blocking(move |i| {
            let _serial = i.serial()?;
            let _lock = InternalLock::take(SERIAL_WAIT).map_err(|e| io_err("internal lock", e))?;
            let (list, mut groups) = i.python_groups()?;
            let listed = groups.contains(&g);
            let dir = i.layout.group_dir(&g);
            if !Inner::exists_with(i.dir_state(&g)?, listed) {
                return Err(ToozError::GroupNotCreated(g));
            }
            let records = i
                .layout
                .member_records(&g)
                .map_err(|e| io_err(format_args!("cannot list group {g}"), e))?;
            for r in &records {
                if i.live(&r.alive)? {
                    return Err(ToozError::GroupNotEmpty(g));
                }
            }
            match fs::remove_dir_all(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(format_args!("cannot remove group {g}"), e)),
            }
            remove_opt(&i.layout.leader_file(&g))
                .map_err(|e| io_err(format_args!("cannot remove the leader of {g}"), e))?;
            if listed {
                groups.retain(|x| *x != g);
                list.write(&groups)
                    .map_err(|e| io_err("cannot write the group list", e))?;
            }
            Ok(())
        })
        .await
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn get_groups(&self) -> Result<Vec<GroupId>> {
        self.blocking(|i| {
            let mut out: BTreeSet<GroupId> = {
                let _lock =
                    InternalLock::take(SERIAL_WAIT).map_err(|e| io_err("internal lock", e))?;
                i.python_groups()?.1.into_iter().collect()
            };
            let dir = i.layout.groups_dir();
            let entries = fs::read_dir(&dir).map_err(|e| io_err("cannot list groups", e))?;
            for entry in entries {
                let entry = entry.map_err(|e| io_err("cannot list groups", e))?;
                // Groups in Python's list are listed from it.
                if let Some(g) = Layout::rust_only_group(&entry.path())
                    .map_err(|e| io_err("cannot read a group", e))?
                {
                    out.insert(g);
                }
            }
            Ok(out.into_iter().collect())
        })
        .await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(group = %group))]
    async fn join_group(&self, group: &GroupId, capabilities: &Capabilities) -> Result<()> {
        let (g, caps) = (group.clone(), capabilities.clone());
        self.blocking(move |i| {
            let alive = i.alive_id()?;
            let _serial = i.serial()?;
            i.require(&g)?;
            i.ensure_dir(&g)?;
            i.layout
                .prune_members(&g)
                .map_err(|e| io_err(format_args!("cannot clean group {g}"), e))?;
            let m = i.member.clone();
            if let Some(r) = i
                .layout
                .member_record(&g, &m)
                .map_err(|e| io_err("cannot read a member", e))?
                && i.live(&r.alive)?
            {
                return Err(ToozError::MemberAlreadyExist {
                    group: g,
                    member: m,
                });
            }
            let now = SystemTime::now();
            i.write_member(
                &g,
                &MemberRecord {
                    member: m,
                    caps,
                    alive,
                    created: Some(now),
                    updated: Some(now),
                },
            )
        })
        .await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(group = %group))]
    async fn leave_group(&self, group: &GroupId) -> Result<()> {
        let g = group.clone();
        self.blocking(move |i| {
            i.alive_id()?;
            let _serial = i.serial()?;
            // Any live record of this member id (another coordinator's too, as
            // tooz lets a coordinator boot out its namesake).
            i.live_record(&g, &i.member)?;
            remove_opt(&i.layout.member_file(&g, &i.member))
                .map_err(|e| io_err(format_args!("cannot leave {g}"), e))
        })
        .await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(group = %group))]
    async fn get_members(&self, group: &GroupId) -> Result<BTreeSet<MemberId>> {
        let g = group.clone();
        self.blocking(move |i| Ok(i.live_records(&g)?.into_iter().map(|r| r.member).collect()))
            .await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(group = %group))]
    async fn get_members_with_capabilities(
        &self,
        group: &GroupId,
    ) -> Result<Vec<(MemberId, Capabilities)>> {
        let g = group.clone();
        self.blocking(move |i| {
            Ok(i.live_records(&g)?
                .into_iter()
                .map(|r| (r.member, r.caps))
                .collect())
        })
        .await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(group = %group, member = %member))]
    async fn get_member_info(&self, group: &GroupId, member: &MemberId) -> Result<MemberInfo> {
        let (g, m) = (group.clone(), member.clone());
        self.blocking(move |i| {
            let r = i.live_record(&g, &m)?;
            Ok(MemberInfo::new(r.caps, r.created, r.updated))
        })
        .await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(group = %group))]
    async fn update_capabilities(
        &self,
        group: &GroupId,
        capabilities: &Capabilities,
    ) -> Result<()> {
        let (g, caps) = (group.clone(), capabilities.clone());
        self.blocking(move |i| {
            i.alive_id()?;
            let _serial = i.serial()?;
            let mut r = i.live_record(&g, &i.member)?;
            r.caps = caps;
            r.updated = Some(SystemTime::now());
            i.write_member(&g, &r)
        })
        .await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(group = %group))]
    async fn campaign(&self, group: &GroupId) -> Result<Option<FencingToken>> {
        let g = group.clone();
        self.blocking(move |i| {
            let alive = i.alive_id()?;
            let _serial = i.serial()?;
            if let Some(r) = i.leader(&g)? {
                return Ok(
                    (r.alive == alive && r.member == i.member).then_some(FencingToken(r.token))
                );
            }
            let token = fence::next(keys::leader_fence_slot(g.as_bytes()))?;
            let rec = LeaderRecord {
                member: i.member.clone(),
                alive,
                token,
            };
            let data = rec
                .encode()
                .map_err(|e| ToozError::serialization("leader record", e))?;
            i.layout
                .write_atomic(&i.layout.leader_file(&g), &data)
                .map_err(|e| io_err(format_args!("cannot write the leader of {g}"), e))?;
            Ok(Some(FencingToken(token)))
        })
        .await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(group = %group))]
    async fn resign(&self, group: &GroupId) -> Result<bool> {
        let g = group.clone();
        self.blocking(move |i| {
            let Ok(alive) = i.alive_id() else {
                return Ok(false);
            };
            let _serial = i.serial()?;
            match i.leader(&g)? {
                Some(r) if r.alive == alive && r.member == i.member => {
                    remove_opt(&i.layout.leader_file(&g))
                        .map_err(|e| io_err(format_args!("cannot resign from {g}"), e))?;
                    Ok(true)
                }
                _ => Ok(false),
            }
        })
        .await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(group = %group))]
    async fn get_leader(&self, group: &GroupId) -> Result<Option<MemberId>> {
        let g = group.clone();
        self.blocking(move |i| Ok(i.leader(&g)?.map(|r| r.member)))
            .await
    }

    fn lock(&self, name: &LockName) -> Result<Arc<dyn DriverLock>> {
        Ok(Arc::new(IpcLock::new(name)))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(group = %group))]
    async fn watch_group(&self, group: &GroupId) -> Result<Option<DriverEventStream>> {
        let g = group.clone();
        self.blocking(move |i| {
            i.require(&g)?;
            let dir = i.layout.group_dir(&g);
            {
                // Python's group: make its directory so that joins can be watched.
                let _serial = i.serial()?;
                i.ensure_dir(&g)?;
            }
            Ok((
                dir,
                i.layout.alive_dir(),
                i.layout.leaders_dir(),
                Layout::leader_name(&g),
            ))
        })
        .await
        .map(|(dir, alive, leaders, leader)| watch::group_stream(&dir, &alive, &leaders, leader))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::os::unix::fs::PermissionsExt;
    use std::path::PathBuf;

    use tooz_core::Registry;

    use super::*;

    /// The tests that look at Python's host-wide list run one at a time (one of
    /// them fills it up).
    static LIST: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    fn temp_root() -> PathBuf {
        std::env::temp_dir().join(format!("tooz-ipc-unit-{}", uuid::Uuid::new_v4()))
    }

    fn unique(what: &str) -> String {
        format!("{what}-{}", uuid::Uuid::new_v4().simple())
    }

    async fn coordinator(root: &std::path::Path, member: &str) -> tooz_core::Coordinator {
        let c = Registry::new()
            .with(crate::DRIVER)
            .connect(&format!("ipc://{}", root.display()), member)
            .unwrap();
        c.start(false).await.unwrap();
        c
    }

    /// Python's `_read_group_list`: a native-endian u16 length, then msgpack.
    fn python_view() -> Vec<rmpv::Value> {
        let list = GroupList::attach().unwrap();
        let _lock = InternalLock::take(SERIAL_WAIT).unwrap();
        list.read()
            .unwrap()
            .into_iter()
            .map(|g| rmpv::Value::Binary(g.as_bytes().to_vec()))
            .collect()
    }

    #[tokio::test]
    async fn groups_go_to_pythons_list_and_python_deletions_count() {
        let _list = LIST.lock().await;
        let root = temp_root();
        let c = coordinator(&root, "m").await;
        let g = unique("unit-g");
        c.create_group(g.as_str()).await.unwrap();
        assert!(python_view().contains(&rmpv::Value::Binary(g.clone().into_bytes())));
        c.join_group(g.as_str(), &()).await.unwrap();
        c.leave_group(g.as_str()).await.unwrap();

        // Python deletes it (rewrites the list without it): gone for us too.
        {
            let list = GroupList::attach().unwrap();
            let _lock = InternalLock::take(SERIAL_WAIT).unwrap();
            let mut groups = list.read().unwrap();
            groups.retain(|x| x.as_bytes() != g.as_bytes());
            assert!(list.write(&groups).unwrap());
        }
        assert!(
            !c.get_groups()
                .await
                .unwrap()
                .contains(&GroupId::from(g.as_str()))
        );
        assert!(matches!(
            c.get_members(g.as_str()).await,
            Err(ToozError::GroupNotCreated(_))
        ));
        // Created again from scratch.
        c.create_group(g.as_str()).await.unwrap();
        assert!(c.get_members(g.as_str()).await.unwrap().is_empty());
        c.delete_group(g.as_str()).await.unwrap();
        assert!(!python_view().contains(&rmpv::Value::Binary(g.into_bytes())));
        c.stop().await.unwrap();
        std::fs::remove_dir_all(root).unwrap();
    }

    #[tokio::test]
    async fn a_group_python_created_can_be_joined() {
        let _list = LIST.lock().await;
        let root = temp_root();
        let c = coordinator(&root, "m").await;
        let g = unique("unit-py");
        {
            let list = GroupList::attach().unwrap();
            let _lock = InternalLock::take(SERIAL_WAIT).unwrap();
            let mut groups = list.read().unwrap();
            groups.push(GroupId::from(g.as_str()));
            assert!(list.write(&groups).unwrap());
        }
        assert!(
            c.get_groups()
                .await
                .unwrap()
                .contains(&GroupId::from(g.as_str()))
        );
        assert!(matches!(
            c.create_group(g.as_str()).await,
            Err(ToozError::GroupAlreadyExist(_))
        ));
        c.join_group(g.as_str(), &()).await.unwrap();
        assert_eq!(
            c.get_members(g.as_str()).await.unwrap(),
            BTreeSet::from([MemberId::from("m")])
        );
        c.leave_group(g.as_str()).await.unwrap();
        c.delete_group(g.as_str()).await.unwrap();
        c.stop().await.unwrap();
        std::fs::remove_dir_all(root).unwrap();
    }

    #[tokio::test]
    async fn a_full_python_list_leaves_groups_to_rust() {
        let _list = LIST.lock().await;
        let root = temp_root();
        let c = coordinator(&root, "m").await;
        // 20 names of 60 bytes overflow the 1 KiB list whatever it holds already.
        let names: Vec<String> = (0..20)
            .map(|i| format!("{}-{i:02}", unique("unit-full-0123456789abcdef")))
            .collect();
        for n in &names {
            c.create_group(n.as_str()).await.unwrap();
        }
        let listed = c.get_groups().await.unwrap();
        let in_python = python_view();
        let mut rust_only = 0;
        for n in &names {
            assert!(listed.contains(&GroupId::from(n.as_str())), "{n}");
            if !in_python.contains(&rmpv::Value::Binary(n.clone().into_bytes())) {
                rust_only += 1;
            }
        }
        assert!(rust_only > 0, "the list never filled up");
        for n in &names {
            assert!(matches!(
                c.create_group(n.as_str()).await,
                Err(ToozError::GroupAlreadyExist(_))
            ));
            c.join_group(n.as_str(), &()).await.unwrap();
            c.leave_group(n.as_str()).await.unwrap();
            c.delete_group(n.as_str()).await.unwrap();
        }
        let listed = c.get_groups().await.unwrap();
        assert!(
            names
                .iter()
                .all(|n| !listed.contains(&GroupId::from(n.as_str())))
        );
        c.stop().await.unwrap();
        std::fs::remove_dir_all(root).unwrap();
    }

    #[tokio::test]
    async fn state_files_are_private() {
        let root = temp_root();
        std::fs::create_dir_all(&root).unwrap();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
        let c = coordinator(&root, "m").await;
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&root), 0o700, "an open state directory is closed");
        let g = unique("unit-perm");
        c.create_group(g.as_str()).await.unwrap();
        c.join_group(g.as_str(), &()).await.unwrap();
        let layout = Layout::new(root.clone());
        let gid = GroupId::from(g.as_str());
        assert_eq!(mode(&layout.group_dir(&gid)), 0o700);
        assert_eq!(mode(&layout.member_file(&gid, &MemberId::from("m"))), 0o600);
        for entry in std::fs::read_dir(layout.alive_dir()).unwrap() {
            assert_eq!(mode(&entry.unwrap().path()), 0o600);
        }
        c.leave_group(g.as_str()).await.unwrap();
        c.delete_group(g.as_str()).await.unwrap();
        c.stop().await.unwrap();
        std::fs::remove_dir_all(root).unwrap();
    }
}
