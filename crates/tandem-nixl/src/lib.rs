//! `tandem-nixl`: real KV bytes over NIXL for the simulated engines and `tandem kv-probe`.
//!
//! - [`standin`] (always built, pure): the bytes a simulated KV block holds, derived from its
//!   token digest, and the checks that catch a corrupted or unwritten block.
//! - With feature `nixl`: [`Agent`], one NIXL agent with a UCX backend and one registered
//!   host-memory KV region, and [`NixlThread`], which owns an agent on a dedicated thread so that
//!   the synchronous FFI never runs on an async runtime's workers.
//!
//! The library comes from `nixl-sys` with `stub-api`: it builds without NIXL installed and
//! dlopens `libnixl_capi.so` at run time (LD_LIBRARY_PATH, plus NIXL_PLUGIN_DIR for the UCX
//! plugin; see `python/requirements-nixl.txt`). [`check_library`] reports a missing library as
//! an error before any call that would abort the process.

pub mod standin;

use std::time::Duration;

#[cfg(feature = "nixl")]
mod agent;
#[cfg(feature = "nixl")]
mod thread;

#[cfg(feature = "nixl")]
pub use agent::Agent;
#[cfg(feature = "nixl")]
pub use thread::{AgentInfo, NixlThread};

/// Whether this build can move bytes over NIXL.
pub const ENABLED: bool = cfg!(feature = "nixl");

/// Shape of a registered KV region: `layers` regions of `num_blocks` blocks of `block_len`
/// bytes (see [`Agent`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub layers: u32,
    pub num_blocks: u32,
    pub block_len: usize,
}

impl Layout {
    /// Bytes of one layer region.
    pub fn layer_bytes(&self) -> usize {
        self.num_blocks as usize * self.block_len
    }

    /// Bytes of the whole region, or an error when it does not fit in memory's address space or
    /// a block cannot hold a digest.
    pub fn region_bytes(&self) -> Result<usize, NixlFailure> {
        if self.block_len < standin::DIGEST_LEN || self.layers == 0 || self.num_blocks == 0 {
            return Err(NixlFailure::LayoutMismatch(format!(
                "a KV region needs layers, blocks, and blocks of at least {} bytes (got {self:?})",
                standin::DIGEST_LEN
            )));
        }
        (self.layers as usize)
            .checked_mul(self.layer_bytes())
            .ok_or_else(|| NixlFailure::LayoutMismatch(format!("{self:?} is too large")))
    }
}

/// Where a remote agent's KV region lies, from its handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteLayout {
    /// The agent name `load_remote_md` returned.
    pub agent: String,
    /// One base address per layer region.
    pub base_addrs: Vec<u64>,
    /// Bytes of one block in one layer region.
    pub block_len: u64,
}

/// What one READ moved.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReadReport {
    pub bytes: u64,
    pub descriptors: u64,
    /// Time of the post call (NIXL's `postDuration`).
    pub post: Duration,
    /// Wall-clock time from posting the request to seeing it complete (NIXL's
    /// `xferDuration`); creating the request comes before and is not counted.
    pub elapsed: Duration,
}

/// Failures of NIXL calls, named for the operator.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum NixlFailure {
    #[error("this build has no NIXL support (build with `--features nixl`)")]
    Disabled,
    #[error("the NIXL library libnixl_capi.so was not found (set LD_LIBRARY_PATH to the libraries of the nixl-cu12 wheel and NIXL_PLUGIN_DIR to its plugins/)")]
    LibraryMissing,
    #[error("NIXL {what} failed: {error}")]
    Nixl { what: &'static str, error: String },
    #[error("KV layout mismatch: {0}")]
    LayoutMismatch(String),
    #[error("block {block} is outside the region of {num_blocks} blocks")]
    OutOfRange { block: u32, num_blocks: u32 },
    #[error("remote NIXL agent {0} has not been loaded")]
    UnknownRemote(String),
    #[error("NIXL READ did not complete within {0:?}")]
    Timeout(Duration),
    #[error("the NIXL agent thread has stopped")]
    Stopped,
}

/// Whether `libnixl_capi.so` can be loaded; checked before the first FFI call, which would
/// abort the process without it.
pub fn check_library() -> Result<(), NixlFailure> {
    #[cfg(feature = "nixl")]
    {
        if nixl_sys::is_stub() {
            return Err(NixlFailure::LibraryMissing);
        }
        Ok(())
    }
    #[cfg(not(feature = "nixl"))]
    Err(NixlFailure::Disabled)
}
