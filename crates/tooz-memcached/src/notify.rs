//! Wake-up hints from memcached's mutation log.
//!
//! memcached cannot push a change to a key, but since 1.5 its `watch mutations`
//! command streams one log line per stored item (`ms`, `add`, CAS writes) on a
//! dedicated connection. A coordinator opens one such connection while something
//! of it waits (a blocked lock acquirer, a group watch) and turns the lines naming
//! a key it waits on into wake-ups. Deletions are not in that log (memcached 1.6.18),
//! so a Rust holder's release also stores a one-second marker key
//! (`__TOOZ_FREE_<lock key>`), in the same round trip as the delete.
//!
//! These are **hints**: a Python release, an expiry or an eviction writes nothing
//! to the log, lines are skipped when the watcher falls behind, and a server
//! may refuse `watch`. Waiters and group watches keep polling; a hint only makes
//! them look sooner. The log connection carries every store on the server, so it
//! is closed as soon as nothing waits; `mutation_log=false` in the URL turns it off.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::Stream;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::broadcast;

/// Prefix of the marker key a release stores (12 bytes, as long as the fencing
/// counter prefix, so every lock key's marker fits memcached's 250 bytes).
pub(crate) const FREE_PREFIX: &[u8] = b"__TOOZ_FREE_";

/// The marker key of a lock or leader key.
pub(crate) fn marker(key: &[u8]) -> Vec<u8> {
    let mut m = FREE_PREFIX.to_vec();
    m.extend_from_slice(key);
    m
}

/// How often the log reader checks whether anyone still waits.
const IDLE_CHECK: Duration = Duration::from_secs(1);

#[derive(Debug, Default)]
struct State {
    /// Who waits on which key.
    subs: HashMap<Vec<u8>, broadcast::Sender<()>>,
    /// A log reader is connected.
    running: bool,
    /// The server refused `watch` (or the option is off): never try again.
    refused: bool,
}

/// The mutation-log reader of one coordinator.
#[derive(Debug)]
pub(crate) struct Notifier {
    address: String,
    timeout: Duration,
    state: Mutex<State>,
}

impl Notifier {
    pub(crate) fn new(address: String, timeout: Duration, enabled: bool) -> Self {
        Notifier {
            address,
            timeout,
            state: Mutex::new(State {
                refused: !enabled,
                ..State::default()
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A stream that yields when one of `keys` is stored (or the log skipped
    /// lines), and ends when the log connection fails. `None` when the server has
    /// no usable log. Returns once the log connection is open, so a change made
    /// after this call is seen.
    pub(crate) async fn subscribe(
        self: &Arc<Self>,
        keys: &[Vec<u8>],
    ) -> Option<impl Stream<Item = ()> + Send + 'static + use<>> {
        if self.state().refused {
            return None;
        }
        let needs_reader = !self.state().running;
        if needs_reader {
            match tokio::time::timeout(self.timeout, open_log(&self.address)).await {
                Ok(Ok(Some(reader))) => {
                    let mut st = self.state();
                    if st.running {
                        // Another subscriber opened one meanwhile: use that.
                        drop(reader);
                    } else {
                        st.running = true;
                        tokio::spawn(Arc::clone(self).read_log(reader));
                    }
                }
                Ok(Ok(None)) => {
                    tracing::info!(
                        "memcached: the server refuses `watch mutations`; waiters and watches poll only"
                    );
                    self.state().refused = true;
                    return None;
                }
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "memcached: cannot open the mutation log");
                    return None;
                }
                Err(_) => return None,
            }
        }
        let mut st = self.state();
        if !st.running {
            return None;
        }
        let rxs: Vec<broadcast::Receiver<()>> = keys
            .iter()
            .map(|k| {
                st.subs
                    .entry(k.clone())
                    .or_insert_with(|| broadcast::channel(1).0)
                    .subscribe()
            })
            .collect();
        Some(futures_util::stream::select_all(rxs.into_iter().map(
            |rx| {
                Box::pin(futures_util::stream::unfold(rx, |mut rx| async move {
                    match rx.recv().await {
                        Ok(()) | Err(broadcast::error::RecvError::Lagged(_)) => Some(((), rx)),
                        Err(broadcast::error::RecvError::Closed) => None,
                    }
                }))
            },
        )))
    }

    /// Reads the log until it fails or nothing waits any more; then ends every
    /// subscriber's stream (they fall back to polling, and resubscribe).
    async fn read_log(self: Arc<Self>, mut reader: BufReader<TcpStream>) {
        let mut line = Vec::new();
        let mut idle = tokio::time::interval(IDLE_CHECK);
        idle.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                r = reader.read_until(b'\n', &mut line) => {
                    match r {
                        Ok(n) if n > 0 => {}
                        Ok(_) => break,
                        Err(e) => {
                            tracing::debug!(error = %e, "memcached: the mutation log connection failed");
                            break;
                        }
                    }
                    self.dispatch(&line);
                    line.clear();
                }
                _ = idle.tick() => {
                    let mut st = self.state();
                    st.subs.retain(|_, tx| tx.receiver_count() > 0);
                    if st.subs.is_empty() {
                        st.running = false;
                        return;
                    }
                }
            }
        }
        let mut st = self.state();
        st.running = false;
        st.subs.clear();
    }

    fn dispatch(&self, line: &[u8]) {
        let text = String::from_utf8_lossy(line);
        let st = self.state();
        if text.starts_with("skipped=") {
            // Lines were lost: anyone may have missed their key.
            for tx in st.subs.values() {
                let _ = tx.send(());
            }
            return;
        }
        let Some(key) = text
            .split_ascii_whitespace()
            .find_map(|t| t.strip_prefix("key="))
        else {
            return;
        };
        let key = percent_decode(key);
        let key = key.strip_prefix(FREE_PREFIX).unwrap_or(&key);
        if let Some(tx) = st.subs.get(key) {
            let _ = tx.send(());
        }
    }
}

/// Connects and asks for the mutation log: `None` when the server refuses.
async fn open_log(address: &str) -> std::io::Result<Option<BufReader<TcpStream>>> {
    let mut s = TcpStream::connect(address).await?;
    s.set_nodelay(true)?;
    s.write_all(b"watch mutations\r\n").await?;
    let mut reader = BufReader::new(s);
    let mut line = Vec::new();
    reader.read_until(b'\n', &mut line).await?;
    Ok((line.as_slice() == b"OK\r\n").then_some(reader))
}

/// memcached's logger may URI-encode keys (`%XX`).
fn percent_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Some(v) = std::str::from_utf8(&b[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_keys_are_decoded_and_markers_map_to_their_lock() {
        assert_eq!(percent_decode("a%20b%2"), b"a b%2".to_vec());
        assert_eq!(
            marker(b"__TOOZ_LOCK_x"),
            b"__TOOZ_FREE___TOOZ_LOCK_x".to_vec()
        );
        let n = Notifier::new(String::new(), Duration::from_secs(1), true);
        let (tx, mut rx) = broadcast::channel(1);
        n.state().subs.insert(b"__TOOZ_LOCK_x".to_vec(), tx);
        n.dispatch(b"ts=1.2 gid=3 type=item_store key=__TOOZ_LOCK_y status=stored cmd=set\n");
        assert!(rx.try_recv().is_err());
        n.dispatch(
            b"ts=1.2 gid=4 type=item_store key=__TOOZ_FREE___TOOZ_LOCK_x status=stored cmd=set\n",
        );
        assert!(rx.try_recv().is_ok());
        n.dispatch(b"skipped=3\n");
        assert!(rx.try_recv().is_ok());
    }
}
