//! The OpenAI fields beyond text (logprobs, prompt_logprobs, echo, structured output, tool
//! calls) through `tandem serve` in P/D mode: every answer equals a colocated engine's, streamed
//! or not, and a tool-call stream is timed like a text one (its deltas are content).

use serde_json::{json, Value};

use crate::support::{read_sse, Sim, Tandem, PROMPT};

const MODEL: &str = "Qwen/Qwen3-0.6B";

fn config(prefill: &str, decode: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n\
         [pools.prefill]\nendpoints = [{prefill:?}]\n\n\
         [pools.decode]\nendpoints = [{decode:?}]\n\n\
         [disaggregation]\nmode = \"always\"\n\n\
         [health]\ninterval_ms = 100\n"
    )
}

fn without_created(mut v: Value) -> Value {
    if let Some(o) = v.as_object_mut() {
        o.remove("created");
    }
    v
}

fn streamed(mut body: Value) -> Value {
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    body
}

fn chat(extra: Value) -> Value {
    let mut b = json!({"model": MODEL, "messages": [{"role": "user", "content": PROMPT}],
                       "max_completion_tokens": 80});
    b.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    b
}

fn completion(extra: Value) -> Value {
    let mut b = json!({"model": MODEL, "prompt": PROMPT, "max_tokens": 12, "ignore_eos": true});
    b.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    b
}

fn weather_tools() -> Value {
    json!([{"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string"}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
            "required": ["city", "days"]}}}])
}

#[tokio::test]
async fn every_field_through_pd_equals_colocated() {
    let (p, d, c) = tokio::join!(
        Sim::start(&["--seed", "11"]),
        Sim::start(&["--seed", "11"]),
        Sim::start(&["--seed", "11"]),
    );
    let t = Tandem::start(&config(&p.url, &d.url)).await;
    let schema = json!({"type": "object", "properties": {
        "answer": {"type": "string"}, "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        "sources": {"type": "array", "items": {"type": "string"}, "minItems": 1}},
        "required": ["answer", "confidence", "sources"]});
    let cases = [
        (
            "/v1/completions",
            completion(json!({"logprobs": 3, "echo": true})),
        ),
        (
            "/v1/completions",
            completion(json!({"logprobs": 2, "prompt_logprobs": 1})),
        ),
        (
            "/v1/chat/completions",
            chat(
                json!({"logprobs": true, "top_logprobs": 3, "max_completion_tokens": 10,
                        "ignore_eos": true}),
            ),
        ),
        (
            "/v1/chat/completions",
            chat(json!({"response_format": {"type": "json_schema",
                        "json_schema": {"name": "a", "schema": schema}}})),
        ),
        (
            "/v1/chat/completions",
            chat(json!({"tools": weather_tools(), "logprobs": true})),
        ),
        (
            "/v1/chat/completions",
            chat(json!({"tools": weather_tools(),
                        "tool_choice": {"type": "function", "function": {"name": "get_weather"}}})),
        ),
    ];
    for (n, (path, body)) in cases.iter().enumerate() {
        let id = format!("fields-{n}");
        // Not streamed: the whole body.
        let (status, got) = t.post_json(path, body, Some(&id)).await;
        assert_eq!(status, 200, "{id}: {got}");
        let (_, want) = c.post_json(path, body, Some(&id)).await;
        assert_eq!(without_created(got.clone()), without_created(want), "{id}");
        let rec = t.record(&id).await;
        assert_eq!(rec["route"], "disaggregated", "{rec}");
        assert_eq!(rec["outcome"], "ok", "{rec}");

        // The answer is what the fields ask for.
        let choice = &got["choices"][0];
        if body.get("tools").is_some() {
            let call = &choice["message"]["tool_calls"][0];
            assert_eq!(call["function"]["name"], "get_weather");
            let args: Value =
                serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
            assert!(args["city"].is_string() && args["days"].is_i64(), "{args}");
        }
        if body.get("response_format").is_some() {
            let v: Value =
                serde_json::from_str(choice["message"]["content"].as_str().unwrap()).unwrap();
            assert!(
                v["answer"].is_string() && v["confidence"].is_number(),
                "{v}"
            );
            assert_eq!(choice["finish_reason"], "stop");
        }
        if body["echo"] == true {
            assert!(choice["text"].as_str().unwrap().starts_with(PROMPT));
        }
        if body.get("logprobs").is_some() {
            assert!(!choice["logprobs"].is_null(), "{choice}");
        }

        // Streamed (prompt_logprobs is not available there, as in vLLM).
        if body.get("prompt_logprobs").is_some() {
            continue;
        }
        let sid = format!("fields-{n}-stream");
        let sbody = streamed(body.clone());
        let got = read_sse(t.post(path, &sbody, Some(&sid)).await).await;
        let want = read_sse(c.post(path, &sbody, Some(&sid)).await).await;
        assert!(got.done && !got.cut, "{sid}");
        let strip = |e: &[Value]| e.iter().cloned().map(without_created).collect::<Vec<_>>();
        assert_eq!(strip(&got.events), strip(&want.events), "{sid}");
        let rec = t.record(&sid).await;
        assert_eq!(rec["outcome"], "ok", "{rec}");
        // A chunk with text or a tool-call delta is content: Tandem's first token is the first
        // of them (the chat role chunk before it is not).
        let content = got
            .events
            .iter()
            .filter(|e| {
                let c = &e["choices"][0];
                c["text"].as_str().is_some_and(|t| !t.is_empty())
                    || c["delta"]["content"]
                        .as_str()
                        .is_some_and(|t| !t.is_empty())
                    || c["delta"]["tool_calls"].is_array()
            })
            .count();
        assert!(content > 1, "{sid}");
        assert_eq!(rec["content_chunks"], content as u64, "{sid}: {rec}");
        assert!(rec["ttft_s"].as_f64().unwrap() > 0.0, "{rec}");
    }
    // Every handoff was read.
    assert_eq!(
        p.wait_metric("vllm:kv_cache_usage_perc", &[], |v| v == 0.0)
            .await,
        0.0
    );
}

#[tokio::test]
async fn field_errors_are_vllm_400s_through_tandem() {
    let (p, d) = tokio::join!(Sim::start(&[]), Sim::start(&[]));
    let t = Tandem::start(&config(&p.url, &d.url)).await;
    for (path, body, msg) in [
        (
            "/v1/completions",
            completion(json!({"suffix": "x"})),
            "suffix is not currently supported",
        ),
        (
            "/v1/completions",
            completion(json!({"logprobs": 50})),
            "greater than max allowed: 20",
        ),
        (
            "/v1/chat/completions",
            chat(json!({"tools": weather_tools(),
                        "tool_choice": {"type": "function", "function": {"name": "nope"}}})),
            "does not match any of the specified `tools`",
        ),
        // The prefill leg (not streamed) accepts it; the decode engine refuses it.
        (
            "/v1/completions",
            streamed(completion(json!({"prompt_logprobs": 1}))),
            "`prompt_logprobs` are not available when `stream=True`.",
        ),
    ] {
        let (status, v) = t.post_json(path, &body, None).await;
        assert_eq!(status, 400, "{v}");
        let m = v["error"]["message"].as_str().unwrap_or_default();
        assert!(m.contains(msg), "{m}");
    }
    // Nothing stays pinned on the prefill engine after the decode engine's refusal.
    assert_eq!(
        p.wait_metric("vllm:kv_cache_usage_perc", &[], |v| v == 0.0)
            .await,
        0.0
    );
}
