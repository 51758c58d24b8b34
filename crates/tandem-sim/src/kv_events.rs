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
//! The pure codec ([`encode_batch`], [`decode_batch`], [`KvEvent`]) lives in `tandem-kvevents`,
//! shared with Tandem's own consumer, and is re-exported here.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;
use zeromq::{PubSocket, RouterSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

pub use tandem_kvevents::{decode_batch, encode_batch, CodecError, KvEvent, REPLAY_END_SEQ};

/// Bound of the queue between the engine and the publishing task; vLLM's `max_queue_size` default.
const QUEUE_CAPACITY: usize = 100_000;

/// Errors of the KV-event publisher.
#[derive(Debug, thiserror::Error)]
pub enum KvEventsError {
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
mod tests;
