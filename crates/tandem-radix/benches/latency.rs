//! Per-lookup latency percentiles, which criterion (means and medians of batches) does not give.
//!
//! For 8, 64 and 512 engines: build the 1M-entry workload (see `support`), then time every one of
//! its 4,096 distinct prompts 40 times, each round in a fresh random order so that consecutive
//! lookups share no cache lines beyond what the workload itself shares. Each sample is one
//! `match_prefix` call timed with `Instant` (about 20–30 ns of timer overhead included).
//! `cargo bench -p tandem-radix --bench latency`.

mod support;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::hint::black_box;
use std::time::Instant;
use tandem_radix::PrefixMatch;

const ROUNDS: usize = 40;

fn main() {
    // `cargo bench` passes `--bench`; a filter argument selects engine counts ("64").
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    for engines in [8u16, 64, 512] {
        if !filter.is_empty() && !filter.iter().any(|f| *f == engines.to_string()) {
            continue;
        }
        let t = Instant::now();
        let w = support::build(engines);
        println!(
            "{} (built in {:.1} s)",
            support::describe(engines, &w),
            t.elapsed().as_secs_f64()
        );
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut order: Vec<usize> = (0..w.queries.len()).collect();
        let mut m = PrefixMatch::new();
        // (ns, blocks in the prompt) per lookup.
        let mut ns: Vec<(u64, usize)> = Vec::with_capacity(order.len() * ROUNDS);
        let mut blocks = 0u64;
        for _ in 0..ROUNDS {
            order.shuffle(&mut rng);
            for &q in &order {
                let keys = &w.queries[q];
                let t = Instant::now();
                w.index.match_prefix(black_box(keys), &mut m);
                ns.push((t.elapsed().as_nanos() as u64, keys.len()));
                blocks += u64::from(black_box(&m).best().map_or(0, |b| b.1));
            }
        }
        let mean = ns.iter().map(|s| s.0).sum::<u64>() as f64 / ns.len() as f64;
        ns.sort_unstable();
        let at = |p: f64| ((ns.len() as f64 * p) as usize).min(ns.len() - 1);
        let pct = |p: f64| ns[at(p)].0 as f64 / 1000.0;
        let slowest = &ns[at(0.99)..];
        let slow_len = slowest.iter().map(|s| s.1).sum::<usize>() as f64 / slowest.len() as f64;
        println!(
            "  lookup µs over {} samples: mean {:.2}, p50 {:.2}, p90 {:.2}, p99 {:.2}, p99.9 {:.2}, max {:.2}; {:.1} ns per best-matched block; slowest 1 %: prompts of {:.0} blocks on average",
            ns.len(),
            mean / 1000.0,
            pct(0.50),
            pct(0.90),
            pct(0.99),
            pct(0.999),
            ns.last().unwrap().0 as f64 / 1000.0,
            mean * ns.len() as f64 / blocks as f64,
            slow_len,
        );
    }
}
