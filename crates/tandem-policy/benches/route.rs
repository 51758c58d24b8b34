//! The whole routing decision on a full 1M-entry prefix index: `match_prefix` of the prompt's
//! block keys, the hits turned into per-engine cached tokens, the `prefix` policy over N prefill
//! engines and the `kv-capacity` policy over N decode engines (tokenization and key hashing are
//! measured separately: `block_keys` in tandem-radix's `lookup` bench).
//!
//! The index workload is tandem-radix's (shared source: 16 system prompts on many engines,
//! 4,096 multi-turn conversations, LRU steady state). Engine loads and KV figures are seeded
//! random, so ties are rare and every candidate is scored. Two outputs:
//! - criterion medians: `route/N`;
//! - percentiles over every distinct prompt × 40 shuffled rounds, each decision timed with
//!   `Instant` (printed before criterion runs): `cargo bench -p tandem-policy --bench route`.

#[path = "../../tandem-radix/benches/support/mod.rs"]
mod support;

use std::hint::black_box;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tandem_policy::{EngineView, KvCapacity, Policy, PrefixParams, PrefixPolicy, RouteFacts};
use tandem_radix::{PrefixIndex, PrefixMatch};

struct Setup {
    w: support::Workload,
    prefill: Vec<EngineView>,
    decode: Vec<EngineView>,
}

fn setup(engines: u16) -> Setup {
    let w = support::build(engines);
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let prefill = (0..usize::from(engines))
        .map(|i| EngineView {
            inflight: rng.random_range(0..8),
            queued_prefill_tokens: rng.random_range(0..60_000),
            ..EngineView::healthy(i, format!("http://p{i}"))
        })
        .collect();
    let decode = (0..usize::from(engines))
        .map(|i| EngineView {
            inflight: rng.random_range(0..64),
            kv_total_blocks: Some(25_000),
            kv_used_blocks: Some(rng.random_range(0..20_000)),
            kv_reserved_blocks: rng.random_range(0..2_000),
            ..EngineView::healthy(i, format!("http://d{i}"))
        })
        .collect();
    Setup { w, prefill, decode }
}

/// The candidates and the prefill policy.
struct Sides<'a> {
    p: &'a [&'a EngineView],
    d: &'a [&'a EngineView],
    prefix: &'a PrefixPolicy,
}

/// One decision; returns the two picks so nothing is optimized away.
fn decide(
    index: &PrefixIndex,
    keys: &[u64],
    m: &mut PrefixMatch,
    cached: &mut Vec<(usize, u64)>,
    sides: &Sides<'_>,
    rng: &mut ChaCha8Rng,
) -> (usize, usize) {
    let Sides { p, d, prefix } = *sides;
    index.match_prefix(keys, m);
    cached.clear();
    cached.extend(
        m.hits()
            .iter()
            .map(|&(e, b)| (usize::from(e.0), u64::from(b) * support::BLOCK as u64)),
    );
    let tokens = keys.len() as u64 * support::BLOCK as u64;
    let facts = RouteFacts {
        seq: 0,
        prompt_tokens: tokens,
        cached,
        kv_blocks_needed: keys.len() as u64 + 16,
        session: None,
    };
    let a = prefix.choose(p, facts, rng).map_or(0, |c| c.index);
    let b = KvCapacity.choose(d, facts, rng).map_or(0, |c| c.index);
    (a, b)
}

fn percentiles(engines: u16, s: &Setup) {
    let p: Vec<&EngineView> = s.prefill.iter().collect();
    let d: Vec<&EngineView> = s.decode.iter().collect();
    let prefix = PrefixPolicy::new(PrefixParams::default());
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut order: Vec<usize> = (0..s.w.queries.len()).collect();
    let (mut m, mut cached) = (PrefixMatch::new(), Vec::new());
    let mut ns = Vec::with_capacity(order.len() * 40);
    for _ in 0..40 {
        order.shuffle(&mut rng);
        for &q in &order {
            let t = Instant::now();
            black_box(decide(
                &s.w.index,
                black_box(&s.w.queries[q]),
                &mut m,
                &mut cached,
                &Sides {
                    p: &p,
                    d: &d,
                    prefix: &prefix,
                },
                &mut rng,
            ));
            ns.push(t.elapsed().as_nanos() as u64);
        }
    }
    ns.sort_unstable();
    let at = |q: f64| ns[((ns.len() as f64 * q) as usize).min(ns.len() - 1)] as f64 / 1000.0;
    println!(
        "route/{engines}: {} decisions, µs p50 {:.2}, p90 {:.2}, p99 {:.2}, p99.9 {:.2}, max {:.2}; index {:.1} B/entry",
        ns.len(),
        at(0.5),
        at(0.9),
        at(0.99),
        at(0.999),
        *ns.last().unwrap() as f64 / 1000.0,
        s.w.index.memory_bytes() as f64 / s.w.index.len() as f64
    );
}

fn route(c: &mut Criterion) {
    let mut g = c.benchmark_group("route");
    for engines in [8u16, 64, 512] {
        let s = setup(engines);
        percentiles(engines, &s);
        let p: Vec<&EngineView> = s.prefill.iter().collect();
        let d: Vec<&EngineView> = s.decode.iter().collect();
        let prefix = PrefixPolicy::new(PrefixParams::default());
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let (mut m, mut cached) = (PrefixMatch::new(), Vec::new());
        let mut i = 0;
        g.bench_function(engines.to_string(), |b| {
            b.iter(|| {
                i = (i + 1) % s.w.queries.len();
                decide(
                    &s.w.index,
                    black_box(&s.w.queries[i]),
                    &mut m,
                    &mut cached,
                    &Sides {
                        p: &p,
                        d: &d,
                        prefix: &prefix,
                    },
                    &mut rng,
                )
            })
        });
    }
    g.finish();
}

criterion_group!(benches, route);
criterion_main!(benches);
