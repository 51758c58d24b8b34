//! The OpenAI fields beyond plain text: `logprobs` / `top_logprobs`, `prompt_logprobs`, `echo`
//! (and `suffix`'s 400), structured output, and chat tool calls. Parsed and validated once per
//! request ([`Extras`]), then rendered into each choice of the JSON or SSE answer ([`Render`]).
//!
//! Everything here is a function of (seed, prompt, choice index, position, token): a decode
//! engine that pulled the KV from elsewhere answers exactly as a colocated one.

use std::sync::Arc;

use serde_json::{json, Value};

use super::generate::{finish_str, Kind};
use super::logprobs::{CompletionShape, Lp};
use super::structured::{self, Spec};
use super::tools::{self, Call};
use super::wire::{ApiError, ChatRequest, CommonParams, CompletionRequest};
use super::HttpInfo;
use crate::engine::{Finish, Forced};
use crate::sampler::{mix, prompt_fingerprint};
use crate::scheduler::FinishReason;
use crate::tokenizer::SimTokenizer;

/// What a request asks for beyond text.
#[derive(Debug, Clone, Default)]
pub(super) struct Extras {
    /// Alternatives per output token (`Some(0)`: the token's own logprob only).
    pub logprobs: Option<usize>,
    /// Alternatives per prompt token (also set by completions' `echo` with `logprobs`, as vLLM
    /// does).
    pub prompt_logprobs: Option<usize>,
    pub echo: bool,
    pub structured: Option<Spec>,
    pub tool: Option<Call>,
}

/// Validate a logprobs count as vLLM does (`-1`: the whole vocabulary; at most
/// `--max-logprobs`).
fn count(v: i64, field: &str, what: &str, info: &HttpInfo, vocab: u32) -> Result<usize, ApiError> {
    if v < -1 {
        return Err(ApiError::bad_request(format!(
            "`{field}` must be a positive value or -1."
        )));
    }
    let n = if v == -1 { i64::from(vocab) } else { v };
    let max = if info.max_logprobs == -1 {
        i64::from(vocab)
    } else {
        info.max_logprobs
    };
    if n > max {
        return Err(ApiError::bad_request(format!(
            "Requested {what} logprobs of {n}, which is greater than max allowed: {max}"
        )));
    }
    Ok(n as usize)
}

fn prompt_logprobs(
    c: &CommonParams,
    stream: bool,
    info: &HttpInfo,
    vocab: u32,
) -> Result<Option<usize>, ApiError> {
    let Some(v) = c.prompt_logprobs else {
        return Ok(None);
    };
    if stream && (v > 0 || v == -1) {
        return Err(ApiError::bad_request(
            "`prompt_logprobs` are not available when `stream=True`.",
        ));
    }
    count(v, "prompt_logprobs", "prompt", info, vocab).map(Some)
}

impl Extras {
    pub fn completion(
        r: &CompletionRequest,
        info: &HttpInfo,
        vocab: u32,
    ) -> Result<Extras, ApiError> {
        if r.suffix.is_some() {
            // vLLM's `render_completion`: the models it serves have no fill-in-the-middle.
            return Err(ApiError::bad_request("suffix is not currently supported"));
        }
        let stream = r.common.stream.unwrap_or(false);
        let logprobs = r
            .logprobs
            .map(|v| count(v, "logprobs", "sample", info, vocab))
            .transpose()?;
        let echo = r.echo.unwrap_or(false);
        let mut prompt = prompt_logprobs(&r.common, stream, info, vocab)?;
        if prompt.is_none() && echo {
            prompt = logprobs;
        }
        Ok(Extras {
            logprobs,
            prompt_logprobs: prompt,
            echo,
            structured: structured::from_request(&r.common)?,
            tool: None,
        })
    }

    pub fn chat(r: &ChatRequest, info: &HttpInfo, vocab: u32) -> Result<Extras, ApiError> {
        let stream = r.common.stream.unwrap_or(false);
        let want = r.logprobs.unwrap_or(false);
        let top = match r.top_logprobs {
            Some(t) if t < -1 => {
                return Err(ApiError::bad_request(
                    "`top_logprobs` must be a positive value or -1.",
                ))
            }
            Some(t) if (t > 0 || t == -1) && !want => {
                return Err(ApiError::bad_request(
                    "when using `top_logprobs`, `logprobs` must be set to true.",
                ))
            }
            Some(t) => t,
            None => 0,
        };
        let logprobs = if want {
            Some(count(top, "top_logprobs", "sample", info, vocab)?)
        } else {
            None
        };
        let tool = tools::choose(r.tools.as_ref(), r.tool_choice.as_ref())?;
        Ok(Extras {
            logprobs,
            prompt_logprobs: prompt_logprobs(&r.common, stream, info, vocab)?,
            echo: false,
            // A tool call's arguments are the structured output when there is one.
            structured: structured::from_request(&r.common)?,
            tool,
        })
    }

    /// The output every choice of `prompt` must produce, tokenized, if it is constrained.
    pub fn forced(
        &self,
        tok: &SimTokenizer,
        prompt: &PromptCtx,
        n: u32,
    ) -> Result<Option<Forced>, ApiError> {
        let spec = match (&self.tool, &self.structured) {
            (Some(call), _) => call.spec(),
            (None, Some(s)) => s.clone(),
            (None, None) => return Ok(None),
        };
        let mut out = Vec::with_capacity(n as usize);
        for index in 0..n {
            let text = structured::render(&spec, prompt.choice_key(index));
            let ids = tok
                .encode(&text, false)
                .map_err(|e| ApiError::bad_request(e.to_string()))?;
            out.push(Arc::from(ids));
        }
        Ok(Some(out.into()))
    }
}

/// One prompt of a request, as the renderer needs it.
#[derive(Debug, Clone)]
pub(super) struct PromptCtx {
    pub ids: Arc<[u32]>,
    pub fingerprint: u64,
    /// The prompt as text (for `echo`): as sent, or decoded from its ids.
    pub text: String,
    /// Keys the derived outputs: the seed (the request's, else the engine's) and the prompt.
    pub key: u64,
}

impl PromptCtx {
    pub fn new(ids: Arc<[u32]>, text: String, seed: u64) -> Self {
        let fingerprint = prompt_fingerprint(&ids);
        PromptCtx {
            ids,
            fingerprint,
            text,
            key: mix(seed ^ mix(fingerprint)),
        }
    }

    fn choice_key(&self, index: u32) -> u64 {
        mix(self.key ^ u64::from(index))
    }
}

/// A streamed choice's progress.
#[derive(Debug, Default)]
pub(super) struct ChoiceState {
    /// Output tokens seen so far.
    position: usize,
    /// Tokens not yet reported (a chunk without text is not sent; its logprobs ride on the
    /// next one).
    pending: Vec<u32>,
    shape: CompletionShape,
    /// Whether a chunk went out (the echo and the tool-call head go in the first).
    started: bool,
}

impl ChoiceState {
    pub fn note(&mut self, token: u32) {
        self.pending.push(token);
    }
}

/// Renders the choices of one request.
pub(super) struct Render<'a> {
    pub kind: Kind,
    pub x: &'a Extras,
    pub lp: Lp<'a>,
    pub prompts: &'a [PromptCtx],
    /// Choices per prompt.
    pub n: usize,
}

impl Render<'_> {
    fn prompt_of(&self, i: usize) -> (&PromptCtx, u32) {
        (&self.prompts[i / self.n], (i % self.n) as u32)
    }

    fn tool_id(&self, i: usize) -> String {
        let (p, index) = self.prompt_of(i);
        tools::call_id(p.choice_key(index))
    }

    fn finish(&self, reason: Option<FinishReason>) -> Value {
        match self.x.tool.as_ref().and_then(|c| c.finish_reason(reason)) {
            Some(f) => f.into(),
            None => finish_str(reason),
        }
    }

    /// Completions logprobs of `ids` (output positions from `from`), after the prompt's when
    /// echoing.
    fn completion_logprobs(
        &self,
        i: usize,
        shape: &mut CompletionShape,
        echo: bool,
        from: usize,
        ids: &[u32],
        k: usize,
    ) -> Value {
        let (p, index) = self.prompt_of(i);
        if echo {
            for (j, &id) in p.ids.iter().enumerate() {
                let entries = (j > 0).then(|| self.lp.prompt(p.fingerprint, &p.ids, j, k));
                shape.push(&self.lp, id, entries.as_deref(), k);
            }
        }
        for (j, &id) in ids.iter().enumerate() {
            let e = self.lp.sampled(p.fingerprint, index, from + j, id, k);
            shape.push(&self.lp, id, Some(&e), k);
        }
        shape.take()
    }

    fn chat_logprobs(&self, i: usize, from: usize, ids: &[u32], k: usize) -> Value {
        let (p, index) = self.prompt_of(i);
        let content: Vec<Value> = ids
            .iter()
            .enumerate()
            .map(|(j, &id)| {
                let e = self.lp.sampled(p.fingerprint, index, from + j, id, k);
                self.lp.chat_entry(&e, k)
            })
            .collect();
        json!({ "content": content })
    }

    /// `prompt_logprobs` of prompt `p`, or `null`.
    pub fn prompt_logprobs(&self, p: usize) -> Value {
        match self.x.prompt_logprobs {
            Some(k) => {
                let c = &self.prompts[p];
                self.lp.prompt_list(c.fingerprint, &c.ids, k)
            }
            None => Value::Null,
        }
    }

    /// A finished choice of a non-streaming answer.
    pub fn full_choice(
        &self,
        i: usize,
        ids: &[u32],
        text: &str,
        finish: Option<FinishReason>,
        stop_reason: &Option<Value>,
    ) -> Value {
        let (p, _) = self.prompt_of(i);
        match self.kind {
            Kind::Completion => {
                let text = if self.x.echo {
                    format!("{}{text}", p.text)
                } else {
                    text.to_string()
                };
                let logprobs = self.x.logprobs.map_or(Value::Null, |k| {
                    self.completion_logprobs(
                        i,
                        &mut CompletionShape::default(),
                        self.x.echo,
                        0,
                        ids,
                        k,
                    )
                });
                json!({
                    "index": i, "text": text, "logprobs": logprobs,
                    "finish_reason": self.finish(finish), "stop_reason": stop_reason,
                    "prompt_logprobs": self.prompt_logprobs(i / self.n),
                })
            }
            Kind::Chat => {
                let message = match &self.x.tool {
                    Some(call) => call.message(&self.tool_id(i), text),
                    None => json!({"role": "assistant", "content": text, "refusal": null,
                                   "annotations": null, "audio": null, "function_call": null,
                                   "tool_calls": [], "reasoning_content": null}),
                };
                let logprobs = self
                    .x
                    .logprobs
                    .map_or(Value::Null, |k| self.chat_logprobs(i, 0, ids, k));
                json!({
                    "index": i, "message": message, "logprobs": logprobs,
                    "finish_reason": self.finish(finish), "stop_reason": stop_reason,
                })
            }
        }
    }

    /// A streamed chunk's choice: `text` and the tokens noted since the last one.
    pub fn stream_choice(
        &self,
        st: &mut ChoiceState,
        i: usize,
        text: &str,
        finish: Option<&Finish>,
    ) -> Value {
        let ids = std::mem::take(&mut st.pending);
        let from = st.position;
        st.position += ids.len();
        let first = !std::mem::replace(&mut st.started, true);
        let (fr, sr) = match finish {
            Some(f) => (
                self.finish(Some(f.reason)),
                f.stop_reason.clone().unwrap_or(Value::Null),
            ),
            None => (Value::Null, Value::Null),
        };
        match self.kind {
            Kind::Completion => {
                let echo = self.x.echo && first;
                let text = if echo {
                    format!("{}{text}", self.prompt_of(i).0.text)
                } else {
                    text.to_string()
                };
                let logprobs = self.x.logprobs.map_or(Value::Null, |k| {
                    self.completion_logprobs(i, &mut st.shape, echo, from, &ids, k)
                });
                json!({"index": i, "text": text, "logprobs": logprobs, "finish_reason": fr, "stop_reason": sr})
            }
            Kind::Chat => {
                let delta = match &self.x.tool {
                    Some(call) => call.delta(&self.tool_id(i), first, text),
                    None => json!({ "content": text }),
                };
                let logprobs = self
                    .x
                    .logprobs
                    .map_or(Value::Null, |k| self.chat_logprobs(i, from, &ids, k));
                let mut c =
                    json!({"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": fr});
                if finish.is_some() {
                    c["stop_reason"] = sr;
                }
                c
            }
        }
    }
}

#[cfg(test)]
#[path = "fields_tests.rs"]
mod tests;
