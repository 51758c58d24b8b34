//! A leg's failure, typed the same way for every transport: what went wrong (a bounded kind,
//! which is also the `reason` label of `tandem_retries_total`), whether another engine may be
//! tried, and whether the request may have reached the engine.

use crate::error::ProxyError;
use crate::pool::Engine;

/// What went wrong on a leg. Bounded: these are metric label values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// No connection (or channel) to the engine: the request never left.
    Connect,
    /// The request was (or may have been) sent and no answer came.
    Send,
    /// The answer broke off while it was read.
    Read,
    /// The engine answered with a server error (HTTP 5xx, gRPC INTERNAL/UNAVAILABLE/...).
    Status5xx,
    /// The answer could not be read as the protocol says.
    BadResponse,
    /// The prefill leg ran past `timeouts.prefill_ms`.
    Timeout,
    /// The decode engine sent no response head within `timeouts.handoff_ms`.
    HandoffTimeout,
    /// The decode engine's first event (or whole answer) did not come in time.
    FirstTokenTimeout,
    /// The decode engine streamed an error before any token.
    ErrorEvent,
    /// The decode stream broke or was empty before its first event.
    StreamBroken,
    /// The task running the leg failed.
    Task,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Connect => "connect",
            ErrorKind::Send => "send",
            ErrorKind::Read => "read",
            ErrorKind::Status5xx => "status_5xx",
            ErrorKind::BadResponse => "bad_response",
            ErrorKind::Timeout => "timeout",
            ErrorKind::HandoffTimeout => "handoff_timeout",
            ErrorKind::FirstTokenTimeout => "first_token_timeout",
            ErrorKind::ErrorEvent => "error_event",
            ErrorKind::StreamBroken => "stream_broken",
            ErrorKind::Task => "task",
        }
    }
}

/// A failure worth another engine.
#[derive(Debug)]
pub struct EngineError {
    pub kind: ErrorKind,
    /// For the client and the log; never names an engine's address.
    pub message: String,
    /// The engine itself looks unwell (re-probe it now).
    pub suspect: bool,
    /// The request may have reached the engine. Once a decode engine has seen a handoff it may
    /// have read it or told the prefill engine to free it (vLLM notifies P when D rejects), so
    /// its params must not be reused; an undelivered one left the prefill's KV untouched.
    pub delivered: bool,
}

/// A leg's failure: either worth another engine, or the engine's own answer for the client.
#[derive(Debug)]
pub enum LegError {
    Retry(EngineError),
    Relay(ProxyError),
}

/// A failure that reached (or may have reached) the engine.
pub fn retry(kind: ErrorKind, message: impl Into<String>, suspect: bool) -> LegError {
    LegError::Retry(EngineError {
        kind,
        message: message.into(),
        suspect,
        delivered: true,
    })
}

/// A transport failure: worth another engine, and a re-probe of this one. The error itself (it
/// names the engine's address) goes to the log only; the client's message names no engine.
pub fn failed(
    engine: &Engine,
    kind: ErrorKind,
    message: &'static str,
    e: &dyn std::fmt::Display,
) -> LegError {
    tracing::warn!(engine = %engine.url, reason = kind.as_str(), error = %e, "{message}");
    retry(kind, message, true)
}

/// The request never left: no connection to the engine.
pub fn undelivered(message: impl Into<String>) -> LegError {
    LegError::Retry(EngineError {
        kind: ErrorKind::Connect,
        message: message.into(),
        suspect: true,
        delivered: false,
    })
}
