//! `tandem bench trace`: replay a trace through Tandem over simulated pools, per routing policy.
//!
//! Each policy gets fresh engines (cold caches) and the same requests at the same moments. Sims
//! run `--time-scale` times faster than real time and arrivals are compressed by the same factor
//! (times `--rate-scale`, which raises the load itself); every latency the client measures is
//! multiplied back, so figures are in simulated seconds. Real overheads (HTTP, the coordinator,
//! this process) are multiplied too, which makes the figures slightly pessimistic.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use futures::StreamExt;
use serde_json::json;
use tandem_config::{
    Config, DisaggregationMode, Endpoint, PolicyName, PoolConfig, PoolsConfig, PrefixFeed, Protocol,
};
use tandem_sim::kv_events::KvEventsConfig;
use tandem_sim::profile::GpuKind;
use tandem_sim::RunningSim;
use tandem_workload::{
    infinite_cache_hits, lru_cache_hits, parse_azure, parse_mooncake, side_by_side, synthetic_chat,
    synthetic_conversation, Assignment, ChatParams, ConversationParams, Outcome, Slo, Summary,
    Synthesizer, Trace,
};

use crate::harness::BoxError;

mod plot;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// JSONL with timestamp, input_length, output_length, hash_ids (512-token blocks).
    Mooncake,
    /// CSV TIMESTAMP,ContextTokens,GeneratedTokens.
    Azure,
    /// Built-in multi-turn chat (no file).
    Chat,
    /// Built-in stand-in for the Mooncake conversation trace (no file).
    Conversation,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProtocolArg {
    Http,
    Grpc,
}

#[derive(Debug, Args)]
pub struct TraceArgs {
    /// The trace file (not needed for `--format chat` or `conversation`).
    #[arg(long)]
    file: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "mooncake")]
    format: Format,
    /// Replay only the first N requests.
    #[arg(long)]
    requests: Option<usize>,
    /// Divide inter-arrival times by this (2 = twice the trace's request rate).
    #[arg(long, default_value_t = 1.0)]
    rate_scale: f64,
    /// Simulated seconds per real second, for engines and arrivals alike.
    #[arg(long, default_value_t = 4.0)]
    time_scale: f64,
    /// Prefill engines; 0 replays colocated serving (`mode = "never"`): the `--decode` engines
    /// serve whole requests, routed by each compared policy (no `:DECODE` part then), and take
    /// the prefill-side options (`--feed`, `--prefill-kv-blocks`, `--prefill-kv-offloading-gib`),
    /// as `tandem plan`'s colocated baseline has them.
    #[arg(long, default_value_t = 8)]
    prefill: usize,
    #[arg(long, default_value_t = 8)]
    decode: usize,
    #[arg(long, default_value = "llama-3.1-8b")]
    model: String,
    #[arg(long, default_value = "h100")]
    gpu: String,
    /// Policies to compare, each `PREFILL[:DECODE]` (decode default kv-capacity), comma-separated.
    #[arg(long, default_value = "prefix", value_delimiter = ',')]
    compare: Vec<String>,
    /// Prefix index feed for the prefill pool.
    #[arg(long, default_value = "precise")]
    feed: String,
    /// TTFT objective for goodput, ms.
    #[arg(long, default_value_t = 2000.0)]
    slo_ttft_ms: f64,
    /// TPOT objective for goodput, ms.
    #[arg(long, default_value_t = 100.0)]
    slo_tpot_ms: f64,
    /// Prompts longer than this are left out (the model's context is 131,072 tokens).
    #[arg(long, default_value_t = 120_000)]
    max_prompt_tokens: u32,
    /// KV blocks per prefill engine instead of what the GPU's memory gives (vLLM's
    /// --num-gpu-blocks-override): rehearses a larger cache, e.g. one with a host-memory tier.
    #[arg(long)]
    prefill_kv_blocks: Option<u32>,
    /// GiB of host memory per prefill engine for offloaded KV (vLLM's --kv-offloading-size): a
    /// CPU tier behind each engine's GPU prefix cache, which the precise feed indexes too.
    #[arg(long)]
    prefill_kv_offloading_gib: Option<f64>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The protocol Tandem speaks to both pools: http, or grpc (vLLM's native `vllm.Inference`,
    /// each engine's HTTP port kept for its metrics).
    #[arg(long, value_enum, default_value = "http")]
    protocol: ProtocolArg,
    /// Write every summary as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write charts (PNG and SVG) into this directory: TTFT and TPOT CDFs per policy, the
    /// per-phase TTFT split, and each engine's load over time.
    #[arg(long, value_name = "DIR")]
    plot: Option<PathBuf>,
}

/// One policy's run: its summary, and the per-request outcomes the plots are drawn from.
struct RunResult {
    summary: Summary,
    /// Tokens of KV each prefill engine holds.
    capacity: u64,
    outcomes: Vec<Outcome>,
    prefill_urls: Vec<String>,
    decode_urls: Vec<String>,
}

fn load_trace(a: &TraceArgs) -> Result<Trace, BoxError> {
    let t = read_trace(
        a.format,
        a.file.as_deref(),
        a.seed,
        &ChatParams::default(),
        a.requests,
        a.max_prompt_tokens,
    )?;
    Ok(t.scaled(a.rate_scale)?)
}

/// A trace as `bench trace` and `tandem plan` both read it, so a plan is made for the requests
/// a replay sends: the format's parser or generator (`chat` for the built-in chat), the first
/// `requests`, and prompts over `max_prompt_tokens` left out. Not rate-scaled.
pub(crate) fn read_trace(
    format: Format,
    file: Option<&std::path::Path>,
    seed: u64,
    chat: &ChatParams,
    requests: Option<usize>,
    max_prompt_tokens: u32,
) -> Result<Trace, BoxError> {
    let open = || -> Result<std::io::BufReader<std::fs::File>, BoxError> {
        let p = file.ok_or("--file is required for this format")?;
        Ok(std::io::BufReader::new(
            std::fs::File::open(p).map_err(|e| format!("{}: {e}", p.display()))?,
        ))
    };
    let t = match format {
        Format::Mooncake => parse_mooncake(open()?)?,
        Format::Azure => parse_azure(open()?)?,
        Format::Chat => synthetic_chat(chat, seed)?,
        Format::Conversation => synthetic_conversation(&ConversationParams::default(), seed)?,
    };
    let t = match requests {
        Some(n) => t.head(n),
        None => t,
    };
    let kept: Vec<_> = t
        .requests
        .iter()
        .filter(|r| r.input.len() <= max_prompt_tokens)
        .cloned()
        .collect();
    Ok(Trace::new(t.name.clone(), kept, t.block_tokens))
}

/// Fresh engines for one run: kv events on when the precise feed needs them.
async fn start_pool(
    a: &TraceArgs,
    gpu: GpuKind,
    n: usize,
    events: bool,
    base_seed: u64,
    kv_blocks: Option<u32>,
    offload_gib: Option<f64>,
) -> Result<Vec<(RunningSim, tokio::sync::oneshot::Sender<()>)>, BoxError> {
    let mut out = Vec::new();
    for i in 0..n {
        let mut cfg =
            crate::harness::sim_config(&a.model, gpu, a.time_scale, a.seed, base_seed + i as u64);
        cfg.enable_prompt_tokens_details = true;
        if a.protocol == ProtocolArg::Grpc {
            cfg.grpc_port = Some(0);
        }
        cfg.num_gpu_blocks_override = kv_blocks;
        cfg.kv_offloading_size_gib = offload_gib;
        if events {
            cfg.kv_events = Some(KvEventsConfig {
                endpoint: "tcp://127.0.0.1:0".into(),
                replay_endpoint: Some("tcp://127.0.0.1:0".into()),
                ..KvEventsConfig::default()
            });
        }
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let sim = tandem_sim::start(cfg, listener, async {
            let _ = stopped.await;
        })
        .await?;
        out.push((sim, stop));
    }
    Ok(out)
}

fn endpoint(s: &RunningSim, protocol: ProtocolArg) -> Endpoint {
    let http = format!("http://{}", s.http_addr);
    let (url, metrics) = match (protocol, s.grpc_addr) {
        (ProtocolArg::Grpc, Some(g)) => (format!("http://{g}"), Some(http)),
        _ => (http, None),
    };
    Endpoint {
        kv_events: s.kv_events_endpoint.clone(),
        kv_events_replay: s.kv_events_replay_endpoint.clone(),
        metrics,
        ..Endpoint::new(url)
    }
}

fn protocol(a: &TraceArgs) -> Protocol {
    match a.protocol {
        ProtocolArg::Http => Protocol::Http,
        ProtocolArg::Grpc => Protocol::Grpc,
    }
}

fn parse_policy(s: &str) -> Result<PolicyName, BoxError> {
    let v = serde_json::Value::String(s.trim().to_string());
    serde_json::from_value(v).map_err(|_| format!("unknown policy `{s}`").into())
}

/// One policy's run.
async fn run_one(
    a: &TraceArgs,
    trace: &Trace,
    synth: &Synthesizer,
    spec: &str,
    bound: f64,
) -> Result<RunResult, BoxError> {
    let colocated = a.prefill == 0;
    let (p_name, d_name) = match spec.split_once(':') {
        Some(_) if colocated => {
            return Err(format!(
            "--prefill 0 replays colocated engines, one pool with one policy: `{spec}` names two"
        )
            .into())
        }
        Some((p, d)) => (parse_policy(p)?, parse_policy(d)?),
        // Colocated, the one pool routes by the policy given.
        None if colocated => {
            let p = parse_policy(spec)?;
            (p, p)
        }
        None => (parse_policy(spec)?, PolicyName::KvCapacity),
    };
    let gpu = GpuKind::parse(&a.gpu).ok_or_else(|| format!("unknown GPU `{}`", a.gpu))?;
    let feed = match a.feed.as_str() {
        "precise" => PrefixFeed::Precise,
        "approximate" => PrefixFeed::Approximate,
        other => return Err(format!("unknown feed `{other}` (precise, approximate)").into()),
    };
    let events = feed == PrefixFeed::Precise && p_name == PolicyName::Prefix;
    let prefill = start_pool(
        a,
        gpu,
        a.prefill,
        events,
        1000,
        a.prefill_kv_blocks,
        a.prefill_kv_offloading_gib,
    )
    .await?;
    let decode = if colocated {
        // These engines prefill: they take the prefill side's cache options and feed.
        start_pool(
            a,
            gpu,
            a.decode,
            events,
            2000,
            a.prefill_kv_blocks,
            a.prefill_kv_offloading_gib,
        )
        .await?
    } else {
        start_pool(a, gpu, a.decode, false, 2000, None, None).await?
    };
    let prefilling = if colocated { &decode } else { &prefill };
    // The host tier holds what the GPU caches and more (written through), so an engine's reach
    // is the larger of the two.
    let engine_blocks = prefilling.first().map_or(0, |(s, _)| {
        u64::from(s.num_gpu_blocks.max(s.num_host_blocks))
    });
    let capacity = engine_blocks * 16;
    let mut pp = PoolConfig {
        endpoints: prefill
            .iter()
            .map(|(s, _)| endpoint(s, a.protocol))
            .collect(),
        protocol: protocol(a),
        policy: Some(p_name),
        ..PoolConfig::default()
    };
    if events {
        pp.prefix_index.feed = PrefixFeed::Precise;
    }
    // Room for every block the engines can report, GPU and host tiers (a quarter spare for
    // both copies of blocks in flight between tiers).
    let reportable = engine_blocks * prefilling.len() as u64;
    pp.prefix_index.max_blocks = pp.prefix_index.max_blocks.max(reportable + reportable / 4);
    let mut dp = PoolConfig {
        endpoints: decode
            .iter()
            .map(|(s, _)| endpoint(s, a.protocol))
            .collect(),
        protocol: protocol(a),
        policy: Some(d_name),
        ..PoolConfig::default()
    };
    if colocated {
        dp.prefix_index = pp.prefix_index.clone();
    }
    let mut cfg = Config::new(PoolsConfig::new(pp, dp));
    cfg.disaggregation.mode = if colocated {
        DisaggregationMode::Never
    } else {
        DisaggregationMode::Always
    };
    cfg.health.interval_ms = 100;
    cfg.health.scrape_interval_ms = 100;
    cfg.server.recent_requests = trace.requests.len().max(1);
    // Overload is what the comparison is about: let requests wait rather than time out.
    for t in [
        &mut cfg.timeouts.prefill_ms,
        &mut cfg.timeouts.first_token_ms,
        &mut cfg.timeouts.handoff_ms,
        &mut cfg.timeouts.idle_ms,
    ] {
        *t = 3_600_000;
    }
    cfg.admission.max_wait_ms = 3_600_000;
    let coordinator = crate::harness::serve(cfg).await?;
    let base = coordinator.base.clone();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(1024)
        .build()?;

    let k = a.time_scale;
    let n = trace.requests.len();
    let done = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    let mut shown = Instant::now();
    for (i, r) in trace.requests.iter().enumerate() {
        let at = start + Duration::from_secs_f64(r.at_ms / 1000.0 / k);
        let ids = synth.tokens(r);
        let body = json!({
            "prompt": ids,
            "max_tokens": r.output_tokens.max(1),
            "ignore_eos": true,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        let body = bytes::Bytes::from(serde_json::to_vec(&body)?);
        let (client, url, finished) = (
            client.clone(),
            format!("{base}/v1/completions"),
            done.clone(),
        );
        let prompt = r.input.len();
        tokio::time::sleep_until(at.into()).await;
        tasks.push(tokio::spawn(async move {
            let o = one(&client, &url, body, format!("bench-{i}"), prompt, k).await;
            finished.fetch_add(1, Ordering::Relaxed);
            o
        }));
        if shown.elapsed() > Duration::from_millis(250) {
            progress(spec, done.load(Ordering::Relaxed), i + 1, n);
            shown = Instant::now();
        }
    }
    let mut outcomes = Vec::with_capacity(n);
    let mut last = Instant::now();
    for t in tasks {
        outcomes.push(t.await?);
        if last.elapsed() > Duration::from_millis(250) {
            progress(spec, done.load(Ordering::Relaxed), n, n);
            last = Instant::now();
        }
    }
    progress(spec, n, n, n);
    eprintln!();
    // Why engines were chosen, and what the index predicted against what engines reported.
    if let Ok(r) = client.get(format!("{base}/metrics")).send().await {
        let text = r.text().await.unwrap_or_default();
        for line in text.lines().filter(|l| {
            l.starts_with("tandem_route_decisions_total")
                || l.starts_with("tandem_predicted_cached_tokens_total")
                || l.starts_with("tandem_reported_cached_tokens_total")
                || l.starts_with("tandem_admission_")
                || l.starts_with("tandem_engine_prefill_tokens_per_second")
        }) {
            eprintln!("  {line}");
        }
    }
    let duration_s = start.elapsed().as_secs_f64() * k;
    // Which engines served each request: the coordinator's own records.
    let recs: std::collections::HashMap<String, tandem_proxy::RequestRecord> = coordinator
        .running
        .recent()
        .into_iter()
        .map(|r| (r.request_id.clone(), r))
        .collect();
    for (i, o) in outcomes.iter_mut().enumerate() {
        if let Some(r) = recs.get(&format!("bench-{i}")) {
            o.prefill_engine = r.prefill_engine.clone();
            o.decode_engine = r.decode_engine.clone();
            // The same records the demo prints: simulated ms, like the client-side figures.
            if let (Some(q), Some(p), Some(h), Some(d)) =
                (r.queue_s, r.prefill_s, r.handoff_s, r.decode_first_token_s)
            {
                o.phases_ms = Some([q, p, h, d].map(|s| s * 1000.0 * k));
            }
        }
    }
    // The URLs the records name: the endpoints' own (gRPC ones when the pools speak gRPC).
    let urls = |v: &[(RunningSim, _)]| -> Vec<String> {
        v.iter().map(|(s, _)| endpoint(s, a.protocol).url).collect()
    };
    let summary = Summary::from_outcomes(
        &outcomes,
        Slo {
            ttft_ms: a.slo_ttft_ms,
            tpot_ms: a.slo_tpot_ms,
        },
        duration_s,
    )
    .with_hit_bound(bound)
    .with_engines(&urls(prefilling), &urls(&decode));
    let (prefill_urls, decode_urls) = (urls(&prefill), urls(&decode));
    drop(coordinator);
    for (_, s) in prefill.into_iter().chain(decode) {
        let _ = s.send(());
    }
    Ok(RunResult {
        summary,
        capacity,
        outcomes,
        prefill_urls,
        decode_urls,
    })
}

fn progress(spec: &str, done: usize, sent: usize, n: usize) {
    use std::io::Write;
    let width = 30;
    let filled = done * width / n.max(1);
    eprint!(
        "\r{spec:>24} [{}{}] {done}/{n} done, {sent} sent",
        "#".repeat(filled),
        " ".repeat(width - filled)
    );
    let _ = std::io::stderr().flush();
}

/// One streamed request; times in simulated ms (real × `k`).
async fn one(
    client: &reqwest::Client,
    url: &str,
    body: bytes::Bytes,
    id: String,
    prompt: u32,
    k: f64,
) -> Outcome {
    let mut o = Outcome {
        ok: false,
        ttft_ms: 0.0,
        itl_ms: Vec::new(),
        e2e_ms: 0.0,
        output_tokens: 0,
        prompt_tokens: prompt,
        cached_tokens: 0,
        prefill_engine: None,
        decode_engine: None,
        phases_ms: None,
    };
    let t0 = Instant::now();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0 * k;
    let resp = client
        .post(url)
        .header("content-type", "application/json")
        .header("x-request-id", id)
        .body(body)
        .send()
        .await;
    let Ok(resp) = resp else { return o };
    if !resp.status().is_success() {
        return o;
    }
    let mut stream = resp.bytes_stream();
    let mut buf: Vec<u8> = Vec::new();
    let mut last: Option<Instant> = None;
    while let Some(chunk) = stream.next().await {
        let Ok(chunk) = chunk else { return o };
        let now = Instant::now();
        buf.extend_from_slice(&chunk);
        while let Some(pos) = buf.windows(2).position(|w| w == b"\n\n") {
            let ev: Vec<u8> = buf.drain(..pos + 2).collect();
            let Some(data) = ev.strip_prefix(b"data: ") else {
                continue;
            };
            let data = &data[..data.len() - 2];
            if data == b"[DONE]" {
                o.ok = true;
                o.e2e_ms = ms(now - t0);
                return o;
            }
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else {
                continue;
            };
            if v.get("error").is_some() {
                return o;
            }
            let text = v["choices"][0]["text"].as_str().unwrap_or("");
            let content = v["choices"][0]["text"].is_string()
                && (!text.is_empty() || v["choices"][0]["finish_reason"].is_string());
            if content {
                o.output_tokens += 1;
                match last {
                    None => o.ttft_ms = ms(now - t0),
                    Some(l) => o.itl_ms.push(ms(now - l)),
                }
                last = Some(now);
            }
            if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
                o.cached_tokens = u["prompt_tokens_details"]["cached_tokens"]
                    .as_u64()
                    .unwrap_or(0) as u32;
                if let Some(c) = u["completion_tokens"].as_u64() {
                    o.output_tokens = c as u32;
                }
            }
        }
    }
    o
}

pub async fn run(a: TraceArgs) -> Result<(), BoxError> {
    let trace = load_trace(&a)?;
    let stats = trace.stats();
    eprintln!(
        "trace {}: {} requests over {:.0} s (after rate scale {}), {:.0} input tok/s",
        trace.name,
        stats.requests,
        stats.span_ms / 1000.0,
        a.rate_scale,
        stats.input_tokens_per_s.unwrap_or(0.0)
    );
    // The engines' 16-token blocks decide what is shareable; the trace's own 512-token ids give
    // the same bound for Mooncake, and the only one for traces without ids.
    let bt = trace.block_tokens.or(Some(16));
    let inf = infinite_cache_hits(&trace, bt)?;
    // The engines that prefill hold the caches: the decode engines themselves when colocated.
    let caches = if a.prefill == 0 { a.decode } else { a.prefill };
    let rr = lru_cache_hits(&trace, bt, caches, None, Assignment::RoundRobin)?;
    eprintln!(
        "prefix-hit upper bound (one infinite cache): {:.1} % of prompt tokens; round-robin over {} infinite caches: {:.1} %",
        inf.token_fraction() * 100.0,
        caches,
        rr.total.token_fraction() * 100.0
    );
    let synth = Synthesizer::new(a.seed, 0..256)?;
    let mut results: Vec<(String, Summary)> = Vec::new();
    let mut runs: Vec<(String, RunResult)> = Vec::new();
    let mut capacity = 0;
    for spec in &a.compare {
        let r = run_one(&a, &trace, &synth, spec, inf.token_fraction()).await?;
        capacity = r.capacity;
        results.push((spec.clone(), r.summary.clone()));
        runs.push((spec.clone(), r));
    }
    // What caches of the engines' real size allow: the infinite bound cannot be reached when
    // each engine holds a few hundred thousand tokens. An offline LRU simulation with the
    // engines' KV capacity, longest-prefix routing (no load term) and round-robin, for scale.
    let lp = lru_cache_hits(
        &trace,
        bt,
        caches,
        Some(capacity),
        Assignment::LongestPrefix,
    )?;
    let lrr = lru_cache_hits(&trace, bt, caches, Some(capacity), Assignment::RoundRobin)?;
    // One LRU as large as the whole pool: what routing could keep if the pool's caches held no
    // block twice and every request found its history (a reference, not a proof of optimum).
    let pooled = lru_cache_hits(
        &trace,
        bt,
        1,
        Some(capacity.saturating_mul(caches as u64)),
        Assignment::RoundRobin,
    )?;
    eprintln!(
        "with {} LRU caches of {} tokens (each prefill engine's KV, host tier included): longest-prefix {:.1} %, round-robin {:.1} % of prompt tokens; one LRU of all {} tokens: {:.1} %",
        caches,
        capacity,
        lp.total.token_fraction() * 100.0,
        lrr.total.token_fraction() * 100.0,
        capacity.saturating_mul(caches as u64),
        pooled.total.token_fraction() * 100.0
    );
    let cols: Vec<(&str, &Summary)> = results.iter().map(|(n, s)| (n.as_str(), s)).collect();
    println!("{}", side_by_side(&cols));
    if let Some(p) = &a.json {
        let v = json!({
            "trace": trace.name,
            "requests": stats.requests,
            "rate_scale": a.rate_scale,
            "time_scale": a.time_scale,
            "prefill_engines": a.prefill,
            "decode_engines": a.decode,
            "model": a.model,
            "gpu": a.gpu,
            "feed": a.feed,
            "upper_bound_token_hit": inf.token_fraction(),
            "prefill_kv_tokens": capacity,
            "lru_longest_prefix_token_hit": lp.total.token_fraction(),
            "lru_round_robin_token_hit": lrr.total.token_fraction(),
            "lru_pooled_token_hit": pooled.total.token_fraction(),
            "runs": results.iter().map(|(n, s)| json!({"policy": n, "summary": s})).collect::<Vec<_>>(),
        });
        std::fs::write(p, serde_json::to_string_pretty(&v)?)?;
    }
    if let Some(dir) = &a.plot {
        let arrivals: Vec<f64> = trace.requests.iter().map(|r| r.at_ms).collect();
        let views: Vec<plot::PolicyRun<'_>> = runs
            .iter()
            .map(|(name, r)| plot::PolicyRun {
                name,
                outcomes: &r.outcomes,
                arrivals_ms: &arrivals,
                prefill_urls: &r.prefill_urls,
                decode_urls: &r.decode_urls,
            })
            .collect();
        let slo = Slo {
            ttft_ms: a.slo_ttft_ms,
            tpot_ms: a.slo_tpot_ms,
        };
        let files = plot::write_all(dir, &trace.name, &views, slo)?;
        eprintln!("wrote {} chart files into {}", files.len(), dir.display());
    }
    Ok(())
}
