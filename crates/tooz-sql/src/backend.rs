//! What a database gives the driver: one implementation per database
//! ([`crate::pg`], [`crate::mysql`]); everything else (sessions, holds, waits,
//! heartbeats) is shared in [`crate::driver`] and [`crate::lock`].

use std::collections::BTreeSet;
use std::fmt;
use std::hash::Hash;
use std::time::Duration;

use tooz_core::{
    Capabilities, DriverEventStream, GroupId, LockName, MemberId, MemberInfo, Mode, Result,
    ToozError,
};

/// A grant: the fencing token.
pub(crate) type Token = u64;

/// One database.
#[tooz_core::async_trait]
pub(crate) trait Backend: Send + Sync + fmt::Debug + Sized + 'static {
    /// The driver name (`postgresql`, `mysql`).
    const NAME: &'static str;
    /// A dedicated connection (never pooled) that can hold session locks.
    type Conn: Send + 'static;
    /// A lock's key on the server (PostgreSQL's `int4` pair, MySQL's lock name).
    type Key: Clone + Eq + Hash + Send + Sync + fmt::Debug + 'static;

    /// The server-side key of a lock name (shared with Python tooz; known once
    /// [`Backend::prepare`] has seen the server).
    fn key(&self, name: &LockName) -> Self::Key;

    /// The lease: memberships, leaderships and lock sessions not renewed for this
    /// long are gone.
    fn ttl(&self) -> Duration;

    /// Creates the tables if absent (or checks their version), and learns what the
    /// server supports.
    async fn prepare(&self) -> Result<()>;

    /// Opens a dedicated connection with the settings of a lock holder: the server
    /// ends it after [`Backend::ttl`] without a statement (PostgreSQL
    /// `idle_session_timeout` and TCP keepalives, MySQL `wait_timeout`). Returns it
    /// with its server-side id (backend pid, connection id).
    async fn connect_holder(&self) -> std::result::Result<(Self::Conn, i64), sqlx::Error>;

    /// Closes a connection politely.
    async fn close(&self, conn: Self::Conn);

    /// Inserts this coordinator's lease row.
    async fn open_lease(&self, lease: i64, member: &MemberId) -> Result<()>;
    /// Renews the lease on `conn` (one statement); `false` when it had already
    /// expired.
    async fn renew(
        &self,
        conn: &mut Self::Conn,
        lease: i64,
    ) -> std::result::Result<bool, sqlx::Error>;
    /// Deletes the lease and everything on it (memberships, leaderships).
    async fn end_lease(&self, lease: i64) -> Result<()>;
    /// One round trip on `conn`.
    async fn ping(&self, conn: &mut Self::Conn) -> std::result::Result<(), sqlx::Error>;

    /// One try without waiting on `conn`; the token when granted (the fence
    /// advanced). `reader` names a shared hold where the database needs one.
    async fn try_lock(
        &self,
        conn: &mut Self::Conn,
        key: &Self::Key,
        name: &LockName,
        mode: Mode,
        reader: &str,
    ) -> std::result::Result<Option<Token>, sqlx::Error>;
    /// Tries several exclusive locks (distinct keys no handle of `conn` holds)
    /// without waiting, in one round trip and one commit where the database can:
    /// the token of each grant. On an error nothing of the batch is held any more
    /// (given back, or the connection is broken). `Ok(None)`: the database has no
    /// batch; they are tried one by one.
    async fn try_lock_batch(
        &self,
        _conn: &mut Self::Conn,
        _items: &[(Self::Key, LockName)],
    ) -> std::result::Result<Option<Vec<Option<Token>>>, sqlx::Error> {
        Ok(None)
    }
    /// Waits server-side for the lock on `conn`, at most `wait` (`None`: for ever).
    /// `Ok(None)` when the wait ran out with nothing held.
    async fn wait_lock(
        &self,
        conn: &mut Self::Conn,
        key: &Self::Key,
        name: &LockName,
        mode: Mode,
        reader: &str,
        wait: Option<Duration>,
    ) -> std::result::Result<Option<Token>, sqlx::Error>;
    /// Releases one hold on `conn`; whether it was held.
    async fn unlock(
        &self,
        conn: &mut Self::Conn,
        key: &Self::Key,
        mode: Mode,
        reader: &str,
    ) -> std::result::Result<bool, sqlx::Error>;
    /// Gives back whatever `conn` holds of `key` that no handle accounts for (after a
    /// failed attempt whose outcome is unknown).
    async fn abandon(
        &self,
        conn: &mut Self::Conn,
        key: &Self::Key,
        mode: Mode,
        reader: &str,
    ) -> std::result::Result<(), sqlx::Error>;
    /// Whether `conn` holds the lock in `mode`.
    async fn holds(
        &self,
        conn: &mut Self::Conn,
        key: &Self::Key,
        mode: Mode,
        reader: &str,
    ) -> std::result::Result<bool, sqlx::Error>;
    /// Stops whatever the connection with this server id is waiting on (from
    /// another connection).
    async fn cancel_wait(&self, server_id: i64);
    /// Ends the sessions holding `key`, whoever they are; whether any held it.
    async fn break_lock(&self, key: &Self::Key) -> Result<bool>;

    /// Creates a group. `GroupAlreadyExist`.
    async fn create_group(&self, group: &GroupId) -> Result<()>;
    /// Deletes an empty group. `GroupNotCreated`, `GroupNotEmpty`.
    async fn delete_group(&self, group: &GroupId) -> Result<()>;
    /// Every group.
    async fn get_groups(&self) -> Result<Vec<GroupId>>;
    /// Joins on the lease. `GroupNotCreated`, `MemberAlreadyExist`.
    async fn join_group(
        &self,
        lease: i64,
        group: &GroupId,
        member: &MemberId,
        caps: &Capabilities,
    ) -> Result<()>;
    /// Leaves. `GroupNotCreated`, `MemberNotJoined`.
    async fn leave_group(&self, group: &GroupId, member: &MemberId) -> Result<()>;
    /// Live members with their capabilities. `GroupNotCreated`.
    async fn members(&self, group: &GroupId, caps: bool) -> Result<Vec<(MemberId, Capabilities)>>;
    /// One live member. `GroupNotCreated`, `MemberNotJoined`.
    async fn member_info(&self, group: &GroupId, member: &MemberId) -> Result<MemberInfo>;
    /// Replaces capabilities. `GroupNotCreated`, `MemberNotJoined`.
    async fn update_capabilities(
        &self,
        group: &GroupId,
        member: &MemberId,
        caps: &Capabilities,
    ) -> Result<()>;
    /// Takes a vacant leadership (or keeps ours): the token, `None` when another
    /// lease leads.
    async fn campaign(
        &self,
        lease: i64,
        group: &GroupId,
        member: &MemberId,
    ) -> Result<Option<Token>>;
    /// Gives up leadership held on the lease.
    async fn resign(&self, lease: i64, group: &GroupId) -> Result<bool>;
    /// The live leader.
    async fn get_leader(&self, group: &GroupId) -> Result<Option<MemberId>>;
    /// The source of the group's changes (`GroupNotCreated` for an unknown group):
    /// notifications on PostgreSQL, one poller for every watched group on MySQL.
    async fn watch(&self, group: &GroupId) -> Result<Option<DriverEventStream>>;
    /// Closes the idle connections (at `stop`; new ones open on demand).
    fn disconnect(&self);
}

/// Whether an error means the connection is gone (so are the locks it held).
pub(crate) fn is_broken(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(d) => {
            let code = d.code();
            let code = code.as_deref().unwrap_or("");
            // PostgreSQL: connection exceptions (08), operator intervention (57P01
            // terminated, 57P02 crash, 57P03 cannot connect now); MySQL: 08S01.
            code.starts_with("08")
                || code.starts_with("57P")
                || code == "HY000" && {
                    let m = d.message().to_ascii_lowercase();
                    m.contains("connection was killed") || m.contains("lost connection")
                }
        }
        _ => false,
    }
}

/// A sqlx error as a tooz error of `driver`, with what was being done.
pub(crate) fn to_tooz(driver: &'static str, what: &str, e: sqlx::Error) -> ToozError {
    if is_broken(&e) || matches!(e, sqlx::Error::Configuration(_)) {
        return ToozError::connection(driver, what, e);
    }
    ToozError::Backend {
        driver,
        message: format!("{what}: {e}"),
        source: Some(Box::new(e)),
        retryable: false,
    }
}

/// The SQLSTATE of a database error.
pub(crate) fn sqlstate(e: &sqlx::Error) -> Option<String> {
    match e {
        sqlx::Error::Database(d) => d.code().map(|c| c.into_owned()),
        _ => None,
    }
}

/// Members as a set.
pub(crate) fn member_set(v: Vec<(MemberId, Capabilities)>) -> BTreeSet<MemberId> {
    v.into_iter().map(|(m, _)| m).collect()
}

/// `SystemTime` of microseconds since the epoch.
pub(crate) fn system_time(us: i64) -> Option<std::time::SystemTime> {
    let us = u64::try_from(us).ok()?;
    std::time::UNIX_EPOCH.checked_add(Duration::from_micros(us))
}

/// A leadership token read from `tooz_leaders`: grants store 1 and up (a negative
/// value another client wrote restarts at 1), so a negative one is junk; it is not
/// cast to a huge `u64`, which the next grant would undercut.
pub(crate) fn leader_token(group: &tooz_core::GroupId, t: i64) -> Result<u64> {
    u64::try_from(t).map_err(|_| {
        ToozError::serialization(
            format!("the leadership token of group {group} in tooz_leaders is {t}"),
            "tokens are positive",
        )
    })
}

/// Whole microseconds of a duration, for SQL.
pub(crate) fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// Idle dedicated connections for statements that hold nothing. sqlx's pool pings
/// every connection it takes back (one more round trip per statement); these are
/// handed back as they are, and dropped when a statement found them broken.
///
/// At most [`MAX_OPEN`] are lent at once: further statements wait for one to come
/// back rather than open a connection each (200 concurrent `join_group`s used to
/// open 200 connections and exhaust the server's slots).
#[derive(Debug)]
pub(crate) struct Idle<C> {
    conns: std::sync::Mutex<Vec<C>>,
    open: tokio::sync::Semaphore,
}

/// The most idle connections kept.
const MAX_IDLE: usize = 4;

/// The most connections lent at once.
pub(crate) const MAX_OPEN: usize = 16;

impl<C> Idle<C> {
    pub(crate) fn new() -> Self {
        Idle {
            conns: std::sync::Mutex::new(Vec::new()),
            open: tokio::sync::Semaphore::new(MAX_OPEN),
        }
    }

    /// Waits for a turn to use a connection (see [`MAX_OPEN`]).
    pub(crate) async fn turn(
        &self,
    ) -> std::result::Result<tokio::sync::SemaphorePermit<'_>, sqlx::Error> {
        self.open
            .acquire()
            .await
            .map_err(|_| sqlx::Error::PoolClosed)
    }

    fn guard(&self) -> std::sync::MutexGuard<'_, Vec<C>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An idle connection, if there is one.
    pub(crate) fn pop(&self) -> Option<C> {
        self.guard().pop()
    }

    /// Lends `conn` on a turn; it comes back when the loan is dropped, unless found
    /// broken.
    pub(crate) fn lend<'a>(
        &'a self,
        conn: C,
        turn: tokio::sync::SemaphorePermit<'a>,
    ) -> Lent<'a, C> {
        Lent {
            conn: Some(conn),
            home: self,
            broken: false,
            _turn: turn,
        }
    }

    /// Drops every idle connection.
    pub(crate) fn clear(&self) -> Vec<C> {
        std::mem::take(&mut *self.guard())
    }
}

/// A connection lent by [`Idle`].
#[derive(Debug)]
pub(crate) struct Lent<'a, C> {
    conn: Option<C>,
    home: &'a Idle<C>,
    broken: bool,
    /// Given back after the connection (fields drop in order).
    _turn: tokio::sync::SemaphorePermit<'a>,
}

impl<C> Lent<'_, C> {
    /// Notes the outcome of a statement: a broken connection is not given back.
    pub(crate) fn check<T>(
        &mut self,
        r: std::result::Result<T, sqlx::Error>,
    ) -> std::result::Result<T, sqlx::Error> {
        if let Err(e) = &r
            && is_broken(e)
        {
            self.broken = true;
        }
        r
    }
}

impl<C> std::ops::Deref for Lent<'_, C> {
    type Target = C;
    fn deref(&self) -> &C {
        match &self.conn {
            Some(c) => c,
            None => unreachable!("a loan holds its connection until dropped"),
        }
    }
}

impl<C> std::ops::DerefMut for Lent<'_, C> {
    fn deref_mut(&mut self) -> &mut C {
        match &mut self.conn {
            Some(c) => c,
            None => unreachable!("a loan holds its connection until dropped"),
        }
    }
}

impl<C> Drop for Lent<'_, C> {
    fn drop(&mut self) {
        if let Some(c) = self.conn.take()
            && !self.broken
        {
            let mut idle = self.home.guard();
            if idle.len() < MAX_IDLE {
                idle.push(c);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use futures_util::FutureExt;

    use super::{Idle, MAX_OPEN};

    #[tokio::test]
    async fn lends_at_most_max_open_connections() {
        let idle: Idle<usize> = Idle::new();
        let mut loans = Vec::new();
        for i in 0..MAX_OPEN {
            let turn = idle.turn().await.unwrap();
            loans.push(idle.lend(i, turn));
        }
        // Every turn is out: the next statement waits.
        assert!(idle.turn().now_or_never().is_none());
        // A loan given back makes a turn and an idle connection.
        drop(loans.pop());
        let turn = idle.turn().now_or_never().unwrap().unwrap();
        assert_eq!(idle.pop(), Some(MAX_OPEN - 1));
        drop(turn);
    }
}
