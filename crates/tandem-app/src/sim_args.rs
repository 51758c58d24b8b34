//! `tandem sim` flags. Names follow vLLM's where vLLM has the same knob.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use tandem_sim::cost::LinkClass;
use tandem_sim::engine::KvLoadFailurePolicy;
use tandem_sim::faults::FaultSpec;
use tandem_sim::kv_events::KvEventsConfig;
use tandem_sim::nixl::KvTransport;
use tandem_sim::profile::GpuKind;
use tandem_sim::{SimConfig, SimError};

#[derive(Debug, Args)]
pub struct SimArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// HTTP port; 0 picks a free one (the bound address is printed on the ready line).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Also serve vLLM's native gRPC (`vllm.Inference`, `vllm.Control`, health) on this port of
    /// `--host`; 0 picks a free one (printed as `grpc` on the ready line). Absent: no gRPC.
    #[arg(long)]
    grpc_port: Option<u16>,
    /// Model profile: llama-3.1-8b, llama-3.1-70b, qwen3-32b, qwen3-0.6b (or their HF ids).
    #[arg(long, default_value = "llama-3.1-8b")]
    model: String,
    /// Name served in /v1/models (default: the profile's HF id).
    #[arg(long)]
    served_model_name: Option<String>,
    /// GPU: h100 or h200.
    #[arg(long, default_value = "h100", value_parser = parse_gpu)]
    gpu: GpuKind,
    /// Tensor parallel size (default: the profile's).
    #[arg(long = "tensor-parallel-size", visible_alias = "tp")]
    tp: Option<u32>,
    /// HuggingFace tokenizer.json, or a model directory holding tokenizer.json and
    /// tokenizer_config.json (chat template, special tokens, EOS) (default: a built-in byte-level
    /// tokenizer).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Jinja chat template file (default: the model's from tokenizer_config.json, else a simple
    /// `<|role|>` template).
    #[arg(long)]
    chat_template: Option<PathBuf>,
    /// Seed for sampled tokens and request-id suffixes.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Simulated seconds per real second: 10 runs the simulated clock ten times faster, with the
    /// same queueing dynamics. Metrics report simulated time.
    #[arg(long, default_value_t = 1.0)]
    time_scale: f64,
    #[arg(long, default_value_t = 16)]
    block_size: u32,
    /// Override the number of KV blocks derived from GPU memory.
    #[arg(long = "num-gpu-blocks-override")]
    num_gpu_blocks: Option<u32>,
    #[arg(long, default_value_t = 0.9)]
    gpu_memory_utilization: f64,
    #[arg(long, default_value_t = 256)]
    max_num_seqs: usize,
    #[arg(long, default_value_t = 8192)]
    max_num_batched_tokens: usize,
    #[arg(long)]
    max_model_len: Option<u32>,
    #[arg(long)]
    no_enable_prefix_caching: bool,
    /// GiB of host memory for offloaded KV blocks (vLLM's `--kv-offloading-size`): a CPU tier
    /// behind the GPU prefix cache, reported in KV events with medium "CPU".
    #[arg(long)]
    kv_offloading_size: Option<f64>,
    /// Offloading backend (vLLM's `--kv-offloading-backend`); only `native` is simulated.
    #[arg(long, default_value = "native", value_parser = ["native"])]
    kv_offloading_backend: String,
    /// Seeds the block-hash chain (vLLM's PYTHONHASHSEED); random when unset.
    #[arg(long, env = "PYTHONHASHSEED")]
    hash_seed: Option<String>,
    /// Publish KV events on this ZMQ PUB endpoint, e.g. tcp://127.0.0.1:0 (vLLM: tcp://*:5557).
    #[arg(long)]
    kv_events_endpoint: Option<String>,
    /// ZMQ ROUTER endpoint for KV event replay.
    #[arg(long)]
    kv_events_replay_endpoint: Option<String>,
    #[arg(long, default_value = "")]
    kv_events_topic: String,
    /// NIXL side-channel host put in kv_transfer_params (VLLM_NIXL_SIDE_CHANNEL_HOST).
    #[arg(long, env = "VLLM_NIXL_SIDE_CHANNEL_HOST", default_value = "127.0.0.1")]
    side_channel_host: String,
    /// NIXL side-channel port; 0 picks a free one (VLLM_NIXL_SIDE_CHANNEL_PORT, vLLM default 5600).
    #[arg(long, env = "VLLM_NIXL_SIDE_CHANNEL_PORT", default_value_t = 0)]
    side_channel_port: u16,
    /// NIXL engine id (default: a random UUID).
    #[arg(long)]
    engine_id: Option<String>,
    /// Seconds pinned prefill blocks wait for a read (VLLM_NIXL_ABORT_REQUEST_TIMEOUT), simulated time.
    #[arg(long, env = "VLLM_NIXL_ABORT_REQUEST_TIMEOUT", default_value_t = 480.0)]
    nixl_abort_timeout: f64,
    /// What a decode engine does when a KV load fails: fail or recompute.
    #[arg(long, default_value = "fail", value_parser = parse_policy)]
    kv_load_failure_policy: KvLoadFailurePolicy,
    /// Seconds each NIXL side-channel call (handshake, read, notification) may take.
    #[arg(long, default_value_t = 5.0)]
    nixl_handshake_timeout: f64,
    /// Link class of this engine's NIC, which its concurrent KV transfers share: nvlink, rdma400,
    /// rdma100, tcp.
    #[arg(long, default_value = "rdma400", value_parser = parse_link)]
    kv_link: LinkClass,
    /// Probability that a sampled token is EOS (0 = generate to max_tokens).
    #[arg(long, default_value_t = 0.0)]
    eos_rate: f64,
    #[arg(long)]
    enable_prompt_tokens_details: bool,
    /// The most `logprobs` / `top_logprobs` / `prompt_logprobs` a request may ask for (vLLM's
    /// `--max-logprobs`; -1 = the vocabulary size).
    #[arg(long, default_value_t = 20, allow_negative_numbers = true)]
    max_logprobs: i64,
    #[arg(long, env = "VLLM_DISABLE_REQUEST_ID_RANDOMIZATION", value_parser = parse_env_bool, default_value = "0")]
    disable_request_id_randomization: bool,
    /// Fault: fail the next N requests with 500.
    #[arg(long)]
    fault_fail_next: Option<u64>,
    /// Fault: accept the next N requests and never answer.
    #[arg(long)]
    fault_stall_next: Option<u64>,
    /// Fault: cut every response after N tokens.
    #[arg(long)]
    fault_die_after_tokens: Option<u64>,
    /// Fault: refuse the next N KV reads (prefill side).
    #[arg(long)]
    fault_kv_refuse_next: Option<u64>,
    /// Fault: corrupt the next N KV reads (prefill side).
    #[arg(long)]
    fault_kv_corrupt_next: Option<u64>,
    /// Fault: never answer NIXL handshakes.
    #[arg(long)]
    fault_handshake_stall: bool,
    /// Fault: delay each request by this many milliseconds before accepting it.
    #[arg(long)]
    fault_slow_accept_ms: Option<u64>,
    /// Fault: hold every free KV block.
    #[arg(long)]
    fault_exhaust_kv: bool,
    /// Fault: the next N requests sample EOS first.
    #[arg(long)]
    fault_eos_next: Option<u64>,
    /// Fault: advertise the NIXL side channel in kv_transfer_params but close it right after
    /// start, so decode engines cannot reach it.
    #[arg(long)]
    fault_side_channel_down: bool,
    /// How KV bytes move to a decode engine: `tcp` (the side channel carries a digest per
    /// block) or `nixl` (real NIXL READs of registered host memory over UCX; needs a build with
    /// feature `nixl` and the NIXL libraries on LD_LIBRARY_PATH / NIXL_PLUGIN_DIR).
    #[arg(long, default_value = "tcp", value_parser = parse_transport)]
    kv_transport: KvTransport,
    /// With `--kv-transport nixl`: bytes of one block in one layer region, the scaled-down
    /// stand-in of the modeled block (the timing model still charges the modeled size).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(32..))]
    nixl_block_bytes: u32,
    /// Run as vLLM does without `--kv-transfer-config`: kv_transfer_params are ignored and
    /// every prompt is prefilled locally.
    #[arg(long)]
    no_kv_connector: bool,
    /// KV cache dtype (vLLM's `--kv-cache-dtype`), a NIXL compatibility-hash factor.
    #[arg(long, default_value = "auto")]
    kv_cache_dtype: String,
    /// Attention backend name, a NIXL compatibility-hash factor.
    #[arg(long, env = "VLLM_ATTENTION_BACKEND", default_value = "FLASH_ATTN")]
    attention_backend: String,
}

fn parse_transport(s: &str) -> Result<KvTransport, String> {
    KvTransport::parse(s).ok_or_else(|| format!("unknown KV transport `{s}` (tcp, nixl)"))
}

fn parse_gpu(s: &str) -> Result<GpuKind, String> {
    GpuKind::parse(s).ok_or_else(|| format!("unknown GPU `{s}` (h100, h200)"))
}

fn parse_policy(s: &str) -> Result<KvLoadFailurePolicy, String> {
    KvLoadFailurePolicy::parse(s).ok_or_else(|| format!("unknown policy `{s}` (fail, recompute)"))
}

fn parse_link(s: &str) -> Result<LinkClass, String> {
    LinkClass::parse(s).ok_or_else(|| format!("unknown link `{s}` (nvlink, rdma400, rdma100, tcp)"))
}

fn parse_env_bool(s: &str) -> Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" => Ok(true),
        "0" | "false" | "no" | "" => Ok(false),
        _ => Err(format!("expected 0 or 1, got `{s}`")),
    }
}

impl SimArgs {
    pub fn into_config(self) -> Result<(String, u16, SimConfig), SimError> {
        if !(self.nixl_abort_timeout >= 0.0 && self.nixl_abort_timeout.is_finite()) {
            return Err(SimError::Config(format!(
                "--nixl-abort-timeout must be a non-negative number, got {}",
                self.nixl_abort_timeout
            )));
        }
        let mut c = SimConfig::new(&self.model, self.gpu);
        c.served_model_name = self.served_model_name;
        c.tp = self.tp;
        c.tokenizer = self.tokenizer;
        c.chat_template = self.chat_template;
        c.seed = self.seed;
        c.time_scale = self.time_scale;
        c.block_size = self.block_size;
        c.num_gpu_blocks_override = self.num_gpu_blocks;
        c.gpu_memory_utilization = self.gpu_memory_utilization;
        c.max_num_seqs = self.max_num_seqs;
        c.max_num_batched_tokens = self.max_num_batched_tokens;
        c.max_model_len = self.max_model_len;
        c.enable_prefix_caching = !self.no_enable_prefix_caching;
        c.kv_offloading_size_gib = self.kv_offloading_size;
        c.hash_seed = self.hash_seed;
        c.kv_events = self.kv_events_endpoint.map(|endpoint| KvEventsConfig {
            endpoint,
            replay_endpoint: self.kv_events_replay_endpoint,
            topic: self.kv_events_topic,
            ..KvEventsConfig::default()
        });
        c.side_channel_host = self.side_channel_host;
        c.side_channel_port = self.side_channel_port;
        c.engine_id = self.engine_id;
        c.nixl_abort_timeout = Duration::from_secs_f64(self.nixl_abort_timeout);
        c.kv_load_failure_policy = self.kv_load_failure_policy;
        c.link = self.kv_link;
        if !(self.nixl_handshake_timeout > 0.0 && self.nixl_handshake_timeout.is_finite()) {
            return Err(SimError::Config(format!(
                "--nixl-handshake-timeout must be positive, got {}",
                self.nixl_handshake_timeout
            )));
        }
        c.side_channel_timeout = Duration::from_secs_f64(self.nixl_handshake_timeout);
        c.eos_rate = self.eos_rate;
        c.enable_prompt_tokens_details = self.enable_prompt_tokens_details;
        c.max_logprobs = self.max_logprobs;
        c.disable_request_id_randomization = self.disable_request_id_randomization;
        c.grpc_port = self.grpc_port;
        c.kv_transport = self.kv_transport;
        c.nixl_block_bytes = self.nixl_block_bytes;
        c.no_kv_connector = self.no_kv_connector;
        c.kv_cache_dtype = self.kv_cache_dtype;
        c.attention_backend = self.attention_backend;
        c.side_channel_down = self.fault_side_channel_down;
        c.faults = FaultSpec {
            fail_next: self.fault_fail_next,
            stall_next: self.fault_stall_next,
            die_after_tokens: self.fault_die_after_tokens,
            kv_refuse_next: self.fault_kv_refuse_next,
            kv_corrupt_next: self.fault_kv_corrupt_next,
            handshake_stall: self.fault_handshake_stall.then_some(true),
            slow_accept_ms: self.fault_slow_accept_ms,
            exhaust_kv: self.fault_exhaust_kv.then_some(true),
            eos_next: self.fault_eos_next,
        };
        Ok((self.host, self.port, c))
    }
}

/// Start the engine, print the ready line on stdout, serve until Ctrl-C.
pub async fn run(args: SimArgs) -> Result<(), Box<dyn std::error::Error>> {
    let (host, port, cfg) = args.into_config()?;
    let listener = tokio::net::TcpListener::bind((host.as_str(), port)).await?;
    let shutdown = async {
        // If the signal handler cannot be installed, run until killed.
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let sim = tandem_sim::start(cfg, listener, shutdown).await?;
    println!("{}", sim.ready_line());
    sim.wait().await?;
    Ok(())
}
