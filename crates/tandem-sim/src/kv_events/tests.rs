use super::*;
use std::time::Duration;
use zeromq::{DealerSocket, ReqSocket, SubSocket};

fn stored(hashes: Vec<u64>, parent: Option<u64>, tokens: Vec<u32>, bs: u32) -> KvEvent {
    KvEvent::BlockStored {
        block_hashes: hashes,
        parent_block_hash: parent,
        token_ids: tokens,
        block_size: bs,
        medium: Some("GPU".into()),
    }
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
            medium: Some("GPU".into()),
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
    // The task picks fairly between queued batches and replay requests, so a replay may run
    // before all 5 batches are dequeued: ask again (bounded) until seq 4 is visible. The ring
    // (buffer_steps 3) then holds seqs 2..=4.
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
