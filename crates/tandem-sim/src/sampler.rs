//! Deterministic "sampling": an output token is a pure function of (seed, prompt, position,
//! choice index), so a request yields the same text on any engine, colocated or disaggregated,
//! and a decode engine that pulled the KV from elsewhere continues exactly where a colocated
//! engine would.

/// Where sampled ids come from, and the end-of-sequence id.
#[derive(Debug, Clone)]
pub struct SampleVocab {
    /// Ids to draw ordinary tokens from (non-special).
    pub ids: std::sync::Arc<[u32]>,
    pub eos: u32,
    /// Probability, in millionths, that a position draws EOS (0 = never).
    pub eos_ppm: u32,
}

/// A 64-bit fingerprint of a prompt, fed to [`sample`].
pub fn prompt_fingerprint(tokens: &[u32]) -> u64 {
    let mut h = 0x9e37_79b9_7f4a_7c15u64;
    for &t in tokens {
        h = mix(h ^ u64::from(t));
    }
    mix(h ^ tokens.len() as u64)
}

/// The token at output `position` of choice `index`.
pub fn sample(vocab: &SampleVocab, seed: u64, prompt: u64, position: usize, index: u32) -> u32 {
    let h = mix(mix(mix(seed ^ prompt) ^ position as u64) ^ u64::from(index));
    if vocab.eos_ppm > 0 && (h >> 40) % 1_000_000 < u64::from(vocab.eos_ppm) {
        return vocab.eos;
    }
    vocab.ids[(h % vocab.ids.len() as u64) as usize]
}

/// splitmix64's finaliser: a cheap, well-distributed 64-bit mix (also keys the HTTP layer's
/// derived outputs: logprobs, structured values, tool-call ids).
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab(eos_ppm: u32) -> SampleVocab {
        SampleVocab {
            ids: (97..123).collect(),
            eos: 1,
            eos_ppm,
        }
    }

    #[test]
    fn same_inputs_same_token_and_inputs_matter() {
        let v = vocab(0);
        let p = prompt_fingerprint(&[1, 2, 3]);
        let a: Vec<u32> = (0..64).map(|i| sample(&v, 7, p, i, 0)).collect();
        let b: Vec<u32> = (0..64).map(|i| sample(&v, 7, p, i, 0)).collect();
        assert_eq!(a, b);
        let other_seed: Vec<u32> = (0..64).map(|i| sample(&v, 8, p, i, 0)).collect();
        assert_ne!(a, other_seed);
        let other_prompt = prompt_fingerprint(&[1, 2, 4]);
        let c: Vec<u32> = (0..64).map(|i| sample(&v, 7, other_prompt, i, 0)).collect();
        assert_ne!(a, c);
        let other_index: Vec<u32> = (0..64).map(|i| sample(&v, 7, p, i, 1)).collect();
        assert_ne!(a, other_index);
        assert!(a.iter().all(|t| v.ids.contains(t)));
    }

    #[test]
    fn eos_rate_is_respected() {
        let never = vocab(0);
        let always = vocab(1_000_000);
        let p = prompt_fingerprint(&[5]);
        assert!((0..1000).all(|i| sample(&never, 0, p, i, 0) != 1));
        assert!((0..1000).all(|i| sample(&always, 0, p, i, 0) == 1));
        let some = vocab(100_000);
        let eos = (0..10_000)
            .filter(|&i| sample(&some, 0, p, i, 0) == 1)
            .count();
        assert!((700..1300).contains(&eos), "{eos} EOS in 10k at 10%");
    }
}
