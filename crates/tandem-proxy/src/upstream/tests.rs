//! The client against a real socket: an engine stand-in that writes exactly the bytes a test
//! gives it, so framing, bursts, reuse and stale connections are checked end to end.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::*;
use crate::relay::{Burst, Event, EventReader, RelayError};
use crate::tls::EngineTls;

const WAIT: Duration = Duration::from_secs(10);

/// Serves accepted connections with `answers` in turn: for each request read (up to its blank
/// line and `content-length` bytes), the given writes, each flushed on its own. With `close`,
/// each connection gets one answer and is closed; without, one connection gets them all and is
/// held until the client closes it. Returns the number of connections once the answers are out.
async fn engine(
    answers: Vec<Vec<Vec<u8>>>,
    close: bool,
) -> (Arc<Upstream>, tokio::task::JoinHandle<usize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let mut accepted = 0;
        let mut answers = answers.into_iter().peekable();
        while answers.peek().is_some() {
            let (mut s, _) = listener.accept().await.expect("accept");
            accepted += 1;
            let mut req = Vec::new();
            for writes in answers.by_ref() {
                read_request(&mut s, &mut req).await;
                for w in writes {
                    s.write_all(&w).await.expect("write");
                    s.flush().await.expect("flush");
                    // Let the client see each write on its own where it reads in time.
                    tokio::task::yield_now().await;
                }
                if close {
                    break;
                }
            }
            if !close {
                let _ = s.read(&mut [0u8; 1]).await;
            }
        }
        accepted
    });
    let up = Upstream::new(&format!("http://{addr}"), WAIT, &EngineTls::none());
    (up, task)
}

/// One HTTP/1.1 chunk holding `data`.
fn chunk(data: &str) -> Vec<u8> {
    format!("{:x}\r\n{data}\r\n", data.len()).into_bytes()
}

fn bytes(b: &[u8]) -> Vec<u8> {
    b.to_vec()
}

/// Read one request head (and its body by `content-length`).
async fn read_request(s: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                buf.drain(..end + 4 + len);
                return;
            }
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await.expect("read");
        assert!(n > 0, "the client closed before a whole request");
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn trace() -> Outgoing {
    let tp =
        crate::trace::TraceParent::parse("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
            .expect("a valid traceparent");
    Outgoing::new(tp, None)
}

const HEAD: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";

#[tokio::test]
async fn a_burst_of_chunked_events_is_one_part_and_the_connection_is_kept() {
    // Three events as three chunks in one write, then [DONE] and the closing chunk.
    let burst = [
        chunk("data: {\"a\":1}\n\n"),
        chunk("data: {\"b\":2}\n\n"),
        chunk("data: {\"c\":3}\n\n"),
    ]
    .concat();
    let done = [chunk("data: [DONE]\n\n"), bytes(b"0\r\n\r\n")].concat();
    let second = bytes(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
    let (up, task) = engine(vec![vec![bytes(HEAD), burst, done], vec![second]], false).await;
    let mut conn = up.acquire().await.expect("connect");
    let head = conn
        .send(conn.post_json("/v1/completions", Bytes::from_static(b"{}"), "r1", &trace()))
        .await
        .expect("head");
    assert_eq!(head.status, 200);
    assert_eq!(head.content_type.expect("type"), "text/event-stream");
    let mut reader = EventReader::new(conn, None);
    let mut b = Burst::default();
    let mut all = Vec::new();
    while !b.done {
        b = Burst::default();
        reader.next_burst(WAIT, &mut b, false).await.expect("burst");
        assert!(!b.parts.is_empty());
        // However the writes were read, a burst goes out as one part.
        assert_eq!(b.parts.len(), 1, "{:?}", b.parts);
        all.extend_from_slice(&b.parts[0]);
    }
    assert_eq!(
        all,
        b"data: {\"a\":1}\n\ndata: {\"b\":2}\n\ndata: {\"c\":3}\n\ndata: [DONE]\n\n"
    );
    // Read to [DONE] and the closing chunk: the connection goes back to the pool and the next
    // request reuses it.
    let mut conn = reader.into_conn();
    while let Ok(Step::Data(_)) = conn.buffered() {}
    if !conn.body_done() {
        assert!(conn.data().await.expect("body end").is_none());
    }
    conn.release();
    assert_eq!(
        up.idle.lock().expect("lock").len(),
        1,
        "kept for the next request"
    );
    let mut again = up.acquire().await.expect("pooled");
    let h = again
        .send(again.get("/health"))
        .await
        .expect("second answer");
    assert_eq!(h.status, 200);
    assert_eq!(
        again.collect().await.expect("body"),
        Bytes::from_static(b"ok")
    );
    drop(again);
    drop(up);
    assert_eq!(
        task.await.expect("engine"),
        1,
        "one connection for both requests"
    );
}

#[tokio::test]
async fn events_split_anywhere_are_whole_and_usage_is_rewritten() {
    // An event split inside its blank line, and a usage event whose cached tokens Tandem sets.
    let a = chunk("data: {\"text\":\"x\"}\n");
    let b = chunk("\n");
    let usage = chunk("data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":1,\"total_tokens\":10}}\n\n");
    let done = [chunk("data: [DONE]\n\n"), bytes(b"0\r\n\r\n")].concat();
    let (up, _task) = engine(vec![vec![bytes(HEAD), a, b, usage, done]], true).await;
    let mut conn = up.acquire().await.expect("connect");
    conn.send(conn.post_json("/v1/completions", Bytes::new(), "r2", &trace()))
        .await
        .expect("head");
    let mut reader = EventReader::new(conn, Some(7));
    let first = reader.next(WAIT).await.expect("event").expect("some");
    assert_eq!(
        first,
        Event::Content(Bytes::from_static(b"data: {\"text\":\"x\"}\n\n"))
    );
    let mut out = Vec::new();
    let mut seen_usage = None;
    loop {
        let mut burst = Burst::default();
        reader
            .next_burst(WAIT, &mut burst, true)
            .await
            .expect("burst");
        for p in &burst.parts {
            out.extend_from_slice(p);
        }
        seen_usage = burst.usage.or(seen_usage);
        if burst.done {
            break;
        }
    }
    let text = String::from_utf8(out).expect("utf-8");
    assert!(
        text.contains("\"prompt_tokens_details\":{\"cached_tokens\":7}"),
        "{text}"
    );
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert_eq!(seen_usage, Some((9, 1)));
}

#[tokio::test]
async fn a_stream_cut_before_done_is_truncated_and_never_pooled() {
    let a = chunk("data: {\"text\":\"x\"}\n\n");
    let (up, _task) = engine(vec![vec![bytes(HEAD), a]], true).await;
    let mut conn = up.acquire().await.expect("connect");
    conn.send(conn.post_json("/v1/completions", Bytes::new(), "r3", &trace()))
        .await
        .expect("head");
    let mut reader = EventReader::new(conn, None);
    assert!(matches!(
        reader.next(WAIT).await,
        Ok(Some(Event::Content(_)))
    ));
    let mut burst = Burst::default();
    let err = reader.next_burst(WAIT, &mut burst, false).await;
    assert!(matches!(err, Err(RelayError::Broken(_))), "{err:?}");
    reader.into_conn().release();
    assert!(
        up.idle.lock().expect("lock").is_empty(),
        "a broken body's connection is closed"
    );
}

#[tokio::test]
async fn an_idle_connection_the_engine_closed_is_replaced_before_the_request() {
    // The engine answers once and closes (uvicorn's keep-alive timeout), then answers a fresh
    // connection.
    let ok = bytes(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
    let (up, task) = engine(vec![vec![ok.clone()], vec![ok]], true).await;
    let mut conn = up.acquire().await.expect("connect");
    conn.send(conn.get("/health")).await.expect("first");
    conn.collect().await.expect("body");
    conn.release();
    // Wait until the close has arrived, as it would during a prefill.
    let mut idle = up.acquire().await.expect("pooled or new");
    for _ in 0..1000 {
        if idle.io.as_ref().is_some_and(Io::is_stale) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let h = idle
        .send(idle.get("/health"))
        .await
        .expect("sent on a fresh connection");
    assert_eq!(h.status, 200);
    assert_eq!(
        idle.collect().await.expect("body"),
        Bytes::from_static(b"ok")
    );
    drop(idle);
    drop(up);
    assert_eq!(task.await.expect("engine"), 2);
}
