//! The `kv-capacity` decode policy: spread requests by load while KV is plentiful, protect KV
//! when it is scarce, counting what the coordinator has promised since the last scrape.
//!
//! ```text
//! free_e   = num_gpu_blocks_e − used_e (last scrape) − reserved_e (admitted since, not yet visible)
//! room_e   = free_e ≥ need                 need: prompt blocks + expected output blocks
//! spare_e  = (free_e − need) / num_gpu_blocks_e          the fraction left after placing it
//! load_e   = inflight_e / weight_e         every request admitted here and not finished,
//!                                          including those still pulling their KV
//! plenty   = { e with room : spare_e ≥ KV_PLENTY }     (KV_PLENTY = 0.25)
//! pick     = plenty ≠ ∅: argmin load_e over plenty      ties: larger weight·spare_e, then the RNG
//!            else:       argmax weight·spare_e over room  near-ties (within KV_NEAR_TIE = 0.02):
//!                                                       the lower load, then more free, then RNG
//! ```
//!
//! Why two regimes: while every engine has a quarter of its KV to spare, free KV says nothing
//! about how a request will fare, but the batch it joins does (ITL grows with the batch), so load
//! decides. Picking by free KV alone then herds: between two scrapes every handoff sees the same
//! free fractions, and a burst of handoffs (requests that finished prefill in the same step) lands
//! on one engine. When KV runs short, a preemption costs a full recompute, so free KV decides, and
//! load only separates engines whose free KV is about the same.
//!
//! No engine with room: `None`, and the coordinator holds the request in its admission queue
//! rather than push a decode engine into preemption (vLLM recomputes preempted requests, which
//! costs more than the wait). Two escape hatches keep that from stalling forever: engines whose
//! capacity no scrape has reported yet are routable by load, and a request that needs more blocks
//! than any engine has in total goes to the engine with the most free blocks, where vLLM queues or
//! rejects it visibly.

use rand::RngCore;

use crate::policy::{argmin_by, load, Choice, Policy, Reservoir, RouteFacts, RouteReason};
use crate::snapshot::EngineView;

/// Spare fraction of KV (after placing the request) above which load, not KV, decides.
pub const KV_PLENTY: f64 = 0.25;
/// Scarce regime: weighted spare fractions closer than this count as a tie, broken by load.
pub const KV_NEAR_TIE: f64 = 0.02;

/// See the module docs.
#[derive(Debug, Clone, Copy)]
pub struct KvCapacity;

/// A candidate with room: index, weighted spare fraction, load, free blocks.
#[derive(Debug, Clone, Copy)]
struct Roomy {
    i: usize,
    spare: f64,
    load: f64,
    free: u64,
}

/// Fewer in flight first, then more spare KV.
fn lighter(a: &Roomy, b: &Roomy) -> std::cmp::Ordering {
    b.load.total_cmp(&a.load).then(a.spare.total_cmp(&b.spare))
}

impl Policy for KvCapacity {
    fn name(&self) -> &'static str {
        "kv-capacity"
    }

    fn capacity_aware(&self) -> bool {
        true
    }

    fn choose(&self, c: &[&EngineView], f: RouteFacts, rng: &mut dyn RngCore) -> Option<Choice> {
        let need = f.kv_blocks_needed;
        let known = |e: &EngineView| e.kv_total_blocks.is_some_and(|t| t > 0);
        let roomy = |i: usize| {
            let e = c[i];
            let (total, free) = (e.kv_total_blocks?, e.kv_free_blocks()?);
            (total > 0 && free >= need).then(|| Roomy {
                i,
                spare: e.weight * (free - need) as f64 / total as f64,
                load: f64::from(e.inflight) / e.weight,
                free,
            })
        };
        // One pass: the best engine with KV to spare, and the top spare for the scarce regime
        // (no allocation: this runs on every handoff).
        let (mut plenty, mut top) = (Reservoir::new(), f64::NEG_INFINITY);
        for (i, e) in c.iter().enumerate() {
            let Some(r) = roomy(i) else { continue };
            top = top.max(r.spare);
            // `spare` carries the weight; the plenty test is on the engine's own fraction.
            if r.spare / e.weight >= KV_PLENTY {
                plenty.offer(r, rng, lighter);
            }
        }
        let single = |r| {
            if c.len() == 1 {
                RouteReason::OnlyCandidate
            } else {
                r
            }
        };
        if let Some(b) = plenty.best() {
            return Choice::new(b.i, single(RouteReason::KvBalanced));
        }
        if top.is_finite() {
            let mut near = Reservoir::new();
            for r in (0..c.len()).filter_map(roomy) {
                if r.spare >= top - KV_NEAR_TIE {
                    near.offer(r, rng, |a, b| {
                        b.load.total_cmp(&a.load).then(a.free.cmp(&b.free))
                    });
                }
            }
            let b = near.best().expect("the top engine is near itself");
            return Choice::new(b.i, single(RouteReason::KvHeadroom));
        }
        let unknown: Vec<&EngineView> = c.iter().copied().filter(|e| !known(e)).collect();
        if !unknown.is_empty() {
            let (j, _) = argmin_by(&unknown, rng, load);
            let id = unknown[j].id;
            let i = c.iter().position(|e| e.id == id).expect("from this list");
            return Choice::new(i, RouteReason::KvUnknown);
        }
        if c.iter().all(|e| e.kv_total_blocks.unwrap_or(0) < need) {
            let (i, _) = argmin_by(c, rng, |e| -(e.kv_free_blocks().unwrap_or(0) as f64));
            return Choice::new(i, RouteReason::KvOversize);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn e(id: usize, total: Option<u64>, used: u64, reserved: u64) -> EngineView {
        EngineView {
            kv_total_blocks: total,
            kv_used_blocks: total.map(|_| used),
            kv_reserved_blocks: reserved,
            ..EngineView::healthy(id, format!("http://d{id}"))
        }
    }

    fn need(blocks: u64) -> RouteFacts<'static> {
        RouteFacts {
            kv_blocks_needed: blocks,
            ..RouteFacts::basic(0, 0)
        }
    }

    fn choose(es: &[EngineView], n: u64, seed: u64) -> Option<Choice> {
        let refs: Vec<&EngineView> = es.iter().collect();
        KvCapacity.choose(&refs, need(n), &mut ChaCha8Rng::seed_from_u64(seed))
    }

    #[test]
    fn relative_headroom_counts_reservations() {
        // Same capacity; engine 0 looks freer at the scrape but has 600 blocks promised since.
        // Scarce: 100 free after reservations against 150.
        let es = [e(0, Some(1000), 300, 600), e(1, Some(1000), 850, 0)];
        let c = choose(&es, 10, 0).unwrap();
        assert_eq!((c.index, c.reason), (1, RouteReason::KvHeadroom));
        // Plenty, equal load: the tie goes to the freer one, reservations counted.
        let es = [e(0, Some(1000), 100, 600), e(1, Some(1000), 300, 0)];
        let c = choose(&es, 10, 0).unwrap();
        assert_eq!((c.index, c.reason), (1, RouteReason::KvBalanced));
    }

    #[test]
    fn plenty_of_kv_balances_by_load() {
        // Both have over a quarter spare: the one with fewer requests wins, though less free.
        let mut es = [e(0, Some(1000), 100, 0), e(1, Some(1000), 500, 0)];
        es[0].inflight = 9;
        es[1].inflight = 3;
        let c = choose(&es, 10, 0).unwrap();
        assert_eq!((c.index, c.reason), (1, RouteReason::KvBalanced));
        // A weight-2 engine carries twice the requests for the same load.
        es[0].weight = 4.0;
        assert_eq!(choose(&es, 10, 0).unwrap().index, 0);
        // Once an engine's spare falls under the threshold it leaves the balanced set.
        let mut es = [e(0, Some(1000), 800, 0), e(1, Some(1000), 500, 0)];
        es[1].inflight = 50;
        assert_eq!(choose(&es, 10, 0).unwrap().index, 1);
    }

    #[test]
    fn scarce_kv_decides_and_load_breaks_near_ties() {
        let mut es = [e(0, Some(1000), 900, 0), e(1, Some(1000), 905, 0)];
        es[0].inflight = 20;
        es[1].inflight = 5;
        // 9.0 % and 8.5 % spare: a near tie, the lighter engine takes it.
        let c = choose(&es, 0, 0).unwrap();
        assert_eq!((c.index, c.reason), (1, RouteReason::KvHeadroom));
        // 15 % against 8.5 %: KV decides whatever the load.
        es[0].kv_used_blocks = Some(850);
        assert_eq!(choose(&es, 0, 0).unwrap().index, 0);
    }

    #[test]
    fn a_burst_of_handoffs_between_scrapes_spreads_evenly() {
        // 64 handoffs before any scrape: each one's admission counts it (inflight and
        // reservation) before the next decides, as the coordinator does.
        let mut es = [e(0, Some(30_000), 2_000, 0), e(1, Some(30_000), 2_500, 0)];
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mut per = [0u32; 2];
        for _ in 0..64 {
            let refs: Vec<&EngineView> = es.iter().collect();
            let c = KvCapacity.choose(&refs, need(40), &mut rng).unwrap();
            per[c.index] += 1;
            es[c.index].inflight += 1;
            es[c.index].kv_reserved_blocks += 40;
        }
        assert!(per[0].abs_diff(per[1]) <= 1, "{per:?}");
    }

    #[test]
    fn relative_not_absolute_and_weighted() {
        // Scarce: 1,000 free of 10,000 (10 %) loses to 200 free of 1,000 (20 %)...
        let es = [e(0, Some(10_000), 9_000, 0), e(1, Some(1_000), 800, 0)];
        assert_eq!(choose(&es, 0, 0).unwrap().index, 1);
        // ...unless the big engine's weight says it is worth three small ones.
        let mut es = es;
        es[0].weight = 3.0;
        assert_eq!(choose(&es, 0, 0).unwrap().index, 0);
    }

    #[test]
    fn no_room_anywhere_holds_the_request() {
        let es = [e(0, Some(1000), 990, 0), e(1, Some(1000), 900, 95)];
        assert_eq!(choose(&es, 11, 0), None);
        assert!(choose(&es, 10, 0).is_some(), "exactly enough is room");
    }

    #[test]
    fn unknown_capacity_is_routable_by_load_and_oversize_is_not_held() {
        let es = [e(0, Some(1000), 1000, 0), e(1, None, 0, 0)];
        let c = choose(&es, 10, 0).unwrap();
        assert_eq!((c.index, c.reason), (1, RouteReason::KvUnknown));
        let es = [e(0, Some(100), 50, 0), e(1, Some(100), 10, 0)];
        let c = choose(&es, 500, 0).unwrap();
        assert_eq!((c.index, c.reason), (1, RouteReason::KvOversize));
    }

    fn engines() -> impl Strategy<Value = Vec<EngineView>> {
        prop::collection::vec(
            (
                1u64..5000,
                0u64..5000,
                0u64..2000,
                prop::bool::weighted(0.9),
            ),
            1..12,
        )
        .prop_map(|v| {
            v.into_iter()
                .enumerate()
                .map(|(i, (total, used, reserved, known))| {
                    e(i, known.then_some(total), used.min(total), reserved)
                })
                .collect()
        })
    }

    proptest! {
        /// Never an engine without room while another has room; never `None` while one has room.
        #[test]
        fn never_picks_an_engine_without_room_while_another_has_room(
            es in engines(), n in 0u64..3000, seed in any::<u64>()
        ) {
            let room = |e: &EngineView| e.kv_free_blocks().is_some_and(|f| f >= n);
            let any_room = es.iter().any(room);
            let c = choose(&es, n, seed);
            if any_room {
                let c = c.expect("some engine has room");
                prop_assert!(room(&es[c.index]), "picked {:?} without room", es[c.index]);
                prop_assert!(matches!(c.reason, RouteReason::KvHeadroom | RouteReason::KvBalanced | RouteReason::OnlyCandidate));
            } else if let Some(c) = c {
                prop_assert!(matches!(c.reason, RouteReason::KvUnknown | RouteReason::KvOversize));
            }
        }

        /// The same inputs and seed give the same choice.
        #[test]
        fn same_seed_same_choice(es in engines(), n in 0u64..3000, seed in any::<u64>()) {
            prop_assert_eq!(choose(&es, n, seed), choose(&es, n, seed));
        }
    }
}
