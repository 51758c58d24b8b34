use super::*;

fn pool(n: u32) -> BlockPool {
    BlockPool::new(n, 4)
}

#[test]
fn hashes_chain_and_depend_on_parent_and_tokens() {
    let root = none_hash("0");
    assert_ne!(root, none_hash("1"));
    let a = hash_block(&root, &[1, 2, 3, 4]);
    assert_eq!(a, hash_block(&root, &[1, 2, 3, 4]));
    assert_ne!(a, hash_block(&root, &[1, 2, 3, 5]));
    assert_ne!(a, hash_block(&none_hash("1"), &[1, 2, 3, 4]));
    let chain = chain_digests(&root, &[1, 2, 3, 4, 5, 6], 4);
    assert_eq!(chain.len(), 2);
    assert_eq!(chain[0], a);
    assert_eq!(chain[1], hash_block(&a, &[5, 6]));
    assert_eq!(
        external_hash(&a),
        u64::from_be_bytes(a[24..].try_into().unwrap())
    );
}

#[test]
fn cbor_input_is_vllms_tuple_shape() {
    // sha256_cbor((parent_bytes, (1, 2), None)): CBOR array(3) [bytes(32), array(2)[1, 2], null].
    let parent = [7u8; 32];
    let mut expected = vec![0x83, 0x58, 0x20];
    expected.extend_from_slice(&parent);
    expected.extend_from_slice(&[0x82, 0x01, 0x02, 0xf6]);
    let want: BlockDigest = Sha256::digest(&expected).into();
    assert_eq!(hash_block(&parent, &[1, 2]), want);
}

#[test]
fn the_streamed_encoding_equals_ciboriums() {
    // Every CBOR integer width (1, 2, 3 and 5 bytes), array heads of 1 and 2 bytes, and enough
    // tokens to flush the stack buffer more than once.
    #[derive(Serialize)]
    struct Input<'a>(
        #[serde(with = "serde_bytes")] &'a [u8],
        &'a [u32],
        Option<()>,
    );
    let parent = none_hash("42");
    let values = [0, 1, 23, 24, 255, 256, 65_535, 65_536, 151_642, u32::MAX];
    for len in [0usize, 1, 16, 23, 24, 100, 300] {
        let tokens: Vec<u32> = (0..len).map(|i| values[i % values.len()]).collect();
        let mut doc = Vec::new();
        ciborium::into_writer(&Input(&parent, &tokens, None), &mut doc).unwrap();
        let want: BlockDigest = Sha256::digest(&doc).into();
        assert_eq!(hash_block(&parent, &tokens), want, "{len} tokens");
    }
}

#[test]
fn allocate_free_and_lru_eviction_publish_events() {
    let mut p = pool(3);
    assert_eq!(p.usage(), 0.0);
    let blocks = p.allocate(2).unwrap();
    assert!((p.usage() - 2.0 / 3.0).abs() < 1e-9);
    let root = none_hash("0");
    let d = chain_digests(&root, &[1, 2, 3, 4, 5, 6, 7, 8], 4);
    p.cache_full_blocks(&blocks, &d, None, &[1, 2, 3, 4, 5, 6, 7, 8]);
    let ev = p.take_events();
    assert_eq!(
        ev,
        vec![KvEvent::BlockStored {
            block_hashes: vec![external_hash(&d[0]), external_hash(&d[1])],
            parent_block_hash: None,
            token_ids: vec![1, 2, 3, 4, 5, 6, 7, 8],
            block_size: 4,
            medium: Some("GPU".into()),
        }]
    );
    p.free(&blocks);
    // Cached-but-free blocks count as free.
    assert_eq!(p.usage(), 0.0);
    assert_eq!(p.lookup_prefix(&d), blocks);
    // Three allocations: the never-used block first, then the cached tail before the head.
    let a = p.allocate(1).unwrap();
    assert!(!blocks.contains(&a[0]));
    assert!(p.take_events().is_empty());
    let b = p.allocate(1).unwrap();
    assert_eq!(
        b[0], blocks[1],
        "the tail of a freed sequence is evicted first"
    );
    assert_eq!(
        p.take_events(),
        vec![KvEvent::BlockRemoved {
            block_hashes: vec![external_hash(&d[1])],
            medium: Some("GPU".into()),
        }]
    );
    assert_eq!(p.lookup_prefix(&d), vec![blocks[0]]);
    assert!(p.allocate(2).is_none(), "only one block is left");
}

#[test]
fn touching_a_cached_free_block_takes_it_off_the_free_queue() {
    let mut p = pool(2);
    let blocks = p.allocate(1).unwrap();
    let d = chain_digests(&none_hash("0"), &[9, 9, 9, 9], 4);
    p.cache_full_blocks(&blocks, &d, None, &[9, 9, 9, 9]);
    p.free(&blocks);
    let hit = p.lookup_prefix(&d);
    p.touch(&hit);
    assert_eq!(p.ref_count(hit[0]), 1);
    assert_eq!(p.num_free(), 1);
    // The remaining free block can be allocated; the touched one is not evicted.
    let other = p.allocate(1).unwrap();
    assert_ne!(other, hit);
    assert!(p
        .take_events()
        .iter()
        .all(|e| !matches!(e, KvEvent::BlockRemoved { .. })));
}

#[test]
fn duplicates_do_not_publish_and_parents_chain_across_runs() {
    let mut p = pool(4);
    let root = none_hash("0");
    let toks = [1, 1, 1, 1, 2, 2, 2, 2];
    let d = chain_digests(&root, &toks, 4);
    let first = p.allocate(2).unwrap();
    p.cache_full_blocks(&first, &d, None, &toks);
    p.take_events();
    // A second sequence computed the same two blocks concurrently.
    let second = p.allocate(2).unwrap();
    p.cache_full_blocks(&second, &d, None, &toks);
    assert!(p.take_events().is_empty());
    assert!(!p.reset_prefix_cache(), "blocks in use: no reset");
    p.free(&first);
    p.free(&second);
    assert!(p.reset_prefix_cache());
    assert_eq!(p.take_events(), vec![KvEvent::AllBlocksCleared]);
    assert!(p.lookup_prefix(&d).is_empty());
}

/// A block already held ends the run of new ones and parents the next run, so every event's
/// parent is the block just before its first (both tiers publish through this).
#[test]
fn stored_runs_split_at_held_blocks_and_chain_parents() {
    let d: Vec<BlockDigest> = (0u8..5).map(|i| [i; 32]).collect();
    let h = |i: usize| external_hash(&d[i]);
    let mut events = Vec::new();
    let mut runs = StoredRuns::new(Some(&d[0]), 2, "CPU", &mut events);
    runs.stored(&d[1], &[1, 1]);
    runs.skipped(&d[2]);
    runs.stored(&d[3], &[3, 3]);
    runs.stored(&d[4], &[4, 4]);
    runs.finish();
    let event = |hashes: Vec<u64>, parent: u64, tokens: Vec<u32>| KvEvent::BlockStored {
        block_hashes: hashes,
        parent_block_hash: Some(parent),
        token_ids: tokens,
        block_size: 2,
        medium: Some("CPU".into()),
    };
    assert_eq!(
        events,
        vec![
            event(vec![h(1)], h(0), vec![1, 1]),
            event(vec![h(3), h(4)], h(2), vec![3, 3, 4, 4]),
        ]
    );
}
