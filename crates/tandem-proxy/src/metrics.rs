//! Tandem's Prometheus metrics. The application owns the registry (no globals); every name starts
//! with `tandem_` and every label value comes from a bounded set: enum names, pool names, and the
//! configured engine URLs.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;
use tandem_policy::{Health, PoolKind};

use crate::pool::Pools;

mod outlier;

pub use outlier::OutlierMetrics;

/// Time to first token and its phases: 1 ms to 5 minutes. LLM TTFT spans a cached short prompt
/// (milliseconds) to a queued 100k-token prefill (minutes). Between 10 ms and 10 s, where SLOs
/// sit, the edges are the E24 series with nine more per decade (14, 17, 19, 26, 28, 41, 59, 71,
/// 86: E24 alone has steps of up to 15 %), each at most 10 % above the last, so a quantile that
/// `histogram_quantile` interpolates inside a bucket is within a few percent of the exact one;
/// the E12 series (at most 22 %) below and above. Edges: see README.md, "Metrics".
pub const TTFT_BUCKETS: [f64; 129] = [
    0.001, 0.0012, 0.0015, 0.0018, 0.0022, 0.0027, 0.0033, 0.0039, 0.0047, 0.0056, 0.0068, 0.0082,
    0.01, 0.011, 0.012, 0.013, 0.014, 0.015, 0.016, 0.017, 0.018, 0.019, 0.02, 0.022, 0.024, 0.026,
    0.027, 0.028, 0.03, 0.033, 0.036, 0.039, 0.041, 0.043, 0.047, 0.051, 0.056, 0.059, 0.062,
    0.068, 0.071, 0.075, 0.082, 0.086, 0.091, 0.1, 0.11, 0.12, 0.13, 0.14, 0.15, 0.16, 0.17, 0.18,
    0.19, 0.2, 0.22, 0.24, 0.26, 0.27, 0.28, 0.3, 0.33, 0.36, 0.39, 0.41, 0.43, 0.47, 0.51, 0.56,
    0.59, 0.62, 0.68, 0.71, 0.75, 0.82, 0.86, 0.91, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 1.8,
    1.9, 2.0, 2.2, 2.4, 2.6, 2.7, 2.8, 3.0, 3.3, 3.6, 3.9, 4.1, 4.3, 4.7, 5.1, 5.6, 5.9, 6.2, 6.8,
    7.1, 7.5, 8.2, 8.6, 9.1, 10.0, 12.0, 15.0, 18.0, 22.0, 27.0, 33.0, 39.0, 47.0, 56.0, 68.0,
    82.0, 100.0, 120.0, 150.0, 180.0, 220.0, 300.0,
];
/// Gaps between streamed chunks: 0.5 ms (a batch-1 small model) to 10 s (a preempted request).
pub const ITL_BUCKETS: [f64; 19] = [
    0.0005, 0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5,
    1.0, 2.0, 5.0, 10.0,
];
/// Whole requests: 10 ms to 10 minutes.
pub const E2E_BUCKETS: [f64; 20] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0,
    120.0, 240.0, 480.0, 600.0,
];
/// Prefill params in hand to decode leg dispatched: 1 µs to 100 ms.
pub const DISPATCH_BUCKETS: [f64; 16] = [
    1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2,
    5e-2, 1e-1,
];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: &'static str,
    pub outcome: &'static str,
    /// The engine group (a configured name; empty for a request refused before it had one).
    pub group: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TtftLabels {
    pub route: &'static str,
    pub model: String,
    pub group: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GroupLabels {
    pub group: String,
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub phase: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub pool: &'static str,
    pub policy: &'static str,
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DisaggLabels {
    pub decision: &'static str,
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RetryLabels {
    pub leg: &'static str,
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EngineLabels {
    pub pool: &'static str,
    pub engine: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolStateLabels {
    pub pool: &'static str,
    pub state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RatioLabels {
    pub kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    /// A tenant name from the key file (bounded by it), never a key.
    pub tenant: String,
    pub reason: &'static str,
}

/// An admission class (`interactive`, `default`, `batch`) and why a request waited or was
/// refused.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AdmissionLabels {
    pub class: &'static str,
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassLabels {
    pub class: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

/// Who may use the front door and how much: API keys and tenants' budgets.
#[derive(Debug)]
pub struct AccessMetrics {
    pub limits_rejected: Family<LimitLabels, Counter>,
    pub limits_backend_up: Gauge,
    pub limits_fallback: Counter,
    pub auth_rejected: Family<ReasonLabels, Counter>,
    pub auth_reloads: Family<ResultLabels, Counter>,
    pub auth_keys: Gauge,
}

impl AccessMetrics {
    fn register(r: &mut Registry) -> Self {
        let m = AccessMetrics {
            limits_rejected: Family::default(),
            limits_backend_up: Gauge::default(),
            limits_fallback: Counter::default(),
            auth_rejected: Family::default(),
            auth_reloads: Family::default(),
            auth_keys: Gauge::default(),
        };
        r.register(
            "tandem_limits_rejected",
            "Requests answered 429 by tenant and reason (requests, tokens, concurrency, too_large)",
            m.limits_rejected.clone(),
        );
        r.register(
            "tandem_limits_backend_up",
            "1 while the limits backend answers (always 1 for local); 0 while Redis is unreachable and budgets are counted per process",
            m.limits_backend_up.clone(),
        );
        r.register(
            "tandem_limits_fallback",
            "Limit checks decided from this process's buckets because Redis was unreachable",
            m.limits_fallback.clone(),
        );
        r.register(
            "tandem_auth_rejected",
            "Requests answered 401, by reason (missing, malformed, unknown_key)",
            m.auth_rejected.clone(),
        );
        r.register(
            "tandem_auth_reloads",
            "Changed API key files read, by result (ok, error: the previous keys stay)",
            m.auth_reloads.clone(),
        );
        r.register("tandem_auth_keys", "API keys in force", m.auth_keys.clone());
        m
    }
}

type HistFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn hist(buckets: &'static [f64]) -> Histogram {
    Histogram::new(buckets.iter().copied())
}

#[derive(Debug)]
pub struct Metrics {
    /// `[telemetry] metrics`: when false the request path records nothing and `/metrics` is 404
    /// (the coordinator benchmark compares the two).
    enabled: bool,
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub ttft: HistFamily<TtftLabels>,
    groups_selected: Family<GroupLabels, Counter>,
    pub phase: HistFamily<PhaseLabels>,
    pub itl: Histogram,
    pub tpot: Histogram,
    pub e2e: Histogram,
    pub dispatch_gap: Histogram,
    pub route_decisions: Family<RouteLabels, Counter>,
    pub disagg_decisions: Family<DisaggLabels, Counter>,
    pub retries: Family<RetryLabels, Counter>,
    pub reported_cached_tokens: Counter,
    pub predicted_cached_tokens: Counter,
    pub admission_queued: Family<AdmissionLabels, Counter>,
    pub admission_rejected: Family<AdmissionLabels, Counter>,
    pub admission_waiting: Family<ClassLabels, Gauge>,
    pub admission_waiting_peak: Gauge,
    handoffs: Family<OutcomeLabels, Counter>,
    pub handoffs_pinned: Gauge,
    pub kv_feed_batches: Counter,
    kv_feed_up: Family<EngineLabels, Gauge>,
    engine_kv_reserved: Family<EngineLabels, Gauge>,
    engine_prefix_blocks: Family<EngineLabels, Gauge>,
    engine_up: Family<EngineLabels, Gauge>,
    engine_inflight: Family<EngineLabels, Gauge>,
    engine_prefill_queue: Family<EngineLabels, Gauge>,
    engine_kv_total: Family<EngineLabels, Gauge>,
    engine_kv_free: Family<EngineLabels, Gauge>,
    pool_engines: Family<PoolStateLabels, Gauge>,
    pd_ratio: Family<RatioLabels, Gauge<f64, AtomicU64>>,
    engine_prefill_rate: Family<EngineLabels, Gauge<f64, AtomicU64>>,
    /// The live P:D recommendation, fed every pool view `observe_pools` sees, on the seconds
    /// since `born` (`recommend.rs`).
    recommender: std::sync::Mutex<crate::recommend::Tracker>,
    born: tokio::time::Instant,
    pub access: AccessMetrics,
    pub outlier: OutlierMetrics,
}

impl Metrics {
    pub fn new(target_ratio: Option<f64>, enabled: bool) -> Self {
        let mut r = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        r.register(
            "tandem_requests",
            "Requests finished, by route (disaggregated | local), outcome and engine group",
            requests.clone(),
        );
        let groups_selected = Family::<GroupLabels, Counter>::default();
        r.register(
            "tandem_group_selected",
            "Requests routed in each engine group, by why (header, tenant, split, fallback)",
            groups_selected.clone(),
        );
        let ttft: HistFamily<TtftLabels> = Family::new_with_constructor(|| hist(&TTFT_BUCKETS));
        r.register(
            "tandem_ttft_seconds",
            "Arrival to the first content byte written to the client",
            ttft.clone(),
        );
        let phase: HistFamily<PhaseLabels> = Family::new_with_constructor(|| hist(&TTFT_BUCKETS));
        r.register(
            "tandem_phase_seconds",
            "TTFT phases: queue, prefill, handoff, decode_first_token; they add up to TTFT",
            phase.clone(),
        );
        let itl = hist(&ITL_BUCKETS);
        r.register(
            "tandem_itl_seconds",
            "Gaps between content chunks written to the client",
            itl.clone(),
        );
        let tpot = hist(&ITL_BUCKETS);
        r.register(
            "tandem_tpot_seconds",
            "Per request: (last content chunk - first content chunk) / (chunks - 1)",
            tpot.clone(),
        );
        let e2e = hist(&E2E_BUCKETS);
        r.register(
            "tandem_e2e_seconds",
            "Arrival to the end of the response",
            e2e.clone(),
        );
        let dispatch_gap = hist(&DISPATCH_BUCKETS);
        r.register(
            "tandem_handoff_dispatch_seconds",
            "Prefill KV params parsed to decode leg dispatched",
            dispatch_gap.clone(),
        );
        let route_decisions = Family::<RouteLabels, Counter>::default();
        r.register(
            "tandem_route_decisions",
            "Engine choices by pool, policy and reason",
            route_decisions.clone(),
        );
        let disagg_decisions = Family::<DisaggLabels, Counter>::default();
        r.register(
            "tandem_disaggregation_decisions",
            "Disaggregate-or-local decisions by reason",
            disagg_decisions.clone(),
        );
        let retries = Family::<RetryLabels, Counter>::default();
        r.register(
            "tandem_retries",
            "Leg retries by leg and reason",
            retries.clone(),
        );
        let reported_cached_tokens = Counter::default();
        r.register(
            "tandem_reported_cached_tokens",
            "Prompt tokens the prefill engines reported as cached (usage.prompt_tokens_details)",
            reported_cached_tokens.clone(),
        );
        let predicted_cached_tokens = Counter::default();
        r.register(
            "tandem_predicted_cached_tokens",
            "Prompt tokens the prefix index predicted cached on the chosen prefill engine, for requests whose engine reported cached tokens (compare with tandem_reported_cached_tokens)",
            predicted_cached_tokens.clone(),
        );
        let admission_queued = Family::<AdmissionLabels, Counter>::default();
        r.register(
            "tandem_admission_queued",
            "Waits in the admission queue, by class and reason: decode_kv (no decode room in the pool for it besides the requests in prefill), prefill_queue (every prefill engine's queue full), handoff (prefill done, no decode engine with KV room)",
            admission_queued.clone(),
        );
        let admission_rejected = Family::<AdmissionLabels, Counter>::default();
        r.register(
            "tandem_admission_rejected",
            "Requests answered 503 by admission, by class and reason: queue_full, tenant_queue_full, deadline (waited the class's longest wait), shed (its place given to a higher class)",
            admission_rejected.clone(),
        );
        let admission_waiting = Family::<ClassLabels, Gauge>::default();
        r.register(
            "tandem_admission_waiting",
            "Requests waiting in the admission queue now, by class",
            admission_waiting.clone(),
        );
        let admission_waiting_peak = Gauge::default();
        r.register(
            "tandem_admission_waiting_peak",
            "The most requests that have waited in the admission queue at once since start (at most admission.max_queued)",
            admission_waiting_peak.clone(),
        );
        let handoffs = Family::<OutcomeLabels, Counter>::default();
        r.register(
            "tandem_handoffs",
            "Prefill KV handoffs ended, by outcome: delivered to a decode engine, rejected by one (which frees it), released by a release leg (released, release_rejected, release_failed), or leaked (pinned until the engine's lease)",
            handoffs.clone(),
        );
        let handoffs_pinned = Gauge::default();
        r.register(
            "tandem_handoffs_pinned",
            "Prefill KV handoffs pinned now: prefilled, not yet taken by a decode engine or released",
            handoffs_pinned.clone(),
        );
        let kv_feed_batches = Counter::default();
        r.register(
            "tandem_kv_feed_batches",
            "KV event batches applied to the prefix indexes (precise feed)",
            kv_feed_batches.clone(),
        );
        let kv_feed_up = Family::<EngineLabels, Gauge>::default();
        r.register(
            "tandem_kv_feed_up",
            "1 while the engine's KV event feed is connected (precise feed only)",
            kv_feed_up.clone(),
        );
        let g = || Family::<EngineLabels, Gauge>::default();
        let (engine_kv_reserved, engine_prefix_blocks) = (g(), g());
        r.register(
            "tandem_engine_kv_reserved_blocks",
            "KV blocks Tandem has promised to requests on the engine that no scrape shows yet",
            engine_kv_reserved.clone(),
        );
        r.register(
            "tandem_engine_prefix_blocks_indexed",
            "Blocks the pool's prefix index says the engine holds",
            engine_prefix_blocks.clone(),
        );
        let (engine_up, engine_inflight, engine_prefill_queue, engine_kv_total, engine_kv_free) =
            (g(), g(), g(), g(), g());
        r.register(
            "tandem_engine_up",
            "1 when the engine is healthy",
            engine_up.clone(),
        );
        r.register(
            "tandem_engine_inflight",
            "Requests Tandem has in flight on the engine",
            engine_inflight.clone(),
        );
        r.register(
            "tandem_engine_prefill_queue_tokens",
            "Prompt tokens Tandem has sent to the engine for prefill and not seen finish",
            engine_prefill_queue.clone(),
        );
        r.register(
            "tandem_engine_kv_total_blocks",
            "The engine's KV blocks (vLLM num_gpu_blocks)",
            engine_kv_total.clone(),
        );
        r.register(
            "tandem_engine_kv_free_blocks",
            "The engine's free KV blocks at the last scrape",
            engine_kv_free.clone(),
        );
        let pool_engines = Family::<PoolStateLabels, Gauge>::default();
        r.register(
            "tandem_pool_engines",
            "Engines per pool and state",
            pool_engines.clone(),
        );
        let engine_prefill_rate = Family::<EngineLabels, Gauge<f64, AtomicU64>>::default();
        r.register(
            "tandem_engine_prefill_tokens_per_second",
            "Prefill throughput Tandem measured on the engine (uncached tokens per second busy with its prefill legs, 30 s decay), which the prefix policy prices queues with",
            engine_prefill_rate.clone(),
        );
        let pd_ratio = Family::<RatioLabels, Gauge<f64, AtomicU64>>::default();
        r.register(
            "tandem_pd_ratio",
            "Prefill:decode engine ratio: live (healthy engines), target (configured) and recommended (what the pools' work calls for, see /admin/plan)",
            pd_ratio.clone(),
        );
        if let Some(t) = target_ratio {
            pd_ratio
                .get_or_create(&RatioLabels { kind: "target" })
                .set(t);
        }
        let access = AccessMetrics::register(&mut r);
        let outlier = OutlierMetrics::register(&mut r);
        Metrics {
            enabled,
            access,
            outlier,
            registry: r,
            requests,
            ttft,
            groups_selected,
            phase,
            itl,
            tpot,
            e2e,
            dispatch_gap,
            route_decisions,
            disagg_decisions,
            retries,
            reported_cached_tokens,
            predicted_cached_tokens,
            admission_queued,
            admission_rejected,
            admission_waiting,
            admission_waiting_peak,
            handoffs,
            handoffs_pinned,
            kv_feed_batches,
            kv_feed_up,
            engine_kv_reserved,
            engine_prefix_blocks,
            engine_up,
            engine_inflight,
            engine_prefill_queue,
            engine_kv_total,
            engine_kv_free,
            pool_engines,
            pd_ratio,
            engine_prefill_rate,
            recommender: Default::default(),
            born: tokio::time::Instant::now(),
        }
    }

    /// The recommender's state for `/admin/plan`.
    pub fn plan(&self) -> crate::recommend::Tracker {
        self.recommender
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Count one request's engine group and why it was chosen (`split.rs`).
    pub fn group_selected(&self, group: &str, reason: &'static str) {
        if self.enabled {
            self.groups_selected
                .get_or_create(&GroupLabels {
                    group: group.to_owned(),
                    reason,
                })
                .inc();
        }
    }

    /// Count one handoff's end (see `handoff::Outcome`).
    pub fn handoff(&self, outcome: &'static str) {
        if self.enabled {
            self.handoffs
                .get_or_create(&OutcomeLabels { outcome })
                .inc();
        }
    }

    /// Refresh the per-engine and per-pool gauges from a pool view.
    pub fn observe_pools(&self, p: &Pools) {
        for kind in [PoolKind::Prefill, PoolKind::Decode] {
            let mut counts = [0i64; 5];
            for e in p.pool(kind) {
                let l = EngineLabels {
                    pool: kind.as_str(),
                    engine: e.engine.url.to_string(),
                };
                let st = &e.status;
                self.engine_up
                    .get_or_create(&l)
                    .set(i64::from(st.health == Health::Healthy));
                self.engine_inflight
                    .get_or_create(&l)
                    .set(i64::from(e.engine.inflight()));
                self.engine_prefill_queue
                    .get_or_create(&l)
                    .set(e.engine.queued_prefill_tokens() as i64);
                if let (Some(total), Some(free)) = (st.num_gpu_blocks, st.kv_free_blocks()) {
                    self.engine_kv_total.get_or_create(&l).set(total as i64);
                    self.engine_kv_free.get_or_create(&l).set(free as i64);
                }
                counts[health_index(st.health)] += 1;
            }
            for h in [
                Health::Unknown,
                Health::Healthy,
                Health::Unhealthy,
                Health::Draining,
                Health::Ejected,
            ] {
                self.pool_engines
                    .get_or_create(&PoolStateLabels {
                        pool: kind.as_str(),
                        state: h.as_str(),
                    })
                    .set(counts[health_index(h)]);
            }
        }
        self.outlier.observe(p);
        let (np, nd) = (p.healthy(PoolKind::Prefill), p.healthy(PoolKind::Decode));
        if nd > 0 {
            self.pd_ratio
                .get_or_create(&RatioLabels { kind: "live" })
                .set(np as f64 / nd as f64);
        }
        let sample = |kind| -> Vec<_> {
            p.pool(kind)
                .iter()
                .map(crate::recommend::EngineSample::of)
                .collect()
        };
        let (ps, ds) = (sample(PoolKind::Prefill), sample(PoolKind::Decode));
        let now = self.born.elapsed().as_secs_f64();
        let mut t = self.recommender.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = t.observe(now, &ps, &ds) {
            self.pd_ratio
                .get_or_create(&RatioLabels {
                    kind: "recommended",
                })
                .set(r.ratio);
        }
    }

    pub fn kv_feed_up(&self, pool: PoolKind, engine: &str, up: bool) {
        self.kv_feed_up
            .get_or_create(&EngineLabels {
                pool: pool.as_str(),
                engine: engine.to_string(),
            })
            .set(i64::from(up));
    }

    /// Refresh the gauges only the request path and the feeds change (reservations, index
    /// sizes); called at scrape time after [`Metrics::observe_pools`]. `indexed` gives each engine's indexed blocks.
    pub fn observe_live(&self, p: &Pools, indexed: impl Fn(PoolKind, usize) -> usize) {
        for kind in [PoolKind::Prefill, PoolKind::Decode] {
            for e in p.pool(kind) {
                let l = EngineLabels {
                    pool: kind.as_str(),
                    engine: e.engine.url.to_string(),
                };
                self.engine_kv_reserved
                    .get_or_create(&l)
                    .set(e.engine.reserved_blocks() as i64);
                self.engine_prefix_blocks
                    .get_or_create(&l)
                    .set(indexed(kind, e.engine.id) as i64);
                if let Some(rate) = e.engine.rate.tokens_per_sec() {
                    self.engine_prefill_rate.get_or_create(&l).set(rate);
                }
            }
        }
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

fn health_index(h: Health) -> usize {
    match h {
        Health::Unknown => 0,
        Health::Healthy => 1,
        Health::Unhealthy => 2,
        Health::Draining => 3,
        Health::Ejected => 4,
    }
}

#[cfg(test)]
mod tests;
