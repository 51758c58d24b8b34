//! vLLM's OpenAI surface as the simulator serves it (vllm-pd-protocol.md §5, §7 items 1-6).

use serde_json::{json, Value};

use crate::support::{read_sse, Sim, Tandem, PROMPT};

#[tokio::test]
async fn completions_json_and_sse_shapes() {
    let s = Sim::start(&[]).await;
    let model = s.ready["model"].as_str().unwrap().to_string();
    let body = json!({"model": model, "prompt": PROMPT, "max_tokens": 5, "ignore_eos": true});
    let (status, v) = s.post_json("/v1/completions", &body, Some("abc")).await;
    assert_eq!(status, 200);
    assert_eq!(v["id"], "cmpl-abc");
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["model"], model);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["choices"][0]["index"], 0);
    assert!(v["choices"][0]["stop_reason"].is_null());
    assert_eq!(v["usage"]["completion_tokens"], 5);
    assert_eq!(
        v["usage"]["total_tokens"],
        v["usage"]["prompt_tokens"].as_u64().unwrap() + 5
    );
    assert!(v.as_object().unwrap().contains_key("kv_transfer_params"));
    assert!(v["kv_transfer_params"].is_null());

    // Same prompt, same seed: same text, streamed or not.
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    sb["stream_options"] = json!({"include_usage": true});
    let out = read_sse(s.post("/v1/completions", &sb, Some("abc")).await).await;
    assert!(out.done);
    assert_eq!(out.text(), v["choices"][0]["text"].as_str().unwrap());
    let last = out.events.last().unwrap();
    assert_eq!(
        last["choices"],
        json!([]),
        "usage-only chunk has empty choices"
    );
    assert_eq!(last["usage"]["completion_tokens"], 5);
    let finals: Vec<&Value> = out
        .events
        .iter()
        .filter(|e| {
            !e["choices"][0]["finish_reason"].is_null()
                && e["choices"].as_array().is_some_and(|c| !c.is_empty())
        })
        .collect();
    assert_eq!(finals.len(), 1);
    assert_eq!(finals[0]["choices"][0]["finish_reason"], "length");
    assert!(out
        .events
        .iter()
        .all(|e| e["object"] == "text_completion" && e["id"] == "cmpl-abc"));

    // Without stream_options there is no usage chunk.
    let mut plain = body.clone();
    plain["stream"] = json!(true);
    let out = read_sse(s.post("/v1/completions", &plain, None).await).await;
    assert!(out.events.iter().all(|e| e.get("usage").is_none()));

    // n = 2 gives two choices with different text.
    let mut two = body.clone();
    two["n"] = json!(2);
    let (_, v) = s.post_json("/v1/completions", &two, None).await;
    assert_eq!(v["choices"].as_array().unwrap().len(), 2);
    assert_ne!(v["choices"][0]["text"], v["choices"][1]["text"]);
    assert_eq!(v["usage"]["completion_tokens"], 10);
}

#[tokio::test]
async fn chat_stream_starts_with_the_role_and_stop_strings_apply() {
    let s = Sim::start(&[]).await;
    let body = json!({"messages": [{"role": "user", "content": "hello"}], "max_tokens": 6,
        "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true}});
    let out = read_sse(s.post("/v1/chat/completions", &body, Some("c1")).await).await;
    assert!(out.done);
    assert_eq!(out.events[0]["object"], "chat.completion.chunk");
    assert_eq!(
        out.events[0]["choices"][0]["delta"],
        json!({"role": "assistant", "content": ""})
    );
    assert!(out.events.iter().all(|e| e["id"] == "chatcmpl-c1"));
    assert_eq!(out.events.last().unwrap()["usage"]["completion_tokens"], 6);

    // Take a character the output is known to contain and stop on it.
    let (_, full) = s
        .post_json(
            "/v1/completions",
            &json!({"prompt": PROMPT, "max_tokens": 40, "ignore_eos": true}),
            None,
        )
        .await;
    let text = full["choices"][0]["text"].as_str().unwrap().to_string();
    let stop: String = text.chars().skip(5).take(2).collect();
    let at = text.find(&stop).unwrap();
    let (_, stopped) = s.post_json("/v1/completions", &json!({"prompt": PROMPT, "max_tokens": 40, "ignore_eos": true, "stop": [stop.clone()]}), None).await;
    assert_eq!(stopped["choices"][0]["finish_reason"], "stop");
    assert_eq!(stopped["choices"][0]["stop_reason"], stop);
    assert_eq!(stopped["choices"][0]["text"], &text[..at]);
}

#[tokio::test]
async fn errors_have_vllms_shape_and_status() {
    let s = Sim::start(&[]).await;
    let resp = s
        .client
        .post(format!("{}/v1/completions", s.url))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "BadRequestError");
    assert_eq!(v["error"]["code"], 400);
    assert!(v["error"].as_object().unwrap().contains_key("param"));

    let (status, v) = s
        .post_json(
            "/v1/completions",
            &json!({"model": "nope", "prompt": "x"}),
            None,
        )
        .await;
    assert_eq!(status, 404);
    assert_eq!(v["error"]["message"], "The model `nope` does not exist.");
    assert_eq!(v["error"]["type"], "NotFoundError");

    let (status, v) = s
        .post_json(
            "/v1/completions",
            &json!({"prompt": "x", "stream_options": {"include_usage": true}}),
            None,
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(
        v["error"]["message"],
        "Stream options can only be defined when `stream=True`."
    );

    let (status, _) = s
        .post_json(
            "/v1/completions",
            &json!({"prompt": "x", "max_tokens": "many"}),
            None,
        )
        .await;
    assert_eq!(status, 400);
    let (status, _) = s
        .post_json(
            "/v1/completions",
            &json!({"prompt": "x", "max_tokens": 100000000}),
            None,
        )
        .await;
    assert_eq!(status, 400);
    // vLLM's `SamplingParams` rejects an empty stop string (the fuzzer found the sim crashing).
    for stop in [json!(""), json!(["a", ""])] {
        let (status, v) = s
            .post_json(
                "/v1/completions",
                &json!({"prompt": "x", "max_tokens": 2, "stop": stop}),
                None,
            )
            .await;
        assert_eq!(status, 400);
        assert_eq!(
            v["error"]["message"],
            "stop cannot contain an empty string."
        );
    }
    // Unknown fields are accepted and ignored.
    let (status, _) = s
        .post_json(
            "/v1/completions",
            &json!({"prompt": "x", "max_tokens": 1, "frobnicate": true}),
            None,
        )
        .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn models_health_tokenize_detokenize_metrics() {
    let s = Sim::start(&["--served-model-name", "sim-model"]).await;
    assert_eq!(s.get("/health").await.status().as_u16(), 200);
    let m: Value = s.get("/v1/models").await.json().await.unwrap();
    assert_eq!(m["object"], "list");
    assert_eq!(m["data"][0]["id"], "sim-model");
    assert_eq!(m["data"][0]["root"], "sim-model");
    assert_eq!(m["data"][0]["owned_by"], "vllm");
    assert!(m["data"][0]["max_model_len"].as_u64().unwrap() > 0);

    let (_, t) = s
        .post_json(
            "/tokenize",
            &json!({"prompt": "hi there", "add_special_tokens": false}),
            None,
        )
        .await;
    assert_eq!(t["count"], 8);
    let (_, d) = s
        .post_json("/detokenize", &json!({"tokens": t["tokens"]}), None)
        .await;
    assert_eq!(d["prompt"], "hi there");

    let text = s.metrics().await;
    // prometheus_client (Python) writes counters' TYPE lines with the `_total` name.
    for (family, kind) in [
        ("vllm:num_requests_running", "gauge"),
        ("vllm:num_requests_waiting", "gauge"),
        ("vllm:kv_cache_usage_perc", "gauge"),
        ("vllm:prefix_cache_queries_total", "counter"),
        ("vllm:time_to_first_token_seconds", "histogram"),
        ("vllm:inter_token_latency_seconds", "histogram"),
        ("vllm:e2e_request_latency_seconds", "histogram"),
        ("vllm:request_prefill_time_seconds", "histogram"),
        ("vllm:request_decode_time_seconds", "histogram"),
        ("vllm:cache_config_info", "gauge"),
        ("vllm:nixl_num_failed_transfers_total", "counter"),
    ] {
        assert!(
            text.contains(&format!("# TYPE {family} {kind}\n")),
            "missing {family} {kind}"
        );
    }
    assert!(text.contains("block_size=\"16\""));
    assert!(text.contains("model_name=\"sim-model\""));
}

#[tokio::test]
async fn prefix_cache_hits_are_counted_and_shorten_prefill() {
    let s = Sim::start(&[]).await;
    let long = PROMPT.repeat(20);
    let body = json!({"prompt": long, "max_tokens": 1});
    s.post_json("/v1/completions", &body, None).await;
    let hits0 = s.metric("vllm:prefix_cache_hits_total", &[]).await;
    assert_eq!(hits0, 0.0);
    s.post_json("/v1/completions", &body, None).await;
    let hits1 = s.metric("vllm:prefix_cache_hits_total", &[]).await;
    let prompt_len = s.tokens(&long).await.len() as f64;
    // Every full block but the one holding the last token is reused.
    assert_eq!(hits1, ((prompt_len - 1.0) / 16.0).floor() * 16.0);
    assert_eq!(
        s.metric("vllm:prefix_cache_queries_total", &[]).await,
        2.0 * prompt_len
    );
}

#[tokio::test]
async fn the_chat_role_chunk_comes_with_the_first_token_as_in_vllm() {
    use futures::StreamExt;
    let s = Sim::start(&[]).await;
    // No KV: the request waits in the engine with no output yet.
    s.faults(json!({"exhaust_kv": true})).await;
    let body = json!({"messages": [{"role": "user", "content": "hello"}], "max_tokens": 3,
        "ignore_eos": true, "stream": true});
    let resp = s.post("/v1/chat/completions", &body, Some("role")).await;
    assert_eq!(resp.status(), 200);
    let mut chunks = resp.bytes_stream();
    assert_eq!(
        s.wait_metric("vllm:num_requests_waiting", &[], |v| v == 1.0)
            .await,
        1.0
    );
    let early = tokio::time::timeout(std::time::Duration::from_millis(300), chunks.next()).await;
    assert!(
        early.is_err(),
        "nothing is sent before the first token: {early:?}"
    );
    s.faults(json!({"exhaust_kv": false})).await;
    let mut text = String::new();
    while let Some(Ok(b)) = chunks.next().await {
        text.push_str(&String::from_utf8_lossy(&b));
    }
    let first = text.split("\n\n").next().unwrap();
    assert!(first.contains("\"role\":\"assistant\""), "{first}");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
}

#[tokio::test]
async fn through_tandem_the_chat_role_chunk_comes_with_the_first_token() {
    use futures::StreamExt;
    use std::time::{Duration, Instant};
    let (p, d) = tokio::join!(Sim::start(&[]), Sim::start(&[]));
    let t = Tandem::start(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n\
         [pools.prefill]\nendpoints = [{:?}]\n\n\
         [pools.decode]\nendpoints = [{:?}]\n\n\
         [disaggregation]\nmode = \"always\"\n\n\
         [health]\ninterval_ms = 100\n",
        p.url, d.url
    ))
    .await;
    // No KV on the decode engine: the decode leg waits there, after the prefill, with no token.
    d.faults(json!({"exhaust_kv": true})).await;
    let body = json!({"messages": [{"role": "user", "content": "hello"}], "max_tokens": 3,
        "ignore_eos": true, "stream": true});
    // The client runs on its own: each body chunk comes back with the instant it arrived.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let req = t
        .client
        .post(format!("{}/v1/chat/completions", t.url))
        .header("x-request-id", "role-pd")
        .json(&body);
    let client = tokio::spawn(async move {
        let resp = req.send().await.expect("sent");
        assert_eq!(resp.status(), 200);
        let mut chunks = resp.bytes_stream();
        while let Some(b) = chunks.next().await {
            let _ = tx.send((Instant::now(), b.expect("body chunk").to_vec()));
        }
    });
    assert_eq!(
        d.wait_metric("vllm:num_requests_waiting", &[], |v| v == 1.0)
            .await,
        1.0,
        "the decode leg waits on the decode engine"
    );
    match tokio::time::timeout(Duration::from_millis(300), rx.recv()).await {
        Err(_) => {}
        Ok(Some((_, b))) => panic!(
            "Tandem sent body bytes before the first token: {:?}",
            String::from_utf8_lossy(&b)
        ),
        Ok(None) => panic!(
            "the stream ended before the first token: {:?}",
            client.await
        ),
    }
    let released = Instant::now();
    d.faults(json!({"exhaust_kv": false})).await;
    let mut frames: Vec<(Instant, String)> = Vec::new();
    let mut pending = String::new();
    while let Some((at, bytes)) = rx.recv().await {
        assert!(at >= released, "a body chunk arrived before the release");
        pending.push_str(&String::from_utf8_lossy(&bytes));
        while let Some(end) = pending.find("\n\n") {
            frames.push((at, pending[..end].to_string()));
            pending.drain(..end + 2);
        }
    }
    client.await.expect("the client task");
    assert_eq!(frames.last().map(|f| f.1.as_str()), Some("data: [DONE]"));
    let json = |f: &str| -> Value { serde_json::from_str(&f["data: ".len()..]).expect("JSON") };
    let first = json(&frames[0].1);
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant", "{first}");
    let (content_at, content) = frames
        .iter()
        .find(|(_, f)| {
            f != "data: [DONE]"
                && json(f)["choices"][0]["delta"]["content"]
                    .as_str()
                    .is_some_and(|c| !c.is_empty())
        })
        .expect("a content chunk");
    // The role chunk is not an early TTFT: it comes with the first token's chunk (vLLM sends
    // both in the same iteration); the bound is generous for a loaded machine.
    let gap = content_at.duration_since(frames[0].0);
    assert!(
        gap < Duration::from_millis(200),
        "role chunk {gap:?} before the first token's chunk {content}"
    );
}
