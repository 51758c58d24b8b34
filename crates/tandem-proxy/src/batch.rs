//! A `/v1/completions` request with a list of prompts, disaggregated.
//!
//! vLLM's KV handoff is one `kv_transfer_params` per request, and vLLM's serving layer gives
//! every prompt of a list the same sampling parameters, so a batch sent to one decode engine with
//! one set of params would have every prompt read the first prompt's blocks. Tandem therefore
//! splits the list: each prompt is a request of its own (its own prefill leg, handoff and decode
//! leg, run in parallel, each recorded as `<request id>-<i>` as vLLM numbers a batch's engine
//! requests), and the answers are merged into the one response vLLM would give for the list:
//! choice `j` of prompt `i` is index `i * n + j`, usage is summed, one id for the whole answer.
//!
//! The response starts once every prompt's decode leg has its first event (a prompt that fails
//! before that fails the whole request, as vLLM answers a batch with one error, and its siblings
//! are cancelled, which releases their KV). A stream then interleaves the prompts' chunks as they
//! arrive; an error on one after the first byte ends the merged stream with that error.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use serde_json::{Map, Value};

use crate::error::ProxyError;
use crate::front::{self, Kind, Parsed};
use crate::pd::{self, Done};
use crate::timing::Finisher;
use crate::State;

/// One prompt of the list, parsed as a request of its own.
pub(crate) struct Part {
    pub parsed: Parsed,
    pub fin: Finisher,
}

/// Run every part, then answer with the merged response.
pub(crate) async fn run(
    st: &Arc<State>,
    request_id: &str,
    stream: bool,
    who: &crate::admission::Who,
    mut parts: Vec<Part>,
) -> Response {
    let runs = parts.iter_mut().map(|p| async {
        pd::run(st, &p.parsed, who, &mut p.fin)
            .await
            .map_err(|e| (e, &mut p.fin))
    });
    let dones = match futures::future::try_join_all(runs).await {
        Ok(d) => d,
        Err((e, fin)) => {
            fin.finish(e.outcome());
            tracing::warn!(request_id, error = %e, "a prompt of the list failed");
            // The siblings' futures are gone, and with them their legs and handoffs.
            for p in &mut parts {
                p.fin.finish("batch_cancelled");
            }
            return e.into_response();
        }
    };
    let n = parts.first().map_or(1, |p| p.parsed.n.max(1));
    let id = format!("cmpl-{request_id}");
    if !stream {
        let mut bodies = Vec::with_capacity(dones.len());
        for d in dones {
            match d {
                Done::Full(r) => match axum::body::to_bytes(r.into_body(), usize::MAX).await {
                    Ok(b) => bodies.push(b),
                    Err(_) => return ProxyError::Internal.into_response(),
                },
                // A non-streaming request never streams.
                Done::Stream(_) => return ProxyError::Internal.into_response(),
            }
        }
        return match merge_full(&id, n, &bodies) {
            Some(b) => {
                let mut r = (StatusCode::OK, b).into_response();
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                r
            }
            None => ProxyError::Internal.into_response(),
        };
    }
    let mut subs = Vec::with_capacity(dones.len());
    for (i, (d, p)) in dones.into_iter().zip(parts).enumerate() {
        let body = match d {
            Done::Stream(s) => pd::stream_response(st, s, p.fin).into_body(),
            // A streaming request's decode leg always streams.
            Done::Full(_) => return ProxyError::Internal.into_response(),
        };
        subs.push(body.into_data_stream().map(move |b| (i, b)).boxed());
    }
    let mut merged = futures::stream::select_all(subs);
    let mut m = StreamMerge::new(id, n, merged.len());
    let body = async_stream::stream! {
        while let Some((i, chunk)) = merged.next().await {
            let Ok(chunk) = chunk else { break };
            let (out, end) = m.feed(i, &chunk);
            if !out.is_empty() {
                yield Ok::<Bytes, std::io::Error>(out);
            }
            if end {
                return;
            }
        }
        yield Ok(m.finish());
    };
    let mut r = Response::new(Body::from_stream(body));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    r
}

/// The client's body once per prompt of its list, each with `prompt` set to that one prompt.
/// `None` when the body's prompt is not a list of several prompts.
pub(crate) fn split(raw: &[u8]) -> Option<Vec<Bytes>> {
    let Ok(Value::Object(body)) = serde_json::from_slice::<Value>(raw) else {
        return None;
    };
    let Some(Value::Array(items)) = body.get("prompt") else {
        return None;
    };
    Some(
        items
            .iter()
            .map(|item| {
                let mut one: Map<String, Value> = body.clone();
                one.insert("prompt".into(), item.clone());
                Bytes::from(serde_json::to_vec(&one).expect("a JSON map serialises"))
            })
            .collect(),
    )
}

/// Parse each prompt's body as its own request.
pub(crate) fn parse_parts(
    st: &State,
    bodies: &[Bytes],
    session: Option<&[u8]>,
) -> Result<Vec<Parsed>, ProxyError> {
    bodies
        .iter()
        .map(|b| front::parse(Kind::Completions, b, &st.tokenizer, &st.cfg.limits, session))
        .collect()
}

fn add_usage(total: &mut Usage, u: &Value) {
    total.prompt += u["prompt_tokens"].as_u64().unwrap_or(0);
    total.completion += u["completion_tokens"].as_u64().unwrap_or(0);
    if let Some(c) = u["prompt_tokens_details"]["cached_tokens"].as_u64() {
        *total.cached.get_or_insert(0) += c;
    }
    total.seen = true;
}

#[derive(Debug, Default)]
struct Usage {
    prompt: u64,
    completion: u64,
    cached: Option<u64>,
    seen: bool,
}

impl Usage {
    fn to_json(&self) -> Value {
        let mut u = serde_json::json!({
            "prompt_tokens": self.prompt,
            "total_tokens": self.prompt + self.completion,
            "completion_tokens": self.completion,
        });
        if let Some(c) = self.cached {
            u["prompt_tokens_details"] = serde_json::json!({ "cached_tokens": c });
        }
        u
    }
}

/// Shift every choice of prompt `i` to its place in the list's numbering.
fn reindex(v: &mut Value, i: usize, n: u64) {
    if let Some(choices) = v.get_mut("choices").and_then(Value::as_array_mut) {
        for c in choices {
            let j = c["index"].as_u64().unwrap_or(0);
            c["index"] = Value::from(i as u64 * n + j);
        }
    }
}

/// The non-streaming answers, one per prompt, as vLLM's one answer for the list.
fn merge_full(id: &str, n: u64, bodies: &[Bytes]) -> Option<Bytes> {
    let mut out: Option<Value> = None;
    let mut choices = Vec::new();
    let mut usage = Usage::default();
    for (i, b) in bodies.iter().enumerate() {
        let mut v: Value = serde_json::from_slice(b).ok()?;
        reindex(&mut v, i, n);
        if let Some(Value::Array(c)) = v.get_mut("choices").map(Value::take) {
            choices.extend(c);
        }
        if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
            add_usage(&mut usage, u);
        }
        out.get_or_insert(v);
    }
    let mut v = out?;
    v["id"] = Value::from(id);
    v["choices"] = Value::Array(choices);
    if usage.seen {
        v["usage"] = usage.to_json();
    }
    Some(Bytes::from(serde_json::to_vec(&v).ok()?))
}

/// Interleaves the prompts' SSE streams into one: chunks re-indexed and re-labelled with the
/// list's id, each prompt's own usage chunk and `[DONE]` held back, one summed usage chunk and
/// one `[DONE]` at the end.
#[derive(Debug)]
struct StreamMerge {
    id: String,
    n: u64,
    bufs: Vec<BytesMut>,
    usage: Usage,
    /// The fields a closing usage chunk repeats (`object`, `created`, `model`), from the first
    /// chunk seen.
    head: Option<Value>,
}

impl StreamMerge {
    fn new(id: String, n: u64, parts: usize) -> Self {
        StreamMerge {
            id,
            n,
            bufs: (0..parts).map(|_| BytesMut::new()).collect(),
            usage: Usage::default(),
            head: None,
        }
    }

    /// Bytes from prompt `i`'s stream: what to send now, and whether the merged stream ends
    /// here (an error event).
    fn feed(&mut self, i: usize, chunk: &[u8]) -> (Bytes, bool) {
        let mut out = BytesMut::new();
        self.bufs[i].extend_from_slice(chunk);
        while let Some(pos) = memchr::memmem::find(&self.bufs[i], b"\n\n") {
            let ev = self.bufs[i].split_to(pos + 2);
            let Some(data) = data_of(&ev) else { continue };
            if data == b"[DONE]" {
                continue;
            }
            let Ok(mut v) = serde_json::from_slice::<Value>(data) else {
                out.extend_from_slice(&ev);
                continue;
            };
            if v.get("error").is_some() {
                out.extend_from_slice(&ev);
                out.extend_from_slice(b"data: [DONE]\n\n");
                return (out.freeze(), true);
            }
            let no_choices = v["choices"].as_array().is_some_and(Vec::is_empty);
            if let Some(u) = v.get("usage").filter(|u| u.is_object()) {
                if no_choices {
                    add_usage(&mut self.usage, u);
                    continue;
                }
            }
            if self.head.is_none() {
                self.head = Some(serde_json::json!({
                    "object": v["object"], "created": v["created"], "model": v["model"],
                }));
            }
            reindex(&mut v, i, self.n);
            v["id"] = Value::from(self.id.as_str());
            out.extend_from_slice(b"data: ");
            out.extend_from_slice(&serde_json::to_vec(&v).expect("a JSON value serialises"));
            out.extend_from_slice(b"\n\n");
        }
        (out.freeze(), false)
    }

    /// The closing usage chunk (when the prompts sent theirs) and `[DONE]`.
    fn finish(&self) -> Bytes {
        let mut out = BytesMut::new();
        if self.usage.seen {
            let head = self.head.clone().unwrap_or(Value::Null);
            let v = serde_json::json!({
                "id": self.id,
                "object": head["object"],
                "created": head["created"],
                "model": head["model"],
                "choices": [],
                "usage": self.usage.to_json(),
            });
            out.extend_from_slice(b"data: ");
            out.extend_from_slice(&serde_json::to_vec(&v).expect("a JSON value serialises"));
            out.extend_from_slice(b"\n\n");
        }
        out.extend_from_slice(b"data: [DONE]\n\n");
        out.freeze()
    }
}

/// The `data:` payload of one SSE event (its first data line), trimmed.
fn data_of(ev: &[u8]) -> Option<&[u8]> {
    ev.split(|&b| b == b'\n')
        .find_map(|l| l.strip_prefix(b"data:"))
        .map(|d| d.trim_ascii())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ev(v: Value) -> Vec<u8> {
        format!("data: {v}\n\n").into_bytes()
    }

    fn events(b: &[u8]) -> Vec<Value> {
        b.split(|&c| c == b'\n')
            .filter_map(|l| l.strip_prefix(b"data: "))
            .map(|d| serde_json::from_slice(d).unwrap_or(Value::String("DONE".into())))
            .collect()
    }

    #[test]
    fn split_gives_one_body_per_prompt_and_none_for_one_prompt() {
        let parts = split(br#"{"model":"m","prompt":["a",[1,2]],"max_tokens":3}"#).unwrap();
        assert_eq!(parts.len(), 2);
        let one: Value = serde_json::from_slice(&parts[1]).unwrap();
        assert_eq!(one, json!({"model":"m","prompt":[1,2],"max_tokens":3}));
        assert!(split(br#"{"prompt":"a"}"#).is_none());
    }

    #[test]
    fn full_answers_are_numbered_prompt_major_and_usage_summed() {
        let a = json!({"id":"cmpl-a","object":"text_completion","created":1,"model":"m",
            "choices":[{"index":0,"text":"x"},{"index":1,"text":"y"}],
            "usage":{"prompt_tokens":3,"total_tokens":5,"completion_tokens":2,"prompt_tokens_details":{"cached_tokens":1}}});
        let b = json!({"id":"cmpl-b","object":"text_completion","created":2,"model":"m",
            "choices":[{"index":0,"text":"z"},{"index":1,"text":"w"}],
            "usage":{"prompt_tokens":4,"total_tokens":7,"completion_tokens":3,"prompt_tokens_details":{"cached_tokens":2}}});
        let bodies = [Bytes::from(a.to_string()), Bytes::from(b.to_string())];
        let v: Value = serde_json::from_slice(&merge_full("cmpl-x", 2, &bodies).unwrap()).unwrap();
        assert_eq!(v["id"], "cmpl-x");
        assert_eq!(v["created"], 1);
        let idx: Vec<(u64, &str)> = v["choices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| (c["index"].as_u64().unwrap(), c["text"].as_str().unwrap()))
            .collect();
        assert_eq!(idx, vec![(0, "x"), (1, "y"), (2, "z"), (3, "w")]);
        assert_eq!(
            v["usage"],
            json!({"prompt_tokens":7,"total_tokens":12,"completion_tokens":5,"prompt_tokens_details":{"cached_tokens":3}})
        );
    }

    #[test]
    fn streams_interleave_with_one_usage_chunk_and_one_done() {
        let mut m = StreamMerge::new("cmpl-x".into(), 1, 2);
        let c0 = json!({"id":"a","object":"text_completion","created":9,"model":"m","choices":[{"index":0,"text":"p"}]});
        let c1 = json!({"id":"b","object":"text_completion","created":9,"model":"m","choices":[{"index":0,"text":"q"}]});
        let u0 = json!({"id":"a","object":"text_completion","created":9,"model":"m","choices":[],"usage":{"prompt_tokens":2,"completion_tokens":1,"total_tokens":3}});
        let u1 = json!({"id":"b","object":"text_completion","created":9,"model":"m","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":1,"total_tokens":6}});
        // An event split across two reads of prompt 1's stream.
        let e1 = ev(c1);
        let (out, end) = m.feed(1, &e1[..7]);
        assert!(out.is_empty() && !end);
        let (out, _) = m.feed(1, &e1[7..]);
        let got = events(&out);
        assert_eq!(
            (
                got[0]["id"].as_str(),
                got[0]["choices"][0]["index"].as_u64()
            ),
            (Some("cmpl-x"), Some(1))
        );
        let mut both = ev(c0);
        both.extend(ev(u0));
        both.extend(b"data: [DONE]\n\n");
        let (out, _) = m.feed(0, &both);
        let got = events(&out);
        assert_eq!(got.len(), 1, "prompt 0's usage and [DONE] are held back");
        assert_eq!(got[0]["choices"][0]["index"], 0);
        let mut tail = ev(u1);
        tail.extend(b"data: [DONE]\n\n");
        assert!(m.feed(1, &tail).0.is_empty());
        let end = events(&m.finish());
        assert_eq!(end.len(), 2);
        assert_eq!(
            end[0]["usage"],
            json!({"prompt_tokens":7,"total_tokens":9,"completion_tokens":2})
        );
        assert_eq!(end[0]["created"], 9);
        assert_eq!(end[1], "DONE");
    }

    #[test]
    fn an_error_ends_the_merged_stream() {
        let mut m = StreamMerge::new("cmpl-x".into(), 1, 2);
        let (out, end) = m.feed(
            0,
            b"data: {\"error\":{\"message\":\"boom\"}}\n\ndata: [DONE]\n\n",
        );
        assert!(end);
        let s = String::from_utf8(out.to_vec()).unwrap();
        assert!(s.contains("boom") && s.ends_with("data: [DONE]\n\n"));
    }
}
