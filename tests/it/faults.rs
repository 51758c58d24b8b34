//! Every fault of `tandem sim`, each exercised through the real binary.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::{decode_leg, prefill_leg, read_sse, Sim, PROMPT};

fn body(max_tokens: u64) -> Value {
    json!({"prompt": PROMPT, "max_tokens": max_tokens, "ignore_eos": true})
}

#[tokio::test]
async fn fail_next_returns_500_then_recovers() {
    let s = Sim::start(&["--fault-fail-next", "1"]).await;
    let (status, err) = s.complete(&body(4)).await;
    assert_eq!(status, 500);
    assert_eq!(err["error"]["type"], "InternalServerError");
    assert_eq!(err["error"]["code"], 500);
    let (status, _) = s.complete(&body(4)).await;
    assert_eq!(status, 200);
    // Runtime form of the same fault.
    s.faults(json!({"fail_next": 2})).await;
    assert_eq!(s.complete(&body(4)).await.0, 500);
    assert_eq!(s.complete(&body(4)).await.0, 500);
    assert_eq!(s.complete(&body(4)).await.0, 200);
}

#[tokio::test]
async fn stall_accepts_and_never_answers() {
    let s = Sim::start(&[]).await;
    s.faults(json!({"stall_next": 1})).await;
    let stalled = s
        .client
        .post(format!("{}/v1/completions", s.url))
        .json(&body(4))
        .timeout(Duration::from_millis(500))
        .send()
        .await;
    assert!(stalled.unwrap_err().is_timeout());
    // The engine is still healthy for the next request.
    assert_eq!(s.complete(&body(4)).await.0, 200);
}

#[tokio::test]
async fn die_after_tokens_cuts_the_stream() {
    let s = Sim::start(&["--fault-die-after-tokens", "3"]).await;
    // Long enough that the engine is still generating when the stream is cut.
    let mut b = body(20_000);
    b["stream"] = json!(true);
    let out = read_sse(s.post("/v1/completions", &b, None).await).await;
    assert!(out.cut, "the connection must be cut");
    assert!(!out.done, "no [DONE] after a cut");
    assert_eq!(
        out.events.len(),
        3,
        "exactly three token chunks before the cut"
    );
    // A short request under the limit completes.
    let mut short = body(3);
    short["stream"] = json!(true);
    let ok = read_sse(s.post("/v1/completions", &short, None).await).await;
    assert!(ok.done && !ok.cut);
    // The cut request was aborted in the engine (the client side of the cut closed it).
    let aborted = s
        .wait_metric(
            "vllm:request_success_total",
            &[("finished_reason", "abort")],
            |v| v > 0.0,
        )
        .await;
    assert_eq!(aborted, 1.0);
}

/// Run a P/D pair where the prefill engine has `p_fault` set; returns the decode leg's response.
async fn pd_with(p_fault: Value, d_flags: &[&str], stream: bool) -> (Sim, Sim, reqwest::Response) {
    let (p, d) = tokio::join!(Sim::start(&["--seed", "5"]), Sim::start(d_flags));
    p.faults(p_fault).await;
    let mut b = body(8);
    let (status, pr) = p.post_json("/v1/completions", &prefill_leg(&b), None).await;
    assert_eq!(status, 200);
    if stream {
        b["stream"] = json!(true);
    }
    let resp = d
        .post(
            "/v1/completions",
            &decode_leg(&b, &pr["kv_transfer_params"]),
            None,
        )
        .await;
    (p, d, resp)
}

#[tokio::test]
async fn refused_kv_read_fails_the_request_under_policy_fail() {
    let (_p, d, resp) = pd_with(json!({"kv_refuse_next": 1}), &["--seed", "5"], false).await;
    assert_eq!(resp.status().as_u16(), 500);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "InternalServerError");
    assert_eq!(
        d.metric("vllm:nixl_num_failed_transfers_total", &[]).await,
        1.0
    );
    assert_eq!(
        d.metric(
            "vllm:request_success_total",
            &[("finished_reason", "error")]
        )
        .await,
        1.0
    );
}

#[tokio::test]
async fn refused_kv_read_streams_an_error_event() {
    let (_p, _d, resp) = pd_with(json!({"kv_refuse_next": 1}), &["--seed", "5"], true).await;
    assert_eq!(resp.status().as_u16(), 200);
    let out = read_sse(resp).await;
    assert!(out.done);
    assert_eq!(out.events.last().unwrap()["error"]["code"], 500);
}

#[tokio::test]
async fn corrupt_kv_is_detected_and_recomputed_under_policy_recompute() {
    let c = Sim::start(&["--seed", "5"]).await;
    let (_, colo) = c.post_json("/v1/completions", &body(8), None).await;
    let (p, d, resp) = pd_with(
        json!({"kv_corrupt_next": 1}),
        &["--seed", "5", "--kv-load-failure-policy", "recompute"],
        false,
    )
    .await;
    assert_eq!(resp.status().as_u16(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["choices"][0]["text"], colo["choices"][0]["text"]);
    assert_eq!(
        d.metric("vllm:nixl_num_failed_transfers_total", &[]).await,
        1.0
    );
    // A failed read sends no notification, so the prefill side still holds the blocks.
    assert!(p.metric("vllm:kv_cache_usage_perc", &[]).await > 0.0);
}

#[tokio::test]
async fn corrupt_kv_fails_under_policy_fail() {
    let (_p, d, resp) = pd_with(json!({"kv_corrupt_next": 1}), &["--seed", "5"], false).await;
    assert_eq!(resp.status().as_u16(), 500);
    assert_eq!(
        d.metric("vllm:nixl_num_failed_transfers_total", &[]).await,
        1.0
    );
}

#[tokio::test]
async fn handshake_stall_times_out_on_the_decode_side() {
    let (_p, d, resp) = pd_with(
        json!({"handshake_stall": true}),
        &["--seed", "5", "--nixl-handshake-timeout", "0.3"],
        false,
    )
    .await;
    assert_eq!(resp.status().as_u16(), 500);
    assert_eq!(
        d.metric("vllm:nixl_num_failed_transfers_total", &[]).await,
        1.0
    );
}

#[tokio::test]
async fn decode_side_rejection_still_releases_prefill_blocks() {
    let (p, d) = tokio::join!(Sim::start(&[]), Sim::start(&["--fault-fail-next", "1"]));
    let b = body(8);
    let (_, pr) = p.post_json("/v1/completions", &prefill_leg(&b), None).await;
    assert!(p.metric("vllm:kv_cache_usage_perc", &[]).await > 0.0);
    let (status, _) = d
        .post_json(
            "/v1/completions",
            &decode_leg(&b, &pr["kv_transfer_params"]),
            None,
        )
        .await;
    assert_eq!(status, 500);
    let usage = p
        .wait_metric("vllm:kv_cache_usage_perc", &[], |v| v == 0.0)
        .await;
    assert_eq!(usage, 0.0, "the rejection must notify the prefill engine");
}

#[tokio::test]
async fn slow_accept_delays_each_request() {
    let s = Sim::start(&["--fault-slow-accept-ms", "300"]).await;
    let t = Instant::now();
    assert_eq!(s.complete(&body(2)).await.0, 200);
    assert!(t.elapsed() >= Duration::from_millis(300));
    s.faults(json!({"slow_accept_ms": 0})).await;
    let f: Value = s.get("/admin/faults").await.json().await.unwrap();
    assert_eq!(f["slow_accept_ms"], 0);
}

#[tokio::test]
async fn exhausted_kv_holds_requests_waiting_until_released() {
    let s = Sim::start(&["--fault-exhaust-kv"]).await;
    assert_eq!(s.metric("vllm:kv_cache_usage_perc", &[]).await, 1.0);
    let client = s.client.clone();
    let url = format!("{}/v1/completions", s.url);
    let pending = tokio::spawn(async move { client.post(url).json(&body(4)).send().await });
    let waiting = s
        .wait_metric("vllm:num_requests_waiting", &[], |v| v > 0.0)
        .await;
    assert_eq!(waiting, 1.0, "the request waits for KV capacity");
    assert_eq!(
        s.metric(
            "vllm:num_requests_waiting_by_reason",
            &[("reason", "capacity")]
        )
        .await,
        1.0
    );
    s.faults(json!({"exhaust_kv": false})).await;
    let resp = pending.await.unwrap().unwrap();
    assert_eq!(resp.status().as_u16(), 200);
}

#[tokio::test]
async fn eos_first_token_returns_null_params_and_the_proxy_falls_back() {
    let (p, d, c) = tokio::join!(
        Sim::start(&["--seed", "2", "--fault-eos-next", "1"]),
        Sim::start(&["--seed", "2"]),
        Sim::start(&["--seed", "2"]),
    );
    let b = body(8);
    let (_, colo) = c.post_json("/v1/completions", &b, None).await;
    let mut leg1 = prefill_leg(&b);
    leg1["ignore_eos"] = json!(false);
    let (status, pr) = p.post_json("/v1/completions", &leg1, None).await;
    assert_eq!(status, 200);
    assert_eq!(pr["choices"][0]["finish_reason"], "stop");
    assert_eq!(pr["kv_transfer_params"], Value::Null);
    // Blocks were freed at once, not pinned.
    assert_eq!(p.metric("vllm:kv_cache_usage_perc", &[]).await, 0.0);
    // The reference proxy then sends the original body to D, which prefills locally.
    let (status, out) = d
        .post_json(
            "/v1/completions",
            &decode_leg(&b, &pr["kv_transfer_params"]),
            None,
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(out["choices"][0]["text"], colo["choices"][0]["text"]);
}
