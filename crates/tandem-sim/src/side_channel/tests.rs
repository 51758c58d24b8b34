use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rmpv::Value;
use tokio::sync::mpsc;
use zeromq::{ReqSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

use super::server::{parse_request, reap_candidates, PeerState, Request};
use super::*;

const T: Duration = Duration::from_secs(5);

fn factors() -> CompatFactors {
    CompatFactors {
        vllm_version: "0.10.1".into(),
        nixl_connector_version: NIXL_CONNECTOR_VERSION,
        model: "Qwen/Qwen3-8B".into(),
        dtype: "torch.bfloat16".into(),
        num_kv_heads: 8,
        head_size: 128,
        num_hidden_layers: 36,
        attn_backend_name: "FLASH_ATTN".into(),
        cache_dtype: "auto".into(),
    }
}

fn info() -> HandshakeInfo {
    HandshakeInfo {
        engine_id: "prefill-0".into(),
        tp_size: 2,
        num_blocks: 1000,
        block_size: 16,
        block_len_bytes: 65536,
        factors: factors(),
        nixl: None,
    }
}

/// A stand-in engine: READs return 3 bytes of the block id per block, notifications are
/// forwarded to the test; ids starting with "unknown" are answered with an error.
fn spawn_engine() -> (
    mpsc::Sender<SideRequest>,
    mpsc::UnboundedReceiver<(String, u32)>,
) {
    let (tx, mut rx) = mpsc::channel(16);
    let (notif_tx, notif_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(req) = rx.recv().await {
            match req {
                SideRequest::Read {
                    remote_request_id: id,
                    block_ids,
                    reply,
                    ..
                } => {
                    let r = if id.starts_with("unknown") {
                        Err(format!("no blocks pinned for {id}"))
                    } else {
                        Ok(block_ids.iter().map(|&b| vec![b as u8; 3]).collect())
                    };
                    let _ = reply.send(r);
                }
                SideRequest::Notify {
                    remote_request_id: id,
                    world_size,
                    reply,
                } => {
                    let r = if id.starts_with("unknown") {
                        Err(format!("unrecognized request {id}"))
                    } else {
                        let _ = notif_tx.send((id, world_size));
                        Ok(())
                    };
                    let _ = reply.send(r);
                }
            }
        }
    });
    (tx, notif_rx)
}

async fn start(
    to_engine: mpsc::Sender<SideRequest>,
    stall: Arc<AtomicBool>,
    max_idle: usize,
) -> (SideChannelHandle, u16) {
    let (handle, endpoint) = SideChannelServer::start_with_max_idle_peers(
        "tcp://127.0.0.1:0",
        info(),
        to_engine,
        stall,
        max_idle,
    )
    .await
    .unwrap();
    let port = endpoint.strip_prefix("tcp://127.0.0.1:").unwrap();
    (handle, port.parse().unwrap())
}

async fn start_default() -> (
    SideChannelHandle,
    u16,
    mpsc::UnboundedReceiver<(String, u32)>,
) {
    let (tx, notifs) = spawn_engine();
    let (handle, port) = start(tx, Arc::new(AtomicBool::new(false)), 128).await;
    (handle, port, notifs)
}

/// One raw REQ exchange, to look at the bytes on the wire.
async fn raw_call(port: u16, request: Vec<u8>) -> Vec<Bytes> {
    let mut req = ReqSocket::new();
    req.connect(&format!("tcp://127.0.0.1:{port}"))
        .await
        .unwrap();
    req.send(ZmqMessage::from(request)).await.unwrap();
    let reply = tokio::time::timeout(T, req.recv()).await.unwrap();
    reply.unwrap().into_vec()
}

#[test]
fn compatibility_hash_is_vllms_and_sensitive_to_every_factor() {
    // Golden values from Python: sha256(json.dumps(factors, sort_keys=True).encode()).hexdigest().
    let f = factors();
    assert_eq!(
        compatibility_hash(&f),
        "5f683a481d3e7521fcec8b75ba4d329c97b54d9ac1f8d9ebd1805dbd97a90bfc"
    );
    let escaped = CompatFactors {
        model: "mod\u{e8}le\"x\\\n\u{1F600}".into(),
        ..f.clone()
    };
    assert_eq!(
        compatibility_hash(&escaped),
        "ca2b5efbae8f32daf41a34002af6884c901ec57c71aaf09da2b88aa56d0e0d41"
    );
    type Mutate = fn(&mut CompatFactors);
    let mutations: [Mutate; 9] = [
        |f| f.vllm_version.push('x'),
        |f| f.nixl_connector_version += 1,
        |f| f.model.push('x'),
        |f| f.dtype = "torch.float16".into(),
        |f| f.num_kv_heads += 1,
        |f| f.head_size += 1,
        |f| f.num_hidden_layers += 1,
        |f| f.attn_backend_name = "FLASHINFER".into(),
        |f| f.cache_dtype = "fp8".into(),
    ];
    let base = compatibility_hash(&f);
    for (i, mutate) in mutations.iter().enumerate() {
        let mut g = f.clone();
        mutate(&mut g);
        assert_ne!(compatibility_hash(&g), base, "factor #{i} not hashed");
    }
}

#[tokio::test]
async fn handshake_roundtrip() {
    let (_server, port, _) = start_default().await;
    // vLLM's default side-channel host is "localhost".
    let agent = handshake("localhost", port, 0, T).await.unwrap();
    assert_eq!(agent.compatibility_hash, compatibility_hash(&factors()));
    assert_eq!(agent.engine_id, "prefill-0");
    assert_eq!(agent.device_id, 0);
    assert_eq!(agent.num_blocks, 1000);
    assert_eq!(agent.block_size, 16);
    assert_eq!(agent.kv_cache_layout, "HND");
    assert_eq!(agent.block_lens, vec![65536; 36]);
    assert_eq!(agent.kv_caches_base_addr.len(), 36);
    assert!(!agent.agent_metadata.is_empty());

    let client = SideChannelClient::new();
    let rank1 = client.handshake("127.0.0.1", port, 1, T).await.unwrap();
    assert_eq!(rank1.device_id, 1);
    assert_eq!(rank1.compatibility_hash, agent.compatibility_hash);
    assert_ne!(rank1.kv_caches_base_addr, agent.kv_caches_base_addr);
    assert_eq!(client.idle_connections(), 1);
}

#[tokio::test]
async fn handshake_wire_format() {
    let (_server, port, _) = start_default().await;
    // msgspec.msgpack.encode((b"get_meta_msg", 0)): fixarray(2), bin8(12) "get_meta_msg", 0.
    let mut request = vec![0x92, 0xc4, 0x0c];
    request.extend_from_slice(b"get_meta_msg");
    request.push(0x00);
    let frames = raw_call(port, request).await;
    assert_eq!(frames.len(), 1);
    let reply = &frames[0];
    // fixmap(2), fixstr(18) "compatibility_hash", str8(64) hex digest, ...
    assert_eq!(&reply[..2], &[0x82, 0xb2]);
    assert_eq!(&reply[2..20], b"compatibility_hash");
    assert_eq!(&reply[20..22], &[0xd9, 0x40]);
    let outer = from_msgpack(reply).unwrap();
    let keys = |v: &Value| -> Vec<String> {
        let map = v.as_map().unwrap();
        map.iter()
            .map(|(k, _)| k.as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(keys(&outer), ["compatibility_hash", "agent_metadata_bytes"]);
    let meta_bytes = map_get(&outer, "agent_metadata_bytes").unwrap();
    assert!(
        matches!(meta_bytes, Value::Binary(_)),
        "msgspec bytes = bin"
    );
    let meta = from_msgpack(meta_bytes.as_slice().unwrap()).unwrap();
    assert_eq!(
        keys(&meta),
        [
            "engine_id",
            "agent_metadata",
            "kv_caches_base_addr",
            "device_id",
            "num_blocks",
            "block_lens",
            "kv_cache_layout",
            "block_size"
        ]
    );
    assert!(matches!(
        map_get(&meta, "agent_metadata"),
        Some(Value::Binary(_))
    ));

    // Newer form (GET_META_MSG, pp_rank, tp_rank): payload plus a float64 timestamp frame.
    let newer = to_msgpack(&Value::Array(vec![
        Value::Binary(GET_META_MSG.to_vec()),
        Value::from(0u32),
        Value::from(1u32),
    ]));
    let frames = raw_call(port, newer).await;
    assert_eq!(frames.len(), 2);
    assert!(matches!(from_msgpack(&frames[1]), Ok(Value::F64(_))));
}

#[tokio::test]
async fn read_and_notify_roundtrip() {
    let (_server, port, mut notifs) = start_default().await;
    let client = SideChannelClient::new();
    let blocks = client
        .read_blocks("localhost", port, "cmpl-a-0-1234abcd", &[7, 300, 9], T)
        .await
        .unwrap();
    assert_eq!(blocks, vec![vec![7; 3], vec![44; 3], vec![9; 3]]);
    // Request ids may contain ':'; the server splits on the last one, as vLLM does.
    client
        .notify("localhost", port, "chat:cmpl-b", 2, T)
        .await
        .unwrap();
    assert_eq!(notifs.recv().await.unwrap(), ("chat:cmpl-b".to_string(), 2));
    notify("127.0.0.1", port, "cmpl-c", 1, T).await.unwrap();
    assert_eq!(notifs.recv().await.unwrap(), ("cmpl-c".to_string(), 1));
    assert_eq!(
        read_blocks("127.0.0.1", port, "x", &[], T)
            .await
            .unwrap()
            .len(),
        0
    );
    assert_eq!(client.idle_connections(), 1, "one connection, reused");
}

#[tokio::test]
async fn remote_errors_propagate() {
    let (_server, port, _) = start_default().await;
    let err = read_blocks("127.0.0.1", port, "unknown-1", &[1], T)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, SideChannelError::Remote(m) if m == "no blocks pinned for unknown-1"),
        "{err:?}"
    );
    assert!(!err.retryable());
    let err = notify("127.0.0.1", port, "unknown-2", 1, T)
        .await
        .unwrap_err();
    assert!(matches!(&err, SideChannelError::Remote(m) if m.contains("unknown-2")));

    // Malformed requests are answered with an error instead of vLLM's silence.
    let frames = raw_call(port, to_msgpack(&Value::from("hello"))).await;
    let reply = from_msgpack(&frames[0]).unwrap();
    assert_eq!(map_get(&reply, "ok"), Some(&Value::Boolean(false)));

    // Engine gone: the server still answers, with an error.
    let (tx, rx) = mpsc::channel(1);
    drop(rx);
    let (_server, port) = start(tx, Arc::new(AtomicBool::new(false)), 128).await;
    let err = read_blocks("127.0.0.1", port, "r", &[1], T)
        .await
        .unwrap_err();
    assert!(matches!(&err, SideChannelError::Remote(m) if m == "engine is not running"));
}

#[tokio::test]
async fn unknown_tp_rank_is_an_error() {
    let (_server, port, _) = start_default().await;
    let err = handshake("127.0.0.1", port, 2, T).await.unwrap_err();
    assert!(
        matches!(&err, SideChannelError::Remote(m) if m.contains("tp=2")),
        "{err:?}"
    );
    assert!(!err.retryable());
}

#[tokio::test]
async fn stalled_handshake_times_out_without_blocking_the_server() {
    let (tx, _notifs) = spawn_engine();
    let stall = Arc::new(AtomicBool::new(true));
    let (_server, port) = start(tx, stall.clone(), 128).await;
    let client = SideChannelClient::new();
    // A real (short) timeout: the fault under test is a reply that never comes.
    let err = client
        .handshake("127.0.0.1", port, 0, Duration::from_millis(200))
        .await
        .unwrap_err();
    assert!(matches!(err, SideChannelError::Timeout), "{err:?}");
    assert!(err.retryable());
    assert_eq!(client.idle_connections(), 0, "timed-out socket dropped");
    // Other requests are still served while handshakes stall.
    client
        .read_blocks("127.0.0.1", port, "r", &[1], T)
        .await
        .unwrap();
    stall.store(false, Ordering::Relaxed);
    client.handshake("127.0.0.1", port, 0, T).await.unwrap();
}

#[tokio::test]
async fn dead_server_times_out_and_shutdown_closes_the_port() {
    let (server, port, _) = start_default().await;
    handshake("127.0.0.1", port, 0, T).await.unwrap();
    server.shutdown().await;
    // Connection refused is retried by the zeromq crate (like libzmq's lazy connect), so a dead
    // server surfaces as a timeout, as it does for vLLM.
    let err = handshake("127.0.0.1", port, 0, Duration::from_millis(200))
        .await
        .unwrap_err();
    assert!(matches!(err, SideChannelError::Timeout), "{err:?}");
}

#[tokio::test]
async fn idle_peers_are_reaped_and_pooled_clients_reconnect() {
    let (tx, _notifs) = spawn_engine();
    let (_server, port) = start(tx, Arc::new(AtomicBool::new(false)), 1).await;
    let request = || {
        to_msgpack(&Value::Array(vec![
            Value::Binary(GET_META_MSG.to_vec()),
            Value::from(0u32),
        ]))
    };

    // A raw REQ socket that stays connected after its call...
    let mut a = ReqSocket::new();
    a.connect(&format!("tcp://127.0.0.1:{port}")).await.unwrap();
    a.send(ZmqMessage::from(request())).await.unwrap();
    tokio::time::timeout(T, a.recv()).await.unwrap().unwrap();
    // ...is disconnected by the server once a newer peer exceeds the idle bound of 1.
    handshake("127.0.0.1", port, 0, T).await.unwrap();
    let second = async {
        a.send(ZmqMessage::from(request())).await?;
        a.recv().await
    };
    let res = tokio::time::timeout(T, second)
        .await
        .expect("the reaped connection fails fast");
    assert!(res.is_err(), "reaped connection must not answer");

    // A pooled client whose connection was reaped the same way retries once, transparently.
    let client = SideChannelClient::new();
    client.handshake("127.0.0.1", port, 0, T).await.unwrap();
    handshake("127.0.0.1", port, 1, T).await.unwrap();
    client.handshake("127.0.0.1", port, 0, T).await.unwrap();
    assert_eq!(client.idle_connections(), 1);
}

#[test]
fn reap_picks_least_recent_idle_peers() {
    let peer = |last_active, inflight, stalled| PeerState {
        last_active,
        inflight,
        stalled,
    };
    let peers: HashMap<Bytes, PeerState> = [
        (Bytes::from_static(b"busy"), peer(1, 1, false)),
        (Bytes::from_static(b"stalled"), peer(2, 0, true)),
        (Bytes::from_static(b"old"), peer(3, 0, false)),
        (Bytes::from_static(b"new"), peer(4, 0, false)),
    ]
    .into_iter()
    .collect();
    assert!(reap_candidates(&peers, 4, true).is_empty());
    assert_eq!(
        reap_candidates(&peers, 3, true),
        vec![Bytes::from_static(b"old")]
    );
    assert_eq!(
        reap_candidates(&peers, 0, true),
        vec![Bytes::from_static(b"old"), Bytes::from_static(b"new")]
    );
    assert_eq!(
        reap_candidates(&peers, 3, false),
        vec![Bytes::from_static(b"stalled")]
    );
}

#[test]
fn parses_requests_leniently_but_strictly_typed() {
    let enc = |items: Vec<Value>| to_msgpack(&Value::Array(items));
    let notif = |payload: &str| {
        enc(vec![
            Value::Binary(TANDEM_NOTIF_MSG.to_vec()),
            Value::from(payload),
        ])
    };
    assert_eq!(
        parse_request(&notif("a:b:4")),
        Ok(Request::Notify {
            id: "a:b".into(),
            world_size: 4
        })
    );
    assert!(parse_request(&notif("no-world-size")).is_err());
    assert!(parse_request(&notif("id:x")).is_err());
    // A str tag is accepted as well as msgspec's bin.
    assert_eq!(
        parse_request(&enc(vec![Value::from("get_meta_msg"), Value::from(3u32)])),
        Ok(Request::Handshake {
            pp_rank: None,
            tp_rank: 3
        })
    );
    let read = enc(vec![
        Value::Binary(TANDEM_READ_MSG.to_vec()),
        Value::from("r"),
        Value::Array(vec![Value::from(-1i64)]),
    ]);
    assert!(parse_request(&read).is_err());
    assert!(parse_request(&[0x92]).is_err());
    // The grant before a real NIXL READ is a read that wants no bytes back.
    let grant = enc(vec![
        Value::Binary(TANDEM_GRANT_MSG.to_vec()),
        Value::from("r"),
        Value::Array(vec![Value::from(4u32), Value::from(9u32)]),
    ]);
    assert_eq!(
        parse_request(&grant),
        Ok(Request::Read {
            id: "r".into(),
            block_ids: vec![4, 9],
            grant: true
        })
    );
}

#[test]
fn connect_endpoints() {
    let ep = |h: &str| client::connect_endpoint(h, 5600).unwrap();
    assert_eq!(ep("localhost"), "tcp://127.0.0.1:5600");
    assert_eq!(ep("10.0.0.7"), "tcp://10.0.0.7:5600");
    assert_eq!(ep("::1"), "tcp://[::1]:5600");
    assert_eq!(ep("[::1]"), "tcp://[::1]:5600");
    assert!(client::connect_endpoint("", 1).is_err());
}
