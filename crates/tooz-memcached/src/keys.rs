//! The one place for the storage layout: key names, memcache flags and value
//! encodings, shared with Python tooz's memcached driver.
//!
//! # Keys shared with Python tooz
//!
//! | key | flags | content | expiry |
//! |---|---|---|---|
//! | `_TOOZ_GROUP_LIST` | 2 | msgpack array of group ids | none (CAS-updated) |
//! | `_TOOZ_GROUP_<group>` | 2 | msgpack map member id → `{"capabilities": caps}` (`{}`: empty group, `nil`: being deleted) | none (CAS-updated) |
//! | `_TOOZ_MEMBER_<member>` | 1 | `It's alive!` | `membership_timeout` |
//! | `__TOOZ_LOCK_<name>` | 1 | the exclusive holder's member id | `lock_timeout` |
//! | `__TOOZ_LOCK__TOOZ_GROUP_LEADER_<group>` | 1 | the leader's member id | `leader_timeout` |
//!
//! Flag 1 is a raw byte string, flag 2 msgpack; any other flag is a
//! serialization error (Python's rule). Python writes ids as msgpack `bin`
//! (bytes ids) or `str` (text ids): both are read, this crate writes `bin`.
//! A member entry written by this crate carries two more fields, `created_at`
//! and `updated_at` (µs since the epoch) for `get_member_info`; Python reads
//! only `capabilities` and keeps the rest of the entries it does not own.
//!
//! # Keys and values only this crate writes
//!
//! | key | flags | content | expiry |
//! |---|---|---|---|
//! | `__TOOZ_FENCE` + lock key | 0 | decimal fencing counter, created at the server's time in µs | none |
//! | a lock key held **shared** | 2 | msgpack map reader token (`bin`) → member id (`bin`) | `lock_timeout` |
//!
//! A Python process sees a shared hold as a lock taken by someone else (its `add`
//! fails), which is the exclusion wanted.

use std::time::{SystemTime, UNIX_EPOCH};

use rmpv::Value;
use tooz_core::{Capabilities, GroupId, IdRef, MemberId, Result, ToozError};

/// The group list key.
pub const GROUP_LIST: &[u8] = b"_TOOZ_GROUP_LIST";
/// Prefix of group keys.
pub const GROUP_PREFIX: &[u8] = b"_TOOZ_GROUP_";
/// Prefix of member liveness keys.
pub const MEMBER_PREFIX: &[u8] = b"_TOOZ_MEMBER_";
/// Prefix of lock keys.
pub const LOCK_PREFIX: &[u8] = b"__TOOZ_LOCK_";
/// What follows the lock prefix in a leader key.
pub const LEADER_PREFIX: &[u8] = b"_TOOZ_GROUP_LEADER_";
/// Prefix of fencing counters (followed by the lock or leader key).
pub const FENCE_PREFIX: &[u8] = b"__TOOZ_FENCE";
/// The value of a member liveness key.
pub const STILL_ALIVE: &[u8] = b"It's alive!";
/// Flag of raw byte values.
pub const FLAG_RAW: u32 = 1;
/// Flag of msgpack values.
pub const FLAG_MSGPACK: u32 = 2;
/// memcached's longest key.
pub const MAX_KEY: usize = 250;

fn cat(a: &[u8], b: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(a.len() + b.len());
    v.extend_from_slice(a);
    v.extend_from_slice(b);
    v
}

/// `_TOOZ_GROUP_<group>`.
pub fn group(g: &GroupId) -> Vec<u8> {
    cat(GROUP_PREFIX, g.as_bytes())
}
/// `_TOOZ_MEMBER_<member>`.
pub fn member(m: &[u8]) -> Vec<u8> {
    cat(MEMBER_PREFIX, m)
}
/// `__TOOZ_LOCK_<name>`.
pub fn lock(name: &[u8]) -> Vec<u8> {
    cat(LOCK_PREFIX, name)
}
/// `__TOOZ_LOCK__TOOZ_GROUP_LEADER_<group>`.
pub fn leader(g: &GroupId) -> Vec<u8> {
    lock(&cat(LEADER_PREFIX, g.as_bytes()))
}
/// The fencing counter of a lock or leader key.
pub fn fence(lock_key: &[u8]) -> Vec<u8> {
    cat(FENCE_PREFIX, lock_key)
}

fn invalid(kind: &'static str, id: String, reason: impl Into<String>) -> ToozError {
    ToozError::InvalidId {
        kind,
        id,
        reason: reason.into(),
    }
}

/// The driver's id rules: memcached keys are at most 250 bytes without spaces or
/// control characters, and no id may make its key alias another kind of key.
///
/// # Errors
/// [`ToozError::InvalidId`] naming the id and the rule.
pub fn check_id(id: IdRef<'_>) -> Result<()> {
    let (kind, bytes, longest_key) = match id {
        IdRef::Group(g) => ("group id", g.as_bytes(), fence(&leader(g)).len()),
        IdRef::Member(m) => ("member id", m.as_bytes(), member(m.as_bytes()).len()),
        IdRef::Lock(l) => ("lock name", l.as_bytes(), fence(&lock(l.as_bytes())).len()),
        _ => return Ok(()),
    };
    let show = || String::from_utf8_lossy(bytes).into_owned();
    if let Some(b) = bytes.iter().find(|b| **b <= 0x20 || **b == 0x7f) {
        return Err(invalid(
            kind,
            show(),
            format!("byte {b:#04x} (a space or control character) cannot be in a memcached key"),
        ));
    }
    if longest_key > MAX_KEY {
        return Err(invalid(
            kind,
            show(),
            format!(
                "too long: its memcached key would be {longest_key} bytes, memcached allows {MAX_KEY}"
            ),
        ));
    }
    match id {
        IdRef::Group(g) if g.as_bytes() == b"LIST" => Err(invalid(
            kind,
            show(),
            "its key _TOOZ_GROUP_LIST is the list of groups",
        )),
        IdRef::Lock(l) if l.as_bytes().starts_with(LEADER_PREFIX) => Err(invalid(
            kind,
            show(),
            "names starting with _TOOZ_GROUP_LEADER_ are the keys of group leaders",
        )),
        _ => Ok(()),
    }
}

/// Decodes the value of `key` by its memcache flag: raw bytes or msgpack. Errors
/// name the key (another client may have written anything there).
pub(crate) fn decode(key: &[u8], flags: Option<u32>, data: &[u8]) -> Result<Value> {
    let key = String::from_utf8_lossy(key);
    match flags.unwrap_or(0) {
        FLAG_RAW => Ok(Value::Binary(data.to_vec())),
        FLAG_MSGPACK => tooz_core::capabilities::read_msgpack(&mut &data[..]).map_err(|e| {
            ToozError::serialization(
                format!("memcached key {key} does not hold a msgpack value"),
                e,
            )
        }),
        other => Err(ToozError::serialization(
            format!(
                "unknown serialization format '{other}' (memcache flag) of memcached key {key}"
            ),
            "python tooz writes flag 1 (raw bytes) or 2 (msgpack)",
        )),
    }
}

/// Encodes a msgpack value.
pub(crate) fn encode(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    // Writing into a Vec cannot fail.
    let _ = rmpv::encode::write_value(&mut out, v);
    out
}

/// The bytes of an id written as `bin` or `str`.
pub(crate) fn id_bytes(v: &Value) -> Option<&[u8]> {
    match v {
        Value::Binary(b) => Some(b),
        Value::String(s) => Some(s.as_bytes()),
        _ => None,
    }
}

fn field<'a>(map: &'a Value, name: &str) -> Option<&'a Value> {
    match map {
        Value::Map(m) => m
            .iter()
            .find(|(k, _)| id_bytes(k) == Some(name.as_bytes()))
            .map(|(_, v)| v),
        _ => None,
    }
}

fn set_field(entry: &mut Value, name: &str, value: Value) {
    if !matches!(entry, Value::Map(_)) {
        *entry = Value::Map(Vec::new());
    }
    if let Value::Map(m) = entry {
        match m
            .iter_mut()
            .find(|(k, _)| id_bytes(k) == Some(name.as_bytes()))
        {
            Some((_, v)) => *v = value,
            None => m.push((Value::Binary(name.as_bytes().to_vec()), value)),
        }
    }
}

pub(crate) fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// One member's entry of a group map.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub(crate) caps: Capabilities,
    pub(crate) created: Option<u64>,
    pub(crate) updated: Option<u64>,
}

/// A group's member map, keeping every entry as read (Python's included).
#[derive(Debug, Clone, Default)]
pub(crate) struct GroupMap {
    entries: Vec<(Value, Value)>,
}

impl GroupMap {
    /// `None` for a group being deleted (`nil`).
    pub(crate) fn from_value(key: &[u8], v: Value) -> Result<Option<Self>> {
        match v {
            Value::Nil => Ok(None),
            Value::Map(entries) => Ok(Some(GroupMap { entries })),
            other => Err(ToozError::serialization(
                format!(
                    "memcached group key {} does not hold a msgpack map",
                    String::from_utf8_lossy(key)
                ),
                format!("found {}", preview(&other)),
            )),
        }
    }

    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        encode(&Value::Map(self.entries.clone()))
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub(crate) fn members(&self) -> impl Iterator<Item = &[u8]> {
        self.entries.iter().filter_map(|(k, _)| id_bytes(k))
    }

    fn position(&self, m: &[u8]) -> Option<usize> {
        self.entries
            .iter()
            .position(|(k, _)| id_bytes(k) == Some(m))
    }

    pub(crate) fn contains(&self, m: &[u8]) -> bool {
        self.position(m).is_some()
    }

    pub(crate) fn entry(&self, m: &[u8]) -> Option<Entry> {
        let (_, e) = &self.entries[self.position(m)?];
        let caps = field(e, "capabilities").map_or_else(Capabilities::none, |c| {
            Capabilities::from_msgpack(encode(c))
        });
        let time = |n| field(e, n).and_then(Value::as_u64);
        Some(Entry {
            caps,
            created: time("created_at"),
            updated: time("updated_at"),
        })
    }

    pub(crate) fn insert(&mut self, m: &MemberId, caps: &Capabilities) -> Result<()> {
        let now = Value::from(now_micros());
        let entry = Value::Map(vec![
            (Value::Binary(b"capabilities".to_vec()), caps_value(caps)?),
            (Value::Binary(b"created_at".to_vec()), now.clone()),
            (Value::Binary(b"updated_at".to_vec()), now),
        ]);
        self.entries
            .push((Value::Binary(m.as_bytes().to_vec()), entry));
        Ok(())
    }

    pub(crate) fn remove(&mut self, m: &[u8]) -> bool {
        let before = self.entries.len();
        self.entries.retain(|(k, _)| id_bytes(k) != Some(m));
        before != self.entries.len()
    }

    /// Keeps the members `keep` says live.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&[u8]) -> bool) -> bool {
        let before = self.entries.len();
        self.entries
            .retain(|(k, _)| id_bytes(k).is_none_or(&mut keep));
        before != self.entries.len()
    }

    pub(crate) fn update(&mut self, m: &[u8], caps: &Capabilities) -> Result<bool> {
        let Some(i) = self.position(m) else {
            return Ok(false);
        };
        let caps = caps_value(caps)?;
        let e = &mut self.entries[i].1;
        set_field(e, "capabilities", caps);
        set_field(e, "updated_at", Value::from(now_micros()));
        Ok(true)
    }
}

/// A value for an error message, cut to a few hundred characters (a junk value may
/// be as large as memcached allows).
fn preview(v: &Value) -> String {
    let mut s = v.to_string();
    if s.len() > 200 {
        let mut end = 200;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

fn caps_value(caps: &Capabilities) -> Result<Value> {
    tooz_core::capabilities::read_msgpack(&mut caps.as_msgpack())
        .map_err(|e| ToozError::serialization("capabilities are not msgpack", e))
}

/// The group list (ids as read).
pub(crate) fn group_list(v: Value) -> Vec<Value> {
    match v {
        Value::Array(a) => a,
        _ => Vec::new(),
    }
}

/// What a lock key holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LockValue {
    /// An exclusive holder (Python's or ours): its member id.
    Owner(Vec<u8>),
    /// Shared holders: reader token → member id.
    Readers(Vec<(Vec<u8>, Vec<u8>)>),
}

impl LockValue {
    pub(crate) fn read(key: &[u8], flags: Option<u32>, data: &[u8]) -> Result<Self> {
        match decode(key, flags, data)? {
            Value::Map(m) => Ok(LockValue::Readers(
                m.iter()
                    .filter_map(|(k, v)| {
                        Some((id_bytes(k)?.to_vec(), id_bytes(v).unwrap_or(&[]).to_vec()))
                    })
                    .collect(),
            )),
            v => Ok(LockValue::Owner(id_bytes(&v).unwrap_or(&[]).to_vec())),
        }
    }

    pub(crate) fn readers_bytes(readers: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
        encode(&Value::Map(
            readers
                .iter()
                .map(|(t, m)| (Value::Binary(t.clone()), Value::Binary(m.clone())))
                .collect(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tooz_core::LockName;

    #[test]
    fn python_key_names() {
        assert_eq!(group(&"g".into()), b"_TOOZ_GROUP_g");
        assert_eq!(member(b"m"), b"_TOOZ_MEMBER_m");
        assert_eq!(lock(b"l"), b"__TOOZ_LOCK_l");
        assert_eq!(leader(&"g".into()), b"__TOOZ_LOCK__TOOZ_GROUP_LEADER_g");
        assert_eq!(fence(b"__TOOZ_LOCK_l"), b"__TOOZ_FENCE__TOOZ_LOCK_l");
    }

    #[test]
    fn ids_are_checked() {
        let g: GroupId = "LIST".into();
        assert!(check_id(IdRef::Group(&g)).is_err());
        let g: GroupId = "a b".into();
        assert!(check_id(IdRef::Group(&g)).is_err());
        let l: LockName = "_TOOZ_GROUP_LEADER_x".into();
        assert!(check_id(IdRef::Lock(&l)).is_err());
        let l: LockName = "x".repeat(226).as_str().into();
        assert!(check_id(IdRef::Lock(&l)).is_ok());
        let l: LockName = "x".repeat(227).as_str().into();
        assert!(check_id(IdRef::Lock(&l)).is_err());
        let m: MemberId = "héllo".into();
        assert!(check_id(IdRef::Member(&m)).is_ok());
    }

    #[test]
    fn group_maps_read_python_entries() {
        // {b"py": {b"capabilities": {"a": 1}}, "str-member": {b"capabilities": None}}
        let py = Value::Map(vec![
            (
                Value::Binary(b"py".to_vec()),
                Value::Map(vec![(
                    Value::Binary(b"capabilities".to_vec()),
                    Value::Map(vec![(Value::from("a"), Value::from(1))]),
                )]),
            ),
            (
                Value::from("str-member"),
                Value::Map(vec![(Value::Binary(b"capabilities".to_vec()), Value::Nil)]),
            ),
        ]);
        let mut g = GroupMap::from_value(b"k", py).unwrap().unwrap();
        assert!(g.contains(b"py") && g.contains(b"str-member"));
        assert_eq!(
            g.entry(b"py").unwrap().caps.as_msgpack(),
            [0x81, 0xa1, b'a', 1]
        );
        assert!(g.entry(b"str-member").unwrap().caps.is_none());
        g.insert(&"me".into(), &Capabilities::none()).unwrap();
        assert!(g.entry(b"me").unwrap().created.is_some());
        assert!(
            g.update(b"me", &Capabilities::from_msgpack(vec![0x01]))
                .unwrap()
        );
        assert_eq!(g.entry(b"me").unwrap().caps.as_msgpack(), [0x01]);
        assert!(g.remove(b"str-member"));
        let back = decode(b"k", Some(FLAG_MSGPACK), &g.to_bytes()).unwrap();
        let g2 = GroupMap::from_value(b"k", back).unwrap().unwrap();
        assert_eq!(g2.members().count(), 2);
        assert!(GroupMap::from_value(b"k", Value::Nil).unwrap().is_none());
    }

    #[test]
    fn lock_values() {
        assert_eq!(
            LockValue::read(b"k", Some(1), b"m").unwrap(),
            LockValue::Owner(b"m".to_vec())
        );
        // A Python text member id: msgpack str, flag 2.
        assert_eq!(
            LockValue::read(b"k", Some(2), &[0xa1, b'm']).unwrap(),
            LockValue::Owner(b"m".to_vec())
        );
        let r = vec![(b"t".to_vec(), b"m".to_vec())];
        assert_eq!(
            LockValue::read(b"k", Some(2), &LockValue::readers_bytes(&r)).unwrap(),
            LockValue::Readers(r)
        );
        assert!(LockValue::read(b"k", Some(7), b"x").is_err());
    }
}
