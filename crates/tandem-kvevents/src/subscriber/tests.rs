//! The subscriber against a scripted publisher (PUB + ROUTER replay on port 0) that can withhold
//! live messages, serve any ring and restart its sequence, so gaps and restarts are exact.

use super::*;
use crate::codec::encode_batch;
use zeromq::{PubSocket, RouterSocket};

/// Guard against a hung test; nothing waits for it in a passing run.
const GUARD: Duration = Duration::from_secs(15);

enum Cmd {
    /// Append to the ring and, when `live`, publish.
    Publish {
        seq: u64,
        payload: Bytes,
        live: bool,
        done: oneshot::Sender<()>,
    },
    /// Forget the ring, as a new publisher process would.
    Restart { done: oneshot::Sender<()> },
}

struct FakePub {
    cmd: mpsc::UnboundedSender<Cmd>,
    endpoint: String,
    replay: String,
}

impl FakePub {
    async fn start(endpoint: &str) -> FakePub {
        let mut pub_socket = PubSocket::new();
        let endpoint = pub_socket.bind(endpoint).await.unwrap().to_string();
        let mut router = RouterSocket::new();
        let replay = router.bind("tcp://127.0.0.1:0").await.unwrap().to_string();
        let (cmd, mut rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut ring: Vec<(u64, Bytes)> = Vec::new();
            loop {
                tokio::select! {
                    c = rx.recv() => match c {
                        Some(Cmd::Publish { seq, payload, live, done }) => {
                            if live {
                                let msg = ZmqMessage::try_from(vec![
                                    Bytes::from_static(b"kv@fake@m"),
                                    Bytes::copy_from_slice(&seq.to_be_bytes()),
                                    payload.clone(),
                                ])
                                .unwrap();
                                pub_socket.send(msg).await.unwrap();
                            }
                            ring.push((seq, payload));
                            let _ = done.send(());
                        }
                        Some(Cmd::Restart { done }) => {
                            ring.clear();
                            let _ = done.send(());
                        }
                        None => break,
                    },
                    req = router.recv() => {
                        let Ok(req) = req else { continue };
                        let frames = req.into_vec();
                        let start = seq_of(&frames[2]).unwrap();
                        for (seq, payload) in ring.iter().filter(|(s, _)| *s >= start) {
                            let reply = vec![
                                frames[0].clone(),
                                Bytes::new(),
                                Bytes::copy_from_slice(&seq.to_be_bytes()),
                                payload.clone(),
                            ];
                            let _ = router.send(ZmqMessage::try_from(reply).unwrap()).await;
                        }
                        let end = vec![
                            frames[0].clone(),
                            Bytes::new(),
                            Bytes::copy_from_slice(&REPLAY_END_SEQ),
                            Bytes::new(),
                        ];
                        let _ = router.send(ZmqMessage::try_from(end).unwrap()).await;
                    }
                }
            }
        });
        FakePub {
            cmd,
            endpoint,
            replay,
        }
    }

    async fn publish_payload(&self, seq: u64, payload: Bytes, live: bool) {
        let (done, ack) = oneshot::channel();
        let _ = self.cmd.send(Cmd::Publish {
            seq,
            payload,
            live,
            done,
        });
        ack.await.unwrap();
    }

    /// Publishes the batch `events(seq, incarnation)`.
    async fn publish(&self, seq: u64, incarnation: u32, live: bool) {
        let payload = encode_batch(f64::from(incarnation), &events(seq, incarnation), None);
        self.publish_payload(seq, payload.into(), live).await;
    }

    async fn restart(&self) {
        let (done, ack) = oneshot::channel();
        let _ = self.cmd.send(Cmd::Restart { done });
        ack.await.unwrap();
    }
}

/// A batch that names its seq and publisher incarnation.
fn events(seq: u64, incarnation: u32) -> Vec<KvEvent> {
    vec![KvEvent::BlockStored {
        block_hashes: vec![seq],
        parent_block_hash: None,
        token_ids: vec![incarnation; 4],
        block_size: 4,
        medium: Some("GPU".into()),
    }]
}

fn cfg(fake: &FakePub, replay: bool, idle_resync: Duration) -> SubscriberConfig {
    SubscriberConfig {
        replay_endpoint: replay.then(|| fake.replay.clone()),
        topic: "kv@fake".into(),
        connect_timeout: Duration::from_millis(300),
        replay_timeout: Duration::from_secs(5),
        idle_resync,
        backoff_min: Duration::from_millis(10),
        backoff_max: Duration::from_millis(100),
        ..SubscriberConfig::new(fake.endpoint.clone())
    }
}

async fn next(rx: &mut mpsc::Receiver<FeedEvent>) -> FeedEvent {
    tokio::time::timeout(GUARD, rx.recv())
        .await
        .expect("a feed event before the guard")
        .expect("the subscriber is running")
}

/// The next batch, skipping status events; a reset fails the test.
async fn next_batch(rx: &mut mpsc::Receiver<FeedEvent>) -> (u64, Vec<KvEvent>) {
    loop {
        match next(rx).await {
            FeedEvent::Batch { seq, events } => return (seq, events),
            FeedEvent::Status(_) => {}
            FeedEvent::Reset { .. } => panic!("unexpected reset"),
        }
    }
}

async fn wait_state(rx: &mut mpsc::Receiver<FeedEvent>, state: FeedState) -> FeedStatus {
    loop {
        match next(rx).await {
            FeedEvent::Status(s) if s.state == state => return s,
            FeedEvent::Status(_) => {}
            other => panic!("unexpected {other:?} while waiting for {state:?}"),
        }
    }
}

/// Publishes live batches from `seq` on until one reaches the subscriber as a live message, so
/// the PUB side has registered the subscription (ZMQ's slow joiner); returns the next seq.
/// Batches lost meanwhile are filled in by replay when there is one.
async fn warm_up(
    fake: &FakePub,
    h: &SubscriberHandle,
    rx: &mut mpsc::Receiver<FeedEvent>,
    mut seq: u64,
) -> u64 {
    for _ in 0..100 {
        let before = h.status();
        fake.publish(seq, 0, true).await;
        seq += 1;
        if let Ok(Some(FeedEvent::Batch { seq: got, .. })) =
            tokio::time::timeout(Duration::from_millis(100), rx.recv()).await
        {
            // Replay would deliver what is missing first; drain up to the newest seq.
            let mut got = got;
            while got + 1 < seq {
                got = next_batch(rx).await.0;
            }
            let after = h.status();
            if after.batches - after.replayed > before.batches - before.replayed {
                return seq;
            }
        }
    }
    panic!("no live message reached the subscriber");
}

#[tokio::test]
async fn replays_from_zero_on_start_then_fills_a_gap() {
    let fake = FakePub::start("tcp://127.0.0.1:0").await;
    for seq in 0..3 {
        fake.publish(seq, 0, true).await; // nobody listens yet
    }
    let (tx, mut rx) = mpsc::channel(64);
    let h = spawn_subscriber(cfg(&fake, true, Duration::from_secs(60)), tx);
    for want in 0..3 {
        assert_eq!(next_batch(&mut rx).await, (want, events(want, 0)));
    }
    let s = wait_state(&mut rx, FeedState::Connected).await;
    assert_eq!((s.batches, s.replayed, s.last_seq), (3, 3, Some(2)));

    let seq = warm_up(&fake, &h, &mut rx, 3).await;
    let recovered = h.status().gaps_recovered;
    // `seq` never goes out live: only replay can deliver it, and the live `seq + 1` (no idle
    // resync within this test) is what reveals the gap.
    fake.publish(seq, 0, false).await;
    fake.publish(seq + 1, 0, true).await;
    assert_eq!(next_batch(&mut rx).await, (seq, events(seq, 0)));
    assert_eq!(next_batch(&mut rx).await, (seq + 1, events(seq + 1, 0)));
    let s = h.status();
    assert_eq!(s.gaps_recovered, recovered + 1);
    assert_eq!(s.last_seq, Some(seq + 1));
    assert_eq!((s.gaps_unrecovered, s.decode_errors, s.resets), (0, 0, 0));

    // The next in-order batch arrives live.
    fake.publish(seq + 2, 0, true).await;
    assert_eq!(next_batch(&mut rx).await.0, seq + 2);
    h.shutdown().await;
}

/// A batch published only to the ring after the last live one (a lost tail) arrives through the
/// idle resync.
#[tokio::test]
async fn idle_resync_delivers_a_lost_tail() {
    let fake = FakePub::start("tcp://127.0.0.1:0").await;
    let (tx, mut rx) = mpsc::channel(64);
    let h = spawn_subscriber(cfg(&fake, true, Duration::from_millis(100)), tx);
    wait_state(&mut rx, FeedState::Connected).await;
    fake.publish(0, 0, false).await;
    fake.publish(1, 0, false).await;
    assert_eq!(next_batch(&mut rx).await.0, 0);
    assert_eq!(next_batch(&mut rx).await.0, 1);
    assert_eq!(h.status().replayed, 2);
}

#[tokio::test]
async fn publisher_restart_resets_and_replays_the_new_sequence() {
    let fake = FakePub::start("tcp://127.0.0.1:0").await;
    for seq in 0..3 {
        fake.publish(seq, 0, false).await;
    }
    let (tx, mut rx) = mpsc::channel(64);
    let h = spawn_subscriber(cfg(&fake, true, Duration::from_secs(60)), tx);
    for want in 0..3 {
        assert_eq!(next_batch(&mut rx).await.0, want);
    }
    wait_state(&mut rx, FeedState::Connected).await;
    let seq = warm_up(&fake, &h, &mut rx, 3).await;
    assert_eq!(h.status().last_seq, Some(seq - 1));

    fake.restart().await;
    fake.publish(0, 1, false).await;
    fake.publish(1, 1, true).await;
    let mut got = Vec::new();
    while got.len() < 3 {
        match next(&mut rx).await {
            FeedEvent::Status(_) => {}
            ev => got.push(ev),
        }
    }
    assert_eq!(
        got,
        vec![
            FeedEvent::Reset {
                reason: ResetReason::PublisherRestarted
            },
            FeedEvent::Batch {
                seq: 0,
                events: events(0, 1)
            },
            FeedEvent::Batch {
                seq: 1,
                events: events(1, 1)
            },
        ]
    );
    let s = h.status();
    assert_eq!((s.resets, s.last_seq), (1, Some(1)));
}

/// After a gap was filled by replay, live messages inside the replayed range are duplicates only
/// when their payload matches: a restarted publisher's batch with such a seq resets the feed.
#[tokio::test]
async fn restart_inside_the_replayed_range_is_not_taken_for_a_duplicate() {
    let fake = FakePub::start("tcp://127.0.0.1:0").await;
    let (tx, mut rx) = mpsc::channel(64);
    let h = spawn_subscriber(cfg(&fake, true, Duration::from_secs(60)), tx);
    wait_state(&mut rx, FeedState::Connected).await;
    let seq = warm_up(&fake, &h, &mut rx, 0).await;
    // Replay delivers `seq` and `seq + 1`; the live `seq + 1` is a true duplicate.
    fake.publish(seq, 0, false).await;
    fake.publish(seq + 1, 0, true).await;
    assert_eq!(next_batch(&mut rx).await.0, seq);
    assert_eq!(next_batch(&mut rx).await.0, seq + 1);
    let dups = h.status().duplicates;

    // A new publisher reaches `seq` again, live: same seq, other payload.
    fake.restart().await;
    for s in 0..seq {
        fake.publish(s, 1, false).await;
    }
    fake.publish(seq, 1, true).await;
    loop {
        match next(&mut rx).await {
            FeedEvent::Reset { .. } => break,
            FeedEvent::Status(_) => {}
            FeedEvent::Batch { seq, .. } => panic!("batch {seq} before the reset"),
        }
    }
    for want in 0..=seq {
        assert_eq!(next_batch(&mut rx).await, (want, events(want, 1)));
    }
    let s = h.status();
    assert_eq!((s.resets, s.last_seq), (1, Some(seq)));
    assert_eq!(
        s.duplicates,
        dups + 1,
        "the live `seq` was replayed after the reset"
    );
}

#[tokio::test]
async fn undecodable_batches_are_counted_and_skipped() {
    let fake = FakePub::start("tcp://127.0.0.1:0").await;
    fake.publish_payload(0, Bytes::from_static(&[0x92, 0xcb]), false)
        .await;
    fake.publish(1, 0, false).await;
    let (tx, mut rx) = mpsc::channel(64);
    let h = spawn_subscriber(cfg(&fake, true, Duration::from_secs(60)), tx);
    assert_eq!(next_batch(&mut rx).await, (1, events(1, 0)));
    let s = h.status();
    assert_eq!((s.decode_errors, s.batches, s.last_seq), (1, 1, Some(1)));
    assert!(s.last_error.unwrap().contains("batch 0"));
}

/// Without replay, gaps are counted and skipped, and a sequence going backwards is a restart.
#[tokio::test]
async fn without_replay_gaps_are_counted_and_restarts_reset() {
    let fake = FakePub::start("tcp://127.0.0.1:0").await;
    let (tx, mut rx) = mpsc::channel(64);
    let h = spawn_subscriber(cfg(&fake, false, Duration::from_secs(60)), tx);
    wait_state(&mut rx, FeedState::Connected).await;
    let seq = warm_up(&fake, &h, &mut rx, 0).await;
    let unrecovered = h.status().gaps_unrecovered;
    fake.publish(seq + 1, 0, true).await;
    assert_eq!(next_batch(&mut rx).await.0, seq + 1);
    assert_eq!(h.status().gaps_unrecovered, unrecovered + 1);

    fake.publish(0, 1, true).await;
    assert_eq!(
        next(&mut rx).await,
        FeedEvent::Reset {
            reason: ResetReason::PublisherRestarted
        }
    );
    assert_eq!(next_batch(&mut rx).await, (0, events(0, 1)));
    assert_eq!(h.status().resets, 1);
}

#[tokio::test]
async fn unreachable_until_the_publisher_binds() {
    // A port nobody listens on (bound and released by this test).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let endpoint = format!("tcp://127.0.0.1:{port}");
    let (tx, mut rx) = mpsc::channel(64);
    let mut c = SubscriberConfig::new(endpoint.clone());
    c.connect_timeout = Duration::from_millis(200);
    c.backoff_min = Duration::from_millis(10);
    c.backoff_max = Duration::from_millis(50);
    let h = spawn_subscriber(c, tx);
    let s = wait_state(&mut rx, FeedState::Unreachable).await;
    assert!(s.last_error.unwrap().contains(&endpoint));
    assert_eq!(h.status().state, FeedState::Unreachable);

    let fake = FakePub::start(&endpoint).await;
    wait_state(&mut rx, FeedState::Connected).await;
    warm_up(&fake, &h, &mut rx, 0).await;
}

#[tokio::test]
async fn dropping_the_handle_stops_the_subscriber() {
    let fake = FakePub::start("tcp://127.0.0.1:0").await;
    let (tx, mut rx) = mpsc::channel(64);
    let h = spawn_subscriber(cfg(&fake, true, Duration::from_secs(60)), tx);
    wait_state(&mut rx, FeedState::Connected).await;
    drop(h);
    while let Some(ev) = tokio::time::timeout(GUARD, rx.recv()).await.unwrap() {
        assert!(matches!(ev, FeedEvent::Status(_)), "{ev:?}");
    }
}
