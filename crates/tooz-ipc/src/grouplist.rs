//! Python tooz's group list: a 1 KiB SysV shared-memory segment at
//! `ftok("GROUP_LIST", "_TOOZ_INTERNAL")`, holding a native-endian `u16` length and
//! then a msgpack array of group ids (`bin`), guarded by the IPC lock
//! `TOOZ_INTERNAL_LOCK`.

use std::io;

use rmpv::Value;
use tooz_core::GroupId;

use crate::keys::{GROUP_SEGMENT_SIZE, group_list_key};
use crate::sys::Shm;

/// The attached group list segment (attach per use: Python's `stop()` removes the
/// segment, and a later one is a new segment at the same key).
#[derive(Debug)]
pub(crate) struct GroupList(Shm);

impl GroupList {
    /// Attaches the segment, creating it if needed (as Python's `start` does).
    pub(crate) fn attach() -> io::Result<GroupList> {
        Shm::attach(group_list_key(), GROUP_SEGMENT_SIZE).map(GroupList)
    }

    /// The group ids listed (`str` entries written by other clients included).
    pub(crate) fn read(&self) -> io::Result<Vec<GroupId>> {
        let len_bytes = self.0.read(0, 2);
        let len = usize::from(u16::from_ne_bytes([len_bytes[0], len_bytes[1]]));
        if len == 0 {
            return Ok(Vec::new());
        }
        if len > GROUP_SEGMENT_SIZE - 2 {
            return Err(io::Error::other(format!(
                "the group list segment claims {len} bytes"
            )));
        }
        let data = self.0.read(2, len);
        let value = tooz_core::capabilities::read_msgpack(&mut &data[..])
            .map_err(|e| io::Error::other(format!("the group list does not decode: {e}")))?;
        let Value::Array(items) = value else {
            return Err(io::Error::other("the group list is not a msgpack array"));
        };
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            match item {
                Value::Binary(b) => out.push(GroupId::from(b)),
                Value::String(s) => out.push(GroupId::from(s.into_bytes())),
                other => {
                    return Err(io::Error::other(format!(
                        "unexpected group list entry {other}"
                    )));
                }
            }
        }
        Ok(out)
    }

    /// Replaces the list. `Ok(false)` (nothing written) when it would not fit, as
    /// Python's "Group list is too big".
    pub(crate) fn write(&self, groups: &[GroupId]) -> io::Result<bool> {
        let array = Value::Array(
            groups
                .iter()
                .map(|g| Value::Binary(g.as_bytes().to_vec()))
                .collect(),
        );
        let mut data = Vec::new();
        rmpv::encode::write_value(&mut data, &array).map_err(io::Error::other)?;
        if data.len() >= GROUP_SEGMENT_SIZE - 2 {
            return Ok(false);
        }
        let len = u16::try_from(data.len()).map_err(io::Error::other)?;
        Ok(self.0.write(0, &len.to_ne_bytes()) && self.0.write(2, &data))
    }
}
