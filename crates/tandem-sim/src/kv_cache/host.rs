//! The host-memory KV tier, as vLLM's `OffloadingConnector` with its CPU spec keeps it
//! (`--kv-offloading-size`, `kv_offload/cpu` + the LRU manager). Pure: no IO, no clock.
//!
//! Every block that becomes full and cached on the GPU is also stored here (write-through, as
//! the connector offloads completed blocks as they are produced), so the tier holds the recent
//! past of the GPU prefix cache and far more of it. A request's prefix lookup continues here
//! after its GPU hits end; the blocks found are loaded back into fresh GPU blocks before the
//! request computes, and count as cached tokens. The tier evicts in LRU order, a lookup that
//! hits refreshes the blocks, and each store and eviction is a KV event with `medium` "CPU",
//! the same block hashes as the GPU's events.

use std::collections::BTreeMap;

use tandem_kvevents::MEDIUM_CPU;

use super::{external_hash, BlockDigest, DigestMap, StoredRuns};
use crate::kv_events::KvEvent;

/// The tier: at most `capacity` blocks, keyed by their prefix-cache digest.
#[derive(Debug)]
pub struct HostTier {
    capacity: usize,
    /// Digest → its position in `lru`.
    entries: DigestMap<u64>,
    /// Least recently used first.
    lru: BTreeMap<u64, BlockDigest>,
    next_seq: u64,
}

impl HostTier {
    /// A tier of `capacity` blocks (the connector's `cpu_bytes_to_use` over the bytes of one
    /// block).
    pub fn new(capacity: usize) -> Self {
        HostTier {
            capacity,
            entries: DigestMap::default(),
            lru: BTreeMap::new(),
            next_seq: 0,
        }
    }

    /// Blocks held now.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// How many of `digests`, from the first, the tier holds. Those are about to be loaded, so
    /// they become the most recently used.
    pub fn lookup(&mut self, digests: &[BlockDigest]) -> usize {
        let n = digests
            .iter()
            .take_while(|d| self.entries.contains_key(*d))
            .count();
        for d in &digests[..n] {
            self.refresh(d);
        }
        n
    }

    fn refresh(&mut self, d: &BlockDigest) {
        if let Some(seq) = self.entries.get_mut(d) {
            self.lru.remove(seq);
            *seq = self.next_seq;
            self.lru.insert(self.next_seq, *d);
            self.next_seq += 1;
        }
    }

    /// Stores newly cached GPU blocks: `digests[i]` holds `tokens[i*bs..(i+1)*bs]`, `parent` is
    /// the digest before the first. Blocks already held are refreshed; new ones are announced in
    /// parent-linked runs like the GPU's, and the least recently used blocks beyond the capacity
    /// are evicted (`BlockRemoved`).
    pub fn store(
        &mut self,
        digests: &[BlockDigest],
        parent: Option<&BlockDigest>,
        tokens: &[u32],
        block_size: usize,
        events: &mut Vec<KvEvent>,
    ) {
        if self.capacity == 0 {
            return;
        }
        let mut runs = StoredRuns::new(parent, block_size, MEDIUM_CPU, events);
        for (i, d) in digests.iter().enumerate() {
            if self.entries.contains_key(d) {
                self.refresh(d);
                runs.skipped(d);
            } else {
                self.entries.insert(*d, self.next_seq);
                self.lru.insert(self.next_seq, *d);
                self.next_seq += 1;
                runs.stored(d, &tokens[i * block_size..(i + 1) * block_size]);
            }
        }
        runs.finish();
        let mut evicted = Vec::new();
        while self.entries.len() > self.capacity {
            let (_, d) = self.lru.pop_first().expect("entries are in the LRU");
            self.entries.remove(&d);
            evicted.push(external_hash(&d));
        }
        if !evicted.is_empty() {
            events.push(KvEvent::BlockRemoved {
                block_hashes: evicted,
                medium: Some(MEDIUM_CPU.into()),
            });
        }
    }

    /// Forgets every block (a prefix-cache reset; the caller publishes `AllBlocksCleared`).
    pub fn clear(&mut self) {
        self.entries.clear();
        self.lru.clear();
    }
}
