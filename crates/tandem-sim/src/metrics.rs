//! vLLM's Prometheus metrics, as served on `GET /metrics` (protocol spec §3, §1.8, §7 item 18).
//!
//! Names, types, label sets and bucket lists follow vLLM's `PrometheusStatLogger` exactly. The
//! registry is owned by [`EngineMetrics`] (no statics, no global registry), so several simulated
//! engines can live in one process.
//!
//! # Encoding
//!
//! `prometheus-client` writes metric names verbatim (no validation, `:` is kept), but it speaks
//! OpenMetrics: counter families are typed under their base name (`# TYPE vllm:prompt_tokens
//! counter`, sample `vllm:prompt_tokens_total`), output ends with `# EOF`, numbers are written
//! Rust-style (`3`, not `3.0`) and every help text gets a `.` appended. vLLM answers a plain
//! scrape with Python `prometheus_client`'s text format 0.0.4, where the family itself is
//! `vllm:prompt_tokens_total`, so [`EngineMetrics::encode`] post-processes the crate's output
//! into that format: counter families renamed to `<name>_total`, help texts verbatim, no
//! `# EOF`, every number (values and `le`) formatted like Python's `floatToGoString`, labels in
//! the order vLLM's multiprocess collector emits them (sorted by key, `le` last).
//! [`EngineMetrics::encode_openmetrics`] keeps the OpenMetrics shape for clients that negotiate
//! it (see [`EngineMetrics::encode_for_accept`]). No `_created` series are emitted: the crate
//! has none, and vLLM runs `prometheus_client` in multiprocess mode, which drops them too.
//!
//! The NIXL families (§1.8) are always registered; vLLM has them only when a NixlConnector is
//! configured, which for a P/D simulator is the normal case.

use std::fmt::Write as _;
use std::sync::atomic::AtomicU64;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Content type of [`EngineMetrics::encode`]: Prometheus text format 0.0.4, which is what
/// vLLM (`prometheus_client.CONTENT_TYPE_LATEST`) sends when the scraper does not ask for
/// OpenMetrics.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Content type of [`EngineMetrics::encode_openmetrics`].
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// `vllm:time_to_first_token_seconds` buckets (spec §3).
pub const TTFT_BUCKETS: [f64; 22] = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];

/// Buckets of `vllm:inter_token_latency_seconds`, the deprecated
/// `vllm:time_per_output_token_seconds` and `vllm:request_time_per_output_token_seconds` (spec §3).
pub const ITL_BUCKETS: [f64; 19] = [
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];

/// vLLM's `request_latency_buckets`: e2e, queue, inference, prefill and decode time (spec §3).
pub const REQUEST_LATENCY_BUCKETS: [f64; 21] = [
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];

/// `vllm:request_params_n` buckets (spec §3).
pub const REQUEST_PARAMS_N_BUCKETS: [f64; 5] = [1.0, 2.0, 5.0, 10.0, 20.0];

/// `vllm:iteration_tokens_total` buckets (spec §3).
pub const ITERATION_TOKENS_BUCKETS: [f64; 13] = [
    1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0,
];

// The spec (§1.8) names the NIXL metrics but not their buckets. These are ours, chosen to match
// upstream vLLM's `NixlPromMetrics` (`vllm/distributed/kv_transfer/kv_connector/v1/nixl/stats.py`
// @bd33ba3ea6d0202d5d6fe7e21c9b1d36374fc638) so dashboards built on real instances bin alike.

/// `vllm:nixl_post_time_seconds` buckets (ours, see above): 1 ms .. 5 s.
pub const NIXL_POST_TIME_BUCKETS: [f64; 13] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 5.0,
];

/// `vllm:nixl_xfer_time_seconds` buckets (ours): the post-time list without its 1 ms bucket,
/// as upstream does (`buckets[1:]`).
pub const NIXL_XFER_TIME_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 5.0,
];

/// `vllm:nixl_bytes_transferred` buckets (ours): `2^(10+i)` for odd `i` in 1..25, 2 KiB .. 8 GiB.
#[rustfmt::skip]
pub const NIXL_BYTES_BUCKETS: [f64; 12] = [
    2048.0, 8192.0, 32768.0, 131072.0, 524288.0, 2097152.0, 8388608.0, 33554432.0, 134217728.0,
    536870912.0, 2147483648.0, 8589934592.0,
];

/// `vllm:nixl_num_descriptors` buckets (ours): 10 .. 50 000 descriptors per transfer.
pub const NIXL_NUM_DESCRIPTORS_BUCKETS: [f64; 14] = [
    10.0, 20.0, 30.0, 50.0, 75.0, 100.0, 200.0, 400.0, 1000.0, 2000.0, 4000.0, 10000.0, 20000.0,
    50000.0,
];

/// vLLM's `build_1_2_5_buckets(max_value)`: 1, 2, 5, 10, 20, 50, ... while `<= max_value`.
pub fn build_1_2_5_buckets(max_value: u64) -> Vec<u64> {
    let mut buckets = Vec::new();
    let mut scale: u64 = 1;
    loop {
        for mantissa in [1u64, 2, 5] {
            match mantissa.checked_mul(scale) {
                Some(value) if value <= max_value => buckets.push(value),
                _ => return buckets,
            }
        }
        scale = match scale.checked_mul(10) {
            Some(s) => s,
            None => return buckets,
        };
    }
}

/// The `CacheConfig` fields exported as labels of `vllm:cache_config_info`.
#[derive(Debug, Clone)]
pub struct CacheConfigInfo {
    pub block_size: u32,
    pub num_gpu_blocks: u32,
    pub gpu_memory_utilization: f64,
    /// vLLM default `"auto"`.
    pub cache_dtype: String,
    pub enable_prefix_caching: bool,
    /// vLLM default `"sha256_cbor"` in the revisions the spec follows.
    pub prefix_caching_hash_algo: String,
}

/// vLLM's `FinishReason`; the label value is Python's `str(reason)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FinishedReason {
    Stop,
    Length,
    Abort,
    Error,
}

impl FinishedReason {
    /// In vLLM's enum order, which is also the order the series are created in.
    pub const ALL: [FinishedReason; 4] = [Self::Stop, Self::Length, Self::Abort, Self::Error];

    /// The `finished_reason` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::Abort => "abort",
            Self::Error => "error",
        }
    }
}

/// Everything vLLM observes once per finished request (`FinishedRequestStats`).
#[derive(Debug, Clone)]
pub struct FinishedRequest {
    pub reason: FinishedReason,
    pub prompt_tokens: u64,
    pub generation_tokens: u64,
    /// The request's `max_tokens`; 0 means unset and is not observed (vLLM: `if max_tokens_param`).
    pub max_tokens_param: u64,
    pub n: u32,
    /// Arrival to finish.
    pub e2e_s: f64,
    /// Arrival (queued) to first scheduled.
    pub queue_s: f64,
    /// First scheduled to first token.
    pub prefill_s: f64,
    /// First token to finish.
    pub decode_s: f64,
    /// First scheduled to finish (prefill + decode).
    pub inference_s: f64,
    /// Prompt tokens minus prefix-cache (or remotely transferred) hits.
    pub prefill_kv_computed_tokens: u64,
    /// Per-request mean TPOT; observed only when present.
    pub mean_tpot_s: Option<f64>,
}

/// Scheduler state sampled after each step.
#[derive(Debug, Clone, Copy, Default)]
pub struct SchedulerGauges {
    pub running: u64,
    /// Waiting for scheduling capacity (KV blocks, batch budget).
    pub waiting_capacity: u64,
    /// Deferred by transient constraints; decode-side requests awaiting NIXL KV count here.
    pub waiting_deferred: u64,
    /// `1 - free/total`, in 0..=1.
    pub kv_cache_usage: f64,
}

type Labels = Vec<(&'static str, String)>;
type GaugeF64 = Gauge<f64, AtomicU64>;

/// Counters, in registration order; index into `EngineMetrics::counters`. The crate appends
/// `_total` on output, so the table holds the base names.
#[rustfmt::skip]
#[derive(Debug, Clone, Copy)]
enum C {
    PrefixQueries, PrefixHits, ExternalPrefixQueries, ExternalPrefixHits, Preemptions,
    PromptTokens, GenerationTokens, NixlFailedTransfers, NixlFailedNotifications, NixlExpired,
}

#[rustfmt::skip]
const COUNTERS: [(C, &str, &str); 10] = [
    (C::PrefixQueries, "vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens."),
    (C::PrefixHits, "vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens."),
    (C::ExternalPrefixQueries, "vllm:external_prefix_cache_queries", "External prefix cache queries from KV connector cross-instance cache sharing, in terms of number of queried tokens."),
    (C::ExternalPrefixHits, "vllm:external_prefix_cache_hits", "External prefix cache hits from KV connector cross-instance cache sharing, in terms of number of cached tokens."),
    (C::Preemptions, "vllm:num_preemptions", "Cumulative number of preemption from the engine."),
    (C::PromptTokens, "vllm:prompt_tokens", "Number of prefill tokens processed."),
    (C::GenerationTokens, "vllm:generation_tokens", "Number of generation tokens processed."),
    (C::NixlFailedTransfers, "vllm:nixl_num_failed_transfers", "Number of failed NIXL KV Cache transfers."),
    (C::NixlFailedNotifications, "vllm:nixl_num_failed_notifications", "Number of failed NIXL KV Cache notifications."),
    (C::NixlExpired, "vllm:nixl_num_kv_expired_reqs", "Number of requests that had their KV expire. NOTE: This metric is tracked on the P instance."),
];

/// Histograms, in registration order; index into `EngineMetrics::histograms`.
#[rustfmt::skip]
#[derive(Debug, Clone, Copy)]
enum H {
    PromptTokens, GenerationTokens, IterationTokens, MaxNumGenerationTokens, ParamsN,
    ParamsMaxTokens, Ttft, TimePerOutputToken, InterTokenLatency, RequestTpot, E2e, Queue,
    Inference, Prefill, Decode, PrefillKvComputed, NixlXferTime, NixlPostTime, NixlBytes,
    NixlDescriptors,
}

/// `None` = `build_1_2_5_buckets(max_model_len)`.
type Buckets = Option<&'static [f64]>;
const LEN: Buckets = None;
const LATENCY: Buckets = Some(&REQUEST_LATENCY_BUCKETS);

#[rustfmt::skip]
const HISTOGRAMS: [(H, &str, Buckets, &str); 20] = [
    (H::PromptTokens, "vllm:request_prompt_tokens", LEN, "Number of prefill tokens processed."),
    (H::GenerationTokens, "vllm:request_generation_tokens", LEN, "Number of generation tokens processed."),
    (H::IterationTokens, "vllm:iteration_tokens_total", Some(&ITERATION_TOKENS_BUCKETS), "Histogram of number of tokens per engine_step."),
    (H::MaxNumGenerationTokens, "vllm:request_max_num_generation_tokens", LEN, "Histogram of maximum number of requested generation tokens."),
    (H::ParamsN, "vllm:request_params_n", Some(&REQUEST_PARAMS_N_BUCKETS), "Histogram of the n request parameter."),
    (H::ParamsMaxTokens, "vllm:request_params_max_tokens", LEN, "Histogram of the max_tokens request parameter."),
    (H::Ttft, "vllm:time_to_first_token_seconds", Some(&TTFT_BUCKETS), "Histogram of time to first token in seconds."),
    (H::TimePerOutputToken, "vllm:time_per_output_token_seconds", Some(&ITL_BUCKETS), "Histogram of time per output token in seconds. DEPRECATED: Use vllm:inter_token_latency_seconds instead."),
    (H::InterTokenLatency, "vllm:inter_token_latency_seconds", Some(&ITL_BUCKETS), "Histogram of inter-token latency in seconds."),
    (H::RequestTpot, "vllm:request_time_per_output_token_seconds", Some(&ITL_BUCKETS), "Histogram of time_per_output_token_seconds per request."),
    (H::E2e, "vllm:e2e_request_latency_seconds", LATENCY, "Histogram of e2e request latency in seconds."),
    (H::Queue, "vllm:request_queue_time_seconds", LATENCY, "Histogram of time spent in WAITING phase for request."),
    (H::Inference, "vllm:request_inference_time_seconds", LATENCY, "Histogram of time spent in RUNNING phase for request."),
    (H::Prefill, "vllm:request_prefill_time_seconds", LATENCY, "Histogram of time spent in PREFILL phase for request."),
    (H::Decode, "vllm:request_decode_time_seconds", LATENCY, "Histogram of time spent in DECODE phase for request."),
    (H::PrefillKvComputed, "vllm:request_prefill_kv_computed_tokens", LEN, "Histogram of new KV tokens computed during prefill (excluding cached tokens)."),
    (H::NixlXferTime, "vllm:nixl_xfer_time_seconds", Some(&NIXL_XFER_TIME_BUCKETS), "Histogram of transfer duration for NIXL KV Cache transfers."),
    (H::NixlPostTime, "vllm:nixl_post_time_seconds", Some(&NIXL_POST_TIME_BUCKETS), "Histogram of transfer post time for NIXL KV Cache transfers."),
    (H::NixlBytes, "vllm:nixl_bytes_transferred", Some(&NIXL_BYTES_BUCKETS), "Histogram of bytes transferred per NIXL KV Cache transfers."),
    (H::NixlDescriptors, "vllm:nixl_num_descriptors", Some(&NIXL_NUM_DESCRIPTORS_BUCKETS), "Histogram of number of descriptors per NIXL KV Cache transfers."),
];

const WAITING_BY_REASON_HELP: &str = "Number of requests waiting, by reason. 'capacity' = waiting \
    for scheduling capacity (KV cache blocks, token budget); 'deferred' = deferred by transient \
    constraints (LoRA budget, KV transfer, blocked status). Sum of all reasons equals \
    vllm:num_requests_waiting.";

/// The metrics of one simulated engine: the registry and a handle per series. Cheap to share
/// behind an `Arc`; every method takes `&self` (the handles are atomics).
#[derive(Debug)]
pub struct EngineMetrics {
    registry: Registry,
    running: Gauge,
    waiting: Gauge,
    waiting_capacity: Gauge,
    waiting_deferred: Gauge,
    kv_cache_usage: GaugeF64,
    counters: [Counter; COUNTERS.len()],
    /// Indexed by `FinishedReason as usize`.
    request_success: [Counter; 4],
    histograms: [Histogram; HISTOGRAMS.len()],
}

/// Every metric is a one-series `Family` carrying `engine` and `model_name` (rather than const
/// labels on a sub-registry) so extra labels sort in among them as vLLM's output has it, and
/// so the output keeps registration order.
struct Builder {
    registry: Registry,
    base: Labels,
}

impl Builder {
    fn labels(&self, extra: &[(&'static str, &str)]) -> Labels {
        let mut labels = self.base.clone();
        labels.extend(extra.iter().map(|(k, v)| (*k, escape_label_value(v))));
        labels.sort_by_key(|(k, _)| *k);
        labels
    }

    /// Registers a family and returns its series for each of `extras`.
    fn family<M, F, E, const N: usize>(
        &mut self,
        name: &str,
        help: &str,
        family: Family<Labels, M, F>,
        extras: [E; N],
    ) -> [M; N]
    where
        E: AsRef<[(&'static str, &'static str)]>,
        M: Clone + prometheus_client::encoding::EncodeMetric + std::fmt::Debug + 'static,
        M: prometheus_client::metrics::TypedMetric + Send + Sync,
        F: prometheus_client::metrics::family::MetricConstructor<M> + Send + Sync + 'static,
    {
        let series = extras.map(|extra| family.get_or_create_owned(&self.labels(extra.as_ref())));
        self.registry.register(name, help, family);
        series
    }
}

impl EngineMetrics {
    /// Creates every series vLLM creates at startup, so all of them are scrapeable (at zero)
    /// before the first request, as on a real instance.
    pub fn new(
        model_name: &str,
        engine: &str,
        max_model_len: u32,
        cache: &CacheConfigInfo,
    ) -> Self {
        let base = vec![
            ("engine", escape_label_value(engine)),
            ("model_name", escape_label_value(model_name)),
        ];
        let mut b = Builder {
            registry: Registry::default(),
            base,
        };
        let no_extra: [[(&str, &str); 0]; 1] = [[]];
        let [running] = b.family(
            "vllm:num_requests_running",
            "Number of requests currently running.",
            Family::default(),
            no_extra,
        );
        let [waiting] = b.family(
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed.",
            Family::default(),
            no_extra,
        );
        let [waiting_capacity, waiting_deferred] = b.family(
            "vllm:num_requests_waiting_by_reason",
            WAITING_BY_REASON_HELP,
            Family::default(),
            [[("reason", "capacity")], [("reason", "deferred")]],
        );
        let [kv_cache_usage] = b.family(
            "vllm:kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage.",
            Family::default(),
            no_extra,
        );
        let counters = COUNTERS.map(|(_, name, help)| {
            let [c] = b.family(name, help, Family::default(), no_extra);
            c
        });
        // vLLM creates one series per FinishReason up front, so all four show 0 at startup.
        let request_success = b.family(
            "vllm:request_success",
            "Count of successfully processed requests.",
            Family::default(),
            FinishedReason::ALL.map(|r| [("finished_reason", r.as_str())]),
        );
        let len_buckets: Vec<f64> = build_1_2_5_buckets(u64::from(max_model_len))
            .into_iter()
            .map(|v| v as f64)
            .collect();
        let histograms = HISTOGRAMS.map(|(_, name, buckets, help)| {
            let buckets = buckets.map_or_else(|| len_buckets.clone(), <[f64]>::to_vec);
            let family = Family::new_with_constructor(move || Histogram::new(buckets.clone()));
            let [h] = b.family(name, help, family, no_extra);
            h
        });

        // An info-style gauge labelled by CacheConfig fields (Python `str()` of each) plus
        // `engine`, without `model_name`: vLLM's `log_metrics_info` builds it from the config.
        let mut info: Labels = [
            ("block_size", cache.block_size.to_string()),
            ("cache_dtype", cache.cache_dtype.clone()),
            (
                "enable_prefix_caching",
                py_bool(cache.enable_prefix_caching).to_string(),
            ),
            ("engine", engine.to_string()),
            (
                "gpu_memory_utilization",
                py_float_repr(cache.gpu_memory_utilization),
            ),
            ("num_gpu_blocks", cache.num_gpu_blocks.to_string()),
            (
                "prefix_caching_hash_algo",
                cache.prefix_caching_hash_algo.clone(),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k, escape_label_value(&v)))
        .collect();
        info.sort_by_key(|(k, _)| *k);
        let info_family = Family::<Labels, Gauge>::default();
        info_family.get_or_create(&info).set(1);
        b.registry.register(
            "vllm:cache_config_info",
            "Information of the LLMEngine CacheConfig",
            info_family,
        );

        Self {
            registry: b.registry,
            running,
            waiting,
            waiting_capacity,
            waiting_deferred,
            kv_cache_usage,
            counters,
            request_success,
            histograms,
        }
    }

    fn counter(&self, c: C) -> &Counter {
        &self.counters[c as usize]
    }

    /// NaN or infinite observations would poison `_sum` forever; the engine never means them.
    fn observe(&self, h: H, v: f64) {
        if v.is_finite() {
            self.histograms[h as usize].observe(v);
        }
    }

    /// Per-step scheduler state. `num_requests_waiting` is derived as capacity + deferred so the
    /// by-reason series always sum to it.
    pub fn set_scheduler(&self, g: SchedulerGauges) {
        let waiting = g.waiting_capacity.saturating_add(g.waiting_deferred);
        self.running.set(to_i64(g.running));
        self.waiting.set(to_i64(waiting));
        self.waiting_capacity.set(to_i64(g.waiting_capacity));
        self.waiting_deferred.set(to_i64(g.waiting_deferred));
        self.kv_cache_usage.set(g.kv_cache_usage);
    }

    /// Prefix-cache lookups of one step, in tokens.
    pub fn prefix_cache(&self, queries: u64, hits: u64) {
        self.counter(C::PrefixQueries).inc_by(queries);
        self.counter(C::PrefixHits).inc_by(hits);
    }

    /// Lookups of one step in the KV connector's cache (the host-memory tier), in tokens.
    pub fn external_prefix_cache(&self, queries: u64, hits: u64) {
        self.counter(C::ExternalPrefixQueries).inc_by(queries);
        self.counter(C::ExternalPrefixHits).inc_by(hits);
    }

    pub fn preempted(&self, n: u64) {
        self.counter(C::Preemptions).inc_by(n);
    }

    pub fn prompt_tokens(&self, n: u64) {
        self.counter(C::PromptTokens).inc_by(n);
    }

    pub fn generation_tokens(&self, n: u64) {
        self.counter(C::GenerationTokens).inc_by(n);
    }

    /// Prompt + generation tokens scheduled in one engine step.
    pub fn iteration_tokens(&self, n: u64) {
        self.observe(H::IterationTokens, n as f64);
    }

    pub fn ttft(&self, s: f64) {
        self.observe(H::Ttft, s);
    }

    /// Observes `inter_token_latency_seconds` and its deprecated alias
    /// `time_per_output_token_seconds`, as vLLM 0.11+ does.
    pub fn itl(&self, s: f64) {
        self.observe(H::InterTokenLatency, s);
        self.observe(H::TimePerOutputToken, s);
    }

    /// Once per finished request. `request_max_num_generation_tokens` and `request_params_n`
    /// are observed here too: vLLM observes them per *parent* request (the max generation
    /// tokens over its `n` children), which is the same thing for `n == 1`.
    pub fn request_finished(&self, r: &FinishedRequest) {
        self.request_success[r.reason as usize].inc();
        self.observe(H::E2e, r.e2e_s);
        self.observe(H::Queue, r.queue_s);
        self.observe(H::Prefill, r.prefill_s);
        self.observe(H::Inference, r.inference_s);
        self.observe(H::Decode, r.decode_s);
        self.observe(H::PromptTokens, r.prompt_tokens as f64);
        self.observe(H::GenerationTokens, r.generation_tokens as f64);
        self.observe(H::MaxNumGenerationTokens, r.generation_tokens as f64);
        self.observe(H::ParamsN, f64::from(r.n));
        if r.max_tokens_param > 0 {
            self.observe(H::ParamsMaxTokens, r.max_tokens_param as f64);
        }
        self.observe(H::PrefillKvComputed, r.prefill_kv_computed_tokens as f64);
        if let Some(tpot) = r.mean_tpot_s {
            self.observe(H::RequestTpot, tpot);
        }
    }

    /// One successful NIXL read (decode side). With `--kv-transport nixl` the times and bytes are
    /// the real READ's (wall-clock seconds, as vLLM takes them from NIXL's transfer telemetry);
    /// over the TCP stand-in the times are the modeled transfer's, in simulated seconds, and the
    /// bytes its modeled size.
    pub fn nixl_transfer(&self, xfer_s: f64, post_s: f64, bytes: u64, descriptors: u64) {
        self.observe(H::NixlXferTime, xfer_s);
        self.observe(H::NixlPostTime, post_s);
        self.observe(H::NixlBytes, bytes as f64);
        self.observe(H::NixlDescriptors, descriptors as f64);
    }

    pub fn nixl_failed_transfer(&self) {
        self.counter(C::NixlFailedTransfers).inc();
    }

    pub fn nixl_failed_notification(&self) {
        self.counter(C::NixlFailedNotifications).inc();
    }

    /// Requests whose pinned KV blocks expired before D read them (prefill side).
    pub fn nixl_expired(&self, n: u64) {
        self.counter(C::NixlExpired).inc_by(n);
    }

    /// Prometheus text format 0.0.4 (serve with [`CONTENT_TYPE`]); what vLLM returns to a
    /// scraper that does not negotiate OpenMetrics.
    pub fn encode(&self) -> String {
        rewrite(&self.encode_raw(), false)
    }

    /// OpenMetrics 1.0 text (serve with [`OPENMETRICS_CONTENT_TYPE`]): counter families under
    /// their base name, `# EOF` last.
    pub fn encode_openmetrics(&self) -> String {
        rewrite(&self.encode_raw(), true)
    }

    /// Picks the format from an `Accept` header the way `prometheus_client.choose_encoder`
    /// does; returns the body and its content type.
    pub fn encode_for_accept(&self, accept: Option<&str>) -> (String, &'static str) {
        let wants_openmetrics = accept.unwrap_or("").split(',').any(|media| {
            media.split(';').next().unwrap_or("").trim() == "application/openmetrics-text"
        });
        if wants_openmetrics {
            (self.encode_openmetrics(), OPENMETRICS_CONTENT_TYPE)
        } else {
            (self.encode(), CONTENT_TYPE)
        }
    }

    fn encode_raw(&self) -> String {
        let mut out = String::with_capacity(32 * 1024);
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("encoding into a String is infallible");
        out
    }
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn py_bool(b: bool) -> &'static str {
    if b {
        "True"
    } else {
        "False"
    }
}

/// Label-value escaping of the text formats; `prometheus-client` writes label values raw.
fn escape_label_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            _ => out.push(c),
        }
    }
    out
}

/// Python's `repr(float)`: shortest round-trip digits, exponent form when the decimal point
/// position is `<= -4` or `> 16`, `.0` on integral values.
fn py_float_repr(v: f64) -> String {
    if v.is_nan() {
        return "nan".to_string();
    }
    if v.is_infinite() {
        return if v > 0.0 { "inf" } else { "-inf" }.to_string();
    }
    let sci = format!("{v:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let decpt = exp + 1;
    if v != 0.0 && (decpt <= -4 || decpt > 16) {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exp.abs())
    } else {
        let fixed = format!("{v}");
        if fixed.contains('.') {
            fixed
        } else {
            fixed + ".0"
        }
    }
}

/// `prometheus_client.utils.floatToGoString`, used by Python for every sample value and `le`.
/// It keeps its quirks: 2097152 becomes `2.097152e+06` and 2^35 `3.4359738368e+010`.
fn go_float(v: f64) -> String {
    if v == f64::INFINITY {
        return "+Inf".to_string();
    }
    if v == f64::NEG_INFINITY {
        return "-Inf".to_string();
    }
    if v.is_nan() {
        return "NaN".to_string();
    }
    let s = py_float_repr(v);
    match s.find('.') {
        Some(dot) if v > 0.0 && dot > 6 => {
            let digits = format!("{}.{}{}", &s[..1], &s[1..dot], &s[dot + 1..]);
            let mantissa = digits.trim_end_matches(['0', '.']);
            format!("{mantissa}e+0{}", dot - 1)
        }
        _ => s,
    }
}

/// One parsed sample line; label values stay in their escaped form.
#[derive(Debug)]
struct Sample<'a> {
    name: &'a str,
    labels: Vec<(&'a str, &'a str)>,
    value: &'a str,
}

fn parse_sample(line: &str) -> Option<Sample<'_>> {
    let name_end = line.find(['{', ' '])?;
    let name = &line[..name_end];
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(after) = rest.strip_prefix('{') {
        rest = after;
        loop {
            if let Some(after) = rest.strip_prefix('}') {
                rest = after;
                break;
            }
            rest = rest.strip_prefix(',').unwrap_or(rest);
            let eq = rest.find("=\"")?;
            let key = &rest[..eq];
            let body = &rest[eq + 2..];
            let mut escaped = false;
            let mut close = None;
            for (i, c) in body.char_indices() {
                match (escaped, c) {
                    (true, _) => escaped = false,
                    (false, '\\') => escaped = true,
                    (false, '"') => {
                        close = Some(i);
                        break;
                    }
                    _ => {}
                }
            }
            let close = close?;
            labels.push((key, &body[..close]));
            rest = &body[close + 1..];
        }
    }
    let value = rest.strip_prefix(' ')?;
    Some(Sample {
        name,
        labels,
        value,
    })
}

/// Re-renders a sample the way Python's multiprocess collector does: labels as given (sorted
/// at registration), `le` moved last, numbers through [`go_float`].
fn render_sample(s: &Sample<'_>, out: &mut String) {
    let number = |v: &str| v.parse::<f64>().map_or_else(|_| v.to_string(), go_float);
    out.push_str(s.name);
    if !s.labels.is_empty() {
        out.push('{');
        let ordered = s
            .labels
            .iter()
            .filter(|(k, _)| *k != "le")
            .chain(s.labels.iter().filter(|(k, _)| *k == "le"));
        for (i, (k, v)) in ordered.enumerate() {
            if i > 0 {
                out.push(',');
            }
            let v = if *k == "le" { number(v) } else { v.to_string() };
            let _ = write!(out, "{k}=\"{v}\"");
        }
        out.push('}');
    }
    out.push(' ');
    out.push_str(&number(s.value));
    out.push('\n');
}

/// Turns the crate's OpenMetrics output into vLLM's exposition (see the module docs).
/// Samples of counter and gauge families are sorted so multi-series families (whose order
/// comes from a `HashMap`) encode deterministically.
fn rewrite(raw: &str, openmetrics: bool) -> String {
    let mut out = String::with_capacity(raw.len() + raw.len() / 4);
    let mut help: Option<&str> = None;
    let mut sortable = false;
    let mut pending: Vec<String> = Vec::new();
    let flush = |pending: &mut Vec<String>, sortable: bool, out: &mut String| {
        if sortable {
            pending.sort();
        }
        for line in pending.drain(..) {
            out.push_str(&line);
        }
    };
    for line in raw.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            flush(&mut pending, sortable, &mut out);
            help = Some(rest);
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            flush(&mut pending, sortable, &mut out);
            let (name, kind) = rest.rsplit_once(' ').unwrap_or((rest, "unknown"));
            sortable = kind == "counter" || kind == "gauge";
            let family = if kind == "counter" && !openmetrics {
                format!("{name}_total")
            } else {
                name.to_string()
            };
            if let Some(h) = help.take() {
                // The crate appends a `.` to every help text; vLLM's are verbatim.
                let text = h.split_once(' ').map_or("", |(_, text)| text);
                let text = text.strip_suffix('.').unwrap_or(text);
                let _ = writeln!(out, "# HELP {family} {text}");
            }
            let _ = writeln!(out, "# TYPE {family} {kind}");
        } else if line == "# EOF" {
            flush(&mut pending, sortable, &mut out);
            if openmetrics {
                out.push_str("# EOF\n");
            }
        } else if line.starts_with('#') {
            flush(&mut pending, sortable, &mut out);
            out.push_str(line);
            out.push('\n');
        } else if let Some(sample) = parse_sample(line) {
            let mut rendered = String::with_capacity(line.len() + 8);
            render_sample(&sample, &mut rendered);
            pending.push(rendered);
        } else {
            pending.push(format!("{line}\n"));
        }
    }
    flush(&mut pending, sortable, &mut out);
    out
}

#[cfg(test)]
mod tests;
