//! The configuration schema: every section, its documented defaults, and the
//! serde shapes of the few values that are not plain TOML scalars
//! (endpoints, the `P:D` ratio).
//!
//! Defaults live in the `Default` impls (and, for structs that have required
//! fields, in small `default_*` functions) so that there is exactly one place
//! that states each default; `tandem.example.toml` mirrors them and a test
//! keeps the two in step.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};

use crate::engines::{OutlierConfig, TlsConfig};
use crate::routing::{
    AdmissionConfig, KvEventsConfig, PolicyName, PrefixIndexConfig, RoutingConfig,
};

/// The whole configuration file.
///
/// There is no `Default` for `Config` because the pools have no sensible
/// default: use [`Config::new`] to get every other section at its default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub model: ModelConfig,
    pub pools: PoolsConfig,
    #[serde(default)]
    pub timeouts: TimeoutsConfig,
    #[serde(default)]
    pub retries: RetryConfig,
    #[serde(default)]
    pub disaggregation: DisaggregationConfig,
    #[serde(default)]
    pub routing: RoutingConfig,
    #[serde(default)]
    pub admission: AdmissionConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default)]
    pub health: HealthConfig,
    #[serde(default)]
    pub outlier: OutlierConfig,
    #[serde(default)]
    pub tls: TlsConfig,
    #[serde(default)]
    pub logging: LoggingConfig,
    #[serde(default)]
    pub telemetry: TelemetryConfig,
}

impl Config {
    /// The given pools with every other section at its documented default.
    pub fn new(pools: PoolsConfig) -> Self {
        Self {
            server: ServerConfig::default(),
            model: ModelConfig::default(),
            pools,
            timeouts: TimeoutsConfig::default(),
            retries: RetryConfig::default(),
            disaggregation: DisaggregationConfig::default(),
            routing: RoutingConfig::default(),
            admission: AdmissionConfig::default(),
            limits: LimitsConfig::default(),
            auth: AuthConfig::default(),
            health: HealthConfig::default(),
            outlier: OutlierConfig::default(),
            tls: TlsConfig::default(),
            logging: LoggingConfig::default(),
            telemetry: TelemetryConfig::default(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address the OpenAI-compatible front end listens on.
    pub listen: SocketAddr,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// How long in-flight streams may finish after SIGTERM.
    pub shutdown_grace_secs: u64,
    /// Per-request timing records kept for `GET /admin/requests`.
    pub recent_requests: usize,
    /// Largest accepted request header block (request line and header fields), in bytes;
    /// larger ones get 431. Past twice this the HTTP parser itself refuses the request.
    pub max_header_bytes: usize,
    /// Most header fields in one request; more get 431.
    pub max_headers: usize,
    /// A client must send a request's whole header block within this many milliseconds of
    /// starting it, or of its previous response on a keep-alive connection (which is also how
    /// long an idle keep-alive connection stays open); otherwise the connection is closed.
    pub header_read_timeout_ms: u64,
    /// A request body must arrive in full within this many milliseconds of its headers, or the
    /// request gets 408.
    pub body_read_timeout_ms: u64,
    /// Most client connections open at once; connections beyond it are closed on accept.
    pub max_connections: usize,
    /// A second listener for `/metrics` and `/admin/*` (with `/health` and `/ready`); when set,
    /// the public listener answers 404 for those. `None` = both on `listen` (the default, for
    /// the demo); production should set it to an address clients cannot reach.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_listen: Option<SocketAddr>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 8000)),
            max_body_bytes: 32 * 1024 * 1024,
            shutdown_grace_secs: 30,
            recent_requests: 1024,
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            header_read_timeout_ms: 10_000,
            body_read_timeout_ms: 30_000,
            max_connections: 10_000,
            admin_listen: None,
        }
    }
}

/// Bounds on what one request may ask for, checked before any engine work (vLLM itself has
/// none on `n` or `best_of`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest `n` (choices per request).
    pub max_n: u32,
    /// Largest `best_of` (at least `max_n`).
    pub max_best_of: u32,
    /// Largest `max_tokens` / `max_completion_tokens` a request may name; `None` = no cap
    /// beyond the engines' own (a request that names none is not capped here).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u64>,
    /// Where tenants' rate budgets (requests and tokens per minute, from the key file) are
    /// counted: in this process, or in Redis, shared by every replica.
    pub backend: LimitsBackend,
    /// `redis://host:port[/db]` or `unix:///path/to/redis.sock`; required by `backend = "redis"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_url: Option<String>,
    /// Longest a limit check waits for Redis before deciding locally (and treating Redis as
    /// down until it answers a ping again).
    pub redis_timeout_ms: u64,
    /// While Redis is down, how often Tandem tries to reconnect.
    pub redis_retry_ms: u64,
    /// Prefix of every Redis key Tandem writes (`<prefix>:limits:{<tenant>}:requests`), so
    /// several deployments may share one Redis.
    pub redis_key_prefix: String,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_n: 16,
            max_best_of: 16,
            max_tokens: None,
            backend: LimitsBackend::default(),
            redis_url: None,
            redis_timeout_ms: 100,
            redis_retry_ms: 1_000,
            redis_key_prefix: "tandem".to_owned(),
        }
    }
}

/// Where per-tenant rate budgets are counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum LimitsBackend {
    /// In this process: each replica enforces each tenant's whole budget on its own.
    #[default]
    Local,
    /// In Redis, one atomic script per check: all replicas share one budget per tenant; while
    /// Redis is unreachable each replica falls back to its local count.
    Redis,
}

/// API keys (`[auth]`). Authentication is on when a key source is set: every OpenAI route
/// (and `/metrics` and `/admin/*` on the public listener) then needs `Authorization: Bearer`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// The key file (TOML: `[[tenants]]` and `[[keys]]`, see `tandem.example.toml`), e.g. a
    /// mounted Kubernetes Secret; re-read every `reload_interval_ms` and swapped in when its
    /// contents change and parse.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keys_file: Option<PathBuf>,
    /// The name of an environment variable holding a key document in the same format, read at
    /// start-up (merged with `keys_file`'s).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keys_env: Option<String>,
    /// How often `keys_file` is re-read.
    pub reload_interval_ms: u64,
}

impl AuthConfig {
    /// Whether requests must carry a key.
    pub fn enabled(&self) -> bool {
        self.keys_file.is_some() || self.keys_env.is_some()
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            keys_file: None,
            keys_env: None,
            reload_interval_ms: 1_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// HF `tokenizer.json`, or a model directory holding `tokenizer.json` and
    /// `tokenizer_config.json` (whose chat template, special tokens and EOS are then used; a
    /// `tokenizer_config.json` beside a named file is read too); `None` = built-in byte-level
    /// tokenizer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<PathBuf>,
    /// Jinja chat template file, overriding the model's; `None` = the model's
    /// (`tokenizer_config.json`), else the built-in default template.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chat_template: Option<PathBuf>,
    /// KV block size in tokens; must match the engines (vLLM's default is 16).
    pub block_size: u32,
    /// `None` = take it from the engines' `/v1/models`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub served_model_name: Option<String>,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            tokenizer: None,
            chat_template: None,
            block_size: 16,
            served_model_name: None,
        }
    }
}

/// The two engine pools. `prefill` and `decode` are required tables so that
/// a typo in a section name cannot silently leave a pool empty.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolsConfig {
    pub prefill: PoolConfig,
    pub decode: PoolConfig,
    /// Intended prefill:decode engine ratio; `None` = not checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ratio: Option<Ratio>,
    /// Warn when the live P/D ratio differs from the target by more than this
    /// fraction of the target.
    #[serde(default = "default_ratio_tolerance")]
    pub ratio_tolerance: f64,
    /// The traffic split over engine groups (an endpoint's or a DNS table's `group`; unset =
    /// [`DEFAULT_GROUP`]): each request not matched by `x-tandem-group` or its tenant's pinned
    /// group goes to a group drawn by these weights, and both its legs stay in it. Empty = every
    /// such request to [`DEFAULT_GROUP`]. A group with weight 0 gets header and tenant
    /// matches only.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub groups: BTreeMap<String, u32>,
}

/// The group of an engine that names none.
pub const DEFAULT_GROUP: &str = "default";

fn default_ratio_tolerance() -> f64 {
    0.25
}

impl PoolsConfig {
    /// Both pools, no target ratio, default tolerance; unset policies get each pool's default.
    pub fn new(mut prefill: PoolConfig, mut decode: PoolConfig) -> Self {
        prefill.policy.get_or_insert(PolicyName::default_prefill());
        decode.policy.get_or_insert(PolicyName::default_decode());
        Self {
            prefill,
            decode,
            target_ratio: None,
            ratio_tolerance: default_ratio_tolerance(),
            groups: BTreeMap::new(),
        }
    }

    /// Every group the configuration names (on an endpoint, a DNS table or in `groups`), with
    /// [`DEFAULT_GROUP`], sorted: the bounded set of `group` metric labels.
    pub fn group_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.groups.keys().cloned().collect();
        for pool in [&self.prefill, &self.decode] {
            for g in pool.groups() {
                names.push(g.to_owned());
            }
        }
        names.push(DEFAULT_GROUP.to_owned());
        names.sort();
        names.dedup();
        names
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct PoolConfig {
    /// Static engine endpoints.
    pub endpoints: Vec<Endpoint>,
    /// Engines discovered by re-resolving a (headless Service) DNS name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dns: Option<DnsConfig>,
    pub protocol: Protocol,
    /// Unset: `prefix` for the prefill pool, `kv-capacity` for the decode pool (filled in at
    /// load, so the rendered configuration always names it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicyName>,
    pub prefix_index: PrefixIndexConfig,
    /// Where the engines publish KV events (for `prefix_index.feed = "precise"`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kv_events: Option<KvEventsConfig>,
}

impl PoolConfig {
    /// The groups this pool's endpoints and DNS table belong to (with repeats).
    pub fn groups(&self) -> impl Iterator<Item = &str> {
        self.endpoints
            .iter()
            .map(|e| e.group.as_deref().unwrap_or(DEFAULT_GROUP))
            .chain(
                self.dns
                    .iter()
                    .map(|d| d.group.as_deref().unwrap_or(DEFAULT_GROUP)),
            )
    }

    /// The pool's policy; `policy` is always set after loading, the fallback only matters for
    /// configurations built in code.
    pub fn policy_or(&self, default: PolicyName) -> PolicyName {
        self.policy.unwrap_or(default)
    }
}

/// One engine endpoint. Written either as a plain URL string or as a table
/// `{ url = "...", weight = 2.0 }`; rendered back as a plain string when the
/// weight is the default so that rendered files stay as terse as the input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "EndpointSpec", into = "EndpointSpec")]
pub struct Endpoint {
    pub url: String,
    pub weight: f64,
    /// This engine's KV-event PUB endpoint, e.g. `tcp://10.0.0.5:5557` (overrides the pool's
    /// `kv_events` port).
    pub kv_events: Option<String>,
    /// Its replay (ROUTER) endpoint.
    pub kv_events_replay: Option<String>,
    /// For a gRPC engine (`url` is then its gRPC address): the HTTP base URL where it serves
    /// Prometheus `/metrics` (vLLM-rs keeps them on its HTTP port), read for KV load. Without
    /// it, `kv-capacity` counts Tandem's own reservations against the engine's
    /// `total_kv_blocks`.
    pub metrics: Option<String>,
    /// The engine group (model version, GPU type) it belongs to; `None` = [`DEFAULT_GROUP`].
    /// A request's prefill and decode engines always share a group.
    pub group: Option<String>,
}

impl Endpoint {
    /// An endpoint with the default weight (1.0).
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            weight: default_weight(),
            kv_events: None,
            kv_events_replay: None,
            metrics: None,
            group: None,
        }
    }
}

fn default_weight() -> f64 {
    1.0
}

/// The two spellings of an [`Endpoint`] in the file.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum EndpointSpec {
    Url(String),
    Detailed {
        url: String,
        weight: f64,
        #[serde(skip_serializing_if = "Option::is_none")]
        kv_events: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        kv_events_replay: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        metrics: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        group: Option<String>,
    },
}

impl From<EndpointSpec> for Endpoint {
    fn from(spec: EndpointSpec) -> Self {
        match spec {
            EndpointSpec::Url(url) => Endpoint::new(url),
            EndpointSpec::Detailed {
                url,
                weight,
                kv_events,
                kv_events_replay,
                metrics,
                group,
            } => Endpoint {
                url,
                weight,
                kv_events,
                kv_events_replay,
                metrics,
                group,
            },
        }
    }
}

impl From<Endpoint> for EndpointSpec {
    fn from(ep: Endpoint) -> Self {
        if ep.weight == default_weight()
            && ep.kv_events.is_none()
            && ep.kv_events_replay.is_none()
            && ep.metrics.is_none()
            && ep.group.is_none()
        {
            EndpointSpec::Url(ep.url)
        } else {
            EndpointSpec::Detailed {
                url: ep.url,
                weight: ep.weight,
                kv_events: ep.kv_events,
                kv_events_replay: ep.kv_events_replay,
                metrics: ep.metrics,
                group: ep.group,
            }
        }
    }
}

/// The table spelling, kept separate so that it can deny unknown fields:
/// serde cannot deny unknown fields on a variant of an untagged enum.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EndpointTable {
    url: String,
    #[serde(default = "default_weight")]
    weight: f64,
    #[serde(default)]
    kv_events: Option<String>,
    #[serde(default)]
    kv_events_replay: Option<String>,
    #[serde(default)]
    metrics: Option<String>,
    #[serde(default)]
    group: Option<String>,
}

// Hand-written rather than `#[serde(untagged)]` because the derived untagged
// impl replaces every inner error (e.g. "unknown field `wieght`") with "data
// did not match any variant", which would hide the offending key.
impl<'de> Deserialize<'de> for EndpointSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SpecVisitor;

        impl<'de> Visitor<'de> for SpecVisitor {
            type Value = EndpointSpec;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an endpoint URL string or a table { url = \"...\", weight = ... }")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<EndpointSpec, E> {
                Ok(EndpointSpec::Url(v.to_owned()))
            }

            fn visit_string<E: de::Error>(self, v: String) -> Result<EndpointSpec, E> {
                Ok(EndpointSpec::Url(v))
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<EndpointSpec, A::Error> {
                let t = EndpointTable::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(EndpointSpec::Detailed {
                    url: t.url,
                    weight: t.weight,
                    kv_events: t.kv_events,
                    kv_events_replay: t.kv_events_replay,
                    metrics: t.metrics,
                    group: t.group,
                })
            }
        }

        deserializer.deserialize_any(SpecVisitor)
    }
}

/// Engines found by resolving `name` every `interval_secs`; each address
/// becomes `scheme://addr:port` with `weight`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    pub name: String,
    pub port: u16,
    #[serde(default = "default_dns_scheme")]
    pub scheme: String,
    #[serde(default = "default_dns_interval_secs")]
    pub interval_secs: u64,
    #[serde(default = "default_weight")]
    pub weight: f64,
    /// For a gRPC pool (`port` is then the engines' gRPC port): the port each engine serves its
    /// HTTP `/metrics` on (vLLM-rs keeps them on its HTTP port), read for KV load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_port: Option<u16>,
    /// The engine group every discovered engine belongs to (see [`Endpoint::group`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

fn default_dns_scheme() -> String {
    "http".to_owned()
}

fn default_dns_interval_secs() -> u64 {
    5
}

/// Wire protocol spoken to the engines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    #[default]
    Http,
    Grpc,
}

/// A prefill:decode engine ratio, written `"P:D"` (both > 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Ratio {
    pub prefill: u32,
    pub decode: u32,
}

impl Ratio {
    /// `prefill / decode`.
    pub fn value(&self) -> f64 {
        f64::from(self.prefill) / f64::from(self.decode)
    }
}

impl FromStr for Ratio {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad =
            || format!("expected \"P:D\" with two positive integers, e.g. \"2:1\"; got {s:?}");
        let (p, d) = s.split_once(':').ok_or_else(bad)?;
        let prefill: u32 = p.trim().parse().map_err(|_| bad())?;
        let decode: u32 = d.trim().parse().map_err(|_| bad())?;
        if prefill == 0 || decode == 0 {
            return Err(format!("both sides of the ratio must be > 0; got {s:?}"));
        }
        Ok(Self { prefill, decode })
    }
}

impl TryFrom<String> for Ratio {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl fmt::Display for Ratio {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.prefill, self.decode)
    }
}

impl From<Ratio> for String {
    fn from(r: Ratio) -> Self {
        r.to_string()
    }
}

/// Timeouts, all in milliseconds and all > 0.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TimeoutsConfig {
    /// TCP connect to an engine.
    pub connect_ms: u64,
    /// One prefill leg, request sent to response parsed.
    pub prefill_ms: u64,
    /// Decode leg dispatched to its response headers.
    pub handoff_ms: u64,
    /// Decode leg dispatched to its first content chunk.
    pub first_token_ms: u64,
    /// Longest gap between decode chunks.
    pub idle_ms: u64,
    /// How long a finished prefill's KV stays pinned for us. vLLM frees it
    /// after VLLM_NIXL_ABORT_REQUEST_TIMEOUT (480 s); the default keeps a
    /// 30 s margin so we never pull blocks that were already released.
    pub prefill_lease_ms: u64,
    /// How long a non-streaming decode leg may take per requested token, on top of
    /// `first_token_ms` (nothing arrives until the whole answer is ready).
    pub per_token_ms: u64,
    /// Longest a release leg (a dropped handoff's params sent to a decode engine with one
    /// token, to free the prefill's pinned KV) may run before it is cut, which makes the decode
    /// engine abort and notify the prefill engine. Keep it below the engines' NIXL handshake
    /// timeout (5 s) so a handshake that hangs cannot outlast it.
    pub release_ms: u64,
}

impl Default for TimeoutsConfig {
    fn default() -> Self {
        Self {
            connect_ms: 2_000,
            prefill_ms: 60_000,
            handoff_ms: 10_000,
            first_token_ms: 60_000,
            idle_ms: 30_000,
            prefill_lease_ms: 450_000,
            per_token_ms: 250,
            release_ms: 3_000,
        }
    }
}

/// Attempts per leg, counting the first (so 1 = no retry).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryConfig {
    pub prefill_attempts: u32,
    pub decode_attempts: u32,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            prefill_attempts: 3,
            decode_attempts: 3,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DisaggregationConfig {
    pub mode: DisaggregationMode,
    /// `true` = fail the request instead of silently running it locally on
    /// the decode engine when disaggregation is not possible.
    pub enforce: bool,
    /// Conditional mode runs prompts with fewer uncached tokens than this on
    /// the decode engine (the transfer would cost more than it saves).
    pub local_max_uncached_tokens: u32,
    /// Conditional mode runs locally when every prefill engine has more
    /// queued prefill tokens than this.
    pub local_when_prefill_queue_tokens: u64,
}

impl Default for DisaggregationConfig {
    fn default() -> Self {
        Self {
            mode: DisaggregationMode::default(),
            enforce: false,
            local_max_uncached_tokens: 256,
            local_when_prefill_queue_tokens: 16_384,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum DisaggregationMode {
    /// Every request is prefilled on the prefill pool.
    Always,
    /// Disaggregate only when it pays off (see `DisaggregationConfig`).
    #[default]
    Conditional,
    /// Everything runs on the decode pool; the prefill pool may be empty.
    Never,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthConfig {
    /// Time between health probes of each engine.
    pub interval_ms: u64,
    /// A probe slower than this counts as failed.
    pub timeout_ms: u64,
    /// Consecutive failed probes before an engine is taken out of rotation.
    pub unhealthy_after: u32,
    /// Consecutive good probes before it is put back.
    pub healthy_after: u32,
    /// Time between scrapes of each engine's load metrics.
    pub scrape_interval_ms: u64,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            interval_ms: 1_000,
            timeout_ms: 1_000,
            unhealthy_after: 2,
            healthy_after: 1,
            scrape_interval_ms: 1_000,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoggingConfig {
    pub format: LogFormat,
    /// A tracing filter directive, e.g. `"info"` or `"info,tandem_proxy=debug"`.
    pub level: String,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::default(),
            level: "info".to_owned(),
        }
    }
}

/// Metrics on the request path and trace export.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// Record Prometheus metrics on the request path and serve `/metrics`.
    pub metrics: bool,
    /// OTLP/HTTP (protobuf) traces endpoint, e.g. `http://otel-collector:4318/v1/traces`;
    /// unset = no export. Needs a `tandem` built with the `otel` feature.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub otlp_endpoint: Option<String>,
    /// OTLP encoding, as `OTEL_EXPORTER_OTLP_PROTOCOL` names it.
    pub otlp_protocol: OtlpProtocol,
    /// `service.name` of the exported spans.
    pub service_name: String,
    /// Fraction of new traces (no sampled parent from the client) that are exported, 0..=1.
    pub sample_ratio: f64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            metrics: true,
            otlp_endpoint: None,
            otlp_protocol: OtlpProtocol::default(),
            service_name: "tandem".to_owned(),
            sample_ratio: 1.0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum OtlpProtocol {
    #[default]
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
    #[serde(rename = "http/json")]
    HttpJson,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}
