//! Workloads and report maths for `tandem bench`.
//!
//! - Traces: [`parse_mooncake`] (with prefix block ids), [`parse_azure`] (lengths and arrival
//!   times only), [`synthetic_chat`] (multi-turn chat with shared system prompts). A request's
//!   prompt is a [`PromptSpec`] — which deterministic token streams, how many tokens — not the
//!   tokens themselves, so large traces stay small in memory.
//! - [`synthetic_conversation`]: a seeded stand-in for the held-out Mooncake conversation trace
//!   (one system block shared by every request, long-tailed contexts, whole-history resends).
//! - [`Synthesizer`]: the prompt's token ids, on demand, identical for identical block ids.
//! - [`Trace`] transformations a replayer needs: [`Trace::scaled`], [`Trace::head`],
//!   [`Trace::window`], [`Trace::jittered`], [`Trace::with_shared_prefix`].
//! - Prefix-cache bounds: [`infinite_cache_hits`] and [`lru_cache_hits`], to judge a measured
//!   hit rate against what the trace allows.
//! - Reporting: [`Outcome`] per request, [`Summary`] per run (serde `Serialize`), and
//!   [`side_by_side`] to compare policies.
//!
//! Pure: no IO (parsers read from a caller's `BufRead`), no clock, randomness only from seeds.

mod azure;
mod bound;
mod chat;
mod conversation;
mod error;
mod mooncake;
mod report;
mod synth;
mod table;
mod trace;

pub use azure::parse_azure;
pub use bound::{
    infinite_cache_hits, lru_cache_hits, prefix_blocks, Assignment, Block, CacheSim, PrefixHits,
};
pub use chat::{synthetic_chat, ChatParams};
pub use conversation::{synthetic_conversation, ConversationParams};
pub use error::{Result, WorkloadError};
pub use mooncake::{parse_mooncake, MOONCAKE_BLOCK_TOKENS};
pub use report::{percentile, Dist, EngineLoad, LoadSpread, Outcome, Slo, Summary};
pub use synth::Synthesizer;
pub use table::side_by_side;
pub use trace::{PromptSpec, Request, Segment, SharedPrefix, Source, Trace, TraceStats};
