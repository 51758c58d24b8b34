//! Chat tool calls: `tools` + `tool_choice` validated as vLLM validates them
//! (`ChatCompletionRequest.check_tool_usage`), and the vLLM-shaped answer.
//!
//! vLLM constrains a `required` or named call with a JSON-schema grammar and parses an `auto`
//! call out of the model's text with `--tool-call-parser`. The simulator always calls one tool
//! (the named one, else the first) and writes its arguments with [`super::structured`] from
//! the tool's `parameters` schema; those argument tokens are the output (`usage` counts them).
//! `auto` is answered as if the server ran with `--enable-auto-tool-choice` and a parser, and
//! as if the model always chose to call.

use serde_json::{json, Value};

use super::structured::Spec;
use super::wire::ApiError;
use crate::scheduler::FinishReason;

/// How the call was asked for; it decides `content` and `finish_reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Auto,
    Required,
    Named,
}

/// The one tool call a request's answer carries.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub mode: Mode,
    pub name: String,
    /// The tool's `parameters` schema (`None`: the tool takes none).
    pub parameters: Option<Value>,
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::bad_request(msg)
}

const CORRECT_USAGE: &str =
    r#"Correct usage: `{"type": "function", "function": {"name": "my_function"}}`"#;

/// The call a request asks for, or `None` for a text answer.
pub fn choose(
    tools: Option<&Value>,
    tool_choice: Option<&Value>,
) -> Result<Option<Call>, ApiError> {
    let tools = match tools {
        None | Some(Value::Null) => None,
        Some(Value::Array(a)) => Some(a.as_slice()),
        Some(_) => return Err(bad("`tools` must be a list of tools")),
    };
    // Each tool: `{"type": "function", "function": {"name", "parameters"?}}`.
    let mut defs = Vec::new();
    for t in tools.unwrap_or_default() {
        if t.get("type").is_some_and(|ty| ty != "function") {
            return Err(bad(format!("unsupported tool type: {}", t["type"])));
        }
        let f = t.get("function").filter(|f| f.is_object()).ok_or_else(|| {
            bad("each tool must be {\"type\": \"function\", \"function\": {...}}")
        })?;
        let name = f
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("each tool's function must have a string `name`"))?;
        let params = f.get("parameters").filter(|p| !p.is_null()).cloned();
        if params.as_ref().is_some_and(|p| !p.is_object()) {
            return Err(bad(format!(
                "the parameters of tool `{name}` must be a JSON schema object"
            )));
        }
        defs.push((name.to_string(), params));
    }
    let choice = match tool_choice {
        None | Some(Value::Null) => {
            // vLLM: tools without a tool_choice default to "auto".
            if defs.is_empty() {
                return Ok(None);
            }
            &Value::from("auto")
        }
        Some(c) => c,
    };
    if choice == "none" {
        return Ok(None);
    }
    if tools.is_none() {
        return Err(bad("When using `tool_choice`, `tools` must be set."));
    }
    let pick = |mode: Mode, i: usize| {
        let (name, parameters) = defs[i].clone();
        Some(Call {
            mode,
            name,
            parameters,
        })
    };
    match choice {
        Value::String(s) if s == "auto" || s == "required" => {
            // "required" with no tools behaves as "none" (vLLM follows OpenAI here).
            if defs.is_empty() {
                return Ok(None);
            }
            let mode = if s == "auto" {
                Mode::Auto
            } else {
                Mode::Required
            };
            Ok(pick(mode, 0))
        }
        Value::Object(o) => {
            let f = o.get("function");
            let Some(f) = f.filter(|f| f.is_object()) else {
                return Err(bad(format!(
                    "Invalid value for `function`: `{}` in `tool_choice`! {CORRECT_USAGE}",
                    f.unwrap_or(&Value::Null)
                )));
            };
            let name = match f.get("name") {
                None => {
                    return Err(bad(format!(
                        "Expected field `name` in `function` in `tool_choice`! {CORRECT_USAGE}"
                    )))
                }
                Some(Value::String(n)) if !n.is_empty() => n,
                Some(n) => {
                    return Err(bad(format!(
                        "Invalid `name` in `function`: `{n}` in `tool_choice`! {CORRECT_USAGE}"
                    )))
                }
            };
            let i = defs.iter().position(|(n, _)| n == name).ok_or_else(|| {
                bad("The tool specified in `tool_choice` does not match any of the specified `tools`")
            })?;
            Ok(pick(Mode::Named, i))
        }
        other => Err(bad(format!(
            "Invalid value for `tool_choice`: {other}! Only named tools, \"none\", \"auto\" or \"required\" are supported."
        ))),
    }
}

impl Call {
    /// What the arguments must look like.
    pub fn spec(&self) -> Spec {
        Spec::Schema(
            self.parameters
                .clone()
                .unwrap_or_else(|| json!({"type": "object", "properties": {}})),
        )
    }

    /// vLLM: `"tool_calls"` when an auto call was parsed or a required one completed; a named
    /// call finishes as its sequence did (`"stop"`); a cut call stays `"length"`.
    pub fn finish_reason(&self, reason: Option<FinishReason>) -> Option<&'static str> {
        match (reason, self.mode) {
            (Some(FinishReason::Stop), Mode::Auto | Mode::Required) => Some("tool_calls"),
            _ => None,
        }
    }

    /// The non-streaming `message`. vLLM leaves `content` empty for required and named calls,
    /// and `null` when an auto parser found no text before the call.
    pub fn message(&self, id: &str, arguments: &str) -> Value {
        let content = match self.mode {
            Mode::Auto => Value::Null,
            Mode::Required | Mode::Named => "".into(),
        };
        json!({"role": "assistant", "content": content, "refusal": null, "annotations": null,
               "audio": null, "function_call": null,
               "tool_calls": [{"id": id, "type": "function",
                               "function": {"name": self.name, "arguments": arguments}}],
               "reasoning_content": null})
    }

    /// A streamed delta: the first names the call (as vLLM's named-tool stream does, with the
    /// first argument fragment); later ones carry argument fragments only.
    pub fn delta(&self, id: &str, first: bool, fragment: &str) -> Value {
        let call = if first {
            json!({"index": 0, "id": id, "type": "function",
                   "function": {"name": self.name, "arguments": fragment}})
        } else {
            json!({"index": 0, "function": {"arguments": fragment}})
        };
        json!({ "tool_calls": [call] })
    }
}

/// vLLM's `make_tool_call_id`: `chatcmpl-tool-` and 32 hex digits (random there; drawn from
/// the request's key here, so P/D and colocated answers agree).
pub fn call_id(key: u64) -> String {
    let a = crate::sampler::mix(key ^ 0x7001);
    let b = crate::sampler::mix(a);
    format!("chatcmpl-tool-{a:016x}{b:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tools() -> Value {
        json!([
            {"type": "function", "function": {"name": "get_weather",
             "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                            "required": ["city"]}}},
            {"type": "function", "function": {"name": "ping"}},
        ])
    }

    #[test]
    fn tool_choice_modes() {
        let t = tools();
        let c = |choice: Option<Value>| choose(Some(&t), choice.as_ref());
        let auto = c(None).unwrap().unwrap();
        assert_eq!((auto.mode, auto.name.as_str()), (Mode::Auto, "get_weather"));
        assert_eq!(c(Some(json!("none"))).unwrap(), None);
        assert_eq!(
            c(Some(json!("required"))).unwrap().unwrap().mode,
            Mode::Required
        );
        let named = c(Some(
            json!({"type": "function", "function": {"name": "ping"}}),
        ))
        .unwrap()
        .unwrap();
        assert_eq!((named.mode, named.name.as_str()), (Mode::Named, "ping"));
        assert_eq!(named.parameters, None);
        assert_eq!(
            super::super::structured::render(&named.spec(), 3),
            "{}",
            "a tool without parameters gets empty arguments"
        );
        assert_eq!(choose(None, None).unwrap(), None);
        assert_eq!(
            choose(Some(&json!([])), Some(&json!("required"))).unwrap(),
            None
        );
    }

    #[test]
    fn bad_tool_usage_is_a_400() {
        let t = tools();
        for (tools, choice, msg) in [
            (None, json!("auto"), "`tools` must be set"),
            (
                Some(&t),
                json!("sometimes"),
                "Invalid value for `tool_choice`",
            ),
            (
                Some(&t),
                json!({"type": "function", "function": {"name": "nope"}}),
                "does not match any of the specified `tools`",
            ),
            (
                Some(&t),
                json!({"type": "function"}),
                "Invalid value for `function`",
            ),
            (Some(&t), json!({"function": {}}), "Expected field `name`"),
        ] {
            let e = choose(tools, Some(&choice)).expect_err(msg);
            assert_eq!(e.status, 400);
            assert!(e.message.contains(msg), "{}", e.message);
        }
        let e = choose(Some(&json!([{"type": "function"}])), None).unwrap_err();
        assert_eq!(e.status, 400);
    }

    #[test]
    fn answer_shapes() {
        let call = choose(Some(&tools()), None).unwrap().unwrap();
        let id = call_id(9);
        assert!(
            id.starts_with("chatcmpl-tool-") && id.len() == 14 + 32,
            "{id}"
        );
        assert_eq!(id, call_id(9));
        let m = call.message(&id, "{\"city\": \"x\"}");
        assert_eq!(m["content"], Value::Null);
        assert_eq!(m["tool_calls"][0]["function"]["name"], "get_weather");
        assert_eq!(
            call.finish_reason(Some(FinishReason::Stop)),
            Some("tool_calls")
        );
        assert_eq!(call.finish_reason(Some(FinishReason::Length)), None);
        let first = call.delta(&id, true, "{\"");
        assert_eq!(first["tool_calls"][0]["id"], id.as_str());
        assert_eq!(first["tool_calls"][0]["function"]["arguments"], "{\"");
        let later = call.delta(&id, false, "city");
        assert!(later["tool_calls"][0].get("id").is_none());
        let named = Call {
            mode: Mode::Named,
            ..call
        };
        assert_eq!(named.finish_reason(Some(FinishReason::Stop)), None);
        assert_eq!(named.message(&id, "{}")["content"], "");
    }
}
