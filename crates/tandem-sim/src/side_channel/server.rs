//! The side-channel server: a ZMQ ROUTER answering handshakes itself and forwarding READs and
//! notifications to the engine.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use rmpv::Value;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use zeromq::util::PeerIdentity;
use zeromq::{RouterSocket, Socket, SocketEvent, SocketRecv, SocketSend, ZmqMessage};

use super::{
    as_u32, compatibility_hash, from_msgpack, str_map, to_msgpack, HandshakeInfo, SideChannelError,
    SideRequest, GET_META_MSG, KV_CACHE_LAYOUT, TANDEM_GRANT_MSG, TANDEM_NOTIF_MSG,
    TANDEM_READ_MSG,
};

/// Synthetic device address of region 0 on rank 0; only its stability matters.
const BASE_ADDR: u64 = 0x7f00_0000_0000;

/// Default bound on idle peers the server keeps (see [`Server::reap`]).
pub const DEFAULT_MAX_IDLE_PEERS: usize = 128;

fn ok_reply(extra: Vec<(&str, Value)>) -> Vec<u8> {
    let mut entries = vec![("ok", Value::Boolean(true))];
    entries.extend(extra);
    to_msgpack(&str_map(entries))
}

fn fail_reply(error: &str) -> Vec<u8> {
    to_msgpack(&str_map(vec![
        ("ok", Value::Boolean(false)),
        ("error", Value::from(error)),
    ]))
}

/// Map-encoded `NixlAgentMetadata` v2 for one rank, fields in declaration order as msgspec
/// writes them. With a real NIXL agent its metadata and region are advertised (one agent
/// serves every rank); otherwise addresses are synthetic but distinct per rank and region.
fn agent_metadata(info: &HandshakeInfo, tp_rank: u32) -> Vec<u8> {
    let regions = u64::from(info.factors.num_hidden_layers.max(1));
    let (blob, addrs, block_len) = match &info.nixl {
        Some(n) => (n.agent_metadata.clone(), n.base_addrs.clone(), n.block_len),
        None => {
            let region_bytes = u64::from(info.num_blocks) * info.block_len_bytes;
            let rank_base = BASE_ADDR + u64::from(tp_rank) * regions * region_bytes;
            let addrs = (0..regions).map(|r| rank_base + r * region_bytes).collect();
            let blob = format!("tandem-sim-nixl-agent:{}:{tp_rank}", info.engine_id);
            (blob.into_bytes(), addrs, info.block_len_bytes)
        }
    };
    let lens = addrs.iter().map(|_| Value::from(block_len)).collect();
    let addrs = addrs.into_iter().map(Value::from).collect();
    to_msgpack(&str_map(vec![
        ("engine_id", Value::from(info.engine_id.as_str())),
        ("agent_metadata", Value::Binary(blob)),
        ("kv_caches_base_addr", Value::Array(addrs)),
        ("device_id", Value::from(tp_rank)),
        ("num_blocks", Value::from(info.num_blocks)),
        ("block_lens", Value::Array(lens)),
        ("kv_cache_layout", Value::from(KV_CACHE_LAYOUT)),
        ("block_size", Value::from(info.block_size)),
    ]))
}

/// Encoded `NixlHandshakePayload` per TP rank, precomputed like vLLM's `encoded_data`.
fn handshake_payloads(info: &HandshakeInfo) -> Vec<Bytes> {
    let hash = compatibility_hash(&info.factors);
    (0..info.tp_size)
        .map(|rank| {
            let payload = str_map(vec![
                ("compatibility_hash", Value::from(hash.as_str())),
                (
                    "agent_metadata_bytes",
                    Value::Binary(agent_metadata(info, rank)),
                ),
            ]);
            Bytes::from(to_msgpack(&payload))
        })
        .collect()
}

/// A parsed request.
#[derive(Debug, PartialEq)]
pub(super) enum Request {
    /// `pp_rank` is `Some` for the newer 3-element form `(GET_META_MSG, pp_rank, tp_rank)`.
    Handshake {
        pp_rank: Option<u32>,
        tp_rank: u32,
    },
    Read {
        id: String,
        block_ids: Vec<u32>,
        grant: bool,
    },
    Notify {
        id: String,
        world_size: u32,
    },
}

pub(super) fn parse_request(bytes: &[u8]) -> Result<Request, String> {
    let v = from_msgpack(bytes)?;
    let items = v.as_array().ok_or("request is not a msgpack array")?;
    // msgspec encodes Python bytes as bin; accept str too, for hand-written clients.
    let tag = match items.first() {
        Some(Value::Binary(b)) => b.as_slice(),
        Some(Value::String(s)) => s.as_bytes(),
        _ => return Err("request does not start with a bin/str tag".into()),
    };
    let bad = |what: &str| format!("malformed {what} request");
    let u32_at = |i: usize, what: &str| as_u32(items.get(i)).ok_or_else(|| bad(what));
    let str_at = |i: usize, what: &str| {
        let s = items.get(i).and_then(Value::as_str);
        s.map(str::to_string).ok_or_else(|| bad(what))
    };
    match tag {
        GET_META_MSG => match items.len() {
            2 => Ok(Request::Handshake {
                pp_rank: None,
                tp_rank: u32_at(1, "handshake")?,
            }),
            3 => Ok(Request::Handshake {
                pp_rank: Some(u32_at(1, "handshake")?),
                tp_rank: u32_at(2, "handshake")?,
            }),
            _ => Err(bad("handshake")),
        },
        TANDEM_READ_MSG | TANDEM_GRANT_MSG => {
            let ids = items.get(2).and_then(Value::as_array);
            let block_ids = ids
                .ok_or_else(|| bad("read"))?
                .iter()
                .map(|b| as_u32(Some(b)).ok_or_else(|| bad("read")))
                .collect::<Result<_, _>>()?;
            Ok(Request::Read {
                id: str_at(1, "read")?,
                block_ids,
                grant: tag == TANDEM_GRANT_MSG,
            })
        }
        TANDEM_NOTIF_MSG => {
            let payload = str_at(1, "notify")?;
            // vLLM: `req_id, tp_size = notif.decode().rsplit(":", 1)`; request ids may contain ':'.
            let (id, ws) = payload.rsplit_once(':').ok_or_else(|| bad("notify"))?;
            Ok(Request::Notify {
                id: id.to_string(),
                world_size: ws.parse().map_err(|_| bad("notify"))?,
            })
        }
        other => Err(format!(
            "unknown request tag {:?}",
            String::from_utf8_lossy(other)
        )),
    }
}

/// A reply in the making: the client identity and the reply frames (after the delimiter).
type Pending = Pin<Box<dyn Future<Output = (Bytes, Vec<Bytes>)> + Send>>;

fn ready(identity: Bytes, frames: Vec<Bytes>) -> Pending {
    Box::pin(std::future::ready((identity, frames)))
}

/// Sends `make(reply_tx)` to the engine and turns its answer into reply bytes; all of it runs in
/// the server's `FuturesUnordered`, so a slow engine never blocks other clients.
fn engine_call<T: Send + 'static>(
    to_engine: &mpsc::Sender<SideRequest>,
    identity: Bytes,
    make: impl FnOnce(oneshot::Sender<Result<T, String>>) -> SideRequest,
    encode: impl FnOnce(T) -> Vec<u8> + Send + 'static,
) -> Pending {
    let (tx, rx) = oneshot::channel();
    let request = make(tx);
    let to_engine = to_engine.clone();
    Box::pin(async move {
        let reply = if to_engine.send(request).await.is_err() {
            fail_reply("engine is not running")
        } else {
            match rx.await {
                Ok(Ok(v)) => encode(v),
                Ok(Err(e)) => fail_reply(&e),
                Err(_) => fail_reply("engine dropped the request"),
            }
        };
        (identity, vec![Bytes::from(reply)])
    })
}

/// Entry point of the side-channel server.
#[derive(Debug)]
pub struct SideChannelServer;

/// Running server; dropping it or calling [`SideChannelHandle::shutdown`] stops it.
#[derive(Debug)]
pub struct SideChannelHandle {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl SideChannelHandle {
    /// Stops the server and waits until its listener is closed, so new connections are refused.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}

impl Drop for SideChannelHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl SideChannelServer {
    /// Binds the ROUTER (port 0 allowed) and spawns the serving task; returns the resolved
    /// endpoint, e.g. `tcp://127.0.0.1:41234`. While `stall` is true handshake requests are
    /// received but never answered (fault injection: handshake timeout).
    pub async fn start(
        bind: &str,
        info: HandshakeInfo,
        to_engine: mpsc::Sender<SideRequest>,
        stall: Arc<AtomicBool>,
    ) -> Result<(SideChannelHandle, String), SideChannelError> {
        Self::start_with_max_idle_peers(bind, info, to_engine, stall, DEFAULT_MAX_IDLE_PEERS).await
    }

    /// [`Self::start`] with an explicit bound on idle client connections kept open.
    pub async fn start_with_max_idle_peers(
        bind: &str,
        info: HandshakeInfo,
        to_engine: mpsc::Sender<SideRequest>,
        stall: Arc<AtomicBool>,
        max_idle_peers: usize,
    ) -> Result<(SideChannelHandle, String), SideChannelError> {
        let endpoint = crate::kv_events::zmq_bind_endpoint(bind).map_err(SideChannelError::Bind)?;
        let mut router = RouterSocket::new();
        // Installed before bind so no accepted peer goes unseen.
        let monitor = router.monitor();
        let bound = router
            .bind(&endpoint)
            .await
            .map_err(|e| SideChannelError::Bind(format!("{endpoint}: {e}")))?;
        let (stop_tx, stop_rx) = oneshot::channel();
        let server = Server {
            payloads: handshake_payloads(&info),
            to_engine,
            stall,
            started: Instant::now(),
            peers: HashMap::new(),
            clock: 0,
            max_idle_peers,
        };
        let task = tokio::spawn(server.run(router, monitor, stop_rx));
        let handle = SideChannelHandle {
            stop: Some(stop_tx),
            task,
        };
        Ok((handle, bound.to_string()))
    }
}

/// What the server tracks per connected client, to close idle connections.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(super) struct PeerState {
    /// Logical time of the last request or reply (LRU order, no clock needed).
    pub(super) last_active: u64,
    /// Replies still owed.
    pub(super) inflight: u32,
    /// Sent a handshake that is being stalled on purpose.
    pub(super) stalled: bool,
}

/// Peers to disconnect so that at most `max_idle` stay connected, least recently active first.
/// Peers owed a reply are never chosen, nor stalled ones while the stall is on: closing those
/// would turn an injected timeout into a connection error.
pub(super) fn reap_candidates(
    peers: &HashMap<Bytes, PeerState>,
    max_idle: usize,
    stall_on: bool,
) -> Vec<Bytes> {
    let excess = peers.len().saturating_sub(max_idle);
    if excess == 0 {
        return Vec::new();
    }
    let mut idle: Vec<(u64, &Bytes)> = peers
        .iter()
        .filter(|(_, s)| s.inflight == 0 && !(s.stalled && stall_on))
        .map(|(id, s)| (s.last_active, id))
        .collect();
    idle.sort_unstable();
    idle.into_iter()
        .take(excess)
        .map(|(_, id)| id.clone())
        .collect()
}

struct Server {
    payloads: Vec<Bytes>,
    to_engine: mpsc::Sender<SideRequest>,
    stall: Arc<AtomicBool>,
    /// Origin of the newer protocol's `perf_counter` timestamp frame.
    started: Instant,
    peers: HashMap<Bytes, PeerState>,
    clock: u64,
    max_idle_peers: usize,
}

impl Server {
    async fn run(
        mut self,
        mut router: RouterSocket,
        mut monitor: futures::channel::mpsc::Receiver<SocketEvent>,
        mut stop: oneshot::Receiver<()>,
    ) {
        let mut pending: FuturesUnordered<Pending> = FuturesUnordered::new();
        loop {
            // `RouterSocket::recv` is cancel-safe (it returns as soon as its fair queue yields),
            // and `select!` drops the other branches' futures before running a handler, so the
            // handlers may use `router` again.
            tokio::select! {
                _ = &mut stop => break,
                msg = router.recv() => match msg {
                    Ok(msg) => {
                        if let Some(p) = self.handle(msg) {
                            pending.push(p);
                        }
                    }
                    Err(e) => tracing::warn!("side-channel recv error: {e}"),
                },
                Some((identity, frames)) = pending.next(), if !pending.is_empty() => {
                    tracing::trace!(peer = ?identity, "side-channel: reply");
                    send_reply(&mut router, identity.clone(), frames).await;
                    let state = self.touch(identity);
                    state.inflight = state.inflight.saturating_sub(1);
                    self.reap(&router);
                }
                Some(event) = monitor.next() => match event {
                    SocketEvent::Accepted(_, peer) => {
                        self.touch(Bytes::from(peer));
                        self.reap(&router);
                    }
                    // The crate dropped a peer whose connection ended (the client closed it).
                    SocketEvent::Disconnected(peer) => {
                        self.peers.remove(&Bytes::from(peer));
                    }
                    _ => {}
                },
            }
        }
        // Unbind so the port is closed once `shutdown` returns.
        for e in router.close().await {
            tracing::debug!("side-channel close: {e}");
        }
    }

    fn touch(&mut self, identity: Bytes) -> &mut PeerState {
        self.clock += 1;
        let state = self.peers.entry(identity).or_default();
        state.last_active = self.clock;
        state
    }

    /// Bounds the connections the server keeps. The zeromq crate's ROUTER before 0.5 never forgot
    /// a peer whose connection the client closed cleanly (every closed connection pinned a
    /// CLOSE_WAIT socket); 0.7 drops such a peer at EOF (and the monitor's `Disconnected` removes
    /// it here), so this is now the guard against clients that keep idle connections open: at
    /// most `max_idle_peers` idle ones stay, and the least recently active beyond that are
    /// disconnected through the crate's public `MultiPeerBackend::peer_disconnected`. A live
    /// client whose idle connection is closed this way sees an error on its next use and
    /// reconnects (libzmq sockets do so on their own, [`super::SideChannelClient`] retries once).
    fn reap(&mut self, router: &RouterSocket) {
        let stall_on = self.stall.load(Ordering::Relaxed);
        let victims = reap_candidates(&self.peers, self.max_idle_peers, stall_on);
        if victims.is_empty() {
            return;
        }
        tracing::debug!(
            peers = self.peers.len(),
            reaped = victims.len(),
            "side-channel: reaping idle peers"
        );
        let backend = router.backend();
        for id in victims {
            self.peers.remove(&id);
            match PeerIdentity::try_from(id) {
                Ok(peer) => backend.peer_disconnected(&peer),
                Err(e) => tracing::debug!("side-channel: bad peer identity: {e}"),
            }
        }
    }

    /// Parses one request; immediate answers become ready futures so all replies take one path.
    fn handle(&mut self, msg: ZmqMessage) -> Option<Pending> {
        let frames = msg.into_vec();
        let [identity, delimiter, body] = frames.as_slice() else {
            let n = frames.len();
            tracing::warn!("side-channel: expected [identity, b\"\", msg], got {n} frames");
            return None;
        };
        if !delimiter.is_empty() {
            tracing::warn!("side-channel: missing empty delimiter frame");
            return None;
        }
        let identity = identity.clone();
        tracing::trace!(peer = ?identity, peers = self.peers.len(), "side-channel: request");
        let reply = self.reply_for(identity.clone(), body);
        let state = self.touch(identity);
        match &reply {
            Some(_) => state.inflight += 1,
            None => state.stalled = true,
        }
        reply
    }

    fn reply_for(&self, identity: Bytes, body: &[u8]) -> Option<Pending> {
        let one = |reply: Vec<u8>| vec![Bytes::from(reply)];
        match parse_request(body) {
            Err(e) => {
                tracing::warn!("side-channel: {e}");
                Some(ready(identity, one(fail_reply(&e))))
            }
            Ok(Request::Handshake { pp_rank, tp_rank }) => {
                if self.stall.load(Ordering::Relaxed) {
                    tracing::debug!("side-channel: stalling handshake for tp_rank {tp_rank}");
                    return None;
                }
                let payload = match pp_rank {
                    Some(pp) if pp != 0 => None,
                    _ => self.payloads.get(tp_rank as usize),
                };
                let Some(payload) = payload else {
                    let pp = pp_rank.unwrap_or(0);
                    let tp_size = self.payloads.len();
                    let e = format!("unknown rank pp={pp} tp={tp_rank} (tp_size {tp_size})");
                    tracing::warn!("side-channel handshake: {e}");
                    let reply = to_msgpack(&str_map(vec![("error", Value::from(e))]));
                    return Some(ready(identity, one(reply)));
                };
                let mut frames = vec![payload.clone()];
                if pp_rank.is_some() {
                    // The newer protocol adds a 4th frame `msgpack(time.perf_counter())`, used
                    // by D to estimate the clock offset for lease expiry.
                    let ts = Value::F64(self.started.elapsed().as_secs_f64());
                    frames.push(Bytes::from(to_msgpack(&ts)));
                }
                Some(ready(identity, frames))
            }
            Ok(Request::Read {
                id,
                block_ids,
                grant,
            }) => Some(engine_call(
                &self.to_engine,
                identity,
                |reply| SideRequest::Read {
                    remote_request_id: id,
                    block_ids,
                    grant,
                    reply,
                },
                |blocks| {
                    let blocks = blocks.into_iter().map(Value::Binary).collect();
                    ok_reply(vec![("blocks", Value::Array(blocks))])
                },
            )),
            Ok(Request::Notify { id, world_size }) => Some(engine_call(
                &self.to_engine,
                identity,
                |reply| SideRequest::Notify {
                    remote_request_id: id,
                    world_size,
                    reply,
                },
                |()| ok_reply(Vec::new()),
            )),
        }
    }
}

async fn send_reply(router: &mut RouterSocket, identity: Bytes, body: Vec<Bytes>) {
    let mut frames = vec![identity, Bytes::new()];
    frames.extend(body);
    let msg = ZmqMessage::try_from(frames).expect("non-empty frame list");
    // The client may have timed out and gone away; nothing else to do for it.
    if let Err(e) = router.send(msg).await {
        tracing::debug!("side-channel reply not delivered: {e}");
    }
}
