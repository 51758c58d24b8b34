//! The front door's view of a request: parsed once, tokenised once, with both legs' bodies
//! prepared before any engine is contacted.

use bytes::Bytes;
use serde_json::{Map, Value};
use tandem_model::Tokenizer;

use crate::error::ProxyError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Completions,
    Chat,
}

impl Kind {
    pub fn path(self) -> &'static str {
        match self {
            Kind::Completions => "/v1/completions",
            Kind::Chat => "/v1/chat/completions",
        }
    }
}

/// A validated request.
#[derive(Debug)]
pub struct Parsed {
    pub kind: Kind,
    pub stream: bool,
    pub model: Option<String>,
    /// Several prompts in one completions request (vLLM's KV handoff takes one prompt).
    pub batch: bool,
    pub prompt_tokens: u64,
    /// The prompt's token ids (empty for a batch), for the prefix index.
    pub prompt_ids: Vec<u32>,
    /// `max_tokens` (or chat's `max_completion_tokens`), when given.
    pub max_tokens: Option<u64>,
    /// The client's session key, hashed: the `x-session-id` header, else the body's `user`.
    pub session: Option<u64>,
    /// The prefill leg's body (vllm-pd-protocol.md §1.2).
    pub prefill_body: Bytes,
    /// The client's body without any `kv_transfer_params` and without its closing brace, so the
    /// decode body is one concatenation away once the params arrive.
    decode_prefix: Vec<u8>,
    decode_empty: bool,
}

impl Parsed {
    /// The decode leg's body: the client's body plus P's `kv_transfer_params`, verbatim.
    pub fn decode_body(&self, params: Option<&str>) -> Bytes {
        let mut out =
            Vec::with_capacity(self.decode_prefix.len() + 40 + params.map_or(0, str::len));
        out.extend_from_slice(&self.decode_prefix);
        if let Some(p) = params {
            if !self.decode_empty {
                out.push(b',');
            }
            out.extend_from_slice(b"\"kv_transfer_params\":");
            out.extend_from_slice(p.as_bytes());
        }
        out.push(b'}');
        Bytes::from(out)
    }
}

fn bad(msg: impl Into<String>) -> ProxyError {
    ProxyError::BadRequest(msg.into())
}

/// Parse, validate and tokenise one request body.
/// The header a client names its conversation with (OpenAI's body field `user` also counts).
pub const SESSION_HEADER: &str = "x-session-id";

pub fn parse(
    kind: Kind,
    raw: &[u8],
    tok: &Tokenizer,
    session_header: Option<&[u8]>,
) -> Result<Parsed, ProxyError> {
    let mut body: Map<String, Value> = match serde_json::from_slice::<Value>(raw) {
        Ok(Value::Object(m)) => m,
        Ok(_) => return Err(bad("the request body must be a JSON object")),
        Err(e) => return Err(bad(format!("invalid JSON body: {e}"))),
    };
    // A client-supplied handoff would let it read another request's KV blocks.
    body.remove("kv_transfer_params");
    let stream = match body.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(bad("`stream` must be a boolean")),
    };
    if !stream && body.get("stream_options").is_some_and(|v| !v.is_null()) {
        return Err(bad(
            "Stream options can only be defined when `stream=True`.",
        ));
    }
    let model = match body.get("model") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(bad("`model` must be a string")),
    };
    let user = match body.get("user") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.as_bytes()),
        Some(_) => return Err(bad("`user` must be a string")),
    };
    let session = session_header
        .filter(|h| !h.is_empty())
        .or(user.filter(|u| !u.is_empty()))
        .map(tandem_policy::affinity::hash_key);
    let max_tokens = ["max_completion_tokens", "max_tokens"]
        .iter()
        .find_map(|k| body.get(*k).and_then(Value::as_u64));
    let (prompt_ids, prompt_tokens, batch) = match kind {
        Kind::Completions => completion_tokens(&body, tok)?,
        Kind::Chat => {
            let ids = chat_tokens(&body, tok)?;
            let n = ids.len() as u64;
            (ids, n, false)
        }
    };

    let mut decode = serde_json::to_vec(&body).expect("a JSON map serialises");
    decode.pop(); // the closing brace; `decode_body` adds it back
    let decode_empty = body.is_empty();

    let mut p = body;
    p.insert(
        "kv_transfer_params".into(),
        serde_json::json!({
            "do_remote_decode": true,
            "do_remote_prefill": false,
            "remote_engine_id": null,
            "remote_block_ids": null,
            "remote_host": null,
            "remote_port": null,
        }),
    );
    p.insert("stream".into(), Value::Bool(false));
    p.insert("max_tokens".into(), Value::from(1));
    if p.contains_key("max_completion_tokens") {
        p.insert("max_completion_tokens".into(), Value::from(1));
    }
    // vLLM rejects these on a 1-token prefill (the reference proxy strips them too).
    p.remove("stream_options");
    p.remove("min_tokens");
    p.remove("min_completion_tokens");
    let prefill_body = Bytes::from(serde_json::to_vec(&p).expect("a JSON map serialises"));

    Ok(Parsed {
        kind,
        stream,
        model,
        batch,
        prompt_tokens,
        prompt_ids,
        max_tokens,
        session,
        prefill_body,
        decode_prefix: decode,
        decode_empty,
    })
}

fn encode(tok: &Tokenizer, text: &str, special: bool) -> Result<Vec<u32>, ProxyError> {
    tok.encode(text, special).map_err(|e| bad(e.to_string()))
}

const BAD_PROMPT: &str =
    "`prompt` must be a string, a list of strings, a list of token ids or a list of token id lists";

/// Token ids from a JSON list of integers; `None` if any item is not a u32.
fn ids(items: &[Value]) -> Option<Vec<u32>> {
    items
        .iter()
        .map(|v| v.as_u64().and_then(|n| u32::try_from(n).ok()))
        .collect()
}

/// The prompt's ids (one prompt) or none (a batch), its total token count, and whether it is a
/// batch.
fn completion_tokens(
    body: &Map<String, Value>,
    tok: &Tokenizer,
) -> Result<(Vec<u32>, u64, bool), ProxyError> {
    let special = body
        .get("add_special_tokens")
        .and_then(Value::as_bool)
        .unwrap_or(true);
    match body.get("prompt") {
        Some(Value::String(s)) => {
            let ids = encode(tok, s, special)?;
            let n = ids.len() as u64;
            Ok((ids, n, false))
        }
        Some(Value::Array(items)) if items.is_empty() => Err(bad("`prompt` must not be empty")),
        Some(Value::Array(items)) => {
            if items.iter().all(Value::is_u64) {
                let ids = ids(items).ok_or_else(|| bad("token ids must fit in 32 bits"))?;
                let n = ids.len() as u64;
                return Ok((ids, n, false));
            }
            let mut all = Vec::with_capacity(items.len());
            for it in items {
                all.push(match it {
                    Value::String(s) => encode(tok, s, special)?,
                    Value::Array(list) if list.iter().all(Value::is_u64) => {
                        ids(list).ok_or_else(|| bad("token ids must fit in 32 bits"))?
                    }
                    _ => return Err(bad(BAD_PROMPT)),
                });
            }
            let total = all.iter().map(|v| v.len() as u64).sum();
            if all.len() == 1 {
                let one = all.pop().expect("one prompt");
                return Ok((one, total, false));
            }
            Ok((Vec::new(), total, true))
        }
        Some(_) => Err(bad(BAD_PROMPT)),
        None => Err(bad("`prompt` is required")),
    }
}

fn chat_tokens(body: &Map<String, Value>, tok: &Tokenizer) -> Result<Vec<u32>, ProxyError> {
    let Some(Value::Array(messages)) = body.get("messages") else {
        return Err(bad("`messages` must be a list"));
    };
    let msgs = tandem_model::chat::normalise_messages(messages).map_err(bad)?;
    let add_gen = body
        .get("add_generation_prompt")
        .and_then(Value::as_bool)
        .unwrap_or(true);
    let text = tok
        .render_chat(&msgs, add_gen)
        .map_err(|e| bad(e.to_string()))?;
    let special = body
        .get("add_special_tokens")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    encode(tok, &text, special)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tok() -> Tokenizer {
        Tokenizer::byte_level()
    }

    #[test]
    fn prefill_body_follows_the_reference_proxy() {
        let raw = br#"{"model":"m","prompt":"hello","max_tokens":50,"stream":true,"stream_options":{"include_usage":true},"min_tokens":3}"#;
        let p = parse(Kind::Completions, raw, &tok(), None).unwrap();
        let v: Value = serde_json::from_slice(&p.prefill_body).unwrap();
        assert_eq!(v["stream"], false);
        assert_eq!(v["max_tokens"], 1);
        assert_eq!(v["kv_transfer_params"]["do_remote_decode"], true);
        assert_eq!(v["kv_transfer_params"]["do_remote_prefill"], false);
        assert!(v.get("stream_options").is_none());
        assert!(v.get("min_tokens").is_none());
        assert_eq!(p.prompt_tokens, 6); // BOS + 5 bytes
        assert!(p.stream);
    }

    #[test]
    fn decode_body_is_the_original_plus_params_verbatim() {
        let raw = br#"{"model":"m","prompt":"hi","kv_transfer_params":{"evil":1},"max_tokens":5}"#;
        let p = parse(Kind::Completions, raw, &tok(), None).unwrap();
        let params = r#"{"do_remote_prefill":true,"remote_block_ids":[1,2]}"#;
        let d = p.decode_body(Some(params));
        assert_eq!(
            std::str::from_utf8(&d).unwrap(),
            r#"{"model":"m","prompt":"hi","max_tokens":5,"kv_transfer_params":{"do_remote_prefill":true,"remote_block_ids":[1,2]}}"#
        );
        let local = p.decode_body(None);
        assert_eq!(
            std::str::from_utf8(&local).unwrap(),
            r#"{"model":"m","prompt":"hi","max_tokens":5}"#
        );
        let chat = parse(
            Kind::Chat,
            br#"{"messages":[{"role":"user","content":"x"}],"max_completion_tokens":9}"#,
            &tok(),
            None,
        )
        .unwrap();
        let v: Value = serde_json::from_slice(&chat.prefill_body).unwrap();
        assert_eq!(v["max_completion_tokens"], 1);
        assert_eq!(chat.max_tokens, Some(9));
    }

    #[test]
    fn bad_requests_are_400s_with_reasons() {
        for (kind, raw) in [
            (Kind::Completions, &b"not json"[..]),
            (Kind::Completions, b"[1]"),
            (Kind::Completions, br#"{"model":"m"}"#),
            (
                Kind::Completions,
                br#"{"prompt":"x","stream_options":{"include_usage":true}}"#,
            ),
            (Kind::Completions, br#"{"prompt":{"a":1}}"#),
            (Kind::Chat, br#"{"messages":"hi"}"#),
            (Kind::Chat, br#"{"messages":[{"content":"no role"}]}"#),
        ] {
            let e = parse(kind, raw, &tok(), None).unwrap_err();
            assert!(matches!(e, ProxyError::BadRequest(_)), "{e:?}");
        }
        let batch = parse(Kind::Completions, br#"{"prompt":["a","b"]}"#, &tok(), None).unwrap();
        assert!(batch.batch);
        let ids = parse(Kind::Completions, br#"{"prompt":[1,2,3]}"#, &tok(), None).unwrap();
        assert_eq!((ids.prompt_tokens, ids.batch), (3, false));
    }

    #[test]
    fn the_session_key_is_the_header_else_the_user_field() {
        let key = |raw: &[u8], h: Option<&[u8]>| {
            parse(Kind::Completions, raw, &tok(), h).unwrap().session
        };
        let with_user = br#"{"prompt":"hi","user":"alice"}"#;
        let hash = tandem_policy::affinity::hash_key;
        assert_eq!(key(with_user, None), Some(hash(b"alice")));
        assert_eq!(key(with_user, Some(b"conv-7")), Some(hash(b"conv-7")));
        assert_eq!(key(br#"{"prompt":"hi","user":""}"#, Some(b"")), None);
        assert_eq!(key(br#"{"prompt":"hi"}"#, None), None);
        let e = parse(
            Kind::Completions,
            br#"{"prompt":"hi","user":5}"#,
            &tok(),
            None,
        );
        assert!(matches!(e, Err(ProxyError::BadRequest(_))));
    }
}
