//! `tandem serve` and `tandem config check`.

use std::path::PathBuf;
use std::sync::Arc;

use tandem_config::{Config, LogFormat, PolicyName};
use tandem_proxy::trace::{TraceLink, W3cLink};

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// The configuration file (TOML). `TANDEM__SECTION__KEY` variables override it.
    #[arg(long, short, env = "TANDEM_CONFIG")]
    pub config: PathBuf,
    /// Override `server.listen` (port 0 picks a free port; the ready line names it).
    #[arg(long)]
    pub listen: Option<String>,
    /// Override any key: `--set disaggregation.mode=never` (repeatable; beats the environment).
    #[arg(long = "set", value_name = "KEY=VALUE", value_parser = parse_kv)]
    pub set: Vec<(String, String)>,
}

#[derive(Debug, clap::Subcommand)]
pub enum ConfigCommand {
    /// Validate a configuration file and print the effective configuration (defaults filled in,
    /// environment overrides applied).
    Check {
        file: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE", value_parser = parse_kv)]
        set: Vec<(String, String)>,
    },
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_string(), v.to_string()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("expected KEY=VALUE, got `{s}`"))
}

pub fn load(args: &ServeArgs) -> Result<Config, String> {
    let mut overrides = args.set.clone();
    if let Some(l) = &args.listen {
        overrides.push(("server.listen".into(), l.clone()));
    }
    tandem_config::load(Some(&args.config), None, &overrides)
        .map_err(|e| format!("{}: {e}", args.config.display()))
}

pub fn check(cmd: ConfigCommand) -> Result<(), String> {
    let ConfigCommand::Check { file, set } = cmd;
    let cfg = tandem_config::load(Some(&file), None, &set)
        .map_err(|e| format!("{}: {e}", file.display()))?;
    print!("{}", tandem_config::render(&cfg));
    // The routing formulas in force, as comments so the output stays a loadable file.
    println!();
    for (pool, p) in [
        ("prefill", &cfg.pools.prefill),
        ("decode", &cfg.pools.decode),
    ] {
        let default = if pool == "prefill" {
            PolicyName::default_prefill()
        } else {
            PolicyName::default_decode()
        };
        let name = p.policy_or(default);
        let what = match name {
            PolicyName::Prefix => tandem_proxy::prefix_params(&cfg.routing).describe(),
            // On the prefill pool the same formula picks where the prompt is computed and held
            // until the pull, at arrival; with no room the request runs on a decode engine alone
            // (or is refused, under `enforce`).
            PolicyName::KvCapacity if pool == "prefill" => format!(
                "decided at arrival over the prefill engines' KV; free(e) = num_gpu_blocks(e) − used \
                 at last scrape − reserved since, need = ceil((prompt_tokens + min(max_tokens, {})) \
                 / block_size); engines with spare ≥ {}: the fewest in-flight(e)/weight(e); \
                 otherwise the most weight(e)·spare(e); no engine with free ≥ need: run on a decode \
                 engine alone (refused with 503 under disaggregation.enforce)",
                cfg.routing.expected_output_tokens,
                tandem_proxy::KV_PLENTY,
            ),
            PolicyName::KvCapacity => format!(
                "decided at the handoff; free(e) = num_gpu_blocks(e) − used at last scrape − reserved \
                 since, spare(e) = (free(e) − need)/num_gpu_blocks(e) over engines with free ≥ need, \
                 need = ceil((prompt_tokens + min(max_tokens, {})) / block_size); engines with \
                 spare ≥ {}: the fewest in-flight(e)/weight(e); otherwise the most weight(e)·spare(e), \
                 within {} of it the fewest in-flight; none: wait in admission \
                 (max {} requests; interactive before default before batch, fair by tenant weight \
                 within a class; {} ms for the default class), then 503 Retry-After {} s",
                cfg.routing.expected_output_tokens,
                tandem_proxy::KV_PLENTY,
                tandem_proxy::KV_NEAR_TIE,
                cfg.admission.max_queued,
                cfg.admission.max_wait_ms,
                cfg.admission.retry_after_secs
            ),
            other => other.as_str().to_string(),
        };
        println!("# {pool} policy {}: {what}", name.as_str());
        let protocol = match p.protocol {
            tandem_config::Protocol::Http => {
                "http: vLLM's OpenAI server; bodies relayed byte for byte, KV params as JSON"
                    .to_string()
            }
            tandem_config::Protocol::Grpc => {
                let no_metrics = p.endpoints.iter().filter(|e| e.metrics.is_none()).count();
                format!(
                    "grpc: vllm.Inference/vllm.Control (vllm-proto {}); token ids in, OpenAI bytes rendered by Tandem, KV params as a Struct (remote_port sent as a string); discovery from GetServerInfo/GetModelInfo, P/D pairs need equal engine versions; {} endpoint(s) without a metrics URL use Tandem's own KV reservations against total_kv_blocks",
                    tandem_proxy::VLLM_PROTO_VERSION,
                    no_metrics
                )
            }
        };
        println!("# {pool} protocol {protocol}");
    }
    // The key file is its own format: check it too (its errors never quote a key).
    if let Some(path) = &cfg.auth.keys_file {
        let bad = |e: &dyn std::fmt::Display| format!("auth.keys_file {}: {e}", path.display());
        let text = std::fs::read_to_string(path).map_err(|e| bad(&e))?;
        let keys = tandem_config::parse_keys(&text).map_err(|e| bad(&e))?;
        println!(
            "# auth: {} tenant(s) and {} key(s) in {}",
            keys.tenants.len(),
            keys.keys.len(),
            path.display()
        );
    }
    Ok(())
}

/// What `serve` set up for tracing: how request spans join a trace and, in the `otel` build, the
/// exporter to flush at exit.
pub struct Telemetry {
    trace_link: Arc<dyn TraceLink>,
    #[cfg(feature = "otel")]
    provider: Option<crate::otel::Provider>,
}

/// Logging for `serve` comes from the config file (`[logging]`; `RUST_LOG` still wins), and span
/// export from `[telemetry]`.
pub fn init_logging(cfg: &Config) -> Result<Telemetry, String> {
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cfg.logging.level));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = match cfg.logging.format {
        LogFormat::Json => fmt.json().boxed(),
        LogFormat::Text => fmt.boxed(),
    };
    let registry = tracing_subscriber::registry().with(fmt.with_filter(filter));
    match &cfg.telemetry.otlp_endpoint {
        None => {
            registry.init();
            Ok(Telemetry {
                trace_link: Arc::new(W3cLink),
                #[cfg(feature = "otel")]
                provider: None,
            })
        }
        #[cfg(feature = "otel")]
        Some(endpoint) => {
            let p = crate::otel::provider(&cfg.telemetry, endpoint)?;
            // The exported spans carry the per-phase events, whatever the log level.
            let targets = tracing_subscriber::filter::Targets::new()
                .with_target("tandem_proxy", tracing::Level::DEBUG);
            registry
                .with(crate::otel::layer(&p).with_filter(targets))
                .init();
            Ok(Telemetry {
                trace_link: Arc::new(crate::otel::OtelLink),
                provider: Some(p),
            })
        }
        #[cfg(not(feature = "otel"))]
        Some(_) => Err("telemetry.otlp_endpoint is set, but this tandem was built without \
             OpenTelemetry export: rebuild with `cargo build --release --features otel`, or unset it"
            .into()),
    }
}

/// Run the coordinator until SIGINT or SIGTERM.
pub async fn run(cfg: Config, telemetry: Telemetry) -> Result<(), String> {
    let listener = tokio::net::TcpListener::bind(cfg.server.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", cfg.server.listen))?;
    let edges = tandem_proxy::Edges {
        trace_link: telemetry.trace_link.clone(),
        ..tandem_proxy::Edges::default()
    };
    let running = tandem_proxy::start_with(cfg, listener, shutdown_signal(), edges)
        .map_err(|e| e.to_string())?;
    // One JSON line on stdout so scripts and tests know where to connect.
    let mut ready =
        serde_json::json!({"ready": "tandem", "http": format!("http://{}", running.addr)});
    if let Some(a) = running.admin_addr {
        ready["admin"] = format!("http://{a}").into();
    }
    println!("{ready}");
    tracing::info!(addr = %running.addr, "tandem serving");
    let result = match running.task.await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    #[cfg(feature = "otel")]
    if let Some(p) = telemetry.provider {
        // Flushing blocks on the exporter's thread.
        let _ = tokio::task::spawn_blocking(move || crate::otel::shutdown(p)).await;
    }
    result
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutting down: no new connections; in-flight responses finish");
}
