//! Deterministic prompt tokens from prompt descriptions.
//!
//! Each [`Source`] names an endless token stream drawn from a ChaCha8 RNG whose 256-bit seed is
//! `(seed, namespace, id)` — no hashing, so distinct sources never share a stream — and a
//! [`Segment`] of length `n` is that stream's first `n` tokens. Hence:
//! - identical Mooncake hash id ⇒ identical 512-token block ⇒ shared ids give shared token
//!   prefixes, which is what a prefix cache sees;
//! - the last, partial block is the head of its full block;
//! - different ids give different blocks (two random 512-token blocks from a vocabulary of 256
//!   agree with probability 256⁻⁵¹²).
//!
//! There is no block cache: drawing a token costs a few nanoseconds, about what copying it
//! out of a cache would, and the whole Mooncake synthetic trace (61 M tokens) would not fit a
//! useful cache anyway. Tokens are produced per request, when it is sent.

use std::ops::Range;

use rand::distr::Uniform;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{invalid, Result};
use crate::trace::{PromptSpec, Request, Segment, Source};

/// Turns [`PromptSpec`]s into token ids, the same ones on every run with the same seed.
#[derive(Debug, Clone)]
pub struct Synthesizer {
    seed: u64,
    vocab: Range<u32>,
    dist: Uniform<u32>,
}

impl Synthesizer {
    /// Tokens are drawn uniformly from `vocab`. Keep special tokens out of it (for the built-in
    /// byte-level tokenizer, ids 0..256: 256 and 257 are BOS/EOS, and an EOS inside a prompt
    /// would change what the engine does).
    ///
    /// # Errors
    /// [`crate::WorkloadError::InvalidParam`] when `vocab` is empty.
    pub fn new(seed: u64, vocab: Range<u32>) -> Result<Self> {
        let dist = Uniform::new(vocab.start, vocab.end)
            .map_err(|_| invalid("vocab", format!("{vocab:?} is empty")))?;
        Ok(Self { seed, vocab, dist })
    }

    /// The seed given at construction.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The vocabulary range given at construction.
    pub fn vocab(&self) -> Range<u32> {
        self.vocab.clone()
    }

    /// The request's prompt tokens; exactly `req.input.len()` of them.
    pub fn tokens(&self, req: &Request) -> Vec<u32> {
        let mut out = Vec::with_capacity(req.input.len() as usize);
        self.extend_prompt(&req.input, &mut out);
        out
    }

    /// Append a prompt's tokens to `out` (reuse one buffer across requests).
    pub fn extend_prompt(&self, prompt: &PromptSpec, out: &mut Vec<u32>) {
        for &segment in &prompt.segments {
            self.extend_segment(segment, out);
        }
    }

    /// Append one segment's tokens to `out`.
    pub fn extend_segment(&self, segment: Segment, out: &mut Vec<u32>) {
        let rng = self.stream(segment.source);
        out.extend(rng.sample_iter(self.dist).take(segment.len as usize));
    }

    fn stream(&self, source: Source) -> ChaCha8Rng {
        let (namespace, id): (u64, u64) = match source {
            Source::Block(id) => (1, id),
            Source::Shared(id) => (2, id),
            Source::Unique(id) => (3, id),
        };
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&self.seed.to_le_bytes());
        key[8..16].copy_from_slice(&namespace.to_le_bytes());
        key[16..24].copy_from_slice(&id.to_le_bytes());
        ChaCha8Rng::from_seed(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::test_request as prompt;

    #[test]
    fn deterministic_and_in_vocab() {
        let s = Synthesizer::new(42, 0..256).unwrap();
        let r = prompt(&[(Source::Block(3), 512), (Source::Unique(1), 100)]);
        let a = s.tokens(&r);
        assert_eq!(a.len(), 612);
        assert_eq!(a, s.tokens(&r));
        assert_eq!(a, Synthesizer::new(42, 0..256).unwrap().tokens(&r));
        assert_ne!(a, Synthesizer::new(43, 0..256).unwrap().tokens(&r));
        assert!(a.iter().all(|&t| t < 256));
        let narrow = Synthesizer::new(42, 1000..1002).unwrap().tokens(&r);
        assert!(narrow.iter().all(|&t| (1000..1002).contains(&t)));
        assert!(Synthesizer::new(0, 5..5).is_err());
    }

    #[test]
    fn shared_ids_share_prefixes_and_different_ids_differ() {
        let s = Synthesizer::new(7, 0..256).unwrap();
        let a = s.tokens(&prompt(&[
            (Source::Block(0), 512),
            (Source::Block(1), 512),
            (Source::Block(2), 300),
        ]));
        let b = s.tokens(&prompt(&[
            (Source::Block(0), 512),
            (Source::Block(1), 512),
            (Source::Block(9), 512),
        ]));
        assert_eq!(a[..1024], b[..1024]);
        assert_ne!(a[1024..1100], b[1024..1100]);
        // Namespaces are separate: Block(0), Shared(0) and Unique(0) are different text.
        let ns: Vec<Vec<u32>> = [Source::Block(0), Source::Shared(0), Source::Unique(0)]
            .into_iter()
            .map(|src| s.tokens(&prompt(&[(src, 64)])))
            .collect();
        assert_ne!(ns[0], ns[1]);
        assert_ne!(ns[1], ns[2]);
        assert_ne!(ns[0], ns[2]);
    }

    #[test]
    fn last_block_is_the_head_of_the_full_block() {
        let s = Synthesizer::new(1, 0..256).unwrap();
        let full = s.tokens(&prompt(&[(Source::Block(5), 512)]));
        let part = s.tokens(&prompt(&[(Source::Block(4), 512), (Source::Block(5), 77)]));
        assert_eq!(part.len(), 589);
        assert_eq!(part[512..], full[..77]);
    }
}
