//! The coordinator's lease: one ZooKeeper session at a time, reported to the
//! coordinator through a [`LeaseState`]:
//!
//! * while connected, a probe (`exists` of the namespace node) every third of the
//!   negotiated session timeout; each answered probe reports its *send* time, since
//!   the server cannot expire the session before a session timeout after it last
//!   heard from us. The coordinator declares the lease lost a margin before that
//!   bound, whatever the connection does meanwhile;
//! * disconnected: at risk at once; still disconnected one negotiated session
//!   timeout later, or told the session expired: lost. The old session is then
//!   dropped (its ephemeral nodes go with it) and a new one is opened (a replaced
//!   lease); the coordinator re-joins its groups on it. Locks and leaderships are
//!   never taken again on their own.
//!
//! Every session gets an epoch; a hold remembers the epoch it was won in and is
//! lost when the epoch changes.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tooz_core::util::Backoff;
use tooz_core::{LeaseState, Result, ToozError};
use zookeeper_client::{Acls, Client, CreateMode, CreateOptions, SessionState};

use crate::config::ZookeeperConfig;
use crate::error::zk_err;

/// One ZooKeeper session.
#[derive(Debug)]
pub(crate) struct Session {
    pub(crate) client: Client,
    pub(crate) epoch: u64,
}

impl Session {
    /// The ZooKeeper session id.
    pub(crate) fn id(&self) -> i64 {
        self.client.session_id().0
    }
}

/// How long `Lost` is shown before a new session may replace it.
const LOST_DWELL: Duration = Duration::from_millis(50);

fn guard<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The current session, its liveness and the task that watches it.
#[derive(Debug)]
pub(crate) struct Sessions {
    config: ZookeeperConfig,
    current: watch::Sender<Option<Arc<Session>>>,
    lease: LeaseState,
    /// Ids of this driver's earlier sessions: their ephemeral nodes are stale.
    past: Mutex<HashSet<i64>>,
    epoch: AtomicU64,
    monitor: Mutex<Option<JoinHandle<()>>>,
    /// Set while the driver is not started.
    stopped: watch::Sender<bool>,
}

impl Sessions {
    pub(crate) fn new(config: ZookeeperConfig) -> Arc<Self> {
        Arc::new(Sessions {
            config,
            current: watch::channel(None).0,
            lease: LeaseState::new(),
            past: Mutex::new(HashSet::new()),
            epoch: AtomicU64::new(0),
            monitor: Mutex::new(None),
            stopped: watch::channel(true).0,
        })
    }

    pub(crate) fn acls(&self) -> Acls<'static> {
        if self.config.digest.is_some() {
            Acls::creator_all()
        } else {
            Acls::anyone_all()
        }
    }

    pub(crate) fn options(&self, mode: CreateMode) -> CreateOptions<'static> {
        mode.with_acls(self.acls())
    }

    /// The lease state the coordinator reads.
    pub(crate) fn lease(&self) -> LeaseState {
        self.lease.clone()
    }

    /// How lock and election directories are made: CONTAINER znodes (deleted by
    /// the server once empty), unless `container_parents=false`.
    pub(crate) fn dir_mode(&self) -> CreateMode {
        if self.config.container_parents {
            CreateMode::Container
        } else {
            CreateMode::Persistent
        }
    }

    /// Watches the current session (`None` while there is none).
    pub(crate) fn subscribe(&self) -> watch::Receiver<Option<Arc<Session>>> {
        self.current.subscribe()
    }

    /// The live session, or `Connection` when there is none right now.
    pub(crate) fn get(&self) -> Result<Arc<Session>> {
        if *self.stopped.borrow() {
            return Err(ToozError::NotStarted);
        }
        self.current
            .borrow()
            .clone()
            .ok_or_else(|| ToozError::Connection {
                driver: "zookeeper",
                message: "no session (the last one was lost; reconnecting)".into(),
                source: None,
            })
    }

    /// The live session, waiting up to `wait` for one to be established.
    pub(crate) async fn get_within(&self, wait: Duration) -> Result<Arc<Session>> {
        if let Some(s) = self.current.borrow().clone() {
            return Ok(s);
        }
        let mut rx = self.current.subscribe();
        let mut stopped = self.stopped.subscribe();
        let waited = tokio::time::timeout(wait, async {
            loop {
                if *stopped.borrow_and_update() {
                    return Err(ToozError::Stopped);
                }
                if let Some(s) = rx.borrow_and_update().clone() {
                    return Ok(s);
                }
                tokio::select! {
                    r = rx.changed() => if r.is_err() { return Err(ToozError::Stopped) },
                    r = stopped.changed() => if r.is_err() { return Err(ToozError::Stopped) },
                }
            }
        })
        .await;
        match waited {
            Ok(r) => r,
            Err(_) => self.get(),
        }
    }

    /// Whether `epoch` is the live session's.
    pub(crate) fn is_current(&self, epoch: u64) -> bool {
        self.current
            .borrow()
            .as_ref()
            .is_some_and(|s| s.epoch == epoch)
    }

    /// Whether an ephemeral owner is one of this driver's dead sessions.
    pub(crate) fn is_past_session(&self, owner: i64) -> bool {
        owner != 0 && guard(&self.past).contains(&owner)
    }

    /// How long to wait for a session before a request gives up.
    pub(crate) fn request_timeout(&self) -> Duration {
        self.config.timeout
    }

    async fn connect(&self) -> Result<Client> {
        let c = &self.config;
        let mut connector = Client::connector().with_session_timeout(c.timeout);
        if let Some((u, p)) = &c.digest {
            connector = connector.with_auth("digest", format!("{u}:{p}").as_bytes());
        }
        let cs = c.connect_string();
        // The client gives up by itself after about the session timeout; the
        // outer limit only guards against a hang.
        let client = match tokio::time::timeout(c.timeout * 2, connector.connect(&cs)).await {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => {
                return Err(ToozError::connection(
                    "zookeeper",
                    format!("cannot open a session with {cs}"),
                    e,
                ));
            }
            Err(_) => {
                return Err(ToozError::Connection {
                    driver: "zookeeper",
                    message: format!("no session with {cs} within {:?}", c.timeout * 2),
                    source: None,
                });
            }
        };
        client
            .mkdir(
                &c.base_path(),
                &CreateMode::Persistent.with_acls(self.acls()),
            )
            .await
            .map_err(|e| zk_err("creating the namespace znode", e))?;
        Ok(client)
    }

    /// Makes `client` the current session; `sent` is when its connect began (the
    /// server cannot expire it before a session timeout after that).
    fn install(&self, client: Client, sent: Instant) -> Arc<Session> {
        let epoch = self.epoch.fetch_add(1, Ordering::SeqCst) + 1;
        let s = Arc::new(Session { client, epoch });
        tracing::debug!(session = %s.client.session_id(), epoch, timeout = ?s.client.session_timeout(), "zookeeper: session established");
        self.current.send_replace(Some(Arc::clone(&s)));
        self.lease.replaced(sent, s.client.session_timeout());
        s
    }

    /// Opens the first session and starts watching it.
    pub(crate) async fn start(self: &Arc<Self>) -> Result<()> {
        let sent = Instant::now();
        let client = self.connect().await?;
        self.stopped.send_replace(false);
        self.install(client, sent);
        let me = Arc::downgrade(self);
        let task = tokio::spawn(monitor(me));
        if let Some(old) = guard(&self.monitor).replace(task) {
            old.abort();
        }
        Ok(())
    }

    /// Drops the session (closing it once no request holds it any more).
    pub(crate) fn stop(&self) {
        self.stopped.send_replace(true);
        if let Some(t) = guard(&self.monitor).take() {
            t.abort();
        }
        if let Some(s) = self.current.send_replace(None) {
            guard(&self.past).insert(s.id());
        }
    }

    /// Marks the current session (if it is `epoch`) lost.
    fn lose(&self, epoch: u64) -> bool {
        let mut lost = None;
        self.current.send_if_modified(|cur| {
            if cur.as_ref().is_some_and(|s| s.epoch == epoch) {
                lost = cur.take();
                true
            } else {
                false
            }
        });
        match lost {
            Some(s) => {
                guard(&self.past).insert(s.id());
                tracing::warn!(session = %s.client.session_id(), "zookeeper: session lost; every lock, membership and leadership on it is gone");
                self.lease.lost();
                true
            }
            None => false,
        }
    }
}

/// Sends one `exists` after `pause` and, if the server answers, reports its send
/// time to the lease.
async fn probe(sessions: &Sessions, s: &Session, pause: Duration) {
    tokio::time::sleep(pause).await;
    let sent = Instant::now();
    match s.client.check_stat(&sessions.config.base_path()).await {
        Ok(_) => sessions.lease.renewed(sent, s.client.session_timeout()),
        Err(e) => tracing::debug!(error = %e, "zookeeper: lease probe failed"),
    }
}

/// What became of a session.
enum Ended {
    Lost,
    Stopped,
}

/// Follows one session's state until it is lost.
async fn follow(sessions: &Sessions, s: &Session) -> Ended {
    let mut states = s.client.state_watcher();
    let mut state = s.client.state();
    let timeout = s.client.session_timeout();
    let mut stopped = sessions.stopped.subscribe();
    let mut fresh = true;
    loop {
        if *stopped.borrow_and_update() {
            return Ended::Stopped;
        }
        match state {
            SessionState::SyncConnected | SessionState::ConnectedReadOnly => {
                // Probe at once after a reconnect, then every third of the timeout.
                let pause = if fresh { Duration::ZERO } else { timeout / 3 };
                fresh = false;
                tokio::select! {
                    st = states.changed() => state = st,
                    _ = stopped.changed() => {}
                    () = probe(sessions, s, pause) => {}
                }
            }
            SessionState::Disconnected => {
                fresh = true;
                sessions.lease.at_risk();
                tracing::warn!(session = %s.client.session_id(), ?timeout, "zookeeper: disconnected; the session is at risk");
                let deadline = Instant::now() + timeout;
                tokio::select! {
                    st = states.changed() => state = st,
                    _ = tokio::time::sleep_until(deadline) => {
                        tracing::warn!(session = %s.client.session_id(), "zookeeper: disconnected for a whole session timeout");
                        return Ended::Lost;
                    }
                    _ = stopped.changed() => {}
                }
            }
            SessionState::Expired | SessionState::AuthFailed | SessionState::Closed => {
                tracing::warn!(session = %s.client.session_id(), ?state, "zookeeper: session ended");
                return Ended::Lost;
            }
        }
    }
}

async fn monitor(sessions: std::sync::Weak<Sessions>) {
    loop {
        let Some(me) = sessions.upgrade() else { return };
        let Some(s) = me.current.borrow().clone() else {
            return;
        };
        match follow(&me, &s).await {
            Ended::Stopped => return,
            Ended::Lost => {}
        }
        if !me.lose(s.epoch) {
            return;
        }
        drop(s);
        // `Lost` stays visible for a moment before the next session replaces it,
        // for whoever watches the lease. The coordinator does not depend on it: it
        // sees the lease's new generation even when the two coalesce.
        tokio::time::sleep(LOST_DWELL).await;
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
        loop {
            if *me.stopped.borrow() {
                return;
            }
            let sent = Instant::now();
            match me.connect().await {
                Ok(client) => {
                    if *me.stopped.borrow() {
                        return;
                    }
                    me.install(client, sent);
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "zookeeper: opening a new session failed; retrying");
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
    }
}
