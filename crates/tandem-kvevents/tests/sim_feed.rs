//! End to end against the simulated engine in process: its KV events, through the subscriber and
//! a `KeyTracker`, give exactly `tandem_radix::block_keys` of the prompts it served.
//!
//! Nothing here depends on timing: the subscriber replays from 0 when it connects and after any
//! gap, so every test simply consumes the feed until the expected state is reached (a guard
//! timeout only turns a hang into a failure).

use std::collections::HashSet;
use std::time::Duration;

use serde_json::{json, Value};
use tandem_kvevents::{
    spawn_subscriber, FeedEvent, IndexOp, KeyTracker, SubscriberConfig, SubscriberHandle,
};
use tandem_radix::block_keys;
use tandem_sim::kv_events::KvEventsConfig;
use tandem_sim::profile::GpuKind;
use tandem_sim::{RunningSim, SimConfig};
use tokio::sync::mpsc;

const BLOCK: u32 = 16;
/// Tandem's key seed; unrelated to the engine's own hash seed.
const SEED: u64 = 7;
const GUARD: Duration = Duration::from_secs(30);

struct Sim {
    running: RunningSim,
    http: String,
    client: reqwest::Client,
}

impl Sim {
    async fn start(num_gpu_blocks: Option<u32>) -> Sim {
        Sim::start_with(num_gpu_blocks, None).await
    }

    /// `offload_gib`: a host-memory KV tier of that size (`--kv-offloading-size`).
    async fn start_with(num_gpu_blocks: Option<u32>, offload_gib: Option<f64>) -> Sim {
        let mut cfg = SimConfig::new("qwen3-0.6b", GpuKind::H100);
        cfg.kv_offloading_size_gib = offload_gib;
        cfg.enable_prompt_tokens_details = true;
        cfg.time_scale = 50.0;
        cfg.hash_seed = Some("0".into());
        cfg.num_gpu_blocks_override = num_gpu_blocks;
        cfg.kv_events = Some(KvEventsConfig {
            endpoint: "tcp://127.0.0.1:0".into(),
            replay_endpoint: Some("tcp://127.0.0.1:0".into()),
            topic: "kv@sim@qwen".into(),
            ..KvEventsConfig::default()
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let running = tandem_sim::start(cfg, listener, std::future::pending())
            .await
            .unwrap();
        Sim {
            http: format!("http://{}", running.http_addr),
            running,
            client: reqwest::Client::new(),
        }
    }

    async fn post(&self, path: &str, body: Value) -> Value {
        let resp = self
            .client
            .post(format!("{}{path}", self.http))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success(), "{path}: {}", resp.status());
        let body = resp.bytes().await.unwrap();
        serde_json::from_slice(&body).unwrap_or(Value::Null)
    }

    /// The prompt's tokens as the engine sees them.
    async fn tokens(&self, prompt: &str) -> Vec<u32> {
        let v = self.post("/tokenize", json!({ "prompt": prompt })).await;
        serde_json::from_value(v["tokens"].clone()).unwrap()
    }

    /// One completion of a single token: the engine caches exactly the prompt's full blocks
    /// (the KV of the last sampled token is never computed). Returns `block_keys` of the prompt.
    async fn complete(&self, prompt: &str) -> Vec<u64> {
        self.post(
            "/v1/completions",
            json!({ "prompt": prompt, "max_tokens": 1 }),
        )
        .await;
        block_keys(&self.tokens(prompt).await, BLOCK as usize, SEED)
    }

    fn subscribe(&self) -> (SubscriberHandle, Feed) {
        let cfg = SubscriberConfig {
            replay_endpoint: self.running.kv_events_replay_endpoint.clone(),
            topic: "kv@sim".into(),
            idle_resync: Duration::from_millis(200),
            ..SubscriberConfig::new(self.running.kv_events_endpoint.clone().unwrap())
        };
        let (tx, rx) = mpsc::channel(256);
        let handle = spawn_subscriber(cfg, tx);
        let feed = Feed {
            rx,
            tracker: KeyTracker::new(BLOCK, SEED),
            index: HashSet::new(),
            removed: Vec::new(),
        };
        (handle, feed)
    }
}

/// The consumer's side: a tracker and a set standing in for one engine's prefix-index entries.
struct Feed {
    rx: mpsc::Receiver<FeedEvent>,
    tracker: KeyTracker,
    index: HashSet<u64>,
    removed: Vec<u64>,
}

impl Feed {
    fn apply(&mut self, ev: FeedEvent) {
        let mut ops = Vec::new();
        match ev {
            FeedEvent::Batch { events, .. } => self.tracker.apply_batch(&events, &mut ops),
            FeedEvent::Reset { .. } => ops.push(self.tracker.reset()),
            FeedEvent::Status(_) => {}
        }
        for op in ops {
            match op {
                IndexOp::Insert(keys) => self.index.extend(keys),
                IndexOp::Remove(keys) => {
                    for k in &keys {
                        assert!(self.index.remove(k), "removed key {k:#x} was held");
                    }
                    self.removed.extend(keys);
                }
                IndexOp::Clear => self.index.clear(),
            }
        }
    }

    async fn until(&mut self, what: &str, cond: impl Fn(&Feed) -> bool) {
        let deadline = tokio::time::Instant::now() + GUARD;
        while !cond(self) {
            let ev = tokio::time::timeout_at(deadline, self.rx.recv())
                .await
                .unwrap_or_else(|_| panic!("{what}: not reached within {GUARD:?}"))
                .expect("the subscriber is running");
            self.apply(ev);
        }
    }

    fn assert_clean(&self) {
        let s = self.tracker.stats();
        assert_eq!(
            (
                s.orphans,
                s.block_size_mismatches,
                s.malformed,
                s.unknown_removals
            ),
            (0, 0, 0, 0),
            "{s:?}"
        );
    }
}

fn union(sets: &[&[u64]]) -> HashSet<u64> {
    sets.iter().flat_map(|s| s.iter().copied()).collect()
}

const SYSTEM: &str =
    "You are a careful assistant. Answer briefly and cite the documents you used. ";

#[tokio::test]
async fn feed_keys_equal_block_keys_of_the_prompts() {
    let sim = Sim::start(None).await;
    let (handle, mut feed) = sim.subscribe();
    let a = sim.complete(&format!("{SYSTEM}What is a KV cache?")).await;
    // Shares A's leading blocks: the engine stores only the new ones, as children of A's.
    let b = sim
        .complete(&format!(
            "{SYSTEM}How does prefix caching pick blocks to evict?"
        ))
        .await;
    let c = sim.complete(&"unrelated words ".repeat(9)).await;
    assert!(a.len() >= 4 && c.len() >= 8);
    assert_eq!(a[..4], b[..4], "A and B share their leading blocks");

    let want = union(&[&a, &b, &c]);
    feed.until("all prompt blocks indexed", |f| f.index == want)
        .await;
    feed.assert_clean();
    assert_eq!(feed.tracker.len(), want.len());
    let s = handle.status();
    assert_eq!((s.decode_errors, s.gaps_unrecovered, s.resets), (0, 0, 0));
}

/// Batches published before the subscriber existed come from replay; later ones live.
#[tokio::test]
async fn late_subscriber_replays_from_zero() {
    let sim = Sim::start(None).await;
    let a = sim
        .complete(&format!("{SYSTEM}First question, long enough."))
        .await;
    let b = sim.complete(&"second prompt ".repeat(8)).await;

    let (handle, mut feed) = sim.subscribe();
    let want = union(&[&a, &b]);
    feed.until("earlier prompts replayed", |f| f.index == want)
        .await;
    assert!(handle.status().replayed >= 2);

    let c = sim
        .complete(&"third prompt, after subscribing ".repeat(3))
        .await;
    let want = union(&[&a, &b, &c]);
    feed.until("the later prompt indexed", |f| f.index == want)
        .await;
    feed.assert_clean();
    assert_eq!(handle.status().last_seq, Some(2), "one batch per prompt");
}

/// A small KV cache: a long second prompt evicts the first one's blocks, which come back as
/// `Remove` of exactly those keys.
#[tokio::test]
async fn eviction_yields_remove_ops() {
    let sim = Sim::start(Some(24)).await;
    let (handle, mut feed) = sim.subscribe();
    let a = sim.complete(&"abcdefgh".repeat(20)).await; // 10 blocks
    feed.until("first prompt indexed", |f| f.index == union(&[&a]))
        .await;
    let b = sim.complete(&"z".repeat(16 * 20)).await; // needs most of the 24 blocks
    assert!(b.len() >= 20);
    let kb = union(&[&b]);
    feed.until("second prompt indexed", |f| kb.is_subset(&f.index))
        .await;

    assert!(!feed.removed.is_empty(), "evictions are published");
    let ka = union(&[&a]);
    assert!(feed.removed.iter().all(|k| ka.contains(k)), "only A's keys");
    let left: HashSet<u64> = ka.difference(&union(&[&feed.removed])).copied().collect();
    assert_eq!(feed.index, union(&[&b]).union(&left).copied().collect());
    assert_eq!(
        feed.tracker.stats().removed_blocks,
        feed.removed.len() as u64
    );
    feed.assert_clean();
    assert_eq!(handle.status().gaps_unrecovered, 0);
}

/// `/reset_prefix_cache` publishes `AllBlocksCleared`, which clears the engine's entries.
#[tokio::test]
async fn prefix_cache_reset_clears_the_engine() {
    let sim = Sim::start(None).await;
    let (_handle, mut feed) = sim.subscribe();
    let a = sim.complete(&"cached then cleared ".repeat(5)).await;
    feed.until("prompt indexed", |f| f.index == union(&[&a]))
        .await;
    sim.post("/reset_prefix_cache", json!({})).await;
    feed.until("cleared", |f| f.index.is_empty()).await;
    assert_eq!(feed.tracker.stats().clears, 1);
    let b = sim.complete(&"after the reset ".repeat(5)).await;
    feed.until("indexed again", |f| f.index == union(&[&b]))
        .await;
    feed.assert_clean();
}

/// With KV offloading the engine reports its host tier too: blocks the GPU evicts stay in the
/// index while the host holds them, and the engine serves them as cached tokens.
#[tokio::test]
async fn host_tier_keeps_gpu_evicted_blocks_indexed() {
    // 24 GPU blocks; 0.05 GiB of host memory is 29 blocks of qwen3-0.6b KV (1.75 MiB each).
    let sim = Sim::start_with(Some(24), Some(0.05)).await;
    assert_eq!(sim.running.num_host_blocks, 29);
    let (handle, mut feed) = sim.subscribe();
    let prompt_a = "abcdefgh".repeat(20);
    let a = sim.complete(&prompt_a).await; // 10 blocks
    feed.until("first prompt indexed", |f| f.index == union(&[&a]))
        .await;
    let b = sim.complete(&"z".repeat(16 * 18)).await; // evicts some of A on the GPU
    let kb = union(&[&b]);
    feed.until("second prompt indexed", |f| kb.is_subset(&f.index))
        .await;
    assert!(
        feed.removed.is_empty(),
        "the host tier still holds what the GPU evicted"
    );
    assert_eq!(feed.index, union(&[&a, &b]));
    assert!(
        feed.tracker.stats().removed_blocks > 0,
        "the GPU's evictions were published"
    );

    // A again: its blocks come back from the host, reported as cached.
    let v = sim
        .post(
            "/v1/completions",
            json!({ "prompt": prompt_a, "max_tokens": 1 }),
        )
        .await;
    let cached = v["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert!(cached >= 16 * (a.len() as u64 - 1), "{v}");
    let metrics = sim
        .client
        .get(format!("{}/metrics", sim.http))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let hits: f64 = metrics
        .lines()
        .find(|l| l.starts_with("vllm:external_prefix_cache_hits_total"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .expect("external hits are exported");
    assert!(
        hits > 0.0,
        "host-tier hits count as external prefix-cache hits"
    );
    feed.assert_clean();
    assert_eq!(handle.status().gaps_unrecovered, 0);
}
