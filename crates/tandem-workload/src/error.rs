//! The crate's one error type.
//!
//! Trace files are large and hand-edited traces are common, so every parse error names the
//! 1-based line it came from: the caller can print it as is and the user can jump to the line.

/// Why a trace could not be loaded or a workload could not be built.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    /// The reader failed (e.g. invalid UTF-8 or an IO error from the caller's reader).
    #[error("line {line}: read error: {source}")]
    Read {
        /// 1-based line number being read.
        line: usize,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A Mooncake line is not a valid JSON record.
    #[error("line {line}: invalid Mooncake record: {source}")]
    Json {
        /// 1-based line number.
        line: usize,
        /// What serde_json objected to (missing field, wrong type, ...).
        #[source]
        source: serde_json::Error,
    },
    /// A Mooncake record's `hash_ids` do not cover its `input_length` in whole blocks.
    #[error(
        "line {line}: input_length {input_length} needs {expected} hash_ids of {block_tokens} tokens, found {found}"
    )]
    HashIdCount {
        /// 1-based line number.
        line: usize,
        /// The record's `input_length`.
        input_length: u32,
        /// Block size the trace was cut with.
        block_tokens: u32,
        /// `ceil(input_length / block_tokens)`.
        expected: usize,
        /// `len(hash_ids)`.
        found: usize,
    },
    /// A CSV line is malformed (missing header, wrong column count, bad number or timestamp).
    #[error("line {line}: {reason}")]
    Csv {
        /// 1-based line number.
        line: usize,
        /// What is wrong, naming the column.
        reason: String,
    },
    /// A caller-supplied parameter is out of range.
    #[error("invalid {name}: {reason}")]
    InvalidParam {
        /// The parameter's name.
        name: &'static str,
        /// Why it is rejected.
        reason: String,
    },
}

/// Result alias for this crate.
pub type Result<T, E = WorkloadError> = std::result::Result<T, E>;

pub(crate) fn invalid(name: &'static str, reason: impl Into<String>) -> WorkloadError {
    WorkloadError::InvalidParam {
        name,
        reason: reason.into(),
    }
}
