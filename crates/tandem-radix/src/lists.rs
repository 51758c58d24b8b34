//! Per-key engine lists: which engines hold a key, sorted by engine id, with each holder's entry.
//!
//! Most keys (a conversation's own turns) are held by one engine, so a node keeps a single holder
//! inline and needs no other storage. Keys held by several engines (shared system prompts) keep
//! their holders in a chunk of a shared pool: engine ids in one array and entry slots in a
//! parallel one at the same offsets, so that matching reads only the 2-byte ids, contiguously
//! (64 engines are two cache lines) and can compare a whole list with one `memcmp`.
//!
//! Memory: chunk sizes step by ×1.5 and ×4/3 alternately (2, 3, 4, 6, 8, 12, …, 65,536) rather
//! than ×2, lists move to a smaller chunk once half empty, freed chunks go on a free list per size
//! threaded through the chunks themselves, and the pool grows in 1/8 steps rather than doubling.
//! Freed chunks of one size cannot serve another, so the pool is compacted in place once free
//! words exceed a quarter of the live ones. Compaction slides chunks down in one pass over the
//! pool: a free chunk is marked in its first slot word (entry slots stay below 2²⁸, far from the
//! mark), and a live chunk's owner is found through its first holder's entry. Each compaction
//! follows at least live/4 freed words, so its cost is amortized O(1) per word.

/// "No slot" in links and free lists.
pub(crate) const NIL: u32 = u32::MAX;
/// Size classes 0..=30: chunks of 2 to 65,536 holders (every possible engine id).
const CLASSES: usize = 31;
/// First slot word of a free chunk: this bit plus the class. The second word links the free list.
const FREE_MARK: u32 = 1 << 31;

/// Holders a chunk of `class` has room for: 2, 3, 4, 6, 8, 12, …
#[inline(always)]
fn size(class: u16) -> usize {
    let k = class / 2;
    if class.is_multiple_of(2) {
        2 << k
    } else {
        3 << k
    }
}

#[derive(Debug, Clone, Default)]
pub(crate) struct Pool {
    eng: Vec<u16>,
    slot: Vec<u32>,
    /// Head of each class's free list.
    free: [u32; CLASSES],
    /// Words in allocated chunks.
    live: usize,
}

impl Pool {
    pub(crate) fn new() -> Self {
        Pool {
            free: [NIL; CLASSES],
            ..Pool::default()
        }
    }

    fn alloc(&mut self, class: u16) -> u32 {
        let words = size(class);
        self.live += words;
        let head = self.free[usize::from(class)];
        if head != NIL {
            self.free[usize::from(class)] = self.slot[head as usize + 1];
            return head;
        }
        let off = self.eng.len();
        if off + words > self.eng.capacity() {
            // 1/8 steps: amortized O(1) per word still, with at most 1/8 of the pool unused.
            let more = words.max(off / 8).max(64);
            self.eng.reserve_exact(more);
            self.slot.reserve_exact(more);
        }
        self.eng.resize(off + words, 0);
        self.slot.resize(off + words, 0);
        u32::try_from(off).expect("pool offsets fit u32 under the capacity bound")
    }

    fn release(&mut self, off: u32, class: u16) {
        let c = usize::from(class);
        self.live -= size(class);
        self.slot[off as usize] = FREE_MARK | u32::from(class);
        self.slot[off as usize + 1] = self.free[c];
        self.free[c] = off;
    }

    pub(crate) fn wants_compaction(&self) -> bool {
        self.eng.len() - self.live > self.live / 4 + 64
    }

    /// Slides every live chunk down over the free ones and re-points its node, found as
    /// `nodes[owner(first holder's entry slot)]`.
    pub(crate) fn compact(&mut self, nodes: &mut [Node], owner: impl Fn(u32) -> u32) {
        let (mut read, mut write) = (0, 0);
        while read < self.eng.len() {
            let first = self.slot[read];
            if first & FREE_MARK != 0 {
                read += size((first & !FREE_MARK) as u16);
                continue;
            }
            let node = &mut nodes[owner(first) as usize];
            let words = size(node.aux);
            if write != read {
                self.eng.copy_within(read..read + words, write);
                self.slot.copy_within(read..read + words, write);
            }
            node.head = write as u32;
            (read, write) = (read + words, write + words);
        }
        debug_assert_eq!(write, self.live);
        self.eng.truncate(write);
        self.slot.truncate(write);
        if self.eng.capacity() > write + write / 4 + 64 {
            self.eng.shrink_to(write + write / 8);
            self.slot.shrink_to(write + write / 8);
        }
        self.free = [NIL; CLASSES];
    }

    pub(crate) fn bytes(&self) -> usize {
        self.eng.capacity() * std::mem::size_of::<u16>()
            + self.slot.capacity() * std::mem::size_of::<u32>()
    }

    pub(crate) fn live_words(&self) -> usize {
        self.live
    }
}

/// A key and its holders. 16 bytes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Node {
    pub(crate) key: u64,
    /// One holder: its entry slot. Several: the chunk offset in the pool. Free node: `NIL`.
    head: u32,
    /// Holders minus one: a live node has at least one, and all 65,536 engine ids fit.
    len_m1: u16,
    /// One holder: its engine id. Several: the chunk's size class.
    aux: u16,
}

impl Node {
    pub(crate) fn single(key: u64, engine: u16, slot: u32) -> Node {
        Node {
            key,
            head: slot,
            len_m1: 0,
            aux: engine,
        }
    }

    /// A free arena slot; `next` (the free list link) is kept in the key field.
    pub(crate) fn free(next: u32) -> Node {
        Node {
            key: u64::from(next),
            head: NIL,
            len_m1: 0,
            aux: 0,
        }
    }

    #[inline(always)]
    pub(crate) fn is_live(&self) -> bool {
        self.head != NIL
    }

    /// For a free node, the next free node.
    pub(crate) fn next_free(&self) -> u32 {
        self.key as u32
    }

    #[inline(always)]
    pub(crate) fn len(&self) -> usize {
        usize::from(self.len_m1) + 1
    }

    /// Pool words this node's chunk takes (0 with one holder).
    pub(crate) fn words(&self) -> usize {
        if self.len_m1 == 0 {
            0
        } else {
            size(self.aux)
        }
    }

    /// The holders' engine ids, ascending.
    #[inline(always)]
    pub(crate) fn engines<'a>(&'a self, pool: &'a Pool) -> &'a [u16] {
        if self.len_m1 == 0 {
            std::slice::from_ref(&self.aux)
        } else {
            let off = self.head as usize;
            &pool.eng[off..off + self.len()]
        }
    }

    /// The holders' entry slots, in the order of [`Node::engines`].
    pub(crate) fn slots<'a>(&'a self, pool: &'a Pool) -> &'a [u32] {
        if self.len_m1 == 0 {
            std::slice::from_ref(&self.head)
        } else {
            let off = self.head as usize;
            &pool.slot[off..off + self.len()]
        }
    }

    /// Position of `engine` among the holders, or where it would be inserted.
    #[inline]
    pub(crate) fn position(&self, pool: &Pool, engine: u16) -> Result<usize, usize> {
        self.engines(pool).binary_search(&engine)
    }

    /// Copies this node's holders into a new chunk of `class`, leaving a gap at `gap` (if any),
    /// releases the old chunk, and points the node at the new one.
    fn move_to(&mut self, pool: &mut Pool, class: u16, len: usize, gap: Option<usize>) {
        let (from, to) = (self.head as usize, pool.alloc(class) as usize);
        let split = gap.unwrap_or(len);
        let shift = usize::from(gap.is_some());
        pool.eng.copy_within(from..from + split, to);
        pool.slot.copy_within(from..from + split, to);
        pool.eng
            .copy_within(from + split..from + len, to + split + shift);
        pool.slot
            .copy_within(from + split..from + len, to + split + shift);
        pool.release(self.head, self.aux);
        (self.head, self.aux) = (to as u32, class);
    }

    /// Adds holder `engine` with entry `slot` at `pos` (from [`Node::position`]'s `Err`).
    pub(crate) fn insert(&mut self, pool: &mut Pool, pos: usize, engine: u16, slot: u32) {
        let len = self.len();
        if len == 1 {
            let (e0, s0) = (self.aux, self.head);
            let o = pool.alloc(0) as usize;
            let (lo, hi) = if pos == 0 {
                ((engine, slot), (e0, s0))
            } else {
                ((e0, s0), (engine, slot))
            };
            (pool.eng[o], pool.slot[o]) = lo;
            (pool.eng[o + 1], pool.slot[o + 1]) = hi;
            (self.head, self.aux) = (o as u32, 0);
        } else {
            if len == size(self.aux) {
                self.move_to(pool, self.aux + 1, len, Some(pos));
            } else {
                let o = self.head as usize;
                pool.eng.copy_within(o + pos..o + len, o + pos + 1);
                pool.slot.copy_within(o + pos..o + len, o + pos + 1);
            }
            let o = self.head as usize + pos;
            (pool.eng[o], pool.slot[o]) = (engine, slot);
        }
        self.len_m1 += 1;
    }

    /// Removes the holder at `pos`; the node must keep at least one (deleting the node is the
    /// caller's job). A list half the size of its chunk moves to the next smaller one, so a chunk
    /// is never more than twice its list (and shrinking and growing back are a class apart).
    pub(crate) fn remove(&mut self, pool: &mut Pool, pos: usize) {
        let len = self.len();
        debug_assert!(len >= 2 && pos < len);
        let o = self.head as usize;
        if len == 2 {
            let keep = o + 1 - pos;
            let (e, s) = (pool.eng[keep], pool.slot[keep]);
            pool.release(self.head, self.aux);
            (self.head, self.aux) = (s, e);
        } else {
            pool.eng.copy_within(o + pos + 1..o + len, o + pos);
            pool.slot.copy_within(o + pos + 1..o + len, o + pos);
            let new_len = len - 1;
            if self.aux >= 2 && new_len <= size(self.aux - 2) {
                self.move_to(pool, self.aux - 1, new_len, None);
            }
        }
        self.len_m1 -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_classes_step_by_at_most_half_up_to_every_engine() {
        assert_eq!(
            (0..8).map(size).collect::<Vec<_>>(),
            [2, 3, 4, 6, 8, 12, 16, 24]
        );
        assert_eq!(size(CLASSES as u16 - 1), 65_536);
        assert!((1..CLASSES as u16).all(|c| 2 * size(c) <= 3 * size(c - 1)));
    }

    #[test]
    fn lists_stay_sorted_through_growth_shrink_compaction_and_back_to_inline() {
        let mut pool = Pool::new();
        let mut nodes = [Node::single(1, 500, 0), Node::single(2, 7, 1000)];
        // Slot s belongs to node s / 1000 (the `owner` map compaction needs).
        let mut models = [vec![(500u16, 0u32)], vec![(7u16, 1000u32)]];
        let check = |nodes: &[Node], pool: &Pool, models: &[Vec<(u16, u32)>]| {
            for (node, model) in nodes.iter().zip(models) {
                let got: Vec<_> = node
                    .engines(pool)
                    .iter()
                    .copied()
                    .zip(node.slots(pool).iter().copied())
                    .collect();
                assert_eq!(&got, model);
                assert!(node.len() == 1 || node.len() * 2 > node.words());
            }
            let words: usize = nodes.iter().map(Node::words).sum();
            assert_eq!(pool.live_words(), words);
        };
        // Interleaved ids so that inserts land in the middle.
        for i in 0..300u16 {
            let n = usize::from(i % 2);
            let e = (i * 37) % 1000;
            if let Err(pos) = nodes[n].position(&pool, e) {
                let slot = n as u32 * 1000 + u32::from(i) + 1;
                nodes[n].insert(&mut pool, pos, e, slot);
                models[n].insert(pos, (e, slot));
            }
            check(&nodes, &pool, &models);
        }
        let mut step = 0;
        while models.iter().any(|m| m.len() > 1) {
            let n = step % 2;
            step += 1;
            if models[n].len() == 1 {
                continue;
            }
            let pos = (models[n].len() * 7 / 11) % models[n].len();
            nodes[n].remove(&mut pool, pos);
            models[n].remove(pos);
            if pool.wants_compaction() || step % 50 == 0 {
                pool.compact(&mut nodes, |slot| slot / 1000);
                assert_eq!(pool.eng.len(), pool.live_words());
            }
            check(&nodes, &pool, &models);
        }
        assert_eq!(pool.live_words(), 0);
        pool.compact(&mut nodes, |slot| slot / 1000);
        assert!(pool.eng.is_empty());
    }
}
