//! The [`ConsulDriver`]: groups, membership, leadership and locks in Consul's KV
//! store, laid out as Python tooz 8.1.0's consul driver lays them out (see
//! [`crate::keys`]), everything of ours bound to one session per coordinator.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;
use tooz_core::{
    Capabilities, Characteristic, ConnectRequest, Driver, DriverEventStream, DriverInfo,
    DriverLock, FencingToken, GroupId, Held, IdRef, LeaseState, LockName, MemberId, MemberInfo,
    Renewal, Result, ToozError,
};

use crate::client::{Client, Kv, Txn, op};
use crate::config::{ConsulConfig, NAME};
use crate::keys::{self, Layout};
use crate::lock::ConsulLock;
use crate::watch::{Hubs, group_events};

const CHARACTERISTICS: &[Characteristic] = &[
    Characteristic::DistributedAcrossThreads,
    Characteristic::DistributedAcrossProcesses,
    Characteristic::DistributedAcrossHosts,
    Characteristic::Sequential,
    Characteristic::Serializable,
];

/// How often a write retries after a concurrent change.
pub(crate) const CAS_TRIES: usize = 16;

pub(crate) fn guard<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub(crate) fn contention(what: &str) -> ToozError {
    ToozError::Backend {
        driver: NAME,
        message: format!("{what}: the keys kept changing under {CAS_TRIES} attempts"),
        source: None,
        retryable: true,
    }
}

/// Shared state of a driver and its lock handles.
#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) config: ConsulConfig,
    pub(crate) member: MemberId,
    pub(crate) layout: Layout,
    pub(crate) client: Client,
    session: Mutex<Option<String>>,
    lease: LeaseState,
    pub(crate) hubs: Hubs,
    /// Leaderships reported to the coordinator: group → token.
    leading: Mutex<HashMap<GroupId, u64>>,
}

impl Inner {
    /// The current session (`NotStarted` before `start`).
    pub(crate) fn session(&self) -> Result<String> {
        guard(&self.session).clone().ok_or(ToozError::NotStarted)
    }

    pub(crate) fn on_session(&self, s: &str) -> bool {
        guard(&self.session).as_deref() == Some(s)
    }

    /// Runs `op` (an owner-checked cleanup) in a task of its own until it goes
    /// through; stops once `session` is gone (so is whatever hung on it).
    pub(crate) fn spawn_cleanup<F, Fut>(
        self: &Arc<Self>,
        session: String,
        what: &'static str,
        op: F,
    ) where
        F: Fn(Arc<Inner>, String) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<()>> + Send + 'static,
    {
        let weak: Weak<Inner> = Arc::downgrade(self);
        tooz_core::util::spawn_cleanup(NAME, what, None, move || {
            let work = weak
                .upgrade()
                .filter(|i| i.on_session(&session))
                .map(|i| op(i, session.clone()));
            async move {
                match work {
                    Some(w) => w.await,
                    None => Ok(()),
                }
            }
        });
    }

    async fn new_session(&self) -> Result<(String, Instant)> {
        let sent = Instant::now();
        let name = self.member.to_string_lossy();
        let id = self
            .client
            .session_create(&name, self.config.ttl, self.config.lock_delay)
            .await?;
        Ok((id, sent))
    }

    /// The group's entries, `GroupNotCreated` without its key.
    async fn group_entries(&self, what: &str, group: &GroupId) -> Result<(String, Vec<Kv>)> {
        let gk = self.layout.group(group.as_bytes());
        let (entries, _) = self.client.list(what, &gk).await?;
        if !entries.iter().any(|k| k.key == gk) {
            return Err(ToozError::GroupNotCreated(group.clone()));
        }
        Ok((gk, entries))
    }

    fn not_joined(&self, group: &GroupId, member: &MemberId) -> ToozError {
        ToozError::MemberNotJoined {
            group: group.clone(),
            member: member.clone(),
        }
    }

    /// Frees the leader key of `group` if our session holds it and the
    /// coordinator does not know the leadership (a campaign whose reply was lost).
    async fn resolve_campaign(&self, group: &GroupId, session: &str) -> Result<()> {
        let lk = self.layout.leader(group.as_bytes());
        let Some(kv) = self.client.get("resolving a campaign", &lk).await? else {
            return Ok(());
        };
        if kv.holder() != Some(session) || guard(&self.leading).contains_key(group) {
            return Ok(());
        }
        self.client
            .txn(
                "resolving a campaign",
                vec![op::check_index(&lk, kv.modify_index), op::delete(&lk)],
            )
            .await
            .map(|_| ())
    }

    async fn drop_leader_key(&self, group: &GroupId, session: &str) -> Result<bool> {
        let lk = self.layout.leader(group.as_bytes());
        let r = self
            .client
            .txn(
                "stand_down_group_leader",
                vec![op::check_session(&lk, session), op::delete(&lk)],
            )
            .await?;
        Ok(matches!(r, Txn::Applied(_)))
    }

    /// Takes Python's group lock (`<ns>/group_locks/<group>`), waiting a little
    /// while a Python join or delete holds it.
    async fn take_group_lock(&self, group: &GroupId, session: &str) -> Result<String> {
        let key = self.layout.group_lock(group.as_bytes());
        let until = Instant::now() + self.config.timeout;
        let mut backoff =
            tooz_core::util::Backoff::new(Duration::from_millis(10), Duration::from_millis(200));
        loop {
            let r = self
                .client
                .txn(
                    "delete_group",
                    vec![op::lock(&key, session.as_bytes(), session, 0)],
                )
                .await?;
            if matches!(r, Txn::Applied(_)) {
                return Ok(key);
            }
            if Instant::now() >= until {
                return Err(ToozError::OperationTimedOut(format!(
                    "consul: delete_group: the group lock {key} stayed held for {:?}",
                    self.config.timeout
                )));
            }
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }
}

/// A coordination backend on Consul's HTTP API, sharing its keys with Python
/// tooz 8.1.0's consul driver. See the crate documentation.
///
/// Most code connects through a [`tooz_core::Registry`] with [`crate::DRIVER`].
#[derive(Debug, Clone)]
pub struct ConsulDriver {
    inner: Arc<Inner>,
}

impl ConsulDriver {
    /// A driver for `member` (nothing is contacted before `start`).
    ///
    /// # Errors
    /// `InvalidOption` for an unreadable `ca_cert`.
    pub fn new(config: ConsulConfig, member: MemberId) -> Result<Self> {
        Ok(ConsulDriver {
            inner: Arc::new(Inner {
                client: Client::new(&config)?,
                layout: Layout::new(&config.namespace),
                config,
                member,
                session: Mutex::new(None),
                lease: LeaseState::new(),
                hubs: Hubs::new(),
                leading: Mutex::new(HashMap::new()),
            }),
        })
    }

    pub(crate) fn connect(req: &ConnectRequest<'_>) -> Result<Arc<dyn Driver>> {
        let config = ConsulConfig::from_request(req)?;
        Ok(Arc::new(ConsulDriver::new(config, req.member_id.clone())?))
    }

    /// The settings of this driver.
    pub fn config(&self) -> &ConsulConfig {
        &self.inner.config
    }

    /// The id of the coordinator's current Consul session (`None` before
    /// `start`). Every membership, lock and leadership of this coordinator hangs
    /// on it.
    pub fn session_id(&self) -> Option<String> {
        guard(&self.inner.session).clone()
    }
}

/// Group and member ids may not contain `/` (the layout's separator).
fn check_no_slash(kind: &'static str, bytes: &[u8], shown: String) -> Result<()> {
    if bytes.contains(&b'/') {
        return Err(ToozError::InvalidId {
            kind,
            id: shown,
            reason: "Consul ids of groups and members cannot contain '/' (the key layout's separator: group `a` would hold group `a/b`)".into(),
        });
    }
    Ok(())
}

#[tooz_core::async_trait]
impl Driver for ConsulDriver {
    fn info(&self) -> DriverInfo {
        DriverInfo::new(NAME, CHARACTERISTICS, true)
    }

    fn check_id(&self, id: IdRef<'_>) -> Result<()> {
        match id {
            IdRef::Group(g) => check_no_slash("group id", g.as_bytes(), g.to_string()),
            IdRef::Member(m) => check_no_slash("member id", m.as_bytes(), m.to_string()),
            _ => Ok(()),
        }
    }

    #[tracing::instrument(level = "debug", skip_all, fields(member = %self.inner.member))]
    async fn start(&self) -> Result<()> {
        let i = &self.inner;
        i.hubs.restart();
        let (id, sent) = i.new_session().await?;
        *guard(&i.session) = Some(id);
        i.lease.replaced(sent, i.config.ttl);
        Ok(())
    }

    #[tracing::instrument(level = "debug", skip_all, fields(member = %self.inner.member))]
    async fn stop(&self) -> Result<()> {
        let i = &self.inner;
        i.hubs.stop();
        guard(&i.leading).clear();
        let session = guard(&i.session).take();
        if let Some(s) = session {
            // Destroying the session deletes every key it holds (Behavior delete).
            if let Err(e) = i.client.session_destroy(&s).await {
                tracing::warn!(error = %e, "consul: destroying the session on stop failed; it expires after its TTL");
            }
        }
        Ok(())
    }

    /// One session renewal renews every membership, lock and leadership: they
    /// all hang on the session. A session Consul no longer knows is reported
    /// lost and replaced.
    #[tracing::instrument(level = "debug", skip_all)]
    async fn heartbeat(&self, _held: &Held<'_>) -> Result<Renewal> {
        let i = &self.inner;
        let s = i.session()?;
        if i.client.session_renew(&s).await? {
            return Ok(Renewal::new(i.config.ttl));
        }
        tracing::warn!(session = %s, "consul: the session was invalidated; memberships, locks and leaderships on it are lost");
        i.lease.lost();
        guard(&i.leading).clear();
        let (id, sent) = i.new_session().await?;
        *guard(&i.session) = Some(id);
        i.lease.replaced(sent, i.config.ttl);
        Ok(Renewal::new(i.config.ttl))
    }

    fn lease(&self) -> Option<LeaseState> {
        Some(self.inner.lease.clone())
    }

    #[tracing::instrument(level = "debug", skip_all, fields(group = %group))]
    async fn create_group(&self, group: &GroupId) -> Result<()> {
        let i = &self.inner;
        let gk = i.layout.group(group.as_bytes());
        match i
            .client
            .txn("create_group", vec![op::cas(&gk, b"", 0)])
            .await?
        {
            Txn::Applied(_) => Ok(()),
            Txn::Failed(_) => Err(ToozError::GroupAlreadyExist(group.clone())),
        }
    }

    /// Under Python's group lock (so no Python join slips in): the group key goes
    /// only if it has no member key.
    #[tracing::instrument(level = "debug", skip_all, fields(group = %group))]
    async fn delete_group(&self, group: &GroupId) -> Result<()> {
        let i = &self.inner;
        let s = i.session()?;
        let glk = i.take_group_lock(group, &s).await?;
        let res = async {
            for _ in 0..CAS_TRIES {
                let (gk, entries) = i.group_entries("delete_group", group).await?;
                if entries.iter().any(|k| k.key != gk) {
                    return Err(ToozError::GroupNotEmpty(group.clone()));
                }
                let idx = entries
                    .iter()
                    .find(|k| k.key == gk)
                    .map_or(0, |k| k.modify_index);
                let r = i
                    .client
                    .txn(
                        "delete_group",
                        vec![op::check_index(&gk, idx), op::delete(&gk), op::delete(&glk)],
                    )
                    .await?;
                if matches!(r, Txn::Applied(_)) {
                    return Ok(());
                }
            }
            Err(contention("delete_group"))
        }
        .await;
        if res.is_err() {
            let r = i
                .client
                .txn(
                    "delete_group",
                    vec![op::check_session(&glk, &s), op::delete(&glk)],
                )
                .await;
            if let Err(e) = r {
                tracing::debug!(error = %e, "consul: releasing the group lock failed");
            }
        }
        res
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn get_groups(&self) -> Result<Vec<GroupId>> {
        let i = &self.inner;
        let keys = i.client.keys("get_groups", &i.layout.groups()).await?;
        Ok(keys
            .iter()
            .filter_map(|k| i.layout.group_of(k))
            .map(GroupId::new)
            .collect())
    }

    /// One transaction: the group key exists, the member key does not, and the
    /// member key is created held by the session (so it goes with it).
    #[tracing::instrument(level = "debug", skip_all, fields(group = %group))]
    async fn join_group(&self, group: &GroupId, capabilities: &Capabilities) -> Result<()> {
        let i = &self.inner;
        let s = i.session()?;
        let gk = i.layout.group(group.as_bytes());
        let mk = i.layout.member(group.as_bytes(), i.member.as_bytes());
        let now = now_secs();
        // A member key of an invalidated session is under Consul's lock delay for
        // a while: retry through it.
        let until = Instant::now() + i.config.lock_delay + Duration::from_secs(1);
        loop {
            let r = i
                .client
                .txn(
                    "join_group",
                    vec![
                        op::get(&gk),
                        op::check_not_exists(&mk),
                        op::lock(
                            &mk,
                            capabilities.as_msgpack(),
                            &s,
                            keys::times_flags(now, now),
                        ),
                    ],
                )
                .await?;
            match r {
                Txn::Applied(_) => return Ok(()),
                r if r.failed_at(0) => return Err(ToozError::GroupNotCreated(group.clone())),
                r if r.failed_at(1) => {
                    return Err(ToozError::MemberAlreadyExist {
                        group: group.clone(),
                        member: i.member.clone(),
                    });
                }
                r @ Txn::Failed(_) if r.invalid_session() => {
                    return Err(ToozError::Backend {
                        driver: NAME,
                        message: "join_group: the coordinator's session is gone; the next heartbeat replaces it".into(),
                        source: None,
                        retryable: true,
                    });
                }
                Txn::Failed(e) => {
                    if Instant::now() >= until || !i.on_session(&s) {
                        return Err(ToozError::backend_msg(
                            NAME,
                            format!("join_group: the member key was refused: {e:?}"),
                        ));
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    #[tracing::instrument(level = "debug", skip_all, fields(group = %group))]
    async fn leave_group(&self, group: &GroupId) -> Result<()> {
        let i = &self.inner;
        let gk = i.layout.group(group.as_bytes());
        let mk = i.layout.member(group.as_bytes(), i.member.as_bytes());
        let r = i
            .client
            .txn(
                "leave_group",
                vec![op::get(&gk), op::get(&mk), op::delete(&mk)],
            )
            .await?;
        match r {
            Txn::Applied(_) => Ok(()),
            r if r.failed_at(0) => Err(ToozError::GroupNotCreated(group.clone())),
            _ => Err(i.not_joined(group, &i.member)),
        }
    }

    #[tracing::instrument(level = "debug", skip_all, fields(group = %group))]
    async fn get_members(&self, group: &GroupId) -> Result<BTreeSet<MemberId>> {
        // Key names only: the capabilities stay on the server.
        let gk = self.inner.layout.group(group.as_bytes());
        let keys = self.inner.client.keys("get_members", &gk).await?;
        if !keys.contains(&gk) {
            return Err(ToozError::GroupNotCreated(group.clone()));
        }
        Ok(keys
            .iter()
            .filter_map(|k| Layout::member_of(&gk, k))
            .map(MemberId::new)
            .collect())
    }

    #[tracing::instrument(level = "debug", skip_all, fields(group = %group))]
    async fn get_members_with_capabilities(
        &self,
        group: &GroupId,
    ) -> Result<Vec<(MemberId, Capabilities)>> {
        let (gk, entries) = self
            .inner
            .group_entries("get_members_with_capabilities", group)
            .await?;
        Ok(entries
            .iter()
            .filter_map(|k| {
                Layout::member_of(&gk, &k.key)
                    .map(|m| (MemberId::new(m), Capabilities::from_msgpack(k.bytes())))
            })
            .collect())
    }

    #[tracing::instrument(level = "debug", skip_all, fields(group = %group, member = %member))]
    async fn get_member_info(&self, group: &GroupId, member: &MemberId) -> Result<MemberInfo> {
        let i = &self.inner;
        let (_, entries) = i.group_entries("get_member_info", group).await?;
        let mk = i.layout.member(group.as_bytes(), member.as_bytes());
        let kv = entries
            .iter()
            .find(|k| k.key == mk)
            .ok_or_else(|| i.not_joined(group, member))?;
        let times = keys::flags_times(kv.flags);
        let at = |s: u64| UNIX_EPOCH + Duration::from_secs(s);
        Ok(MemberInfo::new(
            Capabilities::from_msgpack(kv.bytes()),
            times.map(|(c, _)| at(c)),
            times.map(|(_, u)| at(u)),
        ))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(group = %group))]
    async fn update_capabilities(
        &self,
        group: &GroupId,
        capabilities: &Capabilities,
    ) -> Result<()> {
        let i = &self.inner;
        let s = i.session()?;
        let mk = i.layout.member(group.as_bytes(), i.member.as_bytes());
        for _ in 0..CAS_TRIES {
            let (_, entries) = i.group_entries("update_capabilities", group).await?;
            let kv = entries
                .iter()
                .find(|k| k.key == mk)
                .ok_or_else(|| i.not_joined(group, &i.member))?;
            let now = now_secs();
            let created = keys::flags_times(kv.flags).map_or(now, |(c, _)| c);
            let flags = keys::times_flags(created, now.max(created));
            let write = match kv.holder() {
                Some(h) if h == s => op::lock(&mk, capabilities.as_msgpack(), &s, flags),
                // A Python member of our id (not bound to a session): keep it so.
                _ => op::cas(&mk, capabilities.as_msgpack(), kv.modify_index),
            };
            let r = i
                .client
                .txn(
                    "update_capabilities",
                    vec![op::check_index(&mk, kv.modify_index), write],
                )
                .await?;
            if matches!(r, Txn::Applied(_)) {
                return Ok(());
            }
        }
        Err(contention("update_capabilities"))
    }

    /// Acquires the leader key with the session; the key's modify index after
    /// the grant is the token. Our own session's earlier grant (a campaign whose
    /// reply was lost) is adopted.
    #[tracing::instrument(level = "debug", skip_all, fields(group = %group))]
    async fn campaign(&self, group: &GroupId) -> Result<Option<FencingToken>> {
        let i = &self.inner;
        let s = i.session()?;
        if let Some(t) = guard(&i.leading).get(group) {
            return Ok(Some(FencingToken(*t)));
        }
        let lk = i.layout.leader(group.as_bytes());
        let r = i
            .client
            .txn("campaign", vec![op::lock(&lk, i.member.as_bytes(), &s, 0)])
            .await;
        match r {
            Ok(Txn::Applied(kvs)) => {
                let token = kvs.first().map_or(0, |k| k.modify_index);
                guard(&i.leading).insert(group.clone(), token);
                Ok(Some(FencingToken(token)))
            }
            Ok(Txn::Failed(_)) => Ok(None),
            Err(e) => {
                let g = group.clone();
                Arc::clone(i).spawn_cleanup(s, "unconfirmed leadership", move |i, s| {
                    let g = g.clone();
                    async move { i.resolve_campaign(&g, &s).await }
                });
                Err(e)
            }
        }
    }

    #[tracing::instrument(level = "debug", skip_all, fields(group = %group))]
    async fn resign(&self, group: &GroupId) -> Result<bool> {
        let i = &self.inner;
        let s = i.session()?;
        let known = guard(&i.leading).remove(group).is_some();
        match i.drop_leader_key(group, &s).await {
            Ok(led) => Ok(led),
            Err(e) => {
                if known {
                    let g = group.clone();
                    Arc::clone(i).spawn_cleanup(s, "leadership release", move |i, s| {
                        let g = g.clone();
                        async move { i.drop_leader_key(&g, &s).await.map(|_| ()) }
                    });
                }
                Err(e)
            }
        }
    }

    #[tracing::instrument(level = "debug", skip_all, fields(group = %group))]
    async fn get_leader(&self, group: &GroupId) -> Result<Option<MemberId>> {
        let i = &self.inner;
        let kv = i
            .client
            .get("get_leader", &i.layout.leader(group.as_bytes()))
            .await?;
        Ok(kv
            .filter(|k| k.holder().is_some())
            .map(|k| MemberId::new(k.bytes())))
    }

    fn lock(&self, name: &LockName) -> Result<Arc<dyn DriverLock>> {
        Ok(Arc::new(ConsulLock::new(
            Arc::clone(&self.inner),
            name.clone(),
        )))
    }

    /// Blocking queries on the group's prefix (for the first 4 watched groups) or
    /// on the prefix of every group (`<ns>/groups/`, key names only, shared by the
    /// rest), and on the leader keys: at most 6 long-polls (connections) however
    /// many groups are watched.
    #[tracing::instrument(level = "debug", skip_all, fields(group = %group))]
    async fn watch_group(&self, group: &GroupId) -> Result<Option<DriverEventStream>> {
        let i = &self.inner;
        let (gk, entries) = i.group_entries("watch_group", group).await?;
        let all = i.layout.groups();
        let prefix = if i.hubs.under(&all) < crate::watch::OWN_GROUP_POLLS {
            gk.as_str()
        } else {
            all.as_str()
        };
        let members_rx = i.hubs.subscribe_keys(&i.client, prefix);
        let leaders_rx = i.hubs.subscribe(&i.client, &i.layout.leaders());
        Ok(Some(group_events(
            members_rx,
            leaders_rx,
            gk,
            i.layout.leader(group.as_bytes()),
            &entries,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slashes_are_refused() {
        let d = ConsulDriver::new(
            ConsulConfig::from_url_str("consul://localhost").unwrap(),
            "m".into(),
        )
        .unwrap();
        assert!(matches!(
            d.check_id(IdRef::Group(&GroupId::from("a/b"))),
            Err(ToozError::InvalidId { .. })
        ));
        assert!(d.check_id(IdRef::Lock(&LockName::from("a/b"))).is_ok());
        assert!(d.info().requires_beating);
    }
}
