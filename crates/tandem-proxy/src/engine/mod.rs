//! The engine seam: everything Tandem says to an engine goes through [`EngineClient`], whatever
//! protocol the engine speaks.
//!
//! The request is described in the client's own terms, the same for every transport: the
//! OpenAI body as Tandem prepared it for the leg (JSON bytes: the client's body for a decode leg,
//! the one-token variant for a prefill leg) and the prompt's token ids. The HTTP transport sends
//! the bytes as they are (vLLM's OpenAI server parses them itself, and the bytes a client
//! receives are the engine's own); a transport with its own schema converts them. Answers come
//! back neutral too: a prefill's [`KvParams`] (opaque, carried verbatim between engines of the
//! same protocol), a decode leg's OpenAI events ([`DecodeStream`]), a typed [`LegError`], a
//! probe's [`Probe`]. `pd.rs`, `prefill.rs` and `handoff.rs` hold these, never connections.

use std::borrow::Cow;
use std::time::Duration;

use axum::http::{HeaderValue, StatusCode};
use bytes::Bytes;
use serde_json::value::RawValue;

use crate::front::Kind;
use crate::relay::{Burst, Event, RelayError};
use crate::trace::Outgoing;

pub mod error;
pub mod grpc;
pub mod http;
pub mod scrape;

pub use error::LegError;

/// One engine's client, by protocol.
#[derive(Debug)]
pub enum EngineClient {
    Http(http::HttpEngine),
    Grpc(grpc::GrpcEngine),
}

/// Who a leg is for: its kind (the OpenAI route), request id and trace context.
#[derive(Debug, Clone, Copy)]
pub struct Leg<'a> {
    pub kind: Kind,
    pub request_id: &'a str,
    pub trace: &'a Outgoing,
}

/// A prefill's KV handoff as its engine issued it.
#[derive(Debug)]
pub enum KvParams {
    /// vLLM's HTTP `kv_transfer_params`, byte for byte.
    Json(Box<RawValue>),
    /// vLLM gRPC's `FinishInfo.kv_transfer_params`.
    Struct(prost_types::Struct),
}

impl KvParams {
    /// The params as JSON for an HTTP decode leg: verbatim when they came as JSON; from a gRPC
    /// prefill, with integral numbers as integers (vLLM's Python side needs `remote_port` and
    /// block ids as ints, and a Struct carries every number as a double).
    pub fn json(&self) -> Cow<'_, str> {
        match self {
            KvParams::Json(raw) => Cow::Borrowed(raw.get()),
            KvParams::Struct(s) => Cow::Owned(crate::grpc::struct_to_json(s).to_string()),
        }
    }
}

/// A finished prefill leg: its handoff (`None`: the engine kept no KV for us) and the cached
/// tokens it reported.
#[derive(Debug)]
pub struct PrefillAnswer {
    pub params: Option<KvParams>,
    pub cached: Option<u64>,
}

/// Something made ready for a decode leg before it is sent (a connection opened while the
/// prefill runs, so the handoff is one write).
#[derive(Debug)]
pub enum Warm {
    Http(crate::upstream::Conn),
}

/// How long a decode leg may wait: for the response head, for the first event of a stream, for
/// a whole non-streaming answer, and for an error answer's body.
#[derive(Debug, Clone, Copy)]
pub struct DecodeDeadlines {
    pub head: Duration,
    pub first_event: Duration,
    pub full: Duration,
    pub idle: Duration,
}

/// A decode leg that began: a stream with its first event, or a whole answer.
#[derive(Debug)]
pub enum DecodeAnswer {
    Stream {
        stream: DecodeStream,
        first: Event,
        content_type: Option<HeaderValue>,
    },
    Full {
        body: Bytes,
        content_type: Option<HeaderValue>,
    },
}

/// A decode leg's OpenAI events as they arrive.
#[derive(Debug)]
pub enum DecodeStream {
    /// Both boxed: the connection with its read buffer, and the renderer with the tonic
    /// stream, are large, and a stream is moved through several futures before it relays.
    Http(Box<http::HttpStream>),
    Grpc(Box<grpc::GrpcStream>),
}

impl DecodeStream {
    /// The next event, waiting at most `wait`. `Ok(None)` after `[DONE]`.
    pub async fn next(&mut self, wait: Duration) -> Result<Option<Event>, RelayError> {
        match self {
            DecodeStream::Http(s) => s.reader.next(wait).await,
            DecodeStream::Grpc(s) => s.next(wait).await,
        }
    }

    /// Wait at most `wait` for at least one event, then take every one already arrived into
    /// `burst` (one client write). Nothing in it afterwards: the stream is over.
    pub async fn next_burst(
        &mut self,
        wait: Duration,
        burst: &mut Burst,
        want_usage: bool,
    ) -> Result<(), RelayError> {
        match self {
            DecodeStream::Http(s) => s.reader.next_burst(wait, burst, want_usage).await,
            DecodeStream::Grpc(s) => {
                // The renderer makes each event's bytes itself; joined for one client write.
                let Some(ev) = s.next(wait).await? else {
                    return Ok(());
                };
                let mut next = Some(ev);
                while let Some(ev) = next.take() {
                    burst.push(ev, want_usage);
                    if !burst.done {
                        next = s.buffered();
                    }
                }
                burst.join();
                Ok(())
            }
        }
    }

    /// An event already complete, without waiting (to coalesce a burst into one write).
    pub fn buffered(&mut self) -> Option<Event> {
        match self {
            DecodeStream::Http(s) => s.reader.buffered(),
            DecodeStream::Grpc(s) => s.buffered(),
        }
    }

    /// The stream is over: a transport that reuses connections keeps this one if the stream
    /// ended cleanly; dropping the stream instead aborts the request on the engine.
    pub fn finish(self) {
        match self {
            DecodeStream::Http(s) => s.finish(),
            DecodeStream::Grpc(s) => s.finish(),
        }
    }
}

/// How one release leg (handoff.rs) went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// It never reached the engine (no connection).
    Unsent,
    /// The engine ran it (HTTP 2xx).
    Accepted,
    /// The engine's serving layer refused it (HTTP 4xx), which frees the handoff's blocks.
    Refused,
    /// The engine answered with an error.
    Failed,
    /// It reached the engine (or may have) and got no whole answer in time.
    Cut,
}

impl Sent {
    fn from_status(s: StatusCode) -> Sent {
        if s.is_success() {
            Sent::Accepted
        } else if s.is_client_error() {
            Sent::Refused
        } else {
            Sent::Failed
        }
    }
}

/// One probe's findings.
#[derive(Debug, Default)]
pub struct Probe {
    pub ok: bool,
    pub error: Option<String>,
    pub model: Option<std::sync::Arc<str>>,
    /// KV geometry learned by discovery rather than a scrape (gRPC `GetServerInfo`).
    pub block_size: Option<u32>,
    pub num_gpu_blocks: Option<u64>,
    pub engine_version: Option<std::sync::Arc<str>>,
    pub scrape: Option<scrape::Scrape>,
}

impl EngineClient {
    /// The client for an engine at `url` (validated by the config), over `protocol`;
    /// `metrics` is a gRPC engine's HTTP base URL, if given. `https://` URLs use `tls`.
    pub fn new(
        protocol: tandem_config::Protocol,
        url: &str,
        metrics: Option<&str>,
        connect_timeout: Duration,
        tls: &crate::tls::EngineTls,
    ) -> Self {
        match protocol {
            tandem_config::Protocol::Http => {
                EngineClient::Http(http::HttpEngine::new(url, connect_timeout, tls))
            }
            tandem_config::Protocol::Grpc => {
                EngineClient::Grpc(grpc::GrpcEngine::new(url, metrics, connect_timeout, tls))
            }
        }
    }

    /// Run a prefill leg: `body` is its OpenAI body (one token, `do_remote_decode`).
    pub async fn prefill(
        &self,
        engine: &crate::pool::Engine,
        leg: Leg<'_>,
        body: &Bytes,
        prompt_ids: &[u32],
    ) -> Result<PrefillAnswer, LegError> {
        match self {
            EngineClient::Http(h) => h.prefill(engine, leg, body).await,
            EngineClient::Grpc(g) => g.prefill(leg, body, prompt_ids).await,
        }
    }

    /// Make a decode leg's first write cheap (`None` if nothing could be prepared).
    pub async fn warm(&self) -> Option<Warm> {
        match self {
            EngineClient::Http(h) => h.warm().await.map(Warm::Http),
            // One multiplexed channel, kept open: nothing to prepare.
            EngineClient::Grpc(_) => None,
        }
    }

    /// Send a decode leg: the client's request with the prefill's handoff, if any. `cached`
    /// replaces the usage's cached-token count.
    #[allow(clippy::too_many_arguments)]
    pub async fn decode(
        &self,
        engine: &crate::pool::Engine,
        leg: Leg<'_>,
        warm: Option<Warm>,
        req: &crate::front::Parsed,
        params: Option<&KvParams>,
        cached: Option<u64>,
        deadlines: DecodeDeadlines,
    ) -> Result<DecodeAnswer, LegError> {
        match self {
            EngineClient::Http(h) => {
                let warm = warm.map(|Warm::Http(c)| c);
                // The client's bytes plus the params, verbatim (one concatenation).
                let p = params.map(KvParams::json);
                let body = req.decode_body(p.as_deref());
                h.decode(engine, leg, warm, body, req.stream, cached, deadlines)
                    .await
            }
            EngineClient::Grpc(g) => g.decode(leg, req, params, cached, deadlines).await,
        }
    }

    /// Send a release leg (handoff.rs): the prefill leg's body with `params` and `max_tokens`
    /// (1: pull the blocks; 0: a request the serving layer refuses, which frees them).
    pub async fn release(
        &self,
        leg: Leg<'_>,
        prefill_body: &Bytes,
        prompt_ids: &[u32],
        params: &KvParams,
        max_tokens: u64,
        deadline: Duration,
    ) -> Sent {
        match self {
            EngineClient::Http(h) => {
                let Some(body) = http::release_body(prefill_body, &params.json(), max_tokens)
                else {
                    return Sent::Unsent;
                };
                match tokio::time::timeout(deadline, h.post(leg, body)).await {
                    Err(_) => Sent::Cut,
                    Ok(s) => s,
                }
            }
            EngineClient::Grpc(g) => {
                let release = g.release(leg, prefill_body, prompt_ids, params, max_tokens);
                match tokio::time::timeout(deadline, release).await {
                    Err(_) => Sent::Cut,
                    Ok(s) => s,
                }
            }
        }
    }

    /// Health, and (when asked) the served model and the load figures routing reads.
    pub async fn probe(
        &self,
        scrape_seq: Option<u64>,
        want_model: bool,
        timeout: Duration,
    ) -> Probe {
        match self {
            EngineClient::Http(h) => h.probe(scrape_seq, want_model, timeout).await,
            EngineClient::Grpc(g) => g.probe(scrape_seq, want_model, timeout).await,
        }
    }

    /// The engine's `/v1/models` answer, as its OpenAI server writes it.
    pub async fn models(&self) -> Option<Bytes> {
        match self {
            EngineClient::Http(h) => h.get("/v1/models", None).await.ok(),
            EngineClient::Grpc(g) => g.models(),
        }
    }

    /// Reset the engine's prefix cache; the engine's answer status.
    pub async fn reset_prefix_cache(&self, leg: Leg<'_>) -> Option<StatusCode> {
        match self {
            EngineClient::Http(h) => h.post_status(leg, "/reset_prefix_cache").await,
            EngineClient::Grpc(g) => g.reset_prefix_cache(leg).await,
        }
    }

    /// The engine left the pool: close what is kept open to it.
    pub fn close_idle(&self) {
        match self {
            EngineClient::Http(h) => h.close_idle(),
            // The channel closes when the last handle to the engine goes.
            EngineClient::Grpc(_) => {}
        }
    }
}
