//! Prefill side of the simulated RDMA READ, served beside the engine task rather than by it.
//!
//! vLLM's NIXL READs are one-sided: the decode engine's NIC reads the prefill GPU's pinned blocks
//! while the prefill engine goes on computing, and no scheduler step of the prefill engine stands
//! in the way. So reads of pinned requests are answered here, from a copy of the pinned blocks'
//! contents that the engine task writes when it pins a request and removes when it releases it
//! (it stays the only writer). Only a read for a request the engine no longer pins (its lease
//! expired) goes to the engine task, which answers with whatever those blocks hold now, as real
//! NIXL would. Every answer leaves through this engine's NIC ([`LinkHandle`]) and passes the
//! read faults once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};

use super::link::LinkHandle;
use super::Command;
use crate::faults::Faults;
use crate::nixl::KvNixl;
use crate::side_channel::SideRequest;

type Content = [u8; 32];
/// One pinned request's blocks: block id to content.
type Blocks = Arc<HashMap<u32, Content>>;
/// Blocks a fault damaged in the NIXL region, by request id: (block id, content to restore).
type Damaged = HashMap<String, Vec<(u32, Content)>>;

/// The contents of pinned blocks by request id; written only by the engine task. With NIXL,
/// also the blocks a corrupt-read fault damaged in the registered region, by request id, with
/// the content to put back when that request is unpinned.
#[derive(Clone, Debug, Default)]
pub(super) struct PinnedReads {
    inner: Arc<Mutex<HashMap<String, Blocks>>>,
    damaged: Arc<Mutex<Damaged>>,
}

impl PinnedReads {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Blocks>> {
        // Each operation is one insert, remove or lookup, so a panicked holder left it whole.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn pin(&self, id: &str, blocks: HashMap<u32, Content>) {
        self.lock().insert(id.to_string(), Arc::new(blocks));
    }

    /// Forgets `id`'s blocks; returns those a fault damaged in the NIXL region (block id,
    /// the content to write back).
    pub(super) fn unpin(&self, id: &str) -> Vec<(u32, Content)> {
        self.lock().remove(id);
        let mut damaged = self.damaged.lock().unwrap_or_else(|e| e.into_inner());
        damaged.remove(id).unwrap_or_default()
    }

    /// Notes that `block` of `id` is about to be damaged, if `id` pins it (else there is no
    /// known content to restore; an unpinned block is rewritten when next pinned anyway).
    fn damage(&self, id: &str, block: u32) {
        let content = self.lock().get(id).and_then(|b| b.get(&block).copied());
        if let Some(c) = content {
            let mut damaged = self.damaged.lock().unwrap_or_else(|e| e.into_inner());
            damaged.entry(id.to_string()).or_default().push((block, c));
        }
    }

    /// The contents of `block_ids` if all of them are pinned for `id`.
    fn read(&self, id: &str, block_ids: &[u32]) -> Option<Vec<Vec<u8>>> {
        let blocks = self.lock().get(id).cloned()?;
        block_ids
            .iter()
            .map(|b| blocks.get(b).map(|c| c.to_vec()))
            .collect()
    }
}

/// What the side-request task needs besides the engine's command channel.
#[derive(Clone, Debug)]
pub(super) struct ReadServing {
    pub reads: PinnedReads,
    pub faults: Faults,
    pub link: LinkHandle,
    /// Modeled KV bytes of one block (what the NIC moves per block id read).
    pub block_bytes: u64,
    /// The engine's NIXL agent, when KV moves over NIXL (`--kv-transport nixl`).
    pub nixl: Option<KvNixl>,
}

/// Serve side-channel requests: reads here (module docs), notifications by the engine task.
pub(super) fn serve(
    s: ReadServing,
    mut rx: mpsc::Receiver<SideRequest>,
    cmd: mpsc::UnboundedSender<Command>,
) {
    tokio::spawn(async move {
        while let Some(r) = rx.recv().await {
            let SideRequest::Read {
                remote_request_id,
                block_ids,
                grant,
                reply,
            } = r
            else {
                if cmd.send(Command::Side(r)).is_err() {
                    break;
                }
                continue;
            };
            if s.faults.take_kv_refuse() {
                let _ = reply.send(Err("KV read refused (fault injection)".to_string()));
                continue;
            }
            let corrupt = s.faults.take_kv_corrupt();
            let bytes = block_ids.len() as u64 * s.block_bytes;
            if grant {
                grant_read(&s, &remote_request_id, block_ids, corrupt, bytes, reply);
                continue;
            }
            let answer = match s.reads.read(&remote_request_id, &block_ids) {
                Some(blocks) => Answer::Now(Ok(blocks)),
                None => {
                    let (tx, rx) = oneshot::channel();
                    let fwd = SideRequest::Read {
                        remote_request_id,
                        block_ids,
                        grant: false,
                        reply: tx,
                    };
                    if cmd.send(Command::Side(fwd)).is_err() {
                        break;
                    }
                    Answer::Engine(rx)
                }
            };
            let link = s.link.clone();
            tokio::spawn(async move {
                let mut result = match answer {
                    Answer::Now(r) => r,
                    Answer::Engine(rx) => rx
                        .await
                        .unwrap_or_else(|_| Err("engine dropped the request".to_string())),
                };
                if let Ok(blocks) = &mut result {
                    if corrupt {
                        if let Some(b) = blocks.first_mut().and_then(|b| b.first_mut()) {
                            *b ^= 0xff;
                        }
                    }
                    link.transfer(bytes).await;
                }
                let _ = reply.send(result);
            });
        }
    });
}

/// A grant before a real NIXL READ: the blocks are already in the registered region (written
/// when the request was pinned; the barrier waits for that write), so the answer only carries
/// the faults and this NIC's modeled time. The corrupt fault flips a byte in the registered
/// memory itself, so the decode side's NIXL READ brings real bad bytes; the block is written
/// whole again when the request is unpinned.
fn grant_read(
    s: &ReadServing,
    id: &str,
    block_ids: Vec<u32>,
    corrupt: bool,
    bytes: u64,
    reply: oneshot::Sender<Result<Vec<Vec<u8>>, String>>,
) {
    let Some(nixl) = s.nixl.clone() else {
        let e = "this engine moves KV over tcp, not NIXL (start it with --kv-transport nixl)";
        let _ = reply.send(Err(e.to_string()));
        return;
    };
    let link = s.link.clone();
    if corrupt {
        if let Some(&b) = block_ids.first() {
            s.reads.damage(id, b);
            nixl.corrupt_block(b);
        }
    }
    tokio::spawn(async move {
        nixl.barrier().await;
        link.transfer(bytes).await;
        let _ = reply.send(Ok(Vec::new()));
    });
}

enum Answer {
    Now(Result<Vec<Vec<u8>>, String>),
    Engine(oneshot::Receiver<Result<Vec<Vec<u8>>, String>>),
}
