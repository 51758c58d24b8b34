//! `tandem`: the one CLI binary.
//!
//! - `tandem sim`: a simulated vLLM engine (see `tandem-sim`).
//! - `tandem serve`: the coordinator in front of prefill and decode pools.
//! - `tandem config check`: validate a configuration file and print the effective configuration.
//! - `tandem demo`: simulated prefill and decode pools plus a workload, with per-phase results.
//! - `tandem plan`: the best P:D split for a trace and GPU budget, from a virtual-time fleet simulation.

mod balance_bench;
mod bench;
mod demo;
mod harness;
mod kv_probe;
mod nixl_bench;
#[cfg(feature = "otel")]
mod otel;
mod plan;
mod relay_bench;
mod serve;
mod sim_args;
mod trace_bench;

use clap::{Parser, Subcommand};

/// jemalloc rather than the system allocator: a relay allocates and frees per-stream buffers in
/// bursts across worker threads, and glibc's per-thread arenas keep what a burst freed, so RSS
/// ratchets up burst after burst; jemalloc gives freed pages back after a decay time.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Debug, Parser)]
#[command(
    name = "tandem",
    version,
    about = "Prefill/decode disaggregation orchestrator for vLLM"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a simulated vLLM engine (OpenAI HTTP, NixlConnector P/D, KV events, metrics).
    Sim(Box<sim_args::SimArgs>),
    /// Run the coordinator: an OpenAI-compatible front door over prefill and decode pools.
    Serve(serve::ServeArgs),
    /// Configuration tools.
    #[command(subcommand)]
    Config(serve::ConfigCommand),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Run the embedded demo: simulated P/D pools and a workload; prints per-phase results.
    Demo(demo::DemoArgs),
    /// Find the P:D split, disaggregation mode and policy with the most goodput per GPU for a
    /// trace, by simulating the whole fleet in virtual time (and compare with colocated).
    Plan(Box<plan::PlanArgs>),
    /// Check a deployment's prefill → decode KV path (handshake, layout, bytes, decode pull).
    KvProbe(kv_probe::KvProbeArgs),
}

fn main() -> std::process::ExitCode {
    // Purge freed pages on jemalloc's own timer, so memory goes back after a burst even while
    // the process is idle (without it, purging only happens on later allocations).
    if let Err(e) = tikv_jemalloc_ctl::background_thread::write(true) {
        eprintln!("warning: jemalloc background purging is off: {e}");
    }
    let cli = Cli::parse();
    // `serve` takes its logging settings from its config file; the rest log warnings to stderr.
    let serve_cfg = match &cli.command {
        Command::Serve(args) => match serve::load(args).and_then(|cfg| {
            let telemetry = serve::init_logging(&cfg)?;
            Ok((cfg, telemetry))
        }) {
            Ok(loaded) => Some(loaded),
            Err(e) => {
                eprintln!("error: {e}");
                return std::process::ExitCode::FAILURE;
            }
        },
        _ => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
                )
                .with_writer(std::io::stderr)
                .init();
            None
        }
    };
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        match cli.command {
            Command::Sim(args) => sim_args::run(*args).await,
            Command::Demo(args) => demo::run(args).await,
            Command::Plan(args) => plan::run(*args).await,
            Command::Bench(cmd) => bench::run(cmd).await,
            Command::KvProbe(args) => kv_probe::run(args).await,
            Command::Serve(_) => match serve_cfg {
                Some((cfg, telemetry)) => serve::run(cfg, telemetry).await.map_err(Into::into),
                None => unreachable!("serve's config was loaded above"),
            },
            Command::Config(cmd) => serve::check(cmd).map_err(Into::into),
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
