//! Chained block keys.
//!
//! A prompt is cut into full blocks of `block_size` tokens (a trailing partial block is ignored,
//! as vLLM only caches full blocks). Key *i* hashes key *i−1* together with the tokens of block
//! *i*, the first block chaining from a caller-chosen seed (for example a hash of the model name,
//! so that two models never share keys). A key therefore stands for the whole prefix up to and
//! including its block: equal prefixes give equal keys, and prefixes that differ anywhere give
//! different keys from the first differing block on.
//!
//! # The hash
//!
//! Each round multiplies two 64-bit words into 128 bits and folds the halves together (the
//! "folded multiply" of wyhash and foldhash): one word carries four tokens XOR a constant, the
//! other the chaining state XOR the next tokens. The block length is folded in last, so `[x]` and
//! `[x, 0]` differ. It is fixed, portable and seedless beyond `seed` (no per-process random state,
//! unlike std's `RandomState`), so two processes and two runs compute the same keys.
//!
//! # Collision odds
//!
//! The construction is not cryptographic, but for non-adversarial token streams it behaves like a
//! random function to 64 bits. Among `n` distinct prefixes, the chance that any two share a key is
//! about `n² / 2⁶⁵`: 2.7·10⁻⁸ for the 1M blocks an index holds, 2.7·10⁻² only after some 4·10⁹
//! distinct prefixes *held at once*. A lookup of an unseen prefix falsely matches one of `m` held
//! keys with probability `m / 2⁶⁴` per block (5·10⁻¹⁴ at 1M). The cost of a collision is a
//! routing hint that is wrong (a request sent to an engine without the prefix), never a wrong
//! answer: engines key their caches by their own hashes. Deliberately colliding inputs can be
//! constructed by someone who knows the constants; the index is a hint and treats them as such.

/// Constants from wyhash (final version 4): odd, with balanced bits in both halves.
const K0: u64 = 0x2d35_8dcc_aa6c_78a5;
const K1: u64 = 0x8bb8_4b93_962e_acc9;
const K2: u64 = 0x4b33_a62e_d433_d4a3;
const K3: u64 = 0x4d5a_2da5_1de1_aa47;

/// 64×64→128-bit multiply, halves XORed: every output bit depends on every input bit of both
/// operands (apart from the degenerate zero operand, which needs a token pair equal to a constant
/// above any vocabulary).
#[inline(always)]
pub(crate) fn fold_mul(a: u64, b: u64) -> u64 {
    let r = u128::from(a) * u128::from(b);
    (r as u64) ^ ((r >> 64) as u64)
}

#[inline(always)]
fn pair(lo: u32, hi: u32) -> u64 {
    u64::from(lo) | (u64::from(hi) << 32)
}

/// The key of one block given the key of the block before it (or the seed, for the first block).
///
/// This is the step [`block_keys`] repeats; it is public so that a KV-event decoder that receives
/// a block's tokens together with its parent can extend a known chain one block at a time.
#[inline]
pub fn chain_key(parent: u64, block: &[u32]) -> u64 {
    let mut h = parent ^ K0;
    let mut quads = block.chunks_exact(4);
    for q in &mut quads {
        h = fold_mul(pair(q[0], q[1]) ^ K1, pair(q[2], q[3]) ^ h);
    }
    let rest = quads.remainder();
    if !rest.is_empty() {
        let t = |i: usize| rest.get(i).copied().unwrap_or(0);
        h = fold_mul(pair(t(0), t(1)) ^ K1, pair(t(2), 0) ^ h);
    }
    fold_mul(h ^ K2, block.len() as u64 ^ K3)
}

/// Chained keys of the full blocks of `tokens`: `len / block_size` keys, none for a trailing
/// partial block. A `block_size` of zero yields no keys (there is no such thing as an empty block).
pub fn block_keys(tokens: &[u32], block_size: usize, seed: u64) -> Vec<u64> {
    let mut out = Vec::new();
    block_keys_into(tokens, block_size, seed, &mut out);
    out
}

/// [`block_keys`] into a reused vector (cleared first), for an allocation-free routing path.
pub fn block_keys_into(tokens: &[u32], block_size: usize, seed: u64, out: &mut Vec<u64>) {
    out.clear();
    if block_size == 0 {
        return;
    }
    out.reserve(tokens.len() / block_size);
    let mut key = seed;
    for block in tokens.chunks_exact(block_size) {
        key = chain_key(key, block);
        out.push(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use std::collections::HashSet;

    #[test]
    fn full_blocks_only_and_zero_block_size() {
        let t: Vec<u32> = (0..50).collect();
        assert_eq!(block_keys(&t, 16, 7).len(), 3);
        assert!(block_keys(&t, 0, 7).is_empty());
        assert!(block_keys(&t[..15], 16, 7).is_empty());
    }

    #[test]
    fn equal_prefixes_share_keys_and_a_difference_changes_every_later_key() {
        let a: Vec<u32> = (0..64).collect();
        let mut b = a.clone();
        b[37] = 999;
        let (ka, kb) = (block_keys(&a, 16, 1), block_keys(&b, 16, 1));
        assert_eq!(ka[..2], kb[..2]);
        assert!(ka[2..].iter().zip(&kb[2..]).all(|(x, y)| x != y));
        // The chain is the composition of single steps.
        assert_eq!(chain_key(ka[1], &a[32..48]), ka[2]);
        // The seed separates namespaces.
        assert_ne!(block_keys(&a, 16, 2)[0], ka[0]);
    }

    #[test]
    fn the_length_and_position_of_tokens_matter() {
        assert_ne!(chain_key(0, &[5]), chain_key(0, &[5, 0]));
        assert_ne!(chain_key(0, &[1, 2, 3, 4]), chain_key(0, &[3, 4, 1, 2]));
        assert_ne!(chain_key(0, &[]), chain_key(0, &[0]));
    }

    #[test]
    fn keys_are_stable_across_versions() {
        // Pinned so that an accidental change of the hash (which would silently invalidate keys
        // other components may have stored) fails a test.
        let t: Vec<u32> = (0..32).collect();
        assert_eq!(
            block_keys(&t, 16, 0),
            [0xf9da_2262_8e19_45af, 0xf439_8dc8_2f1d_5908]
        );
    }

    #[test]
    fn no_collisions_and_balanced_bits_over_a_million_blocks() {
        let mut rng = ChaCha8Rng::seed_from_u64(42);
        let mut seen = HashSet::with_capacity(1 << 20);
        let mut ones = [0u32; 64];
        let block: &mut [u32] = &mut [0; 16];
        for _ in 0..(1 << 20) {
            // Small token ids and a low-entropy parent: the realistic, structured case.
            block
                .iter_mut()
                .for_each(|t| *t = rng.random_range(0..1000));
            let k = chain_key(rng.random_range(0..16), block);
            assert!(seen.insert(k));
            for (b, n) in ones.iter_mut().enumerate() {
                *n += ((k >> b) & 1) as u32;
            }
        }
        // Each bit set in 50 % ± 0.5 % of keys (that is ±10 standard deviations).
        for n in ones {
            let f = f64::from(n) / f64::from(1u32 << 20);
            assert!((f - 0.5).abs() < 0.005, "bit bias {f}");
        }
    }

    #[test]
    fn one_flipped_token_bit_flips_about_half_the_key_bits() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let mut total = 0u64;
        let trials = 10_000u64;
        for _ in 0..trials {
            let mut block: Vec<u32> = (0..16).map(|_| rng.random_range(0..150_000)).collect();
            let a = chain_key(3, &block);
            let i = rng.random_range(0..16);
            block[i] ^= 1 << rng.random_range(0..18);
            total += u64::from((a ^ chain_key(3, &block)).count_ones());
        }
        let mean = total as f64 / trials as f64;
        assert!((mean - 32.0).abs() < 0.5, "avalanche mean {mean}");
    }
}
