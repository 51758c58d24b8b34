//! One suite for every engine protocol pairing (issue 14 acceptance): each scenario runs with the
//! prefill and decode pools speaking HTTP or vLLM's native gRPC in all four combinations, through
//! the real `tandem serve` in front of real `tandem sim` engines. The client-facing answer must
//! not depend on the pairing; what the engines saw (KV pulled, blocks freed, aborts) must not
//! either.
//!
//! A scenario is an `async fn(Pair)`; [`every_pair!`] turns it into four `#[tokio::test]`s named
//! `protocols::<scenario>::<pair>`.

use std::time::Duration;

use futures::future::join_all;
use serde_json::{json, Value};

use crate::support::{held_by, metric_in, read_sse, Sim, Sse, Tandem, PROMPT};

mod faults;

/// Simulated seconds a pinned prefill waits for its read: far beyond any test (2,000 s of real
/// time at the sims' ×50), so only a release frees P's blocks and a leak cannot hide behind
/// lease expiry.
const LEASE: &str = "100000";

/// The protocols a prefill pool and a decode pool speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pair {
    Http,
    Grpc,
    GrpcPrefillHttpDecode,
    HttpPrefillGrpcDecode,
}

impl Pair {
    fn prefill_grpc(self) -> bool {
        matches!(self, Pair::Grpc | Pair::GrpcPrefillHttpDecode)
    }

    fn decode_grpc(self) -> bool {
        matches!(self, Pair::Grpc | Pair::HttpPrefillGrpcDecode)
    }
}

/// Four tests per scenario, one per [`Pair`].
macro_rules! every_pair {
    ($($scenario:ident),* $(,)?) => {$(
        mod $scenario {
            use super::Pair;

            #[tokio::test]
            async fn http() {
                super::$scenario(Pair::Http).await
            }

            #[tokio::test]
            async fn grpc() {
                super::$scenario(Pair::Grpc).await
            }

            #[tokio::test]
            async fn grpc_prefill_http_decode() {
                super::$scenario(Pair::GrpcPrefillHttpDecode).await
            }

            #[tokio::test]
            async fn http_prefill_grpc_decode() {
                super::$scenario(Pair::HttpPrefillGrpcDecode).await
            }
        }
    )*};
}
use every_pair;

/// What a scenario needs beyond one prefill and one decode engine.
pub struct Setup<'a> {
    pub prefills: usize,
    pub seed: &'a str,
    pub p_flags: &'a [&'a str],
    pub d_flags: &'a [&'a str],
    pub prefill_policy: &'a str,
    pub timeouts: &'a [(&'a str, u64)],
    /// How often Tandem scrapes the engines' load (long: it believes what it saw at start).
    pub scrape_interval_ms: u64,
}

impl Default for Setup<'_> {
    fn default() -> Self {
        Setup {
            prefills: 1,
            seed: "7",
            p_flags: &[],
            d_flags: &[],
            prefill_policy: "least-loaded",
            timeouts: &[],
            scrape_interval_ms: 100,
        }
    }
}

pub struct Cluster {
    pub pair: Pair,
    pub prefill: Vec<Sim>,
    pub decode: Sim,
    pub tandem: Tandem,
}

/// A sim's pool endpoint: its HTTP URL, or its gRPC address with its HTTP port for `/metrics`.
fn endpoint(sim: &Sim, grpc: bool) -> String {
    if grpc {
        format!("{{ url = {:?}, metrics = {:?} }}", grpc_url(sim), sim.url)
    } else {
        format!("{:?}", sim.url)
    }
}

fn grpc_url(sim: &Sim) -> String {
    let addr = sim.ready["grpc"]
        .as_str()
        .unwrap_or_else(|| panic!("a gRPC sim names its gRPC address: {}", sim.ready));
    format!("http://{addr}")
}

impl Cluster {
    pub async fn start(pair: Pair, s: Setup<'_>) -> Cluster {
        let flags = |role: &[&str], grpc: bool| {
            let mut f = vec!["--seed", s.seed, "--nixl-abort-timeout", LEASE];
            if grpc {
                f.extend(["--grpc-port", "0"]);
            }
            f.extend_from_slice(role);
            f.into_iter().map(str::to_string).collect::<Vec<_>>()
        };
        let mut all: Vec<Vec<String>> = (0..s.prefills)
            .map(|_| flags(s.p_flags, pair.prefill_grpc()))
            .collect();
        all.push(flags(s.d_flags, pair.decode_grpc()));
        let mut sims = join_all(all.iter().map(|f| async move {
            let refs: Vec<&str> = f.iter().map(String::as_str).collect();
            Sim::start(&refs).await
        }))
        .await;
        let decode = sims.pop().expect("the decode sim");
        let prefill = sims;
        let protocol = |grpc: bool| if grpc { "grpc" } else { "http" };
        let p_eps: Vec<String> = prefill
            .iter()
            .map(|p| endpoint(p, pair.prefill_grpc()))
            .collect();
        let mut conf = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n\n\
             [pools.prefill]\nprotocol = \"{}\"\nendpoints = [{}]\npolicy = \"{}\"\n\n\
             [pools.decode]\nprotocol = \"{}\"\nendpoints = [{}]\npolicy = \"kv-capacity\"\n\n\
             [disaggregation]\nmode = \"always\"\n\n\
             [health]\ninterval_ms = 100\nscrape_interval_ms = {}\n\n\
             [timeouts]\n",
            protocol(pair.prefill_grpc()),
            p_eps.join(", "),
            s.prefill_policy,
            protocol(pair.decode_grpc()),
            endpoint(&decode, pair.decode_grpc()),
            s.scrape_interval_ms,
        );
        if !s.timeouts.iter().any(|(k, _)| *k == "release_ms") {
            conf.push_str("release_ms = 1000\n");
        }
        for (k, v) in s.timeouts {
            conf.push_str(&format!("{k} = {v}\n"));
        }
        let tandem = Tandem::start(&conf).await;
        Cluster {
            pair,
            prefill,
            decode,
            tandem,
        }
    }

    /// The URL Tandem's records name prefill engine `i` by.
    pub fn prefill_url(&self, i: usize) -> String {
        let p = &self.prefill[i];
        if self.pair.prefill_grpc() {
            grpc_url(p)
        } else {
            p.url.clone()
        }
    }

    pub fn decode_url(&self) -> String {
        if self.pair.decode_grpc() {
            grpc_url(&self.decode)
        } else {
            self.decode.url.clone()
        }
    }

    pub fn sims(&self) -> impl Iterator<Item = &Sim> {
        self.prefill.iter().chain(std::iter::once(&self.decode))
    }

    /// Nothing held on any sim or in Tandem (KV, running or waiting requests, in-flight counts,
    /// reservations, pinned handoffs) within 5 s.
    pub async fn assert_clean(&self) {
        let mut last = Vec::new();
        for _ in 0..200 {
            last = held_by(self.sims(), &self.tandem).await;
            let m = self.tandem.metrics().await;
            let pinned = metric_in(&m, "tandem_handoffs_pinned", &[]);
            if pinned != 0.0 {
                last.push(format!("tandem: {pinned} handoffs pinned"));
            }
            if last.is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("{:?}: still held after 5 s: {}", self.pair, last.join("; "));
    }

    /// The decode engine's KV pulls and locally computed prompt tokens so far.
    async fn decode_kv(&self) -> (f64, f64) {
        let m = self.decode.metrics().await;
        (
            metric_in(&m, "vllm:nixl_xfer_time_seconds_count", &[]),
            metric_in(&m, "vllm:request_prefill_kv_computed_tokens_sum", &[]),
        )
    }
}

pub fn completion(max_tokens: u64) -> Value {
    json!({"prompt": PROMPT, "max_tokens": max_tokens, "ignore_eos": true})
}

pub fn chat(max_tokens: u64) -> Value {
    json!({"messages": [{"role": "user", "content": PROMPT}],
           "max_completion_tokens": max_tokens, "ignore_eos": true})
}

pub fn streamed(mut body: Value) -> Value {
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    body
}

/// Each event's part in a stream: the chat role chunk, content, the finish, the usage chunk, an
/// error.
fn shape(events: &[Value]) -> Vec<&'static str> {
    events
        .iter()
        .map(|e| {
            let c = &e["choices"][0];
            if e.get("error").is_some() {
                "error"
            } else if e["choices"] == json!([]) {
                "usage"
            } else if c["delta"]["role"].is_string() {
                "role"
            } else if !c["finish_reason"].is_null() {
                "finish"
            } else {
                "content"
            }
        })
        .collect()
}

/// A whole SSE body: every frame `data: ...`, exactly one `[DONE]`, last; the JSON of the others.
async fn sse(resp: reqwest::Response, pair: Pair) -> Sse {
    let raw = resp.text().await.expect("the whole SSE body");
    let frames: Vec<&str> = raw.split("\n\n").filter(|f| !f.is_empty()).collect();
    assert!(raw.ends_with("data: [DONE]\n\n"), "{pair:?}: {raw}");
    assert_eq!(raw.matches("data: [DONE]").count(), 1, "{pair:?}: {raw}");
    let events = frames[..frames.len() - 1]
        .iter()
        .map(|f| {
            let data = f
                .strip_prefix("data: ")
                .expect("every frame is `data: ...`");
            serde_json::from_str(data).expect("event is JSON")
        })
        .collect();
    Sse {
        events,
        done: true,
        cut: false,
    }
}

/// The four request kinds: (path, body, request id).
fn cases(tag: &str) -> [(&'static str, Value, String); 4] {
    [
        ("/v1/completions", completion(16), format!("{tag}-cmpl")),
        (
            "/v1/completions",
            streamed(completion(16)),
            format!("{tag}-cmpl-stream"),
        ),
        ("/v1/chat/completions", chat(12), format!("{tag}-chat")),
        (
            "/v1/chat/completions",
            streamed(chat(12)),
            format!("{tag}-chat-stream"),
        ),
    ]
}

every_pair!(equal_to_colocated, decode_reads_the_prefills_kv);

/// `v` without `created` (the wall clock) and without its usage's `prompt_tokens_details`,
/// checked first: from a gRPC prefill it is the prefill's cached count (vLLM's gRPC `FinishInfo`
/// always reports `num_cached_tokens`, and Tandem writes the prefill's count into the usage as it
/// does for an HTTP prefill engine run with `--enable-prompt-tokens-details`); otherwise what a
/// colocated HTTP engine without that flag writes: `null`, or no key on a stream's usage chunk.
fn comparable(mut v: Value, pair: Pair, cached: &Value) -> Value {
    if let Some(o) = v.as_object_mut() {
        o.remove("created");
    }
    if let Some(u) = v.get_mut("usage").and_then(Value::as_object_mut) {
        let details = u.remove("prompt_tokens_details");
        if pair.prefill_grpc() {
            assert_eq!(
                details,
                Some(json!({ "cached_tokens": cached })),
                "{pair:?}: the gRPC prefill's cached count"
            );
        } else {
            assert!(matches!(details, None | Some(Value::Null)), "{details:?}");
        }
    }
    v
}

/// Scenario 1: chat and completions, streamed and not, answer what one colocated engine with
/// the same seed answers: the text, finish_reason and usage, indeed every event but for
/// `created` (and `cached_tokens`, see [`comparable`]); for streams the role chunk, one usage
/// chunk and one `[DONE]`. All disaggregated.
async fn equal_to_colocated(pair: Pair) {
    let (c, colo) = tokio::join!(
        Cluster::start(pair, Setup::default()),
        Sim::start(&["--seed", "7"])
    );
    let t = &c.tandem;
    // Every engine's load is scraped, a gRPC engine's from its `metrics` (HTTP) URL.
    let blocks = colo.ready["num_gpu_blocks"].clone();
    for pool in ["prefill", "decode"] {
        let scraped = t
            .wait_engines(pool, |e| {
                e["last_scrape_age_s"].is_number() && e["kv_total_blocks"] == blocks
            })
            .await;
        assert!(scraped, "{pair:?} {pool}: {}", t.engines().await);
    }
    for (path, body, id) in cases("eq") {
        let resp = t.post(path, &body, Some(&id)).await;
        assert_eq!(resp.status().as_u16(), 200, "{pair:?} {id}");
        let want_resp = colo.post(path, &body, Some(&id)).await;
        let (usage, finish, rec) = if body["stream"] == true {
            let got = sse(resp, pair).await;
            let want = sse(want_resp, Pair::Http).await;
            let rec = t.record(&id).await;
            assert!(!got.text().is_empty(), "{pair:?} {id}");
            assert_eq!(got.text(), want.text(), "{pair:?} {id}: text");
            let s = shape(&got.events);
            assert_eq!(s, shape(&want.events), "{pair:?} {id}: chunk sequence");
            assert_eq!(s.iter().filter(|k| **k == "usage").count(), 1, "{s:?}");
            assert_eq!(s.last(), Some(&"usage"), "the usage chunk comes last");
            if path == "/v1/chat/completions" {
                assert_eq!(s[0], "role", "{pair:?} {id}: {s:?}");
            }
            let cached = &rec["cached_tokens"];
            let strip = |v: &[Value], p| {
                v.iter()
                    .map(|e| comparable(e.clone(), p, cached))
                    .collect::<Vec<_>>()
            };
            assert_eq!(
                strip(&got.events, pair),
                strip(&want.events, Pair::Http),
                "{pair:?} {id}: every event equals the colocated engine's"
            );
            let fin = got
                .events
                .iter()
                .find_map(|e| e["choices"][0]["finish_reason"].as_str())
                .expect("a finish_reason")
                .to_string();
            (got.events.last().unwrap()["usage"].clone(), fin, rec)
        } else {
            let got: Value = resp.json().await.expect("JSON");
            let want: Value = want_resp.json().await.expect("JSON");
            let rec = t.record(&id).await;
            assert_eq!(
                got["choices"][0]["message"]["content"], want["choices"][0]["message"]["content"],
                "{pair:?} {id}"
            );
            assert_eq!(
                got["choices"][0]["text"], want["choices"][0]["text"],
                "{pair:?} {id}"
            );
            assert_eq!(
                comparable(got.clone(), pair, &rec["cached_tokens"]),
                comparable(want, Pair::Http, &Value::Null),
                "{pair:?} {id}"
            );
            let fin = got["choices"][0]["finish_reason"].clone();
            let fin = fin.as_str().unwrap_or("").to_string();
            (got["usage"].clone(), fin, rec)
        };
        assert_eq!(finish, "length", "{pair:?} {id}");
        let u = |k: &str| usage[k].as_u64().unwrap_or_else(|| panic!("{k}: {usage}"));
        let max = if path == "/v1/completions" { 16 } else { 12 };
        assert_eq!(u("completion_tokens"), max, "{pair:?} {id}: {usage}");
        assert_eq!(
            u("total_tokens"),
            u("prompt_tokens") + max,
            "{pair:?} {id}: {usage}"
        );
        assert_eq!(rec["route"], "disaggregated", "{pair:?}: {rec}");
        assert_eq!(rec["outcome"], "ok", "{pair:?}: {rec}");
        assert_eq!(rec["decision_reason"], "mode_always", "{pair:?}: {rec}");
        assert_eq!(rec["prefill_engine"], c.prefill_url(0), "{pair:?}: {rec}");
        assert_eq!(rec["decode_engine"], c.decode_url(), "{pair:?}: {rec}");
        assert_eq!(
            rec["prompt_tokens"], usage["prompt_tokens"],
            "{pair:?}: {rec}"
        );
    }
    assert_eq!(
        t.metric(
            "tandem_requests_total",
            &[("route", "disaggregated"), ("outcome", "ok")]
        )
        .await,
        4.0,
        "{pair:?}"
    );
    assert_eq!(t.metric("tandem_retries_total", &[]).await, 0.0, "{pair:?}");
    assert_eq!(
        c.decode_kv().await.0,
        4.0,
        "{pair:?}: one KV pull per request"
    );
    c.assert_clean().await;
}

/// Scenario 7 (SMG #1622: params silently not relayed, decode recomputes): every request's
/// decode leg pulled the prefill's KV once and computed only the last prompt token itself, where
/// a colocated engine computes the whole prompt; the prefill's blocks are freed by the read.
async fn decode_reads_the_prefills_kv(pair: Pair) {
    let c = Cluster::start(pair, Setup::default()).await;
    let prompt_len = c.decode.tokens(PROMPT).await.len() as f64;
    assert!(prompt_len > 16.0, "a prompt of several blocks");
    for (path, body, id) in cases("kv") {
        let before = c.decode_kv().await;
        let resp = c.tandem.post(path, &body, Some(&id)).await;
        assert_eq!(resp.status().as_u16(), 200, "{pair:?} {id}");
        if body["stream"] == true {
            assert!(read_sse(resp).await.done, "{pair:?} {id}");
        } else {
            let v: Value = resp.json().await.expect("JSON");
            assert!(v["usage"]["completion_tokens"].as_u64() > Some(0), "{v}");
        }
        let after = c.decode_kv().await;
        assert_eq!(
            after.0 - before.0,
            1.0,
            "{pair:?} {id}: the decode engine pulled the prefill's KV once"
        );
        assert_eq!(
            after.1 - before.1,
            1.0,
            "{pair:?} {id}: the decode engine computed only the last prompt token"
        );
        assert_eq!(c.tandem.record(&id).await["route"], "disaggregated");
        // The read notification freed the prefill's pinned blocks (the lease is far away).
        assert_eq!(
            c.prefill[0]
                .wait_metric("vllm:kv_cache_usage_perc", &[], |v| v == 0.0)
                .await,
            0.0,
            "{pair:?} {id}"
        );
    }
    // The prefill engine ran each prompt (four one-token legs), the decode engine none of them.
    let p = &c.prefill[0];
    assert_eq!(
        p.metric(
            "vllm:request_success_total",
            &[("finished_reason", "length")]
        )
        .await,
        4.0,
        "{pair:?}"
    );
    assert_eq!(
        p.metric("vllm:nixl_num_kv_expired_reqs_total", &[]).await,
        0.0,
        "{pair:?}"
    );
    c.assert_clean().await;
}
