//! `vllm.Inference`: `Generate` (unary) and `GenerateStream` (server streaming).
//!
//! A request goes the HTTP surface's way into the same engine: the slow-accept delay, validation
//! (a rejected decode leg still frees the prefill's pinned blocks, as the HTTP surface does), the
//! fail and stall faults, the modeled per-request overhead, then one `Submit`. The stream's
//! producer is its own task behind a 32-message channel, as vLLM's; it notices a client that has
//! gone only when its next send fails, so a dropped stream aborts the engine request at that
//! request's next output (vllm-grpc.md §4), not before.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use vllm_proto::{GenerateRequest, GenerateResponse};

use super::conn::ConnInfo;
use super::convert::{self, KvIdentity, Limits};
use super::output::Assembler;
use super::{GrpcState, Ticket};
use crate::engine::{random_suffix, Event, RemoteKv, RequestStream, Submit};
use crate::http::AppState;

const DATA_PARALLEL_RANK: &str = "x-data-parallel-rank";

#[derive(Debug)]
pub(crate) struct InferenceSvc {
    state: Arc<GrpcState>,
}

impl InferenceSvc {
    pub(crate) fn new(state: Arc<GrpcState>) -> Self {
        InferenceSvc { state }
    }
}

/// A request the engine has accepted.
struct Accepted {
    request_id: String,
    rs: RequestStream,
    asm: Assembler,
    abort: oneshot::Receiver<()>,
    _ticket: Ticket,
    conn: Option<ConnInfo>,
    /// Cut the connection after this many tokens (the `die_after_tokens` fault).
    die: Option<u64>,
}

/// What the next thing that happened to a request is.
enum Next {
    Event(Option<Event>),
    Abort,
}

impl Accepted {
    async fn next(&mut self, abort_live: &mut bool) -> Next {
        loop {
            let live = *abort_live;
            let signal = tokio::select! {
                biased;
                r = &mut self.abort, if live => r,
                ev = self.rs.rx.recv() => return Next::Event(ev),
            };
            match signal {
                Ok(()) => return Next::Abort,
                // The ticket holds the sender, so this does not happen; stop polling if it does.
                Err(_) => *abort_live = false,
            }
        }
    }

    /// Whether the next token is past the `die_after_tokens` budget.
    fn dies_now(&self) -> bool {
        self.die
            .is_some_and(|d| self.asm.num_tokens() as u64 + 1 > d)
    }

    fn closed(&self) -> Status {
        Status::internal(format!(
            "text request stream `{}` closed before terminal output",
            self.request_id
        ))
    }
}

fn engine_failed() -> Status {
    // vLLM since #56405: an engine failure is the stream's status, after what was delivered.
    Status::internal("engine failed during generation")
}

/// Tell the prefill engine to free blocks a rejected decode leg will never read.
fn release_remote(app: &AppState, remote: Option<RemoteKv>) {
    let Some(r) = remote else { return };
    let metrics = app.metrics.clone();
    let world = app.info.tp_size;
    let timeout = app.info.side_channel_timeout;
    let client = app.side_client.clone();
    tokio::spawn(async move {
        if let Err(e) = client
            .notify(&r.host, r.port, &r.request_id, world, timeout)
            .await
        {
            metrics.nixl_failed_notification();
            tracing::warn!("NIXL send_notif failed for request {}: P worker blocks will be freed after timeout. ({e})", r.request_id);
        }
    });
}

impl InferenceSvc {
    async fn accept(&self, req: Request<GenerateRequest>) -> Result<Accepted, Status> {
        // c_req runs from arrival: the conversion below is part of what it models (as in
        // `http::generate::handle`), so the overhead is slept to a deadline.
        let received = tokio::time::Instant::now();
        let conn = req.extensions().get::<ConnInfo>().cloned();
        let rank = convert::data_parallel_rank(
            req.metadata().get(DATA_PARALLEL_RANK).map(|v| v.as_bytes()),
        );
        let req = req.into_inner();
        let app = &self.state.app;
        let slow = app.faults.slow_accept_ms();
        if slow > 0 {
            tokio::time::sleep(Duration::from_millis(slow)).await;
        }
        // A slow accept (a fault) delays the request on top of c_req.
        let ready_at = received + Duration::from_millis(slow) + app.engine.overhead();
        let remote = req
            .kv
            .as_ref()
            .and_then(|kv| kv.kv_transfer_params.as_ref())
            .and_then(|s| {
                convert::remote_of(&convert::struct_to_json(s))
                    .ok()
                    .flatten()
            });
        let limits = Limits {
            served_model_name: app.info.served_model_name.clone(),
            max_model_len: app.info.max_model_len,
            vocab_size: app.tokenizer.vocab_size(),
        };
        let converted = rank.and_then(|_| {
            convert::convert(
                req,
                &limits,
                |text| app.tokenizer.encode(text, true).map_err(|e| e.to_string()),
                || uuid::Uuid::new_v4().to_string(),
            )
        });
        let c = match converted {
            Ok(c) => c,
            Err(status) => {
                release_remote(app, remote);
                return Err(status);
            }
        };
        if app.faults.take_fail() {
            release_remote(app, remote);
            return Err(Status::internal("Internal server error (fault injection)"));
        }
        if app.faults.take_stall() {
            // Accept and never answer; the client's cancel drops this future.
            std::future::pending::<()>().await;
        }
        tokio::time::sleep_until(ready_at).await;
        let clock = app.engine.clock();
        let arrival = clock.now() - clock.real_to_sim(app.engine.overhead());
        // vLLM's frontend hands the engine "{request_id}-{8 hex}"; NIXL and P's pinned KV use it.
        let internal_id = if app.info.disable_request_id_randomization {
            c.request_id.clone()
        } else {
            let mut rng = app
                .rng
                .lock()
                .expect("rng lock is never poisoned: no panics while held");
            format!("{}-{}", c.request_id, random_suffix(&mut *rng))
        };
        let (ticket, abort) = self.state.live.register(&c.request_id);
        let max_tokens = c.params.max_tokens as u64;
        let rs = app.engine.submit(Submit {
            internal_id,
            prompt: c.prompt.clone(),
            params: c.params,
            n: 1,
            role: c.role,
            arrival,
            force_eos_first: app.faults.take_eos(),
            max_tokens_param: max_tokens,
        });
        let identity = KvIdentity {
            engine_id: app.info.engine_id.clone(),
            host: app.info.side_channel_host.clone(),
            port: app.info.side_channel_port,
            tp_size: app.info.tp_size,
        };
        Ok(Accepted {
            request_id: c.request_id,
            rs,
            asm: Assembler::new(c.opts, c.prompt, identity),
            abort,
            _ticket: ticket,
            conn,
            die: app.faults.die_after_tokens(),
        })
    }
}

/// Cut the request's connection, as an engine death would; `sent` first drains into the
/// response body so the client has what was already produced.
async fn die(
    conn: Option<&ConnInfo>,
    sent: Option<&mpsc::Sender<Result<GenerateResponse, Status>>>,
) {
    if let Some(tx) = sent {
        for _ in 0..1000 {
            if tx.capacity() == tx.max_capacity() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    // Let hyper write the drained messages out before the socket fails.
    tokio::time::sleep(Duration::from_millis(5)).await;
    if let Some(c) = conn {
        c.switch.cut();
    }
}

/// The stream's producer: engine events to messages until the finish, an abort, an error or a
/// client that has gone.
async fn pump(mut a: Accepted, tx: mpsc::Sender<Result<GenerateResponse, Status>>) {
    let mut abort_live = true;
    loop {
        let msgs = match a.next(&mut abort_live).await {
            Next::Abort => a.asm.abort(),
            Next::Event(Some(Event::Token {
                token,
                text,
                finish,
                ..
            })) => {
                if a.dies_now() {
                    die(a.conn.as_ref(), Some(&tx)).await;
                    if a.conn.is_none() {
                        let _ = tx
                            .send(Err(Status::unavailable("simulated engine death")))
                            .await;
                    }
                    // Hold the stream open until the cut tears it down, so it cannot end
                    // cleanly first.
                    let _ = tokio::time::timeout(Duration::from_secs(5), tx.closed()).await;
                    return;
                }
                a.asm.token(token, &text, finish.as_ref())
            }
            Next::Event(Some(Event::Failed { error, .. })) => {
                tracing::warn!(%error, "streaming request failed in the engine");
                let _ = tx.send(Err(engine_failed())).await;
                return;
            }
            Next::Event(None) => {
                let _ = tx.send(Err(a.closed())).await;
                return;
            }
        };
        for m in msgs {
            if tx.send(Ok(m)).await.is_err() {
                // The client is gone: dropping `a` aborts the engine request.
                return;
            }
        }
        if a.asm.finished() {
            return;
        }
    }
}

#[tonic::async_trait]
impl vllm_proto::inference_server::Inference for InferenceSvc {
    async fn generate(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<GenerateResponse>, Status> {
        let mut a = self.accept(request).await?;
        let mut abort_live = true;
        while !a.asm.finished() {
            match a.next(&mut abort_live).await {
                Next::Abort => {
                    a.asm.abort();
                }
                Next::Event(Some(Event::Token {
                    token,
                    text,
                    finish,
                    ..
                })) => {
                    if a.dies_now() {
                        die(a.conn.as_ref(), None).await;
                        return Err(Status::unavailable("simulated engine death"));
                    }
                    a.asm.token(token, &text, finish.as_ref());
                }
                Next::Event(Some(Event::Failed { error, .. })) => {
                    tracing::warn!(%error, "request failed in the engine");
                    return Err(engine_failed());
                }
                Next::Event(None) => return Err(a.closed()),
            }
        }
        Ok(Response::new(a.asm.unary()))
    }

    type GenerateStreamStream = ReceiverStream<Result<GenerateResponse, Status>>;

    async fn generate_stream(
        &self,
        request: Request<GenerateRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        let a = self.accept(request).await?;
        let (tx, rx) = mpsc::channel(32);
        tokio::spawn(pump(a, tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
