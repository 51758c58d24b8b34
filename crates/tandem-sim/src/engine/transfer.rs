//! Decode side of a P/D handoff: pull the prompt's KV from the prefill engine named in
//! `kv_transfer_params`, verify it, charge the modeled transfer time, and notify the prefill
//! engine so it frees its pinned blocks.
//!
//! The bytes moved are a 32-byte stand-in per block (the digest of the block's tokens), so the
//! check is real: a recycled, corrupted or wrong block fails loudly. The timing model charges the
//! full modeled size (`tokens * kv_bytes_per_token`) over the configured link class: the bytes
//! through this engine's NIC, shared with every other pull in flight (as the prefill engine's
//! NIC shares its answers), plus the link's fixed `c_xfer` per transfer. Pulls start together
//! and the notification that frees the prefill's blocks is sent without waiting for its answer,
//! as vLLM's NixlConnector does (`send_notif` is one-way).

use std::sync::Arc;

use tokio::sync::mpsc;

use super::link::LinkHandle;
use super::{Command, EngineConfig, SimClock};
use crate::kv_cache::BlockDigest;
use crate::metrics::EngineMetrics;
use serde_json::Value;

use crate::scheduler::SeqId;
use crate::side_channel::{self, SideChannelError};

/// The validated remote half of `kv_transfer_params` (vLLM NixlConnector, §1.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteKv {
    pub block_ids: Vec<u32>,
    pub engine_id: String,
    pub request_id: String,
    pub host: String,
    pub port: u16,
    pub tp_size: u32,
}

/// How numbers in the params may be spelled: as JSON integers (vLLM's HTTP server hands the
/// JSON on as the client sent it), or also as integral doubles (vLLM's gRPC server turns every
/// `Struct` number into a double: `remote_port` arrives as `5600.0`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamNumbers {
    Integers,
    Doubles,
}

impl ParamNumbers {
    /// A non-negative integer: a JSON integer, a decimal string (Dynamo's workaround for a
    /// double port), or with `Doubles` an integral double within 2^53.
    fn uint(self, v: &Value) -> Option<u64> {
        if let Some(n) = v.as_u64() {
            return Some(n);
        }
        if self == ParamNumbers::Doubles {
            if let Some(f) = v.as_f64() {
                return (f >= 0.0 && f.fract() == 0.0 && f <= 9_007_199_254_740_992.0)
                    .then_some(f as u64);
            }
        }
        v.as_str().and_then(|s| s.trim().parse().ok())
    }
}

impl RemoteKv {
    /// The decode role's half of `kv_transfer_params`: `Ok(None)` when the request is not a
    /// decode leg (`do_remote_prefill` not true); `Err(key)` when it claims to be one but a
    /// required key is missing or malformed (vLLM then warns and prefills locally).
    pub fn from_params(p: &Value, numbers: ParamNumbers) -> Result<Option<RemoteKv>, String> {
        if p.get("do_remote_prefill").and_then(Value::as_bool) != Some(true) {
            return Ok(None);
        }
        let ids = match p.get("remote_block_ids") {
            // HMA engines send one list per KV-cache group; the simulator has one group.
            Some(Value::Array(a)) if a.first().is_some_and(Value::is_array) => &a[0],
            Some(v) => v,
            None => return Err("remote_block_ids".into()),
        };
        let block_ids = ids
            .as_array()
            .and_then(|a| {
                a.iter()
                    .map(|v| numbers.uint(v).and_then(|n| u32::try_from(n).ok()))
                    .collect::<Option<Vec<u32>>>()
            })
            .ok_or("remote_block_ids")?;
        if block_ids.is_empty() {
            return Err("remote_block_ids is empty".into());
        }
        let s = |k: &str| {
            p.get(k)
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| k.to_string())
        };
        let port = p
            .get("remote_port")
            .and_then(|v| numbers.uint(v))
            .and_then(|v| u16::try_from(v).ok())
            .ok_or("remote_port")?;
        let tp_size = match p.get("tp_size") {
            None | Some(Value::Null) => 1,
            Some(v) => numbers
                .uint(v)
                .and_then(|n| u32::try_from(n).ok())
                .ok_or("tp_size")?,
        };
        Ok(Some(RemoteKv {
            block_ids,
            engine_id: s("remote_engine_id")?,
            request_id: s("remote_request_id")?,
            host: s("remote_host")?,
            port,
            tp_size,
        }))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("remote_block_ids has {got} blocks but the prompt needs {expected}: prompts differ between prefill and decode")]
    BlockCountMismatch { expected: usize, got: usize },
    #[error("NIXL handshake with {addr} failed: {source}")]
    Handshake {
        addr: String,
        #[source]
        source: SideChannelError,
    },
    #[error("NIXL compatibility hash mismatch. Local: {local}, Remote: {remote}")]
    HashMismatch { local: String, remote: String },
    #[error("Remote NIXL agent engine ID mismatch: expected {expected}, got {got}")]
    EngineIdMismatch { expected: String, got: String },
    #[error("KV read from {addr} failed: {source}")]
    Read {
        addr: String,
        #[source]
        source: SideChannelError,
    },
    #[error("KV block {index} (remote block id {block_id}) does not hold the expected tokens")]
    Corrupt { index: usize, block_id: u32 },
}

#[derive(Debug)]
pub(super) struct TransferStats {
    pub xfer_s: f64,
    pub post_s: f64,
    pub bytes: u64,
    pub descriptors: u64,
    /// Set when this pull performed the handshake, to cache it.
    pub handshake_hash: Option<String>,
}

pub(super) struct Pull {
    pub seq: SeqId,
    pub remote: RemoteKv,
    pub local_hit_blocks: usize,
    pub expected: Vec<BlockDigest>,
    pub known_hash: Option<String>,
    pub prompt_len: usize,
}

/// What a pull touches besides its config.
pub(super) struct PullEdges {
    pub clock: SimClock,
    pub link: LinkHandle,
    pub metrics: Arc<EngineMetrics>,
}

pub(super) fn spawn_pull(
    p: Pull,
    cfg: Arc<EngineConfig>,
    edges: PullEdges,
    tx: mpsc::UnboundedSender<Command>,
) {
    tokio::spawn(async move {
        let result = pull(&p, &cfg, &edges).await;
        // The engine may have stopped; nothing else to tell then.
        let _ = tx.send(Command::TransferDone(p.seq, result));
    });
}

/// Tell the prefill engine to free a request's blocks without reading them.
pub(super) fn spawn_notify(remote: RemoteKv, cfg: Arc<EngineConfig>, metrics: Arc<EngineMetrics>) {
    tokio::spawn(async move {
        if let Err(e) = cfg
            .side_client
            .notify(
                &remote.host,
                remote.port,
                &remote.request_id,
                cfg.tp_size,
                cfg.side_channel_timeout,
            )
            .await
        {
            metrics.nixl_failed_notification();
            tracing::warn!(
                "NIXL send_notif failed for request {}: P worker blocks will be freed after timeout. ({e})",
                remote.request_id
            );
        }
    });
}

async fn pull(
    p: &Pull,
    cfg: &Arc<EngineConfig>,
    e: &PullEdges,
) -> Result<TransferStats, TransferError> {
    let clock = e.clock;
    let r = &p.remote;
    let addr = format!("{}:{}", r.host, r.port);
    if r.block_ids.len() != p.expected.len() {
        return Err(TransferError::BlockCountMismatch {
            expected: p.expected.len(),
            got: r.block_ids.len(),
        });
    }
    let mut handshake_hash = None;
    if p.known_hash.is_none() {
        let agent = cfg
            .side_client
            .handshake(&r.host, r.port, 0, cfg.side_channel_timeout)
            .await
            .map_err(|source| TransferError::Handshake {
                addr: addr.clone(),
                source,
            })?;
        let local = side_channel::compatibility_hash(&cfg.compat);
        if agent.compatibility_hash != local {
            return Err(TransferError::HashMismatch {
                local,
                remote: agent.compatibility_hash,
            });
        }
        if agent.engine_id != r.engine_id {
            return Err(TransferError::EngineIdMismatch {
                expected: r.engine_id.clone(),
                got: agent.engine_id,
            });
        }
        handshake_hash = Some(agent.compatibility_hash);
    }
    let to_read = &r.block_ids[p.local_hit_blocks..];
    let bs = cfg.sched.block_size as usize;
    let tokens = p.prompt_len.saturating_sub(p.local_hit_blocks * bs) as u64;
    let bytes = tokens * cfg.kv_bytes_per_token;
    let started = clock.now();
    // The bytes cross both NICs at once: the read's answer comes through the prefill engine's
    // share of its link, and this engine's share of its own runs alongside.
    let read = async {
        let blocks = cfg
            .side_client
            .read_blocks(
                &r.host,
                r.port,
                &r.request_id,
                to_read,
                cfg.side_channel_timeout,
            )
            .await;
        (blocks, clock.now() - started)
    };
    let link = e.link.transfer(bytes);
    tokio::pin!(read, link);
    let mut moved = false;
    let (blocks, post_s) = loop {
        tokio::select! {
            r = &mut read => break r,
            () = &mut link, if !moved => moved = true,
        }
    };
    // A failed read ends the pull at once; a good one waits for its bytes through this NIC.
    if blocks.is_ok() && !moved {
        link.await;
    }
    let blocks = blocks.map_err(|source| TransferError::Read {
        addr: addr.clone(),
        source,
    })?;
    for (i, (got, want)) in blocks
        .iter()
        .zip(&p.expected[p.local_hit_blocks..])
        .enumerate()
    {
        if got.as_slice() != want.as_slice() {
            return Err(TransferError::Corrupt {
                index: p.local_hit_blocks + i,
                block_id: to_read[i],
            });
        }
    }
    if blocks.len() != to_read.len() {
        return Err(TransferError::Corrupt {
            index: p.local_hit_blocks + blocks.len(),
            block_id: to_read.get(blocks.len()).copied().unwrap_or(0),
        });
    }
    if bytes > 0 {
        // The transfer's fixed cost (descriptor exchange, completion) is its own, not shared.
        tokio::time::sleep(clock.real(cfg.link.c_xfer())).await;
    }
    // One-way, as NIXL's send_notif: the data is here whether or not the prefill side hears.
    spawn_notify(r.clone(), cfg.clone(), e.metrics.clone());
    Ok(TransferStats {
        xfer_s: clock.now() - started,
        post_s,
        bytes,
        descriptors: to_read.len() as u64,
        handshake_hash,
    })
}
