use serde_json::json;

use super::*;

/// A small validator for the keywords the generator supports (the test's oracle).
fn check(v: &Value, s: &Value, root: &Value) -> Result<(), String> {
    let Some(o) = s.as_object() else {
        return Ok(());
    };
    if let Some(t) = o.get("$ref").and_then(Value::as_str) {
        return check(v, resolve(root, t).ok_or("bad ref")?, root);
    }
    if let Some(c) = o.get("const") {
        return (v == c).then_some(()).ok_or(format!("{v} != const {c}"));
    }
    if let Some(Value::Array(e)) = o.get("enum") {
        return e
            .contains(v)
            .then_some(())
            .ok_or(format!("{v} not in enum"));
    }
    for k in ["anyOf", "oneOf"] {
        if let Some(Value::Array(b)) = o.get(k) {
            return b
                .iter()
                .any(|b| check(v, b, root).is_ok())
                .then_some(())
                .ok_or(format!("{v} matches no branch"));
        }
    }
    if let Some(Value::Array(b)) = o.get("allOf") {
        for b in b {
            check(v, b, root)?;
        }
    }
    let ty = match o.get("type") {
        Some(Value::String(t)) => vec![t.as_str()],
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
        _ => vec![],
    };
    let is = |t: &str| ty.is_empty() || ty.contains(&t);
    match v {
        Value::Object(m) => {
            if !is("object") {
                return Err(format!("object where {ty:?}"));
            }
            for r in o
                .get("required")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if !m.contains_key(r.as_str().unwrap()) {
                    return Err(format!("missing {r}"));
                }
            }
            let props = o.get("properties").and_then(Value::as_object);
            for (k, x) in m {
                match props.and_then(|p| p.get(k)) {
                    Some(ps) => check(x, ps, root)?,
                    None if o.get("additionalProperties") == Some(&json!(false)) => {
                        return Err(format!("extra key {k}"))
                    }
                    None => {}
                }
            }
        }
        Value::Array(a) => {
            if !is("array") {
                return Err(format!("array where {ty:?}"));
            }
            let min = o.get("minItems").and_then(Value::as_u64).unwrap_or(0);
            let max = o
                .get("maxItems")
                .and_then(Value::as_u64)
                .unwrap_or(u64::MAX);
            if (a.len() as u64) < min || a.len() as u64 > max {
                return Err(format!("{} items", a.len()));
            }
            if let Some(items) = o.get("items") {
                for x in a {
                    check(x, items, root)?;
                }
            }
        }
        Value::String(st) => {
            if !is("string") {
                return Err(format!("string where {ty:?}"));
            }
            let n = st.chars().count() as u64;
            if o.get("minLength")
                .and_then(Value::as_u64)
                .is_some_and(|m| n < m)
                || o.get("maxLength")
                    .and_then(Value::as_u64)
                    .is_some_and(|m| n > m)
            {
                return Err(format!("length of {st:?}"));
            }
        }
        Value::Number(x) => {
            let f = x.as_f64().unwrap();
            if x.is_i64() || x.is_u64() {
                if !is("integer") && !is("number") {
                    return Err(format!("integer where {ty:?}"));
                }
            } else if !is("number") {
                return Err(format!("number where {ty:?}"));
            }
            if o.get("minimum")
                .and_then(Value::as_f64)
                .is_some_and(|m| f < m)
                || o.get("maximum")
                    .and_then(Value::as_f64)
                    .is_some_and(|m| f > m)
                || o.get("exclusiveMinimum")
                    .and_then(Value::as_f64)
                    .is_some_and(|m| f <= m)
                || o.get("exclusiveMaximum")
                    .and_then(Value::as_f64)
                    .is_some_and(|m| f >= m)
            {
                return Err(format!("{f} out of bounds"));
            }
            if let Some(m) = o.get("multipleOf").and_then(Value::as_i64) {
                if x.as_i64().unwrap() % m != 0 {
                    return Err(format!("{f} not a multiple of {m}"));
                }
            }
        }
        Value::Bool(_) if !is("boolean") => return Err(format!("bool where {ty:?}")),
        Value::Null if !is("null") => return Err(format!("null where {ty:?}")),
        _ => {}
    }
    Ok(())
}

fn schemas() -> Vec<Value> {
    vec![
        json!({"type": "object", "properties": {
            "name": {"type": "string", "minLength": 3, "maxLength": 12},
            "age": {"type": "integer", "minimum": 18, "maximum": 99},
            "score": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
            "ok": {"type": "boolean"},
            "tags": {"type": "array", "items": {"type": "string"}, "minItems": 2, "maxItems": 4},
            "color": {"enum": ["red", "green", "blue"]},
            "kind": {"const": "fixed"},
            "when": {"type": "string", "format": "date-time"},
            "nested": {"type": "object", "properties": {
                "deep": {"type": "array", "items": {"type": "object",
                    "properties": {"x": {"type": "integer", "multipleOf": 5}}, "required": ["x"]}}
            }, "required": ["deep"]},
            "maybe": {"anyOf": [{"type": "null"}, {"type": "string"}]},
            "either": {"type": ["integer", "null"]}
        }, "required": ["name", "age"], "additionalProperties": false}),
        // pydantic style: definitions and references.
        json!({"$defs": {"Item": {"type": "object", "properties": {
                "sku": {"type": "string", "format": "uuid"}, "qty": {"type": "integer"}},
                "required": ["sku", "qty"]}},
               "type": "object",
               "properties": {"items": {"type": "array", "items": {"$ref": "#/$defs/Item"}}},
               "required": ["items"]}),
        // A recursive schema stays finite.
        json!({"$defs": {"Node": {"type": "object", "properties": {
                "v": {"type": "integer"},
                "children": {"type": "array", "items": {"$ref": "#/$defs/Node"}}},
                "required": ["v"]}},
               "$ref": "#/$defs/Node"}),
        json!({"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                         {"properties": {"b": {"type": "boolean"}}, "required": ["b"]}]}),
        json!({"type": "array", "items": {"type": "number"}}),
        json!({"type": "string", "enum": ["yes", "no"]}),
        json!({"type": "object"}),
        json!({}),
    ]
}

#[test]
fn rendered_json_matches_its_schema() {
    for s in schemas() {
        for key in 0..200u64 {
            let text = render(&Spec::Schema(s.clone()), key);
            let v: Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{text:?} is not JSON ({e}) for {s}"));
            check(&v, &s, &s).unwrap_or_else(|e| panic!("{e}: {text} for {s}"));
        }
    }
}

#[test]
fn rendering_is_deterministic_in_its_key_and_varies_with_it() {
    let s = Spec::Schema(schemas()[0].clone());
    assert_eq!(render(&s, 7), render(&s, 7));
    let distinct: std::collections::HashSet<String> = (0..50).map(|k| render(&s, k)).collect();
    assert!(distinct.len() > 40, "{}", distinct.len());
}

#[test]
fn any_object_and_choice() {
    for key in 0..200 {
        let text = render(&Spec::AnyObject, key);
        let v: Value = serde_json::from_str(&text).unwrap();
        assert!(v.as_object().is_some_and(|o| !o.is_empty()), "{text}");
        // Written as a model writes JSON: spaced separators.
        assert!(text.contains("\": "), "{text}");
    }
    let c = Spec::Choice(vec!["left".into(), "right".into()]);
    let picks: std::collections::HashSet<String> = (0..20).map(|k| render(&c, k)).collect();
    assert_eq!(picks.len(), 2);
}

fn params(v: Value) -> CommonParams {
    serde_json::from_value(v).unwrap()
}

#[test]
fn request_fields_select_the_constraint() {
    let s = json!({"type": "object", "properties": {"a": {"type": "integer"}}});
    let f = |v| from_request(&params(v));
    assert_eq!(f(json!({})).unwrap(), None);
    assert_eq!(
        f(json!({"response_format": {"type": "text"}})).unwrap(),
        None
    );
    assert_eq!(
        f(json!({"response_format": {"type": "json_object"}})).unwrap(),
        Some(Spec::AnyObject)
    );
    assert_eq!(
        f(json!({"response_format": {"type": "json_schema",
                   "json_schema": {"name": "x", "schema": s}}}))
        .unwrap(),
        Some(Spec::Schema(s.clone()))
    );
    assert_eq!(
        f(json!({"structured_outputs": {"json": s.to_string()}})).unwrap(),
        Some(Spec::Schema(s.clone()))
    );
    assert_eq!(
        f(json!({"structured_outputs": {"choice": ["a", "b"]}})).unwrap(),
        Some(Spec::Choice(vec!["a".into(), "b".into()]))
    );
    assert_eq!(
        f(json!({"guided_json": s})).unwrap(),
        Some(Spec::Schema(s.clone()))
    );
    assert_eq!(
        f(json!({"structured_outputs": {"regex": "a+"}})).unwrap(),
        None
    );
    for bad in [
        json!({"response_format": {"type": "yaml"}}),
        json!({"response_format": {"type": "json_schema"}}),
        json!({"structured_outputs": {"json": s, "choice": ["a"]}}),
        json!({"structured_outputs": {"json": "{not json"}}),
        json!({"structured_outputs": {"choice": []}}),
    ] {
        let e = f(bad.clone()).expect_err(&bad.to_string());
        assert_eq!(e.status, 400);
    }
}
