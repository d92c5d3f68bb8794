//! Group events from one persistent recursive ZooKeeper watch on the group
//! directory: a member node created or deleted is a join or a leave; anything
//! in the election directory, the group node itself, or a reconnection (events
//! may be missed while disconnected) makes the core re-read the group.

use std::sync::Arc;

use tokio::sync::mpsc;
use tooz_core::{DriverEvent, DriverEventStream, MemberId};
use zookeeper_client::{AddWatchMode, EventType, PersistentWatcher, SessionState};

use crate::layout::{Layout, decode_id, is_member_child};
use crate::session::Sessions;

/// What one watched event means for the group.
pub(crate) fn classify(
    layout: &Layout,
    group_name: &str,
    ty: EventType,
    path: &str,
) -> Option<DriverEvent> {
    let (g, below) = layout.split_group_path(path)?;
    if g != group_name {
        return None;
    }
    match below {
        None => Some(DriverEvent::Changed),
        Some(rest) if !rest.contains('/') && is_member_child(rest) => {
            let m = MemberId::new(decode_id(rest));
            match ty {
                EventType::NodeCreated => Some(DriverEvent::Joined(m)),
                EventType::NodeDeleted => Some(DriverEvent::Left(m)),
                _ => None,
            }
        }
        // The election directory and its contenders.
        Some(_) => match ty {
            EventType::NodeCreated | EventType::NodeDeleted => Some(DriverEvent::Changed),
            _ => None,
        },
    }
}

/// The stream of a group's events, fed by a task that ends when the stream is
/// dropped.
pub(crate) fn group_events(
    sessions: Arc<Sessions>,
    layout: Layout,
    group_path: String,
    group_name: String,
    watcher: PersistentWatcher,
) -> DriverEventStream {
    let (tx, rx) = mpsc::channel::<DriverEvent>(256);
    tokio::spawn(async move {
        let mut watcher = Some(watcher);
        loop {
            let Some(w) = watcher.as_mut() else {
                // Re-watch on the next session.
                let mut cur = sessions.subscribe();
                let s = loop {
                    if let Some(s) = cur.borrow_and_update().clone() {
                        break s;
                    }
                    tokio::select! {
                        r = cur.changed() => if r.is_err() { return },
                        () = tx.closed() => return,
                    }
                };
                match s
                    .client
                    .watch(&group_path, AddWatchMode::PersistentRecursive)
                    .await
                {
                    Ok(w) => {
                        watcher = Some(w);
                        if tx.send(DriverEvent::Changed).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "zookeeper: re-watching a group failed; retrying");
                        drop(s);
                        tokio::select! {
                            _ = tokio::time::sleep(std::time::Duration::from_millis(200)) => {}
                            () = tx.closed() => return,
                        }
                    }
                }
                continue;
            };
            let ev = tokio::select! {
                ev = w.changed() => ev,
                () = tx.closed() => return,
            };
            let out = if ev.event_type == EventType::Session {
                match ev.session_state {
                    // Events during the disconnection may be lost: re-read.
                    SessionState::SyncConnected | SessionState::ConnectedReadOnly => {
                        Some(DriverEvent::Changed)
                    }
                    SessionState::Disconnected => None,
                    _ => {
                        // Terminal: this watcher is done (calling it again panics).
                        watcher = None;
                        None
                    }
                }
            } else {
                classify(&layout, &group_name, ev.event_type, &ev.path)
            };
            if let Some(e) = out
                && tx.send(e).await.is_err()
            {
                return;
            }
        }
    });
    Box::pin(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|e| (e, rx))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_from_paths() {
        let l = Layout::new("/tooz".into());
        let c = |ty, p: &str| classify(&l, "g", ty, p);
        assert_eq!(
            c(EventType::NodeCreated, "/tooz/g/m1"),
            Some(DriverEvent::Joined("m1".into()))
        );
        assert_eq!(
            c(EventType::NodeDeleted, "/tooz/g/%%FF"),
            Some(DriverEvent::Left(MemberId::new([0xff])))
        );
        assert_eq!(c(EventType::NodeDataChanged, "/tooz/g/m1"), None);
        assert_eq!(
            c(EventType::NodeCreated, "/tooz/g/leader/x__lock__0000000001"),
            Some(DriverEvent::Changed)
        );
        // The leader resigning (or its session ending) wakes waiting candidates.
        assert_eq!(
            c(EventType::NodeDeleted, "/tooz/g/leader/x__lock__0000000001"),
            Some(DriverEvent::Changed)
        );
        assert_eq!(
            c(EventType::NodeDeleted, "/tooz/g/leader/x__lock__-000000005"),
            Some(DriverEvent::Changed)
        );
        assert_eq!(
            c(EventType::NodeCreated, "/tooz/g/leader"),
            Some(DriverEvent::Changed)
        );
        assert_eq!(
            c(EventType::NodeDeleted, "/tooz/g"),
            Some(DriverEvent::Changed)
        );
        assert_eq!(c(EventType::NodeCreated, "/tooz/g2/m"), None);
    }
}
