//! The front door's routes. Errors reach HTTP only through `ProxyError`'s `IntoResponse`.

use std::sync::Arc;
use tokio::time::Instant;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State as AxState};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http_body_util::BodyExt;
use serde_json::json;
use tandem_config::DisaggregationMode;
use tandem_policy::{Health, PoolKind};

use crate::error::ProxyError;
use crate::front::Kind;
use crate::State;

pub(crate) fn router(st: Arc<State>) -> Router {
    let limit = st.cfg.server.max_body_bytes;
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/admin/requests", get(recent))
        .route("/admin/engines", get(engines))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(st)
}

async fn completions(AxState(st): AxState<Arc<State>>, h: HeaderMap, body: Bytes) -> Response {
    crate::pd::handle(st, Kind::Completions, h, body).await
}

async fn chat(AxState(st): AxState<Arc<State>>, h: HeaderMap, body: Bytes) -> Response {
    crate::pd::handle(st, Kind::Chat, h, body).await
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
    let warnings: Vec<String> = feed_reports(&st, &pools)
        .into_iter()
        .filter_map(|r| {
            r.problem
                .map(|p| format!("{} engine {}: {p}", r.pool, r.engine))
        })
        .collect();
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
        |kind, id| match kind {
            PoolKind::Prefill => st.prefill_index.engine_blocks(id),
            PoolKind::Decode => st.decode_index.engine_blocks(id),
        },
        |kind, id| pools.find(kind, id).map_or(0, |e| e.engine.served()),
    )
}

async fn metrics(AxState(st): AxState<Arc<State>>) -> Response {
    if !st.metrics.enabled() {
        return (
            StatusCode::NOT_FOUND,
            "metrics are off ([telemetry] metrics = false)\n",
        )
            .into_response();
    }
    let pools = st.pools.pools.borrow().clone();
    st.metrics.observe_pools(&pools);
    st.metrics.observe_live(&pools, |kind, id| match kind {
        PoolKind::Prefill => st.prefill_index.engine_blocks(id),
        PoolKind::Decode => st.decode_index.engine_blocks(id),
    });
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
    let pools = st.pools.pools.borrow().clone();
    for e in pools
        .decode
        .iter()
        .filter(|e| e.status.health == Health::Healthy)
    {
        let Ok(mut conn) = e.engine.upstream.acquire().await else {
            continue;
        };
        let req = conn.get("/v1/models");
        let Ok(resp) = conn.send(req).await else {
            continue;
        };
        let status = resp.status();
        let Ok(body) = resp.into_body().collect().await else {
            continue;
        };
        conn.release();
        if status.is_success() {
            return (
                [(header::CONTENT_TYPE, "application/json")],
                body.to_bytes(),
            )
                .into_response();
        }
    }
    ProxyError::NoEngine(tandem_policy::PlanError::NoDecodeEngine).into_response()
}

async fn recent(AxState(st): AxState<Arc<State>>) -> Response {
    Json(st.recent.list()).into_response()
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
            })
        })
        .collect();
    let feeds = feed_reports(&st, &pools);
    Json(json!({ "engines": list, "kv_feeds": feeds })).into_response()
}
