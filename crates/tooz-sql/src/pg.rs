//! PostgreSQL: session advisory locks keyed as Python tooz keys them, tables for the
//! rest, `LISTEN/NOTIFY` for membership and leader changes.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgConnection, PgListener, PgPool, PgPoolOptions};
use sqlx::{Connection, Row};
use tokio::sync::broadcast;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tooz_core::{
    Capabilities, DriverEvent, DriverEventStream, GroupId, LockName, MemberId, MemberInfo, Mode,
    Result, ToozError,
};

use crate::backend::{
    Backend, Idle, Lent, Token, is_broken, micros, sqlstate, system_time, to_tooz,
};
use crate::config::PgConfig;
use crate::layout::{
    self, FENCE_LOCK, Note, PG_CHANNEL, PG_SCHEMA_LOCK, SCHEMA_NAME, SCHEMA_VERSION,
};

const NAME: &str = crate::PG_NAME;

/// The server's clock, in microseconds since the epoch (the statement's start).
macro_rules! now_us {
    () => {
        "(extract(epoch from now()) * 1000000)::bigint"
    };
}

/// Whether a lease id is alive, for a row alias `$t` with a `lease_id` column.
macro_rules! live {
    ($t:literal) => {
        concat!(
            "EXISTS (SELECT 1 FROM tooz_leases l WHERE l.lease_id = ",
            $t,
            ".lease_id AND l.expires_us > ",
            now_us!(),
            ")"
        )
    };
}

const DDL: &str = r"
BEGIN;
SELECT pg_advisory_xact_lock(8390880412633310056);
CREATE TABLE IF NOT EXISTS tooz_schema (
    name text PRIMARY KEY,
    version integer NOT NULL
);
CREATE TABLE IF NOT EXISTS tooz_leases (
    lease_id bigint PRIMARY KEY,
    member_id bytea NOT NULL,
    expires_us bigint NOT NULL
);
CREATE TABLE IF NOT EXISTS tooz_groups (
    group_id bytea PRIMARY KEY,
    created_us bigint NOT NULL
);
CREATE TABLE IF NOT EXISTS tooz_members (
    group_id bytea NOT NULL REFERENCES tooz_groups (group_id),
    member_id bytea NOT NULL,
    lease_id bigint NOT NULL,
    capabilities bytea NOT NULL,
    joined_us bigint NOT NULL,
    updated_us bigint NOT NULL,
    PRIMARY KEY (group_id, member_id)
);
CREATE INDEX IF NOT EXISTS tooz_members_lease ON tooz_members (lease_id);
CREATE TABLE IF NOT EXISTS tooz_leaders (
    group_id bytea PRIMARY KEY,
    member_id bytea,
    lease_id bigint,
    token bigint NOT NULL
);
CREATE TABLE IF NOT EXISTS tooz_fences (
    kind smallint NOT NULL,
    name bytea NOT NULL,
    token bigint NOT NULL,
    PRIMARY KEY (kind, name)
);
INSERT INTO tooz_schema (name, version) VALUES ('tooz', 1) ON CONFLICT (name) DO NOTHING;
COMMIT;
";

/// Runs one statement on an idle dedicated connection (see [`Idle`]).
macro_rules! on_conn {
    ($self:ident, |$c:ident| $body:expr) => {
        async {
            // A connection that died while idle (the server's idle timeout, a
            // restart) is replaced once: its statement never reached the server.
            let mut retried = false;
            loop {
                let (mut lent, reused) = $self.lend().await?;
                let $c: &mut PgConnection = &mut lent;
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

/// A PostgreSQL database.
#[derive(Debug)]
pub(crate) struct Pg {
    cfg: PgConfig,
    /// For schema creation and event streams' re-reads.
    pool: PgPool,
    idle: Idle<PgConnection>,
    listen_pool: PgPool,
    /// `idle_session_timeout` exists (PostgreSQL ≥ 14).
    idle_timeout: AtomicBool,
    events: Mutex<Option<broadcast::Sender<Event>>>,
    stop: CancellationToken,
}

/// What the listener task broadcasts.
#[derive(Debug, Clone)]
enum Event {
    Note(Vec<u8>, Note),
    /// The listener lost its connection: notifications may have been missed.
    Resync,
}

impl Pg {
    pub(crate) fn new(cfg: PgConfig) -> Self {
        let pool = PgPoolOptions::new()
            .max_connections(4)
            .min_connections(0)
            .acquire_timeout(cfg.common.connect_timeout)
            .idle_timeout(Some(Duration::from_secs(60)))
            .test_before_acquire(false)
            .connect_lazy_with(cfg.connect.clone());
        let listen_pool = PgPoolOptions::new()
            .max_connections(1)
            .min_connections(0)
            .acquire_timeout(cfg.common.connect_timeout)
            .test_before_acquire(false)
            .connect_lazy_with(cfg.connect.clone());
        Pg {
            cfg,
            pool,
            idle: Idle::new(),
            listen_pool,
            idle_timeout: AtomicBool::new(false),
            events: Mutex::new(None),
            stop: CancellationToken::new(),
        }
    }

    /// A connection for statements that hold nothing.
    async fn lend(&self) -> std::result::Result<(Lent<'_, PgConnection>, bool), sqlx::Error> {
        let turn = self.idle.turn().await?;
        if let Some(c) = self.idle.pop() {
            return Ok((self.idle.lend(c, turn), true));
        }
        let c = tokio::time::timeout(
            self.cfg.common.connect_timeout,
            PgConnection::connect_with(&self.cfg.connect),
        )
        .await
        .map_err(|_| sqlx::Error::PoolTimedOut)??;
        Ok((self.idle.lend(c, turn), false))
    }

    fn err(what: &str) -> impl FnOnce(sqlx::Error) -> ToozError + '_ {
        move |e| to_tooz(NAME, what, e)
    }

    fn holder_options(&self) -> PgConnectOptions {
        let ttl = self.ttl();
        let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
        let interval = secs.div_ceil(3).max(1);
        let mut opts: Vec<(&str, String)> = vec![
            // A partitioned client is dropped by the server no earlier than the
            // lease after the last packet it got from it (idle + 3 probes ≥ TTL).
            ("tcp_keepalives_idle", secs.max(1).to_string()),
            ("tcp_keepalives_interval", interval.to_string()),
            ("tcp_keepalives_count", "3".to_string()),
        ];
        if self.idle_timeout.load(Ordering::Relaxed) {
            // A client that stopped talking (frozen, partitioned behind a proxy that
            // keeps TCP alive) loses its session one lease after its last statement.
            let ms = ttl.as_millis().max(1);
            opts.push(("idle_session_timeout", ms.to_string()));
        }
        self.cfg.connect.clone().options(opts)
    }

    async fn ensure_listener(&self) -> Result<broadcast::Receiver<Event>> {
        if let Some(tx) = self
            .events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            return Ok(tx.subscribe());
        }
        let mut listener = PgListener::connect_with(&self.listen_pool)
            .await
            .map_err(Self::err("connecting the notification listener"))?;
        listener
            .listen(PG_CHANNEL)
            .await
            .map_err(Self::err("LISTEN"))?;
        let mut slot = self.events.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = slot.as_ref() {
            return Ok(tx.subscribe());
        }
        let (tx, rx) = broadcast::channel(4096);
        *slot = Some(tx.clone());
        drop(slot);
        let stop = self.stop.clone();
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    _ = stop.cancelled() => return,
                    n = listener.try_recv() => n,
                };
                match next {
                    Ok(Some(n)) => {
                        if let Some((g, note)) = layout::parse_note(n.payload()) {
                            let _ = tx.send(Event::Note(g, note));
                        }
                    }
                    Ok(None) => {
                        let _ = tx.send(Event::Resync);
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "notification listener failed; reconnecting");
                        let _ = tx.send(Event::Resync);
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                        }
                    }
                }
            }
        });
        Ok(rx)
    }

    /// Microseconds until the first live lease of the group's members or leader
    /// expires, if any.
    async fn next_expiry(
        pool: &PgPool,
        group: &[u8],
    ) -> std::result::Result<Option<i64>, sqlx::Error> {
        let row = sqlx::query(concat!(
            "SELECT min(l.expires_us) - ",
            now_us!(),
            " FROM tooz_leases l WHERE l.expires_us > ",
            now_us!(),
            " AND (l.lease_id IN (SELECT lease_id FROM tooz_members WHERE group_id = $1) \
             OR l.lease_id IN (SELECT lease_id FROM tooz_leaders WHERE group_id = $1))"
        ))
        .bind(group)
        .fetch_one(pool)
        .await?;
        row.try_get::<Option<i64>, _>(0)
    }

    async fn group_exists(&self, group: &GroupId) -> Result<bool> {
        let row = on_conn!(self, |c| sqlx::query(
            "SELECT EXISTS (SELECT 1 FROM tooz_groups WHERE group_id = $1)"
        )
        .bind(group.as_bytes())
        .fetch_one(c)
        .await)
        .map_err(Self::err("reading a group"))?;
        row.try_get::<bool, _>(0)
            .map_err(Self::err("reading a group"))
    }
}

fn lock_fn(mode: Mode, wait: bool) -> &'static str {
    match (mode, wait) {
        (Mode::Exclusive, false) => "pg_try_advisory_lock",
        (Mode::Shared, false) => "pg_try_advisory_lock_shared",
        (Mode::Exclusive, true) => "pg_advisory_lock",
        (Mode::Shared, true) => "pg_advisory_lock_shared",
    }
}

fn unlock_fn(mode: Mode) -> &'static str {
    match mode {
        Mode::Exclusive => "pg_advisory_unlock",
        Mode::Shared => "pg_advisory_unlock_shared",
    }
}

/// Advances the fence of a grant (`l` yields a row when granted): the token is
/// `max(stored + 1, server clock in µs)`, committed asynchronously (this transaction
/// only waits for no WAL flush). A crash that loses the last increments cannot make a
/// token go back: the clock has moved past every token handed out before it (unless
/// the server clock steps back across the crash).
///
/// A stored `i64::MAX` (only another client can have written it: the clock is about
/// 2^50 µs) cannot be advanced; the counter restarts from the server clock rather
/// than failing the statement after the advisory lock was taken.
const FENCE_UPSERT: &str = concat!(
    ", a AS (SELECT set_config('synchronous_commit', 'off', true)) \
     INSERT INTO tooz_fences (kind, name, token) SELECT $3, $4, ",
    now_us!(),
    " FROM l, a ON CONFLICT (kind, name) DO UPDATE SET \
     token = CASE WHEN tooz_fences.token = 9223372036854775807 THEN EXCLUDED.token \
     ELSE GREATEST(tooz_fences.token + 1, EXCLUDED.token) END RETURNING token"
);

#[tooz_core::async_trait]
impl Backend for Pg {
    const NAME: &'static str = NAME;
    type Conn = PgConnection;
    type Key = (i32, i32);

    fn key(&self, name: &LockName) -> Self::Key {
        layout::pg_key(name.as_bytes())
    }

    fn ttl(&self) -> Duration {
        self.cfg.common.timeout
    }

    async fn prepare(&self) -> Result<()> {
        let read = || async {
            on_conn!(self, |c| sqlx::query(
                "SELECT version FROM tooz_schema WHERE name = $1"
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
            Err(e) if sqlstate(&e).as_deref() == Some("42P01") => None,
            Err(e) => return Err(to_tooz(NAME, "reading the schema version", e)),
        };
        let version = match version {
            Some(v) => v,
            None => {
                let _ = PG_SCHEMA_LOCK; // the key DDL takes (spelt out in DDL)
                // A pool of its own, closed after: a failed DDL transaction must not
                // leave a connection in the shared pool.
                let once = PgPoolOptions::new()
                    .max_connections(1)
                    .acquire_timeout(self.cfg.common.connect_timeout)
                    .connect_lazy_with(self.cfg.connect.clone());
                let r = sqlx::raw_sql(DDL).execute(&once).await;
                once.close().await;
                r.map_err(Self::err("creating the tooz tables"))?;
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
        let row = on_conn!(self, |c| sqlx::query(
            "SELECT current_setting('server_version_num')::int"
        )
        .fetch_one(c)
        .await)
        .map_err(Self::err("reading the server version"))?;
        let num: i32 = row
            .try_get(0)
            .map_err(Self::err("reading the server version"))?;
        self.idle_timeout.store(num >= 140_000, Ordering::Relaxed);
        if num < 140_000 {
            tracing::warn!(
                server_version_num = num,
                "PostgreSQL < 14 has no idle_session_timeout: a holder that stops talking while its TCP connection stays up keeps its locks until TCP keepalives fail"
            );
        }
        // Forget coordinators that died long ago (their rows are dead already).
        let gc = on_conn!(self, |c| sqlx::query(concat!(
            "WITH d AS (DELETE FROM tooz_leases WHERE expires_us < ",
            now_us!(),
            " - 60000000 RETURNING lease_id) \
             DELETE FROM tooz_members WHERE lease_id IN (SELECT lease_id FROM d)"
        ))
        .execute(c)
        .await);
        if let Err(e) = gc {
            tracing::debug!(error = %e, "removing expired leases failed");
        }
        Ok(())
    }

    async fn connect_holder(&self) -> std::result::Result<(PgConnection, i64), sqlx::Error> {
        let mut c = tokio::time::timeout(
            self.cfg.common.connect_timeout,
            PgConnection::connect_with(&self.holder_options()),
        )
        .await
        .map_err(|_| sqlx::Error::PoolTimedOut)??;
        let row = sqlx::query("SELECT pg_backend_pid()")
            .fetch_one(&mut c)
            .await?;
        let pid: i32 = row.try_get(0)?;
        Ok((c, i64::from(pid)))
    }

    async fn close(&self, conn: PgConnection) {
        let _ = tokio::time::timeout(Duration::from_secs(1), conn.close()).await;
    }

    async fn open_lease(&self, lease: i64, member: &MemberId) -> Result<()> {
        on_conn!(self, |c| sqlx::query(concat!(
            "INSERT INTO tooz_leases (lease_id, member_id, expires_us) VALUES ($1, $2, ",
            now_us!(),
            " + $3)"
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
        conn: &mut PgConnection,
        lease: i64,
    ) -> std::result::Result<bool, sqlx::Error> {
        let r = sqlx::query(concat!(
            "UPDATE tooz_leases SET expires_us = ",
            now_us!(),
            " + $2 WHERE lease_id = $1 AND expires_us > ",
            now_us!()
        ))
        .bind(lease)
        .bind(micros(self.ttl()))
        .execute(conn)
        .await?;
        Ok(r.rows_affected() > 0)
    }

    async fn end_lease(&self, lease: i64) -> Result<()> {
        on_conn!(self, |c| sqlx::query(
            "WITH d AS (DELETE FROM tooz_leases WHERE lease_id = $1), \
             m AS (DELETE FROM tooz_members WHERE lease_id = $1 RETURNING group_id, member_id), \
             ld AS (UPDATE tooz_leaders SET member_id = NULL, lease_id = NULL WHERE lease_id = $1 RETURNING group_id) \
             SELECT (SELECT count(pg_notify('tooz_events', 'l:' || encode(group_id, 'hex') || ':' || encode(member_id, 'hex'))) FROM m), \
                    (SELECT count(pg_notify('tooz_events', 'c:' || encode(group_id, 'hex') || ':')) FROM ld)",
        )
        .bind(lease)
        .fetch_one(c)
        .await)
        .map_err(Self::err("ending the lease"))?;
        Ok(())
    }

    async fn ping(&self, conn: &mut PgConnection) -> std::result::Result<(), sqlx::Error> {
        sqlx::query("SELECT 1").execute(conn).await.map(|_| ())
    }

    async fn try_lock(
        &self,
        conn: &mut PgConnection,
        key: &(i32, i32),
        name: &LockName,
        mode: Mode,
        _reader: &str,
    ) -> std::result::Result<Option<Token>, sqlx::Error> {
        let sql = format!(
            "WITH l AS (SELECT 1 FROM (SELECT {}($1, $2) AS ok) t WHERE t.ok){FENCE_UPSERT}",
            lock_fn(mode, false)
        );
        let row = sqlx::query(&sql)
            .bind(key.0)
            .bind(key.1)
            .bind(FENCE_LOCK)
            .bind(name.as_bytes())
            .fetch_optional(conn)
            .await?;
        row.map(|r| r.try_get::<i64, _>(0).map(|t| t as u64))
            .transpose()
    }

    async fn try_lock_batch(
        &self,
        conn: &mut PgConnection,
        items: &[((i32, i32), LockName)],
    ) -> std::result::Result<Option<Vec<Option<Token>>>, sqlx::Error> {
        // One statement: try each key (distinct, held by no handle of this
        // session), advance the fences of those taken.
        let k1: Vec<i32> = items.iter().map(|(k, _)| k.0).collect();
        let k2: Vec<i32> = items.iter().map(|(k, _)| k.1).collect();
        let names: Vec<Vec<u8>> = items.iter().map(|(_, n)| n.as_bytes().to_vec()).collect();
        let sql = concat!(
            "WITH it AS (SELECT * FROM unnest($1::int4[], $2::int4[], $4::bytea[]) AS t(k1, k2, name)), \
             l AS MATERIALIZED (SELECT name FROM it WHERE pg_try_advisory_lock(k1, k2)), \
             a AS (SELECT set_config('synchronous_commit', 'off', true)) \
             INSERT INTO tooz_fences (kind, name, token) SELECT $3, l.name, ",
            now_us!(),
            " FROM l, a ON CONFLICT (kind, name) DO UPDATE SET \
             token = CASE WHEN tooz_fences.token = 9223372036854775807 THEN EXCLUDED.token \
             ELSE GREATEST(tooz_fences.token + 1, EXCLUDED.token) END RETURNING name, token"
        );
        let rows = match sqlx::query(sql)
            .bind(&k1)
            .bind(&k2)
            .bind(FENCE_LOCK)
            .bind(&names)
            .fetch_all(&mut *conn)
            .await
        {
            Ok(rows) => rows,
            Err(e) => {
                if !is_broken(&e) {
                    // Session locks outlive the failed statement: give back what
                    // it may have taken (no handle holds these keys).
                    for (key, _) in items {
                        self.abandon(conn, key, Mode::Exclusive, "").await?;
                    }
                }
                return Err(e);
            }
        };
        let mut tokens: std::collections::HashMap<Vec<u8>, i64> =
            std::collections::HashMap::with_capacity(rows.len());
        for r in &rows {
            tokens.insert(r.try_get(0)?, r.try_get(1)?);
        }
        Ok(Some(
            names
                .iter()
                .map(|n| tokens.get(n).map(|t| *t as u64))
                .collect(),
        ))
    }

    async fn wait_lock(
        &self,
        conn: &mut PgConnection,
        key: &(i32, i32),
        name: &LockName,
        mode: Mode,
        _reader: &str,
        wait: Option<Duration>,
    ) -> std::result::Result<Option<Token>, sqlx::Error> {
        // lock_timeout bounds the server-side wait; 0 waits for ever.
        let timeout_ms = wait.map_or(0, |w| w.as_millis().clamp(1, i32::MAX as u128));
        let sql = format!(
            "WITH c AS (SELECT set_config('lock_timeout', $5, false) AS v), \
             l AS (SELECT {}($1, $2) FROM c){FENCE_UPSERT}",
            lock_fn(mode, true)
        );
        let r = sqlx::query(&sql)
            .bind(key.0)
            .bind(key.1)
            .bind(FENCE_LOCK)
            .bind(name.as_bytes())
            .bind(timeout_ms.to_string())
            .fetch_optional(conn)
            .await;
        match r {
            Ok(Some(row)) => Ok(Some(row.try_get::<i64, _>(0)? as u64)),
            Ok(None) => Err(sqlx::Error::Protocol(
                "the lock statement returned no token".into(),
            )),
            // lock_not_available: the wait ran out, nothing is held.
            Err(e) if sqlstate(&e).as_deref() == Some("55P03") => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn unlock(
        &self,
        conn: &mut PgConnection,
        key: &(i32, i32),
        mode: Mode,
        _reader: &str,
    ) -> std::result::Result<bool, sqlx::Error> {
        let sql = format!("SELECT {}($1, $2)", unlock_fn(mode));
        let row = sqlx::query(&sql)
            .bind(key.0)
            .bind(key.1)
            .fetch_one(conn)
            .await?;
        row.try_get::<bool, _>(0)
    }

    async fn abandon(
        &self,
        conn: &mut PgConnection,
        key: &(i32, i32),
        mode: Mode,
        reader: &str,
    ) -> std::result::Result<(), sqlx::Error> {
        // Session locks count: give back every count nobody accounts for.
        for _ in 0..64 {
            if !self.unlock(conn, key, mode, reader).await? {
                break;
            }
        }
        Ok(())
    }

    async fn holds(
        &self,
        conn: &mut PgConnection,
        key: &(i32, i32),
        mode: Mode,
        _reader: &str,
    ) -> std::result::Result<bool, sqlx::Error> {
        let row = sqlx::query(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' \
             AND pid = pg_backend_pid() AND classid = $1::int4::oid AND objid = $2::int4::oid \
             AND objsubid = 2 AND granted AND mode = $3)",
        )
        .bind(key.0)
        .bind(key.1)
        .bind(match mode {
            Mode::Exclusive => "ExclusiveLock",
            Mode::Shared => "ShareLock",
        })
        .fetch_one(conn)
        .await?;
        row.try_get::<bool, _>(0)
    }

    async fn cancel_wait(&self, server_id: i64) {
        let Ok(pid) = i32::try_from(server_id) else {
            return;
        };
        if let Err(e) = on_conn!(self, |c| sqlx::query("SELECT pg_cancel_backend($1)")
            .bind(pid)
            .execute(c)
            .await)
        {
            tracing::debug!(pid, error = %e, "cancelling a lock wait failed");
        }
    }

    async fn break_lock(&self, key: &(i32, i32)) -> Result<bool> {
        const HELD: &str = "FROM pg_locks WHERE locktype = 'advisory' AND classid = $1::int4::oid \
             AND objid = $2::int4::oid AND objsubid = 2 AND granted";
        let row = on_conn!(self, |c| sqlx::query(&format!(
            "SELECT count(pg_terminate_backend(pid)) {HELD}"
        ))
        .bind(key.0)
        .bind(key.1)
        .fetch_one(c)
        .await)
        .map_err(Self::err("breaking a lock"))?;
        let n: i64 = row.try_get(0).map_err(Self::err("breaking a lock"))?;
        if n == 0 {
            return Ok(false);
        }
        // The terminated sessions exit asynchronously: wait until the lock is free.
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until {
            let row = on_conn!(self, |c| sqlx::query(&format!(
                "SELECT EXISTS (SELECT 1 {HELD})"
            ))
            .bind(key.0)
            .bind(key.1)
            .fetch_one(c)
            .await)
            .map_err(Self::err("breaking a lock"))?;
            if !row
                .try_get::<bool, _>(0)
                .map_err(Self::err("breaking a lock"))?
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(true)
    }

    async fn create_group(&self, group: &GroupId) -> Result<()> {
        let r = on_conn!(self, |c| sqlx::query(concat!(
            "INSERT INTO tooz_groups (group_id, created_us) VALUES ($1, ",
            now_us!(),
            ") ON CONFLICT (group_id) DO NOTHING"
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
            "DELETE FROM tooz_members m WHERE m.group_id = $1 AND NOT ",
            live!("m")
        ))
        .bind(group.as_bytes())
        .execute(c)
        .await)
        .map_err(Self::err("deleting a group"))?;
        let r = on_conn!(self, |c| sqlx::query(
            "WITH d AS (DELETE FROM tooz_groups WHERE group_id = $1 RETURNING group_id) \
             SELECT count(pg_notify('tooz_events', 'c:' || encode(group_id, 'hex') || ':')) FROM d",
        )
        .bind(group.as_bytes())
        .fetch_one(c)
        .await);
        match r {
            Ok(row) => {
                let n: i64 = row.try_get(0).map_err(Self::err("deleting a group"))?;
                if n == 0 {
                    Err(ToozError::GroupNotCreated(group.clone()))
                } else {
                    Ok(())
                }
            }
            Err(e) if sqlstate(&e).as_deref() == Some("23503") => {
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
        let r = on_conn!(self, |c| {
            sqlx::query(concat!(
            "WITH ins AS (INSERT INTO tooz_members AS m \
             (group_id, member_id, lease_id, capabilities, joined_us, updated_us) \
             VALUES ($1, $2, $3, $4, ",
            now_us!(),
            ", ",
            now_us!(),
            ") ON CONFLICT (group_id, member_id) DO UPDATE SET lease_id = EXCLUDED.lease_id, \
             capabilities = EXCLUDED.capabilities, joined_us = EXCLUDED.joined_us, \
             updated_us = EXCLUDED.updated_us WHERE NOT ",
            live!("m"),
            " RETURNING group_id, member_id) \
             SELECT count(pg_notify('tooz_events', 'j:' || encode(group_id, 'hex') || ':' || encode(member_id, 'hex'))) FROM ins"
        ))
        .bind(group.as_bytes())
        .bind(member.as_bytes())
        .bind(lease)
        .bind(caps.as_msgpack())
        .fetch_one(c)
        .await
        });
        match r {
            Ok(row) => {
                let n: i64 = row.try_get(0).map_err(Self::err("joining a group"))?;
                if n == 0 {
                    Err(ToozError::MemberAlreadyExist {
                        group: group.clone(),
                        member: member.clone(),
                    })
                } else {
                    Ok(())
                }
            }
            Err(e) if sqlstate(&e).as_deref() == Some("23503") => {
                Err(ToozError::GroupNotCreated(group.clone()))
            }
            Err(e) => Err(to_tooz(NAME, "joining a group", e)),
        }
    }

    async fn leave_group(&self, group: &GroupId, member: &MemberId) -> Result<()> {
        let row = on_conn!(self, |c| sqlx::query(concat!(
            "WITH d AS (DELETE FROM tooz_members WHERE group_id = $1 AND member_id = $2 \
             RETURNING group_id, member_id, lease_id) \
             SELECT (SELECT count(*) FROM d WHERE ",
            live!("d"),
            "), (SELECT count(pg_notify('tooz_events', 'l:' || encode(group_id, 'hex') || ':' || encode(member_id, 'hex'))) FROM d), \
             EXISTS (SELECT 1 FROM tooz_groups WHERE group_id = $1)"
        ))
        .bind(group.as_bytes())
        .bind(member.as_bytes())
        .fetch_one(c)
        .await)
        .map_err(Self::err("leaving a group"))?;
        let live: i64 = row.try_get(0).map_err(Self::err("leaving a group"))?;
        let exists: bool = row.try_get(2).map_err(Self::err("leaving a group"))?;
        if !exists {
            return Err(ToozError::GroupNotCreated(group.clone()));
        }
        if live == 0 {
            return Err(ToozError::MemberNotJoined {
                group: group.clone(),
                member: member.clone(),
            });
        }
        Ok(())
    }

    async fn members(&self, group: &GroupId, caps: bool) -> Result<Vec<(MemberId, Capabilities)>> {
        let sql = format!(
            "SELECT m.member_id, {} FROM tooz_groups g LEFT JOIN \
             (tooz_members m JOIN tooz_leases l ON l.lease_id = m.lease_id AND l.expires_us > {}) \
             ON m.group_id = g.group_id WHERE g.group_id = $1",
            if caps {
                "m.capabilities"
            } else {
                "NULL::bytea"
            },
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
            let c: Option<Vec<u8>> = r.try_get(1).map_err(Self::err("reading members"))?;
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
            " WHERE m.group_id = $1 AND m.member_id = $2"
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
            "UPDATE tooz_members m SET capabilities = $3, updated_us = ",
            now_us!(),
            " WHERE m.group_id = $1 AND m.member_id = $2 AND ",
            live!("m")
        ))
        .bind(group.as_bytes())
        .bind(member.as_bytes())
        .bind(caps.as_msgpack())
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
        let row = on_conn!(self, |c| sqlx::query(concat!(
            "WITH up AS (INSERT INTO tooz_leaders AS ld (group_id, member_id, lease_id, token) \
             VALUES ($1, $2, $3, 1) ON CONFLICT (group_id) DO UPDATE SET \
             member_id = EXCLUDED.member_id, lease_id = EXCLUDED.lease_id, token = GREATEST(ld.token, 0) + 1 \
             WHERE ld.lease_id IS NULL OR NOT ",
            live!("ld"),
            " RETURNING token) \
             SELECT (SELECT token FROM up), \
             (SELECT count(pg_notify('tooz_events', 'c:' || encode($1::bytea, 'hex') || ':')) FROM up), \
             (SELECT token FROM tooz_leaders WHERE group_id = $1 AND lease_id = $3)"
        ))
        .bind(group.as_bytes())
        .bind(member.as_bytes())
        .bind(lease)
        .fetch_one(c)
        .await)
        .map_err(Self::err("campaigning"))?;
        let won: Option<i64> = row.try_get(0).map_err(Self::err("campaigning"))?;
        let mine: Option<i64> = row.try_get(2).map_err(Self::err("campaigning"))?;
        won.or(mine)
            .map(|t| crate::backend::leader_token(group, t))
            .transpose()
    }

    async fn resign(&self, lease: i64, group: &GroupId) -> Result<bool> {
        let row = on_conn!(self, |c| sqlx::query(
            "WITH u AS (UPDATE tooz_leaders SET member_id = NULL, lease_id = NULL \
             WHERE group_id = $1 AND lease_id = $2 RETURNING group_id) \
             SELECT count(pg_notify('tooz_events', 'c:' || encode(group_id, 'hex') || ':')) FROM u",
        )
        .bind(group.as_bytes())
        .bind(lease)
        .fetch_one(c)
        .await)
        .map_err(Self::err("resigning"))?;
        let n: i64 = row.try_get(0).map_err(Self::err("resigning"))?;
        Ok(n > 0)
    }

    async fn get_leader(&self, group: &GroupId) -> Result<Option<MemberId>> {
        let row = on_conn!(self, |c| sqlx::query(concat!(
            "SELECT ld.member_id FROM tooz_leaders ld JOIN tooz_leases l \
             ON l.lease_id = ld.lease_id AND l.expires_us > ",
            now_us!(),
            " WHERE ld.group_id = $1"
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
        let rx = self.ensure_listener().await?;
        if !self.group_exists(group).await? {
            return Err(ToozError::GroupNotCreated(group.clone()));
        }
        let st = WatchState {
            rx,
            group: group.as_bytes().to_vec(),
            pool: self.pool.clone(),
            expiry: None,
            dirty: true,
        };
        Ok(Some(Box::pin(futures_util::stream::unfold(
            st,
            |mut st| async move {
                let ev = st.next().await?;
                Some((ev, st))
            },
        ))))
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        // Ends the notification listener.
        self.stop.cancel();
    }
}

/// One group's event stream: notifications, plus a timer at the next lease expiry
/// (nobody announces an expiry, so the stream looks when one is due).
struct WatchState {
    rx: broadcast::Receiver<Event>,
    group: Vec<u8>,
    pool: PgPool,
    expiry: Option<Instant>,
    dirty: bool,
}

impl WatchState {
    async fn next(&mut self) -> Option<DriverEvent> {
        loop {
            if self.dirty {
                self.dirty = false;
                self.expiry = match Pg::next_expiry(&self.pool, &self.group).await {
                    Ok(Some(us)) => {
                        Some(Instant::now() + Duration::from_micros(us.max(0) as u64 + 20_000))
                    }
                    Ok(None) => None,
                    Err(e) => {
                        tracing::debug!(error = %e, "reading the next expiry failed");
                        if is_broken(&e) && self.pool.is_closed() {
                            return None;
                        }
                        Some(Instant::now() + Duration::from_secs(1))
                    }
                };
            }
            let expiry = self.expiry;
            let timer = async move {
                match expiry {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                ev = self.rx.recv() => match ev {
                    Ok(Event::Note(g, note)) if g == self.group => {
                        self.dirty = true;
                        return Some(match note {
                            Note::Joined(m) => DriverEvent::Joined(MemberId::from(m)),
                            Note::Left(m) => DriverEvent::Left(MemberId::from(m)),
                            Note::Changed => DriverEvent::Changed,
                        });
                    }
                    Ok(Event::Note(..)) => {}
                    Ok(Event::Resync) | Err(broadcast::error::RecvError::Lagged(_)) => {
                        self.dirty = true;
                        return Some(DriverEvent::Changed);
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
                () = timer => {
                    self.dirty = true;
                    return Some(DriverEvent::Changed);
                }
            }
        }
    }
}
