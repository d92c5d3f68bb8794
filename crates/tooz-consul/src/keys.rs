//! The key layout, shared with Python tooz 8.1.0's consul driver (spec §11.10).
//!
//! | key | value | session | who |
//! |---|---|---|---|
//! | `<ns>/groups/<group>/` | empty | none | group (Python's) |
//! | `<ns>/groups/<group>/<member>` | msgpack capabilities, `Flags` = created/updated seconds | the member's (Rust) | member (Python's, bound to the session by us) |
//! | `<ns>/group_locks/<group>` | any | the deleter's | Python's group lock, taken by our `delete_group` |
//! | `<ns>/locks/<name>` | attempt id (Rust) / `I got it!` (Python) / [`SHARED_MARKER`] | the holder's | lock |
//! | `<ns>/lock-readers/<hex name>/<reader>` | empty | the reader's | Rust shared holds |
//! | `<ns>/lock-queue/<hex name>/<x\|s><unique>` | empty | the waiter's | Rust blocked acquires (exclusive, shared), ordered by `CreateIndex` |
//! | `<ns>/leaders/<group>` | member id | the leader's | Rust leader election |
//!
//! Ids are used as they are when they are UTF-8 (Python tooz decodes them so);
//! an id that is not UTF-8, that starts with `~hex:` or that has a `.`/`..` path
//! segment (which URLs would collapse) is written `~hex:<hex of its bytes>`.

/// Value of the lock key while Rust readers share it.
pub const SHARED_MARKER: &[u8] = b"tooz-rs:shared";

const HEX_MARK: &str = "~hex:";

/// The text form of an id in a key.
pub fn id(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(s) if !s.starts_with(HEX_MARK) && !s.split('/').any(|seg| seg == "." || seg == "..") => {
            s.to_string()
        }
        _ => format!("{HEX_MARK}{}", hex::encode(bytes)),
    }
}

/// The bytes of an id from its text form in a key.
pub fn id_bytes(text: &str) -> Vec<u8> {
    text.strip_prefix(HEX_MARK)
        .and_then(|h| hex::decode(h).ok())
        .unwrap_or_else(|| text.as_bytes().to_vec())
}

/// The key layout under one namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    ns: String,
}

impl Layout {
    /// The layout under `namespace`.
    pub fn new(namespace: &str) -> Self {
        Layout {
            ns: namespace.to_string(),
        }
    }

    /// `<ns>/groups/`.
    pub fn groups(&self) -> String {
        format!("{}/groups/", self.ns)
    }

    /// `<ns>/groups/<group>/`: the group key, and its members' prefix.
    pub fn group(&self, group: &[u8]) -> String {
        format!("{}/groups/{}/", self.ns, id(group))
    }

    /// `<ns>/groups/<group>/<member>`.
    pub fn member(&self, group: &[u8], member: &[u8]) -> String {
        format!("{}{}", self.group(group), id(member))
    }

    /// `<ns>/group_locks/<group>` (Python's group lock).
    pub fn group_lock(&self, group: &[u8]) -> String {
        format!("{}/group_locks/{}", self.ns, id(group))
    }

    /// `<ns>/locks/<name>`.
    pub fn lock(&self, name: &[u8]) -> String {
        format!("{}/locks/{}", self.ns, id(name))
    }

    /// `<ns>/locks/`: the prefix of every lock key (one blocking query feeds
    /// every shared-marker keeper of this coordinator; queue entries and reader
    /// keys are not under it).
    pub fn locks_watch(&self) -> String {
        format!("{}/locks/", self.ns)
    }

    /// `<ns>/lock-readers/<hex name>/`.
    pub fn readers(&self, name: &[u8]) -> String {
        format!("{}/lock-readers/{}/", self.ns, hex::encode(name))
    }

    /// `<ns>/lock-queue/<hex name>/`: the entries of the lock's blocked
    /// acquires.
    pub fn lock_queue(&self, name: &[u8]) -> String {
        format!("{}/lock-queue/{}/", self.ns, hex::encode(name))
    }

    /// `<ns>/leaders/`.
    pub fn leaders(&self) -> String {
        format!("{}/leaders/", self.ns)
    }

    /// `<ns>/leaders/<group>`.
    pub fn leader(&self, group: &[u8]) -> String {
        format!("{}{}", self.leaders(), id(group))
    }

    /// The group of a key listed under [`Layout::groups`], if it is a group key.
    pub fn group_of(&self, key: &str) -> Option<Vec<u8>> {
        let rest = key.strip_prefix(&self.groups())?;
        let g = rest.strip_suffix('/')?;
        (!g.is_empty() && !g.contains('/')).then(|| id_bytes(g))
    }

    /// The member of a key under `group_key`, if it is a member key.
    pub fn member_of(group_key: &str, key: &str) -> Option<Vec<u8>> {
        let m = key.strip_prefix(group_key)?;
        (!m.is_empty() && !m.contains('/')).then(|| id_bytes(m))
    }
}

/// `Flags` of a member key: created and updated times, in seconds, high and low
/// halves.
pub fn times_flags(created: u64, updated: u64) -> u64 {
    (created.min(u64::from(u32::MAX)) << 32) | updated.min(u64::from(u32::MAX))
}

/// Created and updated seconds from a member key's `Flags` (`None` for 0, a
/// Python member).
pub fn flags_times(flags: u64) -> Option<(u64, u64)> {
    (flags != 0).then_some((flags >> 32, flags & u64::from(u32::MAX)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        let l = Layout::new("tooz");
        assert_eq!(l.group(b"g"), "tooz/groups/g/");
        assert_eq!(l.member(b"g", b"m"), "tooz/groups/g/m");
        assert_eq!(l.lock(b"x/y"), "tooz/locks/x/y");
        assert_eq!(l.group_lock(b"g"), "tooz/group_locks/g");
        assert_eq!(l.leader(b"g"), "tooz/leaders/g");
        assert_eq!(l.lock_queue(b"x/y"), "tooz/lock-queue/782f79/");
        assert_eq!(l.group_of("tooz/groups/g/"), Some(b"g".to_vec()));
        assert_eq!(l.group_of("tooz/groups/g/m"), None);
        assert_eq!(
            Layout::member_of("tooz/groups/g/", "tooz/groups/g/m"),
            Some(b"m".to_vec())
        );
        assert_eq!(Layout::member_of("tooz/groups/g/", "tooz/groups/g/"), None);
    }

    #[test]
    fn ids_round_trip() {
        for raw in [
            &b"plain"[..],
            b"\xff\x00",
            b"~hex:41",
            b"..",
            b"a/./b",
            b"a.b",
        ] {
            assert_eq!(id_bytes(&id(raw)), raw.to_vec());
        }
        assert_eq!(id(b"a.b"), "a.b");
        assert_eq!(id(b"\xff"), "~hex:ff");
        assert_eq!(flags_times(times_flags(5, 7)), Some((5, 7)));
        assert_eq!(flags_times(0), None);
    }
}
