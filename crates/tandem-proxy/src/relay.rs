//! Relaying the decode engine's response to the client: SSE events one by one (so each content
//! chunk is timed as it is handed over), with the usage rewritten to carry the prefill side's
//! cached-token count.

use std::borrow::Cow;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::Value;

/// One SSE event from the engine, classified.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A chunk carrying generated text.
    Content(Bytes),
    /// Any other chunk (the chat role chunk, a finish chunk, the usage chunk).
    Other(Bytes),
    /// vLLM's in-stream error event.
    Error(Bytes),
    /// `data: [DONE]`.
    Done(Bytes),
}

impl Event {
    pub fn bytes(&self) -> &Bytes {
        match self {
            Event::Content(b) | Event::Other(b) | Event::Error(b) | Event::Done(b) => b,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("the decode engine sent nothing for {0:?}")]
    Idle(Duration),
    #[error("the decode stream broke: {0}")]
    Broken(String),
    #[error("the decode stream ended without [DONE]")]
    Truncated,
}

#[derive(Deserialize)]
struct ChunkLite<'a> {
    #[serde(default, borrow)]
    choices: Vec<ChoiceLite<'a>>,
}

#[derive(Deserialize)]
struct ChoiceLite<'a> {
    #[serde(default, borrow)]
    text: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    delta: Option<DeltaLite<'a>>,
}

#[derive(Deserialize)]
struct DeltaLite<'a> {
    #[serde(default, borrow)]
    content: Option<Cow<'a, str>>,
    /// A tool call's head or argument fragment is generated output too (its tokens are the
    /// completion's), so it counts as content for the first-token time.
    #[serde(default)]
    tool_calls: Option<Vec<serde::de::IgnoredAny>>,
}

/// Reads SSE events off an engine response body.
#[derive(Debug)]
pub struct EventReader {
    body: Incoming,
    buf: BytesMut,
    /// Replace `usage.prompt_tokens_details.cached_tokens` with this (the prefill side's count).
    cached_override: Option<u64>,
    done: bool,
}

impl EventReader {
    pub fn new(body: Incoming, cached_override: Option<u64>) -> Self {
        EventReader {
            body,
            buf: BytesMut::new(),
            cached_override,
            done: false,
        }
    }

    /// An event already complete in the buffer, without waiting (to coalesce a burst into
    /// one write).
    pub fn buffered(&mut self) -> Option<Event> {
        let pos = memchr::memmem::find(&self.buf, b"\n\n")?;
        let raw = self.buf.split_to(pos + 2).freeze();
        let ev = classify(raw, self.cached_override);
        if matches!(ev, Event::Done(_)) {
            self.done = true;
        }
        Some(ev)
    }

    /// The next event, waiting at most `wait` for more bytes. `Ok(None)` after `[DONE]`.
    pub async fn next(&mut self, wait: Duration) -> Result<Option<Event>, RelayError> {
        loop {
            if let Some(ev) = self.buffered() {
                return Ok(Some(ev));
            }
            if self.done {
                return Ok(None);
            }
            let frame = match tokio::time::timeout(wait, self.body.frame()).await {
                Err(_) => return Err(RelayError::Idle(wait)),
                Ok(None) => {
                    return if self.buf.iter().all(u8::is_ascii_whitespace) {
                        Err(RelayError::Truncated)
                    } else {
                        // A last event without its blank line: deliver it as is.
                        let raw = self.buf.split().freeze();
                        Ok(Some(classify(raw, self.cached_override)))
                    };
                }
                Ok(Some(Err(e))) => return Err(RelayError::Broken(e.to_string())),
                Ok(Some(Ok(f))) => f,
            };
            if let Ok(data) = frame.into_data() {
                self.buf.extend_from_slice(&data);
            }
        }
    }

    pub fn finished(&self) -> bool {
        self.done
    }
}

fn classify(raw: Bytes, cached_override: Option<u64>) -> Event {
    let text = raw.strip_prefix(b"data: ").unwrap_or(&raw);
    let payload = trim_ascii(text);
    if payload == b"[DONE]" {
        return Event::Done(raw);
    }
    if payload.starts_with(b"{\"error\"") {
        return Event::Error(raw);
    }
    // Most events are token chunks without usage: decide those with byte scans and leave the
    // JSON parse to the rare usage chunk (and to chunks whose text the scan cannot judge).
    let usage = memchr::memmem::find(payload, b"\"usage\":")
        .is_some_and(|i| !payload[i + 8..].starts_with(b"null"));
    let content = match quick_content(payload) {
        Some(c) if !usage => c,
        _ => {
            let Ok(chunk) = serde_json::from_slice::<ChunkLite>(payload) else {
                return Event::Other(raw);
            };
            chunk.choices.iter().any(|c| {
                c.text.as_deref().is_some_and(|t| !t.is_empty())
                    || c.delta.as_ref().is_some_and(|d| {
                        d.content.as_deref().is_some_and(|t| !t.is_empty())
                            || d.tool_calls.as_ref().is_some_and(|t| !t.is_empty())
                    })
            })
        }
    };
    let raw = match (usage, cached_override) {
        (true, Some(cached)) => rewrite_event(payload, cached).unwrap_or(raw),
        _ => raw,
    };
    if content {
        Event::Content(raw)
    } else {
        Event::Other(raw)
    }
}

/// Whether a single-choice chunk carries text, judged from its bytes: `"text":"` or
/// `"content":"` followed by anything but the closing quote. `None` when the scan cannot tell
/// (several choices, or neither key), and the caller parses.
fn quick_content(payload: &[u8]) -> Option<bool> {
    // A tool-call delta has no `"content"` but is content (and its `"index"`es are not
    // choices'); a chat chunk's logprobs hold `"content":[` after the delta: let the parse judge.
    if memchr::memmem::find_iter(payload, b"\"index\":").count() > 1
        || memchr::memmem::find(payload, b"\"tool_calls\":[{").is_some()
    {
        return None;
    }
    for key in [&b"\"text\":"[..], b"\"content\":"] {
        if let Some(i) = memchr::memmem::find(payload, key) {
            let rest = &payload[i + key.len()..];
            return Some(rest.starts_with(b"\"") && !rest.starts_with(b"\"\""));
        }
    }
    None
}

fn trim_ascii(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &b[start..end]
}

fn rewrite_event(payload: &[u8], cached: u64) -> Option<Bytes> {
    let mut v: Value = serde_json::from_slice(payload).ok()?;
    set_cached(&mut v, cached);
    Some(Bytes::from(format!("data: {v}\n\n")))
}

/// Put the prefill side's `cached_tokens` into a response's usage (the decode engine counts the
/// pulled KV as its own, which is not what the client's tokens cost).
pub fn set_cached(v: &mut Value, cached: u64) {
    let Some(usage) = v.get_mut("usage").and_then(Value::as_object_mut) else {
        return;
    };
    match usage.get_mut("prompt_tokens_details") {
        Some(Value::Object(d)) => {
            d.insert("cached_tokens".into(), cached.into());
        }
        _ => {
            usage.insert(
                "prompt_tokens_details".into(),
                serde_json::json!({ "cached_tokens": cached }),
            );
        }
    }
}

#[derive(Deserialize)]
struct WithUsage {
    #[serde(default)]
    usage: Option<UsageLite>,
}

#[derive(Deserialize)]
struct UsageLite {
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
}

/// `(prompt_tokens, completion_tokens)` from an SSE event or a whole response body that carries
/// usage; `None` for anything else (judged by a byte scan first: most events have none).
pub fn usage_of(bytes: &[u8]) -> Option<(u64, u64)> {
    memchr::memmem::find(bytes, b"\"completion_tokens\"")?;
    let payload = trim_ascii(bytes.strip_prefix(b"data: ").unwrap_or(bytes));
    let u = serde_json::from_slice::<WithUsage>(payload).ok()?.usage?;
    Some((u.prompt_tokens, u.completion_tokens))
}

/// Rewrite a whole non-streaming response body's usage.
pub fn rewrite_body(body: &[u8], cached: u64) -> Option<Bytes> {
    let mut v: Value = serde_json::from_slice(body).ok()?;
    set_cached(&mut v, cached);
    Some(Bytes::from(serde_json::to_vec(&v).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_events_and_rewrites_usage() {
        let c = classify(
            Bytes::from_static(
                b"data: {\"choices\":[{\"index\":0,\"text\":\" hi\"}],\"usage\":null}\n\n",
            ),
            Some(7),
        );
        assert!(matches!(c, Event::Content(_)));
        assert!(c.bytes().ends_with(b"\"usage\":null}\n\n"), "untouched");
        let role = classify(
            Bytes::from_static(
                b"data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n",
            ),
            None,
        );
        assert!(matches!(role, Event::Other(_)));
        let chat = classify(
            Bytes::from_static(b"data: {\"choices\":[{\"delta\":{\"content\":\"x\\n\"}}]}\n\n"),
            None,
        );
        assert!(matches!(chat, Event::Content(_)));
        let usage = classify(
            Bytes::from_static(b"data: {\"id\":\"a\",\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"total_tokens\":7,\"completion_tokens\":2,\"prompt_tokens_details\":{\"cached_tokens\":4}}}\n\n"),
            Some(3),
        );
        assert_eq!(
            usage.bytes().as_ref(),
            b"data: {\"id\":\"a\",\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"total_tokens\":7,\"completion_tokens\":2,\"prompt_tokens_details\":{\"cached_tokens\":3}}}\n\n"
        );
        assert!(matches!(
            classify(Bytes::from_static(b"data: [DONE]\n\n"), None),
            Event::Done(_)
        ));
        assert!(matches!(
            classify(
                Bytes::from_static(b"data: {\"error\":{\"message\":\"x\",\"code\":500}}\n\n"),
                None
            ),
            Event::Error(_)
        ));
    }

    #[test]
    fn quick_scan_agrees_with_the_parse() {
        for (payload, want) in [
            (&b"{\"choices\":[{\"index\":0,\"text\":\"a\"}]}"[..], true),
            (b"{\"choices\":[{\"index\":0,\"text\":\"\"}]}", false),
            (b"{\"choices\":[{\"index\":0,\"delta\":{\"content\":\"\\\"\"}}]}", true),
            (b"{\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}", false),
            (b"{\"choices\":[{\"index\":0,\"delta\":{\"content\":null}}]}", false),
            (b"{\"choices\":[{\"index\":0,\"text\":\"\"},{\"index\":1,\"text\":\"b\"}]}", true),
            // A tool-call delta (head, then argument fragments) is generated output.
            (b"{\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"id\":\"chatcmpl-tool-1\",\"type\":\"function\",\"function\":{\"name\":\"f\",\"arguments\":\"\"}}]},\"logprobs\":null,\"finish_reason\":null}]}", true),
            (b"{\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"function\":{\"arguments\":\"{\\\"\"}}]}}]}", true),
            // Logprobs after the text do not confuse the scan.
            (b"{\"choices\":[{\"index\":0,\"delta\":{\"content\":\"\"},\"logprobs\":{\"content\":[{\"token\":\"\",\"logprob\":-1.0}]}}]}", false),
            (b"{\"choices\":[{\"index\":0,\"text\":\" a\",\"logprobs\":{\"text_offset\":[0],\"tokens\":[\" a\"],\"top_logprobs\":[{\"text\":-1.0}]}}]}", true),
        ] {
            let ev = classify(Bytes::from([b"data: ", payload, b"\n\n"].concat()), None);
            assert_eq!(matches!(ev, Event::Content(_)), want, "{}", String::from_utf8_lossy(payload));
        }
    }

    #[test]
    fn usage_is_read_from_events_and_bodies_that_carry_it() {
        assert_eq!(
            usage_of(b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"total_tokens\":7,\"completion_tokens\":2}}\n\n"),
            Some((5, 2))
        );
        assert_eq!(
            usage_of(br#"{"id":"x","choices":[{"text":"completion_tokens"}],"usage":{"prompt_tokens":3,"completion_tokens":9}}"#),
            Some((3, 9))
        );
        assert_eq!(
            usage_of(b"data: {\"choices\":[{\"text\":\"a\"}],\"usage\":null}\n\n"),
            None
        );
        assert_eq!(usage_of(b"data: [DONE]\n\n"), None);
    }

    #[test]
    fn body_rewrite_adds_details_when_absent() {
        let b = rewrite_body(
            br#"{"id":"x","usage":{"prompt_tokens":3,"prompt_tokens_details":null}}"#,
            2,
        )
        .unwrap();
        assert_eq!(
            b.as_ref(),
            br#"{"id":"x","usage":{"prompt_tokens":3,"prompt_tokens_details":{"cached_tokens":2}}}"#
        );
    }
}
