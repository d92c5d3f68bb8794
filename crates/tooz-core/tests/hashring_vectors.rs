//! Checks `HashRing` against lookups recorded from Python tooz 9.1.0
//! (`tests/vectors/hashring.json`).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use serde::de::{Deserializer, MapAccess, Visitor};
use tooz_core::hashring::HashRing;

const VECTORS: &str = include_str!("vectors/hashring.json");

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    generated_by: String,
    #[allow(dead_code)]
    notes: String,
    cases: Vec<Case>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    /// In document order: the nodes are added in this order.
    #[serde(deserialize_with = "ordered_map")]
    nodes: Vec<(String, u32)>,
    partitions: u32,
    hash: String,
    ring_len: usize,
    lookups: Vec<Lookup>,
    after_remove: Option<AfterRemove>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Lookup {
    key_utf8: String,
    replicas: BTreeMap<String, Vec<String>>,
    ignore: Vec<String>,
    ignore_replicas_1: Vec<String>,
    ignore_replicas_2: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AfterRemove {
    removed: String,
    lookups: Vec<RemovedLookup>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RemovedLookup {
    key_utf8: String,
    nodes: Vec<String>,
}

/// Deserializes a JSON object into its entries in document order
/// (`serde_json` is built without `preserve_order`).
fn ordered_map<'de, D>(deserializer: D) -> Result<Vec<(String, u32)>, D::Error>
where
    D: Deserializer<'de>,
{
    struct Ordered;

    impl<'de> Visitor<'de> for Ordered {
        type Value = Vec<(String, u32)>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an object of node name -> weight")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0));
            while let Some(entry) = map.next_entry()? {
                entries.push(entry);
            }
            Ok(entries)
        }
    }

    deserializer.deserialize_map(Ordered)
}

/// The ring's answer as sorted UTF-8 names, for comparison with the file.
fn sorted(nodes: Vec<&[u8]>) -> Vec<String> {
    let mut names: Vec<String> = nodes
        .into_iter()
        .map(|node| String::from_utf8(node.to_vec()).expect("node names are UTF-8"))
        .collect();
    names.sort();
    names
}

fn expected(nodes: &[String]) -> Vec<String> {
    let mut nodes = nodes.to_vec();
    nodes.sort();
    nodes
}

#[test]
fn python_tooz_vectors() {
    let file: File = serde_json::from_str(VECTORS).expect("valid vectors file");
    assert!(!file.cases.is_empty());
    let mut checked = 0_usize;

    for (n, case) in file.cases.iter().enumerate() {
        assert_eq!(case.hash, "md5", "case {n}: unsupported hash");
        let mut ring = HashRing::with_partitions(case.partitions);
        for (node, weight) in &case.nodes {
            ring.add_node(node, *weight);
        }
        let ctx = format!(
            "case {n} ({:?}, partitions {})",
            case.nodes, case.partitions
        );
        assert_eq!(ring.len(), case.ring_len, "{ctx}: ring length");
        assert_eq!(ring.node_count(), case.nodes.len(), "{ctx}: node count");
        assert!(!case.lookups.is_empty(), "{ctx}: no lookups");

        for lookup in &case.lookups {
            let key = lookup.key_utf8.as_bytes();
            let ctx = format!("{ctx}, key {:?}", lookup.key_utf8);
            assert!(!lookup.replicas.is_empty(), "{ctx}: no replica lookups");
            for (replicas, nodes) in &lookup.replicas {
                let replicas: usize = replicas.parse().expect("replica count");
                assert_eq!(
                    sorted(ring.get_nodes(key, &[], replicas)),
                    expected(nodes),
                    "{ctx}: replicas {replicas}"
                );
                checked += 1;
                if replicas == 1 {
                    assert_eq!(
                        ring.get_node(key).map(|node| sorted(vec![node])),
                        Some(expected(nodes)),
                        "{ctx}: get_node"
                    );
                    checked += 1;
                }
            }
            let ignore: Vec<&[u8]> = lookup.ignore.iter().map(|node| node.as_bytes()).collect();
            for (replicas, nodes) in [
                (1, &lookup.ignore_replicas_1),
                (2, &lookup.ignore_replicas_2),
            ] {
                assert_eq!(
                    sorted(ring.get_nodes(key, &ignore, replicas)),
                    expected(nodes),
                    "{ctx}: ignore {:?}, replicas {replicas}",
                    lookup.ignore
                );
                checked += 1;
            }
        }

        if let Some(after) = &case.after_remove {
            let weight = case
                .nodes
                .iter()
                .find(|(node, _)| *node == after.removed)
                .map(|(_, weight)| *weight)
                .expect("removed node is in the case");
            assert_eq!(
                ring.remove_node(&after.removed),
                Ok(weight),
                "{ctx}: remove"
            );
            assert!(!ring.contains(&after.removed));
            assert_eq!(
                ring.len(),
                case.ring_len - (case.partitions * weight) as usize,
                "{ctx}: ring length after removing {:?}",
                after.removed
            );
            assert!(!after.lookups.is_empty(), "{ctx}: no lookups after remove");
            for lookup in &after.lookups {
                let key = lookup.key_utf8.as_bytes();
                let want = expected(&lookup.nodes);
                let ctx = format!(
                    "{ctx}, after removing {:?}, key {:?}",
                    after.removed, lookup.key_utf8
                );
                assert_eq!(sorted(ring.get_nodes(key, &[], want.len())), want, "{ctx}");
                checked += 1;
                if want.len() == 1 {
                    assert_eq!(
                        ring.get_node(key).map(|node| sorted(vec![node])),
                        Some(want),
                        "{ctx}: get_node"
                    );
                    checked += 1;
                }
            }
        }
    }

    assert!(checked > 0);
    println!(
        "checked {checked} lookups over {} cases from {}",
        file.cases.len(),
        file.generated_by
    );
}
