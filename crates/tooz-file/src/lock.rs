//! Lock files: `DIRECTORY/<name>`, OFD-locked, with fencing counters.

use std::fs::File;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;
use tooz_core::util::{Backoff, deadline_of, sleep_within};
use tooz_core::{DriverLock, FencingToken, LockName, Mode, Result, ToozError, Wait};

use crate::layout::{self, Layout};
use crate::ofd::{self, Kind, io_err};
use crate::watch::FileWatch;

/// How long a fencing counter update may wait for the counter's own lock (held
/// for microseconds by whoever updates it).
const COUNTER_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct Held {
    file: File,
    mode: Mode,
}

/// One lock handle. Each handle acquires through its own open file description,
/// so two handles exclude each other even inside one process.
#[derive(Debug)]
pub(crate) struct FileLock {
    name: LockName,
    path: PathBuf,
    fence: PathBuf,
    held: Mutex<Option<Held>>,
}

impl FileLock {
    pub(crate) fn new(layout: &Layout, name: &LockName) -> Result<Self> {
        let (path, rel) = layout.lock_path(name)?;
        Ok(FileLock {
            name: name.clone(),
            fence: layout.lock_fence(&rel),
            path,
            held: Mutex::new(None),
        })
    }

    fn held(&self) -> MutexGuard<'_, Option<Held>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The outcome of one synchronous attempt.
enum Attempt {
    Got(File, u64),
    Busy(File),
    /// The file we locked was removed or replaced meanwhile: reopen and retry.
    Stale,
}

/// Opens the lock file, creating it and its parent directories.
fn open(path: &std::path::Path) -> Result<File> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| io_err("cannot create lock directory", parent, e))?;
    }
    ofd::open_lock_file(path).map_err(|e| io_err("cannot open lock file", path, e))
}

/// One attempt, run on a blocking thread: take the lock, check the file is still
/// the one at `path`, and advance the fencing counter. The file travels in and
/// out, so if the caller is gone the result (and the lock) is dropped.
fn attempt(
    file: File,
    mode: Mode,
    path: &std::path::Path,
    fence: &std::path::Path,
) -> Result<Attempt> {
    let kind = match mode {
        Mode::Exclusive => Kind::Write,
        Mode::Shared => Kind::Read,
    };
    // A file replaced by `break_lock` (or removed) is not the lock any more:
    // waiting on it would wait for the broken holder.
    if !ofd::same_file(&file, path) {
        return Ok(Attempt::Stale);
    }
    if !ofd::try_lock(&file, kind).map_err(|e| io_err("cannot lock", path, e))? {
        return Ok(Attempt::Busy(file));
    }
    if !ofd::same_file(&file, path) {
        return Ok(Attempt::Stale);
    }
    let token = bump_counter(fence)?;
    Ok(Attempt::Got(file, token))
}

/// Advances a fencing counter file under its own short exclusive lock and
/// returns the new value, which is on disk before it is returned.
///
/// - The value is `max(stored + 1, now in µs)` ([`layout::next_token`]); a counter
///   at `u64::MAX` is an error (a repeated token would be worse).
/// - A counter that does not parse (a torn write, a stray edit) is not fatal for
///   ever: it restarts at [`layout::recovery_token`], above every token it can
///   have handed out, and says so in a warning. An empty or missing file is a
///   counter never advanced (we only write complete values, synced before the
///   token is returned), and starts from the clock like a restarted Redis does.
/// - Durability: the value is overwritten in place and `fdatasync`ed (one flush
///   per grant; the values only grow, so the new text covers the old). The first
///   write of a new counter also syncs the directory, so the file's name
///   survives a crash too. An in-place write of at most 21 bytes lies within one
///   sector, which disks write whole; a torn one would not parse and would be
///   recovered as above.
pub(crate) fn bump_counter(path: &std::path::Path) -> Result<u64> {
    use std::io::{Read, Seek, SeekFrom, Write};
    let held = ofd::lock_path_blocking(path, Kind::Write, COUNTER_WAIT)?;
    let mut f = held.file();
    let mut buf = Vec::new();
    f.seek(SeekFrom::Start(0))
        .and_then(|_| f.read_to_end(&mut buf))
        .map_err(|e| io_err("cannot read fencing counter", path, e))?;
    let now = SystemTime::now();
    let next = match layout::parse_counter(&buf) {
        Ok(prev) => layout::next_token(prev, now)?,
        Err(e) => {
            let mtime = f.metadata().and_then(|m| m.modified()).ok();
            let next = layout::recovery_token(now, mtime)?;
            tracing::warn!(
                path = %path.display(),
                error = %e,
                restart = next,
                "damaged fencing counter: restarting it above every token it can have given"
            );
            next
        }
    };
    let text = layout::format_counter(next);
    f.seek(SeekFrom::Start(0))
        .and_then(|_| f.write_all(&text))
        .and_then(|()| {
            if (text.len() as u64) < buf.len() as u64 {
                f.set_len(text.len() as u64)
            } else {
                Ok(())
            }
        })
        .and_then(|()| f.sync_data())
        .map_err(|e| io_err("cannot write fencing counter", path, e))?;
    if buf.is_empty()
        && let Some(dir) = path.parent()
    {
        ofd::sync_dir(dir).map_err(|e| io_err("cannot sync", dir, e))?;
    }
    Ok(next)
}

/// Closes an inotify instance off the async threads: closing one waits for an
/// RCU grace period in the kernel (often 10-30 ms), which would stall the
/// runtime and delay the very acquisition it served.
fn drop_watch(watch: Option<Arc<FileWatch>>) {
    if let Some(w) = watch {
        tokio::task::spawn_blocking(move || drop(w));
    }
}

#[tooz_core::async_trait]
impl DriverLock for FileLock {
    fn name(&self) -> &LockName {
        &self.name
    }

    fn queues(&self) -> bool {
        true
    }

    /// Try-lock, then wait for a wake-up: an inotify event on the lock file (a
    /// holder closing its descriptor, ours or Python's) or a short adaptive pause
    /// (1 ms doubling to 50 ms) for holders that send nothing.
    ///
    /// Cancel-safe: each attempt takes the lock in one step on a blocking thread
    /// and hands it back by value; if this future is dropped the result, and with
    /// it the lock, is dropped.
    #[tracing::instrument(level = "debug", skip(self), fields(lock = %self.name))]
    async fn acquire(&self, mode: Mode, wait: Wait) -> Result<Option<FencingToken>> {
        if self.held().is_some() {
            return Ok(None);
        }
        let deadline = deadline_of(wait);
        let mut backoff = Backoff::new(Duration::from_millis(1), Duration::from_millis(50));
        let mut watch: Option<Arc<FileWatch>> = None;
        let mut watch_tried = false;
        let mut file: Option<File> = None;
        loop {
            let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            // With a watch, the pause happens on the blocking thread right after a
            // failed attempt; without one, on the runtime below.
            let pause = match (&watch, remaining) {
                (None, _) => Duration::ZERO,
                (Some(_), None) => backoff.next_delay(),
                (Some(_), Some(r)) => backoff.next_delay().min(r),
            };
            let (path, fence, prev, w) = (
                self.path.clone(),
                self.fence.clone(),
                file.take(),
                watch.clone(),
            );
            let res = tokio::task::spawn_blocking(move || {
                let f = match prev {
                    Some(f) => f,
                    None => open(&path)?,
                };
                let res = attempt(f, mode, &path, &fence)?;
                if let (Attempt::Busy(_), Some(w)) = (&res, w)
                    && !pause.is_zero()
                {
                    w.wait(pause);
                }
                Ok::<_, ToozError>(res)
            })
            .await
            .map_err(|e| ToozError::backend("lock attempt task failed", e))??;
            match res {
                Attempt::Got(f, token) => {
                    *self.held() = Some(Held { file: f, mode });
                    drop_watch(watch);
                    return Ok(Some(FencingToken(token)));
                }
                Attempt::Stale => {
                    drop_watch(watch.take());
                    watch_tried = false;
                    continue;
                }
                Attempt::Busy(f) => file = Some(f),
            }
            if wait == Wait::No {
                drop_watch(watch);
                return Ok(None);
            }
            if remaining.is_some_and(|r| r.is_zero()) {
                drop_watch(watch);
                return Ok(None);
            }
            if !watch_tried {
                // Watch, then try again at once, so a release between the failed
                // attempt and the watch is not missed.
                watch_tried = true;
                watch = FileWatch::new(&self.path).map(Arc::new);
                continue;
            }
            if watch.is_none() {
                // No inotify: plain polling. At the deadline, loop once more for a
                // last attempt (remaining is then zero and ends the loop).
                sleep_within(backoff.next_delay(), deadline).await;
            }
        }
    }

    /// Unlocks and closes the descriptor (which wakes inotify waiters).
    /// `false` if not held, or if the lock was broken meanwhile (the file at the
    /// path is no longer the one this handle locked).
    #[tracing::instrument(level = "debug", skip(self), fields(lock = %self.name))]
    async fn release(&self) -> Result<bool> {
        let Some(h) = self.held().take() else {
            return Ok(false);
        };
        let still = ofd::same_file(&h.file, &self.path);
        let res = ofd::unlock(&h.file).map_err(|e| io_err("cannot unlock", &self.path, e));
        tracing::trace!(mode = ?h.mode, broken = !still, "released");
        drop(h);
        res.map(|()| still)
    }

    /// Nothing to renew: the kernel keeps the lock until it is released or the
    /// process dies. Reports whether this handle still holds it.
    async fn heartbeat(&self) -> Result<bool> {
        self.is_still_owner().await
    }

    /// Held by this handle, and the lock file was not removed or replaced meanwhile.
    async fn is_still_owner(&self) -> Result<bool> {
        Ok(self
            .held()
            .as_ref()
            .is_some_and(|h| ofd::same_file(&h.file, &self.path)))
    }

    /// Replaces the lock file with a fresh one (atomic rename) if someone holds
    /// it. A record lock cannot be taken away from the process holding it, so the
    /// name moves on instead: new acquirers (Rust and Python) lock the new file,
    /// Rust holders of the old one see `is_still_owner`/`heartbeat` turn false
    /// (the coordinator reports the hold lost) and their `release` returns
    /// `false`, and Rust waiters move over to the new file.
    ///
    /// Caveat: a Python tooz process that was *waiting* for the lock when it was
    /// broken keeps retrying on the old file and gets it once the broken holder
    /// lets go, while someone may hold the new file. Like every `break_lock`, this
    /// is an operator's tool for a holder that is stuck.
    #[tracing::instrument(level = "debug", skip(self), fields(lock = %self.name))]
    async fn break_lock(&self) -> Result<bool> {
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || break_file(&path))
            .await
            .map_err(|e| ToozError::backend("break_lock task failed", e))?
    }
}

/// Replaces `path` with a new empty file if any lock is held on it.
fn break_file(path: &std::path::Path) -> Result<bool> {
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if ofd::is_missing(&e) => return Ok(false),
        Err(e) => return Err(io_err("cannot open", path, e)),
    };
    if !ofd::is_locked(&file).map_err(|e| io_err("cannot probe", path, e))? {
        return Ok(false);
    }
    drop(file);
    // The replacement is created beside the lock file (same file system). Its
    // name must not grow with the lock's: a lock name component may already be
    // NAME_MAX long.
    let parent = path.parent().unwrap_or(std::path::Path::new("/"));
    let tmp = parent.join(format!(".tooz-break-{}", uuid::Uuid::new_v4().simple()));
    let res = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .and_then(|f| {
            drop(f);
            std::fs::rename(&tmp, path)
        });
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_err("cannot replace", path, e));
    }
    tracing::warn!(path = %path.display(), "lock broken: the lock file was replaced");
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> PathBuf {
        let p = std::env::temp_dir().join(format!("tooz-file-lock-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(p.join(".tooz/fence")).unwrap();
        p
    }

    #[test]
    fn fence_counter_is_monotonic_across_threads() {
        let r = root();
        let path = r.join(".tooz/fence/c");
        let mut all = Vec::new();
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let p = path.clone();
                std::thread::spawn(move || {
                    (0..50)
                        .map(|_| bump_counter(&p).unwrap())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for h in handles {
            let v = h.join().unwrap();
            assert!(v.windows(2).all(|w| w[0] < w[1]));
            all.extend(v);
        }
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 200, "every token is unique");
        // The counter never goes back, even if rewritten with a smaller value.
        let last = *all.last().unwrap();
        std::fs::write(&path, b"3\n").unwrap();
        assert!(bump_counter(&path).unwrap() > 3);
        std::fs::write(&path, format!("{}\n", last + 1_000_000_000)).unwrap();
        assert_eq!(bump_counter(&path).unwrap(), last + 1_000_000_001);
        std::fs::remove_dir_all(r).unwrap();
    }

    fn now_us() -> u64 {
        u64::try_from(
            SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_micros(),
        )
        .unwrap()
    }

    /// A counter that does not parse restarts above anything it can have handed
    /// out (clock and mtime plus the margin), is rewritten, and counts on from there.
    #[test]
    fn junk_counter_recovers_above_every_earlier_token() {
        let r = root();
        let path = r.join(".tooz/fence/j");
        let before = bump_counter(&path).unwrap();
        for junk in [
            &b"junk"[..],
            b"12\x0034",
            b"\xff\xfe",
            b"99999999999999999999999",
        ] {
            std::fs::write(&path, junk).unwrap();
            let t0 = now_us();
            let got = bump_counter(&path).unwrap();
            assert!(got > before);
            assert!(got >= t0 + layout::RECOVERY_MARGIN_US, "{junk:?}: {got}");
            assert_eq!(std::fs::read(&path).unwrap(), layout::format_counter(got));
            assert_eq!(
                bump_counter(&path).unwrap(),
                got + 1,
                "counts on from there"
            );
        }
        // A clock stepped back since the last write: the file's mtime still bounds it.
        std::fs::write(&path, b"junk").unwrap();
        let future = SystemTime::now() + Duration::from_secs(7200);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(future)
            .unwrap();
        let got = bump_counter(&path).unwrap();
        assert!(got >= now_us() + 7_200_000_000 + layout::RECOVERY_MARGIN_US - 60_000_000);
        std::fs::remove_dir_all(r).unwrap();
    }

    /// A counter at `u64::MAX` refuses to hand out a token (and the lock with it);
    /// it never repeats one.
    #[tokio::test]
    async fn exhausted_counter_is_an_error() {
        let r = root();
        let layout = Arc::new(Layout::new(&r));
        let a = FileLock::new(&layout, &"max".into()).unwrap();
        let (_, rel) = layout.lock_path(&"max".into()).unwrap();
        let fence = layout.lock_fence(&rel);
        std::fs::write(&fence, format!("{}\n", u64::MAX - 1)).unwrap();
        assert_eq!(
            a.acquire(Mode::Exclusive, Wait::No).await.unwrap(),
            Some(FencingToken(u64::MAX))
        );
        assert!(a.release().await.unwrap());
        let e = a.acquire(Mode::Exclusive, Wait::No).await.unwrap_err();
        assert!(matches!(e, ToozError::Backend { .. }), "{e}");
        assert!(e.to_string().contains("exhausted"), "{e}");
        assert!(a.held().is_none());
        // Nothing is left held: another handle can take the lock (and fails the same way
        // at the token), and the counter was not touched.
        let b = FileLock::new(&layout, &"max".into()).unwrap();
        assert!(b.acquire(Mode::Exclusive, Wait::No).await.is_err());
        assert_eq!(
            std::fs::read(&fence).unwrap(),
            layout::format_counter(u64::MAX)
        );
        std::fs::remove_dir_all(r).unwrap();
    }

    /// A missing counter starts from the clock; the file is created and synced.
    #[test]
    fn missing_counter_starts_from_the_clock() {
        let r = root();
        let path = r.join(".tooz/fence/m");
        let t0 = now_us();
        let got = bump_counter(&path).unwrap();
        assert!(got >= t0 && got < t0 + 60_000_000);
        std::fs::remove_file(&path).unwrap();
        assert!(bump_counter(&path).unwrap() > got);
        std::fs::remove_dir_all(r).unwrap();
    }

    #[tokio::test]
    async fn handles_exclude_each_other_and_tokens_increase() {
        let r = root();
        let layout = Arc::new(Layout::new(&r));
        let a = FileLock::new(&layout, &"sub/dir/l".into()).unwrap();
        let b = FileLock::new(&layout, &"sub/dir/l".into()).unwrap();
        let t1 = a.acquire(Mode::Exclusive, Wait::No).await.unwrap().unwrap();
        assert!(r.join("sub/dir/l").is_file());
        assert_eq!(b.acquire(Mode::Exclusive, Wait::No).await.unwrap(), None);
        assert_eq!(b.acquire(Mode::Shared, Wait::No).await.unwrap(), None);
        assert!(a.is_still_owner().await.unwrap());
        assert!(a.heartbeat().await.unwrap());
        assert!(!b.is_still_owner().await.unwrap());
        // A waiter is woken by the release.
        let waiter = tokio::spawn(async move {
            let t = b
                .acquire(Mode::Exclusive, Wait::For(Duration::from_secs(10)))
                .await;
            (b, t)
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(a.release().await.unwrap());
        assert!(!a.release().await.unwrap());
        let (b, t2) = waiter.await.unwrap();
        let t2 = t2.unwrap().unwrap();
        assert!(t2 > t1);
        assert!(b.release().await.unwrap());
        assert!(!a.break_lock().await.unwrap(), "nobody holds it");
        // Shared holders coexist and exclude exclusive ones.
        let t3 = a.acquire(Mode::Shared, Wait::No).await.unwrap().unwrap();
        let t4 = b.acquire(Mode::Shared, Wait::No).await.unwrap().unwrap();
        assert!(t4 > t3 && t3 > t2);
        let c = FileLock::new(&layout, &"sub/dir/l".into()).unwrap();
        assert_eq!(
            c.acquire(Mode::Exclusive, Wait::For(Duration::from_millis(50)))
                .await
                .unwrap(),
            None
        );
        assert!(a.release().await.unwrap() && b.release().await.unwrap());
        assert!(
            c.acquire(Mode::Exclusive, Wait::No)
                .await
                .unwrap()
                .is_some()
        );
        std::fs::remove_dir_all(r).unwrap();
    }

    #[tokio::test]
    async fn break_moves_the_name_to_a_fresh_file() {
        let r = root();
        let layout = Arc::new(Layout::new(&r));
        let new = || FileLock::new(&layout, &"b".into()).unwrap();
        let (a, b, c) = (new(), new(), new());
        let t1 = a.acquire(Mode::Exclusive, Wait::No).await.unwrap().unwrap();
        // A waiter queued before the break moves over to the new file.
        let waiter = tokio::spawn(async move {
            let t = c
                .acquire(Mode::Exclusive, Wait::For(Duration::from_secs(10)))
                .await;
            (c, t)
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(b.break_lock().await.unwrap());
        let (c, t2) = waiter.await.unwrap();
        let t2 = t2.unwrap().unwrap();
        assert!(t2 > t1, "tokens keep increasing across a break");
        assert!(!a.is_still_owner().await.unwrap());
        assert!(!a.heartbeat().await.unwrap());
        assert_eq!(b.acquire(Mode::Exclusive, Wait::No).await.unwrap(), None);
        assert!(
            !a.release().await.unwrap(),
            "a broken hold releases as false"
        );
        assert_eq!(
            b.acquire(Mode::Exclusive, Wait::No).await.unwrap(),
            None,
            "c still holds"
        );
        assert!(c.release().await.unwrap());
        assert!(!b.break_lock().await.unwrap(), "nothing held");
        // Shared holders can be broken too.
        assert!(a.acquire(Mode::Shared, Wait::No).await.unwrap().is_some());
        assert!(b.break_lock().await.unwrap());
        assert!(!a.is_still_owner().await.unwrap());
        let leftovers: Vec<_> = std::fs::read_dir(&r)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n.to_string_lossy().contains("tooz-break"))
            .collect();
        assert!(leftovers.is_empty());
        std::fs::remove_dir_all(r).unwrap();
    }

    /// A lock whose last name component is NAME_MAX (255 bytes) long can be broken.
    #[tokio::test]
    async fn break_works_for_the_longest_names() {
        let r = root();
        let layout = Arc::new(Layout::new(&r));
        let name = format!("d/{}", "x".repeat(255));
        let new = || FileLock::new(&layout, &name.as_str().into()).unwrap();
        let (a, b) = (new(), new());
        assert!(
            a.acquire(Mode::Exclusive, Wait::No)
                .await
                .unwrap()
                .is_some()
        );
        assert!(b.break_lock().await.unwrap());
        assert!(!a.is_still_owner().await.unwrap());
        assert!(
            b.acquire(Mode::Exclusive, Wait::No)
                .await
                .unwrap()
                .is_some()
        );
        assert!(b.release().await.unwrap());
        std::fs::remove_dir_all(r).unwrap();
    }

    /// Uncontended acquire+release pairs (what `cargo xtask bench` calls
    /// `lock_pair`), on the file system holding `TOOZ_BENCH_DIR` (default: the
    /// system temporary directory). Run with
    /// `cargo test -p tooz-file --release --lib -- --ignored --nocapture lock_pair_cost`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "a measurement, not a test"]
    async fn lock_pair_cost() {
        let base = std::env::var_os("TOOZ_BENCH_DIR")
            .map_or_else(std::env::temp_dir, PathBuf::from)
            .join(format!("tooz-file-bench-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(base.join(".tooz/fence")).unwrap();
        let layout = Arc::new(Layout::new(&base));
        let l = FileLock::new(&layout, &"bench".into()).unwrap();
        let mut times = Vec::new();
        for i in 0..2200 {
            let t = std::time::Instant::now();
            assert!(
                l.acquire(Mode::Exclusive, Wait::No)
                    .await
                    .unwrap()
                    .is_some()
            );
            assert!(l.release().await.unwrap());
            if i >= 200 {
                times.push(t.elapsed());
            }
        }
        times.sort_unstable();
        let mean = times.iter().sum::<Duration>() / u32::try_from(times.len()).unwrap();
        println!(
            "lock_pair on {}: median {:?}, p90 {:?}, mean {:?}",
            base.display(),
            times[times.len() / 2],
            times[times.len() * 9 / 10],
            mean
        );
        std::fs::remove_dir_all(base).unwrap();
    }

    #[tokio::test]
    async fn dropping_an_acquire_never_leaks_the_lock() {
        let r = root();
        let layout = Arc::new(Layout::new(&r));
        let a = FileLock::new(&layout, &"x".into()).unwrap();
        for _ in 0..50 {
            let fut = a.acquire(Mode::Exclusive, Wait::Forever);
            // Poll once or twice, then drop.
            let _ = tokio::time::timeout(Duration::from_micros(50), fut).await;
            if a.held().is_some() {
                assert!(a.release().await.unwrap());
            }
            let probe = FileLock::new(&layout, &"x".into()).unwrap();
            // Give a still-running attempt time to finish and drop its file.
            let got = probe
                .acquire(Mode::Exclusive, Wait::For(Duration::from_secs(5)))
                .await
                .unwrap();
            assert!(got.is_some());
            assert!(probe.release().await.unwrap());
        }
        std::fs::remove_dir_all(r).unwrap();
    }
}
