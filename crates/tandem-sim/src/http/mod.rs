//! vLLM's OpenAI-compatible HTTP surface (axum), plus `/admin/faults`.
//!
//! Routes: `/v1/completions`, `/v1/chat/completions`, `/v1/models`, `/health`, `/tokenize`,
//! `/detokenize`, `/metrics`, `/reset_prefix_cache`, `GET|POST /admin/faults`, and
//! `GET /admin/requests` (the trace headers of recent generation requests; vLLM hands them to its
//! OpenTelemetry tracer, which the sim has not, so this is where a rehearsal can see them).

mod fields;
mod generate;
mod logprobs;
mod structured;
mod tools;
pub mod wire;

use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::engine::EngineHandle;
use crate::faults::{FaultSpec, Faults};
use crate::metrics::EngineMetrics;
use crate::tokenizer::SimTokenizer;
use wire::{ApiError, DetokenizeRequest, TokenizeRequest};

/// Facts the HTTP layer reports about its engine.
#[derive(Debug, Clone)]
pub struct HttpInfo {
    pub served_model_name: String,
    pub max_model_len: u32,
    pub enable_prompt_tokens_details: bool,
    pub engine_id: String,
    pub side_channel_host: String,
    pub side_channel_port: u16,
    pub tp_size: u32,
    pub side_channel_timeout: std::time::Duration,
    /// `VLLM_DISABLE_REQUEST_ID_RANDOMIZATION`.
    pub disable_request_id_randomization: bool,
    /// The engine's `--seed`, for outputs derived in this layer (structured output, tool ids).
    pub seed: u64,
    /// `--max-logprobs` (-1: the vocabulary size).
    pub max_logprobs: i64,
    /// Unix time of start, for `created` fields.
    pub created: u64,
}

/// Shared state of every handler.
#[derive(Debug)]
pub struct AppState {
    pub engine: EngineHandle,
    pub tokenizer: Arc<SimTokenizer>,
    pub metrics: Arc<EngineMetrics>,
    pub faults: Faults,
    pub info: HttpInfo,
    pub side_client: crate::side_channel::SideChannelClient,
    /// Seeded from `--seed`, for request-id suffixes.
    pub rng: Mutex<rand_chacha::ChaCha8Rng>,
    pub seen: Seen,
}

/// The headers of the last [`Seen::CAP`] generation requests, oldest first, with the prompt
/// token ids the engine computed for each (`null` for a request it refused): what a test reads
/// to see the exact prompt a coordinator's leg gave this engine.
#[derive(Debug, Default)]
pub struct Seen(Mutex<std::collections::VecDeque<Value>>);

impl Seen {
    const CAP: usize = 256;

    fn push(&self, path: &str, h: &HeaderMap, prompts: Option<&[Arc<[u32]>]>) {
        let get = |k: &str| h.get(k).and_then(|v| v.to_str().ok());
        let mut q = self.0.lock().expect("seen lock");
        if q.len() == Self::CAP {
            q.pop_front();
        }
        q.push_back(json!({
            "path": path,
            "x_request_id": get("x-request-id"),
            "traceparent": get("traceparent"),
            "tracestate": get("tracestate"),
            "prompt_token_ids": prompts.map(|p| p.iter().map(|i| &i[..]).collect::<Vec<_>>()),
        }));
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/completions", post(generate::completions))
        .route("/v1/chat/completions", post(generate::chat_completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/metrics", get(metrics))
        .route("/reset_prefix_cache", post(reset_prefix_cache))
        .route("/admin/faults", get(get_faults).post(set_faults))
        .route("/admin/requests", get(seen_requests))
        .with_state(state)
}

async fn seen_requests(State(s): State<Arc<AppState>>) -> Json<Value> {
    let q = s.seen.0.lock().expect("seen lock");
    Json(json!({ "requests": q.iter().collect::<Vec<_>>() }))
}

/// Parse a JSON body into `T`, with vLLM-style 400s for malformed JSON or wrong field types.
pub(crate) fn parse_body<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("JSON decode error: {e}")))?;
    serde_json::from_value(value)
        .map_err(|e| ApiError::bad_request(format!("Invalid request: {e}")))
}

/// Check the `model` field against the served name (absent means the served model).
pub(crate) fn check_model(info: &HttpInfo, model: Option<&str>) -> Result<(), ApiError> {
    match model {
        Some(m) if m != info.served_model_name => Err(ApiError::not_found(format!(
            "The model `{m}` does not exist."
        ))),
        _ => Ok(()),
    }
}

async fn health() -> StatusCode {
    StatusCode::OK
}

async fn models(State(s): State<Arc<AppState>>) -> Json<Value> {
    let name = &s.info.served_model_name;
    Json(json!({
        "object": "list",
        "data": [{
            "id": name,
            "object": "model",
            "created": s.info.created,
            "owned_by": "vllm",
            "root": name,
            "parent": null,
            "max_model_len": s.info.max_model_len,
            "permission": [{
                "id": format!("modelperm-{}", &s.info.engine_id.replace('-', "")),
                "object": "model_permission",
                "created": s.info.created,
                "allow_create_engine": false,
                "allow_sampling": true,
                "allow_logprobs": true,
                "allow_search_indices": false,
                "allow_view": true,
                "allow_fine_tuning": false,
                "organization": "*",
                "group": null,
                "is_blocking": false
            }]
        }]
    }))
}

async fn tokenize(State(s): State<Arc<AppState>>, body: Bytes) -> Result<Json<Value>, ApiError> {
    let req: TokenizeRequest = parse_body(&body)?;
    check_model(&s.info, req.model.as_deref())?;
    let text = match (&req.prompt, &req.messages) {
        (Some(p), None) => p.clone(),
        (None, Some(m)) => {
            let msgs = wire::normalise_messages(m)?;
            s.tokenizer
                .render_chat(
                    &msgs,
                    req.add_generation_prompt.unwrap_or(true),
                    req.template_inputs(),
                )
                .map_err(|e| ApiError::bad_request(e.to_string()))?
        }
        _ => {
            return Err(ApiError::bad_request(
                "exactly one of `prompt` or `messages` is required",
            ))
        }
    };
    let tokens = s
        .tokenizer
        // vLLM's defaults: true for a prompt, false for messages (the chat template already
        // writes any BOS).
        .encode(
            &text,
            req.add_special_tokens.unwrap_or(req.messages.is_none()),
        )
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let token_strs = if req.return_token_strs.unwrap_or(false) {
        let strs: Vec<String> = tokens
            .iter()
            .map(|t| s.tokenizer.decode(&[*t]).unwrap_or_default())
            .collect();
        json!(strs)
    } else {
        Value::Null
    };
    Ok(Json(json!({
        "count": tokens.len(),
        "max_model_len": s.info.max_model_len,
        "tokens": tokens,
        "token_strs": token_strs,
    })))
}

async fn detokenize(State(s): State<Arc<AppState>>, body: Bytes) -> Result<Json<Value>, ApiError> {
    let req: DetokenizeRequest = parse_body(&body)?;
    check_model(&s.info, req.model.as_deref())?;
    let text = s
        .tokenizer
        .decode_with_special_tokens(&req.tokens)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    Ok(Json(json!({ "prompt": text })))
}

async fn metrics(State(s): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let (body, content_type) = s.metrics.encode_for_accept(accept);
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

async fn reset_prefix_cache(State(s): State<Arc<AppState>>) -> Result<StatusCode, ApiError> {
    if s.engine.reset_prefix_cache().await {
        Ok(StatusCode::OK)
    } else {
        Err(ApiError::bad_request(
            "prefix cache cannot be reset while requests hold blocks",
        ))
    }
}

async fn get_faults(State(s): State<Arc<AppState>>) -> Json<FaultSpec> {
    Json(s.faults.snapshot())
}

async fn set_faults(
    State(s): State<Arc<AppState>>,
    body: Bytes,
) -> Result<Json<FaultSpec>, ApiError> {
    let spec: FaultSpec = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("invalid fault spec: {e}")))?;
    s.faults.apply(&spec);
    if let Some(on) = spec.exhaust_kv {
        s.engine.set_exhaust_kv(on);
    }
    Ok(Json(s.faults.snapshot()))
}
