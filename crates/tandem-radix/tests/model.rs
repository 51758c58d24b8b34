//! The index against a naive model: random sequences of insert, remove, clear (restart), expire
//! (TTL) and lookups, with capacities small enough that LRU eviction runs constantly.
//!
//! The model is a map from (key, engine) to (tick, touch sequence number): eviction removes the
//! lowest sequence number, expiry every tick at least `ttl` old, and a lookup counts leading keys
//! per engine by brute force. After every operation the two must agree on every observable:
//! sizes, per-engine counts, membership of every (key, engine) pair of the universe, holders, and
//! the lookup results; and the index must pass its own structural check.

use proptest::prelude::*;
use std::collections::BTreeMap;
use tandem_radix::{EngineId, IndexConfig, PrefixIndex, PrefixMatch};

#[derive(Debug, Clone)]
enum Op {
    Insert {
        engine: u16,
        keys: Vec<u64>,
        dt: u64,
    },
    Remove {
        engine: u16,
        keys: Vec<u64>,
    },
    Clear {
        engine: u16,
    },
    Expire {
        dt: u64,
    },
    /// Time stepping back: the index must treat it as the latest tick seen.
    Rewind {
        by: u64,
    },
    Lookup {
        keys: Vec<u64>,
    },
}

#[derive(Debug, Default)]
struct Model {
    max: usize,
    ttl: Option<u64>,
    clock: u64,
    seq: u64,
    held: BTreeMap<(u64, u16), (u64, u64)>,
}

impl Model {
    fn insert(&mut self, engine: u16, keys: &[u64], now: u64) {
        self.clock = self.clock.max(now);
        if self.max == 0 {
            return;
        }
        // The index touches last to first so that a prefix's head is the most recent.
        for &k in keys.iter().rev() {
            if !self.held.contains_key(&(k, engine)) && self.held.len() >= self.max {
                let victim = *self.held.iter().min_by_key(|(_, v)| v.1).unwrap().0;
                self.held.remove(&victim);
            }
            self.seq += 1;
            self.held.insert((k, engine), (self.clock, self.seq));
        }
    }

    fn expire(&mut self, now: u64) {
        self.clock = self.clock.max(now);
        if let Some(ttl) = self.ttl {
            let clock = self.clock;
            self.held.retain(|_, v| v.0.saturating_add(ttl) > clock);
        }
    }

    fn lookup(&self, keys: &[u64]) -> Vec<(EngineId, u32)> {
        let Some(&k0) = keys.first() else {
            return vec![];
        };
        let holders: Vec<u16> = self
            .held
            .keys()
            .filter(|(k, _)| *k == k0)
            .map(|&(_, e)| e)
            .collect();
        holders
            .into_iter()
            .map(|e| {
                let n = keys
                    .iter()
                    .take_while(|&&k| self.held.contains_key(&(k, e)))
                    .count();
                (EngineId(e), n as u32)
            })
            .collect()
    }
}

/// Keys from a small universe so that prompts overlap; `chain` makes runs of consecutive keys
/// (like real chained block keys) more likely than random picks.
fn keys(universe: u64) -> impl Strategy<Value = Vec<u64>> {
    prop_oneof![
        prop::collection::vec(0..universe, 0..8),
        (0..universe, 1..10usize)
            .prop_map(move |(start, n)| (start..start + n as u64).map(|k| k % universe).collect()),
    ]
}

fn op(engines: u16, universe: u64) -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..engines, keys(universe), 0..4u64)
            .prop_map(|(engine, keys, dt)| Op::Insert { engine, keys, dt }),
        2 => (0..engines, keys(universe)).prop_map(|(engine, keys)| Op::Remove { engine, keys }),
        1 => (0..engines).prop_map(|engine| Op::Clear { engine }),
        2 => (0..6u64).prop_map(|dt| Op::Expire { dt }),
        1 => (0..5u64).prop_map(|by| Op::Rewind { by }),
        4 => keys(universe).prop_map(|keys| Op::Lookup { keys }),
    ]
}

#[derive(Debug, Clone)]
struct Case {
    max_blocks: usize,
    ttl: Option<u64>,
    engines: u16,
    universe: u64,
    ops: Vec<Op>,
}

fn case() -> impl Strategy<Value = Case> {
    // Few engines with tight capacity (eviction everywhere), or many engines on few keys (long
    // holder lists that grow, shrink and get compacted). Engine ids near u16::MAX are covered by
    // an offset applied in `run`.
    let shape = prop_oneof![
        (0..40usize, 1..5u16, 4..24u64),
        (50..400usize, 20..90u16, 2..10u64),
    ];
    (shape, prop::option::of(0..12u64)).prop_flat_map(|((max_blocks, engines, universe), ttl)| {
        prop::collection::vec(op(engines, universe), 1..120).prop_map(move |ops| Case {
            max_blocks,
            ttl,
            engines,
            universe,
            ops,
        })
    })
}

/// Which engine ids the index sees for the test's small ones.
#[derive(Debug, Clone, Copy)]
enum Ids {
    Low,
    /// Counting down from 65,535, so that the top of the range is exercised.
    Top,
    /// A range disjoint from `Low`.
    Other,
}

fn eid(e: u16, ids: Ids) -> u16 {
    match ids {
        Ids::Low => e,
        Ids::Top => u16::MAX - e,
        Ids::Other => 1000 + e,
    }
}

/// Runs `case`, checking the index against the model after every operation; returns every
/// lookup result so that two runs can be compared.
fn run(case: &Case, ids: Ids, index: &mut PrefixIndex) -> Vec<Vec<(EngineId, u32)>> {
    // The index's own configuration: a warm-up case runs on an index configured for another.
    let mut model = Model {
        max: index.config().max_blocks,
        ttl: index.config().ttl,
        clock: index.clock(),
        ..Model::default()
    };
    // Time relative to the index's clock on entry, so that a rerun on a used index is the same
    // run shifted in time.
    let base = index.clock();
    let mut rel = 0u64;
    let mut m = PrefixMatch::new();
    let mut lookups = Vec::new();
    for op in &case.ops {
        match op {
            Op::Insert { engine, keys, dt } => {
                rel += dt;
                let (e, now) = (eid(*engine, ids), base + rel);
                index.insert(EngineId(e), keys, now);
                model.insert(e, keys, now);
            }
            Op::Remove { engine, keys } => {
                let e = eid(*engine, ids);
                index.remove(EngineId(e), keys);
                for k in keys {
                    model.held.remove(&(*k, e));
                }
            }
            Op::Clear { engine } => {
                let e = eid(*engine, ids);
                index.clear_engine(EngineId(e));
                model.held.retain(|&(_, h), _| h != e);
            }
            Op::Expire { dt } => {
                rel += dt;
                index.expire(base + rel);
                model.expire(base + rel);
            }
            Op::Rewind { by } => rel = rel.saturating_sub(*by),
            Op::Lookup { keys } => {
                index.match_prefix(keys, &mut m);
                let want = model.lookup(keys);
                assert_eq!(m.hits(), &want[..], "lookup {keys:?}");
                if let Some(best) = m.best() {
                    assert!(want.iter().all(|h| h.1 <= best.1));
                    assert_eq!(m.blocks(best.0), best.1);
                }
                lookups.push(want);
            }
        }
        index.validate().unwrap();
        assert_eq!(index.len(), model.held.len());
        assert_eq!(index.clock(), model.clock);
        let mut distinct: Vec<u64> = model.held.keys().map(|k| k.0).collect();
        distinct.dedup();
        assert_eq!(index.blocks(), distinct.len());
        let mut per_engine: BTreeMap<u16, usize> = BTreeMap::new();
        let mut per_key: BTreeMap<u64, Vec<EngineId>> = BTreeMap::new();
        for &(k, e) in model.held.keys() {
            *per_engine.entry(e).or_default() += 1;
            per_key.entry(k).or_default().push(EngineId(e));
        }
        for e in (0..case.engines).map(|e| eid(e, ids)) {
            let want = per_engine.get(&e).copied().unwrap_or(0);
            assert_eq!(index.engine_blocks(EngineId(e)), want);
        }
        for k in 0..case.universe {
            let want = per_key.remove(&k).unwrap_or_default();
            assert_eq!(index.holders(k).collect::<Vec<_>>(), want, "holders of {k}");
        }
    }
    lookups
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn index_agrees_with_the_naive_model(case in case(), top in prop::bool::weighted(0.25)) {
        let mut index = PrefixIndex::new(IndexConfig { max_blocks: case.max_blocks, ttl: case.ttl });
        run(&case, if top { Ids::Top } else { Ids::Low }, &mut index);
    }

    /// Same inputs, same results, whatever the index went through before: an index whose arenas,
    /// free lists and table were churned by other engines (then cleared) answers exactly as a
    /// fresh one, and two fresh runs agree down to their memory figure.
    #[test]
    fn same_inputs_give_the_same_results(case in case(), warmup in case()) {
        let cfg = IndexConfig { max_blocks: case.max_blocks, ttl: case.ttl };
        let mut fresh = PrefixIndex::new(cfg);
        let a = run(&case, Ids::Low, &mut fresh);
        let mut again = PrefixIndex::new(cfg);
        prop_assert_eq!(&run(&case, Ids::Low, &mut again), &a);
        prop_assert_eq!(fresh.memory_bytes(), again.memory_bytes());

        // Churn with other engine ids, clear them, rerun later in time.
        let mut used = PrefixIndex::new(cfg);
        run(&warmup, Ids::Other, &mut used);
        for e in 0..warmup.engines {
            used.clear_engine(EngineId(eid(e, Ids::Other)));
        }
        prop_assert!(used.is_empty());
        let b = run(&case, Ids::Low, &mut used);
        prop_assert_eq!(b, a);
    }
}

#[test]
fn eviction_takes_a_prefix_tail_before_its_head() {
    let mut index = PrefixIndex::new(IndexConfig {
        max_blocks: 4,
        ttl: None,
    });
    index.insert(EngineId(0), &[1, 2, 3, 4], 0);
    index.insert(EngineId(1), &[9], 1);
    let mut m = PrefixMatch::new();
    index.match_prefix(&[1, 2, 3, 4], &mut m);
    assert_eq!(m.hits(), &[(EngineId(0), 3)]);
}

#[test]
fn ttl_expires_untouched_entries_and_a_refresh_keeps_them() {
    let mut index = PrefixIndex::new(IndexConfig {
        max_blocks: 100,
        ttl: Some(10),
    });
    index.insert(EngineId(0), &[1, 2], 0);
    index.insert(EngineId(1), &[1, 2], 5);
    index.insert(EngineId(0), &[1], 8);
    index.expire(10);
    let mut m = PrefixMatch::new();
    index.match_prefix(&[1, 2], &mut m);
    assert_eq!(m.hits(), &[(EngineId(0), 1), (EngineId(1), 2)]);
    index.expire(100);
    assert!(index.is_empty());
    assert_eq!(index.blocks(), 0);
}
