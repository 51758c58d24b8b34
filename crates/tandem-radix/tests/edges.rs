//! Edge cases the random model test reaches rarely or not at all: the extremes of the engine id
//! range, a zero capacity, memory staying bounded under unbounded traffic, and the chained keys
//! working end to end with the index.

use tandem_radix::{block_keys, EngineId, IndexConfig, PrefixIndex, PrefixMatch};

fn index(max_blocks: usize, ttl: Option<u64>) -> PrefixIndex {
    PrefixIndex::new(IndexConfig { max_blocks, ttl })
}

#[test]
fn every_engine_id_can_hold_the_same_block() {
    let mut idx = index(1 << 17, None);
    for e in (0..=u16::MAX).rev() {
        idx.insert(EngineId(e), &[7, 8], 0);
    }
    assert_eq!((idx.len(), idx.blocks()), (2 * 65_536, 2));
    let mut m = PrefixMatch::new();
    idx.match_prefix(&[7, 8, 9], &mut m);
    assert_eq!(m.hits().len(), 65_536);
    assert!(m
        .hits()
        .iter()
        .enumerate()
        .all(|(i, h)| h == &(EngineId(i as u16), 2)));
    idx.remove(EngineId(u16::MAX), &[8]);
    idx.clear_engine(EngineId(0));
    idx.match_prefix(&[7, 8], &mut m);
    assert_eq!(m.blocks(EngineId(u16::MAX)), 1);
    assert_eq!(m.blocks(EngineId(0)), 0);
    assert_eq!(m.best(), Some((EngineId(1), 2)));
    for e in 0..=u16::MAX {
        idx.clear_engine(EngineId(e));
    }
    assert!(idx.is_empty());
    idx.validate().unwrap();
}

#[test]
fn zero_capacity_holds_nothing_but_keeps_time() {
    let mut idx = index(0, Some(5));
    idx.insert(EngineId(1), &[1, 2, 3], 10);
    idx.expire(4);
    assert!(idx.is_empty());
    assert_eq!(idx.clock(), 10);
    let mut m = PrefixMatch::new();
    idx.match_prefix(&[1], &mut m);
    assert!(m.is_empty() && m.best().is_none());
}

#[test]
fn memory_stays_bounded_under_endless_distinct_traffic() {
    let max = 20_000;
    let mut idx = index(max, Some(1_000));
    let mut peak = 0;
    let mut x = 1u64;
    for tick in 0..4_000u64 {
        // 50-block prompts from 32 engines, a fresh conversation each time, some shared heads.
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        let tokens: Vec<u32> = (0..800u32)
            .map(|i| if i < 160 { i } else { (x >> 33) as u32 ^ i })
            .collect();
        let keys = block_keys(&tokens, 16, 0);
        idx.insert(EngineId((x % 32) as u16), &keys, tick);
        if tick % 100 == 0 {
            idx.expire(tick);
            idx.clear_engine(EngineId((tick / 100 % 32) as u16));
        }
        assert!(idx.len() <= max);
        peak = peak.max(idx.memory_bytes());
    }
    idx.validate().unwrap();
    // The index is full and bounded: arenas at `max`, the table at `max` keys, lists small.
    assert_eq!(idx.len(), max);
    assert!(peak <= max * 64, "{} bytes per entry", peak / max);
}

#[test]
fn a_longer_shared_prefix_wins_and_a_diverging_turn_stops_the_match() {
    let mut idx = index(1_000, None);
    let system: Vec<u32> = (0..64).collect();
    let conv = |tail: u32| -> Vec<u32> { system.iter().copied().chain(tail..tail + 48).collect() };
    let (a, b) = (conv(1_000), conv(2_000));
    idx.insert(EngineId(3), &block_keys(&a, 16, 42), 0);
    idx.insert(EngineId(5), &block_keys(&b, 16, 42), 0);
    let mut m = PrefixMatch::new();
    // `a` plus a new turn: engine 3 holds all 7 blocks of `a`, engine 5 the 4 system blocks.
    let next: Vec<u32> = a.iter().copied().chain(9_000..9_100).collect();
    idx.match_prefix(&block_keys(&next, 16, 42), &mut m);
    assert_eq!(m.hits(), &[(EngineId(3), 7), (EngineId(5), 4)]);
    // Another model (seed) shares nothing.
    idx.match_prefix(&block_keys(&next, 16, 43), &mut m);
    assert!(m.is_empty());
}
