//! The one place for key names, channel names, tokens and Lua scripts (each script
//! is a file in `src/lua/`, documented at its top).
//!
//! # Keys shared with Python tooz (namespace `ns`, default `_tooz`)
//!
//! | key | type | content |
//! |---|---|---|
//! | `<ns>_groups` | SET | every group id |
//! | `<ns>_group:<group>` | HASH | `__created__` = `1` (keeps an empty group alive) and one field per member id → msgpack capabilities |
//! | `<ns>_beats:<member>` | STRING | `Not dead!`, `PSETEX` membership_timeout: the member is alive while it exists |
//! | `<ns>_<name>_lock` | STRING | the exclusive holder's token, `PX` lock_timeout (Python: uuid1 hex; us: `tooz-rs:<32 hex>`) |
//! | `<ns>_leader_of_<group>_lock` | STRING | the group leader's token, `PX` lock_timeout |
//!
//! # Keys only this crate writes
//!
//! Every one of them is a `…_lock` key above followed by `:<suffix>`. No Python
//! key ends that way, and no other lock's key can look like one (a lock key ends in
//! `_lock`), so they cannot alias anything as long as lock names cannot alias the
//! leader keys (see [`check_lock_name`]).
//!
//! | key | type | content |
//! |---|---|---|
//! | `<ns>_<name>_lock:readers` | ZSET | shared holders: token → expiry (server ms) |
//! | `<ns>_<name>_lock:fence` | STRING | fencing counter of the lock (`PX` one day) |
//! | `<ns>_<name>_lock:queue` | ZSET | blocked Rust waiters in arrival order: waiter id → arrival (server µs) |
//! | `<ns>_<name>_lock:waiters` | HASH | waiter id → mode (`x`/`s`) followed by the registration's expiry (server ms) |
//! | `<ns>_leader_of_<group>_lock:owner` | STRING | `<token> <member id>` of a Rust leader, same `PX` as the leader key |
//! | `<ns>_leader_of_<group>_lock:fence` | STRING | fencing counter of the group's leadership |
//! | `<ns>_leader_of_<group>_lock:joined` | HASH | member id → `<created µs> <updated µs>` (for `get_member_info`) |
//!
//! # Pub/sub channels (only Rust publishes)
//!
//! A channel is named after the key of what changed: `<ns>_<name>_lock` gets
//! `w <waiter id>...` when a lock becomes free while Rust waiters are queued (only
//! the waiters named wake; see "Waiter queue" below), `released` (everyone wakes)
//! from older versions of this crate and `broken` after `break_lock`; `<ns>_group:<group>` gets `J<member>`
//! (joined), `L<member>` (left or expired), `U<member>` (capabilities updated),
//! `E` (leadership changed) and `D` (group deleted).
//!
//! # Reader/writer locks compatible with Python's exclusive locks
//!
//! Python only knows the plain lock key: it takes the lock with `SET key token NX
//! PX`, releases it when the key still holds its token. So:
//!
//! * **exclusive** (Rust or Python): the plain key holds the holder's token.
//! * **shared** (Rust only): each reader is a member of `…_lock:readers` scored with
//!   its own expiry, and while at least one reader holds, the plain key holds the
//!   marker [`SHARED_MARKER`] with a `PX` equal to the latest reader expiry. Python
//!   sees the key taken and waits, exactly as it waits for any holder.
//! * A shared acquire succeeds when the plain key is absent or is the marker; an
//!   exclusive acquire only when the key is absent and no unexpired reader remains
//!   (so a marker deleted by Python's `break_` does not let a Rust writer in while
//!   Rust readers hold).
//! * Reader heartbeats push the reader's score and the marker's expiry; the last
//!   reader's release (or expiry) deletes the marker.
//!
//! # Waiter queue (one release wakes one waiter)
//!
//! A blocked Rust acquirer registers in `…_lock:queue`/`…_lock:waiters` with the
//! attempt it makes right after subscribing to the lock's channel (so it is
//! subscribed before any release can find it queued), and refreshes its
//! registration with every later attempt. A registration lives for twice the
//! longer of the waiter's lock timeout and the holder's remaining TTL, plus a
//! second: waiters try again at the latest when the hold would expire, so a live
//! waiter never lapses, and a crashed one is skipped once it expired. A grant
//! removes the waiter in the same script; a waiter that gives up (deadline,
//! dropped future, stop) removes itself and, if the lock is free, wakes the next.
//! A release that frees the lock publishes the id of the queue's oldest live
//! waiter (if it waits to share the lock, the ids of the sharing waiters queued
//! right after it as well), and publishes nothing when nobody is queued. Python
//! clients never queue and take the lock whenever it is free (barging is allowed:
//! a woken waiter that finds the lock taken again stays at the head); our waiters
//! still notice a Python holder's release by polling, and an expiry by their
//! timer at the hold's TTL.
//!
//! # Fencing tokens
//!
//! Every grant (exclusive, shared, leadership) advances the counter inside the
//! granting script to `max(stored + 1, server TIME in µs)`: strictly increasing
//! across holders, and never going back when a non-persistent server restarts
//! empty (its clock still moved forward). The counter expires after a day without
//! grants; the next grant then starts again from the server clock.

use redis::Script;
use tooz_core::{GroupId, LockName, MemberId, Result, ToozError};

/// The field that keeps an empty group hash alive (Python's `GROUP_EXISTS`).
pub const GROUP_EXISTS: &[u8] = b"__created__";

/// Value of the group marker field.
#[allow(dead_code)] // Written by the Lua scripts; named here for the layout's docs.
pub const GROUP_EXISTS_VALUE: &[u8] = b"1";

/// Value of a beat key (Python's `STILL_ALIVE`).
pub const STILL_ALIVE: &[u8] = b"Not dead!";

/// Prefix of every token this crate writes into a lock or leader key; a holder
/// without it is a Python process (which never publishes its releases).
pub const TOKEN_PREFIX: &str = "tooz-rs:";

/// The plain lock key's value while shared holders hold the lock.
#[allow(dead_code)] // Written by the Lua scripts; named here for the layout's docs.
pub const SHARED_MARKER: &str = "tooz-rs:shared";

/// Member id `get_leader` returns for a leader that is a Python tooz process
/// (Python stores a random token, not its member id, in the leader key).
pub const PYTHON_LEADER: &str = "python-tooz-leader";

/// Lifetime of a fencing counter without grants.
pub const FENCE_TTL_MS: u64 = 24 * 3600 * 1000;

/// Lock name prefixes refused because `<ns>_<name>_lock` would be a key Python
/// (or the leader election) uses: `leader_of_G` is group G's leader key,
/// `group:X` and `beats:X` alias a group hash and a beat key.
pub const RESERVED_LOCK_PREFIXES: &[&str] = &["leader_of_", "group:", "beats:"];

/// Key and channel names of one namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    ns: Vec<u8>,
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

impl Keys {
    /// Keys under namespace `ns`.
    pub fn new(ns: impl Into<Vec<u8>>) -> Self {
        Keys { ns: ns.into() }
    }

    /// `<ns>_groups`.
    pub fn groups(&self) -> Vec<u8> {
        cat(&[&self.ns, b"_groups"])
    }

    /// `<ns>_group:<group>` (also the group's channel).
    pub fn group(&self, g: &GroupId) -> Vec<u8> {
        cat(&[&self.ns, b"_group:", g.as_bytes()])
    }

    /// `<ns>_beats:` (scripts append member ids).
    pub fn beat_prefix(&self) -> Vec<u8> {
        cat(&[&self.ns, b"_beats:"])
    }

    /// `<ns>_beats:<member>`.
    pub fn beat(&self, m: &MemberId) -> Vec<u8> {
        cat(&[&self.beat_prefix(), m.as_bytes()])
    }

    /// `<ns>_<name>_lock` (also the lock's channel).
    pub fn lock(&self, l: &LockName) -> Vec<u8> {
        cat(&[&self.ns, b"_", l.as_bytes(), b"_lock"])
    }

    /// `<ns>_<name>_lock:readers`.
    pub fn lock_readers(&self, l: &LockName) -> Vec<u8> {
        cat(&[&self.lock(l), b":readers"])
    }

    /// `<ns>_<name>_lock:fence`.
    pub fn lock_fence(&self, l: &LockName) -> Vec<u8> {
        cat(&[&self.lock(l), b":fence"])
    }

    /// `<ns>_<name>_lock:queue`: the lock's waiters in arrival order.
    pub fn lock_queue(&self, l: &LockName) -> Vec<u8> {
        cat(&[&self.lock(l), b":queue"])
    }

    /// `<ns>_<name>_lock:waiters`: mode and registration expiry of each waiter.
    pub fn lock_waiters(&self, l: &LockName) -> Vec<u8> {
        cat(&[&self.lock(l), b":waiters"])
    }

    /// `<ns>_leader_of_<group>_lock`: the lock Python's election takes.
    pub fn leader(&self, g: &GroupId) -> Vec<u8> {
        cat(&[&self.ns, b"_leader_of_", g.as_bytes(), b"_lock"])
    }

    /// `<ns>_leader_of_<group>_lock:owner`.
    pub fn leader_owner(&self, g: &GroupId) -> Vec<u8> {
        cat(&[&self.leader(g), b":owner"])
    }

    /// `<ns>_leader_of_<group>_lock:fence`.
    pub fn leader_fence(&self, g: &GroupId) -> Vec<u8> {
        cat(&[&self.leader(g), b":fence"])
    }

    /// `<ns>_leader_of_<group>_lock:joined`: join and update times of members.
    pub fn joined_times(&self, g: &GroupId) -> Vec<u8> {
        cat(&[&self.leader(g), b":joined"])
    }
}

/// Refuses lock names whose key would alias a key Python tooz uses for something
/// else (a group's leader key, a group hash, a beat key).
///
/// # Errors
/// [`ToozError::InvalidId`] naming the lock and the reserved prefix.
pub fn check_lock_name(l: &LockName) -> Result<()> {
    for p in RESERVED_LOCK_PREFIXES {
        if l.as_bytes().starts_with(p.as_bytes()) {
            return Err(ToozError::InvalidId {
                kind: "lock name",
                id: l.to_string(),
                reason: format!(
                    "names starting with {p:?} are reserved: the redis key would alias Python tooz's {}",
                    match *p {
                        "leader_of_" => "leader election key of a group",
                        "group:" => "hash of a group",
                        _ => "heartbeat key of a member",
                    }
                ),
            });
        }
    }
    Ok(())
}

/// Refuses the member id Python reserves for its group marker.
///
/// # Errors
/// [`ToozError::InvalidId`] for `__created__`.
pub fn check_member_id(m: &MemberId) -> Result<()> {
    if m.as_bytes() == GROUP_EXISTS {
        return Err(ToozError::InvalidId {
            kind: "member id",
            id: m.to_string(),
            reason: "is the field Python tooz uses to mark that a group exists".into(),
        });
    }
    Ok(())
}

/// A new waiter id (random, 24 hex digits: no spaces, so ids can be listed in
/// one wake-up message).
pub fn new_waiter_id() -> String {
    let bytes: [u8; 12] = rand::random();
    hex::encode(bytes)
}

/// A fresh holder token: `tooz-rs:` and 32 random hex digits.
pub fn new_token() -> String {
    let bytes: [u8; 16] = rand::random();
    format!("{TOKEN_PREFIX}{}", hex::encode(bytes))
}

/// Declares [`Scripts`]: one field per `lua/<name>.lua` file, each run with
/// `lua/prelude.lua` (shared helpers) in front of it. What a script does, its KEYS,
/// ARGV and reply are described at the top of its file.
macro_rules! scripts {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// Every script the driver runs, loaded once per driver (`EVALSHA`, falling
        /// back to `EVAL` after a server restart).
        #[derive(Debug)]
        pub(crate) struct Scripts {
            $($(#[$doc])* pub(crate) $name: Script,)*
            sources: Vec<&'static str>,
        }

        impl Scripts {
            /// Builds the scripts (no I/O).
            pub(crate) fn new() -> Self {
                $(let $name: &'static str = concat!(
                    include_str!("lua/prelude.lua"),
                    include_str!(concat!("lua/", stringify!($name), ".lua")),
                );)*
                Scripts {
                    $($name: Script::new($name),)*
                    sources: vec![$($name),*],
                }
            }
        }
    };
}

scripts! {
    /// Exclusive or shared acquire with a fencing token.
    lock_acquire,
    /// Release of one hold; wakes the next queued waiter when the lock became free.
    lock_release,
    /// A waiter leaving the queue; wakes the next one when the lock is free.
    lock_leave,
    /// Renewal (or check) of one hold.
    lock_renew,
    /// Break of a lock; publishes `broken`.
    lock_break,
    /// Beat key refresh plus the renewal of every hold.
    heartbeat,
    /// Group creation.
    create_group,
    /// Deletion of an empty group.
    delete_group,
    /// Member join.
    join,
    /// Member leave.
    leave,
    /// Capabilities update.
    update,
    /// Live members of a group (dead ones pruned).
    members,
    /// One member of a group (pruned when dead).
    member,
    /// Leadership campaign with a fencing token.
    campaign,
    /// Leadership resignation.
    resign,
}

impl Scripts {
    /// The source of every script, for preloading with `SCRIPT LOAD`.
    pub(crate) fn sources(&self) -> &[&'static str] {
        &self.sources
    }
}

impl Default for Scripts {
    fn default() -> Self {
        Scripts::new()
    }
}

/// Splits a `:owner` value (`<token> <member>`) into its parts.
pub fn parse_owner(v: &[u8]) -> Option<(&[u8], &[u8])> {
    let sp = v.iter().position(|b| *b == b' ')?;
    Some((&v[..sp], &v[sp + 1..]))
}

/// Parses a `:joined` value (`<created µs> <updated µs>`).
pub fn parse_times(v: &[u8]) -> Option<(u64, u64)> {
    let s = std::str::from_utf8(v).ok()?;
    let (a, b) = s.split_once(' ')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_key_layout() {
        let k = Keys::new("_tooz");
        assert_eq!(k.groups(), b"_tooz_groups");
        assert_eq!(k.group(&"g1".into()), b"_tooz_group:g1");
        assert_eq!(k.beat(&"m1".into()), b"_tooz_beats:m1");
        assert_eq!(k.lock(&"l1".into()), b"_tooz_l1_lock");
        assert_eq!(k.leader(&"g1".into()), b"_tooz_leader_of_g1_lock");
        // The leader key is exactly the lock Python's election takes.
        assert_eq!(k.leader(&"g1".into()), k.lock(&"leader_of_g1".into()));
    }

    #[test]
    fn our_keys_hang_off_lock_keys() {
        let k = Keys::new("ns");
        let l = LockName::from("x");
        let g = GroupId::from("g");
        for key in [
            k.lock_readers(&l),
            k.lock_fence(&l),
            k.lock_queue(&l),
            k.lock_waiters(&l),
            k.leader_owner(&g),
            k.leader_fence(&g),
            k.joined_times(&g),
        ] {
            let s = String::from_utf8(key).unwrap();
            assert!(s.starts_with("ns_"), "{s}");
            let (base, suffix) = s.rsplit_once(':').unwrap();
            assert!(base.ends_with("_lock"), "{s}");
            assert!(!suffix.is_empty());
        }
        assert_eq!(k.lock_fence(&l), b"ns_x_lock:fence");
        assert_eq!(k.joined_times(&g), b"ns_leader_of_g_lock:joined");
    }

    #[test]
    fn reserved_names() {
        for bad in ["leader_of_g", "group:g", "beats:m"] {
            assert!(
                matches!(
                    check_lock_name(&bad.into()),
                    Err(ToozError::InvalidId {
                        kind: "lock name",
                        ..
                    })
                ),
                "{bad}"
            );
        }
        for ok in ["leader", "groups", "my-lock", "a:b"] {
            assert!(check_lock_name(&ok.into()).is_ok(), "{ok}");
        }
        assert!(check_member_id(&"__created__".into()).is_err());
        assert!(check_member_id(&"m".into()).is_ok());
    }

    #[test]
    fn tokens_are_ours_and_unique() {
        let a = new_token();
        let b = new_token();
        assert!(a.starts_with(TOKEN_PREFIX));
        assert_eq!(a.len(), TOKEN_PREFIX.len() + 32);
        assert_ne!(a, b);
        assert!(SHARED_MARKER.starts_with(TOKEN_PREFIX));
    }

    #[test]
    fn owner_and_times_parse() {
        assert_eq!(
            parse_owner(b"tooz-rs:ab m 1"),
            Some((&b"tooz-rs:ab"[..], &b"m 1"[..]))
        );
        assert_eq!(parse_owner(b"nospace"), None);
        assert_eq!(parse_times(b"10 20"), Some((10, 20)));
        assert_eq!(parse_times(b"x"), None);
    }

    #[test]
    fn scripts_share_the_prelude() {
        let s = Scripts::new();
        assert_ne!(s.join.get_hash(), s.leave.get_hash());
        let prelude = include_str!("lua/prelude.lua");
        let hashes: std::collections::HashSet<_> = s
            .sources()
            .iter()
            .map(|src| {
                assert!(src.starts_with(prelude));
                // Each script's own text opens with its header comment.
                assert!(src[prelude.len()..].starts_with("-- "), "{src}");
                Script::new(src).get_hash().to_string()
            })
            .collect();
        assert_eq!(hashes.len(), 15);
        assert!(hashes.contains(s.lock_acquire.get_hash()));
    }
}
