//! The `otel` build: request spans exported over OTLP/HTTP to a collector stand-in, parented on
//! the client's span, with the same span id the engines received in `traceparent`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

use crate::support::{Sim, Tandem, PROMPT};

const CLIENT_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const CLIENT_PARENT: &str = "b7ad6b7169203331";

/// A collector stand-in: every OTLP/JSON export body it received.
async fn collector() -> (String, Arc<Mutex<Vec<Value>>>) {
    let got = Arc::new(Mutex::new(Vec::new()));
    let sink = got.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let sink = sink.clone();
            async move {
                let v: Value = serde_json::from_slice(&body).expect("an OTLP/JSON body");
                sink.lock().unwrap().push(v);
                axum::Json(json!({}))
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1/traces", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await });
    (url, got)
}

fn attr<'a>(attrs: &'a Value, key: &str) -> Option<&'a Value> {
    attrs
        .as_array()?
        .iter()
        .find(|a| a["key"] == key)
        .map(|a| &a["value"])
}

#[tokio::test]
async fn request_spans_are_exported_under_the_clients_span() {
    let (url, got) = collector().await;
    let (p, d) = tokio::join!(Sim::start(&[]), Sim::start(&[]));
    let cfg = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nshutdown_grace_secs = 5\n\n\
         [pools.prefill]\nendpoints = [\"{}\"]\n\n[pools.decode]\nendpoints = [\"{}\"]\n\n\
         [disaggregation]\nmode = \"always\"\n\n[health]\ninterval_ms = 100\n\n\
         [telemetry]\notlp_endpoint = \"{url}\"\notlp_protocol = \"http/json\"\nservice_name = \"tandem-it\"\n",
        p.url, d.url
    );
    let mut t = Tandem::start(&cfg).await;
    let resp = t
        .client
        .post(format!("{}/v1/completions", t.url))
        .header("x-request-id", "otel-1")
        .header(
            "traceparent",
            format!("00-{CLIENT_TRACE}-{CLIENT_PARENT}-01"),
        )
        .json(
            &json!({"model": "Qwen/Qwen3-0.6B", "prompt": PROMPT, "max_tokens": 4,
            "ignore_eos": true, "stream": true}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.text().await.unwrap();
    let rec = t.record("otel-1").await;
    let span_id = rec["span_id"].as_str().expect("span id").to_string();
    assert_eq!(rec["trace_id"], CLIENT_TRACE, "{rec}");
    // SIGTERM flushes the batch exporter before the process exits.
    t.terminate();
    assert!(t.wait_exit(Duration::from_secs(20)).await.is_some());

    let bodies = got.lock().unwrap().clone();
    let spans: Vec<(&Value, &Value)> = bodies
        .iter()
        .flat_map(|b| b["resourceSpans"].as_array().into_iter().flatten())
        .flat_map(|rs| {
            rs["scopeSpans"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|ss| ss["spans"].as_array().into_iter().flatten())
                .map(move |s| (&rs["resource"], s))
        })
        .collect();
    let (resource, span) = spans
        .iter()
        .find(|(_, s)| s["name"] == "request")
        .unwrap_or_else(|| panic!("no request span exported: {bodies:?}"));
    assert_eq!(
        attr(&resource["attributes"], "service.name"),
        Some(&json!({"stringValue": "tandem-it"}))
    );
    assert_eq!(span["traceId"], CLIENT_TRACE, "{span}");
    assert_eq!(span["parentSpanId"], CLIENT_PARENT, "{span}");
    assert_eq!(span["spanId"], span_id.as_str(), "{span}");
    let attrs = &span["attributes"];
    assert_eq!(
        attr(attrs, "request_id"),
        Some(&json!({"stringValue": "otel-1"})),
        "{span}"
    );
    assert_eq!(
        attr(attrs, "route"),
        Some(&json!({"stringValue": "disaggregated"})),
        "{span}"
    );
    assert_eq!(
        attr(attrs, "outcome"),
        Some(&json!({"stringValue": "ok"})),
        "{span}"
    );
    // One event per phase, in order.
    let phases: Vec<&str> = span["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|e| attr(&e["attributes"], "phase")?["stringValue"].as_str())
        .collect();
    assert_eq!(
        phases,
        ["queue", "prefill", "handoff", "decode_first_token"],
        "{span}"
    );
    // The engines saw the exported span as their parent.
    let seen: Value = d.get("/admin/requests").await.json().await.unwrap();
    assert_eq!(
        seen["requests"][0]["traceparent"],
        format!("00-{CLIENT_TRACE}-{span_id}-01").as_str()
    );
}
