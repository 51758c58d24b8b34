//! The live P:D recommendation (`tandem_pd_ratio{kind="recommended"}`, `/admin/plan`) follows
//! the work the pools do: long prompts with one output token call for prefill engines, short
//! prompts with long answers for decode engines. Real sims (Llama-3.1-8B on H100 in real time, so
//! compute rather than HTTP dominates each leg, even on a loaded machine) behind the real binary,
//! 2P+2D.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::{metric_in, Sim, Tandem};

/// One workload: concurrent clients sending back to back, each prompt fresh token ids (no
/// prefix cache hits, so every prompt token is prefill work).
#[derive(Clone, Copy)]
struct Work {
    clients: usize,
    prompt_tokens: u32,
    max_tokens: u32,
}

const PREFILL_HEAVY: Work = Work {
    clients: 4,
    prompt_tokens: 6000,
    max_tokens: 1,
};
/// 96 streams: 0.375 engines' worth of decode batch (vLLM's 256 per engine), against prefill
/// legs of 16 tokens.
const DECODE_HEAVY: Work = Work {
    clients: 96,
    prompt_tokens: 16,
    max_tokens: 2000,
};

/// Runs `w` until finished; counts the answers that came back 200.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    /// The first answer that was not 200, for the failure message.
    failed: Arc<std::sync::Mutex<Option<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(t: &Tandem, w: Work, seed: u64) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(std::sync::Mutex::new(None));
        let tasks = (0..w.clients as u64)
            .map(|c| {
                let (client, url) = (t.client.clone(), format!("{}/v1/completions", t.url));
                let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
                tokio::spawn(async move {
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        // Distinct ids per request from the first block on (the coordinator's
                        // built-in byte-level vocabulary: ids below 256), seeded.
                        let mut x = seed * 1_000_003 + c * 10_007 + n * 7 + 1;
                        let ids: Vec<u64> = (0..w.prompt_tokens)
                            .map(|_| {
                                x = x
                                    .wrapping_mul(6_364_136_223_846_793_005)
                                    .wrapping_add(1_442_695_040_888_963_407);
                                1 + (x >> 33) % 250
                            })
                            .collect();
                        let body = json!({"prompt": ids, "max_tokens": w.max_tokens,
                            "ignore_eos": true, "stream": false});
                        let why = match client.post(&url).json(&body).send().await {
                            Ok(r) if r.status() == 200 => {
                                ok.fetch_add(1, Ordering::Relaxed);
                                None
                            }
                            Ok(r) => Some(format!(
                                "{}: {}",
                                r.status(),
                                r.text().await.unwrap_or_default()
                            )),
                            Err(e) => Some(e.to_string()),
                        };
                        if let Some(w) = why {
                            failed.lock().unwrap().get_or_insert(w);
                        }
                        n += 1;
                    }
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failed,
            tasks,
        }
    }

    /// Stop (requests in flight are dropped, as a client going away drops them), and return how
    /// many requests were served and the first failure.
    async fn finish(self) -> (u64, Option<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.abort();
            let _ = t.await;
        }
        let failed = self.failed.lock().unwrap().take();
        (self.ok.load(Ordering::Relaxed), failed)
    }
}

async fn recommended(t: &Tandem) -> f64 {
    metric_in(
        &t.metrics().await,
        "tandem_pd_ratio",
        &[("kind", "recommended")],
    )
}

async fn plan(t: &Tandem) -> Value {
    t.get("/admin/plan")
        .await
        .json()
        .await
        .expect("/admin/plan answers JSON")
}

/// Poll the gauge every 250 ms until `done` holds or `limit` passes; returns the last value.
async fn wait_ratio(t: &Tandem, limit: Duration, done: impl Fn(f64) -> bool) -> f64 {
    let until = Instant::now() + limit;
    loop {
        let v = recommended(t).await;
        if done(v) || Instant::now() > until {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test]
async fn the_recommended_ratio_moves_from_prefill_to_decode_as_the_workload_shifts() {
    let sim = || Sim::spawn(&[]);
    let (p0, p1, d0, d1) = tokio::join!(sim(), sim(), sim(), sim());
    let cfg = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n\
         [pools]\ntarget_ratio = \"1:1\"\n\n\
         [pools.prefill]\nendpoints = [\"{}\", \"{}\"]\n\n\
         [pools.decode]\nendpoints = [\"{}\", \"{}\"]\n\n\
         [disaggregation]\nmode = \"always\"\n\n\
         [health]\ninterval_ms = 100\nscrape_interval_ms = 100\n",
        p0.url, p1.url, d0.url, d1.url
    );
    let t = Tandem::start(&cfg).await;
    let before = plan(&t).await;
    assert_eq!(before["live"]["prefill"], 2, "{before}");
    assert_eq!(before["target"], 1.0, "{before}");
    assert!(before["recommended"].is_null(), "no work yet: {before}");

    // Long prompts, one token each: the prefill engines do nearly all the work. Stopped as soon
    // as the recommendation says so, so the next phase starts from a young average.
    let load = Load::start(&t, PREFILL_HEAVY, 1);
    // A young average starts near its floor (a side with no work yet counts a little), so wait
    // for a clear answer rather than the first.
    let high = wait_ratio(&t, Duration::from_secs(40), |v| v >= 8.0).await;
    let p = plan(&t).await;
    let (served, failed) = load.finish().await;
    assert!(served > 0, "no request served; first failure: {failed:?}");
    assert_eq!(failed, None);
    assert!(high >= 8.0, "prefill-heavy work gave ratio {high}: {p:#}");
    let r = &p["recommended"];
    assert!(r["prefill"].as_u64() > r["decode"].as_u64(), "{p:#}");
    assert!(
        r["reason"]
            .as_str()
            .is_some_and(|s| s.contains("move engines to prefill")),
        "{p:#}"
    );
    assert!(
        p["load"]["prefill"]["load"].as_f64() > p["load"]["decode"]["load"].as_f64(),
        "{p:#}"
    );

    // Short prompts, long answers: the decode engines stream all the time.
    let load = Load::start(&t, DECODE_HEAVY, 2);
    let shifted = Instant::now();
    let low = wait_ratio(&t, Duration::from_secs(90), |v| v <= 0.5).await;
    eprintln!(
        "recommended ratio {high:.2} under prefill-heavy work, {low:.2} {:.1} s into decode-heavy work",
        shifted.elapsed().as_secs_f64()
    );
    let p = plan(&t).await;
    let (_, failed) = load.finish().await;
    // Answers of 2,000 tokens may all still be streaming: what counts is that none failed and
    // the decode engines held the streams.
    assert_eq!(failed, None);
    assert!(
        p["load"]["decode"]["inflight"].as_f64() > Some(24.0),
        "{p:#}"
    );
    assert!(
        low <= 0.5,
        "decode-heavy work left ratio {low} (was {high}): {p:#}"
    );
    let r = &p["recommended"];
    assert!(r["decode"].as_u64() > r["prefill"].as_u64(), "{p:#}");
    assert!(
        r["reason"]
            .as_str()
            .is_some_and(|s| s.contains("move engines to decode")),
        "{p:#}"
    );
    // The live and target gauges stay what the pools and the config say.
    let m = t.metrics().await;
    assert_eq!(metric_in(&m, "tandem_pd_ratio", &[("kind", "live")]), 1.0);
    assert_eq!(metric_in(&m, "tandem_pd_ratio", &[("kind", "target")]), 1.0);
}
