//! Prefill side of a handoff on the engine task: pinned requests' leases, the side channel's
//! reads of expired leases and its notifications, and unpinning (with NIXL, putting back blocks
//! a fault damaged).

use super::*;

impl Engine {
    pub(super) fn expire_leases(&mut self) {
        let now = self.clock.now();
        let expired: Vec<String> = self
            .pinned
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for id in expired {
            let p = self.pinned.remove(&id).expect("listed above");
            self.unpin_reads(&id);
            self.sched.release_pinned(p.seq);
            self.metrics.nixl_expired(1);
            tracing::warn!(
                request_id = %id,
                "Releasing expired KV blocks for request {id} which were retrieved by 0 decode worker(s) within {} seconds.",
                self.cfg.abort_timeout.as_secs()
            );
        }
    }

    /// Forgets a request's pinned contents. With NIXL, blocks a corrupt-read fault damaged for it
    /// are written whole again.
    fn unpin_reads(&mut self, id: &str) {
        let blocks = self.reads.unpin(id);
        if let Some(n) = &self.cfg.nixl {
            if !blocks.is_empty() {
                n.write_blocks(blocks);
            }
        }
    }

    pub(super) fn side(&mut self, req: SideRequest) {
        match req {
            SideRequest::Read {
                remote_request_id,
                block_ids,
                reply,
                ..
            } => {
                // Reads of pinned requests never get here (see `reads`); this one's lease ended.
                if !self.pinned.contains_key(&remote_request_id) {
                    // Real NIXL reads whatever the blocks hold now; the decode side's check
                    // catches recycled content. vLLM logs the same worry on the notification.
                    tracing::warn!(
                        "KV read for unrecognized request {remote_request_id}; blocks may have expired"
                    );
                }
                let mut blocks = Vec::with_capacity(block_ids.len());
                for &b in &block_ids {
                    if b >= self.sched.num_blocks() {
                        let _ = reply.send(Err(format!("block id {b} out of range")));
                        return;
                    }
                    let bytes = self.sched.block_content(b).unwrap_or([0; 32]);
                    blocks.push(bytes.to_vec());
                }
                let _ = reply.send(Ok(blocks));
            }
            SideRequest::Notify {
                remote_request_id,
                world_size: _,
                reply,
            } => {
                match self.pinned.remove(&remote_request_id) {
                    Some(p) => {
                        self.unpin_reads(&remote_request_id);
                        self.sched.release_pinned(p.seq);
                        self.publish_gauges();
                    }
                    None => tracing::warn!(
                        "Potentially invalid KV blocks for unrecognized request {remote_request_id} were retrieved by a decode worker. They may have expired."
                    ),
                }
                let _ = reply.send(Ok(()));
            }
        }
    }
}
