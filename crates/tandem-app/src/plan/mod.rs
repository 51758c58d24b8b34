//! `tandem plan`: which P:D split, disaggregation mode, prefill policy and host tier serve a
//! trace best on a GPU budget, from virtual-time simulations of the whole fleet
//! (`tandem-fleet`), with the colocated deployment on the same GPUs as the baseline.
//!
//! For every candidate configuration the planner finds the highest arrival rate (a scale of the
//! trace's own) at which the SLO attainment target still holds, by bracketing and bisection
//! ([`search`]): DistServe's per-GPU goodput is that rate over the configuration's GPUs. The
//! sweep is two-staged to stay within minutes: every split with Tandem's defaults first, then
//! the mode, threshold, policy and host tier around the best splits. Configurations are
//! independent, so they run on every core.
//!
//! `--fixed P:D --rate-scale X` runs one configuration at one rate instead, printing the same
//! table as `tandem bench trace` (the fleet simulator against a real-time replay).

mod output;
mod search;
mod sweep;

use std::path::PathBuf;

use clap::Args;
use tandem_fleet::EngineSpec;
use tandem_sim::profile::{GpuKind, Profile};
use tandem_workload::{infinite_cache_hits, side_by_side, ChatParams, Slo, Synthesizer, Trace};

use crate::harness::BoxError;

/// The same trace formats as `tandem bench trace`.
pub use crate::trace_bench::Format;

#[derive(Debug, Clone, Args)]
pub struct PlanArgs {
    /// The trace file (not needed for `--format chat` or `conversation`).
    #[arg(long)]
    pub file: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "mooncake")]
    pub format: Format,
    /// Use only the first N requests.
    #[arg(long)]
    pub requests: Option<usize>,
    /// `--format chat`: conversations in the built-in chat workload (its default, 64, makes a
    /// 256-request trace, too short to load 16 GPUs for long).
    #[arg(long, default_value_t = 64)]
    pub chat_conversations: u32,
    /// Prompts longer than this are left out (as `tandem bench trace` does).
    #[arg(long, default_value_t = 120_000)]
    pub max_prompt_tokens: u32,
    #[arg(long, default_value = "llama-3.1-8b")]
    pub model: String,
    /// GPU of every engine; `--prefill-gpu` / `--decode-gpu` override it per pool (mixed GPUs).
    #[arg(long, default_value = "h100")]
    pub gpu: String,
    #[arg(long)]
    pub prefill_gpu: Option<String>,
    #[arg(long)]
    pub decode_gpu: Option<String>,
    /// Tensor-parallel size of every engine (default: the model's).
    #[arg(long)]
    pub tp: Option<u32>,
    /// GPU budget: every configuration uses at most this many GPUs (whole engines).
    #[arg(long, default_value_t = 16)]
    pub gpus: u32,
    /// TTFT objective, ms.
    #[arg(long, default_value_t = 2000.0)]
    pub slo_ttft_ms: f64,
    /// TPOT objective, ms.
    #[arg(long, default_value_t = 100.0)]
    pub slo_tpot_ms: f64,
    /// Fraction of requests that must meet both objectives.
    #[arg(long, default_value_t = 0.9)]
    pub attainment: f64,
    /// Prefill engine counts to try (comma-separated); default: five, 1/6 to 5/6 of the budget.
    #[arg(long, value_delimiter = ',')]
    pub prefill_counts: Vec<u32>,
    /// Disaggregation modes for the second stage: always, conditional.
    #[arg(long, value_delimiter = ',', default_value = "always,conditional")]
    pub modes: Vec<String>,
    /// Conditional mode: `local_max_uncached_tokens` values to try.
    #[arg(long, value_delimiter = ',', default_value = "1024,4096")]
    pub thresholds: Vec<u32>,
    /// Prefill policies: the first for stage one, all in stage two.
    #[arg(long, value_delimiter = ',', default_value = "prefix,least-loaded")]
    pub prefill_policies: Vec<String>,
    /// Host-memory KV tier per prefill engine, GiB (0 = none), for the second stage.
    #[arg(long, value_delimiter = ',', default_value = "0,200")]
    pub host_tier_gib: Vec<f64>,
    /// Routing policies for the colocated baseline (every engine runs whole requests); the
    /// first runs in stage one, the others in stage two.
    #[arg(long, value_delimiter = ',', default_value = "prefix,kv-capacity")]
    pub colocated_policies: Vec<String>,
    /// Best splits of stage one that stage two refines.
    #[arg(long, default_value_t = 1)]
    pub refine: usize,
    /// Bisection steps after the rate is bracketed by doublings (each halves the bracket's
    /// log-width: 2 leave it 2^(1/4), 19 %). Stage two brackets by √2 and bisects as often,
    /// leaving 2^(1/8), 9 %.
    #[arg(long, default_value_t = 2)]
    pub bisect_steps: u32,
    /// Rate scale stage one starts each search at (1 = the trace's own rate).
    #[arg(long, default_value_t = 1.0)]
    pub rate_start: f64,
    /// Worker threads (default: every core).
    #[arg(long)]
    pub threads: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write the full result (every configuration, the curve, the best) as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Draw goodput per GPU against the split (PNG and SVG) into this directory.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Run one configuration `P:D` (`0:N` = colocated on N engines) at `--rate-scale` instead
    /// of planning.
    #[arg(long)]
    pub fixed: Option<String>,
    /// With `--fixed`: the prefill policy (`PREFILL[:DECODE]`, as `bench trace --compare`).
    #[arg(long, default_value = "prefix")]
    pub policy: String,
    /// With `--fixed`: arrival-rate multiplier (as `bench trace --rate-scale`).
    #[arg(long, default_value_t = 1.0)]
    pub rate_scale: f64,
    /// With `--fixed`: host tier per prefill engine, GiB.
    #[arg(long)]
    pub prefill_kv_offloading_gib: Option<f64>,
    /// Simulated seconds per coordinator second: the `--time-scale` of a real-time replay to
    /// reproduce (its coordinator measures rates and scrapes on real time).
    #[arg(long, default_value_t = 1.0)]
    pub coordinator_scale: f64,
    /// With `--fixed`: simulated ms added before each leg reaches its engine, to test how much of
    /// a real-time replay's difference is per-leg overhead (a diagnostic; 0 models none).
    #[arg(long, default_value_t = 0.0)]
    pub leg_overhead_ms: f64,
    /// The coordinator's metrics scrape interval, ms of its own clock (`tandem bench trace`
    /// uses 100; the configuration default is 1000).
    #[arg(long, default_value_t = 1000)]
    pub scrape_interval_ms: u64,
}

/// The trace as `tandem bench trace` reads it (`trace_bench::read_trace`), before rate scaling.
pub fn load_trace(a: &PlanArgs) -> Result<Trace, BoxError> {
    let chat = ChatParams {
        conversations: a.chat_conversations,
        ..ChatParams::default()
    };
    crate::trace_bench::read_trace(
        a.format,
        a.file.as_deref(),
        a.seed,
        &chat,
        a.requests,
        a.max_prompt_tokens,
    )
}

fn gpu(s: &str) -> Result<GpuKind, BoxError> {
    GpuKind::parse(s).ok_or_else(|| format!("unknown GPU `{s}` (h100, h200)").into())
}

/// The engines of each pool.
#[derive(Debug, Clone)]
pub struct Hardware {
    pub prefill: EngineSpec,
    pub decode: EngineSpec,
}

impl Hardware {
    pub fn from_args(a: &PlanArgs) -> Result<Self, BoxError> {
        let base = gpu(&a.gpu)?;
        let pg = a
            .prefill_gpu
            .as_deref()
            .map(gpu)
            .transpose()?
            .unwrap_or(base);
        let dg = a
            .decode_gpu
            .as_deref()
            .map(gpu)
            .transpose()?
            .unwrap_or(base);
        let spec = |g| -> Result<EngineSpec, BoxError> {
            Ok(EngineSpec::new(Profile::new(&a.model, g, a.tp)?))
        };
        Ok(Hardware {
            prefill: spec(pg)?,
            decode: spec(dg)?,
        })
    }

    /// GPUs per engine (the TP degree; the same for both pools).
    pub fn gpus_per_engine(&self) -> u32 {
        self.prefill.gpus().max(self.decode.gpus())
    }
}

pub fn slo(a: &PlanArgs) -> Slo {
    Slo {
        ttft_ms: a.slo_ttft_ms,
        tpot_ms: a.slo_tpot_ms,
    }
}

pub async fn run(a: PlanArgs) -> Result<(), BoxError> {
    // The sweep is CPU-bound and synchronous; keep it off the async runtime's threads.
    tokio::task::spawn_blocking(move || run_blocking(&a).map_err(|e| e.to_string()))
        .await?
        .map_err(Into::into)
}

fn run_blocking(a: &PlanArgs) -> Result<(), BoxError> {
    if !(a.attainment > 0.0 && a.attainment <= 1.0) {
        return Err(format!("--attainment must be within (0, 1], got {}", a.attainment).into());
    }
    let trace = load_trace(a)?;
    if trace.requests.is_empty() {
        return Err("the trace has no requests".into());
    }
    let hw = Hardware::from_args(a)?;
    let synth = Synthesizer::new(a.seed, 0..256)?;
    let stats = trace.stats();
    eprintln!(
        "trace {}: {} requests over {:.0} s, {:.2} req/s, {:.0} input tok/s",
        trace.name,
        stats.requests,
        stats.span_ms / 1000.0,
        stats.requests_per_s.unwrap_or(0.0),
        stats.input_tokens_per_s.unwrap_or(0.0)
    );
    if let Some(fixed) = &a.fixed {
        return run_fixed(a, &hw, &trace, &synth, fixed);
    }
    let result = sweep::plan(a, &hw, &trace, &synth)?;
    output::print(a, &hw, &result)?;
    Ok(())
}

/// One configuration at one rate, printed like `tandem bench trace`.
fn run_fixed(
    a: &PlanArgs,
    hw: &Hardware,
    trace: &Trace,
    synth: &Synthesizer,
    fixed: &str,
) -> Result<(), BoxError> {
    let (p, d) = fixed
        .split_once(':')
        .and_then(|(p, d)| {
            Some((
                p.trim().parse::<usize>().ok()?,
                d.trim().parse::<usize>().ok()?,
            ))
        })
        .ok_or_else(|| format!("--fixed takes P:D, got `{fixed}`"))?;
    let cand = sweep::Candidate::fixed(a, p, d)?;
    let cfg = cand.fleet(a, hw);
    let scaled = trace.scaled(a.rate_scale)?;
    let started = std::time::Instant::now();
    let report = tandem_fleet::run(&cfg, &scaled, synth)?;
    let wall = started.elapsed().as_secs_f64();
    let bt = scaled.block_tokens.or(Some(16));
    let bound = infinite_cache_hits(&scaled, bt)?.token_fraction();
    let summary = report.summary.clone().with_hit_bound(bound);
    let label = cand.label();
    println!("{}", side_by_side(&[(label.as_str(), &summary)]));
    eprintln!(
        "simulated {:.1} s in {:.2} s wall ({:.0}× real time); {} events, {} steps, {} preemptions, {} held, {} unfinished",
        summary.duration_s,
        wall,
        summary.duration_s / wall.max(1e-9),
        report.stats.events,
        report.stats.steps,
        report.stats.preemptions,
        report.stats.held,
        report.stats.unfinished
    );
    if let Some(path) = &a.json {
        let v = serde_json::json!({
            "trace": trace.name,
            "config": label,
            "rate_scale": a.rate_scale,
            "coordinator_scale": a.coordinator_scale,
            "wall_s": wall,
            "summary": summary,
            "stats": report.stats,
        });
        std::fs::write(path, serde_json::to_string_pretty(&v)?)?;
    }
    Ok(())
}
