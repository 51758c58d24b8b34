//! Engine-selection policies: pure functions of a candidate list, the request's routing facts and
//! an injected RNG.

use rand::{Rng, RngCore};

use crate::snapshot::EngineView;

/// Why an engine was chosen. A bounded set: these are metric label values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RouteReason {
    /// The only routable candidate.
    OnlyCandidate,
    /// Lowest weighted load.
    LeastLoaded,
    /// Lowest weighted load, tied with others; the RNG broke the tie.
    LeastLoadedTie,
    RoundRobin,
    Random,
}

impl RouteReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RouteReason::OnlyCandidate => "only_candidate",
            RouteReason::LeastLoaded => "least_loaded",
            RouteReason::LeastLoadedTie => "least_loaded_tie",
            RouteReason::RoundRobin => "round_robin",
            RouteReason::Random => "random",
        }
    }
}

/// A policy's answer: an index into the candidate slice it was given, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Choice {
    pub index: usize,
    pub reason: RouteReason,
}

/// The facts about a request that policies may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteFacts {
    /// A per-coordinator request sequence number (drives round-robin without hidden state).
    pub seq: u64,
    pub prompt_tokens: u64,
}

/// Chooses one engine among routable candidates.
pub trait Policy: Send + Sync + std::fmt::Debug {
    fn name(&self) -> &'static str;
    /// `candidates` are all routable and compatible; the slice is never empty.
    fn choose(
        &self,
        candidates: &[&EngineView],
        facts: RouteFacts,
        rng: &mut dyn RngCore,
    ) -> Choice;
}

/// The policies Tandem ships.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PolicyKind {
    LeastLoaded,
    RoundRobin,
    Random,
}

pub fn policy_for(kind: PolicyKind) -> Box<dyn Policy> {
    match kind {
        PolicyKind::LeastLoaded => Box::new(LeastLoaded),
        PolicyKind::RoundRobin => Box::new(RoundRobin),
        PolicyKind::Random => Box::new(RandomPolicy),
    }
}

/// Tokens of queued prefill that count as much load as one in-flight request. One request's
/// decode costs about as much engine time as prefilling this many tokens on the same GPU, so
/// mixing the two signals this way ranks prefill engines by queue depth and decode engines by
/// request count.
pub const TOKENS_PER_REQUEST_LOAD: f64 = 2048.0;

/// Weighted load: `(inflight + queued_prefill_tokens / 2048) / weight`.
pub fn load(e: &EngineView) -> f64 {
    (f64::from(e.inflight) + e.queued_prefill_tokens as f64 / TOKENS_PER_REQUEST_LOAD) / e.weight
}

/// Lowest weighted load; ties broken uniformly by the RNG so equal engines share traffic.
#[derive(Debug, Clone, Copy)]
pub struct LeastLoaded;

impl Policy for LeastLoaded {
    fn name(&self) -> &'static str {
        "least-loaded"
    }

    fn choose(&self, c: &[&EngineView], _f: RouteFacts, rng: &mut dyn RngCore) -> Choice {
        if c.len() == 1 {
            return Choice {
                index: 0,
                reason: RouteReason::OnlyCandidate,
            };
        }
        let loads: Vec<f64> = c.iter().map(|e| load(e)).collect();
        let min = loads.iter().copied().fold(f64::INFINITY, f64::min);
        let tied: Vec<usize> = (0..c.len()).filter(|&i| loads[i] <= min).collect();
        if tied.len() == 1 {
            Choice {
                index: tied[0],
                reason: RouteReason::LeastLoaded,
            }
        } else {
            Choice {
                index: tied[rng.random_range(0..tied.len())],
                reason: RouteReason::LeastLoadedTie,
            }
        }
    }
}

/// Candidates in turn, by request sequence number.
#[derive(Debug, Clone, Copy)]
pub struct RoundRobin;

impl Policy for RoundRobin {
    fn name(&self) -> &'static str {
        "round-robin"
    }

    fn choose(&self, c: &[&EngineView], f: RouteFacts, _rng: &mut dyn RngCore) -> Choice {
        Choice {
            index: (f.seq % c.len() as u64) as usize,
            reason: if c.len() == 1 {
                RouteReason::OnlyCandidate
            } else {
                RouteReason::RoundRobin
            },
        }
    }
}

/// Uniformly at random (weighted by engine weight).
#[derive(Debug, Clone, Copy)]
pub struct RandomPolicy;

impl Policy for RandomPolicy {
    fn name(&self) -> &'static str {
        "random"
    }

    fn choose(&self, c: &[&EngineView], _f: RouteFacts, rng: &mut dyn RngCore) -> Choice {
        if c.len() == 1 {
            return Choice {
                index: 0,
                reason: RouteReason::OnlyCandidate,
            };
        }
        let total: f64 = c.iter().map(|e| e.weight).sum();
        let mut x = rng.random::<f64>() * total;
        for (i, e) in c.iter().enumerate() {
            if x < e.weight {
                return Choice {
                    index: i,
                    reason: RouteReason::Random,
                };
            }
            x -= e.weight;
        }
        Choice {
            index: c.len() - 1,
            reason: RouteReason::Random,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::Health;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn engine(id: usize, inflight: u32, queued: u64, weight: f64) -> EngineView {
        EngineView {
            id,
            url: format!("http://e{id}").into(),
            health: Health::Healthy,
            weight,
            inflight,
            queued_prefill_tokens: queued,
            model: None,
            block_size: None,
        }
    }

    const F: RouteFacts = RouteFacts {
        seq: 0,
        prompt_tokens: 100,
    };

    #[test]
    fn least_loaded_prefers_fewer_queued_tokens_and_respects_weight() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let a = engine(0, 1, 8192, 1.0);
        let b = engine(1, 1, 1024, 1.0);
        let c = LeastLoaded.choose(&[&a, &b], F, &mut rng);
        assert_eq!((c.index, c.reason), (1, RouteReason::LeastLoaded));
        // A twice-as-capable engine with twice the load ties; with a bit less it wins.
        let big = engine(2, 2, 0, 2.0);
        let small = engine(3, 1, 100, 1.0);
        let c = LeastLoaded.choose(&[&big, &small], F, &mut rng);
        assert_eq!(c.index, 0);
    }

    #[test]
    fn ties_are_broken_by_the_rng_and_reproducible() {
        let es: Vec<EngineView> = (0..4).map(|i| engine(i, 0, 0, 1.0)).collect();
        let refs: Vec<&EngineView> = es.iter().collect();
        let picks = |seed| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            (0..32)
                .map(|_| LeastLoaded.choose(&refs, F, &mut rng).index)
                .collect::<Vec<_>>()
        };
        assert_eq!(picks(7), picks(7));
        let p = picks(7);
        assert!((0..4).all(|i| p.contains(&i)), "ties spread: {p:?}");
    }

    #[test]
    fn round_robin_cycles_by_sequence() {
        let es: Vec<EngineView> = (0..3).map(|i| engine(i, 0, 0, 1.0)).collect();
        let refs: Vec<&EngineView> = es.iter().collect();
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let picks: Vec<usize> = (0..6)
            .map(|seq| {
                RoundRobin
                    .choose(&refs, RouteFacts { seq, ..F }, &mut rng)
                    .index
            })
            .collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn random_follows_weights() {
        let a = engine(0, 0, 0, 3.0);
        let b = engine(1, 0, 0, 1.0);
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let n = 4000;
        let a_hits = (0..n)
            .filter(|_| RandomPolicy.choose(&[&a, &b], F, &mut rng).index == 0)
            .count();
        let share = a_hits as f64 / n as f64;
        assert!((0.70..0.80).contains(&share), "share {share}");
    }
}
