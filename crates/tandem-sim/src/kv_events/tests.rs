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
