//! The SysV IPC system calls, behind safe functions. The only module with `unsafe`.
//!
//! glibc exports `semtimedop` but the `libc` crate has no binding for it on glibc,
//! so timed waits go through the raw system call (`SYS_semtimedop`).
#![allow(unsafe_code)]

use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A SysV IPC key (`key_t`).
pub(crate) type Key = libc::key_t;

/// Permissions of everything this driver creates (sysv_ipc's default): the user only.
const MODE: libc::c_int = 0o600;

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Creates a set of one semaphore exclusively (`IPC_CREAT | IPC_EXCL`).
pub(crate) fn sem_create_excl(key: Key) -> io::Result<libc::c_int> {
    // SAFETY: semget takes plain integers and touches no memory of ours.
    check(unsafe { libc::semget(key, 1, libc::IPC_CREAT | libc::IPC_EXCL | MODE) })
}

/// Creates a private set of one semaphore (`IPC_PRIVATE`), for the benchmark floor.
pub(crate) fn sem_private() -> io::Result<libc::c_int> {
    // SAFETY: as above.
    check(unsafe { libc::semget(libc::IPC_PRIVATE, 1, libc::IPC_CREAT | MODE) })
}

/// Opens an existing semaphore set (`ENOENT` when there is none).
pub(crate) fn sem_open(key: Key) -> io::Result<libc::c_int> {
    // SAFETY: as above.
    check(unsafe { libc::semget(key, 0, 0) })
}

/// Opens a set of one semaphore, creating it (value 0) if needed.
pub(crate) fn sem_open_or_create(key: Key) -> io::Result<libc::c_int> {
    // SAFETY: as above.
    check(unsafe { libc::semget(key, 1, libc::IPC_CREAT | MODE) })
}

/// Sets semaphore 0 of `id` to `value` (`SETVAL`).
pub(crate) fn sem_setval(id: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: SETVAL reads the `val` member of the variadic `union semun`, which is
    // passed by value; an unsigned long holding the value has its layout on Linux.
    check(unsafe { libc::semctl(id, 0, libc::SETVAL, value as libc::c_ulong) }).map(drop)
}

/// The value of semaphore 0 of `id` (`GETVAL`).
pub(crate) fn sem_getval(id: libc::c_int) -> io::Result<libc::c_int> {
    // SAFETY: GETVAL reads no variadic argument.
    check(unsafe { libc::semctl(id, 0, libc::GETVAL) })
}

/// Removes the semaphore set `id` (`IPC_RMID`); its waiters get `EIDRM`.
pub(crate) fn sem_remove(id: libc::c_int) -> io::Result<()> {
    // SAFETY: IPC_RMID reads no variadic argument.
    check(unsafe { libc::semctl(id, 0, libc::IPC_RMID) }).map(drop)
}

/// One operation on semaphore 0 of `id`: `op` (-1 take, +1 give, 0 wait for zero)
/// with `flags` (`IPC_NOWAIT`, `SEM_UNDO`), waiting at most `timeout` when it blocks
/// (`EAGAIN` when it runs out).
pub(crate) fn sem_op(
    id: libc::c_int,
    op: libc::c_short,
    flags: libc::c_int,
    timeout: Option<Duration>,
) -> io::Result<()> {
    let mut buf = libc::sembuf {
        sem_num: 0,
        sem_op: op,
        // The flags fit in a short (IPC_NOWAIT = 0o4000, SEM_UNDO = 0x1000).
        sem_flg: flags as libc::c_short,
    };
    let ret = match timeout {
        None => {
            // SAFETY: `buf` is a valid sembuf for the duration of the call, count 1.
            unsafe { libc::semop(id, &mut buf, 1) }
        }
        Some(t) => {
            let ts = libc::timespec {
                tv_sec: libc::time_t::try_from(t.as_secs()).unwrap_or(libc::time_t::MAX),
                tv_nsec: t.subsec_nanos() as libc::c_long,
            };
            // SAFETY: semtimedop(semid, sops, nsops, timeout) with a valid sembuf of
            // count 1 and a valid timespec, both outliving the call.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_semtimedop,
                    id,
                    &mut buf as *mut libc::sembuf,
                    1 as libc::size_t,
                    &ts as *const libc::timespec,
                )
            };
            r as libc::c_int
        }
    };
    check(ret).map(drop)
}

/// Takes a semaphore this process just created (value 0) in one atomic step: +1
/// without undo, then -1 with `SEM_UNDO`. The value stays 0 (held) and the kernel
/// restores 1 if the process dies: what `SETVAL 1` then a `SEM_UNDO` take do, in
/// one system call.
pub(crate) fn sem_take_fresh(id: libc::c_int) -> io::Result<()> {
    let mut ops = [
        libc::sembuf {
            sem_num: 0,
            sem_op: 1,
            sem_flg: 0,
        },
        libc::sembuf {
            sem_num: 0,
            sem_op: -1,
            // SEM_UNDO = 0x1000 fits in a short.
            sem_flg: libc::SEM_UNDO as libc::c_short,
        },
    ];
    // SAFETY: `ops` is a valid array of two sembufs for the duration of the call.
    check(unsafe { libc::semop(id, ops.as_mut_ptr(), ops.len()) }).map(drop)
}

/// An attached SysV shared-memory segment, detached on drop.
#[derive(Debug)]
pub(crate) struct Shm {
    addr: NonNull<u8>,
    size: usize,
}

// SAFETY: the mapping is plain shared memory; every access goes through volatile
// copies or atomics, and the pointer stays valid until drop.
unsafe impl Send for Shm {}
// SAFETY: as above; `&Shm` only allows copies and atomic operations.
unsafe impl Sync for Shm {}

impl Shm {
    /// Attaches the segment at `key`, creating it (zero-filled, `size` bytes) if
    /// needed. An existing smaller segment is an `EINVAL` error.
    pub(crate) fn attach(key: Key, size: usize) -> io::Result<Shm> {
        // SAFETY: shmget takes plain integers.
        let id = check(unsafe { libc::shmget(key, size, libc::IPC_CREAT | MODE) })?;
        // SAFETY: attaching at an address the kernel picks, read-write.
        let addr = unsafe { libc::shmat(id, std::ptr::null(), 0) };
        if addr as isize == -1 {
            return Err(io::Error::last_os_error());
        }
        let addr = NonNull::new(addr.cast::<u8>())
            .ok_or_else(|| io::Error::other("shmat returned a null address"))?;
        Ok(Shm { addr, size })
    }

    /// Copies `len` bytes at `offset` out of the segment (clamped to its size).
    pub(crate) fn read(&self, offset: usize, len: usize) -> Vec<u8> {
        let start = offset.min(self.size);
        let len = len.min(self.size - start);
        let mut out = vec![0_u8; len];
        // SAFETY: [start, start + len) lies inside the attached segment; other
        // processes may write it concurrently (the caller holds Python's lock for
        // consistency), which a byte copy tolerates.
        unsafe {
            std::ptr::copy_nonoverlapping(self.addr.as_ptr().add(start), out.as_mut_ptr(), len);
        }
        out
    }

    /// Copies `data` into the segment at `offset`; `false` if it does not fit.
    pub(crate) fn write(&self, offset: usize, data: &[u8]) -> bool {
        if offset
            .checked_add(data.len())
            .is_none_or(|end| end > self.size)
        {
            return false;
        }
        // SAFETY: the range was checked to lie inside the attached segment.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                self.addr.as_ptr().add(offset),
                data.len(),
            );
        }
        true
    }

    /// The 64-bit counter in slot `slot`, as an atomic (`None` out of range).
    pub(crate) fn counter(&self, slot: usize) -> Option<&AtomicU64> {
        let offset = slot.checked_mul(8)?;
        if offset.checked_add(8)? > self.size {
            return None;
        }
        // SAFETY: shmat maps page-aligned, so offset (a multiple of 8) is 8-aligned;
        // the slot lies inside the segment, which lives as long as `self`, and is
        // only ever accessed atomically by this driver.
        Some(unsafe { AtomicU64::from_ptr(self.addr.as_ptr().add(offset).cast::<u64>()) })
    }
}

impl Drop for Shm {
    fn drop(&mut self) {
        // SAFETY: `addr` came from shmat and is detached once.
        unsafe {
            libc::shmdt(self.addr.as_ptr().cast());
        }
    }
}

/// Advances a counter to `max(current + 1, floor)` and returns the new value;
/// `None` at `u64::MAX`.
pub(crate) fn advance(counter: &AtomicU64, floor: u64) -> Option<u64> {
    let mut cur = counter.load(Ordering::Acquire);
    loop {
        let next = cur.checked_add(1)?.max(floor);
        match counter.compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return Some(next),
            Err(seen) => cur = seen,
        }
    }
}
