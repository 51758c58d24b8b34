//! Benchmark report maths: per-request outcomes in, a serialisable summary out.
//!
//! Definitions follow `vllm bench serve` where it has one, so numbers compare with the tool P/D
//! papers and blogs quote (perf-model §4):
//! - TTFT: request sent → first token. E2E: request sent → last token.
//! - TPOT (per request): `(e2e − ttft) / (output_tokens − 1)`, only for `output_tokens > 1`.
//! - ITL: every gap between consecutive tokens, pooled over all requests.
//! - Goodput (DistServe): requests per second meeting **both** `ttft ≤ slo.ttft_ms` and
//!   `tpot ≤ slo.tpot_ms` (a one-token answer has TPOT 0); attainment is that count over *all*
//!   requests, failed ones included — a failure never meets an SLO.
//! - Percentiles are nearest-rank ([`percentile`]): always an observed value, no interpolation.
//!
//! Latencies, throughput and the hit rate count successful requests only; failures carry no
//! trustworthy timing or usage. Load spread counts every request that reached an engine.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What happened to one request, as the bench client measured it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    /// Completed with a full response (HTTP 200, stream ended normally).
    pub ok: bool,
    /// Sent → first token, ms. Ignored when `!ok`.
    pub ttft_ms: f64,
    /// Gaps between consecutive output tokens (or content chunks), ms.
    pub itl_ms: Vec<f64>,
    /// Sent → last token, ms.
    pub e2e_ms: f64,
    /// Output tokens received (the `usage` figure when there is one).
    pub output_tokens: u32,
    /// `usage.prompt_tokens`.
    pub prompt_tokens: u32,
    /// `usage.prompt_tokens_details.cached_tokens` (0 when absent).
    pub cached_tokens: u32,
    /// Engine that ran the prefill (or the whole request, when not disaggregated).
    pub prefill_engine: Option<String>,
    /// Engine that ran the decode, when disaggregated.
    pub decode_engine: Option<String>,
    /// The coordinator's own split of its TTFT, ms: queue, prefill, handoff, decode first token
    /// (they add up to the coordinator's TTFT, which the client sees a hop later).
    pub phases_ms: Option<[f64; 4]>,
}

impl Outcome {
    /// `(e2e − ttft) / (output_tokens − 1)`; `None` for fewer than two output tokens.
    pub fn tpot_ms(&self) -> Option<f64> {
        (self.output_tokens > 1)
            .then(|| (self.e2e_ms - self.ttft_ms) / f64::from(self.output_tokens - 1))
    }

    /// Meets both SLOs (see the module doc for the one-token case).
    pub fn meets(&self, slo: Slo) -> bool {
        self.ok && self.ttft_ms <= slo.ttft_ms && self.tpot_ms().unwrap_or(0.0) <= slo.tpot_ms
    }
}

/// Latency objectives for goodput.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Slo {
    /// Time to first token, ms.
    pub ttft_ms: f64,
    /// Time per output token after the first, ms.
    pub tpot_ms: f64,
}

/// Nearest-rank percentile of **ascending** `sorted` data: the value at 1-based rank
/// `ceil(p / 100 · n)`, rank 1 for `p = 0`. `None` when empty. `p` is clamped to `[0, 100]`.
///
/// Nearest-rank never invents a latency nobody saw, and p100 is the maximum.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let n = sorted.len();
    let rank = (p.clamp(0.0, 100.0) / 100.0 * n as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, n) - 1])
}

/// Distribution figures of one metric.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Dist {
    /// Samples.
    pub count: usize,
    /// Arithmetic mean.
    pub mean: f64,
    /// Nearest-rank median.
    pub p50: f64,
    /// Nearest-rank 90th percentile.
    pub p90: f64,
    /// Nearest-rank 99th percentile.
    pub p99: f64,
    /// Largest sample.
    pub max: f64,
}

impl Dist {
    /// `None` for no samples. NaNs sort last (`total_cmp`), so they surface in `max`.
    pub fn of(values: impl IntoIterator<Item = f64>) -> Option<Self> {
        let mut v: Vec<f64> = values.into_iter().collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let p = |q| percentile(&v, q).unwrap_or(f64::NAN);
        Some(Self {
            count: v.len(),
            mean: v.iter().sum::<f64>() / v.len() as f64,
            p50: p(50.0),
            p90: p(90.0),
            p99: p(99.0),
            max: v[v.len() - 1],
        })
    }
}

/// What one engine was given.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct EngineLoad {
    /// Requests.
    pub requests: u64,
    /// Σ prompt tokens of those requests.
    pub prompt_tokens: u64,
}

/// How evenly a role's engines were loaded. Ratios are `None` without engines.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LoadSpread {
    /// Per engine name.
    pub per_engine: BTreeMap<String, EngineLoad>,
    /// Busiest engine's requests over the mean (1.0 = even; N = everything on one of N).
    pub requests_max_over_mean: Option<f64>,
    /// Idlest engine's requests over the mean (0 = an engine got nothing).
    pub requests_min_over_mean: Option<f64>,
    /// As `requests_max_over_mean`, for prompt tokens.
    pub prompt_tokens_max_over_mean: Option<f64>,
    /// As `requests_min_over_mean`, for prompt tokens.
    pub prompt_tokens_min_over_mean: Option<f64>,
}

impl LoadSpread {
    fn add(&mut self, engine: &str, prompt_tokens: u32) {
        let e = self.per_engine.entry(engine.to_string()).or_default();
        e.requests += 1;
        e.prompt_tokens += u64::from(prompt_tokens);
    }

    /// Add engines that may have received nothing (they would otherwise be invisible, and
    /// min/mean would look better than it was), then recompute the ratios.
    pub fn include<S: AsRef<str>>(&mut self, engines: &[S]) {
        for e in engines {
            self.per_engine.entry(e.as_ref().to_string()).or_default();
        }
        self.recompute();
    }

    fn recompute(&mut self) {
        let spread = |f: fn(&EngineLoad) -> u64| {
            let v: Vec<u64> = self.per_engine.values().map(f).collect();
            let sum: u64 = v.iter().sum();
            if sum == 0 {
                return (None, None);
            }
            // x / mean as x · n / sum: exact for small integers.
            let n = v.len() as f64;
            let of = |x: u64| x as f64 * n / sum as f64;
            let max = v.iter().copied().max().unwrap_or(0);
            let min = v.iter().copied().min().unwrap_or(0);
            (Some(of(max)), Some(of(min)))
        };
        (self.requests_max_over_mean, self.requests_min_over_mean) = spread(|e| e.requests);
        (
            self.prompt_tokens_max_over_mean,
            self.prompt_tokens_min_over_mean,
        ) = spread(|e| e.prompt_tokens);
    }
}

/// A benchmark run's figures, ready for JSON (`serde_json::to_string`) or
/// [`crate::side_by_side`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    /// Outcomes given.
    pub requests: usize,
    /// Of which `ok`.
    pub ok: usize,
    /// Of which not `ok`.
    pub failed: usize,
    /// Wall time of the run, s (the denominator of every rate).
    pub duration_s: f64,
    /// TTFT, ms.
    pub ttft_ms: Option<Dist>,
    /// Per-request TPOT, ms.
    pub tpot_ms: Option<Dist>,
    /// Pooled inter-token latency, ms.
    pub itl_ms: Option<Dist>,
    /// End-to-end latency, ms.
    pub e2e_ms: Option<Dist>,
    /// Successful requests per second.
    pub requests_per_s: f64,
    /// Σ output tokens of successful requests.
    pub output_tokens: u64,
    /// Output tokens per second.
    pub output_tokens_per_s: f64,
    /// Σ prompt tokens of successful requests.
    pub prompt_tokens: u64,
    /// Σ cached prompt tokens of successful requests.
    pub cached_tokens: u64,
    /// The objectives goodput was computed against.
    pub slo: Slo,
    /// Requests meeting both SLOs per second.
    pub goodput_requests_per_s: f64,
    /// Fraction of all requests meeting both SLOs.
    pub slo_attainment: f64,
    /// `cached_tokens / prompt_tokens`; `None` without prompt tokens.
    pub prefix_hit_rate: Option<f64>,
    /// A bound to compare the hit rate with (e.g. [`crate::infinite_cache_hits`]' token
    /// fraction), set by [`Summary::with_hit_bound`].
    pub hit_upper_bound: Option<f64>,
    /// `prefix_hit_rate / hit_upper_bound`: how much of the reachable reuse the run got.
    pub hit_vs_bound: Option<f64>,
    /// Spread over prefill engines (or all engines when not disaggregated).
    pub prefill_load: LoadSpread,
    /// Spread over decode engines.
    pub decode_load: LoadSpread,
    /// The coordinator's TTFT phases over successful requests that have them, ms.
    pub queue_ms: Option<Dist>,
    pub prefill_ms: Option<Dist>,
    pub handoff_ms: Option<Dist>,
    pub decode_first_token_ms: Option<Dist>,
}

impl Summary {
    /// Summarise a run that took `duration_s` seconds (rates are 0 when it is not positive).
    pub fn from_outcomes(outcomes: &[Outcome], slo: Slo, duration_s: f64) -> Self {
        let good: Vec<&Outcome> = outcomes.iter().filter(|o| o.ok).collect();
        let per_s = |x: f64| {
            if duration_s > 0.0 {
                x / duration_s
            } else {
                0.0
            }
        };
        let output_tokens: u64 = good.iter().map(|o| u64::from(o.output_tokens)).sum();
        let prompt_tokens: u64 = good.iter().map(|o| u64::from(o.prompt_tokens)).sum();
        let cached_tokens: u64 = good.iter().map(|o| u64::from(o.cached_tokens)).sum();
        let meeting = outcomes.iter().filter(|o| o.meets(slo)).count();
        let mut prefill_load = LoadSpread::default();
        let mut decode_load = LoadSpread::default();
        for o in outcomes {
            if let Some(e) = &o.prefill_engine {
                prefill_load.add(e, o.prompt_tokens);
            }
            if let Some(e) = &o.decode_engine {
                decode_load.add(e, o.prompt_tokens);
            }
        }
        prefill_load.recompute();
        decode_load.recompute();
        Self {
            requests: outcomes.len(),
            ok: good.len(),
            failed: outcomes.len() - good.len(),
            duration_s,
            ttft_ms: Dist::of(good.iter().map(|o| o.ttft_ms)),
            tpot_ms: Dist::of(good.iter().filter_map(|o| o.tpot_ms())),
            itl_ms: Dist::of(good.iter().flat_map(|o| o.itl_ms.iter().copied())),
            e2e_ms: Dist::of(good.iter().map(|o| o.e2e_ms)),
            requests_per_s: per_s(good.len() as f64),
            output_tokens,
            output_tokens_per_s: per_s(output_tokens as f64),
            prompt_tokens,
            cached_tokens,
            slo,
            goodput_requests_per_s: per_s(meeting as f64),
            slo_attainment: if outcomes.is_empty() {
                0.0
            } else {
                meeting as f64 / outcomes.len() as f64
            },
            prefix_hit_rate: (prompt_tokens > 0)
                .then(|| cached_tokens as f64 / prompt_tokens as f64),
            hit_upper_bound: None,
            hit_vs_bound: None,
            prefill_load,
            decode_load,
            queue_ms: Dist::of(good.iter().filter_map(|o| o.phases_ms.map(|p| p[0]))),
            prefill_ms: Dist::of(good.iter().filter_map(|o| o.phases_ms.map(|p| p[1]))),
            handoff_ms: Dist::of(good.iter().filter_map(|o| o.phases_ms.map(|p| p[2]))),
            decode_first_token_ms: Dist::of(good.iter().filter_map(|o| o.phases_ms.map(|p| p[3]))),
        }
    }

    /// Record the hit-rate bound to compare with (a fraction in `[0, 1]`).
    pub fn with_hit_bound(mut self, bound: f64) -> Self {
        self.hit_upper_bound = Some(bound);
        self.hit_vs_bound = self
            .prefix_hit_rate
            .filter(|_| bound > 0.0)
            .map(|h| h / bound);
        self
    }

    /// List every configured engine in the load spread, including idle ones.
    pub fn with_engines<P: AsRef<str>, D: AsRef<str>>(
        mut self,
        prefill: &[P],
        decode: &[D],
    ) -> Self {
        self.prefill_load.include(prefill);
        self.decode_load.include(decode);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let v: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(5.0));
        assert_eq!(percentile(&v, 90.0), Some(9.0));
        assert_eq!(percentile(&v, 91.0), Some(10.0));
        assert_eq!(percentile(&v, 99.0), Some(10.0));
        assert_eq!(percentile(&v, 0.0), Some(1.0));
        assert_eq!(percentile(&v, 100.0), Some(10.0));
        assert_eq!(percentile(&v, 150.0), Some(10.0));
        assert_eq!(percentile(&[3.0], 50.0), Some(3.0));
        assert_eq!(percentile(&[], 50.0), None);
        let hundred: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&hundred, 99.0), Some(99.0));
        assert_eq!(percentile(&hundred, 50.0), Some(50.0));
        let d = Dist::of([4.0, 1.0, 3.0, 2.0]).unwrap();
        assert_eq!(
            (d.count, d.mean, d.p50, d.p90, d.p99, d.max),
            (4, 2.5, 2.0, 4.0, 4.0, 4.0)
        );
        assert_eq!(Dist::of([]), None);
    }

    fn outcome(ttft: f64, e2e: f64, out: u32, engine: &str) -> Outcome {
        Outcome {
            ok: true,
            ttft_ms: ttft,
            itl_ms: vec![(e2e - ttft) / f64::from(out.max(2) - 1); out.saturating_sub(1) as usize],
            e2e_ms: e2e,
            output_tokens: out,
            prompt_tokens: 100,
            cached_tokens: 25,
            prefill_engine: Some(engine.into()),
            decode_engine: None,
            phases_ms: None,
        }
    }

    #[test]
    fn goodput_and_rates() {
        let slo = Slo {
            ttft_ms: 200.0,
            tpot_ms: 50.0,
        };
        let outcomes = vec![
            outcome(100.0, 100.0 + 9.0 * 40.0, 10, "a"), // meets both (TPOT 40)
            outcome(300.0, 300.0 + 9.0 * 10.0, 10, "a"), // TTFT too slow
            outcome(100.0, 100.0 + 9.0 * 60.0, 10, "b"), // TPOT too slow
            outcome(150.0, 150.0, 1, "b"),               // one token: TPOT 0, meets
            Outcome {
                ok: false,
                ttft_ms: 1.0,
                prompt_tokens: 100,
                prefill_engine: Some("b".into()),
                ..Outcome::default()
            },
        ];
        let s = Summary::from_outcomes(&outcomes, slo, 2.0);
        assert_eq!((s.requests, s.ok, s.failed), (5, 4, 1));
        assert_eq!(s.goodput_requests_per_s, 1.0);
        assert_eq!(s.slo_attainment, 0.4);
        assert_eq!(s.requests_per_s, 2.0);
        assert_eq!(s.output_tokens, 31);
        assert_eq!(s.output_tokens_per_s, 15.5);
        let tpot = s.tpot_ms.unwrap();
        assert_eq!(tpot.count, 3);
        assert!((tpot.mean - 110.0 / 3.0).abs() < 1e-9);
        assert_eq!(tpot.p50, 40.0);
        assert_eq!(s.ttft_ms.unwrap().p50, 100.0);
        assert_eq!(s.itl_ms.unwrap().count, 27);
        assert_eq!(s.prefix_hit_rate, Some(0.25));
        let s = s.with_hit_bound(0.5);
        assert_eq!(s.hit_vs_bound, Some(0.5));
        // Prefill: a has 2 requests, b 3 (failed one included): mean 2.5.
        assert_eq!(s.prefill_load.requests_max_over_mean, Some(1.2));
        assert_eq!(s.prefill_load.requests_min_over_mean, Some(0.8));
        assert_eq!(s.decode_load.requests_max_over_mean, None);
        let s = s.with_engines(&["a", "b", "c"], &[] as &[&str]);
        assert_eq!(s.prefill_load.requests_min_over_mean, Some(0.0));
        assert_eq!(s.prefill_load.requests_max_over_mean, Some(1.8));
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["prefill_load"]["per_engine"]["c"]["requests"], 0);
        assert!(json["decode_load"]["requests_max_over_mean"].is_null());
    }

    #[test]
    fn empty_and_zero_duration() {
        let slo = Slo {
            ttft_ms: 1.0,
            tpot_ms: 1.0,
        };
        let s = Summary::from_outcomes(&[], slo, 0.0);
        assert_eq!(
            (s.requests, s.requests_per_s, s.slo_attainment),
            (0, 0.0, 0.0)
        );
        assert_eq!((s.ttft_ms, s.prefix_hit_rate), (None, None));
        assert_eq!(s.with_hit_bound(0.5).hit_vs_bound, None);
    }
}
