//! `tandem bench overhead`: the latency Tandem adds over calling a decode engine directly.
//!
//! One simulated engine serves a closed-loop streaming load split four ways: a quarter of the
//! streams go straight to the engine (HTTP), a quarter through the coordinator over HTTP, a
//! quarter through a second coordinator with its metrics off, and a quarter through a third
//! coordinator that calls the same engine over vLLM's gRPC (disaggregation off, so the path is
//! client → Tandem → the same engine). All share the engine's batches and the machine's cores at
//! the same moments, so the differences of their client-side percentiles are what Tandem, its
//! metrics and its gRPC transport add, not run-to-run noise. A second run puts a prefill engine
//! in front (disaggregation always), over HTTP and over gRPC side by side, to measure the
//! params-to-decode-dispatch gap from the coordinators' own records.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use futures::StreamExt;
use serde_json::json;
use tandem_config::DisaggregationMode;
use tandem_sim::profile::GpuKind;

use crate::harness::{self, start_coordinator, start_sim};

#[derive(Debug, Args)]
pub struct OverheadArgs {
    /// Concurrent streams (closed loop: each sends its next request when the last one ends).
    #[arg(long, default_value_t = 200)]
    streams: usize,
    /// Requests per stream, per run.
    #[arg(long, default_value_t = 10)]
    requests: usize,
    /// Output tokens per request.
    #[arg(long, default_value_t = 32)]
    max_tokens: u64,
    /// Prompt length in characters (the byte tokenizer makes that tokens).
    #[arg(long, default_value_t = 512)]
    prompt_chars: usize,
    /// The simulated model (its decode step time sets the token rate the machine must carry).
    #[arg(long, default_value = "llama-3.1-8b")]
    model: String,
    /// Simulated seconds per real second.
    #[arg(long, default_value_t = 1.0)]
    time_scale: f64,
    /// Spread the streams' first requests over this many milliseconds, so arrivals do not come
    /// in one synchronized wave.
    #[arg(long, default_value_t = 1000)]
    stagger_ms: u64,
    /// Give a share of the streams to a second coordinator with its metrics off.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    metrics_off_group: bool,
    /// Give a share of the streams to a coordinator calling the engine over gRPC.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    grpc_group: bool,
    /// Write the figures as JSON here.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
    /// Latency Tandem adds over calling the decode engine directly, and the handoff gap.
    Overhead(OverheadArgs),
    /// Replay a trace (Mooncake, Azure, synthetic chat) through Tandem over simulated pools,
    /// comparing routing policies.
    Trace(crate::trace_bench::TraceArgs),
    /// Decode placement under closed-loop P/D load: how evenly decode policies spread requests,
    /// with ITL and the decode-first-token phase.
    Balance(crate::balance_bench::BalanceArgs),
    /// Relay cost against nginx and direct: tokens/s, CPU and writes per token, memory per held
    /// stream, memory after bursts, added TTFT.
    Relay(crate::relay_bench::RelayArgs),
    /// NIXL READ bandwidth between a prefill and a decode sim process over the real P/D path
    /// (feature `nixl`).
    Nixl(crate::nixl_bench::NixlArgs),
}

pub async fn run(cmd: BenchCommand) -> Result<(), Box<dyn std::error::Error>> {
    match cmd {
        BenchCommand::Overhead(a) => overhead(a).await,
        BenchCommand::Trace(a) => crate::trace_bench::run(a).await,
        BenchCommand::Balance(a) => crate::balance_bench::run(a).await,
        BenchCommand::Relay(a) => crate::relay_bench::run(a).await,
        BenchCommand::Nixl(a) => crate::nixl_bench::run(a).await,
    }
}

#[derive(Debug, Default)]
pub(crate) struct Run {
    pub ttft: Vec<f64>,
    pub itl: Vec<f64>,
    pub e2e: Vec<f64>,
    pub errors: usize,
}

/// Runs `a.streams` streams; stream `i` sends to `bases[i % bases.len()]`. Returns one `Run`
/// per base.
async fn load(bases: &[&str], a: &OverheadArgs) -> Vec<Run> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(a.streams)
        .build()
        .expect("a default client builds");
    let prompt: String = "tandem benchmark prompt "
        .chars()
        .cycle()
        .take(a.prompt_chars)
        .collect();
    let body = Arc::new(
        json!({"prompt": prompt, "max_tokens": a.max_tokens, "ignore_eos": true,
        "stream": true}),
    );
    let mut tasks = Vec::new();
    for i in 0..a.streams {
        let delay = Duration::from_millis(a.stagger_ms * i as u64 / a.streams.max(1) as u64);
        let (client, body, url) = (
            client.clone(),
            body.clone(),
            format!("{}/v1/completions", bases[i % bases.len()]),
        );
        let n = a.requests;
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let mut run = Run::default();
            for _ in 0..n {
                one(&client, &url, &body, &mut run).await;
            }
            run
        }));
    }
    let mut all: Vec<Run> = bases.iter().map(|_| Run::default()).collect();
    for (i, t) in tasks.into_iter().enumerate() {
        let r = t.await.unwrap_or_else(|_| Run {
            errors: 1,
            ..Run::default()
        });
        let into = &mut all[i % bases.len()];
        into.ttft.extend(r.ttft);
        into.itl.extend(r.itl);
        into.e2e.extend(r.e2e);
        into.errors += r.errors;
    }
    all
}

pub(crate) async fn one(
    client: &reqwest::Client,
    url: &str,
    body: &serde_json::Value,
    run: &mut Run,
) {
    let start = Instant::now();
    let resp = match client.post(url).json(body).send().await {
        Ok(r) if r.status().is_success() => r,
        _ => {
            run.errors += 1;
            return;
        }
    };
    let mut stream = resp.bytes_stream();
    let mut last: Option<Instant> = None;
    let mut done = false;
    while let Some(chunk) = stream.next().await {
        let Ok(chunk) = chunk else {
            run.errors += 1;
            return;
        };
        let now = Instant::now();
        // The engine writes one event per frame; count content events in this frame.
        for ev in chunk
            .split(|&b| b == b'\n')
            .filter(|l| l.starts_with(b"data: "))
        {
            if ev == b"data: [DONE]" {
                done = true;
            } else if has_text(ev) {
                match last {
                    None => run.ttft.push((now - start).as_secs_f64()),
                    Some(p) => run.itl.push((now - p).as_secs_f64()),
                }
                last = Some(now);
            }
        }
    }
    if done {
        run.e2e.push(start.elapsed().as_secs_f64());
    } else {
        run.errors += 1;
    }
}

/// A completions chunk with non-empty text.
fn has_text(ev: &[u8]) -> bool {
    const KEY: &[u8] = b"\"text\":\"";
    ev.windows(KEY.len())
        .position(|w| w == KEY)
        .is_some_and(|i| ev.get(i + KEY.len()) != Some(&b'"'))
}

fn pct(v: &mut [f64], q: f64) -> f64 {
    harness::pct(v, q).unwrap_or(f64::NAN)
}

async fn overhead(a: OverheadArgs) -> Result<(), Box<dyn std::error::Error>> {
    println!(
        "tandem bench overhead: {} concurrent streams (shared between direct, through Tandem, through Tandem with metrics off, through Tandem over gRPC) x {} requests, {} output tokens, {}-token prompts, {} H100 sim at x{}",
        a.streams, a.requests, a.max_tokens, a.prompt_chars + 1, a.model, a.time_scale
    );
    let d = start_sim(&a.model, GpuKind::H100, a.time_scale, 1, 1).await?;
    let direct_base = format!("http://{}", d.http_addr);
    let t = start_coordinator(&[], &[&d], DisaggregationMode::Never, 100_000).await?;
    let via = t.base.clone();
    let t_off =
        harness::start_coordinator_with(&[], &[&d], DisaggregationMode::Never, 100_000, |c| {
            c.telemetry.metrics = false
        })
        .await?;
    let via_off = t_off.base.clone();
    let t_grpc =
        harness::start_coordinator_with(&[], &[&d], DisaggregationMode::Never, 100_000, |c| {
            c.pools.decode = harness::grpc_pool(&[&d])
        })
        .await?;
    let via_grpc = t_grpc.base.clone();
    // Warm both paths (connections, allocator) before measuring.
    let warm = OverheadArgs {
        requests: 1,
        stagger_ms: 0,
        json: None,
        model: a.model.clone(),
        ..a
    };
    let mut bases: Vec<&str> = vec![&direct_base, &via];
    let off_at = a.metrics_off_group.then(|| {
        bases.push(&via_off);
        bases.len() - 1
    });
    let grpc_at = a.grpc_group.then(|| {
        bases.push(&via_grpc);
        bases.len() - 1
    });
    load(&bases, &warm).await;
    let skip = t.running.recent().len();
    let skip_off = t_off.running.recent().len();
    let skip_grpc = t_grpc.running.recent().len();
    let mut runs: Vec<Run> = load(&bases, &a).await;
    let mut take = |i: Option<usize>| i.map(|i| std::mem::take(&mut runs[i])).unwrap_or_default();
    let (mut direct, mut tandem, mut off, mut grpc) =
        (take(Some(0)), take(Some(1)), take(off_at), take(grpc_at));
    let queue_of = |c: &harness::Coordinator, skip: usize| -> Vec<f64> {
        c.running.recent()[skip..]
            .iter()
            .filter_map(|r| r.queue_s)
            .collect()
    };
    let mut queue = queue_of(&t, skip);
    // Tandem's own TTFT (arrival → first byte written): what of the added TTFT is the engine
    // serving Tandem's copies later, rather than the two extra hops.
    let mut own_ttft: Vec<f64> = t.running.recent()[skip..]
        .iter()
        .filter_map(|r| r.ttft_s)
        .collect();
    let mut queue_off = queue_of(&t_off, skip_off);
    let mut queue_grpc = queue_of(&t_grpc, skip_grpc);
    drop(t);
    drop(t_off);
    drop(t_grpc);

    // P/D: the handoff gap.
    let p = start_sim(&a.model, GpuKind::H100, a.time_scale, 1, 2).await?;
    let d2 = start_sim(&a.model, GpuKind::H100, a.time_scale, 1, 3).await?;
    let t2 = start_coordinator(&[&p], &[&d2], DisaggregationMode::Always, 100_000).await?;
    let t2g =
        harness::start_coordinator_with(&[&p], &[&d2], DisaggregationMode::Always, 100_000, |c| {
            c.pools.prefill = harness::grpc_pool(&[&p]);
            c.pools.decode = harness::grpc_pool(&[&d2]);
        })
        .await?;
    let pd_base = t2.base.clone();
    let pd_grpc_base = t2g.base.clone();
    let pd_bases: Vec<&str> = if a.grpc_group {
        vec![&pd_base, &pd_grpc_base]
    } else {
        vec![&pd_base]
    };
    load(&pd_bases, &warm).await;
    let skip = t2.running.recent().len();
    let skip_g = t2g.running.recent().len();
    let mut pd_runs = load(&pd_bases, &a).await.into_iter();
    let (pd, pd_grpc) = (
        pd_runs.next().unwrap_or_default(),
        pd_runs.next().unwrap_or_default(),
    );
    let gaps = |c: &harness::Coordinator, skip: usize| -> Vec<f64> {
        c.running.recent()[skip..]
            .iter()
            .filter_map(|r| r.dispatch_gap_s)
            .collect()
    };
    let mut gap = gaps(&t2, skip);
    let mut gap_grpc = gaps(&t2g, skip_g);
    drop(t2);
    drop(t2g);

    let us = |v: f64| v * 1e6;
    let (dt50, dt99) = (pct(&mut direct.ttft, 0.5), pct(&mut direct.ttft, 0.99));
    let (tt50, tt99) = (pct(&mut tandem.ttft, 0.5), pct(&mut tandem.ttft, 0.99));
    let (di50, di99) = (pct(&mut direct.itl, 0.5), pct(&mut direct.itl, 0.99));
    let (ti50, ti99) = (pct(&mut tandem.itl, 0.5), pct(&mut tandem.itl, 0.99));
    let (ot50, ot99) = (pct(&mut off.ttft, 0.5), pct(&mut off.ttft, 0.99));
    let (oi50, oi99) = (pct(&mut off.itl, 0.5), pct(&mut off.itl, 0.99));
    let (q50, q99) = (pct(&mut queue, 0.5), pct(&mut queue, 0.99));
    let (qo50, qo99) = (pct(&mut queue_off, 0.5), pct(&mut queue_off, 0.99));
    let (own50, own99) = (pct(&mut own_ttft, 0.5), pct(&mut own_ttft, 0.99));
    let (g50, g99) = (pct(&mut gap, 0.5), pct(&mut gap, 0.99));
    let (gt50, gt99) = (pct(&mut grpc.ttft, 0.5), pct(&mut grpc.ttft, 0.99));
    let (gi50, gi99) = (pct(&mut grpc.itl, 0.5), pct(&mut grpc.itl, 0.99));
    let (gq50, gq99) = (pct(&mut queue_grpc, 0.5), pct(&mut queue_grpc, 0.99));
    let (gg50, gg99) = (pct(&mut gap_grpc, 0.5), pct(&mut gap_grpc, 0.99));
    println!();
    println!("{:<44} {:>12} {:>12}", "real µs", "p50", "p99");
    let row = |name: &str, a: f64, b: f64| println!("{name:<44} {:>12.0} {:>12.0}", us(a), us(b));
    row("TTFT direct to the decode engine", dt50, dt99);
    row("TTFT through Tandem", tt50, tt99);
    row("  added by Tandem (difference)", tt50 - dt50, tt99 - dt99);
    row(
        "  Tandem's own TTFT (arrival → first byte out)",
        own50,
        own99,
    );
    row("ITL direct", di50, di99);
    row("ITL through Tandem", ti50, ti99);
    row("  added by Tandem (difference)", ti50 - di50, ti99 - di99);
    row("Tandem queue phase (parse, tokenize, plan)", q50, q99);
    row("TTFT through Tandem, metrics off", ot50, ot99);
    row("  metrics cost (on − off)", tt50 - ot50, tt99 - ot99);
    row("ITL through Tandem, metrics off", oi50, oi99);
    row("  metrics cost (on − off)", ti50 - oi50, ti99 - oi99);
    row("Tandem queue phase, metrics off", qo50, qo99);
    row("TTFT through Tandem over gRPC", gt50, gt99);
    row(
        "  added by Tandem over gRPC (difference)",
        gt50 - dt50,
        gt99 - dt99,
    );
    row("ITL through Tandem over gRPC", gi50, gi99);
    row(
        "  added by Tandem over gRPC (difference)",
        gi50 - di50,
        gi99 - di99,
    );
    row("Tandem queue phase, gRPC", gq50, gq99);
    println!(
        "{:<44} {:>12.1} {:>12.1}",
        "P/D params-to-decode-dispatch gap",
        us(g50),
        us(g99)
    );
    println!(
        "{:<44} {:>12.1} {:>12.1}",
        "P/D params-to-decode-dispatch gap, gRPC",
        us(gg50),
        us(gg99)
    );
    println!(
        "requests: direct {} ok / {} errors, through Tandem {} / {}, metrics off {} / {}, gRPC {} / {}, P/D {} / {} ({} gap samples), P/D gRPC {} / {} ({} gap samples)",
        direct.e2e.len(),
        direct.errors,
        tandem.e2e.len(),
        tandem.errors,
        off.e2e.len(),
        off.errors,
        grpc.e2e.len(),
        grpc.errors,
        pd.e2e.len(),
        pd.errors,
        gap.len(),
        pd_grpc.e2e.len(),
        pd_grpc.errors,
        gap_grpc.len()
    );
    let errors =
        direct.errors + tandem.errors + off.errors + grpc.errors + pd.errors + pd_grpc.errors;
    if let Some(path) = &a.json {
        let v = json!({
            "streams": a.streams, "requests_per_stream": a.requests, "max_tokens": a.max_tokens,
            "ttft_direct_us": {"p50": us(dt50), "p99": us(dt99)},
            "ttft_tandem_us": {"p50": us(tt50), "p99": us(tt99)},
            "ttft_added_us": {"p50": us(tt50 - dt50), "p99": us(tt99 - dt99)},
            "itl_direct_us": {"p50": us(di50), "p99": us(di99)},
            "itl_tandem_us": {"p50": us(ti50), "p99": us(ti99)},
            "queue_phase_us": {"p50": us(q50), "p99": us(q99)},
            "ttft_at_tandem_us": {"p50": us(own50), "p99": us(own99)},
            "ttft_metrics_off_us": {"p50": us(ot50), "p99": us(ot99)},
            "itl_metrics_off_us": {"p50": us(oi50), "p99": us(oi99)},
            "queue_phase_metrics_off_us": {"p50": us(qo50), "p99": us(qo99)},
            "metrics_cost_us": {"ttft_p50": us(tt50 - ot50), "ttft_p99": us(tt99 - ot99),
                "itl_p50": us(ti50 - oi50), "itl_p99": us(ti99 - oi99)},
            "dispatch_gap_us": {"p50": us(g50), "p99": us(g99)},
            "ttft_grpc_us": {"p50": us(gt50), "p99": us(gt99)},
            "ttft_added_grpc_us": {"p50": us(gt50 - dt50), "p99": us(gt99 - dt99)},
            "itl_grpc_us": {"p50": us(gi50), "p99": us(gi99)},
            "queue_phase_grpc_us": {"p50": us(gq50), "p99": us(gq99)},
            "dispatch_gap_grpc_us": {"p50": us(gg50), "p99": us(gg99)},
            "errors": errors,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&v)?)?;
    }
    if errors > 0 {
        return Err("some benchmark requests failed".into());
    }
    Ok(())
}
