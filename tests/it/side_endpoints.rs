//! vLLM's side endpoints on `tandem serve`: `/tokenize`, `/detokenize`, `/version`, `/ping` and
//! `/reset_prefix_cache` (fanned out to every engine, prefix indexes cleared).

use serde_json::{json, Value};

use crate::support::{Sim, Tandem, PROMPT};

async fn cluster() -> (Sim, Sim, Tandem) {
    let (p, d) = tokio::join!(Sim::start(&[]), Sim::start(&[]));
    let conf = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n\
         [pools.prefill]\nendpoints = [{:?}]\n\n\
         [pools.decode]\nendpoints = [{:?}]\n\n\
         [disaggregation]\nmode = \"always\"\n\n\
         [health]\ninterval_ms = 100\n",
        p.url, d.url
    );
    let t = Tandem::start(&conf).await;
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

#[tokio::test]
async fn reset_prefix_cache_resets_every_engine_and_both_indexes() {
    let (_p, _d, t) = cluster().await;
    let body = json!({"prompt": PROMPT.repeat(3), "max_tokens": 2});
    let (status, _) = t.post_json("/v1/completions", &body, None).await;
    assert_eq!(status, 200);
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
    let (status, v) = t.post_json("/reset_prefix_cache", &json!({}), None).await;
    assert_eq!(status, 200, "{v}");
    let engines = v["engines"].as_array().unwrap();
    assert_eq!(engines.len(), 2, "{v}");
    assert!(engines.iter().all(|e| e["reset"] == true), "{v}");
    assert!(!v.to_string().contains("127.0.0.1"), "{v}");
    assert_eq!(indexed(&t.engines().await), vec![0, 0]);
}
