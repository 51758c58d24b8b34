//! Routing through the real binaries: the `prefix` policy on the precise (KV-event) feed, and
//! `kv-capacity` admission when no decode engine has room.

use futures::StreamExt;
use serde_json::{json, Value};

use crate::support::{Sim, Tandem, PROMPT};

const MODEL: &str = "Qwen/Qwen3-0.6B";

fn endpoint_with_events(s: &Sim) -> String {
    format!(
        "{{ url = \"{}\", kv_events = \"{}\", kv_events_replay = \"{}\" }}",
        s.url,
        s.ready["kv_events"].as_str().expect("kv events endpoint"),
        s.ready["kv_events_replay"]
            .as_str()
            .expect("replay endpoint")
    )
}

const EVENTS: [&str; 5] = [
    "--kv-events-endpoint",
    "tcp://127.0.0.1:0",
    "--kv-events-replay-endpoint",
    "tcp://127.0.0.1:0",
    "--enable-prompt-tokens-details",
];

#[tokio::test]
async fn prefix_follows_the_engines_kv_events_to_the_cached_prompt() {
    let (p1, p2, d) = tokio::join!(
        Sim::start(&EVENTS),
        Sim::start(&EVENTS),
        Sim::start(&["--enable-prompt-tokens-details"]),
    );
    let cfg = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n\
         [pools.prefill]\nendpoints = [{}, {}]\npolicy = \"prefix\"\n\
         [pools.prefill.prefix_index]\nfeed = \"precise\"\n\n\
         [pools.decode]\nendpoints = [\"{}\"]\n\n\
         [disaggregation]\nmode = \"always\"\n\n\
         [health]\ninterval_ms = 100\n",
        endpoint_with_events(&p1),
        endpoint_with_events(&p2),
        d.url
    );
    let t = Tandem::start(&cfg).await;
    let long = PROMPT.repeat(8);
    let first = json!({"model": MODEL, "prompt": long, "max_tokens": 4, "ignore_eos": true});
    let (status, out) = t.post_json("/v1/completions", &first, Some("r1")).await;
    assert_eq!(status, 200, "{out}");
    let engine = t.record("r1").await["prefill_engine"]
        .as_str()
        .expect("a prefill engine")
        .to_string();
    // The engine announces the prompt's blocks; the coordinator's index learns them.
    let batches = t
        .wait_metric("tandem_kv_feed_batches_total", &[], |v| v > 0.0)
        .await;
    assert!(batches > 0.0, "no KV event batch reached the coordinator");
    let indexed = t
        .wait_metric(
            "tandem_engine_prefix_blocks_indexed",
            &[("pool", "prefill"), ("engine", &engine)],
            |v| v > 0.0,
        )
        .await;
    assert!(indexed > 0.0, "the index holds nothing for {engine}");
    // The same document with a new question goes where the document is cached, whichever
    // engine round-robin or load would have picked.
    let second = json!({"model": MODEL, "prompt": format!("{long} And then?"), "max_tokens": 4,
        "ignore_eos": true});
    let (status, out) = t.post_json("/v1/completions", &second, Some("r2")).await;
    assert_eq!(status, 200, "{out}");
    let rec = t.record("r2").await;
    assert_eq!(rec["prefill_engine"], engine.as_str(), "{rec}");
    let predicted = rec["predicted_cached_tokens"].as_u64().expect("predicted");
    let reported = rec["cached_tokens"].as_u64().expect("reported");
    assert!(predicted > 0, "{rec}");
    assert_eq!(
        predicted, reported,
        "the index predicted what the engine had"
    );
    assert_eq!(
        t.metric(
            "tandem_route_decisions_total",
            &[("pool", "prefill"), ("reason", "prefix_hit")]
        )
        .await,
        1.0
    );
    let (_, ready) = t.ready().await;
    assert_eq!(ready["warnings"], json!([]), "{ready}");
}

#[tokio::test]
async fn a_full_decode_pool_queues_then_refuses_with_retry_after() {
    // 64 blocks of 16 tokens: one long request's reservation leaves no room for a second.
    let (p, d) = tokio::join!(
        Sim::start(&[]),
        Sim::start(&["--num-gpu-blocks-override", "64"]),
    );
    let cfg = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n\
         [pools.prefill]\nendpoints = [\"{}\"]\n\n\
         [pools.decode]\nendpoints = [\"{}\"]\n\n\
         [disaggregation]\nmode = \"always\"\n\n\
         [admission]\nmax_queued = 1\nretry_after_secs = 7\n\n\
         [health]\ninterval_ms = 100\nscrape_interval_ms = 100\n",
        p.url, d.url
    );
    let t = Tandem::start(&cfg).await;
    t.wait_metric(
        "tandem_engine_kv_total_blocks",
        &[("pool", "decode")],
        |v| v == 64.0,
    )
    .await;
    // ~600 prompt tokens + 256 reserved output tokens: 54 of 64 blocks.
    let long = PROMPT.repeat(5);
    let body = |id: &str| {
        json!({"model": MODEL, "prompt": format!("{id} {long}"), "max_tokens": 20000,
            "ignore_eos": true, "stream": true})
    };
    let holder = t.post("/v1/completions", &body("a"), Some("holder")).await;
    assert_eq!(holder.status(), 200);
    let mut holder = holder.bytes_stream();
    holder.next().await.expect("a first chunk").expect("bytes");
    // Two more: one waits in the queue, the other finds it full.
    let send = |id: &'static str| {
        let (client, url, b) = (
            t.client.clone(),
            format!("{}/v1/completions", t.url),
            body(id),
        );
        tokio::spawn(async move {
            client
                .post(url)
                .header("X-Request-Id", id)
                .json(&b)
                .send()
                .await
                .expect("sent")
        })
    };
    let (h2, h3) = (send("b"), send("c"));
    let rejected = t
        .wait_metric("tandem_admission_rejected_total", &[], |v| v >= 1.0)
        .await;
    assert_eq!(rejected, 1.0);
    assert_eq!(t.metric("tandem_admission_waiting", &[]).await, 1.0);
    // The queued one goes through once the holder lets go of its blocks.
    drop(holder);
    let (r2, r3) = (h2.await.expect("task"), h3.await.expect("task"));
    let (waiting, refused) = if r2.status() == 503 {
        (r3, r2)
    } else {
        (r2, r3)
    };
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["retry-after"], "7");
    let err: Value = refused.json().await.expect("error JSON");
    assert_eq!(err["error"]["type"], "ServiceUnavailableError", "{err}");
    assert_eq!(waiting.status(), 200);
    let mut s = waiting.bytes_stream();
    assert!(s.next().await.is_some_and(|c| c.is_ok()));
    // It waited once at arrival for decode KV. Admitted the moment the holder's release is
    // counted, it may also wait at its handoff until the engine's next scrape shows the blocks
    // free (reason "handoff"), so only the arrival wait is exact.
    assert_eq!(
        t.metric("tandem_admission_queued_total", &[("reason", "decode_kv")])
            .await,
        1.0
    );
}

#[tokio::test]
async fn a_burst_of_handoffs_spreads_evenly_over_the_decode_engines() {
    // 16 requests at once: the prefill engine finishes them in the same few steps, so their
    // handoffs arrive together. Each is placed at its handoff, seeing every admission before it,
    // so two equal decode engines take 8 each (placing them where they were provisionally put
    // at arrival, from one stale scrape, bunched them on one engine).
    let (p, d1, d2) = tokio::join!(Sim::start(&[]), Sim::start(&[]), Sim::start(&[]));
    let cfg = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n\
         [pools.prefill]\nendpoints = [\"{}\"]\n\n\
         [pools.decode]\nendpoints = [\"{}\", \"{}\"]\n\n\
         [disaggregation]\nmode = \"always\"\n\n\
         [health]\ninterval_ms = 100\nscrape_interval_ms = 100\n",
        p.url, d1.url, d2.url
    );
    let t = Tandem::start(&cfg).await;
    for d in [&d1, &d2] {
        t.wait_metric(
            "tandem_engine_kv_total_blocks",
            &[("pool", "decode"), ("engine", &d.url)],
            |v| v > 0.0,
        )
        .await;
    }
    let streams = futures::future::join_all((0..16).map(|i| {
        let body = json!({"model": MODEL, "prompt": format!("burst {i}: {PROMPT}"),
            "max_tokens": 40000, "ignore_eos": true, "stream": true});
        let (client, url) = (t.client.clone(), format!("{}/v1/completions", t.url));
        async move {
            let resp = client.post(url).json(&body).send().await.expect("sent");
            assert_eq!(resp.status(), 200);
            let mut s = resp.bytes_stream();
            // The first chunk: the request is running on its decode engine.
            s.next().await.expect("a first chunk").expect("bytes");
            s
        }
    }))
    .await;
    let (r1, r2) = (
        d1.metric("vllm:num_requests_running", &[]).await,
        d2.metric("vllm:num_requests_running", &[]).await,
    );
    assert_eq!((r1, r2), (8.0, 8.0), "decode engines running {r1} and {r2}");
    drop(streams);
}

#[tokio::test]
async fn a_session_key_keeps_unseen_turns_on_one_prefill_engine() {
    // Turns whose prompts share no block (nothing for the index to see, as after a coordinator
    // restart) tie on cost between two idle engines; a session key sends every turn of its
    // session to the engine the key hashes to. Without it each turn would be a coin flip (all
    // three turns of both sessions together: 1 in 16).
    let (p1, p2, d) = tokio::join!(Sim::start(&[]), Sim::start(&[]), Sim::start(&[]));
    let cfg = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n\
         [pools.prefill]\nendpoints = [\"{}\", \"{}\"]\n\n\
         [pools.decode]\nendpoints = [\"{}\"]\n\n\
         [disaggregation]\nmode = \"always\"\n",
        p1.url, p2.url, d.url
    );
    let t = Tandem::start(&cfg).await;
    let mut seen: [Vec<String>; 2] = [Vec::new(), Vec::new()];
    for turn in 0..6 {
        let session = turn % 2;
        let id = format!("s{turn}");
        let mut body = json!({"model": MODEL, "prompt": format!("turn {turn} {PROMPT}"),
            "max_tokens": 2});
        let mut req = t
            .client
            .post(format!("{}/v1/completions", t.url))
            .header("x-request-id", &id);
        // One session names itself by header, the other by OpenAI's `user` field.
        if session == 0 {
            req = req.header("x-session-id", "conversation-7");
        } else {
            body["user"] = json!("alice");
        }
        let resp = req.json(&body).send().await.expect("sent");
        assert_eq!(resp.status(), 200);
        let _ = resp.bytes().await;
        let rec = t.record(&id).await;
        seen[session].push(rec["prefill_engine"].as_str().expect("engine").to_string());
    }
    for (s, engines) in seen.iter().enumerate() {
        assert!(
            engines.iter().all(|e| e == &engines[0]),
            "session {s} moved: {engines:?}"
        );
    }
}
