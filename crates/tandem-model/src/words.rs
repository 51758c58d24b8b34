//! Output vocabularies whose text re-tokenizes to the same ids.
//!
//! A simulated engine draws output tokens from a list of ids. If that list holds arbitrary
//! vocabulary entries (byte fragments, punctuation runs, half words), the detokenized output
//! re-tokenizes to a different number of tokens, and benchmark clients that count output tokens
//! by re-tokenizing the text (vLLM's `bench serve` warns on a mismatch) disagree with `usage`.
//!
//! [`word_ids`] picks whole-word ids instead: ids whose text is a space followed by 2–10 ASCII
//! lowercase letters and that encode back to exactly themselves. With a byte-level BPE
//! pre-tokenizer (GPT-2, Llama 3, Qwen: the regex splits ` word` runs apart), any concatenation
//! of such texts splits into the same pieces and so encodes to the same ids; a sample of
//! concatenations is checked anyway, and ids that fail it are dropped.
//!
//! Only the tokenizer's public API is used (`vocab_size`, `decode`, `encode`, `eos`), so this
//! works for any tokenizer the crate loads.

use crate::tokenizer::Tokenizer;

/// How many word ids a sampler keeps: enough variety for realistic text, and a bounded start-up
/// scan (ids are scanned in order and the scan stops here).
pub const DEFAULT_WORDS: usize = 2048;

/// Fewer whole-word ids than this and the tokenizer is not of the kind this module understands
/// (e.g. SentencePiece, whose single-id decode drops the leading space): fall back.
const MIN_WORDS: usize = 64;

/// How many candidates are concatenated and re-encoded together in one check.
const CHECK_CHUNK: usize = 256;

/// Ids for a sampler to draw from, at most `max` (in vocabulary order), such that any
/// concatenation of their decoded texts encodes back to exactly those ids.
///
/// The byte-level tokenizer keeps its historical list: the 26 lowercase letters and the space,
/// listed five times to weight it (bytes re-tokenize trivially). A tokenizer with too few
/// whole-word ids falls back to [`Tokenizer::sample_ids`] (every non-special id).
pub fn word_ids(tok: &Tokenizer, max: usize) -> Vec<u32> {
    if is_byte_level(tok) {
        let mut ids: Vec<u32> = (u32::from(b'a')..=u32::from(b'z')).collect();
        ids.extend([u32::from(b' '); 5]);
        return ids;
    }
    let mut found: Vec<(u32, String)> = Vec::with_capacity(max.min(4096));
    for id in 0..tok.vocab_size() {
        if found.len() >= max {
            break;
        }
        if id == tok.eos() {
            continue;
        }
        let Ok(text) = tok.decode(&[id]) else {
            continue;
        };
        // Whether the id encodes back to itself is checked on concatenations below: a chunk
        // that re-encodes to its ids proves it for each member, at a fraction of the cost of
        // one encode per id.
        if is_word(&text) {
            found.push((id, text));
        }
    }
    let words = drop_unstable(tok, found);
    if words.len() < MIN_WORDS {
        return tok.sample_ids();
    }
    words
}

/// The built-in byte tokenizer: 256 bytes plus BOS and EOS, each byte its own id.
/// (`vocab_size` goes last: a HF tokenizer builds its whole vocabulary map to count it.)
fn is_byte_level(tok: &Tokenizer) -> bool {
    tok.encode("a b", false).ok().as_deref() == Some(&[97, 32, 98][..])
        && tok.decode(&[97]).ok().as_deref() == Some("a")
        && tok.vocab_size() == 258
}

/// A space, then 2–10 ASCII lowercase letters.
fn is_word(text: &str) -> bool {
    let Some(rest) = text.strip_prefix(' ') else {
        return false;
    };
    (2..=10).contains(&rest.len()) && rest.bytes().all(|b| b.is_ascii_lowercase())
}

/// Check concatenations chunk by chunk; in a chunk that does not re-encode to its ids, keep
/// only the members that re-encode alone and around their neighbour.
fn drop_unstable(tok: &Tokenizer, found: Vec<(u32, String)>) -> Vec<u32> {
    let mut out = Vec::with_capacity(found.len());
    for chunk in found.chunks(CHECK_CHUNK) {
        let ids: Vec<u32> = chunk.iter().map(|(id, _)| *id).collect();
        let text: String = chunk.iter().map(|(_, t)| t.as_str()).collect();
        if tok.encode(&text, false).ok() == Some(ids.clone()) {
            out.extend(ids);
            continue;
        }
        for (i, (id, t)) in chunk.iter().enumerate() {
            let next = &chunk[(i + 1) % chunk.len()];
            let alone = tok.encode(t, false).ok() == Some(vec![*id]);
            let pair = format!("{t}{}{t}", next.1);
            if alone && tok.encode(&pair, false).ok() == Some(vec![*id, next.0, *id]) {
                out.push(*id);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic pseudo-random walk over `ids`, as a sampler would draw them.
    fn walk(ids: &[u32], len: usize, mut h: u64) -> Vec<u32> {
        (0..len)
            .map(|_| {
                h = h
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                ids[(h >> 33) as usize % ids.len()]
            })
            .collect()
    }

    #[test]
    fn byte_level_keeps_letters_and_spaces_and_re_tokenizes() {
        let t = Tokenizer::byte_level();
        let ids = word_ids(&t, DEFAULT_WORDS);
        assert_eq!(ids.len(), 26 + 5);
        assert!(ids
            .iter()
            .all(|&i| i == u32::from(b' ') || (97..=122).contains(&i)));
        for seed in 0..20 {
            let out = walk(&ids, 200, seed);
            let text = t.decode(&out).unwrap();
            assert_eq!(t.encode(&text, false).unwrap(), out);
        }
    }

    #[test]
    fn words_match_their_shape() {
        assert!(is_word(" hello"));
        assert!(is_word(" ab"));
        assert!(!is_word(" a"));
        assert!(!is_word("hello"));
        assert!(!is_word(" Hello"));
        assert!(!is_word(" abcdefghijk"));
        assert!(!is_word(" h3llo"));
    }

    /// With the real Qwen3 `tokenizer.json` (`$TANDEM_QWEN_TOKENIZER`): generated text
    /// re-tokenizes to the same ids, and the scan is cheap even unoptimised.
    #[test]
    fn real_tokenizer_words_re_tokenize() {
        let Some(path) = std::env::var_os("TANDEM_QWEN_TOKENIZER") else {
            eprintln!("skipped: set TANDEM_QWEN_TOKENIZER to a Qwen3 tokenizer.json to run");
            return;
        };
        let t = Tokenizer::from_file(std::path::Path::new(&path)).expect("load tokenizer");
        let start = std::time::Instant::now();
        let ids = word_ids(&t, DEFAULT_WORDS);
        let took = start.elapsed();
        eprintln!("{} word ids in {took:?}", ids.len());
        // The scan stops at DEFAULT_WORDS candidates; a few may fail the concatenation check.
        assert!(ids.len() > DEFAULT_WORDS * 9 / 10, "{}", ids.len());
        // Generous against a loaded machine; measured well under this (see the module docs).
        assert!(took < std::time::Duration::from_secs(3), "{took:?}");
        for &id in &ids {
            assert!(is_word(&t.decode(&[id]).unwrap()));
        }
        for seed in 0..50 {
            let out = walk(&ids, 300, seed);
            let text = t.decode(&out).unwrap();
            assert_eq!(t.encode(&text, false).unwrap(), out, "seed {seed}");
        }
    }
}
