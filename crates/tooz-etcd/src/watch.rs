//! Group events from an etcd watch on the group's prefix (members) and on its
//! leader key, resumed from the last seen revision after a broken stream.

use std::collections::VecDeque;
use std::time::Duration;

use etcd_client::{Client, EventType, WatchOptions, WatchResponse, WatchStream};
use tooz_core::{DriverEvent, DriverEventStream, GroupId, MemberId, Result};

use crate::error::map_err;
use crate::keys;

struct St {
    client: Client,
    group_key: Vec<u8>,
    leader_key: Vec<u8>,
    stream: Option<WatchStream>,
    next_rev: i64,
    queue: VecDeque<DriverEvent>,
}

async fn open(
    client: &mut Client,
    group_key: &[u8],
    leader_key: &[u8],
    rev: i64,
) -> std::result::Result<WatchStream, etcd_client::Error> {
    let mut w = client
        .watch(
            group_key.to_vec(),
            Some(WatchOptions::new().with_prefix().with_start_revision(rev)),
        )
        .await?;
    w.watch(
        leader_key.to_vec(),
        Some(WatchOptions::new().with_start_revision(rev)),
    )
    .await?;
    Ok(w)
}

/// The events one watch response carries.
fn events_of(group_key: &[u8], r: &WatchResponse) -> Vec<DriverEvent> {
    let mut out = Vec::new();
    for ev in r.events() {
        let Some(kv) = ev.kv() else { continue };
        let member = keys::member_of_key(group_key, kv.key()).filter(|m| !m.contains(&b'/'));
        match (member, ev.event_type()) {
            (Some(m), EventType::Put) if kv.version() == 1 => {
                out.push(DriverEvent::Joined(MemberId::new(m)));
            }
            (Some(m), EventType::Delete) => out.push(DriverEvent::Left(MemberId::new(m))),
            _ => out.push(DriverEvent::Changed),
        }
    }
    out
}

/// The driver event stream of one group, starting after revision `rev - 1`.
pub(crate) async fn group_events(
    mut client: Client,
    group: &GroupId,
    rev: i64,
) -> Result<DriverEventStream> {
    let group_key = keys::group(group.as_bytes());
    let leader_key = keys::leader(group.as_bytes());
    let stream = open(&mut client, &group_key, &leader_key, rev)
        .await
        .map_err(|e| map_err("watching the group", e))?;
    let st = St {
        client,
        group_key,
        leader_key,
        stream: Some(stream),
        next_rev: rev,
        queue: VecDeque::new(),
    };
    Ok(Box::pin(futures_util::stream::unfold(
        st,
        |mut st| async move {
            loop {
                if let Some(ev) = st.queue.pop_front() {
                    return Some((ev, st));
                }
                let Some(w) = st.stream.as_mut() else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    match open(&mut st.client, &st.group_key, &st.leader_key, st.next_rev).await {
                        Ok(w) => {
                            st.stream = Some(w);
                            // Events may have been missed: the core re-reads.
                            return Some((DriverEvent::Changed, st));
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "etcd: re-opening a group watch failed");
                            continue;
                        }
                    }
                };
                match w.message().await {
                    Ok(Some(r)) => {
                        if r.compact_revision() > 0 {
                            st.next_rev = r.compact_revision();
                            st.stream = None;
                            st.queue.push_back(DriverEvent::Changed);
                            continue;
                        }
                        if r.canceled() {
                            st.stream = None;
                            continue;
                        }
                        if let Some(last) = r.events().last().and_then(|e| e.kv()) {
                            st.next_rev = st.next_rev.max(last.mod_revision() + 1);
                        }
                        st.queue.extend(events_of(&st.group_key, &r));
                    }
                    Ok(None) | Err(_) => {
                        st.stream = None;
                    }
                }
            }
        },
    )))
}
