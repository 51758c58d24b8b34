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
    let forced = m
        .params
        .forced
        .as_ref()
        .and_then(|f| f.get(m.index as usize));
    // A forced sequence ends with its last token ("stop"), whatever min_tokens says.
    let forced_end = forced.is_some_and(|f| position + 1 >= f.len());
    let token = if position == 0 && m.force_eos_first {
        vocab.eos
    } else if let Some(f) = forced {
        f.get(position).copied().unwrap_or(vocab.eos)
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
    let mut text = std::mem::take(&mut m.text);
    text.push_str(&detokenize_step(tokenizer, &output, &mut m.detok));
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
    (token, forced_end.then_some(FinishReason::Stop))
}

/// vLLM's incremental detokenizer: decode a short window (`prefix..` against `prefix..read`) so
/// each token costs O(window), not O(output); text is released only once it no longer ends in
/// an incomplete character.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct DetokState {
    prefix: usize,
    read: usize,
}

fn detokenize_step(tokenizer: &SimTokenizer, output: &[u32], st: &mut DetokState) -> String {
    let prefix_text = tokenizer
        .decode(&output[st.prefix..st.read])
        .unwrap_or_default();
    let new_text = tokenizer.decode(&output[st.prefix..]).unwrap_or_default();
    if new_text.len() <= prefix_text.len() || new_text.ends_with('\u{FFFD}') {
        return String::new();
    }
    let delta = match new_text.strip_prefix(prefix_text.as_str()) {
        Some(d) => d.to_string(),
        // The window re-tokenised differently (rare): take the part past the old length.
        None => new_text[floor_char_boundary(&new_text, prefix_text.len())..].to_string(),
    };
    st.prefix = st.read;
    st.read = output.len();
    delta
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn incremental_detokenization_holds_back_split_characters() {
        let t = SimTokenizer::byte_level();
        let mut st = DetokState::default();
        let mut out = Vec::new();
        let mut text = String::new();
        // "aé b": 'é' is two bytes, so it arrives over two tokens.
        for b in "aé b".bytes() {
            out.push(u32::from(b));
            let delta = detokenize_step(&t, &out, &mut st);
            assert!(!delta.contains('\u{FFFD}'));
            text.push_str(&delta);
        }
        assert_eq!(text, "aé b");
        // The window stays short however long the output grows.
        assert!(st.read - st.prefix <= 2);
    }
}
