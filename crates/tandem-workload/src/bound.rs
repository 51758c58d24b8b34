//! Prefix-cache hit bounds of a trace, for putting a measured hit rate in context.
//!
//! A measured hit rate of 30 % means little alone: the Mooncake synthetic trace cannot give more
//! than 64 % to any cache (perf-model §3.2), and with real per-engine KV capacity much less.
//! These functions replay the trace's prompts, as blocks, through idealised caches:
//! - [`infinite_cache_hits`]: one cache that never forgets — the ceiling for any router;
//! - [`lru_cache_hits`]: one LRU per instance, blocks routed by an [`Assignment`] — what an
//!   ideal router (or the routing a run actually made) gets with finite capacity.
//!
//! A request's hit is its *leading* run of cached blocks (a prefix cache cannot use a block
//! after a miss). Block-weighted fractions count blocks; token-weighted ones count each block's
//! real length, so the partial last block weighs what it holds.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;

use crate::error::{invalid, Result};
use crate::trace::{PromptSpec, Source, Trace};

/// One cacheable block of a prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Block {
    /// Identifies the block's tokens *and all tokens before it* (a chained hash), like an
    /// engine's prefix-cache block hash. For Mooncake prompts, equal keys ⇔ equal `hash_id`
    /// chains.
    pub key: u64,
    /// Tokens in the block: `block_tokens`, or fewer for the last one.
    pub tokens: u32,
}

/// The prompt cut into `block_tokens`-sized blocks (the last one partial).
///
/// Keys are computed from the segment structure, not from tokens, so no tokens are synthesised:
/// block `i`'s key chains block `i − 1`'s key with the `(source, offset, length)` pieces that
/// make up block `i`.
///
/// # Errors
/// [`crate::WorkloadError::InvalidParam`] when `block_tokens` is 0.
pub fn prefix_blocks(prompt: &PromptSpec, block_tokens: u32) -> Result<Vec<Block>> {
    if block_tokens == 0 {
        return Err(invalid("block_tokens", "must be at least 1"));
    }
    let mut blocks = Vec::with_capacity(prompt.len().div_ceil(block_tokens) as usize);
    let mut key = 0x5eed_0fb1_0c00_0000_u64;
    let mut filled = 0u32;
    for seg in &prompt.segments {
        let (namespace, id) = match seg.source {
            Source::Block(id) => (1, id),
            Source::Shared(id) => (2, id),
            Source::Unique(id) => (3, id),
        };
        let mut offset = 0u32;
        while offset < seg.len {
            let take = (seg.len - offset).min(block_tokens - filled);
            for word in [namespace, id, u64::from(offset), u64::from(take)] {
                key = mix(key ^ word);
            }
            offset += take;
            filled += take;
            if filled == block_tokens {
                blocks.push(Block {
                    key,
                    tokens: filled,
                });
                filled = 0;
            }
        }
    }
    if filled > 0 {
        blocks.push(Block {
            key,
            tokens: filled,
        });
    }
    Ok(blocks)
}

/// splitmix64's finaliser: a cheap, well-mixed 64-bit permutation.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Hit counts over a trace.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PrefixHits {
    /// Requests walked.
    pub requests: u64,
    /// Requests with at least one leading block hit.
    pub requests_with_hit: u64,
    /// Σ blocks.
    pub blocks: u64,
    /// Σ leading blocks found in cache.
    pub hit_blocks: u64,
    /// Σ prompt tokens.
    pub tokens: u64,
    /// Σ tokens of the leading blocks found in cache.
    pub hit_tokens: u64,
}

impl PrefixHits {
    /// `hit_blocks / blocks` (0 for an empty trace).
    pub fn block_fraction(&self) -> f64 {
        ratio(self.hit_blocks, self.blocks)
    }

    /// `hit_tokens / tokens` (0 for an empty trace); compare with a measured
    /// `Σ cached_tokens / Σ prompt_tokens`.
    pub fn token_fraction(&self) -> f64 {
        ratio(self.hit_tokens, self.tokens)
    }

    fn add(&mut self, blocks: &[Block], hit: usize) {
        self.requests += 1;
        self.requests_with_hit += u64::from(hit > 0);
        self.blocks += blocks.len() as u64;
        self.hit_blocks += hit as u64;
        self.tokens += blocks.iter().map(|b| u64::from(b.tokens)).sum::<u64>();
        self.hit_tokens += blocks[..hit]
            .iter()
            .map(|b| u64::from(b.tokens))
            .sum::<u64>();
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

/// The trace's block size, or the caller's where the trace has none (Azure, chat).
fn block_size(trace: &Trace, block_tokens: Option<u32>) -> Result<u32> {
    block_tokens
        .or(trace.block_tokens)
        .ok_or_else(|| invalid("block_tokens", "the trace has no block size; give one"))
}

/// Hits of one cache that keeps everything, walking requests in trace order: the upper bound of
/// any routing over any number of instances.
///
/// `block_tokens`: `None` uses the trace's own (512 for Mooncake).
///
/// # Errors
/// [`crate::WorkloadError::InvalidParam`] when there is no block size or it is 0.
pub fn infinite_cache_hits(trace: &Trace, block_tokens: Option<u32>) -> Result<PrefixHits> {
    let block_tokens = block_size(trace, block_tokens)?;
    let mut seen = HashSet::new();
    let mut hits = PrefixHits::default();
    for r in &trace.requests {
        let blocks = prefix_blocks(&r.input, block_tokens)?;
        let hit = blocks.iter().take_while(|b| seen.contains(&b.key)).count();
        hits.add(&blocks, hit);
        seen.extend(blocks.iter().map(|b| b.key));
    }
    Ok(hits)
}

/// Which instance serves each request in [`lru_cache_hits`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Assignment<'a> {
    /// Request `i` goes to instance `i mod N`.
    RoundRobin,
    /// Request `i` goes to instance `v[i]` (e.g. what a run's router actually chose), one entry
    /// per request, each `< N`.
    Given(&'a [usize]),
    /// The instance with the longest leading match, ties to the fewest requests so far, then the
    /// lowest index: perf-model §3.2's "pure prefix" router (blind to load, so its own hit rate
    /// can exceed what a balanced router gets; its spread is reported for that reason).
    LongestPrefix,
}

/// Result of [`lru_cache_hits`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CacheSim {
    /// Over all requests.
    pub total: PrefixHits,
    /// Requests per instance.
    pub requests_per_instance: Vec<u64>,
}

impl CacheSim {
    /// Most-loaded instance's request count over the mean (1.0 = perfectly even).
    pub fn max_over_mean_requests(&self) -> f64 {
        let n = self.requests_per_instance.len() as f64;
        let sum: u64 = self.requests_per_instance.iter().sum();
        let max = self
            .requests_per_instance
            .iter()
            .copied()
            .max()
            .unwrap_or(0);
        if sum == 0 {
            0.0
        } else {
            max as f64 * n / sum as f64
        }
    }
}

/// Hits with `instances` caches of `capacity_tokens` each (`None`: unbounded), each an LRU of
/// blocks, requests walked in trace order and placed by `assignment`.
///
/// Capacity is counted in block slots, `capacity_tokens / block_tokens` of them, and a partial
/// block takes a whole slot, as in a paged KV cache. Per request: count the leading blocks
/// present, then touch or insert every block in prompt order, evicting least recently used.
///
/// With perf-model §3.2's parameters this reproduces its table (synthetic trace, 8 instances of
/// 512 k tokens: round-robin 6.3 %, longest prefix 35.9 %).
///
/// # Errors
/// [`crate::WorkloadError::InvalidParam`] for 0 instances, a missing or zero block size, or a
/// [`Assignment::Given`] of the wrong length or naming an instance `>= instances`.
pub fn lru_cache_hits(
    trace: &Trace,
    block_tokens: Option<u32>,
    instances: usize,
    capacity_tokens: Option<u64>,
    assignment: Assignment<'_>,
) -> Result<CacheSim> {
    let block_tokens = block_size(trace, block_tokens)?;
    if instances == 0 {
        return Err(invalid("instances", "must be at least 1"));
    }
    if let Assignment::Given(v) = assignment {
        if v.len() != trace.requests.len() {
            return Err(invalid(
                "assignment",
                format!("{} entries for {} requests", v.len(), trace.requests.len()),
            ));
        }
        if let Some(bad) = v.iter().find(|&&i| i >= instances) {
            return Err(invalid(
                "assignment",
                format!("instance {bad} with {instances} instances"),
            ));
        }
    }
    let slots = capacity_tokens.map(|c| c / u64::from(block_tokens));
    let mut caches: Vec<Lru> = (0..instances).map(|_| Lru::new(slots)).collect();
    let mut counts = vec![0u64; instances];
    let mut hits = PrefixHits::default();
    for (i, r) in trace.requests.iter().enumerate() {
        let blocks = prefix_blocks(&r.input, block_tokens)?;
        let (target, hit) = match assignment {
            Assignment::RoundRobin => {
                let t = i % instances;
                (t, caches[t].leading_hits(&blocks))
            }
            Assignment::Given(v) => (v[i], caches[v[i]].leading_hits(&blocks)),
            Assignment::LongestPrefix => caches
                .iter()
                .enumerate()
                .map(|(t, c)| (t, c.leading_hits(&blocks)))
                .max_by(|a, b| {
                    a.1.cmp(&b.1)
                        .then(counts[b.0].cmp(&counts[a.0]))
                        .then(b.0.cmp(&a.0))
                })
                .unwrap_or((0, 0)),
        };
        counts[target] += 1;
        hits.add(&blocks, hit);
        for b in &blocks {
            caches[target].touch(b.key);
        }
    }
    Ok(CacheSim {
        total: hits,
        requests_per_instance: counts,
    })
}

/// A set of block keys with least-recently-used eviction. `O(log n)` per touch via a tick-ordered
/// map; simple, and fast enough for traces of millions of blocks.
#[derive(Debug)]
struct Lru {
    slots: Option<u64>,
    tick: u64,
    last_used: HashMap<u64, u64>,
    by_tick: BTreeMap<u64, u64>,
}

impl Lru {
    fn new(slots: Option<u64>) -> Self {
        Self {
            slots,
            tick: 0,
            last_used: HashMap::new(),
            by_tick: BTreeMap::new(),
        }
    }

    fn leading_hits(&self, blocks: &[Block]) -> usize {
        blocks
            .iter()
            .take_while(|b| self.last_used.contains_key(&b.key))
            .count()
    }

    fn touch(&mut self, key: u64) {
        self.tick += 1;
        if let Some(old) = self.last_used.insert(key, self.tick) {
            self.by_tick.remove(&old);
        }
        if self.slots.is_none() {
            return; // Unbounded: no eviction order needed.
        }
        self.by_tick.insert(self.tick, key);
        while self.last_used.len() as u64 > self.slots.unwrap_or(u64::MAX) {
            let Some((_, victim)) = self.by_tick.pop_first() else {
                break;
            };
            self.last_used.remove(&victim);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::{test_request as req, Request};

    fn blocks(ids: &[u64], last: u32) -> Request {
        let n = ids.len();
        req(&ids
            .iter()
            .enumerate()
            .map(|(k, &id)| (Source::Block(id), if k + 1 == n { last } else { 4 }))
            .collect::<Vec<_>>())
    }

    #[test]
    fn block_keys_follow_content_not_segmentation_of_blocks() {
        // Mooncake-style: one segment per block.
        let a = prefix_blocks(&blocks(&[1, 2, 3], 2).input, 4).unwrap();
        let b = prefix_blocks(&blocks(&[1, 2, 9], 4).input, 4).unwrap();
        assert_eq!(a.iter().map(|b| b.tokens).collect::<Vec<_>>(), [4, 4, 2]);
        assert_eq!(a[..2], b[..2]);
        assert_ne!(a[2].key, b[2].key);
        // A segment spanning blocks: the second block is keyed by its prefix too.
        let c = prefix_blocks(
            &req(&[(Source::Shared(0), 6), (Source::Unique(1), 5)]).input,
            4,
        )
        .unwrap();
        let d = prefix_blocks(
            &req(&[(Source::Shared(0), 6), (Source::Unique(2), 5)]).input,
            4,
        )
        .unwrap();
        assert_eq!(c.iter().map(|b| b.tokens).collect::<Vec<_>>(), [4, 4, 3]);
        assert_eq!(c[0], d[0]);
        assert_ne!(c[1].key, d[1].key);
        // Same block content after a different prefix is a different block.
        let e = prefix_blocks(&blocks(&[7, 2], 4).input, 4).unwrap();
        assert_ne!(a[1].key, e[1].key);
        assert!(prefix_blocks(&PromptSpec::default(), 4).unwrap().is_empty());
        assert!(prefix_blocks(&PromptSpec::default(), 0).is_err());
    }

    #[test]
    fn infinite_cache_counts_leading_runs() {
        let t = Trace::new(
            "t",
            vec![
                blocks(&[1, 2, 3], 2),
                blocks(&[1, 2, 4], 4),
                blocks(&[5, 2, 3], 1),
            ],
            Some(4),
        );
        let h = infinite_cache_hits(&t, None).unwrap();
        assert_eq!((h.blocks, h.hit_blocks, h.requests_with_hit), (9, 2, 1));
        assert_eq!((h.tokens, h.hit_tokens), (10 + 12 + 9, 8));
        // Partial last block weighs its real length.
        let t2 = Trace::new("t", vec![blocks(&[1, 2], 1), blocks(&[1, 2], 1)], Some(4));
        let h2 = infinite_cache_hits(&t2, None).unwrap();
        assert_eq!((h2.hit_blocks, h2.hit_tokens), (2, 5));
        assert_eq!(h2.block_fraction(), 0.5);
        assert!(infinite_cache_hits(&Trace::new("x", vec![], None), None).is_err());
    }

    #[test]
    fn lru_evicts_and_routes() {
        let t = Trace::new(
            "t",
            vec![blocks(&[1, 2], 4), blocks(&[3, 4], 4), blocks(&[1, 2], 4)],
            Some(4),
        );
        // Room for 2 blocks: request 2 evicts request 1's blocks.
        let small = lru_cache_hits(&t, None, 1, Some(8), Assignment::RoundRobin).unwrap();
        assert_eq!(small.total.hit_blocks, 0);
        let big = lru_cache_hits(&t, None, 1, Some(16), Assignment::RoundRobin).unwrap();
        assert_eq!(big.total.hit_blocks, 2);
        // Two instances round-robin: requests 0 and 2 land on instance 0.
        let rr = lru_cache_hits(&t, None, 2, Some(8), Assignment::RoundRobin).unwrap();
        assert_eq!(rr.total.hit_blocks, 2);
        assert_eq!(rr.requests_per_instance, [2, 1]);
        let given = lru_cache_hits(&t, None, 2, None, Assignment::Given(&[0, 0, 1])).unwrap();
        assert_eq!(given.total.hit_blocks, 0);
        let lp = lru_cache_hits(&t, None, 2, Some(8), Assignment::LongestPrefix).unwrap();
        assert_eq!(
            (lp.total.hit_blocks, lp.requests_per_instance.clone()),
            (2, vec![2, 1])
        );
        assert!((lp.max_over_mean_requests() - 4.0 / 3.0).abs() < 1e-12);
        for bad in [
            lru_cache_hits(&t, None, 0, None, Assignment::RoundRobin),
            lru_cache_hits(&t, None, 2, None, Assignment::Given(&[0, 1])),
            lru_cache_hits(&t, None, 2, None, Assignment::Given(&[0, 1, 2])),
            lru_cache_hits(&t, Some(0), 2, None, Assignment::RoundRobin),
        ] {
            assert!(bad.is_err());
        }
    }
}
