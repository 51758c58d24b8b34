//! A seeded fuzzer of request bodies through `tandem serve` in front of 2 prefill + 2 decode
//! sims: valid OpenAI bodies mutated (keys dropped, values of every JSON type and extreme
//! numbers put in, bodies truncated, bytes flipped, non-UTF-8 inserted). Every answer must be a
//! 200 (a JSON completion, or an SSE stream that ends in `[DONE]`) or an OpenAI-shaped JSON error
//! whose `code` is its status and whose message names no engine; never a 5xx but a 503, never a
//! hang. Afterwards nothing may be held anywhere (see `fault_suite::Cluster::assert_clean`).
//! No answer of any status, a success included, names an engine, a file path or a panic.
//!
//! A second fuzzer, with `[auth]` on and a canary group, mutates the headers too
//! (`Authorization`, `x-tandem-group`, `x-session-id`, `content-type`, a `Content-Length` that
//! disagrees with the body) over every OpenAI path (see
//! `headers_and_every_path_get_one_answer_shape_and_leak_nothing`).
//!
//! `TANDEM_FUZZ_CASES` (default 10,000), `TANDEM_FUZZ_HEADER_CASES` (default 3,000) and
//! `TANDEM_FUZZ_SEED` choose the run; the cases are a function of the seed, so a failure
//! replays.

use std::time::Duration;

use futures::stream::{self, StreamExt};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Map, Value};

use crate::fault_suite::{assert_no_engine_named, Cluster, Setup};
use crate::support::{Sim, PROMPT};

const PATHS: [&str; 2] = ["/v1/completions", "/v1/chat/completions"];

fn env_u64(key: &str, default: u64) -> u64 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A valid body for `path`.
fn base(rng: &mut ChaCha8Rng, chat: bool) -> Map<String, Value> {
    let mut m = Map::new();
    if chat {
        m.insert(
            "messages".into(),
            json!([{"role": "user", "content": PROMPT}]),
        );
    } else {
        m.insert("prompt".into(), json!(PROMPT));
    }
    m.insert("max_tokens".into(), json!(rng.random_range(1..=8)));
    if rng.random_bool(0.5) {
        m.insert("stream".into(), json!(true));
    }
    if rng.random_bool(0.3) {
        m.insert("temperature".into(), json!(rng.random_range(0.0..2.0)));
    }
    m
}

/// A value of a random JSON type, including the awkward ones.
fn any_value(rng: &mut ChaCha8Rng, depth: u32) -> Value {
    match rng.random_range(0..14) {
        0 => Value::Null,
        1 => json!(rng.random_bool(0.5)),
        2 => json!(-1),
        3 => json!(0),
        4 => json!(u64::MAX),
        5 => json!(i64::MIN),
        6 => json!(1e308),
        7 => json!(-0.5),
        8 => json!(rng.random_range(-5..100_000)),
        9 => json!(""),
        10 => json!("\u{0}\u{202e}🦀 ünïcödé"),
        11 => json!("x".repeat(rng.random_range(1..2_000))),
        12 if depth < 4 => Value::Array(
            (0..rng.random_range(0..4))
                .map(|_| any_value(rng, depth + 1))
                .collect(),
        ),
        _ if depth < 4 => {
            let mut m = Map::new();
            for k in ["role", "content", "type", "text", "x"] {
                if rng.random_bool(0.4) {
                    m.insert(k.into(), any_value(rng, depth + 1));
                }
            }
            Value::Object(m)
        }
        _ => json!("deep"),
    }
}

const KEYS: [&str; 22] = [
    "prompt",
    "messages",
    "model",
    "max_tokens",
    "max_completion_tokens",
    "min_tokens",
    "stream",
    "stream_options",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "n",
    "best_of",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "logprobs",
    "seed",
    "stop",
    "user",
    "kv_transfer_params",
];

/// One case: a path and the raw body bytes.
fn case(rng: &mut ChaCha8Rng) -> (&'static str, Vec<u8>) {
    let chat = rng.random_bool(0.5);
    let mut m = base(rng, chat);
    for _ in 0..rng.random_range(0..4) {
        let key = KEYS[rng.random_range(0..KEYS.len())];
        match rng.random_range(0..3) {
            0 => {
                m.remove(key);
            }
            _ => {
                m.insert(key.into(), any_value(rng, 0));
            }
        }
    }
    if chat {
        bound(&mut m);
    }
    let mut bytes = serde_json::to_vec(&Value::Object(m)).expect("serialises");
    match rng.random_range(0..10) {
        0 => bytes.truncate(rng.random_range(0..bytes.len())),
        1 => {
            let i = rng.random_range(0..bytes.len());
            bytes[i] = rng.random();
        }
        2 => {
            let i = rng.random_range(0..bytes.len());
            bytes.splice(i..i, [0xff, 0xfe, 0xc3]);
        }
        3 => bytes = b"[1,2,3]".to_vec(),
        _ => {}
    }
    if chat {
        bytes = rebound(bytes);
    }
    (PATHS[usize::from(chat)], bytes)
}

/// A chat request that names no usable token count generates to the context limit (as vLLM
/// does): valid, but minutes long. Bound it; `max_tokens` itself stays fuzzed.
fn bound(m: &mut Map<String, Value>) {
    let small = |k: &str| m.get(k).and_then(Value::as_u64).is_some_and(|n| n <= 16);
    if !small("max_completion_tokens") && !small("max_tokens") {
        m.insert("max_completion_tokens".into(), json!(8));
    }
}

/// [`bound`] again after the byte mutations: a flipped byte in the bounding key's name
/// (`"max_tPkens"`) leaves valid JSON that generates to the limit (CI: a 30 s client timeout).
fn rebound(bytes: Vec<u8>) -> Vec<u8> {
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(mut m)) => {
            bound(&mut m);
            serde_json::to_vec(&Value::Object(m)).expect("serialises")
        }
        _ => bytes,
    }
}

/// Check one answer; `Err` says what is wrong with it.
async fn check(c: &Cluster, resp: reqwest::Response) -> Result<u16, String> {
    let status = resp.status().as_u16();
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let text = resp
        .text()
        .await
        .map_err(|e| format!("{status}: body broke: {e}"))?;
    // Nothing internal in any answer, a success included (the stricter check of error bodies,
    // which also refuses a bare engine port, follows below).
    assert_no_leak(&text, c.prefill.iter().chain(c.decode.iter()))?;
    if status == 200 {
        if ct.starts_with("text/event-stream") {
            if !text.ends_with("data: [DONE]\n\n") {
                return Err(format!("stream without [DONE]: {text}"));
            }
        } else {
            let v: Value =
                serde_json::from_str(&text).map_err(|e| format!("200 not JSON ({e}): {text}"))?;
            if v["choices"].as_array().is_none_or(Vec::is_empty) {
                return Err(format!("200 without choices: {text}"));
            }
        }
        return Ok(status);
    }
    if status >= 500 && status != 503 {
        return Err(format!("{status}: {text}"));
    }
    let v: Value =
        serde_json::from_str(&text).map_err(|e| format!("{status} not JSON ({e}): {text}"))?;
    let e = &v["error"];
    if e["code"] != status || !e["message"].is_string() || !e["type"].is_string() {
        return Err(format!("{status} not OpenAI-shaped: {text}"));
    }
    assert_no_engine_named(&text, c);
    Ok(status)
}

#[tokio::test]
async fn request_bodies_get_one_answer_shape_and_leak_nothing() {
    let cases = env_u64("TANDEM_FUZZ_CASES", 10_000);
    let seed = env_u64("TANDEM_FUZZ_SEED", 0x00f0_22ed);
    let c = Cluster::start(Setup {
        limits: &[("max_tokens", 16), ("max_n", 4), ("max_best_of", 4)],
        ..Setup::default()
    })
    .await;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let all: Vec<(&str, Vec<u8>)> = (0..cases).map(|_| case(&mut rng)).collect();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let c = &c;
    let client = &client;
    let results: Vec<(usize, Result<u16, String>)> = stream::iter(all.into_iter().enumerate().map(
        |(i, (path, body))| async move {
            let shown = String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
            let r = client
                .post(format!("{}{path}", c.tandem.url))
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await;
            let r = match r {
                Ok(resp) => check(c, resp).await,
                Err(e) => Err(format!("no answer: {e}")),
            }
            .map_err(|e| format!("{e} (POST {path} {shown})"));
            (i, r)
        },
    ))
    .buffer_unordered(16)
    .collect()
    .await;
    let failures: Vec<String> = results
        .iter()
        .filter_map(|(i, r)| r.as_ref().err().map(|e| format!("case {i}: {e}")))
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {cases} cases failed (seed {seed:#x}); first: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    let ok = results.iter().filter(|(_, r)| r == &Ok(200)).count();
    let refused = results.iter().filter(|(_, r)| r == &Ok(400)).count();
    // The mutations keep a fair share valid, so engines and the handoff path are exercised too.
    assert!(ok >= cases as usize / 10, "only {ok} of {cases} succeeded");
    assert!(
        refused >= cases as usize / 10,
        "only {refused} of {cases} were 400s"
    );
    c.assert_clean().await;
}

/// Nothing internal in an answer, whatever its status: no engine address (a URL, the loopback
/// address, `host:port` of any engine), no file path, no panic text. A success's generated text
/// comes from the seeded sims, so a chance hit would fail every run alike, never flake.
fn assert_no_leak<'a>(text: &str, sims: impl Iterator<Item = &'a Sim>) -> Result<(), String> {
    for leak in [
        "panicked",
        "RUST_BACKTRACE",
        ".rs:",
        "/src/",
        "/root/",
        "/tmp/",
        "/home/",
        "http://",
        "https://",
        "tcp://",
        "127.0.0.1",
        "localhost:",
    ] {
        if text.contains(leak) {
            return Err(format!("leaks {leak:?}: {text}"));
        }
    }
    for s in sims {
        let port = s.url.rsplit(':').next().expect("a port");
        if text.contains(&format!(":{port}")) {
            return Err(format!("names an engine's port {port}: {text}"));
        }
    }
    Ok(())
}

/// The keys of the header fuzzer's tenants: `open` uses the split, `pinned` the canary group.
const KEY_OPEN: &str = "sk-fuzz-open-6f1d2c";
const KEY_PINNED: &str = "sk-fuzz-pinned-93ab07";

/// How the sent `Authorization` headers should authenticate.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Auth {
    Valid,
    Invalid,
    /// Several headers, or one too long for the header limits: either answer is fine.
    Either,
}

/// One case of the header fuzzer.
struct Req {
    get: bool,
    path: &'static str,
    headers: Vec<(&'static str, Vec<u8>)>,
    body: Vec<u8>,
    auth: Auth,
    /// Sent on a raw connection whose `Content-Length` is this many bytes off the body's.
    length_off: Option<i64>,
}

fn pick<'a, T>(rng: &mut ChaCha8Rng, xs: &'a [T]) -> &'a T {
    &xs[rng.random_range(0..xs.len())]
}

fn authorization(rng: &mut ChaCha8Rng) -> (Vec<Vec<u8>>, Auth) {
    let one = |v: &str| vec![v.as_bytes().to_vec()];
    match rng.random_range(0..20) {
        0..=9 => (one(&format!("Bearer {KEY_OPEN}")), Auth::Valid),
        10 | 11 => (one(&format!("Bearer {KEY_PINNED}")), Auth::Valid),
        12 => (one(&format!("bearer  {KEY_OPEN} ")), Auth::Valid),
        13 => (vec![], Auth::Invalid),
        14 => (one("Bearer sk-fuzz-open-6f1d2d"), Auth::Invalid),
        15 => (one("Basic Z2FyYmFnZTpnYXJiYWdl"), Auth::Invalid),
        16 => (one(KEY_OPEN), Auth::Invalid),
        17 => (vec![b"Bearer \xff\xfe\xc3".to_vec()], Auth::Invalid),
        18 => (
            vec![
                format!("Bearer {KEY_OPEN}").into_bytes(),
                b"Bearer sk-wrong".to_vec(),
            ],
            Auth::Either,
        ),
        _ => (one(&format!("Bearer {}", "k".repeat(70_000))), Auth::Either),
    }
}

/// A header value of the awkward kinds: empty, long, non-ASCII bytes, one that looks valid.
fn header_value(rng: &mut ChaCha8Rng, valid: &[&str]) -> Vec<u8> {
    match rng.random_range(0..6) {
        0 => Vec::new(),
        1 => "s".repeat(rng.random_range(1..5_000)).into_bytes(),
        2 => b"\xff\xfe caf\xc3\xa9 \x80".to_vec(),
        3 => format!("v-{}", rng.random::<u32>()).into_bytes(),
        _ => pick(rng, valid).as_bytes().to_vec(),
    }
}

fn tools(rng: &mut ChaCha8Rng) -> Value {
    match rng.random_range(0..4) {
        0 => json!([{"type": "function", "function": {"name": "get_weather",
            "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                           "required": ["city"]}}}]),
        1 => json!([{"type": "function", "function": {"name": any_value(rng, 2)}}]),
        2 => json!([]),
        _ => any_value(rng, 0),
    }
}

fn response_format(rng: &mut ChaCha8Rng) -> Value {
    match rng.random_range(0..5) {
        0 => json!({"type": "json_object"}),
        1 => json!({"type": "text"}),
        2 => json!({"type": "json_schema", "json_schema": {"name": "s",
            "schema": {"type": "object", "properties": {"a": {"type": "integer"}}}}}),
        3 => json!({"type": any_value(rng, 2)}),
        _ => any_value(rng, 0),
    }
}

/// A body for `path` (valid, then mutated like the body fuzzer's).
fn side_body(rng: &mut ChaCha8Rng, path: &str) -> Vec<u8> {
    let mut m = match path {
        "/v1/completions" => {
            let mut m = base(rng, false);
            if rng.random_bool(0.4) {
                m.insert(
                    "echo".into(),
                    if rng.random_bool(0.7) {
                        json!(rng.random_bool(0.5))
                    } else {
                        any_value(rng, 0)
                    },
                );
            }
            m
        }
        "/v1/chat/completions" => {
            let mut m = base(rng, true);
            m.insert(
                "max_completion_tokens".into(),
                json!(rng.random_range(1..=8)),
            );
            if rng.random_bool(0.4) {
                m.insert("tools".into(), tools(rng));
                let choice = pick(rng, &["auto", "none", "required", "sometimes"]).to_string();
                m.insert("tool_choice".into(), json!(choice));
            }
            if rng.random_bool(0.3) {
                m.insert("response_format".into(), response_format(rng));
            }
            if rng.random_bool(0.3) {
                let kw = match rng.random_range(0..3) {
                    0 => json!({"enable_thinking": false}),
                    1 => json!({"enable_thinking": any_value(rng, 2), "x": any_value(rng, 2)}),
                    _ => any_value(rng, 0),
                };
                m.insert("chat_template_kwargs".into(), kw);
            }
            if rng.random_bool(0.2) {
                m.insert(
                    "messages".into(),
                    json!([{"role": "system", "content": "Be brief."},
                           {"role": "user", "content": PROMPT},
                           {"role": "assistant", "content": null, "tool_calls": [{"id": "c1",
                            "type": "function", "function": {"name": "get_weather",
                            "arguments": "{\"city\":\"Oslo\"}"}}]},
                           {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]),
                );
            }
            m
        }
        "/tokenize" => {
            let mut m = Map::new();
            if rng.random_bool(0.5) {
                m.insert("prompt".into(), json!(PROMPT));
            } else {
                m.insert(
                    "messages".into(),
                    json!([{"role": "user", "content": PROMPT}]),
                );
            }
            if rng.random_bool(0.3) {
                m.insert("add_special_tokens".into(), any_value(rng, 0));
            }
            m
        }
        _ => {
            let mut m = Map::new();
            let ids: Vec<Value> = (0..rng.random_range(0..12))
                .map(|_| {
                    // Mostly ids of the built-in byte-level tokenizer, some beyond any vocabulary.
                    if rng.random_bool(0.9) {
                        json!(rng.random_range(0..256))
                    } else if rng.random_bool(0.5) {
                        json!(rng.random_range(256..1_000_000))
                    } else {
                        any_value(rng, 3)
                    }
                })
                .collect();
            m.insert("tokens".into(), Value::Array(ids));
            m
        }
    };
    for _ in 0..rng.random_range(0..3) {
        let key = *pick(rng, &KEYS);
        if rng.random_bool(0.3) {
            m.remove(key);
        } else {
            m.insert(key.into(), any_value(rng, 0));
        }
    }
    let chat = path == "/v1/chat/completions";
    if chat {
        bound(&mut m);
    }
    let mut bytes = serde_json::to_vec(&Value::Object(m)).expect("serialises");
    match rng.random_range(0..12) {
        0 => bytes.truncate(rng.random_range(0..bytes.len())),
        1 => {
            let i = rng.random_range(0..bytes.len());
            bytes[i] = rng.random();
        }
        2 => bytes = b"\xff\xfe{}".to_vec(),
        _ => {}
    }
    if chat {
        bytes = rebound(bytes);
    }
    bytes
}

const SIDE_PATHS: [&str; 4] = [
    "/v1/completions",
    "/v1/chat/completions",
    "/tokenize",
    "/detokenize",
];

fn side_case(rng: &mut ChaCha8Rng) -> Req {
    let (get, path) = match rng.random_range(0..40) {
        0 => (true, "/v1/models"),
        1 => (true, "/v1/completions"),
        2 => (false, "/v1/embeddings"),
        _ => (false, *pick(rng, &SIDE_PATHS)),
    };
    let mut headers = Vec::new();
    let (auth_values, auth) = authorization(rng);
    for v in auth_values {
        headers.push(("authorization", v));
    }
    if rng.random_bool(0.3) {
        headers.push((
            "x-tandem-group",
            header_value(rng, &["canary", "default", "blue"]),
        ));
    }
    if rng.random_bool(0.3) {
        headers.push((
            "x-session-id",
            header_value(rng, &["session-1", "session-2"]),
        ));
    }
    if rng.random_bool(0.1) {
        headers.push(("x-request-id", header_value(rng, &["fuzz-id"])));
    }
    match rng.random_range(0..10) {
        0 => {}
        1 => headers.push(("content-type", b"text/plain".to_vec())),
        2 => headers.push((
            "content-type",
            b"application/x-www-form-urlencoded".to_vec(),
        )),
        3 => headers.push(("content-type", b"application/json; charset=utf-8".to_vec())),
        4 => headers.push(("content-type", b"\xffjson".to_vec())),
        _ => headers.push(("content-type", b"application/json".to_vec())),
    }
    let body = if get {
        Vec::new()
    } else {
        side_body(rng, path)
    };
    // A Content-Length that disagrees with the body, on a raw connection (a client library
    // cannot send one), with a key so the body is read rather than refused unread.
    let length_off = (!get && SIDE_PATHS.contains(&path) && rng.random_bool(0.03)).then(|| {
        headers.retain(|(k, _)| *k != "authorization");
        headers.push(("authorization", format!("Bearer {KEY_OPEN}").into_bytes()));
        if rng.random_bool(0.5) {
            -rng.random_range(1..=body.len().max(1) as i64)
        } else {
            rng.random_range(1..64)
        }
    });
    let auth = if length_off.is_some() {
        Auth::Valid
    } else {
        auth
    };
    Req {
        get,
        path,
        headers,
        body,
        auth,
        length_off,
    }
}

/// A status, content type and body as the client read them.
struct Answer {
    status: u16,
    content_type: String,
    text: String,
}

/// Send `r` on a raw connection with a wrong `Content-Length`, then close the writing half:
/// the first answer, or `None` when the server closed without one.
async fn send_raw(base: &str, r: &Req) -> Result<Option<Answer>, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let authority = base.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(authority)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let off = r.length_off.expect("a raw case");
    let length = (r.body.len() as i64 + off).max(0);
    let mut head = format!("POST {} HTTP/1.1\r\nHost: {authority}\r\n", r.path).into_bytes();
    for (k, v) in &r.headers {
        head.extend_from_slice(k.as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(v);
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(format!("Content-Length: {length}\r\n\r\n").as_bytes());
    head.extend_from_slice(&r.body);
    s.write_all(&head)
        .await
        .map_err(|e| format!("write: {e}"))?;
    s.shutdown().await.map_err(|e| format!("shutdown: {e}"))?;
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut got))
        .await
        .map_err(|_| "no end of the answer in 30 s".to_string())?
        .map_err(|e| format!("read: {e} after {}", String::from_utf8_lossy(&got)))?;
    if got.is_empty() {
        return Ok(None);
    }
    let text = String::from_utf8_lossy(&got).into_owned();
    let (head, rest) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no header end: {text}"))?;
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status: {head}"))?;
    let header = |name: &str| {
        head.lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_string())
    };
    let length: usize = header("content-length")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("the first answer has no Content-Length: {head}"))?;
    let body = rest
        .get(..length)
        .ok_or_else(|| format!("a short body: {text}"))?;
    Ok(Some(Answer {
        status,
        content_type: header("content-type").unwrap_or_default(),
        text: body.to_string(),
    }))
}

async fn send_side(
    client: &reqwest::Client,
    base: &str,
    r: &Req,
) -> Result<Option<Answer>, String> {
    if r.length_off.is_some() {
        return send_raw(base, r).await;
    }
    let url = format!("{base}{}", r.path);
    let mut req = if r.get {
        client.get(url)
    } else {
        client.post(url).body(r.body.clone())
    };
    for (k, v) in &r.headers {
        let v = reqwest::header::HeaderValue::from_bytes(v).expect("a sendable header value");
        req = req.header(*k, v);
    }
    let resp = req.send().await.map_err(|e| format!("no answer: {e}"))?;
    let status = resp.status().as_u16();
    let content_type = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let text = resp
        .text()
        .await
        .map_err(|e| format!("{status}: body broke: {e}"))?;
    Ok(Some(Answer {
        status,
        content_type,
        text,
    }))
}

/// Check one answer of the header fuzzer; `Ok(status)`, 0 for a connection the server closed
/// without answering (allowed only when the body ended before its `Content-Length`).
fn check_side(r: &Req, a: Option<Answer>, sims: &[&Sim]) -> Result<u16, String> {
    let Some(a) = a else {
        return match r.length_off {
            Some(off) if off > 0 => Ok(0),
            _ => Err("the connection closed without an answer".into()),
        };
    };
    let (status, text) = (a.status, &a.text);
    assert_no_leak(text, sims.iter().copied())?;
    for key in [KEY_OPEN, KEY_PINNED] {
        if text.contains(key) {
            return Err(format!("the answer quotes a key: {text}"));
        }
    }
    let guarded = !r.get && SIDE_PATHS.contains(&r.path);
    if guarded && r.auth == Auth::Invalid && status != 401 {
        return Err(format!(
            "{status} for a request without a valid key: {text}"
        ));
    }
    if r.auth == Auth::Valid && status == 401 {
        return Err(format!("401 for a valid key: {text}"));
    }
    if r.length_off.is_some_and(|off| off < 0) && status != 400 {
        return Err(format!(
            "{status} for a body cut by its Content-Length: {text}"
        ));
    }
    if status == 200 {
        if a.content_type.starts_with("text/event-stream") {
            if !text.ends_with("data: [DONE]\n\n") {
                return Err(format!("stream without [DONE]: {text}"));
            }
            return Ok(200);
        }
        let v: Value =
            serde_json::from_str(text).map_err(|e| format!("200 not JSON ({e}): {text}"))?;
        let shaped = match r.path {
            "/tokenize" => v["tokens"].is_array(),
            "/detokenize" => v["prompt"].is_string(),
            "/v1/models" => v["data"].is_array(),
            _ => v["choices"].as_array().is_some_and(|c| !c.is_empty()),
        };
        if !shaped {
            return Err(format!("200 of the wrong shape for {}: {text}", r.path));
        }
        return Ok(200);
    }
    if status >= 500 && status != 503 {
        return Err(format!("{status}: {text}"));
    }
    let v: Value =
        serde_json::from_str(text).map_err(|e| format!("{status} not JSON ({e}): {text}"))?;
    let e = &v["error"];
    if e["code"] != status || !e["message"].is_string() || !e["type"].is_string() {
        return Err(format!("{status} not OpenAI-shaped: {text}"));
    }
    // An error names no engine even by its bare port.
    for s in sims {
        let port = s.url.rsplit(':').next().expect("a port");
        if text.contains(port) {
            return Err(format!("names an engine's port: {text}"));
        }
    }
    Ok(status)
}

/// The header fuzzer: with `[auth]` on and a canary group, seeded cases mutate the headers
/// (`Authorization`, `x-tandem-group`, `x-session-id`, `x-request-id`, `content-type`, a
/// `Content-Length` that disagrees with the body) and the bodies of every OpenAI path
/// (completions with `echo`, chat with `tools`, `response_format` and `chat_template_kwargs`,
/// `/tokenize`, `/detokenize`). Every answer has one of the shapes the body fuzzer allows, a
/// request without a valid key is refused with 401 whatever else is wrong with it, no answer
/// of any status names an engine, a file, a panic or a key, and nothing is held afterwards.
/// `TANDEM_FUZZ_HEADER_CASES` (default 3,000) and `TANDEM_FUZZ_SEED` choose the run.
#[tokio::test]
async fn headers_and_every_path_get_one_answer_shape_and_leak_nothing() {
    let cases = env_u64("TANDEM_FUZZ_HEADER_CASES", 3_000);
    let seed = env_u64("TANDEM_FUZZ_SEED", 0x00f0_22ed);
    // A NIXL lease far beyond the test, so a leaked handoff cannot hide behind its expiry.
    let flags = |seed| ["--seed", seed, "--nixl-abort-timeout", "100000"];
    let (f0, f1, f2, f3) = (flags("1"), flags("2"), flags("3"), flags("4"));
    let (p0, p1, d0, d1) = tokio::join!(
        Sim::start(&f0),
        Sim::start(&f1),
        Sim::start(&f2),
        Sim::start(&f3),
    );
    let dir = crate::support::temp_dir("fuzz-keys");
    let keys = dir.join("keys.toml");
    std::fs::write(
        &keys,
        format!(
            "[[tenants]]\nname = \"open\"\n\n[[tenants]]\nname = \"pinned\"\ngroup = \"canary\"\n\n\
             [[keys]]\nkey = \"{KEY_OPEN}\"\ntenant = \"open\"\n\n\
             [[keys]]\nkey = \"{KEY_PINNED}\"\ntenant = \"pinned\"\n"
        ),
    )
    .expect("write the key file");
    let conf = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\n\
         [auth]\nkeys_file = \"{}\"\n\n\
         [pools]\ngroups = {{ default = 80, canary = 20 }}\n\n\
         [pools.prefill]\nendpoints = [\"{}\", {{ url = \"{}\", group = \"canary\" }}]\n\n\
         [pools.decode]\nendpoints = [\"{}\", {{ url = \"{}\", group = \"canary\" }}]\n\
         policy = \"kv-capacity\"\n\n\
         [disaggregation]\nmode = \"always\"\n\n\
         [health]\ninterval_ms = 100\nscrape_interval_ms = 100\n\n\
         [timeouts]\nrelease_ms = 1000\n\n\
         [limits]\nmax_tokens = 16\nmax_n = 4\nmax_best_of = 4\n",
        keys.display(),
        p0.url,
        p1.url,
        d0.url,
        d1.url
    );
    let t = crate::support::Tandem::start(&conf).await;
    let admin = t.admin();
    let sims = [&p0, &p1, &d0, &d1];
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x4ead_e125);
    let all: Vec<Req> = (0..cases).map(|_| side_case(&mut rng)).collect();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let (client, base, sims_ref) = (&client, t.url.as_str(), &sims);
    let started = std::time::Instant::now();
    let results: Vec<(usize, Result<u16, String>)> =
        stream::iter(all.iter().enumerate().map(|(i, r)| async move {
            let res = send_side(client, base, r)
                .await
                .and_then(|a| check_side(r, a, sims_ref));
            let shown = String::from_utf8_lossy(&r.body[..r.body.len().min(300)]).into_owned();
            let heads: Vec<String> = r
                .headers
                .iter()
                .map(|(k, v)| format!("{k}: {}", String::from_utf8_lossy(&v[..v.len().min(60)])))
                .collect();
            let res = res.map_err(|e| {
                format!(
                    "{e} ({} {} {heads:?} length off {:?} {shown})",
                    if r.get { "GET" } else { "POST" },
                    r.path,
                    r.length_off
                )
            });
            (i, res)
        }))
        .buffer_unordered(16)
        .collect()
        .await;
    let elapsed = started.elapsed();
    let failures: Vec<String> = results
        .iter()
        .filter_map(|(i, r)| r.as_ref().err().map(|e| format!("case {i}: {e}")))
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {cases} cases failed (seed {seed:#x}); first: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    let count = |s: u16| results.iter().filter(|(_, r)| r == &Ok(s)).count();
    let (ok, bad, unauthorized) = (count(200), count(400), count(401));
    // `results` come in completion order; each carries its case's index.
    let per_path = |p: &str| {
        results
            .iter()
            .filter(|(i, res)| all[*i].path == p && res == &Ok(200))
            .count()
    };
    eprintln!(
        "header fuzz: {cases} cases in {:.1} s: {ok} × 200, {bad} × 400, {unauthorized} × 401; \
         200s per path: completions {}, chat {}, tokenize {}, detokenize {}",
        elapsed.as_secs_f64(),
        per_path("/v1/completions"),
        per_path("/v1/chat/completions"),
        per_path("/tokenize"),
        per_path("/detokenize"),
    );
    // Each kind of answer, and every path's success, is exercised.
    let n = cases as usize;
    assert!(ok >= n / 10, "only {ok} of {cases} succeeded");
    assert!(bad >= n / 20, "only {bad} of {cases} were 400s");
    assert!(
        unauthorized >= n / 20,
        "only {unauthorized} of {cases} were 401s"
    );
    for p in SIDE_PATHS {
        assert!(per_path(p) >= n / 50, "too few successes on {p}");
    }

    // Nothing held anywhere afterwards (engines, Tandem's counts, pinned handoffs).
    let mut held = Vec::new();
    for _ in 0..200 {
        held = crate::support::held_by(sims.iter().copied(), &admin).await;
        let engines: Value = admin.get("/admin/engines").await.json().await.unwrap();
        if engines["decode_blocks_pending"] != 0 {
            held.push(format!(
                "decode blocks pending {}",
                engines["decode_blocks_pending"]
            ));
        }
        let pinned = admin.metric("tandem_handoffs_pinned", &[]).await;
        if pinned != 0.0 {
            held.push(format!("{pinned} handoffs pinned"));
        }
        if held.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(held.is_empty(), "still held: {held:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
