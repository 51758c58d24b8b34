//! The prefix index routing consults: which engine holds which KV-cache blocks.
//!
//! A prompt is cut into blocks of `block_size` tokens and each full block gets a chained 64-bit
//! key ([`block_keys`]): a key stands for the whole prefix up to its block. The [`PrefixIndex`]
//! records (key, engine) entries and answers, for a prompt's keys, how many leading blocks each
//! engine holds ([`PrefixIndex::match_prefix`]), which is the prefix-cache hit a request would
//! get there.
//!
//! Two feeds share the same operations:
//! - *approximate*: [`PrefixIndex::insert`] what Tandem routed where, and let entries age out by
//!   TTL ([`PrefixIndex::expire`]) and by the capacity bound (least recently touched first);
//! - *precise*: vLLM's KV events, decoded elsewhere, map to [`PrefixIndex::insert`]
//!   (`BlockStored`), [`PrefixIndex::remove`] (`BlockRemoved`) and
//!   [`PrefixIndex::clear_engine`] (`AllBlocksCleared`, a restart, an engine leaving).
//!
//! Memory is bounded: at most `max_blocks` entries, about 60 bytes each when full, everything
//! counted (see [`PrefixIndex::memory_bytes`] and `benches/README.md`).
//!
//! ```
//! use tandem_radix::{block_keys, EngineId, IndexConfig, PrefixIndex, PrefixMatch};
//!
//! let mut index = PrefixIndex::new(IndexConfig { max_blocks: 1 << 20, ttl: Some(600_000) });
//! let prompt: Vec<u32> = (0..100).collect();
//! let keys = block_keys(&prompt, 16, 0); // 6 full blocks; the last 4 tokens have no key
//! index.insert(EngineId(3), &keys[..4], 1_000); // routed there earlier (ticks in ms)
//! index.insert(EngineId(7), &keys[..2], 2_000);
//!
//! let mut m = PrefixMatch::new(); // reusable scratch: lookups allocate nothing once warm
//! index.match_prefix(&keys, &mut m);
//! assert_eq!(m.hits(), &[(EngineId(3), 4), (EngineId(7), 2)]);
//! assert_eq!(m.best(), Some((EngineId(3), 4)));
//!
//! index.expire(601_000); // engine 3's entries are 10 minutes old
//! index.match_prefix(&keys, &mut m);
//! assert_eq!(m.hits(), &[(EngineId(7), 2)]);
//! ```
//!
//! Everything is pure: no IO, no clock, no global or random state. Time enters as a `u64` tick
//! (say milliseconds) passed to the calls that need it, and never runs backwards inside an index:
//! a tick older than one seen before counts as that one. The same calls give the same results.

mod index;
mod keys;
mod lists;
mod matching;
mod table;

pub use index::{EngineId, IndexConfig, PrefixIndex, MAX_BLOCKS_LIMIT};
pub use keys::{block_keys, block_keys_into, chain_key};
pub use matching::PrefixMatch;
