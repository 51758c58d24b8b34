//! vLLM's side endpoints on the coordinator: `/tokenize` and `/detokenize` with Tandem's own
//! tokenizer (the one routing uses, so a client sees the ids the prefix index sees), `/version`,
//! `/ping`, and `POST /reset_prefix_cache`, fanned out to every engine of both pools with
//! Tandem's prefix indexes cleared.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State as AxState;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::future::join_all;
use serde_json::{json, Map, Value};

use crate::error::ProxyError;
use crate::State;

fn body_map(raw: &[u8]) -> Result<Map<String, Value>, ProxyError> {
    match serde_json::from_slice::<Value>(raw) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ProxyError::BadRequest(
            "the request body must be a JSON object".into(),
        )),
        Err(e) => Err(ProxyError::BadRequest(format!("invalid JSON body: {e}"))),
    }
}

/// vLLM's 404 for a model name the pool does not serve.
fn check_model(st: &State, body: &Map<String, Value>) -> Result<(), ProxyError> {
    match (body.get("model").and_then(Value::as_str), st.served_model()) {
        (Some(asked), Some(served)) if asked != served => {
            Err(ProxyError::ModelNotFound(asked.to_string()))
        }
        _ => Ok(()),
    }
}

/// A decode engine's `max_model_len` from its `/v1/models` (vLLM reports it there).
async fn max_model_len(st: &State) -> Option<u64> {
    let body = st.decode_models().await?;
    let v: Value = serde_json::from_slice(&body).ok()?;
    v["data"][0]["max_model_len"].as_u64()
}

/// `POST /tokenize`: `{prompt}` or `{messages}` → `{count, max_model_len, tokens, token_strs}`.
///
/// The body is read as the generation routes read theirs (size limit, read timeout, and a
/// broken or short upload answered in vLLM's error shape, not the framework's plain text).
pub(crate) async fn tokenize(
    AxState(st): AxState<Arc<State>>,
    h: HeaderMap,
    raw: Body,
) -> Response {
    let run = async {
        let raw = crate::server::read_body(&st.cfg.server, &h, raw).await?;
        let body = body_map(&raw)?;
        check_model(&st, &body)?;
        let tok = &st.tokenizer;
        let bad = |e: tandem_model::TokenizerError| ProxyError::BadRequest(e.to_string());
        let tokens = match (body.get("prompt"), body.get("messages")) {
            (Some(Value::String(p)), None) => {
                let special = body
                    .get("add_special_tokens")
                    .and_then(Value::as_bool)
                    .unwrap_or(true);
                tok.encode(p, special).map_err(bad)?
            }
            (None, Some(_)) => crate::front::chat_tokens(&body, tok)?,
            _ => {
                return Err(ProxyError::BadRequest(
                    "exactly one of `prompt` (a string) or `messages` is required".into(),
                ))
            }
        };
        let token_strs = if body
            .get("return_token_strs")
            .and_then(Value::as_bool)
            .unwrap_or(false)
        {
            let strs: Vec<String> = tokens
                .iter()
                .map(|t| tok.decode(&[*t]).unwrap_or_default())
                .collect();
            json!(strs)
        } else {
            Value::Null
        };
        Ok(json!({
            "count": tokens.len(),
            "max_model_len": max_model_len(&st).await,
            "tokens": tokens,
            "token_strs": token_strs,
        }))
    };
    match run.await {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `POST /detokenize`: `{tokens}` → `{prompt}`.
pub(crate) async fn detokenize(
    AxState(st): AxState<Arc<State>>,
    h: HeaderMap,
    raw: Body,
) -> Response {
    let raw = match crate::server::read_body(&st.cfg.server, &h, raw).await {
        Ok(raw) => raw,
        Err(e) => return e.into_response(),
    };
    let run = || -> Result<Value, ProxyError> {
        let body = body_map(&raw)?;
        check_model(&st, &body)?;
        let ids: Vec<u32> = body
            .get("tokens")
            .and_then(Value::as_array)
            .and_then(|a| {
                a.iter()
                    .map(|t| t.as_u64().and_then(|t| u32::try_from(t).ok()))
                    .collect()
            })
            .ok_or_else(|| ProxyError::BadRequest("`tokens` must be a list of token ids".into()))?;
        let prompt = st
            .tokenizer
            .decode_with_special_tokens(&ids)
            .map_err(|e| ProxyError::BadRequest(e.to_string()))?;
        Ok(json!({ "prompt": prompt }))
    };
    match run() {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `GET /version`: `{"version": ...}`, Tandem's.
pub(crate) async fn version() -> Response {
    Json(json!({ "version": env!("CARGO_PKG_VERSION") })).into_response()
}

/// `GET|POST /ping`: vLLM's liveness alias of `/health` (200, empty).
pub(crate) async fn ping() -> StatusCode {
    StatusCode::OK
}

/// `POST /reset_prefix_cache`: every engine of both pools resets its prefix cache, and both
/// prefix indexes forget what they knew of each engine. Answers 200 when every engine did, else
/// 502, with each engine's result either way (by stable id and pool; no addresses).
pub(crate) async fn reset_prefix_cache(AxState(st): AxState<Arc<State>>) -> Response {
    let pools = st.pools.pools.borrow().clone();
    let engines: Vec<_> = pools
        .prefill
        .iter()
        .chain(pools.decode.iter())
        .map(|e| e.engine.clone())
        .collect();
    let st = &st;
    let results = join_all(engines.iter().map(|e| async move {
        let trace =
            crate::trace::Outgoing::new(st.trace_link.link(&tracing::Span::current(), None), None);
        let leg = crate::engine::Leg {
            kind: crate::front::Kind::Completions,
            request_id: "reset-prefix-cache",
            trace: &trace,
        };
        let status = e.client.reset_prefix_cache(leg).await;
        st.index(e.pool).clear_engine(e.id);
        (e, status)
    }))
    .await;
    let all_ok = results
        .iter()
        .all(|(_, s)| s.is_some_and(|s| s.is_success()));
    let list: Vec<Value> = results
        .iter()
        .map(|(e, s)| {
            json!({
                "pool": e.pool.as_str(),
                "id": e.id,
                "reset": s.is_some_and(|s| s.is_success()),
                "status": s.map(|s| s.as_u16()),
            })
        })
        .collect();
    let status = if all_ok {
        StatusCode::OK
    } else {
        StatusCode::BAD_GATEWAY
    };
    (status, Json(json!({ "engines": list }))).into_response()
}
