//! Engine-selection policies: pure functions of a candidate list, the request's routing facts and
//! an injected RNG.
//!
//! The baselines (least-loaded, least-requests, power-of-two, round-robin, random) live here; the
//! cache-aware prefill policy is in [`crate::prefix`] and the decode policy that counts free KV
//! blocks in [`crate::capacity`].

use rand::{Rng, RngCore};

use crate::capacity::KvCapacity;
use crate::prefix::{PrefixParams, PrefixPolicy};
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
    /// Fewest in-flight requests per unit of weight (nginx `least_conn`).
    LeastRequests,
    /// The less loaded of two engines drawn at random.
    PowerOfTwo,
    RoundRobin,
    Random,
    /// `prefix`: the lowest expected prefill cost, and that engine holds part of the prompt.
    PrefixHit,
    /// `prefix`: no engine holds any of the prompt; the least loaded one.
    PrefixMiss,
    /// `prefix`: the cache-preferred engine's first token was predicted too far past the
    /// fastest engine's; released to the fastest.
    LoadRelease,
    /// `prefix`: the engine the client's session key names, no worse cached than the cost's
    /// pick and within the release bound.
    SessionAffinity,
    /// `kv-capacity`: KV is scarce; the most free KV relative to capacity, after reservations.
    KvHeadroom,
    /// `kv-capacity`: KV is plentiful; the least loaded of the engines with room to spare.
    KvBalanced,
    /// `kv-capacity`: no candidate's capacity is known yet; least loaded.
    KvUnknown,
    /// `kv-capacity`: the request needs more blocks than any engine has in total; the engine
    /// with the most free blocks (it will queue or reject there, visibly, rather than wait here
    /// forever).
    KvOversize,
}

impl RouteReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RouteReason::OnlyCandidate => "only_candidate",
            RouteReason::LeastLoaded => "least_loaded",
            RouteReason::LeastLoadedTie => "least_loaded_tie",
            RouteReason::LeastRequests => "least_requests",
            RouteReason::PowerOfTwo => "power_of_two",
            RouteReason::RoundRobin => "round_robin",
            RouteReason::Random => "random",
            RouteReason::PrefixHit => "prefix_hit",
            RouteReason::PrefixMiss => "prefix_miss",
            RouteReason::LoadRelease => "load_release",
            RouteReason::SessionAffinity => "session_affinity",
            RouteReason::KvHeadroom => "kv_headroom",
            RouteReason::KvBalanced => "kv_balanced",
            RouteReason::KvUnknown => "kv_unknown",
            RouteReason::KvOversize => "kv_oversize",
        }
    }
}

/// A policy's answer: an index into the candidate slice it was given, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Choice {
    pub index: usize,
    pub reason: RouteReason,
}

impl Choice {
    pub(crate) fn new(index: usize, reason: RouteReason) -> Option<Choice> {
        Some(Choice { index, reason })
    }
}

/// The facts about a request that policies may use.
#[derive(Debug, Clone, Copy)]
pub struct RouteFacts<'a> {
    /// A per-coordinator request sequence number (drives round-robin without hidden state).
    pub seq: u64,
    pub prompt_tokens: u64,
    /// Prompt tokens each engine is predicted to hold already (from the pool's prefix index), as
    /// `(engine id, tokens)`; engines not listed hold none.
    pub cached: &'a [(usize, u64)],
    /// KV blocks the request will occupy on a decode engine: its prompt plus the output it is
    /// expected to write.
    pub kv_blocks_needed: u64,
    /// The client's session key, hashed ([`crate::affinity::hash_key`]), when it sent one.
    pub session: Option<u64>,
}

impl RouteFacts<'_> {
    /// Facts with only a sequence number and a prompt length (no cache prediction, no KV need).
    pub fn basic(seq: u64, prompt_tokens: u64) -> RouteFacts<'static> {
        RouteFacts {
            seq,
            prompt_tokens,
            cached: &[],
            kv_blocks_needed: 0,
            session: None,
        }
    }

    /// Predicted cached prompt tokens by engine id, for ids `0..=max_id` (others are dropped),
    /// clamped to the prompt. One pass over the hit list: a lookup per candidate would scan it
    /// once per candidate, quadratic at hundreds of engines that all hold a shared system prompt.
    /// Engine ids are small and never reused, so the table stays small.
    pub fn cached_by_id(&self, max_id: usize) -> Vec<u64> {
        let mut table = vec![0u64; max_id + 1];
        for &(id, tokens) in self.cached {
            if let Some(slot) = table.get_mut(id) {
                *slot = tokens.min(self.prompt_tokens);
            }
        }
        table
    }
}

/// Chooses one engine among routable candidates.
pub trait Policy: Send + Sync + std::fmt::Debug {
    fn name(&self) -> &'static str;
    /// Whether the policy declines engines without KV room (`choose` may answer `None`); the
    /// coordinator then also holds requests back before their prefill when the decode pool as a
    /// whole has no room left for them.
    fn capacity_aware(&self) -> bool {
        false
    }
    /// `candidates` are all routable and compatible; the slice is never empty. `None` means no
    /// candidate can take the request now (only capacity-aware policies say so); the caller
    /// holds the request until one can.
    fn choose(
        &self,
        candidates: &[&EngineView],
        facts: RouteFacts<'_>,
        rng: &mut dyn RngCore,
    ) -> Option<Choice>;
}

/// The policies Tandem ships.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PolicyKind {
    LeastLoaded,
    LeastRequests,
    PowerOfTwo,
    RoundRobin,
    Random,
    Prefix(PrefixParams),
    KvCapacity,
}

pub fn policy_for(kind: PolicyKind) -> Box<dyn Policy> {
    match kind {
        PolicyKind::LeastLoaded => Box::new(LeastLoaded),
        PolicyKind::LeastRequests => Box::new(LeastRequests),
        PolicyKind::PowerOfTwo => Box::new(PowerOfTwo),
        PolicyKind::RoundRobin => Box::new(RoundRobin),
        PolicyKind::Random => Box::new(RandomPolicy),
        PolicyKind::Prefix(p) => Box::new(PrefixPolicy::new(p)),
        PolicyKind::KvCapacity => Box::new(KvCapacity),
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

/// The best of a stream of candidates under `better` (`Greater`: the first argument is better),
/// exact ties broken uniformly by the RNG (reservoir sampling), in one pass and without
/// allocating: every policy's decision runs on the request path.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Reservoir<T> {
    best: Option<T>,
    ties: u32,
}

impl<T: Copy> Reservoir<T> {
    pub(crate) fn new() -> Self {
        Reservoir {
            best: None,
            ties: 0,
        }
    }

    pub(crate) fn offer(
        &mut self,
        x: T,
        rng: &mut dyn RngCore,
        better: impl Fn(&T, &T) -> std::cmp::Ordering,
    ) {
        match self.best.as_ref().map(|b| better(&x, b)) {
            None | Some(std::cmp::Ordering::Greater) => {
                self.best = Some(x);
                self.ties = 1;
            }
            Some(std::cmp::Ordering::Equal) => {
                self.ties += 1;
                if rng.random_range(0..self.ties) == 0 {
                    self.best = Some(x);
                }
            }
            Some(std::cmp::Ordering::Less) => {}
        }
    }

    pub(crate) fn best(&self) -> Option<T> {
        self.best
    }

    /// Whether the best was tied with another candidate.
    pub(crate) fn tied(&self) -> bool {
        self.ties > 1
    }
}

/// Smaller keys first: the order [`Reservoir::offer`] takes for an argmin.
pub(crate) fn lower(a: &(usize, f64), b: &(usize, f64)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1)
}

/// The index of the minimum of `score` over `c`, ties broken uniformly by the RNG; also whether
/// there was a tie.
pub(crate) fn argmin_by(
    c: &[&EngineView],
    rng: &mut dyn RngCore,
    score: impl Fn(&EngineView) -> f64,
) -> (usize, bool) {
    let mut r = Reservoir::new();
    for (i, e) in c.iter().enumerate() {
        r.offer((i, score(e)), rng, lower);
    }
    (r.best().map_or(0, |(i, _)| i), r.tied())
}

/// Lowest weighted load; ties broken uniformly by the RNG so equal engines share traffic.
#[derive(Debug, Clone, Copy)]
pub struct LeastLoaded;

impl Policy for LeastLoaded {
    fn name(&self) -> &'static str {
        "least-loaded"
    }

    fn choose(&self, c: &[&EngineView], _f: RouteFacts, rng: &mut dyn RngCore) -> Option<Choice> {
        if c.len() == 1 {
            return Choice::new(0, RouteReason::OnlyCandidate);
        }
        let (i, tie) = argmin_by(c, rng, load);
        Choice::new(
            i,
            if tie {
                RouteReason::LeastLoadedTie
            } else {
                RouteReason::LeastLoaded
            },
        )
    }
}

/// Fewest in-flight requests per unit of weight, whatever their size: nginx's `least_conn`, the
/// usual Kubernetes-gateway baseline.
#[derive(Debug, Clone, Copy)]
pub struct LeastRequests;

impl Policy for LeastRequests {
    fn name(&self) -> &'static str {
        "least-requests"
    }

    fn choose(&self, c: &[&EngineView], _f: RouteFacts, rng: &mut dyn RngCore) -> Option<Choice> {
        if c.len() == 1 {
            return Choice::new(0, RouteReason::OnlyCandidate);
        }
        let (i, _) = argmin_by(c, rng, |e| f64::from(e.inflight) / e.weight);
        Choice::new(i, RouteReason::LeastRequests)
    }
}

/// Two distinct candidates drawn uniformly, the less loaded of the two (Mitzenmacher's
/// power of two choices: nearly least-loaded balance without herding on one stale minimum).
#[derive(Debug, Clone, Copy)]
pub struct PowerOfTwo;

impl Policy for PowerOfTwo {
    fn name(&self) -> &'static str {
        "power-of-two"
    }

    fn choose(&self, c: &[&EngineView], _f: RouteFacts, rng: &mut dyn RngCore) -> Option<Choice> {
        if c.len() == 1 {
            return Choice::new(0, RouteReason::OnlyCandidate);
        }
        let a = rng.random_range(0..c.len());
        let mut b = rng.random_range(0..c.len() - 1);
        if b >= a {
            b += 1;
        }
        let i = if load(c[b]) < load(c[a]) { b } else { a };
        Choice::new(i, RouteReason::PowerOfTwo)
    }
}

/// Candidates in turn, by request sequence number.
#[derive(Debug, Clone, Copy)]
pub struct RoundRobin;

impl Policy for RoundRobin {
    fn name(&self) -> &'static str {
        "round-robin"
    }

    fn choose(&self, c: &[&EngineView], f: RouteFacts, _rng: &mut dyn RngCore) -> Option<Choice> {
        Choice::new(
            (f.seq % c.len() as u64) as usize,
            if c.len() == 1 {
                RouteReason::OnlyCandidate
            } else {
                RouteReason::RoundRobin
            },
        )
    }
}

/// Uniformly at random (weighted by engine weight).
#[derive(Debug, Clone, Copy)]
pub struct RandomPolicy;

impl Policy for RandomPolicy {
    fn name(&self) -> &'static str {
        "random"
    }

    fn choose(&self, c: &[&EngineView], _f: RouteFacts, rng: &mut dyn RngCore) -> Option<Choice> {
        if c.len() == 1 {
            return Choice::new(0, RouteReason::OnlyCandidate);
        }
        let total: f64 = c.iter().map(|e| e.weight).sum();
        let mut x = rng.random::<f64>() * total;
        for (i, e) in c.iter().enumerate() {
            if x < e.weight {
                return Choice::new(i, RouteReason::Random);
            }
            x -= e.weight;
        }
        Choice::new(c.len() - 1, RouteReason::Random)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn engine(id: usize, inflight: u32, queued: u64, weight: f64) -> EngineView {
        EngineView {
            weight,
            inflight,
            queued_prefill_tokens: queued,
            ..EngineView::healthy(id, format!("http://e{id}"))
        }
    }

    const F: RouteFacts<'static> = RouteFacts {
        seq: 0,
        prompt_tokens: 100,
        cached: &[],
        kv_blocks_needed: 0,
        session: None,
    };

    #[test]
    fn least_loaded_prefers_fewer_queued_tokens_and_respects_weight() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let a = engine(0, 1, 8192, 1.0);
        let b = engine(1, 1, 1024, 1.0);
        let c = LeastLoaded.choose(&[&a, &b], F, &mut rng).unwrap();
        assert_eq!((c.index, c.reason), (1, RouteReason::LeastLoaded));
        // A twice-as-capable engine with twice the load ties; with a bit less it wins.
        let big = engine(2, 2, 0, 2.0);
        let small = engine(3, 1, 100, 1.0);
        let c = LeastLoaded.choose(&[&big, &small], F, &mut rng).unwrap();
        assert_eq!(c.index, 0);
    }

    #[test]
    fn ties_are_broken_by_the_rng_and_reproducible() {
        let es: Vec<EngineView> = (0..4).map(|i| engine(i, 0, 0, 1.0)).collect();
        let refs: Vec<&EngineView> = es.iter().collect();
        let picks = |seed| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            (0..32)
                .map(|_| LeastLoaded.choose(&refs, F, &mut rng).unwrap().index)
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
                    .unwrap()
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
            .filter(|_| RandomPolicy.choose(&[&a, &b], F, &mut rng).unwrap().index == 0)
            .count();
        let share = a_hits as f64 / n as f64;
        assert!((0.70..0.80).contains(&share), "share {share}");
    }

    #[test]
    fn least_requests_counts_requests_not_tokens() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let a = engine(0, 1, 100_000, 1.0);
        let b = engine(1, 2, 0, 1.0);
        let c = LeastRequests.choose(&[&a, &b], F, &mut rng).unwrap();
        assert_eq!((c.index, c.reason), (0, RouteReason::LeastRequests));
    }

    #[test]
    fn power_of_two_never_picks_the_most_loaded_of_two_and_spreads() {
        let a = engine(0, 5, 0, 1.0);
        let b = engine(1, 0, 0, 1.0);
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        for _ in 0..64 {
            assert_eq!(PowerOfTwo.choose(&[&a, &b], F, &mut rng).unwrap().index, 1);
        }
        let es: Vec<EngineView> = (0..8).map(|i| engine(i, 0, 0, 1.0)).collect();
        let refs: Vec<&EngineView> = es.iter().collect();
        let picks: Vec<usize> = (0..256)
            .map(|_| PowerOfTwo.choose(&refs, F, &mut rng).unwrap().index)
            .collect();
        assert!((0..8).all(|i| picks.contains(&i)), "{picks:?}");
    }
}
