//! The key table: an open-addressing hash table from a block key to its node's index.
//!
//! Why not `std::collections::HashMap`: its capacity is a power of two at most 7/8 full, so just
//! after growing it is 7/16 full, and a `(u64, u32)` bucket pads to 16 bytes plus a control byte:
//! up to 39 bytes per key of a 64-byte budget. Here a bucket is one `u64` holding a 32-bit hash
//! of the key (the tag) and the node index, the capacity is any integer (a key's home bucket is
//! `tag × capacity / 2³²`, a multiply instead of a mask), and the table never grows past what
//! `max_blocks` keys need at a 3/4 load: at most 10.7 bytes per key.
//!
//! Linear probing keeps a probe to one or two adjacent cache lines. The tag filters probes
//! without reading the node (a false tag match costs one node read, odds about 2⁻¹² per probe),
//! and since a bucket's home is a function of its tag alone, growing and deleting (backward
//! shift, no tombstones) never read nodes either. Nodes live in their own arena, allocated in
//! insertion order, so the nodes of one prompt's blocks sit next to each other (which
//! [`crate::matching`] exploits); a table of nodes would scatter them by hash.

use crate::keys::fold_mul;

/// An empty bucket. No occupied bucket equals it: node indices stay below `u32::MAX`.
const EMPTY: u64 = u64::MAX;
/// Largest load factor, as a fraction num/den.
const LOAD_NUM: usize = 3;
const LOAD_DEN: usize = 4;
const MIN_BUCKETS: usize = 16;

/// The 32-bit tag of a key: the high half of a multiplicative mix, so that structured keys
/// (small integers in tests, other hashers' outputs) spread evenly too.
#[inline(always)]
pub(crate) fn tag(key: u64) -> u32 {
    (fold_mul(key ^ 0x9e37_79b9_7f4a_7c15, 0xbf58_476d_1ce4_e5b9) >> 32) as u32
}

#[derive(Debug, Clone)]
pub(crate) struct KeyTable {
    buckets: Vec<u64>,
    len: usize,
    /// The capacity needed for `max_keys` keys at the largest load: the table never grows past it.
    max_buckets: usize,
}

impl KeyTable {
    pub(crate) fn new(max_keys: usize) -> Self {
        let max_buckets = (max_keys * LOAD_DEN).div_ceil(LOAD_NUM).max(MIN_BUCKETS);
        KeyTable {
            buckets: Vec::new(),
            len: 0,
            max_buckets,
        }
    }

    #[inline(always)]
    fn home(&self, tag: u32) -> usize {
        ((u64::from(tag) * self.buckets.len() as u64) >> 32) as usize
    }

    #[inline(always)]
    fn next(&self, i: usize) -> usize {
        if i + 1 == self.buckets.len() {
            0
        } else {
            i + 1
        }
    }

    pub(crate) fn bytes(&self) -> usize {
        self.buckets.capacity() * std::mem::size_of::<u64>()
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The node under `tag` for which `is_key(node)` holds. The table always has an empty bucket,
    /// so the probe ends.
    #[inline(always)]
    pub(crate) fn find(&self, tag: u32, mut is_key: impl FnMut(u32) -> bool) -> Option<u32> {
        if self.buckets.is_empty() {
            return None;
        }
        let mut i = self.home(tag);
        loop {
            let b = self.buckets[i];
            if b == EMPTY {
                return None;
            }
            if (b >> 32) as u32 == tag && is_key(b as u32) {
                return Some(b as u32);
            }
            i = self.next(i);
        }
    }

    /// Adds `node` under `tag`; the caller has checked that its key is absent.
    pub(crate) fn insert(&mut self, tag: u32, node: u32) {
        if (self.len + 1) * LOAD_DEN > self.buckets.len() * LOAD_NUM {
            self.grow();
        }
        let mut i = self.home(tag);
        while self.buckets[i] != EMPTY {
            i = self.next(i);
        }
        self.buckets[i] = (u64::from(tag) << 32) | u64::from(node);
        self.len += 1;
    }

    /// Removes the bucket holding `node` (present under `tag`), then shifts later buckets of its
    /// run back so that no probe sequence crosses a hole.
    pub(crate) fn remove(&mut self, tag: u32, node: u32) {
        let want = (u64::from(tag) << 32) | u64::from(node);
        let mut hole = self.home(tag);
        while self.buckets[hole] != want {
            debug_assert_ne!(self.buckets[hole], EMPTY, "removing an absent node");
            hole = self.next(hole);
        }
        let n = self.buckets.len();
        let mut j = hole;
        loop {
            j = self.next(j);
            let b = self.buckets[j];
            if b == EMPTY {
                break;
            }
            // `b` may fill the hole if the hole lies on its probe path [home, j), cyclically.
            let home = self.home((b >> 32) as u32);
            if (j + n - home) % n >= (j + n - hole) % n {
                self.buckets[hole] = b;
                hole = j;
            }
        }
        self.buckets[hole] = EMPTY;
        self.len -= 1;
    }

    /// Doubles the capacity (up to what the key bound needs) and reinserts by tag: no node reads.
    fn grow(&mut self) {
        let mut want = (self.buckets.len() * 2).clamp(MIN_BUCKETS, self.max_buckets);
        // Only reachable if a caller exceeds `max_keys`; stay correct anyway.
        if (self.len + 1) * LOAD_DEN > want * LOAD_NUM {
            want = self.buckets.len() * 2 + MIN_BUCKETS;
        }
        let old = std::mem::replace(&mut self.buckets, Vec::with_capacity(want));
        self.buckets.resize(want, EMPTY);
        for b in old.into_iter().filter(|&b| b != EMPTY) {
            let mut i = self.home((b >> 32) as u32);
            while self.buckets[i] != EMPTY {
                i = self.next(i);
            }
            self.buckets[i] = b;
        }
    }

    /// Every (tag, node) pair, for consistency checks.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u32, u32)> + '_ {
        self.buckets
            .iter()
            .filter(|&&b| b != EMPTY)
            .map(|&b| ((b >> 32) as u32, b as u32))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn agrees_with_a_hashmap_under_churn_with_colliding_tags() {
        // Few distinct tags force long runs, wraparound and backward shifts across them.
        let mut t = KeyTable::new(300);
        let mut model: HashMap<u32, u32> = HashMap::new();
        let tag_of = |node: u32| (node % 7).wrapping_mul(0x9000_0001);
        let mut x = 1u64;
        for _ in 0..20_000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let node = ((x >> 33) % 400) as u32;
            if let Some(tg) = model.remove(&node) {
                t.remove(tg, node);
            } else if model.len() < 300 {
                t.insert(tag_of(node), node);
                model.insert(node, tag_of(node));
            }
            assert_eq!(t.len(), model.len());
        }
        for node in 0..400 {
            let found = t.find(tag_of(node), |n| n == node);
            assert_eq!(found, model.get(&node).map(|_| node));
        }
        assert!(t.buckets.len() <= t.max_buckets);
    }
}
