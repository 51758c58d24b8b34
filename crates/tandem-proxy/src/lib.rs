//! Tandem's data plane: the OpenAI-compatible front door, the P/D request state machine, the
//! engine clients and the pool control loop.
//!
//! [`start`] is the whole coordinator: give it a validated [`Config`], a bound listener and a shutdown
//! signal. Everything it needs is built here and passed down; there is no global state.

/// The vLLM gRPC schema version the gRPC transport speaks (`vllm-proto`, pinned exactly).
pub const VLLM_PROTO_VERSION: &str = vllm_proto::VERSION;

mod admission;
mod auth;
mod batch;
mod engine;
mod error;
mod front;
mod grpc;
mod handoff;
mod kvfeed;
mod limits;
mod metrics;
mod pd;
mod pool;
mod prefill;
mod prefix;
mod rate;
mod recommend;
mod relay;
mod route;
mod server;
mod side;
mod split;
mod timing;
mod tls;
pub mod trace;
mod upstream;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tandem_config::{Config, DisaggregationMode, PolicyName, RoutingConfig};
use tandem_model::Tokenizer;
use tandem_policy::{DisaggMode, DisaggSettings, Policy, PolicyKind, PrefixParams};
use tokio::net::TcpListener;

pub use auth::AuthError;
pub use error::ProxyError;
pub use metrics::{Metrics, TTFT_BUCKETS};
pub use pool::{Resolver, SystemResolver};
pub use tandem_policy::{KV_NEAR_TIE, KV_PLENTY};
pub use timing::RequestRecord;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Tokenizer(#[from] tandem_model::TokenizerError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("{0}")]
    Limits(String),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("cannot listen on server.admin_listen {addr}: {source}")]
    AdminListen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Deadlines per phase, from the config.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Deadlines {
    pub prefill: Duration,
    pub handoff: Duration,
    pub first_token: Duration,
    pub idle: Duration,
    pub lease: Duration,
    pub per_token: Duration,
    pub release: Duration,
}

/// Everything a request needs, built once.
#[derive(Debug)]
pub(crate) struct State {
    pub cfg: Config,
    pub metrics: Arc<Metrics>,
    pub pools: pool::PoolHandle,
    pub tokenizer: Tokenizer,
    pub disagg: DisaggSettings,
    pub prefill_policy: Box<dyn Policy>,
    pub decode_policy: Box<dyn Policy>,
    pub prefill_policy_name: &'static str,
    pub decode_policy_name: &'static str,
    pub prefill_index: Arc<prefix::PoolIndex>,
    pub decode_index: Arc<prefix::PoolIndex>,
    /// The precise prefix feeds (empty when every pool is fed approximately).
    pub feeds: Arc<kvfeed::Feeds>,
    /// The admission queue: requests waiting for room, in priority and fair order.
    pub admission: admission::Admission,
    /// Decode KV blocks promised, pool-wide, to requests whose prefill is running (see
    /// `route::PendingDecode`).
    pub pending_decode_blocks: AtomicU64,
    /// Prefill KV handoffs pinned now, for `/admin/requests/pinned`.
    pub handoffs: handoff::Registry,
    /// Tie-breaking and random policies; seeded so a run can be replayed.
    pub rng: Mutex<ChaCha8Rng>,
    pub seq: AtomicU64,
    pub recent: Arc<timing::Recent>,
    pub deadlines: Deadlines,
    /// Set when shutdown begins: `/ready` fails from then on.
    pub shutting_down: std::sync::atomic::AtomicBool,
    /// Turns `true` when the shutdown grace period ends with responses still open (see
    /// [`State::grace_over`]).
    pub grace_rx: tokio::sync::watch::Receiver<bool>,
    /// Ties each request span to the client's W3C trace.
    pub trace_link: Arc<dyn trace::TraceLink>,
    /// API keys (`None`: `[auth]` is off and every request is served).
    pub auth: Option<Arc<auth::Auth>>,
    /// Tenants' budgets.
    pub limits: Arc<limits::Limiter>,
    /// Engine groups and the traffic split over them.
    pub splits: split::Splits,
}

impl State {
    /// The model name clients must ask for: `model.served_model_name`, else the engines' own.
    pub(crate) fn served_model(&self) -> Option<String> {
        self.cfg.model.served_model_name.clone().or_else(|| {
            self.pools
                .pools
                .borrow()
                .served_model()
                .map(|m| m.to_string())
        })
    }

    /// A pool's prefix index.
    pub(crate) fn index(&self, pool: tandem_policy::PoolKind) -> &prefix::PoolIndex {
        match pool {
            tandem_policy::PoolKind::Prefill => &self.prefill_index,
            tandem_policy::PoolKind::Decode => &self.decode_index,
        }
    }

    /// A pool's policy name, for metric labels.
    pub(crate) fn policy_name(&self, pool: tandem_policy::PoolKind) -> &'static str {
        match pool {
            tandem_policy::PoolKind::Prefill => self.prefill_policy_name,
            tandem_policy::PoolKind::Decode => self.decode_policy_name,
        }
    }

    /// A healthy decode engine's own `/v1/models` body (the first that answers 2xx).
    pub(crate) async fn decode_models(&self) -> Option<bytes::Bytes> {
        let pools = self.pools.pools.borrow().clone();
        for e in pools
            .decode
            .iter()
            .filter(|e| e.status.health == tandem_policy::Health::Healthy)
        {
            if let Some(body) = e.engine.client.models().await {
                return Some(body);
            }
        }
        None
    }

    /// Resolves once the shutdown grace period has ended with responses still open: streams
    /// then end with an error event. Never resolves if the server stops some other way.
    pub(crate) fn grace_over(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.grace_rx.clone();
        async move {
            let closed = rx.wait_for(|over| *over).await.is_err();
            if closed {
                std::future::pending::<()>().await;
            }
        }
    }
}

/// The effects a host process may swap: how pool DNS names resolve, and how request spans join
/// a trace (the `otel` build of `tandem` exports them).
#[derive(Debug, Clone)]
pub struct Edges {
    pub resolver: Arc<dyn Resolver>,
    pub trace_link: Arc<dyn trace::TraceLink>,
}

impl Default for Edges {
    fn default() -> Self {
        Edges {
            resolver: Arc::new(SystemResolver),
            trace_link: Arc::new(trace::W3cLink),
        }
    }
}

/// The policy a configuration names, with its parameters.
pub fn policy_kind(p: PolicyName, routing: &RoutingConfig) -> PolicyKind {
    match p {
        PolicyName::Prefix => PolicyKind::Prefix(prefix_params(routing)),
        PolicyName::KvCapacity => PolicyKind::KvCapacity,
        PolicyName::LeastLoaded => PolicyKind::LeastLoaded,
        PolicyName::LeastRequests => PolicyKind::LeastRequests,
        PolicyName::PowerOfTwo => PolicyKind::PowerOfTwo,
        PolicyName::RoundRobin => PolicyKind::RoundRobin,
        PolicyName::Random => PolicyKind::Random,
    }
}

/// The `prefix` policy's parameters from `[routing]`.
pub fn prefix_params(r: &RoutingConfig) -> PrefixParams {
    PrefixParams {
        request_cost_tokens: r.request_cost_tokens,
        cache_weight: r.cache_weight,
        release_ratio: r.release_ratio,
        release_slack_tokens: r.release_slack_tokens,
    }
}

/// A coordinator running in this process (for `tandem demo` and tests).
#[derive(Debug)]
pub struct Running {
    pub addr: SocketAddr,
    /// Where `/metrics` and `/admin/*` are served when `server.admin_listen` is set.
    pub admin_addr: Option<SocketAddr>,
    state: Arc<State>,
    pub task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Running {
    /// The most recent per-request records, oldest first.
    pub fn recent(&self) -> Vec<RequestRecord> {
        self.state.recent.list()
    }
}

fn build(
    cfg: Config,
    edges: Edges,
    grace_rx: tokio::sync::watch::Receiver<bool>,
) -> Result<Arc<State>, StartError> {
    // Compiles the chat template and renders a plain conversation with it, so a template that
    // cannot work fails start-up instead of every request.
    let tokenizer = Tokenizer::load(
        cfg.model.tokenizer.as_deref(),
        cfg.model.chat_template.as_deref(),
    )?;
    let target = cfg.pools.target_ratio.map(|r| r.value());
    let metrics = Arc::new(Metrics::new(target, cfg.telemetry.metrics));
    let auth = auth::Auth::start(&cfg.auth, metrics.clone())?;
    let limits =
        Arc::new(limits::Limiter::new(&cfg.limits, metrics.clone()).map_err(StartError::Limits)?);
    let tls = tls::EngineTls::load(&cfg)?;
    let pools = pool::start(&cfg, metrics.clone(), edges.resolver, tls);
    let d = &cfg.disaggregation;
    let disagg = DisaggSettings {
        mode: match d.mode {
            DisaggregationMode::Always => DisaggMode::Always,
            DisaggregationMode::Conditional => DisaggMode::Conditional,
            DisaggregationMode::Never => DisaggMode::Never,
        },
        enforce: d.enforce,
        local_max_uncached_tokens: u64::from(d.local_max_uncached_tokens),
        local_when_prefill_queue_tokens: d.local_when_prefill_queue_tokens,
    };
    let t = &cfg.timeouts;
    let deadlines = Deadlines {
        prefill: Duration::from_millis(t.prefill_ms),
        handoff: Duration::from_millis(t.handoff_ms),
        first_token: Duration::from_millis(t.first_token_ms),
        idle: Duration::from_millis(t.idle_ms),
        lease: Duration::from_millis(t.prefill_lease_ms),
        per_token: Duration::from_millis(t.per_token_ms),
        release: Duration::from_millis(t.release_ms),
    };
    let prefill_policy = tandem_policy::policy_for(policy_kind(
        cfg.pools.prefill.policy_or(PolicyName::default_prefill()),
        &cfg.routing,
    ));
    let decode_policy = tandem_policy::policy_for(policy_kind(
        cfg.pools.decode.policy_or(PolicyName::default_decode()),
        &cfg.routing,
    ));
    let bs = cfg.model.block_size;
    let prefill_index = Arc::new(prefix::PoolIndex::new(&cfg.pools.prefill.prefix_index, bs));
    let decode_index = Arc::new(prefix::PoolIndex::new(&cfg.pools.decode.prefix_index, bs));
    let feeds = kvfeed::start(
        &cfg,
        pools.clone(),
        [
            (tandem_policy::PoolKind::Prefill, prefill_index.clone()),
            (tandem_policy::PoolKind::Decode, decode_index.clone()),
        ],
        metrics.clone(),
    );
    Ok(Arc::new(State {
        prefill_policy_name: prefill_policy.name(),
        decode_policy_name: decode_policy.name(),
        prefill_policy,
        decode_policy,
        prefill_index,
        decode_index,
        feeds,
        admission: admission::Admission::new(&cfg.admission, metrics.clone()),
        pending_decode_blocks: AtomicU64::new(0),
        handoffs: handoff::Registry::default(),
        recent: Arc::new(timing::Recent::new(cfg.server.recent_requests)),
        rng: Mutex::new(ChaCha8Rng::seed_from_u64(0x7a4d_e35e)),
        seq: AtomicU64::new(0),
        tokenizer,
        metrics,
        pools,
        disagg,
        deadlines,
        shutting_down: std::sync::atomic::AtomicBool::new(false),
        grace_rx,
        trace_link: edges.trace_link,
        auth,
        limits,
        splits: split::Splits::new(&cfg.pools),
        cfg,
    }))
}

/// Start the coordinator on `listener`; it stops accepting when `shutdown` resolves and returns
/// once in-flight responses have finished.
pub fn start(
    cfg: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Running, StartError> {
    start_with(cfg, listener, shutdown, Edges::default())
}

/// [`start`] with chosen [`Edges`] (tests use a stand-in resolver).
pub fn start_with(
    cfg: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    edges: Edges,
) -> Result<Running, StartError> {
    let addr = listener.local_addr()?;
    let admin = match cfg.server.admin_listen {
        Some(a) => {
            let bind = || {
                let l = std::net::TcpListener::bind(a)?;
                l.set_nonblocking(true)?;
                TcpListener::from_std(l)
            };
            Some(bind().map_err(|source| StartError::AdminListen { addr: a, source })?)
        }
        None => None,
    };
    let admin_addr = admin.as_ref().map(TcpListener::local_addr).transpose()?;
    let (grace_tx, grace_rx) = tokio::sync::watch::channel(false);
    let state = build(cfg, edges, grace_rx)?;
    let admin = admin.map(|l| tokio::spawn(server::serve_admin(l, state.clone())));
    // On the signal: fail `/ready`, stop accepting, let in-flight responses finish; after the
    // grace period, end the streams still open with an error event and return (and close the
    // admin listener, which answered throughout).
    let serve = server::serve(listener, state.clone(), shutdown, grace_tx);
    let task = tokio::spawn(async move {
        let r = serve.await;
        if let Some(a) = admin {
            a.abort();
        }
        r
    });
    Ok(Running {
        addr,
        admin_addr,
        state,
        task,
    })
}
