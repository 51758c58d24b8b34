//! The engine's tokenizer is the shared one in `tandem-model`, so the coordinator and the
//! simulated engine always agree on token ids. This module adds the sampler's view of it.

use crate::sampler::SampleVocab;
pub use tandem_model::tokenizer::{Tokenizer as SimTokenizer, TokenizerError};
use tandem_model::words::{word_ids, DEFAULT_WORDS};

/// The ids the sampler draws from, with the EOS id and its per-million rate.
///
/// Whole-word ids (`tandem_model::words`), so that the output text re-tokenizes to the same ids
/// and a client counting tokens from the text agrees with `usage.completion_tokens`.
pub fn sample_vocab(tokenizer: &SimTokenizer, eos_ppm: u32) -> SampleVocab {
    SampleVocab {
        ids: word_ids(tokenizer, DEFAULT_WORDS).into(),
        eos: tokenizer.eos(),
        eos_ppm,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampler::{prompt_fingerprint, sample};

    /// Whatever the sampler draws, the detokenized text encodes back to as many tokens.
    fn assert_re_tokenizes(t: &SimTokenizer) {
        let v = sample_vocab(t, 0);
        for seed in 0..20u64 {
            let p = prompt_fingerprint(&[1, 2, 3, seed as u32]);
            let out: Vec<u32> = (0..256).map(|i| sample(&v, seed, p, i, 0)).collect();
            let text = t.decode(&out).unwrap();
            assert_eq!(t.encode(&text, false).unwrap().len(), out.len(), "{text:?}");
        }
    }

    #[test]
    fn byte_level_output_re_tokenizes_to_the_same_count() {
        assert_re_tokenizes(&SimTokenizer::byte_level());
    }

    /// The same with the real Qwen3 tokenizer (`$TANDEM_QWEN_TOKENIZER`, a `tokenizer.json`).
    #[test]
    fn real_tokenizer_output_re_tokenizes_to_the_same_count() {
        let Some(path) = std::env::var_os("TANDEM_QWEN_TOKENIZER") else {
            eprintln!("skipped: set TANDEM_QWEN_TOKENIZER to a Qwen3 tokenizer.json to run");
            return;
        };
        let t = SimTokenizer::from_file(std::path::Path::new(&path)).expect("load tokenizer");
        assert_re_tokenizes(&t);
    }
}
