//! The extra OpenAI fields through a real in-process engine: shapes, determinism, streaming
//! equal to non-streaming, and a P/D decode leg equal to a colocated answer.

use serde_json::{json, Value};

use crate::profile::GpuKind;
use crate::{start, RunningSim, SimConfig};

struct Engine {
    _running: RunningSim,
    url: String,
    client: reqwest::Client,
}

async fn engine(seed: u64) -> Engine {
    let mut cfg = SimConfig::new("qwen3-0.6b", GpuKind::H100);
    cfg.time_scale = 200.0;
    cfg.seed = seed;
    cfg.hash_seed = Some(format!("h{seed}"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let running = start(cfg, listener, std::future::pending()).await.unwrap();
    Engine {
        url: format!("http://{}", running.http_addr),
        _running: running,
        client: reqwest::Client::new(),
    }
}

impl Engine {
    async fn post(&self, path: &str, body: &Value) -> (u16, String) {
        let r = self
            .client
            .post(format!("{}{path}", self.url))
            .header("x-request-id", "t-1")
            .json(body)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    async fn json(&self, path: &str, body: &Value) -> Value {
        let (status, text) = self.post(path, body).await;
        assert_eq!(status, 200, "{text}");
        serde_json::from_str(&text).unwrap()
    }

    /// The `data:` events of a streamed answer, without `[DONE]`.
    async fn events(&self, path: &str, body: &Value) -> Vec<Value> {
        let (status, text) = self.post(path, body).await;
        assert_eq!(status, 200, "{text}");
        assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
        text.split("\n\n")
            .filter_map(|f| f.strip_prefix("data: "))
            .filter(|d| *d != "[DONE]")
            .map(|d| serde_json::from_str(d).unwrap())
            .collect()
    }

    async fn error(&self, path: &str, body: &Value) -> String {
        let (status, text) = self.post(path, body).await;
        assert_eq!(status, 400, "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        v["error"]["message"].as_str().unwrap().to_string()
    }

    async fn count_tokens(&self, text: &str) -> usize {
        let v = self
            .json(
                "/tokenize",
                &json!({"prompt": text, "add_special_tokens": false}),
            )
            .await;
        v["count"].as_u64().unwrap() as usize
    }
}

const CMPL: &str = "/v1/completions";
const CHAT: &str = "/v1/chat/completions";

fn chat_body(extra: Value) -> Value {
    let mut b = json!({"messages": [{"role": "user", "content": "What is the weather in Paris?"}],
                       "max_tokens": 12});
    b.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    b
}

fn cmpl_body(extra: Value) -> Value {
    let mut b = json!({"prompt": "The quick brown fox", "max_tokens": 10, "ignore_eos": true});
    b.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    b
}

fn streamed(mut b: Value) -> Value {
    b["stream"] = json!(true);
    b["stream_options"] = json!({"include_usage": true});
    b
}

/// The prefill leg as vLLM's reference proxy sends it.
fn prefill(b: &Value) -> Value {
    let mut p = b.clone();
    p["kv_transfer_params"] = json!({"do_remote_decode": true, "do_remote_prefill": false});
    p["stream"] = json!(false);
    p["max_tokens"] = json!(1);
    p.as_object_mut().unwrap().remove("stream_options");
    p
}

#[tokio::test]
async fn completion_logprobs_shape_and_determinism() {
    let e = engine(1).await;
    let v = e.json(CMPL, &cmpl_body(json!({"logprobs": 3}))).await;
    let lp = &v["choices"][0]["logprobs"];
    let n = v["usage"]["completion_tokens"].as_u64().unwrap() as usize;
    assert_eq!(n, 10);
    for k in ["text_offset", "token_logprobs", "tokens", "top_logprobs"] {
        assert_eq!(lp[k].as_array().unwrap().len(), n, "{k}");
    }
    let tokens: String = lp["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(tokens, v["choices"][0]["text"].as_str().unwrap());
    for j in 0..n {
        let lpj = lp["token_logprobs"][j].as_f64().unwrap();
        let top = lp["top_logprobs"][j].as_object().unwrap();
        assert!(!top.is_empty() && top.len() <= 3, "{top:?}");
        let best = top
            .values()
            .map(|x| x.as_f64().unwrap())
            .fold(f64::MIN, f64::max);
        assert_eq!(top[lp["tokens"][j].as_str().unwrap()], lpj);
        assert_eq!(best, lpj, "the sampled token is the most likely");
        assert!(top.values().all(|x| x.as_f64().unwrap() <= 0.0));
        let mass: f64 = top.values().map(|x| x.as_f64().unwrap().exp()).sum();
        assert!(mass <= 1.0);
    }
    assert_eq!(v["choices"][0]["prompt_logprobs"], Value::Null);
    let again = e.json(CMPL, &cmpl_body(json!({"logprobs": 3}))).await;
    assert_eq!(again["choices"], v["choices"], "deterministic");
    // Without logprobs the text is the same: logprobs never change what is sampled.
    let plain = e.json(CMPL, &cmpl_body(json!({}))).await;
    assert_eq!(plain["choices"][0]["text"], v["choices"][0]["text"]);
    assert_eq!(plain["choices"][0]["logprobs"], Value::Null);

    assert_eq!(
        e.error(CMPL, &cmpl_body(json!({"logprobs": 21}))).await,
        "Requested sample logprobs of 21, which is greater than max allowed: 20"
    );
    assert_eq!(
        e.error(CMPL, &cmpl_body(json!({"logprobs": -2}))).await,
        "`logprobs` must be a positive value or -1."
    );
    let zero = e.json(CMPL, &cmpl_body(json!({"logprobs": 0}))).await;
    assert_eq!(
        zero["choices"][0]["logprobs"]["top_logprobs"][0]
            .as_object()
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test]
async fn streamed_logprobs_equal_the_whole_answers() {
    let e = engine(2).await;
    let body = cmpl_body(json!({"logprobs": 2, "echo": true}));
    let whole = e.json(CMPL, &body).await;
    let events = e.events(CMPL, &streamed(body)).await;
    let mut text = String::new();
    let mut lp = json!({"text_offset": [], "token_logprobs": [], "tokens": [], "top_logprobs": []});
    for ev in &events {
        for c in ev["choices"].as_array().unwrap() {
            text.push_str(c["text"].as_str().unwrap());
            for k in ["text_offset", "token_logprobs", "tokens", "top_logprobs"] {
                let add = c["logprobs"][k].as_array().unwrap().clone();
                lp[k].as_array_mut().unwrap().extend(add);
            }
        }
    }
    assert_eq!(text, whole["choices"][0]["text"].as_str().unwrap());
    assert_eq!(lp, whole["choices"][0]["logprobs"]);

    let body = chat_body(json!({"logprobs": true, "top_logprobs": 4}));
    let whole = e.json(CHAT, &body).await;
    let events = e.events(CHAT, &streamed(body)).await;
    let content: Vec<Value> = events
        .iter()
        .flat_map(|ev| ev["choices"].as_array().unwrap().clone())
        .filter(|c| !c["logprobs"].is_null())
        .flat_map(|c| c["logprobs"]["content"].as_array().unwrap().clone())
        .collect();
    assert_eq!(json!(content), whole["choices"][0]["logprobs"]["content"]);
}

#[tokio::test]
async fn chat_logprobs_shape_and_validation() {
    let e = engine(3).await;
    let v = e
        .json(
            CHAT,
            &chat_body(json!({"logprobs": true, "top_logprobs": 5})),
        )
        .await;
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len() as u64, v["usage"]["completion_tokens"]);
    let text: String = content
        .iter()
        .map(|c| c["token"].as_str().unwrap())
        .collect();
    assert_eq!(
        text,
        v["choices"][0]["message"]["content"].as_str().unwrap()
    );
    for c in content {
        let top = c["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 5);
        assert_eq!(top[0]["token"], c["token"]);
        assert_eq!(top[0]["logprob"], c["logprob"]);
        assert_eq!(
            c["bytes"],
            json!(c["token"].as_str().unwrap().as_bytes()),
            "bytes are the token's UTF-8"
        );
        let lps: Vec<f64> = top.iter().map(|t| t["logprob"].as_f64().unwrap()).collect();
        assert!(lps.windows(2).all(|w| w[0] > w[1]), "{lps:?}");
    }
    let only = e.json(CHAT, &chat_body(json!({"logprobs": true}))).await;
    assert_eq!(
        only["choices"][0]["logprobs"]["content"][0]["top_logprobs"],
        json!([])
    );
    assert_eq!(
        e.error(CHAT, &chat_body(json!({"top_logprobs": 2}))).await,
        "when using `top_logprobs`, `logprobs` must be set to true."
    );
}

#[tokio::test]
async fn prompt_logprobs_and_echo() {
    let e = engine(4).await;
    let v = e
        .json(CMPL, &cmpl_body(json!({"prompt_logprobs": 2})))
        .await;
    let prompt_tokens = v["usage"]["prompt_tokens"].as_u64().unwrap() as usize;
    let pl = v["choices"][0]["prompt_logprobs"].as_array().unwrap();
    assert_eq!(pl.len(), prompt_tokens);
    assert_eq!(pl[0], Value::Null);
    for d in &pl[1..] {
        let d = d.as_object().unwrap();
        assert!((2..=3).contains(&d.len()), "{d:?}");
        for x in d.values() {
            assert!(x["logprob"].as_f64().unwrap() <= 0.0);
            assert!(x["rank"].as_u64().unwrap() >= 1);
            assert!(x["decoded_token"].is_string());
        }
    }
    assert_eq!(
        e.error(CMPL, &streamed(cmpl_body(json!({"prompt_logprobs": 1}))))
            .await,
        "`prompt_logprobs` are not available when `stream=True`."
    );
    let chat = e
        .json(CHAT, &chat_body(json!({"prompt_logprobs": 0})))
        .await;
    assert_eq!(chat["prompt_logprobs"][0], Value::Null);
    assert!(chat["prompt_logprobs"][1].is_object());

    // echo: the prompt, then the output; with logprobs, the prompt tokens' first.
    let plain = e.json(CMPL, &cmpl_body(json!({}))).await;
    let echo = e
        .json(CMPL, &cmpl_body(json!({"echo": true, "logprobs": 1})))
        .await;
    let c = &echo["choices"][0];
    assert_eq!(
        c["text"].as_str().unwrap(),
        format!(
            "The quick brown fox{}",
            plain["choices"][0]["text"].as_str().unwrap()
        )
    );
    let lp = &c["logprobs"];
    assert_eq!(
        lp["tokens"].as_array().unwrap().len(),
        prompt_tokens + 10,
        "prompt tokens (BOS included) then output tokens"
    );
    assert_eq!(lp["token_logprobs"][0], Value::Null);
    assert_eq!(lp["top_logprobs"][0], Value::Null);
    assert!(lp["token_logprobs"][1].is_f64());
    assert_eq!(
        c["prompt_logprobs"].as_array().unwrap().len(),
        prompt_tokens
    );
    assert_eq!(echo["usage"]["completion_tokens"], 10);

    assert_eq!(
        e.error(CMPL, &cmpl_body(json!({"suffix": "!"}))).await,
        "suffix is not currently supported"
    );
}

#[tokio::test]
async fn json_output_is_valid_and_counted() {
    let e = engine(5).await;
    let schema = json!({"type": "object", "properties": {
        "city": {"type": "string"}, "temp": {"type": "integer", "minimum": -30, "maximum": 45},
        "sunny": {"type": "boolean"}}, "required": ["city", "temp", "sunny"]});
    let bodies = [
        chat_body(json!({"max_tokens": 200, "response_format": {"type": "json_object"}})),
        chat_body(json!({"max_tokens": 200, "response_format":
            {"type": "json_schema", "json_schema": {"name": "w", "schema": schema}}})),
        cmpl_body(json!({"max_tokens": 200, "structured_outputs": {"json": schema}})),
    ];
    for body in bodies {
        let path = if body.get("messages").is_some() {
            CHAT
        } else {
            CMPL
        };
        let v = e.json(path, &body).await;
        let c = &v["choices"][0];
        let text = c["text"]
            .as_str()
            .or(c["message"]["content"].as_str())
            .unwrap()
            .to_string();
        let parsed: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("{text}"));
        assert!(parsed.is_object(), "{text}");
        if body.to_string().contains("sunny") {
            assert!(
                parsed["city"].is_string()
                    && parsed["temp"].is_i64()
                    && parsed["sunny"].is_boolean()
            );
        }
        assert_eq!(c["finish_reason"], "stop");
        assert_eq!(
            v["usage"]["completion_tokens"].as_u64().unwrap() as usize,
            e.count_tokens(&text).await
        );
        // Streamed: the same text.
        let events = e.events(path, &streamed(body.clone())).await;
        let streamed_text: String = events
            .iter()
            .filter_map(|ev| ev["choices"].get(0).cloned())
            .filter_map(|c| {
                c["text"]
                    .as_str()
                    .or(c["delta"]["content"].as_str())
                    .map(str::to_string)
            })
            .collect();
        assert_eq!(streamed_text, text);
        // Cut by max_tokens: a prefix, "length".
        let mut short = body.clone();
        short["max_tokens"] = json!(3);
        let cut = e.json(path, &short).await;
        let cc = &cut["choices"][0];
        let cut_text = cc["text"]
            .as_str()
            .or(cc["message"]["content"].as_str())
            .unwrap();
        assert!(text.starts_with(cut_text) && cut_text.len() < text.len());
        assert_eq!(cc["finish_reason"], "length");
        assert_eq!(cut["usage"]["completion_tokens"], 3);
    }
    let choice = e
        .json(
            CMPL,
            &cmpl_body(json!({"structured_outputs": {"choice": ["yes", "no"]}})),
        )
        .await;
    let t = choice["choices"][0]["text"].as_str().unwrap();
    assert!(t == "yes" || t == "no", "{t}");
}

fn tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather", "description": "Weather",
         "parameters": {"type": "object", "properties": {
            "city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"]}}},
        {"type": "function", "function": {"name": "get_time",
         "parameters": {"type": "object", "properties": {"zone": {"type": "string"}},
                        "required": ["zone"]}}},
    ])
}

#[tokio::test]
async fn tool_calls_shapes_and_streaming() {
    let e = engine(6).await;
    for (choice, name, finish, content) in [
        (Value::Null, "get_weather", "tool_calls", Value::Null),
        (json!("auto"), "get_weather", "tool_calls", Value::Null),
        (json!("required"), "get_weather", "tool_calls", json!("")),
        (
            json!({"type": "function", "function": {"name": "get_time"}}),
            "get_time",
            "stop",
            json!(""),
        ),
    ] {
        let mut extra = json!({"tools": tools(), "max_tokens": 100});
        if !choice.is_null() {
            extra["tool_choice"] = choice.clone();
        }
        let body = chat_body(extra);
        let v = e.json(CHAT, &body).await;
        let c = &v["choices"][0];
        assert_eq!(c["finish_reason"], finish, "{choice}");
        assert_eq!(c["message"]["content"], content);
        let calls = c["message"]["tool_calls"].as_array().unwrap();
        assert_eq!(calls.len(), 1);
        let call = &calls[0];
        let id = call["id"].as_str().unwrap();
        assert!(id.starts_with("chatcmpl-tool-"), "{id}");
        assert_eq!(call["type"], "function");
        assert_eq!(call["function"]["name"], name);
        let args = call["function"]["arguments"].as_str().unwrap();
        let parsed: Value = serde_json::from_str(args).unwrap();
        if name == "get_weather" {
            assert!(parsed["city"].is_string());
            assert!(["celsius", "fahrenheit"].contains(&parsed["unit"].as_str().unwrap()));
        } else {
            assert!(parsed["zone"].is_string());
        }
        assert_eq!(
            v["usage"]["completion_tokens"].as_u64().unwrap() as usize,
            e.count_tokens(args).await
        );
        // Streamed: the role chunk, then the call's head with the first fragment, then
        // fragments; together the same arguments; the same finish.
        let events = e.events(CHAT, &streamed(body)).await;
        assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
        let deltas: Vec<&Value> = events[1..]
            .iter()
            .filter_map(|ev| ev["choices"].get(0))
            .collect();
        let head = &deltas[0]["delta"]["tool_calls"][0];
        assert_eq!(head["id"], id);
        assert_eq!(head["type"], "function");
        assert_eq!(head["function"]["name"], name);
        assert!(deltas[1..]
            .iter()
            .all(|d| d["delta"]["tool_calls"][0].get("id").is_none()));
        let joined: String = deltas
            .iter()
            .map(|d| {
                d["delta"]["tool_calls"][0]["function"]["arguments"]
                    .as_str()
                    .unwrap()
            })
            .collect();
        assert_eq!(joined, args);
        assert_eq!(deltas.last().unwrap()["finish_reason"], finish);
    }
    let none = e
        .json(
            CHAT,
            &chat_body(json!({"tools": tools(), "tool_choice": "none"})),
        )
        .await;
    assert_eq!(none["choices"][0]["message"]["tool_calls"], json!([]));
    assert!(none["choices"][0]["message"]["content"].is_string());
    let msg = e
        .error(
            CHAT,
            &chat_body(json!({"tools": tools(),
            "tool_choice": {"type": "function", "function": {"name": "nope"}}})),
        )
        .await;
    assert!(
        msg.contains("does not match any of the specified `tools`"),
        "{msg}"
    );
}

/// A decode leg (KV pulled from a prefill engine) answers every field as a colocated engine.
#[tokio::test]
async fn disaggregated_answers_equal_colocated_for_every_field() {
    let (p, d, c) = tokio::join!(engine(9), engine(9), engine(9));
    let cases = [
        (CMPL, cmpl_body(json!({"logprobs": 3, "echo": true}))),
        (
            CMPL,
            cmpl_body(json!({"prompt_logprobs": 2, "logprobs": 1})),
        ),
        (
            CHAT,
            chat_body(
                json!({"logprobs": true, "top_logprobs": 2, "max_tokens": 100,
                             "response_format": {"type": "json_object"}}),
            ),
        ),
        (
            CHAT,
            chat_body(json!({"tools": tools(), "tool_choice": "required", "max_tokens": 100})),
        ),
    ];
    for (path, body) in cases {
        let want = c.json(path, &body).await;
        let pr = p.json(path, &prefill(&body)).await;
        assert_eq!(pr["choices"][0]["finish_reason"], "length", "{pr}");
        let kv = pr["kv_transfer_params"].clone();
        assert_eq!(kv["do_remote_prefill"], true);
        let mut leg = body.clone();
        leg["kv_transfer_params"] = kv;
        let got = d.json(path, &leg).await;
        assert_eq!(got["choices"], want["choices"], "{path} {body}");
        assert_eq!(got["usage"], want["usage"]);
        assert_eq!(got["prompt_logprobs"], want["prompt_logprobs"]);
    }
}

/// With the real Qwen3 tokenizer (`$TANDEM_QWEN_TOKENIZER`): a client that re-tokenizes the
/// output text counts what `usage` says, for sampled text and for JSON output alike.
#[tokio::test]
async fn real_tokenizer_output_re_tokenizes_to_its_usage() {
    let Some(path) = std::env::var_os("TANDEM_QWEN_TOKENIZER") else {
        eprintln!("skipped: set TANDEM_QWEN_TOKENIZER to a Qwen3 tokenizer.json to run");
        return;
    };
    let mut cfg = SimConfig::new("qwen3-0.6b", GpuKind::H100);
    cfg.time_scale = 200.0;
    cfg.tokenizer = Some(path.into());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let running = start(cfg, listener, std::future::pending()).await.unwrap();
    let e = Engine {
        url: format!("http://{}", running.http_addr),
        _running: running,
        client: reqwest::Client::new(),
    };
    for body in [
        cmpl_body(json!({"max_tokens": 64})),
        cmpl_body(json!({"max_tokens": 200, "response_format": {"type": "json_object"}})),
    ] {
        let v = e.json(CMPL, &body).await;
        let text = v["choices"][0]["text"].as_str().unwrap();
        assert_eq!(
            e.count_tokens(text).await as u64,
            v["usage"]["completion_tokens"].as_u64().unwrap(),
            "{text:?}"
        );
    }
}
