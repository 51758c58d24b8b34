//! The P/D request state machine.
//!
//! ```text
//! parse ─▶ plan ─┬─ disaggregate ─▶ prefill leg (decode connection warmed meanwhile)
//!                │                    ├─ params ──────▶ decode leg (params verbatim)
//!                │                    ├─ null params ─▶ decode leg, local prefill   [counted]
//!                │                    ├─ 5xx/connect/deadline ─▶ retry elsewhere ─▶ plan
//!                │                    │                 (budget spent: local, or error if enforced)
//!                │                    └─ 4xx ─────────▶ the client's own body, local (enforce: relayed)
//!                └─ local ─────────▶ decode leg (original body)
//! decode leg ─┬─ first event ─────▶ stream to the client (mid-stream death: SSE error + [DONE])
//!             ├─ fails before it ─▶ another decode engine, same params, while the lease holds;
//!             │                     else re-plan from the prefill
//!             └─ 4xx ─────────────▶ relayed unchanged
//! ```
//! Every edge leaves a counted reason: retries by leg and reason, decisions by reason, outcomes.
//! Dropping the request (the client went away) drops its decode connection, which is how the
//! decode engine learns to abort; a prefill leg already sent runs on in its own task
//! (`prefill.rs`), and the `Handoff` it returns, dropped unused, releases the prefill's KV.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use tandem_policy::{DisaggReason, Health, PlanError, PoolKind};

use crate::batch;
use crate::engine::error::{EngineError, ErrorKind, LegError};
use crate::engine::{DecodeAnswer, DecodeDeadlines, DecodeStream, KvParams, Leg, Warm};
use crate::error::{sse_error, ProxyError};
use crate::front::{self, Kind, Parsed};
use crate::handoff::Handoff;
use crate::metrics::{RetryLabels, RouteLabels};
use crate::pool::{Engine, LoadGuard};
use crate::prefill;
use crate::relay::{Burst, Event, RelayError};
use crate::route::{self, RouteError};
use crate::timing::Finisher;
use crate::trace;
use crate::State;
use tandem_config::DEFAULT_GROUP;

/// A successful decode leg, before its body is relayed.
pub(crate) enum Done {
    Full(Response),
    Stream(StreamParts),
}

pub(crate) struct StreamParts {
    stream: DecodeStream,
    first: Event,
    guard: LoadGuard,
    content_type: Option<HeaderValue>,
    /// The decode engine, told if the stream breaks (outlier detection).
    engine: Arc<Engine>,
}

/// Handle one completions or chat request; `tenant` is the caller when `[auth]` is on.
pub(crate) async fn handle(
    st: Arc<State>,
    kind: Kind,
    headers: HeaderMap,
    raw: Bytes,
    tenant: Option<Arc<tandem_config::Tenant>>,
) -> Response {
    let request_id = headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 256)
        .map(str::to_string)
        // From the thread's RNG: `new_v4` asks the kernel for randomness on every request.
        .unwrap_or_else(|| {
            uuid::Builder::from_random_bytes(rand::random())
                .into_uuid()
                .simple()
                .to_string()
        });
    let incoming = trace::Incoming::from_headers(&headers);
    let span = tracing::info_span!(
        "request",
        request_id = %request_id,
        kind = ?kind,
        trace_id = tracing::field::Empty,
        route = tracing::field::Empty,
        decision_reason = tracing::field::Empty,
        prefill_engine = tracing::field::Empty,
        decode_engine = tracing::field::Empty,
        outcome = tracing::field::Empty,
    );
    let ctx = st.trace_link.link(&span, incoming.parent.as_ref());
    if !span.is_disabled() {
        span.record("trace_id", ctx.trace_id_hex().as_str());
    }
    let mut fin = Finisher::new(
        st.metrics.clone(),
        st.recent.clone(),
        request_id.clone(),
        span.clone(),
        trace::Outgoing::new(ctx, incoming.tracestate),
    );
    let session = st
        .cfg
        .routing
        .session_affinity
        .then(|| headers.get(front::SESSION_HEADER).map(|v| v.as_bytes()))
        .flatten();
    // Its place in the admission queue: its tenant's class and weight.
    let mut who = crate::admission::Who::of(tenant.as_deref());
    let parsed = match front::parse(kind, &raw, &st.tokenizer, &st.cfg.limits, session) {
        Ok(p) => p,
        Err(e) => {
            fin.finish(e.outcome());
            return e.into_response();
        }
    };
    // Its engine group, once for the whole request (every prompt of a list, every retry).
    match choose_group(&st, &headers, tenant.as_deref()) {
        Ok(g) => {
            fin.group = Some(g.clone());
            who.group = g;
        }
        Err(e) => {
            fin.finish(e.outcome());
            return with_request_id(e.into_response(), &request_id);
        }
    }
    fin.prompt_tokens = parsed.prompt_tokens;
    // The tenant's budgets, before any engine work.
    let rate = match crate::limits::admit(&st, tenant.as_ref(), &parsed, &mut fin).await {
        Ok(r) => r,
        Err(e) => {
            fin.finish(e.outcome());
            return with_request_id(e.into_response(), &request_id);
        }
    };
    let with_ids = |mut resp: Response| {
        if let Some(r) = &rate {
            crate::error::rate_headers(resp.headers_mut(), r);
        }
        with_request_id(resp, &request_id)
    };
    if parsed.batch {
        let resp = run_batch(&st, &request_id, &raw, session, &parsed, &who, fin).await;
        return with_ids(resp);
    }
    let result = tracing::Instrument::instrument(run(&st, &parsed, &who, &mut fin), span).await;
    let resp = match result {
        Ok(Done::Full(r)) => r,
        Ok(Done::Stream(parts)) => stream_response(&st, parts, fin),
        Err(e) => {
            tracing::warn!(request_id = %request_id, error = %e, "request failed");
            fin.finish(e.outcome());
            e.into_response()
        }
    };
    with_ids(resp)
}

/// The request's engine group: `x-tandem-group` (a group the configuration does not name is
/// refused with 400), else the tenant's pinned group, else the split; then the first group
/// with routable engines in both pools if the chosen one has none (counted as a fallback).
fn choose_group(
    st: &State,
    headers: &HeaderMap,
    tenant: Option<&tandem_config::Tenant>,
) -> Result<Arc<str>, ProxyError> {
    let header = match headers.get(crate::split::GROUP_HEADER) {
        None => None,
        Some(v) => {
            let known = v.to_str().ok().and_then(|v| st.splits.known(v.trim()));
            match known {
                Some(g) => Some(g),
                None => {
                    let names: Vec<&str> = st.splits.names().iter().map(|n| &**n).collect();
                    return Err(ProxyError::BadRequest(format!(
                        "{} names no engine group; known groups: {}",
                        crate::split::GROUP_HEADER,
                        names.join(", ")
                    )));
                }
            }
        }
    };
    let (group, reason) = st
        .splits
        .choose(header, tenant.and_then(|t| t.group.as_deref()));
    // With one group there is nothing to fall back to.
    let (group, fell_back) = if st.splits.names().len() > 1 {
        let need_prefill = st.cfg.disaggregation.mode != tandem_config::DisaggregationMode::Never;
        let snap = st.pools.pools.borrow().snapshot();
        st.splits.settle(&snap, group, need_prefill)
    } else {
        (group, false)
    };
    let reason = if fell_back {
        crate::split::Reason::Fallback
    } else {
        reason
    };
    st.metrics.group_selected(&group, reason.as_str());
    Ok(group)
}

fn with_request_id(mut resp: Response, request_id: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(request_id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

/// A prompt list: one request per prompt (`batch.rs`), each with its own record.
async fn run_batch(
    st: &Arc<State>,
    request_id: &str,
    raw: &[u8],
    session: Option<&[u8]>,
    parsed: &Parsed,
    who: &crate::admission::Who,
    mut fin: Finisher,
) -> Response {
    let bodies = batch::split(raw).unwrap_or_default();
    let parts = match batch::parse_parts(st, &bodies, session) {
        Ok(p) => p,
        Err(e) => {
            fin.finish(e.outcome());
            return e.into_response();
        }
    };
    // The list's own record would count its prompts twice.
    fin.silence();
    // Each prompt charges its own output to the list's one permit.
    let permit = fin.take_permit();
    let parts = parts
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            let id = format!("{request_id}-{i}");
            let span = tracing::info_span!(
                parent: &fin.span,
                "prompt",
                request_id = %id,
                route = tracing::field::Empty,
                decision_reason = tracing::field::Empty,
                prefill_engine = tracing::field::Empty,
                decode_engine = tracing::field::Empty,
                outcome = tracing::field::Empty,
            );
            let mut f = Finisher::new(
                st.metrics.clone(),
                st.recent.clone(),
                id,
                span,
                fin.trace.clone(),
            );
            f.prompt_tokens = p.prompt_tokens;
            f.group = fin.group.clone();
            if let Some(permit) = &permit {
                f.set_permit(permit.clone(), p.prompt_tokens);
            }
            batch::Part { parsed: p, fin: f }
        })
        .collect();
    let span = fin.span.clone();
    tracing::Instrument::instrument(batch::run(st, request_id, parsed.stream, who, parts), span)
        .await
}

pub(crate) fn stream_response(st: &Arc<State>, parts: StreamParts, mut fin: Finisher) -> Response {
    let idle = st.deadlines.idle;
    let mut grace_over = Box::pin(st.grace_over());
    let StreamParts {
        mut stream,
        first,
        guard,
        content_type,
        engine,
    } = parts;
    let pools = st.pools.clone();
    let body = async_stream::stream! {
        if matches!(first, Event::Content(_)) {
            fin.mark_content();
        }
        yield Ok::<Bytes, std::io::Error>(first.bytes().clone());
        let want_usage = fin.wants_usage();
        let mut burst = Burst::default();
        loop {
            burst.clear();
            let next = tokio::select! {
                r = stream.next_burst(idle, &mut burst, want_usage) => Some(r),
                () = &mut grace_over => None,
            };
            let Some(next) = next else {
                // The shutdown grace period is over: end the stream the way vLLM ends one that
                // fails after its first byte.
                fin.finish("shutdown");
                yield Ok(sse_error("the server is shutting down"));
                break;
            };
            match next {
                Ok(()) if burst.parts.is_empty() => break,
                Ok(()) => {
                    // Everything that arrived together goes out together: each part a slice of
                    // the engine's read, and hyper gathers parts that are ready at once into
                    // one write to the client.
                    fin.mark_contents(burst.content);
                    if let Some(u) = burst.usage {
                        fin.saw_usage(u);
                    }
                    if burst.error {
                        fin.finish("engine_error");
                    }
                    for part in burst.parts.drain(..) {
                        yield Ok(part);
                    }
                    if burst.done {
                        break;
                    }
                }
                Err(e) => {
                    let (reason, kind) = match e {
                        RelayError::Idle(_) => ("decode_stalled", ErrorKind::Timeout),
                        _ => ("decode_died", ErrorKind::Read),
                    };
                    pools.failed(&engine, kind, false, None);
                    fin.finish(reason);
                    tracing::warn!(request_id = %fin.request_id, error = %e, "decode stream failed after the first byte");
                    yield Ok(sse_error(&e.to_string()));
                    break;
                }
            }
        }
        fin.finish("ok");
        stream.finish();
        drop(guard);
    };
    let mut r = Response::new(Body::from_stream(body));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        content_type.unwrap_or(HeaderValue::from_static("text/event-stream; charset=utf-8")),
    );
    r
}

pub(crate) async fn run(
    st: &Arc<State>,
    req: &Parsed,
    who: &crate::admission::Who,
    fin: &mut Finisher,
) -> Result<Done, ProxyError> {
    let served = st.served_model();
    if let (Some(asked), Some(served)) = (&req.model, &served) {
        if asked != served {
            return Err(ProxyError::ModelNotFound(asked.clone()));
        }
    }
    fin.model = served.unwrap_or_default();
    let seq = st.seq.fetch_add(1, Ordering::Relaxed);
    let retries = &st.cfg.retries;
    let mut ex_p: Vec<usize> = Vec::new();
    let mut ex_d: Vec<usize> = Vec::new();
    let mut force_local = None;
    let mut last_err = String::new();
    let pred = route::predict(st, req);
    // Each pass spends at least one attempt, so this bounds re-planning.
    for _ in 0..(retries.prefill_attempts + retries.decode_attempts) {
        relax_decode_exclusions(st, &who.group, &mut ex_d, None);
        let attempt = route::Attempt {
            seq,
            exclude_prefill: &ex_p,
            exclude_decode: &ex_d,
            force_local,
            who,
        };
        let routed = route::plan_admitted(st, req, &pred, &attempt)
            .await
            .map_err(|e| route_error(e, &last_err))?;
        let route::Routed {
            pools,
            plan,
            admitted,
            mut pending,
        } = routed;
        let mut admitted = admitted;
        fin.decision = Some((plan.decision.as_str(), plan.decision_reason.as_str()));
        count_route(st, PoolKind::Decode, plan.decode.reason.as_str());
        let mut d_engine = pools
            .find(PoolKind::Decode, plan.decode.id)
            .expect("the plan came from this snapshot")
            .engine
            .clone();
        fin.decode_engine = Some(d_engine.url.to_string());
        // Approximate feed: the decode engine caches the prompt's blocks too (pulled or local).
        st.decode_index.routed(d_engine.id, &pred.keys);

        let mut handoff: Option<Handoff> = None;
        let mut cached: Option<u64> = None;
        let mut warm: Option<Warm> = None;
        let mut prefill_id = None;
        if let Some(pp) = plan.prefill {
            count_route(st, PoolKind::Prefill, pp.reason.as_str());
            let p_engine = pools
                .find(PoolKind::Prefill, pp.id)
                .expect("the plan came from this snapshot")
                .engine
                .clone();
            fin.prefill_engine = Some(p_engine.url.to_string());
            fin.prefill_attempts += 1;
            let predicted = pred.cached_on(PoolKind::Prefill, pp.id);
            fin.predicted_cached_tokens = Some(predicted);
            st.prefill_index.routed(pp.id, &pred.keys);
            fin.mark_dispatch();
            // Warm the decode connection while the prefill runs, so the handoff is one write.
            let work = req.prompt_tokens.saturating_sub(predicted);
            let job = prefill::PrefillJob {
                kind: req.kind,
                body: req.prefill_body.clone(),
                prompt_ids: req.prompt_ids.clone(),
                prompt_tokens: req.prompt_tokens,
                work_tokens: work,
                blocks: route::blocks_needed(st, req),
                request_id: fin.request_id.clone(),
                trace: fin.trace.clone(),
            };
            let (res, w) = tokio::join!(prefill::spawn(st, &p_engine, job), d_engine.client.warm());
            // If the engine closed it while the prefill ran, the transport resends on a fresh one.
            warm = w;
            match res {
                Ok(done) => {
                    cached = done.cached;
                    fin.cached_tokens = done.cached;
                    // After the cached count, which the phase event carries.
                    fin.mark_params();
                    match done.handoff {
                        Some(h) => {
                            fin.disaggregated = true;
                            handoff = Some(h);
                            prefill_id = Some(pp.id);
                        }
                        None => {
                            if st.disagg.enforce {
                                return Err(ProxyError::NullParamsEnforced);
                            }
                            // The engine ran the prompt but kept no KV for us (e.g. it stopped
                            // on EOS): the decode engine prefills it itself.
                            fin.disaggregated = false;
                            fin.decision = Some(("local", DisaggReason::NullParams.as_str()));
                            force_local = Some(DisaggReason::NullParams);
                        }
                    }
                }
                Err(LegError::Relay(e)) => {
                    if st.disagg.enforce {
                        return Err(e);
                    }
                    // The engine refused the prefill leg's body (one token, no stream options):
                    // the decode engine answers the client's own, so an error names what the
                    // client sent (a context-length error quotes its max_tokens, not 1).
                    fin.mark_params();
                    force_local = Some(DisaggReason::PrefillRejected);
                    continue;
                }
                Err(LegError::Retry(EngineError { kind, message, .. })) => {
                    // Failed attempts are prefill time, whatever runs next. (The leg's own task
                    // reported the failure to the control loop: prefill.rs.)
                    fin.mark_params();
                    let reason = kind.as_str();
                    count_retry(st, "prefill", reason);
                    tracing::warn!(request_id = %fin.request_id, engine = %p_engine.url, reason, %message, "prefill leg failed");
                    ex_p.push(pp.id);
                    last_err = message.clone();
                    if fin.prefill_attempts >= retries.prefill_attempts {
                        if st.disagg.enforce {
                            return Err(ProxyError::PrefillFailed(message));
                        }
                        force_local = Some(DisaggReason::PrefillFailed);
                    }
                    continue;
                }
            }
        } else {
            fin.disaggregated = false;
        }

        // The decode leg, retried on other decode engines while the KV can still be read.
        let params = handoff.as_ref().map(|h| h.params().clone());
        let params_at = Instant::now();
        loop {
            fin.decode_attempts += 1;
            let guard = match admitted.take() {
                Some(r) => r,
                None => {
                    // Decide the decode engine again now that the request needs its KV room,
                    // from the state at this handoff (the provisional one only if the policy
                    // picks it again), or wait for room. A refusal drops the handoff, which
                    // releases the prefill's KV.
                    relax_decode_exclusions(st, &who.group, &mut ex_d, prefill_id);
                    let (pools, reason, id, r) = route::admit_decode(
                        st,
                        req,
                        &pred,
                        &route::HandoffAt {
                            seq,
                            exclude: &ex_d,
                            prefill_id,
                            current: d_engine.id,
                            who,
                        },
                    )
                    .await
                    .map_err(|e| route_error(e, &last_err))?;
                    // The request's own reservation now stands for its pool-wide room.
                    drop(pending.take());
                    if let Some(reason) = reason {
                        count_route(st, PoolKind::Decode, reason.as_str());
                        d_engine = pools
                            .find(PoolKind::Decode, id)
                            .expect("the pick came from this snapshot")
                            .engine
                            .clone();
                        warm = None;
                        st.decode_index.routed(d_engine.id, &pred.keys);
                        fin.decode_engine = Some(d_engine.url.to_string());
                    }
                    r
                }
            };
            let conn = warm.take();
            let target = DecodeTarget {
                engine: &d_engine,
                warm: conn,
                guard,
            };
            let seen_before = handoff.as_mut().map(Handoff::sending);
            // A decode leg that carries a prefill's KV reports on that transfer too.
            let kv_from = prefill_id.filter(|_| params.is_some());
            match decode_leg(st, target, params.as_deref(), req, fin, cached).await {
                Ok(done) => {
                    st.pools.succeeded(&d_engine, kv_from);
                    if let Some(h) = handoff.take() {
                        h.delivered();
                    }
                    return Ok(done);
                }
                Err(LegError::Relay(e)) => {
                    // The engine answered: it is up, whatever it thought of the request.
                    st.pools.succeeded(&d_engine, None);
                    // A 4xx is the decode engine's serving layer refusing it, which frees the
                    // KV; any other answer drops the handoff, whose release leg frees it.
                    if let (Some(h), ProxyError::Engine { status, .. }) = (handoff.take(), &e) {
                        if status.is_client_error() {
                            h.rejected();
                        }
                    }
                    return Err(e);
                }
                Err(LegError::Retry(EngineError {
                    kind,
                    message,
                    suspect,
                    delivered,
                })) => {
                    let undelivered = !delivered;
                    let reason = kind.as_str();
                    count_retry(st, "decode", reason);
                    tracing::warn!(request_id = %fin.request_id, engine = %d_engine.url, reason, %message, "decode leg failed before its first byte");
                    st.pools
                        .failed(&d_engine, kind, suspect, kv_from.filter(|_| delivered));
                    ex_d.push(d_engine.id);
                    if let (Some(h), Some(seen)) = (handoff.as_mut(), seen_before) {
                        h.avoid(d_engine.id);
                        if undelivered {
                            h.unsent(seen);
                        }
                    }
                    last_err = message.clone();
                    if fin.decode_attempts >= retries.decode_attempts {
                        return Err(ProxyError::DecodeFailed(message));
                    }
                    if handoff.is_none()
                        || !undelivered
                        || params_at.elapsed() >= st.deadlines.lease
                    {
                        if let (Some(p), false) = (prefill_id, undelivered) {
                            // The decode engine had the params and failed: the fault may be the
                            // prefill side's (a handshake or a KV read that fails), so the fresh
                            // prefill goes to another prefill engine if there is one.
                            if another_prefill_engine(st, &who.group, &ex_p, p) {
                                ex_p.push(p);
                            }
                        }
                        break; // re-plan: a local request anywhere, or a fresh prefill
                    }
                    // Another decode engine, same params: the admission at the top of the loop
                    // skips the failed (now excluded) engine.
                }
            }
        }
        // Dropping the handoff here releases its KV before the fresh prefill runs.
        drop(handoff);
    }
    Err(ProxyError::DecodeFailed(last_err))
}

/// Decode exclusions are soft: an engine that failed this request is skipped while another
/// decode engine can take it, so one failure on each engine does not exhaust the request's
/// budget; when every healthy decode engine (compatible with `prefill`, the engine holding the
/// request's KV, if any) is excluded, the oldest exclusions lapse until one is not. (Prefill
/// exclusions stay: with every prefill engine excluded the request falls back to a local
/// prefill, or fails if disaggregation is enforced.)
fn relax_decode_exclusions(st: &State, group: &str, ex_d: &mut Vec<usize>, prefill: Option<usize>) {
    if ex_d.is_empty() {
        return;
    }
    let snap = st
        .pools
        .pools
        .borrow()
        .snapshot()
        .in_group(group, DEFAULT_GROUP);
    let p = prefill.and_then(|id| snap.prefill.iter().find(|e| e.id == id));
    let candidates: Vec<usize> = snap
        .decode
        .iter()
        .filter(|d| d.routable() && p.is_none_or(|p| p.compatible_with(d)))
        .map(|d| d.id)
        .collect();
    while !ex_d.is_empty() && candidates.iter().all(|id| ex_d.contains(id)) {
        ex_d.remove(0);
    }
}

/// Whether a healthy prefill engine of `group` other than `id` is not excluded.
fn another_prefill_engine(st: &State, group: &str, ex_p: &[usize], id: usize) -> bool {
    st.pools
        .pools
        .borrow()
        .pool(PoolKind::Prefill)
        .iter()
        .any(|e| {
            e.engine.id != id
                && *e.engine.group == *group
                && e.status.health == Health::Healthy
                && !ex_p.contains(&e.engine.id)
        })
}

/// A routing failure as the client sees it, worded with the last leg failure if there was one.
fn route_error(e: RouteError, last_err: &str) -> ProxyError {
    match e {
        RouteError::Refused(e) => e,
        RouteError::Plan(e) if last_err.is_empty() => ProxyError::NoEngine(e),
        RouteError::Plan(PlanError::NoPrefillEngine) => {
            ProxyError::PrefillFailed(last_err.to_string())
        }
        RouteError::Plan(_) => ProxyError::DecodeFailed(last_err.to_string()),
    }
}

fn count_route(st: &State, pool: PoolKind, reason: &'static str) {
    if !st.metrics.enabled() {
        return;
    }
    let policy = st.policy_name(pool);
    st.metrics
        .route_decisions
        .get_or_create(&RouteLabels {
            pool: pool.as_str(),
            policy,
            reason,
        })
        .inc();
}

fn count_retry(st: &State, leg: &'static str, reason: &'static str) {
    if !st.metrics.enabled() {
        return;
    }
    st.metrics
        .retries
        .get_or_create(&RetryLabels { leg, reason })
        .inc();
}

/// How long a non-streaming decode may take: nothing arrives until the whole answer is ready.
fn full_deadline(st: &State, req: &Parsed) -> Duration {
    let tokens = req.max_tokens.unwrap_or(4096).clamp(1, 100_000) as u32;
    st.deadlines.first_token + st.deadlines.per_token.saturating_mul(tokens)
}

/// Where a decode leg goes: the engine, a connection already open to it, and its admission
/// there (in flight, with its KV reservation).
struct DecodeTarget<'a> {
    engine: &'a Arc<Engine>,
    warm: Option<Warm>,
    guard: LoadGuard,
}

async fn decode_leg(
    st: &State,
    target: DecodeTarget<'_>,
    params: Option<&KvParams>,
    req: &Parsed,
    fin: &mut Finisher,
    cached: Option<u64>,
) -> Result<Done, LegError> {
    let DecodeTarget {
        engine,
        warm,
        guard,
    } = target;
    let deadlines = DecodeDeadlines {
        head: if req.stream {
            st.deadlines.handoff
        } else {
            full_deadline(st, req)
        },
        first_event: st.deadlines.first_token,
        full: full_deadline(st, req),
        idle: st.deadlines.idle,
    };
    fin.mark_decode_dispatch();
    let leg = Leg {
        kind: req.kind,
        request_id: &fin.request_id,
        trace: &fin.trace,
    };
    let answer = engine
        .client
        .decode(engine, leg, warm, req, params, cached, deadlines)
        .await;
    match answer? {
        DecodeAnswer::Stream {
            stream,
            first,
            content_type,
        } => {
            // The engine is running the request: its blocks are allocated now.
            guard.began();
            Ok(Done::Stream(StreamParts {
                stream,
                first,
                guard,
                content_type,
                engine: engine.clone(),
            }))
        }
        DecodeAnswer::Full { body, content_type } => {
            fin.saw(&body);
            fin.mark_content();
            fin.finish("ok");
            drop(guard);
            let mut r = (StatusCode::OK, body).into_response();
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                content_type.unwrap_or(HeaderValue::from_static("application/json")),
            );
            Ok(Done::Full(r))
        }
    }
}
