//! Turning a sampled token into output: EOS, stop token ids and stop strings, incremental text.

use rand::Rng;

use super::SeqMeta;
use crate::sampler::{sample, SampleVocab};
use crate::scheduler::FinishReason;
use crate::tokenizer::SimTokenizer;

/// Sample the next token of a sequence and decide whether it ends it.
pub(super) fn decide(
    m: &mut SeqMeta,
    tokenizer: &SimTokenizer,
    vocab: &SampleVocab,
    tokens: &[u32],
    prompt_len: usize,
) -> (u32, Option<FinishReason>) {
    let position = tokens.len() - prompt_len;
    let token = if position == 0 && m.force_eos_first {
        vocab.eos
    } else {
        sample(vocab, m.seed, m.fingerprint, position, m.index)
    };
    let may_stop = position >= m.params.min_tokens;
    if token == vocab.eos && !m.params.ignore_eos && may_stop {
        return (token, Some(FinishReason::Stop));
    }
    if may_stop && m.params.stop_token_ids.contains(&token) {
        m.stop_reason = Some(token.into());
        return (token, Some(FinishReason::Stop));
    }
    let mut output: Vec<u32> = tokens[prompt_len..].to_vec();
    output.push(token);
    // Decoding the whole output keeps multi-byte characters intact across token boundaries.
    let text = tokenizer.decode(&output).unwrap_or_default();
    if may_stop {
        let search_from = floor_char_boundary(
            &text,
            m.text
                .len()
                .saturating_sub(m.params.stop.iter().map(|s| s.len()).max().unwrap_or(0)),
        );
        for stop in &m.params.stop {
            if stop.is_empty() {
                continue;
            }
            if let Some(pos) = text[search_from..].find(stop.as_str()) {
                let at = search_from + pos;
                let end = if m.params.include_stop_str_in_output {
                    at + stop.len()
                } else {
                    at
                };
                m.text = text[..end].to_string();
                m.stop_reason = Some(stop.clone().into());
                return (token, Some(FinishReason::Stop));
            }
        }
    }
    m.text = text;
    (token, None)
}

pub(super) fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    if i >= s.len() {
        return s.len();
    }
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// Wall-clock seconds, vLLM's `time.time()` for event batch timestamps.
pub(super) fn wall_clock_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// A fresh 8-hex-char suffix for internal request ids (vLLM's `random_uuid()[:8]`).
pub fn random_suffix(rng: &mut impl Rng) -> String {
    format!("{:08x}", rng.random::<u32>())
}
