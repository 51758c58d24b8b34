//! The precise prefix feed: each engine's vLLM KV events, applied to its pool's prefix index.
//!
//! A supervisor task watches the published pool table and keeps one subscriber per engine of a
//! pool whose index is fed precisely (engines found later by DNS included); an engine that
//! leaves has its feed stopped and its index entries dropped. Each feed turns events into index
//! operations through a [`KeyTracker`], which recomputes Tandem's own keys from the token ids.
//!
//! Problems are loud, because a silent feed means routing on nothing: every feed's state is in
//! `/ready`'s `warnings` and `/admin/engines`, in `tandem_kv_feed_up`, and logged when it
//! changes; a block-size mismatch (the engine's blocks are not the configured
//! `model.block_size`) and an engine that ran prefills but never announced a block are reported
//! the same way.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tandem_config::{Config, PoolConfig, PrefixFeed};
use tandem_kvevents::{
    spawn_subscriber, FeedEvent, FeedState, IndexOp, KeyTracker, SubscriberConfig, SubscriberHandle,
};
use tandem_policy::PoolKind;
use tokio::sync::mpsc;

use crate::metrics::Metrics;
use crate::pool::{EngineEntry, PoolHandle};
use crate::prefix::{PoolIndex, KEY_SEED};

/// One engine's feed as `/ready` and `/admin/engines` show it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FeedReport {
    pub pool: &'static str,
    pub engine: String,
    pub endpoint: String,
    pub state: &'static str,
    pub batches: u64,
    pub blocks_indexed: usize,
    pub gaps_recovered: u64,
    pub gaps_unrecovered: u64,
    pub block_size_mismatches: u64,
    pub orphans: u64,
    /// Why this feed needs attention, if it does.
    pub problem: Option<String>,
}

#[derive(Debug)]
struct Feed {
    pool: PoolKind,
    url: String,
    endpoint: String,
    handle: SubscriberHandle,
    tracker: Arc<Mutex<KeyTracker>>,
    task: tokio::task::JoinHandle<()>,
}

/// All feeds; read by `/ready`, written by the supervisor.
#[derive(Debug, Default)]
pub struct Feeds {
    feeds: Mutex<HashMap<usize, Feed>>,
}

impl Feeds {
    /// Reports for every feed; `indexed(pool, id)` gives the blocks the index holds for the
    /// engine and `served(pool, id)` the requests Tandem has sent it.
    pub fn reports(
        &self,
        indexed: impl Fn(PoolKind, usize) -> usize,
        served: impl Fn(PoolKind, usize) -> u64,
    ) -> Vec<FeedReport> {
        let feeds = self.feeds.lock().expect("feeds lock");
        let mut out: Vec<FeedReport> = feeds
            .iter()
            .map(|(&id, f)| {
                let s = f.handle.status();
                let t = f.tracker.lock().expect("tracker lock").stats();
                let blocks = indexed(f.pool, id);
                let sent = served(f.pool, id);
                let state = match s.state {
                    FeedState::Connecting => "connecting",
                    FeedState::Connected => "connected",
                    FeedState::Unreachable => "unreachable",
                };
                let problem = if t.block_size_mismatches > 0 {
                    Some(format!(
                        "the engine's KV blocks are not model.block_size tokens ({} events ignored)",
                        t.block_size_mismatches
                    ))
                } else if s.state == FeedState::Unreachable {
                    Some(format!(
                        "KV events endpoint {} unreachable{}",
                        f.endpoint,
                        s.last_error.map(|e| format!(": {e}")).unwrap_or_default()
                    ))
                } else if s.batches == 0 && sent > 0 {
                    Some(format!(
                        "no KV events received although {} requests were sent to the engine: is \
                         --kv-events-config enabled there, with this endpoint and topic?",
                        sent
                    ))
                } else if s.gaps_unrecovered > 0 {
                    Some(format!(
                        "{} event gaps could not be replayed; the index may miss blocks",
                        s.gaps_unrecovered
                    ))
                } else {
                    None
                };
                FeedReport {
                    pool: f.pool.as_str(),
                    engine: f.url.clone(),
                    endpoint: f.endpoint.clone(),
                    state,
                    batches: s.batches,
                    blocks_indexed: blocks,
                    gaps_recovered: s.gaps_recovered,
                    gaps_unrecovered: s.gaps_unrecovered,
                    block_size_mismatches: t.block_size_mismatches,
                    orphans: t.orphans,
                    problem,
                }
            })
            .collect();
        out.sort_by(|a, b| (a.pool, &a.engine).cmp(&(b.pool, &b.engine)));
        out
    }
}

/// The engine's KV-event endpoints: its own `kv_events` URLs if configured, else its host with
/// the pool's ports.
fn endpoints(pool: &PoolConfig, url: &str) -> Option<(String, Option<String>, String)> {
    if let Some(ep) = pool.endpoints.iter().find(|e| e.url == url) {
        if let Some(ev) = &ep.kv_events {
            let topic = pool
                .kv_events
                .as_ref()
                .map(|k| k.topic.clone())
                .unwrap_or_default();
            return Some((ev.clone(), ep.kv_events_replay.clone(), topic));
        }
    }
    let k = pool.kv_events.as_ref()?;
    let host = url.split_once("://").map_or(url, |(_, r)| r);
    let host = host.rsplit_once(':').map_or(host, |(h, _)| h);
    let replay = (k.replay_port > 0).then(|| format!("tcp://{host}:{}", k.replay_port));
    Some((format!("tcp://{host}:{}", k.port), replay, k.topic.clone()))
}

/// Start the supervisor for the pools fed precisely; returns the shared feed table.
pub fn start(
    cfg: &Config,
    pools: PoolHandle,
    indexes: [(PoolKind, Arc<PoolIndex>); 2],
    metrics: Arc<Metrics>,
) -> Arc<Feeds> {
    let feeds = Arc::new(Feeds::default());
    let precise: Vec<(PoolKind, Arc<PoolIndex>, PoolConfig)> = indexes
        .into_iter()
        .filter(|(_, i)| i.feed == PrefixFeed::Precise)
        .map(|(k, i)| (k, i, crate::pool::pool_config(cfg, k).clone()))
        .collect();
    if precise.is_empty() {
        return feeds;
    }
    let block_size = cfg.model.block_size;
    let f = feeds.clone();
    tokio::spawn(async move {
        let mut rx = pools.pools.clone();
        loop {
            let table = rx.borrow_and_update().clone();
            for (kind, index, pc) in &precise {
                sync(
                    &f,
                    *kind,
                    index,
                    pc,
                    table.pool(*kind),
                    block_size,
                    &metrics,
                );
            }
            if rx.changed().await.is_err() {
                break;
            }
        }
    });
    feeds
}

/// Start feeds for new engines, stop those of engines that left.
fn sync(
    feeds: &Feeds,
    kind: PoolKind,
    index: &Arc<PoolIndex>,
    pc: &PoolConfig,
    engines: &[EngineEntry],
    block_size: u32,
    metrics: &Arc<Metrics>,
) {
    let mut map = feeds.feeds.lock().expect("feeds lock");
    map.retain(|id, f| {
        let keep = f.pool != kind || engines.iter().any(|e| e.engine.id == *id);
        if !keep {
            f.task.abort();
            index.clear_engine(*id);
            tracing::info!(engine = %f.url, "engine left the pool: KV feed stopped");
        }
        keep
    });
    for e in engines {
        let id = e.engine.id;
        if map.contains_key(&id) {
            continue;
        }
        let Some((endpoint, replay, topic)) = endpoints(pc, &e.engine.url) else {
            continue;
        };
        let mut sc = SubscriberConfig::new(endpoint.clone());
        sc.replay_endpoint = replay;
        sc.topic = topic;
        let (tx, rx) = mpsc::channel(1024);
        let handle = spawn_subscriber(sc, tx);
        let tracker = Arc::new(Mutex::new(KeyTracker::new(block_size, KEY_SEED)));
        let task = tokio::spawn(apply(
            rx,
            id,
            e.engine.url.to_string(),
            kind,
            index.clone(),
            tracker.clone(),
            metrics.clone(),
        ));
        tracing::info!(engine = %e.engine.url, %endpoint, "KV feed started");
        map.insert(
            id,
            Feed {
                pool: kind,
                url: e.engine.url.to_string(),
                endpoint,
                handle,
                tracker,
                task,
            },
        );
    }
}

async fn apply(
    mut rx: mpsc::Receiver<FeedEvent>,
    id: usize,
    url: String,
    kind: PoolKind,
    index: Arc<PoolIndex>,
    tracker: Arc<Mutex<KeyTracker>>,
    metrics: Arc<Metrics>,
) {
    let mut ops = Vec::new();
    let mut warned_mismatch = false;
    while let Some(ev) = rx.recv().await {
        {
            let mut t = tracker.lock().expect("tracker lock");
            match ev {
                FeedEvent::Batch { events, .. } => {
                    metrics.kv_feed_batches.inc();
                    t.apply_batch(&events, &mut ops);
                }
                FeedEvent::Reset { reason } => {
                    tracing::warn!(engine = %url, ?reason, "KV feed reset: the engine's index entries are dropped");
                    ops.push(t.reset());
                }
                FeedEvent::Status(s) => {
                    let up = s.state == FeedState::Connected;
                    metrics.kv_feed_up(kind, &url, up);
                    if up {
                        tracing::info!(engine = %url, "KV feed connected");
                    } else {
                        tracing::warn!(engine = %url, state = ?s.state, error = s.last_error.as_deref().unwrap_or(""), "KV feed not connected");
                    }
                }
            }
            if !warned_mismatch && t.stats().block_size_mismatches > 0 {
                warned_mismatch = true;
                tracing::error!(engine = %url, configured = t.block_size(), "the engine publishes KV blocks of another size than model.block_size: its events are ignored; fix model.block_size");
            }
        }
        for op in ops.drain(..) {
            match op {
                IndexOp::Insert(k) => index.stored(id, &k),
                IndexOp::Remove(k) => index.removed(id, &k),
                IndexOp::Clear => index.clear_engine(id),
            }
        }
    }
}
