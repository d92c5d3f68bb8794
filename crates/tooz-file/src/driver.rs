//! The [`FileDriver`]: groups, membership, leadership and locks in a directory.

use std::collections::{BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use nix::sys::stat::{UtimensatFlags, utimensat};
use nix::sys::time::TimeSpec;
use tooz_core::{
    Capabilities, Characteristic, ConnectRequest, Driver, DriverEventStream, DriverInfo,
    DriverLock, FencingToken, GroupId, Held, LockName, MemberId, MemberInfo, Renewal, Result,
    ToozError,
};

use crate::config::{FileConfig, NAME};
use crate::layout::{self, Layout, LeaderState, MemberRecord};
use crate::lock::FileLock;
use crate::ofd::{self, Kind, io_err, is_missing, read_opt, write_atomic, write_atomic_synced};
use crate::watch::{GroupPaths, GroupWatch};

/// How long a group operation waits for `.driver_lock` before giving up with
/// `OperationTimedOut` (holders keep it for a few file operations only).
const DRIVER_LOCK_WAIT: Duration = Duration::from_secs(60);

/// A member file whose modification time is this far in the future still counts
/// as fresh (coarse file system timestamps).
const CLOCK_SLACK: Duration = Duration::from_secs(1);

const CHARACTERISTICS: &[Characteristic] = &[
    Characteristic::DistributedAcrossThreads,
    Characteristic::DistributedAcrossProcesses,
    Characteristic::NonTimeoutBased,
];

/// This coordinator's liveness file: OFD write-locked for as long as it runs.
#[derive(Debug)]
struct Alive {
    /// Path relative to the root, as stored in member records.
    rel: String,
    path: PathBuf,
    file: File,
}

/// One group's leader lock file as this coordinator has it open.
#[derive(Debug)]
struct LeaderSlot {
    file: File,
    /// `Some` while this coordinator holds the lock (leads).
    token: Option<u64>,
}

#[derive(Debug)]
struct Inner {
    config: FileConfig,
    layout: Layout,
    member: MemberId,
    alive: Mutex<Option<Alive>>,
    leaders: tokio::sync::Mutex<HashMap<GroupId, LeaderSlot>>,
}

/// A coordination backend in a directory shared by the processes of one host,
/// on-disk compatible with Python tooz's file driver. See the crate
/// documentation for the layout and semantics.
///
/// Most code connects through a [`tooz_core::Registry`] with [`crate::DRIVER`];
/// build one directly to wrap it in a [`tooz_core::Coordinator`] yourself:
///
/// ```no_run
/// use std::sync::Arc;
/// use tooz_core::{Coordinator, MemberId};
/// use tooz_file::{FileConfig, FileDriver};
///
/// let member = MemberId::from("worker-1");
/// let driver = FileDriver::new(FileConfig::new("/var/lib/app/tooz"), member.clone());
/// let coord = Coordinator::new(Arc::new(driver), member, "file:///var/lib/app/tooz");
/// ```
#[derive(Debug, Clone)]
pub struct FileDriver {
    inner: Arc<Inner>,
}

impl FileDriver {
    /// A driver for `member` over `config.directory` (nothing is touched before
    /// `start`).
    pub fn new(config: FileConfig, member: MemberId) -> Self {
        let layout = Layout::new(&config.directory);
        FileDriver {
            inner: Arc::new(Inner {
                config,
                layout,
                member,
                alive: Mutex::new(None),
                leaders: tokio::sync::Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The factory registered by [`crate::DRIVER`].
    pub(crate) fn connect(req: &ConnectRequest<'_>) -> Result<Arc<dyn Driver>> {
        let config = FileConfig::from_request(req)?;
        Ok(Arc::new(FileDriver::new(config, req.member_id.clone())))
    }

    /// The settings of this driver.
    pub fn config(&self) -> &FileConfig {
        &self.inner.config
    }

    /// Runs `f` on a blocking thread while holding `.driver_lock` (`Write`: the
    /// exclusive lock Python also takes; `Read`: a shared lock our readers take,
    /// which still excludes Python's writers).
    async fn locked<T, F>(&self, kind: Kind, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T> + Send + 'static,
    {
        let path = self.inner.layout.driver_lock();
        let held = ofd::lock_path_async(&path, kind, DRIVER_LOCK_WAIT).await?;
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || {
            let res = f(&inner);
            drop(held);
            res
        })
        .await
        .map_err(|e| ToozError::backend("file", "file driver task failed", e))?
    }

    /// Runs `f` on a blocking thread without the driver lock.
    async fn blocking<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| ToozError::backend("file", "file driver task failed", e))?
    }
}

/// A member record file as found on disk.
struct Found {
    /// `None` when the file is not a valid record.
    record: Option<MemberRecord>,
    mtime: SystemTime,
}

impl Inner {
    fn alive_guard(&self) -> MutexGuard<'_, Option<Alive>> {
        self.alive.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn alive_rel(&self) -> Result<String> {
        self.alive_guard()
            .as_ref()
            .map(|a| a.rel.clone())
            .ok_or(ToozError::NotStarted)
    }

    fn group_exists(&self, group: &GroupId) -> bool {
        self.layout.metadata(group).is_file()
    }

    fn require_group(&self, group: &GroupId) -> Result<()> {
        if self.group_exists(group) {
            Ok(())
        } else {
            Err(ToozError::GroupNotCreated(group.clone()))
        }
    }

    /// Reads a member record file; `None` when it does not exist.
    fn read_member(&self, path: &Path) -> Result<Option<Found>> {
        let mtime = match std::fs::metadata(path) {
            Ok(m) => m
                .modified()
                .map_err(|e| io_err("cannot read the modification time of", path, e))?,
            Err(e) if is_missing(&e) => return Ok(None),
            Err(e) => return Err(io_err("cannot stat", path, e)),
        };
        let Some(bytes) = read_opt(path)? else {
            return Ok(None);
        };
        let record = match MemberRecord::decode(&bytes) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::debug!(path = %path.display(), error = %e, "unreadable member record");
                None
            }
        };
        Ok(Some(Found { record, mtime }))
    }

    /// Whether a member record belongs to a live member:
    /// - ours (it names a liveness file): that file is write-locked, whatever the
    ///   modification time says;
    /// - Python's (or unreadable): modified within `timeout` of now, as Python decides.
    fn is_live(&self, found: &Found) -> Result<bool> {
        if let Some(rel) = found.record.as_ref().and_then(|r| r.alive.as_deref()) {
            let Some(path) = self.layout.resolve_alive(rel) else {
                return Ok(false);
            };
            return ofd::path_is_write_locked(&path)
                .map_err(|e| io_err("cannot probe liveness file", &path, e));
        }
        let now = SystemTime::now();
        Ok(match now.duration_since(found.mtime) {
            Ok(age) => age <= self.config.timeout,
            Err(ahead) => ahead.duration() <= CLOCK_SLACK,
        })
    }

    /// The live members of a group with their records.
    fn live_members(&self, group: &GroupId) -> Result<Vec<MemberRecord>> {
        self.require_group(group)?;
        let dir = self.layout.group_dir(group);
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if is_missing(&e) => return Err(ToozError::GroupNotCreated(group.clone())),
            Err(e) => return Err(io_err("cannot list", &dir, e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| io_err("cannot list", &dir, e))?;
            if !entry
                .file_name()
                .as_encoded_bytes()
                .ends_with(layout::MEMBER_SUFFIX.as_bytes())
                // Only regular files are member records (a directory named `x.raw`
                // must not make every membership read fail).
                || !entry.file_type().is_ok_and(|t| t.is_file())
            {
                continue;
            }
            let Some(found) = self.read_member(&entry.path())? else {
                continue;
            };
            if found.record.is_some() && self.is_live(&found)? {
                out.extend(found.record);
            }
        }
        Ok(out)
    }

    /// One live member's record. `GroupNotCreated`, `MemberNotJoined`.
    fn live_member(
        &self,
        group: &GroupId,
        member: &MemberId,
    ) -> Result<(MemberRecord, SystemTime)> {
        self.require_group(group)?;
        let path = self.layout.member_file(group, member);
        let not_joined = || ToozError::MemberNotJoined {
            group: group.clone(),
            member: member.clone(),
        };
        let found = self.read_member(&path)?.ok_or_else(not_joined)?;
        if !self.is_live(&found)? {
            return Err(not_joined());
        }
        let mtime = found.mtime;
        let record = found.record.ok_or_else(|| ToozError::Serialization {
            message: format!("member record {} is not valid msgpack", path.display()),
            source: None,
        })?;
        Ok((record, mtime))
    }

    fn write_member(&self, group: &GroupId, record: &MemberRecord) -> Result<()> {
        let path = self.layout.member_file(group, &record.member_id);
        write_atomic(&self.layout, &path, &record.encode()?)
    }

    // ----- liveness file ------------------------------------------------------

    /// Creates and locks a new liveness file. It is locked before it appears in
    /// `.tooz/alive/` (created in `tmp/`, then renamed), so an unlocked file there
    /// always belongs to a coordinator that stopped or died.
    fn create_alive(&self) -> Result<Alive> {
        let rel = Layout::new_alive_rel(&self.member);
        let path = self.layout.root().join(&rel);
        let tmp = self.layout.temp_file();
        let res = (|| -> io::Result<File> {
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&tmp)?;
            if !ofd::try_lock(&file, Kind::Write)? {
                return Err(io::Error::other(
                    "a fresh liveness file is locked by someone else",
                ));
            }
            writeln!(file, "pid {}\nmember {}", std::process::id(), self.member)?;
            std::fs::rename(&tmp, &path)?;
            Ok(file)
        })();
        match res {
            Ok(file) => Ok(Alive { rel, path, file }),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(io_err("cannot create liveness file", &path, e))
            }
        }
    }

    /// Removes liveness files of coordinators that stopped or died.
    fn collect_dead_alive_files(&self) {
        let dir = self.layout.alive_dir();
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return;
        };
        for entry in entries.flatten() {
            let p = entry.path();
            if let Ok(false) = ofd::path_is_write_locked(&p) {
                match std::fs::remove_file(&p) {
                    Ok(()) => tracing::debug!(path = %p.display(), "removed a dead liveness file"),
                    Err(e) if is_missing(&e) => {}
                    Err(e) => {
                        tracing::debug!(path = %p.display(), error = %e, "cannot remove a dead liveness file")
                    }
                }
            }
        }
    }

    /// Replaces the liveness file if it was removed from under us. Returns the old
    /// and new relative paths when it did.
    fn heal_alive(&self) -> Result<Option<(String, String)>> {
        let mut guard = self.alive_guard();
        let Some(a) = guard.as_ref() else {
            return Ok(None);
        };
        if ofd::same_file(&a.file, &a.path) {
            return Ok(None);
        }
        let old = a.rel.clone();
        let fresh = self.create_alive()?;
        let new = fresh.rel.clone();
        *guard = Some(fresh);
        tracing::warn!(old = %old, new = %new, "the liveness file was removed by someone; replaced it");
        Ok(Some((old, new)))
    }

    // ----- leadership -----------------------------------------------------------

    /// Reads a group's leader state; `None` when absent or unreadable.
    fn read_leader_state(&self, group: &GroupId) -> Option<LeaderState> {
        let path = self.layout.leader_state(group);
        match read_opt(&path) {
            Ok(Some(b)) => match LeaderState::decode(&b) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "unreadable leader state");
                    None
                }
            },
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read leader state");
                None
            }
        }
    }

    /// The token of a new leadership of `group`, from the state file (called with
    /// the leader lock held, so nobody else writes it meanwhile):
    /// - the stored token + 1, at least the clock in µs ([`layout::next_token`];
    ///   an error at `u64::MAX`);
    /// - no state file (a group never led, or the file was removed): from the
    ///   clock, as the lock counters and the Redis driver do;
    /// - a state file that does not decode: [`layout::recovery_token`], above
    ///   every token it can have recorded, with a warning;
    /// - a state file that cannot be read (permissions, I/O error): an error, and
    ///   no leadership; a token from the clock alone could go back or repeat.
    fn next_leader_token(&self, group: &GroupId) -> Result<u64> {
        let path = self.layout.leader_state(group);
        let now = SystemTime::now();
        let Some(bytes) = read_opt(&path)? else {
            return layout::next_token(0, now);
        };
        match LeaderState::decode(&bytes) {
            Ok(s) => layout::next_token(s.token, now),
            Err(e) => {
                let mtime = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
                let token = layout::recovery_token(now, mtime)?;
                tracing::warn!(
                    path = %path.display(),
                    error = %e,
                    restart = token,
                    "damaged leader state: restarting its token above every token it can have given"
                );
                Ok(token)
            }
        }
    }

    /// One campaign step on a blocking thread. Returns the slot to keep and the
    /// token when leading.
    fn campaign_step(
        &self,
        group: &GroupId,
        slot: Option<LeaderSlot>,
    ) -> Result<(Option<LeaderSlot>, Option<u64>)> {
        let path = self.layout.leader_lock(group);
        let file = match slot {
            Some(LeaderSlot {
                file,
                token: Some(t),
            }) => {
                if ofd::same_file(&file, &path) {
                    return Ok((
                        Some(LeaderSlot {
                            file,
                            token: Some(t),
                        }),
                        Some(t),
                    ));
                }
                tracing::warn!(group = %group, "the leader lock file was removed; campaigning again");
                drop(file);
                ofd::open_lock_file(&path).map_err(|e| io_err("cannot open", &path, e))?
            }
            Some(LeaderSlot { file, token: None }) => file,
            None => ofd::open_lock_file(&path).map_err(|e| io_err("cannot open", &path, e))?,
        };
        if !ofd::try_lock(&file, Kind::Write).map_err(|e| io_err("cannot lock", &path, e))? {
            // Keep the descriptor: closing it would wake every watcher of the group.
            return Ok((Some(LeaderSlot { file, token: None }), None));
        }
        if !ofd::same_file(&file, &path) {
            return Ok((None, None));
        }
        let token = self.next_leader_token(group)?;
        let state = LeaderState {
            group_id: group.clone(),
            leader: Some((self.member.clone(), self.alive_rel()?)),
            token,
        };
        write_atomic_synced(
            &self.layout,
            &self.layout.leader_state(group),
            &state.encode()?,
        )?;
        Ok((
            Some(LeaderSlot {
                file,
                token: Some(token),
            }),
            Some(token),
        ))
    }

    /// Gives up a held leadership: clears the leader in the state (keeping the
    /// token) and unlocks. Closing the descriptor wakes the other candidates.
    fn resign_slot(&self, group: &GroupId, slot: LeaderSlot) -> Result<bool> {
        let Some(token) = slot.token else {
            return Ok(false);
        };
        let state = LeaderState {
            group_id: group.clone(),
            leader: None,
            token,
        };
        let res = write_atomic_synced(
            &self.layout,
            &self.layout.leader_state(group),
            &state.encode()?,
        );
        let unlocked = ofd::unlock(&slot.file)
            .map_err(|e| io_err("cannot unlock", &self.layout.leader_lock(group), e));
        drop(slot);
        res.and(unlocked).map(|()| true)
    }
}

#[tooz_core::async_trait]
impl Driver for FileDriver {
    fn info(&self) -> DriverInfo {
        DriverInfo::new(NAME, CHARACTERISTICS, true).with_holds_independent_of_lease()
    }

    /// Creates the layout, removes liveness files of dead coordinators and takes
    /// this coordinator's liveness file.
    #[tracing::instrument(level = "debug", skip_all, fields(dir = %self.inner.layout.root().display()))]
    async fn start(&self) -> Result<()> {
        self.blocking(|i| {
            for d in i.layout.dirs() {
                std::fs::create_dir_all(&d).map_err(|e| {
                    ToozError::connection(
                        "file",
                        format!("cannot create directory {}", d.display()),
                        e,
                    )
                })?;
            }
            i.collect_dead_alive_files();
            let alive = i.create_alive()?;
            *i.alive_guard() = Some(alive);
            Ok(())
        })
        .await
    }

    /// Gives up leaderships still held, then unlocks and removes the liveness
    /// file. Member records left behind (if leaving failed) are dead from then on
    /// and never block a restart.
    #[tracing::instrument(level = "debug", skip_all)]
    async fn stop(&self) -> Result<()> {
        let slots: Vec<(GroupId, LeaderSlot)> = self.inner.leaders.lock().await.drain().collect();
        self.blocking(move |i| {
            for (g, slot) in slots {
                if let Err(e) = i.resign_slot(&g, slot) {
                    tracing::warn!(group = %g, error = %e, "resigning on stop failed");
                }
            }
            if let Some(a) = i.alive_guard().take() {
                let _ = ofd::unlock(&a.file);
                drop(a.file);
                match std::fs::remove_file(&a.path) {
                    Ok(()) => {}
                    Err(e) if is_missing(&e) => {}
                    Err(e) => tracing::debug!(error = %e, "cannot remove the liveness file"),
                }
            }
            Ok(())
        })
        .await
    }

    /// Touches this member's record in every joined group (so Python readers see
    /// it alive) and returns `timeout`, with the groups whose record the touch
    /// found deleted (the coordinator re-joins them).
    #[tracing::instrument(level = "debug", skip_all)]
    async fn heartbeat(&self, held: &Held<'_>) -> Result<Renewal> {
        let healed = self.blocking(Inner::heal_alive).await?;
        let groups = held.joined.to_vec();
        if let Some((old, new)) = healed {
            let groups = groups.clone();
            let new_alive = new.clone();
            self.locked(Kind::Write, move |i| {
                for g in &groups {
                    let path = i.layout.member_file(g, &i.member);
                    if let Some(Found {
                        record: Some(mut r),
                        ..
                    }) = i.read_member(&path)?
                        && r.alive.as_deref() == Some(old.as_str())
                    {
                        r.alive = Some(new.clone());
                        i.write_member(g, &r)?;
                    }
                }
                Ok(())
            })
            .await?;
            // Leaderships held name the liveness file too.
            let slots = self.inner.leaders.lock().await;
            let held: Vec<(GroupId, u64)> = slots
                .iter()
                .filter_map(|(g, s)| s.token.map(|t| (g.clone(), t)))
                .collect();
            self.blocking(move |i| {
                for (g, token) in held {
                    let state = LeaderState {
                        group_id: g.clone(),
                        leader: Some((i.member.clone(), new_alive.clone())),
                        token,
                    };
                    write_atomic_synced(&i.layout, &i.layout.leader_state(&g), &state.encode()?)?;
                }
                Ok(())
            })
            .await?;
            drop(slots);
        }
        let lost = self
            .locked(Kind::Read, move |i| {
                let mut lost = Vec::new();
                for g in groups {
                    let path = i.layout.member_file(&g, &i.member);
                    match utimensat(
                        nix::fcntl::AT_FDCWD,
                        &path,
                        &TimeSpec::UTIME_NOW,
                        &TimeSpec::UTIME_NOW,
                        UtimensatFlags::FollowSymlink,
                    ) {
                        Ok(()) => {}
                        // The record (or the group's directory) was deleted while
                        // this member lives: the coordinator re-joins.
                        Err(nix::errno::Errno::ENOENT | nix::errno::Errno::ENOTDIR) => {
                            tracing::info!(group = %g, "file: this member's record is gone while it lives");
                            lost.push(g);
                        }
                        Err(e) => return Err(io_err("cannot touch", &path, io::Error::from(e))),
                    }
                }
                Ok(lost)
            })
            .await?;
        // Locks and leaderships are open-file-description locks: nothing to renew.
        let mut renewal = Renewal::new(self.inner.config.timeout);
        for g in lost {
            renewal.lose_group(g);
        }
        Ok(renewal)
    }

    #[tracing::instrument(level = "debug", skip_all, fields(group = %group))]
    async fn create_group(&self, group: &GroupId) -> Result<()> {
        let g = group.clone();
        self.locked(Kind::Write, move |i| {
            if i.group_exists(&g) {
                return Err(ToozError::GroupAlreadyExist(g));
            }
            let dir = i.layout.group_dir(&g);
            std::fs::create_dir_all(&dir).map_err(|e| io_err("cannot create", &dir, e))?;
            write_atomic(
                &i.layout,
                &i.layout.metadata(&g),
                &layout::encode_metadata(&g)?,
            )
        })
        .await
    }

    /// Refuses while a live member remains; records of dead members (crashed Rust
    /// coordinators, expired Python members) are removed with the group.
    #[tracing::instrument(level = "debug", skip_all, fields(group = %group))]
    async fn delete_group(&self, group: &GroupId) -> Result<()> {
        let g = group.clone();
        self.locked(Kind::Write, move |i| {
            let dir = i.layout.group_dir(&g);
            let names: Vec<std::ffi::OsString> = match std::fs::read_dir(&dir) {
                Ok(rd) => rd
                    .map(|e| e.map(|e| e.file_name()))
                    .collect::<io::Result<_>>()
                    .map_err(|e| io_err("cannot list", &dir, e))?,
                Err(e) if is_missing(&e) => return Err(ToozError::GroupNotCreated(g)),
                Err(e) => return Err(io_err("cannot list", &dir, e)),
            };
            let has_meta = names.iter().any(|n| n == layout::METADATA);
            if !has_meta && names.is_empty() {
                let _ = std::fs::remove_dir(&dir);
                return Err(ToozError::GroupNotCreated(g));
            }
            let mut dead = Vec::new();
            let mut unexpected = Vec::new();
            for n in &names {
                if n == layout::METADATA {
                    continue;
                }
                if !n.as_encoded_bytes().ends_with(layout::MEMBER_SUFFIX.as_bytes()) {
                    unexpected.push(n.to_string_lossy().into_owned());
                    continue;
                }
                let path = dir.join(n);
                let Some(found) = i.read_member(&path)? else {
                    continue;
                };
                if i.is_live(&found)? {
                    return Err(ToozError::GroupNotEmpty(g));
                }
                dead.push(path);
            }
            if !has_meta || !unexpected.is_empty() {
                return Err(ToozError::backend_msg("file", format!(
                    "unexpected path(s) {unexpected:?} in group directory {} (expected only .metadata and member records{})",
                    dir.display(),
                    if has_meta { "" } else { "; .metadata is missing" }
                )));
            }
            for p in dead {
                tracing::debug!(path = %p.display(), "removing a dead member record with its group");
                match std::fs::remove_file(&p) {
                    Ok(()) => {}
                    Err(e) if is_missing(&e) => {}
                    Err(e) => return Err(io_err("cannot remove", &p, e)),
                }
            }
            let meta = dir.join(layout::METADATA);
            std::fs::remove_file(&meta).map_err(|e| io_err("cannot remove", &meta, e))?;
            std::fs::remove_dir(&dir).map_err(|e| io_err("cannot remove", &dir, e))
        })
        .await
    }

    #[tracing::instrument(level = "debug", skip_all)]
    async fn get_groups(&self) -> Result<Vec<GroupId>> {
        self.blocking(|i| {
            let dir = i.layout.groups_dir();
            let entries = match std::fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if is_missing(&e) => return Ok(Vec::new()),
                Err(e) => return Err(io_err("cannot list", &dir, e)),
            };
            let mut out = Vec::new();
            for entry in entries {
                let entry = entry.map_err(|e| io_err("cannot list", &dir, e))?;
                let meta = entry.path().join(layout::METADATA);
                let Some(bytes) = read_opt(&meta)? else {
                    continue;
                };
                match layout::decode_metadata(&bytes) {
                    Ok(g) => out.push(g),
                    Err(e) => {
                        tracing::warn!(path = %meta.display(), error = %e, "skipping unreadable group metadata")
                    }
                }
            }
            Ok(out)
        })
        .await
    }

    /// A record of a dead member (crashed Rust coordinator, expired Python
    /// member) does not block the join: it is replaced.
    #[tracing::instrument(level = "debug", skip_all, fields(group = %group))]
    async fn join_group(&self, group: &GroupId, capabilities: &Capabilities) -> Result<()> {
        let g = group.clone();
        let caps = capabilities.clone();
        self.locked(Kind::Write, move |i| {
            i.require_group(&g)?;
            let alive = i.alive_rel()?;
            let path = i.layout.member_file(&g, &i.member);
            if let Some(found) = i.read_member(&path)? {
                if i.is_live(&found)? {
                    return Err(ToozError::MemberAlreadyExist {
                        group: g,
                        member: i.member.clone(),
                    });
                }
                tracing::debug!(path = %path.display(), "replacing the record of a dead member");
            }
            i.write_member(
                &g,
                &MemberRecord {
                    member_id: i.member.clone(),
                    capabilities: caps,
                    joined_on: Some(SystemTime::now()),
                    alive: Some(alive),
                },
            )
        })
        .await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(group = %group))]
    async fn leave_group(&self, group: &GroupId) -> Result<()> {
        let g = group.clone();
        self.locked(Kind::Write, move |i| {
            i.require_group(&g)?;
            let path = i.layout.member_file(&g, &i.member);
            match std::fs::remove_file(&path) {
                Ok(()) => Ok(()),
                Err(e) if is_missing(&e) => Err(ToozError::MemberNotJoined {
                    group: g,
                    member: i.member.clone(),
                }),
                Err(e) => Err(io_err("cannot remove", &path, e)),
            }
        })
        .await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(group = %group))]
    async fn get_members(&self, group: &GroupId) -> Result<BTreeSet<MemberId>> {
        let g = group.clone();
        self.locked(Kind::Read, move |i| {
            Ok(i.live_members(&g)?
                .into_iter()
                .map(|r| r.member_id)
                .collect())
        })
        .await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(group = %group, member = %member))]
    async fn get_member_capabilities(
        &self,
        group: &GroupId,
        member: &MemberId,
    ) -> Result<Capabilities> {
        let (g, m) = (group.clone(), member.clone());
        self.locked(Kind::Read, move |i| {
            Ok(i.live_member(&g, &m)?.0.capabilities)
        })
        .await
    }

    #[tracing::instrument(level = "debug", skip_all, fields(group = %group))]
    async fn get_members_with_capabilities(
        &self,
        group: &GroupId,
    ) -> Result<Vec<(MemberId, Capabilities)>> {
        let g = group.clone();
        self.locked(Kind::Read, move |i| {
            Ok(i.live_members(&g)?
                .into_iter()
                .map(|r| (r.member_id, r.capabilities))
                .collect())
        })
        .await
    }

    /// `created_at` is the record's `joined_on`, `updated_at` its modification
    /// time (last join, capability update or heartbeat).
    #[tracing::instrument(level = "debug", skip_all, fields(group = %group, member = %member))]
    async fn get_member_info(&self, group: &GroupId, member: &MemberId) -> Result<MemberInfo> {
        let (g, m) = (group.clone(), member.clone());
        self.locked(Kind::Read, move |i| {
            let (r, mtime) = i.live_member(&g, &m)?;
            // File times come from a coarse clock and may trail `joined_on` by a
            // few milliseconds; a record is never updated before it was created.
            let updated = r.joined_on.map_or(mtime, |j| j.max(mtime));
            Ok(MemberInfo::new(r.capabilities, r.joined_on, Some(updated)))
        })
        .await
    }

    /// Rewrites this member's record atomically, keeping `joined_on`.
    #[tracing::instrument(level = "debug", skip_all, fields(group = %group))]
    async fn update_capabilities(
        &self,
        group: &GroupId,
        capabilities: &Capabilities,
    ) -> Result<()> {
        let g = group.clone();
        let caps = capabilities.clone();
        self.locked(Kind::Write, move |i| {
            let alive = i.alive_rel()?;
            let mut r = match i.live_member(&g, &i.member) {
                Ok((r, _)) => r,
                // Our own record, damaged by another process (junk, a torn
                // write): rewrite it whole (its join time is lost) rather than
                // fail every update while listings skip us.
                Err(ToozError::Serialization { message, .. }) => {
                    tracing::warn!(group = %g, %message, "rewriting a damaged member record");
                    MemberRecord {
                        member_id: i.member.clone(),
                        capabilities: caps.clone(),
                        joined_on: None,
                        alive: None,
                    }
                }
                Err(e) => return Err(e),
            };
            r.capabilities = caps;
            r.member_id = i.member.clone();
            r.alive = Some(alive);
            i.write_member(&g, &r)
        })
        .await
    }

    /// Leadership is an OFD write lock on `.tooz/leaders/<sha1(group)>.lock`, held
    /// until `resign`, `stop` or the process's death; the state file beside it
    /// names the leader and keeps the token counter.
    #[tracing::instrument(level = "debug", skip_all, fields(group = %group))]
    async fn campaign(&self, group: &GroupId) -> Result<Option<FencingToken>> {
        let mut slots = self.inner.leaders.lock().await;
        let slot = slots.remove(group);
        let g = group.clone();
        let (slot, token) = self.blocking(move |i| i.campaign_step(&g, slot)).await?;
        if let Some(s) = slot {
            slots.insert(group.clone(), s);
        }
        Ok(token.map(FencingToken))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(group = %group))]
    async fn resign(&self, group: &GroupId) -> Result<bool> {
        let mut slots = self.inner.leaders.lock().await;
        let Some(slot) = slots.remove(group) else {
            return Ok(false);
        };
        let g = group.clone();
        self.blocking(move |i| i.resign_slot(&g, slot)).await
    }

    /// The member named in the state file, if the leader lock is held and that
    /// member's coordinator is alive.
    #[tracing::instrument(level = "debug", skip_all, fields(group = %group))]
    async fn get_leader(&self, group: &GroupId) -> Result<Option<MemberId>> {
        let g = group.clone();
        self.blocking(move |i| {
            let lock = i.layout.leader_lock(&g);
            if !ofd::path_is_write_locked(&lock).map_err(|e| io_err("cannot probe", &lock, e))? {
                return Ok(None);
            }
            let Some(LeaderState {
                leader: Some((member, alive)),
                ..
            }) = i.read_leader_state(&g)
            else {
                return Ok(None);
            };
            let Some(alive_path) = i.layout.resolve_alive(&alive) else {
                return Ok(None);
            };
            let live = ofd::path_is_write_locked(&alive_path)
                .map_err(|e| io_err("cannot probe", &alive_path, e))?;
            Ok(live.then_some(member))
        })
        .await
    }

    fn lock(&self, name: &LockName) -> Result<Arc<dyn DriverLock>> {
        Ok(Arc::new(FileLock::new(&self.inner.layout, name)?))
    }

    /// inotify on the group directory, on `.tooz/alive/` (a crashed coordinator's
    /// descriptor closing) and on the group's leader files, plus a tick every
    /// `timeout / 2` for Python members expiring by modification time.
    #[tracing::instrument(level = "debug", skip_all, fields(group = %group))]
    async fn watch_group(&self, group: &GroupId) -> Result<Option<DriverEventStream>> {
        let g = group.clone();
        let paths = self
            .blocking(move |i| {
                i.require_group(&g)?;
                let (lock, state) = Layout::leader_names(&g);
                Ok(GroupPaths {
                    group_dir: i.layout.group_dir(&g),
                    alive_dir: i.layout.alive_dir(),
                    leaders_dir: i.layout.leaders_dir(),
                    leader_lock: lock.into(),
                    leader_state: state.into(),
                })
            })
            .await?;
        let tick = self.inner.config.timeout / 2;
        Ok(GroupWatch::new(paths, tick).map(|w| Box::pin(w) as DriverEventStream))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_root() -> PathBuf {
        std::env::temp_dir().join(format!("tooz-file-drv-{}", uuid::Uuid::new_v4()))
    }

    fn driver(root: &Path, member: &str) -> FileDriver {
        FileDriver::new(
            FileConfig::new(root).with_timeout(Duration::from_secs(2)),
            member.into(),
        )
    }

    #[tokio::test]
    async fn layout_on_disk_matches_python() {
        let root = temp_root();
        let d = driver(&root, "m1");
        d.start().await.unwrap();
        let g = GroupId::from("g1");
        d.create_group(&g).await.unwrap();
        d.join_group(&g, &Capabilities::encode(&[("weight", 5)]).unwrap())
            .await
            .unwrap();
        for p in [".driver_lock", "tmp", "groups", ".tooz/alive"] {
            assert!(root.join(p).exists(), "{p}");
        }
        let rec = root.join(
            "groups/a46e558d11cb2400bab09c1ca969e615142ef3d6/ae23b94ccaf714337e4ce5ba99ef3dc257e300df.raw",
        );
        let r = MemberRecord::decode(&std::fs::read(&rec).unwrap()).unwrap();
        assert_eq!(r.member_id, MemberId::from("m1"));
        let alive = r.alive.clone().unwrap();
        assert!(root.join(&alive).is_file());
        // Only Python's entries inside the group directory.
        let mut names: Vec<_> = std::fs::read_dir(rec.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [".metadata", "ae23b94ccaf714337e4ce5ba99ef3dc257e300df.raw"]
        );
        d.stop().await.unwrap();
        assert!(
            !root.join(&alive).exists(),
            "stop removes the liveness file"
        );
        std::fs::remove_dir_all(root).unwrap();
    }

    /// Writes a record as a Python member would (no liveness key).
    fn write_python_member(root: &Path, g: &GroupId, m: &str, age: Duration) {
        let l = Layout::new(root);
        let rec = MemberRecord {
            member_id: m.into(),
            capabilities: Capabilities::none(),
            joined_on: Some(SystemTime::now()),
            alive: None,
        };
        let path = l.member_file(g, &m.into());
        std::fs::write(&path, rec.encode().unwrap()).unwrap();
        let f = File::options().write(true).open(&path).unwrap();
        f.set_modified(SystemTime::now() - age).unwrap();
    }

    #[tokio::test]
    async fn crashed_and_expired_members() {
        let root = temp_root();
        let a = driver(&root, "a");
        let b = driver(&root, "b");
        a.start().await.unwrap();
        b.start().await.unwrap();
        let g = GroupId::from("grp");
        a.create_group(&g).await.unwrap();
        a.join_group(&g, &Capabilities::none()).await.unwrap();
        b.join_group(&g, &Capabilities::none()).await.unwrap();
        write_python_member(&root, &g, "py-fresh", Duration::ZERO);
        write_python_member(&root, &g, "py-old", Duration::from_secs(60));
        let members = a.get_members(&g).await.unwrap();
        let names: Vec<String> = members.iter().map(ToString::to_string).collect();
        assert_eq!(names, ["a", "b", "py-fresh"]);
        assert!(matches!(
            a.get_member_capabilities(&g, &"py-old".into()).await,
            Err(ToozError::MemberNotJoined { .. })
        ));

        // Simulate b crashing: its liveness descriptor closes, nothing else runs.
        let b_alive = b.inner.alive_guard().take().unwrap();
        drop(b_alive.file);
        let members = a.get_members(&g).await.unwrap();
        assert!(!members.contains(&MemberId::from("b")));
        // Even with a fresh mtime (Python would still see it for `timeout`).
        assert!(matches!(
            a.get_member_info(&g, &"b".into()).await,
            Err(ToozError::MemberNotJoined { .. })
        ));

        // A restarted b re-joins over its stale record.
        let b2 = driver(&root, "b");
        b2.start().await.unwrap();
        assert!(!b_alive.path.exists(), "start collects dead liveness files");
        b2.join_group(&g, &Capabilities::none()).await.unwrap();
        assert!(
            a.get_members(&g)
                .await
                .unwrap()
                .contains(&MemberId::from("b"))
        );
        // Same member id, other live coordinator: refused.
        let b3 = driver(&root, "b");
        b3.start().await.unwrap();
        assert!(matches!(
            b3.join_group(&g, &Capabilities::none()).await,
            Err(ToozError::MemberAlreadyExist { .. })
        ));
        // A stale Python record does not block a join either.
        let old = driver(&root, "py-old");
        old.start().await.unwrap();
        old.join_group(&g, &Capabilities::none()).await.unwrap();

        // delete_group: refused while live members remain; dead records go with it.
        assert!(matches!(
            a.delete_group(&g).await,
            Err(ToozError::GroupNotEmpty(_))
        ));
        for d in [&a, &b2, &old] {
            d.leave_group(&g).await.unwrap();
        }
        assert!(
            matches!(a.delete_group(&g).await, Err(ToozError::GroupNotEmpty(_))),
            "py-fresh is live"
        );
        write_python_member(&root, &g, "py-fresh", Duration::from_secs(60));
        a.delete_group(&g).await.unwrap();
        assert!(!Layout::new(&root).group_dir(&g).exists());
        for d in [a, b2, b3, old] {
            d.stop().await.unwrap();
        }
        std::fs::remove_dir_all(root).unwrap();
    }

    #[tokio::test]
    async fn group_directory_oddities() {
        let root = temp_root();
        let d = driver(&root, "m");
        d.start().await.unwrap();
        let g = GroupId::from("g");
        let dir = Layout::new(&root).group_dir(&g);
        // An empty directory without metadata is no group.
        std::fs::create_dir_all(&dir).unwrap();
        assert!(matches!(
            d.get_members(&g).await,
            Err(ToozError::GroupNotCreated(_))
        ));
        assert!(matches!(
            d.delete_group(&g).await,
            Err(ToozError::GroupNotCreated(_))
        ));
        // Junk and no metadata: an error naming the path, like Python's ToozError.
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("junk"), b"x").unwrap();
        let e = d.delete_group(&g).await.unwrap_err();
        assert!(
            matches!(e, ToozError::Backend { .. }) && e.to_string().contains("junk"),
            "{e}"
        );
        std::fs::remove_file(dir.join("junk")).unwrap();
        d.create_group(&g).await.unwrap();
        assert!(matches!(
            d.create_group(&g).await,
            Err(ToozError::GroupAlreadyExist(_))
        ));
        // A lock file where a group directory would be is skipped by get_groups.
        std::fs::write(root.join("groups/not-a-dir"), b"").unwrap();
        assert_eq!(d.get_groups().await.unwrap(), std::slice::from_ref(&g));
        d.delete_group(&g).await.unwrap();
        assert!(d.get_groups().await.unwrap().is_empty());
        d.stop().await.unwrap();
        std::fs::remove_dir_all(root).unwrap();
    }

    #[tokio::test]
    async fn leadership_follows_the_lock() {
        let root = temp_root();
        let a = driver(&root, "a");
        let b = driver(&root, "b");
        a.start().await.unwrap();
        b.start().await.unwrap();
        let g = GroupId::from("lead");
        assert_eq!(a.get_leader(&g).await.unwrap(), None);
        let t1 = a.campaign(&g).await.unwrap().unwrap();
        assert_eq!(
            a.campaign(&g).await.unwrap(),
            Some(t1),
            "still leading, same token"
        );
        assert_eq!(b.campaign(&g).await.unwrap(), None);
        assert_eq!(b.get_leader(&g).await.unwrap(), Some("a".into()));
        assert!(!b.resign(&g).await.unwrap());
        assert!(a.resign(&g).await.unwrap());
        assert_eq!(b.get_leader(&g).await.unwrap(), None);
        let t2 = b.campaign(&g).await.unwrap().unwrap();
        assert!(t2 > t1);
        // The leader dies: leadership is free at once.
        b.inner.leaders.lock().await.clear();
        assert_eq!(a.get_leader(&g).await.unwrap(), None);
        let t3 = a.campaign(&g).await.unwrap().unwrap();
        assert!(t3 > t2);
        a.stop().await.unwrap();
        assert_eq!(b.get_leader(&g).await.unwrap(), None);
        b.stop().await.unwrap();
        std::fs::remove_dir_all(root).unwrap();
    }

    /// The leadership token never comes from the clock alone when the state file
    /// is damaged or unreadable, and never repeats.
    #[tokio::test]
    async fn leadership_tokens_survive_damaged_state() {
        let root = temp_root();
        let a = driver(&root, "a");
        a.start().await.unwrap();
        let g = GroupId::from("fence");
        let state = Layout::new(&root).leader_state(&g);
        let now_us = || {
            u64::try_from(
                SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_micros(),
            )
            .unwrap()
        };
        // Missing state (never led): from the clock.
        let t0 = now_us();
        let t1 = a.campaign(&g).await.unwrap().unwrap().0;
        assert!(t1 >= t0 && t1 < t0 + 60_000_000, "{t1} vs {t0}");
        assert!(a.resign(&g).await.unwrap());
        // Missing state (removed): still above the previous token.
        std::fs::remove_file(&state).unwrap();
        let t2 = a.campaign(&g).await.unwrap().unwrap().0;
        assert!(t2 > t1);
        assert!(a.resign(&g).await.unwrap());
        // Junk state: restarts above clock + margin, and counts on from there.
        std::fs::write(&state, b"\xc1 not msgpack").unwrap();
        let t3 = a.campaign(&g).await.unwrap().unwrap().0;
        assert!(t3 >= t2 + layout::RECOVERY_MARGIN_US, "{t3} vs {t2}");
        assert!(a.resign(&g).await.unwrap());
        let t4 = a.campaign(&g).await.unwrap().unwrap().0;
        assert_eq!(t4, t3 + 1);
        assert!(a.resign(&g).await.unwrap());
        // A token of the wrong type is damage too, not token 0.
        let bad = rmpv::Value::Map(vec![(
            rmpv::Value::from("token"),
            rmpv::Value::from("soon"),
        )]);
        let mut buf = Vec::new();
        rmpv::encode::write_value(&mut buf, &bad).unwrap();
        std::fs::write(&state, &buf).unwrap();
        let t5 = a.campaign(&g).await.unwrap().unwrap().0;
        assert!(t5 >= now_us() - 60_000_000 + layout::RECOVERY_MARGIN_US);
        assert!(a.resign(&g).await.unwrap());
        // An unreadable state file (here a directory): an error, no leadership.
        std::fs::remove_file(&state).unwrap();
        std::fs::create_dir(&state).unwrap();
        assert!(a.campaign(&g).await.is_err());
        assert!(a.inner.leaders.lock().await.get(&g).is_none());
        std::fs::remove_dir(&state).unwrap();
        // u64::MAX: an error, never the same token twice; the lock is let go.
        let full = LeaderState {
            group_id: g.clone(),
            leader: None,
            token: u64::MAX,
        };
        std::fs::write(&state, full.encode().unwrap()).unwrap();
        let e = a.campaign(&g).await.unwrap_err();
        assert!(e.to_string().contains("exhausted"), "{e}");
        let b = driver(&root, "b");
        b.start().await.unwrap();
        assert!(
            b.campaign(&g).await.is_err(),
            "the leader lock is free again"
        );
        b.stop().await.unwrap();
        a.stop().await.unwrap();
        std::fs::remove_dir_all(root).unwrap();
    }

    #[tokio::test]
    async fn heartbeat_reports_a_deleted_record_as_a_lost_group() {
        let root = temp_root();
        let d = driver(&root, "m");
        d.start().await.unwrap();
        let (g, h) = (GroupId::from("g"), GroupId::from("h"));
        for x in [&g, &h] {
            d.create_group(x).await.unwrap();
            d.join_group(x, &Capabilities::none()).await.unwrap();
        }
        std::fs::remove_file(Layout::new(&root).member_file(&g, &"m".into())).unwrap();
        let joined = [g.clone(), h.clone()];
        let r = d.heartbeat(&Held::new(&joined, &[], &[])).await.unwrap();
        assert_eq!(r.lost_groups, vec![g.clone()]);
        // Re-joined (as the coordinator does), nothing is lost any more.
        d.join_group(&g, &Capabilities::none()).await.unwrap();
        let r = d.heartbeat(&Held::new(&joined, &[], &[])).await.unwrap();
        assert!(r.lost_groups.is_empty(), "{r:?}");
    }

    #[tokio::test]
    async fn heartbeat_touches_and_heals() {
        let root = temp_root();
        let d = driver(&root, "m");
        d.start().await.unwrap();
        let g = GroupId::from("g");
        d.create_group(&g).await.unwrap();
        d.join_group(&g, &Capabilities::none()).await.unwrap();
        let path = Layout::new(&root).member_file(&g, &"m".into());
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(SystemTime::now() - Duration::from_secs(100))
            .unwrap();
        let token = d.campaign(&g).await.unwrap();
        // Someone removes our liveness file: the heartbeat replaces it.
        let old = d.inner.alive_rel().unwrap();
        std::fs::remove_file(root.join(&old)).unwrap();
        assert!(d.get_members(&g).await.unwrap().is_empty());
        assert_eq!(d.get_leader(&g).await.unwrap(), None);
        assert_eq!(
            d.heartbeat(&Held::new(std::slice::from_ref(&g), &[], &[]))
                .await
                .unwrap(),
            Renewal::new(Duration::from_secs(2))
        );
        let age = SystemTime::now()
            .duration_since(std::fs::metadata(&path).unwrap().modified().unwrap())
            .unwrap_or_default();
        assert!(age < Duration::from_secs(5));
        assert_ne!(d.inner.alive_rel().unwrap(), old);
        assert_eq!(d.get_members(&g).await.unwrap().len(), 1);
        assert_eq!(d.get_leader(&g).await.unwrap(), Some("m".into()));
        assert_eq!(d.campaign(&g).await.unwrap(), token);
        d.stop().await.unwrap();
        std::fs::remove_dir_all(root).unwrap();
    }
}
