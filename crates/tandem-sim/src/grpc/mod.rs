//! vLLM's native gRPC surface (`vllm-rs serve --grpc-port`, crate `vllm-proto` 0.6.0): the
//! `vllm.Inference` and `vllm.Control` services plus `grpc.health.v1`, over the same engine
//! task, KV cache, side channel and faults as the HTTP surface (vllm-grpc.md).
//!
//! - [`convert`]: request validation and conversion, `Struct` ↔ JSON (pure).
//! - [`output`]: engine events → response messages in vLLM's order (pure).
//! - [`inference`]: `Generate` / `GenerateStream`: faults, submission, streaming, abort.
//! - [`control`]: discovery (`GetServerInfo`, `GetModelInfo`, `GetKvEventSources`) and `Abort`;
//!   every other Control RPC answers `UNIMPLEMENTED`.
//! - [`conn`]: connections a fault can cut.

mod conn;
mod control;
mod convert;
mod inference;
mod output;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use vllm_proto::control_server::ControlServer;
use vllm_proto::inference_server::InferenceServer;

use crate::http::AppState;

/// Engine facts the gRPC surface reports that the HTTP one does not hold.
#[derive(Debug, Clone)]
pub struct GrpcInfo {
    /// `ModelInfo.model_id`: the model's path or HF id.
    pub model_id: String,
    pub block_size: u32,
    pub num_gpu_blocks: u32,
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    /// The KV-event publisher, when enabled.
    pub kv_events: Option<KvEventSourceInfo>,
}

/// The KV-event publisher as `GetKvEventSources` reports it.
#[derive(Debug, Clone)]
pub struct KvEventSourceInfo {
    /// The bound PUB endpoint (port 0 resolved).
    pub endpoint: String,
    pub replay_endpoint: Option<String>,
    pub topic: String,
    pub buffer_steps: usize,
    pub data_parallel_rank: Option<u32>,
}

/// What both services share.
#[derive(Debug)]
struct GrpcState {
    app: Arc<AppState>,
    info: GrpcInfo,
    /// vLLM's `instance_id`: start time in nanoseconds, as `VllmConfig.__post_init__` sets it.
    instance_id: String,
    live: Arc<Live>,
}

/// In-flight requests by external id, so `Control.Abort` can reach them. Several requests may
/// share an id; an abort reaches them all.
#[derive(Debug, Default)]
struct Live {
    next: AtomicU64,
    by_id: Mutex<HashMap<String, Vec<Waiting>>>,
}

/// One registered request: its ticket's key and the sender that aborts it.
type Waiting = (u64, oneshot::Sender<()>);

/// A registered request; dropping it unregisters it.
#[derive(Debug)]
struct Ticket {
    live: Arc<Live>,
    id: String,
    key: u64,
}

impl Live {
    fn register(self: &Arc<Self>, id: &str) -> (Ticket, oneshot::Receiver<()>) {
        let (tx, rx) = oneshot::channel();
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        self.by_id
            .lock()
            .expect("live lock is never poisoned: no panics while held")
            .entry(id.to_string())
            .or_default()
            .push((key, tx));
        let ticket = Ticket {
            live: self.clone(),
            id: id.to_string(),
            key,
        };
        (ticket, rx)
    }

    /// Signal every request with one of these ids; unknown ids are no-ops. Returns how many.
    fn abort(&self, ids: &[String]) -> usize {
        let mut by_id = self
            .by_id
            .lock()
            .expect("live lock is never poisoned: no panics while held");
        let mut n = 0;
        for id in ids {
            for (_, tx) in by_id.remove(id).unwrap_or_default() {
                n += usize::from(tx.send(()).is_ok());
            }
        }
        n
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut by_id = self
            .live
            .by_id
            .lock()
            .expect("live lock is never poisoned: no panics while held");
        if let Some(v) = by_id.get_mut(&self.id) {
            v.retain(|(k, _)| *k != self.key);
            if v.is_empty() {
                by_id.remove(&self.id);
            }
        }
    }
}

/// Serve gRPC on `listener` until `shutdown` resolves; health turns NOT_SERVING first.
pub fn spawn(
    app: Arc<AppState>,
    info: GrpcInfo,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> tokio::task::JoinHandle<Result<(), tonic::transport::Error>> {
    let instance_id = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
        .to_string();
    let state = Arc::new(GrpcState {
        app,
        info,
        instance_id,
        live: Arc::default(),
    });
    let inference = InferenceServer::new(inference::InferenceSvc::new(state.clone()));
    let control = ControlServer::new(control::ControlSvc::new(state));
    tokio::spawn(async move {
        let (reporter, health) = tonic_health::server::health_reporter();
        reporter
            .set_serving::<InferenceServer<inference::InferenceSvc>>()
            .await;
        reporter
            .set_serving::<ControlServer<control::ControlSvc>>()
            .await;
        let signal = async move {
            shutdown.await;
            reporter
                .set_not_serving::<InferenceServer<inference::InferenceSvc>>()
                .await;
            reporter
                .set_not_serving::<ControlServer<control::ControlSvc>>()
                .await;
            reporter
                .set_service_status("", tonic_health::ServingStatus::NotServing)
                .await;
        };
        tonic::transport::Server::builder()
            // vLLM's server: a ping every two hours, 20 s to answer it. The receive limit stays
            // tonic's default 4 MiB (OUT_OF_RANGE beyond), as vLLM sets none.
            .http2_keepalive_interval(Some(Duration::from_secs(7200)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)))
            .add_service(health)
            .add_service(inference)
            .add_service(control)
            .serve_with_incoming_shutdown(conn::incoming(listener), signal)
            .await
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abort_reaches_every_request_with_the_id_and_tickets_unregister() {
        let live = Arc::new(Live::default());
        let (t1, mut r1) = live.register("a");
        let (_t2, mut r2) = live.register("a");
        let (t3, mut r3) = live.register("b");
        drop(t3);
        assert!(r3.try_recv().is_err());
        assert_eq!(live.abort(&["a".into(), "zzz".into()]), 2);
        assert!(r1.try_recv().is_ok() && r2.try_recv().is_ok());
        assert_eq!(live.abort(&["a".into()]), 0, "aborted once");
        drop(t1);
        assert!(live.by_id.lock().unwrap().is_empty());
        assert_eq!(live.abort(&[]), 0);
    }
}
