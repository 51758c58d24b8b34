//! The `prefix` prefill policy: the predicted time to this request's first token on each
//! engine, counting what each engine already holds and how fast it has been computing, with a
//! release guard against hot spots.
//!
//! # The formula
//!
//! For a prompt of `P` tokens and a candidate `e` predicted (by the pool's prefix index) to hold
//! the first `h_e` of them:
//!
//! ```text
//! m_e     = prefill tokens/s Tandem measured on e ((uncached tokens + c) per leg, per second
//!           busy with its prefill legs, decayed over 30 s), per unit of weight
//! g       = the geometric mean of m over the measured candidates
//! rate_e  = weight_e · g · exp(shrink(ln(m_e / g)))   shrink(x) = sign(x)·max(0, |x| − ln 1.5);
//!           unmeasured: weight_e · g; none measured: weight_e (every figure below is then in
//!           tokens)
//! ahead_e = queued_e + c·inflight_e                 uncached prefill tokens Tandem has sent to e
//!                                                   and not seen finish, plus c per request
//! L_e     = ahead_e / rate_e                        the queue ahead, in time
//! T_e     = (ahead_e + (P − h_e)) / rate_e          predicted time to this request's first token
//! cost_e  = (ahead_e + w·(P − h_e)) / rate_e        the same, with the work it adds to the pool
//!                                                   counted w times
//! S       = s / mean_e rate_e                        the slack, in time
//! pick    = argmin cost_e                           ties: the RNG
//! release (hot spot):    if L_pick > r·min_e L_e + S, pick = argmin L_e
//! release (first token): then if T_pick > r·min_e T_e + S, pick = argmin T_e
//! ```
//!
//! Rates count each leg's uncached tokens plus `c`, the same per-request cost `ahead` charges,
//! so an engine that serves many short or well-cached prompts (its time going to per-request
//! overhead) is not taken for a slow one.
//!
//! Defaults: `c = 256` tokens per in-flight request (vLLM's fixed per-request cost, ~10 ms on an
//! 8B H100, is about 300 tokens of prefill), `w = 5`, `r = 1.5`, `s = 131072` tokens (~5 s of
//! 8B H100 prefill). The KV transfer to the decode engine is the same whichever prefill engine
//! runs the prompt, so it is left out of the comparison.
//!
//! Why a measured rate: tokens are not seconds. A prefill engine on a slower GPU, one whose
//! host-memory tier keeps its PCIe link busy loading long cached conversations, or one slowed by
//! a neighbour computes fewer tokens per second, and a queue of equal length takes it longer.
//! Counting the queue in tokens sent the next long conversation to the engine that held it even
//! when that engine was the slowest in the pool; the measured rate prices that in without a
//! constant per GPU, and it follows the engine as its load changes.
//!
//! Why the band: what Tandem can measure is throughput while busy, and an engine that is busy
//! but not saturated (one short prompt in flight) shows less than one batching many. Equal GPUs
//! measured this way differ by tens of percent with their traffic, and pricing that noise
//! moved requests away from their caches and, since the busiest engine looks fastest, toward
//! the busiest (Mooncake synthetic with host tiers, unshrunk rates: hit 57.5 % against 60.1 %
//! with rates off, prefill tokens up to 1.57× the mean). A factor of 1.5 is past that noise and
//! well inside what matters: an A100 is 3.4× slower than an H100 in compute, a PCIe link
//! saturated by host-tier loads halves a prefill engine's rate.
//!
//! Why `w = 5`: recomputing a cached prefix elsewhere costs more than once. The request waits
//! for it, and so does every request queued behind it on that engine, whose load grows by the
//! same tokens; the prefix also ends up cached twice, in capacity a longer-lived prefix would
//! have used; and on conversation traffic the next turn of the same session, minutes later, finds
//! its history on neither engine's hot end. With `w = 1` the policy is greedy for each request's
//! own finish time and gives away hits the pool pays for later. The figure is measured, not
//! derived: in the virtual-time fleet (`tandem plan --fixed 8:8`, 8P+8D 8B H100, 2× rate; sweep
//! in benches/README.md) `w` from 2 to 5 with `s = 131072` raised the hit rate on the
//! conversation workload with 200 GiB host tiers from 86.1 % to 91.2 % of the infinite-cache
//! bound and on the Mooncake synthetic trace from 92.5 % to 94.8 %, with TTFT p50 / p90 / p99
//! within 3 % or better on all four trace × tier cases and prefill tokens at most 1.13× the mean;
//! past 6 the queue balance starts to give (1.21–1.25× on Mooncake with host tiers).
//!
//! Session affinity, a tie-breaker: when the client names its conversation (`x-session-id`, or
//! the body's `user`), the engine the key hashes to ([`crate::affinity`]) takes the request if it
//! is predicted to hold at least as much of the prompt as the pick and its first token is within
//! the release bound. It matters where the index cannot see the history (the first turn after a
//! coordinator restart, an approximate feed that expired): the conversation goes back to the
//! engine its earlier turns went to, whose cache likely still holds them.
//!
//! The releases are the guard for what a prediction can get wrong. However large the saving
//! looks, no engine's queue runs more than `r` times (plus `s` tokens' worth of time) ahead of the
//! least loaded one, so a hot prefix never piles onto one engine; and no request is sent where
//! its own first token is predicted to come more than `r` times (plus `s`) later than on the
//! engine that would serve it first. `s` is large because a release throws the cached prefix
//! away: the released request recomputes all of it, so a small `s` turns every long cached
//! conversation that meets a busy engine into the longest prefill of the hour (16,384 lost ~8
//! points of hit rate on the Mooncake synthetic trace; 65,536 against 131,072 lost 1–3 points on
//! the conversation workload, where prompts average 12k tokens and reach 100k).

use rand::RngCore;

use crate::affinity;
use crate::policy::{lower, Choice, Policy, Reservoir, RouteFacts, RouteReason};
use crate::snapshot::EngineView;

/// The `prefix` policy's parameters; one set of defaults, documented above.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PrefixParams {
    /// `c`: tokens of prefill work one in-flight request counts as, whatever its length.
    pub request_cost_tokens: u64,
    /// `w`: how many queued tokens one uncached prompt token counts as.
    pub cache_weight: f64,
    /// `r`: how many times the fastest predicted first token the chosen engine's may take.
    pub release_ratio: f64,
    /// `s`: tokens of time the chosen engine's first token may take beyond `r·min`.
    pub release_slack_tokens: u64,
}

impl Default for PrefixParams {
    fn default() -> Self {
        PrefixParams {
            request_cost_tokens: 256,
            cache_weight: 5.0,
            release_ratio: 1.5,
            release_slack_tokens: 131_072,
        }
    }
}

impl PrefixParams {
    /// The formula with these parameters, for `tandem config check`.
    pub fn describe(&self) -> String {
        format!(
            "rate(e) = measured prefill tokens/s of e ((uncached + {c}) per leg over busy time, 30 s decay), its log-ratio to the pool's geometric mean shrunk by ln 1.5; unmeasured: pool mean × weight; \
             ahead(e) = queued_tokens(e) + {c}·inflight(e); \
             T(e) = (ahead(e) + prompt_tokens − cached_tokens(e)) / rate(e); \
             cost(e) = (ahead(e) + {w}·(prompt_tokens − cached_tokens(e))) / rate(e); pick argmin cost; \
             release to argmin ahead/rate when ahead(pick)/rate(pick) > {r}·min ahead/rate + {s} tokens / mean rate, \
             then to argmin T when T(pick) > {r}·min T + {s} tokens / mean rate",
            c = self.request_cost_tokens,
            w = self.cache_weight,
            r = self.release_ratio,
            s = self.release_slack_tokens
        )
    }
}

/// See the module docs.
#[derive(Debug, Clone, Copy)]
pub struct PrefixPolicy {
    params: PrefixParams,
}

/// Measured rates within this factor of the pool's (geometric) mean count as the mean; beyond
/// it, only the excess counts (module docs).
pub const RATE_BAND: f64 = 1.5;

/// One candidate's figures, in seconds (tokens when no rate is measured).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Estimate {
    /// Predicted time to the request's first token.
    pub first_token: f64,
    /// The queue ahead of it.
    pub load: f64,
    /// The policy's cost.
    pub cost: f64,
    /// Prompt tokens the engine is predicted not to hold.
    pub uncached: f64,
}

/// How measured rates turn into `rate_e`: the candidates' mean log rate per unit of weight, or
/// `None` when none is measured (then `rate_e = weight_e`).
#[derive(Debug, Clone, Copy)]
struct Rates {
    mean_log: Option<f64>,
}

impl Rates {
    fn measured(e: &EngineView) -> Option<f64> {
        e.prefill_tokens_per_sec
            .filter(|r| r.is_finite() && *r > 0.0)
            .map(|r| (r / e.weight).ln())
    }

    fn of(c: &[&EngineView]) -> Self {
        let (mut sum, mut n) = (0.0, 0u32);
        for l in c.iter().filter_map(|e| Self::measured(e)) {
            sum += l;
            n += 1;
        }
        Rates {
            mean_log: (n > 0).then(|| sum / f64::from(n)),
        }
    }

    /// `rate_e` (module docs): relative to the geometric mean, the log-ratio shrunk toward 0 by
    /// `ln RATE_BAND`.
    fn rate(&self, e: &EngineView) -> f64 {
        let Some(mean) = self.mean_log else {
            return e.weight;
        };
        let x = Self::measured(e).map_or(0.0, |l| l - mean);
        let shrunk = x.signum() * (x.abs() - RATE_BAND.ln()).max(0.0);
        e.weight * (mean + shrunk).exp()
    }
}

impl PrefixPolicy {
    pub fn new(params: PrefixParams) -> Self {
        PrefixPolicy { params }
    }

    fn estimate(&self, e: &EngineView, cached: u64, prompt: u64, rate: f64) -> Estimate {
        let ahead = e.queued_prefill_tokens as f64
            + self.params.request_cost_tokens as f64 * f64::from(e.inflight);
        let uncached = prompt.saturating_sub(cached) as f64;
        Estimate {
            first_token: (ahead + uncached) / rate,
            load: ahead / rate,
            cost: (ahead + self.params.cache_weight * uncached) / rate,
            uncached,
        }
    }

    /// The release slack `S` in the estimates' unit, at the candidates' mean rate.
    fn slack(&self, mean_rate: f64) -> f64 {
        self.params.release_slack_tokens as f64 / mean_rate
    }

    /// Each candidate's predicted first token and cost, and the release slack in the same unit.
    pub fn estimates(&self, c: &[&EngineView], f: &RouteFacts) -> (Vec<Estimate>, f64) {
        let cached = f.cached_by_id(c.iter().map(|e| e.id).max().unwrap_or(0));
        let rates = Rates::of(c);
        let est = c
            .iter()
            .map(|e| self.estimate(e, cached[e.id], f.prompt_tokens, rates.rate(e)))
            .collect();
        let mean_rate = c.iter().map(|e| rates.rate(e)).sum::<f64>() / c.len().max(1) as f64;
        (est, self.slack(mean_rate))
    }
}

impl Policy for PrefixPolicy {
    fn name(&self) -> &'static str {
        "prefix"
    }

    fn choose(&self, c: &[&EngineView], f: RouteFacts, rng: &mut dyn RngCore) -> Option<Choice> {
        if c.len() == 1 {
            return Choice::new(0, RouteReason::OnlyCandidate);
        }
        // One pass for the three minima, estimating each candidate once (no per-candidate
        // allocation: this runs on every request, with up to hundreds of engines).
        let cached = f.cached_by_id(c.iter().map(|e| e.id).max().unwrap_or(0));
        let rates = Rates::of(c);
        let est = |i: usize| {
            let e = c[i];
            self.estimate(e, cached[e.id], f.prompt_tokens, rates.rate(e))
        };
        let (mut by_cost, mut by_load, mut by_time) =
            (Reservoir::new(), Reservoir::new(), Reservoir::new());
        let mut rate_sum = 0.0;
        for (i, e) in c.iter().enumerate() {
            let rate = rates.rate(e);
            rate_sum += rate;
            let x = self.estimate(e, cached[e.id], f.prompt_tokens, rate);
            by_cost.offer((i, x.cost), rng, lower);
            by_load.offer((i, x.load), rng, lower);
            by_time.offer((i, x.first_token), rng, lower);
        }
        let [(cheapest, _), (least, least_load), (fastest, fastest_time)] =
            [by_cost, by_load, by_time].map(|r| r.best().expect("candidates are never empty"));
        let slack = self.slack(rate_sum / c.len() as f64);
        let r = self.params.release_ratio;
        let load_limit = r * least_load + slack;
        let (pick, released) = if est(cheapest).load > load_limit {
            (least, true)
        } else {
            (cheapest, false)
        };
        let limit = r * fastest_time + slack;
        let (pick, released) = if est(pick).first_token > limit {
            (fastest, true)
        } else {
            (pick, released)
        };
        // Session affinity breaks ties the index cannot see: the session's engine takes the
        // request when it holds at least as much of the prompt as the pick, within the bound.
        let session = f
            .session
            .and_then(|k| affinity::rendezvous(k, c.iter().map(|e| &*e.url)));
        if let Some(s) = session.filter(|&s| s != pick) {
            let (home, chosen) = (est(s), est(pick));
            if home.uncached <= chosen.uncached
                && home.first_token <= limit
                && home.load <= load_limit
            {
                return Choice::new(s, RouteReason::SessionAffinity);
            }
        }
        if released {
            return Choice::new(pick, RouteReason::LoadRelease);
        }
        let hit = f.cached.iter().any(|&(id, t)| id == c[pick].id && t > 0);
        Choice::new(
            pick,
            if hit {
                RouteReason::PrefixHit
            } else {
                RouteReason::PrefixMiss
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn e(id: usize, queued: u64) -> EngineView {
        EngineView {
            queued_prefill_tokens: queued,
            ..EngineView::healthy(id, format!("http://p{id}"))
        }
    }

    fn facts(cached: &[(usize, u64)]) -> RouteFacts<'_> {
        RouteFacts {
            seq: 0,
            prompt_tokens: 10_000,
            cached,
            kv_blocks_needed: 0,
            session: None,
        }
    }

    #[test]
    fn overlap_wins_while_it_saves_more_than_the_extra_queue() {
        let p = PrefixPolicy::new(PrefixParams::default());
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        // Engine 1 holds 8,000 of 10,000 tokens and has 5,000 queued: cost 5,000 + 5·2,000 =
        // 15,000 vs 5·10,000 = 50,000.
        let es = [e(0, 0), e(1, 5_000)];
        let c = p.choose(&[&es[0], &es[1]], facts(&[(1, 8_000)]), &mut rng);
        assert_eq!(c.unwrap().index, 1);
        assert_eq!(c.unwrap().reason, RouteReason::PrefixHit);
        // With 45,000 queued the saving no longer pays: cost 55,000 vs 50,000.
        let es = [e(0, 0), e(1, 45_000)];
        let c = p.choose(&[&es[0], &es[1]], facts(&[(1, 8_000)]), &mut rng);
        assert_eq!(c.unwrap().index, 0);
        assert_eq!(c.unwrap().reason, RouteReason::PrefixMiss);
    }

    #[test]
    fn a_hot_prefix_is_released_to_the_least_loaded_engine() {
        let p = PrefixPolicy::new(PrefixParams::default());
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        // A 100k-token cached document: cost says engine 1 even at 150k queued (150,000 vs
        // 10,000 + 5·100,000), but that is past 1.5·10,000 + 131,072.
        let f = RouteFacts {
            prompt_tokens: 100_000,
            ..facts(&[(1, 100_000)])
        };
        let es = [e(0, 10_000), e(1, 150_000)];
        let c = p.choose(&[&es[0], &es[1]], f, &mut rng).unwrap();
        assert_eq!((c.index, c.reason), (0, RouteReason::LoadRelease));
        // 140k queued is within 146,072: the cache keeps it.
        let es = [e(0, 10_000), e(1, 140_000)];
        let c = p.choose(&[&es[0], &es[1]], f, &mut rng).unwrap();
        assert_eq!((c.index, c.reason), (1, RouteReason::PrefixHit));
    }

    #[test]
    fn measured_rates_turn_queues_into_time() {
        let p = PrefixPolicy::new(PrefixParams::default());
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let rated = |id, queued, rate| EngineView {
            prefill_tokens_per_sec: Some(rate),
            ..e(id, queued)
        };
        // Fewer queued tokens on engine 1, but it computes a quarter as fast (a slower GPU, or
        // its PCIe link busy with host-tier loads). Around the 10k geometric mean, ×2 and ÷2
        // shrink to ×1.33 and ÷1.33: cost (20k + 20k)/7.5k = 5.3 s against (40k + 20k)/13.3k =
        // 4.5 s.
        let es = [rated(0, 40_000, 20_000.0), rated(1, 20_000, 5_000.0)];
        let c = p.choose(&[&es[0], &es[1]], facts(&[]), &mut rng).unwrap();
        assert_eq!(c.index, 0);
        // Within the band, equal engines measured 20 % apart count as equal: tokens decide.
        let es = [rated(0, 40_000, 12_000.0), rated(1, 20_000, 10_000.0)];
        let c = p.choose(&[&es[0], &es[1]], facts(&[]), &mut rng).unwrap();
        assert_eq!(c.index, 1);
        let (est, _) = p.estimates(&[&es[0], &es[1]], &facts(&[]));
        assert!((est[0].load / est[1].load - 2.0).abs() < 1e-9, "{est:?}");
        // An engine not measured yet is priced at the pool's mean rate per unit of weight.
        let es = [rated(0, 0, 10_000.0), e(1, 0)];
        let (est, _) = p.estimates(&[&es[0], &es[1]], &facts(&[]));
        assert!((est[0].first_token - 1.0).abs() < 1e-9, "{est:?}");
        assert!((est[1].first_token - 1.0).abs() < 1e-9, "{est:?}");
    }

    #[test]
    fn without_any_overlap_it_is_least_loaded_and_weights_count() {
        let p = PrefixPolicy::new(PrefixParams::default());
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let big = EngineView {
            weight: 2.0,
            ..e(0, 8_000)
        };
        let small = e(1, 3_000);
        // big: (8,000 + 5·10,000)/2 = 29,000; small: 3,000 + 5·10,000 = 53,000.
        let c = p.choose(&[&big, &small], facts(&[]), &mut rng).unwrap();
        assert_eq!((c.index, c.reason), (0, RouteReason::PrefixMiss));
    }

    #[test]
    fn cached_beyond_the_prompt_is_clamped() {
        let f = facts(&[(3, 50_000)]);
        assert_eq!(f.cached_by_id(5), vec![0, 0, 0, 10_000, 0, 0]);
        assert_eq!(
            f.cached_by_id(2),
            vec![0, 0, 0],
            "ids past the table are dropped"
        );
    }

    proptest::proptest! {
        /// The same inputs and seed give the same choice; the choice's predicted first token is
        /// never worse than the release bound (r·fastest + s at the pool's mean rate), and its
        /// queue is within r·least + s unless that would break the first bound.
        #[test]
        fn deterministic_and_never_past_the_release_bounds(
            engines in proptest::collection::vec(
                (0u64..400_000, 0u32..64, proptest::option::of(500.0f64..100_000.0), 1u32..4),
                2..16,
            ),
            hits in proptest::collection::vec((0usize..16, 0u64..120_000), 0..8),
            prompt in 1u64..120_000,
            seed in proptest::prelude::any::<u64>(),
            session in proptest::option::of(proptest::prelude::any::<u64>()),
        ) {
            let es: Vec<EngineView> = engines
                .iter()
                .enumerate()
                .map(|(i, &(q, inflight, rate, w))| EngineView {
                    inflight,
                    prefill_tokens_per_sec: rate,
                    weight: f64::from(w),
                    ..e(i, q)
                })
                .collect();
            let refs: Vec<&EngineView> = es.iter().collect();
            let f = RouteFacts { seq: 0, prompt_tokens: prompt, cached: &hits, kv_blocks_needed: 0, session };
            let p = PrefixPolicy::new(PrefixParams::default());
            let a = p.choose(&refs, f, &mut ChaCha8Rng::seed_from_u64(seed)).unwrap();
            let b = p.choose(&refs, f, &mut ChaCha8Rng::seed_from_u64(seed)).unwrap();
            proptest::prop_assert_eq!(a, b);
            let (est, slack) = p.estimates(&refs, &f);
            let fastest = est.iter().map(|x| x.first_token).fold(f64::INFINITY, f64::min);
            let bound = 1.5 * fastest + slack;
            proptest::prop_assert!(
                est[a.index].first_token <= bound * (1.0 + 1e-12),
                "picked {} with T {} past {}", a.index, est[a.index].first_token, bound
            );
            // The hot-spot bound holds too, unless the first-token guard overrode it.
            let least = est.iter().map(|x| x.load).fold(f64::INFINITY, f64::min);
            proptest::prop_assert!(
                est[a.index].load <= (1.5 * least + slack) * (1.0 + 1e-12)
                    || est[a.index].first_token == fastest,
                "picked {} with load {} past {}", a.index, est[a.index].load, 1.5 * least + slack
            );
            if a.reason == RouteReason::SessionAffinity {
                let home = affinity::rendezvous(session.unwrap(), refs.iter().map(|e| &*e.url));
                proptest::prop_assert_eq!(Some(a.index), home);
            }
        }
    }

    #[test]
    fn a_session_key_breaks_ties_within_the_bound_only() {
        let p = PrefixPolicy::new(PrefixParams::default());
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let es: Vec<EngineView> = (0..8).map(|i| e(i, 1_000 * i as u64)).collect();
        let refs: Vec<&EngineView> = es.iter().collect();
        // Find a session whose engine is not the least loaded one (engine 0).
        let (key, home) = (0u64..)
            .map(|k| {
                (
                    k,
                    affinity::rendezvous(k, refs.iter().map(|e| &*e.url)).unwrap(),
                )
            })
            .find(|&(_, h)| h >= 3)
            .unwrap();
        let f = RouteFacts {
            session: Some(key),
            ..facts(&[])
        };
        // Nothing cached anywhere (the index has not seen this conversation): its engine.
        let c = p.choose(&refs, f, &mut rng).unwrap();
        assert_eq!((c.index, c.reason), (home, RouteReason::SessionAffinity));
        // A cache elsewhere wins over the key.
        let other = (home + 1) % 8;
        let hits = [(other, 8_000)];
        let c = p
            .choose(&refs, RouteFacts { cached: &hits, ..f }, &mut rng)
            .unwrap();
        assert_eq!(c.index, other);
        // Past the release bound the key does not hold it.
        let mut es = es.clone();
        es[home].queued_prefill_tokens = 200_000;
        let refs: Vec<&EngineView> = es.iter().collect();
        let c = p.choose(&refs, f, &mut rng).unwrap();
        assert_ne!(c.index, home);
    }
}
