//! The prefix index: (block key, engine) entries with LRU and TTL eviction.
//!
//! Storage, per entry and per key, all in flat vectors indexed by `u32`:
//! - an entry arena (32 bytes an entry): the holder's engine, last-touch tick, its node, and two
//!   intrusive doubly-linked lists through the arena — the global LRU order and the engine's own
//!   entries (so that clearing an engine costs its entries, not the whole index);
//! - a node arena (16 bytes a key): the key and its holders, inline when there is one (see
//!   [`crate::lists`]); nodes are allocated in insertion order, so a prompt's are adjacent;
//! - the key table from key to node (8 bytes a bucket, ≤ 3/4 full; see [`crate::table`]);
//! - the list pool for keys with several holders (6 bytes a holder, chunks rounded up).
//!
//! Arenas reuse freed slots through free lists and never grow past `max_blocks`, so memory is
//! bounded by the configuration, not by the traffic.

use crate::lists::{Node, Pool, NIL};
use crate::table::{tag, KeyTable};

/// An engine (one vLLM instance), numbered by the caller. All 65,536 values are usable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EngineId(pub u16);

/// Largest `max_blocks` honored (larger values are clamped): keeps every arena index and pool
/// offset within `u32` with room for chunk rounding. 2²⁸ entries would be about 15 GiB.
pub const MAX_BLOCKS_LIMIT: usize = 1 << 28;

/// How much an index keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexConfig {
    /// Most (block, engine) entries kept; inserting beyond evicts the least recently touched.
    pub max_blocks: usize,
    /// Entries untouched for this many ticks are dropped by [`PrefixIndex::expire`].
    pub ttl: Option<u64>,
}

/// One (block, engine) entry, or a free arena slot (`node == NIL`, `next` links the free list).
#[derive(Debug, Clone, Copy)]
struct Entry {
    tick: u64,
    node: u32,
    /// LRU neighbours: `prev` is more recent.
    prev: u32,
    next: u32,
    /// Neighbours in the engine's list.
    eprev: u32,
    enext: u32,
    engine: u16,
}

#[derive(Debug, Clone, Copy)]
struct EngineSlot {
    head: u32,
    len: u32,
}

/// Which engines hold which blocks. See the crate documentation.
#[derive(Debug, Clone)]
pub struct PrefixIndex {
    max_blocks: usize,
    ttl: Option<u64>,
    entries: Vec<Entry>,
    free_entry: u32,
    len: usize,
    pub(crate) nodes: Vec<Node>,
    free_node: u32,
    table: KeyTable,
    pub(crate) pool: Pool,
    engines: Vec<EngineSlot>,
    /// Most and least recently touched entries.
    lru_head: u32,
    lru_tail: u32,
    /// Latest tick seen: time never runs backwards inside the index.
    clock: u64,
}

/// Grows an arena's capacity by doubling, but never past `max` elements, so that a full index's
/// arenas are exactly `max_blocks` long instead of up to twice that.
fn reserve_bounded<T>(v: &mut Vec<T>, max: usize) {
    if v.len() == v.capacity() {
        let want = (v.capacity() * 2).max(64).min(max.max(1));
        v.reserve_exact(want.saturating_sub(v.len()).max(1));
    }
}

impl PrefixIndex {
    pub fn new(config: IndexConfig) -> Self {
        let max_blocks = config.max_blocks.min(MAX_BLOCKS_LIMIT);
        PrefixIndex {
            max_blocks,
            ttl: config.ttl,
            entries: Vec::new(),
            free_entry: NIL,
            len: 0,
            nodes: Vec::new(),
            free_node: NIL,
            table: KeyTable::new(max_blocks),
            pool: Pool::new(),
            engines: Vec::new(),
            lru_head: NIL,
            lru_tail: NIL,
            clock: 0,
        }
    }

    /// The configuration in force (`max_blocks` after clamping to [`MAX_BLOCKS_LIMIT`]).
    pub fn config(&self) -> IndexConfig {
        IndexConfig {
            max_blocks: self.max_blocks,
            ttl: self.ttl,
        }
    }

    /// (block, engine) entries held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Distinct block keys held by at least one engine.
    pub fn blocks(&self) -> usize {
        self.table.len()
    }

    /// Blocks `engine` holds.
    pub fn engine_blocks(&self, engine: EngineId) -> usize {
        self.engines
            .get(usize::from(engine.0))
            .map_or(0, |s| s.len as usize)
    }

    /// The latest tick any call has passed.
    pub fn clock(&self) -> u64 {
        self.clock
    }

    /// Heap bytes of every container (capacity × element size, free slots included) plus the
    /// struct itself. Allocator headers and rounding are not included.
    pub fn memory_bytes(&self) -> usize {
        self.memory_parts().iter().map(|p| p.1).sum()
    }

    /// [`PrefixIndex::memory_bytes`] by container, for reports.
    pub fn memory_parts(&self) -> [(&'static str, usize); 6] {
        [
            ("struct", std::mem::size_of::<Self>()),
            (
                "entries",
                self.entries.capacity() * std::mem::size_of::<Entry>(),
            ),
            ("nodes", self.nodes.capacity() * std::mem::size_of::<Node>()),
            ("table", self.table.bytes()),
            ("lists", self.pool.bytes()),
            (
                "engines",
                self.engines.capacity() * std::mem::size_of::<EngineSlot>(),
            ),
        ]
    }

    /// The node of `key`.
    #[inline(always)]
    pub(crate) fn find_node(&self, key: u64) -> Option<u32> {
        let nodes = &self.nodes;
        self.table.find(tag(key), |n| nodes[n as usize].key == key)
    }

    fn find_slot(&self, engine: u16, key: u64) -> Option<u32> {
        let node = &self.nodes[self.find_node(key)? as usize];
        let pos = node.position(&self.pool, engine).ok()?;
        Some(node.slots(&self.pool)[pos])
    }

    /// Whether `engine` holds `key`.
    pub fn contains(&self, engine: EngineId, key: u64) -> bool {
        self.find_slot(engine.0, key).is_some()
    }

    /// The engines holding `key`, ascending.
    pub fn holders(&self, key: u64) -> impl Iterator<Item = EngineId> + '_ {
        self.find_node(key)
            .into_iter()
            .flat_map(move |n| self.nodes[n as usize].engines(&self.pool))
            .map(|&e| EngineId(e))
    }

    fn advance(&mut self, now: u64) -> u64 {
        self.clock = self.clock.max(now);
        self.clock
    }

    /// Records that `engine` holds `keys` as of `now`, adding missing entries and refreshing
    /// present ones (their tick and LRU position). Beyond `max_blocks`, least recently touched
    /// entries are evicted first.
    ///
    /// Keys are touched last to first, so that within one call the first block ends up most
    /// recent: under pressure a prefix loses its tail before its head, as vLLM's own cache does,
    /// and a tail without its head would be unreachable to [`PrefixIndex::match_prefix`] anyway.
    pub fn insert(&mut self, engine: EngineId, keys: &[u64], now: u64) {
        let now = self.advance(now);
        if self.max_blocks == 0 {
            return;
        }
        for &key in keys.iter().rev() {
            self.insert_one(engine.0, key, now);
        }
        self.maybe_compact();
    }

    fn insert_one(&mut self, engine: u16, key: u64, now: u64) {
        let mut found = self.find_node(key);
        if let Some(n) = found {
            let node = &self.nodes[n as usize];
            if let Ok(pos) = node.position(&self.pool, engine) {
                let slot = node.slots(&self.pool)[pos];
                self.entries[slot as usize].tick = now;
                self.lru_unlink(slot);
                self.lru_push_front(slot);
                return;
            }
        }
        if self.len >= self.max_blocks {
            self.remove_entry(self.lru_tail);
            // The victim may have been this key's last holder, deleting its node.
            if found.is_some() {
                found = self.find_node(key);
            }
        }
        let slot = self.alloc_entry(engine, now);
        let node = match found {
            Some(n) => {
                let node = &mut self.nodes[n as usize];
                let pos = node.position(&self.pool, engine).unwrap_err();
                node.insert(&mut self.pool, pos, engine, slot);
                n
            }
            None => {
                let n = self.alloc_node(Node::single(key, engine, slot));
                self.table.insert(tag(key), n);
                n
            }
        };
        self.entries[slot as usize].node = node;
        self.lru_push_front(slot);
        self.engine_push_front(engine, slot);
        self.len += 1;
    }

    /// Forgets that `engine` holds `keys` (vLLM's `BlockRemoved`). Absent pairs are ignored.
    pub fn remove(&mut self, engine: EngineId, keys: &[u64]) {
        for &key in keys {
            if let Some(slot) = self.find_slot(engine.0, key) {
                self.remove_entry(slot);
            }
        }
        self.maybe_compact();
    }

    /// Forgets everything `engine` holds (`AllBlocksCleared`, a restart, or the engine leaving).
    pub fn clear_engine(&mut self, engine: EngineId) {
        while let Some(s) = self.engines.get(usize::from(engine.0)) {
            if s.head == NIL {
                break;
            }
            self.remove_entry(s.head);
        }
        self.maybe_compact();
    }

    /// Drops entries untouched for `ttl` ticks as of `now` (those with `tick + ttl <= now`);
    /// without a TTL it only advances the clock. Costs O(1) plus the entries dropped, since the
    /// LRU order is also tick order.
    pub fn expire(&mut self, now: u64) {
        let now = self.advance(now);
        let Some(ttl) = self.ttl else { return };
        while self.lru_tail != NIL
            && self.entries[self.lru_tail as usize]
                .tick
                .saturating_add(ttl)
                <= now
        {
            self.remove_entry(self.lru_tail);
        }
        self.maybe_compact();
    }

    /// Forgets everything and frees the memory; the configuration and the clock stay.
    pub fn clear(&mut self) {
        let (max_blocks, ttl, clock) = (self.max_blocks, self.ttl, self.clock);
        *self = PrefixIndex::new(IndexConfig { max_blocks, ttl });
        self.clock = clock;
    }

    fn remove_entry(&mut self, slot: u32) {
        let Entry { node, engine, .. } = self.entries[slot as usize];
        self.lru_unlink(slot);
        self.engine_unlink(slot);
        let n = &mut self.nodes[node as usize];
        if n.len() == 1 {
            self.table.remove(tag(n.key), node);
            self.nodes[node as usize] = Node::free(self.free_node);
            self.free_node = node;
        } else {
            let pos = n
                .position(&self.pool, engine)
                .unwrap_or_else(|_| unreachable!());
            n.remove(&mut self.pool, pos);
        }
        let e = &mut self.entries[slot as usize];
        e.node = NIL;
        e.next = self.free_entry;
        self.free_entry = slot;
        self.len -= 1;
    }

    fn alloc_entry(&mut self, engine: u16, tick: u64) -> u32 {
        let entry = Entry {
            tick,
            node: NIL,
            prev: NIL,
            next: NIL,
            eprev: NIL,
            enext: NIL,
            engine,
        };
        if self.free_entry != NIL {
            let slot = self.free_entry;
            self.free_entry = self.entries[slot as usize].next;
            self.entries[slot as usize] = entry;
            slot
        } else {
            reserve_bounded(&mut self.entries, self.max_blocks);
            self.entries.push(entry);
            (self.entries.len() - 1) as u32
        }
    }

    fn alloc_node(&mut self, node: Node) -> u32 {
        if self.free_node != NIL {
            let n = self.free_node;
            self.free_node = self.nodes[n as usize].next_free();
            self.nodes[n as usize] = node;
            n
        } else {
            reserve_bounded(&mut self.nodes, self.max_blocks);
            self.nodes.push(node);
            (self.nodes.len() - 1) as u32
        }
    }

    fn maybe_compact(&mut self) {
        if self.pool.wants_compaction() {
            let entries = &self.entries;
            self.pool
                .compact(&mut self.nodes, |slot| entries[slot as usize].node);
        }
    }

    fn lru_unlink(&mut self, slot: u32) {
        let Entry { prev, next, .. } = self.entries[slot as usize];
        match prev {
            NIL => self.lru_head = next,
            p => self.entries[p as usize].next = next,
        }
        match next {
            NIL => self.lru_tail = prev,
            n => self.entries[n as usize].prev = prev,
        }
    }

    fn lru_push_front(&mut self, slot: u32) {
        let old = self.lru_head;
        let e = &mut self.entries[slot as usize];
        (e.prev, e.next) = (NIL, old);
        match old {
            NIL => self.lru_tail = slot,
            o => self.entries[o as usize].prev = slot,
        }
        self.lru_head = slot;
    }

    fn engine_unlink(&mut self, slot: u32) {
        let Entry {
            eprev,
            enext,
            engine,
            ..
        } = self.entries[slot as usize];
        let list = &mut self.engines[usize::from(engine)];
        list.len -= 1;
        match eprev {
            NIL => list.head = enext,
            p => self.entries[p as usize].enext = enext,
        }
        if enext != NIL {
            self.entries[enext as usize].eprev = eprev;
        }
    }

    fn engine_push_front(&mut self, engine: u16, slot: u32) {
        let e = usize::from(engine);
        if self.engines.len() <= e {
            self.engines.resize(e + 1, EngineSlot { head: NIL, len: 0 });
        }
        let list = &mut self.engines[e];
        let old = list.head;
        list.head = slot;
        list.len += 1;
        let entry = &mut self.entries[slot as usize];
        (entry.eprev, entry.enext) = (NIL, old);
        if old != NIL {
            self.entries[old as usize].eprev = slot;
        }
    }

    /// Checks every structural invariant, O(size). For tests and debugging; `Err` names the first
    /// violation.
    #[doc(hidden)]
    pub fn validate(&self) -> Result<(), String> {
        let fail = |m: String| Err(m);
        // LRU: consistent links, every live entry once, ticks non-increasing towards the tail.
        let (mut seen, mut prev, mut cur, mut last_tick) = (0, NIL, self.lru_head, u64::MAX);
        while cur != NIL {
            let e = &self.entries[cur as usize];
            if e.prev != prev || e.node == NIL || e.tick > last_tick || e.tick > self.clock {
                return fail(format!("lru entry {cur} inconsistent"));
            }
            (seen, prev, cur, last_tick) = (seen + 1, cur, e.next, e.tick);
        }
        if prev != self.lru_tail || seen != self.len || self.len > self.max_blocks {
            return fail(format!("lru holds {seen}, len {}", self.len));
        }
        // Engine lists partition the live entries.
        let mut total = 0;
        for (id, s) in self.engines.iter().enumerate() {
            let (mut n, mut prev, mut cur) = (0, NIL, s.head);
            while cur != NIL {
                let e = &self.entries[cur as usize];
                if e.eprev != prev || usize::from(e.engine) != id || e.node == NIL {
                    return fail(format!("engine {id} list broken at {cur}"));
                }
                (n, prev, cur) = (n + 1, cur, e.enext);
            }
            if n != s.len {
                return fail(format!("engine {id} counts {} holds {n}", s.len));
            }
            total += n as usize;
        }
        if total != self.len {
            return fail(format!("engine lists hold {total}, len {}", self.len));
        }
        // Nodes: sorted holders pointing at entries that point back; pool words add up.
        let (mut live, mut holders, mut words) = (0, 0, 0);
        for (i, n) in self.nodes.iter().enumerate().filter(|(_, n)| n.is_live()) {
            live += 1;
            let (es, ss) = (n.engines(&self.pool), n.slots(&self.pool));
            if es.windows(2).any(|w| w[0] >= w[1]) {
                return fail(format!("node {i} holders unsorted"));
            }
            for (&e, &s) in es.iter().zip(ss) {
                let entry = &self.entries[s as usize];
                if entry.node as usize != i || entry.engine != e {
                    return fail(format!("node {i} holder {e} -> entry {s} mismatch"));
                }
            }
            if self.find_node(n.key) != Some(i as u32) {
                return fail(format!("node {i} not found by its key"));
            }
            holders += es.len();
            // A chunk holds its list and is never more than twice its size.
            if es.len() > 1 && (n.words() < es.len() || n.words() >= 2 * es.len()) {
                return fail(format!(
                    "node {i}: {} holders in {} words",
                    es.len(),
                    n.words()
                ));
            }
            words += n.words();
        }
        if holders != self.len || self.table.len() != live {
            return fail(format!(
                "{live} live nodes, {holders} holders, table {}",
                self.table.len()
            ));
        }
        if self.table.iter().any(|(t, n)| {
            let node = &self.nodes[n as usize];
            !node.is_live() || tag(node.key) != t
        }) {
            return fail("table bucket points at a wrong node".into());
        }
        if self.pool.live_words() != words {
            return fail(format!(
                "pool live words {} vs lists {words}",
                self.pool.live_words()
            ));
        }
        Ok(())
    }
}
