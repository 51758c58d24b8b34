//! vLLM's KV-cache events (`--kv-events-config`, protocol spec §4), for Tandem's precise prefix
//! index.
//!
//! - [`codec`] (pure): the msgpack `KVEventBatch` payload, both the `array_like` layout vLLM emits
//!   by default and the newer map layout. Shared with `tandem-sim`, whose publisher encodes with it.
//! - [`tracker`] (pure: no IO, no clock): [`KeyTracker`], one per engine, turns events into
//!   [`IndexOp`]s on Tandem's own chained keys ([`tandem_radix::block_keys`]), so the index holds
//!   exactly the keys routing computes for a prompt.
//! - [`subscriber`] (the edge): [`spawn_subscriber`] connects a ZMQ SUB to one engine's publisher,
//!   repairs gaps through the replay socket, detects publisher restarts, and delivers
//!   [`FeedEvent`]s in sequence order on a channel, with [`FeedStatus`] counters.
//!
//! The consumer (the coordinator) owns the prefix index and one [`KeyTracker`] per engine:
//!
//! ```no_run
//! use tandem_kvevents::{spawn_subscriber, FeedEvent, IndexOp, KeyTracker, SubscriberConfig};
//! use tandem_radix::{EngineId, IndexConfig, PrefixIndex};
//!
//! # async fn run(mut index: PrefixIndex, now: impl Fn() -> u64) {
//! let engine = EngineId(0);
//! let mut cfg = SubscriberConfig::new("tcp://10.0.0.7:5557");
//! cfg.replay_endpoint = Some("tcp://10.0.0.7:5558".into());
//! let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
//! let handle = spawn_subscriber(cfg, tx);
//! let mut tracker = KeyTracker::new(16, 0); // the engine's block size, routing's key seed
//! let mut ops = Vec::new();
//! while let Some(ev) = rx.recv().await {
//!     match ev {
//!         FeedEvent::Batch { events, .. } => tracker.apply_batch(&events, &mut ops),
//!         FeedEvent::Reset { .. } => ops.push(tracker.reset()),
//!         FeedEvent::Status(s) => tracing::info!(state = ?s.state, "KV events"),
//!     }
//!     for op in ops.drain(..) {
//!         match op {
//!             IndexOp::Insert(keys) => index.insert(engine, &keys, now()),
//!             IndexOp::Remove(keys) => index.remove(engine, &keys),
//!             IndexOp::Clear => index.clear_engine(engine),
//!         }
//!     }
//!     if tracker.stats().block_size_mismatches > 0 {
//!         // The configured block size is wrong for this engine: a configuration error.
//!     }
//! }
//! # drop(handle);
//! # }
//! ```

pub mod codec;
pub mod subscriber;
pub mod tracker;

pub use codec::{
    decode_batch, encode_batch, CodecError, DecodedBatch, KvEvent, MEDIUM_CPU, MEDIUM_GPU,
    REPLAY_END_SEQ,
};
pub use subscriber::{
    spawn_subscriber, FeedEvent, FeedState, FeedStatus, ResetReason, SubscriberConfig,
    SubscriberHandle,
};
pub use tracker::{IndexOp, KeyTracker, TrackerStats};
