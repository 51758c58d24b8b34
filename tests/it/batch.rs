//! A `/v1/completions` prompt list through `tandem serve`: every prompt disaggregated on its own,
//! the answers merged into the response a colocated engine gives for the same list.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::support::{read_sse, Sim, Tandem, PROMPT};

const OTHER: &str = "A second prompt, shorter, about the decode pool.";

async fn cluster() -> (Sim, Sim, Sim, Tandem) {
    let (p, d, c) = tokio::join!(
        Sim::start(&["--seed", "3", "--hash-seed", "p"]),
        Sim::start(&["--seed", "3", "--hash-seed", "d"]),
        Sim::start(&["--seed", "3", "--hash-seed", "c"]),
    );
    let conf = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n\
         [pools.prefill]\nendpoints = [{:?}]\n\n\
         [pools.decode]\nendpoints = [{:?}]\n\n\
         [disaggregation]\nmode = \"always\"\n\n\
         [health]\ninterval_ms = 100\n",
        p.url, d.url
    );
    let t = Tandem::start(&conf).await;
    (p, d, c, t)
}

/// (index, text, finish_reason) of each choice, by index.
fn choices(v: &Value) -> Vec<(u64, String, Value)> {
    let mut out: Vec<_> = v["choices"]
        .as_array()
        .expect("choices")
        .iter()
        .map(|c| {
            (
                c["index"].as_u64().expect("index"),
                c["text"].as_str().expect("text").to_string(),
                c["finish_reason"].clone(),
            )
        })
        .collect();
    out.sort_by_key(|c| c.0);
    out
}

async fn assert_disaggregated(t: &Tandem, request_id: &str, prompts: usize) {
    for i in 0..prompts {
        let r = t.record(&format!("{request_id}-{i}")).await;
        assert_eq!(r["route"], "disaggregated", "{r}");
        assert_eq!(r["outcome"], "ok", "{r}");
    }
}

#[tokio::test]
async fn a_prompt_list_is_disaggregated_and_equals_a_colocated_answer() {
    let (_p, _d, c, t) = cluster().await;
    // Two choices per prompt, so the list's numbering (prompt-major) is exercised too.
    let body = json!({"prompt": [PROMPT, OTHER], "max_tokens": 12, "ignore_eos": true,
                      "n": 2, "seed": 11});
    let (status, want) = c.post_json("/v1/completions", &body, Some("colo")).await;
    assert_eq!(status, 200, "{want}");
    let (status, got) = t.post_json("/v1/completions", &body, Some("list")).await;
    assert_eq!(status, 200, "{got}");
    assert_eq!(choices(&got), choices(&want));
    assert_eq!(choices(&got).len(), 4);
    assert_eq!(got["object"], "text_completion");
    assert_eq!(got["id"], "cmpl-list");
    for k in ["prompt_tokens", "completion_tokens", "total_tokens"] {
        assert_eq!(got["usage"][k], want["usage"][k], "usage.{k}");
    }
    assert_disaggregated(&t, "list", 2).await;
}

#[tokio::test]
async fn a_streamed_prompt_list_interleaves_under_one_id_with_one_usage_chunk() {
    let (_p, _d, c, t) = cluster().await;
    let body = json!({"prompt": [PROMPT, OTHER, "Three."], "max_tokens": 10,
                      "ignore_eos": true, "seed": 5, "stream": true,
                      "stream_options": {"include_usage": true}});
    let want = read_sse(c.post("/v1/completions", &body, Some("colo-s")).await).await;
    let got = read_sse(t.post("/v1/completions", &body, Some("list-s")).await).await;
    assert!(want.done && got.done && !got.cut);
    let texts = |events: &[Value]| {
        let mut by: BTreeMap<u64, String> = BTreeMap::new();
        for e in events {
            for ch in e["choices"].as_array().into_iter().flatten() {
                let i = ch["index"].as_u64().expect("index");
                by.entry(i)
                    .or_default()
                    .push_str(ch["text"].as_str().unwrap_or(""));
            }
        }
        by
    };
    assert_eq!(texts(&got.events), texts(&want.events));
    assert_eq!(texts(&got.events).len(), 3);
    assert!(got.events.iter().all(|e| e["id"] == "cmpl-list-s"));
    let usage: Vec<&Value> = got
        .events
        .iter()
        .filter(|e| e["usage"].is_object())
        .map(|e| &e["usage"])
        .collect();
    assert_eq!(usage.len(), 1, "one closing usage chunk: {usage:?}");
    let want_usage = &want.events.last().expect("a usage chunk")["usage"];
    for k in ["prompt_tokens", "completion_tokens", "total_tokens"] {
        assert_eq!(usage[0][k], want_usage[k], "usage.{k}");
    }
    assert_disaggregated(&t, "list-s", 3).await;
}

#[tokio::test]
async fn a_bad_prompt_in_the_list_fails_the_whole_request_before_any_engine_work() {
    let (p, _d, _c, t) = cluster().await;
    let body = json!({"prompt": [PROMPT, 5.5], "max_tokens": 4});
    let (status, err) = t.post_json("/v1/completions", &body, Some("bad")).await;
    assert_eq!(status, 400, "{err}");
    // vLLM's request model takes strings or id lists, not both.
    let mixed = json!({"prompt": [PROMPT, [1, 2, 3]], "max_tokens": 4});
    let (status, err) = t.post_json("/v1/completions", &mixed, Some("mixed")).await;
    assert_eq!(status, 400, "{err}");
    assert!(
        p.metric("vllm:request_success_total", &[]).await == 0.0,
        "no prefill ran"
    );
}
