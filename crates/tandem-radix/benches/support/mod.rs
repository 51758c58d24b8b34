//! The workload both benches build: a full 1M-entry index fed the way approximate routing feeds
//! it, and lookups of many distinct prompts against it.
//!
//! - 16 system prompts of 32–256 blocks (0.5k–4k tokens at block size 16), each cached on a
//!   random 25–100 % of the engines (scaled down so that they start at most half the index).
//! - 4,096 multi-turn conversations in flight, each on a random system prompt and engine. Each
//!   request is the next turn of a random conversation: its whole prompt so far plus 8–64 new
//!   blocks, inserted for the conversation's engine (re-routed to another holder of the system
//!   prompt 10 % of the time, which then holds the history too). A conversation retires after
//!   1–12 turns (prompts up to ~1,000 blocks, 16k tokens) and a new one takes its place.
//! - Requests go in until twice the capacity in new blocks has been inserted, so the index is
//!   full and in its LRU steady state (free lists, chunk reuse and pool compaction included)
//!   when memory and lookups are measured.
//! - Queries: the next turn of every conversation in flight that has had one (≈3,400 distinct
//!   prompts): its prompt plus 8 new blocks no engine holds. A match runs through the system
//!   prompt (many engines), the history (one or two) and stops at the new turn, or earlier where
//!   LRU eviction has taken a conversation's tail. `describe` reports the figures.

#![allow(dead_code)]

use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tandem_radix::{block_keys, chain_key, EngineId, IndexConfig, PrefixIndex, PrefixMatch};

pub const BLOCK: usize = 16;
pub const ENTRIES: usize = 1 << 20;
/// Conversations in flight at once.
const ACTIVE: usize = 4_096;
const SEED: u64 = 0x7a6d;

pub struct Workload {
    pub index: PrefixIndex,
    /// Distinct prompts' block keys.
    pub queries: Vec<Vec<u64>>,
}

fn random_blocks(rng: &mut ChaCha8Rng, parent: u64, n: usize) -> Vec<u64> {
    let mut key = parent;
    let mut block = [0u32; BLOCK];
    (0..n)
        .map(|_| {
            block
                .iter_mut()
                .for_each(|t| *t = rng.random_range(0..128_000));
            key = chain_key(key, &block);
            key
        })
        .collect()
}

pub fn build(engines: u16) -> Workload {
    let mut rng = ChaCha8Rng::seed_from_u64(SEED ^ u64::from(engines));
    let mut index = PrefixIndex::new(IndexConfig {
        max_blocks: ENTRIES,
        ttl: None,
    });
    let all: Vec<u16> = (0..engines).collect();
    let mut systems: Vec<(Vec<u64>, f64)> = (0..16)
        .map(|_| {
            let n = rng.random_range(32..=256);
            let tokens: Vec<u32> = (0..n * BLOCK)
                .map(|_| rng.random_range(0..128_000))
                .collect();
            (
                block_keys(&tokens, BLOCK, SEED),
                rng.random_range(0.25..=1.0),
            )
        })
        .collect();
    let shared: f64 = systems
        .iter()
        .map(|(k, f)| k.len() as f64 * f * f64::from(engines))
        .sum();
    let scale = (ENTRIES as f64 / 2.0 / shared).min(1.0);
    let mut holders: Vec<Vec<u16>> = Vec::new();
    let mut tick = 0;
    for (keys, f) in &mut systems {
        let n = ((f64::from(engines) * *f * scale).round() as usize).max(1);
        let mut h = all.clone();
        h.shuffle(&mut rng);
        h.truncate(n);
        for &e in &h {
            index.insert(EngineId(e), keys, tick);
        }
        holders.push(h);
    }
    struct Conv {
        sys: usize,
        keys: Vec<u64>,
        engine: u16,
        turns_left: u32,
    }
    let new_conv = |rng: &mut ChaCha8Rng| {
        let sys = rng.random_range(0..systems.len());
        Conv {
            sys,
            keys: systems[sys].0.clone(),
            engine: *holders[sys].choose(rng).unwrap(),
            turns_left: rng.random_range(1..=12),
        }
    };
    let mut active: Vec<Conv> = (0..ACTIVE).map(|_| new_conv(&mut rng)).collect();
    let mut inserted = index.len();
    while inserted < 2 * ENTRIES {
        tick += 1;
        let c = rng.random_range(0..active.len());
        let turn = rng.random_range(8..=64);
        let conv = &mut active[c];
        let tail = random_blocks(&mut rng, *conv.keys.last().unwrap(), turn);
        conv.keys.extend_from_slice(&tail);
        if rng.random_bool(0.1) {
            conv.engine = *holders[conv.sys].choose(&mut rng).unwrap();
        }
        index.insert(EngineId(conv.engine), &conv.keys, tick);
        inserted += turn;
        conv.turns_left -= 1;
        if conv.turns_left == 0 {
            active[c] = new_conv(&mut rng);
        }
    }
    // The next turn of every active conversation that has had one.
    let mut queries: Vec<Vec<u64>> = active
        .iter()
        .filter(|c| c.keys.len() > systems[c.sys].0.len())
        .map(|c| {
            let mut q = c.keys.clone();
            q.extend(random_blocks(&mut rng, *q.last().unwrap(), 8));
            q
        })
        .collect();
    queries.shuffle(&mut rng);
    Workload { index, queries }
}

/// One line describing the built index.
pub fn describe(engines: u16, w: &Workload) -> String {
    let i = &w.index;
    let n = w.queries.len() as f64;
    let mean_len = w.queries.iter().map(Vec::len).sum::<usize>() as f64 / n;
    let (mut best, mut holders, mut whole) = (0u64, 0usize, 0usize);
    let mut m = PrefixMatch::new();
    for q in &w.queries {
        i.match_prefix(q, &mut m);
        let b = m.best().map_or(0, |b| b.1);
        best += u64::from(b);
        holders += m.hits().len();
        whole += usize::from(b as usize + 8 == q.len());
    }
    let parts: Vec<String> = i
        .memory_parts()
        .iter()
        .map(|(name, b)| format!("{name} {:.1}", *b as f64 / i.len() as f64))
        .collect();
    format!(
        "{engines} engines: {} entries, {} distinct blocks, {:.1} holders/block, {} bytes = {:.1} B/entry ({}); \
         queries: {mean_len:.0} blocks, best match {:.0} blocks ({:.0} % whole), {:.1} engines hold the first",
        i.len(),
        i.blocks(),
        i.len() as f64 / i.blocks() as f64,
        i.memory_bytes(),
        i.memory_bytes() as f64 / i.len() as f64,
        parts.join(", "),
        best as f64 / n,
        whole as f64 * 100.0 / n,
        holders as f64 / n,
    )
}
