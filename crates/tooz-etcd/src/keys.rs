//! The key layout shared with Python tooz's etcd3gw driver (spec §11.6).
//!
//! * group `tooz/groups/<group>/`, value = the key itself;
//! * member `tooz/groups/<group>/<member>`, msgpack capabilities, on the lease;
//! * lock `/tooz/locks<name>` (no `/` after `locks`), 16 random bytes;
//! * (Rust only) leader `tooz/leaders/<group>`, value = member id, on the lease;
//! * (Rust only) member times `tooz/member-times/<group>/<member>`, on the lease;
//! * (Rust only) shared-lock readers `tooz/lock-readers/<hex name>/<reader>`, on the
//!   lease, plus the lock key itself holding [`SHARED_MARKER`] while readers hold it
//!   (so that a Python exclusive acquirer waits);
//! * (Rust only) lock waiters `tooz/lock-queue/<hex name>/<x|s><entry>`, on the
//!   lease: one key per blocked acquire, ordered by create revision (see
//!   `lock.rs`); Python clients never queue.

/// Prefix of every group and member key.
pub const GROUPS_PREFIX: &[u8] = b"tooz/groups/";
/// Prefix of lock keys (no separator before the name, as Python).
pub const LOCKS_PREFIX: &[u8] = b"/tooz/locks";
/// Prefix of leader keys (Rust extension; Python has no leader election).
pub const LEADERS_PREFIX: &[u8] = b"tooz/leaders/";

/// Prefix of member time keys (Rust extension).
pub const TIMES_PREFIX: &[u8] = b"tooz/member-times/";
/// Prefix of shared-lock reader keys (Rust extension).
pub const READERS_PREFIX: &[u8] = b"tooz/lock-readers/";
/// Prefix of lock waiter queues (Rust extension).
pub const QUEUE_PREFIX: &[u8] = b"tooz/lock-queue/";
/// The value of a lock key while shared holders hold the lock.
pub const SHARED_MARKER: &[u8] = b"tooz-rs:shared";

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// `tooz/groups/<group>/`: the group key (also the prefix of its members).
pub fn group(group: &[u8]) -> Vec<u8> {
    cat(&[GROUPS_PREFIX, group, b"/"])
}

/// `tooz/groups/<group>/<member>`.
pub fn member(group: &[u8], member: &[u8]) -> Vec<u8> {
    cat(&[GROUPS_PREFIX, group, b"/", member])
}

/// `/tooz/locks<name>`.
pub fn lock(name: &[u8]) -> Vec<u8> {
    cat(&[LOCKS_PREFIX, name])
}

/// `tooz/leaders/<group>`.
pub fn leader(group: &[u8]) -> Vec<u8> {
    cat(&[LEADERS_PREFIX, group])
}

/// `tooz/member-times/<group>/<member>`: `created_us updated_us`.
pub fn member_times(group: &[u8], member: &[u8]) -> Vec<u8> {
    cat(&[TIMES_PREFIX, group, b"/", member])
}

/// `tooz/lock-readers/<hex name>/`: the prefix of a lock's shared holders.
pub fn lock_readers(name: &[u8]) -> Vec<u8> {
    let mut k = READERS_PREFIX.to_vec();
    k.extend_from_slice(hex::encode(name).as_bytes());
    k.push(b'/');
    k
}

/// `tooz/lock-queue/<hex name>/`: the prefix of a lock's waiters.
pub fn lock_queue(name: &[u8]) -> Vec<u8> {
    let mut k = QUEUE_PREFIX.to_vec();
    k.extend_from_slice(hex::encode(name).as_bytes());
    k.push(b'/');
    k
}

/// `tooz/lock-queue/<hex name>/x`: the prefix of a lock's exclusive waiters (shared
/// waiters are under `…/s`).
pub fn lock_queue_exclusive(name: &[u8]) -> Vec<u8> {
    let mut k = lock_queue(name);
    k.push(b'x');
    k
}

/// The end of the key range holding every key that starts with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// The group id of a key under [`GROUPS_PREFIX`] if it is a real group key
/// (`tooz/groups/<group>/`, no other `/`), unlike Python's buggy `get_groups`.
pub fn group_of_key(key: &[u8]) -> Option<&[u8]> {
    let rest = key.strip_prefix(GROUPS_PREFIX)?;
    let id = rest.strip_suffix(b"/")?;
    (!id.is_empty() && !id.contains(&b'/')).then_some(id)
}

/// The member id of a key under `group(g)`, `None` for the group key itself.
pub fn member_of_key<'a>(group_key: &[u8], key: &'a [u8]) -> Option<&'a [u8]> {
    let m = key.strip_prefix(group_key)?;
    (!m.is_empty()).then_some(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        assert_eq!(group(b"g"), b"tooz/groups/g/");
        assert_eq!(member(b"g", b"m"), b"tooz/groups/g/m");
        assert_eq!(lock(b"l"), b"/tooz/locksl");
        assert_eq!(lock_queue(b"l"), b"tooz/lock-queue/6c/");
        assert_eq!(lock_queue_exclusive(b"l"), b"tooz/lock-queue/6c/x");
        assert_eq!(group_of_key(b"tooz/groups/g/"), Some(&b"g"[..]));
        assert_eq!(group_of_key(b"tooz/groups/g/m"), None);
        assert_eq!(
            member_of_key(b"tooz/groups/g/", b"tooz/groups/g/m"),
            Some(&b"m"[..])
        );
        assert_eq!(member_of_key(b"tooz/groups/g/", b"tooz/groups/g/"), None);
    }
}
