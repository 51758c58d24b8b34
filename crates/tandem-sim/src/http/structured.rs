//! Structured output (`response_format`, `structured_outputs`, `guided_json`/`guided_choice`,
//! and tool-call arguments): the text a grammar-constrained request produces.
//!
//! vLLM masks the logits with a grammar (xgrammar) so the model can only write text the schema
//! accepts. The simulator has no model to mask, so it writes such text itself: [`render`] builds
//! a JSON document of the schema's shape with values drawn from a 64-bit key (seed, prompt,
//! choice index), and the HTTP layer tokenizes it and has the engine emit exactly those tokens
//! (`SeqParams::forced`). The same request therefore yields the same document on any engine,
//! colocated or disaggregated.
//!
//! Supported schema keywords: `type` (also as a list), `properties`/`required`,
//! `additionalProperties: false`, `items`/`prefixItems`/`minItems`/`maxItems`, `enum`, `const`,
//! `anyOf`/`oneOf` (one branch), `allOf` (merged), local `$ref` (`#/$defs/..`), string
//! `minLength`/`maxLength`/`format` (date, date-time, time, email, uri, uuid, ipv4), number and
//! integer bounds and integer `multipleOf`. `pattern` is not honoured (no regex generator), nor
//! are `uniqueItems` and `minProperties`.

use serde_json::{Map, Value};

use super::wire::{ApiError, CommonParams};
use crate::sampler::mix;

/// What the output must be.
#[derive(Debug, Clone, PartialEq)]
pub enum Spec {
    /// `json_object`: any JSON object.
    AnyObject,
    /// Valid against this JSON schema.
    Schema(Value),
    /// One of these strings, verbatim (`choice`).
    Choice(Vec<String>),
}

/// The structured-output constraint of a request, if any (vLLM folds `response_format` into
/// `structured_outputs`; the older `guided_*` fields are its previous spelling).
///
/// `regex`, `grammar` and `structural_tag` constraints are accepted and not enforced: the
/// output stays free text.
pub fn from_request(c: &CommonParams) -> Result<Option<Spec>, ApiError> {
    if let Some(rf) = c.response_format.as_ref().filter(|v| !v.is_null()) {
        let ty = rf.get("type").and_then(Value::as_str).ok_or_else(|| {
            ApiError::bad_request("response_format must be an object with a string `type`")
        })?;
        return match ty {
            "text" | "structural_tag" => Ok(None),
            "json_object" => Ok(Some(Spec::AnyObject)),
            "json_schema" => {
                let js = rf.get("json_schema").filter(|v| !v.is_null()).ok_or_else(|| {
                    ApiError::bad_request(
                        "response_format of type `json_schema` requires `json_schema`",
                    )
                })?;
                // vLLM reads the schema under `schema` (OpenAI's key); none means any object.
                Ok(Some(match js.get("schema").filter(|v| !v.is_null()) {
                    Some(s) => Spec::Schema(schema_value(s)?),
                    None => Spec::AnyObject,
                }))
            }
            other => Err(ApiError::bad_request(format!(
                "response_format type must be one of 'text', 'json_object', 'json_schema' or 'structural_tag', got '{other}'"
            ))),
        };
    }
    if let Some(so) = c.structured_outputs.as_ref().filter(|v| !v.is_null()) {
        let set = |k: &str| match so.get(k) {
            None | Some(Value::Null) | Some(Value::Bool(false)) => None,
            Some(v) => Some(v),
        };
        let kinds = [
            "json",
            "regex",
            "choice",
            "grammar",
            "json_object",
            "structural_tag",
        ];
        let present: Vec<&str> = kinds.into_iter().filter(|k| set(k).is_some()).collect();
        if present.len() > 1 {
            // vLLM's `StructuredOutputsParams.__post_init__`.
            return Err(ApiError::bad_request(format!(
                "You can only use one kind of structured outputs constraint but multiple are specified: {so}"
            )));
        }
        if let Some(j) = set("json") {
            return Ok(Some(Spec::Schema(schema_value(j)?)));
        }
        if set("json_object").is_some() {
            return Ok(Some(Spec::AnyObject));
        }
        if let Some(ch) = set("choice") {
            return choice(ch);
        }
        return Ok(None);
    }
    if let Some(j) = c.guided_json.as_ref().filter(|v| !v.is_null()) {
        return Ok(Some(Spec::Schema(schema_value(j)?)));
    }
    if let Some(ch) = &c.guided_choice {
        return choice(&Value::from(ch.clone()));
    }
    Ok(None)
}

/// A schema given as an object or as a JSON string.
fn schema_value(v: &Value) -> Result<Value, ApiError> {
    match v {
        Value::String(s) => serde_json::from_str(s)
            .map_err(|e| ApiError::bad_request(format!("invalid JSON schema: {e}"))),
        Value::Object(_) | Value::Bool(_) => Ok(v.clone()),
        _ => Err(ApiError::bad_request(
            "a JSON schema must be an object or a JSON string",
        )),
    }
}

fn choice(v: &Value) -> Result<Option<Spec>, ApiError> {
    let list: Vec<String> = v
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|c| c.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    if list.is_empty() {
        return Err(ApiError::bad_request(
            "`choice` must be a non-empty list of strings",
        ));
    }
    Ok(Some(Spec::Choice(list)))
}

/// The output text for `spec`, a pure function of `key`.
pub fn render(spec: &Spec, key: u64) -> String {
    match spec {
        Spec::Choice(c) => {
            let mut d = Draw(key);
            c[d.below(c.len() as u64) as usize].clone()
        }
        Spec::AnyObject => {
            let mut g = Gen::new(&Value::Null, key);
            g.any_object(0);
            g.out
        }
        Spec::Schema(s) => {
            let mut g = Gen::new(s, key);
            g.value(s, 0);
            g.out
        }
    }
}

/// Below this depth every optional property and a few array items are written; at and beyond
/// it only what the schema requires (keeps recursive schemas finite).
const SOFT_DEPTH: usize = 4;
/// Beyond this, `null` whatever the schema (a recursive schema with required self-reference
/// has no finite instance).
const HARD_DEPTH: usize = 16;

const WORDS: &[&str] = &[
    "alpha", "amber", "anchor", "apple", "arrow", "autumn", "basil", "beacon", "birch", "blue",
    "bridge", "canyon", "cedar", "cloud", "coral", "crane", "delta", "dune", "ember", "falcon",
    "fern", "forest", "garnet", "glacier", "harbor", "hazel", "island", "ivory", "jade", "juniper",
    "lantern", "lemon", "maple", "meadow", "mist", "north", "ocean", "olive", "orchid", "pebble",
    "pine", "quartz", "river", "saffron", "shore", "silver", "stone", "summit", "thistle", "tide",
    "valley", "willow", "winter", "zephyr",
];

const KEYS: &[&str] = &[
    "name", "id", "title", "count", "value", "status", "tags", "score", "active", "summary",
    "kind", "level",
];

/// A stream of 64-bit draws from a key.
struct Draw(u64);

impl Draw {
    fn next(&mut self) -> u64 {
        self.0 = mix(self.0.wrapping_add(0x9e37_79b9_7f4a_7c15));
        self.0
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }

    fn word(&mut self) -> &'static str {
        WORDS[self.below(WORDS.len() as u64) as usize]
    }
}

struct Gen<'a> {
    root: &'a Value,
    d: Draw,
    out: String,
}

impl<'a> Gen<'a> {
    fn new(root: &'a Value, key: u64) -> Self {
        Gen {
            root,
            d: Draw(key),
            out: String::new(),
        }
    }

    fn value(&mut self, s: &Value, depth: usize) {
        let obj = match s {
            Value::Object(o) => o,
            // `true` accepts anything; `false` nothing (null is as good as any).
            Value::Bool(true) => return self.words_string(&Map::new()),
            _ => return self.out.push_str("null"),
        };
        if depth > HARD_DEPTH {
            return self.out.push_str("null");
        }
        if let Some(target) = obj
            .get("$ref")
            .and_then(Value::as_str)
            .and_then(|r| resolve(self.root, r))
        {
            return self.value(target, depth + 1);
        }
        if let Some(c) = obj.get("const") {
            return self.push_json(c);
        }
        if let Some(Value::Array(e)) = obj.get("enum") {
            if !e.is_empty() {
                let pick = &e[self.d.below(e.len() as u64) as usize];
                return self.push_json(pick);
            }
        }
        for k in ["anyOf", "oneOf"] {
            if let Some(Value::Array(branches)) = obj.get(k) {
                // Prefer a branch that carries a value over `{"type": "null"}`.
                let valued: Vec<&Value> = branches
                    .iter()
                    .filter(|b| b.get("type").and_then(Value::as_str) != Some("null"))
                    .collect();
                let from: Vec<&Value> = if valued.is_empty() {
                    branches.iter().collect()
                } else {
                    valued
                };
                if !from.is_empty() {
                    let b = from[self.d.below(from.len() as u64) as usize];
                    return self.value(b, depth + 1);
                }
            }
        }
        if let Some(Value::Array(parts)) = obj.get("allOf") {
            let merged = self.merge_all_of(obj, parts);
            return self.value(&merged, depth + 1);
        }
        match type_of(obj) {
            "object" => self.object(obj, depth),
            "array" => self.array(obj, depth),
            "integer" => self.integer(obj),
            "number" => self.number(obj),
            "boolean" => {
                let b = self.d.below(2) == 0;
                self.out.push_str(if b { "true" } else { "false" });
            }
            "null" => self.out.push_str("null"),
            _ => self.string(obj),
        }
    }

    fn push_json(&mut self, v: &Value) {
        // Compact JSON, re-spaced the way a model writes it (`", "`, `": "`).
        write_spaced(v, &mut self.out);
    }

    fn merge_all_of(&self, base: &Map<String, Value>, parts: &[Value]) -> Value {
        let mut m = base.clone();
        m.remove("allOf");
        let mut props = m
            .get("properties")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        let mut required: Vec<Value> = m
            .get("required")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        for p in parts {
            let p = p
                .get("$ref")
                .and_then(Value::as_str)
                .and_then(|r| resolve(self.root, r))
                .unwrap_or(p);
            let Some(po) = p.as_object() else { continue };
            if let Some(pp) = po.get("properties").and_then(Value::as_object) {
                props.extend(pp.clone());
            }
            if let Some(r) = po.get("required").and_then(Value::as_array) {
                required.extend(r.iter().cloned());
            }
            for (k, v) in po {
                if k != "properties" && k != "required" && !m.contains_key(k) {
                    m.insert(k.clone(), v.clone());
                }
            }
        }
        if !props.is_empty() {
            m.insert("properties".into(), Value::Object(props));
        }
        if !required.is_empty() {
            m.insert("required".into(), Value::Array(required));
        }
        Value::Object(m)
    }

    fn object(&mut self, obj: &Map<String, Value>, depth: usize) {
        let required: Vec<&str> = obj
            .get("required")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let props = obj.get("properties").and_then(Value::as_object);
        if props.is_none_or(Map::is_empty) && required.is_empty() {
            // `"properties": {}` (a tool without arguments) or no extra keys allowed: `{}`;
            // a bare `{"type": "object"}` is any object.
            if props.is_some() || obj.get("additionalProperties") == Some(&Value::Bool(false)) {
                return self.out.push_str("{}");
            }
            return self.any_object(depth);
        }
        self.out.push('{');
        let mut first = true;
        let mut sep = |out: &mut String| {
            if !std::mem::take(&mut first) {
                out.push_str(", ");
            }
        };
        if let Some(props) = props {
            for (k, v) in props {
                if depth >= SOFT_DEPTH && !required.contains(&k.as_str()) {
                    continue;
                }
                sep(&mut self.out);
                self.push_json(&Value::String(k.clone()));
                self.out.push_str(": ");
                self.value(v, depth + 1);
            }
        }
        for r in required {
            if props.is_some_and(|p| p.contains_key(r)) {
                continue;
            }
            sep(&mut self.out);
            self.push_json(&Value::String(r.to_string()));
            self.out.push_str(": ");
            self.words_string(&Map::new());
        }
        self.out.push('}');
    }

    /// A small object of the kind a model writes for "reply in JSON".
    fn any_object(&mut self, depth: usize) {
        let n = if depth >= SOFT_DEPTH {
            1
        } else {
            2 + self.d.below(3)
        };
        let start = self.d.below(KEYS.len() as u64) as usize;
        self.out.push('{');
        for i in 0..n as usize {
            if i > 0 {
                self.out.push_str(", ");
            }
            let key = KEYS[(start + i) % KEYS.len()];
            self.out.push('"');
            self.out.push_str(key);
            self.out.push_str("\": ");
            match self.d.below(4) {
                0 => {
                    let v = self.d.below(1000);
                    self.out.push_str(&v.to_string());
                }
                1 => {
                    let b = self.d.below(2) == 0;
                    self.out.push_str(if b { "true" } else { "false" });
                }
                2 if depth < SOFT_DEPTH => {
                    self.out.push('[');
                    for j in 0..1 + self.d.below(3) {
                        if j > 0 {
                            self.out.push_str(", ");
                        }
                        let w = self.d.word();
                        self.out.push('"');
                        self.out.push_str(w);
                        self.out.push('"');
                    }
                    self.out.push(']');
                }
                _ => self.words_string(&Map::new()),
            }
        }
        self.out.push('}');
    }

    fn array(&mut self, obj: &Map<String, Value>, depth: usize) {
        let min = obj.get("minItems").and_then(Value::as_u64).unwrap_or(0);
        let max = obj
            .get("maxItems")
            .and_then(Value::as_u64)
            .unwrap_or(u64::MAX);
        let n = if depth >= SOFT_DEPTH {
            min
        } else {
            let lo = min.max(1).min(max);
            let hi = lo.saturating_add(2).min(max).max(lo);
            lo + self.d.below(hi - lo + 1)
        };
        let prefix: &[Value] = obj
            .get("prefixItems")
            .and_then(Value::as_array)
            .map_or(&[], Vec::as_slice);
        let items = obj.get("items").cloned().unwrap_or(Value::Bool(true));
        let n = n.max(prefix.len() as u64);
        self.out.push('[');
        for i in 0..n as usize {
            if i > 0 {
                self.out.push_str(", ");
            }
            let s = prefix.get(i).unwrap_or(&items).clone();
            self.value(&s, depth + 1);
        }
        self.out.push(']');
    }

    fn integer(&mut self, obj: &Map<String, Value>) {
        let f = |k: &str| obj.get(k).and_then(Value::as_f64);
        let lo = f("minimum")
            .map(f64::ceil)
            .or(f("exclusiveMinimum").map(|x| x.floor() + 1.0));
        let hi = f("maximum")
            .map(f64::floor)
            .or(f("exclusiveMaximum").map(|x| x.ceil() - 1.0));
        let (lo, hi) = bounds(lo, hi, 100.0);
        let (lo, hi) = (lo as i64, hi as i64);
        let mut v = lo + self.d.below((hi - lo) as u64 + 1) as i64;
        if let Some(m) = obj
            .get("multipleOf")
            .and_then(Value::as_i64)
            .filter(|m| *m > 0)
        {
            v = v.div_euclid(m) * m;
            if v < lo {
                v += m;
            }
        }
        self.out.push_str(&v.to_string());
    }

    fn number(&mut self, obj: &Map<String, Value>) {
        let f = |k: &str| obj.get(k).and_then(Value::as_f64);
        let lo = f("minimum").or(f("exclusiveMinimum").map(|x| x + 0.25));
        let hi = f("maximum").or(f("exclusiveMaximum").map(|x| x - 0.25));
        let (lo, hi) = bounds(lo, hi, 100.0);
        // Quarter steps: short decimal text, as a model would write.
        let steps = ((hi - lo) * 4.0).floor().max(0.0) as u64;
        let v = lo + self.d.below(steps + 1) as f64 / 4.0;
        let v = if v.fract() == 0.0 && self.d.below(2) == 0 {
            v + 0.5
        } else {
            v
        };
        let v = if v > hi { lo } else { v };
        let n = serde_json::Number::from_f64(v).unwrap_or_else(|| 0.into());
        self.out.push_str(&n.to_string());
    }

    fn string(&mut self, obj: &Map<String, Value>) {
        let fmt = obj.get("format").and_then(Value::as_str).unwrap_or("");
        let mut d = |n: u64| self.d.below(n);
        let text = match fmt {
            "date" => format!("{:04}-{:02}-{:02}", 2000 + d(30), 1 + d(12), 1 + d(28)),
            "date-time" => format!(
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
                2000 + d(30),
                1 + d(12),
                1 + d(28),
                d(24),
                d(60),
                d(60)
            ),
            "time" => format!("{:02}:{:02}:{:02}", d(24), d(60), d(60)),
            "email" => format!("{}@example.com", self.d.word()),
            "uri" | "url" => format!("https://example.com/{}", self.d.word()),
            "uuid" => {
                let (a, b) = (self.d.next(), self.d.next());
                let h = format!("{a:016x}{b:016x}");
                format!(
                    "{}-{}-{}-{}-{}",
                    &h[..8],
                    &h[8..12],
                    &h[12..16],
                    &h[16..20],
                    &h[20..]
                )
            }
            "ipv4" => format!("10.{}.{}.{}", d(256), d(256), 1 + d(254)),
            _ => return self.words_string(obj),
        };
        self.push_json(&Value::String(text));
    }

    /// One to three words, fitted to `minLength`/`maxLength`.
    fn words_string(&mut self, obj: &Map<String, Value>) {
        let min = obj.get("minLength").and_then(Value::as_u64).unwrap_or(0) as usize;
        let max = obj
            .get("maxLength")
            .and_then(Value::as_u64)
            .map_or(usize::MAX, |m| m as usize);
        let mut s = String::new();
        for i in 0..1 + self.d.below(3) {
            if i > 0 {
                s.push(' ');
            }
            s.push_str(self.d.word());
        }
        while s.len() < min {
            s.push(' ');
            s.push_str(self.d.word());
        }
        if s.len() > max {
            s.truncate(max);
            let trimmed = s.trim_end().len();
            s.truncate(trimmed);
        }
        while s.len() < min.min(max) {
            s.push('a');
        }
        self.push_json(&Value::String(s));
    }
}

/// The schema's type: `type` (the first non-null of a list), else what its keywords imply.
fn type_of(obj: &Map<String, Value>) -> &str {
    match obj.get("type") {
        Some(Value::String(t)) => return t,
        Some(Value::Array(ts)) => {
            let names: Vec<&str> = ts.iter().filter_map(Value::as_str).collect();
            return names
                .iter()
                .find(|t| **t != "null")
                .or(names.first())
                .copied()
                .unwrap_or("string");
        }
        _ => {}
    }
    let has = |k: &str| obj.contains_key(k);
    if has("properties") || has("required") || has("additionalProperties") {
        "object"
    } else if has("items") || has("prefixItems") {
        "array"
    } else if has("minimum") || has("maximum") {
        "number"
    } else {
        "string"
    }
}

/// `[lo, hi]` from optional bounds, `span` wide when only one (or none) is given.
fn bounds(lo: Option<f64>, hi: Option<f64>, span: f64) -> (f64, f64) {
    match (lo, hi) {
        (Some(l), Some(h)) if h >= l => (l, h),
        (Some(l), Some(_)) => (l, l),
        (Some(l), None) => (l, l + span),
        (None, Some(h)) => ((h - span).max(0.0).min(h), h),
        (None, None) => (0.0, span),
    }
}

/// A local `$ref` (`#`, `#/$defs/X`, `#/definitions/X`).
fn resolve<'v>(root: &'v Value, r: &str) -> Option<&'v Value> {
    let pointer = r.strip_prefix('#')?;
    if pointer.is_empty() {
        Some(root)
    } else {
        root.pointer(pointer)
    }
}

/// Serialise `v` with Python's `json.dumps` separators.
fn write_spaced(v: &Value, out: &mut String) {
    match v {
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_spaced(x, out);
            }
            out.push(']');
        }
        Value::Object(m) => {
            out.push('{');
            for (i, (k, x)) in m.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push_str(": ");
                write_spaced(x, out);
            }
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
}

#[cfg(test)]
#[path = "structured_tests.rs"]
mod tests;
