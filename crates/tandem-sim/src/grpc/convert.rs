//! `GenerateRequest` → engine request: vLLM's gRPC validations, defaults and P/D role, and the
//! `google.protobuf.Struct` ↔ JSON conversion of `kv_transfer_params` (vllm-grpc.md §2, §6).
//!
//! Pure: tokenisation comes in as a function, ids as a value, so every rule here is unit-tested.
//! Messages and status codes follow vLLM's Rust frontend (`grpc/convert.rs`, `text/src/lower.rs`,
//! `text/src/error.rs`): conversion errors are the RPC's status, `INVALID_ARGUMENT` for request
//! validation.

use std::sync::Arc;

use serde_json::{json, Value};
use tonic::Status;
use vllm_proto::{GenerateRequest, ResponseOptions};

use crate::engine::{KvHandle, RemoteKv, Role, SeqParams};

/// vLLM's `MAX_NUM_STOP_TOKEN_IDS` (the GPU sampler's cap).
const MAX_NUM_STOP_TOKEN_IDS: usize = 128;

/// What a request is validated against.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    pub served_model_name: String,
    pub max_model_len: u32,
    pub vocab_size: u32,
}

/// What the response carries besides text (vLLM's `ResponseOpts`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ResponseOpts {
    pub prompt_token_ids: bool,
    /// Defaults to true.
    pub output_text: bool,
    pub output_token_ids: bool,
}

impl ResponseOpts {
    pub(crate) fn from_proto(r: Option<&ResponseOptions>) -> Self {
        ResponseOpts {
            prompt_token_ids: r.is_some_and(|r| r.prompt_token_ids),
            output_text: r.and_then(|r| r.output_text).unwrap_or(true),
            output_token_ids: r.is_some_and(|r| r.output_token_ids),
        }
    }
}

/// A validated request, ready for the engine.
#[derive(Debug)]
pub(crate) struct Converted {
    /// The external id: the request's own, else a fresh UUIDv4.
    pub request_id: String,
    pub prompt: Arc<[u32]>,
    pub params: SeqParams,
    pub role: Role,
    pub opts: ResponseOpts,
}

/// Convert and validate. `encode` tokenises a text prompt (with special tokens, as vLLM's gRPC
/// path sets `add_special_tokens: true`); `new_id` mints the id of a request that has none.
pub(crate) fn convert(
    req: GenerateRequest,
    lim: &Limits,
    encode: impl Fn(&str) -> Result<Vec<u32>, String>,
    new_id: impl FnOnce() -> String,
) -> Result<Converted, Status> {
    use vllm_proto::generate_request::Prompt;
    // An empty model is proto3's "unset": the served model.
    if !req.model.is_empty() && req.model != lim.served_model_name {
        return Err(Status::not_found(format!(
            "model `{}` not found",
            req.model
        )));
    }
    let prompt = match req.prompt {
        Some(Prompt::Text(t)) => Err(t),
        Some(Prompt::TokenIds(ids)) => Ok(ids.ids),
        None => return Err(Status::invalid_argument("prompt is required")),
    };
    let request_id = if req.request_id.is_empty() {
        new_id()
    } else {
        req.request_id
    };
    // The simulator has one model without adapters (vLLM without `--enable-lora`).
    if !req.lora_name.is_empty() {
        return Err(Status::failed_precondition(
            "engine was not started with LoRA enabled",
        ));
    }
    if !req.media.is_empty() {
        return Err(Status::invalid_argument(
            "this model does not support multimodal inputs",
        ));
    }
    let sampling = req.sampling.unwrap_or_default();
    // vLLM: "the response path also hardcodes SequenceOutput.index = 0".
    if sampling.num_sequences > 1 {
        return Err(Status::invalid_argument(
            "num_sequences > 1 is not supported",
        ));
    }
    let decoding = req.decoding.unwrap_or_default();
    if decoding.structured_output.is_some() {
        return Err(Status::unimplemented(
            "structured output is not simulated over gRPC",
        ));
    }
    let response = req.response;
    if response
        .as_ref()
        .is_some_and(|r| r.prompt_logprobs || r.output_logprobs)
    {
        return Err(Status::unimplemented(
            "logprobs are not simulated over gRPC",
        ));
    }
    let stopping = req.stopping.unwrap_or_default();
    let invalid = |m: String| Status::invalid_argument(m);

    let mut ids = match prompt {
        Ok(ids) => ids,
        Err(text) => encode(&text).map_err(|e| invalid(format!("tokenizer error: {e}")))?,
    };
    if ids.is_empty() {
        return Err(invalid(format!(
            "text request `{request_id}` must contain at least one prompt token ID"
        )));
    }
    if let Some(bad) = ids.iter().find(|&&t| t >= lim.vocab_size) {
        return Err(invalid(format!(
            "prompt contains out-of-vocab token id {bad}; vocabulary size is {}",
            lim.vocab_size
        )));
    }
    // Positive values keep the last N tokens (fixed left truncation); 0 is proto3's "unset".
    if req.truncate_prompt_tokens != 0 {
        let n = req.truncate_prompt_tokens;
        let budget = lim.max_model_len.saturating_sub(stopping.max_new_tokens);
        if n > budget {
            return Err(invalid(format!(
                "truncate_prompt_tokens={n} cannot be greater than max_model_len - max_tokens = {budget}. Please request a smaller truncation size."
            )));
        }
        let n = n as usize;
        if ids.len() > n {
            ids.drain(..ids.len() - n);
        }
    }
    if stopping.stop_token_ids.len() > MAX_NUM_STOP_TOKEN_IDS {
        return Err(invalid(format!(
            "stop_token_ids has {} entries; maximum is {MAX_NUM_STOP_TOKEN_IDS}",
            stopping.stop_token_ids.len()
        )));
    }
    if let Some(bad) = stopping
        .stop_token_ids
        .iter()
        .find(|&&t| t >= lim.vocab_size)
    {
        return Err(invalid(format!(
            "stop_token_ids contains out-of-vocab token id {bad}; vocabulary size is {}",
            lim.vocab_size
        )));
    }
    if stopping.stop_strings.iter().any(String::is_empty) {
        return Err(invalid(format!(
            "text request `{request_id}` stop strings cannot be empty"
        )));
    }
    // `max_new_tokens = 0` is unset: the rest of the context (there is no generation config);
    // a larger request is capped to it, as Python's `get_max_tokens`.
    let prompt_len = ids.len() as u32;
    if prompt_len >= lim.max_model_len {
        return Err(invalid(format!(
            "this model's maximum context length is {} tokens, but the prompt contains {prompt_len} input tokens",
            lim.max_model_len
        )));
    }
    let room = lim.max_model_len - prompt_len;
    let max_tokens = match stopping.max_new_tokens {
        0 => room,
        n => n.min(room),
    };
    if stopping.min_new_tokens > max_tokens {
        return Err(invalid(format!(
            "`min_tokens` must be less than or equal to `max_tokens`, got min_tokens={}, max_tokens={max_tokens}",
            stopping.min_new_tokens
        )));
    }
    // Unset temperature is greedy on the gRPC API (HTTP's default is 1.0). The simulator's
    // tokens do not depend on it, but its range is still checked, as vLLM's lowering does.
    let temperature = req.temperature.unwrap_or(0.0);
    check_finite("temperature", temperature)?;
    check_range("temperature", temperature, 0.0, 2.0, "[0, 2]")?;
    if let Some(p) = sampling.top_p {
        if !(p > 0.0 && p <= 1.0) {
            return Err(out_of_range("top_p", p, "(0, 1]"));
        }
    }
    if let Some(p) = sampling.min_p {
        check_range("min_p", p, 0.0, 1.0, "[0, 1]")?;
    }
    check_range(
        "frequency_penalty",
        decoding.frequency_penalty,
        -2.0,
        2.0,
        "[-2, 2]",
    )?;
    check_range(
        "presence_penalty",
        decoding.presence_penalty,
        -2.0,
        2.0,
        "[-2, 2]",
    )?;
    // 0 is unset (1.0).
    let rep = decoding.repetition_penalty;
    if rep != 0.0 {
        check_finite("repetition_penalty", rep)?;
        if rep <= 0.0 {
            return Err(out_of_range("repetition_penalty", rep, "(0, inf)"));
        }
    }

    let role = match req.kv.and_then(|kv| kv.kv_transfer_params) {
        Some(s) => role_of(&struct_to_json(&s)),
        None => Role::Colocated,
    };
    Ok(Converted {
        request_id,
        prompt: Arc::from(ids),
        params: SeqParams {
            max_tokens: max_tokens as usize,
            min_tokens: stopping.min_new_tokens as usize,
            ignore_eos: stopping.ignore_eos,
            stop: stopping.stop_strings,
            stop_token_ids: stopping.stop_token_ids,
            include_stop_str_in_output: stopping.include_stop_strings,
            seed: sampling.seed.map(|s| s as u64),
            forced: None,
        },
        role,
        opts: ResponseOpts::from_proto(response.as_ref()),
    })
}

fn out_of_range(parameter: &str, value: f32, expected: &str) -> Status {
    Status::invalid_argument(format!("{parameter} must be in {expected}, got {value}"))
}

fn check_finite(parameter: &str, value: f32) -> Result<(), Status> {
    if value.is_finite() {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "{parameter} must be a finite number, got {value}"
        )))
    }
}

fn check_range(
    parameter: &str,
    value: f32,
    min: f32,
    max: f32,
    expected: &str,
) -> Result<(), Status> {
    if value >= min && value <= max {
        Ok(())
    } else {
        Err(out_of_range(parameter, value, expected))
    }
}

/// `x-data-parallel-rank` metadata (base 10, trimmed). The simulator is one DP rank, 0.
pub(crate) fn data_parallel_rank(value: Option<&[u8]>) -> Result<Option<u32>, Status> {
    let Some(raw) = value else { return Ok(None) };
    let bad = || {
        Status::invalid_argument("x-data-parallel-rank metadata must be an unsigned 32-bit integer")
    };
    let rank: u32 = std::str::from_utf8(raw)
        .map_err(|_| bad())?
        .trim()
        .parse()
        .map_err(|_| bad())?;
    if rank != 0 {
        return Err(Status::invalid_argument(format!(
            "data parallel rank {rank} is out of range: data_parallel_size is 1"
        )));
    }
    Ok(Some(rank))
}

/// The P/D role that `kv_transfer_params` (as JSON) asks for. Decode-role params that lack a
/// key are logged and ignored, as vLLM's NixlConnector does ("This request will not utilize
/// KVTransfer"): the request prefills locally.
pub(crate) fn role_of(p: &Value) -> Role {
    if p.get("do_remote_decode").and_then(Value::as_bool) == Some(true) {
        return Role::Prefill;
    }
    match remote_of(p) {
        Ok(Some(r)) => Role::Decode(r),
        Ok(None) => Role::Colocated,
        Err(missing) => {
            tracing::warn!("Got invalid KVTransferParams: {p} ({missing}). This request will not utilize KVTransfer");
            Role::Colocated
        }
    }
}

/// Decode-role params as the gRPC server sees them: every number a double.
pub(crate) fn remote_of(p: &Value) -> Result<Option<RemoteKv>, String> {
    RemoteKv::from_params(p, crate::engine::ParamNumbers::Doubles)
}

/// This engine's half of the params a prefill returns.
#[derive(Debug, Clone)]
pub(crate) struct KvIdentity {
    pub engine_id: String,
    pub host: String,
    pub port: u16,
    pub tp_size: u32,
}

/// The params a prefill-role request returns: the keys the HTTP surface returns.
pub(crate) fn kv_params(id: &KvIdentity, kv: &KvHandle) -> Value {
    json!({
        "do_remote_prefill": true,
        "do_remote_decode": false,
        "remote_block_ids": kv.block_ids,
        "remote_engine_id": id.engine_id,
        "remote_request_id": kv.remote_request_id,
        "remote_host": id.host,
        "remote_port": id.port,
        "tp_size": id.tp_size,
    })
}

/// `Struct` → JSON, as vLLM does it: numbers stay doubles (`5600` becomes `5600.0`).
pub(crate) fn struct_to_json(s: &prost_types::Struct) -> Value {
    tandem_model::pbjson::struct_to_json(s, tandem_model::pbjson::Numbers::Doubles)
}

pub(crate) use tandem_model::pbjson::json_to_struct;

#[cfg(test)]
#[path = "convert_tests.rs"]
mod tests;
