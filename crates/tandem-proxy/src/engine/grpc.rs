//! The gRPC transport: vLLM's native `vllm.Inference` / `vllm.Control` (vllm-grpc.md), over one
//! tonic channel per engine.
//!
//! The request goes in as token ids with every sampling field written out (`grpc/request.rs`),
//! the answer comes back as OpenAI bytes rendered by Tandem (`grpc/render.rs`) from the server's
//! text deltas, so a client sees what vLLM's HTTP server would have sent. The prefill's
//! `FinishInfo.kv_transfer_params` travel to the decode leg as the same Struct. A decode leg the
//! request drops is aborted with `Control.Abort` besides the stream's own drop, at once, as an
//! HTTP leg's dropped connection is: not deferred until its first output (vllm-grpc.md §4's
//! advice), because a leg that failed before its first output makes `pd.rs` release the
//! prefill's blocks (a reject), and a decode request still alive would then read blocks the
//! prefill engine may have reused.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::{HeaderValue, StatusCode};
use bytes::Bytes;
use serde_json::{Map, Value};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use vllm_proto::control_client::ControlClient;
use vllm_proto::inference_client::InferenceClient;
use vllm_proto::{AbortRequest, GenerateRequest, GenerateResponse};

use super::error::{retry, undelivered, ErrorKind, LegError};
use super::scrape::{parse_scrape, Scrape};
use super::{
    DecodeAnswer, DecodeDeadlines, DecodeStream, KvParams, Leg, PrefillAnswer, Probe, Sent,
};
use crate::error::{error_body, ProxyError};
use crate::front::{Kind, Parsed};
use crate::grpc::{self as conv, RenderSpec, Renderer};
use crate::relay::{Event, RelayError};

/// Responses carry token ids (and may carry prompt token ids): above tonic's 4 MiB default.
const MAX_DECODE_BYTES: usize = 64 << 20;

/// What discovery learned about the engine (`GetModelInfo`, `GetServerInfo`).
#[derive(Debug, Default, Clone)]
struct Discovered {
    model: Option<Arc<str>>,
    max_model_len: u32,
    tool_call_parser: bool,
}

#[derive(Debug)]
pub struct GrpcEngine {
    channel: Channel,
    /// The engine's HTTP port, where vLLM-rs serves `/metrics` (and `/reset_prefix_cache`).
    http: Option<super::http::HttpEngine>,
    discovered: Mutex<Discovered>,
}

/// A streaming decode answer: the engine's messages rendered into OpenAI events.
#[derive(Debug)]
pub struct GrpcStream {
    stream: tonic::Streaming<GenerateResponse>,
    renderer: Renderer,
    pending: VecDeque<Event>,
    done: bool,
    abort: AbortOnDrop,
}

/// Sends `Control.Abort` for a request unless disarmed.
#[derive(Debug)]
struct AbortOnDrop {
    control: ControlClient<Channel>,
    request_id: String,
    armed: bool,
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut control = self.control.clone();
        let ids = vec![self.request_id.clone()];
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            // Idempotent: an id the engine no longer knows is a no-op.
            rt.spawn(async move {
                let _ = control.abort(AbortRequest { request_ids: ids }).await;
            });
        }
    }
}

impl AbortOnDrop {
    /// How long [`AbortOnDrop::now`] waits for the engine's answer.
    const WAIT: Duration = Duration::from_millis(500);

    /// Send the abort and wait for it (at most [`Self::WAIT`]); disarms the drop.
    async fn now(&mut self) {
        self.armed = false;
        let ids = vec![self.request_id.clone()];
        let abort = self.control.abort(AbortRequest { request_ids: ids });
        let _ = tokio::time::timeout(Self::WAIT, abort).await;
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The client-facing error for a status the engine's validation returned.
fn status_answer(s: &Status) -> Option<ProxyError> {
    let status = match s.code() {
        Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => {
            StatusCode::BAD_REQUEST
        }
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        _ => return None,
    };
    let body = error_body(s.message(), status);
    Some(ProxyError::Engine {
        status,
        content_type: Some(HeaderValue::from_static("application/json")),
        body: Bytes::from(body.to_string()),
    })
}

/// A failed call: the engine's own refusal for the client, or a failure worth another engine.
fn status_error(leg: &'static str, s: &Status) -> LegError {
    if let Some(e) = status_answer(s) {
        return LegError::Relay(e);
    }
    tracing::warn!(code = ?s.code(), message = s.message(), "{leg} engine call failed");
    let suspect = matches!(s.code(), Code::Unavailable | Code::Unknown);
    retry(
        ErrorKind::Status5xx,
        format!("the {leg} engine answered {:?}", s.code()),
        suspect,
    )
}

fn bad_request(e: conv::RequestError) -> LegError {
    LegError::Relay(ProxyError::BadRequest(e.to_string()))
}

fn with_meta<T>(msg: T, leg: Leg<'_>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    let m = r.metadata_mut();
    if let Ok(v) = leg.request_id.parse() {
        m.insert("x-request-id", v);
    }
    if let Ok(v) = leg.trace.traceparent.to_str().unwrap_or("").parse() {
        m.insert("traceparent", v);
    }
    r
}

/// A leg's JSON body as a map, without the params a prefill body carries.
fn body_map(body: &[u8]) -> Result<Map<String, Value>, LegError> {
    let mut m: Map<String, Value> = serde_json::from_slice(body)
        .map_err(|_| LegError::Relay(ProxyError::BadRequest("invalid JSON body".into())))?;
    m.remove("kv_transfer_params");
    Ok(m)
}

impl KvParams {
    /// The params as a Struct for a gRPC decode leg: as issued when they came over gRPC.
    fn to_struct(&self) -> Option<prost_types::Struct> {
        match self {
            KvParams::Struct(s) => Some(s.clone()),
            KvParams::Json(raw) => {
                let v: Value = serde_json::from_str(raw.get()).ok()?;
                conv::json_to_struct(&v)
            }
        }
    }
}

impl GrpcEngine {
    /// `url` is `http://host:port` (h2c) or `https://host:port` (HTTP/2 over TLS from `tls`);
    /// `metrics`, the engine's HTTP base URL, if any.
    pub fn new(
        url: &str,
        metrics: Option<&str>,
        connect_timeout: Duration,
        tls: &crate::tls::EngineTls,
    ) -> Self {
        let mut endpoint =
            Endpoint::from_shared(url.to_string()).expect("a URL the config validated");
        if url.starts_with("https://") {
            let host = crate::tls::host_of(url);
            // Without a usable configuration tonic refuses the https:// URL at the first call,
            // which the probes report; the same CA and host are used for HTTP engines.
            match tls.grpc(host).map(|c| endpoint.clone().tls_config(c)) {
                Some(Ok(e)) => endpoint = e,
                Some(Err(e)) => tracing::error!(engine = url, error = %e, "gRPC TLS configuration"),
                None => tracing::error!(
                    engine = url,
                    "gRPC engine over https:// without TLS configured"
                ),
            }
        }
        let channel = endpoint
            .connect_timeout(connect_timeout)
            // SMG's profile: keepalive pings often enough that a dead engine is noticed.
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true)
            .tcp_nodelay(true)
            .connect_lazy();
        GrpcEngine {
            channel,
            http: metrics.map(|m| super::http::HttpEngine::new(m, connect_timeout, tls)),
            discovered: Mutex::new(Discovered::default()),
        }
    }

    fn inference(&self) -> InferenceClient<Channel> {
        InferenceClient::new(self.channel.clone()).max_decoding_message_size(MAX_DECODE_BYTES)
    }

    fn control(&self) -> ControlClient<Channel> {
        ControlClient::new(self.channel.clone())
    }

    fn discovered(&self) -> Discovered {
        self.discovered.lock().expect("discovery lock").clone()
    }

    /// Whether the channel can carry a call now; an error means nothing was sent.
    async fn ready(&self) -> Result<(), String> {
        let mut ch = self.channel.clone();
        tower::ServiceExt::ready(&mut ch)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    fn request(
        &self,
        kind: Kind,
        body: &Map<String, Value>,
        prompt_ids: &[u32],
        request_id: &str,
        leg: conv::Leg,
    ) -> Result<GenerateRequest, conv::RequestError> {
        conv::generate_request(
            &conv::OpenAiRequest {
                kind,
                body,
                prompt_ids,
                request_id,
                tool_call_parser: self.discovered().tool_call_parser,
            },
            leg,
        )
    }

    pub async fn prefill(
        &self,
        leg: Leg<'_>,
        body: &Bytes,
        prompt_ids: &[u32],
    ) -> Result<PrefillAnswer, LegError> {
        let map = body_map(body)?;
        let req = self
            .request(
                leg.kind,
                &map,
                prompt_ids,
                leg.request_id,
                conv::Leg::Prefill,
            )
            .map_err(bad_request)?;
        self.ready().await.map_err(|e| {
            tracing::warn!(error = %e, "could not connect to the prefill engine");
            retry(
                ErrorKind::Connect,
                "could not connect to the prefill engine",
                true,
            )
        })?;
        let resp = self
            .inference()
            .generate(with_meta(req, leg))
            .await
            .map_err(|s| status_error("prefill", &s))?
            .into_inner();
        let finish = resp
            .outputs
            .as_ref()
            .and_then(|o| o.finish_info.as_ref())
            .ok_or_else(|| {
                retry(
                    ErrorKind::BadResponse,
                    "the prefill engine's answer has no finish_info",
                    false,
                )
            })?;
        Ok(PrefillAnswer {
            params: finish.kv_transfer_params.clone().map(KvParams::Struct),
            cached: finish.num_cached_tokens.map(u64::from),
        })
    }

    pub async fn decode(
        &self,
        leg: Leg<'_>,
        req: &Parsed,
        params: Option<&KvParams>,
        cached: Option<u64>,
        deadlines: DecodeDeadlines,
    ) -> Result<DecodeAnswer, LegError> {
        let map = body_map(&req.decode_body(None))?;
        let role = match params {
            None => conv::Leg::Colocated,
            Some(p) => conv::Leg::Decode {
                kv_transfer_params: p.to_struct().ok_or_else(|| {
                    retry(
                        ErrorKind::BadResponse,
                        "the prefill's KV params cannot be carried over gRPC",
                        false,
                    )
                })?,
            },
        };
        let greq = self
            .request(leg.kind, &map, &req.prompt_ids, leg.request_id, role)
            .map_err(bad_request)?;
        self.ready().await.map_err(|e| {
            tracing::warn!(error = %e, "decode engine unreachable");
            undelivered("could not connect to the decode engine")
        })?;
        let (include_usage, continuous_usage_stats) = conv::stream_usage(&map);
        let d = self.discovered();
        let spec = RenderSpec {
            kind: leg.kind,
            stream: req.stream,
            include_usage,
            continuous_usage_stats,
            response_id: match leg.kind {
                Kind::Completions => format!("cmpl-{}", leg.request_id),
                Kind::Chat => format!("chatcmpl-{}", leg.request_id),
            },
            created: now_secs(),
            model: d.model.as_deref().unwrap_or_default().to_string(),
            prompt_tokens: req.prompt_tokens,
            cached_tokens: cached,
            prompt_tokens_details: false,
        };
        let renderer = Renderer::new(spec);
        if !req.stream {
            let mut client = self.inference();
            let call = client.generate(with_meta(greq, leg));
            let resp = match tokio::time::timeout(deadlines.full, call).await {
                Err(_) => {
                    return Err(retry(
                        ErrorKind::FirstTokenTimeout,
                        "the decode engine's answer timed out",
                        false,
                    ))
                }
                Ok(Err(s)) => return Err(status_error("decode", &s)),
                Ok(Ok(r)) => r.into_inner(),
            };
            let body = renderer.full(&[resp]).map_err(|e| {
                retry(
                    ErrorKind::BadResponse,
                    format!("the decode engine's answer: {e}"),
                    false,
                )
            })?;
            return Ok(DecodeAnswer::Full {
                body,
                content_type: Some(HeaderValue::from_static("application/json")),
            });
        }
        let mut client = self.inference();
        let call = client.generate_stream(with_meta(greq, leg));
        let stream = match tokio::time::timeout(deadlines.head, call).await {
            Err(_) => {
                return Err(retry(
                    ErrorKind::HandoffTimeout,
                    "the decode engine sent no response in time",
                    false,
                ))
            }
            Ok(Err(s)) => return Err(status_error("decode", &s)),
            Ok(Ok(r)) => r.into_inner(),
        };
        let mut s = GrpcStream {
            stream,
            renderer,
            pending: VecDeque::new(),
            done: false,
            abort: AbortOnDrop {
                control: self.control(),
                request_id: leg.request_id.to_string(),
                armed: true,
            },
        };
        let first = match tokio::time::timeout(deadlines.first_event, s.fill()).await {
            Err(_) => {
                // Abort the request now, and before returning. Deferring the abort until the
                // first output (to spare a KV read in flight) left the request queued on the
                // engine while the re-plan's reject freed the prefill's blocks, which it then
                // pulled once it had room: a read of released, possibly reused, blocks. Awaited,
                // so it cannot reach the engine after the retry's leg, which carries the same
                // request id (`Control.Abort` takes external ids) and would be aborted instead.
                s.abort.now().await;
                return Err(retry(
                    ErrorKind::FirstTokenTimeout,
                    "the decode engine sent no first token in time",
                    false,
                ));
            }
            Ok(Err(e)) => return Err(e),
            Ok(Ok(())) => s.pending.pop_front().expect("fill leaves an event"),
        };
        if let Event::Error(_) = first {
            return Err(retry(
                ErrorKind::ErrorEvent,
                "the decode engine failed before any token",
                false,
            ));
        }
        Ok(DecodeAnswer::Stream {
            stream: DecodeStream::Grpc(Box::new(s)),
            first,
            content_type: Some(HeaderValue::from_static("text/event-stream; charset=utf-8")),
        })
    }

    /// A release leg (handoff.rs) over gRPC: a pull is the decode request with the params and
    /// one token; a reject is one the server refuses in validation before it reaches the engine
    /// (`min_new_tokens > max_new_tokens`), gRPC's counterpart of HTTP's `max_tokens = 0`.
    pub async fn release(
        &self,
        leg: Leg<'_>,
        prefill_body: &Bytes,
        prompt_ids: &[u32],
        params: &KvParams,
        max_tokens: u64,
    ) -> Sent {
        let (Ok(map), Some(s)) = (body_map(prefill_body), params.to_struct()) else {
            return Sent::Unsent;
        };
        let Ok(mut req) = self.request(
            leg.kind,
            &map,
            prompt_ids,
            leg.request_id,
            conv::Leg::Decode {
                kv_transfer_params: s,
            },
        ) else {
            return Sent::Unsent;
        };
        let stopping = req.stopping.get_or_insert_with(Default::default);
        stopping.max_new_tokens = 1;
        stopping.min_new_tokens = if max_tokens == 0 { 2 } else { 0 };
        if self.ready().await.is_err() {
            return Sent::Unsent;
        }
        match self.inference().generate(with_meta(req, leg)).await {
            Ok(_) => Sent::Accepted,
            Err(s) if status_answer(&s).is_some() => Sent::Refused,
            Err(_) => Sent::Failed,
        }
    }

    /// `grpc.health.v1`; discovery (`GetModelInfo`, `GetServerInfo`) when the model is wanted;
    /// `/metrics` on the engine's HTTP port when a scrape number is given and one is known.
    pub async fn probe(&self, scrape_seq: Option<u64>, want_model: bool, t: Duration) -> Probe {
        let health = async {
            let mut h = tonic_health::pb::health_client::HealthClient::new(self.channel.clone());
            let r = match h
                .check(tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                })
                .await
            {
                Ok(r) => r,
                // vLLM-rs builds before grpc.health.v1 landed answer UNIMPLEMENTED: an engine
                // that answers `GetServerInfo` is serving.
                Err(s) if s.code() == Code::Unimplemented => {
                    return self
                        .control()
                        .get_server_info(vllm_proto::GetServerInfoRequest {})
                        .await
                        .map(|_| ())
                        .map_err(|s| {
                            format!("GetServerInfo failed: {:?} {}", s.code(), s.message())
                        });
                }
                Err(s) => {
                    return Err(format!(
                        "health check failed: {:?} {}",
                        s.code(),
                        s.message()
                    ))
                }
            };
            let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
            if r.into_inner().status == serving {
                Ok(())
            } else {
                Err("the engine reports NOT_SERVING".to_string())
            }
        };
        match tokio::time::timeout(t, health).await {
            Err(_) => {
                return Probe {
                    ok: false,
                    error: Some("health check timed out".into()),
                    ..Probe::default()
                }
            }
            Ok(Err(e)) => {
                return Probe {
                    ok: false,
                    error: Some(e),
                    ..Probe::default()
                }
            }
            Ok(Ok(())) => {}
        }
        let mut out = Probe {
            ok: true,
            ..Probe::default()
        };
        if want_model {
            let mut c = self.control();
            let info = async {
                let m = c
                    .get_model_info(vllm_proto::GetModelInfoRequest {})
                    .await
                    .ok()?;
                let s = c
                    .get_server_info(vllm_proto::GetServerInfoRequest {})
                    .await
                    .ok()?;
                Some((m.into_inner(), s.into_inner()))
            };
            if let Ok(Some((m, s))) = tokio::time::timeout(t, info).await {
                let model: Arc<str> = Arc::from(m.served_model_name.as_str());
                *self.discovered.lock().expect("discovery lock") = Discovered {
                    model: Some(model.clone()),
                    max_model_len: s.max_model_len,
                    tool_call_parser: !m.tool_call_parser.is_empty(),
                };
                out.model = Some(model);
                out.block_size = Some(s.kv_block_size);
                out.num_gpu_blocks = Some(s.total_kv_blocks);
                out.engine_version = Some(Arc::from(s.engine_version.as_str()));
            }
        }
        if let (Some(seq), Some(http)) = (scrape_seq, &self.http) {
            if let Ok(b) = http.get("/metrics", Some(t)).await {
                out.scrape = Some(Scrape {
                    seq,
                    ..parse_scrape(&String::from_utf8_lossy(&b))
                });
            }
        }
        out
    }

    /// `/v1/models` as vLLM's OpenAI server writes it, from what discovery learned.
    pub fn models(&self) -> Option<Bytes> {
        let d = self.discovered();
        let model = d.model?;
        let body = serde_json::json!({
            "object": "list",
            "data": [{
                "id": &*model,
                "object": "model",
                "created": now_secs(),
                "owned_by": "vllm",
                "root": &*model,
                "parent": null,
                "max_model_len": d.max_model_len,
                "permission": [],
            }],
        });
        Some(Bytes::from(body.to_string()))
    }

    /// vLLM-rs resets its prefix cache on its HTTP port; without one there is no way to.
    pub async fn reset_prefix_cache(&self, leg: Leg<'_>) -> Option<StatusCode> {
        self.http
            .as_ref()?
            .post_status(leg, "/reset_prefix_cache")
            .await
    }
}

impl GrpcStream {
    /// Read messages until at least one event is pending (or the stream is over).
    async fn fill(&mut self) -> Result<(), LegError> {
        while self.pending.is_empty() {
            match self.read().await {
                Ok(true) => {}
                Ok(false) => break,
                Err(RelayError::Broken(m)) => {
                    return Err(retry(ErrorKind::StreamBroken, m, true));
                }
                Err(e) => return Err(retry(ErrorKind::StreamBroken, e.to_string(), true)),
            }
        }
        if self.pending.is_empty() {
            return Err(retry(
                ErrorKind::StreamBroken,
                "the decode engine's stream was empty",
                true,
            ));
        }
        Ok(())
    }

    /// Read one message and render it. `Ok(false)` once the stream is over.
    async fn read(&mut self) -> Result<bool, RelayError> {
        if self.done {
            return Ok(false);
        }
        match self.stream.message().await {
            Ok(Some(msg)) => {
                let chunks = self
                    .renderer
                    .push(&msg)
                    .map_err(|e| RelayError::Broken(e.to_string()))?;
                self.queue(chunks);
                Ok(true)
            }
            Ok(None) => {
                self.done = true;
                self.abort.armed = false;
                match self.renderer.finish() {
                    Ok(chunks) => {
                        self.queue(chunks);
                        Ok(true)
                    }
                    Err(conv::RenderError::NoFinish) => Err(RelayError::Truncated),
                    Err(e) => Err(RelayError::Broken(e.to_string())),
                }
            }
            Err(s) => {
                self.done = true;
                tracing::warn!(code = ?s.code(), message = s.message(), "decode stream failed");
                Err(RelayError::Broken(format!(
                    "the decode engine's stream failed: {:?}",
                    s.code()
                )))
            }
        }
    }

    fn queue(&mut self, chunks: Vec<conv::Chunk>) {
        for c in chunks {
            let ev = if c.bytes.as_ref() == b"data: [DONE]\n\n" {
                Event::Done(c.bytes)
            } else if c.bytes.starts_with(b"data: {\"error\"") {
                Event::Error(c.bytes)
            } else if c.content {
                Event::Content(c.bytes)
            } else {
                Event::Other(c.bytes)
            };
            self.pending.push_back(ev);
        }
    }

    pub(super) async fn next(&mut self, wait: Duration) -> Result<Option<Event>, RelayError> {
        loop {
            if let Some(ev) = self.pending.pop_front() {
                return Ok(Some(ev));
            }
            if self.done {
                return Ok(None);
            }
            match tokio::time::timeout(wait, self.read()).await {
                Err(_) => return Err(RelayError::Idle(wait)),
                Ok(r) => {
                    r?;
                }
            }
        }
    }

    pub(super) fn buffered(&mut self) -> Option<Event> {
        self.pending.pop_front()
    }

    pub(super) fn finish(mut self) {
        if self.done {
            self.abort.armed = false;
        }
    }
}
