//! `tandem bench balance`: decode placement under closed-loop P/D load.
//!
//! Fresh simulated pools per decode policy (prefill `P` + decode `D` engines, disaggregation
//! always), `streams` closed-loop streams of unique prompts (no prefix reuse, so only placement
//! and the KV path matter). Every `sample_ms` the decode engines' `vllm:num_requests_running` and
//! `vllm:num_requests_waiting` are read from their `/metrics`; the report gives the mean running
//! per engine, the mean gap between the busiest and the idlest engine relative to the mean, the
//! client's ITL and TTFT, and the coordinator's decode-first-token phase (handoff dispatched to
//! first content byte, which holds the KV pull), all in simulated time (real × time scale).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use serde_json::json;
use tandem_config::{DisaggregationMode, PolicyName};
use tandem_sim::profile::GpuKind;
use tandem_sim::RunningSim;

use crate::bench::{one, Run};
use crate::harness::{self, start_coordinator_with, start_sim, BoxError};

#[derive(Debug, Args)]
pub struct BalanceArgs {
    /// Prefill engines.
    #[arg(long, default_value_t = 2)]
    prefill: usize,
    /// Decode engines.
    #[arg(long, default_value_t = 2)]
    decode: usize,
    /// Concurrent closed-loop streams.
    #[arg(long, default_value_t = 200)]
    streams: usize,
    /// Requests per stream.
    #[arg(long, default_value_t = 10)]
    requests: usize,
    /// Prompt length in tokens (the byte tokenizer: one character, one token).
    #[arg(long, default_value_t = 512)]
    prompt_tokens: usize,
    /// Output tokens per request.
    #[arg(long, default_value_t = 32)]
    max_tokens: u64,
    #[arg(long, default_value = "qwen3-0.6b")]
    model: String,
    /// Simulated seconds per real second.
    #[arg(long, default_value_t = 1.0)]
    time_scale: f64,
    /// Decode policies to compare, comma-separated (each on fresh pools).
    #[arg(long, default_value = "kv-capacity,round-robin")]
    compare: String,
    /// How often the decode engines' queues are sampled (real ms).
    #[arg(long, default_value_t = 50)]
    sample_ms: u64,
    /// Write the figures as JSON here.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

/// A sim's `/metrics` exposition.
async fn scrape(client: &reqwest::Client, sim: &RunningSim) -> Option<String> {
    let r = client
        .get(format!("http://{}/metrics", sim.http_addr))
        .send()
        .await
        .ok()?;
    r.text().await.ok()
}

/// The sum of `name` over all its label sets in an exposition; `None` if it has no sample.
fn total(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .reduce(|a, b| a + b)
}

/// The running and waiting counts a sim reports.
async fn queues(client: &reqwest::Client, sim: &RunningSim) -> Option<(f64, f64)> {
    let text = scrape(client, sim).await?;
    Some((
        total(&text, "vllm:num_requests_running")?,
        total(&text, "vllm:num_requests_waiting")?,
    ))
}

/// The decode engines' own view (simulated seconds, averaged over all of them): queue time
/// (arrival to the pull's start: `c_req` plus the wait for a step boundary), the KV pull, and
/// the prefill phase (pull start to first token: pull, the wait for a step, the step that
/// recomputes the last prompt token and samples), and the engines' own ITL.
async fn engine_phases(client: &reqwest::Client, decode: &[&RunningSim]) -> [f64; 4] {
    let mut acc = [(0.0, 0.0); 4];
    for s in decode {
        let Some(text) = scrape(client, s).await else {
            continue;
        };
        for (i, name) in [
            "vllm:request_queue_time_seconds",
            "vllm:nixl_xfer_time_seconds",
            "vllm:request_prefill_time_seconds",
            "vllm:inter_token_latency_seconds",
        ]
        .iter()
        .enumerate()
        {
            // A histogram's mean over its label sets: Σ_sum ÷ Σ_count.
            acc[i].0 += total(&text, &format!("{name}_sum")).unwrap_or(0.0);
            acc[i].1 += total(&text, &format!("{name}_count")).unwrap_or(0.0);
        }
    }
    acc.map(|(s, n)| if n > 0.0 { s / n * 1e3 } else { f64::NAN })
}

struct Report {
    policy: String,
    mean_running: Vec<f64>,
    mean_waiting: Vec<f64>,
    /// Mean over samples of (max − min running) ÷ the mean running over the run.
    gap_over_mean: f64,
    itl_mean_ms: f64,
    ttft_p50_ms: f64,
    decode_first_token_ms: [f64; 3],
    /// Means in the decode engines: queue, KV pull, prefill phase, ITL (ms, simulated).
    engine_ms: [f64; 4],
    ok: usize,
    errors: usize,
}

async fn run_policy(a: &BalanceArgs, policy: &str) -> Result<Report, BoxError> {
    let name: PolicyName = serde_json::from_value(serde_json::Value::String(policy.into()))
        .map_err(|_| format!("unknown policy `{policy}`"))?;
    let mut sims = Vec::new();
    for i in 0..a.prefill + a.decode {
        sims.push(start_sim(&a.model, GpuKind::H100, a.time_scale, 1, 10 + i as u64).await?);
    }
    let (p, d) = sims.split_at(a.prefill);
    let (p, d): (Vec<&RunningSim>, Vec<&RunningSim>) = (p.iter().collect(), d.iter().collect());
    let t = start_coordinator_with(&p, &d, DisaggregationMode::Always, 1_000_000, |c| {
        c.pools.decode.policy = Some(name);
    })
    .await?;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(a.streams)
        .build()?;
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (client, stop, d) = (client.clone(), stop.clone(), d.clone());
        let every = Duration::from_millis(a.sample_ms);
        async move {
            let mut samples: Vec<Vec<(f64, f64)>> = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let mut row = Vec::new();
                for s in &d {
                    row.push(queues(&client, s).await.unwrap_or((f64::NAN, f64::NAN)));
                }
                samples.push(row);
                tokio::time::sleep(every).await;
            }
            samples
        }
    };
    let url = format!("{}/v1/completions", t.base);
    let load = async {
        let streams = (0..a.streams).map(|i| {
            let (client, url) = (client.clone(), url.clone());
            async move {
                let mut run = Run::default();
                for k in 0..a.requests {
                    // Unique from the first token, so nothing is shared between requests.
                    let head = format!("stream {i} request {k}: ");
                    let prompt: String = head
                        .chars()
                        .chain("balance benchmark prompt ".chars().cycle())
                        .take(a.prompt_tokens.saturating_sub(1))
                        .collect();
                    let body = json!({"prompt": prompt, "max_tokens": a.max_tokens,
                        "ignore_eos": true, "stream": true});
                    one(&client, &url, &body, &mut run).await;
                }
                run
            }
        });
        let runs = futures::future::join_all(streams).await;
        stop.store(true, Ordering::Relaxed);
        runs
    };
    let (runs, samples) = tokio::join!(load, sampler);
    let mut all = Run::default();
    for r in runs {
        all.ttft.extend(r.ttft);
        all.itl.extend(r.itl);
        all.e2e.extend(r.e2e);
        all.errors += r.errors;
    }
    // Only samples while every stream was still running: the tail, where streams finish one by
    // one, says nothing about placement.
    let busy: Vec<&Vec<(f64, f64)>> = samples
        .iter()
        .filter(|row| row.iter().all(|(r, w)| r.is_finite() && w.is_finite()))
        .collect();
    let n = busy.len().max(1) as f64;
    let mean_running: Vec<f64> = (0..d.len())
        .map(|j| busy.iter().map(|row| row[j].0).sum::<f64>() / n)
        .collect();
    let mean_waiting: Vec<f64> = (0..d.len())
        .map(|j| busy.iter().map(|row| row[j].1).sum::<f64>() / n)
        .collect();
    let mean_all = mean_running.iter().sum::<f64>() / d.len().max(1) as f64;
    let gap = busy
        .iter()
        .map(|row| {
            let r = row.iter().map(|x| x.0);
            r.clone().fold(f64::MIN, f64::max) - r.fold(f64::MAX, f64::min)
        })
        .sum::<f64>()
        / n;
    let engine_ms = engine_phases(&client, &d).await;
    let mut dft: Vec<f64> = t
        .running
        .recent()
        .iter()
        .filter_map(|r| r.decode_first_token_s)
        .collect();
    // Client and coordinator time is real; at time scale x the sims' time runs x times faster,
    // so real × x is simulated time.
    let ms = |v: Option<f64>| v.map_or(f64::NAN, |v| v * 1e3 * a.time_scale);
    let itl_mean = a.time_scale * all.itl.iter().sum::<f64>() / all.itl.len().max(1) as f64;
    Ok(Report {
        policy: policy.to_string(),
        mean_running,
        mean_waiting,
        gap_over_mean: gap / mean_all.max(f64::MIN_POSITIVE),
        itl_mean_ms: itl_mean * 1e3,
        ttft_p50_ms: ms(harness::pct(&mut all.ttft, 0.5)),
        decode_first_token_ms: [
            ms(harness::pct(&mut dft, 0.5)),
            ms(harness::pct(&mut dft, 0.9)),
            ms(harness::pct(&mut dft, 0.99)),
        ],
        engine_ms,
        ok: all.e2e.len(),
        errors: all.errors,
    })
}

pub async fn run(a: BalanceArgs) -> Result<(), BoxError> {
    println!(
        "tandem bench balance: {}P+{}D {} H100 sims at x{}, {} closed-loop streams x {} requests, unique {}-token prompts, {} output tokens, disaggregation always",
        a.prefill, a.decode, a.model, a.time_scale, a.streams, a.requests, a.prompt_tokens, a.max_tokens
    );
    let mut reports = Vec::new();
    for policy in a
        .compare
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        reports.push(run_policy(&a, policy).await?);
    }
    println!();
    println!(
        "{:<14} {:>22} {:>16} {:>10} {:>9} {:>10} {:>26} {:>10}",
        "decode policy",
        "mean running per eng.",
        "mean waiting",
        "gap/mean",
        "ITL mean",
        "TTFT p50",
        "decode_first_token p50/90/99",
        "ok/errors"
    );
    let list = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.1}"))
            .collect::<Vec<_>>()
            .join(" / ")
    };
    for r in &reports {
        println!(
            "{:<14} {:>22} {:>16} {:>9.1}% {:>7.2}ms {:>8.1}ms {:>26} {:>10}",
            r.policy,
            list(&r.mean_running),
            list(&r.mean_waiting),
            r.gap_over_mean * 100.0,
            r.itl_mean_ms,
            r.ttft_p50_ms,
            format!(
                "{:.1} / {:.1} / {:.1} ms",
                r.decode_first_token_ms[0], r.decode_first_token_ms[1], r.decode_first_token_ms[2]
            ),
            format!("{}/{}", r.ok, r.errors)
        );
    }
    println!();
    println!("decode engines' means (simulated ms): queue = c_req + wait for a step; pull = KV transfer; prefill phase = pull + wait for a step + the step that samples; ITL as the engines timed it");
    for r in &reports {
        println!(
            "{:<14} queue {:.2}  pull {:.2}  prefill phase {:.2}  ITL {:.2}",
            r.policy, r.engine_ms[0], r.engine_ms[1], r.engine_ms[2], r.engine_ms[3]
        );
    }
    if let Some(path) = &a.json {
        let v: Vec<_> = reports
            .iter()
            .map(|r| {
                json!({"policy": r.policy, "mean_running": r.mean_running,
                "mean_waiting": r.mean_waiting, "gap_over_mean": r.gap_over_mean,
                "itl_mean_ms": r.itl_mean_ms, "ttft_p50_ms": r.ttft_p50_ms,
                "decode_first_token_ms": r.decode_first_token_ms,
                "engine_queue_pull_prefill_ms": r.engine_ms, "ok": r.ok, "errors": r.errors})
            })
            .collect();
        std::fs::write(path, serde_json::to_vec_pretty(&v)?)?;
    }
    if reports.iter().any(|r| r.errors > 0) {
        return Err("some benchmark requests failed".into());
    }
    Ok(())
}
