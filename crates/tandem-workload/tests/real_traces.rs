//! Figures on the published traces in `../shared/data`, checked against perf-model §0 and §3.
//! Each test skips (with a note) when the data folder is absent.

use std::path::PathBuf;

use tandem_workload::{
    infinite_cache_hits, lru_cache_hits, parse_azure, parse_mooncake, Assignment, Synthesizer,
    Trace,
};

fn data(name: &str) -> Option<String> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/data")
        .join(name);
    match std::fs::read_to_string(&path) {
        Ok(text) => Some(text),
        Err(e) => {
            println!("skipping: {} not readable ({e})", path.display());
            None
        }
    }
}

fn mooncake() -> Option<Trace> {
    data("mooncake_synthetic_trace.jsonl").map(|t| parse_mooncake(t.as_bytes()).unwrap())
}

fn close(got: f64, want: f64, tol: f64, what: &str) {
    println!(
        "{what}: {:.2} % (perf-model: {:.1} %)",
        got * 100.0,
        want * 100.0
    );
    assert!((got - want).abs() <= tol, "{what}: {got} vs {want}");
}

#[test]
fn mooncake_synthetic_statistics() {
    let Some(t) = mooncake() else { return };
    let s = t.stats();
    assert_eq!(s.requests, 3993);
    assert_eq!(s.input_tokens, 61_194_628);
    assert_eq!(s.span_ms, 1_022_025.0);
    let blocks: usize = t.requests.iter().map(|r| r.input.segments.len()).sum();
    assert_eq!(blocks, 121_877);
}

#[test]
fn mooncake_infinite_cache_bound() {
    let Some(t) = mooncake() else { return };
    let h = infinite_cache_hits(&t, None).unwrap();
    close(
        h.block_fraction(),
        0.640,
        0.0006,
        "infinite cache, block-weighted",
    );
    close(
        h.token_fraction(),
        0.651,
        0.0006,
        "infinite cache, token-weighted",
    );
    // §3.2: 44.6 % of requests have at least one hit.
    close(
        h.requests_with_hit as f64 / h.requests as f64,
        0.446,
        0.0006,
        "requests with a hit",
    );
}

#[test]
fn mooncake_round_robin_and_lru_bounds() {
    let Some(t) = mooncake() else { return };
    // §0 item 9: round-robin over 8 infinite caches keeps 22.6 %.
    let rr_inf = lru_cache_hits(&t, None, 8, None, Assignment::RoundRobin).unwrap();
    close(
        rr_inf.total.block_fraction(),
        0.226,
        0.0006,
        "8 inst, infinite, round-robin",
    );
    // §3.2 table: 8 instances of 512 k tokens.
    let cap = Some(512_000);
    let rr = lru_cache_hits(&t, None, 8, cap, Assignment::RoundRobin).unwrap();
    close(
        rr.total.block_fraction(),
        0.063,
        0.0006,
        "8 inst, 512k, round-robin",
    );
    println!(
        "  token-weighted {:.2} %",
        rr.total.token_fraction() * 100.0
    );
    let lp = lru_cache_hits(&t, None, 8, cap, Assignment::LongestPrefix).unwrap();
    close(
        lp.total.block_fraction(),
        0.359,
        0.0006,
        "8 inst, 512k, longest prefix",
    );
    println!(
        "  max/mean requests {:.3} (perf-model: 1.02)",
        lp.max_over_mean_requests()
    );
    assert!((lp.max_over_mean_requests() - 1.02).abs() < 0.005);
    let lp2 = lru_cache_hits(&t, None, 8, Some(2_050_000), Assignment::LongestPrefix).unwrap();
    close(
        lp2.total.block_fraction(),
        0.627,
        0.0006,
        "8 inst, 2.05M, longest prefix",
    );
    let rr2 = lru_cache_hits(&t, None, 8, Some(2_050_000), Assignment::RoundRobin).unwrap();
    close(
        rr2.total.block_fraction(),
        0.162,
        0.0006,
        "8 inst, 2.05M, round-robin",
    );
    // An explicit assignment equal to round-robin gives the same figure.
    let v: Vec<usize> = (0..t.requests.len()).map(|i| i % 8).collect();
    let given = lru_cache_hits(&t, None, 8, cap, Assignment::Given(&v)).unwrap();
    assert_eq!(given, rr);
    // One unbounded instance is the infinite bound.
    let one = lru_cache_hits(&t, None, 1, None, Assignment::RoundRobin).unwrap();
    assert_eq!(one.total, infinite_cache_hits(&t, None).unwrap());
}

#[test]
fn mooncake_synthesis_shares_prefixes() {
    let Some(t) = mooncake() else { return };
    let s = Synthesizer::new(0, 0..256).unwrap();
    // The first two requests of the file are 79 and 72 blocks long; find a pair that shares a
    // leading block and check the tokens agree exactly over the shared blocks.
    let reqs = &t.requests;
    let (a, b) = reqs
        .iter()
        .enumerate()
        .find_map(|(i, a)| {
            reqs[i + 1..]
                .iter()
                .find(|b| b.input.segments[0] == a.input.segments[0] && b.input.segments.len() > 1)
                .map(|b| (a, b))
        })
        .unwrap();
    let shared = a
        .input
        .segments
        .iter()
        .zip(&b.input.segments)
        .take_while(|(x, y)| x.source == y.source)
        .map(|(x, y)| x.len.min(y.len) as usize)
        .sum::<usize>();
    let (ta, tb) = (s.tokens(a), s.tokens(b));
    assert_eq!(ta.len(), a.input.len() as usize);
    assert_eq!(ta[..shared], tb[..shared]);
    println!("a shared prefix of {shared} tokens synthesised identically");
}

#[test]
fn azure_traces() {
    for (file, rows, span_s, mean_in) in [
        ("azure_llm_2023_code.csv", 8819, 3436.0, 2048.0),
        ("azure_llm_2023_conv.csv", 19366, 3502.0, 1155.0),
    ] {
        let Some(text) = data(file) else { return };
        let t = parse_azure(text.as_bytes()).unwrap();
        let s = t.stats();
        assert_eq!(s.requests, rows, "{file}");
        assert_eq!(t.requests[0].at_ms, 0.0);
        assert!(
            (s.span_ms / 1000.0 - span_s).abs() < 1.0,
            "{file}: {}",
            s.span_ms
        );
        let mean = s.input_tokens as f64 / rows as f64;
        assert!((mean - mean_in).abs() < 1.0, "{file}: {mean}");
        println!(
            "{file}: {rows} requests over {:.0} s, mean input {mean:.0}",
            s.span_ms / 1000.0
        );
    }
}
