//! Model-side facts that both the coordinator and the simulated engine must agree on.
//!
//! The coordinator tokenises prompts to route them by prefix; the simulated engine tokenises them
//! to run them. Sharing one implementation keeps the two token streams identical (pure code: no
//! IO beyond loading the tokenizer file at start-up).

pub mod chat;
mod hf_config;
pub mod pbjson;
pub mod template;
pub mod tokenizer;
pub mod words;

pub use template::{ChatInputs, TemplateSource};
pub use tokenizer::{Tokenizer, TokenizerError, DEFAULT_CHAT_TEMPLATE};
