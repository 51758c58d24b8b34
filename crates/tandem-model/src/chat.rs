//! OpenAI chat message shapes.

use serde_json::{Map, Value};

/// Normalise chat message content as vLLM does before templating: a list of
/// `{type: "text", text}` parts becomes one string joined by newlines; a missing or null content
/// is the empty string. The error is a client-facing message (a 400).
pub fn normalise_messages(messages: &[Value]) -> Result<Vec<Value>, String> {
    messages
        .iter()
        .map(|m| {
            let obj = m
                .as_object()
                .ok_or_else(|| "each message must be an object".to_string())?;
            let role = obj
                .get("role")
                .and_then(Value::as_str)
                .ok_or_else(|| "each message needs a string `role`".to_string())?;
            let content = match obj.get("content") {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => parts
                    .iter()
                    .filter_map(|p| p.get("text").and_then(Value::as_str))
                    .collect::<Vec<_>>()
                    .join("\n"),
                Some(_) => {
                    return Err("message `content` must be a string or a list of parts".to_string())
                }
            };
            let mut out = obj.clone();
            out.insert("role".into(), Value::String(role.to_string()));
            out.insert("content".into(), Value::String(content));
            if role == "assistant" {
                if let Some(Value::Array(calls)) = out.get_mut("tool_calls") {
                    calls.iter_mut().for_each(parse_arguments);
                }
            }
            Ok(Value::Object(out))
        })
        .collect()
}

/// vLLM's `_postprocess_messages`: tool-use templates expect an assistant tool call's
/// `function.arguments` as an object, while OpenAI clients send a JSON string. A missing, null or
/// empty one becomes `{}`; a string that is not JSON is left as sent.
fn parse_arguments(call: &mut Value) {
    let Some(Value::Object(function)) = call.get_mut("function") else {
        return;
    };
    let parsed = match function.get("arguments") {
        None | Some(Value::Null) => Value::Object(Map::new()),
        Some(Value::String(s)) if s.is_empty() => Value::Object(Map::new()),
        Some(Value::String(s)) => match serde_json::from_str(s) {
            Ok(v) => v,
            Err(_) => return,
        },
        Some(_) => return,
    };
    function.insert("arguments".into(), parsed);
}

/// The request's `tools` as vLLM hands them to the template: each validated as a
/// `ChatCompletionToolsParam` and re-emitted by pydantic's `model_dump()`, so the declared fields
/// come first in declaration order (`type`, `function` with `name`, `description`, `parameters`),
/// absent optional ones as null, and any extra keys after them as sent. Templates print tools with
/// `tojson`, so this order is part of the prompt. The error is a client-facing message (a 400).
pub fn normalise_tools(tools: &Value) -> Result<Value, String> {
    let Value::Array(list) = tools else {
        return Err("`tools` must be a list".into());
    };
    list.iter()
        .map(|tool| {
            let obj = tool
                .as_object()
                .ok_or_else(|| "each tool must be an object".to_string())?;
            match obj.get("type") {
                None => {}
                Some(Value::String(t)) if t == "function" => {}
                Some(_) => return Err("tool `type` must be \"function\"".into()),
            }
            let function = obj
                .get("function")
                .and_then(Value::as_object)
                .ok_or_else(|| "each tool needs a `function` object".to_string())?;
            let name = function
                .get("name")
                .filter(|n| n.is_string())
                .ok_or_else(|| "each tool `function` needs a string `name`".to_string())?;
            let description = match function.get("description") {
                None | Some(Value::Null) => Value::Null,
                Some(d @ Value::String(_)) => d.clone(),
                Some(_) => return Err("tool `description` must be a string".into()),
            };
            let parameters = match function.get("parameters") {
                None | Some(Value::Null) => Value::Null,
                Some(p @ Value::Object(_)) => p.clone(),
                Some(_) => return Err("tool `parameters` must be an object".into()),
            };
            let mut f = Map::new();
            f.insert("name".into(), name.clone());
            f.insert("description".into(), description);
            f.insert("parameters".into(), parameters);
            for (k, v) in function {
                if !f.contains_key(k) {
                    f.insert(k.clone(), v.clone());
                }
            }
            let mut out = Map::new();
            out.insert("type".into(), Value::String("function".into()));
            out.insert("function".into(), Value::Object(f));
            for (k, v) in obj {
                if !out.contains_key(k) {
                    out.insert(k.clone(), v.clone());
                }
            }
            Ok(Value::Object(out))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Value::Array)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parts_are_joined_and_null_content_is_empty() {
        let out = normalise_messages(&[
            json!({"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}),
            json!({"role": "assistant", "content": null}),
        ])
        .unwrap();
        assert_eq!(out[0]["content"], "a\nb");
        assert_eq!(out[1]["content"], "");
        assert!(normalise_messages(&[json!({"content": "x"})]).is_err());
        assert!(normalise_messages(&[json!({"role": "user", "content": 3})]).is_err());
    }

    #[test]
    fn tool_call_arguments_are_parsed_and_other_keys_kept() {
        let out = normalise_messages(&[
            json!({"role": "assistant", "content": null, "reasoning_content": "hm", "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"b\": 1, \"a\": [2]}"}},
                {"id": "c2", "type": "function", "function": {"name": "g", "arguments": "not json"}},
                {"id": "c3", "type": "function", "function": {"name": "h", "arguments": ""}},
                {"id": "c4", "type": "function", "function": {"name": "k"}},
            ]}),
            json!({"role": "tool", "tool_call_id": "c1", "name": "f", "content": "{\"x\": 1}"}),
        ])
        .unwrap();
        let calls = &out[0]["tool_calls"];
        assert_eq!(calls[0]["function"]["arguments"], json!({"b": 1, "a": [2]}));
        // Key order is the client's: templates print arguments with `tojson`.
        let keys: Vec<_> = calls[0]["function"]["arguments"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        assert_eq!(keys, ["b", "a"]);
        assert_eq!(calls[1]["function"]["arguments"], "not json");
        assert_eq!(calls[2]["function"]["arguments"], json!({}));
        assert_eq!(calls[3]["function"]["arguments"], json!({}));
        assert_eq!(out[0]["reasoning_content"], "hm");
        assert_eq!(out[0]["content"], "");
        // A tool message's content is the client's string, not parsed.
        assert_eq!(out[1]["content"], "{\"x\": 1}");
        assert_eq!(out[1]["tool_call_id"], "c1");
        assert_eq!(out[1]["name"], "f");
    }

    #[test]
    fn tools_are_emitted_as_vllm_dumps_them() {
        let out = normalise_tools(&json!([
            {"function": {"extra": 1, "parameters": {"type": "object"}, "name": "f"}, "x": true},
        ]))
        .unwrap();
        assert_eq!(
            serde_json::to_string(&out).unwrap(),
            r#"[{"type":"function","function":{"name":"f","description":null,"parameters":{"type":"object"},"extra":1},"x":true}]"#
        );
        assert!(normalise_tools(&json!({"a": 1})).is_err());
        assert!(normalise_tools(&json!([{"type": "function"}])).is_err());
        assert!(normalise_tools(&json!([{"type": "web", "function": {"name": "f"}}])).is_err());
        assert!(normalise_tools(&json!([{"function": {"name": 3}}])).is_err());
    }
}
