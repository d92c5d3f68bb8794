//! Consistent hash ring, hash-compatible with Python tooz's `tooz.hashring.HashRing`.
//!
//! Every node owns `partitions * weight` points on a 128-bit ring. Point `r`
//! (0-based) of a node whose key bytes are `k` is the MD5 digest of `k`
//! repeated `r + 2` times, read as a big-endian `u128`. A piece of data is
//! mapped to the node owning the first point strictly greater than the MD5
//! digest of the data (wrapping around to the smallest point). Replicas are
//! found by walking the ring clockwise from there, collecting distinct nodes.
//!
//! For the same nodes, weights, partition count and insertion order, the
//! lookups give the same nodes as Python tooz 9.1.0 (which returns them as an
//! unordered set; here they come in walk order, primary first).
//!
//! Differences from Python tooz, all in cases where Python misbehaves:
//!
//! * re-adding an existing node (with any weight) behaves as removing it and
//!   adding it again, so a weight change leaves no orphan points behind;
//! * when two nodes produce the same point (only possible when one node's key
//!   is a repetition of the other's, e.g. `ab` and `abab`), the node added last
//!   owns it, as in Python; removing that node hands the point back to the
//!   other node instead of deleting it for both;
//! * nodes of weight 0 are members of the ring but own no points and are never
//!   returned; lookups never loop forever.
//!
//! ```
//! use tooz_core::hashring::HashRing;
//!
//! let mut ring = HashRing::new();
//! ring.add_nodes([b"foo", b"bar"], 1);
//! assert_eq!(ring.len(), 64);
//! assert_eq!(ring.get_node(b"fake"), Some(&b"foo"[..]));
//! assert_eq!(ring.get_nodes(b"fake", &[b"foo"], 1), vec![&b"bar"[..]]);
//! ```

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use md5::{Digest, Md5};

/// Number of points per unit of weight used by [`HashRing::new`], as in Python tooz.
pub const DEFAULT_PARTITIONS: u32 = 32;

/// A consistent hash ring of byte-string nodes, compatible with Python tooz.
///
/// Lookups ([`get_node`](Self::get_node), [`get_nodes`](Self::get_nodes)) are
/// `O(log points)` to find the starting point and do not allocate besides the
/// returned `Vec`. Adding and removing nodes costs `O(points)`.
///
/// ```
/// use tooz_core::hashring::HashRing;
///
/// let mut ring = HashRing::new();
/// ring.add_node("node1", 1);
/// ring.add_node("node2", 1);
/// ring.add_node("node3", 1);
/// assert_eq!(
///     ring.get_nodes(b"object1", &[], 3),
///     vec![&b"node1"[..], &b"node3"[..], &b"node2"[..]],
/// );
/// ```
#[derive(Clone)]
pub struct HashRing {
    /// Points per unit of weight.
    partitions: u32,
    /// Members in insertion order: key bytes and weight. Shared (`Arc`) so that
    /// the partitioner hands out member ids without copying them.
    nodes: Vec<(Arc<[u8]>, u32)>,
    /// Key bytes -> position in `nodes`.
    index: HashMap<Arc<[u8]>, usize>,
    /// All points of all nodes as `(point, position in nodes)`, sorted.
    ///
    /// Colliding points appear once per owner; within a run of equal points the
    /// last entry (highest insertion position) owns the slot.
    points: Vec<(u128, usize)>,
    /// Number of distinct points (the Python `len(ring)`).
    distinct: usize,
    /// Number of members whose weight is non-zero.
    weighted: usize,
}

impl HashRing {
    /// Creates an empty ring with [`DEFAULT_PARTITIONS`] points per unit of weight.
    ///
    /// ```
    /// use tooz_core::hashring::{HashRing, DEFAULT_PARTITIONS};
    ///
    /// let ring = HashRing::new();
    /// assert_eq!(ring.partitions(), DEFAULT_PARTITIONS);
    /// assert!(ring.is_empty());
    /// ```
    pub fn new() -> Self {
        Self::with_partitions(DEFAULT_PARTITIONS)
    }

    /// Creates an empty ring with `partitions` points per unit of weight.
    ///
    /// With 0 partitions nodes can be added but own no points, so every lookup
    /// returns nothing.
    ///
    /// ```
    /// use tooz_core::hashring::HashRing;
    ///
    /// let mut ring = HashRing::with_partitions(8);
    /// ring.add_nodes(["foo", "bar", "baz"], 1);
    /// assert_eq!(ring.len(), 24);
    /// ```
    pub fn with_partitions(partitions: u32) -> Self {
        Self {
            partitions,
            nodes: Vec::new(),
            index: HashMap::new(),
            points: Vec::new(),
            distinct: 0,
            weighted: 0,
        }
    }

    /// Returns the number of points per unit of weight.
    ///
    /// ```
    /// use tooz_core::hashring::HashRing;
    ///
    /// assert_eq!(HashRing::with_partitions(16).partitions(), 16);
    /// ```
    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    /// Adds `node` with `weight`, creating `partitions * weight` points.
    ///
    /// If `node` is already a member it is first removed, so this also changes
    /// the weight of a node (unlike Python tooz, no stale points are left).
    /// A node of weight 0 is a member (see [`contains`](Self::contains)) but owns
    /// no points and is never returned by lookups.
    ///
    /// ```
    /// use tooz_core::hashring::HashRing;
    ///
    /// let mut ring = HashRing::new();
    /// ring.add_node("a", 3);
    /// assert_eq!(ring.len(), 96);
    /// ring.add_node("a", 1);
    /// assert_eq!(ring.len(), 32);
    /// assert_eq!(ring.weight("a"), Some(1));
    /// ```
    pub fn add_node(&mut self, node: impl AsRef<[u8]>, weight: u32) {
        self.add_nodes(std::iter::once(node), weight);
    }

    /// Adds every node of `nodes`, in order, each with `weight`.
    ///
    /// Equivalent to calling [`add_node`](Self::add_node) for each of them, but
    /// sorts the ring only once.
    ///
    /// ```
    /// use tooz_core::hashring::HashRing;
    ///
    /// let mut ring = HashRing::new();
    /// ring.add_nodes(["foo", "bar", "baz"], 2);
    /// assert_eq!(ring.node_count(), 3);
    /// assert_eq!(ring.len(), 3 * 2 * 32);
    /// ```
    pub fn add_nodes<I, N>(&mut self, nodes: I, weight: u32)
    where
        I: IntoIterator<Item = N>,
        N: AsRef<[u8]>,
    {
        // `points[..sorted_len]` stays sorted; new points are appended unsorted.
        let mut sorted_len = self.points.len();
        let count = u64::from(self.partitions) * u64::from(weight);
        for node in nodes {
            let key = node.as_ref();
            if let Some(&pos) = self.index.get(key) {
                self.detach(pos, &mut sorted_len);
            }
            let pos = self.nodes.len();
            let shared: Arc<[u8]> = Arc::from(key);
            self.nodes.push((Arc::clone(&shared), weight));
            self.index.insert(shared, pos);
            if weight > 0 {
                self.weighted += 1;
            }
            self.points.reserve(usize::try_from(count).unwrap_or(0));
            // Point r is md5(key * (r + 2)): seed with the key, then append it
            // once more before each digest.
            let mut hasher = Md5::new();
            hasher.update(key);
            for _ in 0..count {
                hasher.update(key);
                self.points.push((digest_to_u128(hasher.clone()), pos));
            }
        }
        if self.points.len() > sorted_len {
            self.points[sorted_len..].sort_unstable();
            // Two sorted runs: the stable sort merges them in linear time.
            self.points.sort();
        }
        self.recount();
    }

    /// Removes `node` and its points, returning its weight.
    ///
    /// # Errors
    ///
    /// Returns [`UnknownNode`] if `node` is not a member of the ring.
    ///
    /// ```
    /// use tooz_core::hashring::{HashRing, UnknownNode};
    ///
    /// let mut ring = HashRing::new();
    /// ring.add_node("a", 2);
    /// assert_eq!(ring.remove_node("a"), Ok(2));
    /// assert!(ring.is_empty());
    /// assert_eq!(ring.remove_node("a"), Err(UnknownNode(b"a".to_vec())));
    /// ```
    pub fn remove_node(&mut self, node: impl AsRef<[u8]>) -> Result<u32, UnknownNode> {
        let key = node.as_ref();
        let Some(&pos) = self.index.get(key) else {
            return Err(UnknownNode(key.to_vec()));
        };
        let mut sorted_len = self.points.len();
        let weight = self.detach(pos, &mut sorted_len);
        self.recount();
        Ok(weight)
    }

    /// Returns whether `node` is a member of the ring (including with weight 0).
    ///
    /// ```
    /// use tooz_core::hashring::HashRing;
    ///
    /// let mut ring = HashRing::new();
    /// ring.add_node("a", 0);
    /// assert!(ring.contains("a"));
    /// assert!(!ring.contains("b"));
    /// ```
    pub fn contains(&self, node: impl AsRef<[u8]>) -> bool {
        self.index.contains_key(node.as_ref())
    }

    /// Returns the weight of `node`, or `None` if it is not a member.
    ///
    /// ```
    /// use tooz_core::hashring::HashRing;
    ///
    /// let mut ring = HashRing::new();
    /// ring.add_node("a", 3);
    /// assert_eq!(ring.weight("a"), Some(3));
    /// assert_eq!(ring.weight("b"), None);
    /// ```
    pub fn weight(&self, node: impl AsRef<[u8]>) -> Option<u32> {
        let pos = *self.index.get(node.as_ref())?;
        self.nodes.get(pos).map(|(_, weight)| *weight)
    }

    /// Iterates over the members and their weights, in insertion order (a
    /// re-added node counts as added last).
    ///
    /// ```
    /// use tooz_core::hashring::HashRing;
    ///
    /// let mut ring = HashRing::new();
    /// ring.add_node("a", 1);
    /// ring.add_node("b", 2);
    /// let nodes: Vec<_> = ring.nodes().collect();
    /// assert_eq!(nodes, vec![(&b"a"[..], 1), (&b"b"[..], 2)]);
    /// ```
    pub fn nodes(&self) -> impl ExactSizeIterator<Item = (&[u8], u32)> {
        self.nodes.iter().map(|(key, weight)| (&**key, *weight))
    }

    /// Returns the number of members (including those of weight 0).
    ///
    /// ```
    /// use tooz_core::hashring::HashRing;
    ///
    /// let mut ring = HashRing::new();
    /// ring.add_nodes(["a", "b"], 1);
    /// assert_eq!(ring.node_count(), 2);
    /// ```
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    /// Returns the number of distinct points on the ring, like Python's `len(ring)`.
    ///
    /// ```
    /// use tooz_core::hashring::HashRing;
    ///
    /// let mut ring = HashRing::new();
    /// ring.add_node("a", 1);
    /// ring.add_node("b", 3);
    /// assert_eq!(ring.len(), 128);
    /// ```
    pub fn len(&self) -> usize {
        self.distinct
    }

    /// Returns whether the ring has no points (lookups then return nothing).
    ///
    /// ```
    /// use tooz_core::hashring::HashRing;
    ///
    /// let mut ring = HashRing::new();
    /// assert!(ring.is_empty());
    /// ring.add_node("a", 1);
    /// assert!(!ring.is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }

    /// Returns up to `replicas` distinct nodes for `data`, skipping the nodes
    /// in `ignore`, primary first.
    ///
    /// The walk starts at the first point strictly greater than `md5(data)` and
    /// goes clockwise. Fewer than `replicas` nodes are returned only when fewer
    /// nodes are eligible; an empty ring (or everything ignored) gives an empty
    /// `Vec`. Unknown nodes in `ignore` are allowed and have no effect.
    ///
    /// ```
    /// use tooz_core::hashring::HashRing;
    ///
    /// let mut ring = HashRing::new();
    /// ring.add_nodes(["foo", "bar", "baz"], 1);
    /// assert_eq!(
    ///     ring.get_nodes(b"fake", &[], 3),
    ///     vec![&b"foo"[..], &b"bar"[..], &b"baz"[..]],
    /// );
    /// assert_eq!(ring.get_nodes(b"fake", &[b"foo"], 1), vec![&b"bar"[..]]);
    /// assert!(ring.get_nodes(b"fake", &[b"foo", b"bar", b"baz"], 1).is_empty());
    /// ```
    pub fn get_nodes<'a>(
        &'a self,
        data: &[u8],
        ignore: &[&[u8]],
        replicas: usize,
    ) -> Vec<&'a [u8]> {
        let mut found = Vec::new();
        self.walk(data, ignore, replicas, |node| found.push(&**node));
        found
    }

    /// The walk behind [`get_nodes`](Self::get_nodes): calls `visit` with each of
    /// up to `replicas` distinct nodes for `data` not in `ignore`, primary first,
    /// and returns how many it visited. Hashes `data` once and allocates nothing.
    pub(crate) fn walk<'a, I: AsRef<[u8]>>(
        &'a self,
        data: &[u8],
        ignore: &[I],
        replicas: usize,
        mut visit: impl FnMut(&'a Arc<[u8]>),
    ) -> usize {
        let wanted = replicas.min(self.candidates(ignore));
        if wanted == 0 {
            return 0;
        }
        // The nodes found so far, as positions in `nodes`: on the stack for the
        // usual replica counts.
        let mut small = [usize::MAX; 8];
        let mut more = Vec::new();
        let mut count = 0;
        let total = self.points.len();
        let mut at = self.start(data);
        // One full turn visits every point, so it always finds every eligible
        // node; the bound only guards against looping forever.
        for _ in 0..total {
            if let Some(pos) = self.owner_pos(at)
                && let Some((node, _)) = self.nodes.get(pos)
                && !small[..count.min(small.len())].contains(&pos)
                && !more.contains(&pos)
                && !ignore.iter().any(|i| i.as_ref() == &**node)
            {
                if count < small.len() {
                    small[count] = pos;
                } else {
                    more.push(pos);
                }
                count += 1;
                visit(node);
                if count == wanted {
                    break;
                }
            }
            at += 1;
            if at == total {
                at = 0;
            }
        }
        count
    }

    /// Returns the primary node for `data`, or `None` if the ring is empty.
    ///
    /// Same as the first element of `get_nodes(data, &[], 1)`, without allocating.
    ///
    /// ```
    /// use tooz_core::hashring::HashRing;
    ///
    /// let mut ring = HashRing::new();
    /// assert_eq!(ring.get_node(b"fake"), None);
    /// ring.add_nodes(["foo", "bar"], 1);
    /// assert_eq!(ring.get_node(b"fake"), Some(&b"foo"[..]));
    /// assert_eq!(ring.get_node(b"fake-again"), Some(&b"bar"[..]));
    /// ```
    pub fn get_node<'a>(&'a self, data: &[u8]) -> Option<&'a [u8]> {
        if self.points.is_empty() {
            return None;
        }
        let mut at = self.start(data);
        // `start` lands on the first entry of a run of equal points; the last
        // entry of the run owns the slot.
        while let (Some(here), Some(next)) = (self.points.get(at), self.points.get(at + 1)) {
            if here.0 != next.0 {
                break;
            }
            at += 1;
        }
        self.points
            .get(at)
            .and_then(|&(_, pos)| self.nodes.get(pos))
            .map(|(key, _)| &**key)
    }

    /// Index of the first point strictly greater than `md5(data)`, wrapping to 0.
    /// Only meaningful on a non-empty ring.
    fn start(&self, data: &[u8]) -> usize {
        let hash = md5_u128(data);
        let at = self.points.partition_point(|&(point, _)| point <= hash);
        if at == self.points.len() { 0 } else { at }
    }

    /// The position in `nodes` of the node owning the slot of entry `at`, or
    /// `None` if a later-added node with the same point owns it.
    fn owner_pos(&self, at: usize) -> Option<usize> {
        let &(point, pos) = self.points.get(at)?;
        match self.points.get(at + 1) {
            Some(&(next, _)) if next == point => None,
            _ => Some(pos),
        }
    }

    /// Number of distinct nodes owning points that are not in `ignore`.
    fn candidates<I: AsRef<[u8]>>(&self, ignore: &[I]) -> usize {
        if self.points.is_empty() {
            return 0;
        }
        let ignored = ignore
            .iter()
            .enumerate()
            .filter(|&(i, node)| {
                !ignore[..i]
                    .iter()
                    .any(|seen| seen.as_ref() == node.as_ref())
                    && self.weight(node).is_some_and(|weight| weight > 0)
            })
            .count();
        self.weighted.saturating_sub(ignored)
    }

    /// Removes the member at `pos` and its points; returns its weight.
    ///
    /// `points[..*sorted_len]` must be sorted; `sorted_len` is updated so that it
    /// still delimits the (still sorted) prefix afterwards.
    fn detach(&mut self, pos: usize, sorted_len: &mut usize) -> u32 {
        let (key, weight) = self.nodes.remove(pos);
        self.index.remove(&key);
        for other in self.index.values_mut() {
            if *other > pos {
                *other -= 1;
            }
        }
        if weight > 0 {
            self.weighted -= 1;
        }
        let limit = *sorted_len;
        let mut seen = 0;
        let mut removed_sorted = 0;
        // Decrementing every position above `pos` keeps the relative order of
        // entries, so the sorted prefix stays sorted.
        self.points.retain_mut(|entry| {
            let keep = entry.1 != pos;
            if !keep && seen < limit {
                removed_sorted += 1;
            }
            if entry.1 > pos {
                entry.1 -= 1;
            }
            seen += 1;
            keep
        });
        *sorted_len = limit - removed_sorted;
        weight
    }

    /// Recomputes the number of distinct points.
    fn recount(&mut self) {
        self.distinct = match self.points.first() {
            None => 0,
            Some(_) => {
                1 + self
                    .points
                    .windows(2)
                    .filter(|pair| pair[0].0 != pair[1].0)
                    .count()
            }
        };
    }
}

impl Default for HashRing {
    /// Same as [`HashRing::new`]: an empty ring with [`DEFAULT_PARTITIONS`].
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for HashRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Nodes<'a>(&'a [(Arc<[u8]>, u32)]);
        impl fmt::Debug for Nodes<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_map()
                    .entries(
                        self.0
                            .iter()
                            .map(|(key, weight)| (String::from_utf8_lossy(key), weight)),
                    )
                    .finish()
            }
        }
        f.debug_struct("HashRing")
            .field("partitions", &self.partitions)
            .field("nodes", &Nodes(&self.nodes))
            .field("points", &self.distinct)
            .finish()
    }
}

/// Finalizes `hasher` and reads the digest as a big-endian `u128`.
fn digest_to_u128(hasher: Md5) -> u128 {
    let digest: [u8; 16] = hasher.finalize().into();
    u128::from_be_bytes(digest)
}

/// `md5(data)` read as a big-endian `u128`.
///
/// Data that fits one block with its padding (at most 55 bytes: most keys) is
/// padded on the stack and compressed once, without the streaming hasher's
/// buffering; longer data goes through [`Md5`].
fn md5_u128(data: &[u8]) -> u128 {
    const INIT: [u32; 4] = [0x6745_2301, 0xefcd_ab89, 0x98ba_dcfe, 0x1032_5476];
    if data.len() > 55 {
        let mut hasher = Md5::new();
        hasher.update(data);
        return digest_to_u128(hasher);
    }
    let mut block = [0u8; 64];
    block[..data.len()].copy_from_slice(data);
    block[data.len()] = 0x80;
    // At most 55 bytes: the bit length fits easily.
    let bits = (data.len() as u64) * 8;
    block[56..].copy_from_slice(&bits.to_le_bytes());
    let mut state = INIT;
    md5::block_api::compress(&mut state, std::slice::from_ref(&block));
    let mut digest = [0u8; 16];
    for (out, word) in digest.chunks_exact_mut(4).zip(state) {
        out.copy_from_slice(&word.to_le_bytes());
    }
    u128::from_be_bytes(digest)
}

/// Error returned by [`HashRing::remove_node`] for a node that is not a member.
///
/// Holds the node's bytes.
///
/// ```
/// use tooz_core::hashring::{HashRing, UnknownNode};
///
/// let err = HashRing::new().remove_node("ghost").unwrap_err();
/// assert_eq!(err, UnknownNode(b"ghost".to_vec()));
/// assert_eq!(err.to_string(), "unknown node `ghost`");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownNode(pub Vec<u8>);

impl fmt::Display for UnknownNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown node `{}`", String::from_utf8_lossy(&self.0))
    }
}

impl std::error::Error for UnknownNode {}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ring_of(nodes: &[&str], partitions: u32) -> HashRing {
        let mut ring = HashRing::with_partitions(partitions);
        for node in nodes {
            ring.add_node(node, 1);
        }
        ring
    }

    fn bytes(nodes: &[&'static str]) -> Vec<&'static [u8]> {
        nodes.iter().map(|node| node.as_bytes()).collect()
    }

    #[test]
    fn size_of_two_node_ring() {
        let ring = ring_of(&["foo", "bar"], DEFAULT_PARTITIONS);
        assert_eq!(ring.len(), 64);
        assert_eq!(ring.node_count(), 2);
        assert!(!ring.is_empty());
    }

    #[test]
    fn first_points_of_foo() {
        let expected = [
            0xfdba98970961edb29f88241b9d99d890_u128,
            0x216d7c020d0732def6775af81f6dc44f,
            0x9b0a4d70193f8a2025dacee027bcfd5b,
        ];
        let ring = ring_of(&["foo"], DEFAULT_PARTITIONS);
        for point in expected {
            assert!(ring.points.contains(&(point, 0)), "missing {point:032x}");
        }
        // And directly: md5("foo" * (r + 2)).
        for (r, point) in expected.iter().enumerate() {
            let mut hasher = Md5::new();
            hasher.update("foo".repeat(r + 2));
            assert_eq!(digest_to_u128(hasher), *point);
        }
    }

    #[test]
    fn lookups_on_two_nodes() {
        let ring = ring_of(&["foo", "bar"], DEFAULT_PARTITIONS);
        assert_eq!(ring.get_node(b"fake"), Some(&b"foo"[..]));
        assert_eq!(ring.get_node(b"fake-again"), Some(&b"bar"[..]));
        assert_eq!(ring.get_nodes(b"fake", &[b"foo"], 1), bytes(&["bar"]));
        assert_eq!(ring.get_nodes(b"fake", &[b"baz"], 1), bytes(&["foo"]));
    }

    #[test]
    fn replicas_walk_order() {
        let ring = ring_of(&["foo", "bar", "baz"], DEFAULT_PARTITIONS);
        assert_eq!(
            ring.get_nodes(b"fake", &[], 3),
            bytes(&["foo", "bar", "baz"])
        );
        assert_eq!(
            ring.get_nodes(b"fake-again", &[], 3),
            bytes(&["bar", "baz", "foo"])
        );
        // More replicas than nodes is capped.
        assert_eq!(
            ring.get_nodes(b"fake", &[], 10),
            bytes(&["foo", "bar", "baz"])
        );
        assert_eq!(
            ring.get_nodes(b"fake", &[b"bar"], 3),
            bytes(&["foo", "baz"])
        );
        assert!(ring.get_nodes(b"fake", &[], 0).is_empty());

        let ring = ring_of(&["node1", "node2", "node3"], DEFAULT_PARTITIONS);
        assert_eq!(
            ring.get_nodes(b"object1", &[], 3),
            bytes(&["node1", "node3", "node2"])
        );
        assert_eq!(
            ring.get_nodes(b"object2", &[], 3),
            bytes(&["node3", "node1", "node2"])
        );
    }

    #[test]
    fn weights() {
        let mut ring = HashRing::new();
        ring.add_node("a", 1);
        ring.add_node("b", 3);
        assert_eq!(ring.len(), 128);
        for key in [&b"x"[..], b"y", b"1", b"2"] {
            assert_eq!(ring.get_node(key), Some(&b"b"[..]));
        }
        assert_eq!(ring.get_node(b"z"), Some(&b"a"[..]));
    }

    #[test]
    fn eight_partitions() {
        let ring = ring_of(&["foo", "bar", "baz"], 8);
        assert_eq!(ring.len(), 24);
        assert_eq!(ring.get_node(b"fake"), Some(&b"bar"[..]));
        assert_eq!(ring.get_node(b"fake-again"), Some(&b"bar"[..]));
        let first: Vec<(u128, &[u8])> = ring
            .points
            .iter()
            .take(3)
            .map(|&(point, pos)| (point, &*ring.nodes[pos].0))
            .collect();
        assert_eq!(
            first,
            vec![
                (20144553589889800882676948436648721409, &b"baz"[..]),
                (35430798113595062966713692620872625087, &b"bar"[..]),
                (41260426460558780816668865045765890887, &b"bar"[..]),
            ]
        );
    }

    #[test]
    fn re_add_changes_weight_without_orphans() {
        let mut ring = HashRing::new();
        ring.add_node("a", 3);
        assert_eq!(ring.len(), 96);
        ring.add_node("a", 1);
        assert_eq!(ring.len(), 32);
        assert_eq!(ring.weight("a"), Some(1));
        assert_eq!(ring.node_count(), 1);
        assert_eq!(ring.remove_node("a"), Ok(1));
        assert_eq!(ring.len(), 0);
        assert!(ring.is_empty());
        assert_eq!(ring.node_count(), 0);
        assert_eq!(ring.nodes().count(), 0);
        assert_eq!(ring.get_node(b"x"), None);
        assert!(ring.get_nodes(b"x", &[], 3).is_empty());
    }

    #[test]
    fn remove_unknown_node() {
        let mut ring = ring_of(&["foo"], DEFAULT_PARTITIONS);
        let err = ring.remove_node("bar").unwrap_err();
        assert_eq!(err, UnknownNode(b"bar".to_vec()));
        assert_eq!(err.to_string(), "unknown node `bar`");
        assert_eq!(
            UnknownNode(vec![0xff, b'x']).to_string(),
            "unknown node `\u{fffd}x`"
        );
        assert_eq!(ring.len(), 32);
    }

    #[test]
    fn remove_restores_previous_mapping() {
        let ring = ring_of(&["foo", "bar"], DEFAULT_PARTITIONS);
        let mut grown = ring.clone();
        grown.add_node("baz", 2);
        assert_eq!(grown.remove_node("baz"), Ok(2));
        assert_eq!(grown.points, ring.points);
        // Removing a node in the middle re-indexes the others correctly.
        let mut three = ring_of(&["foo", "baz", "bar"], DEFAULT_PARTITIONS);
        three.remove_node("baz").unwrap();
        assert_eq!(three.len(), 64);
        for i in 0..500 {
            let key = i.to_string();
            assert_eq!(
                three.get_node(key.as_bytes()),
                ring.get_node(key.as_bytes())
            );
        }
    }

    #[test]
    fn distribution() {
        let mut ring = HashRing::new();
        ring.add_node("a", 1);
        ring.add_node("b", 2);
        ring.add_node("c", 3);
        let mut counts = [0_usize; 3];
        for i in 0..60000 {
            let node = ring.get_node(i.to_string().as_bytes()).unwrap();
            counts[usize::from(node[0] - b'a')] += 1;
        }
        assert_eq!(counts, [9660, 19149, 31191]);
    }

    #[test]
    fn zero_weight_nodes_are_members_without_points() {
        let mut ring = HashRing::new();
        ring.add_node("z", 0);
        assert!(ring.contains("z"));
        assert_eq!(ring.weight("z"), Some(0));
        assert!(ring.is_empty());
        assert_eq!(ring.get_node(b"x"), None);
        assert!(ring.get_nodes(b"x", &[], 2).is_empty());
        ring.add_node("a", 1);
        // Would loop forever in Python (the weight-0 node counts as a candidate).
        assert_eq!(ring.get_nodes(b"x", &[], 2), bytes(&["a"]));
        assert_eq!(ring.remove_node("z"), Ok(0));
        assert_eq!(ring.get_nodes(b"x", &[], 2), bytes(&["a"]));
    }

    #[test]
    fn zero_partitions() {
        let mut ring = HashRing::with_partitions(0);
        ring.add_nodes(["a", "b"], 5);
        assert_eq!(ring.node_count(), 2);
        assert!(ring.is_empty());
        assert_eq!(ring.get_node(b"x"), None);
        assert!(ring.get_nodes(b"x", &[], 2).is_empty());
    }

    #[test]
    fn one_block_md5_matches_the_streaming_hasher() {
        // Every length around the one-block limit (55) and the block size.
        for len in 0..=140usize {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
            let mut hasher = Md5::new();
            hasher.update(&data);
            assert_eq!(md5_u128(&data), digest_to_u128(hasher), "length {len}");
        }
        // A known digest: md5("") = d41d8cd98f00b204e9800998ecf8427e.
        assert_eq!(md5_u128(b""), 0xd41d8cd98f00b204e9800998ecf8427e);
    }

    #[test]
    fn colliding_points_belong_to_last_added() {
        // "abab" * k == "ab" * 2k, so these nodes share points.
        let mut ring = HashRing::with_partitions(4);
        ring.add_node("ab", 1); // ab^2, ab^3, ab^4, ab^5
        ring.add_node("abab", 1); // ab^4, ab^6, ab^8, ab^10
        assert_eq!(ring.len(), 7);
        let owned_by = |ring: &HashRing, node: &[u8]| {
            (0..ring.points.len())
                .filter(|&at| {
                    ring.owner_pos(at)
                        .and_then(|pos| ring.nodes.get(pos))
                        .is_some_and(|(key, _)| &**key == node)
                })
                .count()
        };
        assert_eq!(owned_by(&ring, b"ab"), 3);
        assert_eq!(owned_by(&ring, b"abab"), 4);
        // Every key maps consistently between get_node and get_nodes.
        for i in 0..2000 {
            let key = i.to_string();
            let primary = ring.get_node(key.as_bytes());
            assert_eq!(
                ring.get_nodes(key.as_bytes(), &[], 1).first().copied(),
                primary
            );
            assert_eq!(ring.get_nodes(key.as_bytes(), &[], 5).len(), 2);
        }
        // Re-adding "ab" makes it the latest writer.
        ring.add_node("ab", 1);
        assert_eq!(owned_by(&ring, b"ab"), 4);
        assert_eq!(owned_by(&ring, b"abab"), 3);
        // Removing it gives the shared point back to "abab".
        ring.remove_node("ab").unwrap();
        assert_eq!(ring.len(), 4);
        assert_eq!(owned_by(&ring, b"abab"), 4);
    }

    #[test]
    fn empty_key_node_has_one_point() {
        let mut ring = HashRing::new();
        ring.add_node("", 1);
        assert_eq!(ring.len(), 1);
        assert_eq!(ring.get_node(b"x"), Some(&b""[..]));
        assert_eq!(ring.get_nodes(b"x", &[], 3), bytes(&[""]));
        assert_eq!(ring.remove_node(""), Ok(1));
        assert!(ring.is_empty());
    }

    #[test]
    fn add_nodes_with_duplicates() {
        let mut ring = HashRing::new();
        ring.add_nodes(["a", "b", "a"], 1);
        assert_eq!(ring.node_count(), 2);
        assert_eq!(ring.len(), 64);
        let nodes: Vec<_> = ring.nodes().collect();
        assert_eq!(nodes, vec![(&b"b"[..], 1), (&b"a"[..], 1)]);
        let single = {
            let mut ring = HashRing::new();
            ring.add_node("b", 1);
            ring.add_node("a", 1);
            ring
        };
        assert_eq!(ring.points, single.points);
    }

    #[test]
    fn ignore_duplicates_and_unknown() {
        let ring = ring_of(&["foo", "bar", "baz"], DEFAULT_PARTITIONS);
        assert_eq!(
            ring.get_nodes(b"fake", &[b"foo", b"foo", b"nope"], 3),
            bytes(&["bar", "baz"])
        );
    }

    #[test]
    fn debug_is_compact() {
        let ring = ring_of(&["foo"], DEFAULT_PARTITIONS);
        assert_eq!(
            format!("{ring:?}"),
            "HashRing { partitions: 32, nodes: {\"foo\": 1}, points: 32 }"
        );
    }
}
