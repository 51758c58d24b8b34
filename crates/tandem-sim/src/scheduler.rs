//! vLLM V1-style continuous batching over the paged [`BlockPool`].
//!
//! Pure: the engine calls [`Scheduler::schedule`] to plan a step, charges its modeled time, then
//! calls [`Scheduler::complete`] with a sampling callback. Time never enters here.
//!
//! Policy, as in vLLM's scheduler: running sequences go first (decode or the next prefill chunk),
//! each taking blocks as it grows; when blocks run out the last-admitted running sequence is
//! preempted (its blocks freed, recomputed later). Waiting sequences are then admitted FCFS while
//! the token budget (`max_num_batched_tokens`) and `max_num_seqs` allow, after a prefix-cache
//! lookup. A decode-role sequence (remote prefill) is first parked as *deferred* while its KV is
//! pulled; it then computes only its last prompt token to sample the first output token.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use crate::cost::{PrefillChunk, StepShape};
use crate::kv_cache::{chain_digests, content_root, hash_block, BlockDigest, BlockId, BlockPool};
use crate::kv_events::KvEvent;

/// Engine-wide sequence id (one per sampled sequence; a request with `n` > 1 has `n`).
pub type SeqId = u64;

#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    pub block_size: u32,
    pub num_gpu_blocks: u32,
    /// Root of the block-hash chain (vLLM's `NONE_HASH`).
    pub root_hash: BlockDigest,
    pub enable_prefix_caching: bool,
    /// Blocks of the host-memory KV tier (vLLM's KV offloading); 0 = none.
    pub num_host_blocks: u32,
    /// Keep each block's KV content digest (the stand-in for its bytes, which the side channel
    /// and NIXL serve and the decode side verifies). Nothing the scheduler decides depends on
    /// it, so a simulation that moves no KV bytes (the virtual-time fleet) turns it off and saves
    /// a second hash chain per block and a hash per decoded token.
    pub kv_content: bool,
}

/// Why a sequence finished. `Abort` comes from [`Scheduler::abort`], never from sampling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
    Abort,
    Error,
}

/// A new sequence handed to the scheduler.
#[derive(Debug, Clone)]
pub struct NewSeq {
    pub id: SeqId,
    pub prompt: Arc<[u32]>,
    pub max_tokens: usize,
    /// Decode role: the prompt's KV is to be pulled from a prefill engine before decoding.
    pub remote_prefill: bool,
    /// Prefill role: keep the blocks pinned after a length-capped finish, for a decode engine to read.
    pub remote_decode: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Waiting,
    /// Deferred: blocks allocated, KV being pulled from the prefill engine or loaded from the
    /// host-memory tier (vLLM parks both in `WAITING_FOR_REMOTE_KVS`).
    WaitingForRemoteKv,
    Running,
}

#[derive(Debug)]
struct Seq {
    tokens: Vec<u32>,
    prompt_len: usize,
    num_computed: usize,
    blocks: Vec<BlockId>,
    /// Full-block prefix-cache hashes of `tokens` (rooted at `NONE_HASH`), extended lazily.
    digests: Vec<BlockDigest>,
    /// Full-block KV content digests of `tokens` (rooted at [`content_root`]), extended lazily.
    contents: Vec<BlockDigest>,
    /// Number of leading blocks registered in the prefix cache.
    num_cached_blocks: usize,
    state: State,
    max_tokens: usize,
    remote_prefill: bool,
    remote_decode: bool,
    /// Set when the remote KV has been received, so admission skips the prefix lookup.
    kv_ready: bool,
    scheduled_once: bool,
}

/// One sequence's share of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scheduled {
    pub id: SeqId,
    /// Tokens already computed before this step.
    pub start: usize,
    /// Tokens computed this step.
    pub len: usize,
    /// True when this step finishes the prompt or decodes, so a token is sampled after it.
    pub samples: bool,
    /// True for a decode step (prompt already done).
    pub is_decode: bool,
}

/// A decode-role sequence that now needs its KV pulled from the prefill engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferStart {
    pub id: SeqId,
    /// Leading blocks already held locally (prefix-cache hit); only the rest are read.
    pub local_hit_blocks: usize,
    /// Number of blocks the prompt needs in total.
    pub prompt_blocks: usize,
}

/// A sequence whose prefix is being loaded from the host-memory tier, beside the steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostLoad {
    pub id: SeqId,
    /// Tokens of KV copied from host memory to the GPU.
    pub tokens: usize,
}

/// The plan for one step.
#[derive(Debug, Default, Clone)]
pub struct StepPlan {
    pub scheduled: Vec<Scheduled>,
    pub transfers: Vec<TransferStart>,
    pub preempted: Vec<SeqId>,
    /// Sequences scheduled for the first time this step (their queueing ends now).
    pub first_scheduled: Vec<SeqId>,
    pub prefix_queries: u64,
    pub prefix_hits: u64,
    /// Host-tier lookups this step, in tokens (vLLM's connector queries and hits).
    pub external_queries: u64,
    pub external_hits: u64,
    /// Host-tier loads this step starts; the sequences wait for them, the step does not.
    pub host_loads: Vec<HostLoad>,
}

impl StepPlan {
    pub fn is_empty(&self) -> bool {
        self.scheduled.is_empty()
    }

    pub fn num_tokens(&self) -> usize {
        self.scheduled.iter().map(|s| s.len).sum()
    }
}

/// What a finished sequence leaves behind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    pub reason: FinishReason,
    /// Prefill role, length-capped: the blocks stay pinned for the decode engine.
    pub pinned_blocks: Option<Vec<BlockId>>,
}

/// One sampled token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepOutput {
    pub id: SeqId,
    pub token: u32,
    pub finished: Option<Finished>,
}

/// The sampler's decision for one sequence: the token, and whether it ends the sequence.
pub type Decide<'a> = dyn FnMut(SeqId, &[u32], usize) -> (u32, Option<FinishReason>) + 'a;

#[derive(Debug)]
pub struct Scheduler {
    cfg: SchedulerConfig,
    pool: BlockPool,
    /// Looked up several times per sequence per step: foldhash, not SipHash.
    seqs: HashMap<SeqId, Seq, foldhash::fast::RandomState>,
    waiting: VecDeque<SeqId>,
    running: Vec<SeqId>,
    /// Prefill-role blocks held for a decode engine, by sequence id.
    pinned: HashMap<SeqId, Vec<BlockId>, foldhash::fast::RandomState>,
    num_preemptions: u64,
    /// [`content_root`], hashed once: every write of every step chains from it.
    content_root: BlockDigest,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig) -> Self {
        let pool = BlockPool::new(cfg.num_gpu_blocks, cfg.block_size)
            .with_host_tier(cfg.num_host_blocks as usize);
        Scheduler {
            cfg,
            pool,
            seqs: HashMap::default(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            pinned: HashMap::default(),
            num_preemptions: 0,
            content_root: content_root(),
        }
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    pub fn add(&mut self, new: NewSeq) {
        let prompt_len = new.prompt.len();
        self.seqs.insert(
            new.id,
            Seq {
                tokens: new.prompt.to_vec(),
                prompt_len,
                num_computed: 0,
                blocks: Vec::new(),
                digests: Vec::new(),
                contents: Vec::new(),
                num_cached_blocks: 0,
                state: State::Waiting,
                max_tokens: new.max_tokens,
                remote_prefill: new.remote_prefill,
                remote_decode: new.remote_decode,
                kv_ready: false,
                scheduled_once: false,
            },
        );
        self.waiting.push_back(new.id);
    }

    pub fn contains(&self, id: SeqId) -> bool {
        self.seqs.contains_key(&id)
    }

    /// Remove a sequence wherever it is and free its blocks. Returns false if unknown.
    pub fn abort(&mut self, id: SeqId) -> bool {
        let Some(seq) = self.seqs.remove(&id) else {
            return false;
        };
        self.waiting.retain(|&w| w != id);
        self.running.retain(|&r| r != id);
        self.pool.free(&seq.blocks);
        true
    }

    /// Release a prefill-role sequence's pinned blocks (read notification or lease expiry).
    pub fn release_pinned(&mut self, id: SeqId) -> bool {
        match self.pinned.remove(&id) {
            Some(blocks) => {
                self.pool.free(&blocks);
                true
            }
            None => false,
        }
    }

    pub fn is_pinned(&self, id: SeqId) -> bool {
        self.pinned.contains_key(&id)
    }

    /// The KV content digest of a block, as a decode engine would read it.
    pub fn block_content(&self, id: BlockId) -> Option<BlockDigest> {
        self.pool.content(id)
    }

    pub fn num_blocks(&self) -> u32 {
        self.pool.num_blocks()
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    /// Waiting sequences split into (capacity, deferred-for-KV).
    pub fn num_waiting(&self) -> (usize, usize) {
        let deferred = self
            .waiting
            .iter()
            .filter(|id| self.seqs[id].state == State::WaitingForRemoteKv)
            .count();
        (self.waiting.len() - deferred, deferred)
    }

    pub fn kv_usage(&self) -> f64 {
        self.pool.usage()
    }

    pub fn num_preemptions(&self) -> u64 {
        self.num_preemptions
    }

    pub fn take_events(&mut self) -> Vec<KvEvent> {
        self.pool.take_events()
    }

    /// Allocate up to `n` blocks outside any sequence (the "exhaust KV" fault). Returns what it got.
    pub fn reserve_blocks(&mut self, n: usize) -> Vec<BlockId> {
        let n = n.min(self.pool.num_free());
        self.pool.allocate(n).unwrap_or_default()
    }

    pub fn unreserve_blocks(&mut self, blocks: &[BlockId]) {
        self.pool.free(blocks);
    }

    pub fn reset_prefix_cache(&mut self) -> bool {
        self.pool.reset_prefix_cache()
    }

    /// Modeled work of a plan, for the cost model.
    pub fn shape(&self, plan: &StepPlan) -> StepShape {
        let mut shape = StepShape::default();
        for s in &plan.scheduled {
            if s.is_decode {
                shape.decode_seqs += 1;
                shape.decode_context_tokens += (s.start + s.len) as u64;
            } else {
                shape.prefill_chunks.push(PrefillChunk {
                    start: s.start as u64,
                    len: s.len as u64,
                });
            }
        }
        shape
    }

    // === planning ===

    pub fn schedule(&mut self) -> StepPlan {
        let mut plan = StepPlan::default();
        let mut budget = self.cfg.max_num_batched_tokens;

        // Running sequences first, in admission order.
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            let (start, want) = {
                let s = &self.seqs[&id];
                (s.num_computed, s.tokens.len() - s.num_computed)
            };
            let len = want.min(budget);
            if len == 0 {
                i += 1;
                continue;
            }
            // Make room, preempting from the back; the sequence itself may be the victim.
            let mut scheduled = false;
            loop {
                if self.grow(id, start + len) {
                    scheduled = true;
                    break;
                }
                let victim = *self.running.last().expect("running is non-empty");
                self.preempt(victim);
                plan.preempted.push(victim);
                plan.scheduled.retain(|s| s.id != victim);
                if victim == id {
                    break;
                }
            }
            if !scheduled {
                break;
            }
            let s = &self.seqs[&id];
            plan.scheduled.push(Scheduled {
                id,
                start,
                len,
                samples: start + len == s.tokens.len(),
                is_decode: start >= s.prompt_len,
            });
            budget -= len;
            i += 1;
        }

        // Then waiting sequences, unless this step had to preempt (vLLM does the same).
        if plan.preempted.is_empty() {
            self.admit_waiting(&mut plan, &mut budget);
        }
        plan
    }

    fn admit_waiting(&mut self, plan: &mut StepPlan, budget: &mut usize) {
        let mut idx = 0;
        while idx < self.waiting.len() && *budget > 0 && self.running.len() < self.cfg.max_num_seqs
        {
            let id = self.waiting[idx];
            let state = self.seqs[&id].state;
            if state == State::WaitingForRemoteKv {
                idx += 1;
                continue;
            }
            let fresh = self.seqs[&id].blocks.is_empty() && !self.seqs[&id].kv_ready;
            if fresh {
                let hit_blocks = self.prefix_lookup(id);
                let seq = &self.seqs[&id];
                plan.prefix_queries += seq.tokens.len() as u64;
                plan.prefix_hits += (hit_blocks.len() * self.cfg.block_size as usize) as u64;
                if seq.remote_prefill {
                    // Decode role: allocate for the whole prompt and pull the rest of it.
                    let prompt_blocks = seq.prompt_len.div_ceil(self.cfg.block_size as usize);
                    let need = prompt_blocks - hit_blocks.len();
                    if self.pool.num_free() < need + self.pool.num_free_among(&hit_blocks) {
                        break;
                    }
                    self.pool.touch(&hit_blocks);
                    let new = self.pool.allocate(need).expect("checked free count");
                    let seq = self.seqs.get_mut(&id).expect("seq exists");
                    seq.num_computed = hit_blocks.len() * self.cfg.block_size as usize;
                    seq.num_cached_blocks = hit_blocks.len();
                    seq.blocks = hit_blocks.iter().copied().chain(new).collect();
                    seq.state = State::WaitingForRemoteKv;
                    plan.transfers.push(TransferStart {
                        id,
                        local_hit_blocks: hit_blocks.len(),
                        prompt_blocks,
                    });
                    idx += 1;
                    continue;
                }
                let bs = self.cfg.block_size as usize;
                let gpu_tokens = hit_blocks.len() * bs;
                // The lookup continues in the host tier where the GPU's hits end (vLLM asks the
                // connector for tokens beyond the locally computed ones).
                let host_blocks = self.host_lookup(id, hit_blocks.len());
                if self.pool.host().is_some() {
                    plan.external_queries += self.seqs[&id].tokens.len() as u64;
                    plan.external_hits += (host_blocks * bs) as u64;
                }
                let hit_tokens = gpu_tokens + host_blocks * bs;
                let want = self.seqs[&id].tokens.len() - hit_tokens;
                // A sequence that loads computes nothing this step: it waits for the copy.
                let len = if host_blocks > 0 {
                    0
                } else {
                    want.min(*budget)
                };
                let total_blocks = (hit_tokens + len).div_ceil(bs);
                // Hits that sit free in the LRU queue stop being free once touched.
                let need = total_blocks - hit_blocks.len();
                if self.pool.num_free() < need + self.pool.num_free_among(&hit_blocks) {
                    break;
                }
                self.pool.touch(&hit_blocks);
                let new = self.pool.allocate(need).expect("checked free count");
                let seq = self.seqs.get_mut(&id).expect("seq exists");
                seq.num_computed = gpu_tokens;
                seq.num_cached_blocks = hit_blocks.len();
                seq.blocks = hit_blocks.into_iter().chain(new).collect();
                if host_blocks > 0 {
                    // Copied into fresh GPU blocks beside the steps, as vLLM's offloading
                    // connector does (an async load): the sequence waits, the batch does not.
                    let seq = self.seqs.get_mut(&id).expect("seq exists");
                    seq.state = State::WaitingForRemoteKv;
                    plan.host_loads.push(HostLoad {
                        id,
                        tokens: host_blocks * bs,
                    });
                    idx += 1;
                    continue;
                }
                self.start_running(plan, idx, id, hit_tokens, len);
                *budget -= len;
            } else {
                // Remote KV arrived (blocks held, all but the last token computed).
                let (start, want) = {
                    let s = &self.seqs[&id];
                    (s.num_computed, s.tokens.len() - s.num_computed)
                };
                let len = want.min(*budget);
                if !self.grow(id, start + len) {
                    break;
                }
                self.start_running(plan, idx, id, start, len);
                *budget -= len;
            }
        }
    }

    fn start_running(
        &mut self,
        plan: &mut StepPlan,
        idx: usize,
        id: SeqId,
        start: usize,
        len: usize,
    ) {
        self.waiting.remove(idx);
        self.running.push(id);
        let seq = self.seqs.get_mut(&id).expect("seq exists");
        seq.state = State::Running;
        if !seq.scheduled_once {
            seq.scheduled_once = true;
            plan.first_scheduled.push(id);
        }
        plan.scheduled.push(Scheduled {
            id,
            start,
            len,
            samples: start + len == seq.tokens.len(),
            is_decode: start >= seq.prompt_len,
        });
    }

    /// Cached leading blocks for a sequence, capped so at least one token is computed (vLLM
    /// recomputes the last token to sample from it).
    fn prefix_lookup(&mut self, id: SeqId) -> Vec<BlockId> {
        if !self.cfg.enable_prefix_caching {
            return Vec::new();
        }
        self.extend_digests(id);
        let bs = self.cfg.block_size as usize;
        let seq = &self.seqs[&id];
        let max_blocks = (seq.tokens.len() - 1) / bs;
        let mut hits = self
            .pool
            .lookup_prefix(&seq.digests[..max_blocks.min(seq.digests.len())]);
        hits.truncate(max_blocks);
        hits
    }

    /// Host-tier blocks that follow the sequence's `gpu_hits` GPU-cached blocks, refreshed for
    /// the load; capped like [`Self::prefix_lookup`].
    fn host_lookup(&mut self, id: SeqId, gpu_hits: usize) -> usize {
        if !self.cfg.enable_prefix_caching || self.pool.host().is_none() {
            return 0;
        }
        let seq = &self.seqs[&id];
        let max_blocks =
            ((seq.tokens.len() - 1) / self.cfg.block_size as usize).min(seq.digests.len());
        if gpu_hits >= max_blocks {
            return 0;
        }
        self.pool.host_lookup(&seq.digests[gpu_hits..max_blocks])
    }

    fn extend_digests(&mut self, id: SeqId) {
        let bs = self.cfg.block_size as usize;
        let root = self.cfg.root_hash;
        let seq = self.seqs.get_mut(&id).expect("seq exists");
        let full = seq.tokens.len() / bs;
        while seq.digests.len() < full {
            let i = seq.digests.len();
            let parent = if i == 0 { root } else { seq.digests[i - 1] };
            seq.digests
                .push(hash_block(&parent, &seq.tokens[i * bs..(i + 1) * bs]));
        }
        if !self.cfg.kv_content {
            return;
        }
        let croot = self.content_root;
        while seq.contents.len() < full {
            let i = seq.contents.len();
            let parent = if i == 0 { croot } else { seq.contents[i - 1] };
            seq.contents
                .push(hash_block(&parent, &seq.tokens[i * bs..(i + 1) * bs]));
        }
    }

    /// Ensure a sequence holds blocks for `tokens` tokens. False when the pool is out of blocks.
    fn grow(&mut self, id: SeqId, tokens: usize) -> bool {
        let need = tokens.div_ceil(self.cfg.block_size as usize);
        let have = self.seqs[&id].blocks.len();
        if need <= have {
            return true;
        }
        match self.pool.allocate(need - have) {
            Some(new) => {
                self.seqs
                    .get_mut(&id)
                    .expect("seq exists")
                    .blocks
                    .extend(new);
                true
            }
            None => false,
        }
    }

    fn preempt(&mut self, id: SeqId) {
        self.running.retain(|&r| r != id);
        let seq = self.seqs.get_mut(&id).expect("seq exists");
        let blocks = std::mem::take(&mut seq.blocks);
        seq.num_computed = 0;
        seq.num_cached_blocks = 0;
        seq.kv_ready = false;
        // Only running sequences are preempted, so a decode-role one already received its KV:
        // like vLLM (whose connector spends `do_remote_prefill` on the first load) it is
        // recomputed here, from whatever of it the local prefix cache still holds.
        seq.remote_prefill = false;
        seq.state = State::Waiting;
        self.pool.free(&blocks);
        self.waiting.push_front(id);
        self.num_preemptions += 1;
    }

    // === completion ===

    /// Apply a planned step: mark KV computed, cache newly full blocks, sample where due.
    pub fn complete(&mut self, plan: &StepPlan, decide: &mut Decide<'_>) -> Vec<StepOutput> {
        let mut outputs = Vec::new();
        for s in &plan.scheduled {
            if !self.seqs.contains_key(&s.id) {
                continue; // aborted between planning and completion
            }
            self.seqs.get_mut(&s.id).expect("seq exists").num_computed = s.start + s.len;
            self.write_kv(s.id, s.start, s.start + s.len);
            if !s.samples {
                continue;
            }
            let (token, finish) = {
                let seq = &self.seqs[&s.id];
                decide(s.id, &seq.tokens, seq.prompt_len)
            };
            let seq = self.seqs.get_mut(&s.id).expect("seq exists");
            seq.tokens.push(token);
            let generated = seq.tokens.len() - seq.prompt_len;
            let finish = finish.or((generated >= seq.max_tokens).then_some(FinishReason::Length));
            let finished = finish.map(|reason| self.finish(s.id, reason));
            outputs.push(StepOutput {
                id: s.id,
                token,
                finished,
            });
        }
        outputs
    }

    /// Write KV content for tokens `[from, to)` and register newly full blocks.
    fn write_kv(&mut self, id: SeqId, from: usize, to: usize) {
        self.extend_digests(id);
        let bs = self.cfg.block_size as usize;
        if self.cfg.kv_content {
            let root = self.content_root;
            // `seqs` and `pool` are disjoint fields: each content is written as it is found.
            let seq = &self.seqs[&id];
            for j in from / bs..to.div_ceil(bs) {
                let end = ((j + 1) * bs).min(to);
                let content = if end == (j + 1) * bs {
                    seq.contents[j]
                } else {
                    let parent = if j == 0 { root } else { seq.contents[j - 1] };
                    hash_block(&parent, &seq.tokens[j * bs..end])
                };
                self.pool.write(seq.blocks[j], content);
            }
        }
        if !self.cfg.enable_prefix_caching {
            return;
        }
        let seq = &self.seqs[&id];
        let full = to / bs;
        if full > seq.num_cached_blocks {
            let from_b = seq.num_cached_blocks;
            let parent = (from_b > 0).then(|| seq.digests[from_b - 1]);
            // `seqs` and `pool` are disjoint fields: the slices are lent, not copied.
            self.pool.cache_full_blocks(
                &seq.blocks[from_b..full],
                &seq.digests[from_b..full],
                parent.as_ref(),
                &seq.tokens[from_b * bs..full * bs],
            );
            self.seqs
                .get_mut(&id)
                .expect("seq exists")
                .num_cached_blocks = full;
        }
    }

    fn finish(&mut self, id: SeqId, reason: FinishReason) -> Finished {
        let seq = self.seqs.remove(&id).expect("seq exists");
        self.running.retain(|&r| r != id);
        self.waiting.retain(|&w| w != id);
        if seq.remote_decode && reason == FinishReason::Length && !seq.blocks.is_empty() {
            self.pinned.insert(id, seq.blocks.clone());
            return Finished {
                reason,
                pinned_blocks: Some(seq.blocks),
            };
        }
        self.pool.free(&seq.blocks);
        Finished {
            reason,
            pinned_blocks: None,
        }
    }

    /// Blocks held by a deferred decode-role sequence, in prompt order.
    pub fn blocks_of(&self, id: SeqId) -> Option<&[BlockId]> {
        self.seqs.get(&id).map(|s| s.blocks.as_slice())
    }

    /// Content digests the prompt of a sequence should have, for verifying a remote read.
    pub fn expected_prompt_contents(&self, id: SeqId) -> Option<Vec<BlockDigest>> {
        let seq = self.seqs.get(&id)?;
        Some(chain_digests(
            &self.content_root,
            &seq.tokens[..seq.prompt_len],
            self.cfg.block_size as usize,
        ))
    }

    /// The remote KV for a deferred sequence has landed: write it and make it schedulable with
    /// all but the last prompt token computed (vLLM recomputes the last one to sample).
    pub fn remote_kv_done(&mut self, id: SeqId) -> bool {
        let Some(seq) = self.seqs.get(&id) else {
            return false;
        };
        if seq.state != State::WaitingForRemoteKv {
            return false;
        }
        let from = seq.num_computed;
        let n = seq.prompt_len;
        self.write_kv(id, from, n);
        let seq = self.seqs.get_mut(&id).expect("seq exists");
        seq.num_computed = n - 1;
        seq.kv_ready = true;
        seq.state = State::Waiting;
        true
    }

    /// A host-tier load has landed: the loaded blocks join the GPU prefix cache (under their old
    /// hashes) and the sequence is schedulable from the end of its hits.
    pub fn host_load_done(&mut self, id: SeqId) -> bool {
        let Some(seq) = self.seqs.get(&id) else {
            return false;
        };
        if seq.state != State::WaitingForRemoteKv || seq.remote_prefill {
            return false;
        }
        let bs = self.cfg.block_size as usize;
        let (from, to) = (seq.num_computed, seq.blocks.len() * bs);
        self.write_kv(id, from, to);
        let seq = self.seqs.get_mut(&id).expect("seq exists");
        seq.num_computed = to;
        seq.kv_ready = true;
        seq.state = State::Waiting;
        true
    }

    /// The remote KV could not be loaded and the policy is `recompute`: drop the blocks that were
    /// meant for it and prefill locally.
    pub fn remote_kv_recompute(&mut self, id: SeqId) -> bool {
        let Some(seq) = self.seqs.get_mut(&id) else {
            return false;
        };
        if seq.state != State::WaitingForRemoteKv {
            return false;
        }
        let blocks = std::mem::take(&mut seq.blocks);
        seq.num_computed = 0;
        seq.num_cached_blocks = 0;
        seq.remote_prefill = false;
        seq.state = State::Waiting;
        self.pool.free(&blocks);
        true
    }
}

#[cfg(test)]
mod tests;
