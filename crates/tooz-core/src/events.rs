//! Group events, watch ids and event streams.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::{Stream, StreamExt};
use tokio::sync::broadcast;

use crate::ids::{GroupId, MemberId};

/// Something that happened in a group.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum GroupEvent {
    /// A member joined (tooz `MemberJoinedGroup`).
    MemberJoined {
        /// The group.
        group: GroupId,
        /// The member.
        member: MemberId,
    },
    /// A member left or expired (tooz `MemberLeftGroup`).
    MemberLeft {
        /// The group.
        group: GroupId,
        /// The member.
        member: MemberId,
    },
    /// A member became the group's leader (tooz `LeaderElected`).
    LeaderElected {
        /// The group.
        group: GroupId,
        /// The new leader.
        member: MemberId,
    },
    /// A member stopped leading the group (stood down, stopped, or lost its lease).
    LeadershipLost {
        /// The group.
        group: GroupId,
        /// The former leader.
        member: MemberId,
    },
    /// The stream fell behind and `missed` events were dropped; re-read the state.
    Lagged {
        /// The group.
        group: GroupId,
        /// How many events were dropped.
        missed: u64,
    },
}

impl GroupEvent {
    /// The group of the event.
    pub fn group(&self) -> &GroupId {
        match self {
            GroupEvent::MemberJoined { group, .. }
            | GroupEvent::MemberLeft { group, .. }
            | GroupEvent::LeaderElected { group, .. }
            | GroupEvent::LeadershipLost { group, .. }
            | GroupEvent::Lagged { group, .. } => group,
        }
    }

    /// The member of the event, if it has one.
    pub fn member(&self) -> Option<&MemberId> {
        match self {
            GroupEvent::MemberJoined { member, .. }
            | GroupEvent::MemberLeft { member, .. }
            | GroupEvent::LeaderElected { member, .. }
            | GroupEvent::LeadershipLost { member, .. } => Some(member),
            GroupEvent::Lagged { .. } => None,
        }
    }
}

impl fmt::Display for GroupEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GroupEvent::MemberJoined { group, member } => {
                write!(f, "group {group}: +member {member}")
            }
            GroupEvent::MemberLeft { group, member } => {
                write!(f, "group {group}: -member {member}")
            }
            GroupEvent::LeaderElected { group, member } => {
                write!(f, "group {group}: leader {member}")
            }
            GroupEvent::LeadershipLost { group, member } => {
                write!(f, "group {group}: leader {member} stepped down")
            }
            GroupEvent::Lagged { group, missed } => {
                write!(f, "group {group}: {missed} events missed")
            }
        }
    }
}

/// Identifies a registered watch callback (closures cannot be compared).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WatchId(pub(crate) u64);

impl WatchId {
    /// The raw number.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for WatchId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// A stream of one group's events, pushed by the backend where it can push.
///
/// Obtained from [`Coordinator::events`](crate::Coordinator::events). Ends when the
/// coordinator stops. A receiver that falls behind gets a [`GroupEvent::Lagged`].
pub struct EventStream {
    inner: Pin<Box<dyn Stream<Item = GroupEvent> + Send + 'static>>,
}

impl fmt::Debug for EventStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EventStream")
    }
}

impl EventStream {
    pub(crate) fn new(group: GroupId, rx: broadcast::Receiver<GroupEvent>) -> Self {
        let s = futures_util::stream::unfold((group, rx), |(group, mut rx)| async move {
            match rx.recv().await {
                Ok(ev) => Some((ev, (group, rx))),
                Err(broadcast::error::RecvError::Lagged(missed)) => Some((
                    GroupEvent::Lagged {
                        group: group.clone(),
                        missed,
                    },
                    (group, rx),
                )),
                Err(broadcast::error::RecvError::Closed) => None,
            }
        });
        EventStream { inner: Box::pin(s) }
    }

    /// The next event; `None` once the coordinator stopped.
    pub async fn next_event(&mut self) -> Option<GroupEvent> {
        self.inner.next().await
    }
}

impl Stream for EventStream {
    type Item = GroupEvent;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<GroupEvent>> {
        self.inner.as_mut().poll_next(cx)
    }
}
