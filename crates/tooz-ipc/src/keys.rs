//! SysV keys, derived exactly as Python tooz's `ftok` derives them, and the names
//! this driver adds.
//!
//! Python: `md5(project + name)` as a 128-bit integer, `mod KEY_RANGE`, plus
//! `KEY_MIN`, with the bounds of the local `sysv_ipc` build. sysv_ipc 1.2.0 (the
//! pinned version, as built from PyPI on Linux x86-64) reports
//! `KEY_MIN = -2^63`, `KEY_MAX = 2^63 - 1`, so `KEY_RANGE = 2^64 - 1`, and hands the
//! result to the kernel as a C `key_t` (32 bits): its low 32 bits are the key.

use md5::{Digest, Md5};

use crate::sys::Key;

/// Python's `IPCLock._LOCK_PROJECT`.
pub(crate) const LOCK_PROJECT: &[u8] = b"__TOOZ_LOCK_";
/// Python's `IPCDriver._GROUP_LIST_KEY` / `_GROUP_PROJECT`.
const GROUP_LIST_NAME: &[u8] = b"GROUP_LIST";
const GROUP_PROJECT: &[u8] = b"_TOOZ_INTERNAL";
/// Python's `IPCDriver._INTERNAL_LOCK_NAME`.
pub(crate) const INTERNAL_LOCK_NAME: &[u8] = b"TOOZ_INTERNAL_LOCK";
/// Python's `IPCDriver._SEGMENT_SIZE`.
pub(crate) const GROUP_SEGMENT_SIZE: usize = 1024;

/// Ours: the reader count of a lock name held shared.
const READERS_PROJECT: &[u8] = b"__TOOZ_RS_READERS_";
/// Ours: the fencing counters table.
const FENCE_NAME: &[u8] = b"FENCE_TABLE";
const FENCE_PROJECT: &[u8] = b"__TOOZ_RS_INTERNAL_";
/// Slots of the fencing table (8 bytes each).
pub(crate) const FENCE_SLOTS: usize = 8192;
const FENCE_LOCK_PROJECT: &[u8] = b"__TOOZ_RS_FENCE_LOCK_";
const FENCE_LEADER_PROJECT: &[u8] = b"__TOOZ_RS_FENCE_LEADER_";

/// `sysv_ipc.KEY_MIN` / `KEY_MAX` of the pinned build.
const KEY_MIN: i128 = i64::MIN as i128;
const KEY_MAX: i128 = i64::MAX as i128;

/// Python's `ftok(name, project)`, as the integer Python computes.
pub(crate) fn python_ftok(name: &[u8], project: &[u8]) -> i128 {
    let range: u128 = if KEY_MIN <= 0 {
        KEY_MIN.unsigned_abs() + KEY_MAX.unsigned_abs()
    } else {
        (KEY_MAX - KEY_MIN).unsigned_abs()
    };
    let mut h = Md5::new();
    h.update(project);
    h.update(name);
    let digest: [u8; 16] = h.finalize().into();
    let v = u128::from_be_bytes(digest) % range;
    // v < 2^64, so it fits an i128 without loss.
    v as i128 + KEY_MIN
}

/// The `key_t` the kernel sees for `ftok(name, project)` (the low 32 bits).
pub(crate) fn key(name: &[u8], project: &[u8]) -> Key {
    // Truncation to the C type is what sysv_ipc's conversion does.
    python_ftok(name, project) as Key
}

/// The semaphore key of a lock name (Python's).
pub(crate) fn lock_key(name: &[u8]) -> Key {
    key(name, LOCK_PROJECT)
}

/// The key of the reader-count semaphore of a lock name (ours).
pub(crate) fn readers_key(name: &[u8]) -> Key {
    key(name, READERS_PROJECT)
}

/// The key of the group list segment (Python's).
pub(crate) fn group_list_key() -> Key {
    key(GROUP_LIST_NAME, GROUP_PROJECT)
}

/// The key of the fencing counters segment (ours).
pub(crate) fn fence_table_key() -> Key {
    key(FENCE_NAME, FENCE_PROJECT)
}

fn slot(name: &[u8], project: &[u8]) -> usize {
    let mut h = Md5::new();
    h.update(project);
    h.update(name);
    let d: [u8; 16] = h.finalize().into();
    (u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]]) % FENCE_SLOTS as u64)
        as usize
}

/// The fencing counter slot of a lock name. Names may share a slot: a shared
/// counter still strictly increases for each of them.
pub(crate) fn lock_fence_slot(name: &[u8]) -> usize {
    slot(name, FENCE_LOCK_PROJECT)
}

/// The fencing counter slot of a group's leadership.
pub(crate) fn leader_fence_slot(group: &[u8]) -> usize {
    slot(group, FENCE_LEADER_PROJECT)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Computed with Python tooz 9.1.0 and sysv_ipc 1.2.0 (`tooz.drivers.ipc.ftok`,
    /// and `ctypes.c_int32` for the key the semaphore got).
    #[test]
    fn keys_match_python() {
        assert_eq!(python_ftok(b"abc", LOCK_PROJECT), -1758122951431774340);
        assert_eq!(lock_key(b"abc"), -1737318532);
        assert_eq!(
            python_ftok(GROUP_LIST_NAME, GROUP_PROJECT),
            5139689563633823633
        );
        assert_eq!(group_list_key(), 1210920849);
        assert_eq!(
            python_ftok(INTERNAL_LOCK_NAME, LOCK_PROJECT),
            -466281960937111831
        );
        assert_eq!(lock_key(INTERNAL_LOCK_NAME), -383009047);
        assert_eq!(python_ftok(b"\xff\x00x", LOCK_PROJECT), 6013735770094420248);
        assert_eq!(lock_key(b"\xff\x00x"), 495567128);
    }

    #[test]
    fn slots_in_range() {
        for n in [&b"a"[..], b"b", b"\x00"] {
            assert!(lock_fence_slot(n) < FENCE_SLOTS);
            assert!(leader_fence_slot(n) < FENCE_SLOTS);
        }
    }
}
