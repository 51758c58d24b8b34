//! The edge: a ZMQ SUB to one engine's KV-event publisher, with gap recovery through vLLM's replay
//! socket, delivering batches in sequence order to a channel.
//!
//! Wire (protocol spec §4.2): live messages are 3 frames `(topic, seq as 8-byte big-endian,
//! payload)`, `seq` counting from 0 per publisher process. Replay: a DEALER sends
//! `["", start_seq as 8-byte big-endian]` and reads `["", seq, payload]` per buffered batch with
//! `seq >= start`, then `["", -1 as 8 bytes, ""]`.
//!
//! What the subscriber guarantees to the consumer: [`FeedEvent::Batch`]es come in increasing
//! `seq` order, each at most once per publisher incarnation; a [`FeedEvent::Reset`] comes before
//! the batches of a new incarnation. With a replay endpoint, missing batches are fetched, live
//! duplicates of replayed ones are dropped, and a publisher restart is told apart from a gap by
//! comparing the payload of the last applied `seq` with the replayed one. What cannot be recovered
//! (the replay ring moved past us, no replay endpoint) is counted in [`FeedStatus`], not hidden.
//!
//! The `zeromq` crate neither reports nor repairs a SUB connection whose publisher went away, so
//! after `idle_resync` without a live message the subscriber reconnects and resynchronises
//! through replay (vLLM publishes nothing while idle, so this is also how a lost tail is found).

use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use zeromq::{DealerSocket, Socket, SocketRecv, SocketSend, SubSocket, ZmqMessage};

use crate::codec::{decode_batch, KvEvent, REPLAY_END_SEQ};

/// Where and how to subscribe.
#[derive(Debug, Clone)]
pub struct SubscriberConfig {
    /// The publisher's endpoint as reachable from here, e.g. `tcp://10.0.0.7:5557` (not vLLM's
    /// bind form `tcp://*:5557`).
    pub endpoint: String,
    /// vLLM's `replay_endpoint`, as reachable from here. `None`: gaps and restarts are detected
    /// from sequence numbers only and cannot be repaired.
    pub replay_endpoint: Option<String>,
    /// Subscription prefix (vLLM's `topic`; empty subscribes to everything).
    pub topic: String,
    /// Limit for connecting the SUB socket.
    pub connect_timeout: Duration,
    /// Limit for one whole replay exchange, connect included.
    pub replay_timeout: Duration,
    /// Reconnect and resynchronise after this long without a live message.
    pub idle_resync: Duration,
    /// First delay before retrying an unreachable endpoint; doubles up to `backoff_max`.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl SubscriberConfig {
    /// `endpoint` with no replay, topic `""` and default timings.
    pub fn new(endpoint: impl Into<String>) -> Self {
        SubscriberConfig {
            endpoint: endpoint.into(),
            replay_endpoint: None,
            topic: String::new(),
            connect_timeout: Duration::from_secs(2),
            replay_timeout: Duration::from_secs(5),
            idle_resync: Duration::from_secs(10),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
        }
    }
}

/// What the subscriber delivers.
#[derive(Debug, Clone, PartialEq)]
pub enum FeedEvent {
    /// One decoded batch; `seq` is greater than that of every batch since the last reset.
    Batch { seq: u64, events: Vec<KvEvent> },
    /// The publisher is a new process: forget everything known about the engine's cache
    /// (`KeyTracker::reset` and `PrefixIndex::clear_engine`) before applying later batches.
    Reset { reason: ResetReason },
    /// The connection state changed (sent on transitions only; [`SubscriberHandle::status`]
    /// always has the current counters).
    Status(FeedStatus),
}

/// Why a [`FeedEvent::Reset`] was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetReason {
    /// Sequence numbers went backwards, or the replayed batch at the last applied `seq` differs
    /// from the one applied.
    PublisherRestarted,
}

/// Connection state of a subscriber.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum FeedState {
    /// Not connected yet.
    #[default]
    Connecting,
    /// Subscribed and synchronised (through replay when there is one).
    Connected,
    /// The last connect attempt failed; retrying with backoff.
    Unreachable,
}

/// Counters and state of one subscriber, for status pages and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FeedStatus {
    pub state: FeedState,
    /// Sequence number of the last batch delivered (or skipped as undecodable) since the last
    /// reset.
    pub last_seq: Option<u64>,
    /// Batches delivered, live and replayed.
    pub batches: u64,
    /// Of those, delivered from replay.
    pub replayed: u64,
    /// Live messages dropped because replay had delivered them already.
    pub duplicates: u64,
    /// Live gaps filled through replay.
    pub gaps_recovered: u64,
    /// Gaps that could not be filled (no replay endpoint, replay failed, or the replay ring no
    /// longer had the batches): the engine's cache may hold blocks Tandem does not know about,
    /// or have dropped ones it does.
    pub gaps_unrecovered: u64,
    /// Replay exchanges that failed (unreachable, timed out, malformed).
    pub replay_failures: u64,
    /// Messages or payloads that could not be decoded, skipped.
    pub decode_errors: u64,
    /// Resets sent.
    pub resets: u64,
    /// The latest connect, replay or decode error.
    pub last_error: Option<String>,
}

/// A running subscriber. Dropping it stops the subscriber (as does dropping the receiver).
#[derive(Debug)]
pub struct SubscriberHandle {
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    status: watch::Receiver<FeedStatus>,
}

impl SubscriberHandle {
    /// Current state and counters.
    pub fn status(&self) -> FeedStatus {
        self.status.borrow().clone()
    }

    /// A receiver of [`Self::status`] updates (changed on every batch, error and transition).
    pub fn status_watch(&self) -> watch::Receiver<FeedStatus> {
        self.status.clone()
    }

    /// Stops the subscriber and waits until its sockets are closed.
    pub async fn shutdown(mut self) {
        self.stop.take();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for SubscriberHandle {
    fn drop(&mut self) {
        // Dropping `stop` wakes the task, which then drops its sockets.
        self.stop.take();
    }
}

/// Starts a subscriber task; events go to `tx` in order (the task waits when `tx` is full, and
/// the publisher's queue or the replay ring absorb the delay).
pub fn spawn_subscriber(cfg: SubscriberConfig, tx: mpsc::Sender<FeedEvent>) -> SubscriberHandle {
    let (stop, stopped) = oneshot::channel::<()>();
    let (status_tx, status) = watch::channel(FeedStatus::default());
    let closed = tx.clone();
    let feed = Feed {
        cfg,
        tx,
        status: status_tx,
        last_payload: Bytes::new(),
        dup_window: None,
    };
    let task = tokio::spawn(async move {
        tokio::select! {
            _ = stopped => {}
            _ = closed.closed() => {}
            _ = feed.run() => {}
        }
    });
    SubscriberHandle {
        stop: Some(stop),
        task: Some(task),
        status,
    }
}

/// The consumer dropped its receiver.
struct Closed;

struct Feed {
    cfg: SubscriberConfig,
    tx: mpsc::Sender<FeedEvent>,
    status: watch::Sender<FeedStatus>,
    /// Payload of `last_seq`, to recognise the same publisher in a replay.
    last_payload: Bytes,
    /// What the latest replay delivered, which live messages may repeat: the first seq and a
    /// payload hash per seq from there. Cleared by the next in-order live message.
    dup_window: Option<(u64, Vec<u64>)>,
}

impl Feed {
    async fn run(mut self) -> Result<(), Closed> {
        let mut backoff = self.cfg.backoff_min;
        loop {
            let sub = match self.connect_sub().await {
                Ok(sub) => sub,
                Err(e) => {
                    tracing::debug!(endpoint = %self.cfg.endpoint, "KV events unreachable: {e}");
                    self.set_state(FeedState::Unreachable, Some(e)).await?;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.cfg.backoff_max);
                    continue;
                }
            };
            backoff = self.cfg.backoff_min;
            self.resync().await?;
            self.set_state(FeedState::Connected, None).await?;
            self.live(sub).await?;
        }
    }

    async fn connect_sub(&self) -> Result<SubSocket, String> {
        let mut sub = SubSocket::new();
        // Recorded now and sent by the socket right after the handshake, inside `connect`.
        sub.subscribe(&self.cfg.topic)
            .await
            .map_err(|e| format!("subscribe: {e}"))?;
        match tokio::time::timeout(self.cfg.connect_timeout, sub.connect(&self.cfg.endpoint)).await
        {
            Ok(Ok(())) => Ok(sub),
            Ok(Err(e)) => Err(format!("connect {}: {e}", self.cfg.endpoint)),
            Err(_) => Err(format!(
                "connect {}: no answer within {:?}",
                self.cfg.endpoint, self.cfg.connect_timeout
            )),
        }
    }

    /// Reads live messages until `idle_resync` passes without one; the caller then reconnects.
    async fn live(&mut self, mut sub: SubSocket) -> Result<(), Closed> {
        loop {
            let msg = match tokio::time::timeout(self.cfg.idle_resync, sub.recv()).await {
                Err(_) => return Ok(()),
                Ok(Err(e)) => {
                    self.note_error(format!("recv: {e}"));
                    return Ok(());
                }
                Ok(Ok(msg)) => msg,
            };
            let frames = msg.into_vec();
            let [_topic, seq, payload] = frames.as_slice() else {
                self.decode_error(format!("live message with {} frames", frames.len()));
                continue;
            };
            let Some(seq) = seq_of(seq) else {
                self.decode_error(format!("live seq frame of {} bytes", seq.len()));
                continue;
            };
            self.on_live(seq, payload.clone()).await?;
        }
    }

    async fn on_live(&mut self, seq: u64, payload: Bytes) -> Result<(), Closed> {
        let last = self.status.borrow().last_seq;
        let expected = last.map_or(0, |l| l + 1);
        let replay = self.cfg.replay_endpoint.is_some();
        if seq == expected {
            self.dup_window = None;
            return self.deliver(seq, payload, false).await;
        }
        if seq < expected && self.is_duplicate(seq, &payload) {
            self.status.send_modify(|s| s.duplicates += 1);
            return Ok(());
        }
        if !replay {
            if seq < expected {
                // A new publisher; its batches before `seq` are gone.
                self.reset().await?;
                if seq > 0 {
                    self.status.send_modify(|s| s.gaps_unrecovered += 1);
                }
            } else if last.is_some() {
                self.status.send_modify(|s| s.gaps_unrecovered += 1);
            }
            return self.deliver(seq, payload, false).await;
        }
        // A gap, or a sequence going backwards that replay did not explain: resynchronise, which
        // fills the gap or, for a new publisher, resets and replays it from 0.
        let resets = self.status.borrow().resets;
        self.resync().await?;
        let (now, reset) = {
            let s = self.status.borrow();
            (s.last_seq, s.resets != resets)
        };
        if now.is_some_and(|l| seq <= l) {
            self.status.send_modify(|s| {
                s.duplicates += 1;
                if seq > expected && !reset {
                    s.gaps_recovered += 1;
                }
            });
            return Ok(());
        }
        if now.is_some_and(|l| seq > l + 1) || (now.is_none() && seq > 0) {
            self.status.send_modify(|s| s.gaps_unrecovered += 1);
        }
        self.dup_window = None;
        self.deliver(seq, payload, false).await
    }

    /// Fetches every buffered batch after the last delivered one (all of them when there is none)
    /// and delivers them, first checking through the last delivered `seq` that the publisher is
    /// still the same process.
    async fn resync(&mut self) -> Result<(), Closed> {
        let Some(endpoint) = self.cfg.replay_endpoint.clone() else {
            return Ok(());
        };
        let last = self.status.borrow().last_seq;
        let from = last.unwrap_or(0);
        let Some(mut reply) = self.replay(&endpoint, from).await else {
            return Ok(());
        };
        if let Some(l) = last {
            match reply.first() {
                Some((s, p)) if *s == l && *p == self.last_payload => {
                    reply.remove(0);
                }
                // The ring no longer has `l`: the publisher cannot be checked; a gap is counted
                // below if batches are missing.
                Some((s, _)) if *s > l => {}
                // A different batch at `l`, or nothing at or after it: a new publisher.
                _ => {
                    tracing::info!(endpoint = %self.cfg.endpoint, last_seq = l, "KV event publisher restarted");
                    self.reset().await?;
                    match self.replay(&endpoint, 0).await {
                        Some(r) => reply = r,
                        None => return Ok(()),
                    }
                }
            }
        }
        let mut window: Option<(u64, Vec<u64>)> = None;
        for (seq, payload) in reply {
            let last = self.status.borrow().last_seq;
            if last.is_some_and(|l| seq <= l) {
                continue; // not sent by a well-behaved publisher
            }
            if last.is_some_and(|l| seq > l + 1) {
                self.status.send_modify(|s| s.gaps_unrecovered += 1);
                window = None; // keep it contiguous: only the tail after the gap
            }
            window
                .get_or_insert_with(|| (seq, Vec::new()))
                .1
                .push(payload_hash(&payload));
            self.deliver(seq, payload, true).await?;
        }
        self.dup_window = window;
        Ok(())
    }

    /// A live message replay delivered already: same seq, same payload. (The same seq with another
    /// payload comes from a new publisher.)
    fn is_duplicate(&self, seq: u64, payload: &[u8]) -> bool {
        let Some((lo, hashes)) = &self.dup_window else {
            return false;
        };
        seq.checked_sub(*lo)
            .and_then(|i| hashes.get(usize::try_from(i).ok()?))
            .is_some_and(|&h| h == payload_hash(payload))
    }

    async fn replay(&mut self, endpoint: &str, from: u64) -> Option<Vec<(u64, Bytes)>> {
        match replay_exchange(endpoint, from, self.cfg.replay_timeout).await {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!(endpoint, from, "KV event replay failed: {e}");
                self.status.send_modify(|s| {
                    s.replay_failures += 1;
                    s.last_error = Some(format!("replay: {e}"));
                });
                None
            }
        }
    }

    async fn deliver(&mut self, seq: u64, payload: Bytes, replayed: bool) -> Result<(), Closed> {
        let decoded = decode_batch(&payload);
        self.last_payload = payload;
        self.status.send_modify(|s| s.last_seq = Some(seq));
        match decoded {
            Ok((_, events, _)) => {
                self.status.send_modify(|s| {
                    s.batches += 1;
                    s.replayed += u64::from(replayed);
                });
                self.send(FeedEvent::Batch { seq, events }).await
            }
            Err(e) => {
                self.decode_error(format!("batch {seq}: {e}"));
                Ok(())
            }
        }
    }

    async fn reset(&mut self) -> Result<(), Closed> {
        self.last_payload = Bytes::new();
        self.dup_window = None;
        self.status.send_modify(|s| {
            s.last_seq = None;
            s.resets += 1;
        });
        self.send(FeedEvent::Reset {
            reason: ResetReason::PublisherRestarted,
        })
        .await
    }

    async fn set_state(&mut self, state: FeedState, error: Option<String>) -> Result<(), Closed> {
        let mut changed = false;
        self.status.send_modify(|s| {
            changed = s.state != state;
            s.state = state;
            if error.is_some() {
                s.last_error = error;
            }
        });
        if changed {
            tracing::info!(endpoint = %self.cfg.endpoint, ?state, "KV event feed");
            let status = self.status.borrow().clone();
            self.send(FeedEvent::Status(status)).await?;
        }
        Ok(())
    }

    fn decode_error(&mut self, e: String) {
        tracing::warn!(endpoint = %self.cfg.endpoint, "undecodable KV event message skipped: {e}");
        self.status.send_modify(|s| {
            s.decode_errors += 1;
            s.last_error = Some(e);
        });
    }

    fn note_error(&mut self, e: String) {
        tracing::debug!(endpoint = %self.cfg.endpoint, "KV event feed: {e}");
        self.status.send_modify(|s| s.last_error = Some(e));
    }

    async fn send(&self, ev: FeedEvent) -> Result<(), Closed> {
        self.tx.send(ev).await.map_err(|_| Closed)
    }
}

/// The first 8 bytes of a seq frame, big-endian (longer frames carry a publisher id in newer vLLM).
fn seq_of(frame: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(frame.get(..8)?.try_into().ok()?))
}

fn payload_hash(payload: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    payload.hash(&mut h);
    h.finish()
}

/// Aborts a task when dropped, so a cancelled replay closes its socket.
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One replay exchange on a fresh DEALER: every buffered batch with `seq >= from`, in the order
/// served. Runs in its own task: the `zeromq` crate's DEALER panics on some connection errors.
async fn replay_exchange(
    endpoint: &str,
    from: u64,
    limit: Duration,
) -> Result<Vec<(u64, Bytes)>, String> {
    let endpoint = endpoint.to_string();
    let mut task = AbortOnDrop(tokio::spawn(async move {
        let mut dealer = DealerSocket::new();
        dealer
            .connect(&endpoint)
            .await
            .map_err(|e| format!("connect {endpoint}: {e}"))?;
        // A DEALER adds no delimiter of its own; vLLM's ROUTER wants (id, "", start).
        let req = ZmqMessage::try_from(vec![
            Bytes::new(),
            Bytes::copy_from_slice(&from.to_be_bytes()),
        ])
        .map_err(|e| e.to_string())?;
        dealer.send(req).await.map_err(|e| format!("send: {e}"))?;
        let mut out = Vec::new();
        loop {
            let frames = dealer
                .recv()
                .await
                .map_err(|e| format!("recv: {e}"))?
                .into_vec();
            let (seq, payload) = match frames.as_slice() {
                [delim, seq, payload] if delim.is_empty() => (seq, payload),
                [seq, payload] => (seq, payload),
                _ => return Err(format!("replay reply with {} frames", frames.len())),
            };
            if seq.get(..8) == Some(&REPLAY_END_SEQ[..]) {
                return Ok(out);
            }
            let seq = seq_of(seq).ok_or("replay seq frame shorter than 8 bytes")?;
            out.push((seq, payload.clone()));
        }
    }));
    match tokio::time::timeout(limit, &mut task.0).await {
        Err(_) => Err(format!("no complete answer within {limit:?}")),
        Ok(Err(e)) => Err(format!("replay task failed: {e}")),
        Ok(Ok(r)) => r,
    }
}

#[cfg(test)]
mod tests;
