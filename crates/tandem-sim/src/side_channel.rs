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
//!    (vLLM's payload format), answered `{"ok": true}` or `{"ok": false, "error": str}`.
//!
//! The server knows no engine state: reads and notifications go to the engine over an mpsc with a
//! oneshot for the answer. Differences from vLLM, on purpose: an unknown `tp_rank` or an
//! unparseable request gets an error map (vLLM only logs a warning and never answers, so its client
//! waits out the 5 s timeout); our clients fail fast instead.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use rmpv::Value;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use zeromq::{ReqSocket, RouterSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

/// vLLM's `GET_META_MSG`.
pub const GET_META_MSG: &[u8] = b"get_meta_msg";
/// Tag of the simulated block READ.
pub const TANDEM_READ_MSG: &[u8] = b"tandem_read";
/// Tag of the simulated NIXL notification.
pub const TANDEM_NOTIF_MSG: &[u8] = b"tandem_notif";
/// The `NixlAgentMetadata` layout served here is v2's (`NIXL_CONNECTOR_VERSION = 2`).
pub const NIXL_CONNECTOR_VERSION: u32 = 2;
/// vLLM's handshake `RCVTIMEO`.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_millis(5000);
/// The layout NixlConnector requires.
pub const KV_CACHE_LAYOUT: &str = "HND";

/// Synthetic device address of region 0 on rank 0; only its stability matters.
const BASE_ADDR: u64 = 0x7f00_0000_0000;

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
}

/// A request the side channel forwards to the engine.
#[derive(Debug)]
pub enum SideRequest {
    /// Simulated RDMA READ of `block_ids` pinned for `remote_request_id`.
    Read {
        remote_request_id: String,
        block_ids: Vec<u32>,
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

// ---------------------------------------------------------------------------------------------
// Server
// ---------------------------------------------------------------------------------------------

/// Map-encoded `NixlAgentMetadata` v2 for one rank, fields in declaration order as msgspec
/// writes them. Addresses are synthetic but distinct per rank and region.
fn agent_metadata(info: &HandshakeInfo, tp_rank: u32) -> Vec<u8> {
    let regions = u64::from(info.factors.num_hidden_layers.max(1));
    let region_bytes = u64::from(info.num_blocks) * info.block_len_bytes;
    let rank_base = BASE_ADDR + u64::from(tp_rank) * regions * region_bytes;
    let addrs = (0..regions)
        .map(|r| Value::from(rank_base + r * region_bytes))
        .collect();
    let lens = (0..regions)
        .map(|_| Value::from(info.block_len_bytes))
        .collect();
    let blob = format!("tandem-sim-nixl-agent:{}:{tp_rank}", info.engine_id);
    to_msgpack(&str_map(vec![
        ("engine_id", Value::from(info.engine_id.as_str())),
        ("agent_metadata", Value::Binary(blob.into_bytes())),
        ("kv_caches_base_addr", Value::Array(addrs)),
        ("device_id", Value::from(tp_rank)),
        ("num_blocks", Value::from(info.num_blocks)),
        ("block_lens", Value::Array(lens)),
        ("kv_cache_layout", Value::from(KV_CACHE_LAYOUT)),
        ("block_size", Value::from(info.block_size)),
    ]))
}

/// Encoded `NixlHandshakePayload` per TP rank, precomputed like vLLM's `encoded_data`.
fn handshake_payloads(info: &HandshakeInfo) -> Vec<Vec<u8>> {
    let hash = compatibility_hash(&info.factors);
    (0..info.tp_size)
        .map(|rank| {
            to_msgpack(&str_map(vec![
                ("compatibility_hash", Value::from(hash.as_str())),
                (
                    "agent_metadata_bytes",
                    Value::Binary(agent_metadata(info, rank)),
                ),
            ]))
        })
        .collect()
}

/// A parsed request.
#[derive(Debug, PartialEq)]
enum Request {
    /// `pp_rank` is `Some` for the newer 3-element form `(GET_META_MSG, pp_rank, tp_rank)`.
    Handshake {
        pp_rank: Option<u32>,
        tp_rank: u32,
    },
    Read {
        id: String,
        block_ids: Vec<u32>,
    },
    Notify {
        id: String,
        world_size: u32,
    },
}

fn parse_request(bytes: &[u8]) -> Result<Request, String> {
    let v = from_msgpack(bytes)?;
    let items = v.as_array().ok_or("request is not a msgpack array")?;
    // msgspec encodes Python bytes as bin; accept str too, for hand-written clients.
    let tag = match items.first() {
        Some(Value::Binary(b)) => b.as_slice(),
        Some(Value::String(s)) => s.as_bytes(),
        _ => return Err("request does not start with a bin/str tag".into()),
    };
    let bad = |what: &str| format!("malformed {what} request");
    match tag {
        GET_META_MSG => match items.len() {
            2 => Ok(Request::Handshake {
                pp_rank: None,
                tp_rank: as_u32(items.get(1)).ok_or_else(|| bad("handshake"))?,
            }),
            3 => Ok(Request::Handshake {
                pp_rank: Some(as_u32(items.get(1)).ok_or_else(|| bad("handshake"))?),
                tp_rank: as_u32(items.get(2)).ok_or_else(|| bad("handshake"))?,
            }),
            _ => Err(bad("handshake")),
        },
        TANDEM_READ_MSG => {
            let id = items
                .get(1)
                .and_then(Value::as_str)
                .ok_or_else(|| bad("read"))?;
            let block_ids = items
                .get(2)
                .and_then(Value::as_array)
                .ok_or_else(|| bad("read"))?
                .iter()
                .map(|b| as_u32(Some(b)).ok_or_else(|| bad("read")))
                .collect::<Result<_, _>>()?;
            Ok(Request::Read {
                id: id.to_string(),
                block_ids,
            })
        }
        TANDEM_NOTIF_MSG => {
            let payload = items
                .get(1)
                .and_then(Value::as_str)
                .ok_or_else(|| bad("notify"))?;
            // vLLM: `req_id, tp_size = notif.decode().rsplit(":", 1)`; request ids may contain ':'.
            let (id, ws) = payload.rsplit_once(':').ok_or_else(|| bad("notify"))?;
            let world_size = ws.parse().map_err(|_| bad("notify"))?;
            Ok(Request::Notify {
                id: id.to_string(),
                world_size,
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
        let endpoint = crate::kv_events::zmq_bind_endpoint(bind).map_err(SideChannelError::Bind)?;
        let mut router = RouterSocket::new();
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
        };
        let task = tokio::spawn(server.run(router, stop_rx));
        Ok((
            SideChannelHandle {
                stop: Some(stop_tx),
                task,
            },
            bound.to_string(),
        ))
    }
}

struct Server {
    payloads: Vec<Vec<u8>>,
    to_engine: mpsc::Sender<SideRequest>,
    stall: Arc<AtomicBool>,
    /// Origin of the newer protocol's `perf_counter` timestamp frame.
    started: Instant,
}

impl Server {
    async fn run(self, mut router: RouterSocket, mut stop: oneshot::Receiver<()>) {
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
                    send_reply(&mut router, identity, frames).await;
                }
            }
        }
        // Unbind so the port is closed once `shutdown` returns.
        for e in router.close().await {
            tracing::debug!("side-channel close: {e}");
        }
    }

    /// Parses one request; immediate answers become ready futures so all replies take one path.
    fn handle(&self, msg: ZmqMessage) -> Option<Pending> {
        let frames = msg.into_vec();
        let [identity, delimiter, body] = frames.as_slice() else {
            tracing::warn!(
                "side-channel: expected [identity, b\"\", msg], got {} frames",
                frames.len()
            );
            return None;
        };
        if !delimiter.is_empty() {
            tracing::warn!("side-channel: missing empty delimiter frame");
            return None;
        }
        let identity = identity.clone();
        let ready = |reply: Vec<u8>| -> Option<Pending> {
            Some(Box::pin(std::future::ready((
                identity.clone(),
                vec![Bytes::from(reply)],
            ))))
        };
        match parse_request(body) {
            Err(e) => {
                tracing::warn!("side-channel: {e}");
                ready(fail_reply(&e))
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
                    let e = format!(
                        "unknown rank: pp_rank {}, tp_rank {tp_rank} (tp_size {})",
                        pp_rank.unwrap_or(0),
                        self.payloads.len()
                    );
                    tracing::warn!("side-channel handshake: {e}");
                    return ready(to_msgpack(&str_map(vec![("error", Value::from(e))])));
                };
                let mut frames = vec![Bytes::from(payload.clone())];
                if pp_rank.is_some() {
                    // The newer protocol adds a 4th frame `msgpack(time.perf_counter())`, used
                    // by D to estimate the clock offset for lease expiry.
                    let ts = Value::F64(self.started.elapsed().as_secs_f64());
                    frames.push(Bytes::from(to_msgpack(&ts)));
                }
                Some(Box::pin(std::future::ready((identity, frames))))
            }
            Ok(Request::Read { id, block_ids }) => Some(engine_call(
                &self.to_engine,
                identity,
                |reply| SideRequest::Read {
                    remote_request_id: id,
                    block_ids,
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

// ---------------------------------------------------------------------------------------------
// Client
// ---------------------------------------------------------------------------------------------

/// `tcp://HOST:PORT` for zeromq's connect: `localhost` becomes `127.0.0.1` (the OS resolver may
/// answer `::1` first while servers bind IPv4) and IPv6 literals get brackets.
fn connect_endpoint(host: &str, port: u16) -> Result<String, SideChannelError> {
    match host {
        "" => Err(SideChannelError::Connect("empty host".into())),
        "localhost" => Ok(format!("tcp://127.0.0.1:{port}")),
        h if h.contains(':') && !h.starts_with('[') => Ok(format!("tcp://[{h}]:{port}")),
        h => Ok(format!("tcp://{h}:{port}")),
    }
}

async fn connect(endpoint: &str) -> Result<ReqSocket, SideChannelError> {
    let mut sock = ReqSocket::new();
    sock.connect(endpoint)
        .await
        .map_err(|e| SideChannelError::Connect(format!("{endpoint}: {e}")))?;
    Ok(sock)
}

async fn exchange(sock: &mut ReqSocket, request: Vec<u8>) -> Result<Vec<Bytes>, SideChannelError> {
    sock.send(ZmqMessage::from(request))
        .await
        .map_err(|e| SideChannelError::Connect(format!("send: {e}")))?;
    let reply = sock
        .recv()
        .await
        .map_err(|e| SideChannelError::Connect(format!("recv: {e}")))?;
    Ok(reply.into_vec())
}

/// Most idle connections kept per endpoint; enough for any realistic number of concurrent
/// transfers between one decode and one prefill engine.
const MAX_IDLE_PER_ENDPOINT: usize = 256;

/// Side-channel client that keeps idle REQ connections per endpoint and reuses them.
///
/// Reuse is not an optimisation: the zeromq crate's ROUTER never forgets a peer whose connection
/// the client closed cleanly (the write half stays in its peer map, the socket sits in
/// CLOSE_WAIT), so a fresh connection per call leaks one file descriptor in the *server* per
/// call. Engines that read and notify per request must hold one `SideChannelClient`; the free
/// functions ([`handshake`], [`read_blocks`], [`notify`]) open one connection per call and are
/// meant for rare calls such as vLLM's once-per-remote-engine handshake.
///
/// A connection is returned to the pool only after a complete request/reply. On a timeout or
/// error it is dropped, because a REQ socket whose reply never came refuses to send again, and
/// dropping it closes the connection so nothing outlives the call.
#[derive(Clone, Default)]
pub struct SideChannelClient {
    idle: Arc<Mutex<HashMap<String, Vec<ReqSocket>>>>,
}

impl std::fmt::Debug for SideChannelClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SideChannelClient")
            .field("idle_connections", &self.idle_connections())
            .finish()
    }
}

impl SideChannelClient {
    pub fn new() -> Self {
        Self::default()
    }

    /// Idle pooled connections over all endpoints.
    pub fn idle_connections(&self) -> usize {
        self.lock().values().map(Vec::len).sum()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<ReqSocket>>> {
        // The map stays consistent even if a holder panicked: every operation is a single push/pop.
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn take(&self, endpoint: &str) -> Option<ReqSocket> {
        self.lock().get_mut(endpoint)?.pop()
    }

    fn put(&self, endpoint: String, sock: ReqSocket) {
        let mut idle = self.lock();
        let socks = idle.entry(endpoint).or_default();
        if socks.len() < MAX_IDLE_PER_ENDPOINT {
            socks.push(sock);
        }
    }

    /// One request/reply exchange within `timeout`, on a pooled connection if there is one.
    async fn call(
        &self,
        host: &str,
        port: u16,
        request: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<Bytes>, SideChannelError> {
        let endpoint = connect_endpoint(host, port)?;
        let deadline = tokio::time::Instant::now() + timeout;
        if let Some(mut sock) = self.take(&endpoint) {
            match tokio::time::timeout_at(deadline, exchange(&mut sock, request.clone())).await {
                Err(_) => return Err(SideChannelError::Timeout),
                Ok(Ok(frames)) => {
                    self.put(endpoint, sock);
                    return Ok(frames);
                }
                // A pooled connection may be stale (the server restarted since): retry once on
                // a fresh one. The requests are idempotent enough for this: a READ is, and a
                // notification can only have been delivered if the server died right after.
                Ok(Err(SideChannelError::Connect(e))) => {
                    tracing::debug!("side-channel: stale pooled connection to {endpoint}: {e}");
                }
                Ok(Err(e)) => return Err(e),
            }
        }
        let fresh = async {
            let mut sock = connect(&endpoint).await?;
            let frames = exchange(&mut sock, request).await?;
            Ok::<_, SideChannelError>((sock, frames))
        };
        let (sock, frames) = tokio::time::timeout_at(deadline, fresh)
            .await
            .map_err(|_| SideChannelError::Timeout)??;
        self.put(endpoint, sock);
        Ok(frames)
    }

    /// vLLM's handshake for one remote TP rank: `[bin(b"get_meta_msg"), tp_rank]` (vLLM's timeout
    /// is [`DEFAULT_HANDSHAKE_TIMEOUT`]). Checking the hash and engine id is the caller's job.
    pub async fn handshake(
        &self,
        host: &str,
        port: u16,
        tp_rank: u32,
        timeout: Duration,
    ) -> Result<RemoteAgent, SideChannelError> {
        let request = to_msgpack(&Value::Array(vec![
            Value::Binary(GET_META_MSG.to_vec()),
            Value::from(tp_rank),
        ]));
        let frames = self.call(host, port, request, timeout).await?;
        let [frame] = frames.as_slice() else {
            return Err(protocol(format!(
                "expected 1 reply frame, got {}",
                frames.len()
            )));
        };
        decode_handshake(frame)
    }

    /// Simulated NIXL READ of `block_ids` held for `remote_request_id`; one byte string per block.
    pub async fn read_blocks(
        &self,
        host: &str,
        port: u16,
        remote_request_id: &str,
        block_ids: &[u32],
        timeout: Duration,
    ) -> Result<Vec<Vec<u8>>, SideChannelError> {
        let request = to_msgpack(&Value::Array(vec![
            Value::Binary(TANDEM_READ_MSG.to_vec()),
            Value::from(remote_request_id),
            Value::Array(block_ids.iter().map(|&b| Value::from(b)).collect()),
        ]));
        let reply = decode_ok(&self.call(host, port, request, timeout).await?)?;
        map_get(&reply, "blocks")
            .and_then(Value::as_array)
            .ok_or_else(|| protocol("read reply has no \"blocks\" array"))?
            .iter()
            .map(|b| {
                b.as_slice()
                    .map(<[u8]>::to_vec)
                    .ok_or_else(|| protocol("block is not bin"))
            })
            .collect()
    }

    /// Simulated NIXL notification `"{remote_request_id}:{world_size}"`: this consumer finished
    /// reading, so the producer may free the blocks once all `world_size` ranks notified.
    pub async fn notify(
        &self,
        host: &str,
        port: u16,
        remote_request_id: &str,
        world_size: u32,
        timeout: Duration,
    ) -> Result<(), SideChannelError> {
        let request = to_msgpack(&Value::Array(vec![
            Value::Binary(TANDEM_NOTIF_MSG.to_vec()),
            Value::from(format!("{remote_request_id}:{world_size}")),
        ]));
        decode_ok(&self.call(host, port, request, timeout).await?).map(|_| ())
    }
}

fn protocol(msg: impl Into<String>) -> SideChannelError {
    SideChannelError::Protocol(msg.into())
}

fn u64_list(v: Option<&Value>, field: &str) -> Result<Vec<u64>, SideChannelError> {
    v.and_then(Value::as_array)
        .ok_or_else(|| protocol(format!("{field} missing")))?
        .iter()
        .map(|x| {
            x.as_u64()
                .ok_or_else(|| protocol(format!("{field}: not uint")))
        })
        .collect()
}

/// Decodes a `NixlHandshakePayload` in two phases as vLLM does (outer map, then the agent bytes).
fn decode_handshake(frame: &[u8]) -> Result<RemoteAgent, SideChannelError> {
    let outer = from_msgpack(frame).map_err(protocol)?;
    if let Some(e) = map_get(&outer, "error") {
        return Err(SideChannelError::Remote(
            e.as_str().unwrap_or("unspecified error").to_string(),
        ));
    }
    let s = |v: &Value, k: &str| {
        map_get(v, k)
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| protocol(format!("{k} missing or not a str")))
    };
    let bin = |v: &Value, k: &str| {
        map_get(v, k)
            .and_then(Value::as_slice)
            .map(<[u8]>::to_vec)
            .ok_or_else(|| protocol(format!("{k} missing or not bin")))
    };
    let n =
        |v: &Value, k: &str| as_u32(map_get(v, k)).ok_or_else(|| protocol(format!("{k} missing")));
    let meta = from_msgpack(&bin(&outer, "agent_metadata_bytes")?).map_err(protocol)?;
    Ok(RemoteAgent {
        compatibility_hash: s(&outer, "compatibility_hash")?,
        engine_id: s(&meta, "engine_id")?,
        agent_metadata: bin(&meta, "agent_metadata")?,
        kv_caches_base_addr: u64_list(
            map_get(&meta, "kv_caches_base_addr"),
            "kv_caches_base_addr",
        )?,
        device_id: n(&meta, "device_id")?,
        num_blocks: n(&meta, "num_blocks")?,
        block_lens: u64_list(map_get(&meta, "block_lens"), "block_lens")?,
        kv_cache_layout: s(&meta, "kv_cache_layout")?,
        block_size: n(&meta, "block_size")?,
    })
}

/// Reads the `{"ok": bool, "error"?: str, ...}` envelope of the tandem requests.
fn decode_ok(frames: &[Bytes]) -> Result<Value, SideChannelError> {
    let [frame] = frames else {
        return Err(protocol(format!(
            "expected 1 reply frame, got {}",
            frames.len()
        )));
    };
    let v = from_msgpack(frame).map_err(protocol)?;
    match map_get(&v, "ok").and_then(Value::as_bool) {
        Some(true) => Ok(v),
        Some(false) => Err(SideChannelError::Remote(
            map_get(&v, "error")
                .and_then(Value::as_str)
                .unwrap_or("unspecified error")
                .to_string(),
        )),
        None => Err(protocol("reply has no boolean \"ok\"")),
    }
}

/// One-off [`SideChannelClient::handshake`] on its own connection (see the client's docs).
pub async fn handshake(
    host: &str,
    port: u16,
    tp_rank: u32,
    timeout: Duration,
) -> Result<RemoteAgent, SideChannelError> {
    SideChannelClient::new()
        .handshake(host, port, tp_rank, timeout)
        .await
}

/// One-off [`SideChannelClient::read_blocks`] on its own connection (see the client's docs).
pub async fn read_blocks(
    host: &str,
    port: u16,
    remote_request_id: &str,
    block_ids: &[u32],
    timeout: Duration,
) -> Result<Vec<Vec<u8>>, SideChannelError> {
    SideChannelClient::new()
        .read_blocks(host, port, remote_request_id, block_ids, timeout)
        .await
}

/// One-off [`SideChannelClient::notify`] on its own connection (see the client's docs).
pub async fn notify(
    host: &str,
    port: u16,
    remote_request_id: &str,
    world_size: u32,
    timeout: Duration,
) -> Result<(), SideChannelError> {
    SideChannelClient::new()
        .notify(host, port, remote_request_id, world_size, timeout)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn factors() -> CompatFactors {
        CompatFactors {
            vllm_version: "0.10.1".into(),
            nixl_connector_version: NIXL_CONNECTOR_VERSION,
            model: "Qwen/Qwen3-8B".into(),
            dtype: "torch.bfloat16".into(),
            num_kv_heads: 8,
            head_size: 128,
            num_hidden_layers: 36,
            attn_backend_name: "FLASH_ATTN".into(),
            cache_dtype: "auto".into(),
        }
    }

    fn info() -> HandshakeInfo {
        HandshakeInfo {
            engine_id: "prefill-0".into(),
            tp_size: 2,
            num_blocks: 1000,
            block_size: 16,
            block_len_bytes: 65536,
            factors: factors(),
        }
    }

    fn fd_count() -> usize {
        std::fs::read_dir("/proc/self/fd").unwrap().count()
    }

    #[tokio::test]
    async fn fd_leak_probe() {
        let (tx, _rx) = mpsc::channel(8);
        let (_h, ep) = SideChannelServer::start(
            "tcp://127.0.0.1:0",
            info(),
            tx,
            Arc::new(AtomicBool::new(false)),
        )
        .await
        .unwrap();
        let port: u16 = ep.rsplit_once(':').unwrap().1.parse().unwrap();
        handshake("127.0.0.1", port, 0, Duration::from_secs(5))
            .await
            .unwrap();
        let before = fd_count();
        for _ in 0..200 {
            handshake("127.0.0.1", port, 0, Duration::from_secs(5))
                .await
                .unwrap();
        }
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
        let after = fd_count();
        let states = std::process::Command::new("ss")
            .args(["-tanp"])
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&states.stdout).to_string();
        let close_wait = out
            .lines()
            .filter(|l| l.contains("CLOSE-WAIT") && l.contains(&port.to_string()))
            .count();
        _h.shutdown().await;
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
        println!(
            "fds before {before} after {after} close_wait {close_wait} after_shutdown {}",
            fd_count()
        );
    }
}
