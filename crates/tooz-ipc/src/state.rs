//! What Python's IPC driver has no place for (members, leaders, liveness) lives in
//! files under a per-user runtime directory, the one place this layout is written:
//!
//! ```text
//! ROOT/                               0700, owned by the user
//!   .lock                             OFD write lock serialising changes
//!   alive/<uuid>                      one per running coordinator, write-locked while it runs
//!   groups/<sha1(group)>/.id          the group id (raw bytes)
//!   groups/<sha1(group)>/<sha1(member)>
//!                                     msgpack {member, caps, alive, created, updated}
//!   leaders/<sha1(group)>             msgpack {member, alive, token}
//!   tmp/                              scratch files for atomic writes
//! ```
//!
//! Every path is built from a SHA-1 of an id or from a UUID this driver generated
//! (and parses back before use), never from an id itself.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, fcntl};
use rmpv::Value;
use sha1::{Digest, Sha1};
use tooz_core::{Capabilities, GroupId, MemberId};

/// The default state directory: `/dev/shm/tooz-ipc-<uid>` (memory-backed, the same
/// for every process of the user on the host, whatever its environment), else
/// `$XDG_RUNTIME_DIR/tooz-ipc` when `/dev/shm` is missing, else
/// `<temp dir>/tooz-ipc-<uid>`.
pub fn default_root() -> PathBuf {
    let uid = nix::unistd::getuid();
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        return shm.join(format!("tooz-ipc-{uid}"));
    }
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from)
        && dir.is_absolute()
        && dir.is_dir()
    {
        return dir.join("tooz-ipc");
    }
    std::env::temp_dir().join(format!("tooz-ipc-{uid}"))
}

fn sha1_hex(bytes: &[u8]) -> String {
    hex::encode(Sha1::digest(bytes))
}

fn whole_file(l_type: libc::c_int) -> libc::flock {
    libc::flock {
        // The constants fit in a c_short on every Linux target.
        l_type: l_type as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    }
}

/// Tries once to write-lock the whole file (an OFD lock). `Ok(false)`: held elsewhere.
fn try_write_lock(file: &File) -> io::Result<bool> {
    match fcntl(file, FcntlArg::F_OFD_SETLK(&whole_file(libc::F_WRLCK))) {
        Ok(_) => Ok(true),
        Err(Errno::EAGAIN | Errno::EACCES) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Whether another open file description write-locks the file (takes nothing).
fn is_write_locked(file: &File) -> io::Result<bool> {
    let mut fl = whole_file(libc::F_RDLCK);
    fcntl(file, FcntlArg::F_OFD_GETLK(&mut fl))?;
    Ok(i32::from(fl.l_type) != libc::F_UNLCK)
}

fn secs(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// A time stored as float seconds; `None` for junk (negative, NaN, or too far
/// out for a `Duration` or a `SystemTime`, which would panic).
fn from_secs(s: f64) -> Option<SystemTime> {
    UNIX_EPOCH.checked_add(Duration::try_from_secs_f64(s).ok()?)
}

/// A group directory's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DirState {
    /// No directory (or no `.id`): the group exists if Python's list has it.
    None,
    /// Created when Python's list was full: exists by its directory alone.
    RustOnly,
    /// Also in Python's list (`.python` marker), which decides: a group Python
    /// deleted (or whose list Python's `stop()` removed) is gone.
    Mirrored,
}

/// A member's record.
#[derive(Debug, Clone)]
pub(crate) struct MemberRecord {
    pub(crate) member: MemberId,
    pub(crate) caps: Capabilities,
    pub(crate) alive: String,
    pub(crate) created: Option<SystemTime>,
    pub(crate) updated: Option<SystemTime>,
}

/// A leader's record.
#[derive(Debug, Clone)]
pub(crate) struct LeaderRecord {
    pub(crate) member: MemberId,
    pub(crate) alive: String,
    pub(crate) token: u64,
}

fn encode(pairs: Vec<(&str, Value)>) -> io::Result<Vec<u8>> {
    let map = Value::Map(pairs.into_iter().map(|(k, v)| (k.into(), v)).collect());
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, &map).map_err(io::Error::other)?;
    Ok(out)
}

fn decode(bytes: &[u8]) -> io::Result<Vec<(String, Value)>> {
    match tooz_core::capabilities::read_msgpack(&mut &bytes[..]) {
        Ok(Value::Map(m)) => Ok(m
            .into_iter()
            .filter_map(|(k, v)| k.as_str().map(|k| (k.to_owned(), v)))
            .collect()),
        Ok(_) => Err(io::Error::other("a state record is not a map")),
        Err(e) => Err(io::Error::other(format!(
            "a state record does not decode: {e}"
        ))),
    }
}

fn field<'a>(m: &'a [(String, Value)], k: &str) -> Option<&'a Value> {
    m.iter().find(|(key, _)| key == k).map(|(_, v)| v)
}

fn bin(m: &[(String, Value)], k: &str) -> io::Result<Vec<u8>> {
    match field(m, k) {
        Some(Value::Binary(b)) => Ok(b.clone()),
        _ => Err(io::Error::other(format!("a state record lacks `{k}`"))),
    }
}

fn text(m: &[(String, Value)], k: &str) -> io::Result<String> {
    field(m, k)
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| io::Error::other(format!("a state record lacks `{k}`")))
}

impl MemberRecord {
    pub(crate) fn encode(&self) -> io::Result<Vec<u8>> {
        let t = |t: Option<SystemTime>| Value::F64(t.map_or(0.0, secs));
        encode(vec![
            ("member", Value::Binary(self.member.as_bytes().to_vec())),
            ("caps", Value::Binary(self.caps.as_msgpack().to_vec())),
            ("alive", Value::from(self.alive.as_str())),
            ("created", t(self.created)),
            ("updated", t(self.updated)),
        ])
    }

    pub(crate) fn decode(bytes: &[u8]) -> io::Result<Self> {
        let m = decode(bytes)?;
        let t = |k| field(&m, k).and_then(Value::as_f64).and_then(from_secs);
        Ok(MemberRecord {
            member: MemberId::from(bin(&m, "member")?),
            caps: Capabilities::from_msgpack(bin(&m, "caps")?),
            alive: text(&m, "alive")?,
            created: t("created"),
            updated: t("updated"),
        })
    }
}

impl LeaderRecord {
    pub(crate) fn encode(&self) -> io::Result<Vec<u8>> {
        encode(vec![
            ("member", Value::Binary(self.member.as_bytes().to_vec())),
            ("alive", Value::from(self.alive.as_str())),
            ("token", Value::from(self.token)),
        ])
    }

    pub(crate) fn decode(bytes: &[u8]) -> io::Result<Self> {
        let m = decode(bytes)?;
        Ok(LeaderRecord {
            member: MemberId::from(bin(&m, "member")?),
            alive: text(&m, "alive")?,
            token: field(&m, "token")
                .and_then(Value::as_u64)
                .ok_or_else(|| io::Error::other("a leader record lacks `token`"))?,
        })
    }
}

/// This coordinator's liveness: its `alive/<uuid>` file, write-locked while it runs.
#[derive(Debug)]
pub(crate) struct Alive {
    pub(crate) id: String,
    path: PathBuf,
    file: File,
}

impl Drop for Alive {
    fn drop(&mut self) {
        // Remove first, then close (which unlocks): readers see either a missing
        // file or a live lock, both right. The close event wakes watchers.
        let _ = fs::remove_file(&self.path);
        let _ = fcntl(
            &self.file,
            FcntlArg::F_OFD_SETLK(&whole_file(libc::F_UNLCK)),
        );
    }
}

/// Holds `.lock`; released on drop (closing the descriptor).
#[derive(Debug)]
pub(crate) struct Serial(#[allow(dead_code)] File);

/// The state directory.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    pub(crate) root: PathBuf,
}

impl Layout {
    pub(crate) fn new(root: PathBuf) -> Self {
        Layout { root }
    }

    pub(crate) fn alive_dir(&self) -> PathBuf {
        self.root.join("alive")
    }

    pub(crate) fn groups_dir(&self) -> PathBuf {
        self.root.join("groups")
    }

    pub(crate) fn leaders_dir(&self) -> PathBuf {
        self.root.join("leaders")
    }

    pub(crate) fn group_dir(&self, g: &GroupId) -> PathBuf {
        self.groups_dir().join(sha1_hex(g.as_bytes()))
    }

    pub(crate) fn member_file(&self, g: &GroupId, m: &MemberId) -> PathBuf {
        self.group_dir(g).join(sha1_hex(m.as_bytes()))
    }

    /// The leader file's name inside `leaders/`.
    pub(crate) fn leader_name(g: &GroupId) -> String {
        sha1_hex(g.as_bytes())
    }

    pub(crate) fn leader_file(&self, g: &GroupId) -> PathBuf {
        self.leaders_dir().join(Self::leader_name(g))
    }

    /// Creates the directories (mode 0700) and checks the root is ours.
    pub(crate) fn create(&self) -> io::Result<()> {
        let mut b = fs::DirBuilder::new();
        b.recursive(true).mode(0o700);
        b.create(&self.root)?;
        let meta = fs::symlink_metadata(&self.root)?;
        if !meta.is_dir() || meta.uid() != nix::unistd::getuid().as_raw() {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "{} is not a directory owned by this user",
                    self.root.display()
                ),
            ));
        }
        if meta.mode() & 0o077 != 0 {
            // Ours but open to others: close it (members' files are 0600 anyway).
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&self.root, fs::Permissions::from_mode(0o700))?;
        }
        for d in ["alive", "groups", "leaders", "tmp"] {
            b.create(self.root.join(d))?;
        }
        Ok(())
    }

    /// Takes the serialising lock, waiting at most `max_wait`.
    pub(crate) fn serial(&self, max_wait: Duration) -> io::Result<Serial> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(self.root.join(".lock"))?;
        let deadline = Instant::now() + max_wait;
        let mut pause = Duration::from_micros(50);
        loop {
            if try_write_lock(&file)? {
                return Ok(Serial(file));
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("waited {max_wait:?} for {}/.lock", self.root.display()),
                ));
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(5));
        }
    }

    /// Removes what crashed processes left: unlocked liveness files and scratch
    /// files older than a minute (younger ones may be a coordinator starting or a
    /// write in progress). Best effort.
    pub(crate) fn prune(&self) {
        let old = |p: &Path| {
            fs::metadata(p)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > Duration::from_secs(60))
        };
        for (dir, check_lock) in [(self.alive_dir(), true), (self.root.join("tmp"), false)] {
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                let p = e.path();
                if !old(&p) {
                    continue;
                }
                let dead = !check_lock
                    || File::open(&p)
                        .and_then(|f| is_write_locked(&f))
                        .is_ok_and(|locked| !locked);
                if dead {
                    let _ = fs::remove_file(&p);
                }
            }
        }
    }

    /// Removes the records of dead members of a group (their coordinator is gone).
    pub(crate) fn prune_members(&self, g: &GroupId) -> io::Result<()> {
        for r in self.member_records(g)? {
            if !self.is_alive(&r.alive)? {
                remove_opt(&self.member_file(g, &r.member))?;
            }
        }
        Ok(())
    }

    /// Creates and locks this coordinator's liveness file.
    pub(crate) fn make_alive(&self) -> io::Result<Alive> {
        let id = uuid::Uuid::new_v4().to_string();
        let path = self.alive_dir().join(&id);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        if !try_write_lock(&file)? {
            return Err(io::Error::other("a fresh liveness file is locked"));
        }
        Ok(Alive { id, path, file })
    }

    /// Whether the coordinator with liveness id `id` runs. An id that is not one
    /// of our UUIDs is not alive.
    pub(crate) fn is_alive(&self, id: &str) -> io::Result<bool> {
        let Ok(uuid) = uuid::Uuid::parse_str(id) else {
            return Ok(false);
        };
        match File::open(self.alive_dir().join(uuid.to_string())) {
            Ok(f) => is_write_locked(&f),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Writes `data` to `path` atomically (scratch file, then rename).
    pub(crate) fn write_atomic(&self, path: &Path, data: &[u8]) -> io::Result<()> {
        let tmp = self.root.join("tmp").join(uuid::Uuid::new_v4().to_string());
        let res = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(data)?;
            drop(f);
            fs::rename(&tmp, path)
        })();
        if res.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        res
    }

    /// How a group directory stands.
    pub(crate) fn dir_state(dir: &Path) -> io::Result<DirState> {
        if !dir.join(".id").is_file() {
            return Ok(DirState::None);
        }
        Ok(if dir.join(".python").exists() {
            DirState::Mirrored
        } else {
            DirState::RustOnly
        })
    }

    /// The group id of a directory whose group is not in Python's list.
    pub(crate) fn rust_only_group(dir: &Path) -> io::Result<Option<GroupId>> {
        if Self::dir_state(dir)? != DirState::RustOnly {
            return Ok(None);
        }
        read_opt(&dir.join(".id")).map(|o| o.map(GroupId::from))
    }

    /// Creates (or reuses) a group's directory; `mirrored` when the group is in
    /// Python's list (then the list decides whether it exists).
    pub(crate) fn make_group_dir(&self, g: &GroupId, mirrored: bool) -> io::Result<()> {
        let dir = self.group_dir(g);
        match fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        let marker = dir.join(".python");
        if mirrored {
            self.write_atomic(&marker, b"")?;
        } else {
            remove_opt(&marker)?;
        }
        self.write_atomic(&dir.join(".id"), g.as_bytes())
    }

    /// Member records of a group (undecodable ones skipped with a warning).
    pub(crate) fn member_records(&self, g: &GroupId) -> io::Result<Vec<MemberRecord>> {
        let mut out = Vec::new();
        let entries = match fs::read_dir(self.group_dir(g)) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            let is_record = name
                .to_str()
                .is_some_and(|n| n.len() == 40 && n.bytes().all(|b| b.is_ascii_hexdigit()));
            if !is_record {
                continue;
            }
            if let Some(bytes) = read_opt(&entry.path())? {
                match MemberRecord::decode(&bytes) {
                    Ok(r) => out.push(r),
                    Err(e) => tracing::warn!(path = %entry.path().display(), error = %e,
                        "skipping an unreadable member record"),
                }
            }
        }
        Ok(out)
    }

    pub(crate) fn member_record(
        &self,
        g: &GroupId,
        m: &MemberId,
    ) -> io::Result<Option<MemberRecord>> {
        let path = self.member_file(g, m);
        read_opt(&path)?
            .map(|b| MemberRecord::decode(&b).map_err(|e| naming(&path, e)))
            .transpose()
    }

    pub(crate) fn leader_record(&self, g: &GroupId) -> io::Result<Option<LeaderRecord>> {
        let path = self.leader_file(g);
        read_opt(&path)?
            .map(|b| LeaderRecord::decode(&b).map_err(|e| naming(&path, e)))
            .transpose()
    }
}

/// A decode error of the record in `path` (another process may have written
/// anything there), naming the file.
fn naming(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// Reads a file; `None` when it is missing.
pub(crate) fn read_opt(path: &Path) -> io::Result<Option<Vec<u8>>> {
    match fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Removes a file; a missing one is fine.
pub(crate) fn remove_opt(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod junk_tests {
    //! Records another process wrote: any bytes decode to a record or an error,
    //! never a panic, an overflow of the stack or an allocation of a claimed size.
    use super::*;
    use proptest::prelude::*;

    fn junk() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..96),
            (
                prop::sample::select(vec![0xc6u8, 0xdb, 0xdd, 0xdf]),
                any::<u32>()
            )
                .prop_map(|(m, n)| [vec![m], n.to_be_bytes().to_vec()].concat()),
            (1usize..5000).prop_map(|n| vec![0x91; n]),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn junk_records_decode_or_fail(bytes in junk()) {
            let _ = MemberRecord::decode(&bytes);
            let _ = LeaderRecord::decode(&bytes);
        }

        #[test]
        fn junk_times_are_absent(t in prop_oneof![
            any::<f64>(),
            Just(1e300),
            Just(f64::MAX),
            Just(1.8446744073709552e19),
            Just(f64::INFINITY),
            Just(f64::NAN),
            Just(-1.0),
        ]) {
            let bytes = encode(vec![
                ("member", Value::Binary(b"m".to_vec())),
                ("caps", Value::Binary(vec![0xc0])),
                ("alive", Value::from("a")),
                ("created", Value::F64(t)),
                ("updated", Value::F64(t)),
            ])
            .unwrap();
            let r = MemberRecord::decode(&bytes).unwrap();
            prop_assert_eq!(r.created, from_secs(t));
        }

        #[test]
        fn records_round_trip(
            member in prop::collection::vec(any::<u8>(), 1..32),
            caps in prop::collection::vec(any::<u8>(), 0..32),
            alive in "[a-z0-9/]{0,16}",
            secs in prop::option::of(0u32..4_000_000_000),
            token in any::<u64>(),
        ) {
            let at = secs.map(|s| std::time::UNIX_EPOCH + std::time::Duration::from_secs(s.into()));
            let r = MemberRecord {
                member: MemberId::from(member.clone()),
                caps: Capabilities::from_msgpack(caps),
                alive: alive.clone(),
                created: at,
                updated: at,
            };
            let back = MemberRecord::decode(&r.encode().unwrap()).unwrap();
            prop_assert_eq!(&back.member, &r.member);
            prop_assert_eq!(&back.caps, &r.caps);
            prop_assert_eq!(&back.alive, &r.alive);
            let l = LeaderRecord { member: MemberId::from(member), alive, token };
            let back = LeaderRecord::decode(&l.encode().unwrap()).unwrap();
            prop_assert_eq!(back.token, token);
            prop_assert_eq!(back.member, l.member);
        }
    }
}
