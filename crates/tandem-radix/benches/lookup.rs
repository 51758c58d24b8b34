//! Criterion benches of the routing path on a full 1M-entry index (workload in `support`):
//! `lookup/N`: one `match_prefix` of a prompt (cycling through ≈3,400 distinct prompts) with N
//! engines; `insert/64`: Tandem recording a routed prompt for the engine with the longest match
//! (on a full index, evicting as much as it adds); `block_keys`: keys of a 4,096-token prompt.
//! Percentiles: the `latency` bench.

mod support;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use std::hint::black_box;
use tandem_radix::{block_keys_into, EngineId, PrefixMatch};

fn lookup(c: &mut Criterion) {
    let mut g = c.benchmark_group("lookup");
    for engines in [8u16, 64, 512] {
        let w = support::build(engines);
        eprintln!("{}", support::describe(engines, &w));
        let mut m = PrefixMatch::new();
        let mut i = 0;
        g.bench_function(engines.to_string(), |b| {
            b.iter(|| {
                i = (i + 1) % w.queries.len();
                w.index.match_prefix(black_box(&w.queries[i]), &mut m);
                black_box(m.best())
            })
        });
        if engines == 64 {
            // Approximate mode's write, after the lookup: the prompt recorded for the engine
            // routing picked (the longest match). Prompts repeat once the ≈3,400 have gone
            // round, by then refreshing entries rather than adding them, as a conversation's next
            // turn mostly does.
            let picks: Vec<EngineId> = w
                .queries
                .iter()
                .map(|q| {
                    w.index.match_prefix(q, &mut m);
                    m.best().map_or(EngineId(0), |b| b.0)
                })
                .collect();
            let mut index = w.index.clone();
            let mut i = 0;
            let mut tick = index.clock();
            g.bench_function("insert/64", |b| {
                b.iter_batched_ref(
                    || {
                        i = (i + 1) % w.queries.len();
                        tick += 1;
                        (i, tick)
                    },
                    |(i, t)| index.insert(picks[*i], &w.queries[*i], *t),
                    BatchSize::SmallInput,
                )
            });
        }
    }
    g.finish();
}

fn keys(c: &mut Criterion) {
    let tokens: Vec<u32> = (0..4096u32)
        .map(|t| t.wrapping_mul(2_654_435_761) % 128_000)
        .collect();
    let mut out = Vec::new();
    let mut g = c.benchmark_group("block_keys");
    g.throughput(Throughput::Elements(tokens.len() as u64));
    g.bench_function("4096_tokens", |b| {
        b.iter(|| block_keys_into(black_box(&tokens), 16, 0, &mut out))
    });
    g.finish();
}

criterion_group!(benches, lookup, keys);
criterion_main!(benches);
