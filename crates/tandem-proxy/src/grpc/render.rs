//! vLLM's `GenerateResponse` messages → the OpenAI bytes vLLM's HTTP server writes for the same
//! request (vllm-grpc.md §3): SSE events for a stream, one JSON body otherwise.
//!
//! The shapes, key order included, are those of `tandem sim`'s HTTP surface
//! (`tandem-sim/src/http/generate.rs` and `fields.rs`), which reproduces vLLM's; the relay and the
//! client cannot tell which transport the engine spoke. Ids, `created` and `model` are inputs, so
//! everything here is pure.
//!
//! Text is the server's `SequenceOutput.text` deltas, never re-detokenised from `token_ids`: the
//! server's incremental detokeniser already holds back partial UTF-8 and any bytes that could
//! start a stop string, and trims a matched stop string (and the stop/EOS token's text). Decoding
//! again here would need the model's tokenizer and its exact offsets, and would duplicate that
//! logic with a chance to disagree.

use bytes::Bytes;
use serde_json::{json, Map, Value};
use vllm_proto::finish_info::{FinishReason, StopReason};
use vllm_proto::{FinishInfo, GenerateResponse, SequenceOutput};

use super::request::struct_to_json;
use crate::front::Kind;

const DONE: &[u8] = b"data: [DONE]\n\n";

/// One SSE event's bytes (`data: {...}\n\n`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Chunk {
    pub bytes: Bytes,
    /// It carries generated text (non-empty), for the first-token time; the chat role chunk, an
    /// empty finish chunk, the usage chunk and `[DONE]` do not.
    pub content: bool,
}

impl Chunk {
    fn other(bytes: Bytes) -> Self {
        Chunk {
            bytes,
            content: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum RenderError {
    /// `FinishInfo{ABORTED}`: `Control.Abort`, or the engine gave up (repetition). vLLM's HTTP
    /// server has no client-visible shape for it; the caller decides (error event, retry).
    #[error("the engine aborted the request")]
    Aborted,
    /// A gRPC stream that ends (OK) without `finish_info` is an error (vllm-grpc.md §8).
    #[error("the engine's response ended without finish_info")]
    NoFinish,
    #[error("the engine sent output after finish_info")]
    AfterFinish,
    /// Only one sequence is ever requested (`n > 1` is refused before).
    #[error("the engine sent output for sequence {0}")]
    Index(u32),
    #[error("the engine sent finish_reason {0}")]
    FinishReason(i32),
}

/// What the answer is rendered for.
#[derive(Debug, Clone)]
pub(crate) struct RenderSpec {
    pub kind: Kind,
    pub stream: bool,
    /// `stream_options.include_usage` (see [`stream_usage`]): a last chunk with the usage.
    pub include_usage: bool,
    /// `stream_options.continuous_usage_stats`: the usage so far on every chunk.
    pub continuous_usage_stats: bool,
    /// `cmpl-<id>` / `chatcmpl-<id>`.
    pub response_id: String,
    /// Unix seconds.
    pub created: u64,
    pub model: String,
    /// Tandem's count; the engine's `PromptInfo.num_prompt_tokens` replaces it when it arrives
    /// (it is what the engine actually ran, as an HTTP engine reports its own count).
    pub prompt_tokens: u64,
    /// The prefill side's cached-token count, which replaces the engine's (the decode engine
    /// counts the pulled KV as cached). Written wherever a usage object is, as the HTTP relay's
    /// rewrite does.
    pub cached_tokens: Option<u64>,
    /// vLLM's `--enable-prompt-tokens-details`: a non-streaming usage carries
    /// `{"cached_tokens": n}` instead of `null`.
    pub prompt_tokens_details: bool,
}

/// `(include_usage, continuous_usage_stats)` from a body's `stream_options`, as vLLM's serving
/// code reads them: `include_usage` defaults to true once `stream_options` is given, and
/// continuous stats need `include_usage`.
pub(crate) fn stream_usage(body: &Map<String, Value>) -> (bool, bool) {
    let Some(o) = body.get("stream_options").filter(|o| o.is_object()) else {
        return (false, false);
    };
    let include = match o.get("include_usage") {
        None => true,
        Some(v) => v.as_bool().unwrap_or(false),
    };
    let continuous = include
        && o.get("continuous_usage_stats")
            .and_then(Value::as_bool)
            .unwrap_or(false);
    (include, continuous)
}

/// The error event vLLM's HTTP server ends a failed stream with, then `[DONE]` (the sim's
/// `ApiError::internal("Internal server error")`), for a gRPC stream that ends in an error
/// status after it started.
pub(crate) fn stream_error() -> Vec<Chunk> {
    let body = json!({"error": {
        "message": "Internal server error",
        "type": "InternalServerError",
        "param": null,
        "code": 500,
    }});
    vec![
        Chunk::other(sse(&body)),
        Chunk::other(Bytes::from_static(DONE)),
    ]
}

/// The finish, as the HTTP answer writes it.
#[derive(Debug, Clone)]
struct Finished {
    reason: &'static str,
    stop_reason: Value,
    /// `FinishInfo.num_cached_tokens` (0.5+).
    cached: Option<u32>,
    kv_transfer_params: Value,
}

/// Renders one request's answer; see the module docs.
#[derive(Debug)]
pub(crate) struct Renderer {
    spec: RenderSpec,
    prompt_tokens: u64,
    /// Output tokens so far (`num_tokens` summed; `FinishInfo.num_output_tokens` at the end).
    completion_tokens: u64,
    role_sent: bool,
    finished: Option<Finished>,
}

impl Renderer {
    pub(crate) fn new(spec: RenderSpec) -> Self {
        Renderer {
            prompt_tokens: spec.prompt_tokens,
            spec,
            completion_tokens: 0,
            role_sent: false,
            finished: None,
        }
    }

    /// Output tokens so far.
    pub(crate) fn completion_tokens(&self) -> u64 {
        self.completion_tokens
    }

    /// The cached-token count the usage reports: the override, else the engine's.
    pub(crate) fn cached_tokens(&self) -> Option<u64> {
        self.spec
            .cached_tokens
            .or_else(|| self.finished.as_ref().and_then(|f| f.cached).map(u64::from))
    }

    /// A streamed message's SSE events (none for `PromptInfo` alone or an output without text).
    pub(crate) fn push(&mut self, msg: &GenerateResponse) -> Result<Vec<Chunk>, RenderError> {
        debug_assert!(self.spec.stream, "push renders a stream");
        if let Some(p) = &msg.prompt_info {
            self.prompt_tokens = u64::from(p.num_prompt_tokens);
        }
        let Some(out) = &msg.outputs else {
            return Ok(Vec::new());
        };
        self.note(out)?;
        let mut chunks = Vec::with_capacity(2);
        // vLLM's chat stream sends the role chunk in its first iteration over the engine's
        // outputs: with the first output, whether or not that has text.
        if self.spec.kind == Kind::Chat && !self.role_sent {
            self.role_sent = true;
            let choice = json!([{"index": 0, "delta": {"role": "assistant", "content": ""},
                                 "logprobs": null, "finish_reason": null}]);
            chunks.push(Chunk::other(self.event(choice, None)));
        }
        // vLLM skips an output without text unless it carries the finish (held-back bytes
        // arrive with a later one).
        let finish = out
            .finish_info
            .is_some()
            .then(|| self.finished.clone())
            .flatten();
        if out.text.is_empty() && finish.is_none() {
            return Ok(chunks);
        }
        let (fr, sr) = match &finish {
            Some(f) => (Value::from(f.reason), f.stop_reason.clone()),
            None => (Value::Null, Value::Null),
        };
        let choice = match self.spec.kind {
            Kind::Completions => json!({"index": 0, "text": out.text, "logprobs": null,
                                        "finish_reason": fr, "stop_reason": sr}),
            Kind::Chat => {
                let mut c = json!({"index": 0, "delta": {"content": out.text},
                                   "logprobs": null, "finish_reason": fr});
                // Chat chunks carry `stop_reason` only on the finish.
                if finish.is_some() {
                    c["stop_reason"] = sr;
                }
                c
            }
        };
        let usage = self.spec.continuous_usage_stats.then(|| {
            // Per-chunk usage never reports the engine's cached tokens; an override is written
            // into it as the HTTP relay's rewrite would.
            let details = self
                .spec
                .cached_tokens
                .map_or(Value::Null, |c| json!({ "cached_tokens": c }));
            usage(self.prompt_tokens, self.completion_tokens, details)
        });
        chunks.push(Chunk {
            bytes: self.event(Value::Array(vec![choice]), usage),
            content: !out.text.is_empty(),
        });
        Ok(chunks)
    }

    /// The end of a stream: the usage chunk (if `include_usage`) and `[DONE]`. The finish itself
    /// went out with the output that carried `finish_info`, as vLLM writes `finish_reason` on
    /// the last token's chunk. `Err(NoFinish)` if that never came.
    pub(crate) fn finish(&mut self) -> Result<Vec<Chunk>, RenderError> {
        debug_assert!(self.spec.stream, "finish ends a stream");
        if self.finished.is_none() {
            return Err(RenderError::NoFinish);
        }
        let mut chunks = Vec::with_capacity(2);
        if self.spec.include_usage {
            // The stream's last usage has no `prompt_tokens_details` key of its own.
            let mut u = Map::new();
            u.insert("prompt_tokens".into(), self.prompt_tokens.into());
            u.insert(
                "total_tokens".into(),
                (self.prompt_tokens + self.completion_tokens).into(),
            );
            u.insert("completion_tokens".into(), self.completion_tokens.into());
            if let Some(c) = self.spec.cached_tokens {
                u.insert(
                    "prompt_tokens_details".into(),
                    json!({ "cached_tokens": c }),
                );
            }
            let mut m = self.head(true);
            m.insert("choices".into(), json!([]));
            m.insert("usage".into(), Value::Object(u));
            chunks.push(Chunk::other(sse(&Value::Object(m))));
        }
        chunks.push(Chunk::other(Bytes::from_static(DONE)));
        Ok(chunks)
    }

    /// The whole non-streaming body from every message of the response: the unary `Generate`'s
    /// one message, or a stream's messages collected.
    pub(crate) fn full(mut self, msgs: &[GenerateResponse]) -> Result<Bytes, RenderError> {
        debug_assert!(!self.spec.stream, "full renders a non-streaming answer");
        let mut text = String::new();
        for m in msgs {
            if let Some(p) = &m.prompt_info {
                self.prompt_tokens = u64::from(p.num_prompt_tokens);
            }
            if let Some(out) = &m.outputs {
                self.note(out)?;
                text.push_str(&out.text);
            }
        }
        let f = self.finished.clone().ok_or(RenderError::NoFinish)?;
        let choice = match self.spec.kind {
            Kind::Completions => json!({
                "index": 0, "text": text, "logprobs": null,
                "finish_reason": f.reason, "stop_reason": f.stop_reason,
                "prompt_logprobs": null,
            }),
            Kind::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": null,
                            "annotations": null, "audio": null, "function_call": null,
                            "tool_calls": [], "reasoning_content": null},
                "logprobs": null, "finish_reason": f.reason, "stop_reason": f.stop_reason,
            }),
        };
        let details = match (self.spec.cached_tokens, self.spec.prompt_tokens_details) {
            (Some(c), _) => json!({ "cached_tokens": c }),
            (None, true) => json!({ "cached_tokens": f.cached.unwrap_or(0) }),
            (None, false) => Value::Null,
        };
        let mut m = self.head(false);
        m.insert("choices".into(), Value::Array(vec![choice]));
        m.insert(
            "usage".into(),
            usage(self.prompt_tokens, self.completion_tokens, details),
        );
        m.insert("system_fingerprint".into(), Value::Null);
        m.insert("kv_transfer_params".into(), f.kv_transfer_params);
        if self.spec.kind == Kind::Chat {
            m.insert("prompt_logprobs".into(), Value::Null);
        }
        Ok(Bytes::from(
            serde_json::to_vec(&Value::Object(m)).expect("a JSON value serialises"),
        ))
    }

    /// Count an output and take its finish, checking the sequence's framing.
    fn note(&mut self, out: &SequenceOutput) -> Result<(), RenderError> {
        if self.finished.is_some() {
            return Err(RenderError::AfterFinish);
        }
        if out.index != 0 {
            return Err(RenderError::Index(out.index));
        }
        self.completion_tokens += u64::from(out.num_tokens);
        if let Some(fi) = &out.finish_info {
            self.finished = Some(finished(fi)?);
            // Cumulative and authoritative (a chunk may carry several tokens).
            self.completion_tokens = u64::from(fi.num_output_tokens);
        }
        Ok(())
    }

    /// `id`, `object`, `created`, `model`: every answer's first keys, in this order.
    fn head(&self, stream: bool) -> Map<String, Value> {
        let object = match (self.spec.kind, stream) {
            (Kind::Completions, _) => "text_completion",
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
        };
        let mut m = Map::new();
        m.insert("id".into(), self.spec.response_id.clone().into());
        m.insert("object".into(), object.into());
        m.insert("created".into(), self.spec.created.into());
        m.insert("model".into(), self.spec.model.clone().into());
        m
    }

    fn event(&self, choices: Value, usage: Option<Value>) -> Bytes {
        let mut m = self.head(true);
        m.insert("choices".into(), choices);
        if let Some(u) = usage {
            m.insert("usage".into(), u);
        }
        sse(&Value::Object(m))
    }
}

/// `finish_reason` and `stop_reason` as vLLM's HTTP answer writes them: the matched stop string,
/// the stop token id, or `null` for EOS (the EOS token is not a "stop reason") and for length.
fn finished(fi: &FinishInfo) -> Result<Finished, RenderError> {
    let reason = match FinishReason::try_from(fi.finish_reason) {
        Ok(FinishReason::Length) => "length",
        Ok(FinishReason::Stop) => "stop",
        Ok(FinishReason::Aborted) => return Err(RenderError::Aborted),
        Ok(FinishReason::NotFinished) | Err(_) => {
            return Err(RenderError::FinishReason(fi.finish_reason))
        }
    };
    let stop_reason = match (&fi.stop_reason, reason) {
        (Some(StopReason::StopString(s)), "stop") => Value::from(s.as_str()),
        (Some(StopReason::StopTokenId(t)), "stop") => Value::from(*t),
        _ => Value::Null,
    };
    Ok(Finished {
        reason,
        stop_reason,
        cached: fi.num_cached_tokens,
        kv_transfer_params: fi
            .kv_transfer_params
            .as_ref()
            .map_or(Value::Null, struct_to_json),
    })
}

/// A usage object with its four keys in vLLM's order.
fn usage(prompt_tokens: u64, completion_tokens: u64, details: Value) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": details,
    })
}

fn sse(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

#[cfg(test)]
#[path = "render_tests.rs"]
mod tests;
