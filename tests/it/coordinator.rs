//! `tandem serve` in front of `tandem sim` engines: the P/D state machine end to end, through the
//! real binaries, with faults injected on the engines.

use std::time::Duration;

use futures::StreamExt;
use serde_json::{json, Value};

use crate::support::{closed_port, raw_post, read_until, IdleClosingProxy, Sim, Tandem, PROMPT};

/// The served model name of the `qwen3-0.6b` profile.
const MODEL: &str = "Qwen/Qwen3-0.6B";

/// A test config for `tandem serve`: fast health probes, every other key explicit or default.
struct Conf {
    prefill: Vec<String>,
    decode: Vec<String>,
    mode: &'static str,
    enforce: bool,
    prefill_policy: &'static str,
    decode_policy: &'static str,
    health_interval_ms: u64,
    timeouts: Vec<(&'static str, u64)>,
}

impl Conf {
    fn new(prefill: &[&str], decode: &[&str]) -> Conf {
        Conf {
            prefill: prefill.iter().map(|s| s.to_string()).collect(),
            decode: decode.iter().map(|s| s.to_string()).collect(),
            mode: "always",
            enforce: false,
            prefill_policy: "least-loaded",
            decode_policy: "least-loaded",
            health_interval_ms: 100,
            timeouts: Vec::new(),
        }
    }

    fn timeout(mut self, key: &'static str, ms: u64) -> Conf {
        self.timeouts.push((key, ms));
        self
    }

    fn render(&self) -> String {
        let mut s = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n\n\
             [pools.prefill]\nendpoints = {:?}\npolicy = \"{}\"\n\n\
             [pools.decode]\nendpoints = {:?}\npolicy = \"{}\"\n\n\
             [disaggregation]\nmode = \"{}\"\nenforce = {}\n\n\
             [health]\ninterval_ms = {}\n\n\
             [timeouts]\n",
            self.prefill,
            self.prefill_policy,
            self.decode,
            self.decode_policy,
            self.mode,
            self.enforce,
            self.health_interval_ms
        );
        for (k, v) in &self.timeouts {
            s.push_str(&format!("{k} = {v}\n"));
        }
        s
    }

    async fn start(&self) -> Tandem {
        Tandem::start(&self.render()).await
    }
}

/// An SSE body: the raw text and the JSON of each `data:` event before `[DONE]`.
struct Stream {
    raw: String,
    events: Vec<Value>,
}

impl Stream {
    async fn read(resp: reqwest::Response) -> Stream {
        let raw = resp.text().await.expect("the whole SSE body");
        let mut events = Vec::new();
        for frame in raw.split("\n\n").filter(|f| !f.is_empty()) {
            let data = frame
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("every frame is `data: ...`: {frame:?}"));
            if data != "[DONE]" {
                events.push(serde_json::from_str(data).expect("event is JSON"));
            }
        }
        Stream { raw, events }
    }

    fn text(&self) -> String {
        crate::support::choice_text(&self.events)
    }
}

/// A response without its `created` timestamp (which depends on the wall clock).
fn without_created(mut v: Value) -> Value {
    if let Some(o) = v.as_object_mut() {
        o.remove("created");
    }
    v
}

fn completion(max_tokens: u64) -> Value {
    json!({"model": MODEL, "prompt": PROMPT, "max_tokens": max_tokens, "ignore_eos": true})
}

fn streamed(mut body: Value) -> Value {
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    body
}

fn f(v: &Value) -> f64 {
    v.as_f64()
        .unwrap_or_else(|| panic!("expected a number, got {v}"))
}

/// The TTFT phases of a record add up to its TTFT.
fn assert_phases_sum_to_ttft(rec: &Value) {
    let sum = f(&rec["queue_s"])
        + f(&rec["prefill_s"])
        + f(&rec["handoff_s"])
        + f(&rec["decode_first_token_s"]);
    let ttft = f(&rec["ttft_s"]);
    assert!(ttft > 0.0, "{rec}");
    assert!(
        (sum - ttft).abs() < 1e-6,
        "phases sum to {sum}, ttft is {ttft}: {rec}"
    );
    for k in ["queue_s", "prefill_s", "handoff_s", "decode_first_token_s"] {
        assert!(f(&rec[k]) >= 0.0, "{k}: {rec}");
    }
    assert!(f(&rec["e2e_s"]) >= ttft, "{rec}");
}

#[tokio::test]
async fn disaggregated_responses_equal_colocated_ones() {
    let (p, d, c) = tokio::join!(
        Sim::start(&["--seed", "7"]),
        Sim::start(&["--seed", "7"]),
        Sim::start(&["--seed", "7"]),
    );
    let t = Conf::new(&[&p.url], &[&d.url]).start().await;
    let chat = json!({"model": MODEL, "messages": [{"role": "user", "content": PROMPT}],
                      "max_completion_tokens": 12, "ignore_eos": true});
    let cases = [
        ("/v1/completions", completion(16), "it-cmpl", "cmpl", 16),
        (
            "/v1/completions",
            streamed(completion(16)),
            "it-cmpl-stream",
            "cmpl",
            16,
        ),
        (
            "/v1/chat/completions",
            chat.clone(),
            "it-chat",
            "chatcmpl",
            12,
        ),
        (
            "/v1/chat/completions",
            streamed(chat),
            "it-chat-stream",
            "chatcmpl",
            12,
        ),
    ];
    let prompt_len = p.tokens(PROMPT).await.len();
    for (path, body, id, prefix, max) in &cases {
        let want_id = format!("{prefix}-{id}");
        let resp = t.post(path, body, Some(id)).await;
        assert_eq!(resp.status().as_u16(), 200, "{path} {id}");
        assert_eq!(resp.headers()["x-request-id"], *id);
        let (usage, content_chunks) = if body["stream"] == true {
            assert!(resp.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/event-stream"));
            let got = Stream::read(resp).await;
            let want = Stream::read(c.post(path, body, Some(id)).await).await;
            assert!(
                got.raw.ends_with("data: [DONE]\n\n"),
                "the stream ends with [DONE]: {}",
                got.raw
            );
            assert_eq!(got.raw.matches("data: [DONE]").count(), 1);
            assert!(!got.text().is_empty());
            assert_eq!(got.text(), want.text(), "{id}: text");
            let strip = |s: &Stream| s.events.iter().cloned().map(without_created).collect();
            let (g, w): (Vec<Value>, Vec<Value>) = (strip(&got), strip(&want));
            assert_eq!(g, w, "{id}: every event equals the colocated engine's");
            assert!(got.events.iter().all(|e| e["id"] == want_id.as_str()));
            let last = got.events.last().unwrap();
            assert_eq!(last["choices"], json!([]), "the usage chunk comes last");
            let content = crate::support::content_chunks(&got.events);
            (last["usage"].clone(), content)
        } else {
            let got: Value = resp.json().await.unwrap();
            let (status, want) = c.post_json(path, body, Some(id)).await;
            assert_eq!(status, 200);
            assert_eq!(got["id"], want_id.as_str());
            assert_eq!(without_created(got.clone()), without_created(want), "{id}");
            (got["usage"].clone(), 1)
        };
        assert_eq!(usage["completion_tokens"], *max, "{id}: {usage}");
        if *path == "/v1/completions" {
            assert_eq!(usage["prompt_tokens"], prompt_len, "{id}: {usage}");
        }
        let rec = t.record(id).await;
        assert_eq!(rec["route"], "disaggregated", "{rec}");
        assert_eq!(rec["outcome"], "ok", "{rec}");
        assert_eq!(rec["decision_reason"], "mode_always", "{rec}");
        assert_eq!(rec["prefill_engine"], p.url.as_str(), "{rec}");
        assert_eq!(rec["decode_engine"], d.url.as_str(), "{rec}");
        assert_eq!(rec["prefill_attempts"], 1, "{rec}");
        assert_eq!(rec["decode_attempts"], 1, "{rec}");
        // Tandem's own token count (it routes by it) agrees with the engine's.
        assert_eq!(rec["prompt_tokens"], usage["prompt_tokens"], "{rec}");
        assert_eq!(rec["content_chunks"], content_chunks, "{rec}");
        assert_eq!(rec["itl_observations"], content_chunks - 1, "{rec}");
        assert_phases_sum_to_ttft(&rec);
        assert!(f(&rec["dispatch_gap_s"]) >= 0.0, "{rec}");
    }
    assert_eq!(
        t.metric(
            "tandem_disaggregation_decisions_total",
            &[("decision", "disaggregate"), ("reason", "mode_always")]
        )
        .await,
        4.0
    );
    assert_eq!(
        t.metric(
            "tandem_requests_total",
            &[("route", "disaggregated"), ("outcome", "ok")]
        )
        .await,
        4.0
    );
    assert_eq!(t.metric("tandem_retries_total", &[]).await, 0.0);
    assert_eq!(
        t.metric("tandem_phase_seconds_count", &[("phase", "prefill")])
            .await,
        4.0
    );
    // Every handoff was read: one pull each on D, nothing left pinned on P.
    assert_eq!(
        d.metric("vllm:nixl_xfer_time_seconds_count", &[]).await,
        4.0
    );
    assert_eq!(
        p.wait_metric("vllm:kv_cache_usage_perc", &[], |v| v == 0.0)
            .await,
        0.0
    );
    assert_eq!(
        p.metric(
            "vllm:request_success_total",
            &[("finished_reason", "length")]
        )
        .await,
        4.0,
        "four 1-token prefill legs"
    );
}

#[tokio::test]
async fn prefill_500_on_the_only_prefill_engine_falls_back_to_local_prefill() {
    let (p, d) = tokio::join!(
        Sim::start(&["--seed", "4", "--fault-fail-next", "1"]),
        Sim::start(&["--seed", "4"]),
    );
    let t = Conf::new(&[&p.url], &[&d.url]).start().await;
    let body = completion(8);
    let (status, out) = t
        .post_json("/v1/completions", &body, Some("p500-local"))
        .await;
    assert_eq!(status, 200, "{out}");
    // The decode engine ran the original body itself: the same text as asking it directly.
    let (_, direct) = d.post_json("/v1/completions", &body, None).await;
    assert_eq!(out["choices"][0]["text"], direct["choices"][0]["text"]);
    assert_eq!(out["usage"]["completion_tokens"], 8);
    assert_eq!(
        t.metric(
            "tandem_retries_total",
            &[("leg", "prefill"), ("reason", "status_5xx")]
        )
        .await,
        1.0
    );
    assert_eq!(t.metric("tandem_retries_total", &[]).await, 1.0);
    let rec = t.record("p500-local").await;
    assert_eq!(rec["outcome"], "ok", "{rec}");
    assert_eq!(rec["route"], "local", "{rec}");
    assert_eq!(rec["decision_reason"], "no_prefill_engine", "{rec}");
    assert_eq!(rec["prefill_attempts"], 1, "{rec}");
    assert_eq!(rec["decode_attempts"], 1, "{rec}");
    assert_eq!(
        t.metric(
            "tandem_disaggregation_decisions_total",
            &[("decision", "local"), ("reason", "no_prefill_engine")]
        )
        .await,
        1.0
    );
    // The fault fired (the prefill engine ran nothing) and no KV was pulled.
    assert_eq!(p.metric("vllm:request_success_total", &[]).await, 0.0);
    assert_eq!(
        d.metric("vllm:nixl_xfer_time_seconds_count", &[]).await,
        0.0
    );
}

#[tokio::test]
async fn prefill_500_is_retried_on_the_other_prefill_engine() {
    let (p1, p2, d) = tokio::join!(
        Sim::start(&["--seed", "4", "--fault-fail-next", "1"]),
        Sim::start(&["--seed", "4"]),
        Sim::start(&["--seed", "4"]),
    );
    // Round-robin sends the first request (sequence 0) to the first endpoint: the failing one.
    let mut conf = Conf::new(&[&p1.url, &p2.url], &[&d.url]);
    conf.prefill_policy = "round-robin";
    let t = conf.start().await;
    let body = completion(8);
    let (status, out) = t
        .post_json("/v1/completions", &body, Some("p500-retry"))
        .await;
    assert_eq!(status, 200, "{out}");
    let rec = t.record("p500-retry").await;
    assert_eq!(rec["outcome"], "ok", "{rec}");
    assert_eq!(rec["route"], "disaggregated", "{rec}");
    assert_eq!(rec["decision_reason"], "mode_always", "{rec}");
    assert_eq!(rec["prefill_attempts"], 2, "{rec}");
    assert_eq!(rec["prefill_engine"], p2.url.as_str(), "{rec}");
    assert_phases_sum_to_ttft(&rec);
    assert_eq!(
        t.metric(
            "tandem_retries_total",
            &[("leg", "prefill"), ("reason", "status_5xx")]
        )
        .await,
        1.0
    );
    let (_, direct) = d.post_json("/v1/completions", &body, None).await;
    assert_eq!(out["choices"][0]["text"], direct["choices"][0]["text"]);
    // p1 ran nothing, p2 ran the prefill and its KV was pulled and released.
    assert_eq!(p1.metric("vllm:request_success_total", &[]).await, 0.0);
    assert_eq!(
        p2.metric(
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
    assert_eq!(
        p2.wait_metric("vllm:kv_cache_usage_perc", &[], |v| v == 0.0)
            .await,
        0.0
    );
}

#[tokio::test]
async fn enforced_disaggregation_answers_502_when_prefill_fails() {
    let (p, d) = tokio::join!(Sim::start(&["--fault-fail-next", "1"]), Sim::start(&[]));
    let mut conf = Conf::new(&[&p.url], &[&d.url]);
    conf.enforce = true;
    let t = conf.start().await;
    let resp = t
        .post("/v1/completions", &completion(8), Some("p500-enforced"))
        .await;
    assert_eq!(resp.status().as_u16(), 502);
    assert_eq!(resp.headers()["retry-after"], "1");
    let v: Value = resp.json().await.unwrap();
    let err = v["error"].as_object().expect("vLLM's error object");
    let mut keys: Vec<&str> = err.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["code", "message", "param", "type"], "{v}");
    assert_eq!(v["error"]["type"], "BadGatewayError");
    assert_eq!(v["error"]["code"], 502);
    assert_eq!(v["error"]["param"], Value::Null);
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("disaggregation is enforced"), "{msg}");
    assert!(msg.contains("500"), "{msg}");
    let rec = t.record("p500-enforced").await;
    assert_eq!(rec["outcome"], "prefill_failed", "{rec}");
    assert_eq!(
        t.metric("tandem_requests_total", &[("outcome", "prefill_failed")])
            .await,
        1.0
    );
    // Nothing ran locally on the decode engine.
    assert_eq!(d.metric("vllm:request_success_total", &[]).await, 0.0);
    assert_eq!(d.metric("vllm:prompt_tokens_total", &[]).await, 0.0);
}

#[tokio::test]
async fn decode_500_before_the_first_event_replans_with_a_fresh_prefill() {
    let (p, d1, d2) = tokio::join!(
        Sim::start(&["--seed", "5"]),
        Sim::start(&["--seed", "5", "--fault-fail-next", "1"]),
        Sim::start(&["--seed", "5"]),
    );
    // Round-robin sends the first request (sequence 0) to the first decode endpoint.
    let mut conf = Conf::new(&[&p.url], &[&d1.url, &d2.url]);
    conf.decode_policy = "round-robin";
    let t = conf.start().await;
    let body = streamed(completion(8));
    let resp = t.post("/v1/completions", &body, Some("d500")).await;
    assert_eq!(resp.status().as_u16(), 200);
    let out = Stream::read(resp).await;
    assert!(out.raw.ends_with("data: [DONE]\n\n"), "{}", out.raw);
    let want = Stream::read(d2.post("/v1/completions", &body, None).await).await;
    assert_eq!(out.text(), want.text());
    let rec = t.record("d500").await;
    assert_eq!(rec["outcome"], "ok", "{rec}");
    assert_eq!(rec["route"], "disaggregated", "{rec}");
    // d1 saw the handoff and rejected it (vLLM then tells P to free the blocks), so its params
    // are not reused: a fresh prefill feeds d2.
    assert_eq!(rec["prefill_attempts"], 2, "{rec}");
    assert_eq!(rec["decode_attempts"], 2, "{rec}");
    assert_eq!(rec["decode_engine"], d2.url.as_str(), "{rec}");
    assert_phases_sum_to_ttft(&rec);
    assert_eq!(
        t.metric(
            "tandem_retries_total",
            &[("leg", "decode"), ("reason", "status_5xx")]
        )
        .await,
        1.0
    );
    assert_eq!(p.metric("vllm:request_success_total", &[]).await, 2.0);
    assert_eq!(
        d1.metric("vllm:nixl_xfer_time_seconds_count", &[]).await,
        0.0
    );
    assert_eq!(
        d2.metric("vllm:nixl_xfer_time_seconds_count", &[]).await,
        1.0
    );
    // Both prefills' blocks are released: one read by d2, one freed on d1's rejection.
    assert_eq!(
        p.wait_metric("vllm:kv_cache_usage_perc", &[], |v| v == 0.0)
            .await,
        0.0
    );
}

#[tokio::test]
async fn undeliverable_decode_reuses_the_same_params_on_another_engine() {
    let (p, d1, d2) = tokio::join!(
        Sim::start(&["--seed", "5"]),
        Sim::start(&["--seed", "5"]),
        Sim::start(&["--seed", "5"]),
    );
    let mut conf = Conf::new(&[&p.url], &[&d1.url, &d2.url]);
    conf.decode_policy = "round-robin";
    // One probe round at start-up, then none: d1 still looks healthy after it dies.
    conf.health_interval_ms = 600_000;
    let t = conf.start().await;
    let d1_addr = d1.url.trim_start_matches("http://").to_string();
    drop(d1);
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(&d1_addr).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let body = streamed(completion(8));
    let resp = t.post("/v1/completions", &body, Some("d-gone")).await;
    assert_eq!(resp.status().as_u16(), 200);
    let out = Stream::read(resp).await;
    assert!(out.raw.ends_with("data: [DONE]\n\n"), "{}", out.raw);
    let rec = t.record("d-gone").await;
    assert_eq!(rec["outcome"], "ok", "{rec}");
    assert_eq!(rec["route"], "disaggregated", "{rec}");
    // The request never reached d1, so the prefill's KV was untouched: same params, one prefill.
    assert_eq!(rec["prefill_attempts"], 1, "{rec}");
    assert_eq!(rec["decode_attempts"], 2, "{rec}");
    assert_eq!(rec["decode_engine"], d2.url.as_str(), "{rec}");
    assert_eq!(
        t.metric(
            "tandem_retries_total",
            &[("leg", "decode"), ("reason", "connect")]
        )
        .await,
        1.0
    );
    assert_eq!(p.metric("vllm:request_success_total", &[]).await, 1.0);
    assert_eq!(
        d2.metric("vllm:nixl_xfer_time_seconds_count", &[]).await,
        1.0
    );
}

#[tokio::test]
async fn stalled_prefill_times_out_and_falls_back_to_local_prefill() {
    let (p, d) = tokio::join!(
        Sim::start(&["--seed", "6", "--fault-stall-next", "1"]),
        Sim::start(&["--seed", "6"]),
    );
    let t = Conf::new(&[&p.url], &[&d.url])
        .timeout("prefill_ms", 300)
        .start()
        .await;
    let body = completion(8);
    let (status, out) = t.post_json("/v1/completions", &body, Some("p-stall")).await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["usage"]["completion_tokens"], 8);
    assert_eq!(
        t.metric(
            "tandem_retries_total",
            &[("leg", "prefill"), ("reason", "timeout")]
        )
        .await,
        1.0
    );
    let rec = t.record("p-stall").await;
    assert_eq!(rec["outcome"], "ok", "{rec}");
    assert_eq!(rec["route"], "local", "{rec}");
    assert_eq!(rec["decision_reason"], "no_prefill_engine", "{rec}");
    assert_phases_sum_to_ttft(&rec);
    assert!(
        f(&rec["ttft_s"]) >= 0.3,
        "the prefill deadline was waited out: {rec}"
    );
    let (_, direct) = d.post_json("/v1/completions", &body, None).await;
    assert_eq!(out["choices"][0]["text"], direct["choices"][0]["text"]);
    // The stalled leg never reached the engine's scheduler, and nothing is left behind.
    assert_eq!(
        p.wait_metric("vllm:num_requests_running", &[], |v| v == 0.0)
            .await,
        0.0
    );
    assert_eq!(p.metric("vllm:num_requests_waiting", &[]).await, 0.0);
    assert_eq!(p.metric("vllm:kv_cache_usage_perc", &[]).await, 0.0);
}

#[tokio::test]
async fn prefill_past_its_deadline_is_aborted_in_the_engine() {
    // The prefill engine accepts the leg but has no free KV, so the request waits in its queue
    // until Tandem's deadline drops the connection; the engine must then abort it.
    let (p, d) = tokio::join!(Sim::start(&["--fault-exhaust-kv"]), Sim::start(&[]));
    let t = Conf::new(&[&p.url], &[&d.url])
        .timeout("prefill_ms", 300)
        .start()
        .await;
    let (status, out) = t
        .post_json("/v1/completions", &completion(8), Some("p-queued"))
        .await;
    assert_eq!(status, 200, "{out}");
    assert_eq!(
        t.metric(
            "tandem_retries_total",
            &[("leg", "prefill"), ("reason", "timeout")]
        )
        .await,
        1.0
    );
    assert_eq!(t.record("p-queued").await["route"], "local");
    let aborted = p
        .wait_metric(
            "vllm:request_success_total",
            &[("finished_reason", "abort")],
            |v| v > 0.0,
        )
        .await;
    assert_eq!(aborted, 1.0, "the dropped prefill leg was aborted");
    assert_eq!(p.metric("vllm:num_requests_waiting", &[]).await, 0.0);
    assert_eq!(p.metric("vllm:num_requests_running", &[]).await, 0.0);
}

#[tokio::test]
async fn null_params_from_prefill_run_the_prompt_locally_on_decode() {
    let (p, d) = tokio::join!(
        Sim::start(&["--seed", "2", "--fault-eos-next", "1"]),
        Sim::start(&["--seed", "2"]),
    );
    let t = Conf::new(&[&p.url], &[&d.url]).start().await;
    // No ignore_eos: the prefill engine's forced EOS stops its 1-token leg.
    let body = json!({"model": MODEL, "prompt": PROMPT, "max_tokens": 8});
    let (status, out) = t
        .post_json("/v1/completions", &body, Some("null-params"))
        .await;
    assert_eq!(status, 200, "{out}");
    let (_, direct) = d.post_json("/v1/completions", &body, None).await;
    assert_eq!(out["choices"][0]["text"], direct["choices"][0]["text"]);
    assert_eq!(out["usage"]["completion_tokens"], 8);
    let rec = t.record("null-params").await;
    assert_eq!(rec["outcome"], "ok", "{rec}");
    assert_eq!(rec["route"], "local", "{rec}");
    assert_eq!(rec["decision_reason"], "null_params", "{rec}");
    assert_eq!(rec["prefill_attempts"], 1, "{rec}");
    assert_eq!(rec["prefill_engine"], p.url.as_str(), "{rec}");
    assert_phases_sum_to_ttft(&rec);
    assert_eq!(
        t.metric(
            "tandem_disaggregation_decisions_total",
            &[("decision", "local"), ("reason", "null_params")]
        )
        .await,
        1.0
    );
    assert_eq!(t.metric("tandem_retries_total", &[]).await, 0.0);
    // The prefill stopped on EOS and pinned nothing; the decode engine pulled nothing.
    assert_eq!(
        p.metric("vllm:request_success_total", &[("finished_reason", "stop")])
            .await,
        1.0
    );
    assert_eq!(p.metric("vllm:kv_cache_usage_perc", &[]).await, 0.0);
    assert_eq!(
        d.metric("vllm:nixl_xfer_time_seconds_count", &[]).await,
        0.0
    );
}

#[tokio::test]
async fn decode_death_mid_stream_ends_with_an_error_event_and_done() {
    let (p, d) = tokio::join!(
        Sim::start(&[]),
        Sim::start(&["--fault-die-after-tokens", "3"])
    );
    let t = Conf::new(&[&p.url], &[&d.url]).start().await;
    let resp = t
        .post("/v1/completions", &streamed(completion(64)), Some("d-died"))
        .await;
    assert_eq!(resp.status().as_u16(), 200);
    let out = Stream::read(resp).await;
    let err_at = out
        .raw
        .find("data: {\"error\":")
        .unwrap_or_else(|| panic!("an error event: {}", out.raw));
    assert!(
        out.raw[err_at..].ends_with("\n\ndata: [DONE]\n\n"),
        "the error event is followed by [DONE] and nothing else: {}",
        out.raw
    );
    let err = out.events.last().unwrap();
    assert_eq!(err["error"]["code"], 500, "{err}");
    assert_eq!(err["error"]["type"], "InternalServerError", "{err}");
    let content = &out.events[..out.events.len() - 1];
    assert_eq!(content.len(), 3, "the three chunks sent before the death");
    let rec = t.record("d-died").await;
    assert_eq!(rec["outcome"], "decode_died", "{rec}");
    assert_eq!(rec["route"], "disaggregated", "{rec}");
    assert_eq!(rec["content_chunks"], 3, "{rec}");
    assert_eq!(
        t.metric(
            "tandem_requests_total",
            &[("route", "disaggregated"), ("outcome", "decode_died")]
        )
        .await,
        1.0
    );
}

#[tokio::test]
async fn client_disconnect_while_decode_waits_for_kv_releases_both_engines() {
    // The prefill engine's side channel never answers the handshake, so the decode engine's KV
    // pull hangs while the prefill engine keeps the prompt's blocks pinned.
    let (p, d) = tokio::join!(
        Sim::start(&[]),
        Sim::start(&["--nixl-handshake-timeout", "60"])
    );
    p.faults(json!({"handshake_stall": true})).await;
    let t = Conf::new(&[&p.url], &[&d.url]).start().await;
    let conn = raw_post(
        &t.url,
        "/v1/completions",
        &streamed(completion(32)),
        "gone-before-kv",
    )
    .await;
    // Pinned on P, and D has the request, waiting for its KV.
    assert!(
        p.wait_metric("vllm:kv_cache_usage_perc", &[], |v| v > 0.0)
            .await
            > 0.0
    );
    assert_eq!(
        d.wait_metric(
            "vllm:num_requests_waiting_by_reason",
            &[("reason", "deferred")],
            |v| v > 0.0
        )
        .await,
        1.0
    );
    drop(conn);
    // Far below the 480 s (simulated; 9.6 s real at x50) lease: the decode engine's abort told
    // the prefill engine to free the blocks.
    assert_eq!(
        p.wait_metric("vllm:kv_cache_usage_perc", &[], |v| v == 0.0)
            .await,
        0.0,
        "the prefill engine's pinned blocks were released"
    );
    assert_eq!(
        p.metric("vllm:nixl_num_kv_expired_reqs_total", &[]).await,
        0.0,
        "released by notification, not by lease expiry"
    );
    assert_eq!(
        d.wait_metric(
            "vllm:request_success_total",
            &[("finished_reason", "abort")],
            |v| v > 0.0
        )
        .await,
        1.0
    );
    assert_eq!(d.metric("vllm:num_requests_running", &[]).await, 0.0);
    assert_eq!(d.metric("vllm:num_requests_waiting", &[]).await, 0.0);
    assert_eq!(
        d.wait_metric("vllm:kv_cache_usage_perc", &[], |v| v == 0.0)
            .await,
        0.0
    );
    let rec = t.record("gone-before-kv").await;
    assert_eq!(rec["outcome"], "client_disconnect", "{rec}");
    assert_eq!(rec["route"], "disaggregated", "{rec}");
    assert_eq!(rec["content_chunks"], 0, "{rec}");
}

#[tokio::test]
async fn client_disconnect_mid_stream_aborts_the_decode() {
    let (p, d) = tokio::join!(Sim::start(&[]), Sim::start(&[]));
    let t = Conf::new(&[&p.url], &[&d.url]).start().await;
    // Long enough that the decode engine is still generating when the client leaves.
    let mut conn = raw_post(
        &t.url,
        "/v1/completions",
        &streamed(completion(30_000)),
        "gone-mid-stream",
    )
    .await;
    let head = read_until(&mut conn, "\"text\":").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    drop(conn);
    assert_eq!(
        d.wait_metric(
            "vllm:request_success_total",
            &[("finished_reason", "abort")],
            |v| v > 0.0
        )
        .await,
        1.0,
        "the decode engine aborted the request"
    );
    assert_eq!(
        d.metric(
            "vllm:request_success_total",
            &[("finished_reason", "length")]
        )
        .await,
        0.0
    );
    assert_eq!(
        d.wait_metric("vllm:num_requests_running", &[], |v| v == 0.0)
            .await,
        0.0
    );
    assert_eq!(p.metric("vllm:num_requests_running", &[]).await, 0.0);
    assert_eq!(
        p.wait_metric("vllm:kv_cache_usage_perc", &[], |v| v == 0.0)
            .await,
        0.0
    );
    let rec = t.record("gone-mid-stream").await;
    assert_eq!(rec["outcome"], "client_disconnect", "{rec}");
    assert_eq!(rec["route"], "disaggregated", "{rec}");
    assert!(rec["content_chunks"].as_u64().unwrap() >= 1, "{rec}");
    assert_eq!(
        t.metric("tandem_requests_total", &[("outcome", "client_disconnect")])
            .await,
        1.0
    );
}

#[tokio::test]
async fn bad_requests_get_vllm_errors_and_reach_no_engine() {
    let (p, d) = tokio::join!(Sim::start(&[]), Sim::start(&[]));
    let t = Conf::new(&[&p.url], &[&d.url]).start().await;

    let resp = t
        .client
        .post(format!("{}/v1/completions", t.url))
        .header("content-type", "application/json")
        .header("x-request-id", "bad-json")
        .body("{\"prompt\": ")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "BadRequestError", "{v}");
    assert_eq!(v["error"]["code"], 400, "{v}");
    assert_eq!(v["error"]["param"], Value::Null, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("invalid JSON body"),
        "{v}"
    );

    let (status, v) = t
        .post_json(
            "/v1/completions",
            &json!({"model": "x", "prompt": PROMPT}),
            Some("bad-model"),
        )
        .await;
    assert_eq!(status, 404);
    assert_eq!(v["error"]["message"], "The model `x` does not exist.");
    assert_eq!(v["error"]["type"], "NotFoundError");
    assert_eq!(v["error"]["code"], 404);

    let (status, v) = t
        .post_json(
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": "hi"}],
                    "stream_options": {"include_usage": true}}),
            Some("bad-options"),
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(
        v["error"]["message"],
        "Stream options can only be defined when `stream=True`."
    );

    for id in ["bad-json", "bad-model", "bad-options"] {
        assert_eq!(t.record(id).await["outcome"], "client_error", "{id}");
    }
    assert_eq!(
        t.metric("tandem_requests_total", &[("outcome", "client_error")])
            .await,
        3.0
    );
    for s in [&p, &d] {
        assert_eq!(s.metric("vllm:prompt_tokens_total", &[]).await, 0.0);
    }
    // /v1/models is the decode engine's own answer.
    let models: Value = t.get("/v1/models").await.json().await.unwrap();
    assert_eq!(models["data"][0]["id"], MODEL);
}

#[tokio::test]
async fn not_ready_without_a_healthy_decode_engine() {
    let (pp, dp) = (closed_port(), closed_port());
    let t = Tandem::spawn(
        &Conf::new(
            &[&format!("http://127.0.0.1:{pp}")],
            &[&format!("http://127.0.0.1:{dp}")],
        )
        .render(),
    )
    .await;
    assert_eq!(t.get("/health").await.status().as_u16(), 200);
    // Bounded wait for the first probe round.
    let mut ready = t.ready().await;
    for _ in 0..400 {
        if ready.1["reason"] != "engines not probed yet" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        ready = t.ready().await;
    }
    let (status, v) = ready;
    assert_eq!(status, 503, "{v}");
    assert_eq!(v["ready"], false, "{v}");
    assert_eq!(v["reason"], "no healthy decode engine", "{v}");
    assert_eq!(v["decode_healthy"], 0, "{v}");
    let engines: Value = t.get("/admin/engines").await.json().await.unwrap();
    let decode = engines["engines"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["pool"] == "decode")
        .cloned()
        .unwrap();
    assert_eq!(decode["state"], "unhealthy", "{decode}");
    assert!(decode["last_error"].is_string(), "{decode}");
    // Requests are refused with vLLM's error shape and a retry hint.
    let resp = t
        .post("/v1/completions", &completion(4), Some("no-decode"))
        .await;
    assert_eq!(resp.status().as_u16(), 503);
    assert_eq!(resp.headers()["retry-after"], "1");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "ServiceUnavailableError", "{v}");
    assert_eq!(v["error"]["code"], 503, "{v}");
    assert_eq!(t.record("no-decode").await["outcome"], "no_engine");
}

#[tokio::test]
async fn decode_connection_warmed_during_a_long_prefill_survives_an_idle_close() {
    // Tandem opens the decode connection while the prefill runs. vLLM's HTTP server closes a
    // connection left idle past its keep-alive timeout, so a prefill longer than that timeout
    // finds the warmed connection closed; the decode leg must still go out (it was never sent).
    let (p, d) = tokio::join!(Sim::start(&["--seed", "8"]), Sim::start(&["--seed", "8"]));
    let front = IdleClosingProxy::start(&d.url, std::time::Duration::from_millis(150)).await;
    let mut conf = Conf::new(&[&p.url], &[&front.url]);
    // One probe round only, so that no probe keeps a pooled decode connection alive: the
    // request then opens a fresh one.
    conf.health_interval_ms = 600_000;
    let t = conf.start().await;
    let closed = || front.closed_idle.load(std::sync::atomic::Ordering::SeqCst);
    for _ in 0..200 {
        if closed() >= 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert_eq!(
        closed(),
        1,
        "the probe round's pooled connection was closed"
    );
    p.faults(json!({"slow_accept_ms": 600})).await;
    let body = completion(8);
    let (status, out) = t
        .post_json("/v1/completions", &body, Some("long-prefill"))
        .await;
    assert!(
        closed() >= 2,
        "the warmed decode connection was closed while the prefill ran"
    );
    assert_eq!(status, 200, "{out}");
    let rec = t.record("long-prefill").await;
    assert_eq!(rec["outcome"], "ok", "{rec}");
    assert_eq!(rec["route"], "disaggregated", "{rec}");
    assert_eq!(rec["decode_attempts"], 1, "{rec}");
    assert_eq!(t.metric("tandem_retries_total", &[]).await, 0.0);
    let (_, direct) = d.post_json("/v1/completions", &body, None).await;
    assert_eq!(out["choices"][0]["text"], direct["choices"][0]["text"]);
}

#[tokio::test]
async fn sigterm_fails_ready_at_once_lets_the_stream_finish_and_exits_in_the_grace_period() {
    let (p, d) = tokio::join!(Sim::start(&["--seed", "9"]), Sim::start(&["--seed", "9"]));
    let config = Conf::new(&[&p.url], &[&d.url])
        .render()
        .replace("[server]\n", "[server]\nshutdown_grace_secs = 20\n");
    let mut t = Tandem::start(&config).await;
    let body = streamed(completion(20_000));
    let resp = t.post("/v1/completions", &body, Some("drain")).await;
    assert_eq!(resp.status().as_u16(), 200);
    let mut chunks = resp.bytes_stream();
    let first = chunks.next().await.expect("a first chunk").expect("bytes");
    assert!(first.starts_with(b"data: "));

    t.terminate();
    // /ready stops succeeding at once (503, or the listener is closed), while the stream is
    // still running.
    let mut refused = false;
    for _ in 0..200 {
        let ok = t
            .client
            .get(format!("{}/ready", t.url))
            .timeout(Duration::from_secs(1))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if !ok {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(refused, "/ready kept answering 200 after SIGTERM");

    let mut rest = Vec::new();
    while let Some(c) = chunks.next().await {
        rest.extend_from_slice(&c.expect("the stream is not cut"));
    }
    let rest = String::from_utf8(rest).unwrap();
    assert!(
        rest.ends_with("data: [DONE]\n\n"),
        "stream cut: {}",
        &rest[rest.len().saturating_sub(200)..]
    );
    let tokens = rest.matches("\"text\":\"").count();
    assert!(
        tokens > 1000,
        "the stream carried on after SIGTERM ({tokens} chunks)"
    );
    let status = t
        .wait_exit(Duration::from_secs(20))
        .await
        .expect("exits within the grace period");
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn a_prompt_too_long_for_the_context_is_refused_in_the_clients_own_terms() {
    let (p, d) = tokio::join!(Sim::start(&[]), Sim::start(&[]));
    let t = Conf::new(&[&p.url], &[&d.url]).start().await;
    let (_, info) = p
        .post_json("/tokenize", &json!({"prompt": "x"}), None)
        .await;
    let max = info["max_model_len"].as_u64().expect("max_model_len");
    // One token per byte with the built-in tokenizer: just past the context with the prompt
    // alone, so the prefill leg (one token) is refused too.
    let prompt = "a".repeat(max as usize + 1);
    let body = json!({"model": MODEL, "prompt": prompt, "max_tokens": 50});
    let resp = t.post("/v1/completions", &body, Some("too-long")).await;
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("50 in the completion"),
        "the error quotes the client's max_tokens, not the prefill leg's 1: {msg}"
    );
    let rec = t.record("too-long").await;
    assert_eq!(rec["decision_reason"], "prefill_rejected", "{rec}");
    assert_eq!(rec["outcome"], "client_error", "{rec}");
}
