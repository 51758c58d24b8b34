use super::*;
use proptest::prelude::*;
use rmpv::Value;
use tandem_radix::block_keys;

use crate::codec::{decode_batch, encode_batch, MEDIUM_CPU, MEDIUM_GPU};

/// The same event in another tier.
fn on(medium: &str, mut event: KvEvent) -> KvEvent {
    match &mut event {
        KvEvent::BlockStored { medium: m, .. } | KvEvent::BlockRemoved { medium: m, .. } => {
            *m = Some(medium.into())
        }
        KvEvent::AllBlocksCleared => {}
    }
    event
}

/// With KV offloading the engine reports a block once per tier; the key stays in the index until
/// the last tier evicts it, whichever order the evictions come in.
#[test]
fn a_block_is_held_while_any_tier_holds_it() {
    let tokens: Vec<u32> = (0..8).collect();
    let keys = block_keys(&tokens, BS as usize, SEED);
    for cpu_first in [false, true] {
        let mut t = KeyTracker::new(BS, SEED);
        let gpu = stored(vec![1, 2], None, tokens.clone());
        assert_eq!(t.apply(&gpu), Some(IndexOp::Insert(keys.clone())));
        assert_eq!(
            t.apply(&on(MEDIUM_CPU, gpu.clone())),
            Some(IndexOp::Insert(keys.clone()))
        );
        let (first, second) = if cpu_first {
            (MEDIUM_CPU, MEDIUM_GPU)
        } else {
            (MEDIUM_GPU, MEDIUM_CPU)
        };
        assert_eq!(t.apply(&on(first, removed(vec![1, 2]))), None);
        assert!(t.holds_key(keys[0]) && t.holds_key(keys[1]));
        assert_eq!(
            t.apply(&on(second, removed(vec![2]))),
            Some(IndexOp::Remove(vec![keys[1]]))
        );
        assert!(t.holds_key(keys[0]) && !t.holds_key(keys[1]));
        assert_eq!(t.stats().unknown_removals, 0);
    }
}

const BS: u32 = 4;
const SEED: u64 = 0x5eed;

fn stored(hashes: Vec<u64>, parent: Option<u64>, tokens: Vec<u32>) -> KvEvent {
    KvEvent::BlockStored {
        block_hashes: hashes,
        parent_block_hash: parent,
        token_ids: tokens,
        block_size: BS,
        medium: Some(MEDIUM_GPU.into()),
    }
}

fn removed(hashes: Vec<u64>) -> KvEvent {
    KvEvent::BlockRemoved {
        block_hashes: hashes,
        medium: Some(MEDIUM_GPU.into()),
    }
}

/// The events an engine emits for `tokens` (full blocks only), in events of `split` blocks each,
/// with engine hashes `base + block index`.
fn events_for(tokens: &[u32], split: &[usize], base: u64) -> Vec<KvEvent> {
    let blocks = tokens.len() / BS as usize;
    let mut out = Vec::new();
    let (mut at, mut i) = (0, 0);
    while at < blocks {
        let n = split.get(i).copied().unwrap_or(1).clamp(1, blocks - at);
        let hashes: Vec<u64> = (at..at + n).map(|b| base + b as u64).collect();
        let parent = (at > 0).then(|| base + at as u64 - 1);
        let toks = tokens[at * BS as usize..(at + n) * BS as usize].to_vec();
        out.push(stored(hashes, parent, toks));
        at += n;
        i += 1;
    }
    out
}

fn inserted(ops: &[IndexOp]) -> Vec<u64> {
    ops.iter()
        .flat_map(|op| match op {
            IndexOp::Insert(k) => k.clone(),
            _ => Vec::new(),
        })
        .collect()
}

fn apply_all(t: &mut KeyTracker, events: &[KvEvent]) -> Vec<IndexOp> {
    let mut ops = Vec::new();
    t.apply_batch(events, &mut ops);
    ops
}

#[test]
fn keys_equal_block_keys() {
    let tokens: Vec<u32> = (0..43).map(|i| i * 7 % 300).collect(); // 10 full blocks + 3 tokens
    let want = block_keys(&tokens, BS as usize, SEED);
    assert_eq!(want.len(), 10);
    for split in [vec![10], vec![1; 10], vec![3, 1, 4, 2], vec![2, 7, 1]] {
        let mut t = KeyTracker::new(BS, SEED);
        let ops = apply_all(&mut t, &events_for(&tokens, &split, 100));
        assert_eq!(inserted(&ops), want, "split {split:?}");
        assert_eq!(t.len(), 10);
        assert_eq!(t.key_of(109), Some(want[9]));
        assert!(want.iter().all(|&k| t.holds_key(k)));
        assert_eq!(t.stats().stored_blocks, 10);
    }
}

proptest! {
    /// Any split of any token sequence into events, and a second sequence sharing a prefix
    /// (stored by the engine as a child of the shared block), give `block_keys` of each sequence.
    #[test]
    fn keys_equal_block_keys_for_any_split(
        tokens in proptest::collection::vec(0u32..1000, 0..120),
        split in proptest::collection::vec(1usize..6, 0..40),
        shared in 0usize..30,
        tail in proptest::collection::vec(0u32..1000, 0..40),
        seed in any::<u64>(),
    ) {
        let mut t = KeyTracker::new(BS, seed);
        let ops = apply_all(&mut t, &events_for(&tokens, &split, 1_000));
        prop_assert_eq!(inserted(&ops), block_keys(&tokens, BS as usize, seed));

        // A branch: the first `shared` full blocks, then `tail`.
        let shared = shared.min(tokens.len() / BS as usize);
        let mut branch = tokens[..shared * BS as usize].to_vec();
        branch.extend_from_slice(&tail);
        let new_blocks = branch.len() / BS as usize - shared;
        if new_blocks > 0 {
            let ev = stored(
                (0..new_blocks as u64).map(|i| 50_000 + i).collect(),
                (shared > 0).then(|| 1_000 + shared as u64 - 1),
                branch[shared * BS as usize..(shared + new_blocks) * BS as usize].to_vec(),
            );
            let Some(IndexOp::Insert(keys)) = t.apply(&ev) else {
                panic!("a branch from a known parent is inserted");
            };
            prop_assert_eq!(&keys[..], &block_keys(&branch, BS as usize, seed)[shared..]);
        }
    }
}

#[test]
fn unknown_parent_is_an_orphan_and_so_are_its_children() {
    let mut t = KeyTracker::new(BS, SEED);
    assert_eq!(t.apply(&stored(vec![2, 3], Some(1), vec![0; 8])), None);
    assert_eq!(t.apply(&stored(vec![4], Some(3), vec![0; 4])), None);
    let s = t.stats();
    assert_eq!((s.orphans, s.stored_blocks, s.live_blocks), (3, 0, 0));
    // A new chain from the root is still tracked.
    assert!(t.apply(&stored(vec![9], None, vec![1; 4])).is_some());
    assert_eq!(t.stats().stored_blocks, 1);
}

#[test]
fn block_size_mismatch_is_counted_not_inserted() {
    let mut t = KeyTracker::new(16, SEED);
    assert_eq!(t.apply(&stored(vec![1], None, vec![0; 4])), None);
    assert_eq!(t.stats().block_size_mismatches, 1);
    assert!(t.is_empty());
}

#[test]
fn malformed_token_count_is_counted() {
    let mut t = KeyTracker::new(BS, SEED);
    assert_eq!(t.apply(&stored(vec![1, 2], None, vec![0; 5])), None);
    let mut zero = KeyTracker::new(0, SEED);
    let ev = KvEvent::BlockStored {
        block_hashes: vec![1],
        parent_block_hash: None,
        token_ids: vec![],
        block_size: 0,
        medium: None,
    };
    assert_eq!(zero.apply(&ev), None);
    assert_eq!((t.stats().malformed, zero.stats().malformed), (1, 1));
}

#[test]
fn remove_maps_hashes_to_keys_and_forgets_them() {
    let tokens: Vec<u32> = (0..12).collect();
    let keys = block_keys(&tokens, BS as usize, SEED);
    let mut t = KeyTracker::new(BS, SEED);
    apply_all(&mut t, &events_for(&tokens, &[3], 10));
    assert_eq!(
        t.apply(&removed(vec![12, 77, 11])),
        Some(IndexOp::Remove(vec![keys[2], keys[1]]))
    );
    let s = t.stats();
    assert_eq!(
        (s.removed_blocks, s.unknown_removals, s.live_blocks),
        (2, 1, 1)
    );
    assert!(!t.holds_key(keys[1]) && t.holds_key(keys[0]));
    // Removing again: unknown now. A child of a removed block is an orphan.
    assert_eq!(t.apply(&removed(vec![12])), None);
    assert_eq!(t.stats().unknown_removals, 2);
    assert_eq!(t.apply(&stored(vec![13], Some(12), vec![0; 4])), None);
    assert_eq!(t.stats().orphans, 1);
}

/// Two copies of a block (same hash) and two hashes of the same tokens (vLLM's extra keys differ,
/// Tandem's key does not): a key leaves only with its last copy.
#[test]
fn a_key_is_removed_with_its_last_copy() {
    let toks = vec![5u32; 4];
    let key = block_keys(&toks, BS as usize, SEED)[0];
    let mut t = KeyTracker::new(BS, SEED);
    for hash in [1, 1, 2] {
        assert_eq!(
            t.apply(&stored(vec![hash], None, toks.clone())),
            Some(IndexOp::Insert(vec![key]))
        );
    }
    assert_eq!(t.len(), 2);
    assert_eq!(t.apply(&removed(vec![1])), None);
    assert_eq!(t.apply(&removed(vec![2])), None);
    assert!(t.holds_key(key));
    assert_eq!(t.apply(&removed(vec![1])), Some(IndexOp::Remove(vec![key])));
    assert!(t.is_empty() && !t.holds_key(key));
    assert_eq!(t.stats().removed_blocks, 3);
}

#[test]
fn clear_and_reset_forget_everything() {
    let tokens: Vec<u32> = (0..8).collect();
    let mut t = KeyTracker::new(BS, SEED);
    apply_all(&mut t, &events_for(&tokens, &[2], 10));
    assert_eq!(t.apply(&KvEvent::AllBlocksCleared), Some(IndexOp::Clear));
    assert!(t.is_empty());
    assert_eq!(t.apply(&stored(vec![12], Some(11), vec![0; 4])), None);
    apply_all(&mut t, &events_for(&tokens, &[2], 10));
    assert_eq!(t.reset(), IndexOp::Clear);
    assert_eq!(t.apply(&removed(vec![10])), None);
    let s = t.stats();
    assert_eq!((s.clears, s.orphans, s.unknown_removals), (2, 1, 1));
}

/// A batch in the map layout (newer vLLM) yields the same operations as in the array layout.
#[test]
fn map_layout_yields_the_same_ops() {
    let tokens: Vec<u32> = (0..16).collect();
    let mut events = events_for(&tokens, &[1, 3], 40);
    events.push(removed(vec![43]));
    let array = encode_batch(1.0, &events, None);

    let s = |x: &str| Value::from(x);
    let ints = |v: &[u64]| Value::Array(v.iter().map(|&x| Value::from(x)).collect());
    let as_map = |e: &KvEvent| match e {
        KvEvent::BlockStored {
            block_hashes,
            parent_block_hash,
            token_ids,
            block_size,
            ..
        } => Value::Map(vec![
            (s("type"), s("BlockStored")),
            (s("block_hashes"), ints(block_hashes)),
            (
                s("parent_block_hash"),
                parent_block_hash.map_or(Value::Nil, Value::from),
            ),
            (
                s("token_ids"),
                ints(&token_ids.iter().map(|&t| u64::from(t)).collect::<Vec<_>>()),
            ),
            (s("block_size"), Value::from(*block_size)),
            (s("medium"), s("GPU")),
        ]),
        KvEvent::BlockRemoved { block_hashes, .. } => Value::Map(vec![
            (s("type"), s("BlockRemoved")),
            (s("block_hashes"), ints(block_hashes)),
        ]),
        KvEvent::AllBlocksCleared => Value::Map(vec![(s("type"), s("AllBlocksCleared"))]),
    };
    let batch = Value::Map(vec![
        (s("ts"), Value::F64(1.0)),
        (
            s("events"),
            Value::Array(events.iter().map(as_map).collect()),
        ),
    ]);
    let mut map = Vec::new();
    rmpv::encode::write_value(&mut map, &batch).unwrap();

    let ops = |bytes: &[u8]| {
        let (_, evs, _) = decode_batch(bytes).unwrap();
        apply_all(&mut KeyTracker::new(BS, SEED), &evs)
    };
    let from_array = ops(&array);
    assert_eq!(from_array, ops(&map));
    let keys = block_keys(&tokens, BS as usize, SEED);
    assert_eq!(
        from_array,
        vec![
            IndexOp::Insert(keys[..1].to_vec()),
            IndexOp::Insert(keys[1..].to_vec()),
            IndexOp::Remove(vec![keys[3]]),
        ]
    );
}
