//! `tandem demo`: the embedded default run.
//!
//! Starts simulated vLLM engines in process (a prefill pool, a decode pool, and a colocated pool
//! of the same total size for comparison), replays a seeded prefix-sharing workload against both
//! over real HTTP, and prints per-phase latency. Until the coordinator lands, the P/D path is
//! driven exactly as vLLM's reference proxy drives it (prefill leg with `do_remote_decode` and
//! `max_tokens` 1, then the decode leg with the returned `kv_transfer_params`), round-robin.
//! All latencies are in simulated seconds (real time multiplied by the time scale).

use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use futures::StreamExt;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tandem_sim::engine::SimClock;
use tandem_sim::profile::GpuKind;
use tandem_sim::{RunningSim, SimConfig};

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Requests per mode.
    #[arg(long, default_value_t = 64)]
    requests: usize,
    /// Mean arrival rate, requests per simulated second (Poisson).
    #[arg(long, default_value_t = 6.0)]
    rate: f64,
    /// Output tokens per request.
    #[arg(long, default_value_t = 128)]
    output_tokens: u64,
    #[arg(long, default_value = "llama-3.1-8b")]
    model: String,
    #[arg(long, default_value = "h100")]
    gpu: String,
    #[arg(long, default_value_t = 2)]
    prefill: usize,
    #[arg(long, default_value_t = 2)]
    decode: usize,
    /// Simulated seconds per real second. Above 1, client-side ITL gets coarse: an 8 ms step
    /// becomes shorter than the timer's resolution, so tokens arrive in bursts (their mean stays
    /// right, and engine-side metrics are stamped in simulated time either way).
    #[arg(long, default_value_t = 1.0)]
    time_scale: f64,
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

/// Per-request observations, simulated seconds.
#[derive(Debug, Default, Clone)]
struct Obs {
    prefill_leg: Option<f64>,
    ttft: f64,
    itls: Vec<f64>,
    e2e: f64,
    tokens: u64,
    ok: bool,
}

/// Pulls one phase's samples out of a request's observations.
type Extract = fn(&Obs) -> Vec<f64>;

#[derive(Debug, Clone)]
struct Req {
    at: f64,
    prompt: String,
}

pub async fn run(args: DemoArgs) -> Result<(), Box<dyn std::error::Error>> {
    let gpu = GpuKind::parse(&args.gpu).ok_or_else(|| format!("unknown GPU `{}`", args.gpu))?;
    if args.prefill == 0 || args.decode == 0 || args.requests == 0 || args.rate <= 0.0 {
        return Err("--prefill, --decode, --requests and --rate must be positive".into());
    }
    let workload = make_workload(&args);
    let total_prompt: usize = workload.iter().map(|r| r.prompt.len()).sum();
    println!(
        "tandem demo: {} on {} | {} requests per mode, Poisson {:.1} req/s, mean prompt {} tokens (8 shared system prompts), {} output tokens | time scale x{}",
        args.model, gpu.name(), args.requests, args.rate, total_prompt / workload.len(), args.output_tokens, args.time_scale
    );
    let client = reqwest::Client::new();

    let mut pool = Vec::new();
    for i in 0..args.prefill + args.decode {
        pool.push(start_sim(&args, gpu, 100 + i as u64).await?);
    }
    let (p, d) = pool.split_at(args.prefill);
    let prefill: Vec<String> = p
        .iter()
        .map(|s| format!("http://{}", s.http_addr))
        .collect();
    let decode: Vec<String> = d
        .iter()
        .map(|s| format!("http://{}", s.http_addr))
        .collect();
    let clock = SimClock::new(args.time_scale);
    let disagg = replay(
        &client,
        &workload,
        clock,
        &args,
        Mode::Disagg { prefill, decode },
    )
    .await;

    let mut colo = Vec::new();
    for i in 0..args.prefill + args.decode {
        colo.push(start_sim(&args, gpu, 200 + i as u64).await?);
    }
    let colocated: Vec<String> = colo
        .iter()
        .map(|s| format!("http://{}", s.http_addr))
        .collect();
    let clock = SimClock::new(args.time_scale);
    let colocated_obs = replay(&client, &workload, clock, &args, Mode::Colocated(colocated)).await;

    println!();
    println!(
        "{:<34} {:>12} {:>12}",
        "phase (simulated ms)",
        format!("{}P+{}D", args.prefill, args.decode),
        format!("{} colocated", args.prefill + args.decode)
    );
    let rows: [(&str, Extract); 4] = [
        ("prefill leg (P, incl. queue)", |o| {
            o.prefill_leg.into_iter().collect()
        }),
        ("TTFT (client)", |o| vec![o.ttft]),
        ("ITL (client)", |o| o.itls.clone()),
        ("E2E (client)", |o| vec![o.e2e]),
    ];
    for (name, f) in rows {
        for (q, label) in [(0.5, "p50"), (0.99, "p99")] {
            let a = pct(disagg.iter().flat_map(f).collect(), q);
            let b = pct(colocated_obs.iter().flat_map(f).collect(), q);
            println!(
                "{:<34} {:>12} {:>12}",
                format!("{name} {label}"),
                fmt_ms(a),
                fmt_ms(b)
            );
        }
    }
    let ok_d = disagg.iter().filter(|o| o.ok).count();
    let ok_c = colocated_obs.iter().filter(|o| o.ok).count();
    let tok_d: u64 = disagg.iter().map(|o| o.tokens).sum();
    let tok_c: u64 = colocated_obs.iter().map(|o| o.tokens).sum();
    println!("{:<34} {:>12} {:>12}", "completed requests", ok_d, ok_c);
    println!("{:<34} {:>12} {:>12}", "output tokens", tok_d, tok_c);

    println!();
    println!("engine-side counters (from each engine's /metrics):");
    for (name, sims) in [("prefill", p), ("decode", d), ("colocated", &colo[..])] {
        let queries = sum(&client, sims, "vllm:prefix_cache_queries_total").await;
        let hits = sum(&client, sims, "vllm:prefix_cache_hits_total").await;
        let xfer = sum(&client, sims, "vllm:nixl_xfer_time_seconds_count").await;
        let xfer_s = sum(&client, sims, "vllm:nixl_xfer_time_seconds_sum").await;
        let usage = sum(&client, sims, "vllm:kv_cache_usage_perc").await;
        let preempt = sum(&client, sims, "vllm:num_preemptions_total").await;
        println!(
            "  {name:<10} prefix-cache hit rate {:>5.1}% | KV pulls {:>4} (mean {:>6.2} ms modeled) | preemptions {:>3} | KV usage now {:.3}",
            if queries > 0.0 { 100.0 * hits / queries } else { 0.0 },
            xfer,
            if xfer > 0.0 { 1000.0 * xfer_s / xfer } else { 0.0 },
            preempt,
            usage
        );
    }
    if ok_d != workload.len() || ok_c != workload.len() {
        return Err(format!(
            "{} of {} disaggregated and {} colocated requests failed",
            workload.len() - ok_d,
            workload.len(),
            workload.len() - ok_c
        )
        .into());
    }
    Ok(())
}

async fn start_sim(
    args: &DemoArgs,
    gpu: GpuKind,
    seed: u64,
) -> Result<RunningSim, Box<dyn std::error::Error>> {
    let mut cfg = SimConfig::new(&args.model, gpu);
    cfg.time_scale = args.time_scale;
    // Same sampling seed everywhere, so text matches across engines; distinct hash seeds as in vLLM.
    cfg.seed = args.seed;
    cfg.hash_seed = Some(seed.to_string());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    Ok(tandem_sim::start(cfg, listener, std::future::pending()).await?)
}

fn make_workload(args: &DemoArgs) -> Vec<Req> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(args.seed);
    let words = [
        "tensor", "cache", "prefill", "decode", "route", "block", "token", "stream", "engine",
        "batch",
    ];
    let text = |rng: &mut rand_chacha::ChaCha8Rng, chars: usize| {
        let mut s = String::with_capacity(chars + 8);
        while s.len() < chars {
            s.push_str(words[rng.random_range(0..words.len())]);
            s.push(' ');
        }
        s.truncate(chars);
        s
    };
    let systems: Vec<String> = (0..8).map(|_| text(&mut rng, 1536)).collect();
    let mut t = 0.0;
    (0..args.requests)
        .map(|_| {
            let u: f64 = rng.random_range(f64::EPSILON..1.0);
            t += -u.ln() / args.rate;
            let sys = &systems[rng.random_range(0..systems.len())];
            let user_len = rng.random_range(256..2560);
            Req {
                at: t,
                prompt: format!("{sys}{}", text(&mut rng, user_len)),
            }
        })
        .collect()
}

enum Mode {
    Disagg {
        prefill: Vec<String>,
        decode: Vec<String>,
    },
    Colocated(Vec<String>),
}

async fn replay(
    client: &reqwest::Client,
    workload: &[Req],
    clock: SimClock,
    args: &DemoArgs,
    mode: Mode,
) -> Vec<Obs> {
    let mode = Arc::new(mode);
    let mut tasks = Vec::new();
    for (i, r) in workload.iter().enumerate() {
        let client = client.clone();
        let mode = mode.clone();
        let r = r.clone();
        let max_tokens = args.output_tokens;
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(clock.instant_at(r.at)).await;
            one(&client, &mode, i, &r, max_tokens, clock)
                .await
                .unwrap_or_default()
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap_or_default());
    }
    out
}

async fn one(
    client: &reqwest::Client,
    mode: &Mode,
    i: usize,
    r: &Req,
    max_tokens: u64,
    clock: SimClock,
) -> Result<Obs, reqwest::Error> {
    let start = clock.now();
    let rid = format!("demo-{i}");
    let mut body = json!({"model": null, "prompt": r.prompt, "max_tokens": max_tokens, "ignore_eos": true,
        "stream": true, "stream_options": {"include_usage": true}});
    body.as_object_mut().map(|o| o.remove("model"));
    let mut obs = Obs::default();
    let target = match mode {
        Mode::Colocated(engines) => engines[i % engines.len()].clone(),
        Mode::Disagg { prefill, decode } => {
            let mut p = body.clone();
            p["kv_transfer_params"] = json!({"do_remote_decode": true, "do_remote_prefill": false,
                "remote_engine_id": null, "remote_block_ids": null, "remote_host": null, "remote_port": null});
            p["stream"] = json!(false);
            p["max_tokens"] = json!(1);
            p.as_object_mut().map(|o| o.remove("stream_options"));
            let resp: Value = client
                .post(format!("{}/v1/completions", prefill[i % prefill.len()]))
                .header("X-Request-Id", &rid)
                .json(&p)
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            obs.prefill_leg = Some(clock.now() - start);
            if let Some(kv) = resp.get("kv_transfer_params").filter(|v| !v.is_null()) {
                body["kv_transfer_params"] = kv.clone();
            }
            decode[i % decode.len()].clone()
        }
    };
    let resp = client
        .post(format!("{target}/v1/completions"))
        .header("X-Request-Id", &rid)
        .json(&body)
        .send()
        .await?
        .error_for_status()?;
    let mut stream = resp.bytes_stream();
    let mut buf = Vec::new();
    let mut last = None;
    while let Some(chunk) = stream.next().await {
        buf.extend_from_slice(&chunk?);
        while let Some(pos) = buf.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buf.drain(..pos + 2).collect();
            let line = String::from_utf8_lossy(&event);
            let Some(data) = line.trim().strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                obs.ok = true;
                continue;
            }
            let v: Value = serde_json::from_str(data).unwrap_or(Value::Null);
            if v.get("error").is_some() {
                return Ok(obs);
            }
            if let Some(u) = v
                .get("usage")
                .and_then(|u| u.get("completion_tokens"))
                .and_then(Value::as_u64)
            {
                obs.tokens = u;
            }
            if v.get("choices")
                .and_then(Value::as_array)
                .is_some_and(|c| !c.is_empty())
            {
                let now = clock.now();
                match last {
                    None => obs.ttft = now - start,
                    Some(prev) => obs.itls.push(now - prev),
                }
                last = Some(now);
            }
        }
    }
    obs.e2e = clock.now() - start;
    Ok(obs)
}

async fn sum(client: &reqwest::Client, sims: &[RunningSim], metric: &str) -> f64 {
    let mut t = 0.0;
    for s in sims {
        t += scrape(client, s, metric).await.unwrap_or(0.0);
    }
    t
}

async fn scrape(client: &reqwest::Client, sim: &RunningSim, metric: &str) -> Option<f64> {
    let text = client
        .get(format!("http://{}/metrics", sim.http_addr))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .filter(|l| l.starts_with(metric) && l[metric.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .reduce(|a, b| a + b)
}

fn pct(mut v: Vec<f64>, q: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let idx = ((v.len() - 1) as f64 * q).round() as usize;
    Some(v[idx])
}

fn fmt_ms(v: Option<f64>) -> String {
    v.map_or("-".into(), |s| format!("{:.1}", s * 1000.0))
}
