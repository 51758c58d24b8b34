//! Request bodies of vLLM's OpenAI surface (vllm-pd-protocol.md §5.1), and the error body.
//!
//! Unknown fields are accepted and ignored, as vLLM does (`extra="allow"`); known fields with the
//! wrong type are a 400.

use serde::Deserialize;
use serde_json::{json, Value};

/// `prompt`: a string, a list of strings, a list of ids, or a list of id lists.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
    IdLists(Vec<Vec<u32>>),
}

/// `stop`: a string or a list of strings.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    /// vLLM: `include_usage: bool | None = True`.
    pub include_usage: Option<bool>,
    pub continuous_usage_stats: Option<bool>,
}

/// Fields shared by completions and chat completions.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct CommonParams {
    pub model: Option<String>,
    pub max_tokens: Option<u64>,
    pub n: Option<u32>,
    pub seed: Option<i64>,
    pub stop: Option<Stop>,
    pub stop_token_ids: Option<Vec<u32>>,
    pub include_stop_str_in_output: Option<bool>,
    pub ignore_eos: Option<bool>,
    pub min_tokens: Option<u64>,
    #[serde(default)]
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub request_id: Option<String>,
    pub kv_transfer_params: Option<Value>,
    pub add_special_tokens: Option<bool>,
    /// vLLM extension: top-k logprobs of each prompt token (-1: the whole vocabulary).
    pub prompt_logprobs: Option<i64>,
    /// `{"type": "text" | "json_object" | "json_schema", "json_schema": {...}}`.
    pub response_format: Option<Value>,
    /// vLLM's `StructuredOutputsParams` (`json`, `json_object`, `choice`, ...).
    pub structured_outputs: Option<Value>,
    /// vLLM's older spellings of `structured_outputs.json` / `.choice`.
    pub guided_json: Option<Value>,
    pub guided_choice: Option<Vec<String>>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    pub prompt: Prompt,
    /// Top-k logprobs of each output token (completions: an integer).
    pub logprobs: Option<i64>,
    pub echo: Option<bool>,
    pub suffix: Option<String>,
    #[serde(flatten)]
    pub common: CommonParams,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<Value>,
    pub max_completion_tokens: Option<u64>,
    pub add_generation_prompt: Option<bool>,
    /// Template inputs besides the messages, as sent (see [`ChatRequest::template_inputs`]).
    pub tools: Option<Value>,
    pub documents: Option<Value>,
    pub chat_template_kwargs: Option<Value>,
    /// Chat: whether to return logprobs; `top_logprobs` says how many alternatives.
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<i64>,
    /// `"none"`, `"auto"`, `"required"` or `{"type": "function", "function": {"name": ..}}`.
    pub tool_choice: Option<Value>,
    #[serde(flatten)]
    pub common: CommonParams,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TokenizeRequest {
    pub model: Option<String>,
    pub prompt: Option<String>,
    pub messages: Option<Vec<Value>>,
    pub add_special_tokens: Option<bool>,
    pub add_generation_prompt: Option<bool>,
    pub return_token_strs: Option<bool>,
    pub tools: Option<Value>,
    pub documents: Option<Value>,
    pub chat_template_kwargs: Option<Value>,
}

impl ChatRequest {
    /// What the chat template is rendered with besides the messages.
    pub fn template_inputs(&self) -> tandem_model::ChatInputs<'_> {
        tandem_model::ChatInputs {
            tools: self.tools.as_ref(),
            documents: self.documents.as_ref(),
            chat_template_kwargs: self.chat_template_kwargs.as_ref(),
        }
    }
}

impl TokenizeRequest {
    /// What the chat template is rendered with besides the messages.
    pub fn template_inputs(&self) -> tandem_model::ChatInputs<'_> {
        tandem_model::ChatInputs {
            tools: self.tools.as_ref(),
            documents: self.documents.as_ref(),
            chat_template_kwargs: self.chat_template_kwargs.as_ref(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct DetokenizeRequest {
    pub model: Option<String>,
    pub tokens: Vec<u32>,
}

/// An OpenAI-style error, mapped to HTTP in one place ([`ApiError::into_response`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub kind: &'static str,
    pub message: String,
    pub param: Option<String>,
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError {
            status: 400,
            kind: "BadRequestError",
            message: message.into(),
            param: None,
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        ApiError {
            status: 404,
            kind: "NotFoundError",
            message: message.into(),
            param: None,
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        ApiError {
            status: 500,
            kind: "InternalServerError",
            message: message.into(),
            param: None,
        }
    }

    /// vLLM's `ErrorResponse` body.
    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.status,
        }})
    }
}

impl axum::response::IntoResponse for ApiError {
    fn into_response(self) -> axum::response::Response {
        let status = axum::http::StatusCode::from_u16(self.status)
            .unwrap_or(axum::http::StatusCode::INTERNAL_SERVER_ERROR);
        (status, axum::Json(self.body())).into_response()
    }
}

/// Normalise chat message content (see `tandem_model::chat`), as a 400 on bad shapes.
pub fn normalise_messages(messages: &[Value]) -> Result<Vec<Value>, ApiError> {
    tandem_model::chat::normalise_messages(messages).map_err(ApiError::bad_request)
}
