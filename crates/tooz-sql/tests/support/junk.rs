//! The property test both SQL junk tests run (`junk_postgresql.rs`,
//! `junk_mysql.rs`): bad data another client wrote into the shared tables. Junk
//! capabilities and times in a member row, junk leader rows, fencing counters at
//! any `bigint` (negative, `i64::MAX`), and on MySQL/MariaDB junk rows in
//! `tooz_readers` (the shared-hold registry only that dialect has). The rule: a
//! clear error or a sensible value; never a panic or a hang; tokens never go back
//! (a counter that cannot advance restarts); the rest of the group stays readable;
//! nothing stays held after a grant.

// Each test binary runs one dialect: the other's variant is never built there.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use sqlx::Connection;
use tooz_conformance::testkit::{Backend, unique};
use tooz_core::{MemberId, Wait};

/// Backend-touching properties run few cases.
const CASES: u32 = 32;

/// Each call has a deadline: a hang is a failure, not a stuck CI job.
const LIMIT: Duration = Duration::from_secs(15);

/// The server the test writes junk into.
#[derive(Debug, Clone, Copy)]
pub enum Dialect {
    /// PostgreSQL (`TOOZ_TEST_POSTGRESQL_URL`).
    #[cfg(feature = "postgres")]
    Postgresql,
    /// MySQL/MariaDB (`TOOZ_TEST_MYSQL_URL`).
    #[cfg(feature = "mysql")]
    Mysql,
}

impl Dialect {
    fn url_env(self) -> &'static str {
        match self {
            #[cfg(feature = "postgres")]
            Dialect::Postgresql => "TOOZ_TEST_POSTGRESQL_URL",
            #[cfg(feature = "mysql")]
            Dialect::Mysql => "TOOZ_TEST_MYSQL_URL",
        }
    }

    fn driver(self) -> tooz_core::DriverDescriptor {
        match self {
            #[cfg(feature = "postgres")]
            Dialect::Postgresql => tooz_sql::POSTGRESQL,
            #[cfg(feature = "mysql")]
            Dialect::Mysql => tooz_sql::MYSQL,
        }
    }

    /// A junk leader member id: any bytes, cut to what the column holds
    /// (MySQL's `VARBINARY(1024)`; PostgreSQL's `bytea` takes them all).
    fn leader_member(self) -> BoxedStrategy<Vec<u8>> {
        match self {
            #[cfg(feature = "postgres")]
            Dialect::Postgresql => junk_bytes().boxed(),
            #[cfg(feature = "mysql")]
            Dialect::Mysql => junk_bytes()
                .prop_map(|mut b| {
                    b.truncate(1024);
                    b
                })
                .boxed(),
        }
    }

    /// A junk `tooz_readers` row, where the dialect has that table.
    fn reader(self) -> BoxedStrategy<Option<String>> {
        match self {
            #[cfg(feature = "postgres")]
            Dialect::Postgresql => Just(None).boxed(),
            #[cfg(feature = "mysql")]
            Dialect::Mysql => junk_reader().prop_map(Some).boxed(),
        }
    }
}

fn junk_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..48),
        (
            prop::sample::select(vec![0xc6u8, 0xdb, 0xdd, 0xdf]),
            any::<u32>()
        )
            .prop_map(|(m, n)| [vec![m], n.to_be_bytes().to_vec()].concat()),
        (1usize..5000).prop_map(|n| vec![0x91; n]),
    ]
}

/// A leadership token another client wrote: any `bigint` short of the two
/// largest (a grant over those fails cleanly: "bigint out of range" on
/// PostgreSQL, "BIGINT value is out of range" on MySQL).
fn leader_counter() -> impl Strategy<Value = i64> {
    prop_oneof![
        (i64::MIN..i64::MAX - 1),
        Just(i64::MAX - 2),
        Just(i64::MIN),
        Just(-2),
        Just(-1),
        Just(0),
    ]
}

/// A lock fence another client wrote: any `bigint`, the largest included (a grant
/// over `i64::MAX` restarts the counter).
fn fence_counter() -> impl Strategy<Value = i64> {
    prop_oneof![
        any::<i64>(),
        Just(i64::MAX),
        Just(i64::MAX - 1),
        Just(i64::MAX - 2),
        Just(i64::MIN),
        Just(-2),
        Just(-1),
        Just(0),
    ]
}

/// A reader name another client wrote into `tooz_readers`: any text that fits the
/// column, the empty name (not a valid lock name) included.
#[cfg(feature = "mysql")]
fn junk_reader() -> impl Strategy<Value = String> {
    prop_oneof![Just(String::new()), "[ -~]{0,64}", "\\PC{0,64}",]
}

/// A raw connection to the server, writing what another client might.
enum Raw {
    #[cfg(feature = "postgres")]
    Pg(sqlx::PgConnection),
    #[cfg(feature = "mysql")]
    My(sqlx::MySqlConnection),
}

/// A statement's parameter.
#[derive(Clone, Copy)]
enum Arg<'a> {
    Bytes(&'a [u8]),
    Int(i64),
    Text(&'a str),
}

/// `sql` with `args` bound in order, for either server.
fn bound<'q, DB>(
    sql: &'q str,
    args: &[Arg<'q>],
) -> sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments<'q>>
where
    DB: sqlx::Database,
    &'q [u8]: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    &'q str: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    args.iter().fold(sqlx::query::<DB>(sql), |q, a| match *a {
        Arg::Bytes(b) => q.bind(b),
        Arg::Int(i) => q.bind(i),
        Arg::Text(t) => q.bind(t),
    })
}

impl Raw {
    async fn connect(dialect: Dialect, url: &str) -> Raw {
        let url = url.split('?').next().unwrap();
        match dialect {
            #[cfg(feature = "postgres")]
            Dialect::Postgresql => Raw::Pg(sqlx::PgConnection::connect(url).await.unwrap()),
            #[cfg(feature = "mysql")]
            Dialect::Mysql => Raw::My(sqlx::MySqlConnection::connect(url).await.unwrap()),
        }
    }

    /// Runs the statement of this connection's dialect (`pg` or `my`, parameters
    /// written `$n` or `?`) with `args` bound in order.
    async fn exec(&mut self, pg: &str, my: &str, args: &[Arg<'_>]) {
        // One of the two is unused when a dialect's feature is off.
        let _ = (pg, my);
        match self {
            #[cfg(feature = "postgres")]
            Raw::Pg(db) => {
                bound(pg, args).execute(&mut *db).await.unwrap();
            }
            #[cfg(feature = "mysql")]
            Raw::My(db) => {
                bound(my, args).execute(&mut *db).await.unwrap();
            }
        }
    }

    /// A member `junk` on the (live) lease of the member `good`.
    async fn put_junk_member(&mut self, group: &[u8], caps: &[u8], at: i64) {
        const PG: &str = "INSERT INTO tooz_members (group_id, member_id, lease_id, capabilities, joined_us, updated_us) \
             SELECT group_id, 'junk'::bytea, lease_id, $2, $3, $3 FROM tooz_members \
             WHERE group_id = $1 AND member_id = 'good'::bytea \
             ON CONFLICT (group_id, member_id) DO UPDATE SET capabilities = $2, joined_us = $3, updated_us = $3";
        const MY: &str = "INSERT INTO tooz_members (group_id, member_id, lease_id, capabilities, joined_us, updated_us) \
             VALUES (?, 'junk', ?, ?, ?, ?) \
             ON DUPLICATE KEY UPDATE capabilities = VALUES(capabilities), joined_us = VALUES(joined_us), updated_us = VALUES(updated_us)";
        match self {
            #[cfg(feature = "postgres")]
            Raw::Pg(_) => {
                let args = [Arg::Bytes(group), Arg::Bytes(caps), Arg::Int(at)];
                self.exec(PG, MY, &args).await;
            }
            #[cfg(feature = "mysql")]
            Raw::My(db) => {
                let lease: i64 = sqlx::query_scalar(
                    "SELECT lease_id FROM tooz_members WHERE group_id = ? AND member_id = 'good'",
                )
                .bind(group)
                .fetch_one(&mut *db)
                .await
                .unwrap();
                let args = [
                    Arg::Bytes(group),
                    Arg::Int(lease),
                    Arg::Bytes(caps),
                    Arg::Int(at),
                    Arg::Int(at),
                ];
                self.exec(PG, MY, &args).await;
            }
        }
    }

    /// A leader row nobody holds, with any token and member.
    async fn put_leader(&mut self, group: &[u8], member: &[u8], token: i64) {
        self.exec(
            "INSERT INTO tooz_leaders (group_id, member_id, lease_id, token) VALUES ($1, $2, NULL, $3) \
             ON CONFLICT (group_id) DO UPDATE SET member_id = $2, lease_id = NULL, token = $3",
            "INSERT INTO tooz_leaders (group_id, member_id, lease_id, token) VALUES (?, ?, NULL, ?) \
             ON DUPLICATE KEY UPDATE member_id = VALUES(member_id), lease_id = NULL, token = VALUES(token)",
            &[Arg::Bytes(group), Arg::Bytes(member), Arg::Int(token)],
        )
        .await;
    }

    /// A lock fence at any value.
    async fn put_fence(&mut self, lock: &[u8], token: i64) {
        self.exec(
            "INSERT INTO tooz_fences (kind, name, token) VALUES (0, $1, $2) \
             ON CONFLICT (kind, name) DO UPDATE SET token = $2",
            "INSERT INTO tooz_fences (kind, name, token) VALUES (0, ?, ?) \
             ON DUPLICATE KEY UPDATE token = VALUES(token)",
            &[Arg::Bytes(lock), Arg::Int(token)],
        )
        .await;
    }

    /// Whether the server has the `tooz_readers` table (MySQL/MariaDB).
    fn has_readers(&self) -> bool {
        match self {
            #[cfg(feature = "postgres")]
            Raw::Pg(_) => false,
            #[cfg(feature = "mysql")]
            Raw::My(_) => true,
        }
    }

    /// A reader row nobody holds (MySQL/MariaDB's `tooz_readers`).
    async fn put_reader(&mut self, lock: &[u8], reader: &str) {
        assert!(self.has_readers(), "PostgreSQL has no tooz_readers table");
        self.exec(
            "",
            "INSERT IGNORE INTO tooz_readers (name, reader) VALUES (?, ?)",
            &[Arg::Bytes(lock), Arg::Text(reader)],
        )
        .await;
    }

    /// Removes the lock's exclusive fence row.
    async fn delete_fence(&mut self, lock: &[u8]) {
        self.exec(
            "DELETE FROM tooz_fences WHERE kind = 0 AND name = $1",
            "DELETE FROM tooz_fences WHERE kind = 0 AND name = ?",
            &[Arg::Bytes(lock)],
        )
        .await;
    }

    /// Removes every row of the group and of the lock.
    async fn clean_up(&mut self, group: &[u8], lock: &[u8]) {
        for table in ["tooz_members", "tooz_leaders", "tooz_groups"] {
            let (pg, my) = (
                format!("DELETE FROM {table} WHERE group_id = $1"),
                format!("DELETE FROM {table} WHERE group_id = ?"),
            );
            self.exec(&pg, &my, &[Arg::Bytes(group)]).await;
        }
        self.exec(
            "DELETE FROM tooz_fences WHERE name = $1",
            "DELETE FROM tooz_fences WHERE name = ?",
            &[Arg::Bytes(lock)],
        )
        .await;
        if self.has_readers() {
            self.exec(
                "",
                "DELETE FROM tooz_readers WHERE name = ?",
                &[Arg::Bytes(lock)],
            )
            .await;
        }
    }
}

/// The property: run by the test named `test` against `dialect`'s server, skipped
/// (printing why) without its URL unless `TOOZ_REQUIRE_BACKENDS=1`.
pub fn junk_rows(dialect: Dialect, test: &str) {
    let Some(backend) = Backend::from_env(dialect.url_env(), dialect.driver(), test) else {
        return;
    };
    let backend = backend.limit(LIMIT);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let group = unique("junk-g");
    let lock = unique("junk-l");
    let (a, b, raw) = rt.block_on(async {
        let a = backend.started("good").await;
        // Another client, to see that nothing stays held after a grant.
        let b = backend.started("other").await;
        a.join_group_create(group.as_str(), &BTreeMap::from([("weight", 3)]))
            .await
            .unwrap();
        let raw = Raw::connect(dialect, backend.url()).await;
        (a, b, tokio::sync::Mutex::new(raw))
    });
    let strategy = (
        junk_bytes(),
        any::<i64>(),
        leader_counter(),
        fence_counter(),
        dialect.leader_member(),
        dialect.reader(),
    );
    let mut runner = TestRunner::new(Config::with_cases(CASES));
    runner
        .run(
            &strategy,
            |(caps, at, lead_token, fence, leader_member, reader)| {
                rt.block_on(async {
                    let mut db = raw.lock().await;
                    db.put_junk_member(group.as_bytes(), &caps, at).await;
                    db.put_leader(group.as_bytes(), &leader_member, lead_token)
                        .await;
                    db.put_fence(lock.as_bytes(), fence).await;
                    if let Some(reader) = &reader {
                        db.put_reader(lock.as_bytes(), reader).await;
                    }
                    drop(db);

                    let members = backend
                        .timed("get_members", a.get_members(group.as_str()))
                        .await
                        .unwrap();
                    assert!(members.contains(&MemberId::from("good")), "{members:?}");
                    assert!(members.contains(&MemberId::from("junk")), "{members:?}");
                    let all = backend
                        .timed("with caps", a.get_members_with_capabilities(group.as_str()))
                        .await
                        .unwrap();
                    assert_eq!(all[&MemberId::from("good")].weight(), 3);
                    for c in all.values() {
                        let _ = format!("{c:?}");
                    }
                    let _ = backend
                        .timed("info", a.get_member_info(group.as_str(), "junk"))
                        .await
                        .unwrap();
                    let _ = backend
                        .timed("get_leader", a.get_leader(group.as_str()))
                        .await
                        .unwrap();

                    // Leadership over a junk token: granted with a token, and the next
                    // grant's is larger; or an error saying why.
                    match backend
                        .timed("campaign", a.try_become_leader(group.as_str()))
                        .await
                    {
                        Ok(Some(l)) => {
                            let t1 = l.token();
                            assert!(
                                backend
                                    .timed("stand down", a.stand_down_group_leader(group.as_str()))
                                    .await
                                    .unwrap()
                            );
                            let l2 = backend
                                .timed("campaign", a.try_become_leader(group.as_str()))
                                .await
                                .unwrap()
                                .expect("nobody else runs");
                            assert!(
                                l2.token() > t1,
                                "leader token {lead_token}: {t1} then {}",
                                l2.token()
                            );
                            assert!(a.stand_down_group_leader(group.as_str()).await.unwrap());
                        }
                        Ok(None) => panic!("nobody holds it: {lead_token}"),
                        Err(e) => {
                            println!("leader token {lead_token}: {e}");
                            assert!(e.to_string().contains("token"), "{e}");
                        }
                    }
                    // A lock over a junk fence.
                    let l = a.get_lock(lock.as_str()).unwrap();
                    match backend.timed("acquire", l.guard_or_fail(Wait::No)).await {
                        Ok(g) => {
                            let t1 = g.token();
                            g.release().await.unwrap();
                            let g2 = backend
                                .timed("acquire", l.guard_or_fail(Wait::No))
                                .await
                                .unwrap();
                            if t1.0 == i64::MAX as u64 {
                                // Nothing follows the largest token: the counter restarts.
                                assert!(
                                    g2.token().0 > 0,
                                    "fence {fence}: {t1} then {}",
                                    g2.token()
                                );
                            } else {
                                assert!(g2.token() > t1, "fence {fence}: {t1} then {}", g2.token());
                            }
                            g2.release().await.unwrap();
                        }
                        Err(e) => {
                            println!("fence {fence}: {e}");
                            assert!(e.to_string().contains("fenc"), "{e}");
                            // Nothing stays held by the failed grant.
                            raw.lock().await.delete_fence(lock.as_bytes()).await;
                            let g = backend
                                .timed("acquire", l.guard_or_fail(Wait::No))
                                .await
                                .unwrap();
                            g.release().await.unwrap();
                        }
                    }
                    if let Some(reader) = &reader {
                        // A shared hold over the junk reader rows, then an exclusive one.
                        let got = backend
                            .timed("acquire shared", l.acquire_shared(Wait::No))
                            .await
                            .unwrap_or_else(|e| panic!("reader {reader:?}: {e}"));
                        assert!(got, "reader {reader:?}: a free lock refused a shared hold");
                        assert!(l.release().await.unwrap());
                    }
                    // Whatever happened, the lock is free for another client now.
                    let other = b.get_lock(lock.as_str()).unwrap();
                    let g = backend
                        .timed("acquire elsewhere", other.guard_or_fail(Wait::No))
                        .await
                        .unwrap_or_else(|e| panic!("fence {fence}: the lock stayed held: {e}"));
                    g.release().await.unwrap();
                });
                Ok(())
            },
        )
        .unwrap();
    rt.block_on(async {
        raw.lock()
            .await
            .clean_up(group.as_bytes(), lock.as_bytes())
            .await;
        a.stop().await.unwrap();
        b.stop().await.unwrap();
    });
}
