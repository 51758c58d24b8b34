//! The KV-event wire codec (protocol spec §4.3): msgpack `KVEventBatch` payloads, pure.
//!
//! [`encode_batch`] writes msgspec's `array_like` layout, which is what vLLM emits by default;
//! [`decode_batch`] accepts that layout (shorter and longer arrays alike) and the newer map layout
//! with a `"type"` tag.

use rmpv::Value;

/// vLLM's `MEDIUM_GPU`: blocks in the engine's GPU prefix cache.
pub const MEDIUM_GPU: &str = "GPU";
/// The medium vLLM's `OffloadingConnector` names for blocks in its host-memory (CPU) tier.
pub const MEDIUM_CPU: &str = "CPU";

/// End-of-replay marker on the replay socket: `(-1).to_bytes(8, "big", signed=True)`.
pub const REPLAY_END_SEQ: [u8; 8] = (-1i64).to_be_bytes();

/// One KV-cache event, as vLLM's `BlockStored` / `BlockRemoved` / `AllBlocksCleared`.
///
/// Fields Tandem does not use (`lora_id`, `lora_name`, `extra_keys`, `group_idx`, ...) are not
/// kept: decoding ignores them and encoding writes vLLM's defaults. `medium` is kept: one engine
/// reports each tier it caches blocks in (GPU, and CPU with KV offloading) as its own stream of
/// stores and removals for the same block hashes.
#[derive(Debug, Clone, PartialEq)]
pub enum KvEvent {
    /// Newly full blocks were cached; `token_ids.len() == block_hashes.len() * block_size`.
    BlockStored {
        block_hashes: Vec<u64>,
        parent_block_hash: Option<u64>,
        token_ids: Vec<u32>,
        block_size: u32,
        /// Where the blocks are cached: [`MEDIUM_GPU`], [`MEDIUM_CPU`], another tier's name, or
        /// `None` (older vLLM, which had only the GPU).
        medium: Option<String>,
    },
    /// Cached blocks were evicted from `medium`.
    BlockRemoved {
        block_hashes: Vec<u64>,
        medium: Option<String>,
    },
    /// The prefix cache was reset.
    AllBlocksCleared,
}

/// A payload that is not a `KVEventBatch`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CodecError {
    /// The bytes are not valid msgpack.
    #[error("msgpack decode error: {0}")]
    Decode(String),
    /// Valid msgpack, but not a `KVEventBatch`.
    #[error("malformed KV event batch: {0}")]
    Malformed(String),
}

/// One decoded `KVEventBatch`.
pub type DecodedBatch = (f64, Vec<KvEvent>, Option<u32>);

fn u64_array(values: &[u64]) -> Value {
    Value::Array(values.iter().map(|&v| Value::from(v)).collect())
}

fn medium_value(medium: &Option<String>) -> Value {
    medium.as_deref().map_or(Value::Nil, Value::from)
}

fn event_value(event: &KvEvent) -> Value {
    match event {
        KvEvent::BlockStored {
            block_hashes,
            parent_block_hash,
            token_ids,
            block_size,
            medium,
        } => Value::Array(vec![
            Value::from("BlockStored"),
            u64_array(block_hashes),
            parent_block_hash.map_or(Value::Nil, Value::from),
            Value::Array(token_ids.iter().map(|&t| Value::from(t)).collect()),
            Value::from(*block_size),
            Value::Nil, // lora_id
            medium_value(medium),
            Value::Nil, // lora_name
            Value::Nil, // extra_keys
            Value::Nil, // group_idx
            Value::Nil, // kv_cache_spec_kind
            Value::Nil, // kv_cache_spec_sliding_window
        ]),
        KvEvent::BlockRemoved {
            block_hashes,
            medium,
        } => Value::Array(vec![
            Value::from("BlockRemoved"),
            u64_array(block_hashes),
            medium_value(medium),
            Value::Nil, // group_idx
        ]),
        KvEvent::AllBlocksCleared => Value::Array(vec![Value::from("AllBlocksCleared")]),
    }
}

/// Pure encoding of one batch in vLLM's `array_like` msgpack layout:
/// `[ts(float64), [events...], data_parallel_rank|nil]`; events as
/// `["BlockStored", hashes(u64 array), parent|nil, token_ids, block_size, lora_id(nil), medium|nil,
/// lora_name(nil), extra_keys(nil), group_idx(nil), kv_cache_spec_kind(nil), kv_cache_spec_sliding_window(nil)]`,
/// `["BlockRemoved", hashes, medium|nil, group_idx(nil)]`, `["AllBlocksCleared"]`.
///
/// Every field is present, `nil` when `None`: msgspec ignores `omit_defaults` for `array_like` structs
/// (msgspec issue #720). `ts` is always float64 because msgspec encodes Python floats that way;
/// integers take their most compact msgpack form, as msgspec does.
pub fn encode_batch(ts: f64, events: &[KvEvent], data_parallel_rank: Option<u32>) -> Vec<u8> {
    let batch = Value::Array(vec![
        Value::F64(ts),
        Value::Array(events.iter().map(event_value).collect()),
        data_parallel_rank.map_or(Value::Nil, Value::from),
    ]);
    let mut out = Vec::with_capacity(64);
    // Writing into a Vec cannot fail.
    rmpv::encode::write_value(&mut out, &batch).expect("msgpack encode into Vec");
    out
}

fn malformed(msg: impl Into<String>) -> CodecError {
    CodecError::Malformed(msg.into())
}

/// A block hash is a msgpack uint (default, `VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1`) or the raw digest
/// bytes; for bytes we take the last 8 bytes big-endian, which equals vLLM's `int & (2^64-1)` and
/// llm-d's `getHashAsUint64`.
fn hash_value(v: &Value) -> Result<u64, CodecError> {
    if let Some(n) = v.as_u64() {
        return Ok(n);
    }
    if let Some(n) = v.as_i64() {
        // Only negative i64 reach here; keep the two's-complement low 64 bits.
        return Ok(n as u64);
    }
    if let Some(b) = v.as_slice() {
        let tail = &b[b.len().saturating_sub(8)..];
        return Ok(tail.iter().fold(0u64, |acc, &x| (acc << 8) | u64::from(x)));
    }
    Err(malformed(format!("block hash is not an int or bytes: {v}")))
}

fn hash_list(v: Option<&Value>, field: &str) -> Result<Vec<u64>, CodecError> {
    let arr = v
        .and_then(Value::as_array)
        .ok_or_else(|| malformed(format!("{field} is missing or not an array")))?;
    arr.iter().map(hash_value).collect()
}

fn u32_field(v: Option<&Value>, field: &str) -> Result<u32, CodecError> {
    v.and_then(Value::as_u64)
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| malformed(format!("{field} is missing or not a u32")))
}

fn opt_hash(v: Option<&Value>) -> Result<Option<u64>, CodecError> {
    match v {
        None | Some(Value::Nil) => Ok(None),
        Some(h) => hash_value(h).map(Some),
    }
}

fn medium_field(v: Option<&Value>) -> Result<Option<String>, CodecError> {
    match v {
        None | Some(Value::Nil) => Ok(None),
        Some(m) => m
            .as_str()
            .map(|s| Some(s.to_owned()))
            .ok_or_else(|| malformed(format!("medium is not a string: {m}"))),
    }
}

/// Builds an event from its tag and a field lookup; `None` for tags Tandem does not know
/// (newer vLLM may add event kinds; like llm-d we skip them rather than reject the whole batch).
fn build_event<'a>(
    tag: &str,
    field: impl Fn(&str) -> Option<&'a Value>,
) -> Result<Option<KvEvent>, CodecError> {
    Ok(Some(match tag {
        "BlockStored" => {
            let token_ids = field("token_ids")
                .and_then(Value::as_array)
                .ok_or_else(|| malformed("token_ids is missing or not an array"))?
                .iter()
                .map(|t| {
                    t.as_u64()
                        .and_then(|n| u32::try_from(n).ok())
                        .ok_or_else(|| malformed(format!("token id is not a u32: {t}")))
                })
                .collect::<Result<_, _>>()?;
            KvEvent::BlockStored {
                block_hashes: hash_list(field("block_hashes"), "block_hashes")?,
                parent_block_hash: opt_hash(field("parent_block_hash"))?,
                token_ids,
                block_size: u32_field(field("block_size"), "block_size")?,
                medium: medium_field(field("medium"))?,
            }
        }
        "BlockRemoved" => KvEvent::BlockRemoved {
            block_hashes: hash_list(field("block_hashes"), "block_hashes")?,
            medium: medium_field(field("medium"))?,
        },
        "AllBlocksCleared" => KvEvent::AllBlocksCleared,
        _ => return Ok(None),
    }))
}

/// Positional field names of the array form, in msgspec declaration order (tag excluded).
fn positional_fields(tag: &str) -> &'static [&'static str] {
    match tag {
        "BlockStored" => &[
            "block_hashes",
            "parent_block_hash",
            "token_ids",
            "block_size",
            "lora_id",
            "medium",
        ],
        "BlockRemoved" => &["block_hashes", "medium"],
        _ => &[],
    }
}

fn map_get<'a>(map: &'a [(Value, Value)], key: &str) -> Option<&'a Value> {
    map.iter()
        .find(|(k, _)| k.as_str() == Some(key))
        .map(|(_, v)| v)
}

fn decode_event(v: &Value) -> Result<Option<KvEvent>, CodecError> {
    match v {
        Value::Array(items) => {
            let tag = items
                .first()
                .and_then(Value::as_str)
                .ok_or_else(|| malformed("event array does not start with a string tag"))?;
            let names = positional_fields(tag);
            // Length guards: a missing trailing field reads as absent (older vLLM), extra trailing
            // fields (newer vLLM) are never looked at.
            build_event(tag, |name| {
                let pos = names.iter().position(|n| *n == name)?;
                items.get(pos + 1)
            })
        }
        Value::Map(map) => {
            let tag = map_get(map, "type")
                .and_then(Value::as_str)
                .ok_or_else(|| malformed("event map has no string \"type\" tag"))?;
            build_event(tag, |name| map_get(map, name))
        }
        other => Err(malformed(format!(
            "event is neither array nor map: {other}"
        ))),
    }
}

fn decode_ts(v: Option<&Value>) -> Result<f64, CodecError> {
    match v {
        Some(Value::F64(f)) => Ok(*f),
        Some(Value::F32(f)) => Ok(f64::from(*f)),
        // Lenient: a producer may encode an integral timestamp as an int.
        Some(Value::Integer(i)) => i.as_f64().ok_or_else(|| malformed("ts out of range")),
        _ => Err(malformed("ts is missing or not a number")),
    }
}

fn decode_dp_rank(v: Option<&Value>) -> Result<Option<u32>, CodecError> {
    match v {
        None | Some(Value::Nil) => Ok(None),
        Some(r) => r
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| malformed("data_parallel_rank is not a u32")),
    }
}

/// Decodes one `KVEventBatch` payload into `(ts, events, data_parallel_rank)`.
///
/// Accepts the `array_like` form `[ts, events, dp_rank?]` (the third element is absent in older
/// vLLM), events as tagged arrays of any length (positional with length guards) or as maps with a
/// `"type"` tag (the newer non-`array_like` revision), and the batch itself as a map
/// `{"ts", "events", "data_parallel_rank"}`. Unknown event tags are skipped.
pub fn decode_batch(bytes: &[u8]) -> Result<DecodedBatch, CodecError> {
    let mut rd = bytes;
    let value = rmpv::decode::read_value(&mut rd).map_err(|e| CodecError::Decode(e.to_string()))?;
    if !rd.is_empty() {
        return Err(malformed(format!("{} trailing bytes", rd.len())));
    }
    let (ts, events, dp) = match &value {
        Value::Array(items) => (items.first(), items.get(1), items.get(2)),
        Value::Map(map) => (
            map_get(map, "ts"),
            map_get(map, "events"),
            map_get(map, "data_parallel_rank"),
        ),
        other => {
            return Err(malformed(format!(
                "batch is neither array nor map: {other}"
            )))
        }
    };
    let ts = decode_ts(ts)?;
    let events = events
        .and_then(Value::as_array)
        .ok_or_else(|| malformed("events is missing or not an array"))?
        .iter()
        .filter_map(|e| decode_event(e).transpose())
        .collect::<Result<Vec<_>, _>>()?;
    Ok((ts, events, decode_dp_rank(dp)?))
}

#[cfg(test)]
mod tests;
