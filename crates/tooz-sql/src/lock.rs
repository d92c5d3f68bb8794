//! Lock handles. A lock is tried first on the coordinator's session connection
//! without waiting (one statement that also advances the fencing counter); if it is
//! held, the handle waits **server-side** on a connection of its own
//! (`pg_advisory_lock` under `lock_timeout`, `GET_LOCK` with the remaining wait), so
//! the release of any holder, Python ones included, wakes it at once. A wait ends on
//! its deadline (server-side), when the caller drops the future or the coordinator
//! stops (the wait is cancelled from another connection and its connection closed,
//! which frees whatever it may have been granted meanwhile). A lock won by waiting
//! stays on its own connection, which the heartbeat pings.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tooz_core::{DriverLock, FencingToken, LockName, Mode, Result, ToozError, Wait};

use crate::backend::{Backend, Token, is_broken, to_tooz};
use crate::driver::{Inner, Session, guard};
use tokio::sync::oneshot;

/// Slack of the client-side bound on a server-side wait (the server ends it).
const WAIT_SLACK: Duration = Duration::from_secs(2);

/// Where a hold lives.
enum At<B: Backend> {
    /// On the session connection of this generation.
    Session(u64),
    /// On a connection of its own (and its server-side id).
    Own(B::Conn, i64),
    /// Its connection broke: the hold is gone.
    Lost,
}

struct Hold<B: Backend> {
    mode: Mode,
    at: At<B>,
    reader: String,
}

/// What the heartbeat learns of a handle.
pub(crate) enum HoldState {
    /// Held on the session of this generation.
    Session(u64),
    /// Held on its own connection; whether that answered.
    Own(bool),
    /// Not held.
    None,
}

/// A lock handle of the SQL drivers.
pub(crate) struct SqlLock<B: Backend> {
    name: LockName,
    inner: Arc<Inner<B>>,
    hold: tokio::sync::Mutex<Option<Hold<B>>>,
}

impl<B: Backend> fmt::Debug for SqlLock<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlLock")
            .field("driver", &B::NAME)
            .field("name", &self.name)
            .finish()
    }
}

impl<B: Backend> SqlLock<B> {
    pub(crate) fn new(name: LockName, inner: Arc<Inner<B>>) -> Self {
        SqlLock {
            name,
            inner,
            hold: tokio::sync::Mutex::new(None),
        }
    }

    /// The server-side key (the MySQL one depends on the server, known at start).
    fn key(&self) -> B::Key {
        self.inner.db.key(&self.name)
    }

    /// The heartbeat's view of this handle: pings its own connection if it has one.
    pub(crate) async fn renew_own(&self) -> HoldState {
        let mut h = self.hold.lock().await;
        let Some(hold) = h.as_mut() else {
            return HoldState::None;
        };
        match &mut hold.at {
            At::Session(g) => HoldState::Session(*g),
            At::Lost => HoldState::Own(false),
            At::Own(conn, _) => {
                // Inside the heartbeat's cut-off: a connection that does not answer
                // in time is as good as lost.
                let ping = tokio::time::timeout(self.inner.db.ttl() / 5, self.inner.db.ping(conn));
                match ping.await {
                    Ok(Ok(())) => HoldState::Own(true),
                    Ok(Err(_)) | Err(_) => {
                        if let At::Own(conn, _) = std::mem::replace(&mut hold.at, At::Lost) {
                            self.inner.bury(conn);
                        }
                        HoldState::Own(false)
                    }
                }
            }
        }
    }

    /// One attempt on the session connection, in a task of its own so that a grant
    /// that arrives after the caller went away is given back.
    async fn session_attempt(&self, mode: Mode, reader: &str) -> Result<Option<(Token, u64)>> {
        let inner = Arc::clone(&self.inner);
        let (key, name, reader_s) = (self.key(), self.name.clone(), reader.to_string());
        let task =
            tokio::spawn(async move { try_on_session(&inner, &key, &name, mode, &reader_s).await });
        let mut orphan = Orphan::<B> {
            task: Some(task),
            inner: Arc::clone(&self.inner),
            key: self.key(),
            name: self.name.clone(),
            mode,
            reader: reader.to_string(),
        };
        let res = match orphan.task.as_mut() {
            Some(t) => t.await,
            None => unreachable!("set above"),
        };
        orphan.task = None;
        res.map_err(|e| ToozError::backend_msg(B::NAME, format!("lock attempt task failed: {e}")))?
    }

    /// Waits server-side on a connection of its own, at most `wait` (`None`: for ever).
    async fn wait_own(
        &self,
        mode: Mode,
        reader: &str,
        wait: Option<Duration>,
    ) -> Result<Option<Token>> {
        let inner = &self.inner;
        let (conn, id) = inner.waiter_conn().await?;
        let mut w = Waiting::<B> {
            conn: Some(conn),
            id,
            inner: Arc::clone(inner),
        };
        let key = self.key();
        let res = {
            let Some(conn) = w.conn.as_mut() else {
                unreachable!("set above")
            };
            let fut = inner
                .db
                .wait_lock(conn, &key, &self.name, mode, reader, wait);
            match wait {
                Some(d) => match tokio::time::timeout(d + WAIT_SLACK, fut).await {
                    Ok(r) => r,
                    // The server did not end the wait in time: cancel it (on drop).
                    Err(_) => return Ok(None),
                },
                None => fut.await,
            }
        };
        match res {
            Ok(Some(token)) => {
                let conn = w.conn.take();
                if let Some(conn) = conn {
                    *self.hold.lock().await = Some(Hold {
                        mode,
                        at: At::Own(conn, id),
                        reader: reader.to_string(),
                    });
                }
                Ok(Some(token))
            }
            Ok(None) => {
                if let Some(conn) = w.conn.take() {
                    inner.spare(conn, id);
                }
                Ok(None)
            }
            // The connection's state is unknown: it is closed (on drop), which frees
            // whatever it may hold.
            Err(e) => Err(to_tooz(B::NAME, "waiting for a lock", e)),
        }
    }
}

/// An attempt waiting for the session connection.
pub(crate) struct Pending<B: Backend> {
    key: B::Key,
    name: LockName,
    mode: Mode,
    reader: String,
    reply: oneshot::Sender<Result<SessionGrant>>,
}

/// The most attempts in one batch statement.
const MAX_BATCH: usize = 256;

/// One attempt on the session connection. Attempts that arrive while the session
/// is busy queue up; whoever gets the session next serves every queued attempt
/// (concurrent acquires from one coordinator become a few batches, not one
/// statement and one commit each).
async fn try_on_session<B: Backend>(
    inner: &Inner<B>,
    key: &B::Key,
    name: &LockName,
    mode: Mode,
    reader: &str,
) -> Result<SessionGrant> {
    let (reply, mut answer) = oneshot::channel();
    guard(&inner.pending).push(Pending {
        key: key.clone(),
        name: name.clone(),
        mode,
        reader: reader.to_string(),
        reply,
    });
    let mut s = inner.session.lock().await;
    // Served by whoever had the session before (it answers before letting go).
    if let Ok(r) = answer.try_recv() {
        return r;
    }
    let queued = std::mem::take(&mut *guard(&inner.pending));
    serve(inner, &mut s, queued).await;
    drop(s);
    answer.await.unwrap_or_else(|_| {
        Err(ToozError::backend_msg(
            B::NAME,
            "the lock attempt was dropped unanswered",
        ))
    })
}

/// Serves queued attempts on the session: exclusive attempts on distinct keys that
/// no handle holds go in batches (where the database has them); the rest, and a
/// batch that failed, one by one.
async fn serve<B: Backend>(inner: &Inner<B>, s: &mut Session<B>, queued: Vec<Pending<B>>) {
    let mut batch: Vec<Pending<B>> = Vec::new();
    let mut one_by_one: Vec<Pending<B>> = Vec::new();
    if queued.len() > 1 {
        let mut keys = std::collections::HashSet::new();
        for p in queued {
            if p.mode == Mode::Exclusive
                && !s.held.contains_key(&p.key)
                && keys.insert(p.key.clone())
            {
                batch.push(p);
            } else {
                one_by_one.push(p);
            }
        }
    } else {
        one_by_one = queued;
    }
    while !batch.is_empty() {
        let rest = batch.split_off(batch.len().min(MAX_BATCH));
        let chunk = std::mem::replace(&mut batch, rest);
        if chunk.len() == 1 {
            one_by_one.extend(chunk);
            continue;
        }
        let items: Vec<(B::Key, LockName)> = chunk
            .iter()
            .map(|p| (p.key.clone(), p.name.clone()))
            .collect();
        let res = match s.conn(inner).await {
            Ok(conn) => inner.db.try_lock_batch(conn, &items).await,
            // Each attempt connects (and says why it cannot) on its own.
            Err(_) => {
                one_by_one.extend(chunk);
                continue;
            }
        };
        match res {
            Ok(Some(tokens)) if tokens.len() == chunk.len() => {
                for (p, token) in chunk.into_iter().zip(tokens) {
                    let answer = token.map(|t| {
                        s.add(&p.key, &p.name, Mode::Exclusive);
                        (t, s.generation)
                    });
                    if let Err(Ok(Some(_))) = p.reply.send(Ok(answer)) {
                        // Nobody waits for the grant any more (its attempt task
                        // ended): give it back.
                        let generation = s.generation;
                        let r = match s.conn(inner).await {
                            Ok(conn) => inner.db.unlock(conn, &p.key, Mode::Exclusive, "").await,
                            Err(_) => Ok(false),
                        };
                        if let Err(e) = r {
                            tracing::debug!(lock = %p.name, error = %e, "giving back an unclaimed grant failed");
                            if is_broken(&e) && s.generation == generation {
                                s.broken(inner);
                            }
                        }
                        s.remove(&p.key, &p.name);
                    }
                }
            }
            Ok(_) => one_by_one.extend(chunk),
            Err(e) => {
                tracing::debug!(driver = B::NAME, error = %e, "a batch of lock attempts failed; trying them one by one");
                if is_broken(&e) && s.held.is_empty() {
                    s.broken(inner);
                } else if is_broken(&e) {
                    // The session and its holds are gone; each attempt says so.
                    s.broken(inner);
                    for p in chunk {
                        let _ = p.reply.send(Err(to_tooz(
                            B::NAME,
                            &attempt_what(&p.name),
                            clone_err(&e),
                        )));
                    }
                    continue;
                }
                one_by_one.extend(chunk);
            }
        }
    }
    for p in one_by_one {
        let r = try_one(inner, s, &p.key, &p.name, p.mode, &p.reader).await;
        let _ = p.reply.send(r);
    }
}

/// A copy of a batch's error for each of its attempts.
fn clone_err(e: &sqlx::Error) -> sqlx::Error {
    sqlx::Error::Protocol(e.to_string())
}

/// One attempt on the (locked) session connection.
async fn try_one<B: Backend>(
    inner: &Inner<B>,
    s: &mut Session<B>,
    key: &B::Key,
    name: &LockName,
    mode: Mode,
    reader: &str,
) -> Result<SessionGrant> {
    // The server counts session locks per connection: a name this session already
    // holds in a conflicting mode is held, whichever handle holds it. Another name
    // on the same key (a PostgreSQL key collision) is the server's to decide: it
    // grants this session its own key again.
    if s.conflicts(key, name, mode) {
        return Ok(None);
    }
    let unaccounted = !s.accounts_for(key, mode);
    let conn = s.conn(inner).await?;
    let mut res = inner.db.try_lock(conn, key, name, mode, reader).await;
    if let Err(e) = &res
        && is_broken(e)
        && s.held.is_empty()
    {
        // The session died while holding nothing (the server's idle timeout of a
        // coordinator that does not heartbeat, a restart): nothing is lost; a new one.
        s.broken(inner);
        let conn = s.conn(inner).await?;
        res = inner.db.try_lock(conn, key, name, mode, reader).await;
    }
    let Some(conn) = s.conn.as_mut().map(|(c, _)| c) else {
        return Err(ToozError::backend_msg(
            B::NAME,
            "the session connection is gone",
        ));
    };
    match res {
        Ok(Some(token)) => {
            s.add(key, name, mode);
            Ok(Some((token, s.generation)))
        }
        Ok(None) => Ok(None),
        Err(e) if is_broken(&e) => {
            s.broken(inner);
            Err(to_tooz(B::NAME, &attempt_what(name), e))
        }
        Err(e) => {
            // The statement failed on a live connection: whatever it may have taken
            // that no handle accounts for is given back.
            if unaccounted {
                if let Err(e2) = inner.db.abandon(conn, key, mode, reader).await {
                    tracing::debug!(error = %e2, "giving back a failed attempt failed");
                    if is_broken(&e2) {
                        s.broken(inner);
                    }
                }
            } else {
                // Another name holds this key on the session in this mode: a count
                // the failed statement may have added cannot be told from theirs, so
                // it is left (the key is held anyway); it goes with the session.
                tracing::warn!(
                    driver = B::NAME,
                    lock = %name,
                    "a failed lock attempt on a key this session already holds may leave one count of it held"
                );
            }
            Err(to_tooz(B::NAME, &attempt_what(name), e))
        }
    }
}

/// What a failed attempt was doing, for its error.
fn attempt_what(name: &LockName) -> String {
    format!("taking lock {name} and advancing its fencing counter")
}

async fn unlock_on_session<B: Backend>(
    inner: &Inner<B>,
    key: &B::Key,
    name: &LockName,
    mode: Mode,
    reader: &str,
    generation: u64,
) -> Result<bool> {
    let mut s = inner.session.lock().await;
    if !s.is_live(generation) {
        return Ok(false);
    }
    let conn = s.conn(inner).await?;
    let res = inner.db.unlock(conn, key, mode, reader).await;
    match res {
        Ok(was) => {
            s.remove(key, name);
            Ok(was)
        }
        Err(e) => {
            if is_broken(&e) {
                s.broken(inner);
            } else {
                s.remove(key, name);
            }
            Err(to_tooz(B::NAME, "releasing a lock", e))
        }
    }
}

/// A grant on the session: its token and the session generation.
type SessionGrant = Option<(Token, u64)>;

/// An attempt on the session whose caller may go away: gives back a grant nobody
/// took.
struct Orphan<B: Backend> {
    task: Option<JoinHandle<Result<SessionGrant>>>,
    inner: Arc<Inner<B>>,
    key: B::Key,
    name: LockName,
    mode: Mode,
    reader: String,
}

impl<B: Backend> Drop for Orphan<B> {
    fn drop(&mut self) {
        let Some(task) = self.task.take() else { return };
        let inner = Arc::clone(&self.inner);
        let (key, name, mode, reader) = (
            self.key.clone(),
            self.name.clone(),
            self.mode,
            std::mem::take(&mut self.reader),
        );
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Ok(Ok(Some((_, generation)))) = task.await
                    && let Err(e) =
                        unlock_on_session(&inner, &key, &name, mode, &reader, generation).await
                {
                    tracing::debug!(error = %e, "giving back an abandoned grant failed");
                }
            });
        }
    }
}

/// A server-side wait in progress: if dropped before it ends, the wait is cancelled
/// from another connection and the connection closed (freeing anything granted).
struct Waiting<B: Backend> {
    conn: Option<B::Conn>,
    id: i64,
    inner: Arc<Inner<B>>,
}

impl<B: Backend> Drop for Waiting<B> {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else { return };
        let inner = Arc::clone(&self.inner);
        let id = self.id;
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                inner.db.cancel_wait(id).await;
                drop(conn);
            });
        }
    }
}

#[tooz_core::async_trait]
impl<B: Backend> DriverLock for SqlLock<B> {
    fn name(&self) -> &LockName {
        &self.name
    }

    fn queues(&self) -> bool {
        true
    }

    async fn acquire(&self, mode: Mode, wait: Wait) -> Result<Option<FencingToken>> {
        let deadline = wait.deadline();
        let reader = self.inner.reader_name();
        if let Some((token, generation)) = self.session_attempt(mode, &reader).await? {
            *self.hold.lock().await = Some(Hold {
                mode,
                at: At::Session(generation),
                reader,
            });
            return Ok(Some(FencingToken(token)));
        }
        let remaining = match (wait, deadline) {
            (Wait::No, _) => return Ok(None),
            (Wait::For(_), Some(d)) => {
                let left = d.saturating_duration_since(tokio::time::Instant::now());
                if left.is_zero() {
                    return Ok(None);
                }
                Some(left)
            }
            _ => None,
        };
        Ok(self
            .wait_own(mode, &reader, remaining)
            .await?
            .map(FencingToken))
    }

    async fn release(&self) -> Result<bool> {
        let mut h = self.hold.lock().await;
        let Some(hold) = h.take() else {
            return Ok(false);
        };
        drop(h);
        match hold.at {
            At::Lost => Ok(false),
            At::Session(g) => {
                unlock_on_session(
                    &self.inner,
                    &self.key(),
                    &self.name,
                    hold.mode,
                    &hold.reader,
                    g,
                )
                .await
            }
            At::Own(mut conn, id) => {
                match self
                    .inner
                    .db
                    .unlock(&mut conn, &self.key(), hold.mode, &hold.reader)
                    .await
                {
                    Ok(was) => {
                        self.inner.spare(conn, id);
                        Ok(was)
                    }
                    // Closing the connection frees the lock on the server.
                    Err(e) => Err(to_tooz(B::NAME, "releasing a lock", e)),
                }
            }
        }
    }

    async fn heartbeat(&self) -> Result<bool> {
        Ok(match self.renew_own().await {
            HoldState::Own(ok) => ok,
            HoldState::None => false,
            HoldState::Session(g) => {
                let mut s = self.inner.session.lock().await;
                if !s.is_live(g) {
                    return Ok(false);
                }
                let conn = s.conn(&self.inner).await?;
                match self.inner.db.ping(conn).await {
                    Ok(()) => true,
                    Err(e) if is_broken(&e) => {
                        s.broken(&self.inner);
                        false
                    }
                    Err(e) => return Err(to_tooz(B::NAME, "renewing a lock", e)),
                }
            }
        })
    }

    async fn is_still_owner(&self) -> Result<bool> {
        let mut h = self.hold.lock().await;
        let Some(hold) = h.as_mut() else {
            return Ok(false);
        };
        match &mut hold.at {
            At::Lost => Ok(false),
            At::Own(conn, _) => match self
                .inner
                .db
                .holds(conn, &self.key(), hold.mode, &hold.reader)
                .await
            {
                Ok(v) => Ok(v),
                Err(e) if is_broken(&e) => {
                    if let At::Own(conn, _) = std::mem::replace(&mut hold.at, At::Lost) {
                        self.inner.bury(conn);
                    }
                    Ok(false)
                }
                Err(e) => Err(to_tooz(B::NAME, "checking a lock", e)),
            },
            At::Session(g) => {
                let g = *g;
                let mut s = self.inner.session.lock().await;
                if !s.is_live(g) {
                    return Ok(false);
                }
                let conn = s.conn(&self.inner).await?;
                match self
                    .inner
                    .db
                    .holds(conn, &self.key(), hold.mode, &hold.reader)
                    .await
                {
                    Ok(v) => Ok(v),
                    Err(e) if is_broken(&e) => {
                        s.broken(&self.inner);
                        Ok(false)
                    }
                    Err(e) => Err(to_tooz(B::NAME, "checking a lock", e)),
                }
            }
        }
    }

    async fn break_lock(&self) -> Result<bool> {
        self.inner.db.break_lock(&self.key()).await
    }
}
