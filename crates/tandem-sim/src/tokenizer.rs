//! The engine's tokenizer is the shared one in `tandem-model`, so the coordinator and the
//! simulated engine always agree on token ids. This module adds the sampler's view of it.

use crate::sampler::SampleVocab;
pub use tandem_model::tokenizer::{Tokenizer as SimTokenizer, TokenizerError};

/// The ids the sampler draws from, with the EOS id and its per-million rate.
pub fn sample_vocab(tokenizer: &SimTokenizer, eos_ppm: u32) -> SampleVocab {
    SampleVocab {
        ids: tokenizer.sample_ids(),
        eos: tokenizer.eos(),
        eos_ppm,
    }
}
