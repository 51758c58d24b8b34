//! Tandem's data plane: the OpenAI-compatible front door, the P/D request state machine, the
//! engine clients and the pool control loop.
//!
//! [`start`] is the whole coordinator: give it a validated [`Config`], a bound listener and a shutdown
//! signal. Everything it needs is built here and passed down; there is no global state.

mod error;
mod front;
mod kvfeed;
mod metrics;
mod pd;
mod pool;
mod prefix;
mod rate;
mod relay;
mod route;
mod server;
mod timing;
pub mod trace;
mod upstream;

use std::future::{Future, IntoFuture};
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

pub use error::ProxyError;
pub use metrics::Metrics;
pub use pool::{Resolver, SystemResolver};
pub use tandem_policy::{KV_NEAR_TIE, KV_PLENTY};
pub use timing::RequestRecord;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Tokenizer(#[from] tandem_model::TokenizerError),
    #[error("cannot read chat template {path}: {source}")]
    ChatTemplate {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Deadlines per phase, from the config.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Deadlines {
    pub prefill: Duration,
    pub handoff: Duration,
    pub first_token: Duration,
    pub idle: Duration,
    pub lease: Duration,
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
    /// Requests in the admission queue now.
    pub admission_waiting: std::sync::atomic::AtomicU32,
    /// Tie-breaking and random policies; seeded so a run can be replayed.
    pub rng: Mutex<ChaCha8Rng>,
    pub seq: AtomicU64,
    pub recent: Arc<timing::Recent>,
    pub deadlines: Deadlines,
    /// Set when shutdown begins: `/ready` fails from then on.
    pub shutting_down: std::sync::atomic::AtomicBool,
    /// Ties each request span to the client's W3C trace.
    pub trace_link: Arc<dyn trace::TraceLink>,
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
    state: Arc<State>,
    pub task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Running {
    /// The most recent per-request records, oldest first.
    pub fn recent(&self) -> Vec<RequestRecord> {
        self.state.recent.list()
    }
}

fn build(cfg: Config, edges: Edges) -> Result<Arc<State>, StartError> {
    let mut tokenizer = match &cfg.model.tokenizer {
        Some(p) => Tokenizer::from_file(p)?,
        None => Tokenizer::byte_level(),
    };
    if let Some(p) = &cfg.model.chat_template {
        let src = std::fs::read_to_string(p).map_err(|source| StartError::ChatTemplate {
            path: p.display().to_string(),
            source,
        })?;
        tokenizer = tokenizer.with_chat_template(src)?;
    }
    let target = cfg.pools.target_ratio.map(|r| r.value());
    let metrics = Arc::new(Metrics::new(target, cfg.telemetry.metrics));
    let pools = pool::start(&cfg, metrics.clone(), edges.resolver);
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
        admission_waiting: std::sync::atomic::AtomicU32::new(0),
        recent: Arc::new(timing::Recent::new(cfg.server.recent_requests)),
        rng: Mutex::new(ChaCha8Rng::seed_from_u64(0x7a4d_e35e)),
        seq: AtomicU64::new(0),
        tokenizer,
        metrics,
        pools,
        disagg,
        deadlines,
        shutting_down: std::sync::atomic::AtomicBool::new(false),
        trace_link: edges.trace_link,
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
    let grace = Duration::from_secs(cfg.server.shutdown_grace_secs);
    let state = build(cfg, edges)?;
    let app = server::router(state.clone());
    let (began_tx, began_rx) = tokio::sync::oneshot::channel::<()>();
    let st = state.clone();
    // On the signal: fail `/ready`, stop accepting, let in-flight responses finish; after the
    // grace period, return anyway (whatever is still streaming is cut when the process exits).
    let signal = async move {
        shutdown.await;
        st.shutting_down
            .store(true, std::sync::atomic::Ordering::SeqCst);
        tracing::info!(
            grace_s = grace.as_secs(),
            "shutting down: not ready, not accepting, draining"
        );
        let _ = began_tx.send(());
    };
    let task = tokio::spawn(async move {
        let serve = axum::serve(
            // Token chunks are small writes; Nagle plus the peer's delayed ACK would hold
            // some back by ~40 ms. (Python's asyncio, under vLLM, sets TCP_NODELAY too.)
            axum::serve::ListenerExt::tap_io(listener, |tcp| {
                let _ = tcp.set_nodelay(true);
            }),
            app,
        )
        .with_graceful_shutdown(signal)
        .into_future();
        tokio::pin!(serve);
        let deadline = async {
            if began_rx.await.is_ok() {
                tokio::time::sleep(grace).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            r = &mut serve => r,
            _ = deadline => {
                tracing::warn!("grace period over with responses still in flight; closing them");
                Ok(())
            }
        }
    });
    Ok(Running { addr, state, task })
}
