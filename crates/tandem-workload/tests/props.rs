//! Properties over arbitrary traces.

use proptest::prelude::*;
use tandem_workload::{
    infinite_cache_hits, prefix_blocks, PromptSpec, Request, Segment, Source, Synthesizer, Trace,
};

/// Mooncake-shaped prompts: block ids drawn from a small pool so that prefixes collide.
fn mooncake_prompt() -> impl Strategy<Value = PromptSpec> {
    (prop::collection::vec(0u64..4, 0..6), 1u32..=16).prop_map(|(ids, last)| {
        let n = ids.len();
        // Chain ids so that, as in Mooncake, an id fixes the whole prefix: id' = f(prefix).
        let mut chained = Vec::with_capacity(n);
        let mut acc = 0u64;
        for id in ids {
            acc = acc * 5 + id + 1;
            chained.push(acc);
        }
        PromptSpec {
            segments: chained
                .into_iter()
                .enumerate()
                .map(|(k, id)| Segment {
                    source: Source::Block(id),
                    len: if k + 1 == n { last } else { 16 },
                })
                .collect(),
        }
    })
}

fn trace() -> impl Strategy<Value = Trace> {
    prop::collection::vec((0.0f64..1e6, mooncake_prompt(), 1u32..100), 0..40).prop_map(|rs| {
        let requests = rs
            .into_iter()
            .map(|(at_ms, input, output_tokens)| Request {
                at_ms,
                input,
                output_tokens,
            })
            .collect();
        Trace::new("p", requests, Some(16))
    })
}

proptest! {
    // No regression files: this crate keeps no proptest-regressions directory.
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn scaled_preserves_order_and_count(t in trace(), f in 0.01f64..100.0) {
        let s = t.scaled(f).unwrap();
        prop_assert_eq!(s.requests.len(), t.requests.len());
        prop_assert!(s.requests.windows(2).all(|w| w[0].at_ms <= w[1].at_ms));
        for (a, b) in t.requests.iter().zip(&s.requests) {
            prop_assert_eq!(&a.input, &b.input);
            prop_assert!((b.at_ms * f - a.at_ms).abs() <= 1e-9 * a.at_ms.max(1.0));
        }
    }

    #[test]
    fn jitter_preserves_count_and_sorts(t in trace(), seed in any::<u64>()) {
        let j = t.jittered(3000.0, seed).unwrap();
        prop_assert_eq!(j.requests.len(), t.requests.len());
        prop_assert!(j.requests.windows(2).all(|w| w[0].at_ms <= w[1].at_ms));
    }

    #[test]
    fn synthesis_length_is_input_length(p in mooncake_prompt(), seed in any::<u64>()) {
        let s = Synthesizer::new(seed, 0..256).unwrap();
        let r = Request { at_ms: 0.0, input: p, output_tokens: 1 };
        prop_assert_eq!(s.tokens(&r).len(), r.input.len() as usize);
    }

    /// Equal leading block keys ⇔ equal leading tokens, over those blocks.
    #[test]
    fn block_keys_agree_with_tokens(a in mooncake_prompt(), b in mooncake_prompt()) {
        let s = Synthesizer::new(3, 0..256).unwrap();
        let ra = Request { at_ms: 0.0, input: a, output_tokens: 1 };
        let rb = Request { at_ms: 0.0, input: b, output_tokens: 1 };
        let (ta, tb) = (s.tokens(&ra), s.tokens(&rb));
        let (ka, kb) = (prefix_blocks(&ra.input, 16).unwrap(), prefix_blocks(&rb.input, 16).unwrap());
        let mut start = 0usize;
        for (x, y) in ka.iter().zip(&kb) {
            let (ex, ey) = (start + x.tokens as usize, start + y.tokens as usize);
            prop_assert_eq!(x.key == y.key, ta[start..ex] == tb[start..ey]);
            if x.key != y.key { break; }
            start = ex;
        }
    }

    #[test]
    fn bound_never_exceeds_totals(t in trace()) {
        let h = infinite_cache_hits(&t, None).unwrap();
        prop_assert!(h.hit_blocks <= h.blocks && h.hit_tokens <= h.tokens);
        prop_assert_eq!(h.tokens, t.requests.iter().map(|r| u64::from(r.input.len())).sum::<u64>());
    }
}
