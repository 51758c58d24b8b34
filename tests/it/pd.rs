//! The P/D handoff, driven exactly as vLLM's reference proxy drives it.

use serde_json::{json, Value};

use crate::support::{decode_leg, prefill_leg, read_sse, Sim, PROMPT};

fn client_body() -> Value {
    json!({"prompt": PROMPT, "max_tokens": 24, "ignore_eos": true,
           "stream": true, "stream_options": {"include_usage": true}})
}

#[tokio::test]
async fn disaggregated_text_equals_colocated_and_blocks_are_freed() {
    let (p, d, c) = tokio::join!(
        Sim::start(&["--seed", "3", "--hash-seed", "p"]),
        Sim::start(&["--seed", "3", "--hash-seed", "d"]),
        Sim::start(&["--seed", "3", "--hash-seed", "c"]),
    );
    let body = client_body();

    let colocated = read_sse(c.post("/v1/completions", &body, Some("colo-1")).await).await;
    assert!(colocated.done);
    let want = colocated.text();
    assert!(!want.is_empty());

    // Leg 1: prefill.
    let (status, pr) = p
        .post_json("/v1/completions", &prefill_leg(&body), Some("req-1"))
        .await;
    assert_eq!(status, 200, "{pr}");
    assert_eq!(pr["id"], "cmpl-req-1");
    assert_eq!(pr["choices"][0]["finish_reason"], "length");
    assert_eq!(pr["usage"]["completion_tokens"], 1);
    let kv = pr["kv_transfer_params"].clone();
    assert_eq!(kv["do_remote_prefill"], true);
    assert_eq!(kv["do_remote_decode"], false);
    assert_eq!(kv["remote_engine_id"], p.ready["engine_id"]);
    assert_eq!(kv["tp_size"], 1);
    let rid = kv["remote_request_id"].as_str().unwrap();
    let suffix = rid
        .strip_prefix("cmpl-req-1-0-")
        .expect("internal id = external-index-suffix");
    assert!(
        suffix.len() == 8 && suffix.chars().all(|c| c.is_ascii_hexdigit()),
        "{rid}"
    );
    let prompt_len = p.tokens(PROMPT).await.len();
    assert_eq!(pr["usage"]["prompt_tokens"], prompt_len);
    assert_eq!(
        kv["remote_block_ids"].as_array().unwrap().len(),
        prompt_len.div_ceil(16)
    );
    let side_port = p.ready["side_channel"]
        .as_str()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .parse::<u64>()
        .unwrap();
    assert_eq!(kv["remote_port"], side_port);
    // The blocks are pinned and counted until the decode side reads them.
    assert!(p.metric("vllm:kv_cache_usage_perc", &[]).await > 0.0);

    // Leg 2: decode, streamed.
    let out = read_sse(
        d.post("/v1/completions", &decode_leg(&body, &kv), Some("req-1"))
            .await,
    )
    .await;
    assert!(out.done && !out.cut);
    assert_eq!(
        out.text(),
        want,
        "disaggregated text must equal colocated text"
    );
    assert!(out.events.iter().all(|e| e["id"] == "cmpl-req-1"));
    let usage = &out.events.last().unwrap()["usage"];
    assert_eq!(usage["prompt_tokens"], prompt_len);
    assert_eq!(usage["completion_tokens"], 24);

    // The read notification freed the prefill engine's blocks.
    assert_eq!(p.metric("vllm:kv_cache_usage_perc", &[]).await, 0.0);
    // Both engines saw the request; the decode engine pulled once.
    assert_eq!(
        p.metric(
            "vllm:request_success_total",
            &[("finished_reason", "length")]
        )
        .await,
        1.0
    );
    assert_eq!(
        d.metric(
            "vllm:request_success_total",
            &[("finished_reason", "length")]
        )
        .await,
        1.0
    );
    assert_eq!(
        d.metric("vllm:nixl_xfer_time_seconds_count", &[]).await,
        1.0
    );
    assert_eq!(d.metric("vllm:generation_tokens_total", &[]).await, 24.0);
    assert_eq!(
        p.metric("vllm:nixl_num_kv_expired_reqs_total", &[]).await,
        0.0
    );
}

#[tokio::test]
async fn unread_handoff_expires_after_its_lease() {
    // 10 simulated seconds at x50 is 0.2 s of real time.
    let p = Sim::start(&["--nixl-abort-timeout", "10"]).await;
    let (status, pr) = p
        .post_json(
            "/v1/completions",
            &prefill_leg(&client_body()),
            Some("lost"),
        )
        .await;
    assert_eq!(status, 200);
    assert!(pr["kv_transfer_params"]["remote_block_ids"].is_array());
    assert!(p.metric("vllm:kv_cache_usage_perc", &[]).await > 0.0);
    // The lease is driven by the engine's own timer.
    let expired = p
        .wait_metric("vllm:nixl_num_kv_expired_reqs_total", &[], |v| v > 0.0)
        .await;
    assert_eq!(expired, 1.0);
    assert_eq!(p.metric("vllm:kv_cache_usage_perc", &[]).await, 0.0);
}

#[tokio::test]
async fn chat_pd_round_trip_matches_colocated() {
    let (p, d, c) = tokio::join!(
        Sim::start(&["--seed", "9"]),
        Sim::start(&["--seed", "9"]),
        Sim::start(&["--seed", "9"]),
    );
    let body = json!({"messages": [{"role": "user", "content": PROMPT}], "max_completion_tokens": 12, "ignore_eos": true});
    let (_, colo) = c
        .post_json("/v1/chat/completions", &body, Some("chat-1"))
        .await;
    let (status, pr) = p
        .post_json("/v1/chat/completions", &prefill_leg(&body), Some("chat-1"))
        .await;
    assert_eq!(status, 200, "{pr}");
    assert_eq!(pr["object"], "chat.completion");
    assert!(pr["kv_transfer_params"]["remote_request_id"]
        .as_str()
        .unwrap()
        .starts_with("chatcmpl-chat-1-"));
    let (status, out) = d
        .post_json(
            "/v1/chat/completions",
            &decode_leg(&body, &pr["kv_transfer_params"]),
            Some("chat-1"),
        )
        .await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["id"], "chatcmpl-chat-1");
    assert_eq!(
        out["choices"][0]["message"]["content"],
        colo["choices"][0]["message"]["content"]
    );
    assert_eq!(out["choices"][0]["message"]["role"], "assistant");
    assert_eq!(out["usage"]["completion_tokens"], 12);
    assert_eq!(out["kv_transfer_params"], Value::Null);
    assert_eq!(p.metric("vllm:kv_cache_usage_perc", &[]).await, 0.0);
}

#[tokio::test]
async fn invalid_decode_params_fall_back_to_local_prefill() {
    let (d, c) = tokio::join!(Sim::start(&["--seed", "1"]), Sim::start(&["--seed", "1"]));
    let body = json!({"prompt": PROMPT, "max_tokens": 8, "ignore_eos": true});
    let (_, colo) = c.post_json("/v1/completions", &body, None).await;
    // `remote_request_id` missing: vLLM logs "Got invalid KVTransferParams" and prefills locally.
    let bad = decode_leg(
        &body,
        &json!({"do_remote_prefill": true, "remote_block_ids": [1, 2],
        "remote_engine_id": "x", "remote_host": "127.0.0.1", "remote_port": 1}),
    );
    let (status, out) = d.post_json("/v1/completions", &bad, None).await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["choices"][0]["text"], colo["choices"][0]["text"]);
    assert_eq!(
        d.metric("vllm:nixl_xfer_time_seconds_count", &[]).await,
        0.0
    );
}
