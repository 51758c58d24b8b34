//! The `prefix` prefill policy: expected prefill work, counting what each engine already holds,
//! with a load-balance release.
//!
//! # The formula
//!
//! For a prompt of `P` tokens and a candidate `e` predicted (by the pool's prefix index) to hold
//! the first `h_e` of them:
//!
//! ```text
//! load_e = (queued_e + c·inflight_e) / weight_e          queued_e: uncached prefill tokens Tandem has
//!                                                        sent to e and not seen finish
//! cost_e = load_e + w·(P − h_e) / weight_e               the prefill work ahead of this request's
//!                                                        last token, in tokens, with the work it
//!                                                        adds to the pool counted w times
//! pick   = argmin cost_e                                 ties: the RNG
//! release: if load_pick > r·load_min + s, pick = argmin load_e instead
//! ```
//!
//! Defaults: `c = 256` tokens per in-flight request (vLLM's fixed per-request cost, ~10 ms on an
//! 8B H100, is about 300 tokens of prefill), `w = 2`, `r = 1.5`, `s = 65536` tokens (~2.5 s of
//! 8B H100 prefill).
//!
//! Why a cost in tokens: a cached token is prefill work not done, and a queued token is work done
//! first. Comparing the two in one unit lets overlap win while it saves more than the extra
//! queueing costs, so a long shared document stays where it is cached, and a short shared system
//! prompt (every request of the Mooncake conversation trace shares its first block) hardly moves
//! anything.
//!
//! Why `w = 2`: recomputing a cached prefix elsewhere costs twice. The request waits for it, and
//! so does every request queued behind it on that engine, whose load grows by the same tokens;
//! the prefix also ends up cached twice, in capacity a longer-lived prefix would have used. With
//! `w = 1` the policy is greedy for each request's own finish time and gives away hits the pool
//! pays for later (on the Mooncake synthetic trace, `benches/prefix_policy_model.py`, a queueing
//! model of 8 engines, loses 3–4 points of hit rate and 2–4 % of p90 TTFT against `w = 2`; the
//! measured runs are in benches/README.md).
//!
//! The release is the guard for what a prediction can get wrong: however large the saving looks,
//! no engine runs more than `r·min + s` tokens ahead of the least loaded one, so a hot prefix
//! never piles onto one engine. `s` is large because a release throws the cached prefix away: the
//! released request recomputes all of it, so a small `s` turns every long cached conversation
//! that meets a busy engine into the longest prefill of the hour (16,384 lost ~8 points of hit
//! rate on that trace).

use rand::RngCore;

use crate::policy::{argmin_by, Choice, Policy, RouteFacts, RouteReason};
use crate::snapshot::EngineView;

/// The `prefix` policy's parameters; one set of defaults, documented above.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PrefixParams {
    /// `c`: tokens of prefill work one in-flight request counts as, whatever its length.
    pub request_cost_tokens: u64,
    /// `w`: how many queued tokens one uncached prompt token counts as.
    pub cache_weight: f64,
    /// `r`: how many times the least loaded engine's load the chosen one may carry.
    pub release_ratio: f64,
    /// `s`: tokens of load the chosen engine may carry beyond `r·min`.
    pub release_slack_tokens: u64,
}

impl Default for PrefixParams {
    fn default() -> Self {
        PrefixParams {
            request_cost_tokens: 256,
            cache_weight: 2.0,
            release_ratio: 1.5,
            release_slack_tokens: 65_536,
        }
    }
}

impl PrefixParams {
    /// The formula with these parameters, for `tandem config check`.
    pub fn describe(&self) -> String {
        format!(
            "cost(e) = (queued_tokens(e) + {c}·inflight(e) + {w}·(prompt_tokens − cached_tokens(e))) / weight(e); \
             pick argmin cost; release to the least loaded engine when load(pick) > {r}·load(min) + {s} tokens",
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

impl PrefixPolicy {
    pub fn new(params: PrefixParams) -> Self {
        PrefixPolicy { params }
    }

    fn load(&self, e: &EngineView) -> f64 {
        (e.queued_prefill_tokens as f64
            + self.params.request_cost_tokens as f64 * f64::from(e.inflight))
            / e.weight
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
        let cached = f.cached_by_id(c.iter().map(|e| e.id).max().unwrap_or(0));
        let cost = |e: &EngineView| {
            self.load(e)
                + self.params.cache_weight * f.prompt_tokens.saturating_sub(cached[e.id]) as f64
                    / e.weight
        };
        let (pick, _) = argmin_by(c, rng, cost);
        let (least, _) = argmin_by(c, rng, |e| self.load(e));
        let limit = self.params.release_ratio * self.load(c[least])
            + self.params.release_slack_tokens as f64;
        if self.load(c[pick]) > limit {
            return Choice::new(least, RouteReason::LoadRelease);
        }
        let hit = cached[c[pick].id] > 0;
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
        }
    }

    #[test]
    fn overlap_wins_while_it_saves_more_than_the_extra_queue() {
        let p = PrefixPolicy::new(PrefixParams::default());
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        // Engine 1 holds 8,000 of 10,000 tokens and has 5,000 queued: cost 5,000 + 2·2,000 = 9,000
        // vs 2·10,000 = 20,000.
        let es = [e(0, 0), e(1, 5_000)];
        let c = p.choose(&[&es[0], &es[1]], facts(&[(1, 8_000)]), &mut rng);
        assert_eq!(c.unwrap().index, 1);
        assert_eq!(c.unwrap().reason, RouteReason::PrefixHit);
        // With 17,000 queued the saving no longer pays: cost 21,000 vs 20,000.
        let es = [e(0, 0), e(1, 17_000)];
        let c = p.choose(&[&es[0], &es[1]], facts(&[(1, 8_000)]), &mut rng);
        assert_eq!(c.unwrap().index, 0);
        assert_eq!(c.unwrap().reason, RouteReason::PrefixMiss);
    }

    #[test]
    fn a_hot_prefix_is_released_to_the_least_loaded_engine() {
        let p = PrefixPolicy::new(PrefixParams::default());
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        // A 100k-token cached document: cost says engine 1 even at 100k queued (100,000 vs
        // 10,000 + 2·100,000), but that is past 1.5·10,000 + 65,536.
        let f = RouteFacts {
            prompt_tokens: 100_000,
            ..facts(&[(1, 100_000)])
        };
        let es = [e(0, 10_000), e(1, 100_000)];
        let c = p.choose(&[&es[0], &es[1]], f, &mut rng).unwrap();
        assert_eq!((c.index, c.reason), (0, RouteReason::LoadRelease));
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
        // big: (8,000 + 2·10,000)/2 = 14,000; small: 3,000 + 2·10,000 = 23,000.
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
        /// The same inputs and seed give the same choice, and a release never picks an engine
        /// more loaded than the least loaded one.
        #[test]
        fn deterministic_and_releases_to_the_least_loaded(
            queued in proptest::collection::vec(0u64..200_000, 2..16),
            hits in proptest::collection::vec((0usize..16, 0u64..20_000), 0..8),
            prompt in 1u64..20_000,
            seed in proptest::prelude::any::<u64>(),
        ) {
            let es: Vec<EngineView> = queued.iter().enumerate().map(|(i, &q)| e(i, q)).collect();
            let refs: Vec<&EngineView> = es.iter().collect();
            let f = RouteFacts { seq: 0, prompt_tokens: prompt, cached: &hits, kv_blocks_needed: 0 };
            let p = PrefixPolicy::new(PrefixParams::default());
            let a = p.choose(&refs, f, &mut ChaCha8Rng::seed_from_u64(seed)).unwrap();
            let b = p.choose(&refs, f, &mut ChaCha8Rng::seed_from_u64(seed)).unwrap();
            proptest::prop_assert_eq!(a, b);
            if a.reason == RouteReason::LoadRelease {
                let min = queued.iter().min().copied().unwrap();
                proptest::prop_assert_eq!(queued[a.index], min);
            }
            let min = queued.iter().min().copied().unwrap() as f64;
            proptest::prop_assert!(queued[a.index] as f64 <= 1.5 * min + 65_536.0);
        }
    }
}
