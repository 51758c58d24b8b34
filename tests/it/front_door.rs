//! The coordinator's front door through the real binary: every error it produces is vLLM's JSON
//! body, none of them reaches an engine, slow clients are cut off, and shutdown past the grace
//! period ends open streams the way vLLM ends a failed one.

use std::time::Duration;

use futures::StreamExt;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{read_until, Sim, Tandem, PROMPT};

/// The served model name of the `qwen3-0.6b` profile.
const MODEL: &str = "Qwen/Qwen3-0.6B";

/// A `tandem serve` config over one prefill and one decode sim, with `server` lines added to
/// `[server]`.
fn config(p: &Sim, d: &Sim, server: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{server}\n\n\
         [pools.prefill]\nendpoints = [\"{}\"]\npolicy = \"least-loaded\"\n\n\
         [pools.decode]\nendpoints = [\"{}\"]\npolicy = \"least-loaded\"\n\n\
         [disaggregation]\nmode = \"always\"\n\n\
         [health]\ninterval_ms = 100\n",
        p.url, d.url
    )
}

fn completion(max_tokens: u64) -> Value {
    json!({"model": MODEL, "prompt": PROMPT, "max_tokens": max_tokens, "ignore_eos": true})
}

/// vLLM's error body with this status, and a message that gives nothing away: no address, no
/// URL, no path, no panic text.
fn assert_error(status: u16, v: &Value, code: u16, kind: &str) {
    assert_eq!(status, code, "{v}");
    let e = &v["error"];
    assert_eq!(e["code"], code, "{v}");
    assert_eq!(e["type"], kind, "{v}");
    assert!(e.get("param").is_some_and(Value::is_null), "{v}");
    let msg = e["message"]
        .as_str()
        .unwrap_or_else(|| panic!("a message: {v}"));
    assert!(!msg.is_empty(), "{v}");
    for leak in ["127.0.0.1", "http://", "/", "panicked"] {
        assert!(!msg.contains(leak), "{leak:?} in {msg:?}");
    }
    assert_eq!(v.as_object().map(|o| o.len()), Some(1), "only `error`: {v}");
}

/// Neither engine saw a generation request: none recorded, no prompt tokens counted.
async fn assert_no_generation(sims: &[&Sim]) {
    for s in sims {
        let seen: Value = s.get("/admin/requests").await.json().await.unwrap();
        assert_eq!(seen["requests"], json!([]), "{seen}");
        assert_eq!(s.metric("vllm:prompt_tokens_total", &[]).await, 0.0);
    }
}

/// A raw HTTP/1.1 response: status, header block, body.
struct Raw {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Raw {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "JSON body ({e}): {}\n{}",
                self.head,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

async fn connect(base_url: &str) -> TcpStream {
    TcpStream::connect(base_url.trim_start_matches("http://"))
        .await
        .expect("connect")
}

/// Read one response from `s` (its whole body, by Content-Length), within 10 s.
async fn read_response(s: &mut TcpStream) -> Raw {
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).into_owned();
            let len = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or_else(|| panic!("a Content-Length: {head}"));
            if got.len() >= end + 4 + len {
                let status = head
                    .split(' ')
                    .nth(1)
                    .and_then(|c| c.parse().ok())
                    .unwrap_or_else(|| panic!("a status line: {head}"));
                let body = got[end + 4..end + 4 + len].to_vec();
                return Raw { status, head, body };
            }
        }
        let n = tokio::time::timeout_at(deadline, s.read(&mut buf))
            .await
            .expect("a response within 10 s")
            .expect("read");
        assert!(
            n > 0,
            "closed before a whole response: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
}

/// Send `request` (one write) on a fresh connection and read the response.
async fn exchange(base_url: &str, request: &[u8]) -> Raw {
    let mut s = connect(base_url).await;
    s.write_all(request).await.expect("write");
    read_response(&mut s).await
}

/// Assert the server closes `s` within 10 s (a bound, not a wait): EOF or a reset, and no
/// response before it.
async fn assert_closed(s: &mut TcpStream) {
    let mut buf = [0u8; 1024];
    let r = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("the server closed the connection within 10 s");
    match r {
        Ok(0) | Err(_) => {}
        Ok(n) => panic!(
            "expected the connection closed, got {}",
            String::from_utf8_lossy(&buf[..n])
        ),
    }
}

#[tokio::test]
async fn unknown_routes_and_wrong_methods_get_vllm_errors() {
    let (p, d) = tokio::join!(Sim::start(&[]), Sim::start(&[]));
    let t = Tandem::start(&config(&p, &d, "")).await;

    let resp = t
        .client
        .post(format!("{}/v1/nothing/here", t.url))
        .json(&completion(4))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    assert_error(status, &resp.json().await.unwrap(), 404, "NotFoundError");
    let resp = t.get("/").await;
    let status = resp.status().as_u16();
    assert_error(status, &resp.json().await.unwrap(), 404, "NotFoundError");

    let resp = t.get("/v1/completions").await;
    let status = resp.status().as_u16();
    assert_eq!(resp.headers()["allow"], "POST");
    assert_error(
        status,
        &resp.json().await.unwrap(),
        405,
        "MethodNotAllowedError",
    );
    let resp = t
        .client
        .delete(format!("{}/health", t.url))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let allow = resp.headers()["allow"].to_str().unwrap().to_string();
    assert!(allow.contains("GET"), "{allow}");
    assert_error(
        status,
        &resp.json().await.unwrap(),
        405,
        "MethodNotAllowedError",
    );
    assert_no_generation(&[&p, &d]).await;
}

#[tokio::test]
async fn oversized_and_malformed_requests_get_vllm_errors_and_reach_no_engine() {
    let (p, d) = tokio::join!(Sim::start(&[]), Sim::start(&[]));
    let t = Tandem::start(&config(
        &p,
        &d,
        "max_body_bytes = 1024\nmax_header_bytes = 4096\nmax_headers = 20",
    ))
    .await;
    let host = t.url.trim_start_matches("http://");
    let small = completion(4).to_string();

    // A body declared larger than the limit: answered from the headers.
    let r = exchange(
        &t.url,
        format!(
            "POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n\
             Content-Length: 100000\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    assert_error(r.status, &r.json(), 413, "RequestEntityTooLargeError");
    assert_eq!(r.header("connection"), Some("close"), "{}", r.head);

    // A chunked body that grows past it.
    let chunk = format!("{{\"prompt\": \"{}\"}}", "x".repeat(2000));
    let r = exchange(
        &t.url,
        format!(
            "POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n\
             Transfer-Encoding: chunked\r\n\r\n{:x}\r\n{chunk}\r\n0\r\n\r\n",
            chunk.len()
        )
        .as_bytes(),
    )
    .await;
    assert_error(r.status, &r.json(), 413, "RequestEntityTooLargeError");

    // Broken chunked encoding.
    let r = exchange(
        &t.url,
        format!(
            "POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n\
             Transfer-Encoding: chunked\r\n\r\nzz\r\n{small}\r\n0\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    assert_error(r.status, &r.json(), 400, "BadRequestError");

    // A header block past max_header_bytes (below hyper's own limit, twice that).
    let r = exchange(
        &t.url,
        format!(
            "POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n\
             X-Padding: {}\r\nContent-Length: {}\r\n\r\n{small}",
            "p".repeat(5000),
            small.len()
        )
        .as_bytes(),
    )
    .await;
    assert_error(r.status, &r.json(), 431, "RequestHeaderFieldsTooLargeError");

    // More header fields than max_headers.
    let many: String = (0..30).map(|i| format!("X-Field-{i}: {i}\r\n")).collect();
    let r = exchange(
        &t.url,
        format!(
            "POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n\
             {many}Content-Length: {}\r\n\r\n{small}",
            small.len()
        )
        .as_bytes(),
    )
    .await;
    assert_error(r.status, &r.json(), 431, "RequestHeaderFieldsTooLargeError");

    // The limits leave ordinary requests alone: one goes through on the same server.
    let (status, v) = t.post_json("/v1/completions", &completion(2), None).await;
    assert_eq!(status, 200, "{v}");
    for s in [&p, &d] {
        let seen: Value = s.get("/admin/requests").await.json().await.unwrap();
        assert_eq!(
            seen["requests"].as_array().map(Vec::len),
            Some(1),
            "only the ordinary request reached the engine: {seen}"
        );
    }
}

#[tokio::test]
async fn sampling_parameters_vllm_rejects_get_400_before_any_engine_work() {
    let (p, d) = tokio::join!(Sim::start(&[]), Sim::start(&[]));
    let t = Tandem::start(&config(&p, &d, "")).await;
    let cases = [
        (
            json!({"temperature": -1}),
            "temperature must be non-negative, got -1.0.",
        ),
        (json!({"top_p": 2}), "top_p must be in (0, 1], got 2.0."),
        (json!({"n": 100000}), "n must be at most 16, got 100000."),
        (
            json!({"max_tokens": 0}),
            "max_tokens must be at least 1, got 0.",
        ),
        (
            json!({"temperature": "hot"}),
            "`temperature` must be a number",
        ),
    ];
    for (i, (extra, message)) in cases.into_iter().enumerate() {
        let mut body = completion(4);
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let id = format!("bad-sampling-{i}");
        let started = std::time::Instant::now();
        let (status, v) = t.post_json("/v1/completions", &body, Some(&id)).await;
        assert_error(status, &v, 400, "BadRequestError");
        assert_eq!(v["error"]["message"], message, "{body}");
        // Fast: nothing waited on an engine (a bound, far above the real time).
        assert!(started.elapsed() < Duration::from_secs(5), "{body}");
        assert_eq!(t.record(&id).await["outcome"], "client_error", "{id}");
    }
    let chat = json!({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0});
    let (status, v) = t.post_json("/v1/chat/completions", &chat, None).await;
    assert_error(status, &v, 400, "BadRequestError");
    assert_eq!(
        v["error"]["message"],
        "max_completion_tokens must be at least 1, got 0."
    );
    assert_no_generation(&[&p, &d]).await;
}

#[tokio::test]
async fn slow_clients_are_cut_off() {
    let (p, d) = tokio::join!(Sim::start(&[]), Sim::start(&[]));
    let t = Tandem::start(&config(
        &p,
        &d,
        "header_read_timeout_ms = 300\nbody_read_timeout_ms = 500",
    ))
    .await;
    let host = t.url.trim_start_matches("http://").to_string();

    // Half a header block, then nothing: closed after header_read_timeout_ms.
    let mut s = connect(&t.url).await;
    s.write_all(format!("POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-").as_bytes())
        .await
        .unwrap();
    assert_closed(&mut s).await;

    // An idle keep-alive connection is closed the same way.
    let mut s = connect(&t.url).await;
    s.write_all(format!("GET /health HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let r = read_until(&mut s, "\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert_closed(&mut s).await;

    // Half a body, then nothing: 408 after body_read_timeout_ms.
    let body = completion(4).to_string();
    let mut s = connect(&t.url).await;
    s.write_all(
        format!(
            "POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{}",
            body.len(),
            &body[..body.len() / 2]
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let r = read_response(&mut s).await;
    assert_error(r.status, &r.json(), 408, "RequestTimeoutError");
    assert_eq!(r.header("connection"), Some("close"), "{}", r.head);
    assert_no_generation(&[&p, &d]).await;
}

#[tokio::test]
async fn streams_still_open_when_the_grace_period_ends_get_an_error_event_and_done() {
    let (p, d) = tokio::join!(Sim::start(&[]), Sim::start(&[]));
    let mut t = Tandem::start(&config(&p, &d, "shutdown_grace_secs = 1")).await;
    let mut body = completion(20_000);
    body["stream"] = json!(true);
    let resp = t.post("/v1/completions", &body, Some("past-grace")).await;
    assert_eq!(resp.status().as_u16(), 200);
    let mut chunks = resp.bytes_stream();
    let first = chunks.next().await.expect("a first chunk").expect("bytes");
    assert!(first.starts_with(b"data: "));
    // The decode engine stops making progress (its KV is taken, so the request is preempted
    // and waits), so the stream is still open, whatever the machine's speed, when the grace
    // period ends.
    d.faults(json!({"exhaust_kv": true})).await;

    t.terminate();
    let mut rest = Vec::new();
    let read_all = async {
        while let Some(c) = chunks.next().await {
            rest.extend_from_slice(&c.expect("the stream ends cleanly"));
        }
    };
    tokio::time::timeout(Duration::from_secs(15), read_all)
        .await
        .expect("the stream ended within 15 s of SIGTERM");
    let rest = String::from_utf8(rest).unwrap();
    let err_at = rest.find("data: {\"error\":").unwrap_or_else(|| {
        panic!(
            "an error event: {}",
            &rest[rest.len().saturating_sub(500)..]
        )
    });
    assert!(
        rest[err_at..].ends_with("\n\ndata: [DONE]\n\n"),
        "the error event is followed by [DONE] and nothing else: {}",
        &rest[err_at..]
    );
    let event = rest[err_at..].split("\n\n").next().unwrap();
    let v: Value = serde_json::from_str(event.trim_start_matches("data: ")).unwrap();
    assert_eq!(v["error"]["message"], "the server is shutting down", "{v}");
    assert_eq!(v["error"]["code"], 500, "{v}");
    let status = t
        .wait_exit(Duration::from_secs(15))
        .await
        .expect("exits after the grace period");
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn connections_past_max_connections_are_closed_at_once() {
    let (p, d) = tokio::join!(Sim::start(&[]), Sim::start(&[]));
    let t = Tandem::start(&config(&p, &d, "max_connections = 2")).await;
    let host = t.url.trim_start_matches("http://").to_string();
    let health = format!("GET /health HTTP/1.1\r\nHost: {host}\r\n\r\n");
    // The test's own client may hold one pooled connection (from waiting for /ready), so of
    // three more at most two are served: the third is closed whichever way that went.
    let mut a = connect(&t.url).await;
    let b = connect(&t.url).await;
    let mut c = connect(&t.url).await;
    a.write_all(health.as_bytes()).await.unwrap();
    let r = read_until(&mut a, "\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let _ = c.write_all(health.as_bytes()).await;
    assert_closed(&mut c).await;
    drop((a, b));
}
