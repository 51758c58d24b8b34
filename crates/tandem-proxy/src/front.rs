//! The front door's view of a request: parsed once, tokenised once, with both legs' bodies
//! prepared before any engine is contacted.

use bytes::Bytes;
use serde_json::{Map, Value};
use tandem_config::LimitsConfig;
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
    /// The prompt's token ids (empty for a batch): for the prefix index, and for engines whose
    /// protocol takes token ids (gRPC).
    pub prompt_ids: std::sync::Arc<[u32]>,
    /// `max_tokens` (or chat's `max_completion_tokens`), when given.
    pub max_tokens: Option<u64>,
    /// Choices per prompt (`n`, default 1; validated by `check_sampling`).
    pub n: u64,
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

/// The header a client names its conversation with (OpenAI's body field `user` also counts).
pub const SESSION_HEADER: &str = "x-session-id";

/// Parse, validate (vLLM's sampling checks and `[limits]`) and tokenise one request body.
pub fn parse(
    kind: Kind,
    raw: &[u8],
    tok: &Tokenizer,
    limits: &LimitsConfig,
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
    check_sampling(kind, &body, limits)?;
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
    let n = int_field(&body, "n")?.map_or(1, |v| v.clamp(1, i128::from(u32::MAX)) as u64);
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
        prompt_ids: prompt_ids.into(),
        max_tokens,
        n,
        session,
        prefill_body,
        decode_prefix: decode,
        decode_empty,
    })
}

/// A number as Python prints a float (`-1.0`, `0.5`), for vLLM's messages.
fn py_float(x: f64) -> String {
    if x.is_finite() && x.fract() == 0.0 && x.abs() < 1e16 {
        format!("{x:.1}")
    } else {
        format!("{x}")
    }
}

/// A float field as vLLM's request model reads it (pydantic, lax): a JSON number or a numeric
/// string; absent or `null` is unset.
fn float_field(body: &Map<String, Value>, key: &str) -> Result<Option<f64>, ProxyError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => Ok(n.as_f64()),
        Some(Value::String(s)) => match s.trim().parse::<f64>() {
            Ok(x) if x.is_finite() => Ok(Some(x)),
            _ => Err(bad(format!("`{key}` must be a number"))),
        },
        Some(_) => Err(bad(format!("`{key}` must be a number"))),
    }
}

/// An integer field the same way: a JSON integer, a float without a fractional part, or an
/// integer string.
fn int_field(body: &Map<String, Value>, key: &str) -> Result<Option<i128>, ProxyError> {
    let not_int = || bad(format!("`{key}` must be an integer"));
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => {
            if let Some(i) = n.as_i64() {
                return Ok(Some(i128::from(i)));
            }
            if let Some(u) = n.as_u64() {
                return Ok(Some(i128::from(u)));
            }
            match n.as_f64() {
                Some(x) if x.fract() == 0.0 && x.abs() < 1e30 => Ok(Some(x as i128)),
                _ => Err(not_int()),
            }
        }
        Some(Value::String(s)) => s.trim().parse::<i128>().map(Some).map_err(|_| not_int()),
        Some(_) => Err(not_int()),
    }
}

/// vLLM's checks of the sampling parameters (`SamplingParams._verify_args` and the request
/// models' validators, with their messages), then `[limits]`; all before any engine work, so a
/// request an engine would refuse never occupies a prefill.
fn check_sampling(
    kind: Kind,
    body: &Map<String, Value>,
    limits: &LimitsConfig,
) -> Result<(), ProxyError> {
    if let Some(t) = float_field(body, "temperature")? {
        if t < 0.0 {
            return Err(bad(format!(
                "temperature must be non-negative, got {}.",
                py_float(t)
            )));
        }
    }
    if let Some(p) = float_field(body, "top_p")? {
        if !(p > 0.0 && p <= 1.0) {
            return Err(bad(format!(
                "top_p must be in (0, 1], got {}.",
                py_float(p)
            )));
        }
    }
    if let Some(k) = int_field(body, "top_k")? {
        // -1 is vLLM's old spelling of "disabled", which it still accepts quietly.
        if k < -1 {
            return Err(bad(format!(
                "top_k must be 0 (disable), or at least 1, got {k}."
            )));
        }
    }
    if let Some(p) = float_field(body, "min_p")? {
        if !(0.0..=1.0).contains(&p) {
            return Err(bad(format!(
                "min_p must be in [0, 1], got {}.",
                py_float(p)
            )));
        }
    }
    for key in ["presence_penalty", "frequency_penalty"] {
        if let Some(x) = float_field(body, key)? {
            if !(-2.0..=2.0).contains(&x) {
                return Err(bad(format!(
                    "{key} must be in [-2, 2], got {}.",
                    py_float(x)
                )));
            }
        }
    }
    if let Some(x) = float_field(body, "repetition_penalty")? {
        if x <= 0.0 {
            return Err(bad(format!(
                "repetition_penalty must be greater than zero, got {}.",
                py_float(x)
            )));
        }
    }
    let n = int_field(body, "n")?;
    if let Some(n) = n {
        if n < 1 {
            return Err(bad(format!("n must be at least 1, got {n}.")));
        }
        if n > i128::from(limits.max_n) {
            return Err(bad(format!("n must be at most {}, got {n}.", limits.max_n)));
        }
    }
    if let Some(b) = int_field(body, "best_of")? {
        let n = n.unwrap_or(1);
        if b < n {
            return Err(bad(format!(
                "best_of must be greater than or equal to n, got n={n} and best_of={b}."
            )));
        }
        if b > i128::from(limits.max_best_of) {
            return Err(bad(format!(
                "best_of must be at most {}, got {b}.",
                limits.max_best_of
            )));
        }
    }
    let mut max_tokens = None;
    for key in ["max_tokens", "max_completion_tokens"] {
        let Some(m) = int_field(body, key)? else {
            continue;
        };
        if m < 1 {
            return Err(bad(format!("{key} must be at least 1, got {m}.")));
        }
        if let Some(cap) = limits.max_tokens {
            if u64::try_from(m).map_or(true, |m| m > cap) {
                return Err(bad(format!("{key} must be at most {cap}, got {m}.")));
            }
        }
        max_tokens = Some(max_tokens.map_or(m, |o: i128| o.min(m)));
    }
    if let Some(m) = int_field(body, "min_tokens")? {
        if m < 0 {
            return Err(bad(format!(
                "min_tokens must be greater than or equal to 0, got {m}."
            )));
        }
        if let Some(max) = max_tokens.filter(|max| m > *max) {
            return Err(bad(format!(
                "min_tokens must be less than or equal to max_tokens={max}, got {m}."
            )));
        }
    }
    match kind {
        Kind::Completions => {
            if int_field(body, "logprobs")?.is_some_and(|l| l < -1) {
                return Err(bad("`logprobs` must be a positive value or -1."));
            }
        }
        Kind::Chat => {
            let logprobs = match body.get("logprobs") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => return Err(bad("`logprobs` must be a boolean")),
            };
            if let Some(top) = int_field(body, "top_logprobs")? {
                if top < -1 {
                    return Err(bad("`top_logprobs` must be a positive value or -1."));
                }
                if !logprobs {
                    return Err(bad(
                        "when using `top_logprobs`, `logprobs` must be set to true.",
                    ));
                }
            }
        }
    }
    let prompt_logprobs = int_field(body, "prompt_logprobs")?;
    if prompt_logprobs.is_some_and(|l| l < -1) {
        return Err(bad("`prompt_logprobs` must be a positive value or -1."));
    }
    // vLLM's request model refuses these on a stream; the prefill leg is never a stream, so
    // without this check P would run (and pin KV) before D refused.
    let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    if stream && prompt_logprobs.is_some_and(|l| l > 0 || l == -1) {
        return Err(bad(
            "`prompt_logprobs` are not available when `stream=True`.",
        ));
    }
    let stops: &[Value] = match body.get("stop") {
        None | Some(Value::Null) => &[],
        Some(v @ Value::String(_)) => std::slice::from_ref(v),
        Some(Value::Array(a)) if a.iter().all(Value::is_string) => a,
        Some(_) => return Err(bad("`stop` must be a string or a list of strings")),
    };
    if stops.iter().any(|s| s.as_str() == Some("")) {
        return Err(bad("stop cannot contain an empty string."));
    }
    Ok(())
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
            // vLLM's request model takes a list of strings or a list of id lists, not a mix.
            let texts = items.iter().all(Value::is_string);
            let lists = items.iter().all(Value::is_array);
            if !texts && !lists {
                return Err(bad(BAD_PROMPT));
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

pub(crate) fn chat_tokens(
    body: &Map<String, Value>,
    tok: &Tokenizer,
) -> Result<Vec<u32>, ProxyError> {
    let Some(Value::Array(messages)) = body.get("messages") else {
        return Err(bad("`messages` must be a list"));
    };
    let msgs = tandem_model::chat::normalise_messages(messages).map_err(bad)?;
    let add_gen = body
        .get("add_generation_prompt")
        .and_then(Value::as_bool)
        .unwrap_or(true);
    let text = tok
        .render_chat(&msgs, add_gen, tandem_model::ChatInputs::from_body(body))
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
        let p = parse(
            Kind::Completions,
            raw,
            &tok(),
            &LimitsConfig::default(),
            None,
        )
        .unwrap();
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
        let p = parse(
            Kind::Completions,
            raw,
            &tok(),
            &LimitsConfig::default(),
            None,
        )
        .unwrap();
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
            &LimitsConfig::default(),
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
            let e = parse(kind, raw, &tok(), &LimitsConfig::default(), None).unwrap_err();
            assert!(matches!(e, ProxyError::BadRequest(_)), "{e:?}");
        }
        let batch = parse(
            Kind::Completions,
            br#"{"prompt":["a","b"]}"#,
            &tok(),
            &LimitsConfig::default(),
            None,
        )
        .unwrap();
        assert!(batch.batch);
        let ids = parse(
            Kind::Completions,
            br#"{"prompt":[1,2,3]}"#,
            &tok(),
            &LimitsConfig::default(),
            None,
        )
        .unwrap();
        assert_eq!((ids.prompt_tokens, ids.batch), (3, false));
    }

    fn message(kind: Kind, raw: &str, limits: &LimitsConfig) -> String {
        match parse(kind, raw.as_bytes(), &tok(), limits, None) {
            Err(ProxyError::BadRequest(m)) => m,
            other => panic!("expected a 400 for {raw}, got {other:?}"),
        }
    }

    /// The 400 message for a completions body `{"prompt":"x",<extra>}`.
    fn completion_message(extra: &str, limits: &LimitsConfig) -> String {
        message(
            Kind::Completions,
            &format!(r#"{{"prompt":"x",{extra}}}"#),
            limits,
        )
    }

    #[test]
    fn sampling_parameters_are_checked_as_vllm_checks_them() {
        let l = LimitsConfig::default();
        let c = |extra: &str| completion_message(extra, &l);
        assert_eq!(
            c(r#""temperature":-1"#),
            "temperature must be non-negative, got -1.0."
        );
        assert_eq!(c(r#""top_p":2"#), "top_p must be in (0, 1], got 2.0.");
        assert_eq!(c(r#""stop":"""#), "stop cannot contain an empty string.");
        assert_eq!(
            c(r#""stop":["a",""]"#),
            "stop cannot contain an empty string."
        );
        assert_eq!(
            c(r#""stop":5"#),
            "`stop` must be a string or a list of strings"
        );
        assert_eq!(c(r#""top_p":0"#), "top_p must be in (0, 1], got 0.0.");
        assert_eq!(
            c(r#""top_k":-2"#),
            "top_k must be 0 (disable), or at least 1, got -2."
        );
        assert_eq!(c(r#""min_p":1.5"#), "min_p must be in [0, 1], got 1.5.");
        assert_eq!(
            c(r#""presence_penalty":2.5"#),
            "presence_penalty must be in [-2, 2], got 2.5."
        );
        assert_eq!(
            c(r#""frequency_penalty":-3"#),
            "frequency_penalty must be in [-2, 2], got -3.0."
        );
        assert_eq!(
            c(r#""repetition_penalty":0"#),
            "repetition_penalty must be greater than zero, got 0.0."
        );
        assert_eq!(c(r#""n":0"#), "n must be at least 1, got 0.");
        assert_eq!(
            c(r#""stream":true,"prompt_logprobs":2"#),
            "`prompt_logprobs` are not available when `stream=True`."
        );
        assert_eq!(c(r#""n":100000"#), "n must be at most 16, got 100000.");
        assert_eq!(
            c(r#""n":3,"best_of":2"#),
            "best_of must be greater than or equal to n, got n=3 and best_of=2."
        );
        assert_eq!(c(r#""best_of":17"#), "best_of must be at most 16, got 17.");
        assert_eq!(
            c(r#""max_tokens":0"#),
            "max_tokens must be at least 1, got 0."
        );
        assert_eq!(
            c(r#""max_tokens":4,"min_tokens":5"#),
            "min_tokens must be less than or equal to max_tokens=4, got 5."
        );
        assert_eq!(
            c(r#""logprobs":-2"#),
            "`logprobs` must be a positive value or -1."
        );
        assert_eq!(
            c(r#""temperature":"hot""#),
            "`temperature` must be a number"
        );
        assert_eq!(c(r#""temperature":[1]"#), "`temperature` must be a number");
        assert_eq!(c(r#""n":1.5"#), "`n` must be an integer");
        assert_eq!(c(r#""max_tokens":true"#), "`max_tokens` must be an integer");
        let chat = |extra: &str| {
            message(
                Kind::Chat,
                &format!(r#"{{"messages":[{{"role":"user","content":"x"}}],{extra}}}"#),
                &l,
            )
        };
        assert_eq!(
            chat(r#""max_completion_tokens":0"#),
            "max_completion_tokens must be at least 1, got 0."
        );
        assert_eq!(chat(r#""logprobs":3"#), "`logprobs` must be a boolean");
        assert_eq!(
            chat(r#""top_logprobs":2"#),
            "when using `top_logprobs`, `logprobs` must be set to true."
        );
        // What vLLM accepts passes, whatever the JSON spelling pydantic allows.
        for ok in [
            r#""temperature":0,"top_p":1,"top_k":-1,"min_p":0,"n":16,"best_of":16"#,
            r#""top_k":0,"presence_penalty":-2,"frequency_penalty":2,"repetition_penalty":1.1"#,
            r#""temperature":"0.5","n":2.0,"max_tokens":"7","logprobs":-1,"prompt_logprobs":0"#,
            r#""temperature":null,"n":null,"max_tokens":null,"min_tokens":0"#,
        ] {
            let raw = format!(r#"{{"prompt":"x",{ok}}}"#);
            assert!(
                parse(Kind::Completions, raw.as_bytes(), &tok(), &l, None).is_ok(),
                "{raw}"
            );
        }
        let raw =
            r#"{"messages":[{"role":"user","content":"x"}],"logprobs":true,"top_logprobs":5}"#;
        assert!(parse(Kind::Chat, raw.as_bytes(), &tok(), &l, None).is_ok());
    }

    #[test]
    fn limits_bound_n_best_of_and_max_tokens() {
        let l = LimitsConfig {
            max_n: 2,
            max_best_of: 3,
            max_tokens: Some(100),
            ..LimitsConfig::default()
        };
        let c = |extra: &str| completion_message(extra, &l);
        assert_eq!(c(r#""n":3"#), "n must be at most 2, got 3.");
        assert_eq!(c(r#""best_of":4"#), "best_of must be at most 3, got 4.");
        assert_eq!(
            c(r#""max_tokens":101"#),
            "max_tokens must be at most 100, got 101."
        );
        assert_eq!(
            c(r#""max_tokens":18446744073709551615"#),
            "max_tokens must be at most 100, got 18446744073709551615."
        );
        let raw = br#"{"prompt":"x","n":2,"best_of":3,"max_tokens":100}"#;
        assert!(parse(Kind::Completions, raw, &tok(), &l, None).is_ok());
        let raw = br#"{"prompt":"x","n":3}"#;
        assert!(parse(Kind::Completions, raw, &tok(), &l, None).is_err());
        assert!(parse(
            Kind::Completions,
            raw,
            &tok(),
            &LimitsConfig::default(),
            None
        )
        .is_ok());
    }

    #[test]
    fn the_session_key_is_the_header_else_the_user_field() {
        let key = |raw: &[u8], h: Option<&[u8]>| {
            parse(Kind::Completions, raw, &tok(), &LimitsConfig::default(), h)
                .unwrap()
                .session
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
            &LimitsConfig::default(),
            None,
        );
        assert!(matches!(e, Err(ProxyError::BadRequest(_))));
    }
}
