//! Push from blocking queries: one long-poll per watched prefix per coordinator
//! (every group's members, every leader key, every lock key), shared by everything
//! that watches it, and stopped when the last watcher goes. The first
//! [`OWN_GROUP_POLLS`] watched groups get a long-poll on their own prefix; further
//! ones share one on every group's prefix and pick their group's keys out of it.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::watch;
use tooz_core::util::Backoff;
use tooz_core::{DriverEvent, DriverEventStream, MemberId};

use crate::client::{Client, Kv};
use crate::driver::guard;
use crate::keys::Layout;

/// How many watched groups of one coordinator get a long-poll of their own; the
/// rest share one on `<ns>/groups/` (whose every return carries every group's keys,
/// so it is the cheaper choice only once many groups are watched).
pub(crate) const OWN_GROUP_POLLS: usize = 4;

/// How long one blocking query waits for a change.
pub(crate) const WAIT: Duration = Duration::from_secs(30);

/// A prefix's content at a Consul index.
#[derive(Debug)]
pub(crate) struct Snapshot {
    pub(crate) entries: Vec<Kv>,
}

type Snap = Option<Arc<Snapshot>>;
type Map = Arc<Mutex<HashMap<String, Arc<watch::Sender<Snap>>>>>;

/// The long-polls of one coordinator.
#[derive(Debug)]
pub(crate) struct Hubs {
    map: Map,
    stop: watch::Sender<bool>,
}

impl Hubs {
    pub(crate) fn new() -> Self {
        Hubs {
            map: Arc::new(Mutex::new(HashMap::new())),
            stop: watch::channel(false).0,
        }
    }

    /// Stops every long-poll (their watchers' streams end).
    pub(crate) fn stop(&self) {
        self.stop.send_replace(true);
        guard(&self.map).clear();
    }

    /// Allows long-polls again (after a restart).
    pub(crate) fn restart(&self) {
        self.stop.send_replace(false);
    }

    /// How many long-polls run on prefixes that start with `parent` (and are not
    /// `parent` itself).
    pub(crate) fn under(&self, parent: &str) -> usize {
        guard(&self.map)
            .keys()
            .filter(|k| k.len() > parent.len() && k.starts_with(parent))
            .count()
    }

    /// A receiver of `prefix`'s snapshots, starting its long-poll if none runs.
    pub(crate) fn subscribe(&self, client: &Client, prefix: &str) -> watch::Receiver<Snap> {
        self.subscribe_as(client, prefix, false)
    }

    /// [`subscribe`](Self::subscribe) to key names only (a group watch needs no
    /// more: members are keys); one prefix is always watched in one way.
    pub(crate) fn subscribe_keys(&self, client: &Client, prefix: &str) -> watch::Receiver<Snap> {
        self.subscribe_as(client, prefix, true)
    }

    fn subscribe_as(
        &self,
        client: &Client,
        prefix: &str,
        keys_only: bool,
    ) -> watch::Receiver<Snap> {
        let mut m = guard(&self.map);
        if let Some(tx) = m.get(prefix) {
            return tx.subscribe();
        }
        let (tx, rx) = watch::channel(None);
        let tx = Arc::new(tx);
        m.insert(prefix.to_string(), Arc::clone(&tx));
        tokio::spawn(poll(
            Arc::clone(&self.map),
            prefix.to_string(),
            tx,
            client.clone(),
            self.stop.subscribe(),
            keys_only,
        ));
        rx
    }
}

async fn poll(
    map: Map,
    prefix: String,
    tx: Arc<watch::Sender<Snap>>,
    client: Client,
    mut stop: watch::Receiver<bool>,
    keys_only: bool,
) {
    let mut index = 0u64;
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
    loop {
        if *stop.borrow() {
            return;
        }
        let q = client.list_blocking_as("watching a prefix", &prefix, index, WAIT, keys_only);
        let res = tokio::select! {
            r = q => Some(r),
            _ = tx.closed() => None,
            _ = stop.changed() => return,
        };
        match res {
            None => {
                let mut m = guard(&map);
                if tx.receiver_count() == 0 {
                    if m.get(&prefix).is_some_and(|t| Arc::ptr_eq(t, &tx)) {
                        m.remove(&prefix);
                    }
                    return;
                }
            }
            Some(Ok((entries, at))) => {
                backoff.reset();
                if index == 0 || at != index {
                    tx.send_replace(Some(Arc::new(Snapshot { entries })));
                }
                // Consul: an index that goes backwards means a reset.
                index = if at < index { 0 } else { at.max(1) };
            }
            Some(Err(e)) => {
                tracing::debug!(prefix = %prefix, error = %e, "consul: a blocking query failed; retrying");
                index = 0;
                let pause = backoff.next_delay();
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = stop.changed() => return,
                }
            }
        }
    }
}

/// What of a snapshot matters to a watcher: key, modify index and holder.
fn digest(s: &Snap, relevant: &dyn Fn(&Kv) -> bool) -> Option<Vec<(String, u64, Option<String>)>> {
    s.as_ref().map(|s| {
        s.entries
            .iter()
            .filter(|k| relevant(k))
            .map(|k| (k.key.clone(), k.modify_index, k.session.clone()))
            .collect()
    })
}

struct GroupState {
    members_rx: watch::Receiver<Snap>,
    leaders_rx: watch::Receiver<Snap>,
    group_key: String,
    leader_key: String,
    members: BTreeSet<Vec<u8>>,
    leader: Option<Vec<(String, u64, Option<String>)>>,
    queue: VecDeque<DriverEvent>,
}

fn members_of(group_key: &str, entries: &[Kv]) -> (bool, BTreeSet<Vec<u8>>) {
    let present = entries.iter().any(|k| k.key == group_key);
    let members = entries
        .iter()
        .filter_map(|k| Layout::member_of(group_key, &k.key))
        .collect();
    (present, members)
}

/// Group events from the group's prefix and the leader keys, diffed against
/// `initial` (the members read when the watch started).
pub(crate) fn group_events(
    members_rx: watch::Receiver<Snap>,
    leaders_rx: watch::Receiver<Snap>,
    group_key: String,
    leader_key: String,
    initial: &[Kv],
) -> DriverEventStream {
    let (_, members) = members_of(&group_key, initial);
    let lk = leader_key.clone();
    let leader = digest(&leaders_rx.borrow(), &move |k: &Kv| k.key == lk);
    let st = GroupState {
        members_rx,
        leaders_rx,
        group_key,
        leader_key,
        members,
        leader,
        queue: VecDeque::new(),
    };
    futures_util::stream::unfold(st, |mut st| async move {
        loop {
            if let Some(e) = st.queue.pop_front() {
                return Some((e, st));
            }
            tokio::select! {
                r = st.members_rx.changed() => {
                    r.ok()?;
                    let snap = st.members_rx.borrow_and_update().clone();
                    let Some(snap) = snap else { continue };
                    let (present, now) = members_of(&st.group_key, &snap.entries);
                    for m in now.difference(&st.members) {
                        st.queue.push_back(DriverEvent::Joined(MemberId::new(m)));
                    }
                    for m in st.members.difference(&now) {
                        st.queue.push_back(DriverEvent::Left(MemberId::new(m)));
                    }
                    if !present {
                        st.queue.push_back(DriverEvent::Changed);
                    }
                    st.members = now;
                }
                r = st.leaders_rx.changed() => {
                    r.ok()?;
                    let lk = st.leader_key.clone();
                    let now = digest(&st.leaders_rx.borrow_and_update(), &move |k: &Kv| k.key == lk);
                    if now.is_some() && now != st.leader {
                        st.leader = now;
                        st.queue.push_back(DriverEvent::Changed);
                    }
                }
            }
        }
    })
    .boxed()
}
