//! Tenants' budgets in one process: requests per minute, tokens per minute (prompt at
//! admission, output as it streams, settled from usage) and requests in flight, each refused
//! with 429, `Retry-After` and OpenAI's `x-ratelimit-*` headers, before any engine work.

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};

use super::{assert_error, auth_table, completion, send, tandem, tenants, KeyFile, MODEL};
use crate::support::{Sim, PROMPT};

fn header(r: &reqwest::Response, name: &str) -> Option<String> {
    r.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

fn num(r: &reqwest::Response, name: &str) -> u64 {
    header(r, name)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("a number in {name}: {:?}", r.headers()))
}

/// Requests a bucket of `per_minute` refills in `elapsed`, rounded up.
fn refilled(per_minute: u64, elapsed: Duration) -> u64 {
    (elapsed.as_secs_f64() * per_minute as f64 / 60.0).ceil() as u64
}

/// Finding: one client sent 400 requests at concurrency 50 and got no 429. A tenant allowed
/// 10 requests a minute sending 40 at concurrency 10 gets its 10 (plus what refilled meanwhile)
/// and 429s with OpenAI's headers for the rest; another tenant is not held back by it.
#[tokio::test]
async fn a_tenant_over_its_request_rate_gets_429_with_headers() {
    let d = Sim::start(&[]).await;
    let keys = KeyFile::new(&tenants(&[
        (
            "small",
            "requests_per_minute = 10\ntokens_per_minute = 100000",
        ),
        ("other", "requests_per_minute = 10"),
    ]));
    let t = tandem(&d, &auth_table(&keys)).await;
    let body = completion(2);
    let started = Instant::now();
    let answers: Vec<reqwest::Response> = futures::stream::iter(0..40)
        .map(|_| send(&t, "/v1/completions", Some("sk-small"), &body))
        .buffer_unordered(10)
        .collect()
        .await;
    let elapsed = started.elapsed();
    let (ok, limited): (Vec<_>, Vec<_>) = answers.into_iter().partition(|r| r.status() == 200);
    let allowed = 10 + refilled(10, elapsed) as usize;
    assert!(
        (10..=allowed).contains(&ok.len()),
        "{} admitted, at most {allowed} allowed",
        ok.len()
    );
    for r in &ok {
        assert_eq!(num(r, "x-ratelimit-limit-requests"), 10);
        assert!(num(r, "x-ratelimit-remaining-requests") < 10);
        assert_eq!(num(r, "x-ratelimit-limit-tokens"), 100_000);
        assert!(header(r, "x-ratelimit-reset-requests").is_some());
    }
    for r in limited {
        assert_eq!(r.status(), 429);
        let retry = num(&r, "retry-after");
        assert!(
            (1..=6).contains(&retry),
            "one request refills in 6 s: {retry}"
        );
        assert_eq!(num(&r, "x-ratelimit-limit-requests"), 10);
        assert_eq!(num(&r, "x-ratelimit-remaining-requests"), 0);
        let reset = header(&r, "x-ratelimit-reset-requests").unwrap();
        assert!(reset.ends_with('s'), "{reset}");
        assert!(num(&r, "x-ratelimit-remaining-tokens") > 0);
        assert!(header(&r, "x-ratelimit-reset-tokens").is_some());
        let v: Value = r.json().await.unwrap();
        assert_error(429, &v, 429, "TooManyRequestsError");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains("10 requests per minute"), "{msg}");
    }
    let refused = (40 - ok.len()) as f64;
    let admin = t.admin();
    assert_eq!(
        admin
            .metric(
                "tandem_limits_rejected_total",
                &[("tenant", "small"), ("reason", "requests")]
            )
            .await,
        refused
    );
    assert_eq!(
        admin
            .metric("tandem_requests_total", &[("outcome", "rate_limited")])
            .await,
        refused
    );
    // The engine saw only the admitted ones (its counter may trail the answers a little).
    let served = ok.len() as f64;
    let seen = d
        .wait_metric("vllm:request_success_total", &[], |v| v >= served)
        .await;
    assert_eq!(seen, served);
    // Another tenant has its own budget.
    let r = send(&t, "/v1/completions", Some("sk-other"), &body).await;
    assert_eq!(r.status(), 200);
    assert_eq!(num(&r, "x-ratelimit-remaining-requests"), 9);
    assert!(header(&r, "x-ratelimit-limit-tokens").is_none());
}

/// Tokens per minute: the prompt is taken at admission, the output as it is produced, and the
/// whole settled from the answer's usage, so each answer's usage leaves the budget; past it,
/// 429 on tokens.
#[tokio::test]
async fn token_budgets_count_prompt_and_output_and_settle_from_usage() {
    let d = Sim::start(&[]).await;
    let keys = KeyFile::new(&tenants(&[("tok", "tokens_per_minute = 600")]));
    let t = tandem(&d, &auth_table(&keys)).await;
    let body = completion(40);
    let started = Instant::now();
    let mut last: Option<(u64, u64)> = None;
    let mut refused = None;
    for _ in 0..30 {
        let r = send(&t, "/v1/completions", Some("sk-tok"), &body).await;
        if r.status() == 429 {
            refused = Some(r);
            break;
        }
        assert_eq!(r.status(), 200);
        let remaining = num(&r, "x-ratelimit-remaining-tokens");
        let v: Value = r.json().await.unwrap();
        let total = v["usage"]["total_tokens"].as_u64().unwrap();
        assert_eq!(v["usage"]["completion_tokens"], 40);
        if let Some((before, cost)) = last {
            // From one admission to the next the budget lost the previous answer's usage
            // (the prompts are the same), less what refilled since the start.
            let drop = before as i64 - remaining as i64;
            let slack = refilled(600, started.elapsed()) as i64 + 1;
            assert!(
                (cost as i64 - slack..=cost as i64 + 1).contains(&drop),
                "the budget fell {drop}, the answer used {cost}"
            );
        }
        last = Some((remaining, total));
    }
    let r = refused.expect("a 429 once the tokens ran out");
    assert!(num(&r, "retry-after") >= 1);
    assert_eq!(num(&r, "x-ratelimit-limit-tokens"), 600);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("600 tokens per minute"),
        "{v}"
    );
    assert!(
        t.admin()
            .metric(
                "tandem_limits_rejected_total",
                &[("tenant", "tok"), ("reason", "tokens")]
            )
            .await
            >= 1.0
    );
    // A prompt bigger than the whole minute can never pass.
    let huge = json!({"model": MODEL, "prompt": PROMPT.repeat(8), "max_tokens": 1});
    let r = send(&t, "/v1/completions", Some("sk-tok"), &huge).await;
    assert_eq!(r.status(), 429);
    assert!(r.headers().get("retry-after").is_none());
}

/// Requests in flight: a tenant allowed one stream at a time gets 429 for a second while the
/// first runs, and is served again once it ends.
#[tokio::test]
async fn concurrent_requests_past_the_tenant_bound_get_429() {
    // Real time, so the first stream is still running when the second request comes.
    let d = Sim::spawn(&["--model", "qwen3-0.6b"]).await;
    let keys = KeyFile::new(&tenants(&[("one", "max_concurrent_requests = 1")]));
    let t = tandem(&d, &auth_table(&keys)).await;
    let long = json!({"model": MODEL, "prompt": PROMPT, "max_tokens": 5000, "ignore_eos": true, "stream": true});
    let first = send(&t, "/v1/completions", Some("sk-one"), &long).await;
    assert_eq!(first.status(), 200);
    let mut stream = first.bytes_stream();
    // The stream is running: its first event is here.
    assert!(stream.next().await.is_some_and(|c| c.is_ok()));
    let r = send(&t, "/v1/completions", Some("sk-one"), &completion(2)).await;
    assert_eq!(r.status(), 429);
    assert_eq!(num(&r, "retry-after"), 1);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("1 requests in flight"),
        "{v}"
    );
    // The client goes away: its slot is freed when Tandem sees the stream dropped.
    drop(stream);
    let mut status = 0;
    for _ in 0..400 {
        status = send(&t, "/v1/completions", Some("sk-one"), &completion(2))
            .await
            .status()
            .as_u16();
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(status, 200, "the ended stream's slot was never freed");
}
