//! The znode layout, shared with Python tooz's kazoo driver (spec §11.5). This is
//! the one place it lives.
//!
//! ```text
//! <chroot>/<namespace>                          persistent, made by start
//! <chroot>/<namespace>/<group>                  persistent, no data
//! <chroot>/<namespace>/<group>/<member>         ephemeral, msgpack capabilities
//! <chroot>/<namespace>/<group>/leader                      container (Python: persistent)
//! <chroot>/<namespace>/<group>/leader/<uuid>__lock__<seq>   kazoo Lock, data = member id
//! <chroot>/<namespace>/locks                               persistent
//! <chroot>/<namespace>/locks/<name>                        container (Python: persistent)
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
    /// The sequence suffix: the parent's child version when the node was made,
    /// a signed 32-bit counter that wraps (see [`precedes`]).
    pub(crate) seq: i32,
    /// `__rlock__` (shared) or `__lock__`.
    pub(crate) shared: bool,
}

/// Parses a sequence suffix as ZooKeeper writes it: the parent's signed 32-bit
/// child version formatted with `%010d` (`0000000007`, `2147483647`, and after
/// the counter wrapped `-2147483648` or `-000000005`). Any other text is not a
/// sequence (kazoo accepts only `-?\d{10}`, so it misses `-000000005`).
pub(crate) fn parse_seq(text: &str) -> Option<i32> {
    let v: i32 = text.parse().ok()?;
    (format!("{v:010}") == text).then_some(v)
}

/// Whether sequence `a` was made before `b`: serial-number arithmetic on the
/// wrapping 32-bit counter (RFC 1982 style), `b - a` taken modulo 2^32 is
/// positive as a signed number. Right whenever the live contenders of one
/// directory span fewer than 2^31 child changes, which holds across the wrap
/// from `2147483647` to `-2147483648`, where comparing the text (kazoo) or the
/// plain integers gives the wrong order.
pub(crate) fn precedes(a: i32, b: i32) -> bool {
    b.wrapping_sub(a) > 0
}

/// Parses a lock-directory child: `<anything>(__lock__|__rlock__)<seq>` with a
/// sequence as [`parse_seq`] reads it (kazoo's contender regex, extended to the
/// negative sequences of a wrapped counter).
pub(crate) fn contender(name: &str) -> Option<Contender<'_>> {
    let mark = [(SHARED_MARK, true), (EXCLUSIVE_MARK, false)]
        .into_iter()
        .filter_map(|(m, shared)| name.rfind(m).map(|i| (i + m.len(), shared)))
        .max_by_key(|(end, _)| *end)?;
    let (end, shared) = mark;
    Some(Contender {
        name,
        seq: parse_seq(&name[end..])?,
        shared,
    })
}

/// The contenders of a lock directory, first made first (by [`precedes`],
/// relative to one of them, so the order is total even across the wrap).
pub(crate) fn contenders(children: &[String]) -> Vec<Contender<'_>> {
    let mut v: Vec<Contender<'_>> = children.iter().filter_map(|c| contender(c)).collect();
    if let Some(reference) = v.first().map(|c| c.seq) {
        v.sort_by_key(|c| c.seq.wrapping_sub(reference));
    }
    v
}

/// The node `me` must wait for, as kazoo's `_get_predecessor` (but ordered by
/// [`precedes`]): the closest contender made before ours among those that
/// exclude us (every contender for an exclusive node, exclusive ones for a
/// shared node). `Err(())` when `me` is not among the children (its node is gone).
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
        .filter(|c| precedes(c.seq, mine.seq) && (!mine.shared || !c.shared))
        .min_by_key(|c| mine.seq.wrapping_sub(c.seq))
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
        assert_eq!((c.seq, c.shared), (7, false));
        let c = contender("ff__rlock__0000000012").unwrap();
        assert_eq!((c.seq, c.shared), (12, true));
        assert!(contender("leader").is_none());
        assert!(contender("x__lock__12").is_none());
        assert!(contender("x__lock__+000000012").is_none());
        assert!(contender("x__lock__00000000012").is_none());
        assert!(contender("x__lock__2147483648").is_none());
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

    const WRAP: [i32; 4] = [2_147_483_646, 2_147_483_647, -2_147_483_648, -2_147_483_647];

    #[test]
    fn sequences_as_zookeeper_writes_them() {
        for (text, v) in [
            ("0000000000", 0),
            ("0000000007", 7),
            ("2147483646", 2_147_483_646),
            ("2147483647", i32::MAX),
            ("-2147483648", i32::MIN),
            ("-2147483647", -2_147_483_647),
            ("-000000005", -5),
            ("-999999999", -999_999_999),
        ] {
            assert_eq!(parse_seq(text), Some(v), "{text}");
            assert_eq!(format!("{v:010}"), text);
        }
        for bad in [
            "",
            "7",
            "-5",
            "-0000000005",
            "00000000007",
            "2147483648",
            "abcdefghij",
        ] {
            assert_eq!(parse_seq(bad), None, "{bad}");
        }
        let c = contender("ab__lock__-000000005").unwrap();
        assert_eq!((c.seq, c.shared), (-5, false));
        let c = contender("ab__rlock__-2147483648").unwrap();
        assert_eq!((c.seq, c.shared), (i32::MIN, true));
        // A marker inside the prefix does not confuse the parser.
        let c = contender("x__rlock__y__lock__0000000003").unwrap();
        assert_eq!((c.seq, c.shared), (3, false));
    }

    #[test]
    fn order_survives_the_wrap() {
        // Made in this order: each precedes every later one.
        for (i, a) in WRAP.iter().enumerate() {
            assert!(!precedes(*a, *a));
            for b in &WRAP[i + 1..] {
                assert!(precedes(*a, *b), "{a} before {b}");
                assert!(!precedes(*b, *a), "{b} not before {a}");
            }
        }
        assert!(precedes(-1, 0));
        assert!(precedes(0, 1));
        // Listed in any order, the contenders come out in creation order.
        let kids: Vec<String> = [
            "d__lock__-2147483647",
            "b__lock__2147483647",
            "c__lock__-2147483648",
            "a__lock__2147483646",
        ]
        .map(String::from)
        .to_vec();
        let order: Vec<i32> = contenders(&kids).iter().map(|c| c.seq).collect();
        assert_eq!(order, WRAP);
        let mut rev = kids.clone();
        rev.reverse();
        let order: Vec<i32> = contenders(&rev).iter().map(|c| c.seq).collect();
        assert_eq!(order, WRAP);
    }

    #[test]
    fn predecessor_across_the_wrap() {
        let kids: Vec<String> = [
            "c__lock__-2147483648",
            "a__lock__2147483646",
            "d__rlock__-2147483647",
            "b__rlock__2147483647",
            "e__lock__-000000005",
        ]
        .map(String::from)
        .to_vec();
        // Only the first made holds; nobody else thinks it does.
        assert_eq!(predecessor(&kids, "a__lock__2147483646"), Ok(None));
        assert_eq!(
            predecessor(&kids, "b__rlock__2147483647"),
            Ok(Some("a__lock__2147483646"))
        );
        assert_eq!(
            predecessor(&kids, "c__lock__-2147483648"),
            Ok(Some("b__rlock__2147483647"))
        );
        // A shared node waits only for the exclusive one before it.
        assert_eq!(
            predecessor(&kids, "d__rlock__-2147483647"),
            Ok(Some("c__lock__-2147483648"))
        );
        assert_eq!(
            predecessor(&kids, "e__lock__-000000005"),
            Ok(Some("d__rlock__-2147483647"))
        );
        // The text order (kazoo's) would have let the wrapped node hold.
        let mut by_text: Vec<&str> = kids
            .iter()
            .map(|k| &k[k.rfind("__").unwrap() + 2..])
            .collect();
        by_text.sort_unstable();
        assert_eq!(by_text[0], "-000000005");
        // Once the old ones are gone, the wrapped one holds.
        let later: Vec<String> = ["c__lock__-2147483648", "e__lock__-000000005"]
            .map(String::from)
            .to_vec();
        assert_eq!(predecessor(&later, "c__lock__-2147483648"), Ok(None));
        assert_eq!(
            predecessor(&later, "e__lock__-000000005"),
            Ok(Some("c__lock__-2147483648"))
        );
    }
}
