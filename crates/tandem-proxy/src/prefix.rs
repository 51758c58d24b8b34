//! The coordinator's prefix indexes, one per pool: which engine holds which prompt blocks.
//!
//! The index itself ([`tandem_radix::PrefixIndex`]) is pure; this wrapper adds the two effects it
//! needs, a lock (request tasks and the KV-event feeds share it) and a clock (milliseconds since
//! the coordinator started, the approximate feed's TTL ticks). Lookups hold the lock for one
//! `match_prefix` (microseconds; see benches/README.md).

use std::sync::Mutex;

use tandem_config::{PrefixFeed, PrefixIndexConfig};
use tandem_radix::{EngineId, IndexConfig, PrefixIndex, PrefixMatch};
use tokio::time::Instant;

/// Seed of the key chain. Keys only need to agree within one coordinator (approximate inserts,
/// KV-event feeds and lookups all use this), and every pool serves one model.
pub const KEY_SEED: u64 = 0;

/// One pool's index.
#[derive(Debug)]
pub struct PoolIndex {
    pub feed: PrefixFeed,
    block_size: usize,
    started: Instant,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    index: PrefixIndex,
    scratch: PrefixMatch,
}

/// Engine ids are small, never-reused integers; the index takes 16 bits.
fn engine_id(id: usize) -> EngineId {
    EngineId(u16::try_from(id).unwrap_or(u16::MAX))
}

impl PoolIndex {
    pub fn new(cfg: &PrefixIndexConfig, block_size: u32) -> Self {
        let ttl = match cfg.feed {
            // Blocks Tandem routed are a guess that ages; events are facts until removed.
            PrefixFeed::Approximate => Some(cfg.ttl_secs.saturating_mul(1000)),
            PrefixFeed::Precise => None,
        };
        PoolIndex {
            feed: cfg.feed,
            block_size: block_size as usize,
            started: Instant::now(),
            inner: Mutex::new(Inner {
                index: PrefixIndex::new(IndexConfig {
                    max_blocks: usize::try_from(cfg.max_blocks).unwrap_or(usize::MAX),
                    ttl,
                }),
                scratch: PrefixMatch::new(),
            }),
        }
    }

    /// The prompt's chained block keys (full blocks only).
    pub fn keys(&self, tokens: &[u32]) -> Vec<u64> {
        tandem_radix::block_keys(tokens, self.block_size, KEY_SEED)
    }

    fn now(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Predicted cached prompt tokens per engine id, `(id, tokens)`, for engines holding at least
    /// the first block.
    pub fn lookup(&self, keys: &[u64]) -> Vec<(usize, u64)> {
        if keys.is_empty() {
            return Vec::new();
        }
        let now = self.now();
        let mut g = self.inner.lock().expect("prefix index lock");
        let Inner { index, scratch } = &mut *g;
        if self.feed == PrefixFeed::Approximate {
            index.expire(now);
        }
        index.match_prefix(keys, scratch);
        scratch
            .hits()
            .iter()
            .map(|&(e, blocks)| (usize::from(e.0), u64::from(blocks) * self.block_size as u64))
            .collect()
    }

    /// The approximate feed: `engine` is about to compute (or receive) these blocks.
    pub fn routed(&self, engine: usize, keys: &[u64]) {
        if self.feed != PrefixFeed::Approximate || keys.is_empty() {
            return;
        }
        let now = self.now();
        let mut g = self.inner.lock().expect("prefix index lock");
        g.index.insert(engine_id(engine), keys, now);
    }

    /// The precise feed: the engine cached these blocks.
    pub fn stored(&self, engine: usize, keys: &[u64]) {
        let now = self.now();
        let mut g = self.inner.lock().expect("prefix index lock");
        g.index.insert(engine_id(engine), keys, now);
    }

    /// The precise feed: the engine evicted these blocks.
    pub fn removed(&self, engine: usize, keys: &[u64]) {
        let mut g = self.inner.lock().expect("prefix index lock");
        g.index.remove(engine_id(engine), keys);
    }

    /// Forget an engine (its cache was cleared, it restarted, or it left the pool).
    pub fn clear_engine(&self, engine: usize) {
        let mut g = self.inner.lock().expect("prefix index lock");
        g.index.clear_engine(engine_id(engine));
    }

    /// Blocks indexed for `engine`, for the per-engine gauge.
    pub fn engine_blocks(&self, engine: usize) -> usize {
        let g = self.inner.lock().expect("prefix index lock");
        g.index.engine_blocks(engine_id(engine))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn routed_prompts_predict_cached_tokens_per_engine() {
        let idx = PoolIndex::new(&PrefixIndexConfig::default(), 4);
        let a: Vec<u32> = (0..20).collect();
        let mut b = a[..8].to_vec();
        b.extend(100..112);
        idx.routed(3, &idx.keys(&a));
        idx.routed(5, &idx.keys(&b));
        // `b` shares two full blocks with `a` (8 tokens) and all five of its own with engine 5.
        let mut hits = idx.lookup(&idx.keys(&b));
        hits.sort();
        assert_eq!(hits, vec![(3, 8), (5, 20)]);
        assert_eq!(idx.engine_blocks(3), 5);
        idx.clear_engine(5);
        assert_eq!(idx.lookup(&idx.keys(&b)), vec![(3, 8)]);
    }

    #[tokio::test]
    async fn the_precise_feed_ignores_routing_guesses() {
        let cfg = PrefixIndexConfig {
            feed: PrefixFeed::Precise,
            ..PrefixIndexConfig::default()
        };
        let idx = PoolIndex::new(&cfg, 4);
        let a: Vec<u32> = (0..8).collect();
        let keys = idx.keys(&a);
        idx.routed(1, &keys);
        assert!(idx.lookup(&keys).is_empty());
        idx.stored(1, &keys);
        assert_eq!(idx.lookup(&keys), vec![(1, 8)]);
        idx.removed(1, &keys[1..]);
        assert_eq!(idx.lookup(&keys), vec![(1, 4)]);
    }
}
