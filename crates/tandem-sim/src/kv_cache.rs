//! The paged KV block pool with prefix caching, as vLLM V1's `BlockPool` does it.
//!
//! Pure: no IO, no clock. The pool records the KV events it causes in `pending_events`, and the
//! engine drains them once per step so that one step publishes one batch (vLLM §4.4).
//!
//! Blocks are identified by their index; a block is "cached" when it is full and its chained hash is
//! registered in the hash map. Free blocks (ref count 0) sit in an LRU queue whether cached or not;
//! allocating takes the least recently freed one and, if it was cached, evicts its hash (BlockRemoved).
//!
//! With KV offloading the pool also owns the host-memory tier ([`HostTier`]): blocks cached on
//! the GPU are written through to it, and its events join the GPU's in the order they happen.

use std::collections::hash_map::Entry;
use std::collections::HashMap;

use serde::Serialize;
use sha2::{Digest, Sha256};

use tandem_kvevents::MEDIUM_GPU;

use crate::kv_events::KvEvent;

mod host;
pub use host::HostTier;

/// A block's full 32-byte chained digest (vLLM's `BlockHash`).
pub type BlockDigest = [u8; 32];

/// Index of a physical block, as sent in `remote_block_ids`.
pub type BlockId = u32;

/// "No block" in the free queue's links.
const NIL: BlockId = BlockId::MAX;

/// Maps keyed by block digests. The digests are SHA-256 outputs, so a fast seeded hasher is as
/// good as SipHash here, at a fraction of its cost on every cache lookup and eviction.
pub(crate) type DigestMap<V> = HashMap<BlockDigest, V, foldhash::fast::RandomState>;

/// vLLM's `NONE_HASH` for a given `PYTHONHASHSEED` string: `sha256_cbor(seed)`.
pub fn none_hash(seed: &str) -> BlockDigest {
    sha256_cbor(&seed)
}

/// `sha256_cbor((parent, tuple(tokens), extra_keys=None))`, vLLM's cross-language block hash.
///
/// Partial blocks are hashed the same way; their digest stands in for the block's KV content so a
/// decode engine can verify that it received the right bytes for the tokens it expected.
///
/// The canonical CBOR document is written straight into the hasher, a few bytes at a time through
/// a stack buffer: every prompt block is hashed twice on each engine it visits (its cache key and
/// its content), so a serde round and a `Vec` per block were a quarter of a fleet simulation's time.
/// `cbor_input_is_vllms_tuple_shape` and `the_streamed_encoding_equals_ciboriums` pin the bytes.
pub fn hash_block(parent: &BlockDigest, tokens: &[u32]) -> BlockDigest {
    let mut h = Sha256::new();
    let mut buf = [0u8; 256];
    // array(3) [bytes(32) parent, array(n) tokens, null]
    buf[..3].copy_from_slice(&[0x83, 0x58, 0x20]);
    buf[3..35].copy_from_slice(parent);
    let mut n = 35 + cbor_head(&mut buf[35..], 4, tokens.len() as u64);
    for &t in tokens {
        // A head is at most 9 bytes (5 for a u32), and the null needs one more.
        if n + 10 > buf.len() {
            h.update(&buf[..n]);
            n = 0;
        }
        n += cbor_head(&mut buf[n..], 0, u64::from(t));
    }
    buf[n] = 0xf6;
    h.update(&buf[..=n]);
    h.finalize().into()
}

/// Writes a canonical (shortest) CBOR head of `major` type with argument `v`; returns its length.
fn cbor_head(out: &mut [u8], major: u8, v: u64) -> usize {
    let m = major << 5;
    if v < 24 {
        out[0] = m | v as u8;
        1
    } else if v <= u64::from(u8::MAX) {
        out[..2].copy_from_slice(&[m | 24, v as u8]);
        2
    } else if v <= u64::from(u16::MAX) {
        out[0] = m | 25;
        out[1..3].copy_from_slice(&(v as u16).to_be_bytes());
        3
    } else if v <= u64::from(u32::MAX) {
        out[0] = m | 26;
        out[1..5].copy_from_slice(&(v as u32).to_be_bytes());
        5
    } else {
        out[0] = m | 27;
        out[1..9].copy_from_slice(&v.to_be_bytes());
        9
    }
}

fn sha256_cbor<T: Serialize>(value: &T) -> BlockDigest {
    let mut buf = Vec::with_capacity(64);
    // Serialising plain data into a Vec cannot fail.
    ciborium::into_writer(value, &mut buf).expect("cbor encoding into a Vec");
    Sha256::digest(&buf).into()
}

/// The value vLLM publishes in KV events: the low 64 bits of the digest, big-endian.
pub fn external_hash(d: &BlockDigest) -> u64 {
    u64::from_be_bytes(d[24..32].try_into().expect("8 bytes"))
}

/// Root of the KV *content* chain. Content must not depend on the per-process `NONE_HASH`
/// (which differs between engines, as in vLLM), so it is chained from a fixed root.
pub fn content_root() -> BlockDigest {
    sha256_cbor(&"tandem-kv-content")
}

/// Digests of every block (full and trailing partial) of `tokens`, chained from `root`.
pub fn chain_digests(root: &BlockDigest, tokens: &[u32], block_size: usize) -> Vec<BlockDigest> {
    let mut out = Vec::with_capacity(tokens.len().div_ceil(block_size));
    let mut parent = *root;
    for chunk in tokens.chunks(block_size) {
        parent = hash_block(&parent, chunk);
        out.push(parent);
    }
    out
}

#[derive(Debug, Clone)]
struct Block {
    ref_cnt: u32,
    /// Set once the block is full and registered in the prefix cache.
    hash: Option<BlockDigest>,
    /// Digest of the KV content currently written (full or partial block); `None` until written.
    content: Option<BlockDigest>,
    /// Whether the block is in the free queue, and its neighbours there (towards the head, the
    /// next to be evicted, and towards the tail).
    queued: bool,
    prev: BlockId,
    next: BlockId,
}

impl Default for Block {
    fn default() -> Self {
        Block {
            ref_cnt: 0,
            hash: None,
            content: None,
            queued: false,
            prev: NIL,
            next: NIL,
        }
    }
}

/// The block pool.
#[derive(Debug)]
pub struct BlockPool {
    block_size: usize,
    blocks: Vec<Block>,
    /// LRU free queue, vLLM's `FreeKVCacheBlockQueue`: a doubly linked list threaded through
    /// `blocks`, evicted from the head, freed blocks appended at the tail, and a cached block
    /// taken out of the middle when a prefix hit touches it, each in O(1) with no allocation.
    free_head: BlockId,
    free_tail: BlockId,
    num_free: usize,
    cached: DigestMap<BlockId>,
    pending_events: Vec<KvEvent>,
    /// The host-memory tier, when KV offloading is on.
    host: Option<HostTier>,
}

impl BlockPool {
    pub fn new(num_blocks: u32, block_size: u32) -> Self {
        let mut pool = BlockPool {
            block_size: block_size as usize,
            blocks: vec![Block::default(); num_blocks as usize],
            free_head: NIL,
            free_tail: NIL,
            num_free: 0,
            cached: DigestMap::default(),
            pending_events: Vec::new(),
            host: None,
        };
        for id in 0..num_blocks {
            pool.push_free(id);
        }
        pool
    }

    /// Adds a host-memory tier of `blocks` blocks (none when 0).
    pub fn with_host_tier(mut self, blocks: usize) -> Self {
        self.host = (blocks > 0).then(|| HostTier::new(blocks));
        self
    }

    pub fn host(&self) -> Option<&HostTier> {
        self.host.as_ref()
    }

    /// How many of `digests`, from the first, the host tier holds (0 without one); those are
    /// about to be loaded, so they become the most recently used.
    pub fn host_lookup(&mut self, digests: &[BlockDigest]) -> usize {
        self.host.as_mut().map_or(0, |h| h.lookup(digests))
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> u32 {
        self.blocks.len() as u32
    }

    pub fn num_free(&self) -> usize {
        self.num_free
    }

    /// How many of `ids` are free (cached with no reference): touching them takes them out of
    /// the free queue, so an allocation after the touch has that many fewer blocks to take.
    pub fn num_free_among(&self, ids: &[BlockId]) -> usize {
        ids.iter().filter(|&&id| self.ref_count(id) == 0).count()
    }

    /// vLLM's `kv_cache_usage`: cached-but-free blocks count as free.
    pub fn usage(&self) -> f64 {
        if self.blocks.is_empty() {
            return 0.0;
        }
        1.0 - self.num_free as f64 / self.blocks.len() as f64
    }

    /// The longest run of leading full-block hashes already cached, as block ids.
    pub fn lookup_prefix(&self, hashes: &[BlockDigest]) -> Vec<BlockId> {
        hashes
            .iter()
            .map_while(|h| self.cached.get(h).copied())
            .collect()
    }

    /// Take a reference on blocks found by [`Self::lookup_prefix`].
    pub fn touch(&mut self, ids: &[BlockId]) {
        for &id in ids {
            let b = &mut self.blocks[id as usize];
            let queued = b.ref_cnt == 0 && b.queued;
            b.ref_cnt += 1;
            if queued {
                self.unlink_free(id);
            }
        }
    }

    /// Allocate `n` fresh blocks, evicting cached free blocks in LRU order. `None` if not enough.
    pub fn allocate(&mut self, n: usize) -> Option<Vec<BlockId>> {
        if self.num_free < n {
            return None;
        }
        let mut out = Vec::with_capacity(n);
        let mut evicted = Vec::new();
        for _ in 0..n {
            let id = self.free_head;
            self.unlink_free(id);
            let b = &mut self.blocks[id as usize];
            b.ref_cnt = 1;
            b.content = None;
            if let Some(h) = b.hash.take() {
                // One probe: the digest may map to another block (a duplicate computed
                // concurrently keeps the first mapping), which stays.
                if let Entry::Occupied(e) = self.cached.entry(h) {
                    if *e.get() == id {
                        e.remove();
                        evicted.push(external_hash(&h));
                    }
                }
            }
            out.push(id);
        }
        if !evicted.is_empty() {
            self.pending_events.push(KvEvent::BlockRemoved {
                block_hashes: evicted,
                medium: Some(MEDIUM_GPU.into()),
            });
        }
        Some(out)
    }

    /// Drop a reference on each block. Blocks are queued tail-first, as vLLM does, so that the
    /// end of a sequence is evicted before its (more shareable) beginning.
    pub fn free(&mut self, ids: &[BlockId]) {
        for &id in ids.iter().rev() {
            let b = &mut self.blocks[id as usize];
            debug_assert!(b.ref_cnt > 0, "double free of block {id}");
            b.ref_cnt = b.ref_cnt.saturating_sub(1);
            if b.ref_cnt == 0 {
                self.push_free(id);
            }
        }
    }

    /// Appends a block at the free queue's tail (the last to be evicted).
    fn push_free(&mut self, id: BlockId) {
        let tail = self.free_tail;
        let b = &mut self.blocks[id as usize];
        debug_assert!(!b.queued, "block {id} queued twice");
        b.queued = true;
        b.prev = tail;
        b.next = NIL;
        if tail == NIL {
            self.free_head = id;
        } else {
            self.blocks[tail as usize].next = id;
        }
        self.free_tail = id;
        self.num_free += 1;
    }

    /// Takes a queued block out of the free queue, wherever it is.
    fn unlink_free(&mut self, id: BlockId) {
        let b = &mut self.blocks[id as usize];
        debug_assert!(b.queued, "block {id} is not in the free queue");
        let (prev, next) = (b.prev, b.next);
        b.queued = false;
        b.prev = NIL;
        b.next = NIL;
        if prev == NIL {
            self.free_head = next;
        } else {
            self.blocks[prev as usize].next = next;
        }
        if next == NIL {
            self.free_tail = prev;
        } else {
            self.blocks[next as usize].prev = prev;
        }
        self.num_free -= 1;
    }

    /// Record that KV for a block's tokens has been written (content digest).
    pub fn write(&mut self, id: BlockId, content: BlockDigest) {
        self.blocks[id as usize].content = Some(content);
    }

    pub fn content(&self, id: BlockId) -> Option<BlockDigest> {
        self.blocks.get(id as usize).and_then(|b| b.content)
    }

    pub fn ref_count(&self, id: BlockId) -> u32 {
        self.blocks.get(id as usize).map_or(0, |b| b.ref_cnt)
    }

    /// Register newly full blocks in the prefix cache and queue one `BlockStored` for them.
    ///
    /// `blocks[i]` holds `tokens[i*bs..(i+1)*bs]` with digest `digests[i]`; `parent` is the digest of
    /// the block before the first one (None at the start of a sequence).
    pub fn cache_full_blocks(
        &mut self,
        blocks: &[BlockId],
        digests: &[BlockDigest],
        parent: Option<&BlockDigest>,
        tokens: &[u32],
    ) {
        debug_assert_eq!(blocks.len(), digests.len());
        debug_assert_eq!(tokens.len(), blocks.len() * self.block_size);
        let bs = self.block_size;
        let mut runs = StoredRuns::new(parent, bs, MEDIUM_GPU, &mut self.pending_events);
        for (i, (&id, d)) in blocks.iter().zip(digests).enumerate() {
            let b = &mut self.blocks[id as usize];
            let fresh = b.hash.is_none() && !self.cached.contains_key(d);
            if b.hash.is_none() {
                b.hash = Some(*d);
            }
            if fresh {
                self.cached.insert(*d, id);
                runs.stored(d, &tokens[i * bs..(i + 1) * bs]);
            } else {
                // Already cached: a prefix hit, or a duplicate computed concurrently by another
                // request (vLLM keeps the first mapping and publishes nothing for the duplicate).
                runs.skipped(d);
            }
        }
        runs.finish();
        if let Some(h) = &mut self.host {
            h.store(
                digests,
                parent,
                tokens,
                self.block_size,
                &mut self.pending_events,
            );
        }
    }

    /// Drop every cached hash (vLLM's `reset_prefix_cache`); only free blocks are touched.
    pub fn reset_prefix_cache(&mut self) -> bool {
        if self.blocks.iter().any(|b| b.ref_cnt > 0) {
            return false;
        }
        for b in &mut self.blocks {
            b.hash = None;
            b.content = None;
        }
        self.cached.clear();
        if let Some(h) = &mut self.host {
            h.clear();
        }
        self.pending_events.push(KvEvent::AllBlocksCleared);
        true
    }

    pub fn take_events(&mut self) -> Vec<KvEvent> {
        std::mem::take(&mut self.pending_events)
    }
}

/// `BlockStored` events for a walk over consecutive blocks of one sequence, as vLLM publishes
/// them: consecutive newly stored blocks form one event, and a block that is skipped (already
/// held) ends the run and becomes the parent of the next one, so parent links always chain.
struct StoredRuns<'a> {
    block_size: usize,
    medium: &'static str,
    events: &'a mut Vec<KvEvent>,
    hashes: Vec<u64>,
    tokens: Vec<u32>,
    /// Parent of the current run.
    parent: Option<u64>,
    /// The last block walked: the parent of a run that starts next.
    prev: Option<u64>,
}

impl<'a> StoredRuns<'a> {
    /// `parent`: the digest of the block before the walk's first (None at a sequence's start).
    fn new(
        parent: Option<&BlockDigest>,
        block_size: usize,
        medium: &'static str,
        events: &'a mut Vec<KvEvent>,
    ) -> Self {
        let parent = parent.map(external_hash);
        StoredRuns {
            block_size,
            medium,
            events,
            hashes: Vec::new(),
            tokens: Vec::new(),
            parent,
            prev: parent,
        }
    }

    /// The next block is newly stored; `tokens` are its tokens.
    fn stored(&mut self, d: &BlockDigest, tokens: &[u32]) {
        if self.hashes.is_empty() {
            self.parent = self.prev;
        }
        self.hashes.push(external_hash(d));
        self.tokens.extend_from_slice(tokens);
        self.prev = Some(external_hash(d));
    }

    /// The next block was already held: nothing to announce for it.
    fn skipped(&mut self, d: &BlockDigest) {
        self.flush();
        self.prev = Some(external_hash(d));
    }

    fn finish(mut self) {
        self.flush();
    }

    fn flush(&mut self) {
        if self.hashes.is_empty() {
            return;
        }
        self.events.push(KvEvent::BlockStored {
            block_hashes: std::mem::take(&mut self.hashes),
            parent_block_hash: self.parent,
            token_ids: std::mem::take(&mut self.tokens),
            block_size: self.block_size as u32,
            medium: Some(self.medium.into()),
        });
    }
}

#[cfg(test)]
mod tests;
