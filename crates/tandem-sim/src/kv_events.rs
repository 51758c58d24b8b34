//! vLLM's KV-cache event stream (`--kv-events-config`): ZMQ PUB publisher with a ROUTER replay socket.
//!
//! Wire contract (protocol spec §4, §7 item 19):
//! * live message = 3 frames `(topic utf-8, seq as 8-byte big-endian u64, payload)`, `seq` from 0 per
//!   publisher, +1 per published batch;
//! * payload = msgspec's `array_like` msgpack of `KVEventBatch`: `[ts(float64), [events...], dp_rank|nil]`;
//! * replay: a REQ/DEALER client sends the start seq (8 bytes BE); the ROUTER answers every buffered
//!   `seq >= start` as `(client_id, b"", seq_be8, payload)` and then the end marker
//!   `(client_id, b"", (-1i64).to_be_bytes(), b"")`.
//!
//! The pure codec ([`encode_batch`], [`decode_batch`]) is separate from the IO task so the engine and
//! Tandem's own consumer can share it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use rmpv::Value;
use tokio::sync::mpsc;
use zeromq::{PubSocket, RouterSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

/// `MEDIUM_GPU` in vLLM: every block this simulator caches lives in (simulated) GPU memory.
const MEDIUM_GPU: &str = "GPU";

/// End-of-replay marker: `(-1).to_bytes(8, "big", signed=True)`.
pub const REPLAY_END_SEQ: [u8; 8] = (-1i64).to_be_bytes();

/// Bound of the queue between the engine and the publishing task; vLLM's `max_queue_size` default.
const QUEUE_CAPACITY: usize = 100_000;

/// One KV-cache event, as vLLM's `BlockStored` / `BlockRemoved` / `AllBlocksCleared`.
#[derive(Debug, Clone, PartialEq)]
pub enum KvEvent {
    /// Newly full blocks were cached; `token_ids.len() == block_hashes.len() * block_size`.
    BlockStored {
        block_hashes: Vec<u64>,
        parent_block_hash: Option<u64>,
        token_ids: Vec<u32>,
        block_size: u32,
    },
    /// Cached blocks were evicted.
    BlockRemoved { block_hashes: Vec<u64> },
    /// The prefix cache was reset.
    AllBlocksCleared,
}

/// Errors of the KV-event codec and publisher.
#[derive(Debug, thiserror::Error)]
pub enum KvEventsError {
    /// The bytes are not valid msgpack.
    #[error("msgpack decode error: {0}")]
    Decode(String),
    /// Valid msgpack, but not a `KVEventBatch`.
    #[error("malformed KV event batch: {0}")]
    Malformed(String),
    /// The endpoint string is not usable.
    #[error("invalid endpoint {endpoint:?}: {reason}")]
    Endpoint { endpoint: String, reason: String },
    /// A ZMQ socket error (bind failure, ...).
    #[error("zmq error: {0}")]
    Zmq(#[from] zeromq::ZmqError),
}

/// Publisher configuration, mirroring vLLM's `KVEventsConfig` (protocol spec §4.1).
#[derive(Debug, Clone)]
pub struct KvEventsConfig {
    /// PUB endpoint, e.g. `tcp://127.0.0.1:0`; vLLM default `tcp://*:5557`.
    pub endpoint: String,
    /// ROUTER replay endpoint, always bound; `None` disables replay.
    pub replay_endpoint: Option<String>,
    /// First frame of every live message.
    pub topic: String,
    /// Replay ring size in batches (vLLM default 10 000).
    pub buffer_steps: usize,
    /// Stamped into every batch and used to offset TCP ports, as vLLM does for DP ranks.
    pub data_parallel_rank: Option<u32>,
}

impl Default for KvEventsConfig {
    /// vLLM's defaults.
    fn default() -> Self {
        Self {
            endpoint: "tcp://*:5557".to_string(),
            replay_endpoint: None,
            topic: String::new(),
            buffer_steps: 10_000,
            data_parallel_rank: None,
        }
    }
}

/// Endpoints actually bound (port 0 resolved).
#[derive(Debug, Clone)]
pub struct KvEventsBound {
    /// e.g. `tcp://127.0.0.1:41234`.
    pub endpoint: String,
    pub replay_endpoint: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Codec
// ---------------------------------------------------------------------------------------------

fn u64_array(values: &[u64]) -> Value {
    Value::Array(values.iter().map(|&v| Value::from(v)).collect())
}

fn event_value(event: &KvEvent) -> Value {
    match event {
        KvEvent::BlockStored {
            block_hashes,
            parent_block_hash,
            token_ids,
            block_size,
        } => Value::Array(vec![
            Value::from("BlockStored"),
            u64_array(block_hashes),
            parent_block_hash.map_or(Value::Nil, Value::from),
            Value::Array(token_ids.iter().map(|&t| Value::from(t)).collect()),
            Value::from(*block_size),
            Value::Nil, // lora_id
            Value::from(MEDIUM_GPU),
            Value::Nil, // lora_name
            Value::Nil, // extra_keys
            Value::Nil, // group_idx
            Value::Nil, // kv_cache_spec_kind
            Value::Nil, // kv_cache_spec_sliding_window
        ]),
        KvEvent::BlockRemoved { block_hashes } => Value::Array(vec![
            Value::from("BlockRemoved"),
            u64_array(block_hashes),
            Value::from(MEDIUM_GPU),
            Value::Nil, // group_idx
        ]),
        KvEvent::AllBlocksCleared => Value::Array(vec![Value::from("AllBlocksCleared")]),
    }
}

/// Pure encoding of one batch in vLLM's `array_like` msgpack layout:
/// `[ts(float64), [events...], data_parallel_rank|nil]`; events as
/// `["BlockStored", hashes(u64 array), parent|nil, token_ids, block_size, lora_id(nil), medium("GPU"),
/// lora_name(nil), extra_keys(nil), group_idx(nil), kv_cache_spec_kind(nil), kv_cache_spec_sliding_window(nil)]`,
/// `["BlockRemoved", hashes, medium("GPU"), group_idx(nil)]`, `["AllBlocksCleared"]`.
///
/// Every field is present, `nil` when `None`: msgspec ignores `omit_defaults` for `array_like` structs
/// (msgspec issue #720). `ts` is always float64 because msgspec encodes Python floats that way;
/// integers take their most compact msgpack form, as msgspec does.
pub fn encode_batch(ts: f64, events: &[KvEvent], data_parallel_rank: Option<u32>) -> Vec<u8> {
    let batch = Value::Array(vec![
        Value::F64(ts),
        Value::Array(events.iter().map(event_value).collect()),
        data_parallel_rank.map_or(Value::Nil, Value::from),
    ]);
    let mut out = Vec::with_capacity(64);
    // Writing into a Vec cannot fail.
    rmpv::encode::write_value(&mut out, &batch).expect("msgpack encode into Vec");
    out
}

fn malformed(msg: impl Into<String>) -> KvEventsError {
    KvEventsError::Malformed(msg.into())
}

/// A block hash is a msgpack uint (default, `VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1`) or the raw digest
/// bytes; for bytes we take the last 8 bytes big-endian, which equals vLLM's `int & (2^64-1)` and
/// llm-d's `getHashAsUint64`.
fn hash_value(v: &Value) -> Result<u64, KvEventsError> {
    if let Some(n) = v.as_u64() {
        return Ok(n);
    }
    if let Some(n) = v.as_i64() {
        // Only negative i64 reach here; keep the two's-complement low 64 bits.
        return Ok(n as u64);
    }
    if let Some(b) = v.as_slice() {
        let tail = &b[b.len().saturating_sub(8)..];
        return Ok(tail.iter().fold(0u64, |acc, &x| (acc << 8) | u64::from(x)));
    }
    Err(malformed(format!("block hash is not an int or bytes: {v}")))
}

fn hash_list(v: Option<&Value>, field: &str) -> Result<Vec<u64>, KvEventsError> {
    let arr = v
        .and_then(Value::as_array)
        .ok_or_else(|| malformed(format!("{field} is missing or not an array")))?;
    arr.iter().map(hash_value).collect()
}

fn u32_field(v: Option<&Value>, field: &str) -> Result<u32, KvEventsError> {
    v.and_then(Value::as_u64)
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| malformed(format!("{field} is missing or not a u32")))
}

fn opt_hash(v: Option<&Value>) -> Result<Option<u64>, KvEventsError> {
    match v {
        None | Some(Value::Nil) => Ok(None),
        Some(h) => hash_value(h).map(Some),
    }
}

/// Builds an event from its tag and a field lookup; `None` for tags this simulator does not model
/// (newer vLLM may add event kinds; like llm-d we skip them rather than reject the whole batch).
fn build_event<'a>(
    tag: &str,
    field: impl Fn(&str) -> Option<&'a Value>,
) -> Result<Option<KvEvent>, KvEventsError> {
    Ok(Some(match tag {
        "BlockStored" => {
            let token_ids = field("token_ids")
                .and_then(Value::as_array)
                .ok_or_else(|| malformed("token_ids is missing or not an array"))?
                .iter()
                .map(|t| {
                    t.as_u64()
                        .and_then(|n| u32::try_from(n).ok())
                        .ok_or_else(|| malformed(format!("token id is not a u32: {t}")))
                })
                .collect::<Result<_, _>>()?;
            KvEvent::BlockStored {
                block_hashes: hash_list(field("block_hashes"), "block_hashes")?,
                parent_block_hash: opt_hash(field("parent_block_hash"))?,
                token_ids,
                block_size: u32_field(field("block_size"), "block_size")?,
            }
        }
        "BlockRemoved" => KvEvent::BlockRemoved {
            block_hashes: hash_list(field("block_hashes"), "block_hashes")?,
        },
        "AllBlocksCleared" => KvEvent::AllBlocksCleared,
        _ => return Ok(None),
    }))
}

/// Positional field names of the array form, in msgspec declaration order (tag excluded).
fn positional_fields(tag: &str) -> &'static [&'static str] {
    match tag {
        "BlockStored" => &[
            "block_hashes",
            "parent_block_hash",
            "token_ids",
            "block_size",
        ],
        "BlockRemoved" => &["block_hashes"],
        _ => &[],
    }
}

fn map_get<'a>(map: &'a [(Value, Value)], key: &str) -> Option<&'a Value> {
    map.iter()
        .find(|(k, _)| k.as_str() == Some(key))
        .map(|(_, v)| v)
}

fn decode_event(v: &Value) -> Result<Option<KvEvent>, KvEventsError> {
    match v {
        Value::Array(items) => {
            let tag = items
                .first()
                .and_then(Value::as_str)
                .ok_or_else(|| malformed("event array does not start with a string tag"))?;
            let names = positional_fields(tag);
            // Length guards: a missing trailing field reads as absent (older vLLM), extra trailing
            // fields (newer vLLM) are never looked at.
            build_event(tag, |name| {
                let pos = names.iter().position(|n| *n == name)?;
                items.get(pos + 1)
            })
        }
        Value::Map(map) => {
            let tag = map_get(map, "type")
                .and_then(Value::as_str)
                .ok_or_else(|| malformed("event map has no string \"type\" tag"))?;
            build_event(tag, |name| map_get(map, name))
        }
        other => Err(malformed(format!(
            "event is neither array nor map: {other}"
        ))),
    }
}

fn decode_ts(v: Option<&Value>) -> Result<f64, KvEventsError> {
    match v {
        Some(Value::F64(f)) => Ok(*f),
        Some(Value::F32(f)) => Ok(f64::from(*f)),
        // Lenient: a producer may encode an integral timestamp as an int.
        Some(Value::Integer(i)) => i.as_f64().ok_or_else(|| malformed("ts out of range")),
        _ => Err(malformed("ts is missing or not a number")),
    }
}

fn decode_dp_rank(v: Option<&Value>) -> Result<Option<u32>, KvEventsError> {
    match v {
        None | Some(Value::Nil) => Ok(None),
        Some(r) => r
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| malformed("data_parallel_rank is not a u32")),
    }
}

/// Decodes one `KVEventBatch` payload into `(ts, events, data_parallel_rank)`.
///
/// Accepts the `array_like` form `[ts, events, dp_rank?]` (the third element is absent in older
/// vLLM), events as tagged arrays of any length (positional with length guards) or as maps with a
/// `"type"` tag (the newer non-`array_like` revision), and the batch itself as a map
/// `{"ts", "events", "data_parallel_rank"}`. Unknown event tags are skipped.
pub fn decode_batch(bytes: &[u8]) -> Result<(f64, Vec<KvEvent>, Option<u32>), KvEventsError> {
    let mut rd = bytes;
    let value =
        rmpv::decode::read_value(&mut rd).map_err(|e| KvEventsError::Decode(e.to_string()))?;
    if !rd.is_empty() {
        return Err(malformed(format!("{} trailing bytes", rd.len())));
    }
    let (ts, events, dp) = match &value {
        Value::Array(items) => (items.first(), items.get(1), items.get(2)),
        Value::Map(map) => (
            map_get(map, "ts"),
            map_get(map, "events"),
            map_get(map, "data_parallel_rank"),
        ),
        other => {
            return Err(malformed(format!(
                "batch is neither array nor map: {other}"
            )))
        }
    };
    let ts = decode_ts(ts)?;
    let events = events
        .and_then(Value::as_array)
        .ok_or_else(|| malformed("events is missing or not an array"))?
        .iter()
        .filter_map(|e| decode_event(e).transpose())
        .collect::<Result<Vec<_>, _>>()?;
    Ok((ts, events, decode_dp_rank(dp)?))
}

// ---------------------------------------------------------------------------------------------
// Endpoints
// ---------------------------------------------------------------------------------------------

/// vLLM's `offset_endpoint_port`: TCP port + DP rank. Port 0 (ephemeral) is left alone, since
/// "0 + rank" would turn an ephemeral bind into a fixed low port.
pub fn offset_endpoint_port(endpoint: &str, data_parallel_rank: u32) -> String {
    if !endpoint.starts_with("tcp://") {
        return endpoint.to_string();
    }
    match endpoint.rsplit_once(':') {
        Some((base, port)) => match port.parse::<u32>() {
            Ok(p) if p != 0 => format!("{base}:{}", p + data_parallel_rank),
            _ => endpoint.to_string(),
        },
        None => endpoint.to_string(),
    }
}

/// Rewrites a vLLM-style bind endpoint into one the `zeromq` crate can bind: it hands the host
/// string straight to the OS resolver, which knows neither libzmq's `*` wildcard nor (on some
/// hosts) prefers IPv4 for `localhost`. Shared with the side channel.
pub(crate) fn zmq_bind_endpoint(endpoint: &str) -> Result<String, String> {
    if let Some(rest) = endpoint.strip_prefix("tcp://") {
        let (host, port) = rest
            .rsplit_once(':')
            .ok_or_else(|| format!("{endpoint:?}: expected tcp://HOST:PORT"))?;
        let host = match host {
            "*" => "0.0.0.0",
            "localhost" => "127.0.0.1",
            h => h,
        };
        return Ok(format!("tcp://{host}:{port}"));
    }
    if endpoint.starts_with("ipc://") {
        return Ok(endpoint.to_string());
    }
    Err(format!(
        "{endpoint:?}: only tcp:// and ipc:// are supported (the zeromq crate has no inproc)"
    ))
}

fn bind_endpoint(endpoint: &str) -> Result<String, KvEventsError> {
    zmq_bind_endpoint(endpoint).map_err(|reason| KvEventsError::Endpoint {
        endpoint: endpoint.to_string(),
        reason,
    })
}

// ---------------------------------------------------------------------------------------------
// Publisher
// ---------------------------------------------------------------------------------------------

/// Handle used by the engine to publish one batch per scheduler step. Cheap to clone; the
/// publishing task stops once every clone is dropped.
#[derive(Debug, Clone)]
pub struct KvEventPublisher {
    tx: mpsc::Sender<(f64, Vec<KvEvent>)>,
    dropped: Arc<AtomicU64>,
}

impl KvEventPublisher {
    /// Binds PUB (and ROUTER replay if configured), spawns the publishing task; returns once bound.
    ///
    /// Unlike vLLM, which *connects* the PUB socket when the host is not a wildcard, this always
    /// binds: the simulator is the stable end, and port 0 needs a bind to be resolved.
    pub async fn start(
        cfg: KvEventsConfig,
    ) -> Result<(KvEventPublisher, KvEventsBound), KvEventsError> {
        let offset = |ep: &str| match cfg.data_parallel_rank {
            Some(rank) => offset_endpoint_port(ep, rank),
            None => ep.to_string(),
        };
        let mut pub_socket = PubSocket::new();
        let endpoint = pub_socket
            .bind(&bind_endpoint(&offset(&cfg.endpoint))?)
            .await?
            .to_string();
        let (replay, replay_endpoint) = match &cfg.replay_endpoint {
            Some(ep) => {
                let mut router = RouterSocket::new();
                let bound = router.bind(&bind_endpoint(&offset(ep))?).await?;
                (Some(router), Some(bound.to_string()))
            }
            None => (None, None),
        };
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        let task = PublishTask {
            pub_socket,
            replay,
            topic: Bytes::from(cfg.topic.into_bytes()),
            buffer: VecDeque::new(),
            // A zero-size ring would make replay useless but is what the config says; keep >= 0.
            buffer_steps: cfg.buffer_steps,
            data_parallel_rank: cfg.data_parallel_rank,
            next_seq: 0,
        };
        tokio::spawn(task.run(rx));
        Ok((
            KvEventPublisher {
                tx,
                dropped: Arc::new(AtomicU64::new(0)),
            },
            KvEventsBound {
                endpoint,
                replay_endpoint,
            },
        ))
    }

    /// Queue one batch (one scheduler step). Empty batches are not published. Never blocks: when
    /// the queue is full the batch is dropped and counted (see [`Self::dropped_batches`]), because
    /// stalling the scheduler on a slow event consumer would distort every timing the simulator
    /// models.
    pub fn publish(&self, ts: f64, events: Vec<KvEvent>) {
        if events.is_empty() {
            return;
        }
        match self.tx.try_send((ts, events)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("KV event queue full; dropping one batch");
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                tracing::debug!("KV event publisher task has stopped; batch discarded");
            }
        }
    }

    /// Batches dropped because the queue was full.
    pub fn dropped_batches(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// State owned by the background task: the sockets, the sequence counter and the replay ring.
struct PublishTask {
    pub_socket: PubSocket,
    replay: Option<RouterSocket>,
    topic: Bytes,
    buffer: VecDeque<(u64, Bytes)>,
    buffer_steps: usize,
    data_parallel_rank: Option<u32>,
    next_seq: u64,
}

/// Receives from the replay socket if there is one; otherwise never completes, so the `select!`
/// below needs no separate branch shape for "replay disabled".
async fn recv_replay(replay: &mut Option<RouterSocket>) -> zeromq::ZmqResult<ZmqMessage> {
    match replay {
        Some(router) => router.recv().await,
        None => std::future::pending().await,
    }
}

fn multipart(frames: Vec<Bytes>) -> ZmqMessage {
    ZmqMessage::try_from(frames).expect("non-empty frame list")
}

impl PublishTask {
    async fn run(mut self, mut rx: mpsc::Receiver<(f64, Vec<KvEvent>)>) {
        loop {
            // Both branches are cancel-safe: `mpsc::Receiver::recv` is, and `RouterSocket::recv`
            // returns as soon as its fair queue yields a message, with no await after that.
            tokio::select! {
                item = rx.recv() => match item {
                    Some((ts, events)) => self.publish(ts, &events).await,
                    None => break,
                },
                req = recv_replay(&mut self.replay) => match req {
                    Ok(msg) => self.serve_replay(msg).await,
                    Err(e) => tracing::warn!("KV event replay socket error: {e}"),
                },
            }
        }
    }

    async fn publish(&mut self, ts: f64, events: &[KvEvent]) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let payload = Bytes::from(encode_batch(ts, events, self.data_parallel_rank));
        let msg = multipart(vec![
            self.topic.clone(),
            Bytes::copy_from_slice(&seq.to_be_bytes()),
            payload.clone(),
        ]);
        // PUB never blocks on subscribers (a full per-subscriber queue drops, per ZMTP); an error
        // here is a socket-level failure that must not stop the engine.
        if let Err(e) = self.pub_socket.send(msg).await {
            tracing::warn!("KV event publish failed for seq {seq}: {e}");
        }
        if self.buffer_steps > 0 {
            if self.buffer.len() == self.buffer_steps {
                self.buffer.pop_front();
            }
            self.buffer.push_back((seq, payload));
        }
    }

    /// vLLM's `_service_replay`: exactly `(client_id, b"", start_seq)` is served; anything else is
    /// logged and ignored, as vLLM does.
    async fn serve_replay(&mut self, msg: ZmqMessage) {
        let frames = msg.into_vec();
        let [client_id, _delimiter, start] = frames.as_slice() else {
            tracing::warn!("invalid KV event replay request: {} frames", frames.len());
            return;
        };
        if start.len() > 8 {
            tracing::warn!("invalid KV event replay start seq: {} bytes", start.len());
            return;
        }
        // `int.from_bytes(start, "big")`: shorter frames are zero-extended on the left.
        let start_seq = start.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b));
        let Some(router) = self.replay.as_mut() else {
            return;
        };
        for (seq, payload) in self.buffer.iter().filter(|(s, _)| *s >= start_seq) {
            let reply = multipart(vec![
                client_id.clone(),
                Bytes::new(),
                Bytes::copy_from_slice(&seq.to_be_bytes()),
                payload.clone(),
            ]);
            if let Err(e) = router.send(reply).await {
                // The client went away mid-replay; nothing left to serve it.
                tracing::debug!("KV event replay aborted: {e}");
                return;
            }
        }
        let end = multipart(vec![
            client_id.clone(),
            Bytes::new(),
            Bytes::copy_from_slice(&REPLAY_END_SEQ),
            Bytes::new(),
        ]);
        if let Err(e) = router.send(end).await {
            tracing::debug!("KV event replay end marker not delivered: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use zeromq::{DealerSocket, ReqSocket, SubSocket};

    fn stored(hashes: Vec<u64>, parent: Option<u64>, tokens: Vec<u32>, bs: u32) -> KvEvent {
        KvEvent::BlockStored {
            block_hashes: hashes,
            parent_block_hash: parent,
            token_ids: tokens,
            block_size: bs,
        }
    }

    fn encode(v: &Value) -> Vec<u8> {
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, v).unwrap();
        out
    }

    #[test]
    fn roundtrip() {
        let events = vec![
            stored(vec![1, u64::MAX, 1 << 40], Some(7), (0..48).collect(), 16),
            stored(vec![9], None, vec![70_000; 16], 16),
            KvEvent::BlockRemoved {
                block_hashes: vec![1, u64::MAX],
            },
            KvEvent::AllBlocksCleared,
        ];
        for dp in [None, Some(0), Some(3)] {
            let bytes = encode_batch(1_717_000_000.25, &events, dp);
            let (ts, decoded, rank) = decode_batch(&bytes).unwrap();
            assert_eq!(ts, 1_717_000_000.25);
            assert_eq!(decoded, events);
            assert_eq!(rank, dp);
        }
    }

    /// Hand-computed msgpack of `[1.5, [BlockStored{hashes [7, 2^64-1], parent None, tokens [1, 300],
    /// block_size 2}], None]`, i.e. what msgspec emits for the `array_like` structs.
    #[test]
    fn exact_bytes_of_small_block_stored_batch() {
        let bytes = encode_batch(
            1.5,
            &[stored(vec![7, u64::MAX], None, vec![1, 300], 2)],
            None,
        );
        #[rustfmt::skip]
        let expected: Vec<u8> = vec![
            0x93,                                           // fixarray(3): EventBatch
            0xcb, 0x3f, 0xf8, 0, 0, 0, 0, 0, 0,             // float64 1.5 (ts)
            0x91,                                           // fixarray(1): events
            0x9c,                                           // fixarray(12): BlockStored
            0xab, b'B', b'l', b'o', b'c', b'k', b'S', b't', b'o', b'r', b'e', b'd', // fixstr(11) tag
            0x92, 0x07, 0xcf, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, // [7, uint64 max]
            0xc0,                                           // parent_block_hash nil
            0x92, 0x01, 0xcd, 0x01, 0x2c,                   // token_ids [1, uint16 300]
            0x02,                                           // block_size 2
            0xc0,                                           // lora_id nil
            0xa3, b'G', b'P', b'U',                         // medium "GPU"
            0xc0, 0xc0, 0xc0, 0xc0, 0xc0,                   // lora_name, extra_keys, group_idx, kind, window
            0xc0,                                           // data_parallel_rank nil
        ];
        assert_eq!(bytes, expected);
    }

    #[test]
    fn exact_bytes_of_removed_and_cleared() {
        let bytes = encode_batch(
            0.0,
            &[
                KvEvent::BlockRemoved {
                    block_hashes: vec![5],
                },
                KvEvent::AllBlocksCleared,
            ],
            Some(1),
        );
        let mut expected = vec![0x93, 0xcb, 0, 0, 0, 0, 0, 0, 0, 0, 0x92];
        expected.extend_from_slice(&[0x94, 0xac]);
        expected.extend_from_slice(b"BlockRemoved");
        expected.extend_from_slice(&[0x91, 0x05, 0xa3, b'G', b'P', b'U', 0xc0]);
        expected.extend_from_slice(&[0x91, 0xb0]);
        expected.extend_from_slice(b"AllBlocksCleared");
        expected.push(0x01);
        assert_eq!(bytes, expected);
    }

    #[test]
    fn decodes_map_form() {
        let s = |x: &str| Value::from(x);
        let stored_map = Value::Map(vec![
            (s("type"), s("BlockStored")),
            (s("block_hashes"), Value::Array(vec![Value::from(11u64)])),
            (s("parent_block_hash"), Value::from(10u64)),
            (s("token_ids"), Value::Array(vec![Value::from(4u32); 4])),
            (s("block_size"), Value::from(4u32)),
            (s("lora_id"), Value::Nil),
            (s("medium"), s("GPU")),
            (s("group_idx"), Value::from(0u32)),
        ]);
        let removed_map = Value::Map(vec![
            (s("type"), s("BlockRemoved")),
            // Raw-digest form (VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0): last 8 bytes, big-endian.
            (
                s("block_hashes"),
                Value::Array(vec![Value::from(
                    [vec![0xaa; 24], vec![0, 0, 0, 0, 0, 0, 1, 2]].concat(),
                )]),
            ),
            (s("medium"), s("GPU")),
        ]);
        let cleared_map = Value::Map(vec![(s("type"), s("AllBlocksCleared"))]);
        let unknown = Value::Map(vec![(s("type"), s("SomethingNewer"))]);
        let batch = Value::Map(vec![
            (s("ts"), Value::F64(2.0)),
            (
                s("events"),
                Value::Array(vec![stored_map, removed_map, unknown, cleared_map]),
            ),
            (s("data_parallel_rank"), Value::from(2u32)),
        ]);
        let (ts, events, dp) = decode_batch(&encode(&batch)).unwrap();
        assert_eq!(ts, 2.0);
        assert_eq!(dp, Some(2));
        assert_eq!(
            events,
            vec![
                stored(vec![11], Some(10), vec![4; 4], 4),
                KvEvent::BlockRemoved {
                    block_hashes: vec![0x0102]
                },
                KvEvent::AllBlocksCleared,
            ]
        );
    }

    /// vLLM v0.9: `[ts, events]` without dp rank, 5-field BlockStored, 2-field BlockRemoved; plus a
    /// longer-than-known event to check that extra trailing fields are ignored.
    #[test]
    fn decodes_short_and_long_array_forms() {
        let hashes = Value::Array(vec![Value::from(3u64)]);
        let batch = Value::Array(vec![
            Value::F64(9.0),
            Value::Array(vec![
                Value::Array(vec![
                    Value::from("BlockStored"),
                    hashes.clone(),
                    Value::Nil,
                    Value::Array(vec![Value::from(1u32), Value::from(2u32)]),
                    Value::from(2u32),
                ]),
                Value::Array(vec![Value::from("BlockRemoved"), hashes.clone()]),
                Value::Array(vec![
                    Value::from("BlockRemoved"),
                    hashes,
                    Value::from("GPU"),
                    Value::Nil,
                    Value::from("a future field"),
                ]),
            ]),
        ]);
        let (ts, events, dp) = decode_batch(&encode(&batch)).unwrap();
        assert_eq!((ts, dp), (9.0, None));
        let removed = KvEvent::BlockRemoved {
            block_hashes: vec![3],
        };
        assert_eq!(
            events,
            vec![
                stored(vec![3], None, vec![1, 2], 2),
                removed.clone(),
                removed
            ]
        );
    }

    #[test]
    fn rejects_garbage() {
        assert!(matches!(
            decode_batch(&[0x92, 0xcb]), // truncated
            Err(KvEventsError::Decode(_))
        ));
        assert!(matches!(
            decode_batch(&encode(&Value::from(3u32))),
            Err(KvEventsError::Malformed(_))
        ));
        let no_tokens = Value::Array(vec![
            Value::F64(0.0),
            Value::Array(vec![Value::Array(vec![Value::from("BlockStored")])]),
        ]);
        assert!(matches!(
            decode_batch(&encode(&no_tokens)),
            Err(KvEventsError::Malformed(_))
        ));
        let mut trailing = encode_batch(0.0, &[KvEvent::AllBlocksCleared], None);
        trailing.push(0xc0);
        assert!(decode_batch(&trailing).is_err());
    }

    #[test]
    fn endpoint_rewrites() {
        assert_eq!(
            offset_endpoint_port("tcp://*:5557", 2),
            "tcp://*:5559".to_string()
        );
        assert_eq!(
            offset_endpoint_port("tcp://127.0.0.1:0", 2),
            "tcp://127.0.0.1:0"
        );
        assert_eq!(offset_endpoint_port("ipc:///tmp/x", 2), "ipc:///tmp/x");
        assert_eq!(bind_endpoint("tcp://*:5557").unwrap(), "tcp://0.0.0.0:5557");
        assert_eq!(
            bind_endpoint("tcp://localhost:0").unwrap(),
            "tcp://127.0.0.1:0"
        );
        assert!(bind_endpoint("inproc://x").is_err());
    }

    fn cfg(replay: bool) -> KvEventsConfig {
        KvEventsConfig {
            endpoint: "tcp://127.0.0.1:0".to_string(),
            replay_endpoint: replay.then(|| "tcp://127.0.0.1:0".to_string()),
            topic: "kv@pod-a@model".to_string(),
            buffer_steps: 3,
            data_parallel_rank: Some(0),
        }
    }

    fn seq_of(frame: &[u8]) -> u64 {
        u64::from_be_bytes(frame.try_into().expect("8-byte seq frame"))
    }

    /// Receives one live message and checks the 3-frame shape.
    async fn recv_live(sub: &mut SubSocket) -> (u64, Vec<KvEvent>) {
        let msg = tokio::time::timeout(Duration::from_secs(5), sub.recv())
            .await
            .expect("live message within 5 s")
            .unwrap();
        let frames = msg.into_vec();
        assert_eq!(frames.len(), 3);
        assert_eq!(&frames[0][..], b"kv@pod-a@model");
        let (_, events, dp) = decode_batch(&frames[2]).unwrap();
        assert_eq!(dp, Some(0));
        (seq_of(&frames[1]), events)
    }

    #[tokio::test]
    async fn live_pub_sub_in_order() {
        let (publisher, bound) = KvEventPublisher::start(cfg(false)).await.unwrap();
        assert!(bound.endpoint.starts_with("tcp://127.0.0.1:"));
        assert!(!bound.endpoint.ends_with(":0"));
        assert!(bound.replay_endpoint.is_none());

        let mut sub = SubSocket::new();
        sub.connect(&bound.endpoint).await.unwrap();
        sub.subscribe("kv@pod-a").await.unwrap();

        // Slow joiner: the PUB side registers the subscription asynchronously and silently drops
        // what it publishes before that. Publish warm-up batches until one arrives (bounded); the
        // short recv timeout only paces the loop, no assertion depends on timing.
        let warm = vec![KvEvent::AllBlocksCleared];
        publisher.publish(0.0, Vec::new()); // empty batches are not published (no seq consumed)
        let mut last_seq = None;
        for _ in 0..250 {
            publisher.publish(0.0, warm.clone());
            if let Ok(msg) = tokio::time::timeout(Duration::from_millis(20), sub.recv()).await {
                let frames = msg.unwrap().into_vec();
                last_seq = Some(seq_of(&frames[1]));
                break;
            }
        }
        let mut last_seq = last_seq.expect("subscriber joined within 250 warm-up batches");

        let real = [
            vec![stored(vec![1], None, vec![1, 2], 2)],
            vec![stored(vec![2, 3], Some(1), vec![3, 4, 5, 6], 2)],
            vec![KvEvent::BlockRemoved {
                block_hashes: vec![1, 2, 3],
            }],
        ];
        for (i, events) in real.iter().enumerate() {
            publisher.publish(10.0 + i as f64, events.clone());
        }
        // Remaining warm-up batches may still be queued; after the subscription took effect every
        // batch arrives, so seqs must be contiguous and the real batches come last, in order.
        let mut got = Vec::new();
        while got.len() < real.len() {
            let (seq, events) = recv_live(&mut sub).await;
            assert_eq!(seq, last_seq + 1, "contiguous, in-order sequence numbers");
            last_seq = seq;
            if events != warm {
                got.push(events);
            }
        }
        assert_eq!(got, real.to_vec());
    }

    async fn replay_via_dealer(endpoint: &str, start: u64) -> Vec<(u64, Vec<u8>)> {
        let mut dealer = DealerSocket::new();
        dealer.connect(endpoint).await.unwrap();
        // A DEALER must add the empty delimiter REQ would add: the server wants exactly 3 frames.
        let req = multipart(vec![
            Bytes::new(),
            Bytes::copy_from_slice(&start.to_be_bytes()),
        ]);
        dealer.send(req).await.unwrap();
        let mut out = Vec::new();
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(5), dealer.recv())
                .await
                .expect("replay answer within 5 s")
                .unwrap();
            let frames = msg.into_vec();
            assert!(frames[0].is_empty(), "delimiter frame");
            if frames[1][..] == REPLAY_END_SEQ {
                assert_eq!(frames.len(), 3);
                assert!(frames[2].is_empty());
                return out;
            }
            assert_eq!(frames.len(), 3);
            out.push((seq_of(&frames[1]), frames[2].to_vec()));
        }
    }

    #[tokio::test]
    async fn replay_from_seq_with_end_marker() {
        let (publisher, bound) = KvEventPublisher::start(cfg(true)).await.unwrap();
        let replay = bound.replay_endpoint.clone().unwrap();
        assert!(!replay.ends_with(":0"));

        // Nobody subscribes: publishing still assigns seqs and fills the ring (size 3).
        for i in 0..5u64 {
            publisher.publish(i as f64, vec![stored(vec![i], None, vec![0; 4], 4)]);
        }
        // Replay requests are served in the same task after queued batches only if those were
        // dequeued first; ask until all 5 batches are visible (bounded), ring keeps seqs 2..=4.
        let mut got = Vec::new();
        for _ in 0..100 {
            got = replay_via_dealer(&replay, 0).await;
            if got.last().map(|(s, _)| *s) == Some(4) {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(
            got.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            vec![2, 3, 4]
        );
        for (seq, payload) in &got {
            let (ts, events, _) = decode_batch(payload).unwrap();
            assert_eq!(ts, *seq as f64);
            assert_eq!(events, vec![stored(vec![*seq], None, vec![0; 4], 4)]);
        }

        // From a given seq, via REQ (which adds the delimiter itself).
        let mut req = ReqSocket::new();
        req.connect(&replay).await.unwrap();
        req.send(ZmqMessage::from(4u64.to_be_bytes().to_vec()))
            .await
            .unwrap();
        let first = req.recv().await.unwrap().into_vec();
        assert_eq!(seq_of(&first[0]), 4);
        assert_eq!(decode_batch(&first[1]).unwrap().0, 4.0);

        // Beyond the newest seq: only the end marker.
        assert!(replay_via_dealer(&replay, 99).await.is_empty());
    }
}
