//! The workload model: requests with arrival times and prompt *descriptions*, and the time
//! transformations a replayer needs (compression, cutting, de-bucketing).
//!
//! A prompt is kept as a list of [`Segment`]s (which deterministic token stream, how many tokens)
//! rather than as token ids: the Mooncake synthetic trace alone is ~61 M prompt tokens (245 MB as
//! `u32`), while its segment lists take ~2 MB. Tokens are produced per request, on demand, by
//! [`crate::Synthesizer`].

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{invalid, Result};

/// Which deterministic token stream a segment draws from.
///
/// The namespaces are separate so that a Mooncake hash id `7`, shared prefix `7` and request `7`
/// never produce the same tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// A Mooncake prefix block: the trace's `hash_id`. Identical id ⇒ identical block and prefix.
    Block(u64),
    /// Text shared between requests on purpose: a system prompt or a synthetic shared prefix.
    Shared(u64),
    /// Text owned by one request or one conversation turn (a user message, an answer).
    Unique(u64),
}

/// `len` tokens: the first `len` tokens of the stream named by `source`.
///
/// Taking a *prefix* of the stream is what makes truncation consistent: the last, partial
/// Mooncake block is the head of the same block's full 512 tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Segment {
    /// Which stream.
    pub source: Source,
    /// How many of its leading tokens.
    pub len: u32,
}

/// A prompt as the concatenation of its segments.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptSpec {
    /// In prompt order.
    pub segments: Vec<Segment>,
}

impl PromptSpec {
    /// Prompt length in tokens.
    pub fn len(&self) -> u32 {
        self.segments.iter().map(|s| s.len).sum()
    }

    /// Whether the prompt has no tokens.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A request at t = 0 with one output token and these `(source, len)` segments (unit tests).
#[cfg(test)]
pub(crate) fn test_request(parts: &[(Source, u32)]) -> Request {
    Request {
        at_ms: 0.0,
        input: PromptSpec {
            segments: parts
                .iter()
                .map(|&(source, len)| Segment { source, len })
                .collect(),
        },
        output_tokens: 1,
    }
}

/// One request of a workload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    /// Arrival time in milliseconds after the trace's start.
    pub at_ms: f64,
    /// The prompt.
    pub input: PromptSpec,
    /// How many tokens to ask for (`max_tokens` with `ignore_eos`).
    pub output_tokens: u32,
}

/// Hands out [`Source::Unique`] segments with fresh ids, in order (the synthetic generators'
/// answers and new messages).
#[derive(Debug, Default)]
pub(crate) struct UniqueSegments {
    next: u64,
}

impl UniqueSegments {
    pub(crate) fn take(&mut self, len: u32) -> Segment {
        self.next += 1;
        Segment {
            source: Source::Unique(self.next - 1),
            len,
        }
    }
}

/// A named workload: requests in arrival order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trace {
    /// A label for reports (`mooncake`, `azure`, `chat`, ...).
    pub name: String,
    /// In arrival order (ties keep file order).
    pub requests: Vec<Request>,
    /// The block size the trace's prefix information is cut with (512 for Mooncake), if any.
    pub block_tokens: Option<u32>,
}

/// Size and rate figures of a trace, for a bench's preamble.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct TraceStats {
    /// Number of requests.
    pub requests: usize,
    /// Last arrival minus first arrival.
    pub span_ms: f64,
    /// Σ prompt tokens.
    pub input_tokens: u64,
    /// Σ requested output tokens.
    pub output_tokens: u64,
    /// `requests / span`; `None` when the span is zero.
    pub requests_per_s: Option<f64>,
    /// `input_tokens / span`; `None` when the span is zero.
    pub input_tokens_per_s: Option<f64>,
}

impl Trace {
    /// A trace from requests in any order: they are sorted (stably) by arrival time, because
    /// every consumer (replay, cache bounds) walks them in arrival order.
    pub fn new(
        name: impl Into<String>,
        mut requests: Vec<Request>,
        block_tokens: Option<u32>,
    ) -> Self {
        requests.sort_by(|a, b| a.at_ms.total_cmp(&b.at_ms));
        Self {
            name: name.into(),
            requests,
            block_tokens,
        }
    }

    /// Totals and mean rates.
    pub fn stats(&self) -> TraceStats {
        let first = self.requests.first().map_or(0.0, |r| r.at_ms);
        let last = self.requests.last().map_or(0.0, |r| r.at_ms);
        let span_ms = last - first;
        let input_tokens = self.requests.iter().map(|r| u64::from(r.input.len())).sum();
        let output_tokens = self
            .requests
            .iter()
            .map(|r| u64::from(r.output_tokens))
            .sum();
        let per_s = |x: f64| (span_ms > 0.0).then(|| x * 1000.0 / span_ms);
        TraceStats {
            requests: self.requests.len(),
            span_ms,
            input_tokens,
            output_tokens,
            requests_per_s: per_s(self.requests.len() as f64),
            input_tokens_per_s: per_s(input_tokens as f64),
        }
    }

    /// The same trace played `time_factor` times faster (arrival times divided by it): the way to
    /// reach a target load with a trace recorded on a bigger or smaller cluster.
    ///
    /// # Errors
    /// [`crate::WorkloadError::InvalidParam`] unless `time_factor` is finite and positive.
    pub fn scaled(&self, time_factor: f64) -> Result<Self> {
        if !(time_factor.is_finite() && time_factor > 0.0) {
            return Err(invalid(
                "time_factor",
                format!("{time_factor} (must be finite and > 0)"),
            ));
        }
        let mut out = self.clone();
        for r in &mut out.requests {
            r.at_ms /= time_factor;
        }
        Ok(out)
    }

    /// The first `n` requests.
    pub fn head(&self, n: usize) -> Self {
        let mut out = self.clone();
        out.requests.truncate(n);
        out
    }

    /// The requests arriving in `[start_ms, end_ms)`, with times re-based so that `start_ms`
    /// becomes 0 (a replay of a window should not idle until the window starts).
    pub fn window(&self, start_ms: f64, end_ms: f64) -> Self {
        let requests = self
            .requests
            .iter()
            .filter(|r| r.at_ms >= start_ms && r.at_ms < end_ms)
            .map(|r| Request {
                at_ms: r.at_ms - start_ms,
                ..r.clone()
            })
            .collect();
        Self {
            name: self.name.clone(),
            requests,
            block_tokens: self.block_tokens,
        }
    }

    /// Spread arrivals uniformly inside their `bucket_ms` bucket, then re-sort.
    ///
    /// Traces with quantised timestamps (the Mooncake conversation trace uses 3,000 ms buckets
    /// with up to 28 requests each, perf-model §3.2) would otherwise arrive as synchronised bursts
    /// that no real client produces. Seeded, so a replay is repeatable.
    ///
    /// # Errors
    /// [`crate::WorkloadError::InvalidParam`] unless `bucket_ms` is finite and positive.
    pub fn jittered(&self, bucket_ms: f64, seed: u64) -> Result<Self> {
        if !(bucket_ms.is_finite() && bucket_ms > 0.0) {
            return Err(invalid(
                "bucket_ms",
                format!("{bucket_ms} (must be finite and > 0)"),
            ));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let requests = self
            .requests
            .iter()
            .map(|r| {
                let start = (r.at_ms / bucket_ms).floor() * bucket_ms;
                Request {
                    at_ms: start + rng.random::<f64>() * bucket_ms,
                    ..r.clone()
                }
            })
            .collect();
        Ok(Self::new(self.name.clone(), requests, self.block_tokens))
    }

    /// Replace the first `opts.tokens` tokens of a seeded `opts.fraction` of the requests by one
    /// of `opts.groups` shared prefixes (picked uniformly), keeping every prompt's length.
    ///
    /// For traces without prefix information (Azure), to give a prefix-aware router something
    /// to find. Requests shorter than the prefix become entirely shared text.
    ///
    /// # Errors
    /// [`crate::WorkloadError::InvalidParam`] when `groups` is 0 or `fraction` is outside `[0, 1]`.
    pub fn with_shared_prefix(&self, opts: SharedPrefix, seed: u64) -> Result<Self> {
        if opts.groups == 0 {
            return Err(invalid("groups", "must be at least 1"));
        }
        if !(0.0..=1.0).contains(&opts.fraction) {
            return Err(invalid(
                "fraction",
                format!("{} (must be in [0, 1])", opts.fraction),
            ));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut out = self.clone();
        for r in &mut out.requests {
            // Draw both numbers for every request so that changing `fraction` does not reshuffle
            // which group the other requests get.
            let pick = rng.random::<f64>() < opts.fraction;
            let group = rng.random_range(0..opts.groups);
            if pick {
                r.input = prepend_shared(&r.input, Source::Shared(u64::from(group)), opts.tokens);
            }
        }
        Ok(out)
    }
}

/// Options for [`Trace::with_shared_prefix`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SharedPrefix {
    /// How many distinct prefixes.
    pub groups: u32,
    /// Prefix length in tokens.
    pub tokens: u32,
    /// Fraction of requests that get one, in `[0, 1]`.
    pub fraction: f64,
}

/// `prefix` tokens of `source`, then `prompt` shortened from the front by as many tokens.
/// Shortening a segment keeps the *head* of its stream; its content is arbitrary anyway.
fn prepend_shared(prompt: &PromptSpec, source: Source, prefix: u32) -> PromptSpec {
    let total = prompt.len();
    let take = prefix.min(total);
    let mut drop = take;
    let mut segments = vec![Segment { source, len: take }];
    for s in &prompt.segments {
        let cut = drop.min(s.len);
        drop -= cut;
        if s.len > cut {
            segments.push(Segment {
                source: s.source,
                len: s.len - cut,
            });
        }
    }
    segments.retain(|s| s.len > 0);
    PromptSpec { segments }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(at_ms: f64, len: u32) -> Request {
        Request {
            at_ms,
            input: PromptSpec {
                segments: vec![Segment {
                    source: Source::Unique(at_ms as u64),
                    len,
                }],
            },
            output_tokens: 1,
        }
    }

    #[test]
    fn new_sorts_stably_by_arrival() {
        let t = Trace::new("t", vec![req(5.0, 1), req(1.0, 2), req(5.0, 3)], None);
        let lens: Vec<u32> = t.requests.iter().map(|r| r.input.len()).collect();
        assert_eq!(lens, [2, 1, 3]);
    }

    #[test]
    fn scaled_head_window() {
        let t = Trace::new("t", vec![req(0.0, 1), req(1000.0, 1), req(3000.0, 1)], None);
        let s = t.scaled(2.0).unwrap();
        assert_eq!(s.requests[2].at_ms, 1500.0);
        assert!(t.scaled(0.0).is_err());
        assert!(t.scaled(f64::NAN).is_err());
        assert_eq!(t.head(2).requests.len(), 2);
        let w = t.window(1000.0, 3000.0);
        assert_eq!(w.requests.len(), 1);
        assert_eq!(w.requests[0].at_ms, 0.0);
    }

    #[test]
    fn stats_rates() {
        let t = Trace::new("t", vec![req(0.0, 10), req(2000.0, 30)], None);
        let s = t.stats();
        assert_eq!(s.input_tokens, 40);
        assert_eq!(s.requests_per_s, Some(1.0));
        assert_eq!(s.input_tokens_per_s, Some(20.0));
        assert_eq!(Trace::new("e", vec![], None).stats().requests_per_s, None);
    }

    #[test]
    fn jitter_stays_in_bucket_and_is_seeded() {
        let t = Trace::new(
            "t",
            (0..100)
                .map(|i| req(f64::from(i / 10) * 3000.0, 1))
                .collect(),
            None,
        );
        let a = t.jittered(3000.0, 7).unwrap();
        assert_eq!(a, t.jittered(3000.0, 7).unwrap());
        assert_ne!(a, t.jittered(3000.0, 8).unwrap());
        assert!(a.requests.windows(2).all(|w| w[0].at_ms <= w[1].at_ms));
        for r in &a.requests {
            // The Unique id is the original time: the request stays in its own bucket.
            let Source::Unique(orig) = r.input.segments[0].source else {
                panic!()
            };
            assert!(r.at_ms >= orig as f64 && r.at_ms < orig as f64 + 3000.0);
        }
        assert!(t.jittered(-1.0, 0).is_err());
    }

    #[test]
    fn shared_prefix_keeps_length() {
        let t = Trace::new(
            "t",
            (0..50).map(|i| req(f64::from(i), 100 + i as u32)).collect(),
            None,
        );
        let opts = SharedPrefix {
            groups: 3,
            tokens: 120,
            fraction: 0.5,
        };
        let s = t.with_shared_prefix(opts, 1).unwrap();
        let mut shared = 0;
        for (a, b) in t.requests.iter().zip(&s.requests) {
            assert_eq!(a.input.len(), b.input.len());
            if let Source::Shared(g) = b.input.segments[0].source {
                assert!(g < 3);
                assert_eq!(b.input.segments[0].len, a.input.len().min(120));
                shared += 1;
            }
        }
        assert!(shared > 10 && shared < 40, "{shared}");
        let none = t
            .with_shared_prefix(
                SharedPrefix {
                    fraction: 0.0,
                    ..opts
                },
                1,
            )
            .unwrap();
        assert_eq!(none, t);
        assert!(t
            .with_shared_prefix(SharedPrefix { groups: 0, ..opts }, 1)
            .is_err());
    }
}
