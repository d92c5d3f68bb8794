//! The znode layout, shared with Python tooz's kazoo driver (spec §11.5). This is
//! the one place it lives.
//!
//! ```text
//! <chroot>/<namespace>                          persistent, made by start
//! <chroot>/<namespace>/<group>                  persistent, no data
//! <chroot>/<namespace>/<group>/<member>         ephemeral, msgpack capabilities
//! <chroot>/<namespace>/<group>/leader/<uuid>__lock__<seq>   kazoo Lock, data = member id
//! <chroot>/<namespace>/locks/<name>/<uuid>__lock__<seq>     exclusive holder or waiter
//! <chroot>/<namespace>/locks/<name>/<uuid>__rlock__<seq>    shared (kazoo ReadLock)
//! ```
//!
//! Ids are stored as znode names unchanged when ZooKeeper can hold them (valid
//! UTF-8 without `/`, control characters or the other code points ZooKeeper
//! refuses, not `.`/`..`, not starting with `%`), which covers every id Python
//! tooz can use (it requires ASCII). Any other id is stored as `%` followed by its
//! bytes percent-encoded, and decoded back when listed.

use tooz_core::{GroupId, LockName, MemberId, Result, ToozError};

/// The directory of a group's leader election (a kazoo `Lock`).
pub const LEADER_DIR: &str = "leader";
/// The directory of every lock, directly under the namespace.
pub const LOCKS_DIR: &str = "locks";
/// The node-name marker of an exclusive holder (kazoo `Lock`/`WriteLock`).
pub const EXCLUSIVE_MARK: &str = "__lock__";
/// The node-name marker of a shared holder (kazoo `ReadLock`).
pub const SHARED_MARK: &str = "__rlock__";

/// Whether ZooKeeper accepts this character in a path.
pub(crate) fn is_allowed_char(c: char) -> bool {
    let u = u32::from(c);
    ![
        0x0000..=0x001f,
        0x007f..=0x009f,
        0xd800..=0xf8ff,
        0xfff0..=0xffff,
    ]
    .into_iter()
    .any(|r| r.contains(&u))
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~')
}

/// Decodes `%XX` escapes; `None` for a malformed escape.
pub(crate) fn percent_decode(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(out)
}

/// The znode name of an id.
pub fn encode_id(id: &[u8]) -> String {
    if let Ok(s) = std::str::from_utf8(id)
        && !s.is_empty()
        && s != "."
        && s != ".."
        && !s.starts_with('%')
        && !s.contains('/')
        && s.chars().all(is_allowed_char)
    {
        return s.to_string();
    }
    let mut out = String::with_capacity(id.len() * 3 + 1);
    out.push('%');
    for &b in id {
        if is_unreserved(b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The id a znode name stands for (see [`encode_id`]). A name starting with `%`
/// that is not exactly what [`encode_id`] makes of some id is taken literally.
pub fn decode_id(name: &str) -> Vec<u8> {
    if let Some(rest) = name.strip_prefix('%')
        && let Some(bytes) = percent_decode(rest)
        && encode_id(&bytes) == name
    {
        return bytes;
    }
    name.as_bytes().to_vec()
}

/// Member ids that name the election and lock directories Python leaves in a
/// group directory.
pub(crate) fn check_member_id(m: &MemberId) -> Result<()> {
    let b = m.as_bytes();
    if b == LEADER_DIR.as_bytes() || b == LOCKS_DIR.as_bytes() {
        return Err(ToozError::InvalidId {
            kind: "member id",
            id: m.to_string(),
            reason: format!(
                "{:?} is reserved by the zookeeper driver (Python tooz keeps its leader election and locks under that name)",
                String::from_utf8_lossy(b)
            ),
        });
    }
    Ok(())
}

/// Group ids that would collide with the lock tree.
pub(crate) fn check_group_id(g: &GroupId) -> Result<()> {
    if g.as_bytes() == LOCKS_DIR.as_bytes() {
        return Err(ToozError::InvalidId {
            kind: "group id",
            id: g.to_string(),
            reason: "\"locks\" is reserved by the zookeeper driver: Python tooz keeps every lock under /<namespace>/locks".into(),
        });
    }
    Ok(())
}

/// Whether a group-directory child is a member (not Python's `leader`/`locks`).
pub(crate) fn is_member_child(name: &str) -> bool {
    name != LEADER_DIR && name != LOCKS_DIR
}

/// One contender node of a kazoo lock directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Contender<'a> {
    /// The full child name.
    pub(crate) name: &'a str,
    /// The sequence suffix as text (kazoo compares the text).
    pub(crate) seq: &'a str,
    /// `__rlock__` (shared) or `__lock__`.
    pub(crate) shared: bool,
}

/// Parses a lock-directory child the way kazoo's contender regex does:
/// `(__lock__|__rlock__)(-?\d{10})$`.
pub(crate) fn contender(name: &str) -> Option<Contender<'_>> {
    let b = name.as_bytes();
    if b.len() < 10 {
        return None;
    }
    let digits_start = b.len() - 10;
    if !b[digits_start..].iter().all(u8::is_ascii_digit) {
        return None;
    }
    let seq_start = if digits_start > 0 && b[digits_start - 1] == b'-' {
        digits_start - 1
    } else {
        digits_start
    };
    let head = &name[..seq_start];
    let (head, seq_start) = if head.ends_with(SHARED_MARK) || head.ends_with(EXCLUSIVE_MARK) {
        (head, seq_start)
    } else if seq_start != digits_start {
        // The '-' was not a sign: try without it.
        let h = &name[..digits_start];
        (h, digits_start)
    } else {
        return None;
    };
    let shared = if head.ends_with(SHARED_MARK) {
        true
    } else if head.ends_with(EXCLUSIVE_MARK) {
        false
    } else {
        return None;
    };
    Some(Contender {
        name,
        seq: &name[seq_start..],
        shared,
    })
}

/// The contenders of a lock directory, in kazoo's order (by sequence text).
pub(crate) fn contenders(children: &[String]) -> Vec<Contender<'_>> {
    let mut v: Vec<Contender<'_>> = children.iter().filter_map(|c| contender(c)).collect();
    v.sort_by(|a, b| a.seq.cmp(b.seq));
    v
}

/// The node `me` must wait for, as kazoo's `_get_predecessor`: the contender
/// with the largest sequence below ours among those that exclude us (every
/// contender for an exclusive node, exclusive ones for a shared node).
/// `Err(())` when `me` is not among the children (its node is gone).
pub(crate) fn predecessor<'a>(
    children: &'a [String],
    me: &str,
) -> std::result::Result<Option<&'a str>, ()> {
    let Some(mine) = children
        .iter()
        .find(|c| c.as_str() == me)
        .and_then(|c| contender(c))
    else {
        return Err(());
    };
    Ok(children
        .iter()
        .filter_map(|c| contender(c))
        .filter(|c| c.seq < mine.seq && (!mine.shared || !c.shared))
        .max_by(|a, b| a.seq.cmp(b.seq))
        .map(|c| c.name))
}

/// Absolute znode paths of one namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    base: String,
}

impl Layout {
    /// The layout under `base` (`<chroot>/<namespace>`).
    pub fn new(base: String) -> Self {
        Layout { base }
    }

    /// The namespace znode.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// A group's directory.
    pub fn group(&self, g: &GroupId) -> String {
        format!("{}/{}", self.base, encode_id(g.as_bytes()))
    }

    /// A member's ephemeral node.
    pub fn member(&self, g: &GroupId, m: &MemberId) -> String {
        format!("{}/{}", self.group(g), encode_id(m.as_bytes()))
    }

    /// A group's election directory.
    pub fn leader_dir(&self, g: &GroupId) -> String {
        format!("{}/{LEADER_DIR}", self.group(g))
    }

    /// The directory of a lock.
    pub fn lock_dir(&self, name: &LockName) -> String {
        format!("{}/{LOCKS_DIR}/{}", self.base, encode_id(name.as_bytes()))
    }

    /// The group a path below the namespace belongs to, and what is below it.
    pub(crate) fn split_group_path<'a>(&self, path: &'a str) -> Option<(&'a str, Option<&'a str>)> {
        let rest = path.strip_prefix(self.base.as_str())?.strip_prefix('/')?;
        Some(match rest.split_once('/') {
            Some((g, below)) => (g, Some(below)),
            None => (rest, None),
        })
    }
}

/// The name prefix of a new contender node: `<uuid hex><mark>`.
pub(crate) fn contender_prefix(shared: bool) -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        if shared { SHARED_MARK } else { EXCLUSIVE_MARK }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip() {
        for id in [
            &b"plain-id"[..],
            b"with space",
            b"a/b",
            b"%lead",
            b"50%",
            b".",
            b"..",
            b"\xff\xfe\x80z",
            b"tab\there",
            "caf\u{e9}".as_bytes(),
        ] {
            let enc = encode_id(id);
            assert!(!enc.contains('/'), "{enc}");
            assert!(enc.chars().all(is_allowed_char), "{enc}");
            assert_eq!(decode_id(&enc), id, "{enc}");
        }
        assert_eq!(encode_id(b"worker-1"), "worker-1");
        assert_eq!(encode_id(b"50%"), "50%");
        assert_eq!(encode_id(b"a/b"), "%a%2Fb");
        assert_eq!(decode_id("%zz"), b"%zz");
    }

    #[test]
    fn kazoo_contenders() {
        let c = contender("0123abcd__lock__0000000007").unwrap();
        assert_eq!((c.seq, c.shared), ("0000000007", false));
        let c = contender("ff__rlock__0000000012").unwrap();
        assert_eq!((c.seq, c.shared), ("0000000012", true));
        assert!(contender("leader").is_none());
        assert!(contender("x__lock__12").is_none());
        assert!(contender("member0000000001").is_none());
        let kids: Vec<String> = [
            "a__lock__0000000003",
            "b__rlock__0000000004",
            "c__rlock__0000000005",
            "d__lock__0000000006",
            "junk",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(predecessor(&kids, "a__lock__0000000003"), Ok(None));
        assert_eq!(
            predecessor(&kids, "c__rlock__0000000005"),
            Ok(Some("a__lock__0000000003"))
        );
        assert_eq!(
            predecessor(&kids, "d__lock__0000000006"),
            Ok(Some("c__rlock__0000000005"))
        );
        assert_eq!(predecessor(&kids, "gone__lock__0000000001"), Err(()));
        assert_eq!(contenders(&kids).len(), 4);
    }

    #[test]
    fn paths() {
        let l = Layout::new("/root/tooz".into());
        assert_eq!(l.group(&"g".into()), "/root/tooz/g");
        assert_eq!(l.member(&"g".into(), &"m".into()), "/root/tooz/g/m");
        assert_eq!(l.leader_dir(&"g".into()), "/root/tooz/g/leader");
        assert_eq!(l.lock_dir(&"x".into()), "/root/tooz/locks/x");
        assert_eq!(l.split_group_path("/root/tooz/g/m"), Some(("g", Some("m"))));
        assert_eq!(l.split_group_path("/root/tooz/g"), Some(("g", None)));
        assert_eq!(l.split_group_path("/other"), None);
    }

    #[test]
    fn reserved_ids() {
        assert!(check_member_id(&"leader".into()).is_err());
        assert!(check_member_id(&"locks".into()).is_err());
        assert!(check_member_id(&"leader2".into()).is_ok());
        assert!(check_group_id(&"locks".into()).is_err());
        assert!(!is_member_child("leader"));
    }
}
