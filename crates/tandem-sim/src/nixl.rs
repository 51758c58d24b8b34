//! The engine's NIXL agent (`--kv-transport nixl`): real KV bytes between engine processes.
//!
//! Each engine owns one agent with a UCX backend and one registered host-memory region shaped
//! like its KV cache: one region per layer, `num_gpu_blocks` blocks each, every block a
//! scaled-down stand-in of `--nixl-block-bytes` bytes whose content follows from the block's
//! token digest ([`tandem_nixl::standin`]). A prefill engine writes a request's blocks when it
//! pins them; a decode engine READs them into its own blocks for the request, checks every byte
//! against the digests of its own prompt, and the notification attached to the READ frees the
//! prefill's blocks. The timing model is untouched: the modeled transfer is charged as with the
//! TCP stand-in; the real one is checked, and measured: `vllm:nixl_xfer_time_seconds` and
//! `vllm:nixl_post_time_seconds` report the real READ's wall-clock time (post to completion, and
//! the post call), as vLLM reports NIXL's own telemetry of its transfers, beside its real bytes in
//! `vllm:nixl_bytes_transferred`. Those are real seconds, not scaled by `--time-scale`.
//!
//! [`KvNixl`] exists in every build so the engine has one code path; without feature `nixl` it
//! is never constructed and `--kv-transport nixl` is refused at start.

use std::time::Duration;

use tandem_nixl::{Layout, ReadReport, RemoteLayout};

use crate::kv_cache::BlockDigest;

/// How KV moves between a prefill and a decode engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvTransport {
    /// The side channel's `tandem_read` carries 32-byte digests (no NIXL needed).
    #[default]
    Tcp,
    /// Real NIXL READs of registered host memory (feature `nixl`).
    Nixl,
}

impl KvTransport {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "tcp" => Some(Self::Tcp),
            "nixl" => Some(Self::Nixl),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Nixl => "nixl",
        }
    }
}

/// Why a real READ failed, split so the engine can tell a corrupt block from a failed transfer.
#[derive(Debug)]
pub enum ReadFailure {
    /// The READ did not complete (NIXL error, timeout, layout mismatch).
    Transfer(String),
    /// It completed, but block `index` of the list read is not the expected stand-in.
    Corrupt { index: usize },
}

#[cfg(feature = "nixl")]
mod imp {
    use super::*;
    use tandem_nixl::{standin, NixlThread};

    /// The engine's agent thread.
    #[derive(Clone, Debug)]
    pub struct KvNixl(NixlThread);

    impl KvNixl {
        pub async fn start(
            name: &str,
            layout: Layout,
            notifs: tokio::sync::mpsc::UnboundedSender<(String, String)>,
        ) -> Result<Self, String> {
            NixlThread::start(name, layout, Some(notifs))
                .await
                .map(KvNixl)
                .map_err(|e| e.to_string())
        }

        pub fn agent_name(&self) -> &str {
            &self.0.info().name
        }

        pub fn advert(&self) -> crate::side_channel::NixlAdvert {
            let i = self.0.info();
            crate::side_channel::NixlAdvert {
                agent_metadata: i.metadata.clone(),
                base_addrs: i.base_addrs.clone(),
                block_len: i.layout.block_len as u64,
            }
        }

        /// Writes the stand-ins of `blocks` in every layer (queued; later calls see them).
        pub fn write_blocks(&self, blocks: Vec<(u32, BlockDigest)>) {
            self.0.submit(move |a| {
                let layers = a.layout().layers;
                for (b, d) in &blocks {
                    for layer in 0..layers {
                        if let Err(e) = a.write_block(*b, layer, |out| standin::fill(d, layer, out))
                        {
                            tracing::warn!("NIXL region write: {e}");
                        }
                    }
                }
            });
        }

        /// Flips one byte of `block` (layer 0) in the registered memory: the corrupt-read fault.
        pub fn corrupt_block(&self, block: u32) {
            self.0.submit(move |a| {
                if let Err(e) = a.write_block(block, 0, |out| out[0] ^= 0xff) {
                    tracing::warn!("NIXL region write: {e}");
                }
            });
        }

        /// Returns once every write queued before it is in the region.
        pub async fn barrier(&self) {
            let _ = self.0.call(|_| ()).await;
        }

        /// `load_remote_md`; the remote agent's name.
        pub async fn load_remote(&self, md: Vec<u8>) -> Result<String, String> {
            match self.0.call(move |a| a.load_remote(&md)).await {
                Ok(r) => r.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            }
        }

        /// READs `remote_blocks` into `local_blocks` with `notif` attached, then checks each
        /// local block against the stand-in of `expected` (one digest per block).
        pub async fn read_verified(
            &self,
            remote: RemoteLayout,
            remote_blocks: Vec<u32>,
            local_blocks: Vec<u32>,
            expected: Vec<BlockDigest>,
            notif: Vec<u8>,
            timeout: Duration,
        ) -> Result<ReadReport, ReadFailure> {
            let job = move |a: &mut tandem_nixl::Agent| {
                let report = a
                    .read(
                        &remote,
                        &remote_blocks,
                        &local_blocks,
                        Some(&notif),
                        timeout,
                    )
                    .map_err(|e| ReadFailure::Transfer(e.to_string()))?;
                let layers = a.layout().layers;
                for (index, (lb, d)) in local_blocks.iter().zip(&expected).enumerate() {
                    for layer in 0..layers {
                        let got = a
                            .block(*lb, layer)
                            .map_err(|e| ReadFailure::Transfer(e.to_string()))?;
                        if standin::first_mismatch(d, layer, got).is_some() {
                            return Err(ReadFailure::Corrupt { index });
                        }
                    }
                }
                Ok(report)
            };
            match self.0.call(job).await {
                Ok(r) => r,
                Err(e) => Err(ReadFailure::Transfer(e.to_string())),
            }
        }

        /// `send_notif` to a loaded remote agent.
        pub async fn notify(&self, agent: String, msg: Vec<u8>) -> Result<(), String> {
            match self.0.call(move |a| a.notify(&agent, &msg)).await {
                Ok(r) => r.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            }
        }
    }
}

#[cfg(not(feature = "nixl"))]
mod imp {
    use super::*;

    /// Never constructed: [`KvNixl::start`] is its only constructor and fails in a build
    /// without NIXL, so no engine ever holds one and the methods below are never reached. (An
    /// uninhabited enum would say the same to the compiler, but makes every caller's code after
    /// a use of it "unreachable".)
    #[derive(Clone, Debug)]
    pub struct KvNixl(());

    const NEVER: &str = "no KvNixl exists in a build without feature `nixl`";

    impl KvNixl {
        pub async fn start(
            _name: &str,
            _layout: Layout,
            _notifs: tokio::sync::mpsc::UnboundedSender<(String, String)>,
        ) -> Result<Self, String> {
            Err(tandem_nixl::NixlFailure::Disabled.to_string())
        }

        pub fn agent_name(&self) -> &str {
            unreachable!("{NEVER}")
        }

        pub fn advert(&self) -> crate::side_channel::NixlAdvert {
            unreachable!("{NEVER}")
        }

        pub fn write_blocks(&self, _blocks: Vec<(u32, BlockDigest)>) {
            unreachable!("{NEVER}")
        }

        pub fn corrupt_block(&self, _block: u32) {
            unreachable!("{NEVER}")
        }

        pub async fn barrier(&self) {
            unreachable!("{NEVER}")
        }

        pub async fn load_remote(&self, _md: Vec<u8>) -> Result<String, String> {
            unreachable!("{NEVER}")
        }

        pub async fn read_verified(
            &self,
            _remote: RemoteLayout,
            _remote_blocks: Vec<u32>,
            _local_blocks: Vec<u32>,
            _expected: Vec<BlockDigest>,
            _notif: Vec<u8>,
            _timeout: Duration,
        ) -> Result<ReadReport, ReadFailure> {
            unreachable!("{NEVER}")
        }

        pub async fn notify(&self, _agent: String, _msg: Vec<u8>) -> Result<(), String> {
            unreachable!("{NEVER}")
        }
    }
}

pub use imp::KvNixl;
