//! The control loop against a stand-in resolver, the scrape parser, and KV reservations.
use super::*;
use crate::engine::scrape::{label, parse_scrape, Scrape};
use std::net::SocketAddr;
use std::sync::Mutex;

/// A resolver stand-in whose answer the test changes.
#[derive(Debug, Default)]
struct FakeDns(Mutex<Option<Vec<SocketAddr>>>);

impl Resolver for FakeDns {
    fn resolve(
        &self,
        _name: &str,
        _port: u16,
    ) -> futures::future::BoxFuture<'static, std::io::Result<Vec<SocketAddr>>> {
        let a = self.0.lock().unwrap().clone();
        Box::pin(async move { a.ok_or_else(|| std::io::Error::other("SERVFAIL")) })
    }
}

fn set(dns: &FakeDns, addrs: Option<&[&str]>) {
    *dns.0.lock().unwrap() = addrs.map(|a| a.iter().map(|s| s.parse().unwrap()).collect());
}

async fn wait_for(rx: &mut watch::Receiver<Arc<Pools>>, f: impl Fn(&Pools) -> bool) -> Arc<Pools> {
    loop {
        let p = rx.borrow_and_update().clone();
        if f(&p) {
            return p;
        }
        rx.changed().await.expect("control loop alive");
    }
}

fn urls(p: &Pools) -> Vec<(String, Health)> {
    p.decode
        .iter()
        .map(|e| (e.engine.url.to_string(), e.status.health))
        .collect()
}

#[tokio::test(start_paused = true)]
async fn dns_discovery_adds_drains_and_removes_engines() {
    let cfg = tandem_config::from_toml_str(
        "[pools.prefill]\nendpoints = [\"http://127.0.0.1:9\"]\n\
         [pools.decode]\ndns = { name = \"decode.svc\", port = 8000, interval_secs = 1 }\n",
    )
    .unwrap();
    let dns = Arc::new(FakeDns::default());
    set(&dns, Some(&["127.0.0.1:9", "127.0.0.2:9"]));
    let h = start(
        &cfg,
        Arc::new(Metrics::new(None, true)),
        dns.clone(),
        EngineTls::none(),
    );
    let mut rx = h.pools.clone();
    let p = wait_for(&mut rx, |p| p.decode.len() == 2).await;
    assert!(p.decode.iter().all(|e| e.engine.discovered));
    let first = p.decode[0].engine.clone();
    assert_eq!(&*first.url, "http://127.0.0.1:9");

    // 10.0.0.1 leaves while a request is in flight on it: it drains, and stays until idle.
    let guard = first.track(0);
    set(&dns, Some(&["127.0.0.2:9", "127.0.0.3:9"]));
    let p = wait_for(&mut rx, |p| p.decode.len() == 3).await;
    assert_eq!(
        urls(&p)[0],
        ("http://127.0.0.1:9".to_string(), Health::Draining)
    );
    assert!(p
        .snapshot()
        .decode
        .iter()
        .all(|e| e.id != first.id || !e.routable()));

    // A failed lookup changes nothing.
    set(&dns, None);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(rx.borrow().decode.len(), 3);

    // Once its last request finishes, the drained engine is removed; ids are not reused.
    drop(guard);
    set(&dns, Some(&["127.0.0.2:9", "127.0.0.3:9"]));
    let p = wait_for(&mut rx, |p| p.decode.len() == 2).await;
    let left: Vec<String> = urls(&p).into_iter().map(|u| u.0).collect();
    assert_eq!(left, ["http://127.0.0.2:9", "http://127.0.0.3:9"]);
    assert!(p.decode.iter().all(|e| e.engine.id != first.id));

    // An empty answer (no ready pods) drains everything that is left.
    set(&dns, Some(&[]));
    let p = wait_for(&mut rx, |p| p.decode.is_empty()).await;
    assert!(p.decode.is_empty());
}

#[test]
fn scrape_reads_block_size_capacity_and_usage() {
    let text = "# HELP vllm:cache_config_info x\n\
        vllm:cache_config_info{block_size=\"16\",cache_dtype=\"auto\",num_gpu_blocks=\"24000\"} 1.0\n\
        vllm:kv_cache_usage_perc{engine=\"0\",model_name=\"m\"} 0.25\n";
    assert_eq!(
        parse_scrape(text),
        Scrape {
            seq: 0,
            block_size: Some(16),
            num_gpu_blocks: Some(24000),
            kv_usage: Some(0.25)
        }
    );
    assert_eq!(label("xblock_size=\"3\"", "block_size"), None);
    assert_eq!(
        label("mamba_block_size=\"3\",block_size=\"16\"", "block_size"),
        Some("16")
    );
}

#[test]
fn a_discovered_grpc_engine_gets_its_metrics_url_from_the_metrics_port() {
    assert_eq!(
        metrics_url("http://10.0.0.5:50051", Some(8000)).as_deref(),
        Some("http://10.0.0.5:8000")
    );
    assert_eq!(
        metrics_url("http://[fd00::1]:50051", Some(8000)).as_deref(),
        Some("http://[fd00::1]:8000")
    );
    assert_eq!(metrics_url("http://10.0.0.5:50051", None), None);
}
