//! The fault scenarios of the protocol suite: one fault on one engine, for every [`Pair`]. Each
//! checks the client's one answer, the record and counters, and that nothing is left held.

use serde_json::{json, Value};

use super::{completion, every_pair, streamed, Cluster, Pair, Setup};
use crate::support::{raw_post, read_sse, read_until, PROMPT};

every_pair!(
    prefill_failure_is_retried_on_the_other_prefill_engine,
    prefill_stall_is_retried_on_the_other_prefill_engine,
    null_params_run_the_prompt_locally_on_decode,
    decode_death_mid_stream_ends_with_an_error_event_and_done,
    client_disconnect_mid_stream_aborts_both_legs,
    client_disconnect_while_decode_waits_for_kv_frees_the_prefill,
    client_gone_before_the_decode_engine_accepts_releases_the_kv,
    prefill_queued_past_its_deadline_is_aborted_in_the_engine,
    decode_failure_before_the_first_token_replans_with_a_fresh_prefill,
    decode_stall_before_the_first_token_is_retried,
    decode_past_its_first_token_deadline_is_aborted_before_its_kv_is_released,
);

/// The same body straight to the decode sim (HTTP, same seed): the text Tandem must have served.
async fn reference_text(c: &Cluster, body: &Value) -> Value {
    let (status, v) = c.decode.complete(body).await;
    assert_eq!(status, 200, "{v}");
    v["choices"][0]["text"].clone()
}

/// Two prefill engines, round-robin: the first request goes to the first, which is given `fault`.
async fn two_prefills(pair: Pair, fault: Value, timeouts: &[(&str, u64)]) -> Cluster {
    let c = Cluster::start(
        pair,
        Setup {
            prefills: 2,
            prefill_policy: "round-robin",
            timeouts,
            ..Setup::default()
        },
    )
    .await;
    c.prefill[0].faults(fault).await;
    c
}

/// A prefill leg that failed on the first engine went to the second, and its KV fed the decode.
async fn assert_retried_on_the_second(c: &Cluster, id: &str, reason: &str, out: &Value) {
    let pair = c.pair;
    let t = &c.tandem;
    assert_eq!(out["usage"]["completion_tokens"], 8, "{pair:?}: {out}");
    let rec = t.record(id).await;
    assert_eq!(rec["outcome"], "ok", "{pair:?}: {rec}");
    assert_eq!(rec["route"], "disaggregated", "{pair:?}: {rec}");
    assert_eq!(rec["decision_reason"], "mode_always", "{pair:?}: {rec}");
    assert_eq!(rec["prefill_attempts"], 2, "{pair:?}: {rec}");
    assert_eq!(rec["prefill_engine"], c.prefill_url(1), "{pair:?}: {rec}");
    assert_eq!(
        t.metric(
            "tandem_retries_total",
            &[("leg", "prefill"), ("reason", reason)]
        )
        .await,
        1.0,
        "{pair:?}"
    );
    assert_eq!(t.metric("tandem_retries_total", &[]).await, 1.0, "{pair:?}");
    // The first engine finished nothing; the second ran the one-token leg and its KV was pulled.
    assert_eq!(
        c.prefill[0].metric("vllm:request_success_total", &[]).await,
        0.0,
        "{pair:?}"
    );
    assert_eq!(
        c.prefill[1]
            .metric(
                "vllm:request_success_total",
                &[("finished_reason", "length")]
            )
            .await,
        1.0,
        "{pair:?}"
    );
    assert_eq!(
        c.decode
            .metric("vllm:nixl_xfer_time_seconds_count", &[])
            .await,
        1.0,
        "{pair:?}"
    );
    c.assert_clean().await;
    assert_eq!(
        out["choices"][0]["text"],
        reference_text(c, &completion(8)).await,
        "{pair:?}"
    );
}

/// Scenario 2: the prefill engine fails the leg (HTTP 500, gRPC INTERNAL); the other one runs it.
async fn prefill_failure_is_retried_on_the_other_prefill_engine(pair: Pair) {
    let c = two_prefills(pair, json!({"fail_next": 1}), &[]).await;
    let (status, out) = c
        .tandem
        .post_json("/v1/completions", &completion(8), Some("p-fail"))
        .await;
    assert_eq!(status, 200, "{pair:?}: {out}");
    assert_retried_on_the_second(&c, "p-fail", "status_5xx", &out).await;
}

/// Scenario 3: the prefill engine accepts the leg and never answers; past `prefill_ms` the leg is
/// dropped (the stalled engine is left holding nothing) and the other engine runs it.
async fn prefill_stall_is_retried_on_the_other_prefill_engine(pair: Pair) {
    let c = two_prefills(pair, json!({"stall_next": 1}), &[("prefill_ms", 300)]).await;
    let (status, out) = c
        .tandem
        .post_json("/v1/completions", &completion(8), Some("p-stall"))
        .await;
    assert_eq!(status, 200, "{pair:?}: {out}");
    let rec = c.tandem.record("p-stall").await;
    assert!(
        rec["ttft_s"].as_f64().unwrap() >= 0.3,
        "{pair:?}: the deadline was waited out: {rec}"
    );
    assert_retried_on_the_second(&c, "p-stall", "timeout", &out).await;
}

/// Scenario 4: the prefill engine's one token is EOS, so it keeps no KV and returns no params:
/// the decode engine runs the prompt itself.
async fn null_params_run_the_prompt_locally_on_decode(pair: Pair) {
    let c = Cluster::start(pair, Setup::default()).await;
    c.prefill[0].faults(json!({"eos_next": 1})).await;
    let t = &c.tandem;
    // No ignore_eos: the forced EOS stops the one-token leg.
    let body = json!({"prompt": PROMPT, "max_tokens": 8});
    let (status, out) = t
        .post_json("/v1/completions", &body, Some("null-params"))
        .await;
    assert_eq!(status, 200, "{pair:?}: {out}");
    let rec = t.record("null-params").await;
    assert_eq!(rec["outcome"], "ok", "{pair:?}: {rec}");
    assert_eq!(rec["route"], "local", "{pair:?}: {rec}");
    assert_eq!(rec["decision_reason"], "null_params", "{pair:?}: {rec}");
    assert_eq!(rec["prefill_attempts"], 1, "{pair:?}: {rec}");
    assert_eq!(rec["prefill_engine"], c.prefill_url(0), "{pair:?}: {rec}");
    assert_eq!(
        t.metric(
            "tandem_disaggregation_decisions_total",
            &[("decision", "local"), ("reason", "null_params")]
        )
        .await,
        1.0,
        "{pair:?}"
    );
    assert_eq!(t.metric("tandem_retries_total", &[]).await, 0.0, "{pair:?}");
    let p = &c.prefill[0];
    assert_eq!(
        p.metric("vllm:request_success_total", &[("finished_reason", "stop")])
            .await,
        1.0,
        "{pair:?}"
    );
    // Nothing pulled: the decode engine computed the whole prompt.
    let d = &c.decode;
    assert_eq!(
        d.metric("vllm:nixl_xfer_time_seconds_count", &[]).await,
        0.0,
        "{pair:?}"
    );
    let prompt_len = d.tokens(PROMPT).await.len() as f64;
    assert_eq!(
        d.metric("vllm:request_prefill_kv_computed_tokens_sum", &[])
            .await,
        prompt_len,
        "{pair:?}"
    );
    c.assert_clean().await;
    assert_eq!(
        out["choices"][0]["text"],
        reference_text(&c, &body).await,
        "{pair:?}"
    );
}

/// Scenario 5: the decode engine dies after three tokens; the client gets them, then vLLM's
/// error event and `[DONE]`.
async fn decode_death_mid_stream_ends_with_an_error_event_and_done(pair: Pair) {
    let c = Cluster::start(pair, Setup::default()).await;
    c.decode.faults(json!({"die_after_tokens": 3})).await;
    let t = &c.tandem;
    let resp = t
        .post("/v1/completions", &streamed(completion(64)), Some("d-died"))
        .await;
    assert_eq!(resp.status().as_u16(), 200, "{pair:?}");
    let out = read_sse(resp).await;
    assert!(
        out.done && !out.cut,
        "{pair:?}: the stream ends with [DONE]"
    );
    let (err, content) = out.events.split_last().expect("events");
    assert_eq!(err["error"]["code"], 500, "{pair:?}: {err}");
    assert_eq!(
        err["error"]["type"], "InternalServerError",
        "{pair:?}: {err}"
    );
    assert_eq!(
        content.len(),
        3,
        "{pair:?}: the three chunks before the death"
    );
    assert!(content.iter().all(|e| e.get("error").is_none()));
    let rec = t.record("d-died").await;
    assert_eq!(rec["outcome"], "decode_died", "{pair:?}: {rec}");
    assert_eq!(rec["route"], "disaggregated", "{pair:?}: {rec}");
    assert_eq!(rec["content_chunks"], 3, "{pair:?}: {rec}");
    assert_eq!(
        t.metric(
            "tandem_requests_total",
            &[("route", "disaggregated"), ("outcome", "decode_died")]
        )
        .await,
        1.0,
        "{pair:?}"
    );
    c.decode.faults(json!({"die_after_tokens": 0})).await;
    c.assert_clean().await;
}

/// Scenario 6: the client leaves mid-stream, then mid-way through a non-streaming answer; each
/// time the decode engine aborts its request and the prefill engine's blocks are free (read
/// before the first token).
async fn client_disconnect_mid_stream_aborts_both_legs(pair: Pair) {
    let c = Cluster::start(pair, Setup::default()).await;
    let d = &c.decode;
    // Long enough that the decode engine is still generating when the client leaves.
    for (i, stream) in [true, false].into_iter().enumerate() {
        let id = format!("gone-mid-answer-{i}");
        let b = completion(30_000);
        let b = if stream { streamed(b) } else { b };
        let mut conn = raw_post(&c.tandem.url, "/v1/completions", &b, &id).await;
        if stream {
            let head = read_until(&mut conn, "\"text\":").await;
            assert!(head.starts_with("HTTP/1.1 200"), "{pair:?}: {head}");
        }
        // The KV was pulled and the request runs.
        let pulled = d
            .wait_metric("vllm:nixl_xfer_time_seconds_count", &[], |v| v > i as f64)
            .await;
        assert_eq!(pulled, (i + 1) as f64, "{pair:?} {id}");
        assert_eq!(
            d.wait_metric("vllm:num_requests_running", &[], |v| v == 1.0)
                .await,
            1.0,
            "{pair:?} {id}: still generating"
        );
        drop(conn);
        assert_eq!(
            d.wait_metric(
                "vllm:request_success_total",
                &[("finished_reason", "abort")],
                |v| v > i as f64
            )
            .await,
            (i + 1) as f64,
            "{pair:?} {id}: the decode engine aborted the request"
        );
        assert_eq!(
            d.wait_metric("vllm:num_requests_running", &[], |v| v == 0.0)
                .await,
            0.0,
            "{pair:?} {id}"
        );
        assert_eq!(
            c.prefill[0]
                .wait_metric("vllm:kv_cache_usage_perc", &[], |v| v == 0.0)
                .await,
            0.0,
            "{pair:?} {id}: the prefill's blocks are free"
        );
        let rec = c.tandem.record(&id).await;
        assert_eq!(rec["outcome"], "client_disconnect", "{pair:?}: {rec}");
        assert_eq!(rec["route"], "disaggregated", "{pair:?}: {rec}");
        c.assert_clean().await;
    }
    assert_eq!(
        d.metric("vllm:nixl_xfer_time_seconds_count", &[]).await,
        2.0,
        "{pair:?}"
    );
}

/// Scenario 6, earlier: the client leaves while the decode engine still waits for the KV (the
/// prefill engine's side channel never answers the handshake, so its blocks stay pinned). The
/// decode leg's abort must reach the decode engine, whose abort tells the prefill engine to free
/// the blocks, long before the lease.
async fn client_disconnect_while_decode_waits_for_kv_frees_the_prefill(pair: Pair) {
    let c = Cluster::start(
        pair,
        Setup {
            d_flags: &["--nixl-handshake-timeout", "60"],
            ..Setup::default()
        },
    )
    .await;
    let (p, d) = (&c.prefill[0], &c.decode);
    p.faults(json!({"handshake_stall": true})).await;
    let conn = raw_post(
        &c.tandem.url,
        "/v1/completions",
        &streamed(completion(32)),
        "gone-before-kv",
    )
    .await;
    assert!(
        p.wait_metric("vllm:kv_cache_usage_perc", &[], |v| v > 0.0)
            .await
            > 0.0,
        "{pair:?}: pinned on the prefill engine"
    );
    assert_eq!(
        d.wait_metric(
            "vllm:num_requests_waiting_by_reason",
            &[("reason", "deferred")],
            |v| v > 0.0
        )
        .await,
        1.0,
        "{pair:?}: the decode engine waits for the KV"
    );
    drop(conn);
    assert_eq!(
        p.wait_metric("vllm:kv_cache_usage_perc", &[], |v| v == 0.0)
            .await,
        0.0,
        "{pair:?}: the prefill engine's pinned blocks were released"
    );
    assert_eq!(
        p.metric("vllm:nixl_num_kv_expired_reqs_total", &[]).await,
        0.0,
        "{pair:?}: by notification, not by lease expiry"
    );
    assert_eq!(
        d.wait_metric(
            "vllm:request_success_total",
            &[("finished_reason", "abort")],
            |v| v > 0.0
        )
        .await,
        1.0,
        "{pair:?}: the decode engine aborted the request"
    );
    let rec = c.tandem.record("gone-before-kv").await;
    assert_eq!(rec["outcome"], "client_disconnect", "{pair:?}: {rec}");
    assert_eq!(rec["route"], "disaggregated", "{pair:?}: {rec}");
    assert_eq!(rec["content_chunks"], 0, "{pair:?}: {rec}");
    c.assert_clean().await;
}

/// Beyond the list: the client leaves while the decode engine is slow to accept its leg, so the
/// prefill's blocks are pinned and no decode engine has begun the request. The release leg
/// (over the decode pool's protocol: HTTP `max_tokens = 0`, gRPC `min_new_tokens >
/// max_new_tokens`, refused in validation) frees them.
async fn client_gone_before_the_decode_engine_accepts_releases_the_kv(pair: Pair) {
    let c = Cluster::start(
        pair,
        Setup {
            d_flags: &["--fault-slow-accept-ms", "1000"],
            timeouts: &[("release_ms", 3000)],
            ..Setup::default()
        },
    )
    .await;
    let p = &c.prefill[0];
    let mut conns = Vec::new();
    for (i, stream) in [false, true].into_iter().enumerate() {
        let mut b = completion(8);
        if stream {
            b = streamed(b);
        }
        conns.push(raw_post(&c.tandem.url, "/v1/completions", &b, &format!("gone-{i}")).await);
    }
    assert_eq!(
        p.wait_metric("vllm:request_success_total", &[], |v| v >= 2.0)
            .await,
        2.0,
        "{pair:?}: both prefills ran"
    );
    assert!(
        p.metric("vllm:kv_cache_usage_perc", &[]).await > 0.0,
        "{pair:?}: pinned"
    );
    drop(conns);
    c.assert_clean().await;
    assert_eq!(
        p.metric("vllm:nixl_num_kv_expired_reqs_total", &[]).await,
        0.0,
        "{pair:?}: released, not expired"
    );
    for i in 0..2 {
        let rec = c.tandem.record(&format!("gone-{i}")).await;
        assert_eq!(rec["outcome"], "client_disconnect", "{pair:?}: {rec}");
    }
    // Both were released by a reject leg, which the decode engine refused in validation.
    assert_eq!(
        c.tandem
            .metric("tandem_handoffs_total", &[("outcome", "release_rejected")])
            .await,
        2.0,
        "{pair:?}"
    );
    assert_eq!(c.tandem.metric("tandem_handoffs_total", &[]).await, 2.0);
}

/// Beyond the list: the first prefill engine has no free KV, so the leg waits in its queue past
/// `prefill_ms`; dropping it must abort it in that engine (a unary gRPC call is dropped with
/// RST_STREAM), and the other engine runs it.
async fn prefill_queued_past_its_deadline_is_aborted_in_the_engine(pair: Pair) {
    let c = two_prefills(pair, json!({"exhaust_kv": true}), &[("prefill_ms", 300)]).await;
    let (status, out) = c
        .tandem
        .post_json("/v1/completions", &completion(8), Some("p-queued"))
        .await;
    assert_eq!(status, 200, "{pair:?}: {out}");
    let p0 = &c.prefill[0];
    assert_eq!(
        p0.wait_metric(
            "vllm:request_success_total",
            &[("finished_reason", "abort")],
            |v| v > 0.0
        )
        .await,
        1.0,
        "{pair:?}: the dropped prefill leg was aborted"
    );
    let rec = c.tandem.record("p-queued").await;
    assert_eq!(rec["route"], "disaggregated", "{pair:?}: {rec}");
    assert_eq!(rec["prefill_engine"], c.prefill_url(1), "{pair:?}: {rec}");
    p0.faults(json!({"exhaust_kv": false})).await;
    c.assert_clean().await;
}

/// Beyond the list: the decode engine fails the leg before any token (HTTP 500, gRPC INTERNAL);
/// it saw the params and rejected them (which frees the prefill's blocks), so a fresh prefill
/// feeds the retry.
async fn decode_failure_before_the_first_token_replans_with_a_fresh_prefill(pair: Pair) {
    let c = Cluster::start(pair, Setup::default()).await;
    c.decode.faults(json!({"fail_next": 1})).await;
    let t = &c.tandem;
    let out = read_sse(
        t.post("/v1/completions", &streamed(completion(8)), Some("d-fail"))
            .await,
    )
    .await;
    assert!(out.done && !out.cut, "{pair:?}");
    assert!(
        out.events.iter().all(|e| e.get("error").is_none()),
        "{pair:?}"
    );
    let rec = t.record("d-fail").await;
    assert_eq!(rec["outcome"], "ok", "{pair:?}: {rec}");
    assert_eq!(rec["route"], "disaggregated", "{pair:?}: {rec}");
    assert_eq!(rec["prefill_attempts"], 2, "{pair:?}: {rec}");
    assert_eq!(rec["decode_attempts"], 2, "{pair:?}: {rec}");
    assert_eq!(
        t.metric(
            "tandem_retries_total",
            &[("leg", "decode"), ("reason", "status_5xx")]
        )
        .await,
        1.0,
        "{pair:?}"
    );
    assert_eq!(
        c.decode
            .metric("vllm:nixl_xfer_time_seconds_count", &[])
            .await,
        1.0,
        "{pair:?}: only the second prefill's KV was read"
    );
    c.assert_clean().await;
    assert_eq!(
        out.text(),
        reference_text(&c, &completion(8)).await.as_str().unwrap(),
        "{pair:?}"
    );
}

/// Beyond the list: the decode engine accepts a leg and never answers (no response head over
/// HTTP, no first message over gRPC); past the decode deadlines the leg is dropped, the
/// prefill's blocks released, and a retry answers.
async fn decode_stall_before_the_first_token_is_retried(pair: Pair) {
    let c = Cluster::start(
        pair,
        Setup {
            timeouts: &[
                ("handoff_ms", 300),
                ("first_token_ms", 300),
                ("per_token_ms", 20),
            ],
            ..Setup::default()
        },
    )
    .await;
    for stream in [false, true] {
        c.decode.faults(json!({"stall_next": 1})).await;
        let id = format!("d-stall-{stream}");
        let b = if stream {
            streamed(completion(8))
        } else {
            completion(8)
        };
        let r = c.tandem.post("/v1/completions", &b, Some(&id)).await;
        assert_eq!(r.status(), 200, "{pair:?} {id}");
        if stream {
            let out = read_sse(r).await;
            assert!(out.done && !out.cut, "{pair:?}: {:?}", out.events);
            assert!(out.events.iter().all(|e| e.get("error").is_none()));
        } else {
            let v: Value = r.json().await.expect("JSON");
            assert_eq!(v["usage"]["completion_tokens"], 8, "{pair:?}: {v}");
        }
        let rec = c.tandem.record(&id).await;
        assert_eq!(rec["outcome"], "ok", "{pair:?}: {rec}");
        assert_eq!(rec["decode_attempts"], 2, "{pair:?}: {rec}");
        c.assert_clean().await;
    }
}

/// Beyond the list: the decode engine has no free KV (Tandem's one scrape, at start, does not
/// know), so each decode leg waits in its queue past `first_token_ms`. Tandem then tells the
/// prefill engine to free the blocks (a reject release leg) and re-plans: the dropped leg must
/// be aborted in the decode engine at once, as an HTTP leg is, or it would pull the released
/// (perhaps reused) blocks once it gets room.
async fn decode_past_its_first_token_deadline_is_aborted_before_its_kv_is_released(pair: Pair) {
    let c = Cluster::start(
        pair,
        Setup {
            timeouts: &[("first_token_ms", 300)],
            scrape_interval_ms: 600_000,
            ..Setup::default()
        },
    )
    .await;
    let d = &c.decode;
    // Its one scrape (at start) has seen the free KV; the next is minutes away.
    let scraped = c
        .tandem
        .wait_engines("decode", |e| e["last_scrape_age_s"].is_number())
        .await;
    assert!(scraped, "{pair:?}: {}", c.tandem.engines().await);
    d.faults(json!({"exhaust_kv": true})).await;
    let r = c
        .tandem
        .post("/v1/completions", &streamed(completion(8)), Some("d-late"))
        .await;
    let status = r.status().as_u16();
    let text = r.text().await.expect("a body");
    assert_eq!(status, 502, "{pair:?}: {text}");
    let rec = c.tandem.record("d-late").await;
    assert_eq!(rec["outcome"], "decode_failed", "{pair:?}: {rec}");
    let attempts = rec["decode_attempts"].as_u64().expect("attempts") as f64;
    assert_eq!(
        c.tandem
            .metric(
                "tandem_retries_total",
                &[("leg", "decode"), ("reason", "first_token_timeout")]
            )
            .await,
        attempts,
        "{pair:?}"
    );
    // Every leg was aborted while it waited: none is left to read KV once there is room.
    assert_eq!(
        d.wait_metric(
            "vllm:request_success_total",
            &[("finished_reason", "abort")],
            |v| v >= attempts
        )
        .await,
        attempts,
        "{pair:?}: each decode leg aborted"
    );
    assert_eq!(
        d.metric("vllm:num_requests_waiting", &[]).await,
        0.0,
        "{pair:?}"
    );
    d.faults(json!({"exhaust_kv": false})).await;
    c.assert_clean().await;
    assert_eq!(
        d.metric("vllm:nixl_xfer_time_seconds_count", &[]).await,
        0.0,
        "{pair:?}: no released KV was read"
    );
}
