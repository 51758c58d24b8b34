//! Starting `tandem sim` processes and talking to them.

use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A running `tandem sim` child process, killed on drop.
pub struct Sim {
    _child: Child,
    pub url: String,
    pub ready: Value,
    pub client: reqwest::Client,
}

impl Sim {
    /// Start `tandem sim --port 0` with a small, fast profile plus `extra` flags.
    pub async fn start(extra: &[&str]) -> Sim {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tandem"));
        cmd.args([
            "sim",
            "--port",
            "0",
            "--model",
            "qwen3-0.6b",
            "--time-scale",
            "50",
        ])
        .args(extra)
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
        let mut child = cmd.spawn().expect("spawn tandem sim");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await
            .expect("ready line within 60 s")
            .expect("read stdout")
            .expect("a ready line before exit");
        let ready: Value = serde_json::from_str(&line).expect("ready line is JSON");
        assert_eq!(ready["ready"], "tandem-sim");
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let url = ready["http"].as_str().expect("http address").to_string();
        Sim {
            _child: child,
            url,
            ready,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .expect("client"),
        }
    }

    pub async fn post(
        &self,
        path: &str,
        body: &Value,
        request_id: Option<&str>,
    ) -> reqwest::Response {
        let mut req = self.client.post(format!("{}{path}", self.url)).json(body);
        if let Some(id) = request_id {
            req = req.header("X-Request-Id", id);
        }
        req.send().await.expect("request sent")
    }

    pub async fn post_json(
        &self,
        path: &str,
        body: &Value,
        request_id: Option<&str>,
    ) -> (u16, Value) {
        let resp = self.post(path, body, request_id).await;
        let status = resp.status().as_u16();
        let v = resp.json().await.expect("JSON body");
        (status, v)
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .expect("request sent")
    }

    pub async fn faults(&self, spec: Value) {
        let (status, _) = self.post_json("/admin/faults", &spec, None).await;
        assert_eq!(status, 200);
    }

    pub async fn metrics(&self) -> String {
        self.get("/metrics")
            .await
            .text()
            .await
            .expect("metrics text")
    }

    /// Sum of the samples of `name` whose label set contains every `labels` pair.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_in(&self.metrics().await, name, labels)
    }

    /// Poll `name` until `done(value)` holds, at most 200 times 25 ms apart (for effects that a
    /// sim's own timers or background tasks produce); returns the last value seen.
    pub async fn wait_metric(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        done: impl Fn(f64) -> bool,
    ) -> f64 {
        let mut v = self.metric(name, labels).await;
        for _ in 0..200 {
            if done(v) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
            v = self.metric(name, labels).await;
        }
        v
    }

    /// POST a completion body and return (status, JSON).
    pub async fn complete(&self, body: &Value) -> (u16, Value) {
        self.post_json("/v1/completions", body, None).await
    }

    pub async fn tokens(&self, prompt: &str) -> Vec<u32> {
        let (status, v) = self
            .post_json("/tokenize", &json!({"prompt": prompt}), None)
            .await;
        assert_eq!(status, 200);
        serde_json::from_value(v["tokens"].clone()).expect("token ids")
    }
}

pub fn metric_in(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Parsed SSE: the JSON of each `data:` event, and whether `[DONE]` ended the stream.
pub struct Sse {
    pub events: Vec<Value>,
    pub done: bool,
    /// The body ended in a transport error (connection cut).
    pub cut: bool,
}

impl Sse {
    pub fn text(&self) -> String {
        self.events
            .iter()
            .filter_map(|e| e["choices"].as_array())
            .flatten()
            .filter_map(|c| c["text"].as_str().or(c["delta"]["content"].as_str()))
            .collect()
    }
}

pub async fn read_sse(resp: reqwest::Response) -> Sse {
    use futures::StreamExt;
    let mut body = Vec::new();
    let mut stream = resp.bytes_stream();
    let mut cut = false;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(b) => body.extend_from_slice(&b),
            Err(_) => {
                cut = true;
                break;
            }
        }
    }
    let text = String::from_utf8(body).expect("utf-8 body");
    let mut events = Vec::new();
    let mut done = false;
    for frame in text.split("\n\n").filter(|f| !f.is_empty()) {
        let data = frame
            .strip_prefix("data: ")
            .expect("every frame is `data: ...`");
        if data == "[DONE]" {
            done = true;
        } else {
            events.push(serde_json::from_str(data).expect("event is JSON"));
        }
    }
    Sse { events, done, cut }
}

/// The body vLLM's reference proxy sends to the prefill leg (vllm-pd-protocol.md §1.2).
pub fn prefill_leg(client_body: &Value) -> Value {
    let mut b = client_body.clone();
    b["kv_transfer_params"] = json!({
        "do_remote_decode": true, "do_remote_prefill": false, "remote_engine_id": null,
        "remote_block_ids": null, "remote_host": null, "remote_port": null,
    });
    b["stream"] = json!(false);
    b["max_tokens"] = json!(1);
    let o = b.as_object_mut().expect("object body");
    if o.contains_key("max_completion_tokens") {
        o.insert("max_completion_tokens".into(), json!(1));
    }
    o.remove("stream_options");
    o.remove("min_tokens");
    b
}

/// The decode leg: the original body plus P's params, unchanged (§1.4).
pub fn decode_leg(client_body: &Value, kv: &Value) -> Value {
    let mut b = client_body.clone();
    if !kv.is_null() {
        b["kv_transfer_params"] = kv.clone();
    }
    b
}

pub const PROMPT: &str = "Disaggregated serving splits prefill and decode across engines so that each phase runs where it is cheapest.";
