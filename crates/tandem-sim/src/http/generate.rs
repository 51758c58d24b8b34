//! `/v1/completions` and `/v1/chat/completions`: validation, the P/D role from
//! `kv_transfer_params`, faults, and the JSON or SSE response (vllm-pd-protocol.md §1, §5, §7).

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::stream::{self, StreamExt};
use serde_json::{json, Value};

use super::fields::{ChoiceState, Extras, PromptCtx, Render};
use super::logprobs::Lp;
use super::wire::{self, ApiError, ChatRequest, CommonParams, CompletionRequest, Prompt};
use super::{check_model, parse_body, AppState};
use crate::engine::{random_suffix, Event, KvHandle, RemoteKv, Role, SeqParams, Submit};
use crate::scheduler::FinishReason;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Completion,
    Chat,
}

impl Kind {
    fn object(self, stream: bool) -> &'static str {
        match (self, stream) {
            (Kind::Completion, _) => "text_completion",
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
        }
    }
}

/// A prompt as sent: text to tokenize (`Ok`) or token ids (`Err`).
type PromptInput = Result<String, Vec<u32>>;

/// A validated request, ready for the engine.
#[derive(Debug)]
struct Job {
    kind: Kind,
    response_id: String,
    model: String,
    created: u64,
    prompts: Vec<Arc<[u32]>>,
    /// The prompts as the renderer sees them (same order as `prompts`).
    ctx: Vec<PromptCtx>,
    /// Logprobs, echo, structured output, tool call.
    extras: Extras,
    params: SeqParams,
    n: u32,
    stream: bool,
    include_usage: bool,
    continuous_usage: bool,
    role: Role,
    max_tokens_param: u64,
}

impl Job {
    /// The prefill engine's handle, for a decode-role request.
    fn remote(&self) -> Option<RemoteKv> {
        match &self.role {
            Role::Decode(r) => Some(r.clone()),
            _ => None,
        }
    }
}

pub(super) async fn completions(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    handle(s, headers, body, Kind::Completion).await
}

pub(super) async fn chat_completions(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    handle(s, headers, body, Kind::Chat).await
}

async fn handle(s: Arc<AppState>, headers: HeaderMap, body: Bytes, kind: Kind) -> Response {
    // The modeled per-request overhead (c_req: HTTP, tokenisation, scheduling) runs from here:
    // the sim's own parsing is part of what it models, so it is slept to a deadline rather than
    // after the parse, or every request would pay its real CPU time on top of the model (a
    // 15k-token prompt's JSON costs a few ms of it, doubled at `--time-scale 2`).
    let received = tokio::time::Instant::now();
    // Prepared before it is recorded, so the record carries the prompt ids; a slow accept
    // still delays the answer, not the record.
    let prepared = prepare(&s, &headers, &body, kind);
    s.seen.push(
        match kind {
            Kind::Completion => "/v1/completions",
            Kind::Chat => "/v1/chat/completions",
        },
        &headers,
        prepared.as_ref().ok().map(|j| &j.prompts[..]),
    );
    let slow = s.faults.slow_accept_ms();
    if slow > 0 {
        tokio::time::sleep(Duration::from_millis(slow)).await;
    }
    // A slow accept (a fault) delays the request on top of c_req.
    let ready_at = received + Duration::from_millis(slow) + s.engine.overhead();
    let job = match prepared {
        Ok(job) => job,
        Err(e) => {
            // A rejected decode-role request still frees the prefill engine's pinned blocks
            // (vLLM's `_with_kv_transfer_rejection_cleanup`), so its role is read on its own.
            release_remote(&s, peek_remote(&body));
            return e.into_response();
        }
    };
    if s.faults.take_fail() {
        release_remote(&s, job.remote());
        return ApiError::internal("Internal server error (fault injection)").into_response();
    }
    if s.faults.take_stall() {
        // Accept and never answer; the client's disconnect drops this future.
        std::future::pending::<()>().await;
    }
    tokio::time::sleep_until(ready_at).await;
    run(s, job).await
}

/// The remote half of decode-role params, if the body carries a valid one.
fn peek_remote(body: &Bytes) -> Option<RemoteKv> {
    let v: Value = serde_json::from_slice(body).ok()?;
    parse_remote(v.get("kv_transfer_params")?).ok().flatten()
}

fn release_remote(s: &AppState, remote: Option<RemoteKv>) {
    let Some(r) = remote else { return };
    let metrics = s.metrics.clone();
    let world = s.info.tp_size;
    let timeout = s.info.side_channel_timeout;
    let client = s.side_client.clone();
    tokio::spawn(async move {
        let res = client
            .notify(&r.host, r.port, &r.request_id, world, timeout)
            .await;
        if let Err(e) = res {
            metrics.nixl_failed_notification();
            tracing::warn!("NIXL send_notif failed for request {}: P worker blocks will be freed after timeout. ({e})", r.request_id);
        }
    });
}

/// Decode-role params: `Ok(None)` when the request is not a decode leg; `Err` (logged by the
/// caller) when it claims to be one but lacks a required key.
fn parse_remote(p: &Value) -> Result<Option<RemoteKv>, String> {
    RemoteKv::from_params(p, crate::engine::ParamNumbers::Integers)
}

fn prepare(s: &AppState, headers: &HeaderMap, body: &Bytes, kind: Kind) -> Result<Job, ApiError> {
    let vocab = s.tokenizer.vocab_size();
    // Logprobs, echo, structured output, tool call: read from the parsed body in each arm.
    let extras: Extras;
    let (texts_or_ids, common, max_tokens): (Vec<PromptInput>, CommonParams, Option<u64>) =
        match kind {
            Kind::Completion => {
                let r: CompletionRequest = parse_body(body)?;
                extras = Extras::completion(&r, &s.info, vocab)?;
                let prompts = match r.prompt {
                    Prompt::Text(t) => vec![Ok(t)],
                    Prompt::Texts(t) => t.into_iter().map(Ok).collect(),
                    Prompt::Ids(ids) => vec![Err(ids)],
                    Prompt::IdLists(l) => l.into_iter().map(Err).collect(),
                };
                let mt = r.common.max_tokens;
                (prompts, r.common, mt)
            }
            Kind::Chat => {
                let r: ChatRequest = parse_body(body)?;
                extras = Extras::chat(&r, &s.info, vocab)?;
                if r.messages.is_empty() {
                    return Err(ApiError::bad_request("`messages` must not be empty"));
                }
                let msgs = wire::normalise_messages(&r.messages)?;
                let text = s
                    .tokenizer
                    .render_chat(
                        &msgs,
                        r.add_generation_prompt.unwrap_or(true),
                        r.template_inputs(),
                    )
                    .map_err(|e| ApiError::bad_request(e.to_string()))?;
                let mt = r.max_completion_tokens.or(r.common.max_tokens);
                (vec![Ok(text)], r.common, mt)
            }
        };
    check_model(&s.info, common.model.as_deref())?;
    let stream = common.stream.unwrap_or(false);
    if common.stream_options.is_some() && !stream {
        return Err(ApiError::bad_request(
            "Stream options can only be defined when `stream=True`.",
        ));
    }
    if texts_or_ids.is_empty() {
        return Err(ApiError::bad_request("`prompt` must not be empty"));
    }
    let n = common.n.unwrap_or(1);
    if n == 0 {
        return Err(ApiError::bad_request("n must be at least 1."));
    }
    // Chat templates already carry their special tokens (vLLM defaults add_special_tokens=false
    // for chat); completions add them.
    let add_special = common
        .add_special_tokens
        .unwrap_or(kind == Kind::Completion);
    let seed = common.seed.map_or(s.info.seed, |v| v as u64);
    let mut prompts = Vec::with_capacity(texts_or_ids.len());
    let mut ctx = Vec::with_capacity(texts_or_ids.len());
    for p in texts_or_ids {
        let (ids, text) = match p {
            Ok(text) => (
                s.tokenizer
                    .encode(&text, add_special)
                    .map_err(|e| ApiError::bad_request(e.to_string()))?,
                text,
            ),
            Err(ids) => {
                if let Some(bad) = ids.iter().find(|&&t| t >= s.tokenizer.vocab_size()) {
                    return Err(ApiError::bad_request(format!(
                        "Token id {bad} is out of vocabulary"
                    )));
                }
                // Only `echo` reads the text of an id prompt.
                let text = if extras.echo {
                    s.tokenizer.decode(&ids).unwrap_or_default()
                } else {
                    String::new()
                };
                (ids, text)
            }
        };
        if ids.is_empty() {
            return Err(ApiError::bad_request("The prompt cannot be empty."));
        }
        let ids: Arc<[u32]> = Arc::from(ids);
        ctx.push(PromptCtx::new(ids.clone(), text, seed));
        prompts.push(ids);
    }
    // vLLM: `max_tokens: null` means 16 for completions; chat defaults to the remaining context.
    let longest = prompts
        .iter()
        .map(|p: &Arc<[u32]>| p.len())
        .max()
        .unwrap_or(0) as u64;
    let max_model_len = u64::from(s.info.max_model_len);
    let max_tokens = match (max_tokens, kind) {
        (Some(m), _) => m,
        (None, Kind::Completion) => 16,
        (None, Kind::Chat) => max_model_len.saturating_sub(longest),
    };
    if longest + max_tokens > max_model_len {
        return Err(ApiError::bad_request(format!(
            "This model's maximum context length is {max_model_len} tokens. However, you requested {} tokens ({longest} in the messages, {max_tokens} in the completion). Please reduce the length of the messages or completion.",
            longest + max_tokens
        )));
    }
    if max_tokens == 0 {
        return Err(ApiError::bad_request(
            "max_tokens must be at least 1, got 0.",
        ));
    }
    let empty_stop = match &common.stop {
        Some(wire::Stop::One(s)) => s.is_empty(),
        Some(wire::Stop::Many(v)) => v.iter().any(String::is_empty),
        None => false,
    };
    if empty_stop {
        // vLLM's `SamplingParams._verify_args`.
        return Err(ApiError::bad_request(
            "stop cannot contain an empty string.",
        ));
    }
    let role = match &common.kv_transfer_params {
        Some(p) if p.get("do_remote_decode").and_then(Value::as_bool) == Some(true) => {
            Role::Prefill
        }
        Some(p) => match parse_remote(p) {
            Ok(Some(r)) => Role::Decode(r),
            Ok(None) => Role::Colocated,
            Err(missing) => {
                tracing::warn!("Got invalid KVTransferParams: {p} ({missing}). This request will not utilize KVTransfer");
                Role::Colocated
            }
        },
        None => Role::Colocated,
    };
    if !matches!(role, Role::Colocated) && prompts.len() > 1 {
        return Err(ApiError::bad_request(
            "kv_transfer_params requires a single prompt",
        ));
    }
    let base = headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or(common.request_id.clone())
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string());
    let prefix = match kind {
        Kind::Completion => "cmpl",
        Kind::Chat => "chatcmpl",
    };
    let opts = common.stream_options.clone().unwrap_or_default();
    Ok(Job {
        kind,
        response_id: format!("{prefix}-{base}"),
        model: s.info.served_model_name.clone(),
        created: unix_now(),
        prompts,
        ctx,
        extras,
        params: SeqParams {
            max_tokens: max_tokens as usize,
            min_tokens: common.min_tokens.unwrap_or(0) as usize,
            ignore_eos: common.ignore_eos.unwrap_or(false),
            stop: common.stop.map(wire::Stop::into_vec).unwrap_or_default(),
            stop_token_ids: common.stop_token_ids.unwrap_or_default(),
            include_stop_str_in_output: common.include_stop_str_in_output.unwrap_or(false),
            seed: common.seed.map(|v| v as u64),
            forced: None,
        },
        n,
        stream,
        include_usage: common.stream_options.is_some() && opts.include_usage.unwrap_or(true),
        continuous_usage: opts.continuous_usage_stats.unwrap_or(false),
        role,
        max_tokens_param: max_tokens,
    })
}

/// One finished choice.
#[derive(Debug, Default, Clone)]
struct Choice {
    text: String,
    tokens: u64,
    /// The output token ids (for logprobs).
    ids: Vec<u32>,
    finish: Option<FinishReason>,
    stop_reason: Option<Value>,
    error: Option<String>,
}

async fn run(s: Arc<AppState>, job: Job) -> Response {
    let arrival = s.engine.clock().now();
    let mut streams = Vec::new();
    for (i, prompt) in job.prompts.iter().enumerate() {
        let external = match job.kind {
            Kind::Completion => format!("{}-{i}", job.response_id),
            Kind::Chat => job.response_id.clone(),
        };
        let internal = if s.info.disable_request_id_randomization {
            external
        } else {
            let mut rng = s
                .rng
                .lock()
                .expect("rng lock is never poisoned: no panics while held");
            format!("{external}-{}", random_suffix(&mut *rng))
        };
        let mut params = job.params.clone();
        params.forced = match job.extras.forced(&s.tokenizer, &job.ctx[i], job.n) {
            Ok(f) => f,
            Err(e) => return e.into_response(),
        };
        let req = Submit {
            internal_id: internal,
            prompt: prompt.clone(),
            params,
            n: job.n,
            role: job.role.clone(),
            arrival: arrival - s.engine.clock().real_to_sim(s.engine.overhead()),
            force_eos_first: s.faults.take_eos(),
            max_tokens_param: job.max_tokens_param,
        };
        let rs = s.engine.submit(req);
        streams.push(rs);
    }
    let prompt_tokens: u64 = job.prompts.iter().map(|p| p.len() as u64).sum();
    if job.stream {
        stream_response(s, job, streams, prompt_tokens)
    } else {
        full_response(s, job, streams, prompt_tokens).await
    }
}

fn usage(prompt_tokens: u64, completion_tokens: u64, cached: Option<u64>) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": cached.map(|c| json!({"cached_tokens": c})),
    })
}

pub(super) fn finish_str(f: Option<FinishReason>) -> Value {
    match f {
        None => Value::Null,
        Some(FinishReason::Stop) => "stop".into(),
        Some(FinishReason::Length) => "length".into(),
        Some(FinishReason::Abort) => "abort".into(),
        Some(FinishReason::Error) => "error".into(),
    }
}

fn kv_params(s: &AppState, kv: &KvHandle) -> Value {
    json!({
        "do_remote_prefill": true,
        "do_remote_decode": false,
        "remote_block_ids": kv.block_ids,
        "remote_engine_id": s.info.engine_id,
        "remote_request_id": kv.remote_request_id,
        "remote_host": s.info.side_channel_host,
        "remote_port": s.info.side_channel_port,
        "tp_size": s.info.tp_size,
    })
}

/// A response whose body fails after it starts: the connection is cut (the die fault).
fn cut_connection() -> Response {
    let body = Body::from_stream(stream::once(async {
        Err::<Bytes, _>(std::io::Error::other("simulated engine death"))
    }));
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

async fn full_response(
    s: Arc<AppState>,
    job: Job,
    mut streams: Vec<crate::engine::RequestStream>,
    prompt_tokens: u64,
) -> Response {
    let n = job.n as usize;
    let mut choices = vec![Choice::default(); n * streams.len()];
    let mut kv: Option<KvHandle> = None;
    let mut cached = 0u64;
    let die = s.faults.die_after_tokens();
    let mut total = 0u64;
    for (p, rs) in streams.iter_mut().enumerate() {
        let mut open = n;
        while open > 0 {
            let Some(ev) = rs.rx.recv().await else {
                return ApiError::internal("engine stopped").into_response();
            };
            let (index, finish) = match ev {
                Event::Token {
                    index,
                    token,
                    text,
                    finish,
                } => {
                    let c = &mut choices[p * n + index as usize];
                    c.text.push_str(&text);
                    c.tokens += 1;
                    c.ids.push(token);
                    total += 1;
                    if die.is_some_and(|d| total > d) {
                        return cut_connection();
                    }
                    (index, finish)
                }
                Event::Failed { index, error } => {
                    let c = &mut choices[p * n + index as usize];
                    c.finish = Some(FinishReason::Error);
                    c.error = Some(error);
                    open -= 1;
                    continue;
                }
            };
            if let Some(f) = finish {
                let c = &mut choices[p * n + index as usize];
                c.finish = Some(f.reason);
                c.stop_reason = f.stop_reason;
                if index == 0 {
                    cached += f.cached_tokens as u64;
                }
                if f.kv.is_some() {
                    kv = f.kv;
                }
                open -= 1;
            }
        }
    }
    if let Some(c) = choices
        .iter()
        .find(|c| c.finish == Some(FinishReason::Error))
    {
        tracing::warn!(error = ?c.error, "request failed in the engine");
        return ApiError::internal("Internal server error").into_response();
    }
    let completion_tokens: u64 = choices.iter().map(|c| c.tokens).sum();
    let alts = s.engine.sample_ids();
    let render = Render {
        kind: job.kind,
        x: &job.extras,
        lp: Lp {
            tok: &s.tokenizer,
            alts: &alts,
        },
        prompts: &job.ctx,
        n,
    };
    let choices_json: Vec<Value> = choices
        .iter()
        .enumerate()
        .map(|(i, c)| render.full_choice(i, &c.ids, &c.text, c.finish, &c.stop_reason))
        .collect();
    let details = s.info.enable_prompt_tokens_details.then_some(cached);
    let mut body = json!({
        "id": job.response_id,
        "object": job.kind.object(false),
        "created": job.created,
        "model": job.model,
        "choices": choices_json,
        "usage": usage(prompt_tokens, completion_tokens, details),
        "system_fingerprint": null,
        "kv_transfer_params": kv.as_ref().map(|k| kv_params(&s, k)),
    });
    if job.kind == Kind::Chat {
        body["prompt_logprobs"] = render.prompt_logprobs(0);
    }
    (StatusCode::OK, axum::Json(body)).into_response()
}

fn sse(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

fn stream_response(
    s: Arc<AppState>,
    job: Job,
    streams: Vec<crate::engine::RequestStream>,
    prompt_tokens: u64,
) -> Response {
    let n = job.n as usize;
    let num_prompts = streams.len();
    let die = s.faults.die_after_tokens();
    let details_on = s.info.enable_prompt_tokens_details;
    let body = async_stream::stream! {
        let head = json!({"id": job.response_id, "object": job.kind.object(true), "created": job.created, "model": job.model});
        let chunk = |choices: Value, usage: Option<Value>| {
            let mut c = head.clone();
            c["choices"] = choices;
            if let Some(u) = usage { c["usage"] = u; }
            c
        };
        // vLLM's chat stream sends the role chunks in its first iteration over the engine's
        // outputs, i.e. with the first token, not when the request is accepted.
        let mut role_sent = job.kind != Kind::Chat;
        // Merge the prompts' streams; each event is tagged with its prompt's position.
        let tagged = streams.into_iter().enumerate().map(|(p, rs)| {
            stream::unfold(rs, |mut rs| async move { rs.rx.recv().await.map(|e| (e, rs)) })
                .map(move |e| (p, e))
                .boxed()
        });
        let mut merged = stream::select_all(tagged);
        let alts = s.engine.sample_ids();
        let render = Render {
            kind: job.kind,
            x: &job.extras,
            lp: Lp { tok: &s.tokenizer, alts: &alts },
            prompts: &job.ctx,
            n,
        };
        let mut states: Vec<ChoiceState> = (0..n * num_prompts).map(|_| ChoiceState::default()).collect();
        let mut open = n * num_prompts;
        let mut completion_tokens = 0u64;
        // Cached prompt tokens, summed over the prompts as the full response sums them.
        let mut cached = 0u64;
        let mut failed = None;
        while open > 0 {
            let Some((p, ev)) = merged.next().await else {
                failed = Some("engine stopped".to_string());
                break;
            };
            match ev {
                Event::Token { index, token, text, finish } => {
                    if !role_sent {
                        role_sent = true;
                        for i in 0..n * num_prompts {
                            yield Ok::<Bytes, std::io::Error>(sse(&chunk(json!([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]), None)));
                        }
                    }
                    completion_tokens += 1;
                    if die.is_some_and(|d| completion_tokens > d) {
                        // Let the server flush what was already yielded (a pending body is
                        // flushed), then cut the connection.
                        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                        yield Err(std::io::Error::other("simulated engine death"));
                        return;
                    }
                    let i = p * n + index as usize;
                    states[i].note(token);
                    if let Some(f) = finish.as_ref().filter(|_| index == 0) {
                        cached += f.cached_tokens as u64;
                    }
                    // vLLM skips chunks with no text unless they carry the finish (the
                    // token's logprobs then ride on the next chunk).
                    if text.is_empty() && finish.is_none() { continue; }
                    if finish.is_some() { open -= 1; }
                    let choice = render.stream_choice(&mut states[i], i, &text, finish.as_ref());
                    let u = job.continuous_usage.then(|| usage(prompt_tokens, completion_tokens, None));
                    yield Ok(sse(&chunk(json!([choice]), u)));
                }
                Event::Failed { error, .. } => {
                    failed = Some(error);
                    break;
                }
            }
        }
        if let Some(e) = failed {
            tracing::warn!(error = %e, "streaming request failed in the engine");
            yield Ok(sse(&ApiError::internal("Internal server error").body()));
            yield Ok(Bytes::from_static(b"data: [DONE]\n\n"));
            return;
        }
        if job.include_usage {
            let mut c = head.clone();
            c["choices"] = json!([]);
            // The final usage chunk is serialized without its unset fields, as vLLM's is
            // (`exclude_none`); `prompt_tokens_details` is set as in the full response.
            let mut u = usage(prompt_tokens, completion_tokens, details_on.then_some(cached));
            if u["prompt_tokens_details"].is_null() {
                u.as_object_mut().expect("usage is an object").remove("prompt_tokens_details");
            }
            c["usage"] = u;
            yield Ok(sse(&c));
        }
        yield Ok(Bytes::from_static(b"data: [DONE]\n\n"));
    };
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/event-stream; charset=utf-8")],
        Body::from_stream(body),
    )
        .into_response()
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
