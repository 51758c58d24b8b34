//! The NIXL-like side channel a (simulated) prefill engine serves, and its client.
//!
//! Server: a ZMQ ROUTER at `tcp://HOST:PORT`; every request is one msgpack frame from a REQ client
//! (the ROUTER sees `[identity, b"", msg]` and answers `[identity, b"", reply]`):
//! 1. vLLM's handshake (protocol spec §1.6), exact: `[bin(b"get_meta_msg"), tp_rank]` answered with
//!    `msgpack(NixlHandshakePayload)`, a map `{compatibility_hash: str, agent_metadata_bytes: bin}`
//!    whose bytes are the map-encoded `NixlAgentMetadata` v2;
//! 2. `[bin(b"tandem_read"), remote_request_id, [block_ids]]`: the simulated RDMA READ, answered
//!    `{"ok": true, "blocks": [bin, ...]}` or `{"ok": false, "error": str}`;
//! 3. `[bin(b"tandem_notif"), "<remote_request_id>:<world_size>"]`: the simulated NIXL notification
//!    (vLLM's payload format), answered `{"ok": true}` or `{"ok": false, "error": str}`;
//! 4. `[bin(b"tandem_grant"), remote_request_id, [block_ids]]`: with real NIXL (`--kv-transport
//!    nixl`) the bytes move by a one-sided NIXL READ, so this is only the prefill side's say in
//!    it: the read faults (refuse, corrupt) and its modeled NIC time apply here, as they do to a
//!    `tandem_read`, and it is answered `{"ok": true, "blocks": []}` once the blocks are in the
//!    registered region. vLLM has no such message; a real prefill engine is read without one.
//!
//! The server knows no engine state: reads and notifications go to the engine over an mpsc with a
//! oneshot for the answer. Differences from vLLM, on purpose: an unknown `tp_rank` or an
//! unparseable request gets an error map (vLLM only logs a warning and never answers, so its client
//! waits out the 5 s timeout); our clients fail fast instead.

use std::fmt::Write as _;
use std::time::Duration;

use rmpv::Value;
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;

mod client;
mod server;
#[cfg(test)]
mod tests;

pub use client::{handshake, notify, read_blocks, SideChannelClient};
pub use server::{SideChannelHandle, SideChannelServer};

/// vLLM's `GET_META_MSG`.
pub const GET_META_MSG: &[u8] = b"get_meta_msg";
/// Tag of the simulated block READ.
pub const TANDEM_READ_MSG: &[u8] = b"tandem_read";
/// Tag of the simulated NIXL notification.
pub const TANDEM_NOTIF_MSG: &[u8] = b"tandem_notif";
/// Tag of the read grant that precedes a real NIXL READ (module docs, item 4).
pub const TANDEM_GRANT_MSG: &[u8] = b"tandem_grant";
/// The `NixlAgentMetadata` layout served here is v2's (`NIXL_CONNECTOR_VERSION = 2`).
pub const NIXL_CONNECTOR_VERSION: u32 = 2;
/// vLLM's handshake `RCVTIMEO`.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_millis(5000);
/// The layout NixlConnector requires.
pub const KV_CACHE_LAYOUT: &str = "HND";

/// Errors of the side-channel server and clients.
#[derive(Debug, thiserror::Error)]
pub enum SideChannelError {
    /// No reply within the per-call timeout. A dead or unreachable server also ends up here:
    /// like libzmq's lazy connect, the zeromq crate retries a refused connection until cancelled.
    #[error("side-channel call timed out")]
    Timeout,
    /// The endpoint is unusable, or the connection failed or dropped mid-call.
    #[error("side-channel connection failed: {0}")]
    Connect(String),
    /// The server could not bind.
    #[error("side-channel bind failed: {0}")]
    Bind(String),
    /// The peer answered something that does not follow the protocol.
    #[error("side-channel protocol error: {0}")]
    Protocol(String),
    /// The peer answered with an explicit error.
    #[error("remote side-channel error: {0}")]
    Remote(String),
}

impl SideChannelError {
    /// Whether the same call may succeed if retried: transport trouble yes, answered errors no.
    pub fn retryable(&self) -> bool {
        matches!(self, Self::Timeout | Self::Connect(_))
    }
}

/// The factors of vLLM's `compute_nixl_compatibility_hash` (v2 set).
#[derive(Debug, Clone, PartialEq)]
pub struct CompatFactors {
    pub vllm_version: String,
    pub nixl_connector_version: u32,
    pub model: String,
    /// As vLLM stringifies it, e.g. `torch.bfloat16`.
    pub dtype: String,
    pub num_kv_heads: u32,
    pub head_size: u32,
    pub num_hidden_layers: u32,
    pub attn_backend_name: String,
    /// e.g. `auto`.
    pub cache_dtype: String,
}

/// Python's `json.dumps(s)` for a string (default `ensure_ascii=True`): non-ASCII as `\uXXXX`
/// UTF-16 units, so the canonical text below is byte-identical to vLLM's.
fn py_json_str(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if c.is_ascii() && !c.is_ascii_control() => out.push(c),
            c => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{u:04x}");
                }
            }
        }
    }
    out.push('"');
}

/// SHA-256 hex over the canonical text of the factors, which is exactly vLLM's `hash_factors`:
/// `json.dumps(factors, sort_keys=True)` (keys sorted, `", "` / `": "` separators, ASCII-escaped
/// strings). Given the same strings as vLLM (e.g. dtype `torch.bfloat16`) the hash is bit-exact
/// with vLLM's v2 hash; in any case it is stable and changes with every factor.
pub fn compatibility_hash(f: &CompatFactors) -> String {
    enum Factor<'a> {
        S(&'a str),
        N(u32),
    }
    // Already in sorted key order.
    let factors = [
        ("attn_backend_name", Factor::S(&f.attn_backend_name)),
        ("cache_dtype", Factor::S(&f.cache_dtype)),
        ("dtype", Factor::S(&f.dtype)),
        ("head_size", Factor::N(f.head_size)),
        ("model", Factor::S(&f.model)),
        (
            "nixl_connector_version",
            Factor::N(f.nixl_connector_version),
        ),
        ("num_hidden_layers", Factor::N(f.num_hidden_layers)),
        ("num_kv_heads", Factor::N(f.num_kv_heads)),
        ("vllm_version", Factor::S(&f.vllm_version)),
    ];
    let mut text = String::from("{");
    for (i, (key, value)) in factors.iter().enumerate() {
        if i > 0 {
            text.push_str(", ");
        }
        py_json_str(key, &mut text);
        text.push_str(": ");
        match value {
            Factor::S(s) => py_json_str(s, &mut text),
            Factor::N(n) => text.push_str(&n.to_string()),
        }
    }
    text.push('}');
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// What the prefill engine exposes in its handshake.
#[derive(Debug, Clone)]
pub struct HandshakeInfo {
    pub engine_id: String,
    /// Ranks `0..tp_size` are served; others get an error reply.
    pub tp_size: u32,
    pub num_blocks: u32,
    pub block_size: u32,
    /// Bytes of one block in one KV region; the payload lists one region per hidden layer.
    pub block_len_bytes: u64,
    pub factors: CompatFactors,
    /// The real NIXL agent behind the handshake, when KV moves over NIXL.
    pub nixl: Option<NixlAdvert>,
}

/// What a handshake advertises of a real NIXL agent: `get_local_md` and its registered region.
#[derive(Debug, Clone)]
pub struct NixlAdvert {
    pub agent_metadata: Vec<u8>,
    /// One base address per layer region.
    pub base_addrs: Vec<u64>,
    /// Bytes of one block in one layer region (the scaled-down stand-in, not the modeled size).
    pub block_len: u64,
}

/// A request the side channel forwards to the engine.
#[derive(Debug)]
pub enum SideRequest {
    /// Simulated RDMA READ of `block_ids` pinned for `remote_request_id`; with `grant`, the
    /// grant before a real NIXL READ (answered with no blocks).
    Read {
        remote_request_id: String,
        block_ids: Vec<u32>,
        grant: bool,
        reply: oneshot::Sender<Result<Vec<Vec<u8>>, String>>,
    },
    /// Consumer rank finished reading (vLLM's `"{remote_request_id}:{world_size}"` notification).
    Notify {
        remote_request_id: String,
        world_size: u32,
        reply: oneshot::Sender<Result<(), String>>,
    },
}

/// The decoded handshake: the outer payload's hash plus the v2 `NixlAgentMetadata` fields
/// (the payload has no `tp_size`; `device_id` is the answering rank).
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteAgent {
    pub compatibility_hash: String,
    pub engine_id: String,
    pub agent_metadata: Vec<u8>,
    pub kv_caches_base_addr: Vec<u64>,
    pub device_id: u32,
    pub num_blocks: u32,
    pub block_lens: Vec<u64>,
    pub kv_cache_layout: String,
    pub block_size: u32,
    /// The v12 field, when the engine sends it (v2 has none; the hash covers the backend).
    pub attn_backend_name: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// msgpack helpers
// ---------------------------------------------------------------------------------------------

fn to_msgpack(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    // Writing into a Vec cannot fail.
    rmpv::encode::write_value(&mut out, v).expect("msgpack encode into Vec");
    out
}

fn from_msgpack(bytes: &[u8]) -> Result<Value, String> {
    let mut rd = bytes;
    let v = rmpv::decode::read_value(&mut rd).map_err(|e| format!("invalid msgpack: {e}"))?;
    if rd.is_empty() {
        Ok(v)
    } else {
        Err(format!("{} trailing bytes after msgpack value", rd.len()))
    }
}

fn str_map(entries: Vec<(&str, Value)>) -> Value {
    Value::Map(
        entries
            .into_iter()
            .map(|(k, v)| (Value::from(k), v))
            .collect(),
    )
}

fn map_get<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v.as_map()?
        .iter()
        .find(|(k, _)| k.as_str() == Some(key))
        .map(|(_, v)| v)
}

fn as_u32(v: Option<&Value>) -> Option<u32> {
    v?.as_u64().and_then(|n| u32::try_from(n).ok())
}
