//! Tokenisation and chat templating.
//!
//! With `--tokenizer PATH` a HuggingFace `tokenizer.json` is loaded through the `tokenizers`
//! crate. Without one, a built-in byte-level tokenizer is used: ids 0..=255 are bytes, 256 is BOS
//! and 257 is EOS, so any UTF-8 text round-trips and token counts are easy to reason about.
//!
//! Chat messages are rendered with the model's Jinja chat template (minijinja) when given, else
//! with [`DEFAULT_CHAT_TEMPLATE`].

use std::path::Path;

/// The documented fallback chat template: one `<|role|>` header line per message.
pub const DEFAULT_CHAT_TEMPLATE: &str = "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}";

const BYTE_BOS: u32 = 256;
const BYTE_EOS: u32 = 257;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("cannot load tokenizer {path}: {reason}")]
    Load { path: String, reason: String },
    #[error("tokenizer failed: {0}")]
    Encode(String),
    #[error("invalid chat template: {0}")]
    Template(String),
}

#[derive(Debug)]
enum Inner {
    Bytes,
    Hf(Box<tokenizers::Tokenizer>),
}

/// A tokenizer plus chat template.
#[derive(Debug)]
pub struct Tokenizer {
    inner: Inner,
    chat_template: String,
    bos: Option<u32>,
    eos: u32,
}

impl Tokenizer {
    pub fn byte_level() -> Self {
        Tokenizer {
            inner: Inner::Bytes,
            chat_template: DEFAULT_CHAT_TEMPLATE.to_string(),
            bos: Some(BYTE_BOS),
            eos: BYTE_EOS,
        }
    }

    /// Load a HuggingFace `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self, TokenizerError> {
        let tok = tokenizers::Tokenizer::from_file(path).map_err(|e| TokenizerError::Load {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        // Common EOS spellings across Llama 3, Qwen and older Llama/Mistral tokenizers.
        let eos = [
            "<|eot_id|>",
            "<|im_end|>",
            "<|end_of_text|>",
            "</s>",
            "<|endoftext|>",
        ]
        .iter()
        .find_map(|t| tok.token_to_id(t))
        .unwrap_or(0);
        let bos = ["<|begin_of_text|>", "<s>"]
            .iter()
            .find_map(|t| tok.token_to_id(t));
        Ok(Tokenizer {
            inner: Inner::Hf(Box::new(tok)),
            chat_template: DEFAULT_CHAT_TEMPLATE.to_string(),
            bos,
            eos,
        })
    }

    /// Replace the chat template (a Jinja source, e.g. from the model's `tokenizer_config.json`).
    pub fn with_chat_template(mut self, template: String) -> Result<Self, TokenizerError> {
        let mut env = minijinja::Environment::new();
        env.add_template_owned("chat", template.clone())
            .map_err(|e| TokenizerError::Template(e.to_string()))?;
        self.chat_template = template;
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
            Inner::Hf(t) => t
                .encode(text, add_special_tokens)
                .map(|e| e.get_ids().to_vec())
                .map_err(|e| TokenizerError::Encode(e.to_string())),
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

    /// Render chat messages (already normalised to `{role, content: string}`) to a prompt.
    pub fn render_chat(
        &self,
        messages: &[serde_json::Value],
        add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        let mut env = minijinja::Environment::new();
        env.add_template("chat", &self.chat_template)
            .map_err(|e| TokenizerError::Template(e.to_string()))?;
        let tmpl = env
            .get_template("chat")
            .map_err(|e| TokenizerError::Template(e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => "",
            eos_token => "",
        })
        .map_err(|e| TokenizerError::Template(e.to_string()))
    }
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
        let s = t.render_chat(&msgs, true).unwrap();
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
            )
            .unwrap();
        assert_eq!(s, "[x]");
        assert!(Tokenizer::byte_level()
            .with_chat_template("{% for %}".into())
            .is_err());
    }
}
