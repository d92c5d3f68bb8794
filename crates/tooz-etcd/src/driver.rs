//! The [`EtcdDriver`]: groups, membership, leadership and locks in etcd v3, laid
//! out as Python tooz's etcd3gw driver lays them out, all on one lease per
//! coordinator.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, GetResponse, KeyValue,
    LeaseKeepAliveStream, LeaseKeeper, PutOptions, Txn, TxnOp, TxnOpResponse, TxnResponse,
};
use tooz_core::{
    Capabilities, Characteristic, ConnectRequest, Driver, DriverEventStream, DriverInfo,
    DriverLock, FencingToken, GroupId, Held, IdRef, LeaseState, LockName, MemberId, MemberInfo,
    Renewal, Result, ToozError,
};

use crate::config::EtcdConfig;
use crate::error::lease_not_found;
pub(crate) use crate::error::map_err;
use crate::keys;
use crate::lock::EtcdLock;
use crate::watch::group_events;

const CHARACTERISTICS: &[Characteristic] = &[
    Characteristic::DistributedAcrossThreads,
    Characteristic::DistributedAcrossProcesses,
    Characteristic::DistributedAcrossHosts,
    Characteristic::Linearizable,
    Characteristic::Serializable,
];

pub(crate) fn guard<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

fn parse_times(v: &[u8]) -> Option<(u64, u64)> {
    let s = std::str::from_utf8(v).ok()?;
    let (c, u) = s.split_once(' ')?;
    Some((c.parse().ok()?, u.parse().ok()?))
}

fn ttl_secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs_f64().ceil() as u64)
        .unwrap_or(i64::MAX)
        .max(1)
}

/// The gets of a transaction's responses, in order (`None` for other ops).
pub(crate) fn gets(r: &TxnResponse) -> Vec<Option<GetResponse>> {
    r.op_responses()
        .into_iter()
        .map(|o| match o {
            TxnOpResponse::Get(g) => Some(g),
            _ => None,
        })
        .collect()
}

/// The first key-value of the `i`-th response of a transaction, if a get found one.
pub(crate) fn got(r: &[Option<GetResponse>], i: usize) -> Option<KeyValue> {
    r.get(i)?.as_ref()?.kvs().first().cloned()
}

/// The revision a response was served at.
pub(crate) fn revision(r: &TxnResponse) -> i64 {
    r.header().map_or(0, |h| h.revision())
}

/// The coordinator's lease.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Lease {
    pub(crate) id: i64,
    /// Bumped whenever a new lease replaces a lost one.
    pub(crate) epoch: u64,
}

type KeepAlive = (LeaseKeeper, LeaseKeepAliveStream);

/// Shared state of a driver and its lock handles.
pub(crate) struct Inner {
    pub(crate) config: EtcdConfig,
    pub(crate) member: MemberId,
    client: Mutex<Option<Client>>,
    /// Index in `config.endpoints()` of the member `client` talks to.
    endpoint_at: Mutex<usize>,
    lease: Mutex<Option<Lease>>,
    keeper: tokio::sync::Mutex<Option<KeepAlive>>,
    /// The lease's state, for the coordinator (see `tooz_core::lease`).
    lease_state: LeaseState,
    /// When this member joined each group (µs), for `updated`'s `created` time.
    joined_at: Mutex<HashMap<GroupId, u64>>,
    /// Leaderships reported to the coordinator: group → (lease, create revision of
    /// the leader key). A leader key of ours that is not here was granted by a
    /// campaign whose reply was lost.
    leading: Mutex<HashMap<GroupId, (i64, i64)>>,
    next_lock: AtomicU64,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("config", &self.config)
            .field("member", &self.member)
            .field("lease", &*guard(&self.lease))
            .finish_non_exhaustive()
    }
}

impl Inner {
    pub(crate) fn client(&self) -> Result<Client> {
        guard(&self.client).clone().ok_or(ToozError::NotStarted)
    }

    pub(crate) fn lease(&self) -> Result<Lease> {
        (*guard(&self.lease)).ok_or(ToozError::NotStarted)
    }

    pub(crate) async fn txn(&self, what: &str, txn: Txn) -> Result<TxnResponse> {
        let mut c = self.client()?;
        c.txn(txn).await.map_err(|e| map_err(what, e))
    }

    pub(crate) async fn get(
        &self,
        what: &str,
        key: Vec<u8>,
        opts: Option<GetOptions>,
    ) -> Result<GetResponse> {
        let mut c = self.client()?;
        c.get(key, opts).await.map_err(|e| map_err(what, e))
    }

    /// Whether `lease` is still the coordinator's lease (everything on an older
    /// one went with it: revoked on stop, expired, replaced).
    pub(crate) fn on_lease(&self, lease: i64) -> bool {
        self.lease().is_ok_and(|l| l.id == lease)
    }

    /// Runs `op` (an ownership-checked cleanup: of a hold whose grant was never
    /// confirmed, or whose release failed) in a task of its own, retrying with
    /// backoff until it goes through. Stops early once `lease` is gone (so is
    /// whatever hung on it), the driver is dropped, or after a few errors that
    /// retrying cannot help with.
    pub(crate) fn spawn_cleanup<F, Fut>(self: &Arc<Self>, lease: i64, what: &'static str, op: F)
    where
        F: Fn(Arc<Inner>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<()>> + Send + 'static,
    {
        let weak: Weak<Inner> = Arc::downgrade(self);
        tooz_core::util::spawn_cleanup("etcd3", what, None, move || {
            let work = weak
                .upgrade()
                .filter(|inner| inner.on_lease(lease))
                .map(&op);
            async move {
                match work {
                    Some(done) => done.await,
                    // The driver or the lease is gone, and with it what this frees.
                    None => Ok(()),
                }
            }
        });
    }

    /// Deletes the leader key of `group` if it is ours (`member`, on `lease`)
    /// and, when given, was created at `created`.
    async fn drop_leader_key(
        &self,
        group: &GroupId,
        lease: i64,
        created: Option<i64>,
    ) -> Result<bool> {
        let lk = keys::leader(group.as_bytes());
        let mut when = vec![
            Compare::value(
                lk.clone(),
                CompareOp::Equal,
                self.member.as_bytes().to_vec(),
            ),
            Compare::lease(lk.clone(), CompareOp::Equal, lease),
        ];
        if let Some(c) = created {
            when.push(Compare::create_revision(lk.clone(), CompareOp::Equal, c));
        }
        let r = self
            .txn(
                "stand_down_group_leader",
                Txn::new()
                    .when(when)
                    .and_then(vec![TxnOp::delete(lk, None)]),
            )
            .await?;
        Ok(r.succeeded())
    }

    /// After a campaign whose outcome is unknown: frees the leader key if a grant
    /// of ours that the coordinator never heard of holds it.
    async fn resolve_campaign(&self, group: &GroupId, lease: i64) -> Result<()> {
        let r = self
            .get("resolving a campaign", keys::leader(group.as_bytes()), None)
            .await?;
        let Some(kv) = r.kvs().first() else {
            return Ok(());
        };
        if kv.value() != self.member.as_bytes() || kv.lease() != lease {
            return Ok(());
        }
        let known = guard(&self.leading).get(group).copied();
        if known == Some((lease, kv.create_revision())) {
            // Another campaign reported this grant: it is the coordinator's.
            return Ok(());
        }
        self.drop_leader_key(group, lease, Some(kv.create_revision()))
            .await
            .map(|_| ())
    }

    async fn grant(&self) -> Result<(i64, Duration)> {
        let mut c = self.client()?;
        let ttl = ttl_secs(self.config.lease_ttl());
        let r = c
            .lease_grant(ttl, None)
            .await
            .map_err(|e| map_err("granting the lease", e))?;
        Ok((r.id(), Duration::from_secs(r.ttl().max(1) as u64)))
    }

    /// One keep-alive: `Ok(true)` renewed, `Ok(false)` the lease is gone.
    async fn keep_alive(&self, id: i64) -> Result<bool> {
        let mut k = self.keeper.lock().await;
        let limit = self.config.timeout;
        if k.is_none() {
            let mut c = self.client()?;
            return match tokio::time::timeout(limit, c.lease_keep_alive(id)).await {
                Ok(Ok(pair)) => {
                    *k = Some(pair);
                    Ok(true)
                }
                Ok(Err(e)) if lease_not_found(&e) => Ok(false),
                Ok(Err(e)) => Err(map_err("lease keep-alive", e)),
                Err(_) => Err(ToozError::OperationTimedOut(format!(
                    "etcd: lease keep-alive: no answer within {limit:?}"
                ))),
            };
        }
        let res = match k.as_mut() {
            Some((keeper, stream)) => {
                let once = async {
                    keeper.keep_alive().await?;
                    stream.message().await
                };
                tokio::time::timeout(limit, once).await
            }
            None => return Err(ToozError::backend_msg("etcd3", "keep-alive stream missing")),
        };
        match res {
            Ok(Ok(Some(r))) if r.ttl() > 0 => Ok(true),
            Ok(Ok(Some(_))) => {
                *k = None;
                Ok(false)
            }
            Ok(Ok(None)) => {
                *k = None;
                Err(ToozError::connection(
                    "etcd3",
                    "the lease keep-alive stream ended",
                    std::io::Error::other("stream ended"),
                ))
            }
            Ok(Err(e)) => {
                *k = None;
                Err(map_err("lease keep-alive", e))
            }
            Err(_) => {
                *k = None;
                Err(ToozError::OperationTimedOut(format!(
                    "etcd: lease keep-alive: no answer within {limit:?}"
                )))
            }
        }
    }

    /// A fresh `created updated` value for the member-times key.
    fn times_value(&self, group: &GroupId, joining: bool) -> Vec<u8> {
        let now = now_us();
        let mut j = guard(&self.joined_at);
        let created = if joining {
            j.insert(group.clone(), now);
            now
        } else {
            *j.entry(group.clone()).or_insert(now)
        };
        format!("{created} {now}").into_bytes()
    }

    /// Joins (`joining`) or updates the capabilities of this member in one transaction:
    /// the group must exist, and the member key must be absent (join) or present (update).
    async fn put_member(
        &self,
        group: &GroupId,
        capabilities: &Capabilities,
        joining: bool,
    ) -> Result<()> {
        let lease = self.lease()?;
        let gk = keys::group(group.as_bytes());
        let mk = keys::member(group.as_bytes(), self.member.as_bytes());
        let tk = keys::member_times(group.as_bytes(), self.member.as_bytes());
        let times = self.times_value(group, joining);
        let put = || Some(PutOptions::new().with_lease(lease.id));
        let (what, member_op) = if joining {
            ("join_group", CompareOp::Equal)
        } else {
            ("update_capabilities", CompareOp::Greater)
        };
        let r = self
            .txn(
                what,
                Txn::new()
                    .when(vec![
                        Compare::version(gk.clone(), CompareOp::Greater, 0),
                        Compare::create_revision(mk.clone(), member_op, 0),
                    ])
                    .and_then(vec![
                        TxnOp::put(mk, capabilities.as_msgpack().to_vec(), put()),
                        TxnOp::put(tk, times, put()),
                    ])
                    .or_else(vec![TxnOp::get(
                        gk,
                        Some(GetOptions::new().with_keys_only()),
                    )]),
            )
            .await?;
        let (group, member) = (group.clone(), self.member.clone());
        if r.succeeded() {
            Ok(())
        } else if got(&gets(&r), 0).is_none() {
            Err(ToozError::GroupNotCreated(group))
        } else if joining {
            Err(ToozError::MemberAlreadyExist { group, member })
        } else {
            Err(ToozError::MemberNotJoined { group, member })
        }
    }

    /// Group key, member key and times key of `member` read in one transaction.
    async fn member_read(
        &self,
        group: &GroupId,
        member: &MemberId,
    ) -> Result<(KeyValue, Option<KeyValue>)> {
        let (gk, mk) = (
            keys::group(group.as_bytes()),
            keys::member(group.as_bytes(), member.as_bytes()),
        );
        let tk = keys::member_times(group.as_bytes(), member.as_bytes());
        let r = self
            .txn(
                "get_member",
                Txn::new().and_then(vec![
                    TxnOp::get(gk, None),
                    TxnOp::get(mk, None),
                    TxnOp::get(tk, None),
                ]),
            )
            .await?;
        let g = gets(&r);
        if got(&g, 0).is_none() {
            return Err(ToozError::GroupNotCreated(group.clone()));
        }
        match got(&g, 1) {
            Some(m) => Ok((m, got(&g, 2))),
            None => Err(ToozError::MemberNotJoined {
                group: group.clone(),
                member: member.clone(),
            }),
        }
    }

    /// Every member key of a group (`GroupNotCreated` without the group key).
    async fn member_kvs(&self, group: &GroupId, keys_only: bool) -> Result<Vec<KeyValue>> {
        let gk = keys::group(group.as_bytes());
        let mut o = GetOptions::new().with_prefix();
        if keys_only {
            o = o.with_keys_only();
        }
        let mut r = self.get("get_members", gk.clone(), Some(o)).await?;
        let kvs = r.take_kvs();
        if !kvs.iter().any(|kv| kv.key() == gk.as_slice()) {
            return Err(ToozError::GroupNotCreated(group.clone()));
        }
        Ok(kvs
            .into_iter()
            .filter(|kv| keys::member_of_key(&gk, kv.key()).is_some_and(|m| !m.contains(&b'/')))
            .collect())
    }
}

pub(crate) fn check_group(g: &GroupId) -> Result<()> {
    if g.as_bytes().contains(&b'/') {
        return Err(ToozError::InvalidId {
            kind: "group id",
            id: g.to_string(),
            reason: "etcd group ids cannot contain '/' (with Python tooz's key layout group `a` would be a prefix of group `a/b`)".into(),
        });
    }
    Ok(())
}

/// A coordination backend on etcd v3 (gRPC), sharing its keys with Python tooz's
/// etcd3gw driver. See the crate documentation for the layout and semantics.
///
/// ```no_run
/// use std::sync::Arc;
/// use tooz_core::{Coordinator, MemberId};
/// use tooz_etcd::{EtcdConfig, EtcdDriver};
///
/// let member = MemberId::from("worker-1");
/// let config = EtcdConfig::from_url_str("etcd3+http://127.0.0.1:2379?timeout=10")?;
/// let driver = EtcdDriver::new(config, member.clone());
/// let coord = Coordinator::new(Arc::new(driver), member, "etcd3+http://127.0.0.1:2379");
/// # Ok::<(), tooz_core::ToozError>(())
/// ```
#[derive(Debug, Clone)]
pub struct EtcdDriver {
    inner: Arc<Inner>,
}

impl EtcdDriver {
    /// A driver for `member` (nothing is contacted before `start`).
    pub fn new(config: EtcdConfig, member: MemberId) -> Self {
        EtcdDriver {
            inner: Arc::new(Inner {
                config,
                member,
                client: Mutex::new(None),
                endpoint_at: Mutex::new(0),
                lease: Mutex::new(None),
                keeper: tokio::sync::Mutex::new(None),
                lease_state: LeaseState::new(),
                joined_at: Mutex::new(HashMap::new()),
                leading: Mutex::new(HashMap::new()),
                next_lock: AtomicU64::new(0),
            }),
        }
    }

    /// The factory registered by [`crate::DRIVER`].
    pub(crate) fn connect(req: &ConnectRequest<'_>) -> Result<Arc<dyn Driver>> {
        let config = EtcdConfig::from_url(req.url, req.options)?;
        Ok(Arc::new(EtcdDriver::new(config, req.member_id.clone())))
    }

    /// The settings of this driver.
    pub fn config(&self) -> &EtcdConfig {
        &self.inner.config
    }

    /// The id of the coordinator's current lease (`None` before `start`). Every
    /// membership, lock and leadership of this coordinator hangs on it.
    pub fn lease_id(&self) -> Option<i64> {
        (*guard(&self.inner.lease)).map(|l| l.id)
    }
}

/// A client of the first member, from the `from`-th on (wrapping around), that
/// answers, and its index in `config.endpoints()`. With a single endpoint, connecting
/// is lazy (the first request shows whether it answers); with several, a status
/// request picks one that does.
async fn connect_first(
    config: &EtcdConfig,
    opts: &ConnectOptions,
    from: usize,
) -> Result<(Client, usize)> {
    let endpoints = config.endpoints();
    let probe = endpoints.len() > 1;
    let mut last_err = None;
    for step in 0..endpoints.len() {
        let at = (from + step) % endpoints.len();
        let endpoint = &endpoints[at];
        let attempt = async {
            let mut c = Client::connect([endpoint.as_str()], Some(opts.clone())).await?;
            if probe {
                c.status().await?;
            }
            Ok::<_, etcd_client::Error>(c)
        };
        match tokio::time::timeout(config.timeout, attempt).await {
            Ok(Ok(c)) => return Ok((c, at)),
            Ok(Err(e)) => last_err = Some(map_err(&format!("connecting to {endpoint}"), e)),
            Err(_) => {
                last_err = Some(ToozError::connection(
                    "etcd3",
                    format!("connecting to {endpoint} timed out"),
                    std::io::Error::other("timeout"),
                ));
            }
        }
    }
    Err(last_err.unwrap_or_else(|| ToozError::backend_msg("etcd3", "no endpoint to connect to")))
}

fn connect_options(config: &EtcdConfig) -> Result<ConnectOptions> {
    let o = ConnectOptions::new()
        .with_timeout(config.timeout)
        .with_connect_timeout(config.timeout);
    if !config.https {
        return Ok(o);
    }
    #[cfg(feature = "tls")]
    {
        let read = |p: &std::path::Path, key: &str| {
            std::fs::read(p).map_err(|e| {
                ToozError::invalid_option(
                    crate::config::NAME,
                    key,
                    format!("cannot read {}: {e}", p.display()),
                )
            })
        };
        let mut tls = etcd_client::TlsOptions::new();
        if let Some(ca) = &config.ca_cert {
            tls = tls.ca_certificate(etcd_client::Certificate::from_pem(read(ca, "ca_cert")?));
        }
        match (&config.cert_cert, &config.cert_key) {
            (Some(c), Some(k)) => {
                tls = tls.identity(etcd_client::Identity::from_pem(
                    read(c, "cert_cert")?,
                    read(k, "cert_key")?,
                ));
            }
            (None, None) => {}
            _ => {
                return Err(ToozError::invalid_option(
                    crate::config::NAME,
                    "cert_cert",
                    "cert_cert and cert_key must be given together",
                ));
            }
        }
        Ok(o.with_tls(tls))
    }
    #[cfg(not(feature = "tls"))]
    Err(ToozError::invalid_url(
        config.endpoint(),
        "TLS support is not built into this tooz-etcd (enable its `tls` cargo feature)",
    ))
}

#[tooz_core::async_trait]
impl Driver for EtcdDriver {
    fn info(&self) -> DriverInfo {
        DriverInfo::new("etcd3", CHARACTERISTICS, true)
    }

    /// A `/` in a group id would make group `a` a prefix of group `a/b`.
    fn check_id(&self, id: IdRef<'_>) -> Result<()> {
        match id {
            IdRef::Group(g) => check_group(g),
            _ => Ok(()),
        }
    }

    #[tracing::instrument(level = "debug", skip_all, fields(member = %self.inner.member))]
    async fn start(&self) -> Result<()> {
        let i = &self.inner;
        let opts = connect_options(&i.config)?;
        // With a host list, the first member that answers: etcd-client's balanced
        // channel over several endpoints keeps sending a share of the requests to a
        // member that is down (they fail with `Unavailable`), so the client talks to one
        // member, and a coordinator started while a minority is down still works.
        // Connecting is lazy, hence the status round trip when there is a choice.
        let (client, at) = connect_first(&i.config, &opts, 0).await?;
        *guard(&i.client) = Some(client);
        *guard(&i.endpoint_at) = at;
        let sent = tokio::time::Instant::now();
        match i.grant().await {
            Ok((id, _)) => {
                *guard(&i.lease) = Some(Lease { id, epoch: 0 });
                i.lease_state.replaced(sent, i.config.lease_ttl());
                Ok(())
            }
            Err(e) => {
                *guard(&i.client) = None;
                Err(e)
            }
        }
    }

    #[tracing::instrument(level = "debug", skip_all, fields(member = %self.inner.member))]
    async fn stop(&self) -> Result<()> {
        let i = &self.inner;
        *i.keeper.lock().await = None;
        let lease = guard(&i.lease).take();
        if let (Some(l), Ok(mut c)) = (lease, i.client()) {
            // Revoking deletes every key still on the lease at once.
            if let Err(e) = c.lease_revoke(l.id).await {
                tracing::warn!(error = %e, "etcd: revoking the lease on stop failed");
            }
        }
        guard(&i.joined_at).clear();
        guard(&i.leading).clear();
        *guard(&i.client) = None;
        Ok(())
    }

    #[tracing::instrument(level = "debug", skip_all)]
    /// One keep-alive renews every membership, lock and leadership: they all hang
    /// on the coordinator's lease.
    async fn heartbeat(&self, _held: &Held<'_>) -> Result<Renewal> {
        let i = &self.inner;
        let lease = i.lease()?;
        let alive = match i.keep_alive(lease.id).await {
            // With a host list, a member that stopped answering is left for the next one
            // that answers; the lease lives in the cluster, so it survives the switch
            // when renewed within its TTL.
            Err(e @ (ToozError::Connection { .. } | ToozError::OperationTimedOut(_)))
                if !i.config.more_hosts.is_empty() =>
            {
                let from = *guard(&i.endpoint_at) + 1;
                let opts = connect_options(&i.config)?;
                let Ok((client, at)) = connect_first(&i.config, &opts, from).await else {
                    return Err(e);
                };
                tracing::warn!(
                    endpoint = %i.config.endpoints().get(at).cloned().unwrap_or_default(),
                    "etcd: the member stopped answering ({e}); switched to another one"
                );
                *guard(&i.client) = Some(client);
                *guard(&i.endpoint_at) = at;
                i.keep_alive(lease.id).await?
            }
            r => r?,
        };
        if alive {
            return Ok(Renewal::new(i.config.lease_ttl()));
        }
        // The lease expired or was revoked: everything on it is gone.
        tracing::warn!(
            lease = lease.id,
            "etcd: the coordinator's lease is gone; memberships, locks and leaderships on it were lost"
        );
        i.lease_state.lost();
        let sent = tokio::time::Instant::now();
        let (id, _) = i.grant().await?;
        *guard(&i.lease) = Some(Lease {
            id,
            epoch: lease.epoch + 1,
        });
        i.lease_state.replaced(sent, i.config.lease_ttl());
        Ok(Renewal::new(i.config.lease_ttl()))
    }

    fn lease(&self) -> Option<LeaseState> {
        Some(self.inner.lease_state.clone())
    }

    #[tracing::instrument(level = "debug", skip_all, fields(group = %group))]
    async fn create_group(&self, group: &GroupId) -> Result<()> {
        let gk = keys::group(group.as_bytes());
        let r = self
            .inner
            .txn(
                "create_group",
                Txn::new()
                    .when(vec![Compare::version(gk.clone(), CompareOp::Equal, 0)])
                    .and_then(vec![TxnOp::put(gk.clone(), gk, None)]),
            )
            .await?;
        if r.succeeded() {
            Ok(())
        } else {
            Err(ToozError::GroupAlreadyExist(group.clone()))
        }
    }

    #[tracing::instrument(level = "debug", skip_all, fields(group = %group))]
    async fn delete_group(&self, group: &GroupId) -> Result<()> {
        let gk = keys::group(group.as_bytes());
        let mut first_member = gk.clone();
        first_member.push(0);
        // One transaction: the group exists and no key follows it in its prefix.
        let r = self
            .inner
            .txn(
                "delete_group",
                Txn::new()
                    .when(vec![
                        Compare::version(gk.clone(), CompareOp::Greater, 0),
                        Compare::version(first_member, CompareOp::Equal, 0)
                            .with_range(keys::prefix_end(&gk)),
                    ])
                    .and_then(vec![TxnOp::delete(gk.clone(), None)])
                    .or_else(vec![TxnOp::get(
                        gk,
                        Some(GetOptions::new().with_keys_only()),
                    )]),
            )
            .await?;
        if r.succeeded() {
            Ok(())
        } else if got(&gets(&r), 0).is_none() {
            Err(ToozError::GroupNotCreated(group.clone()))
        } else {
            Err(ToozError::GroupNotEmpty(group.clone()))
        }
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn get_groups(&self) -> Result<Vec<GroupId>> {
        let r = self
            .inner
            .get(
                "get_groups",
                keys::GROUPS_PREFIX.to_vec(),
                Some(GetOptions::new().with_prefix().with_keys_only()),
            )
            .await?;
        Ok(r.kvs()
            .iter()
            .filter_map(|kv| keys::group_of_key(kv.key()))
            .map(GroupId::new)
            .collect())
    }

    #[tracing::instrument(level = "debug", skip_all, fields(group = %group))]
    async fn join_group(&self, group: &GroupId, capabilities: &Capabilities) -> Result<()> {
        self.inner.put_member(group, capabilities, true).await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(group = %group))]
    async fn leave_group(&self, group: &GroupId) -> Result<()> {
        let i = &self.inner;
        let gk = keys::group(group.as_bytes());
        let mk = keys::member(group.as_bytes(), i.member.as_bytes());
        let tk = keys::member_times(group.as_bytes(), i.member.as_bytes());
        let r = i
            .txn(
                "leave_group",
                Txn::new()
                    .when(vec![
                        Compare::version(gk.clone(), CompareOp::Greater, 0),
                        Compare::create_revision(mk.clone(), CompareOp::Greater, 0),
                    ])
                    .and_then(vec![TxnOp::delete(mk, None), TxnOp::delete(tk, None)])
                    .or_else(vec![TxnOp::get(
                        gk,
                        Some(GetOptions::new().with_keys_only()),
                    )]),
            )
            .await?;
        if r.succeeded() {
            guard(&i.joined_at).remove(group);
            Ok(())
        } else if got(&gets(&r), 0).is_none() {
            Err(ToozError::GroupNotCreated(group.clone()))
        } else {
            Err(ToozError::MemberNotJoined {
                group: group.clone(),
                member: i.member.clone(),
            })
        }
    }

    #[tracing::instrument(level = "debug", skip_all, fields(group = %group))]
    async fn get_members(&self, group: &GroupId) -> Result<BTreeSet<MemberId>> {
        let gk = keys::group(group.as_bytes());
        Ok(self
            .inner
            .member_kvs(group, true)
            .await?
            .iter()
            .filter_map(|kv| keys::member_of_key(&gk, kv.key()).map(MemberId::new))
            .collect())
    }

    #[tracing::instrument(level = "debug", skip_all, fields(group = %group, member = %member))]
    async fn get_member_capabilities(
        &self,
        group: &GroupId,
        member: &MemberId,
    ) -> Result<Capabilities> {
        let (m, _) = self.inner.member_read(group, member).await?;
        Ok(Capabilities::from_msgpack(m.value().to_vec()))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(group = %group))]
    async fn get_members_with_capabilities(
        &self,
        group: &GroupId,
    ) -> Result<Vec<(MemberId, Capabilities)>> {
        let gk = keys::group(group.as_bytes());
        Ok(self
            .inner
            .member_kvs(group, false)
            .await?
            .iter()
            .filter_map(|kv| {
                keys::member_of_key(&gk, kv.key()).map(|m| {
                    (
                        MemberId::new(m),
                        Capabilities::from_msgpack(kv.value().to_vec()),
                    )
                })
            })
            .collect())
    }

    #[tracing::instrument(level = "debug", skip_all, fields(group = %group, member = %member))]
    async fn get_member_info(&self, group: &GroupId, member: &MemberId) -> Result<MemberInfo> {
        let (m, t) = self.inner.member_read(group, member).await?;
        let times = t.as_ref().and_then(|t| parse_times(t.value()));
        let at = |us: u64| UNIX_EPOCH + Duration::from_micros(us);
        Ok(MemberInfo::new(
            Capabilities::from_msgpack(m.value().to_vec()),
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
        self.inner.put_member(group, capabilities, false).await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(group = %group))]
    async fn campaign(&self, group: &GroupId) -> Result<Option<FencingToken>> {
        let i = &self.inner;
        let lease = i.lease()?;
        let lk = keys::leader(group.as_bytes());
        let res = i
            .txn(
                "campaign",
                Txn::new()
                    .when(vec![Compare::create_revision(
                        lk.clone(),
                        CompareOp::Equal,
                        0,
                    )])
                    .and_then(vec![TxnOp::put(
                        lk.clone(),
                        i.member.as_bytes().to_vec(),
                        Some(PutOptions::new().with_lease(lease.id)),
                    )])
                    .or_else(vec![TxnOp::get(lk, None)]),
            )
            .await;
        let r = match res {
            Ok(r) => r,
            Err(e) => {
                // The grant may have been applied with its reply lost: on the
                // coordinator's lease it would block the group until the process
                // exits. Free it unless it is a leadership the coordinator knows.
                let known = guard(&i.leading)
                    .get(group)
                    .is_some_and(|(l, _)| *l == lease.id);
                if !known {
                    let g = group.clone();
                    i.spawn_cleanup(lease.id, "unconfirmed leadership", move |i| {
                        let g = g.clone();
                        async move { i.resolve_campaign(&g, lease.id).await }
                    });
                }
                return Err(e);
            }
        };
        let created = if r.succeeded() {
            Some(revision(&r))
        } else {
            match got(&gets(&r), 0) {
                Some(kv) if kv.value() == i.member.as_bytes() && kv.lease() == lease.id => {
                    Some(kv.create_revision())
                }
                _ => None,
            }
        };
        let mut leading = guard(&i.leading);
        match created {
            Some(c) => {
                leading.insert(group.clone(), (lease.id, c));
                Ok(Some(FencingToken(c.max(0) as u64)))
            }
            None => {
                leading.remove(group);
                Ok(None)
            }
        }
    }

    #[tracing::instrument(level = "debug", skip_all, fields(group = %group))]
    async fn resign(&self, group: &GroupId) -> Result<bool> {
        let i = &self.inner;
        let lease = i.lease()?;
        let known = guard(&i.leading)
            .remove(group)
            .filter(|(l, _)| *l == lease.id)
            .map(|(_, c)| c);
        match i.drop_leader_key(group, lease.id, known).await {
            Ok(led) => Ok(led),
            Err(e) => {
                // Retried (guarded on the key's creation, so never a later grant)
                // instead of leaving the leadership on the lease for ever.
                if let Some(c) = known {
                    let g = group.clone();
                    i.spawn_cleanup(lease.id, "leadership release", move |i| {
                        let g = g.clone();
                        async move { i.drop_leader_key(&g, lease.id, Some(c)).await.map(|_| ()) }
                    });
                }
                Err(e)
            }
        }
    }

    #[tracing::instrument(level = "debug", skip_all, fields(group = %group))]
    async fn get_leader(&self, group: &GroupId) -> Result<Option<MemberId>> {
        let r = self
            .inner
            .get("get_leader", keys::leader(group.as_bytes()), None)
            .await?;
        Ok(r.kvs().first().map(|kv| MemberId::new(kv.value())))
    }

    fn lock(&self, name: &LockName) -> Result<Arc<dyn DriverLock>> {
        let id = self.inner.next_lock.fetch_add(1, Ordering::Relaxed);
        Ok(Arc::new(EtcdLock::new(
            Arc::clone(&self.inner),
            name.clone(),
            id,
        )))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(group = %group))]
    async fn watch_group(&self, group: &GroupId) -> Result<Option<DriverEventStream>> {
        let i = &self.inner;
        let gk = keys::group(group.as_bytes());
        let r = i
            .get(
                "watch_group",
                gk.clone(),
                Some(GetOptions::new().with_keys_only()),
            )
            .await?;
        if r.kvs().is_empty() {
            return Err(ToozError::GroupNotCreated(group.clone()));
        }
        let rev = r.header().map_or(0, |h| h.revision());
        let client = i.client()?;
        Ok(Some(group_events(client, group, rev + 1).await?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_round_trip() {
        assert_eq!(parse_times(b"1 2"), Some((1, 2)));
        assert_eq!(parse_times(b"x"), None);
    }

    #[test]
    fn slash_in_group_is_invalid() {
        assert!(matches!(
            check_group(&GroupId::from("a/b")),
            Err(ToozError::InvalidId { .. })
        ));
        assert!(check_group(&GroupId::from("a")).is_ok());
    }

    #[test]
    fn info() {
        let c = EtcdConfig::from_url_str("etcd3+http://localhost").unwrap();
        let d = EtcdDriver::new(c, "m".into());
        assert_eq!(d.info().name, "etcd3");
        assert!(d.info().requires_beating);
    }
}
