//! The fault suite: 2 prefill + 2 decode `tandem sim` engines behind `tandem serve`, one fault
//! per test, each asserting the single terminal answer the client gets *and* that nothing is
//! left held afterwards: every sim's KV usage back to 0 with nothing running or waiting, and
//! Tandem's in-flight counts, KV reservations and pinned handoffs back to 0, within a few
//! seconds. The sims' NIXL lease is set far beyond that bound, so a leaked handoff cannot hide
//! behind lease expiry.

use std::time::Duration;

use futures::future::join_all;
use serde_json::{json, Value};

use crate::support::{held_by, metric_in, raw_post, read_sse, Sim, Tandem, PROMPT};

/// Simulated seconds a pinned prefill waits for its read: 100,000 s (2,000 s of real time at the
/// sims' ×50), so only a release can free it within a test.
const LEASE: &str = "100000";

pub struct Cluster {
    pub prefill: Vec<Sim>,
    pub decode: Vec<Sim>,
    pub tandem: Tandem,
}

/// The cluster's config: fast probes, `mode = "always"`, `kv-capacity` decode routing, plus
/// `extra` TOML (whole tables; `[timeouts]` and `[admission]` are written from `timeouts` and
/// `admission`).
#[derive(Default)]
pub struct Setup<'a> {
    pub p_flags: &'a [&'a str],
    pub d_flags: &'a [&'a str],
    pub timeouts: &'a [(&'a str, u64)],
    pub admission: &'a [(&'a str, u64)],
    pub limits: &'a [(&'a str, u64)],
    /// The prefill policy (default `least-loaded`).
    pub prefill_policy: Option<&'a str>,
}

impl Cluster {
    pub async fn start(s: Setup<'_>) -> Cluster {
        let sim = |role_flags: &[&str], seed: &'static str| {
            let mut f = vec!["--seed", seed, "--nixl-abort-timeout", LEASE];
            f.extend_from_slice(role_flags);
            f.into_iter().map(str::to_string).collect::<Vec<_>>()
        };
        let flags = [
            sim(s.p_flags, "1"),
            sim(s.p_flags, "2"),
            sim(s.d_flags, "3"),
            sim(s.d_flags, "4"),
        ];
        let mut sims = join_all(flags.iter().map(|f| {
            let refs: Vec<&str> = f.iter().map(String::as_str).collect();
            async move { Sim::start(&refs).await }
        }))
        .await;
        let decode: Vec<Sim> = sims.split_off(2);
        let prefill = sims;
        let urls = |v: &[Sim]| v.iter().map(|s| s.url.clone()).collect::<Vec<_>>();
        let mut conf = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n\n\
             [pools.prefill]\nendpoints = {:?}\npolicy = \"{}\"\n\n\
             [pools.decode]\nendpoints = {:?}\npolicy = \"kv-capacity\"\n\n\
             [disaggregation]\nmode = \"always\"\n\n\
             [health]\ninterval_ms = 100\nscrape_interval_ms = 100\n\n\
             [timeouts]\n",
            urls(&prefill),
            s.prefill_policy.unwrap_or("least-loaded"),
            urls(&decode),
        );
        if !s.timeouts.iter().any(|(k, _)| *k == "release_ms") {
            conf.push_str("release_ms = 1000\n");
        }
        for (k, v) in s.timeouts {
            conf.push_str(&format!("{k} = {v}\n"));
        }
        conf.push_str("\n[admission]\n");
        for (k, v) in s.admission {
            conf.push_str(&format!("{k} = {v}\n"));
        }
        conf.push_str("\n[limits]\n");
        for (k, v) in s.limits {
            conf.push_str(&format!("{k} = {v}\n"));
        }
        let tandem = Tandem::start(&conf).await;
        Cluster {
            prefill,
            decode,
            tandem,
        }
    }

    fn sims(&self) -> impl Iterator<Item = &Sim> {
        self.prefill.iter().chain(self.decode.iter())
    }

    async fn faults_all(&self, sims: &[Sim], spec: Value) {
        join_all(sims.iter().map(|s| s.faults(spec.clone()))).await;
    }

    /// What is still held anywhere, or `None` when nothing is.
    async fn held(&self) -> Option<String> {
        let mut held = held_by(self.sims(), &self.tandem).await;
        let engines = self.tandem.engines().await;
        if engines["decode_blocks_pending"] != 0 {
            held.push(format!(
                "tandem: {} decode blocks pending",
                engines["decode_blocks_pending"]
            ));
        }
        let m = self.tandem.metrics().await;
        let pinned = metric_in(&m, "tandem_handoffs_pinned", &[]);
        if pinned != 0.0 {
            held.push(format!("tandem: {pinned} handoffs pinned"));
        }
        let listed: Value = self
            .tandem
            .get("/admin/requests/pinned")
            .await
            .json()
            .await
            .expect("/admin/requests/pinned is JSON");
        if listed["count"] != 0 {
            held.push(format!("tandem: pinned handoffs {listed}"));
        }
        (!held.is_empty()).then(|| held.join("; "))
    }

    /// Nothing held anywhere within 5 s (polled every 25 ms).
    pub async fn assert_clean(&self) {
        let mut last = None;
        for _ in 0..200 {
            last = self.held().await;
            if last.is_none() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let m = self.tandem.metrics().await;
        let handoffs: Vec<&str> = m
            .lines()
            .filter(|l| l.starts_with("tandem_handoffs_total{"))
            .collect();
        let mut failed_notifications = Vec::new();
        for s in self.sims() {
            failed_notifications.push(
                s.metric("vllm:nixl_num_failed_notifications_total", &[])
                    .await,
            );
        }
        panic!(
            "still held 5 s after the last answer: {} (handoffs: {handoffs:?}; failed NIXL notifications per sim: {failed_notifications:?})",
            last.unwrap()
        );
    }

    /// Requests each prefill engine received.
    async fn prefills(&self) -> Vec<f64> {
        join_all(
            self.prefill
                .iter()
                .map(|p| p.metric("vllm:request_success_total", &[])),
        )
        .await
    }
}

fn body(max_tokens: u64, stream: bool) -> Value {
    let mut b = json!({"prompt": PROMPT, "max_tokens": max_tokens, "ignore_eos": true});
    if stream {
        b["stream"] = json!(true);
    }
    b
}

/// An error answer names no engine: no URL, address or port.
pub fn assert_no_engine_named(text: &str, c: &Cluster) {
    // Nor a file path or panic text: nothing internal leaks into an answer.
    for leak in [
        "panicked",
        ".rs:",
        "/src/",
        "/root/",
        "/tmp/",
        "RUST_BACKTRACE",
    ] {
        assert!(!text.contains(leak), "leaks {leak:?}: {text}");
    }
    assert!(!text.contains("http://"), "{text}");
    assert!(!text.contains("tcp://"), "{text}");
    assert!(!text.contains("127.0.0.1"), "{text}");
    for s in c.sims() {
        let port = s.url.rsplit(':').next().expect("a port");
        assert!(!text.contains(port), "names an engine's port: {text}");
    }
}

/// POST and return (status, body text).
async fn post(c: &Cluster, b: &Value) -> (u16, String) {
    let r = c.tandem.post("/v1/completions", b, None).await;
    let status = r.status().as_u16();
    (status, r.text().await.expect("a body"))
}

#[tokio::test]
async fn decode_kv_full_is_refused_before_any_prefill_and_pins_nothing() {
    let c = Cluster::start(Setup {
        admission: &[("max_wait_ms", 300)],
        ..Setup::default()
    })
    .await;
    c.faults_all(&c.decode, json!({"exhaust_kv": true})).await;
    // Tandem sees both decode engines full once a scrape shows it.
    assert!(
        c.tandem
            .wait_engines("decode", |e| e["kv_free_blocks"] == 0)
            .await
    );
    let (status, text) = post(&c, &body(8, false)).await;
    assert_eq!(status, 503, "{text}");
    let v: Value = serde_json::from_str(&text).expect("JSON error");
    assert_eq!(v["error"]["code"], 503, "{v}");
    assert_no_engine_named(&text, &c);
    assert_eq!(
        c.prefills().await,
        vec![0.0, 0.0],
        "no prefill work was spent"
    );
    c.faults_all(&c.decode, json!({"exhaust_kv": false})).await;
    c.assert_clean().await;
}

#[tokio::test]
async fn decode_kv_filling_during_the_prefill_releases_the_pinned_kv() {
    // The prefill engines take 1.5 s to accept; meanwhile both decode engines fill up, so the
    // handoff finds no room, waits its longest and is refused after its prefill ran.
    let c = Cluster::start(Setup {
        p_flags: &["--fault-slow-accept-ms", "1500"],
        admission: &[("max_wait_ms", 300)],
        ..Setup::default()
    })
    .await;
    let b = body(8, false);
    let req = c.tandem.post("/v1/completions", &b, None);
    let fill = async {
        c.faults_all(&c.decode, json!({"exhaust_kv": true})).await;
    };
    let (resp, ()) = tokio::join!(req, fill);
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    assert_eq!(status, 503, "{text}");
    assert_no_engine_named(&text, &c);
    assert_eq!(
        c.prefills().await.iter().sum::<f64>(),
        1.0,
        "the prefill ran before the refusal"
    );
    // The release leg waits on a full decode engine, is cut at release_ms, and the decode
    // engine's abort tells the prefill engine to free the blocks.
    c.faults_all(&c.decode, json!({"exhaust_kv": false})).await;
    c.assert_clean().await;
    let m = c.tandem.metrics().await;
    assert_eq!(
        metric_in(&m, "tandem_handoffs_total", &[("outcome", "leaked")]),
        0.0,
        "{m}"
    );
}

#[tokio::test]
async fn client_gone_after_the_prefill_before_the_pull_releases_the_kv() {
    // Both decode engines take 1 s to accept, so the client leaves while its prefill's KV is
    // pinned and no decode engine has the request yet.
    let c = Cluster::start(Setup {
        d_flags: &["--fault-slow-accept-ms", "1000"],
        timeouts: &[("release_ms", 3000)],
        ..Setup::default()
    })
    .await;
    let mut conns = Vec::new();
    for i in 0..4 {
        conns.push(
            raw_post(
                &c.tandem.url,
                "/v1/completions",
                &body(8, i % 2 == 0),
                &format!("gone-{i}"),
            )
            .await,
        );
    }
    // Every prefill finished (4 requests over the two engines) and pinned its KV.
    for _ in 0..200 {
        if c.prefills().await.iter().sum::<f64>() >= 4.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(c.prefills().await.iter().sum::<f64>(), 4.0);
    // Pinned now, and listed as such while the decode engines are slow to accept.
    let mut listed = Value::Null;
    for _ in 0..200 {
        listed = c
            .tandem
            .get("/admin/requests/pinned?older_than_ms=0")
            .await
            .json()
            .await
            .unwrap();
        if listed["count"] == 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(listed["count"], 4, "{listed}");
    let ids: Vec<&str> = listed["pinned"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["request_id"].as_str().unwrap())
        .collect();
    assert!(ids.iter().all(|id| id.starts_with("gone-")), "{listed}");
    drop(conns);
    c.assert_clean().await;
    for i in 0..4 {
        let rec = c.tandem.record(&format!("gone-{i}")).await;
        assert_eq!(rec["outcome"], "client_disconnect", "{rec}");
    }
}

async fn read_fault_is_replanned_and_frees_both_prefills(fault: &str) {
    let c = Cluster::start(Setup::default()).await;
    c.faults_all(&c.prefill, json!({ fault: 1 })).await;
    let (status, text) = post(&c, &body(8, false)).await;
    assert_eq!(status, 200, "{text}");
    c.assert_clean().await;
    let m = c.tandem.metrics().await;
    assert!(
        metric_in(&m, "tandem_retries_total", &[("leg", "decode")]) >= 1.0,
        "{m}"
    );
}

#[tokio::test]
async fn refused_kv_read_is_replanned_and_frees_the_first_prefill() {
    read_fault_is_replanned_and_frees_both_prefills("kv_refuse_next").await;
}

#[tokio::test]
async fn corrupted_kv_read_is_replanned_and_frees_the_first_prefill() {
    read_fault_is_replanned_and_frees_both_prefills("kv_corrupt_next").await;
}

#[tokio::test]
async fn handshake_stall_on_one_prefill_engine_moves_the_prefill_to_the_other() {
    // `prefix` prefers the engine that already holds the prompt, so a retry that does not move
    // off the stalled engine runs there again (and again).
    let c = Cluster::start(Setup {
        d_flags: &["--nixl-handshake-timeout", "1"],
        timeouts: &[("release_ms", 500)],
        prefill_policy: Some("prefix"),
        ..Setup::default()
    })
    .await;
    c.prefill[0].faults(json!({"handshake_stall": true})).await;
    // Until one request has met the stalled engine (the tie-breaks are seeded: a few at most).
    let mut sent = 0;
    while sent < 10 && c.prefills().await[0] == 0.0 {
        // A prompt of its own, so no engine holds it and the tie-break decides.
        let mut b = body(8, sent % 2 == 1);
        b["prompt"] = json!(format!("({sent}) {PROMPT}"));
        let (status, text) = post(&c, &b).await;
        assert_eq!(status, 200, "request {sent}: {text}");
        sent += 1;
    }
    let prefills = c.prefills().await;
    assert!(
        prefills[0] >= 1.0,
        "no request met the stalled engine: {prefills:?}"
    );
    assert_eq!(
        prefills[1], sent as f64,
        "the healthy engine prefilled every request: {prefills:?}"
    );
    c.prefill[0].faults(json!({"handshake_stall": false})).await;
    c.assert_clean().await;
}

#[tokio::test]
async fn one_500_on_each_decode_engine_is_retried_within_the_budget() {
    let c = Cluster::start(Setup::default()).await;
    c.faults_all(&c.decode, json!({"fail_next": 1})).await;
    for stream in [false, true] {
        let (status, text) = post(&c, &body(8, stream)).await;
        assert_eq!(status, 200, "{text}");
        c.faults_all(&c.decode, json!({"fail_next": 1})).await;
    }
    c.faults_all(&c.decode, json!({"fail_next": 0})).await;
    c.assert_clean().await;
}

#[tokio::test]
async fn decode_stall_ends_in_an_answer_from_another_engine() {
    let c = Cluster::start(Setup {
        timeouts: &[
            ("handoff_ms", 1000),
            ("first_token_ms", 1000),
            ("per_token_ms", 50),
        ],
        ..Setup::default()
    })
    .await;
    for stream in [false, true] {
        c.faults_all(&c.decode, json!({"stall_next": 1})).await;
        let r = c
            .tandem
            .post("/v1/completions", &body(8, stream), None)
            .await;
        assert_eq!(r.status(), 200);
        if stream {
            let out = read_sse(r).await;
            assert!(out.done && !out.cut, "{:?}", out.events);
        } else {
            let v: Value = r.json().await.unwrap();
            assert_eq!(v["usage"]["completion_tokens"], 8, "{v}");
        }
    }
    c.faults_all(&c.decode, json!({"stall_next": 0})).await;
    c.assert_clean().await;
}

#[tokio::test]
async fn overload_refuses_with_503_and_leaks_nothing() {
    // Far more concurrent requests than the decode pool's KV holds, with a short queue: every
    // answer is a 200 or an OpenAI-shaped 503, and nothing is left pinned afterwards.
    let c = Cluster::start(Setup {
        d_flags: &["--num-gpu-blocks-override", "64"],
        admission: &[("max_queued", 8), ("max_wait_ms", 500)],
        ..Setup::default()
    })
    .await;
    let reqs = (0..48).map(|i| {
        let b = body(64, i % 2 == 0);
        let t = &c.tandem;
        async move {
            let r = t.post("/v1/completions", &b, None).await;
            let status = r.status().as_u16();
            (status, r.text().await.unwrap_or_default())
        }
    });
    let answers = join_all(reqs).await;
    let ok = answers.iter().filter(|(s, _)| *s == 200).count();
    let refused = answers.iter().filter(|(s, _)| *s == 503).count();
    assert_eq!(ok + refused, answers.len(), "{answers:?}");
    assert!(ok > 0 && refused > 0, "ok {ok}, refused {refused}");
    for (s, text) in &answers {
        if *s == 503 {
            let v: Value = serde_json::from_str(text).expect("JSON error");
            assert_eq!(v["error"]["code"], 503, "{v}");
            assert_no_engine_named(text, &c);
        }
    }
    c.assert_clean().await;
}

#[tokio::test]
async fn a_full_prefill_queue_holds_and_refuses_before_any_engine_work() {
    // Prefills take 1 s to start, and one prompt fills an engine's queue bound: with both
    // engines busy, a third request waits its longest in the admission queue, then gets 503.
    let c = Cluster::start(Setup {
        p_flags: &["--fault-slow-accept-ms", "1000"],
        admission: &[("max_prefill_queue_tokens", 50), ("max_wait_ms", 200)],
        ..Setup::default()
    })
    .await;
    let (b1, b2) = (body(8, false), body(8, true));
    let first = async {
        let (a, b) = tokio::join!(post(&c, &b1), post(&c, &b2));
        vec![a, b]
    };
    let third = async {
        let busy = c
            .tandem
            .wait_engines("prefill", |e| e["prefill_queue_tokens"].as_u64() > Some(0))
            .await;
        assert!(busy, "both prefill engines have a prefill queued");
        post(&c, &body(8, false)).await
    };
    let (firsts, (status, text)) = tokio::join!(first, third);
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("prefill engine's queue"), "{text}");
    assert_no_engine_named(&text, &c);
    for (s, t) in firsts {
        assert_eq!(s, 200, "{t}");
    }
    assert_eq!(
        c.prefills().await.iter().sum::<f64>(),
        2.0,
        "the third never reached one"
    );
    c.assert_clean().await;
}

#[tokio::test]
async fn a_decode_engine_killed_mid_stream_ends_the_stream_cleanly_and_comes_back() {
    let mut c = Cluster::start(Setup::default()).await;
    // Long streams on both decode engines (kv-capacity spreads them).
    let reqs = (0..4).map(|_| {
        let t = &c.tandem;
        async move {
            let b = body(20_000, true);
            read_sse(t.post("/v1/completions", &b, None).await).await
        }
    });
    let streams = futures::future::join_all(reqs);
    let kill = async {
        // Once the first engine is generating, SIGKILL it.
        c.decode[0]
            .wait_metric("vllm:num_requests_running", &[], |v| v > 0.0)
            .await;
        c.decode[0].kill().await
    };
    let (outs, port) = tokio::join!(streams, kill);
    for out in &outs {
        // Cut streams end in an error event and [DONE]; the others finish normally.
        assert!(out.done && !out.cut, "{:?}", out.events.last());
    }
    assert!(
        outs.iter()
            .any(|o| o.events.iter().any(|e| e.get("error").is_some())),
        "a stream on the killed engine ended with an error event"
    );
    let ready_after_kill = c.tandem.ready().await;
    assert_eq!(
        ready_after_kill.0, 200,
        "the other decode engine still serves"
    );
    c.decode[0] = Sim::spawn_on(
        port,
        &[
            "--model",
            "qwen3-0.6b",
            "--time-scale",
            "50",
            "--seed",
            "3",
            "--nixl-abort-timeout",
            LEASE,
        ],
    )
    .await;
    // Back in rotation: healthy again in Tandem's table.
    let healthy = c
        .tandem
        .wait_engines("decode", |e| e["state"] == "healthy")
        .await;
    assert!(healthy, "the restarted engine is healthy again");
    let (status, text) = post(&c, &body(8, false)).await;
    assert_eq!(status, 200, "{text}");
    c.assert_clean().await;
}

#[tokio::test]
async fn clients_leaving_at_random_points_leave_nothing_held() {
    use rand::{Rng, SeedableRng};
    let c = Cluster::start(Setup::default()).await;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(200);
    // 100 clients, each gone after a seeded delay: before, during or after its prefill, while
    // its decode engine pulls, or mid-stream.
    let clients = (0..100).map(|i| {
        let stream = rng.random_bool(0.5);
        let delay = Duration::from_micros(rng.random_range(0..60_000));
        let url = c.tandem.url.clone();
        async move {
            let conn = raw_post(
                &url,
                "/v1/completions",
                &body(200, stream),
                &format!("leave-{i}"),
            )
            .await;
            tokio::time::sleep(delay).await;
            drop(conn);
        }
    });
    join_all(clients).await;
    c.assert_clean().await;
    // The pool still serves.
    let (status, text) = post(&c, &body(8, false)).await;
    assert_eq!(status, 200, "{text}");
}
