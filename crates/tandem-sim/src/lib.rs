//! `tandem-sim`: a faithful, GPU-free vLLM engine.
//!
//! # Layout
//!
//! Pure core (no IO, no clock, no spawning; time is an argument):
//! - [`profile`]: model and GPU profiles (H100/H200), KV bytes per token, derived `num_gpu_blocks`.
//! - [`cost`]: the calibrated timing model of `perf-model.md` §2.4 (prefill, decode step, KV transfer).
//! - [`kv_cache`]: the paged KV block pool with prefix caching on full blocks and LRU eviction.
//! - [`scheduler`]: vLLM-style continuous batching (running/waiting queues, chunked prefill, preemption).
//! - [`sampler`]: deterministic output tokens, a function of (seed, prompt, position).
//! - [`link`]: a link whose concurrent transfers share its bandwidth (NIC, PCIe).
//!
//! Edges (IO, clocks, tasks):
//! - [`engine`]: the engine task that owns the scheduler, sleeps the modeled step time and fans out tokens.
//! - [`http`]: vLLM's OpenAI-compatible HTTP surface (axum) plus `/admin/faults`.
//! - [`grpc`]: vLLM's native gRPC surface (`vllm.Inference`, `vllm.Control`, health) on the same engine.
//! - [`side_channel`]: the NIXL-like side channel (ZMQ ROUTER): vLLM's handshake plus a simulated block READ.
//! - [`nixl`]: the engine's real NIXL agent (`--kv-transport nixl`, feature `nixl`): KV stand-in bytes moved by UCX READs.
//! - [`kv_events`]: vLLM's KV-event ZMQ PUB publisher with replay.
//! - [`metrics`]: vLLM's Prometheus metrics, exact names, labels and buckets.
//! - [`faults`]: fault injection state, set by flags or at runtime.

pub mod cost;
pub mod engine;
pub mod faults;
pub mod grpc;
pub mod http;
pub mod kv_cache;
pub mod kv_events;
pub mod link;
pub mod metrics;
pub mod nixl;
pub mod profile;
pub mod sampler;
pub mod scheduler;
pub mod side_channel;
pub mod tokenizer;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::SeedableRng;

use crate::cost::{CostModel, LinkClass};
use crate::engine::{EngineConfig, EngineHandle, KvLoadFailurePolicy};
use crate::faults::{FaultSpec, Faults};
use crate::kv_events::{KvEventPublisher, KvEventsConfig};
use crate::metrics::{CacheConfigInfo, EngineMetrics};
use crate::profile::{GpuKind, Profile};
use crate::scheduler::SchedulerConfig;
use crate::side_channel::{CompatFactors, HandshakeInfo, SideChannelHandle, SideChannelServer};
use crate::tokenizer::SimTokenizer;

/// The simulator's own vLLM version string, part of the NIXL compatibility hash.
pub const VLLM_VERSION: &str = "0.11.0+tandem-sim";

/// Everything a simulated engine is started with (the `tandem sim` flags, resolved).
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Profile key or HF id, e.g. `llama-3.1-8b`.
    pub model: String,
    /// Name served in `/v1/models` and checked against `model`; defaults to the profile's HF id.
    pub served_model_name: Option<String>,
    pub gpu: GpuKind,
    pub tp: Option<u32>,
    /// HF `tokenizer.json` or a model directory holding it and `tokenizer_config.json`
    /// ([`tandem_model::Tokenizer::load`]); `None` = the byte-level tokenizer.
    pub tokenizer: Option<PathBuf>,
    /// Chat template file overriding the model's.
    pub chat_template: Option<PathBuf>,
    pub seed: u64,
    /// Simulated seconds per real second (1 = real time).
    pub time_scale: f64,
    pub block_size: u32,
    pub num_gpu_blocks_override: Option<u32>,
    pub gpu_memory_utilization: f64,
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    pub max_model_len: Option<u32>,
    pub enable_prefix_caching: bool,
    /// Host memory for the KV offloading tier, GiB (vLLM's `--kv-offloading-size`); `None` = no
    /// tier.
    pub kv_offloading_size_gib: Option<f64>,
    /// `PYTHONHASHSEED`: seeds `NONE_HASH`; random when unset, as in vLLM.
    pub hash_seed: Option<String>,
    /// KV events; `None` disables them.
    pub kv_events: Option<KvEventsConfig>,
    pub side_channel_host: String,
    pub side_channel_port: u16,
    pub engine_id: Option<String>,
    /// `VLLM_NIXL_ABORT_REQUEST_TIMEOUT`, simulated seconds.
    pub nixl_abort_timeout: Duration,
    pub kv_load_failure_policy: KvLoadFailurePolicy,
    /// Real-time limit for each NIXL side-channel call (vLLM's handshake uses 5 s).
    pub side_channel_timeout: Duration,
    pub link: LinkClass,
    pub eos_rate: f64,
    pub enable_prompt_tokens_details: bool,
    /// vLLM's `--max-logprobs` (default 20; -1 = the vocabulary size).
    pub max_logprobs: i64,
    pub disable_request_id_randomization: bool,
    pub faults: FaultSpec,
    /// Serve vLLM's native gRPC on this port of the HTTP listener's address (0: a free one);
    /// `None`: no gRPC server.
    pub grpc_port: Option<u16>,
    /// How KV bytes move between engines: the TCP stand-in, or real NIXL (feature `nixl`).
    pub kv_transport: nixl::KvTransport,
    /// With NIXL: bytes of one block in one layer region (the scaled-down stand-in of the
    /// modeled block; at least 32).
    pub nixl_block_bytes: u32,
    /// Run without a KV connector (vLLM without `--kv-transfer-config`): `kv_transfer_params`
    /// are ignored and every prompt is prefilled locally.
    pub no_kv_connector: bool,
    /// vLLM's `--kv-cache-dtype` (a compatibility-hash factor).
    pub kv_cache_dtype: String,
    /// The attention backend's name (a compatibility-hash factor; vLLM's
    /// `VLLM_ATTENTION_BACKEND`).
    pub attention_backend: String,
    /// Fault: advertise the side channel but close it right after start (an unreachable side
    /// channel: connections are refused).
    pub side_channel_down: bool,
}

impl SimConfig {
    /// Defaults matching vLLM's where vLLM has one (documented on each flag of `tandem sim`).
    pub fn new(model: &str, gpu: GpuKind) -> Self {
        SimConfig {
            model: model.to_string(),
            served_model_name: None,
            gpu,
            tp: None,
            tokenizer: None,
            chat_template: None,
            seed: 0,
            time_scale: 1.0,
            block_size: 16,
            num_gpu_blocks_override: None,
            gpu_memory_utilization: 0.9,
            max_num_seqs: 256,
            max_num_batched_tokens: 8192,
            max_model_len: None,
            enable_prefix_caching: true,
            kv_offloading_size_gib: None,
            hash_seed: None,
            kv_events: None,
            side_channel_host: "127.0.0.1".into(),
            side_channel_port: 0,
            engine_id: None,
            nixl_abort_timeout: Duration::from_secs(480),
            kv_load_failure_policy: KvLoadFailurePolicy::Fail,
            side_channel_timeout: Duration::from_secs(5),
            link: LinkClass::Rdma400,
            eos_rate: 0.0,
            enable_prompt_tokens_details: false,
            max_logprobs: 20,
            disable_request_id_randomization: false,
            faults: FaultSpec::default(),
            grpc_port: None,
            kv_transport: nixl::KvTransport::Tcp,
            nixl_block_bytes: 64,
            no_kv_connector: false,
            kv_cache_dtype: "auto".into(),
            attention_backend: "FLASH_ATTN".into(),
            side_channel_down: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error(transparent)]
    Profile(#[from] profile::ProfileError),
    #[error(transparent)]
    Tokenizer(#[from] tokenizer::TokenizerError),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("KV events: {0}")]
    KvEvents(#[from] kv_events::KvEventsError),
    #[error("side channel: {0}")]
    SideChannel(#[from] side_channel::SideChannelError),
    #[error("HTTP server: {0}")]
    Io(#[from] std::io::Error),
}

/// A running simulated engine. Dropping it does not stop it; await [`RunningSim::wait`] or
/// resolve the shutdown future given to [`start`].
#[derive(Debug)]
pub struct RunningSim {
    pub http_addr: SocketAddr,
    /// The gRPC server's bound address, when `grpc_port` was given.
    pub grpc_addr: Option<SocketAddr>,
    pub side_channel_endpoint: String,
    pub kv_events_endpoint: Option<String>,
    pub kv_events_replay_endpoint: Option<String>,
    pub engine_id: String,
    pub num_gpu_blocks: u32,
    /// Blocks of the host-memory KV tier (`--kv-offloading-size`); 0 without one.
    pub num_host_blocks: u32,
    pub served_model_name: String,
    pub engine: EngineHandle,
    /// `nixl` or `tcp`.
    pub kv_transport: &'static str,
    /// The engine's NIXL agent name, with `--kv-transport nixl`.
    pub nixl_agent: Option<String>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    grpc: Option<tokio::task::JoinHandle<Result<(), tonic::transport::Error>>>,
    _side: Option<SideChannelHandle>,
}

impl RunningSim {
    /// The machine-readable ready line printed by `tandem sim`.
    pub fn ready_line(&self) -> String {
        serde_json::json!({
            "ready": "tandem-sim",
            "http": format!("http://{}", self.http_addr),
            "grpc": self.grpc_addr.map(|a| a.to_string()),
            "side_channel": self.side_channel_endpoint,
            "kv_events": self.kv_events_endpoint,
            "kv_events_replay": self.kv_events_replay_endpoint,
            "engine_id": self.engine_id,
            "model": self.served_model_name,
            "num_gpu_blocks": self.num_gpu_blocks,
            "num_host_blocks": self.num_host_blocks,
            "kv_transport": self.kv_transport,
            "nixl_agent": self.nixl_agent,
        })
        .to_string()
    }

    /// Wait until the HTTP server (and the gRPC server, if any) stops.
    pub async fn wait(self) -> Result<(), SimError> {
        match self.server.await {
            Ok(r) => r.map_err(SimError::Io)?,
            Err(e) => return Err(SimError::Config(format!("server task failed: {e}"))),
        }
        match self.grpc {
            None => Ok(()),
            Some(g) => match g.await {
                Ok(r) => r.map_err(|e| SimError::Io(std::io::Error::other(e))),
                Err(e) => Err(SimError::Config(format!("gRPC server task failed: {e}"))),
            },
        }
    }
}

/// Start a simulated engine on an already-bound listener.
pub async fn start(
    cfg: SimConfig,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<RunningSim, SimError> {
    if !(cfg.time_scale > 0.0 && cfg.time_scale.is_finite()) {
        return Err(SimError::Config(format!(
            "--time-scale must be a positive number, got {}",
            cfg.time_scale
        )));
    }
    if cfg.block_size == 0 || cfg.max_num_seqs == 0 || cfg.max_num_batched_tokens == 0 {
        return Err(SimError::Config(
            "block size, max_num_seqs and max_num_batched_tokens must be positive".into(),
        ));
    }
    if !(0.0..=1.0).contains(&cfg.eos_rate) {
        return Err(SimError::Config(format!(
            "--eos-rate must be within 0..=1, got {}",
            cfg.eos_rate
        )));
    }
    let mut profile = Profile::new(&cfg.model, cfg.gpu, cfg.tp)?;
    profile.gpu_memory_utilization = cfg.gpu_memory_utilization;
    let num_gpu_blocks = cfg
        .num_gpu_blocks_override
        .unwrap_or_else(|| profile.num_gpu_blocks(cfg.block_size));
    if num_gpu_blocks == 0 {
        return Err(SimError::Config(format!(
            "{} does not fit on {} x{}: no memory left for KV cache",
            profile.model.name,
            cfg.gpu.name(),
            profile.tp
        )));
    }
    let num_host_blocks = host_tier_blocks(cfg.kv_offloading_size_gib, &profile, cfg.block_size)?;
    let max_model_len = cfg.max_model_len.unwrap_or(profile.model.max_model_len);
    let served = cfg
        .served_model_name
        .clone()
        .unwrap_or_else(|| profile.model.served_name.to_string());
    // Compiles the chat template and renders a plain conversation with it (start-up check).
    let tokenizer = Arc::new(SimTokenizer::load(
        cfg.tokenizer.as_deref(),
        cfg.chat_template.as_deref(),
    )?);
    let engine_id = cfg
        .engine_id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let hash_seed = cfg
        .hash_seed
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let cache_info = CacheConfigInfo {
        block_size: cfg.block_size,
        num_gpu_blocks,
        gpu_memory_utilization: cfg.gpu_memory_utilization,
        cache_dtype: cfg.kv_cache_dtype.clone(),
        enable_prefix_caching: cfg.enable_prefix_caching,
        prefix_caching_hash_algo: "sha256_cbor".into(),
    };
    let metrics = Arc::new(EngineMetrics::new(&served, "0", max_model_len, &cache_info));
    let faults = Faults::new(&cfg.faults);
    let (events, kv_bound) = match &cfg.kv_events {
        Some(k) => {
            let (p, b) = KvEventPublisher::start(k.clone()).await?;
            (Some(p), Some(b))
        }
        None => (None, None),
    };
    let compat = CompatFactors {
        vllm_version: VLLM_VERSION.into(),
        nixl_connector_version: 2,
        model: served.clone(),
        dtype: "bfloat16".into(),
        num_kv_heads: profile.model.num_kv_heads,
        head_size: profile.model.head_dim,
        num_hidden_layers: profile.model.num_layers,
        attn_backend_name: cfg.attention_backend.clone(),
        cache_dtype: cfg.kv_cache_dtype.clone(),
    };
    let kv_bytes_per_token = profile.kv_bytes_per_token();
    let tp = profile.tp;
    let (side_tx, side_rx) = tokio::sync::mpsc::channel(256);
    let nixl = start_nixl(
        &cfg,
        &engine_id,
        profile.model.num_layers,
        num_gpu_blocks,
        &side_tx,
    )
    .await?;
    // Reserve the side-channel port first so it can go into kv_transfer_params.
    let (side, side_endpoint) = SideChannelServer::start(
        &format!("tcp://{}:{}", cfg.side_channel_host, cfg.side_channel_port),
        HandshakeInfo {
            engine_id: engine_id.clone(),
            tp_size: tp,
            num_blocks: num_gpu_blocks,
            block_size: cfg.block_size,
            block_len_bytes: kv_bytes_per_token / u64::from(profile.model.num_layers)
                * u64::from(cfg.block_size),
            factors: compat.clone(),
            nixl: nixl.as_ref().map(nixl::KvNixl::advert),
        },
        side_tx,
        faults.handshake_stall_flag(),
    )
    .await?;
    let side_port = side_endpoint
        .rsplit(':')
        .next()
        .and_then(|p| p.parse::<u16>().ok())
        .ok_or_else(|| {
            SimError::Config(format!(
                "cannot parse side channel endpoint {side_endpoint}"
            ))
        })?;
    let side = if cfg.side_channel_down {
        // The port stays advertised in kv_transfer_params; connecting to it is refused.
        side.shutdown().await;
        None
    } else {
        Some(side)
    };
    let side_client = side_channel::SideChannelClient::new();
    let engine = engine::spawn(
        EngineConfig {
            served_model_name: served.clone(),
            cost: CostModel::new(profile.clone()),
            sched: SchedulerConfig {
                max_num_seqs: cfg.max_num_seqs,
                max_num_batched_tokens: cfg.max_num_batched_tokens,
                block_size: cfg.block_size,
                num_gpu_blocks,
                root_hash: kv_cache::none_hash(&hash_seed),
                enable_prefix_caching: cfg.enable_prefix_caching,
                num_host_blocks,
                // The side channel and NIXL serve these contents and the decode side checks them.
                kv_content: true,
            },
            time_scale: cfg.time_scale,
            seed: cfg.seed,
            eos_ppm: (cfg.eos_rate * 1e6).round() as u32,
            engine_id: engine_id.clone(),
            side_channel_host: cfg.side_channel_host.clone(),
            side_channel_port: side_port,
            tp_size: tp,
            compat,
            abort_timeout: cfg.nixl_abort_timeout,
            kv_load_failure_policy: cfg.kv_load_failure_policy,
            link: cfg.link,
            side_channel_timeout: cfg.side_channel_timeout,
            side_client: side_client.clone(),
            kv_bytes_per_token,
            nixl: nixl.clone(),
            no_kv_connector: cfg.no_kv_connector,
        },
        tokenizer.clone(),
        metrics.clone(),
        events,
        faults.clone(),
    );
    engine.serve_side(side_rx);
    let state = Arc::new(http::AppState {
        engine: engine.clone(),
        tokenizer,
        metrics,
        faults,
        info: http::HttpInfo {
            served_model_name: served.clone(),
            max_model_len,
            enable_prompt_tokens_details: cfg.enable_prompt_tokens_details,
            engine_id: engine_id.clone(),
            side_channel_host: cfg.side_channel_host.clone(),
            side_channel_port: side_port,
            tp_size: tp,
            side_channel_timeout: cfg.side_channel_timeout,
            disable_request_id_randomization: cfg.disable_request_id_randomization,
            seed: cfg.seed,
            max_logprobs: cfg.max_logprobs,
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        },
        side_client,
        rng: Mutex::new(rand_chacha::ChaCha8Rng::seed_from_u64(cfg.seed)),
        seen: http::Seen::default(),
    });
    let http_addr = listener.local_addr()?;
    // Both servers stop on the one shutdown signal.
    let shutdown = futures::FutureExt::shared(futures::FutureExt::boxed(shutdown));
    let (grpc_addr, grpc) = match cfg.grpc_port {
        None => (None, None),
        Some(port) => {
            let l = tokio::net::TcpListener::bind((http_addr.ip(), port)).await?;
            let addr = l.local_addr()?;
            let info = grpc::GrpcInfo {
                model_id: profile.model.served_name.to_string(),
                block_size: cfg.block_size,
                num_gpu_blocks,
                max_num_seqs: cfg.max_num_seqs,
                max_num_batched_tokens: cfg.max_num_batched_tokens,
                kv_events: cfg.kv_events.as_ref().zip(kv_bound.as_ref()).map(|(c, b)| {
                    grpc::KvEventSourceInfo {
                        endpoint: b.endpoint.clone(),
                        replay_endpoint: b.replay_endpoint.clone(),
                        topic: c.topic.clone(),
                        buffer_steps: c.buffer_steps,
                        data_parallel_rank: c.data_parallel_rank,
                    }
                }),
            };
            let task = grpc::spawn(state.clone(), info, l, shutdown.clone());
            (Some(addr), Some(task))
        }
    };
    let app = http::router(state);
    let server = tokio::spawn(async move {
        axum::serve(
            // Token chunks are small writes; Nagle plus the peer's delayed ACK would hold
            // some back by ~40 ms. (Python's asyncio, under vLLM, sets TCP_NODELAY too.)
            axum::serve::ListenerExt::tap_io(listener, |tcp| {
                let _ = tcp.set_nodelay(true);
            }),
            app,
        )
        .with_graceful_shutdown(shutdown)
        .await
    });
    Ok(RunningSim {
        http_addr,
        grpc_addr,
        side_channel_endpoint: side_endpoint,
        kv_events_endpoint: kv_bound.as_ref().map(|b| b.endpoint.clone()),
        kv_events_replay_endpoint: kv_bound.and_then(|b| b.replay_endpoint),
        engine_id,
        num_gpu_blocks,
        num_host_blocks,
        served_model_name: served,
        engine,
        kv_transport: cfg.kv_transport.name(),
        nixl_agent: nixl.as_ref().map(|n| n.agent_name().to_string()),
        server,
        grpc,
        _side: side,
    })
}

/// With `--kv-transport nixl`: the engine's agent over a region shaped like its KV cache, and
/// a task that hands the notifications it receives (`"{remote_request_id}:{world_size}"`) to
/// the engine as the side channel's notifications are.
async fn start_nixl(
    cfg: &SimConfig,
    engine_id: &str,
    layers: u32,
    num_blocks: u32,
    side_tx: &tokio::sync::mpsc::Sender<side_channel::SideRequest>,
) -> Result<Option<nixl::KvNixl>, SimError> {
    if cfg.kv_transport != nixl::KvTransport::Nixl {
        return Ok(None);
    }
    let layout = tandem_nixl::Layout {
        layers,
        num_blocks,
        block_len: cfg.nixl_block_bytes as usize,
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, String)>();
    let agent = nixl::KvNixl::start(engine_id, layout, tx)
        .await
        .map_err(|e| SimError::Config(format!("--kv-transport nixl: {e}")))?;
    let side_tx = side_tx.clone();
    tokio::spawn(async move {
        while let Some((from, msg)) = rx.recv().await {
            // vLLM: `req_id, tp_size = notif.decode().rsplit(":", 1)`.
            let Some((id, ws)) = msg.rsplit_once(':') else {
                tracing::warn!("NIXL notification from {from} is not \"id:world_size\": {msg:?}");
                continue;
            };
            let (reply, _) = tokio::sync::oneshot::channel();
            let req = side_channel::SideRequest::Notify {
                remote_request_id: id.to_string(),
                world_size: ws.parse().unwrap_or(1),
                reply,
            };
            if side_tx.send(req).await.is_err() {
                return;
            }
        }
    });
    Ok(Some(agent))
}

/// Blocks of the host-memory tier for `--kv-offloading-size` GiB: whole blocks of the instance's
/// KV bytes per token (as vLLM's CPU offloading spec divides `cpu_bytes_to_use`).
fn host_tier_blocks(gib: Option<f64>, profile: &Profile, block_size: u32) -> Result<u32, SimError> {
    let Some(gib) = gib else {
        return Ok(0);
    };
    if !(gib >= 0.0 && gib.is_finite()) {
        return Err(SimError::Config(format!(
            "--kv-offloading-size must be a non-negative number of GiB, got {gib}"
        )));
    }
    let block_bytes = profile.kv_bytes(u64::from(block_size)) as f64;
    let blocks = (gib * (1u64 << 30) as f64 / block_bytes).floor();
    u32::try_from(blocks as u64).map_err(|_| {
        SimError::Config(format!(
            "--kv-offloading-size {gib} GiB is more than {} blocks",
            u32::MAX
        ))
    })
}
