//! One poller for every group a coordinator watches.
//!
//! memcached cannot push, and its mutation log (see the `notify` module) misses
//! expiries, evictions and Python writers. Instead of the core polling each
//! watched group on its own (a group read and a leader read per group and
//! interval), one task per coordinator reads, in **one pipelined round trip** on
//! the coordinator's connection, every watched group's map and leader key plus the
//! liveness key of every member those maps listed last time, and wakes only the
//! groups whose map, leader or set of dead members changed. The core then re-reads
//! those groups and emits the events.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use futures_util::Stream;
use tokio::sync::broadcast;
use tooz_core::GroupId;

use crate::driver::Inner;

/// What the poller compares between two reads of a group.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Snapshot {
    /// The group map's CAS value (`None`: the group is gone).
    pub(crate) group: Option<u64>,
    /// The leader key's value (`None`: no leader).
    pub(crate) leader: Option<Vec<u8>>,
    /// Members the map lists whose liveness key is gone.
    pub(crate) dead: BTreeSet<Vec<u8>>,
}

#[derive(Debug)]
struct Watched {
    tx: broadcast::Sender<()>,
    last: Snapshot,
    /// The members the map listed at the last read (their liveness keys are read
    /// at the next one).
    members: Vec<Vec<u8>>,
}

#[derive(Debug, Default)]
struct State {
    groups: HashMap<GroupId, Watched>,
    running: bool,
}

/// The watched groups of one coordinator and their poller.
#[derive(Debug, Default)]
pub(crate) struct Watcher {
    state: Mutex<State>,
}

/// A group to read at the next poll: its name and the members to check.
pub(crate) type Polled = (GroupId, Vec<Vec<u8>>);

impl Watcher {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Watches `group` from `first` (read before this call): a stream that yields
    /// when a later poll finds it changed. Starts the poller when none runs.
    pub(crate) fn subscribe(
        &self,
        inner: &Arc<Inner>,
        group: &GroupId,
        first: Snapshot,
        members: Vec<Vec<u8>>,
    ) -> impl Stream<Item = ()> + Send + 'static + use<> {
        let mut st = self.state();
        let rx = match st.groups.get(group) {
            Some(w) if w.tx.receiver_count() > 0 => w.tx.subscribe(),
            _ => {
                let (tx, rx) = broadcast::channel(1);
                st.groups.insert(
                    group.clone(),
                    Watched {
                        tx,
                        last: first,
                        members,
                    },
                );
                rx
            }
        };
        if !st.running {
            st.running = true;
            tokio::spawn(poll_loop(Arc::downgrade(inner)));
        }
        futures_util::stream::unfold(rx, |mut rx| async move {
            match rx.recv().await {
                Ok(()) | Err(broadcast::error::RecvError::Lagged(_)) => Some(((), rx)),
                Err(broadcast::error::RecvError::Closed) => None,
            }
        })
    }

    /// The groups still watched (forgetting those nobody listens to any more);
    /// `None`, and the poller marked stopped, when there are none.
    fn watched(&self) -> Option<Vec<Polled>> {
        let mut st = self.state();
        st.groups.retain(|_, w| w.tx.receiver_count() > 0);
        if st.groups.is_empty() {
            st.running = false;
            return None;
        }
        Some(
            st.groups
                .iter()
                .map(|(g, w)| (g.clone(), w.members.clone()))
                .collect(),
        )
    }

    /// Records a poll's reads and wakes the groups that changed.
    fn record(&self, read: Vec<(GroupId, Snapshot, Vec<Vec<u8>>)>) {
        let mut st = self.state();
        for (g, snap, members) in read {
            if let Some(w) = st.groups.get_mut(&g) {
                if w.last != snap {
                    let _ = w.tx.send(());
                    w.last = snap;
                }
                w.members = members;
            }
        }
    }

    /// Ends every stream (the driver stopped).
    pub(crate) fn clear(&self) {
        self.state().groups.clear();
    }
}

/// Polls every watched group each `watch_interval` until none is watched or the
/// driver is gone.
async fn poll_loop(inner: Weak<Inner>) {
    let every = match inner.upgrade() {
        Some(i) => i.config.watch_interval,
        None => return,
    };
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(i) = inner.upgrade() else { return };
        let Some(groups) = i.watcher.watched() else {
            return;
        };
        match i.poll_groups(&groups).await {
            Ok(read) => i.watcher.record(read),
            Err(e) => tracing::debug!(error = %e, "memcached: polling the watched groups failed"),
        }
    }
}
