//! The one place where the on-disk layout lives: directory and file names, the
//! record formats, and lock-name to path mapping.
//!
//! ```text
//! DIRECTORY/
//!   .driver_lock                      lock file serialising group operations (Python: lockf)
//!   tmp/                              scratch files for atomic writes (write, then rename)
//!   groups/<sha1(group)>/.metadata    msgpack {group_id: bin, encoded: false}
//!   groups/<sha1(group)>/<sha1(member)>.raw
//!                                     msgpack {capabilities: <value>, joined_on: ext 1,
//!                                              member_id: bin, encoded: false,
//!                                              tooz_rs_alive: ".tooz/alive/<name>"}
//!   <lock name>                       lock files (sub-directories allowed)
//!   .tooz/alive/<sha1(member)>-<uuid> one per running Rust coordinator, OFD write-locked
//!   .tooz/leaders/<sha1(group)>.lock  OFD write-locked by the group's leader
//!   .tooz/leaders/<sha1(group)>.state msgpack {group_id, member_id, alive, token}
//!   .tooz/fence/<sha1(lock path)>     fencing counter of a lock (decimal text)
//! ```
//!
//! Everything up to `<lock name>` is Python tooz's file driver layout, byte for
//! byte; `.tooz/` holds what only this implementation uses. Nothing of ours goes
//! inside a group directory apart from the member records, because Python's
//! `delete_group` counts every entry there.

use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rmpv::Value;
use sha1::{Digest, Sha1};
use tooz_core::{Capabilities, GroupId, LockName, MemberId, Result, ToozError};

/// Python's lock file serialising group operations.
pub(crate) const DRIVER_LOCK: &str = ".driver_lock";
/// Python's scratch directory for atomic writes.
pub(crate) const TMP_DIR: &str = "tmp";
/// Python's group directory.
pub(crate) const GROUPS_DIR: &str = "groups";
/// The group metadata file inside a group directory.
pub(crate) const METADATA: &str = ".metadata";
/// Suffix of member record files.
pub(crate) const MEMBER_SUFFIX: &str = ".raw";
/// Our private directory (reserved: no lock may use it).
pub(crate) const TOOZ_DIR: &str = ".tooz";
/// Liveness files of running Rust coordinators, relative to the root.
pub(crate) const ALIVE_DIR: &str = ".tooz/alive";
/// Leader lock and state files, relative to the root.
pub(crate) const LEADERS_DIR: &str = ".tooz/leaders";
/// Fencing counters of locks, relative to the root.
pub(crate) const FENCE_DIR: &str = ".tooz/fence";
/// Extra key of a member record naming the member's liveness file.
pub(crate) const ALIVE_KEY: &str = "tooz_rs_alive";
/// oslo.serialization msgpackutils extension type of `datetime.datetime`.
pub(crate) const EXT_DATETIME: i8 = 1;
/// Longest file name component Linux accepts.
const NAME_MAX: usize = 255;

/// Lower-case hex SHA-1 of `bytes` (Python: `hashlib.sha1(x).hexdigest()`).
pub(crate) fn sha1_hex(bytes: &[u8]) -> String {
    hex::encode(Sha1::digest(bytes))
}

/// Paths of one coordination directory.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    root: PathBuf,
}

impl Layout {
    /// A layout rooted at `root` (made absolute and lexically normalised).
    pub(crate) fn new(root: &Path) -> Self {
        Layout {
            root: normalize_abs(root),
        }
    }

    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    pub(crate) fn driver_lock(&self) -> PathBuf {
        self.root.join(DRIVER_LOCK)
    }

    pub(crate) fn tmp_dir(&self) -> PathBuf {
        self.root.join(TMP_DIR)
    }

    /// A fresh scratch file name in `tmp/`.
    pub(crate) fn temp_file(&self) -> PathBuf {
        self.tmp_dir()
            .join(format!("tooz-rs-{}.tmp", uuid::Uuid::new_v4().simple()))
    }

    pub(crate) fn groups_dir(&self) -> PathBuf {
        self.root.join(GROUPS_DIR)
    }

    pub(crate) fn group_dir(&self, group: &GroupId) -> PathBuf {
        self.groups_dir().join(sha1_hex(group.as_bytes()))
    }

    pub(crate) fn metadata(&self, group: &GroupId) -> PathBuf {
        self.group_dir(group).join(METADATA)
    }

    /// `<sha1(member)>.raw`.
    pub(crate) fn member_file_name(member: &MemberId) -> String {
        format!("{}{MEMBER_SUFFIX}", sha1_hex(member.as_bytes()))
    }

    pub(crate) fn member_file(&self, group: &GroupId, member: &MemberId) -> PathBuf {
        self.group_dir(group).join(Self::member_file_name(member))
    }

    /// Every directory `start` creates.
    pub(crate) fn dirs(&self) -> [PathBuf; 6] {
        [
            self.root.clone(),
            self.groups_dir(),
            self.tmp_dir(),
            self.root.join(ALIVE_DIR),
            self.root.join(LEADERS_DIR),
            self.root.join(FENCE_DIR),
        ]
    }

    pub(crate) fn alive_dir(&self) -> PathBuf {
        self.root.join(ALIVE_DIR)
    }

    /// A new liveness file name for `member`, relative to the root.
    pub(crate) fn new_alive_rel(member: &MemberId) -> String {
        format!(
            "{ALIVE_DIR}/{}-{}",
            sha1_hex(member.as_bytes()),
            uuid::Uuid::new_v4().simple()
        )
    }

    /// Resolves a liveness path read from a member record. Only plain names inside
    /// `.tooz/alive/` are accepted, so a record cannot make us probe other files.
    pub(crate) fn resolve_alive(&self, rel: &str) -> Option<PathBuf> {
        let name = rel.strip_prefix(ALIVE_DIR)?.strip_prefix('/')?;
        let ok = !name.is_empty()
            && name.len() <= NAME_MAX
            && !name.starts_with('.')
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        ok.then(|| self.root.join(ALIVE_DIR).join(name))
    }

    pub(crate) fn leaders_dir(&self) -> PathBuf {
        self.root.join(LEADERS_DIR)
    }

    /// File names (inside [`Layout::leaders_dir`]) of a group's leader lock and state.
    pub(crate) fn leader_names(group: &GroupId) -> (String, String) {
        let h = sha1_hex(group.as_bytes());
        (format!("{h}.lock"), format!("{h}.state"))
    }

    pub(crate) fn leader_lock(&self, group: &GroupId) -> PathBuf {
        self.leaders_dir().join(Self::leader_names(group).0)
    }

    pub(crate) fn leader_state(&self, group: &GroupId) -> PathBuf {
        self.leaders_dir().join(Self::leader_names(group).1)
    }

    /// The fencing counter of a lock, keyed by its path relative to the root.
    pub(crate) fn lock_fence(&self, rel: &Path) -> PathBuf {
        self.root
            .join(FENCE_DIR)
            .join(sha1_hex(rel.as_os_str().as_bytes()))
    }

    /// Maps a lock name to its file, as Python's `safe_abs_path(DIRECTORY, name)`
    /// does (relative names are joined to the root, `.`/`..` are resolved
    /// lexically, absolute names must point inside the root). Returns the absolute
    /// path and the path relative to the root.
    ///
    /// Refused with `InvalidId`: NUL bytes, paths escaping the root, the root itself,
    /// the reserved `groups`, `tmp`, `.driver_lock` and `.tooz` (and anything inside
    /// them), and components longer than 255 bytes.
    pub(crate) fn lock_path(&self, name: &LockName) -> Result<(PathBuf, PathBuf)> {
        let bytes = name.as_bytes();
        let invalid = |reason: &str| ToozError::InvalidId {
            kind: "lock name",
            id: name.to_string(),
            reason: reason.to_string(),
        };
        if bytes.contains(&0) {
            return Err(invalid("must not contain NUL bytes"));
        }
        let raw = Path::new(std::ffi::OsStr::from_bytes(bytes));
        let joined = if raw.is_absolute() {
            normalize_abs(raw)
        } else {
            normalize_abs(&self.root.join(raw))
        };
        let rel = joined
            .strip_prefix(&self.root)
            .map_err(|_| {
                invalid(&format!(
                    "resolves outside the lock directory {}",
                    self.root.display()
                ))
            })?
            .to_path_buf();
        let Some(first) = rel.components().next() else {
            return Err(invalid("is the lock directory itself"));
        };
        let first = first.as_os_str().as_bytes();
        for reserved in [GROUPS_DIR, TMP_DIR, DRIVER_LOCK, TOOZ_DIR] {
            if first == reserved.as_bytes() {
                return Err(invalid(&format!(
                    "uses the reserved path {reserved:?} of the file driver"
                )));
            }
        }
        if rel
            .components()
            .any(|c| c.as_os_str().as_bytes().len() > NAME_MAX)
        {
            return Err(invalid("has a path component longer than 255 bytes"));
        }
        Ok((joined, rel))
    }
}

/// Makes a path absolute (against the current directory) and resolves `.` and
/// `..` lexically, like Python's `os.path.abspath` (symlinks are not followed).
pub(crate) fn normalize_abs(p: &Path) -> PathBuf {
    let base = if p.is_absolute() {
        PathBuf::new()
    } else {
        std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"))
    };
    let mut out = PathBuf::from("/");
    for c in base.components().chain(p.components()) {
        match c {
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
        }
    }
    out
}

// ----- msgpack helpers --------------------------------------------------------

fn encode_value(v: &Value) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, v)
        .map_err(|e| ToozError::serialization("cannot encode a file driver record", e))?;
    Ok(out)
}

fn decode_map(bytes: &[u8], what: &str) -> Result<Vec<(String, Value)>> {
    let v = tooz_core::capabilities::read_msgpack(&mut &bytes[..])
        .map_err(|e| ToozError::serialization(format!("{what} is not msgpack"), e))?;
    let Value::Map(entries) = v else {
        return Err(ToozError::Serialization {
            message: format!("{what} is not a msgpack map"),
            source: None,
        });
    };
    // Files written before tooz 1.36 may use bin keys: accept both.
    Ok(entries
        .into_iter()
        .filter_map(|(k, v)| match k {
            Value::String(s) => s.into_str().map(|s| (s, v)),
            Value::Binary(b) => String::from_utf8(b).ok().map(|s| (s, v)),
            _ => None,
        })
        .collect())
}

fn take(entries: &mut Vec<(String, Value)>, key: &str) -> Option<Value> {
    let pos = entries.iter().position(|(k, _)| k == key)?;
    Some(entries.swap_remove(pos).1)
}

/// An id stored as `bin` (ours, Python ≥ 1.36) or `str` (Python `encoded` ids and
/// old files).
fn id_bytes(v: Value, what: &str) -> Result<Vec<u8>> {
    match v {
        Value::Binary(b) => Ok(b),
        Value::String(s) => Ok(s.into_bytes()),
        other => Err(ToozError::Serialization {
            message: format!("{what} is neither bytes nor text: {other}"),
            source: None,
        }),
    }
}

fn str_key(k: &str) -> Value {
    Value::from(k)
}

// ----- group metadata ---------------------------------------------------------

/// Encodes `groups/<sha1>/.metadata`: `{group_id: bin, encoded: false}` (the exact
/// keys Python validates; it allows no others).
pub(crate) fn encode_metadata(group: &GroupId) -> Result<Vec<u8>> {
    encode_value(&Value::Map(vec![
        (
            str_key("group_id"),
            Value::Binary(group.as_bytes().to_vec()),
        ),
        (str_key("encoded"), Value::Boolean(false)),
    ]))
}

/// Decodes a group metadata file written by us or by any Python tooz version.
pub(crate) fn decode_metadata(bytes: &[u8]) -> Result<GroupId> {
    let mut m = decode_map(bytes, "group metadata")?;
    let id = take(&mut m, "group_id").ok_or_else(|| ToozError::Serialization {
        message: "group metadata has no group_id".into(),
        source: None,
    })?;
    Ok(GroupId::from(id_bytes(id, "group_id")?))
}

// ----- member records ---------------------------------------------------------

/// A member record, `groups/<sha1(group)>/<sha1(member)>.raw`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct MemberRecord {
    pub(crate) member_id: MemberId,
    pub(crate) capabilities: Capabilities,
    /// `joined_on`; Python writes naive local time, we write naive UTC and read
    /// naive values as UTC.
    pub(crate) joined_on: Option<SystemTime>,
    /// Our liveness file (relative to the root); `None` for Python members.
    pub(crate) alive: Option<String>,
}

impl MemberRecord {
    /// Encodes as Python's record (key order `capabilities, joined_on, member_id,
    /// encoded`) plus our liveness key. The capabilities are embedded as a msgpack
    /// value, not as bytes, exactly as Python stores the object.
    pub(crate) fn encode(&self) -> Result<Vec<u8>> {
        let caps = tooz_core::capabilities::read_msgpack(&mut self.capabilities.as_msgpack())
            .map_err(|e| ToozError::serialization("capabilities are not msgpack", e))?;
        let mut map = vec![
            (str_key("capabilities"), caps),
            (
                str_key("joined_on"),
                encode_datetime(self.joined_on.unwrap_or_else(SystemTime::now))?,
            ),
            (
                str_key("member_id"),
                Value::Binary(self.member_id.as_bytes().to_vec()),
            ),
            (str_key("encoded"), Value::Boolean(false)),
        ];
        if let Some(a) = &self.alive {
            map.push((str_key(ALIVE_KEY), Value::from(a.as_str())));
        }
        encode_value(&Value::Map(map))
    }

    /// Decodes a record written by us or by Python tooz (str or bin ids and keys,
    /// `encoded` true/false/missing, any capabilities value, extra keys ignored).
    pub(crate) fn decode(bytes: &[u8]) -> Result<Self> {
        let mut m = decode_map(bytes, "member record")?;
        let id = take(&mut m, "member_id").ok_or_else(|| ToozError::Serialization {
            message: "member record has no member_id".into(),
            source: None,
        })?;
        let member_id = MemberId::from(id_bytes(id, "member_id")?);
        let capabilities = match take(&mut m, "capabilities") {
            None => Capabilities::none(),
            Some(v) => Capabilities::from_msgpack(encode_value(&v)?),
        };
        let joined_on = take(&mut m, "joined_on").and_then(|v| decode_datetime(&v));
        let alive = match take(&mut m, ALIVE_KEY) {
            Some(Value::String(s)) => s.into_str(),
            _ => None,
        };
        Ok(MemberRecord {
            member_id,
            capabilities,
            joined_on,
            alive,
        })
    }
}

// ----- datetimes (oslo msgpackutils ext 1) ------------------------------------

/// Encodes a time as oslo.serialization does a naive `datetime`: ext type 1 whose
/// payload is the msgpack map `day, month, year, hour, minute, second,
/// microsecond` (in that order). We write UTC.
pub(crate) fn encode_datetime(t: SystemTime) -> Result<Value> {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    let secs = since.as_secs();
    let days = i64::try_from(secs / 86_400).unwrap_or(i64::MAX / 2);
    let rem = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    let payload = encode_value(&Value::Map(vec![
        (str_key("day"), Value::from(day)),
        (str_key("month"), Value::from(month)),
        (str_key("year"), Value::from(year)),
        (str_key("hour"), Value::from(rem / 3600)),
        (str_key("minute"), Value::from(rem % 3600 / 60)),
        (str_key("second"), Value::from(rem % 60)),
        (str_key("microsecond"), Value::from(since.subsec_micros())),
    ]))?;
    Ok(Value::Ext(EXT_DATETIME, payload))
}

/// Decodes an oslo datetime (ext 1) as UTC. `None` for anything else.
pub(crate) fn decode_datetime(v: &Value) -> Option<SystemTime> {
    let Value::Ext(EXT_DATETIME, payload) = v else {
        return None;
    };
    let mut m = decode_map(payload, "datetime").ok()?;
    let mut field = |k: &str| take(&mut m, k).and_then(|v| v.as_i64());
    let (day, month, year) = (field("day")?, field("month")?, field("year")?);
    let (hour, minute, second) = (field("hour")?, field("minute")?, field("second")?);
    let micro = field("microsecond").unwrap_or(0);
    // Python's datetime ranges; anything else (a corrupt or hostile file) would
    // overflow the arithmetic below.
    if !(1..=9999).contains(&year)
        || !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || !(0..=23).contains(&hour)
        || !(0..=59).contains(&minute)
        || !(0..=59).contains(&second)
        || !(0..=999_999).contains(&micro)
    {
        return None;
    }
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second;
    let secs = u64::try_from(secs).ok()?;
    let micro = u64::try_from(micro).ok()?;
    UNIX_EPOCH.checked_add(Duration::from_secs(secs) + Duration::from_micros(micro))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day number (inverse of [`days_from_civil`]).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

// ----- leadership -------------------------------------------------------------

/// `.tooz/leaders/<sha1(group)>.state`: who leads (if anyone) and the last
/// leadership token, written only by the holder of the leader lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LeaderState {
    pub(crate) group_id: GroupId,
    /// The leader and its liveness file; `None` after a resignation.
    pub(crate) leader: Option<(MemberId, String)>,
    pub(crate) token: u64,
}

impl LeaderState {
    pub(crate) fn encode(&self) -> Result<Vec<u8>> {
        let (member, alive) = match &self.leader {
            Some((m, a)) => (
                Value::Binary(m.as_bytes().to_vec()),
                Value::from(a.as_str()),
            ),
            None => (Value::Nil, Value::Nil),
        };
        encode_value(&Value::Map(vec![
            (
                str_key("group_id"),
                Value::Binary(self.group_id.as_bytes().to_vec()),
            ),
            (str_key("member_id"), member),
            (str_key("alive"), alive),
            (str_key("token"), Value::from(self.token)),
        ]))
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Self> {
        let mut m = decode_map(bytes, "leader state")?;
        let group_id = match take(&mut m, "group_id") {
            Some(v) => GroupId::from(id_bytes(v, "group_id")?),
            None => GroupId::from(""),
        };
        let member = match take(&mut m, "member_id") {
            None | Some(Value::Nil) => None,
            Some(v) => Some(MemberId::from(id_bytes(v, "member_id")?)),
        };
        let alive = match take(&mut m, "alive") {
            Some(Value::String(s)) => s.into_str(),
            _ => None,
        };
        let token = match take(&mut m, "token") {
            None => 0,
            Some(v) => v.as_u64().ok_or_else(|| {
                ToozError::serialization(
                    "leader state: token is not an unsigned integer",
                    format!("{v}"),
                )
            })?,
        };
        Ok(LeaderState {
            group_id,
            leader: member.zip(alive),
            token,
        })
    }
}

// ----- fencing ----------------------------------------------------------------

/// How far above the wall clock (and above the damaged file's modification time)
/// a token restarts when its counter cannot be read: one hour, in µs.
///
/// Every token we hand out is `max(prev + 1, now in µs)`, so a token exceeds the
/// wall clock of its grant only by the number of grants made faster than one per
/// microsecond in a row, or by how far the clock was stepped back since. The margin
/// covers a clock stepped back by up to an hour (or 3.6·10⁹ back-to-back grants)
/// and costs nothing: at today's ~1.8·10¹⁵ µs a `u64` still has room for ten
/// thousand times as much.
pub(crate) const RECOVERY_MARGIN_US: u64 = 3_600_000_000;

/// Microseconds since the epoch (0 before it).
pub(crate) fn micros(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The next fencing token after `prev`: `max(prev + 1, now in µs since the
/// epoch)`, so tokens keep increasing even if the counter file is lost.
///
/// # Errors
/// A counter at `u64::MAX` is exhausted: handing out `u64::MAX` again would give
/// two holders the same token, so no token is given at all.
pub(crate) fn next_token(prev: u64, now: SystemTime) -> Result<u64> {
    let next = prev.checked_add(1).ok_or_else(|| {
        ToozError::backend_msg(
            "file",
            format!(
                "fencing counter exhausted: it holds {prev} (u64::MAX), so no greater token exists"
            ),
        )
    })?;
    Ok(next.max(micros(now)))
}

/// The token that restarts a counter whose stored value is lost (a file that does
/// not parse): [`RECOVERY_MARGIN_US`] above both the wall clock and the damaged
/// file's modification time (which is later than the clock if the clock was
/// stepped back since the last grant). See [`RECOVERY_MARGIN_US`] for why that
/// is greater than any token handed out before.
///
/// # Errors
/// When that would overflow a `u64` (a clock or mtime absurdly far in the future).
pub(crate) fn recovery_token(now: SystemTime, mtime: Option<SystemTime>) -> Result<u64> {
    let base = micros(now).max(mtime.map_or(0, micros));
    base.checked_add(RECOVERY_MARGIN_US).ok_or_else(|| {
        ToozError::backend_msg(
            "file",
            format!(
                "cannot restart a damaged fencing counter: {base} µs plus the margin overflows"
            ),
        )
    })
}

/// Parses a fencing counter file (decimal text; empty means 0).
pub(crate) fn parse_counter(bytes: &[u8]) -> Result<u64> {
    let text = std::str::from_utf8(bytes)
        .map_err(|e| ToozError::serialization("fencing counter is not text", e))?
        .trim();
    if text.is_empty() {
        return Ok(0);
    }
    text.parse::<u64>().map_err(|e| {
        ToozError::serialization(format!("fencing counter holds {text:?}, not a number"), e)
    })
}

/// Formats a fencing counter file.
pub(crate) fn format_counter(v: u64) -> Vec<u8> {
    format!("{v}\n").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn layout() -> Layout {
        Layout::new(Path::new("/srv/tooz"))
    }

    #[test]
    fn python_paths() {
        let l = layout();
        assert_eq!(
            l.member_file(&"g1".into(), &"m1".into()),
            Path::new(
                "/srv/tooz/groups/a46e558d11cb2400bab09c1ca969e615142ef3d6/ae23b94ccaf714337e4ce5ba99ef3dc257e300df.raw"
            )
        );
        assert_eq!(
            l.metadata(&"g1".into()),
            Path::new("/srv/tooz/groups/a46e558d11cb2400bab09c1ca969e615142ef3d6/.metadata")
        );
        assert_eq!(l.driver_lock(), Path::new("/srv/tooz/.driver_lock"));
        assert_eq!(l.tmp_dir(), Path::new("/srv/tooz/tmp"));
        assert_eq!(
            Layout::new(Path::new("/srv/./x/../tooz/")).root(),
            Path::new("/srv/tooz")
        );
    }

    #[test]
    fn lock_paths_like_safe_abs_path() {
        let l = layout();
        let ok = |n: &str| l.lock_path(&n.into()).map(|(p, _)| p);
        assert_eq!(ok("a").unwrap(), Path::new("/srv/tooz/a"));
        assert_eq!(ok("a/b/../c").unwrap(), Path::new("/srv/tooz/a/c"));
        assert_eq!(ok("./a//b/").unwrap(), Path::new("/srv/tooz/a/b"));
        assert_eq!(ok("/srv/tooz/abs").unwrap(), Path::new("/srv/tooz/abs"));
        let (_, rel) = l.lock_path(&"x/y".into()).unwrap();
        assert_eq!(rel, Path::new("x/y"));
        for bad in [
            "..",
            "../x",
            "a/../../x",
            "/etc/passwd",
            "/srv/tooz2/x",
            ".",
            "b/..",
            "groups",
            "groups/x",
            "tmp",
            "tmp/../tmp/y",
            ".driver_lock",
            ".tooz",
            ".tooz/fence/x",
            "a\0b",
        ] {
            let e = l.lock_path(&bad.into()).unwrap_err();
            assert!(matches!(e, ToozError::InvalidId { .. }), "{bad}: {e}");
        }
        let long = "x".repeat(256);
        assert!(l.lock_path(&long.as_str().into()).is_err());
        // Non-UTF-8 names are fine.
        assert!(l.lock_path(&LockName::from(&b"caf\xe9"[..])).is_ok());
    }

    #[test]
    fn alive_paths_are_confined() {
        let l = layout();
        let rel = Layout::new_alive_rel(&"m1".into());
        assert!(rel.starts_with(".tooz/alive/ae23b94ccaf714337e4ce5ba99ef3dc257e300df-"));
        assert_eq!(
            l.resolve_alive(&rel).unwrap(),
            Path::new("/srv/tooz").join(&rel)
        );
        for bad in [
            ".tooz/alive/../x",
            ".tooz/alive/",
            ".tooz/alive/a/b",
            "/etc/passwd",
            ".tooz/alivex",
            ".tooz/alive/..",
        ] {
            assert!(l.resolve_alive(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn metadata_round_trip_and_python_bytes() {
        let b = encode_metadata(&"g1".into()).unwrap();
        // Python: utils.dumps({'group_id': b'g1', 'encoded': False})
        assert_eq!(b, b"\x82\xa8group_id\xc4\x02g1\xa7encoded\xc2");
        assert_eq!(decode_metadata(&b).unwrap(), GroupId::from("g1"));
        // Python with a str id: encoded True, bytes stored.
        let py = b"\x82\xa8group_id\xc4\x02g2\xa7encoded\xc3";
        assert_eq!(decode_metadata(py).unwrap(), GroupId::from("g2"));
        // tooz < 1.36: bin keys, str value, no `encoded`.
        let old = b"\x81\xc4\x08group_id\xa2g3";
        assert_eq!(decode_metadata(old).unwrap(), GroupId::from("g3"));
        assert!(decode_metadata(b"\xc0").is_err());
        assert!(decode_metadata(b"").is_err());
    }

    #[test]
    fn datetime_matches_oslo() {
        // datetime(2020,1,2,3,4,5,6) from the spec, as UTC.
        let t = UNIX_EPOCH
            + Duration::from_secs(
                days_from_civil(2020, 1, 2) as u64 * 86_400 + 3 * 3600 + 4 * 60 + 5,
            )
            + Duration::from_micros(6);
        let v = encode_datetime(t).unwrap();
        let bytes = encode_value(&v).unwrap();
        let mut expected = vec![0xc7, 0x38, 0x01, 0x87];
        expected.extend_from_slice(b"\xa3day\x02\xa5month\x01\xa4year\xcd\x07\xe4");
        expected.extend_from_slice(b"\xa4hour\x03\xa6minute\x04\xa6second\x05");
        expected.extend_from_slice(b"\xabmicrosecond\x06");
        assert_eq!(bytes, expected);
        assert_eq!(decode_datetime(&v), Some(t));
        for days in [-800_000, -1, 0, 59, 365, 11_016, 20_000, 2_932_896] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(decode_datetime(&Value::Nil), None);
    }

    /// Out-of-range fields on disk (corrupt or hostile files) are rejected, not
    /// turned into an arithmetic overflow panic.
    #[test]
    fn datetime_with_absurd_fields_is_none() {
        let dt = |fields: &[(&str, i64)]| {
            let map = fields
                .iter()
                .map(|(k, v)| (str_key(k), Value::from(*v)))
                .collect();
            Value::Ext(EXT_DATETIME, encode_value(&Value::Map(map)).unwrap())
        };
        let base = [
            ("day", 1),
            ("month", 1),
            ("year", 2020),
            ("hour", 0),
            ("minute", 0),
            ("second", 0),
            ("microsecond", 0),
        ];
        assert!(decode_datetime(&dt(&base)).is_some());
        for (i, bad) in [i64::MAX, i64::MIN, -1, 1_000_000_000_000]
            .into_iter()
            .enumerate()
        {
            for f in 0..base.len() {
                let mut fields = base;
                fields[f].1 = bad;
                assert_eq!(decode_datetime(&dt(&fields)), None, "{i} {f}");
            }
        }
        // A record with such a `joined_on` still decodes (without the time).
        let mut rec = vec![0x82];
        rec.extend_from_slice(b"\xa9joined_on");
        let mut year_max = base;
        year_max[2].1 = i64::MAX;
        rec.extend_from_slice(&encode_value(&dt(&year_max)).unwrap());
        rec.extend_from_slice(b"\xa9member_id\xc4\x02m1");
        let r = MemberRecord::decode(&rec).unwrap();
        assert_eq!(r.joined_on, None);
    }

    /// A record as Python tooz 9.1.0 writes it for
    /// `join_group(b'g1', capabilities={'weight': 5, 'when': datetime(...)})`
    /// with member id `'m1'` (str, so `encoded` is True).
    fn python_record() -> Vec<u8> {
        let dt = encode_value(
            &encode_datetime(UNIX_EPOCH + Duration::from_secs(1_600_000_000)).unwrap(),
        )
        .unwrap();
        let mut b = vec![0x84];
        b.extend_from_slice(b"\xaccapabilities\x82\xa6weight\x05\xa4when");
        b.extend_from_slice(&dt);
        b.extend_from_slice(b"\xa9joined_on");
        b.extend_from_slice(&dt);
        b.extend_from_slice(b"\xa9member_id\xc4\x02m1\xa7encoded\xc3");
        b
    }

    #[test]
    fn reads_python_records() {
        let rec = MemberRecord::decode(&python_record()).unwrap();
        assert_eq!(rec.member_id, MemberId::from("m1"));
        assert_eq!(rec.alive, None);
        assert_eq!(
            rec.joined_on,
            Some(UNIX_EPOCH + Duration::from_secs(1_600_000_000))
        );
        // The capabilities keep the ext value intact.
        let v = rec.capabilities.to_value().unwrap();
        let Value::Map(m) = v else { panic!() };
        assert_eq!(m.len(), 2);
        assert!(matches!(m[1].1, Value::Ext(1, _)));
        assert_eq!(rec.capabilities.weight(), 5);

        // No capabilities (None), str member id, no `encoded` (old format).
        let mut old = vec![0x83];
        old.extend_from_slice(b"\xaccapabilities\xc0\xa9joined_on");
        old.extend_from_slice(&encode_value(&encode_datetime(UNIX_EPOCH).unwrap()).unwrap());
        old.extend_from_slice(b"\xc4\x09member_id\xa2m2");
        let rec = MemberRecord::decode(&old).unwrap();
        assert_eq!(rec.member_id, MemberId::from("m2"));
        assert!(rec.capabilities.is_none());

        assert!(MemberRecord::decode(b"\x81\xa1a\x01").is_err());
        assert!(MemberRecord::decode(b"garbage").is_err());
    }

    #[test]
    fn record_round_trip_embeds_capabilities_as_value() {
        let caps = Capabilities::encode(&BTreeMap::from([("weight", 3)])).unwrap();
        let t = UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456);
        let rec = MemberRecord {
            member_id: MemberId::from(&b"m\xff"[..]),
            capabilities: caps.clone(),
            joined_on: Some(t),
            alive: Some(".tooz/alive/x".into()),
        };
        let bytes = rec.encode().unwrap();
        // Starts as Python's record: map of 5, capabilities embedded as a map.
        assert!(bytes.starts_with(b"\x85\xaccapabilities\x81\xa6weight\x03\xa9joined_on\xc7"));
        let back = MemberRecord::decode(&bytes).unwrap();
        assert_eq!(back, rec);
        // Without capabilities: nil.
        let none = MemberRecord {
            capabilities: Capabilities::none(),
            alive: None,
            ..rec
        };
        let bytes = none.encode().unwrap();
        assert!(bytes.starts_with(b"\x84\xaccapabilities\xc0"));
        assert!(MemberRecord::decode(&bytes).unwrap().capabilities.is_none());
    }

    #[test]
    fn leader_state_round_trip() {
        let s = LeaderState {
            group_id: "g".into(),
            leader: Some(("m".into(), ".tooz/alive/a".into())),
            token: 42,
        };
        assert_eq!(LeaderState::decode(&s.encode().unwrap()).unwrap(), s);
        let none = LeaderState { leader: None, ..s };
        assert_eq!(LeaderState::decode(&none.encode().unwrap()).unwrap(), none);
    }

    #[test]
    fn tokens_and_counters() {
        let t0 = UNIX_EPOCH + Duration::from_secs(10);
        assert_eq!(next_token(0, t0).unwrap(), 10_000_000);
        assert_eq!(next_token(10_000_000, t0).unwrap(), 10_000_001);
        assert_eq!(next_token(99_000_000, t0).unwrap(), 99_000_001);
        // The clock going back never makes tokens go back.
        assert_eq!(next_token(5, UNIX_EPOCH).unwrap(), 6);
        // An exhausted counter is an error, never a repeated token.
        assert_eq!(next_token(u64::MAX - 1, t0).unwrap(), u64::MAX);
        assert!(matches!(
            next_token(u64::MAX, t0),
            Err(ToozError::Backend { .. })
        ));
        // A lost counter restarts above the clock and above the file's mtime.
        let later = t0 + Duration::from_secs(50);
        assert_eq!(
            recovery_token(t0, None).unwrap(),
            10_000_000 + RECOVERY_MARGIN_US
        );
        assert_eq!(
            recovery_token(t0, Some(later)).unwrap(),
            60_000_000 + RECOVERY_MARGIN_US
        );
        assert!(
            recovery_token(UNIX_EPOCH + Duration::from_secs(u64::MAX / 1_000_000), None).is_err()
        );
        assert_eq!(parse_counter(b"").unwrap(), 0);
        assert_eq!(parse_counter(&format_counter(77)).unwrap(), 77);
        assert!(parse_counter(b"x").is_err());
        assert!(parse_counter(b"\xff").is_err(), "not text is damage, not 0");
    }
}
