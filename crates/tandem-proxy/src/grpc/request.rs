//! An OpenAI request body → vLLM's `GenerateRequest` (vllm-grpc.md §2, §6, §8), one per leg, and
//! the `google.protobuf.Struct` ↔ JSON conversion that `kv_transfer_params` travels in.
//!
//! Pure: the body has already passed the front door's checks (vLLM's sampling validations), and
//! the prompt arrives as the token ids Tandem computed, so the engine sees exactly the tokens the
//! prefix index was asked about (the chat template is rendered by Tandem, never by the engine).
//!
//! The rule throughout: the gRPC request must make the engine do what vLLM's HTTP server would do
//! with the same body. Where the two APIs default differently (temperature, `max_tokens`) the
//! HTTP default is written explicitly; where gRPC has no way to say what the body asks for, the
//! conversion fails naming the field ([`RequestError::Unsupported`]) instead of dropping it.

use prost_types::value::Kind as PbKind;
use serde_json::{Map, Value};
use vllm_proto::generate_request::Prompt;
use vllm_proto::{
    DecodingParameters, GenerateRequest, KvCacheParameters, RandomSampling, ResponseOptions,
    StoppingCriteria, TokenIds,
};

use crate::front::Kind;

/// OpenAI's (and vLLM HTTP's) temperature when the client gives none. vLLM's gRPC server reads an
/// unset temperature as 0.0, greedy ("differs from the HTTP/OpenAI API"), and since that is a
/// `Some` the model's generation config is never consulted either: leaving it unset would turn
/// every sampled request greedy.
pub(crate) const DEFAULT_TEMPERATURE: f32 = 1.0;

/// vLLM's `CompletionRequest.max_tokens` default (the field's pydantic default; chat has none).
pub(crate) const COMPLETIONS_DEFAULT_MAX_TOKENS: u32 = 16;

use tandem_model::pbjson::MAX_SAFE_INTEGER;

/// Which leg of a request the `GenerateRequest` is for.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Leg {
    /// One engine does the whole request.
    Colocated,
    /// The prefill leg: one token, KV kept for a remote decode.
    Prefill,
    /// The decode leg, with the params the prefill engine returned (`FinishInfo.kv_transfer_params`,
    /// or an HTTP prefill's JSON through [`json_to_struct`]).
    Decode {
        kv_transfer_params: prost_types::Struct,
    },
}

/// Why a body cannot go to a gRPC engine. Every variant is the client's request, so the caller
/// answers 400 with the `Display` text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum RequestError {
    /// vLLM's gRPC server refuses `num_sequences > 1` ("the response path also hardcodes
    /// SequenceOutput.index = 0").
    #[error("n > 1 is not supported over gRPC")]
    MultipleChoices,
    /// A field this schema version cannot carry, or whose answer (logprobs, parsed tool calls)
    /// the gRPC response has no room for.
    #[error("`{0}` is not supported by gRPC engines")]
    Unsupported(&'static str),
    /// A field of the wrong type or range. The front door's checks make this unreachable for
    /// bodies it passed; kept so a missed case is a 400, not a silently different request.
    #[error("`{0}` has an invalid value")]
    Invalid(&'static str),
}

/// The client's request as the front door left it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct OpenAiRequest<'a> {
    pub kind: Kind,
    /// The client's JSON body (validated; without any `kv_transfer_params`).
    pub body: &'a Map<String, Value>,
    /// The prompt's token ids: the completions prompt, or the rendered and tokenised chat.
    pub prompt_ids: &'a [u32],
    pub request_id: &'a str,
    /// Whether the engine parses tool calls out of its output (`ModelInfo.tool_call_parser` is
    /// non-empty). vLLM's HTTP server would then answer an `auto` tool choice with parsed
    /// `tool_calls`, which a gRPC response (text only) cannot reproduce.
    pub tool_call_parser: bool,
}

/// The `GenerateRequest` for one leg of `req`.
///
/// Errors: `n > 1` ([`RequestError::MultipleChoices`]; the caller maps it to a 400), a field gRPC
/// engines cannot honour ([`RequestError::Unsupported`], 400 "`x` is not supported by gRPC
/// engines").
pub(crate) fn generate_request(
    req: &OpenAiRequest<'_>,
    leg: Leg,
) -> Result<GenerateRequest, RequestError> {
    let body = req.body;
    if int(body, "n")?.is_some_and(|n| n > 1) {
        return Err(RequestError::MultipleChoices);
    }
    check_supported(req)?;

    let max_tokens = max_tokens(req.kind, body)?;
    let min_tokens = to_u32(int(body, "min_tokens")?.unwrap_or(0), "min_tokens")?;
    let (max_new_tokens, min_new_tokens) = match leg {
        // One token is all a prefill needs to fill the KV; vLLM refuses `min_new_tokens >
        // max_new_tokens`, so the client's minimum cannot ride along.
        Leg::Prefill => (1, 0),
        Leg::Colocated | Leg::Decode { .. } => (max_tokens, min_tokens),
    };
    let stopping = StoppingCriteria {
        max_new_tokens,
        min_new_tokens,
        stop_token_ids: u32_list(body, "stop_token_ids")?,
        // Kept on the prefill leg too: harmless on one token (P's output is discarded), and the
        // two legs stay the same request but for its length.
        stop_strings: stop_strings(body)?,
        include_stop_strings: boolean(body, "include_stop_str_in_output")?.unwrap_or(false),
        ignore_eos: boolean(body, "ignore_eos")?.unwrap_or(false),
        thinking_token_budget: None,
    };

    let temperature = float(body, "temperature")?.map_or(DEFAULT_TEMPERATURE, |t| t as f32);
    let top_k = match int(body, "top_k")? {
        None => None,
        // HTTP spells "disabled" 0 or (older) -1; gRPC (0.5+) spells it 0. Unset would mean the
        // model's default instead.
        Some(k) if k <= 0 => Some(0),
        Some(k) => Some(to_u32(k, "top_k")?),
    };
    let sampling = RandomSampling {
        num_sequences: 1,
        top_k,
        top_p: float(body, "top_p")?.map(|p| p as f32),
        min_p: float(body, "min_p")?.map(|p| p as f32),
        seed: int(body, "seed")?,
    };
    let decoding = DecodingParameters {
        // 0.0 is "no penalty" for these two on both APIs.
        presence_penalty: float(body, "presence_penalty")?.unwrap_or(0.0) as f32,
        frequency_penalty: float(body, "frequency_penalty")?.unwrap_or(0.0) as f32,
        // 0.0 is gRPC's "unset" (the model's default, else 1.0), as an absent field is on HTTP.
        repetition_penalty: float(body, "repetition_penalty")?.unwrap_or(0.0) as f32,
        allowed_token_ids: u32_list(body, "allowed_token_ids")?,
        ..Default::default()
    };
    let response = ResponseOptions {
        // Token ids let Tandem count and index the output without detokenising; text is what
        // the client gets, detokenised and stop-trimmed by the engine.
        output_token_ids: true,
        output_text: Some(true),
        skip_special_tokens: Some(boolean(body, "skip_special_tokens")?.unwrap_or(true)),
        ..Default::default()
    };
    let kv_transfer_params = match leg {
        Leg::Colocated => None,
        Leg::Prefill => Some(prefill_params()),
        Leg::Decode { kv_transfer_params } => Some(stringify_remote_port(kv_transfer_params)),
    };
    let cache_salt = string(body, "cache_salt")?.unwrap_or_default();
    let kv = (kv_transfer_params.is_some() || !cache_salt.is_empty()).then(|| KvCacheParameters {
        cache_salt,
        kv_transfer_params,
        ..Default::default()
    });
    let truncate_prompt_tokens = match int(body, "truncate_prompt_tokens")? {
        None => 0,
        // -1 is HTTP's "to the model's context length", which gRPC cannot say.
        Some(n) if n < 0 => return Err(RequestError::Unsupported("truncate_prompt_tokens")),
        Some(n) => to_u32(n, "truncate_prompt_tokens")?,
    };
    let priority = match int(body, "priority")? {
        None => 0,
        Some(p) => i32::try_from(p).map_err(|_| RequestError::Invalid("priority"))?,
    };

    Ok(GenerateRequest {
        request_id: req.request_id.to_string(),
        // Empty selects the engine's served model: the front door has already checked the
        // client's `model`, and an alias Tandem accepts must not become NOT_FOUND.
        model: String::new(),
        prompt: Some(Prompt::TokenIds(TokenIds {
            ids: req.prompt_ids.to_vec(),
        })),
        temperature: Some(temperature),
        sampling: Some(sampling),
        decoding: Some(decoding),
        stopping: Some(stopping),
        response: Some(response),
        kv,
        truncate_prompt_tokens,
        priority,
        ..Default::default()
    })
}

/// `max_new_tokens` as vLLM's HTTP server would resolve the body's: chat's
/// `max_completion_tokens` (else its deprecated `max_tokens`), completions' `max_tokens` (16 when
/// the field is absent). No value is 0, gRPC's "to the context limit" (`max_model_len −
/// prompt_len`, capped by the generation config), which is what HTTP's `get_max_tokens` does
/// with `None`.
fn max_tokens(kind: Kind, body: &Map<String, Value>) -> Result<u32, RequestError> {
    let given = match kind {
        Kind::Chat => match int(body, "max_completion_tokens")? {
            Some(m) => Some(m),
            None => int(body, "max_tokens")?,
        },
        Kind::Completions => {
            if !body.contains_key("max_tokens") {
                return Ok(COMPLETIONS_DEFAULT_MAX_TOKENS);
            }
            // An explicit `null` is `None`, not the default.
            int(body, "max_tokens")?
        }
    };
    match given {
        None => Ok(0),
        Some(m) => to_u32(m, "max_tokens"),
    }
}

/// Refuse what a gRPC engine cannot honour, naming the field.
fn check_supported(req: &OpenAiRequest<'_>) -> Result<(), RequestError> {
    let body = req.body;
    let unsupported = |k: &'static str| Err(RequestError::Unsupported(k));
    match req.kind {
        Kind::Completions => {
            // Completions' `logprobs` is a count; any count (0 too) asks for logprobs.
            if present(body, "logprobs") {
                return unsupported("logprobs");
            }
            if boolean(body, "echo")?.unwrap_or(false) {
                return unsupported("echo");
            }
            if present(body, "suffix") {
                return unsupported("suffix");
            }
            if present(body, "prompt_embeds") {
                return unsupported("prompt_embeds");
            }
        }
        Kind::Chat => {
            if boolean(body, "logprobs")?.unwrap_or(false) {
                return unsupported("logprobs");
            }
            if int(body, "top_logprobs")?.is_some_and(|t| t != 0) {
                return unsupported("top_logprobs");
            }
            check_tools(req)?;
        }
    }
    if present(body, "prompt_logprobs") {
        return unsupported("prompt_logprobs");
    }
    // `{"type": "text"}` is the default; anything else constrains the output.
    if let Some(f) = body.get("response_format").filter(|v| !v.is_null()) {
        if f.get("type").and_then(Value::as_str) != Some("text") {
            return unsupported("response_format");
        }
    }
    // Structured outputs exist in the schema (`DecodingParameters.structured_output`) but
    // Tandem does not translate vLLM's many spellings of them yet.
    for k in [
        "structured_outputs",
        "guided_json",
        "guided_regex",
        "guided_choice",
        "guided_grammar",
        "structural_tag",
    ] {
        if present(body, k) {
            return unsupported(k);
        }
    }
    if int(body, "best_of")?.is_some_and(|b| b > 1) {
        return unsupported("best_of");
    }
    if boolean(body, "use_beam_search")?.unwrap_or(false) {
        return unsupported("use_beam_search");
    }
    // The schema's `logit_bias` map is not lowered by this version's frontend; `bad_words` are
    // strings and the schema only takes token ids.
    for k in ["logit_bias", "bad_words", "logits_processors", "vllm_xargs"] {
        if non_empty(body, k) {
            return unsupported(k);
        }
    }
    // The answer would need fields (token ids, spacing control) the gRPC response lacks.
    if boolean(body, "return_token_ids")?.unwrap_or(false) {
        return unsupported("return_token_ids");
    }
    if boolean(body, "spaces_between_special_tokens")? == Some(false) {
        return unsupported("spaces_between_special_tokens");
    }
    Ok(())
}

/// Tools are fine as template input (Tandem rendered them into the prompt). A tool *call* is not:
/// `required` or a named tool constrains decoding with a grammar, and `auto` on an engine with a
/// tool parser is answered with parsed `tool_calls`; a gRPC response carries text only.
fn check_tools(req: &OpenAiRequest<'_>) -> Result<(), RequestError> {
    let has_tools = req
        .body
        .get("tools")
        .and_then(Value::as_array)
        .is_some_and(|t| !t.is_empty());
    if !has_tools {
        // vLLM answers a choice without tools as "none" ("required" too, following OpenAI).
        return Ok(());
    }
    match req.body.get("tool_choice") {
        Some(Value::String(c)) if c == "none" => Ok(()),
        // Tools without a choice default to "auto" (vLLM).
        None | Some(Value::Null) if !req.tool_call_parser => Ok(()),
        Some(Value::String(c)) if c == "auto" && !req.tool_call_parser => Ok(()),
        _ => Err(RequestError::Unsupported("tool_choice")),
    }
}

/// What a prefill leg sends: keep the KV for a remote decode (SMG sends `do_remote_prefill:
/// false` alongside, which NixlConnector reads as "this is not itself a decode").
fn prefill_params() -> prost_types::Struct {
    let mut s = prost_types::Struct::default();
    for (k, b) in [("do_remote_decode", true), ("do_remote_prefill", false)] {
        s.fields.insert(
            k.to_string(),
            prost_types::Value {
                kind: Some(PbKind::BoolValue(b)),
            },
        );
    }
    s
}

/// P's params for the decode leg, verbatim but for `remote_port` as a decimal string.
///
/// A `Struct` number is a double, and 0.6.0-era servers hand it to Python as one: NixlConnector
/// then builds `tcp://host:5600.0` and the handshake fails. NixlConnector (and the sim) accept the
/// port as a string, so Dynamo sends it that way until vLLM coerces it itself (vllm-grpc.md §6
/// item 4). `remote_block_ids` stay numbers: the server's later integral-double coercion
/// handles them, and a string list would be wrong everywhere.
pub(crate) fn stringify_remote_port(mut s: prost_types::Struct) -> prost_types::Struct {
    if let Some(v) = s.fields.get_mut("remote_port") {
        if let Some(PbKind::NumberValue(n)) = v.kind {
            let port = if n.fract() == 0.0 && n.abs() <= MAX_SAFE_INTEGER {
                format!("{}", n as i64)
            } else {
                format!("{n}")
            };
            v.kind = Some(PbKind::StringValue(port));
        }
    }
    s
}

pub(crate) use tandem_model::pbjson::json_to_struct;

/// `Struct` → JSON, with integral doubles within ±2^53 as JSON integers. A gRPC prefill's params
/// may go on to an HTTP decode engine, whose NixlConnector needs `remote_port`, `tp_size` and the
/// block ids as ints (`5600.0` breaks its ZMQ address).
pub(crate) fn struct_to_json(s: &prost_types::Struct) -> Value {
    tandem_model::pbjson::struct_to_json(s, tandem_model::pbjson::Numbers::Integral)
}

// Field readers, lax as vLLM's pydantic request models are (the front door accepts the same
// spellings): a number may come as a numeric string, an integer as an integral float; `null` is
// absent.

fn present(body: &Map<String, Value>, key: &str) -> bool {
    body.get(key).is_some_and(|v| !v.is_null())
}

/// Present and not an empty list or object (`logit_bias: {}` asks for nothing).
fn non_empty(body: &Map<String, Value>, key: &str) -> bool {
    match body.get(key) {
        None | Some(Value::Null) => false,
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(o)) => !o.is_empty(),
        Some(_) => true,
    }
}

fn float(body: &Map<String, Value>, key: &'static str) -> Result<Option<f64>, RequestError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n.as_f64().map(Some).ok_or(RequestError::Invalid(key)),
        Some(Value::String(s)) => match s.trim().parse::<f64>() {
            Ok(x) if x.is_finite() => Ok(Some(x)),
            _ => Err(RequestError::Invalid(key)),
        },
        Some(_) => Err(RequestError::Invalid(key)),
    }
}

fn int(body: &Map<String, Value>, key: &'static str) -> Result<Option<i64>, RequestError> {
    let bad = RequestError::Invalid(key);
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => {
            if let Some(i) = n.as_i64() {
                return Ok(Some(i));
            }
            match n.as_f64() {
                Some(x) if x.fract() == 0.0 && x.abs() <= MAX_SAFE_INTEGER => Ok(Some(x as i64)),
                _ => Err(bad),
            }
        }
        Some(Value::String(s)) => s.trim().parse().map(Some).map_err(|_| bad),
        Some(_) => Err(bad),
    }
}

fn to_u32(v: i64, key: &'static str) -> Result<u32, RequestError> {
    u32::try_from(v).map_err(|_| RequestError::Invalid(key))
}

fn boolean(body: &Map<String, Value>, key: &'static str) -> Result<Option<bool>, RequestError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(RequestError::Invalid(key)),
    }
}

fn string(body: &Map<String, Value>, key: &'static str) -> Result<Option<String>, RequestError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(RequestError::Invalid(key)),
    }
}

fn u32_list(body: &Map<String, Value>, key: &'static str) -> Result<Vec<u32>, RequestError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_u64().and_then(|n| u32::try_from(n).ok()))
            .collect::<Option<Vec<u32>>>()
            .ok_or(RequestError::Invalid(key)),
        Some(_) => Err(RequestError::Invalid(key)),
    }
}

/// `stop`: a string or a list of strings.
fn stop_strings(body: &Map<String, Value>) -> Result<Vec<String>, RequestError> {
    match body.get("stop") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<Vec<String>>>()
            .ok_or(RequestError::Invalid("stop")),
        Some(_) => Err(RequestError::Invalid("stop")),
    }
}

#[cfg(test)]
#[path = "request_tests.rs"]
mod tests;
