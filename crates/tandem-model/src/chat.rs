//! OpenAI chat message shapes.

use serde_json::Value;

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
            Ok(Value::Object(out))
        })
        .collect()
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
}
