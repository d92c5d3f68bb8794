//! A consistent-hash partitioner over a group's members, hash-compatible with
//! Python tooz's `Partitioner`.
//!
//! Objects are hashed by their [`ToozHash`] bytes (Python hashes `str(obj)` as
//! UTF-8, so `"abc"` and `42` hash the same here and there). Member weights come
//! from the `weight` key of each member's capabilities (default 1). The ring follows
//! joins and leaves seen by [`Coordinator::run_watchers`], as in tooz; call
//! [`Partitioner::refresh`] to rebuild it from the backend at any time.

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::fmt;
use std::sync::{Arc, RwLock};

use crate::coordinator::Coordinator;
use crate::error::{Result, ToozError};
use crate::events::GroupEvent;
use crate::hashring::HashRing;
use crate::ids::{GroupId, MemberId};

/// How an object is turned into the bytes the ring hashes.
///
/// Implemented for text (its UTF-8 bytes) and integers (their decimal text), which
/// is what Python tooz hashes for `str` and `int` objects. Byte slices hash verbatim
/// (Python would hash their `repr`; implement this trait on a newtype to match that).
pub trait ToozHash {
    /// The bytes to hash.
    fn tooz_hash(&self) -> Cow<'_, [u8]>;
}

impl ToozHash for str {
    fn tooz_hash(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(self.as_bytes())
    }
}
impl ToozHash for String {
    fn tooz_hash(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(self.as_bytes())
    }
}
impl ToozHash for [u8] {
    fn tooz_hash(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(self)
    }
}
impl ToozHash for Vec<u8> {
    fn tooz_hash(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(self)
    }
}
macro_rules! int_hash {
    ($($t:ty),*) => {$(
        impl ToozHash for $t {
            fn tooz_hash(&self) -> Cow<'_, [u8]> {
                Cow::Owned(self.to_string().into_bytes())
            }
        }
    )*};
}
int_hash!(
    i8, i16, i32, i64, i128, u8, u16, u32, u64, u128, usize, isize
);

impl<T: ToozHash + ?Sized> ToozHash for &T {
    fn tooz_hash(&self) -> Cow<'_, [u8]> {
        (**self).tooz_hash()
    }
}

pub(crate) struct PartitionerState {
    pub(crate) group: GroupId,
    ring: RwLock<HashRing>,
}

impl PartitionerState {
    fn ring(&self) -> std::sync::RwLockReadGuard<'_, HashRing> {
        self.ring.read().unwrap_or_else(|p| p.into_inner())
    }

    fn ring_mut(&self) -> std::sync::RwLockWriteGuard<'_, HashRing> {
        self.ring.write().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) async fn apply(&self, coord: &Coordinator, events: &[GroupEvent]) -> Result<()> {
        for ev in events {
            match ev {
                GroupEvent::MemberJoined { member, .. } => {
                    match coord
                        .driver()
                        .get_member_capabilities(&self.group, member)
                        .await
                    {
                        Ok(caps) => self.ring_mut().add_node(member, caps.weight()),
                        // Gone again before we looked: its leave event follows.
                        Err(ToozError::MemberNotJoined { .. } | ToozError::GroupNotCreated(_)) => {}
                        Err(e) => return Err(e),
                    }
                }
                GroupEvent::MemberLeft { member, .. } => {
                    // A leave for a member the ring never had is not an error (tooz
                    // raised UnknownNode here).
                    let _ = self.ring_mut().remove_node(member);
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// Maps objects to the members of a group that own them.
///
/// ```no_run
/// # async fn demo(coord: tooz_core::Coordinator) -> tooz_core::Result<()> {
/// let p = coord.join_partitioned_group("workers", 1, 32).await?;
/// coord.run_watchers(None).await?; // follow joins and leaves
/// if p.belongs_to_self("job-17", 1) {
///     println!("job-17 is mine");
/// }
/// coord.leave_partitioned_group(p).await?;
/// # Ok(()) }
/// ```
pub struct Partitioner {
    coord: Coordinator,
    state: Arc<PartitionerState>,
    partitions: u32,
}

impl fmt::Debug for Partitioner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Partitioner")
            .field("group", &self.state.group)
            .field("partitions", &self.partitions)
            .field("members", &self.state.ring().node_count())
            .finish()
    }
}

impl Partitioner {
    /// A partitioner over `group` (which this coordinator need not have joined).
    ///
    /// # Errors
    /// `GroupNotCreated`, backend errors.
    pub async fn new(
        coord: &Coordinator,
        group: impl Into<GroupId>,
        partitions: u32,
    ) -> Result<Self> {
        let state = Arc::new(PartitionerState {
            group: group.into(),
            ring: RwLock::new(HashRing::with_partitions(partitions)),
        });
        coord.register_partitioner(&state).await?;
        let p = Partitioner {
            coord: coord.clone(),
            state,
            partitions,
        };
        if let Err(e) = p.refresh().await {
            coord.unregister_partitioner(&p.state);
            return Err(e);
        }
        Ok(p)
    }

    /// Rebuilds the ring from the group's current members and weights (one call).
    ///
    /// # Errors
    /// `GroupNotCreated`, backend errors.
    pub async fn refresh(&self) -> Result<()> {
        let members = self
            .coord
            .driver()
            .get_members_with_capabilities(&self.state.group)
            .await?;
        let mut ring = HashRing::with_partitions(self.partitions);
        for (m, caps) in members {
            ring.add_node(&m, caps.weight());
        }
        *self.state.ring_mut() = ring;
        Ok(())
    }

    /// The group this partitioner follows.
    pub fn group_id(&self) -> &GroupId {
        &self.state.group
    }

    /// Points per unit of weight.
    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    /// A copy of the current ring.
    pub fn ring(&self) -> HashRing {
        self.state.ring().clone()
    }

    /// The members owning `obj`: `replicas` distinct members, primary first,
    /// skipping `ignore`.
    pub fn members_for_object<T: ToozHash + ?Sized>(
        &self,
        obj: &T,
        ignore: &[MemberId],
        replicas: usize,
    ) -> Vec<MemberId> {
        let key = obj.tooz_hash();
        let mut found = Vec::with_capacity(replicas.min(4));
        // The ring's node bytes are shared: the ids are handed out without copies.
        self.state.ring().walk(&key, ignore, replicas, |node| {
            found.push(MemberId::from_shared(Arc::clone(node)));
        });
        found
    }

    /// Whether `member` is among the `replicas` owners of `obj`.
    pub fn belongs_to_member<T: ToozHash + ?Sized>(
        &self,
        obj: &T,
        member: &MemberId,
        replicas: usize,
    ) -> bool {
        let key = obj.tooz_hash();
        let mut owns = false;
        self.state
            .ring()
            .walk(&key, &[] as &[&[u8]], replicas, |node| {
                owns |= **node == *member.as_bytes();
            });
        owns
    }

    /// Whether this coordinator's member is among the owners of `obj`.
    pub fn belongs_to_self<T: ToozHash + ?Sized>(&self, obj: &T, replicas: usize) -> bool {
        self.belongs_to_member(obj, self.coord.member_id(), replicas)
    }

    /// The members currently in the ring with their weights.
    pub fn members(&self) -> BTreeSet<(MemberId, u32)> {
        self.state
            .ring()
            .nodes()
            .map(|(n, w)| (MemberId::from(n), w))
            .collect()
    }

    /// Stops following the group.
    pub fn stop(&self) {
        self.coord.unregister_partitioner(&self.state);
    }
}

impl Drop for Partitioner {
    fn drop(&mut self) {
        self.coord.unregister_partitioner(&self.state);
    }
}
