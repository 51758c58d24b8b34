//! The front door: the accept loop (hyper HTTP/1.1 with header/body timeouts, a connection cap
//! and graceful draining) and the routes. Every error a client sees, including unknown routes,
//! wrong methods, oversized or slow requests and handler panics, is vLLM's JSON error body from
//! `ProxyError`'s `IntoResponse`; the few answers hyper gives on its own (an empty 431 past
//! twice the header limits, a connection closed at the header read timeout) carry no text.

use std::future::Future;
use std::io;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State as AxState};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use futures::FutureExt;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use serde_json::json;
use tandem_config::{DisaggregationMode, ServerConfig};
use tandem_policy::PoolKind;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::auth::Caller;
use crate::error::ProxyError;
use crate::front::Kind;
use crate::State;

/// The public listener's routes. With `[auth]` on, the OpenAI routes need a key; `/health`,
/// `/ready`, `/ping` and `/version` never do (probes and load balancers call them). `/metrics`
/// and `/admin/*` are here only without `server.admin_listen`, and then behind the key too.
pub(crate) fn router(st: Arc<State>) -> Router {
    let mut keyed = Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/models", get(models))
        .route("/tokenize", post(crate::side::tokenize))
        .route("/detokenize", post(crate::side::detokenize))
        .route("/reset_prefix_cache", post(crate::side::reset_prefix_cache));
    if st.cfg.server.admin_listen.is_none() {
        keyed = keyed.merge(admin_routes());
    }
    if st.auth.is_some() {
        keyed = keyed.route_layer(middleware::from_fn_with_state(
            st.clone(),
            crate::auth::require,
        ));
    }
    let open = Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/version", get(crate::side::version))
        .route("/ping", get(crate::side::ping).post(crate::side::ping));
    finish(open.merge(keyed), st)
}

/// The admin listener's routes (`server.admin_listen`): for operators and scrapers on a network
/// clients cannot reach, so no key.
pub(crate) fn admin_router(st: Arc<State>) -> Router {
    let r = admin_routes()
        .route("/health", get(health))
        .route("/ready", get(ready));
    finish(r, st)
}

fn admin_routes() -> Router<Arc<State>> {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/admin/requests", get(recent))
        .route("/admin/requests/pinned", get(pinned))
        .route("/admin/engines", get(engines))
        .route("/admin/plan", get(plan))
}

/// The answers every listener shares: 404 and 405 in vLLM's shape, the header limits, panics.
fn finish(r: Router<Arc<State>>, st: Arc<State>) -> Router {
    r.fallback(not_found)
        // After every route: it applies to the routes registered before it. axum keeps `Allow`.
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(st.clone(), check_headers))
        .layer(middleware::from_fn(catch_panic))
        .with_state(st)
}

/// Serve the admin routes on their own listener until the coordinator's task ends (which
/// aborts this one), so `/metrics` stays readable while the public listener drains.
pub(crate) async fn serve_admin(listener: TcpListener, st: Arc<State>) -> io::Result<()> {
    axum::serve(listener, admin_router(st)).await
}

async fn not_found() -> Response {
    ProxyError::RouteNotFound.into_response()
}

async fn method_not_allowed() -> Response {
    ProxyError::MethodNotAllowed.into_response()
}

/// A panicking handler answers 500 with vLLM's body; the panic's text reaches only the log
/// (through the panic hook), never the client. (A panic inside a streaming body, after the
/// headers, still cuts the connection.)
async fn catch_panic(req: Request, next: Next) -> Response {
    match AssertUnwindSafe(next.run(req)).catch_unwind().await {
        Ok(r) => r,
        Err(_) => {
            tracing::error!("a request handler panicked");
            ProxyError::Internal.into_response()
        }
    }
}

/// The size of a request's header block as it came in: request line, fields, blank line.
fn header_block_bytes(req: &Request) -> usize {
    let target = req.uri().path_and_query().map_or(1, |p| p.as_str().len());
    let line = req.method().as_str().len() + 1 + target + " HTTP/1.1\r\n".len();
    let fields: usize = req
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + 2 + v.len() + 2)
        .sum();
    line + fields + 2
}

/// `server.max_header_bytes` and `server.max_headers`, answered with JSON. hyper's own limits
/// are set at twice these (see [`serve`]), so this check sees every request up to there.
async fn check_headers(AxState(st): AxState<Arc<State>>, req: Request, next: Next) -> Response {
    let s = &st.cfg.server;
    let count = req.headers().len();
    if count > s.max_headers {
        return ProxyError::HeadersTooLarge(format!(
            "the request has {count} header fields, more than the limit of {}",
            s.max_headers
        ))
        .into_response();
    }
    let size = header_block_bytes(&req);
    if size > s.max_header_bytes {
        return ProxyError::HeadersTooLarge(format!(
            "the request's header block is {size} bytes, more than the limit of {}",
            s.max_header_bytes
        ))
        .into_response();
    }
    next.run(req).await
}

/// The whole request body, within `server.max_body_bytes` and `server.body_read_timeout_ms`.
pub(crate) async fn read_body(
    s: &ServerConfig,
    h: &HeaderMap,
    body: Body,
) -> Result<Bytes, ProxyError> {
    let limit = s.max_body_bytes;
    let declared = h
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ProxyError::BodyTooLarge { limit });
    }
    let ms = s.body_read_timeout_ms;
    let read = Limited::new(body, limit).collect();
    match tokio::time::timeout(Duration::from_millis(ms), read).await {
        Err(_) => Err(ProxyError::BodyTimeout { ms }),
        Ok(Ok(c)) => Ok(c.to_bytes()),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => {
            Err(ProxyError::BodyTooLarge { limit })
        }
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "request body unreadable");
            Err(ProxyError::BadBody)
        }
    }
}

/// The caller `auth::require` found, if authentication is on.
type Who = Option<Extension<Caller>>;

async fn completions(
    AxState(st): AxState<Arc<State>>,
    who: Who,
    h: HeaderMap,
    body: Body,
) -> Response {
    generate(st, Kind::Completions, who, h, body).await
}

async fn chat(AxState(st): AxState<Arc<State>>, who: Who, h: HeaderMap, body: Body) -> Response {
    generate(st, Kind::Chat, who, h, body).await
}

async fn generate(st: Arc<State>, kind: Kind, who: Who, h: HeaderMap, body: Body) -> Response {
    let raw = match read_body(&st.cfg.server, &h, body).await {
        Ok(raw) => raw,
        Err(e) => {
            let mut r = e.into_response();
            if let Some(id) = h.get("x-request-id").filter(|v| v.len() <= 256) {
                r.headers_mut().insert("x-request-id", id.clone());
            }
            return r;
        }
    };
    let tenant = who.map(|Extension(Caller(t))| t);
    crate::pd::handle(st, kind, h, raw, tenant).await
}

/// hyper's default read buffer (8 KiB + 100 × 4 KiB).
const HYPER_DEFAULT_BUF: usize = 8192 + 4096 * 100;

/// One open client connection, counted while it lives.
struct Open(Arc<AtomicUsize>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Accept errors that concern one connection only (as `axum::serve` treats them).
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// Serve `st`'s routes on `listener` until `shutdown` resolves; then fail `/ready`, stop
/// accepting and let in-flight responses finish. When `server.shutdown_grace_secs` pass with
/// some still open, `grace_over` fires (streams end with vLLM's SSE error event and `[DONE]`)
/// and, a second later at most, this returns.
pub(crate) async fn serve(
    listener: TcpListener,
    st: Arc<State>,
    shutdown: impl Future<Output = ()>,
    grace_over: watch::Sender<bool>,
) -> io::Result<()> {
    let s = &st.cfg.server;
    let grace = Duration::from_secs(s.shutdown_grace_secs);
    let max_connections = s.max_connections;
    // The parser's own limits sit at twice the configured ones, so `check_headers` answers in
    // JSON up to there; past them hyper answers 431 itself, with an empty body.
    let hard_header_bytes = s.max_header_bytes.saturating_mul(2);
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        // Also bounds how long an idle keep-alive connection stays open: hyper restarts this
        // timer when a connection goes idle.
        .header_read_timeout(Duration::from_millis(s.header_read_timeout_ms))
        .keep_alive(true)
        .max_header_size(hard_header_bytes)
        .max_headers(s.max_headers.saturating_mul(2))
        .max_buf_size(hard_header_bytes.max(HYPER_DEFAULT_BUF));
    let service = TowerToHyperService::new(router(st.clone()));
    let graceful = GracefulShutdown::new();
    let open = Arc::new(AtomicUsize::new(0));
    // Connections refused for `server.max_connections`, logged at the first and every 1000th.
    let mut refused: u64 = 0;
    tokio::pin!(shutdown);
    loop {
        let (tcp, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(conn) => conn,
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    // Out of file descriptors, say: wait rather than spin.
                    tracing::error!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        if open.fetch_add(1, Ordering::SeqCst) >= max_connections {
            open.fetch_sub(1, Ordering::SeqCst);
            refused += 1;
            if refused % 1000 == 1 {
                tracing::warn!(
                    max_connections,
                    refused,
                    "connection limit reached; closing new connections"
                );
            }
            drop(tcp);
            continue;
        }
        let guard = Open(open.clone());
        // Token chunks are small writes; Nagle plus the peer's delayed ACK would hold some back
        // by ~40 ms. (Python's asyncio, under vLLM, sets TCP_NODELAY too.)
        let _ = tcp.set_nodelay(true);
        let conn = graceful.watch(http.serve_connection(TokioIo::new(tcp), service.clone()));
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "client connection ended with an error");
            }
            drop(guard);
        });
    }
    st.shutting_down.store(true, Ordering::SeqCst);
    drop(listener);
    tracing::info!(
        grace_s = grace.as_secs(),
        "shutting down: not ready, not accepting, draining"
    );
    let drained = graceful.shutdown();
    tokio::pin!(drained);
    if tokio::time::timeout(grace, &mut drained).await.is_ok() {
        return Ok(());
    }
    tracing::warn!(
        open = open.load(Ordering::SeqCst),
        "grace period over with responses still in flight; ending their streams"
    );
    let _ = grace_over.send(true);
    // Streams write their error event and end at once; whatever is still open after this
    // (a request not streaming yet, a client not reading) is cut when the process exits.
    let _ = tokio::time::timeout(Duration::from_secs(1), drained).await;
    Ok(())
}

/// Alive: the process serves HTTP.
async fn health() -> StatusCode {
    StatusCode::OK
}

/// Ready: a request can be served now, disaggregated or by the configured fallback.
async fn ready(AxState(st): AxState<Arc<State>>) -> Response {
    let pools = st.pools.pools.borrow().clone();
    let (p, d) = (
        pools.healthy(PoolKind::Prefill),
        pools.healthy(PoolKind::Decode),
    );
    let d_cfg = &st.cfg.disaggregation;
    let fallback_ok = d_cfg.mode == DisaggregationMode::Never || !d_cfg.enforce;
    let (ready, reason) = if st.shutting_down.load(std::sync::atomic::Ordering::SeqCst) {
        (false, "shutting down")
    } else if !pools.probed {
        (false, "engines not probed yet")
    } else if d == 0 {
        (false, "no healthy decode engine")
    } else if p == 0 && d_cfg.mode != DisaggregationMode::Never && !fallback_ok {
        (
            false,
            "no healthy prefill engine and disaggregation is enforced",
        )
    } else if p == 0 && d_cfg.mode != DisaggregationMode::Never {
        (
            true,
            "no healthy prefill engine: decode engines prefill locally",
        )
    } else {
        (true, "ok")
    };
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    // Degraded routing is not unreadiness (requests are still served), but it must show.
    let mut warnings: Vec<String> = feed_reports(&st, &pools)
        .into_iter()
        .filter_map(|r| {
            r.problem
                .map(|p| format!("{} engine {}: {p}", r.pool, r.engine))
        })
        .collect();
    warnings.extend(st.limits.warning().map(String::from));
    (
        status,
        Json(json!({
            "ready": ready,
            "reason": reason,
            "prefill_healthy": p,
            "decode_healthy": d,
            "warnings": warnings,
        })),
    )
        .into_response()
}

fn feed_reports(st: &State, pools: &crate::pool::Pools) -> Vec<crate::kvfeed::FeedReport> {
    st.feeds.reports(
        |kind, id| st.index(kind).engine_blocks(id),
        |kind, id| pools.find(kind, id).map_or(0, |e| e.engine.served()),
    )
}

async fn metrics(AxState(st): AxState<Arc<State>>) -> Response {
    if !st.metrics.enabled() {
        return ProxyError::Disabled("metrics are off ([telemetry] metrics = false)")
            .into_response();
    }
    let pools = st.pools.pools.borrow().clone();
    st.metrics.observe_pools(&pools);
    st.metrics
        .observe_live(&pools, |kind, id| st.index(kind).engine_blocks(id));
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        st.metrics.encode(),
    )
        .into_response()
}

/// The decode engines' own `/v1/models`, so the answer is exactly vLLM's.
async fn models(AxState(st): AxState<Arc<State>>) -> Response {
    match st.decode_models().await {
        Some(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        None => ProxyError::NoEngine(tandem_policy::PlanError::NoDecodeEngine).into_response(),
    }
}

async fn recent(AxState(st): AxState<Arc<State>>) -> Response {
    Json(st.recent.list()).into_response()
}

/// The prefill KV handoffs pinned now (prefilled, not yet taken by a decode engine or released),
/// oldest first; `?older_than_ms=N` keeps those pinned at least N ms (a long-pinned handoff is
/// a leak in the making).
async fn pinned(
    AxState(st): AxState<Arc<State>>,
    axum::extract::RawQuery(q): axum::extract::RawQuery,
) -> Response {
    let mut min = 0;
    for pair in q
        .as_deref()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
    {
        match pair.split_once('=') {
            Some(("older_than_ms", v)) => match v.parse::<u64>() {
                Ok(v) => min = v,
                Err(_) => {
                    return ProxyError::BadRequest(
                        "older_than_ms must be a non-negative integer".into(),
                    )
                    .into_response()
                }
            },
            _ => {
                return ProxyError::BadRequest(format!("unknown query parameter `{pair}`"))
                    .into_response()
            }
        }
    }
    let list = st.handoffs.older_than(min, std::time::Instant::now());
    Json(json!({ "pinned": list, "count": st.handoffs.len() })).into_response()
}

async fn engines(AxState(st): AxState<Arc<State>>) -> Response {
    let pools = st.pools.pools.borrow().clone();
    let now = Instant::now();
    let list: Vec<_> = pools
        .prefill
        .iter()
        .chain(pools.decode.iter())
        .map(|e| {
            let s = &e.status;
            json!({
                "id": e.engine.id,
                "pool": e.engine.pool.as_str(),
                "url": e.engine.url.as_ref(),
                "weight": e.engine.weight,
                "group": e.engine.group.as_ref(),
                "state": s.health.as_str(),
                "model": s.model.as_deref(),
                "block_size": s.block_size,
                "inflight": e.engine.inflight(),
                "prefill_queue_tokens": e.engine.queued_prefill_tokens(),
                "prefill_tokens_per_sec": e.engine.rate.tokens_per_sec(),
                "kv_total_blocks": s.num_gpu_blocks,
                "kv_free_blocks": s.kv_free_blocks(),
                "kv_reserved_blocks": e.engine.reserved_blocks(),
                "prefix_blocks_indexed": match e.engine.pool {
                    PoolKind::Prefill => st.prefill_index.engine_blocks(e.engine.id),
                    PoolKind::Decode => st.decode_index.engine_blocks(e.engine.id),
                },
                "last_scrape_age_s": s.last_scrape.map(|t| now.duration_since(t).as_secs_f64()),
                "last_error": s.last_error,
                "outlier": s.outlier.json(e.engine.weight, now),
            })
        })
        .collect();
    let feeds = feed_reports(&st, &pools);
    Json(json!({
        "engines": list,
        "kv_feeds": feeds,
        "decode_blocks_pending": st.pending_decode_blocks.load(std::sync::atomic::Ordering::Relaxed),
    }))
    .into_response()
}

/// The live P:D recommendation and its reasoning (`recommend.rs`), beside the live and target
/// ratios.
async fn plan(AxState(st): AxState<Arc<State>>) -> Response {
    use crate::recommend::{BACKLOG_HORIZON_S, KV_TARGET, WINDOW_SECS};
    let pools = st.pools.pools.borrow().clone();
    let (np, nd) = (
        pools.healthy(PoolKind::Prefill),
        pools.healthy(PoolKind::Decode),
    );
    let t = st.metrics.plan();
    let (p, d) = t.sides();
    Json(json!({
        "live": {"prefill": np, "decode": nd, "ratio": (nd > 0).then(|| np as f64 / nd as f64)},
        "target": st.cfg.pools.target_ratio.map(|r| r.value()),
        "recommended": t.current(),
        "load": {"prefill": p, "decode": d},
        "model": {
            "window_s": WINDOW_SECS,
            "kv_target": KV_TARGET,
            "backlog_horizon_s": BACKLOG_HORIZON_S,
        },
    }))
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn call(app: Router, req: axum::http::Request<Body>) -> (StatusCode, serde_json::Value) {
        let svc = TowerToHyperService::new(app);
        let resp = hyper::service::Service::call(&svc, req).await.unwrap();
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&body).unwrap())
    }

    #[tokio::test]
    async fn a_panicking_handler_answers_500_json_without_its_text() {
        let boom = || async {
            let secret = "/etc/tandem.toml at http://127.0.0.1:8000";
            if !secret.is_empty() {
                panic!("{secret}");
            }
            "unreachable"
        };
        let app = Router::new()
            .route("/boom", get(boom))
            .layer(middleware::from_fn(catch_panic));
        let req = axum::http::Request::get("/boom")
            .body(Body::empty())
            .unwrap();
        let (status, v) = call(app, req).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(
            v,
            json!({"error": {"message": "internal server error", "type": "InternalServerError",
                             "param": null, "code": 500}})
        );
    }

    #[test]
    fn the_header_block_is_measured_as_sent() {
        let req = axum::http::Request::post("/v1/completions?x=1")
            .header("host", "a")
            .body(Body::empty())
            .unwrap();
        // "POST /v1/completions?x=1 HTTP/1.1\r\n" + "host: a\r\n" + "\r\n"
        assert_eq!(header_block_bytes(&req), 35 + 9 + 2);
    }
}
