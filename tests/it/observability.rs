//! Observability through the real binaries: every metric family Tandem documents is exported and
//! moves, the phases of each request add up to its TTFT, ITL counts the gaps between the content
//! chunks the client received, and the client's W3C trace reaches both engine legs.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{json, Value};

use crate::support::{content_chunks, metric_in, read_sse, Sim, Tandem, PROMPT};

const MODEL: &str = "Qwen/Qwen3-0.6B";
const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_PARENT: &str = "00f067aa0ba902b7";

fn config(prefill: &[&Sim], decode: &[&Sim], extra: &str) -> String {
    let urls = |s: &[&Sim]| s.iter().map(|s| s.url.clone()).collect::<Vec<_>>();
    // Prefill policy prefix and decode policy kv-capacity, the defaults. Scrapes are rare so the
    // decode reservations the test looks for are still held when it looks.
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n\
         [pools]\ntarget_ratio = \"1:1\"\n\n\
         [pools.prefill]\nendpoints = {:?}\n\n\
         [pools.decode]\nendpoints = {:?}\n\n\
         [disaggregation]\nmode = \"conditional\"\n\n\
         [health]\ninterval_ms = 100\nscrape_interval_ms = 60000\n\n{extra}",
        urls(prefill),
        urls(decode),
    )
}

/// Stream a request to its end; returns the content chunks the client received.
async fn stream(t: &Tandem, path: &str, body: Value, id: &str, trace: Option<(&str, &str)>) -> u64 {
    let mut req = t
        .client
        .post(format!("{}{path}", t.url))
        .header("x-request-id", id)
        .json(&body);
    if let Some((tp, ts)) = trace {
        req = req.header("traceparent", tp).header("tracestate", ts);
    }
    let resp = req.send().await.expect("sent");
    assert_eq!(resp.status(), 200, "{id}");
    let sse = read_sse(resp).await;
    assert!(sse.done && !sse.cut, "{id}: the stream completes");
    content_chunks(&sse.events)
}

fn completion(prompt: &str, max_tokens: u64) -> Value {
    json!({"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": true,
        "stream": true, "stream_options": {"include_usage": true}})
}

fn chat(content: &str, max_tokens: u64) -> Value {
    json!({"model": MODEL, "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens, "ignore_eos": true, "stream": true})
}

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("a number: {v}"))
}

/// What the sims saw of `id`'s legs: (traceparent, tracestate) per leg.
async fn legs(sims: &[&Sim], id: &str) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    for s in sims {
        let v: Value = s.get("/admin/requests").await.json().await.expect("JSON");
        for r in v["requests"].as_array().expect("a list") {
            if r["x_request_id"] == id {
                out.push((
                    r["traceparent"]
                        .as_str()
                        .expect("a traceparent")
                        .to_string(),
                    r["tracestate"].as_str().map(str::to_string),
                ));
            }
        }
    }
    out
}

#[tokio::test]
async fn every_family_moves_phases_add_up_itl_counts_gaps_and_the_trace_reaches_both_legs() {
    let details = ["--enable-prompt-tokens-details"];
    let (p1, p2, d1, d2) = tokio::join!(
        Sim::start(&details),
        Sim::start(&details),
        Sim::start(&details),
        Sim::start(&details),
    );
    let t = Tandem::start(&config(&[&p1, &p2], &[&d1, &d2], "")).await;
    let long = PROMPT.repeat(12);

    // In flight: every engine accepts slowly, so a disaggregated and a local request are caught
    // holding prefill work, in-flight slots and decode KV reservations.
    for s in [&p1, &p2, &d1, &d2] {
        s.faults(json!({"slow_accept_ms": 1500})).await;
    }
    let slow = async {
        tokio::join!(
            stream(
                &t,
                "/v1/completions",
                completion(&format!("Slow. {long}"), 8),
                "slow-pd",
                None
            ),
            stream(
                &t,
                "/v1/completions",
                completion("Hi.", 8),
                "slow-local",
                None
            ),
        )
    };
    let watch = async {
        let mut last = String::new();
        for _ in 0..200 {
            last = t.metrics().await;
            let any = |name: &str, pool: &str| metric_in(&last, name, &[("pool", pool)]) > 0.0;
            if any("tandem_engine_prefill_queue_tokens", "prefill")
                && any("tandem_engine_inflight", "prefill")
                && any("tandem_engine_inflight", "decode")
                && any("tandem_engine_kv_reserved_blocks", "decode")
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        for s in [&p1, &p2, &d1, &d2] {
            s.faults(json!({"slow_accept_ms": 0})).await;
        }
        last
    };
    let (_, in_flight) = tokio::join!(slow, watch);
    for (name, pool) in [
        ("tandem_engine_prefill_queue_tokens", "prefill"),
        ("tandem_engine_inflight", "prefill"),
        ("tandem_engine_inflight", "decode"),
        ("tandem_engine_kv_reserved_blocks", "decode"),
    ] {
        assert!(
            metric_in(&in_flight, name, &[("pool", pool)]) > 0.0,
            "{name}{{pool={pool}}} never moved while requests were in flight:\n{in_flight}"
        );
    }

    // Steady traffic: disaggregated and local, completions and chat, the long document twice (a
    // prefix hit on the prefill engine, with a new tail long enough to be worth disaggregating),
    // one request carrying the client's trace.
    let tail = " Why does the decode pool need free KV blocks?".repeat(12);
    let tp = format!("00-{CLIENT_TRACE}-{CLIENT_PARENT}-01");
    let mut client_chunks: HashMap<&str, u64> = HashMap::new();
    let runs = [
        ("pd-1", "/v1/completions", completion(&long, 24), None),
        (
            "pd-2",
            "/v1/completions",
            completion(&format!("{long}{tail}"), 16),
            Some((tp.as_str(), "vendor=abc")),
        ),
        ("pd-chat", "/v1/chat/completions", chat(&long, 12), None),
        (
            "local-1",
            "/v1/completions",
            completion("Hi there.", 10),
            None,
        ),
        (
            "local-chat",
            "/v1/chat/completions",
            chat("Hello.", 6),
            None,
        ),
    ];
    for (id, path, body, trace) in runs {
        client_chunks.insert(id, stream(&t, path, body, id, trace).await);
    }

    // Per request: the phases add up to TTFT, and ITL has one observation per gap between the
    // content chunks the client received.
    let mut routes = HashMap::new();
    for (id, chunks) in &client_chunks {
        let rec = t.record(id).await;
        assert_eq!(rec["outcome"], "ok", "{rec}");
        let phases: f64 = ["queue_s", "prefill_s", "handoff_s", "decode_first_token_s"]
            .iter()
            .map(|k| num(&rec[k]))
            .sum();
        let ttft = num(&rec["ttft_s"]);
        assert!((phases - ttft).abs() < 1e-3, "{phases} vs {ttft}: {rec}");
        assert!(*chunks > 1, "{id}: {chunks} chunks");
        assert_eq!(rec["content_chunks"], *chunks, "{rec}");
        assert_eq!(rec["itl_observations"], chunks - 1, "{rec}");
        routes.insert(*id, rec["route"].as_str().expect("route").to_string());
    }
    assert_eq!(routes["pd-1"], "disaggregated");
    assert_eq!(routes["local-1"], "local");

    // The client's trace: both legs carry it, with Tandem's span as their parent, and the
    // client's tracestate rides along.
    let rec = t.record("pd-2").await;
    assert_eq!(rec["trace_id"], CLIENT_TRACE, "{rec}");
    let ours = rec["span_id"].as_str().expect("span id");
    assert_ne!(ours, CLIENT_PARENT);
    let want = format!("00-{CLIENT_TRACE}-{ours}-01");
    let seen = legs(&[&p1, &p2, &d1, &d2], "pd-2").await;
    assert_eq!(seen.len(), 2, "one prefill and one decode leg: {seen:?}");
    for (traceparent, tracestate) in &seen {
        assert_eq!(traceparent, &want);
        assert_eq!(tracestate.as_deref(), Some("vendor=abc"));
    }
    // No trace from the client: Tandem starts one, and both legs share it.
    let rec = t.record("pd-1").await;
    let fresh = rec["trace_id"].as_str().expect("trace id");
    assert_ne!(fresh, CLIENT_TRACE);
    let seen = legs(&[&p1, &p2, &d1, &d2], "pd-1").await;
    assert_eq!(seen.len(), 2, "{seen:?}");
    for (traceparent, tracestate) in &seen {
        assert_eq!(
            traceparent,
            &format!("00-{fresh}-{}-01", rec["span_id"].as_str().unwrap())
        );
        assert_eq!(tracestate, &None);
    }

    // Every family is exported and has moved.
    let m = t.metrics().await;
    let nonzero = |name: &str, labels: &[(&str, &str)]| {
        let v = metric_in(&m, name, labels);
        assert!(v > 0.0, "{name}{labels:?} = {v}\n{m}");
    };
    for route in ["disaggregated", "local"] {
        nonzero(
            "tandem_ttft_seconds_count",
            &[("route", route), ("model", MODEL)],
        );
        nonzero(
            "tandem_requests_total",
            &[("route", route), ("outcome", "ok")],
        );
    }
    for phase in ["queue", "prefill", "handoff", "decode_first_token"] {
        nonzero("tandem_phase_seconds_count", &[("phase", phase)]);
    }
    for name in [
        "tandem_itl_seconds_count",
        "tandem_tpot_seconds_count",
        "tandem_e2e_seconds_count",
        "tandem_handoff_dispatch_seconds_count",
        "tandem_predicted_cached_tokens_total",
        "tandem_reported_cached_tokens_total",
    ] {
        nonzero(name, &[]);
    }
    nonzero(
        "tandem_route_decisions_total",
        &[("pool", "prefill"), ("policy", "prefix")],
    );
    nonzero(
        "tandem_route_decisions_total",
        &[("pool", "decode"), ("policy", "kv-capacity")],
    );
    for decision in ["disaggregate", "local"] {
        nonzero(
            "tandem_disaggregation_decisions_total",
            &[("decision", decision)],
        );
    }
    for pool in ["prefill", "decode"] {
        nonzero("tandem_engine_up", &[("pool", pool)]);
        nonzero("tandem_engine_kv_free_blocks", &[("pool", pool)]);
        nonzero("tandem_engine_kv_total_blocks", &[("pool", pool)]);
        nonzero(
            "tandem_pool_engines",
            &[("pool", pool), ("state", "healthy")],
        );
    }
    nonzero(
        "tandem_engine_prefix_blocks_indexed",
        &[("pool", "prefill")],
    );
    nonzero("tandem_pd_ratio", &[("kind", "live")]);
    nonzero("tandem_pd_ratio", &[("kind", "target")]);
    // `/admin/engines`: one entry per engine with what the issue lists, agreeing with /metrics.
    let engines: Value = t.get("/admin/engines").await.json().await.expect("JSON");
    let engines = engines["engines"].as_array().expect("a list");
    assert_eq!(engines.len(), 4, "{engines:?}");
    for e in engines {
        let (pool, url) = (e["pool"].as_str().unwrap(), e["url"].as_str().unwrap());
        assert!(e["id"].is_u64() && e["inflight"].is_u64(), "{e}");
        assert_eq!(e["state"], "healthy", "{e}");
        let labels = [("pool", pool), ("engine", url)];
        for (field, family) in [
            ("kv_total_blocks", "tandem_engine_kv_total_blocks"),
            ("kv_free_blocks", "tandem_engine_kv_free_blocks"),
            ("kv_reserved_blocks", "tandem_engine_kv_reserved_blocks"),
            (
                "prefix_blocks_indexed",
                "tandem_engine_prefix_blocks_indexed",
            ),
        ] {
            assert!(e[field].is_u64(), "{field}: {e}");
            // Both are read live; only the index may grow between the two reads (it does not
            // here: no request is in flight).
            assert_eq!(
                num(&e[field]),
                metric_in(&m, family, &labels),
                "{field}: {e}"
            );
        }
        assert!(num(&e["kv_total_blocks"]) > 0.0, "{e}");
        assert!(num(&e["last_scrape_age_s"]) >= 0.0, "{e}");
    }

    // ITL observations are exactly the recorded gaps, over every request Tandem served.
    let gaps: u64 = t
        .records()
        .await
        .iter()
        .map(|r| r["itl_observations"].as_u64().expect("a count"))
        .sum();
    assert_eq!(metric_in(&m, "tandem_itl_seconds_count", &[]), gaps as f64);
}

#[tokio::test]
async fn with_metrics_off_requests_are_served_and_metrics_is_404() {
    let (p, d) = tokio::join!(Sim::start(&[]), Sim::start(&[]));
    let t = Tandem::start(&config(&[&p], &[&d], "[telemetry]\nmetrics = false\n")).await;
    let chunks = stream(
        &t,
        "/v1/completions",
        completion(&PROMPT.repeat(12), 8),
        "off-1",
        None,
    )
    .await;
    assert!(chunks > 1);
    assert_eq!(t.get("/metrics").await.status(), 404);
    // The per-request record does not depend on the metrics.
    let rec = t.record("off-1").await;
    assert_eq!(rec["itl_observations"], chunks - 1, "{rec}");
}

#[tokio::test]
async fn ttft_and_its_phases_are_observed_at_the_first_token_not_at_the_end() {
    let (p, d) = tokio::join!(Sim::start(&[]), Sim::start(&[]));
    let t = Tandem::start(&config(&[&p], &[&d], "")).await;
    // A long stream: read its first chunk, then scrape while it still runs.
    let resp = t
        .client
        .post(format!("{}/v1/completions", t.url))
        .json(&completion(&PROMPT.repeat(4), 20_000))
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), 200);
    let mut body = resp.bytes_stream();
    use futures::StreamExt;
    body.next().await.expect("a first chunk").expect("bytes");
    let m = t.metrics().await;
    assert_eq!(metric_in(&m, "tandem_ttft_seconds_count", &[]), 1.0, "{m}");
    for phase in ["queue", "prefill", "handoff", "decode_first_token"] {
        assert_eq!(
            metric_in(&m, "tandem_phase_seconds_count", &[("phase", phase)]),
            1.0,
            "{phase}"
        );
    }
    // The outcome and the whole-request figures wait for the end.
    assert_eq!(metric_in(&m, "tandem_requests_total", &[]), 0.0);
    assert_eq!(metric_in(&m, "tandem_e2e_seconds_count", &[]), 0.0);
    drop(body);
    let done = t
        .wait_metric("tandem_requests_total", &[], |v| v >= 1.0)
        .await;
    assert_eq!(done, 1.0);
    // Observed once: not again at the end.
    assert_eq!(t.metric("tandem_ttft_seconds_count", &[]).await, 1.0);
}
