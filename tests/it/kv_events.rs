//! KV events: vLLM's ZMQ PUB stream, read back through the replay socket (deterministic, no
//! slow-joiner race) and checked for exact token ids and hash chaining.

use std::time::Duration;

use serde_json::json;
use tandem_sim::kv_events::{decode_batch, KvEvent};
use zeromq::{Socket, SocketRecv, SocketSend, ZmqMessage};

use crate::support::{Sim, PROMPT};

/// vLLM's replay protocol through a DEALER (a REQ socket could take only one reply): send
/// `["", start_seq]`, receive `["", seq, payload]` per buffered batch, then the `-1` marker.
/// One BlockStored: hashes, parent, token ids, block size.
type Stored = (Vec<u64>, Option<u64>, Vec<u32>, u32);

/// [`replay_from`] until `done` holds (at most 200 times 25 ms apart): an engine publishes a
/// step's batch after the step's outputs, so a response can reach the client first.
async fn replay_until(
    endpoint: &str,
    start: u64,
    done: impl Fn(&[(u64, Vec<KvEvent>)]) -> bool,
) -> Vec<(u64, Vec<KvEvent>)> {
    let mut batches = replay_from(endpoint, start).await;
    for _ in 0..200 {
        if done(&batches) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        batches = replay_from(endpoint, start).await;
    }
    batches
}

async fn replay_from(endpoint: &str, start: u64) -> Vec<(u64, Vec<KvEvent>)> {
    let mut dealer = zeromq::DealerSocket::new();
    dealer.connect(endpoint).await.expect("connect replay");
    let mut req = ZmqMessage::from(Vec::<u8>::new());
    req.push_back(start.to_be_bytes().to_vec().into());
    dealer.send(req).await.expect("send start seq");
    let mut out = Vec::new();
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), dealer.recv())
            .await
            .expect("replay reply")
            .expect("recv");
        let frames: Vec<Vec<u8>> = msg.into_vec().into_iter().map(|b| b.to_vec()).collect();
        assert_eq!(frames.len(), 3, "empty delimiter, seq, payload");
        assert!(frames[0].is_empty());
        let seq = i64::from_be_bytes(frames[1][..8].try_into().unwrap());
        if seq == -1 {
            assert!(frames[2].is_empty());
            break;
        }
        let (_, events, _) = decode_batch(&frames[2]).expect("valid batch");
        out.push((seq as u64, events));
    }
    out
}

#[tokio::test]
async fn block_stored_token_ids_chain_and_evictions_are_published() {
    let s = Sim::start(&[
        "--kv-events-endpoint",
        "tcp://127.0.0.1:0",
        "--kv-events-replay-endpoint",
        "tcp://127.0.0.1:0",
        "--kv-events-topic",
        "kv@sim@test",
        "--num-gpu-blocks-override",
        "24",
    ])
    .await;
    let replay = s.ready["kv_events_replay"].as_str().unwrap().to_string();
    let prompt = PROMPT.repeat(2);
    let tokens = s.tokens(&prompt).await;
    let (status, _) = s
        .post_json(
            "/v1/completions",
            &json!({"prompt": prompt, "max_tokens": 20, "ignore_eos": true}),
            None,
        )
        .await;
    assert_eq!(status, 200);

    let batches = replay_until(&replay, 0, |b| !b.is_empty()).await;
    assert!(!batches.is_empty());
    assert_eq!(batches[0].0, 0, "sequence numbers start at 0");
    assert!(batches.windows(2).all(|w| w[1].0 == w[0].0 + 1));
    let stored: Vec<Stored> = batches
        .iter()
        .flat_map(|(_, evs)| evs.iter())
        .filter_map(|e| match e {
            KvEvent::BlockStored {
                block_hashes,
                parent_block_hash,
                token_ids,
                block_size,
                ..
            } => Some((
                block_hashes.clone(),
                *parent_block_hash,
                token_ids.clone(),
                *block_size,
            )),
            _ => None,
        })
        .collect();
    // Prompt and generated tokens, in order, over all BlockStored events.
    let all_tokens: Vec<u32> = stored.iter().flat_map(|s| s.2.clone()).collect();
    assert_eq!(
        &all_tokens[..tokens.len().min(all_tokens.len())],
        &tokens[..tokens.len().min(all_tokens.len())]
    );
    let full_blocks = (tokens.len() + 20 - 1) / 16; // KV of the last sampled token is never computed
    assert_eq!(all_tokens.len(), full_blocks * 16);
    assert!(stored[0].1.is_none(), "the first block has no parent");
    let mut prev: Option<u64> = None;
    for (hashes, parent, toks, bs) in &stored {
        assert_eq!(*bs, 16);
        assert_eq!(toks.len(), hashes.len() * 16);
        assert_eq!(
            *parent, prev,
            "each event's parent is the previous block's hash"
        );
        prev = hashes.last().copied();
    }
    let stored_hashes: Vec<u64> = stored.iter().flat_map(|s| s.0.clone()).collect();

    // A different prompt that needs most of the 24 blocks evicts cached ones.
    let other = "z".repeat(16 * 20);
    let (status, _) = s
        .post_json(
            "/v1/completions",
            &json!({"prompt": other, "max_tokens": 1}),
            None,
        )
        .await;
    assert_eq!(status, 200);
    let later = replay_from(&replay, batches.last().unwrap().0 + 1).await;
    let removed: Vec<u64> = later
        .iter()
        .flat_map(|(_, evs)| evs.iter())
        .filter_map(|e| match e {
            KvEvent::BlockRemoved { block_hashes, .. } => Some(block_hashes.clone()),
            _ => None,
        })
        .flatten()
        .collect();
    assert!(!removed.is_empty(), "evictions are published");
    assert!(
        removed.iter().all(|h| stored_hashes.contains(h)),
        "removed hashes were stored before"
    );
}

#[tokio::test]
async fn live_pub_frames_are_topic_seq_payload() {
    let s = Sim::start(&[
        "--kv-events-endpoint",
        "tcp://127.0.0.1:0",
        "--kv-events-topic",
        "kv@sim@m",
    ])
    .await;
    let endpoint = s.ready["kv_events"].as_str().unwrap().to_string();
    let mut sub = zeromq::SubSocket::new();
    sub.connect(&endpoint).await.unwrap();
    sub.subscribe("kv@sim@m").await.unwrap();
    // Until the subscription has propagated, PUB drops messages (ZMQ's slow joiner): keep sending
    // distinct requests, a bounded number of times, until one event arrives.
    let mut got = None;
    for i in 0..50 {
        let prompt = format!("{i} {}", PROMPT);
        s.post_json(
            "/v1/completions",
            &json!({"prompt": prompt, "max_tokens": 1}),
            None,
        )
        .await;
        if let Ok(Ok(msg)) = tokio::time::timeout(Duration::from_millis(200), sub.recv()).await {
            got = Some(msg);
            break;
        }
    }
    let msg = got.expect("a live event");
    let frames: Vec<Vec<u8>> = msg.into_vec().into_iter().map(|b| b.to_vec()).collect();
    assert_eq!(frames.len(), 3);
    assert_eq!(frames[0], b"kv@sim@m");
    assert_eq!(frames[1].len(), 8);
    let (_, events, _) = decode_batch(&frames[2]).unwrap();
    assert!(matches!(events[0], KvEvent::BlockStored { .. }));
}

/// `--kv-offloading-size`: the host tier's stores and evictions come as their own events with
/// medium "CPU" and the GPU's hashes, the GPU's evictions leave the host's copies alone, and a
/// prompt whose blocks the GPU evicted is served from the host as cached tokens.
#[tokio::test]
async fn host_tier_events_name_the_cpu_medium() {
    let s = Sim::start(&[
        "--kv-events-endpoint",
        "tcp://127.0.0.1:0",
        "--kv-events-replay-endpoint",
        "tcp://127.0.0.1:0",
        "--num-gpu-blocks-override",
        "24",
        "--kv-offloading-size",
        "0.05",
        "--enable-prompt-tokens-details",
    ])
    .await;
    // 0.05 GiB over 16 tokens × 114,688 bytes of qwen3-0.6b KV.
    assert_eq!(s.ready["num_host_blocks"], 29);
    let replay = s.ready["kv_events_replay"].as_str().unwrap().to_string();
    let by_medium = |batches: &[(u64, Vec<KvEvent>)], stored: bool, medium: &str| -> Vec<u64> {
        batches
            .iter()
            .flat_map(|(_, evs)| evs.iter())
            .filter_map(|e| match (e, stored) {
                (
                    KvEvent::BlockStored {
                        block_hashes,
                        medium: Some(m),
                        ..
                    },
                    true,
                )
                | (
                    KvEvent::BlockRemoved {
                        block_hashes,
                        medium: Some(m),
                    },
                    false,
                ) if m == medium => Some(block_hashes.clone()),
                _ => None,
            })
            .flatten()
            .collect()
    };
    let first = "abcdefgh".repeat(20);
    let body = json!({"prompt": first, "max_tokens": 1});
    assert_eq!(s.post_json("/v1/completions", &body, None).await.0, 200);
    let batches = replay_until(&replay, 0, |b| by_medium(b, true, "GPU").len() >= 10).await;
    let gpu = by_medium(&batches, true, "GPU");
    assert_eq!(gpu.len(), 10);
    assert_eq!(by_medium(&batches, true, "CPU"), gpu, "written through");

    let other = json!({"prompt": "z".repeat(16 * 18), "max_tokens": 1});
    assert_eq!(s.post_json("/v1/completions", &other, None).await.0, 200);
    let later = replay_until(&replay, batches.last().unwrap().0 + 1, |b| {
        !by_medium(b, false, "GPU").is_empty()
    })
    .await;
    let gone = by_medium(&later, false, "GPU");
    assert!(!gone.is_empty() && gone.iter().all(|h| gpu.contains(h)));
    assert!(
        by_medium(&later, false, "CPU").is_empty(),
        "28 of 29 host blocks used"
    );

    let (status, v) = s.post_json("/v1/completions", &body, None).await;
    assert_eq!(status, 200);
    let cached = v["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert!(cached >= 16 * 9, "{v}");
    assert!(s.metric("vllm:external_prefix_cache_hits_total", &[]).await > 0.0);
}
