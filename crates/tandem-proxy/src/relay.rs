//! Relaying the decode engine's response to the client: SSE events as `Bytes` slices of what
//! the engine's socket delivered (each content chunk timed as it is handed over, every event
//! one read brought in relayed in one client write), with the usage rewritten to carry the
//! prefill side's cached-token count.

use std::borrow::Cow;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use serde_json::Value;

use crate::upstream::{Conn, Step};

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

    pub fn into_bytes(self) -> Bytes {
        match self {
            Event::Content(b) | Event::Other(b) | Event::Error(b) | Event::Done(b) => b,
        }
    }
}

/// The events that arrived together, for one client write.
#[derive(Debug, Default)]
pub struct Burst {
    /// Their bytes: slices of the engine's reads, one per run of events that needed no rewrite.
    pub parts: Vec<Bytes>,
    /// Content events among them (each is a token for ITL).
    pub content: u32,
    pub error: bool,
    pub done: bool,
    /// The last usage seen, when asked for (a token budget settles on it).
    pub usage: Option<(u64, u64)>,
}

impl Burst {
    /// Ready for the next burst, keeping the parts' room (one burst per write to the client).
    pub fn clear(&mut self) {
        self.parts.clear();
        self.content = 0;
        self.error = false;
        self.done = false;
        self.usage = None;
    }

    /// Count `ev` (its bytes are added by the caller).
    pub fn count(&mut self, ev: &Event, want_usage: bool) {
        let kind = match ev {
            Event::Content(_) => Kind::Content,
            Event::Error(_) => Kind::Error,
            Event::Done(_) => Kind::Done,
            Event::Other(_) => Kind::Other,
        };
        self.tally(kind, ev.bytes(), want_usage);
    }

    /// Count an event of `kind` whose bytes (as the client gets them) are `bytes`.
    fn tally(&mut self, kind: Kind, bytes: &[u8], want_usage: bool) {
        match kind {
            Kind::Content => self.content += 1,
            Kind::Error => self.error = true,
            Kind::Done => self.done = true,
            Kind::Other => {}
        }
        if want_usage {
            if let Some(u) = usage_of(bytes) {
                self.usage = Some(u);
            }
        }
    }

    /// The engine frames each event as an HTTP chunk (or gRPC message) of its own, so a burst
    /// is several slices; joined, it goes to the client as one chunk (one copy per write, not
    /// per event), as a relay reading raw bytes would send it.
    pub fn join(&mut self) {
        if self.parts.len() > 1 {
            let total = self.parts.iter().map(Bytes::len).sum();
            let mut joined = BytesMut::with_capacity(total);
            for p in self.parts.drain(..) {
                joined.extend_from_slice(&p);
            }
            self.parts.push(joined.freeze());
        }
    }

    /// Count `ev` and add its bytes as a part of their own.
    pub fn push(&mut self, ev: Event, want_usage: bool) {
        self.count(&ev, want_usage);
        self.parts.push(ev.into_bytes());
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
    conn: Conn,
    /// Whole events not yet handed out: a slice of one piece of body, no copy.
    ready: Bytes,
    /// The start of an event whose end has not arrived (the only bytes ever copied).
    partial: BytesMut,
    /// Replace `usage.prompt_tokens_details.cached_tokens` with this (the prefill side's count).
    cached_override: Option<u64>,
    done: bool,
    /// The idle deadline, armed once per stream and moved on only when it fires, instead of a
    /// timer registered and cancelled around every read (timer-wheel work was about 1 % of
    /// the proxy's CPU in a `perf` profile of `bench relay`). It counts from the last piece
    /// that arrived: bytes that came while the relay waited on the client are read first.
    idle: Option<Idle>,
}

#[derive(Debug)]
struct Idle {
    wait: Duration,
    /// When the last piece of body arrived.
    last: tokio::time::Instant,
    sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl EventReader {
    /// Events of the body of the response whose head `conn` has just read.
    pub fn new(conn: Conn, cached_override: Option<u64>) -> Self {
        EventReader {
            conn,
            ready: Bytes::new(),
            partial: BytesMut::new(),
            cached_override,
            done: false,
            idle: None,
        }
    }

    /// An event already complete in what was read, without waiting (to coalesce a burst into
    /// one write).
    pub fn buffered(&mut self) -> Option<Event> {
        loop {
            if let Some(ev) = self.take_ready() {
                return Some(ev);
            }
            if self.done {
                return None;
            }
            // A broken body is reported by the next `next`.
            match self.conn.buffered() {
                Ok(Step::Data(d)) => self.absorb(d),
                _ => return None,
            }
        }
    }

    fn take_ready(&mut self) -> Option<Event> {
        let pos = find_blank(&self.ready)?;
        let raw = self.ready.split_to(pos + 2);
        let ev = classify(raw, self.cached_override);
        if matches!(ev, Event::Done(_)) {
            self.done = true;
        }
        Some(ev)
    }

    /// Take in one piece of body: its whole events become `ready` as they are; a trailing
    /// part of an event waits in `partial` for the rest.
    fn absorb(&mut self, d: Bytes) {
        debug_assert!(self.ready.is_empty());
        if self.partial.is_empty() {
            match rfind_blank(&d) {
                Some(end) if end + 2 == d.len() => self.ready = d,
                Some(end) => {
                    self.ready = d.slice(..end + 2);
                    self.partial.extend_from_slice(&d[end + 2..]);
                }
                None => self.partial.extend_from_slice(&d),
            }
            return;
        }
        // The blank line may straddle the two pieces, so look from just before the join.
        let from = self.partial.len().saturating_sub(1);
        self.partial.extend_from_slice(&d);
        if let Some(end) = rfind_blank(&self.partial[from..]) {
            self.ready = self.partial.split_to(from + end + 2).freeze();
        }
    }

    /// Every whole event already read into `burst`, without waiting: runs of events that need
    /// no rewrite stay one slice of the engine's read each.
    pub fn drain(&mut self, burst: &mut Burst, want_usage: bool) {
        loop {
            let ready = std::mem::take(&mut self.ready);
            let (mut run, mut pos) = (0, 0);
            while let Some(i) = find_blank(&ready[pos..]) {
                let end = pos + i + 2;
                let (kind, rewritten) = judge(&ready[pos..end], self.cached_override);
                let bytes = rewritten.as_deref().unwrap_or(&ready[pos..end]);
                burst.tally(kind, bytes, want_usage);
                if let Some(new) = rewritten {
                    // The run so far, then the new bytes.
                    if pos > run {
                        burst.parts.push(ready.slice(run..pos));
                    }
                    burst.parts.push(new);
                    run = end;
                }
                pos = end;
                if burst.done {
                    self.done = true;
                    break;
                }
            }
            if pos > run {
                burst.parts.push(ready.slice(run..pos));
            }
            if self.done {
                break;
            }
            match self.conn.buffered() {
                Ok(Step::Data(d)) => self.absorb(d),
                // A broken body is reported by the next read.
                _ => break,
            }
        }
        burst.join();
    }

    /// Wait at most `wait` for at least one event, then take every one already read into
    /// `burst`. Nothing in it and `finished()`: the stream is over.
    pub async fn next_burst(
        &mut self,
        wait: Duration,
        burst: &mut Burst,
        want_usage: bool,
    ) -> Result<(), RelayError> {
        loop {
            self.drain(burst, want_usage);
            if !burst.parts.is_empty() || self.done {
                return Ok(());
            }
            if let Some(last) = self.fill(wait).await? {
                burst.push(last, want_usage);
                return Ok(());
            }
        }
    }

    /// Wait at most `wait` for the next piece of body and take it in. At the body's end, a
    /// last event without its blank line is returned as is (and the stream is done); a body
    /// that ends before `[DONE]` with nothing left is truncated.
    async fn fill(&mut self, wait: Duration) -> Result<Option<Event>, RelayError> {
        let now = tokio::time::Instant::now();
        let idle = match &mut self.idle {
            Some(i) if i.wait == wait => i,
            slot => slot.insert(Idle {
                wait,
                last: now,
                sleep: Box::pin(tokio::time::sleep_until(now + wait)),
            }),
        };
        let piece = loop {
            tokio::select! {
                biased;
                r = self.conn.data() => break r,
                () = idle.sleep.as_mut() => {
                    let due = idle.last + wait;
                    if due <= tokio::time::Instant::now() {
                        return Err(RelayError::Idle(wait));
                    }
                    idle.sleep.as_mut().reset(due);
                }
            }
        };
        idle.last = tokio::time::Instant::now();
        match piece {
            Err(e) => Err(RelayError::Broken(e.to_string())),
            Ok(Some(d)) => {
                self.absorb(d);
                Ok(None)
            }
            Ok(None) if self.partial.iter().all(u8::is_ascii_whitespace) => {
                Err(RelayError::Truncated)
            }
            Ok(None) => {
                let raw = self.partial.split().freeze();
                self.done = true;
                Ok(Some(classify(raw, self.cached_override)))
            }
        }
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
            if let Some(last) = self.fill(wait).await? {
                return Ok(Some(last));
            }
        }
    }

    pub fn finished(&self) -> bool {
        self.done
    }

    /// The connection, once the stream is over.
    pub fn into_conn(self) -> Conn {
        self.conn
    }
}

/// The blank line that ends an SSE event: its offset.
fn find_blank(b: &[u8]) -> Option<usize> {
    memchr::memchr_iter(b'\n', b).find(|&i| b.get(i + 1) == Some(&b'\n'))
}

fn rfind_blank(b: &[u8]) -> Option<usize> {
    memchr::memrchr_iter(b'\n', b)
        .find(|&i| i > 0 && b[i - 1] == b'\n')
        .map(|i| i - 1)
}

/// Where the keys the relay judges an event by sit, from one pass over its quotes. A key is a
/// quote followed by its name and `":`; inside a string every quote is escaped (`\"`), so a
/// quoted name in generated text never matches (as a substring search for `"name":` would not).
#[derive(Debug, Default)]
struct Keys {
    /// `"index":` occurrences: more than one means several choices.
    index: u32,
    tool_calls: bool,
    /// Offsets just past the first `"text":`, the first `"content":` and the first `"usage":`.
    text: Option<usize>,
    content: Option<usize>,
    usage: Option<usize>,
}

fn keys(payload: &[u8]) -> Keys {
    let mut k = Keys::default();
    for i in memchr::memchr_iter(b'"', payload) {
        let rest = &payload[i + 1..];
        let at = |name: &[u8]| rest.starts_with(name) && rest[name.len()..].starts_with(b"\":");
        match rest.first() {
            Some(b'i') if at(b"index") => k.index += 1,
            Some(b't') if k.text.is_none() && at(b"text") => k.text = Some(i + 7),
            Some(b't') if at(b"tool_calls") => {
                k.tool_calls |= rest[12..].starts_with(b"[{");
            }
            Some(b'c') if k.content.is_none() && at(b"content") => k.content = Some(i + 10),
            Some(b'u') if k.usage.is_none() && at(b"usage") => k.usage = Some(i + 8),
            _ => {}
        }
    }
    k
}

fn classify(raw: Bytes, cached_override: Option<u64>) -> Event {
    let (kind, rewritten) = judge(&raw, cached_override);
    kind.event(rewritten.unwrap_or(raw))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Content,
    Other,
    Error,
    Done,
}

impl Kind {
    fn event(self, b: Bytes) -> Event {
        match self {
            Kind::Content => Event::Content(b),
            Kind::Other => Event::Other(b),
            Kind::Error => Event::Error(b),
            Kind::Done => Event::Done(b),
        }
    }
}

/// What an event is, and its bytes rewritten when its usage must carry the prefill side's
/// cached tokens. Reads the event in place: the relay makes no handle for it unless rewritten.
fn judge(raw: &[u8], cached_override: Option<u64>) -> (Kind, Option<Bytes>) {
    let text = raw.strip_prefix(b"data: ").unwrap_or(raw);
    let payload = trim_ascii(text);
    if payload == b"[DONE]" {
        return (Kind::Done, None);
    }
    if payload.starts_with(b"{\"error\"") {
        return (Kind::Error, None);
    }
    // Most events are token chunks without usage: decide those from one scan of their keys
    // and leave the JSON parse to the rare usage chunk (and to chunks the scan cannot judge).
    let k = keys(payload);
    let usage = k.usage.is_some_and(|i| !payload[i..].starts_with(b"null"));
    let content = match quick_content(payload, &k) {
        Some(c) if !usage => c,
        _ => {
            let Ok(chunk) = serde_json::from_slice::<ChunkLite>(payload) else {
                return (Kind::Other, None);
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
    let rewritten = match (usage, cached_override) {
        (true, Some(cached)) => rewrite_event(payload, cached),
        _ => None,
    };
    let kind = if content { Kind::Content } else { Kind::Other };
    (kind, rewritten)
}

/// Whether a single-choice chunk carries text, judged from its keys: `"text":"` or
/// `"content":"` followed by anything but the closing quote. `None` when the scan cannot tell
/// (several choices, or neither key), and the caller parses.
fn quick_content(payload: &[u8], k: &Keys) -> Option<bool> {
    // A tool-call delta has no `"content"` but is content (and its `"index"`es are not
    // choices'); a chat chunk's logprobs hold `"content":[` after the delta: let the parse judge.
    if k.index > 1 || k.tool_calls {
        return None;
    }
    let rest = &payload[k.text.or(k.content)?..];
    Some(rest.starts_with(b"\"") && !rest.starts_with(b"\"\""))
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

/// Built once: a searcher costs more to build than one event takes to scan.
static COMPLETION_TOKENS: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
    std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\"completion_tokens\""));

/// `(prompt_tokens, completion_tokens)` from an SSE event or a whole response body that carries
/// usage; `None` for anything else (judged by a byte scan first: most events have none).
pub fn usage_of(bytes: &[u8]) -> Option<(u64, u64)> {
    COMPLETION_TOKENS.find(bytes)?;
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
    fn keys_are_found_outside_strings_only() {
        let p = br#"{"choices":[{"index":0,"text":" \"index\":1 \"usage\":{","logprobs":null}],"usage":null}"#;
        let k = keys(p);
        assert_eq!(k.index, 1, "the quoted names in the text are not keys");
        assert_eq!(&p[k.text.unwrap()..k.text.unwrap() + 2], b"\" ");
        assert!(p[k.usage.unwrap()..].starts_with(b"null}"));
        assert_eq!((k.content, k.tool_calls), (None, false));
        let t = keys(br#"{"delta":{"tool_calls":[{"index":0}],"content":"x"}}"#);
        assert!(t.tool_calls);
        assert_eq!(t.text, None);
        assert!(t.content.is_some());
        assert!(!keys(br#"{"tool_calls":[],"content":"x"}"#).tool_calls);
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
