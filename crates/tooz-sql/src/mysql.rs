//! MySQL/MariaDB: `GET_LOCK` with Python tooz's lock names, tables for the rest;
//! event streams poll.
//!
//! `GET_LOCK` has no shared mode. A shared holder takes the lock name briefly (so it
//! waits out exclusive holders, Python ones included), registers itself in
//! `tooz_readers` under a reader lock of its own (`tooz-r:…`, held on its session, so
//! a dead reader's row is recognised), and gives the name back. An exclusive holder
//! takes the name (which keeps new readers out) and then waits until every
//! registered reader whose reader lock is still held is gone, blocking server-side
//! on each reader lock in turn. A Python holder takes only the name, so it does not
//! see our shared holders (Python has no shared locks on MySQL).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::mysql::{MySqlConnectOptions, MySqlConnection, MySqlPool, MySqlPoolOptions};
use sqlx::{Connection, Executor, Row};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tooz_core::{
    Capabilities, DriverEvent, DriverEventStream, GroupId, LockName, MemberId, MemberInfo, Mode,
    Result, ToozError,
};

use crate::backend::{Backend, Idle, Lent, Token, micros, system_time, to_tooz};
use crate::config::MySqlConfig;
use crate::layout::{FENCE_LOCK, MYSQL_SCHEMA_LOCK, SCHEMA_NAME, SCHEMA_VERSION};

const NAME: &str = crate::MYSQL_NAME;

/// Every connection reads committed rows and takes no gap locks.
const ISOLATION: &str = "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED";

/// Runs `op` again (a few times) when InnoDB chose it as a deadlock victim.
async fn retried<T, F, Fut>(mut op: F) -> std::result::Result<T, sqlx::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<T, sqlx::Error>>,
{
    let mut tries = 0;
    loop {
        match op().await {
            Err(sqlx::Error::Database(d)) if d.code().as_deref() == Some("40001") && tries < 5 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(2 << tries)).await;
            }
            r => return r,
        }
    }
}

/// The `GET_LOCK` timeout of a wait without a deadline (seconds).
const FOREVER_SECS: f64 = 31_536_000.0;

/// The server's clock, in microseconds since the epoch (the statement's start).
macro_rules! now_us {
    () => {
        "CAST(UNIX_TIMESTAMP(NOW(6)) * 1000000 AS SIGNED)"
    };
}

const DDL: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS tooz_schema (
        name VARCHAR(32) NOT NULL PRIMARY KEY,
        version INT NOT NULL
    ) ENGINE=InnoDB",
    "CREATE TABLE IF NOT EXISTS tooz_leases (
        lease_id BIGINT NOT NULL PRIMARY KEY,
        member_id VARBINARY(1024) NOT NULL,
        expires_us BIGINT NOT NULL
    ) ENGINE=InnoDB",
    "CREATE TABLE IF NOT EXISTS tooz_groups (
        group_id VARBINARY(1024) NOT NULL PRIMARY KEY,
        created_us BIGINT NOT NULL
    ) ENGINE=InnoDB",
    "CREATE TABLE IF NOT EXISTS tooz_members (
        group_id VARBINARY(1024) NOT NULL,
        member_id VARBINARY(1024) NOT NULL,
        lease_id BIGINT NOT NULL,
        capabilities LONGBLOB NOT NULL,
        joined_us BIGINT NOT NULL,
        updated_us BIGINT NOT NULL,
        PRIMARY KEY (group_id, member_id),
        KEY tooz_members_lease (lease_id),
        CONSTRAINT tooz_members_group FOREIGN KEY (group_id) REFERENCES tooz_groups (group_id)
    ) ENGINE=InnoDB",
    "CREATE TABLE IF NOT EXISTS tooz_leaders (
        group_id VARBINARY(1024) NOT NULL PRIMARY KEY,
        member_id VARBINARY(1024) NULL,
        lease_id BIGINT NULL,
        token BIGINT NOT NULL
    ) ENGINE=InnoDB",
    "CREATE TABLE IF NOT EXISTS tooz_fences (
        kind SMALLINT NOT NULL,
        name VARBINARY(1024) NOT NULL,
        token BIGINT NOT NULL,
        PRIMARY KEY (kind, name)
    ) ENGINE=InnoDB",
    "CREATE TABLE IF NOT EXISTS tooz_readers (
        name VARBINARY(192) NOT NULL,
        reader VARCHAR(64) NOT NULL,
        PRIMARY KEY (name, reader)
    ) ENGINE=InnoDB",
    "INSERT IGNORE INTO tooz_schema (name, version) VALUES ('tooz', 1)",
];

/// The next value of a lock fence `token` (in `ON DUPLICATE KEY UPDATE`): one more,
/// or 1 again when another client left it where it cannot count up from (negative,
/// which `LAST_INSERT_ID` would turn into a huge unsigned token, or `i64::MAX`,
/// which cannot be advanced and used to fail the grant).
macro_rules! fence_next {
    () => {
        "IF(token < 0 OR token = 9223372036854775807, 1, token + 1)"
    };
}

/// Runs one statement on an idle dedicated connection (see [`Idle`]).
macro_rules! on_conn {
    ($self:ident, |$c:ident| $body:expr) => {
        async {
            // A connection that died while idle (the server's idle timeout, a
            // restart) is replaced once: its statement never reached the server.
            let mut retried = false;
            loop {
                let (mut lent, reused) = $self.lend().await?;
                let $c: &mut MySqlConnection = &mut lent;
                let r = $body;
                match lent.check(r) {
                    Err(e) if reused && !retried && crate::backend::is_broken(&e) => {
                        retried = true;
                    }
                    r => break r,
                }
            }
        }
        .await
    };
}

/// A MySQL or MariaDB database.
#[derive(Debug)]
pub(crate) struct MySql {
    cfg: MySqlConfig,
    /// For schema creation only.
    pool: MySqlPool,
    idle: Idle<MySqlConnection>,
    /// The longest `GET_LOCK` name the server takes (MySQL 64 characters, MariaDB
    /// 192 bytes); longer names are mapped.
    name_limit: AtomicUsize,
    /// The one poller of every watched group.
    watches: Arc<Watches>,
}

impl MySql {
    pub(crate) fn new(cfg: MySqlConfig) -> Self {
        let pool = MySqlPoolOptions::new()
            .max_connections(4)
            .min_connections(0)
            .acquire_timeout(cfg.common.connect_timeout)
            .idle_timeout(Some(Duration::from_secs(60)))
            .test_before_acquire(false)
            // No gap locks: concurrent joins and leaves of one group do not deadlock.
            .after_connect(|c, _| {
                Box::pin(async move {
                    c.execute(ISOLATION).await?;
                    Ok(())
                })
            })
            .connect_lazy_with(cfg.connect.clone());
        let watches = Arc::new(Watches {
            state: Mutex::new(WatchState::default()),
            connect: cfg.connect.clone(),
            connect_timeout: cfg.common.connect_timeout,
            every: cfg.common.poll_interval,
            stop: CancellationToken::new(),
        });
        MySql {
            cfg,
            pool,
            idle: Idle::new(),
            name_limit: AtomicUsize::new(crate::layout::MYSQL_MAX_LOCK_NAME),
            watches,
        }
    }

    /// A connection for statements that hold nothing.
    async fn lend(&self) -> std::result::Result<(Lent<'_, MySqlConnection>, bool), sqlx::Error> {
        let turn = self.idle.turn().await?;
        if let Some(c) = self.idle.pop() {
            return Ok((self.idle.lend(c, turn), true));
        }
        let c = connect(&self.cfg.connect, self.cfg.common.connect_timeout).await?;
        Ok((self.idle.lend(c, turn), false))
    }

    fn err(what: &str) -> impl FnOnce(sqlx::Error) -> ToozError + '_ {
        move |e| to_tooz(NAME, what, e)
    }

    async fn group_exists(&self, group: &GroupId) -> Result<bool> {
        let row = on_conn!(self, |c| sqlx::query(
            "SELECT EXISTS (SELECT 1 FROM tooz_groups WHERE group_id = ?)"
        )
        .bind(group.as_bytes())
        .fetch_one(c)
        .await)
        .map_err(Self::err("reading a group"))?;
        Ok(row
            .try_get::<i64, _>(0)
            .map_err(Self::err("reading a group"))?
            != 0)
    }

    /// Advances the fencing counter of `name`; the new token.
    async fn fence(
        conn: &mut MySqlConnection,
        name: &LockName,
    ) -> std::result::Result<Token, sqlx::Error> {
        let r = sqlx::query(concat!(
            "INSERT INTO tooz_fences (kind, name, token) VALUES (?, ?, LAST_INSERT_ID(1)) \
                 ON DUPLICATE KEY UPDATE token = LAST_INSERT_ID(",
            fence_next!(),
            ")"
        ))
        .bind(FENCE_LOCK)
        .bind(name.as_bytes())
        .execute(conn)
        .await?;
        Ok(r.last_insert_id())
    }

    /// Registers a shared hold while holding the name: the reader lock, its row,
    /// the fence; then gives the name back.
    async fn register_reader(
        conn: &mut MySqlConnection,
        key: &[u8],
        name: &LockName,
        reader: &str,
    ) -> std::result::Result<Token, sqlx::Error> {
        sqlx::query("INSERT INTO tooz_readers (name, reader) SELECT ?, ? FROM DUAL WHERE GET_LOCK(?, 0) = 1")
            .bind(key)
            .bind(reader)
            .bind(reader)
            .execute(&mut *conn)
            .await?;
        let token = Self::fence(conn, name).await?;
        sqlx::query("SELECT RELEASE_LOCK(?)")
            .bind(key)
            .execute(&mut *conn)
            .await?;
        Ok(token)
    }

    /// The exclusive statement batch: takes the name (waiting `secs`, negative for
    /// ever), counts live readers, and if there are none advances the fence. With
    /// `give_back`, a name taken while readers live is released again. Returns the
    /// number of live readers (-1: not taken) and the token.
    async fn exclusive_batch(
        conn: &mut MySqlConnection,
        key: &[u8],
        name: &LockName,
        secs: f64,
        give_back: bool,
    ) -> std::result::Result<(i64, Option<Token>), sqlx::Error> {
        let k = hex::encode(key);
        let n = hex::encode(name.as_bytes());
        let release = if give_back {
            format!("IF(@tooz_n > 0, RELEASE_LOCK(X'{k}'), NULL)")
        } else {
            "NULL".to_string()
        };
        let sql = format!(
            "SET @tooz_n := (SELECT IF(GET_LOCK(X'{k}', {secs}) = 1, \
             (SELECT COUNT(*) FROM tooz_readers WHERE name = X'{k}' AND IS_USED_LOCK(reader) IS NOT NULL), -1)); \
             INSERT INTO tooz_fences (kind, name, token) SELECT {FENCE_LOCK}, X'{n}', LAST_INSERT_ID(1) FROM DUAL \
             WHERE @tooz_n = 0 ON DUPLICATE KEY UPDATE token = LAST_INSERT_ID({next}); \
             SELECT @tooz_n, IF(@tooz_n = 0, LAST_INSERT_ID(), NULL), {release}",
            next = fence_next!()
        );
        let rows = conn.fetch_all(sqlx::raw_sql(&sql)).await?;
        let row = rows
            .last()
            .ok_or_else(|| sqlx::Error::Protocol("the lock batch returned no row".into()))?;
        let readers: Option<i64> = row.try_get(0)?;
        let token: Option<u64> = row.try_get(1)?;
        Ok((readers.unwrap_or(-1), token))
    }
}

#[tooz_core::async_trait]
impl Backend for MySql {
    const NAME: &'static str = NAME;
    type Conn = MySqlConnection;
    type Key = Vec<u8>;

    fn key(&self, name: &LockName) -> Vec<u8> {
        let limit = self.name_limit.load(Ordering::Relaxed);
        if name.as_bytes().len() <= limit {
            name.as_bytes().to_vec()
        } else {
            crate::layout::mysql_lock_name(name.as_bytes())
        }
    }

    fn ttl(&self) -> Duration {
        self.cfg.common.timeout
    }

    async fn prepare(&self) -> Result<()> {
        let read = || async {
            on_conn!(self, |c| sqlx::query(
                "SELECT version FROM tooz_schema WHERE name = ?"
            )
            .bind(SCHEMA_NAME)
            .fetch_optional(c)
            .await)
        };
        let version = match read().await {
            Ok(Some(row)) => Some(
                row.try_get::<i32, _>(0)
                    .map_err(Self::err("reading the schema version"))?,
            ),
            Ok(None) => None,
            // ER_NO_SUCH_TABLE
            Err(sqlx::Error::Database(d)) if d.code().as_deref() == Some("42S02") => None,
            Err(e) => return Err(to_tooz(NAME, "reading the schema version", e)),
        };
        let version = match version {
            Some(v) => v,
            None => {
                let mut c = self.pool.acquire().await.map_err(Self::err("connecting"))?;
                sqlx::query("SELECT GET_LOCK(?, 30)")
                    .bind(MYSQL_SCHEMA_LOCK)
                    .execute(&mut *c)
                    .await
                    .map_err(Self::err("creating the tooz tables"))?;
                let mut res = Ok(());
                for stmt in DDL {
                    if let Err(e) = c.execute(sqlx::raw_sql(stmt)).await {
                        res = Err(to_tooz(NAME, "creating the tooz tables", e));
                        break;
                    }
                }
                let _ = sqlx::query("SELECT RELEASE_LOCK(?)")
                    .bind(MYSQL_SCHEMA_LOCK)
                    .execute(&mut *c)
                    .await;
                res?;
                let row = read()
                    .await
                    .map_err(Self::err("reading the schema version"))?
                    .ok_or_else(|| {
                        ToozError::backend_msg(
                            NAME,
                            "the tooz schema row is missing after creating it",
                        )
                    })?;
                row.try_get::<i32, _>(0)
                    .map_err(Self::err("reading the schema version"))?
            }
        };
        if version != SCHEMA_VERSION {
            return Err(ToozError::backend_msg(
                NAME,
                format!(
                    "the database holds tooz schema version {version}, which this tooz-sql (schema version {SCHEMA_VERSION}) does not know; upgrade tooz-sql"
                ),
            ));
        }
        let row = on_conn!(self, |c| sqlx::query("SELECT VERSION()").fetch_one(c).await)
            .map_err(Self::err("reading the server version"))?;
        let v: String = row
            .try_get(0)
            .map_err(Self::err("reading the server version"))?;
        if v.to_ascii_lowercase().contains("mariadb") {
            self.name_limit.store(192, Ordering::Relaxed);
        }
        let gc = on_conn!(self, |c| sqlx::query(concat!(
            "DELETE m FROM tooz_members m LEFT JOIN tooz_leases l ON l.lease_id = m.lease_id \
             AND l.expires_us > ",
            now_us!(),
            " - 60000000 WHERE l.lease_id IS NULL"
        ))
        .execute(c)
        .await)
        .and(on_conn!(self, |c| sqlx::query(concat!(
            "DELETE FROM tooz_leases WHERE expires_us < ",
            now_us!(),
            " - 60000000"
        ))
        .execute(c)
        .await));
        if let Err(e) = gc {
            tracing::debug!(error = %e, "removing expired leases failed");
        }
        Ok(())
    }

    async fn connect_holder(&self) -> std::result::Result<(MySqlConnection, i64), sqlx::Error> {
        let mut c = connect(&self.cfg.connect, self.cfg.common.connect_timeout).await?;
        // A client that stopped talking loses its session (and its locks) one lease
        // after its last statement.
        let ttl = self.ttl();
        let secs = (ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0)).max(1);
        sqlx::query(&format!("SET SESSION wait_timeout = {secs}"))
            .execute(&mut c)
            .await?;
        let row = sqlx::query("SELECT CAST(CONNECTION_ID() AS SIGNED)")
            .fetch_one(&mut c)
            .await?;
        let id: i64 = row.try_get(0)?;
        Ok((c, id))
    }

    async fn close(&self, conn: MySqlConnection) {
        let _ = tokio::time::timeout(Duration::from_secs(1), conn.close()).await;
    }

    async fn open_lease(&self, lease: i64, member: &MemberId) -> Result<()> {
        on_conn!(self, |c| sqlx::query(concat!(
            "INSERT INTO tooz_leases (lease_id, member_id, expires_us) VALUES (?, ?, ",
            now_us!(),
            " + ?)"
        ))
        .bind(lease)
        .bind(member.as_bytes())
        .bind(micros(self.ttl()))
        .execute(c)
        .await)
        .map_err(Self::err("creating the lease"))?;
        Ok(())
    }

    async fn renew(
        &self,
        conn: &mut MySqlConnection,
        lease: i64,
    ) -> std::result::Result<bool, sqlx::Error> {
        let r = sqlx::query(concat!(
            "UPDATE tooz_leases SET expires_us = ",
            now_us!(),
            " + ? WHERE lease_id = ? AND expires_us > ",
            now_us!()
        ))
        .bind(micros(self.ttl()))
        .bind(lease)
        .execute(conn)
        .await?;
        Ok(r.rows_affected() > 0)
    }

    async fn end_lease(&self, lease: i64) -> Result<()> {
        for sql in [
            "DELETE FROM tooz_members WHERE lease_id = ?",
            "UPDATE tooz_leaders SET member_id = NULL, lease_id = NULL WHERE lease_id = ?",
            "DELETE FROM tooz_leases WHERE lease_id = ?",
        ] {
            retried(
                || async move { on_conn!(self, |c| sqlx::query(sql).bind(lease).execute(c).await) },
            )
            .await
            .map_err(Self::err("ending the lease"))?;
        }
        Ok(())
    }

    async fn ping(&self, conn: &mut MySqlConnection) -> std::result::Result<(), sqlx::Error> {
        sqlx::query("SELECT 1").execute(conn).await.map(|_| ())
    }

    async fn try_lock(
        &self,
        conn: &mut MySqlConnection,
        key: &Vec<u8>,
        name: &LockName,
        mode: Mode,
        reader: &str,
    ) -> std::result::Result<Option<Token>, sqlx::Error> {
        match mode {
            Mode::Exclusive => {
                let (readers, token) = Self::exclusive_batch(conn, key, name, 0.0, true).await?;
                Ok(if readers == 0 { token } else { None })
            }
            Mode::Shared => {
                let row = sqlx::query("SELECT GET_LOCK(?, 0)")
                    .bind(key.as_slice())
                    .fetch_one(&mut *conn)
                    .await?;
                if row.try_get::<Option<i64>, _>(0)? != Some(1) {
                    return Ok(None);
                }
                Ok(Some(Self::register_reader(conn, key, name, reader).await?))
            }
        }
    }

    async fn try_lock_batch(
        &self,
        conn: &mut MySqlConnection,
        items: &[(Vec<u8>, LockName)],
    ) -> std::result::Result<Option<Vec<Option<Token>>>, sqlx::Error> {
        // One round trip: take each name (as `exclusive_batch` does), advance the
        // fences of those taken with no live reader in one transaction (one commit
        // for the batch, durable before any token is handed out), give back names
        // taken while readers live, and report.
        let mut sql = String::with_capacity(items.len() * 420);
        for (i, (key, _)) in items.iter().enumerate() {
            let k = hex::encode(key);
            let _ = write!(
                sql,
                "SET @tooz_n{i} := (SELECT IF(GET_LOCK(X'{k}', 0) = 1, \
                 (SELECT COUNT(*) FROM tooz_readers WHERE name = X'{k}' AND IS_USED_LOCK(reader) IS NOT NULL), -1)); "
            );
        }
        sql.push_str("START TRANSACTION; ");
        for (i, (_, name)) in items.iter().enumerate() {
            let n = hex::encode(name.as_bytes());
            let _ = write!(
                sql,
                "INSERT INTO tooz_fences (kind, name, token) SELECT {FENCE_LOCK}, X'{n}', LAST_INSERT_ID(1) FROM DUAL \
                 WHERE @tooz_n{i} = 0 ON DUPLICATE KEY UPDATE token = LAST_INSERT_ID({next}); \
                 SET @tooz_t{i} := IF(@tooz_n{i} = 0, LAST_INSERT_ID(), NULL); ",
                next = fence_next!()
            );
        }
        sql.push_str("COMMIT; DO 0");
        for (i, (key, _)) in items.iter().enumerate() {
            let _ = write!(
                sql,
                ", IF(@tooz_n{i} > 0, RELEASE_LOCK(X'{}'), NULL)",
                hex::encode(key)
            );
        }
        sql.push_str("; ");
        for i in 0..items.len() {
            if i > 0 {
                sql.push_str(" UNION ALL ");
            }
            let _ = write!(
                sql,
                "SELECT CAST(@tooz_n{i} AS SIGNED), CAST(@tooz_t{i} AS SIGNED)"
            );
        }
        let rows = match conn.fetch_all(sqlx::raw_sql(&sql)).await {
            Ok(rows) => rows,
            Err(e) => {
                if !crate::backend::is_broken(&e) {
                    // Nothing of the batch may stay: undo the fences, give back
                    // every name it may have taken (no handle holds them).
                    sqlx::query("ROLLBACK").execute(&mut *conn).await?;
                    for (key, _) in items {
                        self.abandon(conn, key, Mode::Exclusive, "").await?;
                    }
                }
                return Err(e);
            }
        };
        // The last statement's rows (the batch's other statements return none).
        let rows = &rows[rows.len().saturating_sub(items.len())..];
        if rows.len() != items.len() {
            for (key, _) in items {
                self.abandon(conn, key, Mode::Exclusive, "").await?;
            }
            return Err(sqlx::Error::Protocol(format!(
                "the lock batch of {} returned {} rows",
                items.len(),
                rows.len()
            )));
        }
        let parsed = rows
            .iter()
            .map(|r| {
                let readers: Option<i64> = r.try_get(0)?;
                let token: Option<i64> = r.try_get(1)?;
                Ok(match (readers, token) {
                    (Some(0), Some(t)) => Some(u64::try_from(t).map_err(|_| {
                        sqlx::Error::Protocol(format!("the lock batch returned token {t}"))
                    })?),
                    _ => None,
                })
            })
            .collect::<std::result::Result<Vec<_>, sqlx::Error>>();
        match parsed {
            Ok(tokens) => Ok(Some(tokens)),
            Err(e) => {
                // Grants nobody can account for: give them all back.
                for (key, _) in items {
                    self.abandon(conn, key, Mode::Exclusive, "").await?;
                }
                Err(e)
            }
        }
    }

    async fn wait_lock(
        &self,
        conn: &mut MySqlConnection,
        key: &Vec<u8>,
        name: &LockName,
        mode: Mode,
        reader: &str,
        wait: Option<Duration>,
    ) -> std::result::Result<Option<Token>, sqlx::Error> {
        let deadline = wait.and_then(|w| Instant::now().checked_add(w));
        let secs = |deadline: Option<Instant>| match deadline {
            Some(d) => {
                (d.saturating_duration_since(Instant::now()).as_secs_f64() * 1000.0).ceil() / 1000.0
            }
            // MariaDB refuses a negative timeout (MySQL's "for ever"): a year.
            None => FOREVER_SECS,
        };
        match mode {
            Mode::Shared => {
                let row = sqlx::query("SELECT GET_LOCK(?, ?)")
                    .bind(key.as_slice())
                    .bind(secs(deadline))
                    .fetch_one(&mut *conn)
                    .await?;
                if row.try_get::<Option<i64>, _>(0)? != Some(1) {
                    return Ok(None);
                }
                Ok(Some(Self::register_reader(conn, key, name, reader).await?))
            }
            Mode::Exclusive => {
                let (mut readers, token) =
                    Self::exclusive_batch(conn, key, name, secs(deadline), false).await?;
                if readers < 0 {
                    return Ok(None);
                }
                if readers == 0 {
                    return Ok(token);
                }
                // Holding the name (new readers wait), wait for each live reader.
                while readers > 0 {
                    let row = sqlx::query(
                        "SELECT reader FROM tooz_readers WHERE name = ? AND IS_USED_LOCK(reader) IS NOT NULL LIMIT 1",
                    )
                    .bind(key.as_slice())
                    .fetch_optional(&mut *conn)
                    .await?;
                    let Some(row) = row else { break };
                    let r: String = row.try_get(0)?;
                    let left = secs(deadline);
                    if left == 0.0 {
                        sqlx::query("SELECT RELEASE_LOCK(?)")
                            .bind(key.as_slice())
                            .execute(&mut *conn)
                            .await?;
                        return Ok(None);
                    }
                    let row = sqlx::query("SELECT GET_LOCK(?, ?)")
                        .bind(&r)
                        .bind(left)
                        .fetch_one(&mut *conn)
                        .await?;
                    if row.try_get::<Option<i64>, _>(0)? == Some(1) {
                        sqlx::query("SELECT RELEASE_LOCK(?)")
                            .bind(&r)
                            .execute(&mut *conn)
                            .await?;
                        sqlx::query("DELETE FROM tooz_readers WHERE name = ? AND reader = ?")
                            .bind(key.as_slice())
                            .bind(&r)
                            .execute(&mut *conn)
                            .await?;
                    } else {
                        sqlx::query("SELECT RELEASE_LOCK(?)")
                            .bind(key.as_slice())
                            .execute(&mut *conn)
                            .await?;
                        return Ok(None);
                    }
                    readers -= 1;
                    if readers == 0 {
                        readers = 1; // look again until no live reader is left
                    }
                }
                Ok(Some(Self::fence(conn, name).await?))
            }
        }
    }

    async fn unlock(
        &self,
        conn: &mut MySqlConnection,
        key: &Vec<u8>,
        mode: Mode,
        reader: &str,
    ) -> std::result::Result<bool, sqlx::Error> {
        match mode {
            Mode::Exclusive => {
                let row = sqlx::query("SELECT RELEASE_LOCK(?)")
                    .bind(key.as_slice())
                    .fetch_one(conn)
                    .await?;
                Ok(row.try_get::<Option<i64>, _>(0)? == Some(1))
            }
            Mode::Shared => {
                sqlx::query("DELETE FROM tooz_readers WHERE name = ? AND reader = ?")
                    .bind(key.as_slice())
                    .bind(reader)
                    .execute(&mut *conn)
                    .await?;
                let row = sqlx::query("SELECT RELEASE_LOCK(?)")
                    .bind(reader)
                    .fetch_one(&mut *conn)
                    .await?;
                Ok(row.try_get::<Option<i64>, _>(0)? == Some(1))
            }
        }
    }

    async fn abandon(
        &self,
        conn: &mut MySqlConnection,
        key: &Vec<u8>,
        mode: Mode,
        reader: &str,
    ) -> std::result::Result<(), sqlx::Error> {
        for _ in 0..64 {
            let row = sqlx::query("SELECT RELEASE_LOCK(?)")
                .bind(key.as_slice())
                .fetch_one(&mut *conn)
                .await?;
            if row.try_get::<Option<i64>, _>(0)? != Some(1) {
                break;
            }
        }
        if mode == Mode::Shared {
            self.unlock(conn, key, mode, reader).await?;
        }
        Ok(())
    }

    async fn holds(
        &self,
        conn: &mut MySqlConnection,
        key: &Vec<u8>,
        mode: Mode,
        reader: &str,
    ) -> std::result::Result<bool, sqlx::Error> {
        let q = sqlx::query("SELECT IS_USED_LOCK(?) = CONNECTION_ID()");
        let q = match mode {
            Mode::Exclusive => q.bind(key.as_slice()),
            Mode::Shared => q.bind(reader.as_bytes()),
        };
        let row = q.fetch_one(conn).await?;
        Ok(row.try_get::<Option<i64>, _>(0)? == Some(1))
    }

    async fn cancel_wait(&self, server_id: i64) {
        if let Err(e) = on_conn!(self, |c| sqlx::query(&format!(
            "KILL QUERY {}",
            server_id as u64
        ))
        .execute(c)
        .await)
        {
            tracing::debug!(server_id, error = %e, "cancelling a lock wait failed");
        }
    }

    async fn break_lock(&self, key: &Vec<u8>) -> Result<bool> {
        let holders = on_conn!(self, |c| sqlx::query(
            "SELECT CAST(IS_USED_LOCK(?) AS SIGNED) UNION SELECT CAST(IS_USED_LOCK(reader) AS SIGNED) FROM tooz_readers WHERE name = ?",
        )
        .bind(key.as_slice())
        .bind(key.as_slice())
        .fetch_all(c)
        .await)
        .map_err(Self::err("breaking a lock"))?;
        let mut ids = Vec::new();
        for r in holders {
            if let Some(id) = r
                .try_get::<Option<i64>, _>(0)
                .map_err(Self::err("breaking a lock"))?
            {
                ids.push(id);
            }
        }
        if ids.is_empty() {
            return Ok(false);
        }
        for id in &ids {
            if let Err(e) = on_conn!(self, |c| sqlx::query(&format!("KILL {id}"))
                .execute(c)
                .await)
            {
                tracing::debug!(id, error = %e, "ending a holder's session failed");
            }
        }
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until {
            let row = on_conn!(self, |c| sqlx::query(
                "SELECT IS_USED_LOCK(?) IS NULL AND NOT EXISTS (SELECT 1 FROM tooz_readers WHERE name = ? AND IS_USED_LOCK(reader) IS NOT NULL)",
            )
            .bind(key.as_slice())
            .bind(key.as_slice())
            .fetch_one(c)
            .await)
            .map_err(Self::err("breaking a lock"))?;
            if row
                .try_get::<Option<i64>, _>(0)
                .map_err(Self::err("breaking a lock"))?
                == Some(1)
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(true)
    }

    async fn create_group(&self, group: &GroupId) -> Result<()> {
        let r = on_conn!(self, |c| sqlx::query(concat!(
            "INSERT IGNORE INTO tooz_groups (group_id, created_us) VALUES (?, ",
            now_us!(),
            ")"
        ))
        .bind(group.as_bytes())
        .execute(c)
        .await)
        .map_err(Self::err("creating a group"))?;
        if r.rows_affected() == 0 {
            return Err(ToozError::GroupAlreadyExist(group.clone()));
        }
        Ok(())
    }

    async fn delete_group(&self, group: &GroupId) -> Result<()> {
        on_conn!(self, |c| sqlx::query(concat!(
            "DELETE m FROM tooz_members m LEFT JOIN tooz_leases l ON l.lease_id = m.lease_id \
             AND l.expires_us > ",
            now_us!(),
            " WHERE m.group_id = ? AND l.lease_id IS NULL"
        ))
        .bind(group.as_bytes())
        .execute(c)
        .await)
        .map_err(Self::err("deleting a group"))?;
        let r = on_conn!(self, |c| sqlx::query(
            "DELETE FROM tooz_groups WHERE group_id = ?"
        )
        .bind(group.as_bytes())
        .execute(c)
        .await);
        match r {
            Ok(r) if r.rows_affected() == 0 => Err(ToozError::GroupNotCreated(group.clone())),
            Ok(_) => Ok(()),
            Err(sqlx::Error::Database(d)) if d.code().as_deref() == Some("23000") => {
                Err(ToozError::GroupNotEmpty(group.clone()))
            }
            Err(e) => Err(to_tooz(NAME, "deleting a group", e)),
        }
    }

    async fn get_groups(&self) -> Result<Vec<GroupId>> {
        let rows = on_conn!(self, |c| sqlx::query("SELECT group_id FROM tooz_groups")
            .fetch_all(c)
            .await)
        .map_err(Self::err("listing groups"))?;
        rows.iter()
            .map(|r| r.try_get::<Vec<u8>, _>(0).map(GroupId::from))
            .collect::<std::result::Result<_, _>>()
            .map_err(Self::err("listing groups"))
    }

    async fn join_group(
        &self,
        lease: i64,
        group: &GroupId,
        member: &MemberId,
        caps: &Capabilities,
    ) -> Result<()> {
        // A dead member's row gives way.
        retried(|| async {
            on_conn!(self, |c| sqlx::query(concat!(
                "DELETE m FROM tooz_members m LEFT JOIN tooz_leases l ON l.lease_id = m.lease_id \
                 AND l.expires_us > ",
                now_us!(),
                " WHERE m.group_id = ? AND m.member_id = ? AND l.lease_id IS NULL"
            ))
            .bind(group.as_bytes())
            .bind(member.as_bytes())
            .execute(c)
            .await)
        })
        .await
        .map_err(Self::err("joining a group"))?;
        let r = retried(|| async {
            on_conn!(self, |c| sqlx::query(concat!(
                "INSERT INTO tooz_members (group_id, member_id, lease_id, capabilities, joined_us, updated_us) \
                 VALUES (?, ?, ?, ?, ",
                now_us!(),
                ", ",
                now_us!(),
                ")"
            ))
            .bind(group.as_bytes())
            .bind(member.as_bytes())
            .bind(lease)
            .bind(caps.as_msgpack())
            .execute(c).await)
        })
        .await;
        match r {
            Ok(_) => Ok(()),
            Err(sqlx::Error::Database(d)) if d.code().as_deref() == Some("23000") => {
                let msg = d.message().to_ascii_lowercase();
                if msg.contains("foreign key") {
                    Err(ToozError::GroupNotCreated(group.clone()))
                } else {
                    Err(ToozError::MemberAlreadyExist {
                        group: group.clone(),
                        member: member.clone(),
                    })
                }
            }
            Err(e) => Err(to_tooz(NAME, "joining a group", e)),
        }
    }

    async fn leave_group(&self, group: &GroupId, member: &MemberId) -> Result<()> {
        let r = retried(|| async {
            on_conn!(self, |c| sqlx::query(concat!(
                "DELETE m FROM tooz_members m JOIN tooz_leases l ON l.lease_id = m.lease_id \
                 AND l.expires_us > ",
                now_us!(),
                " WHERE m.group_id = ? AND m.member_id = ?"
            ))
            .bind(group.as_bytes())
            .bind(member.as_bytes())
            .execute(c)
            .await)
        })
        .await
        .map_err(Self::err("leaving a group"))?;
        if r.rows_affected() > 0 {
            Ok(())
        } else if self.group_exists(group).await? {
            Err(ToozError::MemberNotJoined {
                group: group.clone(),
                member: member.clone(),
            })
        } else {
            Err(ToozError::GroupNotCreated(group.clone()))
        }
    }

    async fn members(&self, group: &GroupId, caps: bool) -> Result<Vec<(MemberId, Capabilities)>> {
        let sql = format!(
            "SELECT m.member_id, {} FROM tooz_groups g LEFT JOIN \
             (tooz_members m JOIN tooz_leases l ON l.lease_id = m.lease_id AND l.expires_us > {}) \
             ON m.group_id = g.group_id WHERE g.group_id = ?",
            if caps { "m.capabilities" } else { "NULL" },
            now_us!()
        );
        let rows = on_conn!(self, |c| sqlx::query(&sql)
            .bind(group.as_bytes())
            .fetch_all(c)
            .await)
        .map_err(Self::err("reading members"))?;
        if rows.is_empty() {
            return Err(ToozError::GroupNotCreated(group.clone()));
        }
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let m: Option<Vec<u8>> = r.try_get(0).map_err(Self::err("reading members"))?;
            let c: Option<Vec<u8>> = if caps {
                r.try_get(1).map_err(Self::err("reading members"))?
            } else {
                None
            };
            if let Some(m) = m {
                out.push((
                    MemberId::from(m),
                    c.map_or_else(Capabilities::none, Capabilities::from_msgpack),
                ));
            }
        }
        Ok(out)
    }

    async fn member_info(&self, group: &GroupId, member: &MemberId) -> Result<MemberInfo> {
        let row = on_conn!(self, |c| sqlx::query(concat!(
            "SELECT m.capabilities, m.joined_us, m.updated_us FROM tooz_members m \
             JOIN tooz_leases l ON l.lease_id = m.lease_id AND l.expires_us > ",
            now_us!(),
            " WHERE m.group_id = ? AND m.member_id = ?"
        ))
        .bind(group.as_bytes())
        .bind(member.as_bytes())
        .fetch_optional(c)
        .await)
        .map_err(Self::err("reading a member"))?;
        match row {
            Some(r) => {
                let caps: Vec<u8> = r.try_get(0).map_err(Self::err("reading a member"))?;
                let joined: i64 = r.try_get(1).map_err(Self::err("reading a member"))?;
                let updated: i64 = r.try_get(2).map_err(Self::err("reading a member"))?;
                Ok(MemberInfo::new(
                    Capabilities::from_msgpack(caps),
                    system_time(joined),
                    system_time(updated),
                ))
            }
            None if self.group_exists(group).await? => Err(ToozError::MemberNotJoined {
                group: group.clone(),
                member: member.clone(),
            }),
            None => Err(ToozError::GroupNotCreated(group.clone())),
        }
    }

    async fn update_capabilities(
        &self,
        group: &GroupId,
        member: &MemberId,
        caps: &Capabilities,
    ) -> Result<()> {
        let r = on_conn!(self, |c| sqlx::query(concat!(
            "UPDATE tooz_members m JOIN tooz_leases l ON l.lease_id = m.lease_id AND l.expires_us > ",
            now_us!(),
            " SET m.capabilities = ?, m.updated_us = ",
            now_us!(),
            " WHERE m.group_id = ? AND m.member_id = ?"
        ))
        .bind(caps.as_msgpack())
        .bind(group.as_bytes())
        .bind(member.as_bytes())
        .execute(c)
        .await)
        .map_err(Self::err("updating capabilities"))?;
        if r.rows_affected() > 0 {
            Ok(())
        } else if self.group_exists(group).await? {
            Err(ToozError::MemberNotJoined {
                group: group.clone(),
                member: member.clone(),
            })
        } else {
            Err(ToozError::GroupNotCreated(group.clone()))
        }
    }

    async fn campaign(
        &self,
        lease: i64,
        group: &GroupId,
        member: &MemberId,
    ) -> Result<Option<Token>> {
        // A vacant (or expired) leadership: take it, advancing the token.
        let r = on_conn!(self, |c| sqlx::query(concat!(
            "UPDATE tooz_leaders ld LEFT JOIN tooz_leases l ON l.lease_id = ld.lease_id AND l.expires_us > ",
            now_us!(),
            " SET ld.member_id = ?, ld.token = LAST_INSERT_ID(GREATEST(ld.token, 0) + 1), ld.lease_id = ? \
             WHERE ld.group_id = ? AND l.lease_id IS NULL"
        ))
        .bind(member.as_bytes())
        .bind(lease)
        .bind(group.as_bytes())
        .execute(c)
        .await)
        .map_err(Self::err("campaigning"))?;
        if r.rows_affected() > 0 {
            return Ok(Some(r.last_insert_id()));
        }
        let r = on_conn!(self, |c| sqlx::query(
            "INSERT IGNORE INTO tooz_leaders (group_id, member_id, lease_id, token) VALUES (?, ?, ?, 1)",
        )
        .bind(group.as_bytes())
        .bind(member.as_bytes())
        .bind(lease)
        .execute(c)
        .await)
        .map_err(Self::err("campaigning"))?;
        if r.rows_affected() > 0 {
            return Ok(Some(1));
        }
        let row = on_conn!(self, |c| sqlx::query(
            "SELECT token FROM tooz_leaders WHERE group_id = ? AND lease_id = ?"
        )
        .bind(group.as_bytes())
        .bind(lease)
        .fetch_optional(c)
        .await)
        .map_err(Self::err("campaigning"))?;
        row.map(|r| r.try_get::<i64, _>(0))
            .transpose()
            .map_err(Self::err("campaigning"))?
            .map(|t| crate::backend::leader_token(group, t))
            .transpose()
    }

    async fn resign(&self, lease: i64, group: &GroupId) -> Result<bool> {
        let r = on_conn!(self, |c| sqlx::query(
            "UPDATE tooz_leaders SET member_id = NULL, lease_id = NULL WHERE group_id = ? AND lease_id = ?",
        )
        .bind(group.as_bytes())
        .bind(lease)
        .execute(c)
        .await)
        .map_err(Self::err("resigning"))?;
        Ok(r.rows_affected() > 0)
    }

    async fn get_leader(&self, group: &GroupId) -> Result<Option<MemberId>> {
        let row = on_conn!(self, |c| sqlx::query(concat!(
            "SELECT ld.member_id FROM tooz_leaders ld JOIN tooz_leases l \
             ON l.lease_id = ld.lease_id AND l.expires_us > ",
            now_us!(),
            " WHERE ld.group_id = ?"
        ))
        .bind(group.as_bytes())
        .fetch_optional(c)
        .await)
        .map_err(Self::err("reading the leader"))?;
        row.map(|r| r.try_get::<Vec<u8>, _>(0).map(MemberId::from))
            .transpose()
            .map_err(Self::err("reading the leader"))
    }

    fn disconnect(&self) {
        drop(self.idle.clear());
    }

    async fn watch(&self, group: &GroupId) -> Result<Option<DriverEventStream>> {
        let g = group.as_bytes().to_vec();
        let mut prints = on_conn!(self, |c| fingerprints(c, std::slice::from_ref(&g)).await)
            .map_err(Self::err("reading a group"))?;
        let Some(print) = prints.remove(&g) else {
            return Err(ToozError::GroupNotCreated(group.clone()));
        };
        let rx = self.watches.subscribe(g, print);
        Ok(Some(Box::pin(futures_util::stream::unfold(
            rx,
            |mut rx| async move {
                rx.recv().await?;
                Some((DriverEvent::Changed, rx))
            },
        ))))
    }
}

impl Drop for MySql {
    fn drop(&mut self) {
        // Ends the watch poller.
        self.watches.stop.cancel();
    }
}

/// What decides a group's events: the number of live members, an XOR of 64 bits of
/// each live member id's MD5, and the live leader.
type Fingerprint = (i64, u64, Option<Vec<u8>>);

/// A group's [`Fingerprint`]; `None`: the group is gone.
type Print = Option<Fingerprint>;

/// Groups read by one [`fingerprints`] statement.
const PRINTS_PER_STATEMENT: usize = 1_000;

/// The fingerprint of each of `groups` that exists, in one statement.
async fn fingerprints(
    conn: &mut MySqlConnection,
    groups: &[Vec<u8>],
) -> std::result::Result<HashMap<Vec<u8>, Fingerprint>, sqlx::Error> {
    let mut sql = String::from(concat!(
        "SELECT g.group_id, COUNT(m.member_id), \
         BIT_XOR(CAST(CONV(LEFT(MD5(m.member_id), 16), 16, 10) AS UNSIGNED)), \
         (SELECT ld.member_id FROM tooz_leaders ld JOIN tooz_leases dl \
         ON dl.lease_id = ld.lease_id AND dl.expires_us > ",
        now_us!(),
        " WHERE ld.group_id = g.group_id) \
         FROM tooz_groups g LEFT JOIN (tooz_members m JOIN tooz_leases l \
         ON l.lease_id = m.lease_id AND l.expires_us > ",
        now_us!(),
        ") ON m.group_id = g.group_id WHERE g.group_id IN ("
    ));
    for i in 0..groups.len() {
        sql.push_str(if i == 0 { "?" } else { ", ?" });
    }
    sql.push_str(") GROUP BY g.group_id");
    let mut q = sqlx::query(&sql);
    for g in groups {
        q = q.bind(g.as_slice());
    }
    let rows = q.fetch_all(conn).await?;
    let mut out = HashMap::with_capacity(rows.len());
    for r in rows {
        out.insert(r.try_get(0)?, (r.try_get(1)?, r.try_get(2)?, r.try_get(3)?));
    }
    Ok(out)
}

/// The one poller of every group a coordinator watches (MySQL cannot push): every
/// `poll_interval` one statement reads the [`Print`] of every watched group, and only
/// the streams of groups whose print moved are woken; the core then re-reads those
/// groups. An idle watch of 1,000 groups costs one statement per interval, on a
/// connection of its own, instead of two statements per group.
#[derive(Debug)]
struct Watches {
    state: Mutex<WatchState>,
    connect: MySqlConnectOptions,
    connect_timeout: Duration,
    every: Duration,
    stop: CancellationToken,
}

#[derive(Debug, Default)]
struct WatchState {
    groups: HashMap<Vec<u8>, Watched>,
    /// Whether the poller task runs (it ends when nothing is watched).
    running: bool,
}

#[derive(Debug)]
struct Watched {
    /// The print the subscribers last saw the group at.
    last: Print,
    subs: Vec<mpsc::Sender<()>>,
}

impl Watches {
    /// A wake-up channel for `group`, whose print was `seen` before the subscriber
    /// read the group. A group already watched keeps the older print, so a change
    /// between the two reads still wakes everyone (the newer subscriber at worst
    /// once for nothing).
    fn subscribe(self: &Arc<Self>, group: Vec<u8>, seen: Fingerprint) -> mpsc::Receiver<()> {
        let (tx, rx) = mpsc::channel(1);
        let mut st = crate::driver::guard(&self.state);
        st.groups
            .entry(group)
            .or_insert_with(|| Watched {
                last: Some(seen),
                subs: Vec::new(),
            })
            .subs
            .push(tx);
        if !st.running {
            st.running = true;
            tokio::spawn(Arc::clone(self).poll());
        }
        rx
    }

    async fn poll(self: Arc<Self>) {
        let mut conn: Option<MySqlConnection> = None;
        loop {
            tokio::select! {
                () = self.stop.cancelled() => return,
                () = tokio::time::sleep(self.every) => {}
            }
            let groups: Vec<Vec<u8>> = {
                let mut st = crate::driver::guard(&self.state);
                st.groups.retain(|_, w| {
                    w.subs.retain(|t| !t.is_closed());
                    !w.subs.is_empty()
                });
                if st.groups.is_empty() {
                    st.running = false;
                    return;
                }
                st.groups.keys().cloned().collect()
            };
            let c = match conn.as_mut() {
                Some(c) => c,
                None => match connect(&self.connect, self.connect_timeout).await {
                    Ok(c) => conn.insert(c),
                    Err(e) => {
                        tracing::debug!(error = %e, "the watch poller could not connect");
                        continue;
                    }
                },
            };
            let mut prints = HashMap::with_capacity(groups.len());
            let mut failed = false;
            for chunk in groups.chunks(PRINTS_PER_STATEMENT) {
                match tokio::time::timeout(self.connect_timeout, fingerprints(c, chunk)).await {
                    Ok(Ok(p)) => prints.extend(p),
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "the watch poller's read failed");
                        failed = true;
                        break;
                    }
                    Err(_) => {
                        tracing::debug!("the watch poller's read timed out");
                        failed = true;
                        break;
                    }
                }
            }
            if failed {
                // A fresh connection next time (a timed-out read leaves the old one
                // mid-reply).
                conn = None;
                continue;
            }
            let mut st = crate::driver::guard(&self.state);
            for g in groups {
                let Some(w) = st.groups.get_mut(&g) else {
                    continue;
                };
                let now = prints.remove(&g);
                if w.last != now {
                    w.last = now;
                    for t in &w.subs {
                        // Full: a wake-up is pending already.
                        let _ = t.try_send(());
                    }
                }
            }
        }
    }
}

/// A new connection with the session settings every connection has.
async fn connect(
    opts: &MySqlConnectOptions,
    limit: Duration,
) -> std::result::Result<MySqlConnection, sqlx::Error> {
    let mut c = tokio::time::timeout(limit, MySqlConnection::connect_with(opts))
        .await
        .map_err(|_| sqlx::Error::PoolTimedOut)??;
    c.execute(ISOLATION).await?;
    Ok(c)
}
