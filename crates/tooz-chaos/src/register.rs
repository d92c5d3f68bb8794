//! The orchestrator's loopback server: the event log of every client and the **fenced
//! register**, the shared resource that accepts a write only with a fencing token above
//! the last one it accepted for that key.
//!
//! Protocol: one JSON [`Event`] per line from the client. A `write` event (key in
//! `lock`, token in `token`) is answered `ok` or `stale`; an `idle` event (the client's
//! workload is over) is answered `bye` once the orchestrator has checked the final
//! membership. Everything else is only recorded. Clients reach this server directly,
//! never through their fault proxy.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
};

use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
    sync::{Notify, watch},
};

use crate::Event;

/// State shared by the connections, the nemesis and the orchestrator.
#[derive(Debug)]
pub(crate) struct Shared {
    history: Mutex<Vec<Event>>,
    /// Per key: the last accepted token and who wrote it.
    fence: Mutex<HashMap<String, (u64, String)>>,
    /// Clients whose workload is over, with their `idle` event.
    idle: Mutex<HashMap<String, Event>>,
    /// Which lock each client holds now (from its own events).
    held: Mutex<HashMap<String, String>>,
    /// Set when the clients may leave.
    bye: watch::Sender<bool>,
    /// Woken on every `idle`.
    pub(crate) changed: Notify,
}

fn guard<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Shared {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Shared {
            history: Mutex::new(Vec::new()),
            fence: Mutex::new(HashMap::new()),
            idle: Mutex::new(HashMap::new()),
            held: Mutex::new(HashMap::new()),
            bye: watch::channel(false).0,
            changed: Notify::new(),
        })
    }

    /// Appends an event to the history.
    pub(crate) fn record(&self, ev: Event) {
        match ev.ev.as_str() {
            "acquired" => {
                if let Some(lock) = &ev.lock {
                    guard(&self.held).insert(ev.c.clone(), lock.clone());
                }
            }
            "released" | "lost" => {
                guard(&self.held).remove(&ev.c);
            }
            _ => {}
        }
        guard(&self.history).push(ev);
    }

    /// The fenced write: accepted when `token` is above the key's last accepted token
    /// (or equal to it from the same writer: a leader writing again in its term).
    ///
    /// The event is stamped with the time of the decision and recorded under the fence's
    /// lock, so the history orders writes as the register decided them (the client's own
    /// stamp is taken before the request travels, and two writers' requests can arrive
    /// in the other order).
    fn write(&self, mut ev: Event) -> bool {
        let key = ev.lock.clone().unwrap_or_default();
        let token = ev.token.unwrap_or(0);
        let mut fence = guard(&self.fence);
        let accepted = match fence.get(&key) {
            None => true,
            Some((last, writer)) => token > *last || (token == *last && *writer == ev.c),
        };
        if accepted {
            fence.insert(key, (token, ev.c.clone()));
        }
        ev.t = crate::now_ns();
        ev.ok = Some(accepted);
        self.record(ev);
        drop(fence);
        accepted
    }

    /// A copy of the history so far.
    pub(crate) fn history(&self) -> Vec<Event> {
        guard(&self.history).clone()
    }

    /// The clients that reported the end of their workload.
    pub(crate) fn idle(&self) -> HashMap<String, Event> {
        guard(&self.idle).clone()
    }

    /// Which lock `client` holds, as it last reported.
    pub(crate) fn holders(&self) -> HashMap<String, String> {
        guard(&self.held).clone()
    }

    /// Lets every idle client leave.
    pub(crate) fn say_bye(&self) {
        self.bye.send_replace(true);
    }
}

/// Serves clients on `listener` until the process ends.
pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    while let Ok((stream, _)) = listener.accept().await {
        tokio::spawn(connection(stream, Arc::clone(&shared)));
    }
}

async fn connection(stream: TcpStream, shared: Arc<Shared>) {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let ev: Event = match serde_json::from_str(&line) {
            Ok(ev) => ev,
            Err(e) => {
                shared
                    .record(Event::new("orchestrator", "bad-line").detail(format!("{e}: {line}")));
                continue;
            }
        };
        match ev.ev.as_str() {
            "write" => {
                let reply: &[u8] = if shared.write(ev) {
                    b"ok\n"
                } else {
                    b"stale\n"
                };
                if write.write_all(reply).await.is_err() {
                    return;
                }
            }
            "idle" => {
                guard(&shared.idle).insert(ev.c.clone(), ev.clone());
                shared.record(ev);
                shared.changed.notify_waiters();
                let mut bye = shared.bye.subscribe();
                if bye.wait_for(|b| *b).await.is_err() || write.write_all(b"bye\n").await.is_err() {
                    return;
                }
            }
            _ => shared.record(ev),
        }
    }
}
