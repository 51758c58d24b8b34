//! Hugging Face chat templates, rendered as vLLM renders them.
//!
//! vLLM hands the conversation to transformers' `apply_chat_template`, which renders the Jinja
//! source in a sandboxed jinja2 environment with `trim_blocks` and `lstrip_blocks`, the
//! `loopcontrols` extension, its own `tojson` (Python's `json.dumps`, not jinja2's HTML-safe one)
//! and the globals `raise_exception` and `strftime_now`. Templates are written against Python
//! objects, so they call `str.startswith`, `str.split`, `dict.items` and so on; minijinja-contrib's
//! `pycompat` supplies those. Anything the prompt text depends on must match, or the coordinator's
//! token ids (used for prefix routing) and the engine's would differ from a real vLLM.
//!
//! The template is compiled once, when the tokenizer is loaded, and checked against a plain
//! conversation then, so a template that cannot render fails `tandem serve` / `tandem sim` at
//! start-up rather than every request.

use std::fmt::Write as _;

use minijinja::value::{from_args, Kwargs, Rest, ValueKind};
use minijinja::{AutoEscape, Environment, Error, ErrorKind, Value};
use serde_json::{json, Map, Value as Json};

use crate::tokenizer::TokenizerError;

/// A chat template as a model ships it.
#[derive(Debug, Clone, PartialEq)]
pub enum TemplateSource {
    /// One template (the usual `"chat_template": "..."`).
    Single(String),
    /// transformers' list form, `[{"name": ..., "template": ...}]`: `default` is used, and
    /// `tool_use` when the request carries tools.
    Named(Vec<(String, String)>),
}

/// What a request passes to the template besides its messages (vLLM's template inputs).
#[derive(Debug, Clone, Copy, Default)]
pub struct ChatInputs<'a> {
    /// `tools` as the client sent them; `None` (or JSON null) when absent.
    pub tools: Option<&'a Json>,
    /// `documents` (RAG templates); `None` when absent.
    pub documents: Option<&'a Json>,
    /// `chat_template_kwargs`: extra template variables such as `enable_thinking`.
    pub chat_template_kwargs: Option<&'a Json>,
}

impl<'a> ChatInputs<'a> {
    /// The inputs of a chat request body (`tools`, `documents`, `chat_template_kwargs`).
    pub fn from_body(body: &'a Map<String, Json>) -> Self {
        ChatInputs {
            tools: body.get("tools"),
            documents: body.get("documents"),
            chat_template_kwargs: body.get("chat_template_kwargs"),
        }
    }
}

/// Marks an error raised by the template itself (`raise_exception`), whose message is the
/// template author's words and is shown to the client as is.
#[derive(Debug)]
struct Raised;

impl std::fmt::Display for Raised {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("raised by the chat template")
    }
}

impl std::error::Error for Raised {}

/// A compiled chat template (or named set) with the special tokens it is rendered with.
#[derive(Debug)]
pub(crate) struct ChatTemplate {
    env: Environment<'static>,
    /// Where the template came from, for start-up errors.
    origin: String,
    /// Template names in `env`: `None` for a single template (named `chat`).
    names: Option<Vec<String>>,
    /// transformers' `special_tokens_map` (`bos_token`, `eos_token`, ...), passed to every render.
    special: Map<String, Json>,
}

const SINGLE: &str = "chat";

impl ChatTemplate {
    /// Compile `source` and check that it renders a plain conversation.
    pub(crate) fn new(
        source: TemplateSource,
        origin: &str,
        special: Map<String, Json>,
    ) -> Result<Self, TokenizerError> {
        let bad = |reason: String| TokenizerError::BadTemplate {
            origin: origin.to_string(),
            reason,
        };
        let mut env = environment();
        let names = match source {
            TemplateSource::Single(src) => {
                env.add_template_owned(SINGLE, src)
                    .map_err(|e| bad(e.to_string()))?;
                None
            }
            TemplateSource::Named(list) => {
                let mut names = Vec::with_capacity(list.len());
                for (name, src) in list {
                    env.add_template_owned(name.clone(), src)
                        .map_err(|e| bad(format!("template {name:?}: {e}")))?;
                    names.push(name);
                }
                Some(names)
            }
        };
        let t = ChatTemplate {
            env,
            origin: origin.to_string(),
            names,
            special,
        };
        t.check().map_err(bad)?;
        Ok(t)
    }

    /// Render the conversations every usable template must handle: system + user and user only,
    /// with the generation prompt; and, for a `tool_use` template, the same with one tool.
    fn check(&self) -> Result<(), String> {
        let system = json!({"role": "system", "content": "You are helpful."});
        let user = json!({"role": "user", "content": "Hello"});
        let convs = [vec![system, user.clone()], vec![user]];
        let tools = json!([{"type": "function", "function": {
            "name": "get_weather",
            "description": "Get the weather for a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                "required": ["city"]},
        }}]);
        let with_tools = ChatInputs {
            tools: Some(&tools),
            ..ChatInputs::default()
        };
        let mut cases = vec![ChatInputs::default()];
        if self.has("tool_use") {
            cases.push(with_tools);
        }
        for inputs in cases {
            for conv in &convs {
                self.render(conv, true, inputs).map_err(|e| {
                    let what = if conv.len() == 2 {
                        "a system + user conversation"
                    } else {
                        "a user-only conversation"
                    };
                    let tools = if inputs.tools.is_some() {
                        " with tools"
                    } else {
                        ""
                    };
                    let reason = match e {
                        TokenizerError::Template(m) | TokenizerError::Input(m) => m,
                        other => other.to_string(),
                    };
                    format!("cannot render {what}{tools}: {reason}")
                })?;
            }
        }
        Ok(())
    }

    fn has(&self, name: &str) -> bool {
        self.names
            .as_ref()
            .is_some_and(|n| n.iter().any(|x| x == name))
    }

    /// The template to use, as transformers picks it: `tool_use` when tools are given (even an
    /// empty list) and the model has one, else `default`.
    fn pick(&self, tools: bool) -> Result<&str, TokenizerError> {
        if self.names.is_none() {
            return Ok(SINGLE);
        }
        if tools && self.has("tool_use") {
            return Ok("tool_use");
        }
        if self.has("default") {
            return Ok("default");
        }
        Err(TokenizerError::Template(format!(
            "{} has several chat templates and none is named \"default\"",
            self.origin
        )))
    }

    /// Render normalised `messages`; `inputs` as the client sent them.
    pub(crate) fn render(
        &self,
        messages: &[Json],
        add_generation_prompt: bool,
        inputs: ChatInputs<'_>,
    ) -> Result<String, TokenizerError> {
        let tools = match inputs.tools {
            None | Some(Json::Null) => None,
            Some(t) => Some(crate::chat::normalise_tools(t).map_err(TokenizerError::Input)?),
        };
        let documents = match inputs.documents {
            None | Some(Json::Null) => Json::Null,
            Some(d @ Json::Array(_)) => d.clone(),
            Some(_) => return Err(TokenizerError::Input("`documents` must be a list".into())),
        };
        let name = self.pick(tools.is_some())?;
        // transformers: `render(messages=..., tools=..., documents=..., add_generation_prompt=...,
        // **special_tokens_map, **kwargs)`, where vLLM puts the request's `chat_template_kwargs`
        // over its own arguments, so they may override everything but the messages.
        let mut ctx = self.special.clone();
        ctx.insert("tools".into(), tools.unwrap_or(Json::Null));
        ctx.insert("documents".into(), documents);
        ctx.insert(
            "add_generation_prompt".into(),
            Json::Bool(add_generation_prompt),
        );
        match inputs.chat_template_kwargs {
            None | Some(Json::Null) => {}
            Some(Json::Object(kw)) => {
                for (k, v) in kw {
                    ctx.insert(k.clone(), v.clone());
                }
            }
            Some(_) => {
                return Err(TokenizerError::Input(
                    "`chat_template_kwargs` must be an object".into(),
                ))
            }
        }
        ctx.insert("messages".into(), Json::Array(messages.to_vec()));
        let tmpl = self
            .env
            .get_template(name)
            .map_err(|e| TokenizerError::Template(e.to_string()))?;
        tmpl.render(Value::from_serialize(&ctx))
            .map_err(|e| TokenizerError::Template(render_error(&e)))
    }
}

/// The client-facing text of a render error: the template's own message when it raised one,
/// minijinja's description (with the template line) otherwise.
fn render_error(e: &Error) -> String {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if s.is::<Raised>() {
            return e.detail().unwrap_or("").to_string();
        }
        source = s.source();
    }
    e.to_string()
}

/// A minijinja environment configured as transformers configures jinja2.
fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    // jinja2's default: one trailing newline of the source is dropped.
    env.set_keep_trailing_newline(false);
    env.set_auto_escape_callback(|_| AutoEscape::None);
    // Debug info clones the template source into every error; a bad request should be cheap.
    env.set_debug(false);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    // Printed values read as Python prints them: `None`, `True`, `False`.
    env.set_formatter(|out, state, value| match value.kind() {
        ValueKind::None => out
            .write_str("None")
            .map_err(|_| Error::from(ErrorKind::WriteFailure)),
        ValueKind::Bool => out
            .write_str(if value.is_true() { "True" } else { "False" })
            .map_err(|_| Error::from(ErrorKind::WriteFailure)),
        _ => minijinja::escape_formatter(out, state, value),
    });
    env.add_filter("tojson", tojson);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    env
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message).with_source(Raised))
}

/// transformers: `datetime.now().strftime(format)`, local time.
fn strftime_now(format: String) -> Result<String, Error> {
    let mut out = String::new();
    let items = chrono::format::StrftimeItems::new(&format);
    write!(out, "{}", chrono::Local::now().format_with_items(items)).map_err(|_| {
        Error::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now: invalid format {format:?}"),
        )
    })?;
    Ok(out)
}

/// transformers' override of `tojson`:
/// `json.dumps(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`, with the
/// same positional order.
fn tojson(value: &Value, args: Rest<Value>) -> Result<Value, Error> {
    let (pos, kwargs): (&[Value], Kwargs) = from_args(&args)?;
    if pos.len() > 4 {
        return Err(Error::new(
            ErrorKind::TooManyArguments,
            "tojson takes at most 4 arguments",
        ));
    }
    let arg = |i: usize, name: &str| -> Result<Option<Value>, Error> {
        let kw: Option<Value> = kwargs.get(name)?;
        Ok(kw.or_else(|| pos.get(i).cloned()).filter(|v| !v.is_none()))
    };
    let ensure_ascii = arg(0, "ensure_ascii")?.is_some_and(|v| v.is_true());
    let indent = match arg(1, "indent")? {
        None => None,
        Some(v) if v.kind() == ValueKind::Number => {
            let n = i64::try_from(v)?;
            Some(" ".repeat(usize::try_from(n).unwrap_or(0)))
        }
        Some(v) => match v.as_str() {
            Some(s) => Some(s.to_string()),
            None => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: indent must be an integer or a string",
                ))
            }
        },
    };
    let (item_sep, key_sep) = match arg(2, "separators")? {
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
        Some(v) => {
            let parts: Vec<String> = v
                .try_iter()?
                .map(|p| p.as_str().map(str::to_string))
                .collect::<Option<_>>()
                .filter(|p: &Vec<String>| p.len() == 2)
                .ok_or_else(|| {
                    Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be two strings",
                    )
                })?;
            let [a, b]: [String; 2] = parts.try_into().expect("two separators");
            (a, b)
        }
    };
    let sort_keys = arg(3, "sort_keys")?.is_some_and(|v| v.is_true());
    kwargs.assert_all_used()?;
    if value.is_undefined() {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            "Object of type Undefined is not JSON serializable",
        ));
    }
    let json = serde_json::to_value(value).map_err(|e| {
        Error::new(
            ErrorKind::InvalidOperation,
            format!("tojson: not JSON serializable: {e}"),
        )
    })?;
    let opts = PyJson {
        ensure_ascii,
        indent,
        item_sep,
        key_sep,
        sort_keys,
    };
    let mut out = String::new();
    opts.write(&mut out, &json, 0);
    Ok(Value::from(out))
}

/// Python's `json.dumps` output format.
pub(crate) struct PyJson {
    pub ensure_ascii: bool,
    pub indent: Option<String>,
    pub item_sep: String,
    pub key_sep: String,
    pub sort_keys: bool,
}

impl PyJson {
    fn newline(&self, out: &mut String, level: usize) {
        if let Some(ind) = &self.indent {
            out.push('\n');
            for _ in 0..level {
                out.push_str(ind);
            }
        }
    }

    pub(crate) fn write(&self, out: &mut String, v: &Json, level: usize) {
        match v {
            Json::Null => out.push_str("null"),
            Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Json::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
                (Some(i), _, _) => write!(out, "{i}").expect("write to String"),
                (None, Some(u), _) => write!(out, "{u}").expect("write to String"),
                (None, None, Some(f)) => out.push_str(&py_float(f)),
                _ => out.push_str(&n.to_string()),
            },
            Json::String(s) => self.write_str(out, s),
            Json::Array(items) => {
                if items.is_empty() {
                    out.push_str("[]");
                    return;
                }
                out.push('[');
                self.newline(out, level + 1);
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                        self.newline(out, level + 1);
                    }
                    self.write(out, item, level + 1);
                }
                self.newline(out, level);
                out.push(']');
            }
            Json::Object(map) => {
                if map.is_empty() {
                    out.push_str("{}");
                    return;
                }
                let mut entries: Vec<(&String, &Json)> = map.iter().collect();
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(b.0));
                }
                out.push('{');
                self.newline(out, level + 1);
                for (i, (k, item)) in entries.into_iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                        self.newline(out, level + 1);
                    }
                    self.write_str(out, k);
                    out.push_str(&self.key_sep);
                    self.write(out, item, level + 1);
                }
                self.newline(out, level);
                out.push('}');
            }
        }
    }

    /// Python's string escapes: control characters (`\n`-style where Python has one, else
    /// `\u00xx`), quote and backslash; with `ensure_ascii` everything outside printable ASCII as
    /// `\uxxxx` UTF-16 units.
    fn write_str(&self, out: &mut String, s: &str) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 || (self.ensure_ascii && !(' '..='~').contains(&c)) => {
                    let mut buf = [0u16; 2];
                    for unit in c.encode_utf16(&mut buf) {
                        write!(out, "\\u{unit:04x}").expect("write to String");
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// Python's `repr(float)`: the shortest round-trip digits, positional for exponents -4..16,
/// else `1e+20` style.
fn py_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').expect("`{:e}` has an exponent");
    let exp: i32 = exp.parse().expect("`{:e}` exponent is an integer");
    if f == 0.0 || (-4..16).contains(&exp) {
        let s = format!("{f}");
        if s.contains('.') {
            s
        } else {
            format!("{s}.0")
        }
    } else {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exp.abs())
    }
}

#[cfg(test)]
#[path = "template_tests.rs"]
mod tests;
