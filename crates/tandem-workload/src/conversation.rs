//! A synthetic conversation workload shaped like the Mooncake conversation trace (perf-model
//! §3.1–§3.2, held out as an evaluation set), so that what happens on that trace can be
//! reproduced without the file: one system block shared by every request, tool/instruction
//! prefixes shared by subsets of sessions, long-tailed first-turn contexts, and sessions that
//! resend their whole history each turn.
//!
//! The target (perf-model §3.2): 12,031 requests (12,014 under 120k tokens) over 3,537 s,
//! 3.40 req/s; input mean 12,035, p50 6,909, p90 27,367, p99 85,401; output mean 343, p90 597,
//! p99 1,120, max 2,000; every request starting with the same 512-token block; infinite-cache
//! prefix hit 37.4 % of tokens (36.6 % of blocks, 33.9 % without the shared first block). And
//! since a routing comparison runs with finite caches, the reuse *distance* too: one LRU of
//! 0.5 M / 2.6 M / 10.2 M / 25.6 M tokens keeps 4.5 / 11.0 / 28.8 / 35.5 % of the blocks, and
//! 8 instances keep 13.6 % (round-robin, unbounded), 6.1 % (round-robin, 512 k each) and 4.5 % /
//! 26.3 % (longest prefix, 512 k / 8.2 M each; it sends everything to one instance).
//!
//! # Defaults, and why
//!
//! | field | default | why |
//! |---|---|---|
//! | `duration_ms` | 3,540,000 (59 min) | the trace's span |
//! | `warmup_ms` | 1,800,000 | the recording opens mid-conversation; 30 min is ~6 mean think times, so the window is in steady state from its first second (no ramp-up of follow-ups) |
//! | `session_rate_per_s` | 2.2 | × 1.55 turns ≈ 3.40 req/s, the trace's rate: ≈ 12,000 requests in 59 min |
//! | `mean_turns` | 1.55 | the bound pins it: each follow-up turn hits its whole previous prompt, so the bound is about the share of follow-up tokens plus the first turns' shared blocks. about a third of the requests are follow-ups; a mean of 2 turns puts the bound near 50 % |
//! | `system_tokens` | 512 | every request of the trace starts with the same first block (hash id 0): one system prompt for all, 2.7 points of the bound, and what makes a pure longest-prefix router send everything to one engine |
//! | `tool_tokens` | 16 blocks, 2,048 + 256·k tokens (2–6k) | the cross-session sharing beyond block 0 that round-robin over unbounded caches still finds (13.6 %); 16 blocks used by 15 % of the sessions are each reused every ~50 s (~1.3 M tokens of new blocks), so, as in the trace, small caches lose them (one LRU of 0.5 M tokens keeps 4.5 % there, 6.0 % here) |
//! | `tool_fraction` | 0.15 | as above; more would raise the small-cache hit rates past the trace's |
//! | `context_mean_tokens`, `context_sigma` | 13,000, 1.5 | the input percentiles: a lognormal redrawn above the 120k cap (mean 10.1k after truncation) plus follow-ups gives p50/p90/p99 within 10 % of the trace's and its 12k mean |
//! | `user_mean_tokens`, `user_sigma` | 1,000, 1.0 | a new message of hundreds to a couple of thousand tokens (p10 170, median 610, p90 2,200) |
//! | `output_mean_tokens`, `output_sigma`, `max_output_tokens` | 345, 0.6, 2,000 | the trace's mean 343, p90 597, p99 1,120 and max 2,000 (its median, 350, is higher than any lognormal with that mean allows: 289 here) |
//! | `think_time_ms`, `think_time_sigma` | 300,000 (5 min), 0.95 | the trace's LRU capacity sweep: reuse comes minutes later (10.2 M tokens, ~6 min of the trace's new blocks, are needed for 28.8 %), and hardly ever within seconds (0.5 M: 4.5 %, nearly all block 0); a lognormal with median ~3 min fits all four points, a mean of 45 s puts 13 % at 0.5 M and 39 % at 10.2 M |
//! | `max_prompt_tokens` | 120,000 | what `tandem bench trace` keeps by default (a 131,072-token model); the trace has 17 requests above it |
//! | `timestamp_bucket_ms` | 3,000 | the recording's timestamps are 3 s buckets (1,180 distinct, up to 28 requests in one); replayed as they are, arrivals come in bursts, which is what loads a router's queue estimates and the decode handoffs unevenly. The busiest bucket here holds 15–40 requests |
//!
//! # Measured statistics of the default trace
//!
//! Seed 0, from `default_trace_figures` (run it with `--ignored --nocapture`):
//! 12,033 requests from 8,136 sessions over 3,539 s (3.40 req/s); input mean 11,872, p50 6,319,
//! p90 28,017, p99 82,250, max 118,915; output mean 346, p50 289, p90 631, p99 1,151, max 2,000.
//! Infinite cache: 38.6 % of prompt tokens with the engines' 16-token blocks (what `tandem bench
//! trace` prints for this trace, which has no block size of its own), 37.8 % of tokens and
//! 37.0 % of blocks with Mooncake's 512, 34.3 % of blocks without the system block. One LRU of
//! 0.5 M / 2.6 M / 10.2 M / 25.6 M tokens: 6.0 / 12.4 / 28.9 / 35.9 % of blocks. 8 instances:
//! round-robin 14.1 % unbounded, 6.8 % at 512 k; longest prefix 6.0 % at 512 k, 26.3 % at 8.2 M,
//! max/mean requests 8.0. Seeds 1–3: 11,832–12,135 requests, mean input 11,842–12,490, bound
//! 36.6–38.5 % of tokens (512-token blocks), one 0.5 M LRU 5.5–5.9 %.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{invalid, Result};
use crate::trace::{PromptSpec, Request, Segment, Source, Trace, UniqueSegments};

/// Shape of [`synthetic_conversation`]'s workload. Lengths are in tokens; lognormal lengths are
/// given by their mean and the standard deviation `sigma` of their logarithm.
#[derive(Debug, Clone, PartialEq)]
pub struct ConversationParams {
    /// The trace's length: it keeps the requests arriving in `[0, duration_ms)`, and sessions
    /// still running at its end are cut off, as in a recording.
    pub duration_ms: f64,
    /// Sessions also start in `[-warmup_ms, 0)`, so that the trace opens in the middle of
    /// conversations, as a recording does, rather than with an empty system: their turns before
    /// 0 are left out, and their later turns resend history no cache has seen.
    pub warmup_ms: f64,
    /// Session starts per second (Poisson process over `[-warmup_ms, duration_ms)`).
    pub session_rate_per_s: f64,
    /// Mean turns per session, geometric on 1, 2, … (fewer when `max_prompt_tokens` stops a
    /// session early). At least 1.
    pub mean_turns: f64,
    /// Length of the one system block every request starts with ([`Source::Shared`] 0; 0: none).
    pub system_tokens: u32,
    /// The subset shared prefixes (tool or instruction blocks), one length each; tool block `k`
    /// is [`Source::Shared`] `k + 1`, placed right after the system block.
    pub tool_tokens: Vec<u32>,
    /// Fraction of sessions, in `[0, 1]`, that carry one tool block, picked uniformly.
    pub tool_fraction: f64,
    /// Mean of the first turn's own context (documents and the first user message), lognormal,
    /// redrawn while the first turn would exceed `max_prompt_tokens` (so the mean of what is
    /// kept is lower).
    pub context_mean_tokens: f64,
    /// Log-standard deviation of the first turn's context.
    pub context_sigma: f64,
    /// Mean of each later turn's new user message, lognormal.
    pub user_mean_tokens: f64,
    /// Log-standard deviation of the user messages.
    pub user_sigma: f64,
    /// Mean answer length, lognormal (before the `max_output_tokens` clamp); each answer is
    /// appended to the session's next turn.
    pub output_mean_tokens: f64,
    /// Log-standard deviation of the answers.
    pub output_sigma: f64,
    /// Longest answer.
    pub max_output_tokens: u32,
    /// Mean think time between a session's turns, lognormal, in ms (between arrivals: open
    /// loop, as in [`crate::synthetic_chat`]).
    pub think_time_ms: f64,
    /// Log-standard deviation of the think times.
    pub think_time_sigma: f64,
    /// No prompt is longer: a session ends before a turn that would exceed it.
    pub max_prompt_tokens: u32,
    /// Arrival times are floored to multiples of this (0: exact), as the recorded trace's
    /// timestamps are to 3,000 ms buckets (up to 28 requests share one): replayed as they are,
    /// its arrivals come in bursts, and so do these.
    pub timestamp_bucket_ms: f64,
}

impl Default for ConversationParams {
    /// The Mooncake conversation trace's shape; see the module docs for each value's reason.
    fn default() -> Self {
        Self {
            duration_ms: 3_540_000.0,
            warmup_ms: 1_800_000.0,
            session_rate_per_s: 2.2,
            mean_turns: 1.55,
            system_tokens: 512,
            tool_tokens: (0..16).map(|k| 2048 + 256 * k).collect(),
            tool_fraction: 0.15,
            context_mean_tokens: 13_000.0,
            context_sigma: 1.5,
            user_mean_tokens: 1000.0,
            user_sigma: 1.0,
            output_mean_tokens: 345.0,
            output_sigma: 0.6,
            max_output_tokens: 2000,
            think_time_ms: 300_000.0,
            think_time_sigma: 0.95,
            max_prompt_tokens: 120_000,
            timestamp_bucket_ms: 3_000.0,
        }
    }
}

/// Build a conversation trace from `params`, fully determined by `seed`.
///
/// A session's first turn is the system block, its tool block if it has one, then its own
/// context ([`Source::Unique`]). Turn `t + 1` is turn `t`'s whole prompt, then turn `t`'s answer
/// (`output_tokens` long, [`Source::Unique`]), then a new user message — the history resent
/// verbatim, as in [`crate::synthetic_chat`]. Turn `t + 1` arrives a think time after turn `t`
/// arrived. The trace has no block size of its own (`block_tokens` is `None`): prefix sharing is
/// in the segments, at any granularity.
///
/// # Errors
/// [`crate::WorkloadError::InvalidParam`] for a non-positive or non-finite duration, rate, mean
/// or think time, a negative warm-up or sigma, a mean turn count below 1, a tool fraction
/// outside `[0, 1]`, a positive tool fraction without tool blocks, a zero-length tool block, a
/// zero `max_output_tokens`, or a `max_prompt_tokens` that leaves no room for a first turn's
/// context after the system and longest tool block.
pub fn synthetic_conversation(params: &ConversationParams, seed: u64) -> Result<Trace> {
    validate(params)?;
    let p = params;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut ids = UniqueSegments::default();
    let mut unique = |len: u32| ids.take(len);
    let continue_p = 1.0 - 1.0 / p.mean_turns;
    let mut requests = Vec::new();
    let mut start_ms = -p.warmup_ms;
    loop {
        start_ms += exponential(&mut rng, 1000.0 / p.session_rate_per_s);
        if start_ms >= p.duration_ms {
            break;
        }
        // Both draws for every session, so that `tool_fraction` does not reshuffle which tool
        // block the other sessions get.
        let with_tool = rng.random::<f64>() < p.tool_fraction;
        let tool = rng.random_range(0..p.tool_tokens.len().max(1));
        let mut history = Vec::new();
        if p.system_tokens > 0 {
            history.push(Segment {
                source: Source::Shared(0),
                len: p.system_tokens,
            });
        }
        if with_tool {
            history.push(Segment {
                source: Source::Shared(tool as u64 + 1),
                len: p.tool_tokens[tool],
            });
        }
        let room = p.max_prompt_tokens
            - PromptSpec {
                segments: history.clone(),
            }
            .len();
        let context = context_tokens(&mut rng, p, room);
        history.push(unique(context));
        let mut at_ms = start_ms;
        for turn in 0u32.. {
            // Geometric turn counts: another turn with probability `continue_p`. Drawn turn by
            // turn, so that the prompt cap bounds the loop whatever `mean_turns` is.
            if turn > 0 {
                if rng.random::<f64>() >= continue_p {
                    break;
                }
                at_ms += lognormal(&mut rng, p.think_time_ms, p.think_time_sigma);
                let user = tokens(
                    lognormal(&mut rng, p.user_mean_tokens, p.user_sigma),
                    p.max_prompt_tokens,
                );
                history.push(unique(user));
            }
            if at_ms >= p.duration_ms {
                break;
            }
            let output = tokens(
                lognormal(&mut rng, p.output_mean_tokens, p.output_sigma),
                p.max_output_tokens,
            );
            // In u64: the history is at most one cap long before this turn's answer and message.
            let len: u64 = history.iter().map(|s| u64::from(s.len)).sum();
            if len > u64::from(p.max_prompt_tokens) {
                break;
            }
            if at_ms >= 0.0 {
                let at_ms = if p.timestamp_bucket_ms > 0.0 {
                    (at_ms / p.timestamp_bucket_ms).floor() * p.timestamp_bucket_ms
                } else {
                    at_ms
                };
                requests.push(Request {
                    at_ms,
                    input: PromptSpec {
                        segments: history.clone(),
                    },
                    output_tokens: output,
                });
            }
            history.push(unique(output));
        }
    }
    Ok(Trace::new("conversation", requests, None))
}

fn validate(p: &ConversationParams) -> Result<()> {
    let positive = |name, x: f64| {
        if x.is_finite() && x > 0.0 {
            Ok(())
        } else {
            Err(invalid(name, format!("{x} (must be > 0)")))
        }
    };
    let non_negative = |name, x: f64| {
        if x.is_finite() && x >= 0.0 {
            Ok(())
        } else {
            Err(invalid(name, format!("{x} (must be >= 0)")))
        }
    };
    positive("duration_ms", p.duration_ms)?;
    non_negative("warmup_ms", p.warmup_ms)?;
    non_negative("timestamp_bucket_ms", p.timestamp_bucket_ms)?;
    positive("session_rate_per_s", p.session_rate_per_s)?;
    positive("context_mean_tokens", p.context_mean_tokens)?;
    positive("user_mean_tokens", p.user_mean_tokens)?;
    positive("output_mean_tokens", p.output_mean_tokens)?;
    non_negative("context_sigma", p.context_sigma)?;
    non_negative("user_sigma", p.user_sigma)?;
    non_negative("output_sigma", p.output_sigma)?;
    positive("think_time_ms", p.think_time_ms)?;
    non_negative("think_time_sigma", p.think_time_sigma)?;
    if !(p.mean_turns.is_finite() && p.mean_turns >= 1.0) {
        return Err(invalid(
            "mean_turns",
            format!("{} (must be >= 1)", p.mean_turns),
        ));
    }
    if !(0.0..=1.0).contains(&p.tool_fraction) {
        return Err(invalid(
            "tool_fraction",
            format!("{} (must be in [0, 1])", p.tool_fraction),
        ));
    }
    if p.tool_fraction > 0.0 && p.tool_tokens.is_empty() {
        return Err(invalid("tool_tokens", "empty with tool_fraction > 0"));
    }
    if p.tool_tokens.contains(&0) {
        return Err(invalid("tool_tokens", "a tool block of 0 tokens"));
    }
    if p.max_output_tokens == 0 {
        return Err(invalid("max_output_tokens", "must be at least 1"));
    }
    let longest_prefix =
        u64::from(p.system_tokens) + u64::from(p.tool_tokens.iter().copied().max().unwrap_or(0));
    if u64::from(p.max_prompt_tokens) <= longest_prefix {
        return Err(invalid(
            "max_prompt_tokens",
            format!(
                "{} leaves no room after {longest_prefix} system and tool tokens",
                p.max_prompt_tokens
            ),
        ));
    }
    Ok(())
}

/// A first-turn context that fits in `room`: redrawn while longer (a truncated lognormal, so the
/// cap leaves no spike at `max_prompt_tokens`), clamped after [`MAX_REDRAWS`] draws.
fn context_tokens(rng: &mut impl Rng, p: &ConversationParams, room: u32) -> u32 {
    let mut x = 0.0;
    for _ in 0..MAX_REDRAWS {
        x = lognormal(rng, p.context_mean_tokens, p.context_sigma);
        if x.round() <= f64::from(room) {
            break;
        }
    }
    tokens(x, room)
}

/// Draws of a first-turn context before it is clamped instead (the defaults redraw about one
/// session in 80, nearly always once).
const MAX_REDRAWS: u32 = 16;

/// A token count from a length variate: rounded, at least 1, at most `max`.
fn tokens(x: f64, max: u32) -> u32 {
    x.round().clamp(1.0, f64::from(max)) as u32
}

/// A lognormal variate with the given mean and log-standard deviation.
fn lognormal(rng: &mut impl Rng, mean: f64, sigma: f64) -> f64 {
    let mu = mean.ln() - sigma * sigma / 2.0;
    (mu + sigma * standard_normal(rng)).exp()
}

/// A standard normal variate (Box–Muller; `1 - u` keeps `ln` finite).
fn standard_normal(rng: &mut impl Rng) -> f64 {
    let r = (-2.0 * (1.0 - rng.random::<f64>()).ln()).sqrt();
    r * (std::f64::consts::TAU * rng.random::<f64>()).cos()
}

/// An exponential variate with the given mean (inverse CDF; `1 - u` keeps `ln` finite).
fn exponential(rng: &mut impl Rng, mean: f64) -> f64 {
    -(1.0 - rng.random::<f64>()).ln() * mean
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::bound::{infinite_cache_hits, lru_cache_hits, Assignment};
    use crate::report::percentile;
    use crate::synth::Synthesizer;

    /// The session of a request: the id of its first unique segment (its first-turn context).
    fn session(r: &Request) -> u64 {
        r.input
            .segments
            .iter()
            .find_map(|s| match s.source {
                Source::Unique(id) => Some(id),
                _ => None,
            })
            .unwrap()
    }

    fn mean(sum: u64, n: usize) -> f64 {
        sum as f64 / n as f64
    }

    #[test]
    fn default_trace_has_the_target_shape() {
        let p = ConversationParams::default();
        let t = synthetic_conversation(&p, 0).unwrap();
        let s = t.stats();
        assert!((11_000..=13_000).contains(&s.requests), "{}", s.requests);
        let span_s = s.span_ms / 1000.0;
        assert!((3_300.0..=3_800.0).contains(&span_s), "{span_s}");
        let mean_in = mean(s.input_tokens, s.requests);
        assert!((11_000.0..=13_000.0).contains(&mean_in), "{mean_in}");
        let mean_out = mean(s.output_tokens, s.requests);
        assert!((300.0..=380.0).contains(&mean_out), "{mean_out}");
        // 512-token blocks, as for the Mooncake trace, to keep a debug build fast; `tandem bench
        // trace` counts 16-token blocks (the engines'), which can only find more (+0.8 points
        // here, see `default_trace_figures`).
        let bound = infinite_cache_hits(&t, Some(512)).unwrap().token_fraction();
        assert!((0.30..=0.45).contains(&bound), "{bound}");
        assert!(t.requests.windows(2).all(|w| w[0].at_ms <= w[1].at_ms));
        let system = Segment {
            source: Source::Shared(0),
            len: 512,
        };
        for r in &t.requests {
            assert_eq!(r.input.segments[0], system);
            assert!(r.input.len() <= p.max_prompt_tokens);
            assert!((1..=p.max_output_tokens).contains(&r.output_tokens));
        }
        // A long tail: some prompts past 100k tokens, but no spike at the cap.
        let long = t
            .requests
            .iter()
            .filter(|r| r.input.len() > 100_000)
            .count();
        let at_cap = t
            .requests
            .iter()
            .filter(|r| r.input.len() == p.max_prompt_tokens)
            .count();
        assert!(long > 10 && at_cap <= 1, "{long} {at_cap}");
        assert_eq!(t.block_tokens, None);
        assert_eq!(t.name, "conversation");
        // Timestamps in 3 s buckets, several requests sharing one, as in the recording.
        assert!(t.requests.iter().all(|r| r.at_ms % 3_000.0 == 0.0));
        let mut per_bucket: HashMap<u64, u32> = HashMap::new();
        for r in &t.requests {
            *per_bucket.entry(r.at_ms as u64).or_default() += 1;
        }
        let busiest = per_bucket.values().copied().max().unwrap();
        assert!((15..=40).contains(&busiest), "{busiest} in one bucket");
    }

    #[test]
    fn seeded() {
        let p = ConversationParams {
            duration_ms: 200_000.0,
            ..ConversationParams::default()
        };
        let t = synthetic_conversation(&p, 1).unwrap();
        assert_eq!(t, synthetic_conversation(&p, 1).unwrap());
        assert_ne!(t, synthetic_conversation(&p, 2).unwrap());
    }

    #[test]
    fn turns_resend_the_whole_history() {
        let t = synthetic_conversation(&ConversationParams::default(), 3).unwrap();
        let mut sessions: HashMap<u64, Vec<&Request>> = HashMap::new();
        for r in &t.requests {
            sessions.entry(session(r)).or_default().push(r);
        }
        let mut follow_ups = 0;
        for turns in sessions.values() {
            // In arrival order already (the trace is sorted); each turn extends the previous one
            // by its answer and one user message.
            for w in turns.windows(2) {
                let (prev, next) = (&w[0].input.segments, &w[1].input.segments);
                assert_eq!(next.len(), prev.len() + 2);
                assert_eq!(next[..prev.len()], prev[..]);
                assert_eq!(next[prev.len()].len, w[0].output_tokens);
                assert!(matches!(next[prev.len() + 1].source, Source::Unique(_)));
                assert!(w[1].at_ms >= w[0].at_ms);
                follow_ups += 1;
            }
        }
        let n = t.requests.len();
        assert_eq!(follow_ups + sessions.len(), n);
        // Geometric with mean 1.55 turns: 1 - 1 / 1.55 = 35 % of the turns are follow-ups, a few
        // less once the cap and the window end cut sessions short.
        let share = follow_ups as f64 / n as f64;
        assert!((0.30..0.40).contains(&share), "{share}");
        assert!(sessions.values().any(|v| v.len() >= 5));
        // The warm-up: some sessions open mid-conversation (their first request in the trace
        // does not end with their context).
        assert!(sessions.values().any(|v| {
            v[0].input.segments.last().unwrap().source != Source::Unique(session(v[0]))
        }));
    }

    #[test]
    fn shared_blocks_synthesise_identically() {
        let t = synthetic_conversation(
            &ConversationParams {
                duration_ms: 120_000.0,
                warmup_ms: 0.0,
                ..ConversationParams::default()
            },
            4,
        )
        .unwrap();
        // Tool blocks: about `tool_fraction` of the sessions, each right after the system block.
        let firsts: Vec<&Request> = {
            let mut seen = std::collections::HashSet::new();
            t.requests
                .iter()
                .filter(|r| seen.insert(session(r)))
                .collect()
        };
        let tools: Vec<u64> = firsts
            .iter()
            .filter_map(|r| match r.input.segments[1].source {
                Source::Shared(k) => Some(k),
                _ => None,
            })
            .collect();
        let share = tools.len() as f64 / firsts.len() as f64;
        assert!((0.08..0.25).contains(&share), "{share}");
        assert!(tools.iter().all(|&k| (1..=16).contains(&k)));
        // The tokens: every prompt's first 512 are the same; two sessions on one tool block
        // share it too.
        let synth = Synthesizer::new(0, 0..256).unwrap();
        let head = |r: &Request, n: usize| synth.tokens(r)[..n].to_vec();
        let system = head(firsts[0], 512);
        for r in firsts.iter().take(20) {
            assert_eq!(head(r, 512), system);
        }
        // Some tool block is used twice (about 40 sessions on 16 blocks).
        let k = *tools
            .iter()
            .find(|&&k| tools.iter().filter(|&&j| j == k).count() >= 2)
            .unwrap();
        let on_k: Vec<&&Request> = firsts
            .iter()
            .filter(|r| r.input.segments[1].source == Source::Shared(k))
            .take(2)
            .collect();
        let n = 512 + on_k[0].input.segments[1].len as usize;
        assert_eq!(head(on_k[0], n), head(on_k[1], n));
    }

    #[test]
    fn max_prompt_stops_sessions() {
        let p = ConversationParams {
            duration_ms: 80_000.0,
            warmup_ms: 0.0,
            mean_turns: 10.0,
            tool_tokens: vec![1000],
            context_mean_tokens: 1000.0,
            think_time_ms: 1000.0,
            max_prompt_tokens: 3000,
            ..ConversationParams::default()
        };
        let t = synthetic_conversation(&p, 5).unwrap();
        assert!(t.requests.iter().all(|r| r.input.len() <= 3000));
        // Every session keeps its first turn (no warm-up: each session's first request ends with
        // its context); few reach the 10 turns they would have without the cap.
        let mut sessions = std::collections::HashSet::new();
        for r in &t.requests {
            if sessions.insert(session(r)) {
                let last = r.input.segments.last().unwrap().source;
                assert_eq!(last, Source::Unique(session(r)));
            }
        }
        let n = sessions.len();
        assert!(n > 150, "{n}");
        assert!(t.requests.len() < n * 4, "{} {n}", t.requests.len());
        // Sessions that never end by themselves end at the cap.
        let endless = ConversationParams {
            mean_turns: f64::MAX,
            ..p
        };
        let t = synthetic_conversation(&endless, 5).unwrap();
        assert!(t.requests.iter().all(|r| r.input.len() <= 3000));
    }

    #[test]
    fn no_tools_no_system() {
        let p = ConversationParams {
            duration_ms: 60_000.0,
            system_tokens: 0,
            tool_fraction: 0.0,
            tool_tokens: vec![],
            ..ConversationParams::default()
        };
        let t = synthetic_conversation(&p, 6).unwrap();
        assert!(t
            .requests
            .iter()
            .flat_map(|r| &r.input.segments)
            .all(|s| matches!(s.source, Source::Unique(_))));
    }

    #[test]
    fn invalid_params() {
        let d = ConversationParams::default();
        let bad = [
            ConversationParams {
                session_rate_per_s: 0.0,
                ..d.clone()
            },
            ConversationParams {
                mean_turns: 0.5,
                ..d.clone()
            },
            ConversationParams {
                context_mean_tokens: f64::NAN,
                ..d.clone()
            },
            ConversationParams {
                user_sigma: -1.0,
                ..d.clone()
            },
            ConversationParams {
                output_mean_tokens: 0.0,
                ..d.clone()
            },
            ConversationParams {
                think_time_ms: -1.0,
                ..d.clone()
            },
            ConversationParams {
                tool_fraction: 1.5,
                ..d.clone()
            },
            ConversationParams {
                tool_tokens: vec![],
                ..d.clone()
            },
            ConversationParams {
                tool_tokens: vec![0],
                ..d.clone()
            },
            ConversationParams {
                max_output_tokens: 0,
                ..d.clone()
            },
            ConversationParams {
                max_prompt_tokens: 512 + 5888,
                ..d.clone()
            },
        ];
        for p in bad {
            assert!(synthetic_conversation(&p, 0).is_err(), "{p:?}");
        }
    }

    /// The figures in the module docs (slow in a debug build: the 16-token bound hashes ~9 M
    /// blocks). `cargo test -p tandem-workload default_trace_figures -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn default_trace_figures() {
        let p = ConversationParams::default();
        let t = synthetic_conversation(&p, 0).unwrap();
        let s = t.stats();
        let sorted = |v: Vec<u32>| {
            let mut v: Vec<f64> = v.into_iter().map(f64::from).collect();
            v.sort_by(f64::total_cmp);
            v
        };
        let ins = sorted(t.requests.iter().map(|r| r.input.len()).collect());
        let outs = sorted(t.requests.iter().map(|r| r.output_tokens).collect());
        let q = |v: &[f64], p| percentile(v, p).unwrap();
        let sessions: std::collections::HashSet<u64> = t.requests.iter().map(session).collect();
        // First turns inside the window: the prompt ends with the session's context.
        let contexts: Vec<u32> = t
            .requests
            .iter()
            .filter(|r| r.input.segments.last().unwrap().source == Source::Unique(session(r)))
            .map(|r| r.input.segments.last().unwrap().len)
            .collect();
        println!(
            "first turns {}, context mean {:.0}",
            contexts.len(),
            mean(contexts.iter().map(|&c| u64::from(c)).sum(), contexts.len())
        );
        println!(
            "{} requests, {} sessions, span {:.0} s, {:.2} req/s",
            s.requests,
            sessions.len(),
            s.span_ms / 1000.0,
            s.requests_per_s.unwrap()
        );
        println!(
            "input mean {:.0} p50 {} p90 {} p99 {} max {}",
            mean(s.input_tokens, s.requests),
            q(&ins, 50.0),
            q(&ins, 90.0),
            q(&ins, 99.0),
            q(&ins, 100.0)
        );
        println!(
            "output mean {:.1} p50 {} p90 {} p99 {} max {}",
            mean(s.output_tokens, s.requests),
            q(&outs, 50.0),
            q(&outs, 90.0),
            q(&outs, 99.0),
            q(&outs, 100.0)
        );
        for bt in [16, 512] {
            let h = infinite_cache_hits(&t, Some(bt)).unwrap();
            println!(
                "infinite cache, {bt}-token blocks: {:.2} % of tokens, {:.2} % of blocks",
                h.token_fraction() * 100.0,
                h.block_fraction() * 100.0
            );
        }
        // perf-model §3.2's single-LRU capacity sweep, then its routing table: 8 instances,
        // LRUs of 512-token blocks.
        let sweep: Vec<String> = [500_000, 2_600_000, 10_200_000, 25_600_000]
            .into_iter()
            .map(|cap| {
                let one = lru_cache_hits(&t, Some(512), 1, Some(cap), Assignment::RoundRobin);
                format!(
                    "{cap}: {:.2} %",
                    one.unwrap().total.block_fraction() * 100.0
                )
            })
            .collect();
        println!("one LRU, % of blocks: {}", sweep.join(", "));
        for (cap, a, name) in [
            (None, Assignment::RoundRobin, "round-robin, infinite"),
            (Some(512_000), Assignment::RoundRobin, "round-robin, 512k"),
            (
                Some(512_000),
                Assignment::LongestPrefix,
                "longest prefix, 512k",
            ),
            (
                Some(8_200_000),
                Assignment::LongestPrefix,
                "longest prefix, 8.2M",
            ),
        ] {
            let sim = lru_cache_hits(&t, Some(512), 8, cap, a).unwrap();
            println!(
                "8 instances, {name}: {:.2} % of blocks, max/mean requests {:.2}",
                sim.total.block_fraction() * 100.0,
                sim.max_over_mean_requests()
            );
        }
        let no_system = ConversationParams {
            system_tokens: 0,
            ..p
        };
        let h = infinite_cache_hits(&synthetic_conversation(&no_system, 0).unwrap(), Some(512))
            .unwrap();
        println!(
            "without the system block, 512-token blocks: {:.2} % of blocks",
            h.block_fraction() * 100.0
        );
    }
}
