//! The routing lookup: for each engine holding a prompt's first block, how many leading blocks
//! it holds.
//!
//! The engines still matching are kept as a sorted array of ids. At each block the array is
//! intersected with the block's sorted holders: when the two are equal (a conversation's own
//! blocks, or a shared prefix held by the same engines all along) that is one comparison, a
//! `memcmp` for several engines; otherwise a merge, or a binary search per engine when the block
//! has far more holders than engines still matching. An engine leaving records its count; the
//! scan stops at the first block no matching engine holds. Work is therefore
//! O(blocks matched × engines still matching), never O(all engines).
//!
//! Finding each block's node is the cost that remains once the index outgrows the caches: a
//! table bucket at a random place (a cache and usually a TLB miss), then the node. But nodes are
//! allocated in insertion order, and an insert allocates a prompt's new blocks together (last to
//! first), so block *i + 1*'s node is usually right next to block *i*'s. The scan checks the two
//! neighbours first, an adjacent cache line, and probes the table only where that fails: at the
//! first block, where one turn's blocks meet the next's, and where freed nodes were reused out of
//! order. On the benches' multi-turn workload the neighbour is right for 24 blocks in 25, and a
//! lookup takes half the time it takes probing the table for every block (benches/README.md).
//! A wrong guess cannot slip through: the neighbour's full key is compared.

use crate::index::{EngineId, PrefixIndex};

/// Results and scratch space of [`PrefixIndex::match_prefix`]; reuse one per routing thread to
/// keep lookups allocation-free.
#[derive(Debug, Clone, Default)]
pub struct PrefixMatch {
    /// (engine, leading blocks held), ascending by engine.
    hits: Vec<(EngineId, u32)>,
    /// Engines still matching, ascending, and their positions in `hits`.
    active: Vec<u16>,
    at: Vec<u32>,
}

impl PrefixMatch {
    pub fn new() -> Self {
        PrefixMatch::default()
    }

    /// Every engine holding the first block with the number of leading blocks it holds (≥ 1),
    /// ascending by engine id.
    pub fn hits(&self) -> &[(EngineId, u32)] {
        &self.hits
    }

    /// Leading blocks `engine` holds (0 if it does not hold the first).
    pub fn blocks(&self, engine: EngineId) -> u32 {
        self.hits
            .binary_search_by_key(&engine, |h| h.0)
            .map_or(0, |i| self.hits[i].1)
    }

    /// The longest match; ties go to the lowest engine id.
    pub fn best(&self) -> Option<(EngineId, u32)> {
        self.hits
            .iter()
            .copied()
            .reduce(|b, h| if h.1 > b.1 { h } else { b })
    }

    pub fn is_empty(&self) -> bool {
        self.hits.is_empty()
    }

    fn clear(&mut self) {
        self.hits.clear();
        self.active.clear();
        self.at.clear();
    }

    /// Keeps the active engines that are in `holders` (ascending); the others stopped at `depth`.
    #[inline]
    fn intersect(&mut self, holders: &[u16], depth: u32) {
        let (active, at, hits) = (&mut self.active, &mut self.at, &mut self.hits);
        // The common cases first: one engine left holding this block too (a conversation's own
        // turns; no `memcmp` call for two bytes), or the same holders as the block before (a
        // shared prefix).
        if active.len() == 1 {
            if holders.len() == 1 && holders[0] == active[0] {
                return;
            }
        } else if holders.len() == active.len() && holders == &active[..] {
            return;
        }
        let sparse = holders.len() > 8 * active.len();
        let (mut w, mut j) = (0, 0);
        for r in 0..active.len() {
            let e = active[r];
            let held = if sparse {
                j += holders[j..].partition_point(|&h| h < e);
                holders.get(j) == Some(&e)
            } else {
                while j < holders.len() && holders[j] < e {
                    j += 1;
                }
                j < holders.len() && holders[j] == e
            };
            if held {
                active[w] = e;
                at[w] = at[r];
                w += 1;
            } else {
                hits[at[r] as usize].1 = depth;
            }
        }
        active.truncate(w);
        at.truncate(w);
    }
}

impl PrefixIndex {
    /// The node of `key` if it sits next to node `prev` (see the module documentation).
    #[inline(always)]
    fn neighbour(&self, prev: u32, key: u64) -> Option<u32> {
        let p = prev as usize;
        [p.wrapping_sub(1), p + 1].into_iter().find_map(|c| {
            let n = self.nodes.get(c)?;
            (n.is_live() && n.key == key).then_some(c as u32)
        })
    }

    /// Prefix match of a prompt's block keys: into `m`, every engine holding `keys[0]` with the
    /// number of leading consecutive keys it holds, ascending by engine id.
    pub fn match_prefix(&self, keys: &[u64], m: &mut PrefixMatch) {
        m.clear();
        let Some(first) = keys.first().and_then(|&k| self.find_node(k)) else {
            return;
        };
        let engines = self.nodes[first as usize].engines(&self.pool);
        m.hits.extend(engines.iter().map(|&e| (EngineId(e), 0)));
        m.active.extend_from_slice(engines);
        m.at.extend(0..engines.len() as u32);
        let (mut prev, mut depth) = (first, 1);
        while let Some(&key) = keys.get(depth) {
            let Some(node) = self.neighbour(prev, key).or_else(|| self.find_node(key)) else {
                break;
            };
            m.intersect(self.nodes[node as usize].engines(&self.pool), depth as u32);
            if m.active.is_empty() {
                break;
            }
            (prev, depth) = (node, depth + 1);
        }
        let depth = depth as u32;
        for &i in &m.at {
            m.hits[i as usize].1 = depth;
        }
    }
}
