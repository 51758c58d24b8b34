//! `tandem-fleet`: a whole Tandem deployment simulated in virtual time.
//!
//! Every engine is the simulated vLLM engine's pure core — its [`Scheduler`] (continuous
//! batching, chunked prefill, preemption), its [`tandem_sim::kv_cache::BlockPool`] with prefix
//! caching and the host-memory tier, and its [`CostModel`] — and the coordinator is Tandem's own
//! routing core: the same [`tandem_policy`] policies, [`tandem_policy::plan`] and
//! [`tandem_policy::decide`], and a [`tandem_radix::PrefixIndex`] fed from each engine's KV events
//! through a [`tandem_kvevents::KeyTracker`], exactly as the precise feed feeds it. A
//! discrete-event loop ([`run`]) drives them over a trace: arrival, prefill on the prefill pool,
//! the P→D KV pull over both engines' NICs (processor-shared, [`tandem_sim::link::SharedLink`],
//! plus the link's `c_xfer`), decode placement at the handoff by `kv-capacity` with the
//! coordinator's reservations and metrics scrapes, and decode. A colocated deployment
//! ([`FleetConfig::colocated`]) runs every request whole on one pool.
//!
//! Pure: no IO, no clock, no threads; time is simulated seconds and randomness comes from the
//! seed, so a run is a function of its inputs. What a real-time `tandem bench trace` has and
//! this does not: HTTP and SSE, the coordinator's microseconds, timer jitter. What the
//! coordinator measures on its own clock (prefill rates, scrape intervals, TTLs) runs on
//! simulated time divided by [`FleetConfig::coordinator_scale`], so a replay at `--time-scale 4`
//! can be reproduced tick for tick.
//!
//! [`Scheduler`]: tandem_sim::scheduler::Scheduler
//! [`CostModel`]: tandem_sim::cost::CostModel

mod coord;
mod fleet;
mod links;
mod queue;

#[cfg(test)]
mod tests;

use serde::Serialize;
use tandem_policy::{DisaggMode, DisaggSettings, PolicyKind, PrefixParams};
use tandem_sim::cost::LinkClass;
use tandem_sim::profile::Profile;
use tandem_workload::{Slo, Summary};

pub use fleet::run;

/// One engine of the fleet: what `tandem sim` would be started with.
#[derive(Debug, Clone)]
pub struct EngineSpec {
    pub profile: Profile,
    /// vLLM's `--num-gpu-blocks-override`; `None`: what the GPU's memory gives.
    pub num_gpu_blocks: Option<u32>,
    /// vLLM's `--kv-offloading-size` in GiB (a host-memory KV tier); `None`: no tier.
    pub host_tier_gib: Option<f64>,
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    pub block_size: u32,
    pub enable_prefix_caching: bool,
    /// The NIC class of this engine: its pulls (decode) and answered reads (prefill) share it.
    pub link: LinkClass,
    /// Relative capacity for the policies (mixed GPUs); 1.0 = baseline.
    pub weight: f64,
}

impl EngineSpec {
    /// `tandem sim`'s defaults (vLLM's) for this profile.
    pub fn new(profile: Profile) -> Self {
        EngineSpec {
            profile,
            num_gpu_blocks: None,
            host_tier_gib: None,
            max_num_seqs: 256,
            max_num_batched_tokens: 8192,
            block_size: 16,
            enable_prefix_caching: true,
            link: LinkClass::Rdma400,
            weight: 1.0,
        }
    }

    /// GPUs this engine occupies (its TP degree).
    pub fn gpus(&self) -> u32 {
        self.profile.tp.max(1)
    }

    /// KV blocks on the GPU.
    pub fn gpu_blocks(&self) -> u32 {
        self.num_gpu_blocks
            .unwrap_or_else(|| self.profile.num_gpu_blocks(self.block_size))
    }

    /// Blocks of the host tier, whole blocks of the instance's KV bytes (as `tandem sim` and
    /// vLLM's CPU offloading spec divide `cpu_bytes_to_use`).
    pub fn host_blocks(&self) -> u32 {
        let Some(gib) = self.host_tier_gib.filter(|g| g.is_finite() && *g > 0.0) else {
            return 0;
        };
        let block_bytes = self.profile.kv_bytes(u64::from(self.block_size)) as f64;
        let blocks = (gib * (1u64 << 30) as f64 / block_bytes).floor();
        blocks.min(f64::from(u32::MAX)) as u32
    }
}

/// How a pool's prefix index learns what its engines hold.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Feed {
    /// From the engines' KV events (GPU and host tiers), as `prefix_index.feed = "precise"`.
    Precise,
    /// From Tandem's own routing, entries expiring after `ttl_s` coordinator seconds.
    Approximate { ttl_s: f64 },
}

/// The deployment to simulate.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// Prefill pool; empty for a colocated deployment.
    pub prefill: Vec<EngineSpec>,
    /// Decode pool (every engine, colocated).
    pub decode: Vec<EngineSpec>,
    pub disagg: DisaggSettings,
    pub prefill_policy: PolicyKind,
    pub decode_policy: PolicyKind,
    pub prefill_feed: Feed,
    pub decode_feed: Feed,
    /// `routing.request_cost_tokens`: what the prefill rate counts per leg besides its tokens.
    pub request_cost_tokens: u64,
    /// `routing.expected_output_tokens`: decode KV reserved per request beyond its prompt.
    pub expected_output_tokens: u64,
    /// `admission.max_prefill_queue_tokens` (0 = no limit).
    pub max_prefill_queue_tokens: u64,
    /// `prefix_index.max_blocks`; `None`: room for every block the engines can report.
    pub index_max_blocks: Option<usize>,
    /// `health.scrape_interval_ms`, in coordinator seconds.
    pub scrape_interval_s: f64,
    /// Simulated seconds per coordinator second: 1 for a deployment, the `--time-scale` of a
    /// real-time replay to reproduce one (its coordinator's clock is real time).
    pub coordinator_scale: f64,
    pub slo: Slo,
    /// Seeds the coordinator's RNG (policy tie-breaks).
    pub seed: u64,
    /// Extra latency before each leg reaches its engine, simulated seconds (0 by default): a
    /// stand-in for what a real-time replay adds per leg (HTTP, JSON, the coordinator's hops),
    /// for diagnosing a comparison with one, never for planning.
    pub leg_overhead_s: f64,
    /// Stop the run once more than this many requests are known to miss the SLO (a rate
    /// search only needs to know that a rate fails, and an overloaded fleet is the slowest to
    /// simulate); `None`: run to the end.
    pub stop_after_misses: Option<usize>,
}

impl FleetConfig {
    /// Tandem's defaults over these pools: `prefix` with a precise feed on prefill,
    /// `kv-capacity` on decode, disaggregation `always`.
    pub fn disaggregated(prefill: Vec<EngineSpec>, decode: Vec<EngineSpec>, slo: Slo) -> Self {
        FleetConfig {
            prefill,
            decode,
            disagg: DisaggSettings {
                mode: DisaggMode::Always,
                enforce: false,
                local_max_uncached_tokens: 256,
                local_when_prefill_queue_tokens: 16_384,
            },
            prefill_policy: PolicyKind::Prefix(PrefixParams::default()),
            decode_policy: PolicyKind::KvCapacity,
            prefill_feed: Feed::Precise,
            decode_feed: Feed::Approximate { ttl_s: 300.0 },
            request_cost_tokens: 256,
            expected_output_tokens: 256,
            max_prefill_queue_tokens: 262_144,
            index_max_blocks: None,
            scrape_interval_s: 1.0,
            coordinator_scale: 1.0,
            slo,
            seed: 0,
            leg_overhead_s: 0.0,
            stop_after_misses: None,
        }
    }

    /// Every engine runs whole requests (`mode = "never"`, one pool), routed by `policy` with a
    /// precise feed on that pool.
    pub fn colocated(engines: Vec<EngineSpec>, policy: PolicyKind, slo: Slo) -> Self {
        let mut c = FleetConfig::disaggregated(Vec::new(), engines, slo);
        c.disagg.mode = DisaggMode::Never;
        c.decode_policy = policy;
        c.decode_feed = Feed::Precise;
        c
    }

    /// GPUs of both pools.
    pub fn gpus(&self) -> u32 {
        self.prefill
            .iter()
            .chain(&self.decode)
            .map(EngineSpec::gpus)
            .sum()
    }
}

/// Why a run could not start.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("the decode pool is empty")]
    NoDecodeEngine,
    #[error("disaggregation mode needs a prefill engine")]
    NoPrefillEngine,
    #[error("engine {0} has no KV cache blocks")]
    NoKvBlocks(String),
    #[error("engines of one fleet must share the KV block size")]
    MixedBlockSize,
    #[error("{0} must be a positive number")]
    NotPositive(&'static str),
}

/// What a run produced besides its [`Summary`].
#[derive(Debug, Clone, Default, Serialize)]
pub struct FleetStats {
    /// Events the loop processed (the simulator's own work).
    pub events: u64,
    /// Engine steps simulated.
    pub steps: u64,
    /// Requests run disaggregated / whole on a decode engine.
    pub disaggregated: u64,
    pub local: u64,
    /// Sequences preempted over all engines (recomputed later).
    pub preemptions: u64,
    /// Times a request waited in the admission queue (arrival or handoff).
    pub held: u64,
    /// Requests still unfinished when the events ran out (0 unless stopped early).
    pub unfinished: u64,
    /// Requests known to miss the SLO (TTFT at the first token, TPOT at the last).
    pub misses: u64,
    /// The run stopped at [`FleetConfig::stop_after_misses`].
    pub stopped_early: bool,
}

/// A run's figures.
#[derive(Debug, Clone, Serialize)]
pub struct FleetReport {
    /// The same summary `tandem bench trace` reports, from the same code.
    pub summary: Summary,
    pub stats: FleetStats,
}
