//! TEMPORARY STUB (the lead's placeholder until the real module lands; overwrite freely).
#![allow(missing_docs, dead_code)]
#[derive(Debug, Clone, Default)]
pub struct HashRing {
    nodes: Vec<(Box<[u8]>, u32)>,
    partitions: u32,
}
impl HashRing {
    pub fn with_partitions(partitions: u32) -> Self {
        HashRing {
            nodes: vec![],
            partitions,
        }
    }
    pub fn add_node(&mut self, node: impl AsRef<[u8]>, weight: u32) {
        self.nodes.push((node.as_ref().into(), weight));
    }
    pub fn remove_node(&mut self, node: impl AsRef<[u8]>) -> Result<u32, ()> {
        let _ = node;
        Err(())
    }
    pub fn nodes(&self) -> impl Iterator<Item = (&[u8], u32)> {
        self.nodes.iter().map(|(n, w)| (&**n, *w))
    }
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }
    pub fn get_nodes<'a>(
        &'a self,
        _data: &[u8],
        _ignore: &[&[u8]],
        _replicas: usize,
    ) -> Vec<&'a [u8]> {
        vec![]
    }
}
