//! The one place for key names, channel names, tokens and Lua scripts.
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
//! | `<ns>_leader_of_<group>_lock:owner` | STRING | `<token> <member id>` of a Rust leader, same `PX` as the leader key |
//! | `<ns>_leader_of_<group>_lock:fence` | STRING | fencing counter of the group's leadership |
//! | `<ns>_leader_of_<group>_lock:joined` | HASH | member id → `<created µs> <updated µs>` (for `get_member_info`) |
//!
//! # Pub/sub channels (only Rust publishes)
//!
//! A channel is named after the key of what changed: `<ns>_<name>_lock` gets
//! `released` when a lock becomes free; `<ns>_group:<group>` gets `J<member>`
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
pub const GROUP_EXISTS_VALUE: &[u8] = b"1";

/// Value of a beat key (Python's `STILL_ALIVE`).
pub const STILL_ALIVE: &[u8] = b"Not dead!";

/// Prefix of every token this crate writes into a lock or leader key; a holder
/// without it is a Python process (which never publishes its releases).
pub const TOKEN_PREFIX: &str = "tooz-rs:";

/// The plain lock key's value while shared holders hold the lock.
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

/// A fresh holder token: `tooz-rs:` and 32 random hex digits.
pub fn new_token() -> String {
    let bytes: [u8; 16] = rand::random();
    format!("{TOKEN_PREFIX}{}", hex::encode(bytes))
}

/// Lua helpers prepended to every script.
const PRELUDE: &str = r#"
local GROUP_EXISTS = '__created__'
local MARKER = 'tooz-rs:shared'
local PREFIX = 'tooz-rs:'
local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local function is_rs(v)
  if v and string.sub(v, 1, #PREFIX) == PREFIX then return 1 end
  return 0
end
local function next_fence(fkey, now, ttl)
  local prev = tonumber(redis.call('GET', fkey) or '0') or 0
  local f = prev + 1
  if now > f then f = now end
  redis.call('SET', fkey, string.format('%.0f', f), 'PX', ttl)
  return f
end
local function cur_fence(fkey)
  return tonumber(redis.call('GET', fkey) or '0') or 0
end
-- Points the marker (and the readers set) at the latest reader expiry; removes
-- both when no reader is left. Only called when the plain key is absent or the marker.
local function refresh_marker(k, r, now_ms)
  local top = redis.call('ZRANGE', r, -1, -1, 'WITHSCORES')
  if #top == 0 then
    if redis.call('GET', k) == MARKER then redis.call('DEL', k) end
    redis.call('DEL', r)
    return 0
  end
  local left = math.floor(tonumber(top[2]) - now_ms)
  if left < 1 then left = 1 end
  redis.call('SET', k, MARKER, 'PX', left)
  redis.call('PEXPIRE', r, left)
  return 1
end
-- Renews (renew = true) or checks one hold. 1 when still held.
local function renew_lock(k, r, mode, token, ttl, now_ms, renew)
  if mode == 'x' then
    if redis.call('GET', k) ~= token then return 0 end
    if renew then redis.call('PEXPIRE', k, ttl) end
    return 1
  end
  local s = redis.call('ZSCORE', r, token)
  if (not s) or tonumber(s) < now_ms then
    if s then redis.call('ZREM', r, token) end
    return 0
  end
  local cur = redis.call('GET', k)
  if cur and cur ~= MARKER then
    -- an exclusive holder got in (the marker was broken): this hold is lost
    redis.call('ZREM', r, token)
    return 0
  end
  if renew then
    redis.call('ZADD', r, 'XX', now_ms + ttl, token)
    redis.call('ZREMRANGEBYSCORE', r, '-inf', now_ms)
    refresh_marker(k, r, now_ms)
  end
  return 1
end
-- Removes members of a group whose beat key is gone (except `self`), publishing
-- their departure. Returns nothing.
local function prune_one(g, times, m)
  redis.call('HDEL', g, m)
  redis.call('HDEL', times, m)
  redis.call('PUBLISH', g, 'L' .. m)
end
"#;

/// Builds a script with the prelude and records its source (for `SCRIPT LOAD`).
macro_rules! script {
    ($sources:ident, $body:literal) => {{
        let code = format!("{PRELUDE}{}", $body);
        let s = Script::new(&code);
        $sources.push(code);
        s
    }};
}

/// Every script the driver runs, loaded once per driver (`EVALSHA`, falling
/// back to `EVAL` after a server restart).
#[derive(Debug)]
pub(crate) struct Scripts {
    /// KEYS: lock, readers, fence. ARGV: token, ttl ms, mode (`x`/`s`), fence ttl ms.
    /// `{1, fence}` when acquired (or already acquired by this token: a replayed
    /// request), `{0, wait_ms, rust_holder}` when held by someone else.
    pub lock_acquire: Script,
    /// KEYS: lock, readers. ARGV: token, mode. 1 when this token held it.
    /// Publishes `released` on the lock's channel when the lock became free.
    pub lock_release: Script,
    /// KEYS: lock, readers. ARGV: token, mode, ttl ms, renew (`1`/`0`). 1 when held.
    pub lock_renew: Script,
    /// KEYS: lock, readers. 1 when anything was deleted. Publishes `broken`.
    pub lock_break: Script,
    /// KEYS: beat key, then two keys per hold (lock + readers, or leader + owner).
    /// ARGV: membership ms, lock ttl ms, then kind (`x`/`s`/`l`) and token per hold.
    /// Returns one 0/1 per hold.
    pub heartbeat: Script,
    /// KEYS: group, groups. ARGV: group id. 1 created, 0 exists.
    pub create_group: Script,
    /// KEYS: group, groups, joined times. ARGV: group id, beat prefix, self.
    /// 1 deleted, -1/-2 not created, -3 not empty, -4 set removal failed.
    pub delete_group: Script,
    /// KEYS: group, joined times. ARGV: member, caps. 1, -1 no group, -2 exists.
    pub join: Script,
    /// KEYS: group, joined times. ARGV: member. 1, -1 no group, -2 not joined.
    pub leave: Script,
    /// KEYS: group, joined times. ARGV: member, caps. 1, -1 no group, -2 not joined.
    pub update: Script,
    /// KEYS: group, joined times. ARGV: beat prefix, self, with caps (`0`/`1`).
    /// `{-1}` no group, else `{1, member, [caps,] ...}` of live members (dead ones
    /// are removed and their departure published).
    pub members: Script,
    /// KEYS: group, joined times. ARGV: beat prefix, self, member.
    /// `{-1}` no group, `{-2}` not joined (or dead), `{1, caps, times|nil}`.
    pub member: Script,
    /// KEYS: leader, owner, fence. ARGV: token, member, ttl ms, channel, fence ttl.
    /// `{1, fence, new}` leading (`new` = 1 for a fresh grant, 0 when still
    /// leading), `{0}` someone else leads.
    pub campaign: Script,
    /// KEYS: leader, owner. ARGV: token, channel. 1 when this token led.
    pub resign: Script,
    sources: Vec<String>,
}

impl Scripts {
    /// Builds the scripts (no I/O).
    pub fn new() -> Self {
        let mut src = Vec::new();
        Scripts {
            lock_acquire: script!(
                src,
                r#"
local k, r, f = KEYS[1], KEYS[2], KEYS[3]
local token, ttl, mode, fttl = ARGV[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local now = now_us()
local now_ms = math.floor(now / 1000)
local cur = redis.call('GET', k)
if mode == 'x' then
  if cur == token then return {1, cur_fence(f)} end
  if cur then return {0, redis.call('PTTL', k), is_rs(cur)} end
  redis.call('ZREMRANGEBYSCORE', r, '-inf', now_ms)
  local top = redis.call('ZRANGE', r, -1, -1, 'WITHSCORES')
  if #top > 0 then return {0, math.floor(tonumber(top[2]) - now_ms), 1} end
  redis.call('SET', k, token, 'PX', ttl)
  return {1, next_fence(f, now, fttl)}
end
if redis.call('ZSCORE', r, token) then return {1, cur_fence(f)} end
if cur and cur ~= MARKER then return {0, redis.call('PTTL', k), is_rs(cur)} end
redis.call('ZREMRANGEBYSCORE', r, '-inf', now_ms)
redis.call('ZADD', r, now_ms + ttl, token)
refresh_marker(k, r, now_ms)
return {1, next_fence(f, now, fttl)}
"#
            ),
            lock_release: script!(
                src,
                r#"
local k, r = KEYS[1], KEYS[2]
local token, mode = ARGV[1], ARGV[2]
if mode == 'x' then
  if redis.call('GET', k) ~= token then return 0 end
  redis.call('DEL', k)
  redis.call('PUBLISH', k, 'released')
  return 1
end
local now_ms = math.floor(now_us() / 1000)
local s = redis.call('ZSCORE', r, token)
if not s then return 0 end
redis.call('ZREM', r, token)
if tonumber(s) < now_ms then return 0 end
redis.call('ZREMRANGEBYSCORE', r, '-inf', now_ms)
local cur = redis.call('GET', k)
if (not cur) or cur == MARKER then
  if refresh_marker(k, r, now_ms) == 0 then redis.call('PUBLISH', k, 'released') end
  return 1
end
return 0
"#
            ),
            lock_renew: script!(
                src,
                r#"
local now_ms = math.floor(now_us() / 1000)
return renew_lock(KEYS[1], KEYS[2], ARGV[2], ARGV[1], tonumber(ARGV[3]), now_ms, ARGV[4] == '1')
"#
            ),
            lock_break: script!(
                src,
                r#"
local n = redis.call('DEL', KEYS[1], KEYS[2])
redis.call('PUBLISH', KEYS[1], 'broken')
if n > 0 then return 1 end
return 0
"#
            ),
            heartbeat: script!(
                src,
                r#"
redis.call('SET', KEYS[1], 'Not dead!', 'PX', tonumber(ARGV[1]))
local ttl = tonumber(ARGV[2])
local now_ms = math.floor(now_us() / 1000)
local out = {}
local n = (#KEYS - 1) / 2
for i = 1, n do
  local k, r = KEYS[2 * i], KEYS[2 * i + 1]
  local kind, token = ARGV[1 + 2 * i], ARGV[2 + 2 * i]
  if kind == 'l' then
    if redis.call('GET', k) == token then
      redis.call('PEXPIRE', k, ttl)
      redis.call('PEXPIRE', r, ttl)
      out[i] = 1
    else
      out[i] = 0
    end
  else
    out[i] = renew_lock(k, r, kind, token, ttl, now_ms, true)
  end
end
return out
"#
            ),
            create_group: script!(
                src,
                r#"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('HSET', KEYS[1], GROUP_EXISTS, '1')
return 1
"#
            ),
            delete_group: script!(
                src,
                r#"
local g, groups, times = KEYS[1], KEYS[2], KEYS[3]
local gid, prefix, self = ARGV[1], ARGV[2], ARGV[3]
if redis.call('EXISTS', g) == 0 then return -1 end
if redis.call('SISMEMBER', groups, gid) == 0 then return -2 end
local fields = redis.call('HKEYS', g)
local live = 0
for _, m in ipairs(fields) do
  if m ~= GROUP_EXISTS then
    if m == self or redis.call('EXISTS', prefix .. m) == 1 then
      live = live + 1
    else
      prune_one(g, times, m)
    end
  end
end
if live > 0 then return -3 end
if redis.call('SREM', groups, gid) == 0 then return -4 end
redis.call('DEL', g, times)
redis.call('PUBLISH', g, 'D')
return 1
"#
            ),
            join: script!(
                src,
                r#"
local g, times = KEYS[1], KEYS[2]
local m, caps = ARGV[1], ARGV[2]
if redis.call('EXISTS', g) == 0 then return -1 end
if redis.call('HSETNX', g, m, caps) == 0 then return -2 end
local t = string.format('%.0f', now_us())
redis.call('HSET', times, m, t .. ' ' .. t)
redis.call('PUBLISH', g, 'J' .. m)
return 1
"#
            ),
            leave: script!(
                src,
                r#"
local g, times = KEYS[1], KEYS[2]
local m = ARGV[1]
if redis.call('EXISTS', g) == 0 then return -1 end
if redis.call('HDEL', g, m) == 0 then return -2 end
redis.call('HDEL', times, m)
redis.call('PUBLISH', g, 'L' .. m)
return 1
"#
            ),
            update: script!(
                src,
                r#"
local g, times = KEYS[1], KEYS[2]
local m, caps = ARGV[1], ARGV[2]
if redis.call('EXISTS', g) == 0 then return -1 end
if redis.call('HEXISTS', g, m) == 0 then return -2 end
redis.call('HSET', g, m, caps)
local t = string.format('%.0f', now_us())
local old = redis.call('HGET', times, m)
local created = t
if old then
  local sp = string.find(old, ' ', 1, true)
  if sp then created = string.sub(old, 1, sp - 1) end
end
redis.call('HSET', times, m, created .. ' ' .. t)
redis.call('PUBLISH', g, 'U' .. m)
return 1
"#
            ),
            members: script!(
                src,
                r#"
local g, times = KEYS[1], KEYS[2]
local prefix, self, with_caps = ARGV[1], ARGV[2], ARGV[3] == '1'
if redis.call('EXISTS', g) == 0 then return {-1} end
local all = redis.call('HGETALL', g)
local out = {1}
for i = 1, #all, 2 do
  local m = all[i]
  if m ~= GROUP_EXISTS then
    if m == self or redis.call('EXISTS', prefix .. m) == 1 then
      out[#out + 1] = m
      if with_caps then out[#out + 1] = all[i + 1] end
    else
      prune_one(g, times, m)
    end
  end
end
return out
"#
            ),
            member: script!(
                src,
                r#"
local g, times = KEYS[1], KEYS[2]
local prefix, self, m = ARGV[1], ARGV[2], ARGV[3]
if redis.call('EXISTS', g) == 0 then return {-1} end
local caps = redis.call('HGET', g, m)
if not caps then return {-2} end
if m ~= self and redis.call('EXISTS', prefix .. m) == 0 then
  prune_one(g, times, m)
  return {-2}
end
return {1, caps, redis.call('HGET', times, m)}
"#
            ),
            campaign: script!(
                src,
                r#"
local l, o, f = KEYS[1], KEYS[2], KEYS[3]
local token, member, ttl, chan, fttl = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
local cur = redis.call('GET', l)
if cur == token then
  redis.call('PEXPIRE', l, ttl)
  redis.call('SET', o, token .. ' ' .. member, 'PX', ttl)
  return {1, cur_fence(f), 0}
end
if cur then return {0} end
redis.call('SET', l, token, 'PX', ttl)
redis.call('SET', o, token .. ' ' .. member, 'PX', ttl)
local fence = next_fence(f, now_us(), fttl)
redis.call('PUBLISH', chan, 'E')
return {1, fence, 1}
"#
            ),
            resign: script!(
                src,
                r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('PUBLISH', ARGV[2], 'E')
return 1
"#
            ),
            sources: src,
        }
    }

    /// The source of every script, for preloading with `SCRIPT LOAD`.
    pub fn sources(&self) -> &[String] {
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
    }
}
