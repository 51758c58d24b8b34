//! What `tandem demo` and `tandem bench` both need: simulated engines and a coordinator in this
//! process on loopback, and percentiles.

use std::time::Duration;

use tandem_config::{Config, DisaggregationMode, Endpoint, PoolConfig, PoolsConfig, Protocol};
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
    let mut cfg = sim_config(model, gpu, time_scale, seed, hash_seed);
    // Every in-process engine also serves vLLM's gRPC, so a run can pick either protocol.
    cfg.grpc_port = Some(0);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    Ok(tandem_sim::start(cfg, listener, std::future::pending()).await?)
}

/// A pool over these engines' gRPC ports (their HTTP ports as the metrics URLs).
pub fn grpc_pool(sims: &[&RunningSim]) -> PoolConfig {
    PoolConfig {
        endpoints: sims
            .iter()
            .map(|s| {
                let grpc = s.grpc_addr.expect("start_sim serves gRPC");
                let mut e = Endpoint::new(format!("http://{grpc}"));
                e.metrics = Some(format!("http://{}", s.http_addr));
                e
            })
            .collect(),
        protocol: Protocol::Grpc,
        ..PoolConfig::default()
    }
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

/// A histogram's cumulative buckets, `(le, count)` sorted by `le` (`+Inf` last), summed over
/// every label set of `metric` in a Prometheus text exposition.
pub fn scrape_buckets(text: &str, metric: &str) -> Vec<(f64, f64)> {
    let name = format!("{metric}_bucket{{");
    let mut by_le: Vec<(f64, f64)> = Vec::new();
    for line in text.lines().filter(|l| l.starts_with(&name)) {
        let Some(le) = line
            .split("le=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .and_then(|s| match s {
                "+Inf" => Some(f64::INFINITY),
                s => s.parse::<f64>().ok(),
            })
        else {
            continue;
        };
        let Some(n) = line.rsplit(' ').next().and_then(|s| s.parse::<f64>().ok()) else {
            continue;
        };
        match by_le.iter_mut().find(|(l, _)| *l == le) {
            Some(b) => b.1 += n,
            None => by_le.push((le, n)),
        }
    }
    by_le.sort_by(|a, b| a.0.total_cmp(&b.0));
    by_le
}

/// The `q` quantile of cumulative buckets as Prometheus's `histogram_quantile` estimates it:
/// linear inside the bucket that holds rank `q × count`, the first bucket starting at 0, and the
/// highest finite edge when the rank falls in `+Inf`.
pub fn bucket_quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let (mut lo, mut below) = (0.0, 0.0);
    for &(le, cum) in buckets {
        if cum >= rank {
            if le.is_infinite() {
                return Some(lo);
            }
            if cum == below {
                return Some(le);
            }
            return Some(lo + (le - lo) * (rank - below) / (cum - below));
        }
        (lo, below) = (le, cum);
    }
    Some(lo)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_summed_over_labels_and_interpolated_as_prometheus_does() {
        let text = "tandem_ttft_seconds_bucket{route=\"local\",le=\"0.1\"} 1\n\
                    tandem_ttft_seconds_bucket{route=\"local\",le=\"0.2\"} 3\n\
                    tandem_ttft_seconds_bucket{route=\"local\",le=\"+Inf\"} 3\n\
                    tandem_ttft_seconds_bucket{route=\"disaggregated\",le=\"0.1\"} 0\n\
                    tandem_ttft_seconds_bucket{route=\"disaggregated\",le=\"0.2\"} 1\n\
                    tandem_ttft_seconds_bucket{route=\"disaggregated\",le=\"+Inf\"} 1\n\
                    tandem_ttft_seconds_count 4\n";
        let b = scrape_buckets(text, "tandem_ttft_seconds");
        assert_eq!(b, vec![(0.1, 1.0), (0.2, 4.0), (f64::INFINITY, 4.0)]);
        // Rank 2 of 4 lies a third of the way into (0.1, 0.2].
        let p50 = bucket_quantile(0.5, &b).unwrap();
        assert!((p50 - (0.1 + 0.1 / 3.0)).abs() < 1e-12, "{p50}");
        let p10 = bucket_quantile(0.1, &b).unwrap();
        assert!((p10 - 0.04).abs() < 1e-12, "{p10}");
        assert_eq!(bucket_quantile(0.5, &[]), None);
        assert_eq!(
            bucket_quantile(0.99, &[(1.0, 0.0), (f64::INFINITY, 2.0)]),
            Some(1.0)
        );
    }
}
