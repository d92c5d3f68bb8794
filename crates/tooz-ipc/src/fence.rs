//! Fencing tokens: a table of 64-bit counters in one SysV shared-memory segment
//! (`ftok("FENCE_TABLE", "__TOOZ_RS_INTERNAL_")`, 64 KiB, mode 0600), attached once
//! per process. A grant advances its name's slot to `max(previous + 1, now in µs)`
//! with one atomic compare-and-swap, so tokens strictly increase per lock name
//! (and per group leadership) across processes for as long as the host runs, and
//! do not go back if someone removes the segment. Names may share a slot, which
//! only makes their tokens jump.

use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use tooz_core::{Result, ToozError};

use crate::config::NAME;
use crate::keys::{FENCE_SLOTS, fence_table_key};
use crate::sys::{Shm, advance};

static TABLE: Mutex<Option<Arc<Shm>>> = Mutex::new(None);

fn table() -> Result<Arc<Shm>> {
    let mut t = TABLE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(s) = t.as_ref() {
        return Ok(Arc::clone(s));
    }
    let shm = Arc::new(
        Shm::attach(fence_table_key(), FENCE_SLOTS * 8).map_err(|e| {
            ToozError::backend(NAME, "cannot attach the fencing counters segment", e)
        })?,
    );
    *t = Some(Arc::clone(&shm));
    Ok(shm)
}

/// The next token of `slot`.
pub(crate) fn next(slot: usize) -> Result<u64> {
    let now_us = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    let t = table()?;
    let counter = t
        .counter(slot)
        .ok_or_else(|| ToozError::backend_msg(NAME, format!("fencing slot {slot} out of range")))?;
    advance(counter, now_us)
        .ok_or_else(|| ToozError::backend_msg(NAME, "a fencing counter reached u64::MAX"))
}
