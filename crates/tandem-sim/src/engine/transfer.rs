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
//!
//! With `--kv-transport nixl` the bytes are real (see [`crate::nixl`]): the handshake's agent
//! metadata is loaded, the prefill side's grant (`tandem_grant`: its read faults and NIC time)
//! takes the place of `tandem_read`, and a NIXL READ brings the blocks' stand-ins into this
//! engine's own blocks for the request, checked byte for byte, with the notification attached
//! to the READ as vLLM attaches it. A refused grant or a failed READ still notifies, so the
//! prefill engine's blocks are freed rather than held to the abort timeout.

use std::sync::Arc;

use tokio::sync::mpsc;

use super::link::LinkHandle;
use super::{Command, EngineConfig, SimClock};
use crate::kv_cache::BlockDigest;
use crate::metrics::EngineMetrics;
use serde_json::Value;

use crate::nixl::ReadFailure;
use crate::scheduler::SeqId;
use crate::side_channel::{self, SideChannelError};
use tandem_nixl::RemoteLayout;

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
    #[error("NIXL agent of {addr}: {error}")]
    NixlAgent { addr: String, error: String },
    #[error("NIXL READ from {addr} failed: {error}")]
    NixlRead { addr: String, error: String },
}

/// A remote engine already handshaken (hash and engine id checked), with its NIXL agent when
/// KV moves over NIXL.
#[derive(Debug, Clone)]
pub(super) struct KnownAgent {
    pub nixl: Option<RemoteLayout>,
}

#[derive(Debug)]
pub(super) struct TransferStats {
    pub xfer_s: f64,
    pub post_s: f64,
    pub bytes: u64,
    pub descriptors: u64,
    /// Set when this pull performed the handshake, to cache it.
    pub handshake: Option<KnownAgent>,
}

pub(super) struct Pull {
    pub seq: SeqId,
    pub remote: RemoteKv,
    pub local_hit_blocks: usize,
    /// This engine's blocks for the prompt, the NIXL READ's destination.
    pub local_blocks: Vec<u32>,
    pub expected: Vec<BlockDigest>,
    pub known: Option<KnownAgent>,
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

/// Tell the prefill engine to free a request's blocks without reading them: through NIXL
/// (`send_notif`) when its agent is loaded, else on the side channel.
pub(super) fn spawn_notify(
    remote: RemoteKv,
    known: Option<KnownAgent>,
    cfg: Arc<EngineConfig>,
    metrics: Arc<EngineMetrics>,
) {
    tokio::spawn(async move {
        let nixl = cfg.nixl.as_ref().zip(known.and_then(|k| k.nixl));
        let sent = match nixl {
            Some((n, layout)) => {
                let msg = format!("{}:{}", remote.request_id, cfg.tp_size).into_bytes();
                n.notify(layout.agent, msg).await
            }
            None => cfg
                .side_client
                .notify(
                    &remote.host,
                    remote.port,
                    &remote.request_id,
                    cfg.tp_size,
                    cfg.side_channel_timeout,
                )
                .await
                .map_err(|e| e.to_string()),
        };
        if let Err(e) = sent {
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
    let mut handshake = None;
    let known = match &p.known {
        Some(k) => k.clone(),
        None => {
            let k = handshake_with(p, cfg, &addr).await?;
            handshake = Some(k.clone());
            k
        }
    };
    if let (Some(n), Some(layout)) = (&cfg.nixl, &known.nixl) {
        return pull_nixl(p, cfg, e, n, layout, &addr, handshake).await;
    }
    let to_read = &r.block_ids[p.local_hit_blocks..];
    let bs = cfg.sched.block_size as usize;
    let tokens = p.prompt_len.saturating_sub(p.local_hit_blocks * bs) as u64;
    let bytes = tokens * cfg.kv_bytes_per_token;
    let started = clock.now();
    // The bytes cross both NICs at once: the read's answer comes through the prefill engine's
    // share of its link, and this engine's share of its own runs alongside.
    let read = cfg.side_client.read_blocks(
        &r.host,
        r.port,
        &r.request_id,
        to_read,
        cfg.side_channel_timeout,
    );
    let (blocks, post_s) = alongside_link(read, e, bytes).await;
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
    spawn_notify(
        r.clone(),
        p.known.clone().or(handshake.clone()),
        cfg.clone(),
        e.metrics.clone(),
    );
    Ok(TransferStats {
        xfer_s: clock.now() - started,
        post_s,
        bytes,
        descriptors: to_read.len() as u64,
        handshake,
    })
}

/// Runs `read` (the prefill side's answer, through its NIC) alongside this engine's share of
/// its own NIC for `bytes`; a failed read ends at once, a good one waits for both. Returns the
/// read's result and how long it took (simulated seconds).
async fn alongside_link<T, E>(
    read: impl std::future::Future<Output = Result<T, E>>,
    e: &PullEdges,
    bytes: u64,
) -> (Result<T, E>, f64) {
    let clock = e.clock;
    let started = clock.now();
    let read = async {
        let r = read.await;
        (r, clock.now() - started)
    };
    let link = e.link.transfer(bytes);
    tokio::pin!(read, link);
    let mut moved = false;
    let (result, post_s) = loop {
        tokio::select! {
            r = &mut read => break r,
            () = &mut link, if !moved => moved = true,
        }
    };
    if result.is_ok() && !moved {
        link.await;
    }
    (result, post_s)
}

/// vLLM's handshake with the prefill engine: hash and engine id checked; with NIXL, its agent
/// metadata loaded into this engine's agent.
async fn handshake_with(
    p: &Pull,
    cfg: &Arc<EngineConfig>,
    addr: &str,
) -> Result<KnownAgent, TransferError> {
    let r = &p.remote;
    {
        let agent = cfg
            .side_client
            .handshake(&r.host, r.port, 0, cfg.side_channel_timeout)
            .await
            .map_err(|source| TransferError::Handshake {
                addr: addr.to_string(),
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
        let nixl = match &cfg.nixl {
            None => None,
            Some(n) => {
                let name = n
                    .load_remote(agent.agent_metadata.clone())
                    .await
                    .map_err(|error| TransferError::NixlAgent {
                        addr: addr.to_string(),
                        error: format!("cannot load its metadata ({error}); is it started with --kv-transport nixl?"),
                    })?;
                let block_len = agent.block_lens.first().copied().unwrap_or(0);
                if agent.block_lens.iter().any(|&l| l != block_len) {
                    return Err(TransferError::NixlAgent {
                        addr: addr.to_string(),
                        error: format!("uneven block_lens {:?}", agent.block_lens),
                    });
                }
                Some(RemoteLayout {
                    agent: name,
                    base_addrs: agent.kv_caches_base_addr.clone(),
                    block_len,
                })
            }
        };
        Ok(KnownAgent { nixl })
    }
}

/// How a NIXL pull failed before it was checked.
enum Failed {
    Grant(SideChannelError),
    Read(ReadFailure),
}

/// The NIXL pull (module docs): grant and READ alongside this engine's NIC share, check, and
/// the notification rides on the READ.
async fn pull_nixl(
    p: &Pull,
    cfg: &Arc<EngineConfig>,
    e: &PullEdges,
    nixl: &crate::nixl::KvNixl,
    layout: &RemoteLayout,
    addr: &str,
    handshake: Option<KnownAgent>,
) -> Result<TransferStats, TransferError> {
    let clock = e.clock;
    let r = &p.remote;
    let known = Some(KnownAgent {
        nixl: Some(layout.clone()),
    });
    let free_remote = || spawn_notify(r.clone(), known.clone(), cfg.clone(), e.metrics.clone());
    let to_read = r.block_ids[p.local_hit_blocks..].to_vec();
    let local = p
        .local_blocks
        .get(p.local_hit_blocks..)
        .unwrap_or(&[])
        .to_vec();
    let bs = cfg.sched.block_size as usize;
    let tokens = p.prompt_len.saturating_sub(p.local_hit_blocks * bs) as u64;
    let modeled = tokens * cfg.kv_bytes_per_token;
    let started = clock.now();
    let notif = format!("{}:{}", r.request_id, cfg.tp_size).into_bytes();
    let expected = p.expected[p.local_hit_blocks..].to_vec();
    // The grant and the real READ run inside the modeled transfer, alongside this engine's NIC
    // share, so the clock charges the modeled size; a real READ only shows on it if it takes
    // longer than the model says the bytes do.
    let moved = async {
        cfg.side_client
            .grant(
                &r.host,
                r.port,
                &r.request_id,
                &to_read,
                cfg.side_channel_timeout,
            )
            .await
            .map_err(Failed::Grant)?;
        if to_read.is_empty() {
            return Ok(None);
        }
        nixl.read_verified(
            layout.clone(),
            to_read.clone(),
            local,
            expected,
            notif,
            cfg.side_channel_timeout,
        )
        .await
        .map(Some)
        .map_err(Failed::Read)
    };
    let (moved, post_s) = alongside_link(moved, e, modeled).await;
    let report = match moved {
        Ok(Some(report)) => report,
        Ok(None) => {
            // A full local prefix hit reads nothing but still frees the prefill's blocks (vLLM).
            free_remote();
            return Ok(TransferStats {
                xfer_s: clock.now() - started,
                post_s,
                bytes: 0,
                descriptors: 0,
                handshake,
            });
        }
        Err(Failed::Grant(source)) => {
            free_remote();
            return Err(TransferError::Read {
                addr: addr.to_string(),
                source,
            });
        }
        Err(Failed::Read(ReadFailure::Corrupt { index })) => {
            // The notification went with the READ: the prefill side has freed the blocks.
            return Err(TransferError::Corrupt {
                index: p.local_hit_blocks + index,
                block_id: to_read[index],
            });
        }
        Err(Failed::Read(ReadFailure::Transfer(error))) => {
            free_remote();
            return Err(TransferError::NixlRead {
                addr: addr.to_string(),
                error,
            });
        }
    };
    if modeled > 0 {
        tokio::time::sleep(clock.real(cfg.link.c_xfer())).await;
    }
    // vLLM's xfer and post times come from NIXL's telemetry of the real transfer: report the
    // real READ's (wall clock, post to completion), beside its real bytes; the modeled transfer
    // stays on the simulated clock only.
    Ok(TransferStats {
        xfer_s: report.elapsed.as_secs_f64(),
        post_s: report.post.as_secs_f64(),
        bytes: report.bytes,
        descriptors: report.descriptors,
        handshake,
    })
}
