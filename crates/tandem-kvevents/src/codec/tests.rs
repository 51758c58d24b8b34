use super::*;

fn stored(hashes: Vec<u64>, parent: Option<u64>, tokens: Vec<u32>, bs: u32) -> KvEvent {
    stored_on(Some(MEDIUM_GPU), hashes, parent, tokens, bs)
}

fn stored_on(
    medium: Option<&str>,
    hashes: Vec<u64>,
    parent: Option<u64>,
    tokens: Vec<u32>,
    bs: u32,
) -> KvEvent {
    KvEvent::BlockStored {
        block_hashes: hashes,
        parent_block_hash: parent,
        token_ids: tokens,
        block_size: bs,
        medium: medium.map(str::to_owned),
    }
}

fn removed(hashes: Vec<u64>, medium: Option<&str>) -> KvEvent {
    KvEvent::BlockRemoved {
        block_hashes: hashes,
        medium: medium.map(str::to_owned),
    }
}

fn encode(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, v).unwrap();
    out
}

#[test]
fn roundtrip() {
    let events = vec![
        stored(vec![1, u64::MAX, 1 << 40], Some(7), (0..48).collect(), 16),
        stored(vec![9], None, vec![70_000; 16], 16),
        stored_on(Some(MEDIUM_CPU), vec![9], None, vec![5; 16], 16),
        removed(vec![1, u64::MAX], Some(MEDIUM_GPU)),
        removed(vec![9], Some(MEDIUM_CPU)),
        removed(vec![2], None),
        KvEvent::AllBlocksCleared,
    ];
    for dp in [None, Some(0), Some(3)] {
        let bytes = encode_batch(1_717_000_000.25, &events, dp);
        let (ts, decoded, rank) = decode_batch(&bytes).unwrap();
        assert_eq!(ts, 1_717_000_000.25);
        assert_eq!(decoded, events);
        assert_eq!(rank, dp);
    }
}

/// Hand-computed msgpack of `[1.5, [BlockStored{hashes [7, 2^64-1], parent None, tokens [1, 300],
/// block_size 2}], None]`, i.e. what msgspec emits for the `array_like` structs.
#[test]
fn exact_bytes_of_small_block_stored_batch() {
    let bytes = encode_batch(
        1.5,
        &[stored(vec![7, u64::MAX], None, vec![1, 300], 2)],
        None,
    );
    #[rustfmt::skip]
    let expected: Vec<u8> = vec![
        0x93,                                           // fixarray(3): EventBatch
        0xcb, 0x3f, 0xf8, 0, 0, 0, 0, 0, 0,             // float64 1.5 (ts)
        0x91,                                           // fixarray(1): events
        0x9c,                                           // fixarray(12): BlockStored
        0xab, b'B', b'l', b'o', b'c', b'k', b'S', b't', b'o', b'r', b'e', b'd', // fixstr(11) tag
        0x92, 0x07, 0xcf, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, // [7, uint64 max]
        0xc0,                                           // parent_block_hash nil
        0x92, 0x01, 0xcd, 0x01, 0x2c,                   // token_ids [1, uint16 300]
        0x02,                                           // block_size 2
        0xc0,                                           // lora_id nil
        0xa3, b'G', b'P', b'U',                         // medium "GPU"
        0xc0, 0xc0, 0xc0, 0xc0, 0xc0,                   // lora_name, extra_keys, group_idx, kind, window
        0xc0,                                           // data_parallel_rank nil
    ];
    assert_eq!(bytes, expected);
}

#[test]
fn exact_bytes_of_removed_and_cleared() {
    let bytes = encode_batch(
        0.0,
        &[
            removed(vec![5], Some(MEDIUM_GPU)),
            KvEvent::AllBlocksCleared,
        ],
        Some(1),
    );
    let mut expected = vec![0x93, 0xcb, 0, 0, 0, 0, 0, 0, 0, 0, 0x92];
    expected.extend_from_slice(&[0x94, 0xac]);
    expected.extend_from_slice(b"BlockRemoved");
    expected.extend_from_slice(&[0x91, 0x05, 0xa3, b'G', b'P', b'U', 0xc0]);
    expected.extend_from_slice(&[0x91, 0xb0]);
    expected.extend_from_slice(b"AllBlocksCleared");
    expected.push(0x01);
    assert_eq!(bytes, expected);
}

#[test]
fn decodes_map_form() {
    let s = |x: &str| Value::from(x);
    let stored_map = Value::Map(vec![
        (s("type"), s("BlockStored")),
        (s("block_hashes"), Value::Array(vec![Value::from(11u64)])),
        (s("parent_block_hash"), Value::from(10u64)),
        (s("token_ids"), Value::Array(vec![Value::from(4u32); 4])),
        (s("block_size"), Value::from(4u32)),
        (s("lora_id"), Value::Nil),
        (s("medium"), s("GPU")),
        (s("group_idx"), Value::from(0u32)),
    ]);
    let removed_map = Value::Map(vec![
        (s("type"), s("BlockRemoved")),
        // Raw-digest form (VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0): last 8 bytes, big-endian.
        (
            s("block_hashes"),
            Value::Array(vec![Value::from(
                [vec![0xaa; 24], vec![0, 0, 0, 0, 0, 0, 1, 2]].concat(),
            )]),
        ),
        (s("medium"), s("GPU")),
    ]);
    let cleared_map = Value::Map(vec![(s("type"), s("AllBlocksCleared"))]);
    let unknown = Value::Map(vec![(s("type"), s("SomethingNewer"))]);
    let batch = Value::Map(vec![
        (s("ts"), Value::F64(2.0)),
        (
            s("events"),
            Value::Array(vec![stored_map, removed_map, unknown, cleared_map]),
        ),
        (s("data_parallel_rank"), Value::from(2u32)),
    ]);
    let (ts, events, dp) = decode_batch(&encode(&batch)).unwrap();
    assert_eq!(ts, 2.0);
    assert_eq!(dp, Some(2));
    assert_eq!(
        events,
        vec![
            stored(vec![11], Some(10), vec![4; 4], 4),
            removed(vec![0x0102], Some(MEDIUM_GPU)),
            KvEvent::AllBlocksCleared,
        ]
    );
}

/// vLLM v0.9: `[ts, events]` without dp rank, 5-field BlockStored, 2-field BlockRemoved; plus a
/// longer-than-known event to check that extra trailing fields are ignored.
#[test]
fn decodes_short_and_long_array_forms() {
    let hashes = Value::Array(vec![Value::from(3u64)]);
    let batch = Value::Array(vec![
        Value::F64(9.0),
        Value::Array(vec![
            Value::Array(vec![
                Value::from("BlockStored"),
                hashes.clone(),
                Value::Nil,
                Value::Array(vec![Value::from(1u32), Value::from(2u32)]),
                Value::from(2u32),
            ]),
            Value::Array(vec![Value::from("BlockRemoved"), hashes.clone()]),
            Value::Array(vec![
                Value::from("BlockRemoved"),
                hashes,
                Value::from("GPU"),
                Value::Nil,
                Value::from("a future field"),
            ]),
        ]),
    ]);
    let (ts, events, dp) = decode_batch(&encode(&batch)).unwrap();
    assert_eq!((ts, dp), (9.0, None));
    assert_eq!(
        events,
        vec![
            stored_on(None, vec![3], None, vec![1, 2], 2),
            removed(vec![3], None),
            removed(vec![3], Some(MEDIUM_GPU)),
        ]
    );
}

#[test]
fn rejects_garbage() {
    assert!(matches!(
        decode_batch(&[0x92, 0xcb]), // truncated
        Err(CodecError::Decode(_))
    ));
    assert!(matches!(
        decode_batch(&encode(&Value::from(3u32))),
        Err(CodecError::Malformed(_))
    ));
    let no_tokens = Value::Array(vec![
        Value::F64(0.0),
        Value::Array(vec![Value::Array(vec![Value::from("BlockStored")])]),
    ]);
    assert!(matches!(
        decode_batch(&encode(&no_tokens)),
        Err(CodecError::Malformed(_))
    ));
    let mut trailing = encode_batch(0.0, &[KvEvent::AllBlocksCleared], None);
    trailing.push(0xc0);
    assert!(decode_batch(&trailing).is_err());
}

/// An event in the map layout of the newer (non-`array_like`) vLLM revision, with the fields
/// vLLM writes, including ones the decoder does not keep.
fn event_map(event: &KvEvent) -> Value {
    let s = |x: &str| Value::from(x);
    let hashes = |h: &[u64]| Value::Array(h.iter().map(|&v| Value::from(v)).collect());
    match event {
        KvEvent::BlockStored {
            block_hashes,
            parent_block_hash,
            token_ids,
            block_size,
            medium,
        } => Value::Map(vec![
            (s("type"), s("BlockStored")),
            (s("block_hashes"), hashes(block_hashes)),
            (
                s("parent_block_hash"),
                parent_block_hash.map_or(Value::Nil, Value::from),
            ),
            (
                s("token_ids"),
                Value::Array(token_ids.iter().map(|&t| Value::from(t)).collect()),
            ),
            (s("block_size"), Value::from(*block_size)),
            (s("lora_id"), Value::Nil),
            (s("medium"), medium.as_deref().map_or(Value::Nil, s)),
            (s("lora_name"), Value::Nil),
        ]),
        KvEvent::BlockRemoved {
            block_hashes,
            medium,
        } => Value::Map(vec![
            (s("type"), s("BlockRemoved")),
            (s("block_hashes"), hashes(block_hashes)),
            (s("medium"), medium.as_deref().map_or(Value::Nil, s)),
        ]),
        KvEvent::AllBlocksCleared => Value::Map(vec![(s("type"), s("AllBlocksCleared"))]),
    }
}

/// The same batch in both layouts decodes to the same value.
#[test]
fn map_and_array_layouts_decode_alike() {
    let events = vec![
        stored(vec![1, 2], None, (0..8).collect(), 4),
        stored(vec![3], Some(2), vec![9; 4], 4),
        removed(vec![1, 3], Some(MEDIUM_CPU)),
        KvEvent::AllBlocksCleared,
    ];
    let array = encode_batch(5.5, &events, Some(1));
    let map = encode(&Value::Map(vec![
        (Value::from("ts"), Value::F64(5.5)),
        (
            Value::from("events"),
            Value::Array(events.iter().map(event_map).collect()),
        ),
        (Value::from("data_parallel_rank"), Value::from(1u32)),
    ]));
    assert_ne!(array, map);
    assert_eq!(decode_batch(&array).unwrap(), decode_batch(&map).unwrap());
    assert_eq!(decode_batch(&map).unwrap(), (5.5, events, Some(1)));
}
