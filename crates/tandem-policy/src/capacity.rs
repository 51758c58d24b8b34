//! The `kv-capacity` decode policy: the engine with the most free KV relative to its capacity,
//! counting the blocks the coordinator has promised since the last scrape.
//!
//! ```text
//! free_e  = num_gpu_blocks_e − used_e (last scrape) − reserved_e (routed since, not yet visible)
//! room_e  = free_e ≥ need                 need: prompt blocks + expected output blocks
//! pick    = argmax over engines with room of  weight_e · (free_e − need) / num_gpu_blocks_e
//!           ties: more absolute free blocks, then the RNG
//! ```
//!
//! No engine with room: `None`, and the coordinator holds the request in its admission queue
//! rather than push a decode engine into preemption (vLLM recomputes preempted requests, which
//! costs more than the wait). Two escape hatches keep that from stalling forever: engines whose
//! capacity no scrape has reported yet are routable by load, and a request that needs more blocks
//! than any engine has in total goes to the engine with the most free blocks, where vLLM queues or
//! rejects it visibly.

use rand::{Rng, RngCore};

use crate::policy::{argmin_by, load, Choice, Policy, RouteFacts, RouteReason};
use crate::snapshot::EngineView;

/// See the module docs.
#[derive(Debug, Clone, Copy)]
pub struct KvCapacity;

impl Policy for KvCapacity {
    fn name(&self) -> &'static str {
        "kv-capacity"
    }

    fn choose(&self, c: &[&EngineView], f: RouteFacts, rng: &mut dyn RngCore) -> Option<Choice> {
        let need = f.kv_blocks_needed;
        let known = |e: &EngineView| e.kv_total_blocks.is_some_and(|t| t > 0);
        let mut best: Option<(usize, f64, u64)> = None;
        let mut ties = 0u32;
        for (i, e) in c.iter().enumerate() {
            let (Some(total), Some(free)) = (e.kv_total_blocks, e.kv_free_blocks()) else {
                continue;
            };
            if total == 0 || free < need {
                continue;
            }
            let score = e.weight * (free - need) as f64 / total as f64;
            let better = match best {
                None => true,
                Some((_, s, fr)) => score > s || (score == s && free > fr),
            };
            let tie = best.is_some_and(|(_, s, fr)| score == s && free == fr);
            if better {
                best = Some((i, score, free));
                ties = 1;
            } else if tie {
                // Reservoir sampling over exact ties keeps the choice uniform and seeded.
                ties += 1;
                if rng.random_range(0..ties) == 0 {
                    best = Some((i, score, free));
                }
            }
        }
        if let Some((i, _, _)) = best {
            return Choice::new(
                i,
                if c.len() == 1 {
                    RouteReason::OnlyCandidate
                } else {
                    RouteReason::KvHeadroom
                },
            );
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
        let es = [e(0, Some(1000), 100, 600), e(1, Some(1000), 300, 0)];
        let c = choose(&es, 10, 0).unwrap();
        assert_eq!((c.index, c.reason), (1, RouteReason::KvHeadroom));
    }

    #[test]
    fn relative_not_absolute_and_weighted() {
        // 2,000 free of 10,000 (20 %) loses to 500 free of 1,000 (50 %)...
        let es = [e(0, Some(10_000), 8_000, 0), e(1, Some(1_000), 500, 0)];
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
                prop_assert_eq!(c.reason == RouteReason::KvHeadroom || c.reason == RouteReason::OnlyCandidate, true);
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
