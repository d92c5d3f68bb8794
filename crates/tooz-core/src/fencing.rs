//! How a resource checks fencing tokens.
//!
//! A lock or a leadership can be lost without its holder noticing in time: the process
//! was paused past its lease (SIGSTOP, a long GC pause, a VM migration), or a write it
//! sent was delayed in the network and arrives after the next holder's. Timing cannot
//! rule that out; the resource can. Every grant carries a
//! [`FencingToken`](crate::FencingToken) that
//! strictly increases per lock name (or group leadership) across holders. The holder
//! sends its token with every write, and the resource:
//!
//! 1. keeps the highest token it has accepted (per lock name);
//! 2. refuses a write whose token is *below* it (a stale holder), and accepts one whose
//!    token is equal (the current holder writing again) or above (a new holder);
//! 3. does the check and the write as one atomic step (a compare-and-set), so two
//!    holders racing cannot both pass.
//!
//! In SQL that is one statement, e.g.
//! `UPDATE jobs SET state = $1, fence = $2 WHERE id = $3 AND fence <= $2`: zero rows
//! updated means a stale token. In Redis, a Lua script comparing a stored token; in
//! etcd, a transaction comparing a key's value.
//!
//! A runnable example, with an in-memory resource:
//!
//! ```
//! use std::collections::HashMap;
//! use std::sync::Mutex;
//! use tooz_core::FencingToken;
//!
//! /// A store that refuses writes from stale holders.
//! #[derive(Default)]
//! struct FencedStore {
//!     // value, highest token accepted
//!     rows: Mutex<HashMap<String, (String, u64)>>,
//! }
//!
//! impl FencedStore {
//!     /// Writes `value` if `token` is not below the highest token seen for `key`.
//!     fn write(&self, key: &str, value: &str, token: FencingToken) -> Result<(), String> {
//!         let mut rows = self.rows.lock().unwrap();
//!         let row = rows.entry(key.to_string()).or_insert((String::new(), 0));
//!         if token.0 < row.1 {
//!             return Err(format!("stale fencing token {token} (seen {})", row.1));
//!         }
//!         *row = (value.to_string(), token.0);
//!         Ok(())
//!     }
//! }
//!
//! let store = FencedStore::default();
//! // Holder A got token 41, was paused past its lease; B then got token 42.
//! let (a, b) = (FencingToken(41), FencingToken(42));
//! store.write("report", "from A", a).unwrap();
//! store.write("report", "from B", b).unwrap();
//! // A wakes up and writes again: refused.
//! assert!(store.write("report", "late A", a).is_err());
//! assert_eq!(store.rows.lock().unwrap()["report"].0, "from B");
//! ```
//!
//! The `tooz` command passes the token to the command it runs as
//! `$TOOZ_FENCING_TOKEN`. Tokens of one name come from one counter: tokens of
//! different lock names are not comparable.
