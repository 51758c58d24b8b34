//! Tokenisation and chat templating.
//!
//! With `--tokenizer PATH` (or `model.tokenizer`) a HuggingFace `tokenizer.json` is loaded
//! through the `tokenizers` crate; PATH is the file or the model directory holding it. The
//! directory's `tokenizer_config.json`, when present, gives the chat template, the special tokens
//! templates are rendered with, the EOS token and `add_bos_token`. Without a tokenizer, a
//! built-in byte-level tokenizer is used: ids 0..=255 are bytes, 256 is BOS and 257 is EOS, so any
//! UTF-8 text round-trips and token counts are easy to reason about.
//!
//! Chat messages are rendered with the model's chat template as transformers renders it
//! ([`crate::template`]): an explicit chat template file, else the model's, else
//! [`DEFAULT_CHAT_TEMPLATE`].

use std::path::Path;

use serde_json::Map;

use crate::hf_config;
use crate::template::{ChatInputs, ChatTemplate, TemplateSource};

/// The documented fallback chat template: one `<|role|>` header line per message.
pub const DEFAULT_CHAT_TEMPLATE: &str = "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}";

const BYTE_BOS: u32 = 256;
const BYTE_EOS: u32 = 257;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot load tokenizer {path}: {reason}")]
    Load { path: String, reason: String },
    #[error("cannot read chat template {path}: {reason}")]
    ReadTemplate { path: String, reason: String },
    /// A template that does not compile or cannot render a plain conversation (start-up).
    #[error("chat template {origin} is unusable: {reason}")]
    BadTemplate { origin: String, reason: String },
    #[error("tokenizer failed: {0}")]
    Encode(String),
    /// A render failure: the template raised, or the request's messages do not fit it (a 400).
    #[error("invalid chat template: {0}")]
    Template(String),
    /// A malformed template input (`tools`, `documents`, `chat_template_kwargs`; a 400).
    #[error("{0}")]
    Input(String),
}

#[derive(Debug)]
enum Inner {
    Bytes,
    Hf(Box<tokenizers::Tokenizer>),
}

/// How `add_bos_token` from `tokenizer_config.json` changes what `tokenizer.json`'s
/// post-processor does (transformers rebuilds the post-processor from the flag).
#[derive(Debug, Clone, Copy, PartialEq)]
enum BosFix {
    None,
    /// The flag is true but the post-processor adds no BOS.
    Prepend(u32),
    /// The flag is false but the post-processor adds a BOS (always first).
    Strip,
}

/// A tokenizer plus chat template.
#[derive(Debug)]
pub struct Tokenizer {
    inner: Inner,
    template: ChatTemplate,
    /// The special tokens templates are rendered with, kept for a replacement template.
    special: Map<String, serde_json::Value>,
    bos: Option<u32>,
    eos: u32,
    bos_fix: BosFix,
}

impl Tokenizer {
    pub fn byte_level() -> Self {
        Tokenizer {
            inner: Inner::Bytes,
            template: default_template(no_config_special()),
            special: no_config_special(),
            bos: Some(BYTE_BOS),
            eos: BYTE_EOS,
            bos_fix: BosFix::None,
        }
    }

    /// Load a HuggingFace `tokenizer.json`, or a model directory holding one (see the module
    /// docs).
    pub fn from_file(path: &Path) -> Result<Self, TokenizerError> {
        Self::load(Some(path), None)
    }

    /// The tokenizer at `tokenizer` (none: the byte-level one) with the chat template file
    /// `chat_template` when given, else the model's own, else the default. The template is
    /// compiled and checked here, once.
    pub fn load(
        tokenizer: Option<&Path>,
        chat_template: Option<&Path>,
    ) -> Result<Self, TokenizerError> {
        let explicit = match chat_template {
            Some(p) => {
                let src = std::fs::read_to_string(p).map_err(|e| TokenizerError::ReadTemplate {
                    path: p.display().to_string(),
                    reason: e.to_string(),
                })?;
                Some((p.display().to_string(), TemplateSource::Single(src)))
            }
            None => None,
        };
        let Some(path) = tokenizer else {
            let mut t = Tokenizer::byte_level();
            if let Some((origin, src)) = explicit {
                t.template = ChatTemplate::new(src, &origin, no_config_special())?;
            }
            return Ok(t);
        };
        let (file, dir) = hf_config::locate(path);
        let tok = tokenizers::Tokenizer::from_file(&file).map_err(|e| TokenizerError::Load {
            path: file.display().to_string(),
            reason: e.to_string(),
        })?;
        let mut cfg = hf_config::read(&dir)?;
        if !cfg.found {
            cfg.special = no_config_special();
        }
        let id = |t: &str| {
            tok.token_to_id(t).ok_or_else(|| TokenizerError::Load {
                path: dir.join("tokenizer_config.json").display().to_string(),
                reason: format!("special token {t:?} is not in the vocabulary"),
            })
        };
        // Without a config: common EOS spellings across Llama 3, Qwen and older Llama/Mistral.
        let eos = match &cfg.eos_token {
            Some(t) => id(t)?,
            None => [
                "<|eot_id|>",
                "<|im_end|>",
                "<|end_of_text|>",
                "</s>",
                "<|endoftext|>",
            ]
            .iter()
            .find_map(|t| tok.token_to_id(t))
            .unwrap_or(0),
        };
        // A config's `bos_token` is authoritative, null included (Qwen has none).
        let bos = match &cfg.bos_token {
            Some(t) => Some(id(t)?),
            None if cfg.found => None,
            None => ["<|begin_of_text|>", "<s>"]
                .iter()
                .find_map(|t| tok.token_to_id(t)),
        };
        let bos_fix = bos_fix(&tok, bos, cfg.add_bos_token)?;
        let (origin, source) = match explicit.or(cfg.chat_template) {
            Some(t) => t,
            None => (
                "(built-in default)".to_string(),
                TemplateSource::Single(DEFAULT_CHAT_TEMPLATE.to_string()),
            ),
        };
        let template = ChatTemplate::new(source, &origin, cfg.special.clone())?;
        Ok(Tokenizer {
            inner: Inner::Hf(Box::new(tok)),
            template,
            special: cfg.special,
            bos,
            eos,
            bos_fix,
        })
    }

    /// Replace the chat template with a Jinja source (compiled and checked here).
    pub fn with_chat_template(mut self, template: String) -> Result<Self, TokenizerError> {
        self.template = ChatTemplate::new(
            TemplateSource::Single(template),
            "(given)",
            self.special.clone(),
        )?;
        Ok(self)
    }

    pub fn eos(&self) -> u32 {
        self.eos
    }

    pub fn vocab_size(&self) -> u32 {
        match &self.inner {
            Inner::Bytes => 258,
            Inner::Hf(t) => t.get_vocab_size(true) as u32,
        }
    }

    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        match &self.inner {
            Inner::Bytes => {
                let mut out = Vec::with_capacity(text.len() + 1);
                if add_special_tokens {
                    out.extend(self.bos);
                }
                out.extend(text.bytes().map(u32::from));
                Ok(out)
            }
            Inner::Hf(t) => {
                let mut ids = t
                    .encode(text, add_special_tokens)
                    .map(|e| e.get_ids().to_vec())
                    .map_err(|e| TokenizerError::Encode(e.to_string()))?;
                if add_special_tokens {
                    match self.bos_fix {
                        BosFix::None => {}
                        BosFix::Prepend(b) => ids.insert(0, b),
                        BosFix::Strip => {
                            ids.remove(0);
                        }
                    }
                }
                Ok(ids)
            }
        }
    }

    /// Decode ids to text, skipping special tokens. Out-of-vocabulary ids are an error.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        match &self.inner {
            Inner::Bytes => {
                if let Some(bad) = ids.iter().find(|&&i| i > BYTE_EOS) {
                    return Err(TokenizerError::Encode(format!(
                        "token id {bad} out of vocabulary"
                    )));
                }
                let bytes: Vec<u8> = ids.iter().filter(|&&i| i < 256).map(|&i| i as u8).collect();
                Ok(String::from_utf8_lossy(&bytes).into_owned())
            }
            Inner::Hf(t) => t
                .decode(ids, true)
                .map_err(|e| TokenizerError::Encode(e.to_string())),
        }
    }

    /// Decode ids to text keeping special tokens, as vLLM's `/detokenize` does (transformers'
    /// `decode` default). The byte-level tokenizer has no text for BOS/EOS and drops them.
    pub fn decode_with_special_tokens(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        match &self.inner {
            Inner::Bytes => self.decode(ids),
            Inner::Hf(t) => t
                .decode(ids, false)
                .map_err(|e| TokenizerError::Encode(e.to_string())),
        }
    }

    /// The ids a sampler may draw: lowercase letters and spaces for the byte tokenizer (so output
    /// reads as words; the space is listed five times to weight it), every non-special id for a
    /// real tokenizer.
    pub fn sample_ids(&self) -> Vec<u32> {
        match &self.inner {
            Inner::Bytes => {
                let mut ids: Vec<u32> = (u32::from(b'a')..=u32::from(b'z')).collect();
                ids.extend([u32::from(b' '); 5]);
                ids
            }
            Inner::Hf(t) => {
                let special: std::collections::HashSet<u32> = t
                    .get_added_tokens_decoder()
                    .iter()
                    .filter(|(_, a)| a.special)
                    .map(|(id, _)| *id)
                    .collect();
                (0..t.get_vocab_size(false) as u32)
                    .filter(|i| !special.contains(i))
                    .collect()
            }
        }
    }

    /// Render chat messages (normalised by [`crate::chat::normalise_messages`]) to a prompt,
    /// with the request's `tools`, `documents` and `chat_template_kwargs`.
    pub fn render_chat(
        &self,
        messages: &[serde_json::Value],
        add_generation_prompt: bool,
        inputs: ChatInputs<'_>,
    ) -> Result<String, TokenizerError> {
        self.template
            .render(messages, add_generation_prompt, inputs)
    }
}

/// Without a `tokenizer_config.json` nothing names the special tokens; templates still get
/// `bos_token` and `eos_token`, empty, so `bos_token + ...` renders.
fn no_config_special() -> Map<String, serde_json::Value> {
    let mut m = Map::new();
    m.insert("bos_token".into(), "".into());
    m.insert("eos_token".into(), "".into());
    m
}

fn default_template(special: Map<String, serde_json::Value>) -> ChatTemplate {
    ChatTemplate::new(
        TemplateSource::Single(DEFAULT_CHAT_TEMPLATE.to_string()),
        "(built-in default)",
        special,
    )
    .expect("the default chat template renders")
}

/// Probe the post-processor once: does encoding with special tokens put a BOS first?
fn bos_fix(
    tok: &tokenizers::Tokenizer,
    bos: Option<u32>,
    add_bos_token: Option<bool>,
) -> Result<BosFix, TokenizerError> {
    let (Some(want), Some(b)) = (add_bos_token, bos) else {
        return Ok(BosFix::None);
    };
    let probe = |special| {
        tok.encode("a", special)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| TokenizerError::Encode(e.to_string()))
    };
    let (with, without) = (probe(true)?, probe(false)?);
    let adds_bos = with.first() == Some(&b) && without.first() != Some(&b);
    Ok(match (want, adds_bos) {
        (true, false) => BosFix::Prepend(b),
        (false, true) => BosFix::Strip,
        _ => BosFix::None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_level_round_trips_and_adds_bos() {
        let t = Tokenizer::byte_level();
        let ids = t.encode("héllo", true).unwrap();
        assert_eq!(ids[0], 256);
        assert_eq!(ids.len(), 1 + "héllo".len());
        assert_eq!(t.decode(&ids).unwrap(), "héllo");
        assert_eq!(t.encode("ab", false).unwrap(), vec![97, 98]);
        assert!(t.decode(&[300]).is_err());
    }

    #[test]
    fn default_chat_template_renders_roles() {
        let t = Tokenizer::byte_level();
        let msgs = vec![
            serde_json::json!({"role": "system", "content": "be brief"}),
            serde_json::json!({"role": "user", "content": "hi"}),
        ];
        let s = t.render_chat(&msgs, true, ChatInputs::default()).unwrap();
        assert_eq!(s, "<|system|>\nbe brief\n<|user|>\nhi\n<|assistant|>\n");
    }

    #[test]
    fn custom_template_is_used_and_bad_one_rejected() {
        let t = Tokenizer::byte_level()
            .with_chat_template("{% for m in messages %}[{{ m.content }}]{% endfor %}".into())
            .unwrap();
        let s = t
            .render_chat(
                &[serde_json::json!({"role": "user", "content": "x"})],
                false,
                ChatInputs::default(),
            )
            .unwrap();
        assert_eq!(s, "[x]");
        // Without a tokenizer config the special tokens are empty strings, as before.
        let t = Tokenizer::byte_level()
            .with_chat_template("{{ bos_token + messages[0].content + eos_token }}".into())
            .unwrap();
        let msgs = [serde_json::json!({"role": "user", "content": "x"})];
        assert_eq!(
            t.render_chat(&msgs, true, ChatInputs::default()).unwrap(),
            "x"
        );
        assert!(Tokenizer::byte_level()
            .with_chat_template("{% for %}".into())
            .is_err());
    }
}
