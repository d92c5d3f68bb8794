//! The one place the storage layout lives: lock keys shared with Python tooz, the
//! tables of everything Python tooz does not have, and the notification payloads.
//!
//! # Locks (shared with Python tooz 9.1)
//!
//! * PostgreSQL: a session advisory lock on the `int4` pair
//!   `(md5(name)[0], md5(name)[1])`, each byte read as a number 0–255, exactly the two
//!   arguments Python's `pg_advisory_lock(%s, %s)` receives ([`pg_key`]). 65,536 slots: two
//!   names whose digests start with the same two bytes exclude each other (never two
//!   holders of one name).
//! * MySQL/MariaDB: `GET_LOCK(name)` with the lock name as it is (a binary string, as
//!   PyMySQL sends it) when it has at most 64 bytes; a longer name, which the server
//!   refuses (and Python fails on), becomes `tooz-sha1:` followed by the 40 hex digits of
//!   its SHA-1 ([`mysql_lock_name`]).
//!
//! # Tables (schema [`SCHEMA_NAME`] version [`SCHEMA_VERSION`])
//!
//! | table | rows |
//! |---|---|
//! | `tooz_schema` | `(name, version)`: `('tooz', 1)` |
//! | `tooz_leases` | one per started coordinator: `(lease_id, member_id, expires_us)`, renewed by the heartbeat |
//! | `tooz_groups` | `(group_id, created_us)` |
//! | `tooz_members` | `(group_id, member_id, lease_id, capabilities, joined_us, updated_us)`; live while its lease is |
//! | `tooz_leaders` | `(group_id, member_id, lease_id, token)`; vacant when `lease_id` is null or its lease expired; never deleted, so the token keeps counting |
//! | `tooz_fences` | `(kind, name, token)`: the fencing counter of each lock name (`kind` 0) |
//! | `tooz_readers` | MySQL only: `(name, reader)`, one per shared holder (see the crate README) |
//!
//! Times are microseconds since the Unix epoch on the database server's clock.

use md5::{Digest, Md5};
use sha1::Sha1;

/// The schema's name in `tooz_schema`.
pub const SCHEMA_NAME: &str = "tooz";

/// The schema version this crate creates and understands.
pub const SCHEMA_VERSION: i32 = 1;

/// `tooz_fences.kind` of lock names.
pub const FENCE_LOCK: i16 = 0;

/// The longest lock name MySQL's `GET_LOCK` accepts, in bytes of a binary string.
pub const MYSQL_MAX_LOCK_NAME: usize = 64;

/// The PostgreSQL notification channel of membership and leader changes.
pub const PG_CHANNEL: &str = "tooz_events";

/// The advisory lock key (`int8` key space, apart from Python's `int4` pairs) that
/// serialises schema creation on PostgreSQL.
pub const PG_SCHEMA_LOCK: i64 = 0x746f_6f7a_5f73_6368; // "tooz_sch"

/// The `GET_LOCK` name that serialises schema creation on MySQL.
pub const MYSQL_SCHEMA_LOCK: &str = "tooz-schema-v1";

/// Python tooz's PostgreSQL advisory lock key of a lock name: the first two bytes of
/// its MD5 digest, as the two `int4` arguments of `pg_advisory_lock(a, b)`
/// (`md5(b"a")` = `0cc175b9…` gives `(0x0c, 0xc1)`).
pub fn pg_key(name: &[u8]) -> (i32, i32) {
    let d = Md5::digest(name);
    (i32::from(d[0]), i32::from(d[1]))
}

/// The `GET_LOCK` name of a lock name: the name itself up to 64 bytes (Python tooz's
/// name), else `tooz-sha1:<40 hex digits of SHA-1(name)>`.
pub fn mysql_lock_name(name: &[u8]) -> Vec<u8> {
    if name.len() <= MYSQL_MAX_LOCK_NAME {
        name.to_vec()
    } else {
        let mut out = b"tooz-sha1:".to_vec();
        out.extend_from_slice(hex::encode(Sha1::digest(name)).as_bytes());
        out
    }
}

/// What a notification says about a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Note {
    Joined(Vec<u8>),
    Left(Vec<u8>),
    Changed,
}

/// The payload of a notification: `j:<group hex>:<member hex>`, `l:…` or `c:<group hex>:`
/// (the SQL statements build it with `encode(…, 'hex')`).
#[cfg(test)]
pub(crate) fn note_payload(group: &[u8], note: &Note) -> String {
    let (k, m): (char, &[u8]) = match note {
        Note::Joined(m) => ('j', m),
        Note::Left(m) => ('l', m),
        Note::Changed => ('c', b""),
    };
    format!("{k}:{}:{}", hex::encode(group), hex::encode(m))
}

/// Parses a payload of [`note_payload`]: the group and the note.
pub(crate) fn parse_note(payload: &str) -> Option<(Vec<u8>, Note)> {
    let mut parts = payload.splitn(3, ':');
    let kind = parts.next()?;
    let group = hex::decode(parts.next()?).ok()?;
    let member = hex::decode(parts.next()?).ok()?;
    let note = match kind {
        "j" => Note::Joined(member),
        "l" => Note::Left(member),
        "c" => Note::Changed,
        _ => return None,
    };
    Some((group, note))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_examples() {
        // md5(b"a") = 0cc175b9…
        assert_eq!(pg_key(b"a"), (0x0c, 0xc1));
        assert_eq!(mysql_lock_name(b"job"), b"job");
        let long = mysql_lock_name(&[b'x'; 65]);
        assert!(long.starts_with(b"tooz-sha1:") && long.len() == 50);
    }

    #[test]
    fn python_pg_keys() {
        // hashlib.md5(b"tooz").digest()[0:2]
        let d = Md5::digest(b"tooz");
        assert_eq!(pg_key(b"tooz"), (i32::from(d[0]), i32::from(d[1])));
        let (a, b) = pg_key(b"\xff\x00");
        assert!((0..=255).contains(&a) && (0..=255).contains(&b));
    }

    #[test]
    fn mysql_names() {
        let n64 = [b'a'; 64];
        assert_eq!(mysql_lock_name(&n64), n64.to_vec());
        let a = mysql_lock_name(&[b'a'; 65]);
        let b = mysql_lock_name(&[b'b'; 65]);
        assert_ne!(a, b);
        assert_eq!(a.len(), 50);
        assert_eq!(a, mysql_lock_name(&[b'a'; 65]));
    }

    #[test]
    fn payloads_round_trip() {
        for note in [
            Note::Joined(b"m\x00".to_vec()),
            Note::Left(vec![]),
            Note::Changed,
        ] {
            let p = note_payload(b"g:1", &note);
            assert_eq!(parse_note(&p), Some((b"g:1".to_vec(), note)));
        }
        assert_eq!(parse_note("x:00:"), None);
    }
}
