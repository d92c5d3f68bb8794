//! kazoo's lock recipe, shared by locks and leader election: an ephemeral
//! sequential node `<uuid><mark><seq>` in the lock directory; the holder is the
//! node with no excluding contender below it; a waiter watches only its
//! predecessor (no herd). The node is created and the directory listed in one
//! round trip (ZooKeeper runs a session's requests in order, so the listing
//! already contains the new node).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;
use tooz_core::util::Backoff;
use tooz_core::{GroupId, Result, ToozError};
use zookeeper_client::{CreateMode, Error as ZkError, EventType};

use crate::error::zk_err;
use crate::layout::{contender_prefix, predecessor};
use crate::session::{Session, Sessions};

/// A contender node this driver created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Node {
    /// Absolute path.
    pub(crate) path: String,
    /// The session epoch it lives in.
    pub(crate) epoch: u64,
    /// Its creation zxid: the fencing token.
    pub(crate) czxid: u64,
}

/// A contender node being created: its directory, its unique name prefix and the
/// session epoch. Recorded before the create is sent, so that an attempt abandoned
/// before the reply arrived can still find and delete the node.
#[derive(Debug, Clone)]
struct Intent {
    dir: String,
    prefix: String,
    epoch: u64,
}

/// Where an attempt records its node (`node`, once the create answered) and, before
/// that, what it is creating (`intent`).
#[derive(Debug, Default)]
struct Slot {
    node: Mutex<Option<Node>>,
    intent: Mutex<Option<Intent>>,
}

impl Slot {
    fn set(&self, node: Node) {
        *self.node.lock().unwrap_or_else(|p| p.into_inner()) = Some(node);
    }

    fn clear(&self) {
        self.node.lock().unwrap_or_else(|p| p.into_inner()).take();
    }

    /// The node this attempt left behind, if any: the recorded one, or the one a
    /// create in flight made (found by its prefix; the listing is sent after the
    /// create on the same session, so it sees it).
    async fn leftover(&self, sessions: &Sessions) -> Option<Node> {
        if let Some(node) = self.node.lock().unwrap_or_else(|p| p.into_inner()).take() {
            return Some(node);
        }
        let intent = self
            .intent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()?;
        if !sessions.is_current(intent.epoch) {
            return None;
        }
        let s = sessions.get().ok()?;
        let (name, czxid) = find_by_prefix(&s, &intent.dir, &intent.prefix)
            .await
            .ok()??;
        Some(Node {
            path: format!("{}/{name}", intent.dir),
            epoch: intent.epoch,
            czxid,
        })
    }
}

/// What to do when the lock directory is missing.
#[derive(Debug, Clone)]
pub(crate) enum Parent {
    /// `mkdir -p` it (locks: kazoo's `ensure_path`).
    Make,
    /// Create just the directory; a missing parent means the group does not
    /// exist (leader election).
    GroupChild(GroupId),
}

/// Where a contender goes.
#[derive(Debug, Clone)]
pub(crate) struct Spot {
    pub(crate) dir: String,
    pub(crate) shared: bool,
    pub(crate) data: Vec<u8>,
    pub(crate) parent: Parent,
}

/// Creates a lock or election directory (a CONTAINER znode unless configured
/// otherwise; an existing one, persistent from Python's `makepath` or a
/// container, is used as it is).
async fn ensure_dir(sessions: &Sessions, s: &Session, spot: &Spot) -> Result<()> {
    let create = |mode| async move {
        let r = s
            .client
            .create(&spot.dir, &[], &sessions.options(mode))
            .await;
        match r {
            // A server without containers (before 3.5.3): make it persistent.
            Err(ZkError::Unimplemented) if mode == CreateMode::Container => {
                s.client
                    .create(&spot.dir, &[], &sessions.options(CreateMode::Persistent))
                    .await
            }
            other => other,
        }
    };
    let mode = sessions.dir_mode();
    match &spot.parent {
        Parent::Make => {
            for _ in 0..2 {
                match create(mode).await {
                    Ok(_) | Err(ZkError::NodeExists) => return Ok(()),
                    // `<namespace>/locks` (persistent, as Python makes it) is missing.
                    Err(ZkError::NoNode) => {
                        let parent = spot.dir.rsplit_once('/').map_or("", |(p, _)| p);
                        s.client
                            .mkdir(parent, &sessions.options(CreateMode::Persistent))
                            .await
                            .map_err(|e| zk_err("creating the lock tree", e))?;
                    }
                    Err(e) => return Err(zk_err("creating a lock directory", e)),
                }
            }
            Err(ToozError::backend_msg(
                "zookeeper",
                format!(
                    "the parent of the lock directory {} vanished while creating it",
                    spot.dir
                ),
            ))
        }
        Parent::GroupChild(g) => match create(mode).await {
            Ok(_) | Err(ZkError::NodeExists) => Ok(()),
            Err(ZkError::NoNode) => Err(ToozError::GroupNotCreated(g.clone())),
            Err(e) => Err(zk_err("creating the election directory", e)),
        },
    }
}

/// How many times a contender's create that finds its directory gone (a
/// container the server removed once it was empty, or a directory never made)
/// makes the directory again before giving up.
const DIR_TRIES: u32 = 5;

/// Creates a contender node and lists the directory, in one round trip.
/// The intent is recorded in `slot` before the create is sent, the new node as soon
/// as its reply arrives.
async fn enqueue(
    sessions: &Sessions,
    s: &Session,
    spot: &Spot,
    slot: &Slot,
) -> Result<(Node, String, Vec<String>)> {
    let prefix = contender_prefix(spot.shared);
    *slot.intent.lock().unwrap_or_else(|p| p.into_inner()) = Some(Intent {
        dir: spot.dir.clone(),
        prefix: prefix.clone(),
        epoch: s.epoch,
    });
    let path_prefix = format!("{}/{prefix}", spot.dir);
    let opts = sessions.options(CreateMode::EphemeralSequential);
    let mut made_dir = 0;
    loop {
        let create = s.client.create(&path_prefix, &spot.data, &opts);
        let list = s.client.get_children(&spot.dir);
        let (created, listed) = tokio::join!(create, list);
        match created {
            Ok((stat, seq)) => {
                let name = format!("{prefix}{seq}");
                let node = Node {
                    path: format!("{}/{name}", spot.dir),
                    epoch: s.epoch,
                    czxid: u64::try_from(stat.czxid).unwrap_or(0),
                };
                slot.set(node.clone());
                let children = listed.map_err(|e| zk_err("listing lock contenders", e))?.0;
                return Ok((node, name, children));
            }
            Err(ZkError::NoNode) if made_dir < DIR_TRIES => {
                ensure_dir(sessions, s, spot).await?;
                made_dir += 1;
            }
            Err(ZkError::ConnectionLoss) => {
                // The create may have happened: look for our prefix (kazoo's trick,
                // after Curator), so that no node of ours is left behind.
                if let Some(found) = find_by_prefix(s, &spot.dir, &prefix).await? {
                    let (name, czxid) = found;
                    let node = Node {
                        path: format!("{}/{name}", spot.dir),
                        epoch: s.epoch,
                        czxid,
                    };
                    slot.set(node.clone());
                    let children = retry_transient(|| s.client.get_children(&spot.dir))
                        .await
                        .map_err(|e| zk_err("listing lock contenders", e))?
                        .0;
                    return Ok((node, name, children));
                }
            }
            Err(ZkError::NoNode) => {
                return Err(match &spot.parent {
                    Parent::GroupChild(g) => ToozError::GroupNotCreated(g.clone()),
                    Parent::Make => ToozError::backend_msg(
                        "zookeeper",
                        format!("the lock directory {} vanished while contending", spot.dir),
                    ),
                });
            }
            Err(e) => return Err(zk_err("creating a lock contender node", e)),
        }
    }
}

/// Attempts of a request that failed because the connection dropped while it was
/// in flight (the client reconnects by itself; the session lives on).
const TRANSIENT_TRIES: u32 = 20;

/// Runs a request again while it fails with `ConnectionLoss`, pausing in between.
async fn retry_transient<T, F, Fut>(mut op: F) -> std::result::Result<T, ZkError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<T, ZkError>>,
{
    let mut backoff = Backoff::new(Duration::from_millis(20), Duration::from_millis(500));
    let mut tries = 0;
    loop {
        match op().await {
            Err(ZkError::ConnectionLoss) if tries < TRANSIENT_TRIES => {
                tries += 1;
                tokio::time::sleep(backoff.next_delay()).await;
            }
            other => return other,
        }
    }
}

/// Our node in `dir`, by its unique prefix, with its czxid.
async fn find_by_prefix(s: &Session, dir: &str, prefix: &str) -> Result<Option<(String, u64)>> {
    let children = match retry_transient(|| s.client.get_children(dir)).await {
        Ok((c, _)) => c,
        // The directory (an empty container) went away: no node of ours is in it.
        Err(ZkError::NoNode) => return Ok(None),
        Err(e) => return Err(zk_err("looking for a lock node after a connection loss", e)),
    };
    let Some(name) = children.into_iter().find(|c| c.starts_with(prefix)) else {
        return Ok(None);
    };
    let path = format!("{dir}/{name}");
    match retry_transient(|| s.client.check_stat(&path)).await {
        Ok(Some(stat)) => Ok(Some((name, u64::try_from(stat.czxid).unwrap_or(0)))),
        Ok(None) => Ok(None),
        Err(e) => Err(zk_err("looking for a lock node after a connection loss", e)),
    }
}

/// Deletes a node of ours. `false` when it was already gone (or went with its
/// session). A connection dropped meanwhile is waited out; if the delete still
/// cannot be done, a background task keeps trying while the session lives, so the
/// node never outlives its holder's intent.
pub(crate) async fn delete_node(sessions: &Arc<Sessions>, node: &Node) -> Result<bool> {
    if !sessions.is_current(node.epoch) {
        return Ok(false);
    }
    let s = sessions.get()?;
    match retry_transient(|| s.client.delete(&node.path, None)).await {
        Ok(()) => Ok(true),
        Err(ZkError::NoNode) => Ok(false),
        Err(e) => {
            let (sessions, node) = (Arc::clone(sessions), node.clone());
            tokio::spawn(async move { keep_deleting(&sessions, &node).await });
            Err(zk_err("deleting a lock node", e))
        }
    }
}

/// Retries a delete while the node's session is the live one.
async fn keep_deleting(sessions: &Sessions, node: &Node) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    while sessions.is_current(node.epoch) {
        tokio::time::sleep(backoff.next_delay()).await;
        let Ok(s) = sessions.get() else { return };
        match s.client.delete(&node.path, None).await {
            Ok(()) | Err(ZkError::NoNode) => return,
            Err(e) => {
                tracing::debug!(node = %node.path, error = %e, "zookeeper: deleting a lock node failed; retrying");
            }
        }
    }
}

/// Contends until the lock is won (`Some(node)`), `deadline` passes or, with
/// `deadline == Some(now)`, after one look (`None`). A lost session while waiting
/// restarts the attempt on the next one.
async fn contend(
    sessions: &Sessions,
    spot: &Spot,
    deadline: Option<Instant>,
    try_once: bool,
    slot: &Slot,
) -> Result<Option<Node>> {
    'attempt: loop {
        let wait_session = match deadline {
            Some(d) => d
                .saturating_duration_since(Instant::now())
                .max(std::time::Duration::from_millis(1)),
            None => sessions.request_timeout(),
        };
        let s = sessions.get_within(wait_session).await?;
        let (node, name, mut children) = enqueue(sessions, &s, spot, slot).await?;
        loop {
            let pred = match predecessor(&children, &name) {
                // Our node is gone (broken by an operator, or the session ended).
                Err(()) => {
                    slot.clear();
                    if try_once || deadline.is_some_and(|d| d <= Instant::now()) {
                        return Ok(None);
                    }
                    continue 'attempt;
                }
                Ok(None) => return Ok(Some(node)),
                Ok(Some(p)) => format!("{}/{p}", spot.dir),
            };
            if try_once || deadline.is_some_and(|d| d <= Instant::now()) {
                return Ok(None);
            }
            let (stat, watcher) =
                match retry_transient(|| s.client.check_and_watch_stat(&pred)).await {
                    Ok(r) => r,
                    Err(ZkError::SessionExpired | ZkError::ClientClosed) => {
                        slot.clear();
                        continue 'attempt;
                    }
                    Err(e) => return Err(zk_err("watching the lock predecessor", e)),
                };
            if stat.is_some() {
                let ev = match deadline {
                    Some(d) => tokio::select! {
                        ev = watcher.changed() => Some(ev),
                        _ = tokio::time::sleep_until(d) => None,
                    },
                    None => Some(watcher.changed().await),
                };
                match ev {
                    None => return Ok(None),
                    Some(ev) if ev.event_type == EventType::Session => {
                        if !sessions.is_current(node.epoch) || ev.session_state.is_terminated() {
                            // The node went with the session: start over.
                            slot.clear();
                            continue 'attempt;
                        }
                    }
                    Some(_) => {}
                }
            }
            children = match retry_transient(|| s.client.get_children(&spot.dir)).await {
                Ok((c, _)) => c,
                Err(ZkError::SessionExpired | ZkError::ClientClosed) => {
                    slot.clear();
                    continue 'attempt;
                }
                Err(e) => return Err(zk_err("listing lock contenders", e)),
            };
        }
    }
}

/// Runs [`contend`] in a task of its own so that a caller that goes away (its
/// future dropped) never leaves a node behind: the task deletes whatever node it
/// made unless the caller took the won lock.
pub(crate) async fn acquire(
    sessions: Arc<Sessions>,
    spot: Spot,
    deadline: Option<Instant>,
    try_once: bool,
) -> Result<Option<Node>> {
    let (tx, rx) = oneshot::channel::<Result<Option<Node>>>();
    let task_sessions = Arc::clone(&sessions);
    tokio::spawn(async move {
        let slot = Slot::default();
        let mut tx = tx;
        let outcome = tokio::select! {
            r = contend(&task_sessions, &spot, deadline, try_once, &slot) => Some(r),
            _ = tx.closed() => None,
        };
        match outcome {
            Some(Ok(Some(node))) => {
                if let Err(Ok(Some(node))) = tx.send(Ok(Some(node))) {
                    cleanup(&task_sessions, node).await;
                }
            }
            other => {
                if let Some(node) = slot.leftover(&task_sessions).await {
                    cleanup(&task_sessions, node).await;
                }
                if let Some(other) = other {
                    let _ = tx.send(other);
                }
            }
        }
    });
    let mut pending = Pending {
        rx: Some(rx),
        sessions,
    };
    let res = match pending.rx.as_mut() {
        Some(rx) => rx.await.unwrap_or(Err(ToozError::Stopped)),
        None => Err(ToozError::Stopped),
    };
    pending.rx = None;
    res
}

async fn cleanup(sessions: &Arc<Sessions>, node: Node) {
    if let Err(e) = delete_node(sessions, &node).await {
        tracing::warn!(node = %node.path, error = %e, "zookeeper: removing an abandoned lock node failed (it goes with the session)");
    }
}

/// The receiving end of an acquisition; dropped before it read the outcome, it
/// releases a lock the task won.
struct Pending {
    rx: Option<oneshot::Receiver<Result<Option<Node>>>>,
    sessions: Arc<Sessions>,
}

impl Drop for Pending {
    fn drop(&mut self) {
        let Some(mut rx) = self.rx.take() else { return };
        rx.close();
        if let Ok(Ok(Some(node))) = rx.try_recv()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            let sessions = Arc::clone(&self.sessions);
            rt.spawn(async move { cleanup(&sessions, node).await });
        }
    }
}
