//! The HTTP transport: vLLM's OpenAI server (vllm-pd-protocol.md §1), over Tandem's own HTTP/1
//! connection pool (`upstream.rs`). Bodies go out as prepared, answers come back byte for byte:
//! only `kv_transfer_params` and the cached-token count are read, and SSE events are judged by
//! byte scans (`relay.rs`).

use std::time::Duration;

use axum::http::StatusCode;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::error::{failed, retry, undelivered, ErrorKind, LegError};
use super::scrape::{parse_scrape, Scrape};
use super::{
    DecodeAnswer, DecodeDeadlines, DecodeStream, KvParams, Leg, PrefillAnswer, Probe, Sent,
};
use crate::error::ProxyError;
use crate::pool::Engine;
use crate::relay::{rewrite_body, Event, EventReader, RelayError};
use crate::upstream::{Conn, Upstream};

#[derive(Debug)]
pub struct HttpEngine {
    upstream: std::sync::Arc<Upstream>,
}

/// A streaming decode answer, read off the connection it arrives on.
#[derive(Debug)]
pub struct HttpStream {
    pub(super) reader: EventReader,
}

/// How long a stream read to `[DONE]` may take to end its body before its connection is
/// closed instead of kept.
const BODY_END_WAIT: Duration = Duration::from_secs(1);

impl HttpStream {
    pub(super) fn finish(self) {
        // A stream read to `[DONE]` leaves the connection clean for the next request once the
        // body's last chunk is in; any other end closes it, which is how vLLM learns to abort.
        if !self.reader.finished() {
            return;
        }
        let mut conn = self.reader.into_conn();
        while let Ok(crate::upstream::Step::Data(_)) = conn.buffered() {}
        if conn.body_done() {
            conn.release();
            return;
        }
        // The closing chunk is usually a moment behind `[DONE]`: wait for it off the relay.
        tokio::spawn(async move {
            let end = tokio::time::timeout(BODY_END_WAIT, async {
                while let Ok(Some(_)) = conn.data().await {}
                conn
            });
            if let Ok(conn) = end.await {
                conn.release();
            }
        });
    }
}

#[derive(Deserialize)]
struct PrefillResponse {
    #[serde(default)]
    kv_transfer_params: Option<Box<RawValue>>,
    #[serde(default)]
    usage: Option<UsageLite>,
}

#[derive(Deserialize)]
struct UsageLite {
    #[serde(default)]
    prompt_tokens_details: Option<DetailsLite>,
}

#[derive(Deserialize)]
struct DetailsLite {
    #[serde(default)]
    cached_tokens: Option<u64>,
}

pub(crate) fn snippet(b: &[u8]) -> String {
    String::from_utf8_lossy(&b[..b.len().min(200)]).into_owned()
}

impl HttpEngine {
    pub fn new(url: &str, connect_timeout: Duration, tls: &crate::tls::EngineTls) -> Self {
        HttpEngine {
            upstream: Upstream::new(url, connect_timeout, tls),
        }
    }

    pub fn close_idle(&self) {
        self.upstream.close_idle();
    }

    pub async fn warm(&self) -> Option<Conn> {
        self.upstream.acquire().await.ok()
    }

    pub async fn prefill(
        &self,
        engine: &Engine,
        leg: Leg<'_>,
        body: &Bytes,
    ) -> Result<PrefillAnswer, LegError> {
        let mut conn = self.upstream.acquire().await.map_err(|e| {
            failed(
                engine,
                ErrorKind::Connect,
                "could not connect to the prefill engine",
                &e,
            )
        })?;
        let r = conn.post_json(leg.kind.path(), body.clone(), leg.request_id, leg.trace);
        let head = conn.send(r).await.map_err(|e| {
            failed(
                engine,
                ErrorKind::Send,
                "the prefill engine did not answer",
                &e,
            )
        })?;
        let (status, ct) = (head.status, head.content_type);
        let body = conn.collect().await.map_err(|e| {
            failed(
                engine,
                ErrorKind::Read,
                "the prefill engine's answer broke off",
                &e,
            )
        })?;
        if status.is_server_error() {
            tracing::warn!(engine = %engine.url, %status, body = %snippet(&body), "prefill engine error");
            return Err(retry(
                ErrorKind::Status5xx,
                format!("the prefill engine answered {status}"),
                false,
            ));
        }
        if !status.is_success() {
            return Err(LegError::Relay(ProxyError::Engine {
                status,
                content_type: ct,
                body,
            }));
        }
        conn.release();
        let parsed: PrefillResponse = serde_json::from_slice(&body).map_err(|err| {
            tracing::warn!(engine = %engine.url, error = %err, body = %snippet(&body), "prefill engine sent unreadable JSON");
            retry(
                ErrorKind::BadResponse,
                "the prefill engine sent an unreadable answer",
                false,
            )
        })?;
        let cached = parsed
            .usage
            .and_then(|u| u.prompt_tokens_details)
            .and_then(|d| d.cached_tokens);
        Ok(PrefillAnswer {
            params: parsed.kv_transfer_params.map(KvParams::Json),
            cached,
        })
    }

    #[allow(clippy::too_many_arguments)]
    pub async fn decode(
        &self,
        engine: &Engine,
        leg: Leg<'_>,
        warm: Option<Conn>,
        body: Bytes,
        stream: bool,
        cached: Option<u64>,
        deadlines: DecodeDeadlines,
    ) -> Result<DecodeAnswer, LegError> {
        let mut conn = match warm {
            Some(c) => c,
            None => self.upstream.acquire().await.map_err(|e| {
                tracing::warn!(engine = %engine.url, error = %e, "decode engine unreachable");
                undelivered("could not connect to the decode engine")
            })?,
        };
        let r = conn.post_json(leg.kind.path(), body, leg.request_id, leg.trace);
        let head = match tokio::time::timeout(deadlines.head, conn.send(r)).await {
            Err(_) => {
                return Err(retry(
                    ErrorKind::HandoffTimeout,
                    "the decode engine sent no response in time",
                    false,
                ))
            }
            Ok(Err(e)) => {
                return Err(failed(
                    engine,
                    ErrorKind::Send,
                    "the decode engine did not answer",
                    &e,
                ))
            }
            Ok(Ok(r)) => r,
        };
        let (status, ct) = (head.status, head.content_type);
        if !status.is_success() {
            let body = tokio::time::timeout(deadlines.idle, conn.collect())
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default();
            if status.is_server_error() {
                tracing::warn!(engine = %engine.url, %status, body = %snippet(&body), "decode engine error");
                return Err(retry(
                    ErrorKind::Status5xx,
                    format!("the decode engine answered {status}"),
                    false,
                ));
            }
            return Err(LegError::Relay(ProxyError::Engine {
                status,
                content_type: ct,
                body,
            }));
        }
        if stream {
            let mut reader = EventReader::new(conn, cached);
            let first = match reader.next(deadlines.first_event).await {
                Ok(Some(Event::Error(b))) => {
                    tracing::warn!(engine = %engine.url, event = %snippet(&b), "decode engine streamed an error first");
                    return Err(retry(
                        ErrorKind::ErrorEvent,
                        "the decode engine streamed an error before any token",
                        false,
                    ));
                }
                Ok(Some(ev)) => ev,
                Ok(None) => {
                    return Err(retry(
                        ErrorKind::StreamBroken,
                        "the decode engine's stream was empty",
                        true,
                    ))
                }
                Err(RelayError::Idle(_)) => {
                    return Err(retry(
                        ErrorKind::FirstTokenTimeout,
                        "the decode engine sent no first token in time",
                        false,
                    ))
                }
                Err(e) => {
                    return Err(failed(
                        engine,
                        ErrorKind::StreamBroken,
                        "the decode engine's stream broke",
                        &e,
                    ))
                }
            };
            return Ok(DecodeAnswer::Stream {
                stream: DecodeStream::Http(Box::new(HttpStream { reader })),
                first,
                content_type: ct,
            });
        }
        let body = match tokio::time::timeout(deadlines.full, conn.collect()).await {
            Err(_) => {
                return Err(retry(
                    ErrorKind::FirstTokenTimeout,
                    "the decode engine's answer timed out",
                    false,
                ))
            }
            Ok(Err(e)) => {
                return Err(failed(
                    engine,
                    ErrorKind::StreamBroken,
                    "the decode engine's answer broke off",
                    &e,
                ))
            }
            Ok(Ok(b)) => b,
        };
        conn.release();
        let body = match cached {
            Some(c) => rewrite_body(&body, c).unwrap_or(body),
            None => body,
        };
        Ok(DecodeAnswer::Full {
            body,
            content_type: ct,
        })
    }

    /// POST `body` to the leg's route and read the whole answer.
    pub async fn post(&self, leg: Leg<'_>, body: Bytes) -> Sent {
        let Ok(mut conn) = self.upstream.acquire().await else {
            return Sent::Unsent;
        };
        let r = conn.post_json(leg.kind.path(), body, leg.request_id, leg.trace);
        let Ok(head) = conn.send(r).await else {
            return Sent::Cut;
        };
        if conn.collect().await.is_err() {
            return Sent::Cut;
        }
        conn.release();
        Sent::from_status(head.status)
    }

    /// POST an empty body to `path`; the answer's status.
    pub async fn post_status(&self, leg: Leg<'_>, path: &str) -> Option<StatusCode> {
        let mut conn = self.upstream.acquire().await.ok()?;
        let req = conn.post_json(path, Bytes::new(), leg.request_id, leg.trace);
        let head = conn.send(req).await.ok()?;
        conn.collect().await.ok()?;
        conn.release();
        Some(head.status)
    }

    /// GET `path`: the body of a 2xx answer.
    pub async fn get(&self, path: &str, timeout: Option<Duration>) -> Result<Bytes, String> {
        let fut = async {
            let mut conn = self.upstream.acquire().await.map_err(|e| e.to_string())?;
            let req = conn.get(path);
            let status = conn.send(req).await.map_err(|e| e.to_string())?.status;
            let body = conn.collect().await.map_err(|e| e.to_string())?;
            conn.release();
            if status.is_success() {
                Ok(body)
            } else {
                Err(format!("GET {path} returned {status}"))
            }
        };
        match timeout {
            None => fut.await,
            Some(t) => tokio::time::timeout(t, fut)
                .await
                .unwrap_or_else(|_| Err(format!("GET {path} timed out"))),
        }
    }

    /// `/health`; then `/v1/models` when the model is wanted, `/metrics` when a scrape number is
    /// given.
    pub async fn probe(&self, scrape_seq: Option<u64>, want_model: bool, t: Duration) -> Probe {
        if let Err(e) = self.get("/health", Some(t)).await {
            return Probe {
                ok: false,
                error: Some(e),
                ..Probe::default()
            };
        }
        let mut out = Probe {
            ok: true,
            ..Probe::default()
        };
        if want_model {
            if let Ok(b) = self.get("/v1/models", Some(t)).await {
                out.model = serde_json::from_slice::<Value>(&b)
                    .ok()
                    .and_then(|v| v["data"][0]["id"].as_str().map(std::sync::Arc::from));
            }
        }
        if let Some(seq) = scrape_seq {
            if let Ok(b) = self.get("/metrics", Some(t)).await {
                out.scrape = Some(Scrape {
                    seq,
                    ..parse_scrape(&String::from_utf8_lossy(&b))
                });
            }
        }
        out
    }
}

/// A release leg's body: the prefill leg's (the client's prompt and sampling, not streamed)
/// with the handoff's params in place of the prefill request's, one choice, and `max_tokens`
/// tokens (1: pull; 0: reject, see handoff.rs).
pub(crate) fn release_body(prefill_body: &Bytes, params: &str, max_tokens: u64) -> Option<Bytes> {
    let mut m: Map<String, Value> = serde_json::from_slice(prefill_body).ok()?;
    m.remove("kv_transfer_params");
    m.insert("n".into(), Value::from(1));
    m.remove("best_of");
    m.insert("max_tokens".into(), Value::from(max_tokens));
    if m.contains_key("max_completion_tokens") {
        m.insert("max_completion_tokens".into(), Value::from(max_tokens));
    }
    // The params go in byte for byte, as on the decode leg.
    let mut out = serde_json::to_vec(&m).ok()?;
    out.pop();
    if !m.is_empty() {
        out.push(b',');
    }
    out.extend_from_slice(b"\"kv_transfer_params\":");
    out.extend_from_slice(params.as_bytes());
    out.push(b'}');
    Some(Bytes::from(out))
}
