//! A Hugging Face model directory's tokenizer files: where `tokenizer.json` is, and what
//! `tokenizer_config.json` (plus a `chat_template.jinja` beside it) says about the chat template
//! and the special tokens.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::template::TemplateSource;
use crate::tokenizer::TokenizerError;

/// The special-token keys transformers puts in `special_tokens_map`, which it passes to every
/// template render.
const SPECIAL_KEYS: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// What `tokenizer_config.json` says, as far as Tandem uses it.
#[derive(Debug, Default)]
pub(crate) struct HfConfig {
    /// Whether a `tokenizer_config.json` was found (its `bos_token` is then taken as is).
    pub found: bool,
    /// The chat template and where it came from (for start-up errors).
    pub chat_template: Option<(String, TemplateSource)>,
    /// `special_tokens_map`: each present special token as a string (and
    /// `additional_special_tokens` as a list of them).
    pub special: Map<String, Value>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub add_bos_token: Option<bool>,
}

/// `path` is a `tokenizer.json` or a directory holding one; the directory's
/// `tokenizer_config.json` is read when present.
pub(crate) fn locate(path: &Path) -> (PathBuf, PathBuf) {
    if path.is_dir() {
        (path.join("tokenizer.json"), path.to_path_buf())
    } else {
        let dir = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        (path.to_path_buf(), dir)
    }
}

/// Read `dir`'s `tokenizer_config.json` and `chat_template.jinja`; both are optional.
pub(crate) fn read(dir: &Path) -> Result<HfConfig, TokenizerError> {
    let cfg_path = dir.join("tokenizer_config.json");
    let load_err = |reason: String| TokenizerError::Load {
        path: cfg_path.display().to_string(),
        reason,
    };
    let mut out = HfConfig::default();
    match std::fs::read_to_string(&cfg_path) {
        Ok(text) => {
            let v: Value = serde_json::from_str(&text).map_err(|e| load_err(e.to_string()))?;
            let obj = v
                .as_object()
                .ok_or_else(|| load_err("not a JSON object".into()))?;
            parse(obj, &cfg_path.display().to_string(), &mut out).map_err(load_err)?;
            out.found = true;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(load_err(e.to_string())),
    }
    // transformers saves templates here since 4.50, and prefers the file when both exist.
    let jinja = dir.join("chat_template.jinja");
    match std::fs::read_to_string(&jinja) {
        Ok(src) => {
            out.chat_template = Some((jinja.display().to_string(), TemplateSource::Single(src)));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(TokenizerError::ReadTemplate {
                path: jinja.display().to_string(),
                reason: e.to_string(),
            })
        }
    }
    Ok(out)
}

/// The text of a special token: a string, or an `AddedToken` object's `content`.
fn token_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

pub(crate) fn parse(
    obj: &Map<String, Value>,
    origin: &str,
    out: &mut HfConfig,
) -> Result<(), String> {
    for key in SPECIAL_KEYS {
        if let Some(t) = obj.get(key).and_then(token_text) {
            out.special.insert(key.into(), Value::String(t));
        }
    }
    if let Some(Value::Array(extra)) = obj.get("additional_special_tokens") {
        let list: Vec<Value> = extra
            .iter()
            .filter_map(token_text)
            .map(Value::String)
            .collect();
        out.special
            .insert("additional_special_tokens".into(), Value::Array(list));
    }
    out.bos_token = obj.get("bos_token").and_then(token_text);
    out.eos_token = obj.get("eos_token").and_then(token_text);
    out.add_bos_token = obj.get("add_bos_token").and_then(Value::as_bool);
    out.chat_template = match obj.get("chat_template") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some((origin.to_string(), TemplateSource::Single(s.clone()))),
        Some(Value::Array(list)) => {
            let mut named = Vec::with_capacity(list.len());
            for item in list {
                let name = item.get("name").and_then(Value::as_str);
                let template = item.get("template").and_then(Value::as_str);
                let (Some(name), Some(template)) = (name, template) else {
                    return Err(
                        "each `chat_template` entry needs a string `name` and `template`".into(),
                    );
                };
                named.push((name.to_string(), template.to_string()));
            }
            Some((origin.to_string(), TemplateSource::Named(named)))
        }
        Some(_) => return Err("`chat_template` must be a string or a list".into()),
    };
    Ok(())
}
