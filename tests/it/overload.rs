//! Open-loop overload: Poisson arrivals at twice the pool's measured throughput into 2 prefill +
//! 2 decode sims (Llama-3.1-8B on H100, real time, decode KV cut to 4,096 blocks so decode room
//! is what runs out), `max_queued = 64`. Every answer must be a 200 stream that ends in
//! `[DONE]` or an OpenAI-shaped 503, and within 5 s of the last answer the prefill engines hold
//! no KV and nothing else is held (see `fault_suite::Cluster::assert_clean`).
//!
//! The CI test runs 5 s. `overload_report` (ignored; `TANDEM_OVERLOAD_SECS`,
//! `TANDEM_OVERLOAD_RATE` to fix the arrival rate) is the acceptance run whose figures go in
//! benches/README.md: goodput (TTFT ≤ 2 s and TPOT ≤ 100 ms, per second of the run), answers by
//! status, TTFT percentiles, and the prefill engines' KV usage 5 s after the last answer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use futures::StreamExt;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

use crate::support::{held_by, Sim, Tandem};

pub(crate) const PROMPT_CHARS: usize = 2_000;
const MAX_TOKENS: u64 = 64;

struct Pool {
    prefill: Vec<Sim>,
    decode: Vec<Sim>,
    tandem: Tandem,
}

/// The overload pools (also `priority.rs`'s): 2 prefill sims and 2 decode sims with 4,096 KV
/// blocks each, and a KV lease long enough that a leak cannot hide behind its expiry.
pub(crate) async fn spawn_sims() -> [Sim; 4] {
    let lease = ["--nixl-abort-timeout", "100000"];
    let p = |seed: &'static str| {
        let mut a = vec!["--seed", seed];
        a.extend_from_slice(&lease);
        a
    };
    let d = |seed: &'static str| {
        let mut a = vec!["--seed", seed, "--num-gpu-blocks-override", "4096"];
        a.extend_from_slice(&lease);
        a
    };
    let (a0, a1, a2, a3) = (p("1"), p("2"), d("3"), d("4"));
    let (p0, p1, d0, d1) = tokio::join!(
        Sim::spawn(&a0),
        Sim::spawn(&a1),
        Sim::spawn(&a2),
        Sim::spawn(&a3)
    );
    [p0, p1, d0, d1]
}

impl Pool {
    async fn start() -> Pool {
        let [p0, p1, d0, d1] = spawn_sims().await;
        let conf = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n\n\
             [pools.prefill]\nendpoints = [{:?}, {:?}]\n\n\
             [pools.decode]\nendpoints = [{:?}, {:?}]\n\n\
             [disaggregation]\nmode = \"always\"\n\n\
             [health]\ninterval_ms = 200\nscrape_interval_ms = 200\n\n\
             [admission]\nmax_queued = 64\n{}",
            p0.url,
            p1.url,
            d0.url,
            d1.url,
            // The acceptance run also tries the tight queue (`max_wait_ms = 2000`).
            std::env::var("TANDEM_OVERLOAD_MAX_WAIT_MS")
                .map(|v| format!("max_wait_ms = {v}\n"))
                .unwrap_or_default()
        );
        let tandem = Tandem::start(&conf).await;
        Pool {
            prefill: vec![p0, p1],
            decode: vec![d0, d1],
            tandem,
        }
    }

    async fn prefill_kv(&self) -> Vec<f64> {
        join_all(
            self.prefill
                .iter()
                .map(|p| p.metric("vllm:kv_cache_usage_perc", &[])),
        )
        .await
    }

    /// What is still held: sims' KV or requests, Tandem's in-flight counts and reservations.
    async fn held(&self) -> Vec<String> {
        held_by(self.prefill.iter().chain(self.decode.iter()), &self.tandem).await
    }
}

/// One request's fate.
#[derive(Debug, Clone)]
struct Answer {
    status: u16,
    /// The stream ended with `[DONE]` (200 only).
    done: bool,
    ttft: Option<f64>,
    tpot: Option<f64>,
    error_ok: bool,
}

/// A prompt of `PROMPT_CHARS` whose first characters are its own.
pub(crate) fn prompt(rng: &mut ChaCha8Rng) -> String {
    // Its own first characters, so no two requests share a cached block.
    let mut s = format!("{:016x} ", rng.random::<u64>());
    while s.len() < PROMPT_CHARS {
        s.push_str(["alpha ", "beta ", "gamma ", "delta "][rng.random_range(0..4)]);
    }
    s
}

async fn one(client: &reqwest::Client, url: &str, prompt: String) -> Answer {
    let body = json!({"prompt": prompt, "max_tokens": MAX_TOKENS, "ignore_eos": true,
        "stream": true});
    let start = Instant::now();
    let resp = match client
        .post(format!("{url}/v1/completions"))
        .json(&body)
        .send()
        .await
    {
        Ok(r) => r,
        Err(_) => {
            return Answer {
                status: 0,
                done: false,
                ttft: None,
                tpot: None,
                error_ok: false,
            }
        }
    };
    let status = resp.status().as_u16();
    if status != 200 {
        let text = resp.text().await.unwrap_or_default();
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let error_ok = v["error"]["code"] == status && !text.contains("127.0.0.1");
        return Answer {
            status,
            done: false,
            ttft: None,
            tpot: None,
            error_ok,
        };
    }
    let mut stream = resp.bytes_stream();
    let (mut first, mut last, mut chunks) = (None, None, 0u64);
    let mut tail = String::new();
    while let Some(Ok(b)) = stream.next().await {
        let now = start.elapsed().as_secs_f64();
        let text = String::from_utf8_lossy(&b);
        let n = text.matches("\"text\":").count() as u64;
        if n > 0 {
            first.get_or_insert(now);
            last = Some(now);
            chunks += n;
        }
        tail.push_str(&text);
        if tail.len() > 64 {
            tail = tail[tail.len() - 32..].to_string();
        }
    }
    let tpot = match (first, last) {
        (Some(f), Some(l)) if chunks > 1 => Some((l - f) / (chunks - 1) as f64),
        _ => Some(0.0),
    };
    Answer {
        status,
        done: tail.ends_with("data: [DONE]\n\n"),
        ttft: first,
        tpot,
        error_ok: true,
    }
}

/// Completions per second with `clients` closed-loop clients for `secs`.
async fn capacity(pool: &Pool, clients: usize, secs: f64) -> f64 {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let url = pool.tandem.url.clone();
    let workers = (0..clients).map(|i| {
        let client = client.clone();
        let url = url.clone();
        async move {
            let mut rng = ChaCha8Rng::seed_from_u64(1000 + i as u64);
            let mut done = 0u64;
            while Instant::now() < deadline {
                if one(&client, &url, prompt(&mut rng)).await.status == 200 {
                    done += 1;
                }
            }
            done
        }
    });
    let t0 = Instant::now();
    let total: u64 = join_all(workers).await.into_iter().sum();
    total as f64 / t0.elapsed().as_secs_f64()
}

struct Report {
    answers: Vec<Answer>,
    secs: f64,
    rate: f64,
    kv_after: Vec<f64>,
}

impl Report {
    fn goodput(&self) -> f64 {
        self.answers
            .iter()
            .filter(|a| {
                a.status == 200
                    && a.done
                    && a.ttft.is_some_and(|t| t <= 2.0)
                    && a.tpot.is_some_and(|t| t <= 0.1)
            })
            .count() as f64
            / self.secs
    }

    fn summary(&self) -> String {
        let n = |s: u16| self.answers.iter().filter(|a| a.status == s).count();
        let mut ttft: Vec<f64> = self.answers.iter().filter_map(|a| a.ttft).collect();
        ttft.sort_by(f64::total_cmp);
        let pct = |p: f64| {
            ttft.get(((ttft.len() as f64 * p) as usize).min(ttft.len().saturating_sub(1)))
                .copied()
                .unwrap_or(f64::NAN)
        };
        format!(
            "rate {:.2}/s for {:.0} s: {} sent, {} ok, {} refused (503), {} other; goodput {:.2} req/s; \
             TTFT p50/p90/p99 {:.2}/{:.2}/{:.2} s; prefill KV usage 5 s after the last answer {:?}",
            self.rate,
            self.secs,
            self.answers.len(),
            n(200),
            n(503),
            self.answers.len() - n(200) - n(503),
            self.goodput(),
            pct(0.5),
            pct(0.9),
            pct(0.99),
            self.kv_after
        )
    }
}

/// Poisson arrivals at `rate` per second for `secs`, every request awaited.
async fn open_loop(pool: &Pool, rate: f64, secs: f64, seed: u64) -> Report {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap();
    let url = Arc::new(pool.tandem.url.clone());
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let start = tokio::time::Instant::now();
    let mut at = 0.0;
    let mut tasks = Vec::new();
    loop {
        at += -(1.0 - rng.random::<f64>()).ln() / rate;
        if at >= secs {
            break;
        }
        tokio::time::sleep_until(start + Duration::from_secs_f64(at)).await;
        let (client, url, p) = (client.clone(), url.clone(), prompt(&mut rng));
        tasks.push(tokio::spawn(async move { one(&client, &url, p).await }));
    }
    let answers: Vec<Answer> = join_all(tasks)
        .await
        .into_iter()
        .map(|r| r.expect("request task"))
        .collect();
    // 5 s after the last answer: what the prefill engines still hold.
    let mut kv_after = pool.prefill_kv().await;
    for _ in 0..200 {
        if kv_after.iter().all(|&v| v == 0.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
        kv_after = pool.prefill_kv().await;
    }
    Report {
        answers,
        secs,
        rate,
        kv_after,
    }
}

/// `factor` times the measured capacity, unless `fixed_rate` is given.
async fn run(secs: f64, fixed_rate: Option<f64>, factor: f64) -> Report {
    let pool = Pool::start().await;
    let rate = match fixed_rate {
        Some(r) => r,
        None => factor * capacity(&pool, 48, 5.0).await,
    };
    let report = open_loop(&pool, rate, secs, 7).await;
    eprintln!("overload: {}", report.summary());
    for a in &report.answers {
        assert!(
            (a.status == 200 && a.done) || (a.status == 503 && a.error_ok),
            "{a:?}: {}",
            report.summary()
        );
    }
    assert!(
        report.kv_after.iter().all(|&v| v == 0.0),
        "prefill KV still pinned 5 s after the last answer: {}",
        report.summary()
    );
    let mut held = pool.held().await;
    for _ in 0..200 {
        if held.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
        held = pool.held().await;
    }
    assert!(held.is_empty(), "{held:?}");
    report
}

#[tokio::test]
async fn three_times_the_capacity_is_refused_cleanly_and_leaks_nothing() {
    // Three times, not the acceptance run's two: the capacity is measured while the rest of the
    // suite loads the same two cores, which underestimates the pool, and twice that estimate
    // was sometimes served whole within the 64-request queue (no refusal to check).
    let r = run(5.0, None, 3.0).await;
    assert!(
        r.answers.iter().any(|a| a.status == 503),
        "three times the capacity must refuse some: {}",
        r.summary()
    );
    assert!(r.goodput() > 0.0, "{}", r.summary());
}

#[tokio::test]
#[ignore = "the acceptance run (60 s); see benches/README.md"]
async fn overload_report() {
    let secs = std::env::var("TANDEM_OVERLOAD_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60.0);
    let rate = std::env::var("TANDEM_OVERLOAD_RATE")
        .ok()
        .and_then(|v| v.parse().ok());
    run(secs, rate, 2.0).await;
}
