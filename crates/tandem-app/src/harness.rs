//! What `tandem demo` and `tandem bench` both need: simulated engines and a coordinator in this
//! process on loopback, and percentiles.

use std::time::Duration;

use tandem_config::{Config, DisaggregationMode, Endpoint, PoolConfig, PoolsConfig};
use tandem_sim::profile::GpuKind;
use tandem_sim::{RunningSim, SimConfig};

pub type BoxError = Box<dyn std::error::Error>;

/// A simulated engine's configuration. One sampling `seed` everywhere keeps a request's text
/// independent of the engine it ran on; distinct `hash_seed`s give each engine its own
/// prefix-hash space, as separate vLLM processes have.
pub fn sim_config(
    model: &str,
    gpu: GpuKind,
    time_scale: f64,
    seed: u64,
    hash_seed: u64,
) -> SimConfig {
    let mut cfg = SimConfig::new(model, gpu);
    cfg.time_scale = time_scale;
    cfg.seed = seed;
    cfg.hash_seed = Some(hash_seed.to_string());
    cfg
}

/// Start one simulated engine ([`sim_config`]) on a free loopback port; it runs until the process
/// exits.
pub async fn start_sim(
    model: &str,
    gpu: GpuKind,
    time_scale: f64,
    seed: u64,
    hash_seed: u64,
) -> Result<RunningSim, BoxError> {
    let cfg = sim_config(model, gpu, time_scale, seed, hash_seed);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    Ok(tandem_sim::start(cfg, listener, std::future::pending()).await?)
}

/// A coordinator running in this process; stopped when dropped.
#[derive(Debug)]
pub struct Coordinator {
    pub running: tandem_proxy::Running,
    pub base: String,
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// Start a coordinator over these engines and wait until `/ready`.
pub async fn start_coordinator(
    prefill: &[&RunningSim],
    decode: &[&RunningSim],
    mode: DisaggregationMode,
    recent_requests: usize,
) -> Result<Coordinator, BoxError> {
    start_coordinator_with(prefill, decode, mode, recent_requests, |_| {}).await
}

/// [`start_coordinator`] with a last edit of the configuration.
pub async fn start_coordinator_with(
    prefill: &[&RunningSim],
    decode: &[&RunningSim],
    mode: DisaggregationMode,
    recent_requests: usize,
    edit: impl FnOnce(&mut Config),
) -> Result<Coordinator, BoxError> {
    let pool = |v: &[&RunningSim]| PoolConfig {
        endpoints: v
            .iter()
            .map(|s| Endpoint::new(format!("http://{}", s.http_addr)))
            .collect(),
        ..PoolConfig::default()
    };
    let mut cfg = Config::new(PoolsConfig::new(pool(prefill), pool(decode)));
    cfg.disaggregation.mode = mode;
    cfg.health.interval_ms = 200;
    cfg.server.recent_requests = recent_requests;
    edit(&mut cfg);
    serve(cfg).await
}

/// Validate `cfg`, start a coordinator with it on a free port, and wait until `/ready`.
pub async fn serve(cfg: Config) -> Result<Coordinator, BoxError> {
    cfg.validate()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let running = tandem_proxy::start(cfg, listener, async {
        let _ = stopped.await;
    })?;
    let base = format!("http://{}", running.addr);
    wait_ready(&reqwest::Client::new(), &base).await?;
    Ok(Coordinator {
        running,
        base,
        _stop: stop,
    })
}

/// Poll a coordinator's `/ready` until it answers 200 (at most 20 s).
pub async fn wait_ready(client: &reqwest::Client, base: &str) -> Result<(), BoxError> {
    for _ in 0..400 {
        let ok = client
            .get(format!("{base}/ready"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if ok {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err("the coordinator did not become ready within 20 s".into())
}

/// The `q` quantile (nearest rank) of `v`, sorting it in place; `None` when empty.
pub fn pct(v: &mut [f64], q: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[((v.len() - 1) as f64 * q).round() as usize])
}
