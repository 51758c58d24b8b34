//! The coordinator's errors, their retryability, and their one mapping to HTTP.

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::json;
use tandem_policy::PlanError;

use crate::limits::{Limited, RateHeaders};

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The client's request is malformed (vLLM's 400 `BadRequestError`).
    #[error("{0}")]
    BadRequest(String),
    /// vLLM's 404 for an unknown model name.
    #[error("The model `{0}` does not exist.")]
    ModelNotFound(String),
    /// No engine can take the request now.
    #[error("{0}")]
    NoEngine(PlanError),
    /// Every prefill attempt failed and local fallback is forbidden (`enforce`).
    #[error("prefill failed on every attempt and disaggregation is enforced: {0}")]
    PrefillFailed(String),
    /// The prefill returned no KV handoff and local fallback is forbidden (`enforce`).
    #[error("the prefill engine returned no kv_transfer_params and disaggregation is enforced")]
    NullParamsEnforced,
    /// No decode engine has KV room and the admission queue is full, or the request waited its
    /// longest; `retry_after` seconds go in the Retry-After header.
    #[error("{reason}")]
    Overloaded {
        reason: &'static str,
        retry_after: u64,
    },
    /// Every decode attempt failed before the first byte.
    #[error("decode failed on every attempt: {0}")]
    DecodeFailed(String),
    /// No route has this path (the front door's fallback).
    #[error("Not Found")]
    RouteNotFound,
    /// The route exists but is switched off in the configuration.
    #[error("{0}")]
    Disabled(&'static str),
    /// The path exists but not for this method; the response carries `Allow`.
    #[error("Method Not Allowed")]
    MethodNotAllowed,
    /// The request body did not arrive in full within `server.body_read_timeout_ms`.
    #[error("the request body was not received within {ms} ms")]
    BodyTimeout { ms: u64 },
    /// The request body is larger than `server.max_body_bytes`.
    #[error("the request body is larger than the limit of {limit} bytes")]
    BodyTooLarge { limit: usize },
    /// The request's header block is past `server.max_header_bytes` or `server.max_headers`.
    #[error("{0}")]
    HeadersTooLarge(String),
    /// The request body could not be read: malformed chunked encoding, or the upload broke off.
    #[error("the request body could not be read: malformed chunked encoding or a broken upload")]
    BadBody,
    /// No valid API key (`[auth]` is on); the message never quotes what the client sent.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// The tenant is over one of its budgets.
    #[error("{}", .0.message)]
    RateLimited(Box<Limited>),
    /// A handler panicked; the panic's text goes to the log only.
    #[error("internal server error")]
    Internal,
    /// An engine rejected the request as invalid; its response is relayed unchanged, since the
    /// engine knows the model's limits better than Tandem does.
    #[error("engine answered {status}")]
    Engine {
        status: StatusCode,
        content_type: Option<HeaderValue>,
        body: Bytes,
    },
}

impl ProxyError {
    /// Whether the client may retry the same request later and expect success.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            ProxyError::NoEngine(_)
                | ProxyError::PrefillFailed(_)
                | ProxyError::DecodeFailed(_)
                | ProxyError::Overloaded { .. }
                | ProxyError::RateLimited(_)
        )
    }

    /// The `outcome` label for `tandem_requests_total`.
    pub fn outcome(&self) -> &'static str {
        match self {
            ProxyError::BadRequest(_)
            | ProxyError::ModelNotFound(_)
            | ProxyError::RouteNotFound
            | ProxyError::Disabled(_)
            | ProxyError::MethodNotAllowed
            | ProxyError::BodyTimeout { .. }
            | ProxyError::BodyTooLarge { .. }
            | ProxyError::HeadersTooLarge(_)
            | ProxyError::BadBody => "client_error",
            ProxyError::Unauthorized(_) => "unauthorized",
            ProxyError::RateLimited(_) => "rate_limited",
            ProxyError::Internal => "internal_error",
            ProxyError::Engine { status, .. } if status.is_client_error() => "client_error",
            ProxyError::Engine { .. } => "engine_error",
            ProxyError::NoEngine(_) => "no_engine",
            ProxyError::Overloaded { .. } => "overloaded",
            ProxyError::PrefillFailed(_) | ProxyError::NullParamsEnforced => "prefill_failed",
            ProxyError::DecodeFailed(_) => "decode_failed",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BadRequest(_) | ProxyError::BadBody => StatusCode::BAD_REQUEST,
            ProxyError::ModelNotFound(_) | ProxyError::RouteNotFound | ProxyError::Disabled(_) => {
                StatusCode::NOT_FOUND
            }
            ProxyError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            ProxyError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::HeadersTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ProxyError::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            ProxyError::NoEngine(_) | ProxyError::Overloaded { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::PrefillFailed(_) | ProxyError::DecodeFailed(_) => StatusCode::BAD_GATEWAY,
            ProxyError::NullParamsEnforced => StatusCode::BAD_GATEWAY,
            ProxyError::Engine { status, .. } => *status,
        }
    }

    /// vLLM's `ErrorResponse` body.
    pub fn body(&self) -> serde_json::Value {
        error_body(&self.to_string(), self.status())
    }
}

/// vLLM's `{"error": {message, type, param, code}}`, with the type named after the status the
/// way vLLM names `HTTPStatus` members.
pub fn error_body(message: &str, status: StatusCode) -> serde_json::Value {
    let kind = match status.as_u16() {
        400 => "BadRequestError",
        401 => "UnauthorizedError",
        404 => "NotFoundError",
        405 => "MethodNotAllowedError",
        408 => "RequestTimeoutError",
        413 => "RequestEntityTooLargeError",
        429 => "TooManyRequestsError",
        431 => "RequestHeaderFieldsTooLargeError",
        502 => "BadGatewayError",
        503 => "ServiceUnavailableError",
        504 => "GatewayTimeoutError",
        _ => "InternalServerError",
    };
    json!({"error": {"message": message, "type": kind, "param": null, "code": status.as_u16()}})
}

/// The SSE form of an error after the first byte, followed by the stream terminator.
pub fn sse_error(message: &str) -> Bytes {
    let body = error_body(message, StatusCode::INTERNAL_SERVER_ERROR);
    Bytes::from(format!("data: {body}\n\ndata: [DONE]\n\n"))
}

impl IntoResponse for ProxyError {
    fn into_response(self) -> Response {
        if let ProxyError::Engine {
            status,
            content_type,
            body,
        } = self
        {
            let mut r = (status, body).into_response();
            if let Some(ct) = content_type {
                r.headers_mut().insert(header::CONTENT_TYPE, ct);
            }
            return r;
        }
        let status = self.status();
        let mut r = (status, axum::Json(self.body())).into_response();
        if matches!(
            self,
            ProxyError::BodyTimeout { .. }
                | ProxyError::BodyTooLarge { .. }
                | ProxyError::HeadersTooLarge(_)
                | ProxyError::BadBody
        ) {
            // The rest of the request may still be on its way; the connection cannot carry
            // another one.
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if let ProxyError::Overloaded { retry_after, .. } = self {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
        } else if let ProxyError::Unauthorized(_) = self {
            // RFC 6750: the scheme the client should use.
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        } else if let ProxyError::RateLimited(l) = &self {
            if let Some(s) = l.retry_after {
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(s));
            }
            rate_headers(r.headers_mut(), &l.headers);
        } else if self.retryable() {
            // Engines come back within a health interval or two.
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }
}

/// OpenAI's rate-limit headers, on every answer to a tenant with limits (429 or not).
pub(crate) fn rate_headers(h: &mut HeaderMap, r: &RateHeaders) {
    for (dim, name) in [(&r.requests, "requests"), (&r.tokens, "tokens")] {
        let Some(d) = dim else { continue };
        let reset = crate::limits::reset_str(d.reset_ms);
        for (field, value) in [
            ("limit", HeaderValue::from(d.limit)),
            ("remaining", HeaderValue::from(d.remaining)),
            (
                "reset",
                HeaderValue::from_str(&reset).expect("digits and units are a valid header"),
            ),
        ] {
            let key = header::HeaderName::try_from(format!("x-ratelimit-{field}-{name}"))
                .expect("a valid header name");
            h.insert(key, value);
        }
    }
}
