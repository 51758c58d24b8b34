//! A synthetic multi-turn chat workload: the prefix-reuse pattern of real chat traffic (a few
//! shared system prompts, each turn resending the whole history) with known ground truth.

use std::ops::RangeInclusive;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{invalid, Result};
use crate::trace::{PromptSpec, Request, Segment, Source, Trace, UniqueSegments};

/// Shape of [`synthetic_chat`]'s workload.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatParams {
    /// Number of conversations.
    pub conversations: u32,
    /// Turns per conversation (fewer when `max_prompt_tokens` stops one early).
    pub turns: u32,
    /// Number of distinct system prompts; each conversation picks one uniformly.
    pub system_prompts: u32,
    /// System prompt length (0: none).
    pub system_tokens: u32,
    /// Length of each new user message, uniform in the range.
    pub user_tokens: RangeInclusive<u32>,
    /// Answer length of each turn, uniform in the range; the answer is appended to the next turn.
    pub output_tokens: RangeInclusive<u32>,
    /// Conversation starts per second (Poisson process).
    pub rate_per_s: f64,
    /// Mean think time between a conversation's turns, exponential, in ms.
    pub think_time_ms: f64,
    /// A conversation ends before a turn whose prompt would exceed this (engines have a
    /// `max_model_len`).
    pub max_prompt_tokens: Option<u32>,
}

impl Default for ChatParams {
    /// Small enough for a byte-level tokenizer engine with a 16k context.
    fn default() -> Self {
        Self {
            conversations: 64,
            turns: 4,
            system_prompts: 4,
            system_tokens: 1024,
            user_tokens: 64..=256,
            output_tokens: 32..=128,
            rate_per_s: 2.0,
            think_time_ms: 3000.0,
            max_prompt_tokens: Some(16_000),
        }
    }
}

/// Build a multi-turn chat trace from `params`, fully determined by `seed`.
///
/// Turn `t + 1` of a conversation is turn `t`'s prompt, then turn `t`'s answer
/// ([`Source::Unique`], `output_tokens` long), then a new user message. The replayed engine will
/// generate a *different* answer than the synthesised one, so the reusable prefix of a turn is
/// the previous turn's prompt — as for a real client that re-sends the history verbatim to an
/// engine that did not cache its own output under the client's text.
///
/// Open loop: turn `t + 1` arrives a think time after turn `t` *arrived* (not after it
/// finished), so arrivals do not depend on the system under test and runs compare like for like.
///
/// # Errors
/// [`crate::WorkloadError::InvalidParam`] for an empty length range, a non-positive rate, a
/// negative think time, or a system prompt length with no system prompts.
pub fn synthetic_chat(params: &ChatParams, seed: u64) -> Result<Trace> {
    validate(params)?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut ids = UniqueSegments::default();
    let mut unique = |len: u32| ids.take(len);
    let mut requests = Vec::new();
    let mut start_ms = 0.0;
    for _ in 0..params.conversations {
        start_ms += exponential(&mut rng, 1000.0 / params.rate_per_s);
        let mut history = Vec::new();
        if params.system_tokens > 0 {
            let system = rng.random_range(0..params.system_prompts);
            history.push(Segment {
                source: Source::Shared(u64::from(system)),
                len: params.system_tokens,
            });
        }
        let mut at_ms = start_ms;
        for turn in 0..params.turns {
            if turn > 0 {
                at_ms += exponential(&mut rng, params.think_time_ms);
            }
            let user_len = rng.random_range(params.user_tokens.clone());
            let output = rng.random_range(params.output_tokens.clone());
            history.push(unique(user_len));
            let input = PromptSpec {
                segments: history.clone(),
            };
            if params
                .max_prompt_tokens
                .is_some_and(|max| input.len() > max)
            {
                break;
            }
            requests.push(Request {
                at_ms,
                input,
                output_tokens: output,
            });
            history.push(unique(output));
        }
    }
    Ok(Trace::new("chat", requests, None))
}

fn validate(p: &ChatParams) -> Result<()> {
    if p.user_tokens.is_empty() {
        return Err(invalid("user_tokens", "empty range"));
    }
    if p.output_tokens.is_empty() {
        return Err(invalid("output_tokens", "empty range"));
    }
    if !(p.rate_per_s.is_finite() && p.rate_per_s > 0.0) {
        return Err(invalid(
            "rate_per_s",
            format!("{} (must be > 0)", p.rate_per_s),
        ));
    }
    if !(p.think_time_ms.is_finite() && p.think_time_ms >= 0.0) {
        return Err(invalid(
            "think_time_ms",
            format!("{} (must be >= 0)", p.think_time_ms),
        ));
    }
    if p.system_tokens > 0 && p.system_prompts == 0 {
        return Err(invalid("system_prompts", "0 with system_tokens > 0"));
    }
    Ok(())
}

/// An exponential variate with the given mean (inverse CDF; `1 - u` keeps `ln` finite).
fn exponential(rng: &mut impl Rng, mean: f64) -> f64 {
    -(1.0 - rng.random::<f64>()).ln() * mean
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turns_extend_the_previous_prompt() {
        let p = ChatParams {
            conversations: 20,
            max_prompt_tokens: None,
            ..ChatParams::default()
        };
        let t = synthetic_chat(&p, 1).unwrap();
        assert_eq!(t.requests.len(), 80);
        assert_eq!(t, synthetic_chat(&p, 1).unwrap());
        assert_ne!(t, synthetic_chat(&p, 2).unwrap());
        assert!(t.requests.windows(2).all(|w| w[0].at_ms <= w[1].at_ms));
        // Find each request's successor turn: its prompt starts with this prompt, then this
        // request's answer (output_tokens long), then a user message.
        let mut followed = 0;
        for r in &t.requests {
            let n = r.input.segments.len();
            if let Some(next) = t.requests.iter().find(|q| {
                q.input.segments.len() == n + 2 && q.input.segments[..n] == r.input.segments[..]
            }) {
                assert_eq!(next.input.segments[n].len, r.output_tokens);
                assert!(next.at_ms >= r.at_ms);
                followed += 1;
            }
        }
        assert_eq!(followed, 60);
        // Every conversation starts with one of the 4 system prompts.
        for r in &t.requests {
            let Source::Shared(s) = r.input.segments[0].source else {
                panic!()
            };
            assert!(s < 4);
        }
    }

    #[test]
    fn arrival_rate_is_roughly_the_parameter() {
        let p = ChatParams {
            conversations: 2000,
            turns: 1,
            rate_per_s: 10.0,
            ..ChatParams::default()
        };
        let t = synthetic_chat(&p, 3).unwrap();
        let rate = t.stats().requests_per_s.unwrap();
        assert!((rate - 10.0).abs() < 1.0, "{rate}");
    }

    #[test]
    fn max_prompt_stops_conversations() {
        let p = ChatParams {
            conversations: 10,
            turns: 50,
            max_prompt_tokens: Some(3000),
            ..ChatParams::default()
        };
        let t = synthetic_chat(&p, 4).unwrap();
        assert!(t.requests.iter().all(|r| r.input.len() <= 3000));
        assert!(t.requests.len() < 500);
    }

    #[test]
    fn invalid_params() {
        let d = ChatParams::default();
        #[allow(clippy::reversed_empty_ranges)]
        let bad = [
            ChatParams {
                user_tokens: 5..=4,
                ..d.clone()
            },
            ChatParams {
                output_tokens: 5..=4,
                ..d.clone()
            },
            ChatParams {
                rate_per_s: 0.0,
                ..d.clone()
            },
            ChatParams {
                think_time_ms: -1.0,
                ..d.clone()
            },
            ChatParams {
                system_prompts: 0,
                ..d.clone()
            },
        ];
        for p in bad {
            assert!(synthetic_chat(&p, 0).is_err(), "{p:?}");
        }
    }
}
