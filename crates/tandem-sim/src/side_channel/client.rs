//! Side-channel clients: a pooled [`SideChannelClient`] and one-off free functions.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rmpv::Value;
use zeromq::{ReqSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

use super::{
    as_u32, from_msgpack, map_get, to_msgpack, RemoteAgent, SideChannelError, GET_META_MSG,
    TANDEM_GRANT_MSG, TANDEM_NOTIF_MSG, TANDEM_READ_MSG,
};

/// `tcp://HOST:PORT` for zeromq's connect: `localhost` becomes `127.0.0.1` (the OS resolver may
/// answer `::1` first while servers bind IPv4) and IPv6 literals get brackets.
pub(super) fn connect_endpoint(host: &str, port: u16) -> Result<String, SideChannelError> {
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

/// Most idle connections kept per endpoint: enough for the concurrent transfers between one
/// decode and one prefill engine, and well under the server's idle-peer bound so that several
/// decode engines' pools do not get reaped by one prefill server.
const MAX_IDLE_PER_ENDPOINT: usize = 32;

/// Side-channel client that keeps idle REQ connections per endpoint and reuses them. Engines
/// that read and notify per request should hold one (it is cheap to clone); the free functions
/// ([`handshake`], [`read_blocks`], [`notify`]) open one connection per call and suit rare calls
/// such as vLLM's once-per-remote-engine handshake.
///
/// Reuse saves a TCP and ZMTP handshake per call and, more importantly, connection churn on the
/// server: the zeromq crate's ROUTER keeps every cleanly closed connection in CLOSE_WAIT until
/// the server reaps it (see `Server::reap`). Pooled connections the server reaped are detected on
/// next use and replaced once, transparently.
///
/// A connection goes back to the pool only after a complete request/reply. On a timeout or
/// error it is dropped: a REQ socket whose reply never came refuses to send again, and dropping
/// it closes the connection so nothing outlives the call.
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
                Err(_) => {
                    tracing::debug!("side-channel: timed out on a pooled connection to {endpoint}");
                    return Err(SideChannelError::Timeout);
                }
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
        let mut connected = false;
        let fresh = async {
            let mut sock = connect(&endpoint).await?;
            connected = true;
            let frames = exchange(&mut sock, request).await?;
            Ok::<_, SideChannelError>((sock, frames))
        };
        let (sock, frames) = tokio::time::timeout_at(deadline, fresh)
            .await
            .map_err(|_| {
                tracing::debug!(
                    "side-channel: timed out on a fresh connection to {endpoint} (connected: {connected})"
                );
                SideChannelError::Timeout
            })??;
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

    /// The prefill side's grant before a real NIXL READ of `block_ids` (tandem sims only; see
    /// the module docs of `side_channel`): `Ok` once the blocks may be read.
    pub async fn grant(
        &self,
        host: &str,
        port: u16,
        remote_request_id: &str,
        block_ids: &[u32],
        timeout: Duration,
    ) -> Result<(), SideChannelError> {
        let request = to_msgpack(&Value::Array(vec![
            Value::Binary(TANDEM_GRANT_MSG.to_vec()),
            Value::from(remote_request_id),
            Value::Array(block_ids.iter().map(|&b| Value::from(b)).collect()),
        ]));
        decode_ok(&self.call(host, port, request, timeout).await?).map(|_| ())
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
        attn_backend_name: map_get(&meta, "attn_backend_name")
            .and_then(Value::as_str)
            .map(str::to_string),
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
