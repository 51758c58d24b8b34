//! Engine block hashes → Tandem's own prefix keys, one [`KeyTracker`] per engine (pure: no IO, no
//! clock).
//!
//! vLLM's block hashes cannot be reproduced outside the engine (they are seeded per process, see
//! protocol spec §4.5), so, as llm-d does, the tracker recomputes Tandem's keys from each
//! `BlockStored`'s `token_ids`, chaining from the key it recorded for the parent hash, and keeps an
//! engine-hash → key map to translate later parents and removals. The keys are exactly
//! [`tandem_radix::block_keys`] of the token sequence, so they match what routing computes for a
//! prompt.

use std::collections::HashMap;

use foldhash::fast::RandomState;

use tandem_radix::chain_key;

use crate::codec::KvEvent;

/// What one event does to the prefix index, for the tracker's engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IndexOp {
    /// The engine now holds these keys: `PrefixIndex::insert(engine, &keys, now)`.
    Insert(Vec<u64>),
    /// The engine no longer holds these keys: `PrefixIndex::remove(engine, &keys)`.
    Remove(Vec<u64>),
    /// The engine holds nothing: `PrefixIndex::clear_engine(engine)`.
    Clear,
}

/// Counters of a [`KeyTracker`], since it was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TrackerStats {
    /// Blocks of `BlockStored` events mapped to keys.
    pub stored_blocks: u64,
    /// Blocks of `BlockRemoved` events whose hash was known.
    pub removed_blocks: u64,
    /// Blocks skipped because their event's parent hash is unknown: the tracker joined the stream
    /// after the parent was stored, or lost events (a gap, a reset).
    pub orphans: u64,
    /// `BlockStored` events skipped because their `block_size` is not the tracker's: a
    /// configuration error (the coordinator's block size for this engine is wrong).
    pub block_size_mismatches: u64,
    /// `BlockStored` events skipped because `token_ids` is not `block_hashes × block_size` long.
    pub malformed: u64,
    /// Removed hashes the tracker did not hold (stored before it joined, or skipped).
    pub unknown_removals: u64,
    /// `AllBlocksCleared` events and [`KeyTracker::reset`] calls.
    pub clears: u64,
    /// Distinct block hashes held now.
    pub live_blocks: u64,
}

/// One block hash the engine holds.
#[derive(Debug, Clone, Copy)]
struct Held {
    key: u64,
    /// Stored copies: vLLM can cache two blocks with the same hash (two requests computing the
    /// same prefix in one step) and reports each store and each eviction, and with KV offloading
    /// a block is stored once per tier (`medium` GPU, CPU) and removed from each on its own. The
    /// engine holds the block while any copy is left, in whichever tier: a host-memory copy
    /// still spares the prefill (loading it costs a fraction of recomputing it).
    copies: u32,
}

/// Maps one engine's KV events to [`IndexOp`]s on Tandem's keys.
///
/// Memory is bounded by the engine: the tracker holds an entry per block hash the engine
/// currently caches (entries go on `BlockRemoved` / `AllBlocksCleared`), so at most the engine's
/// `num_gpu_blocks` plus its host tier's blocks, about 50 bytes each.
#[derive(Debug, Clone)]
pub struct KeyTracker {
    block_size: u32,
    seed: u64,
    /// Engine block hash → key. Both maps take a lookup per block of every event, so they use a
    /// fast seeded hasher (foldhash) instead of SipHash: still randomized per process, since keys
    /// are derived from client tokens.
    held: HashMap<u64, Held, RandomState>,
    /// Key → stored copies over all hashes mapping to it; a key leaves the index only when this
    /// reaches zero (distinct hashes can share a key: Tandem's keys ignore vLLM's extra keys such
    /// as a LoRA name or a cache salt).
    keys: HashMap<u64, u32, RandomState>,
    stats: TrackerStats,
}

impl KeyTracker {
    /// A tracker for an engine with this KV block size; chains start from `seed`, the seed routing
    /// passes to [`tandem_radix::block_keys`].
    pub fn new(block_size: u32, seed: u64) -> Self {
        KeyTracker {
            block_size,
            seed,
            held: HashMap::default(),
            keys: HashMap::default(),
            stats: TrackerStats::default(),
        }
    }

    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Distinct block hashes held.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// The key recorded for an engine block hash.
    pub fn key_of(&self, block_hash: u64) -> Option<u64> {
        self.held.get(&block_hash).map(|h| h.key)
    }

    /// Whether any held block maps to `key`.
    pub fn holds_key(&self, key: u64) -> bool {
        self.keys.contains_key(&key)
    }

    pub fn stats(&self) -> TrackerStats {
        TrackerStats {
            live_blocks: self.held.len() as u64,
            ..self.stats
        }
    }

    /// Applies one event; `None` when it changes nothing in the index (skipped, or empty).
    pub fn apply(&mut self, event: &KvEvent) -> Option<IndexOp> {
        match event {
            KvEvent::BlockStored {
                block_hashes,
                parent_block_hash,
                token_ids,
                block_size,
                ..
            } => self.stored(block_hashes, *parent_block_hash, token_ids, *block_size),
            KvEvent::BlockRemoved { block_hashes, .. } => self.removed(block_hashes),
            KvEvent::AllBlocksCleared => Some(self.reset()),
        }
    }

    /// Applies a batch in order, appending its operations to `ops`.
    pub fn apply_batch(&mut self, events: &[KvEvent], ops: &mut Vec<IndexOp>) {
        ops.extend(events.iter().filter_map(|e| self.apply(e)));
    }

    /// Forgets everything (engine restart, publisher restart, prefix-cache reset).
    pub fn reset(&mut self) -> IndexOp {
        self.held.clear();
        self.keys.clear();
        self.stats.clears += 1;
        IndexOp::Clear
    }

    fn stored(
        &mut self,
        hashes: &[u64],
        parent: Option<u64>,
        tokens: &[u32],
        block_size: u32,
    ) -> Option<IndexOp> {
        if block_size != self.block_size {
            self.stats.block_size_mismatches += 1;
            tracing::debug!(
                event = block_size,
                tracker = self.block_size,
                "BlockStored with a different block size skipped"
            );
            return None;
        }
        let bs = block_size as usize;
        if bs == 0 || tokens.len() != hashes.len() * bs {
            self.stats.malformed += 1;
            return None;
        }
        let mut key = match parent {
            None => self.seed,
            Some(p) => match self.held.get(&p) {
                Some(h) => h.key,
                None => {
                    self.stats.orphans += hashes.len() as u64;
                    return None;
                }
            },
        };
        if hashes.is_empty() {
            return None;
        }
        let mut out = Vec::with_capacity(hashes.len());
        for (&hash, block) in hashes.iter().zip(tokens.chunks_exact(bs)) {
            key = chain_key(key, block);
            let held = self.held.entry(hash).or_insert(Held { key, copies: 0 });
            held.copies += 1;
            // A hash seen before keeps its first key; they differ only on a 64-bit collision.
            *self.keys.entry(held.key).or_insert(0) += 1;
            out.push(key);
        }
        self.stats.stored_blocks += hashes.len() as u64;
        Some(IndexOp::Insert(out))
    }

    fn removed(&mut self, hashes: &[u64]) -> Option<IndexOp> {
        let mut out = Vec::new();
        for hash in hashes {
            let Some(held) = self.held.get_mut(hash) else {
                self.stats.unknown_removals += 1;
                continue;
            };
            self.stats.removed_blocks += 1;
            let key = held.key;
            held.copies -= 1;
            if held.copies == 0 {
                self.held.remove(hash);
            }
            if let Some(n) = self.keys.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    self.keys.remove(&key);
                    out.push(key);
                }
            }
        }
        (!out.is_empty()).then_some(IndexOp::Remove(out))
    }
}

#[cfg(test)]
mod tests;
