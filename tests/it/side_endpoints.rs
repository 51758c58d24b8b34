//! vLLM's side endpoints on `tandem serve`: `/tokenize`, `/detokenize`, `/version`, `/ping` and
//! `/reset_prefix_cache` (fanned out to every engine, prefix indexes cleared).

use serde_json::{json, Value};

use crate::support::{Sim, Tandem, PROMPT};

fn conf(p: &Sim, d: &Sim) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n\
         [pools.prefill]\nendpoints = [{:?}]\n\n\
         [pools.decode]\nendpoints = [{:?}]\n\n\
         [disaggregation]\nmode = \"always\"\n\n\
         [health]\ninterval_ms = 100\n",
        p.url, d.url
    )
}

async fn cluster() -> (Sim, Sim, Tandem) {
    let (p, d) = tokio::join!(Sim::start(&[]), Sim::start(&[]));
    let t = Tandem::start(&conf(&p, &d)).await;
    (p, d, t)
}

#[tokio::test]
async fn tokenize_and_detokenize_answer_in_vllms_shapes_with_the_engines_ids() {
    let (p, _d, t) = cluster().await;
    let body = json!({"prompt": PROMPT});
    let (status, ours) = t.post_json("/tokenize", &body, None).await;
    assert_eq!(status, 200, "{ours}");
    let (_, engine) = p.post_json("/tokenize", &body, None).await;
    assert_eq!(
        ours["tokens"], engine["tokens"],
        "the ids routing uses are the engine's"
    );
    assert_eq!(ours["count"], engine["count"]);
    assert_eq!(ours["max_model_len"], engine["max_model_len"]);
    assert_eq!(ours["token_strs"], Value::Null);
    let (status, back) = t
        .post_json("/detokenize", &json!({"tokens": ours["tokens"]}), None)
        .await;
    assert_eq!(status, 200, "{back}");
    assert_eq!(back["prompt"], PROMPT);
    let (status, chat) = t
        .post_json(
            "/tokenize",
            &json!({"messages": [{"role": "user", "content": "hi"}]}),
            None,
        )
        .await;
    assert_eq!(status, 200, "{chat}");
    assert!(chat["count"].as_u64() > Some(2), "{chat}");
    // vLLM's chat default is add_special_tokens = false (the template writes any BOS): the
    // engine's ids for the same messages are Tandem's.
    let (_, engine_chat) = p
        .post_json(
            "/tokenize",
            &json!({"messages": [{"role": "user", "content": "hi"}]}),
            None,
        )
        .await;
    assert_eq!(chat["tokens"], engine_chat["tokens"]);
    // Bad input: vLLM's 400 and 404.
    let (status, err) = t
        .post_json("/detokenize", &json!({"tokens": "x"}), None)
        .await;
    assert_eq!(status, 400);
    assert_eq!(err["error"]["code"], 400);
    let (status, err) = t
        .post_json("/tokenize", &json!({"prompt": "x", "model": "nope"}), None)
        .await;
    assert_eq!(status, 404, "{err}");
}

#[tokio::test]
async fn version_and_ping_answer() {
    let (_p, _d, t) = cluster().await;
    let v: Value = t.get("/version").await.json().await.unwrap();
    assert!(v["version"].is_string(), "{v}");
    assert_eq!(t.get("/ping").await.status(), 200);
    let r = t
        .client
        .post(format!("{}/ping", t.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// `tandem_engine_prefix_blocks_indexed` per engine, as `(pool, value)`, sorted (a metric
/// family's series come out in no fixed order).
fn indexed_gauges(metrics: &str) -> Vec<(String, f64)> {
    let mut out: Vec<(String, f64)> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("tandem_engine_prefix_blocks_indexed{"))
        .map(|rest| {
            let pool = rest
                .split("pool=\"")
                .nth(1)
                .and_then(|r| r.split('"').next())
                .expect("a pool label")
                .to_string();
            let v = rest.rsplit(' ').next().unwrap().parse::<f64>().unwrap();
            (pool, v)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// `usage.prompt_tokens_details.cached_tokens` of a completion.
fn cached(v: &Value) -> u64 {
    v["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or_else(|| panic!("no cached_tokens in {v}"))
}

#[tokio::test]
async fn reset_prefix_cache_resets_every_engine_and_both_indexes() {
    // Prompt-token details on, as vLLM's `--enable-prompt-tokens-details`: Tandem reports the
    // prefill engine's cached count to the client, so the engine's cache shows in the answer.
    let (p, d) = tokio::join!(
        Sim::start(&["--enable-prompt-tokens-details"]),
        Sim::start(&["--enable-prompt-tokens-details"])
    );
    let t = Tandem::start(&conf(&p, &d)).await;
    let body = json!({"prompt": PROMPT.repeat(3), "max_tokens": 2});
    let (status, first) = t.post_json("/v1/completions", &body, None).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(cached(&first), 0, "a cold engine: {first}");
    let (status, warm) = t.post_json("/v1/completions", &body, None).await;
    assert_eq!(status, 200, "{warm}");
    let prompt_tokens = warm["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(
        cached(&warm) >= prompt_tokens / 2,
        "the repeat hits the prefill engine's cache: {warm}"
    );
    // The decode engine holds the pulled prompt too: a colocated request straight to it hits.
    let (status, direct) = d.complete(&body).await;
    assert_eq!(status, 200, "{direct}");
    assert!(
        cached(&direct) > 0,
        "the decode engine caches the prompt: {direct}"
    );
    let hits_before = p.metric("vllm:prefix_cache_hits_total", &[]).await;
    assert!(hits_before > 0.0);

    let indexed = |e: &Value| {
        e["engines"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["prefix_blocks_indexed"].as_u64().unwrap())
            .collect::<Vec<_>>()
    };
    let before = indexed(&t.engines().await);
    assert!(
        before.iter().all(|&b| b > 0),
        "both indexes hold the prompt: {before:?}"
    );
    let gauges = indexed_gauges(&t.metrics().await);
    assert_eq!(
        gauges
            .iter()
            .map(|(pool, _)| pool.as_str())
            .collect::<Vec<_>>(),
        ["decode", "prefill"],
        "one gauge per engine: {gauges:?}"
    );
    assert!(gauges.iter().all(|&(_, v)| v > 0.0), "{gauges:?}");

    let (status, v) = t.post_json("/reset_prefix_cache", &json!({}), None).await;
    assert_eq!(status, 200, "{v}");
    let engines = v["engines"].as_array().unwrap();
    assert_eq!(engines.len(), 2, "{v}");
    assert!(engines.iter().all(|e| e["reset"] == true), "{v}");
    assert!(!v.to_string().contains("127.0.0.1"), "{v}");
    assert_eq!(indexed(&t.engines().await), vec![0, 0]);
    let gauges = indexed_gauges(&t.metrics().await);
    assert_eq!(gauges.len(), 2, "{gauges:?}");
    assert!(
        gauges.iter().all(|&(_, v)| v == 0.0),
        "metrics show both indexes empty: {gauges:?}"
    );

    // The engines' caches are empty: the decode engine misses the prompt it held, and the same
    // request through Tandem is cold again on the prefill engine.
    let (status, direct) = d.complete(&body).await;
    assert_eq!(status, 200, "{direct}");
    assert_eq!(
        cached(&direct),
        0,
        "the decode engine's cache was reset: {direct}"
    );
    let (status, again) = t.post_json("/v1/completions", &body, None).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(
        cached(&again),
        0,
        "the prefill engine's cache was reset: {again}"
    );
    assert_eq!(
        p.metric("vllm:prefix_cache_hits_total", &[]).await,
        hits_before,
        "no prefix hit on the prefill engine after the reset"
    );
}

/// With `--enable-prompt-tokens-details`, a streamed completion's final usage chunk reports the
/// cached prompt tokens as the full response does (vLLM sets `prompt_tokens_details` on the
/// final usage of both), and Tandem passes it through when it serves a request on one engine
/// (`mode = "never"`), which is what `tandem bench trace --prefill 0` reads its hit rate from.
#[tokio::test]
async fn a_streamed_usage_chunk_reports_cached_tokens_through_a_colocated_pool() {
    let d = Sim::start(&["--enable-prompt-tokens-details"]).await;
    let conf = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n\
         [pools.prefill]\nendpoints = []\n\n\
         [pools.decode]\nendpoints = [{:?}]\n\n\
         [disaggregation]\nmode = \"never\"\n\n\
         [health]\ninterval_ms = 100\n",
        d.url
    );
    let t = Tandem::start(&conf).await;
    let body = json!({"prompt": PROMPT.repeat(3), "max_tokens": 2});
    let (status, full) = d.complete(&body).await;
    assert_eq!(status, 200, "{full}");
    assert_eq!(cached(&full), 0, "a cold engine: {full}");
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let sse = crate::support::read_sse(t.post("/v1/completions", &streamed, None).await).await;
    assert!(sse.done, "{:?}", sse.events);
    let last = sse.events.last().expect("a usage chunk");
    assert_eq!(last["choices"], json!([]), "{last}");
    let prompt_tokens = full["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(last["usage"]["prompt_tokens"], prompt_tokens, "{last}");
    // The repeat finds every full block of the first: the same count the full response gives.
    let (_, again) = d.complete(&body).await;
    assert!(cached(last) >= prompt_tokens / 2, "{last}");
    assert_eq!(cached(last), cached(&again), "{last} against {again}");
}
