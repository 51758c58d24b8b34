//! Mooncake FAST'25 traces: one JSON object per line,
//! `{"timestamp": ms, "input_length", "output_length", "hash_ids": [...]}`.
//!
//! `hash_ids` are remapped *prefix* hashes of 512-token blocks (identical id ⇒ identical block
//! and identical prefix), the last block partial. Each id becomes one [`Source::Block`] segment,
//! so requests sharing leading ids share leading tokens once synthesised.

use std::io::BufRead;

use serde::Deserialize;

use crate::error::{Result, WorkloadError};
use crate::trace::{PromptSpec, Request, Segment, Source, Trace};

/// Block size of the Mooncake traces' `hash_ids`.
pub const MOONCAKE_BLOCK_TOKENS: u32 = 512;

#[derive(Deserialize)]
struct Record {
    timestamp: f64,
    input_length: u32,
    output_length: u32,
    hash_ids: Vec<u64>,
}

/// Parse a Mooncake trace (pass a `&str` as `text.as_bytes()`). Blank lines are skipped.
///
/// Every record must satisfy `len(hash_ids) == ceil(input_length / 512)` — true of every
/// published Mooncake trace (perf-model §3.2) — because synthesis and the cache bounds rely on
/// one id per block; a mismatch means a different format, so it is refused rather than guessed.
///
/// # Errors
/// [`WorkloadError::Read`], [`WorkloadError::Json`] or [`WorkloadError::HashIdCount`], each
/// naming the 1-based line.
pub fn parse_mooncake(reader: impl BufRead) -> Result<Trace> {
    let mut requests = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        let line_no = i + 1;
        let line = line.map_err(|source| WorkloadError::Read {
            line: line_no,
            source,
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let rec: Record = serde_json::from_str(&line).map_err(|source| WorkloadError::Json {
            line: line_no,
            source,
        })?;
        requests.push(request(rec, line_no)?);
    }
    Ok(Trace::new(
        "mooncake",
        requests,
        Some(MOONCAKE_BLOCK_TOKENS),
    ))
}

fn request(rec: Record, line: usize) -> Result<Request> {
    let block = MOONCAKE_BLOCK_TOKENS;
    let expected = rec.input_length.div_ceil(block) as usize;
    if rec.hash_ids.len() != expected {
        return Err(WorkloadError::HashIdCount {
            line,
            input_length: rec.input_length,
            block_tokens: block,
            expected,
            found: rec.hash_ids.len(),
        });
    }
    let last = rec.hash_ids.len().saturating_sub(1);
    let segments = rec
        .hash_ids
        .iter()
        .enumerate()
        .map(|(k, &id)| Segment {
            source: Source::Block(id),
            len: if k == last {
                rec.input_length - block * (k as u32)
            } else {
                block
            },
        })
        .collect();
    Ok(Request {
        at_ms: rec.timestamp,
        input: PromptSpec { segments },
        output_tokens: rec.output_length,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_lines() {
        let text = r#"{"timestamp": 40, "input_length": 1100, "output_length": 6, "hash_ids": [0, 1, 2]}

{"timestamp": 0, "input_length": 512, "output_length": 1, "hash_ids": [0], "extra": true}
{"timestamp": 41, "input_length": 0, "output_length": 1, "hash_ids": []}
"#;
        let t = parse_mooncake(text.as_bytes()).unwrap();
        assert_eq!(t.block_tokens, Some(512));
        assert_eq!(t.requests.len(), 3);
        // Sorted by arrival.
        assert_eq!(t.requests[0].at_ms, 0.0);
        let r = &t.requests[1];
        assert_eq!(r.output_tokens, 6);
        let lens: Vec<u32> = r.input.segments.iter().map(|s| s.len).collect();
        assert_eq!(lens, [512, 512, 76]);
        assert_eq!(r.input.segments[2].source, Source::Block(2));
        assert_eq!(r.input.len(), 1100);
        assert!(t.requests[2].input.is_empty());
    }

    #[test]
    fn wrong_hash_id_count_names_the_line() {
        let text = "{\"timestamp\": 0, \"input_length\": 512, \"output_length\": 1, \"hash_ids\": [0]}\n\
                    {\"timestamp\": 1, \"input_length\": 513, \"output_length\": 1, \"hash_ids\": [0]}\n";
        let err = parse_mooncake(text.as_bytes()).unwrap_err();
        assert!(
            matches!(
                err,
                WorkloadError::HashIdCount {
                    line: 2,
                    expected: 2,
                    found: 1,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().starts_with("line 2:"), "{err}");
    }

    #[test]
    fn bad_json_names_the_line() {
        for bad in [
            "{\"timestamp\": 0, \"input_length\": 5}",
            "not json",
            "{\"timestamp\": 0, \"input_length\": -5, \"output_length\": 1, \"hash_ids\": [0]}",
        ] {
            let text = format!("\n{bad}\n");
            let err = parse_mooncake(text.as_bytes()).unwrap_err();
            assert!(matches!(err, WorkloadError::Json { line: 2, .. }), "{err}");
        }
    }

    #[test]
    fn invalid_utf8_is_a_read_error() {
        let err = parse_mooncake(&b"\xff\xfe\n"[..]).unwrap_err();
        assert!(matches!(err, WorkloadError::Read { line: 1, .. }), "{err}");
    }
}
