//! The engine's public request and event types, and its configuration.

use std::sync::Arc;
use std::time::Duration;

use super::transfer::RemoteKv;
use crate::cost::{CostModel, LinkClass};
use crate::scheduler::{FinishReason, SchedulerConfig};
use crate::side_channel::CompatFactors;

/// What to do when a decode-side KV load fails (vLLM's `kv_load_failure_policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvLoadFailurePolicy {
    Fail,
    Recompute,
}

impl KvLoadFailurePolicy {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "fail" => Some(Self::Fail),
            "recompute" => Some(Self::Recompute),
            _ => None,
        }
    }
}

/// Everything the engine task needs, resolved at start-up.
#[derive(Debug)]
pub struct EngineConfig {
    pub served_model_name: String,
    pub cost: CostModel,
    pub sched: SchedulerConfig,
    /// Simulated seconds per real second.
    pub time_scale: f64,
    pub seed: u64,
    pub eos_ppm: u32,
    /// This engine's NIXL engine id and side-channel address, as put in `kv_transfer_params`.
    pub engine_id: String,
    pub side_channel_host: String,
    pub side_channel_port: u16,
    pub tp_size: u32,
    pub compat: CompatFactors,
    /// Prefill side: how long pinned blocks wait for a read notification (simulated time).
    pub abort_timeout: Duration,
    pub kv_load_failure_policy: KvLoadFailurePolicy,
    /// Link class of this engine's NIC: its pulls (decode) and answered reads (prefill) share it.
    pub link: LinkClass,
    /// Real-time limit for each side-channel call (vLLM's handshake uses 5 s).
    pub side_channel_timeout: Duration,
    /// Pooled side-channel connections (one per engine: the zeromq ROUTER keeps closed peers).
    pub side_client: crate::side_channel::SideChannelClient,
    /// Bytes actually moved per block on the side channel (a stand-in for the modeled size).
    pub kv_bytes_per_token: u64,
    /// This engine's NIXL agent when KV moves over NIXL (`--kv-transport nixl`): decode pulls
    /// READ through it, prefill pins write their blocks into its region.
    pub nixl: Option<crate::nixl::KvNixl>,
    /// Run as vLLM does without a KV connector: `kv_transfer_params` are ignored, every request
    /// is prefilled locally, and a prefill returns no params.
    pub no_kv_connector: bool,
}

/// Sampling and stopping parameters of one request.
#[derive(Debug, Clone)]
pub struct SeqParams {
    pub max_tokens: usize,
    pub min_tokens: usize,
    pub ignore_eos: bool,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub include_stop_str_in_output: bool,
    /// The request's `seed`, else the engine's.
    pub seed: Option<u64>,
    /// Structured output (JSON, a tool call's arguments): per choice index, the exact output
    /// tokens, emitted one per step instead of sampled ones; the sequence stops after the last
    /// (as a grammar that has completed only admits EOS). Built by the HTTP layer.
    pub forced: Option<Forced>,
}

/// Per choice index, the output tokens a constrained request must produce.
pub type Forced = Arc<[Arc<[u32]>]>;

/// Which side of a P/D pair a request is on.
#[derive(Debug, Clone)]
pub enum Role {
    Colocated,
    /// `do_remote_decode`: prefill, return one token and a KV handle.
    Prefill,
    /// `do_remote_prefill` with valid params: pull the KV, then decode.
    Decode(RemoteKv),
}

/// A request as the HTTP layer hands it over.
#[derive(Debug)]
pub struct Submit {
    /// Engine-internal request id (external id plus the random suffix).
    pub internal_id: String,
    pub prompt: Arc<[u32]>,
    pub params: SeqParams,
    pub n: u32,
    pub role: Role,
    /// Simulated arrival time, stamped before the per-request overhead.
    pub arrival: f64,
    /// Take EOS as the first token (the `eos_next` fault).
    pub force_eos_first: bool,
    pub max_tokens_param: u64,
}

/// The KV handle a prefill-role request leaves for the decode engine.
#[derive(Debug, Clone, PartialEq)]
pub struct KvHandle {
    pub block_ids: Vec<u32>,
    pub remote_request_id: String,
    pub num_tokens: usize,
}

/// How a sequence ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Finish {
    pub reason: FinishReason,
    /// The matched stop string or stop token id (vLLM's `stop_reason`).
    pub stop_reason: Option<serde_json::Value>,
    /// Prefill role, length-capped: the pinned KV.
    pub kv: Option<KvHandle>,
    /// Prompt tokens that hit the local prefix cache.
    pub cached_tokens: usize,
}

/// What a request's channel carries.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// One sampled token; the last one of a sequence carries its finish.
    Token {
        index: u32,
        token: u32,
        /// Newly decoded text (may be empty).
        text: String,
        finish: Option<Finish>,
    },
    /// The sequence failed without a token (KV load failure under the `fail` policy).
    Failed { index: u32, error: String },
}
