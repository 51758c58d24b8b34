//! Routing: the policies per pool, their parameters, the prefix index feeds and decode admission.

use serde::{Deserialize, Serialize};

/// Engine selection policy within a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyName {
    /// Prefill: expected prefill work counting each engine's cached prefix (`[routing]`).
    Prefix,
    /// Decode: fewest requests while KV is plentiful, most free KV relative to capacity when it
    /// is scarce, counting reservations.
    KvCapacity,
    /// Lowest `(in-flight + queued prefill tokens / 2048) / weight`.
    LeastLoaded,
    /// Fewest in-flight requests per weight (nginx `least_conn`).
    LeastRequests,
    /// The less loaded of two engines drawn at random.
    PowerOfTwo,
    RoundRobin,
    Random,
}

impl PolicyName {
    pub const ALL: [PolicyName; 7] = [
        PolicyName::Prefix,
        PolicyName::KvCapacity,
        PolicyName::LeastLoaded,
        PolicyName::LeastRequests,
        PolicyName::PowerOfTwo,
        PolicyName::RoundRobin,
        PolicyName::Random,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PolicyName::Prefix => "prefix",
            PolicyName::KvCapacity => "kv-capacity",
            PolicyName::LeastLoaded => "least-loaded",
            PolicyName::LeastRequests => "least-requests",
            PolicyName::PowerOfTwo => "power-of-two",
            PolicyName::RoundRobin => "round-robin",
            PolicyName::Random => "random",
        }
    }

    /// The default of each pool: the cache-aware policy for prefill, the capacity-aware one for
    /// decode.
    pub fn default_prefill() -> Self {
        PolicyName::Prefix
    }

    pub fn default_decode() -> Self {
        PolicyName::KvCapacity
    }
}

/// What feeds a pool's prefix index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum PrefixFeed {
    /// What Tandem routed: the prompt's blocks are assumed cached on the engine that ran it,
    /// until `ttl_secs` pass or the index is full (least recently used go first).
    #[default]
    Approximate,
    /// The engines' own KV events (vLLM `--kv-events-config`): exactly what each engine caches
    /// and evicts. Needs `kv_events` (pool-wide port) or a per-endpoint `kv_events` URL.
    Precise,
}

/// A pool's prefix index.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PrefixIndexConfig {
    pub feed: PrefixFeed,
    /// Most (engine, block) entries held; about 60 bytes each.
    pub max_blocks: u64,
    /// Approximate feed: seconds a routed block is assumed to stay cached without being reused.
    pub ttl_secs: u64,
}

impl Default for PrefixIndexConfig {
    fn default() -> Self {
        Self {
            feed: PrefixFeed::default(),
            max_blocks: 1_000_000,
            ttl_secs: 300,
        }
    }
}

/// Where each engine of a pool publishes its KV events (vLLM `KVEventsConfig`): the engine's
/// host with these ports. A per-endpoint `kv_events` URL overrides it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KvEventsConfig {
    /// ZMQ PUB port (vLLM default 5557).
    pub port: u16,
    /// ZMQ ROUTER replay port; 0 = the engine has no replay socket (gaps are then unrecoverable
    /// and reset the engine's index entries).
    pub replay_port: u16,
    /// Topic every live message starts with ("" = all).
    pub topic: String,
}

impl Default for KvEventsConfig {
    fn default() -> Self {
        Self {
            port: 5557,
            replay_port: 5558,
            topic: String::new(),
        }
    }
}

/// Policy parameters. One set of defaults, documented in `tandem.example.toml` and printed by
/// `tandem config check`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoutingConfig {
    /// `prefix`: tokens of prefill work one in-flight request counts as.
    pub request_cost_tokens: u64,
    /// `prefix`: how many queued tokens one uncached prompt token counts as.
    pub cache_weight: f64,
    /// `prefix`: the chosen engine's queue (and its predicted first token) may be at most this
    /// many times the shortest queue's (the fastest first token's)...
    pub release_ratio: f64,
    /// `prefix`: ...plus this many tokens' worth of time, or the request is released.
    pub release_slack_tokens: u64,
    /// `kv-capacity`: output tokens reserved per request, or `max_tokens` if smaller.
    pub expected_output_tokens: u64,
    /// `prefix`: a client's session key (`x-session-id` header, else the body's `user`) breaks
    /// ties toward the engine it hashes to, within the release bound.
    pub session_affinity: bool,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self {
            request_cost_tokens: 256,
            cache_weight: 5.0,
            release_ratio: 1.5,
            release_slack_tokens: 131_072,
            expected_output_tokens: 256,
            session_affinity: true,
        }
    }
}

/// Requests no decode engine has KV room for wait here instead of overloading an engine: one
/// queue, ordered by the tenant's priority class (interactive, default, batch), then weighted-fair
/// across the tenants of a class, then first come first served within a tenant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdmissionConfig {
    /// Requests that may wait at once, every class together; beyond that, 503 with Retry-After
    /// (or, with `shed`, a waiter of a lower class is refused in the newcomer's place).
    pub max_queued: u32,
    /// Requests of one tenant that may wait at once (`None`: up to `max_queued`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_queued_per_tenant: Option<u32>,
    /// Longest wait of the `default` class (and of every request when `[auth]` is off),
    /// milliseconds; then 503 with Retry-After.
    pub max_wait_ms: u64,
    /// Longest wait of the `interactive` class: a user is better served by a quick 503 than by a
    /// first token past the SLO.
    pub interactive_max_wait_ms: u64,
    /// Longest wait of the `batch` class: it tolerates waiting, and is shed first when the
    /// queue is full.
    pub batch_max_wait_ms: u64,
    /// When the queue is full, a newcomer refuses the waiter of the lowest class below its own
    /// that would be admitted last (batch first, then default) and takes its place; `false`:
    /// the newcomer is refused.
    pub shed: bool,
    /// The Retry-After value sent with those 503s, seconds.
    pub retry_after_secs: u64,
    /// Most uncached prompt tokens queued on one prefill engine; a request whose prefill would
    /// go past it on every engine waits in the admission queue like one without decode room
    /// (0 = no limit).
    pub max_prefill_queue_tokens: u64,
}

impl AdmissionConfig {
    /// The longest wait of a class, milliseconds.
    pub fn max_wait_ms_for(&self, class: crate::Priority) -> u64 {
        match class {
            crate::Priority::Interactive => self.interactive_max_wait_ms,
            crate::Priority::Default => self.max_wait_ms,
            crate::Priority::Batch => self.batch_max_wait_ms,
        }
    }
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        Self {
            max_queued: 1024,
            max_queued_per_tenant: None,
            max_wait_ms: 5_000,
            interactive_max_wait_ms: 2_000,
            batch_max_wait_ms: 30_000,
            shed: true,
            retry_after_secs: 1,
            max_prefill_queue_tokens: 262_144,
        }
    }
}
