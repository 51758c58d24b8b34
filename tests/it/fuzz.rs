//! A seeded fuzzer of request bodies through `tandem serve` in front of 2 prefill + 2 decode
//! sims: valid OpenAI bodies mutated (keys dropped, values of every JSON type and extreme
//! numbers put in, bodies truncated, bytes flipped, non-UTF-8 inserted). Every answer must be a
//! 200 (a JSON completion, or an SSE stream that ends in `[DONE]`) or an OpenAI-shaped JSON error
//! whose `code` is its status and whose message names no engine; never a 5xx but a 503, never a
//! hang. Afterwards nothing may be held anywhere (see `fault_suite::Cluster::assert_clean`).
//!
//! `TANDEM_FUZZ_CASES` (default 10,000) and `TANDEM_FUZZ_SEED` choose the run; the cases are a
//! function of the seed, so a failure replays.

use std::time::Duration;

use futures::stream::{self, StreamExt};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Map, Value};

use crate::fault_suite::{assert_no_engine_named, Cluster, Setup};
use crate::support::PROMPT;

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
    // A chat request that names no usable token count generates to the context limit (as vLLM
    // does): valid, but minutes long. Bound those; `max_tokens` itself stays fuzzed.
    let small = |k: &str| m.get(k).and_then(Value::as_u64).is_some_and(|n| n <= 16);
    if chat && !small("max_completion_tokens") && !small("max_tokens") {
        m.insert("max_completion_tokens".into(), json!(8));
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
    (PATHS[usize::from(chat)], bytes)
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
