//! Starting `tandem sim` processes and talking to them.

use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// An HTTP server under test: its base URL and a client with a generous timeout.
pub struct Peer {
    pub url: String,
    pub client: reqwest::Client,
}

/// Spawn `cmd` (stdout piped), read its JSON ready line, check its `ready` field, and keep
/// draining stdout so the child never blocks on a full pipe.
async fn spawn_ready(mut cmd: Command, expect: &str) -> (Child, Value, Peer) {
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    let mut child = cmd.spawn().expect("spawn tandem");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await
        .expect("ready line within 60 s")
        .expect("read stdout")
        .expect("a ready line before exit");
    let ready: Value = serde_json::from_str(&line).expect("ready line is JSON");
    assert_eq!(ready["ready"], expect);
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let url = ready["http"].as_str().expect("http address").to_string();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("client");
    (child, ready, Peer { url, client })
}

/// A running `tandem sim` child process, killed on drop.
pub struct Sim {
    _child: Child,
    pub ready: Value,
    peer: Peer,
}

impl std::ops::Deref for Sim {
    type Target = Peer;
    fn deref(&self) -> &Peer {
        &self.peer
    }
}

impl Sim {
    /// Start `tandem sim --port 0` with a small, fast profile plus `extra` flags.
    pub async fn start(extra: &[&str]) -> Sim {
        let mut args = vec!["--model", "qwen3-0.6b", "--time-scale", "50"];
        args.extend_from_slice(extra);
        Sim::spawn(&args).await
    }

    /// Start `tandem sim --port 0` with exactly `args` (the simulator's own defaults otherwise:
    /// Llama-3.1-8B on an H100, real time).
    pub async fn spawn(args: &[&str]) -> Sim {
        Sim::spawn_on(0, args).await
    }

    /// [`Sim::spawn`] on a chosen port (0: any), e.g. to restart a killed engine where its
    /// coordinator expects it.
    pub async fn spawn_on(port: u16, args: &[&str]) -> Sim {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tandem"));
        cmd.args(["sim", "--port", &port.to_string()])
            .args(args)
            // `TANDEM_TEST_SIM_LOG=warn` shows the sims' warnings when a test needs them.
            .env(
                "RUST_LOG",
                std::env::var("TANDEM_TEST_SIM_LOG").unwrap_or_else(|_| "error".into()),
            );
        let (child, ready, peer) = spawn_ready(cmd, "tandem-sim").await;
        Sim {
            _child: child,
            ready,
            peer,
        }
    }

    /// SIGKILL the process and wait for it to exit; returns its HTTP port.
    pub async fn kill(&mut self) -> u16 {
        self._child.start_kill().expect("kill the sim");
        let _ = self._child.wait().await;
        self.url
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("the sim's URL ends with its port")
    }

    pub async fn faults(&self, spec: Value) {
        let (status, _) = self.post_json("/admin/faults", &spec, None).await;
        assert_eq!(status, 200);
    }

    /// POST a completion body and return (status, JSON).
    pub async fn complete(&self, body: &Value) -> (u16, Value) {
        self.post_json("/v1/completions", body, None).await
    }
}

impl Peer {
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
        choice_text(&self.events)
    }
}

/// Events that carry generated text: the content chunks a client counts (and Tandem's ITL has
/// one observation per gap between).
pub fn content_chunks(events: &[Value]) -> u64 {
    events
        .iter()
        .filter(|e| {
            let c = &e["choices"][0];
            c["text"]
                .as_str()
                .or(c["delta"]["content"].as_str())
                .is_some_and(|t| !t.is_empty())
        })
        .count() as u64
}

/// The generated text of completion or chat chunks, in order.
pub fn choice_text(events: &[Value]) -> String {
    events
        .iter()
        .filter_map(|e| e["choices"].as_array())
        .flatten()
        .filter_map(|c| c["text"].as_str().or(c["delta"]["content"].as_str()))
        .collect()
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

/// A running `tandem serve` child process, killed on drop; its config file is removed on drop.
pub struct Tandem {
    _child: Child,
    config: std::path::PathBuf,
    peer: Peer,
    /// Its ready line (`http`, and `admin` when `server.admin_listen` is set).
    pub ready: Value,
}

impl std::ops::Deref for Tandem {
    type Target = Peer;
    fn deref(&self) -> &Peer {
        &self.peer
    }
}

impl Drop for Tandem {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.config);
    }
}

/// A fresh path under the system temp directory, unique within and across test processes.
fn temp_config_path() -> std::path::PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    std::env::temp_dir().join(format!(
        "tandem-it-{}-{}-{nanos}.toml",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

/// A fresh, empty directory under the system temp directory, unique within and across test
/// processes; the caller removes it.
pub fn temp_dir(tag: &str) -> std::path::PathBuf {
    let p = temp_config_path().with_extension(tag);
    std::fs::create_dir_all(&p).expect("create a temp dir");
    p
}

impl Tandem {
    /// Start `tandem serve` with `config` (TOML) and wait until `GET /ready` answers 200.
    pub async fn start(config: &str) -> Tandem {
        let t = Tandem::spawn(config).await;
        let mut last = t.ready().await;
        for _ in 0..400 {
            if last.0 == 200 {
                return t;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
            last = t.ready().await;
        }
        panic!("tandem not ready after 10 s: {} {}", last.0, last.1);
    }

    /// Start `tandem serve` and return once it listens (its engines may not be probed yet).
    pub async fn spawn(config: &str) -> Tandem {
        let path = temp_config_path();
        std::fs::write(&path, config).expect("write the tandem config");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tandem"));
        cmd.arg("serve").arg("--config").arg(&path).env(
            "RUST_LOG",
            std::env::var("TANDEM_IT_LOG").unwrap_or_else(|_| "error".into()),
        );
        let (child, ready, peer) = spawn_ready(cmd, "tandem").await;
        Tandem {
            _child: child,
            config: path,
            peer,
            ready,
        }
    }

    /// The admin listener (`server.admin_listen`) as a peer.
    pub fn admin(&self) -> Peer {
        Peer {
            url: self.ready["admin"]
                .as_str()
                .expect("an admin address on the ready line")
                .to_string(),
            client: self.peer.client.clone(),
        }
    }

    /// The process id (while it runs).
    pub fn pid(&self) -> Option<u32> {
        self._child.id()
    }

    /// Send SIGTERM, as Kubernetes does to stop a pod.
    pub fn terminate(&self) {
        let pid = self._child.id().expect("still running");
        let ok = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill -TERM {pid}");
    }

    /// Wait for the process to exit, at most `limit`.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        tokio::time::timeout(limit, self._child.wait())
            .await
            .ok()
            .and_then(Result::ok)
    }

    /// `GET /ready`: (status, body).
    pub async fn ready(&self) -> (u16, Value) {
        let resp = self.get("/ready").await;
        let status = resp.status().as_u16();
        (status, resp.json().await.expect("/ready answers JSON"))
    }

    /// `GET /admin/engines`.
    pub async fn engines(&self) -> Value {
        self.get("/admin/engines")
            .await
            .json()
            .await
            .expect("/admin/engines answers JSON")
    }

    /// Poll `/admin/engines` (at most 200 times 25 ms apart) until every engine of `pool`
    /// satisfies `done`; returns whether they did.
    pub async fn wait_engines(&self, pool: &str, done: impl Fn(&Value) -> bool) -> bool {
        for _ in 0..200 {
            let e = self.engines().await;
            let all = e["engines"]
                .as_array()
                .expect("engines")
                .iter()
                .filter(|e| e["pool"] == pool)
                .all(&done);
            if all {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        false
    }

    /// `GET /admin/requests`.
    pub async fn records(&self) -> Vec<Value> {
        let v: Value = self
            .get("/admin/requests")
            .await
            .json()
            .await
            .expect("/admin/requests answers JSON");
        v.as_array().expect("a JSON array").clone()
    }

    /// The record of `request_id`, polled for (at most 200 times 25 ms apart): a request is
    /// recorded when its response or its stream ends, which may trail the client's last read.
    pub async fn record(&self, request_id: &str) -> Value {
        for _ in 0..200 {
            if let Some(r) = self
                .records()
                .await
                .into_iter()
                .find(|r| r["request_id"] == request_id)
            {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("no record of request {request_id} in /admin/requests");
    }
}

/// What `sims` and `tandem` still hold: each sim's KV usage and running or waiting requests,
/// Tandem's per-engine in-flight counts and KV reservations (empty when nothing is).
/// `tandem`: the coordinator, or its admin listener (`Tandem::admin`).
pub async fn held_by<'a>(sims: impl Iterator<Item = &'a Sim>, tandem: &Peer) -> Vec<String> {
    let mut held = Vec::new();
    for (i, s) in sims.enumerate() {
        let m = s.metrics().await;
        for name in [
            "vllm:kv_cache_usage_perc",
            "vllm:num_requests_running",
            "vllm:num_requests_waiting",
        ] {
            let v = metric_in(&m, name, &[]);
            if v != 0.0 {
                held.push(format!("sim {i}: {name} = {v}"));
            }
        }
    }
    let engines: Value = tandem
        .get("/admin/engines")
        .await
        .json()
        .await
        .expect("/admin/engines answers JSON");
    for e in engines["engines"].as_array().expect("engines") {
        for k in ["inflight", "kv_reserved_blocks"] {
            if e[k].as_u64() != Some(0) {
                held.push(format!(
                    "tandem {} engine {}: {k} = {}",
                    e["pool"], e["id"], e[k]
                ));
            }
        }
    }
    held
}

/// Send a POST with a JSON body on a raw TCP connection and return the connection without
/// reading anything: dropping it is a client disconnect at exactly the moment the test chooses.
pub async fn raw_post(
    base_url: &str,
    path: &str,
    body: &Value,
    request_id: &str,
) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let authority = base_url.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(authority)
        .await
        .expect("connect");
    let body = body.to_string();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {authority}\r\nContent-Type: application/json\r\n\
         X-Request-Id: {request_id}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.expect("write head");
    s.write_all(body.as_bytes()).await.expect("write body");
    s
}

/// Read from `s` until the bytes received so far contain `needle` (within 30 s); returns them.
pub async fn read_until(s: &mut tokio::net::TcpStream, needle: &str) -> String {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !String::from_utf8_lossy(&got).contains(needle) {
        let n = tokio::time::timeout_at(deadline, s.read(&mut buf))
            .await
            .expect("expected bytes within 30 s")
            .expect("read");
        assert!(
            n > 0,
            "connection closed before {needle:?}: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// A local port with nothing listening on it (bound, then released).
pub fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("local addr").port()
}

/// A TCP forwarder in front of an engine that closes a connection once nothing has moved on it,
/// in either direction, for `idle`: the way uvicorn (vLLM's HTTP server) closes idle keep-alive
/// connections after `timeout_keep_alive` (5 s by default). It stops accepting when dropped.
pub struct IdleClosingProxy {
    pub url: String,
    /// Connections closed for being idle.
    pub closed_idle: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for IdleClosingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl IdleClosingProxy {
    pub async fn start(upstream_url: &str, idle: Duration) -> IdleClosingProxy {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let upstream = upstream_url.trim_start_matches("http://").to_string();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("local addr"));
        let closed_idle = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let closed = closed_idle.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let upstream = upstream.clone();
                let closed = closed.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let (mut a, mut b) = ([0u8; 8192], [0u8; 8192]);
                    // Reads are cancel-safe; each iteration restarts the idle timer.
                    loop {
                        tokio::select! {
                            r = client.read(&mut a) => match r {
                                Ok(n) if n > 0 => {
                                    if server.write_all(&a[..n]).await.is_err() { return; }
                                }
                                _ => return,
                            },
                            r = server.read(&mut b) => match r {
                                Ok(n) if n > 0 => {
                                    if client.write_all(&b[..n]).await.is_err() { return; }
                                }
                                _ => return,
                            },
                            _ = tokio::time::sleep(idle) => {
                                closed.fetch_add(1, Ordering::SeqCst);
                                return; // dropping both streams closes them
                            }
                        }
                    }
                });
            }
        });
        IdleClosingProxy {
            url,
            closed_idle,
            task,
        }
    }
}
