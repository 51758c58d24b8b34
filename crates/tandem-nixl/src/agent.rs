//! One NIXL agent with a UCX backend and one registered host-memory KV region (blocking FFI).
//!
//! Every call here is synchronous FFI into libnixl; [`crate::NixlThread`] owns an [`Agent`] on a
//! dedicated thread so none of it runs on an async runtime's workers.
//!
//! Region layout, as vLLM registers one KV region per layer: `layers` sub-regions laid end to
//! end, each `num_blocks * block_len` bytes; block `b` of layer `r` starts at
//! `base + r * num_blocks * block_len + b * block_len`. The handshake advertises one base
//! address per layer and one block length per layer (`NixlAgentMetadata.kv_caches_base_addr`,
//! `block_lens`).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use nixl_sys::{
    Agent as SysAgent, Backend, MemType, MemoryRegion, NixlDescriptor, NixlError, NotificationMap,
    OptArgs, RegistrationHandle, XferDescList, XferOp, XferStatus,
};

use crate::{Layout, NixlFailure, ReadReport, RemoteLayout};

/// The host memory behind the registered KV region. A boxed slice, so its address never moves
/// while NIXL holds it.
#[derive(Debug)]
struct HostRegion {
    data: Box<[u8]>,
}

impl MemoryRegion for HostRegion {
    // SAFETY (of the impl): returning the pointer is safe in itself; nixl-sys declares the
    // method `unsafe fn` because callers must not use it past the region's life. The region
    // outlives its registration (`Agent` drops the handle first) and every transfer (they
    // complete or are released before `Agent::read` returns).
    #[allow(unsafe_code)]
    unsafe fn as_ptr(&self) -> *const u8 {
        self.data.as_ptr()
    }

    fn size(&self) -> usize {
        self.data.len()
    }
}

impl NixlDescriptor for HostRegion {
    fn mem_type(&self) -> MemType {
        MemType::Dram
    }

    fn device_id(&self) -> u64 {
        0
    }
}

fn sys(what: &'static str) -> impl FnOnce(NixlError) -> NixlFailure {
    move |e| NixlFailure::Nixl {
        what,
        error: e.to_string(),
    }
}

/// An agent, its UCX backend and its registered region.
#[derive(Debug)]
pub struct Agent {
    // Field order is drop order: the registration (its drop deregisters) goes before the
    // agent and the region.
    _registration: RegistrationHandle,
    backend: Backend,
    agent: SysAgent,
    region: HostRegion,
    layout: Layout,
    /// Remote agents loaded: metadata to name, so loading the same metadata again (a handshake
    /// repeated after a failed transfer) is answered without NIXL.
    remotes: HashMap<Vec<u8>, String>,
    backend_params: Vec<(String, String)>,
}

impl Agent {
    /// Creates the agent `name`, its UCX backend, and registers a zeroed region of `layout`.
    pub fn new(name: &str, layout: Layout) -> Result<Self, NixlFailure> {
        crate::check_library()?;
        let bytes = layout.region_bytes()?;
        let agent = SysAgent::new(name).map_err(sys("create agent"))?;
        let (_mems, params) = agent
            .get_plugin_params("UCX")
            .map_err(sys("UCX plugin (is NIXL_PLUGIN_DIR set?)"))?;
        let backend = agent
            .create_backend("UCX", &params)
            .map_err(sys("create UCX backend"))?;
        let backend_params = agent
            .get_backend_params(&backend)
            .ok()
            .and_then(|(_, p)| {
                p.iter().ok().map(|it| {
                    it.filter_map(Result::ok)
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect()
                })
            })
            .unwrap_or_default();
        let mut data = vec![0u8; bytes].into_boxed_slice();
        // A zeroed allocation this large is mapped lazily, so the first READ into a page would
        // pay its page fault inside the timed transfer. vLLM's KV cache is allocated and zeroed
        // up front (`torch.zeros`), so touch every page now; `black_box` keeps the stores of a
        // value the allocator already wrote from being optimised away.
        for page in data.chunks_mut(4096) {
            page[0] = std::hint::black_box(0);
        }
        let region = HostRegion { data };
        let mut args = OptArgs::new().map_err(sys("opt args"))?;
        args.add_backend(&backend).map_err(sys("opt args"))?;
        let registration = agent
            .register_memory(&region, Some(&args))
            .map_err(sys("register KV region"))?;
        Ok(Agent {
            _registration: registration,
            backend,
            agent,
            region,
            layout,
            remotes: HashMap::new(),
            backend_params,
        })
    }

    pub fn name(&self) -> String {
        self.agent.name()
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// The UCX backend's parameters after initialisation (what NIXL reports about it).
    pub fn backend_params(&self) -> &[(String, String)] {
        &self.backend_params
    }

    /// This agent's metadata (`get_local_md`), for the handshake.
    pub fn local_md(&self) -> Result<Vec<u8>, NixlFailure> {
        self.agent.get_local_md().map_err(sys("get_local_md"))
    }

    /// One base address per layer region (`kv_caches_base_addr`).
    pub fn base_addrs(&self) -> Vec<u64> {
        let base = self.region.data.as_ptr() as u64;
        let stride = self.layout.layer_bytes() as u64;
        (0..u64::from(self.layout.layers))
            .map(|r| base + r * stride)
            .collect()
    }

    /// Loads a remote agent's metadata (`load_remote_md`); returns its agent name.
    pub fn load_remote(&mut self, md: &[u8]) -> Result<String, NixlFailure> {
        if let Some(name) = self.remotes.get(md) {
            return Ok(name.clone());
        }
        let name = self
            .agent
            .load_remote_md(md)
            .map_err(sys("load_remote_md"))?;
        self.remotes.insert(md.to_vec(), name.clone());
        Ok(name)
    }

    pub fn has_remote(&self, name: &str) -> bool {
        self.remotes.values().any(|n| n == name)
    }

    fn offset(&self, block: u32, layer: u32) -> Result<usize, NixlFailure> {
        let l = self.layout;
        if block >= l.num_blocks || layer >= l.layers {
            return Err(NixlFailure::OutOfRange {
                block,
                num_blocks: l.num_blocks,
            });
        }
        Ok(layer as usize * l.layer_bytes() + block as usize * l.block_len)
    }

    /// Local block `block` of layer `layer`.
    pub fn block(&self, block: u32, layer: u32) -> Result<&[u8], NixlFailure> {
        let at = self.offset(block, layer)?;
        Ok(&self.region.data[at..at + self.layout.block_len])
    }

    /// Writes local block `block` of layer `layer`: `fill` gets the block's bytes.
    pub fn write_block(
        &mut self,
        block: u32,
        layer: u32,
        fill: impl FnOnce(&mut [u8]),
    ) -> Result<(), NixlFailure> {
        let at = self.offset(block, layer)?;
        let len = self.layout.block_len;
        fill(&mut self.region.data[at..at + len]);
        Ok(())
    }

    /// NIXL READ of `remote_blocks` (every layer) into `local_blocks`, with `notif` delivered to
    /// the remote agent when the READ completes (as vLLM attaches its notification to the READ).
    pub fn read(
        &mut self,
        remote: &RemoteLayout,
        remote_blocks: &[u32],
        local_blocks: &[u32],
        notif: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<ReadReport, NixlFailure> {
        let l = self.layout;
        if remote.base_addrs.len() != l.layers as usize {
            return Err(NixlFailure::LayoutMismatch(format!(
                "remote has {} layer regions, local {}",
                remote.base_addrs.len(),
                l.layers
            )));
        }
        self.read_inner(
            remote,
            remote_blocks,
            local_blocks,
            l.layers,
            notif,
            timeout,
        )
    }

    /// A READ of the first `layers` layer regions only, without a notification (benchmarks).
    pub fn read_layers(
        &mut self,
        remote: &RemoteLayout,
        remote_blocks: &[u32],
        local_blocks: &[u32],
        layers: u32,
        timeout: Duration,
    ) -> Result<ReadReport, NixlFailure> {
        self.read_inner(remote, remote_blocks, local_blocks, layers, None, timeout)
    }

    fn read_inner(
        &mut self,
        remote: &RemoteLayout,
        remote_blocks: &[u32],
        local_blocks: &[u32],
        layers: u32,
        notif: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<ReadReport, NixlFailure> {
        let l = self.layout;
        if remote.block_len != l.block_len as u64
            || layers > l.layers
            || layers as usize > remote.base_addrs.len()
        {
            return Err(NixlFailure::LayoutMismatch(format!(
                "reading {layers} layers: remote has {} layer regions of {}-byte blocks, local {} of {}",
                remote.base_addrs.len(),
                remote.block_len,
                l.layers,
                l.block_len
            )));
        }
        if remote_blocks.len() != local_blocks.len() {
            return Err(NixlFailure::LayoutMismatch(format!(
                "{} remote blocks into {} local blocks",
                remote_blocks.len(),
                local_blocks.len()
            )));
        }
        if !self.has_remote(&remote.agent) {
            return Err(NixlFailure::UnknownRemote(remote.agent.clone()));
        }
        let mut local = XferDescList::new(MemType::Dram).map_err(sys("xfer dlist"))?;
        let mut far = XferDescList::new(MemType::Dram).map_err(sys("xfer dlist"))?;
        let base = self.region.data.as_ptr() as usize;
        for layer in 0..layers {
            for (&rb, &lb) in remote_blocks.iter().zip(local_blocks) {
                local.add_desc(base + self.offset(lb, layer)?, l.block_len, 0);
                let raddr = remote.base_addrs[layer as usize] + u64::from(rb) * remote.block_len;
                far.add_desc(raddr as usize, l.block_len, 0);
            }
        }
        let descriptors = remote_blocks.len() as u64 * u64::from(layers);
        let mut args = OptArgs::new().map_err(sys("opt args"))?;
        args.add_backend(&self.backend).map_err(sys("opt args"))?;
        if let Some(msg) = notif {
            args.set_has_notification(true).map_err(sys("opt args"))?;
            args.set_notification_message(msg)
                .map_err(sys("opt args"))?;
        }
        let created = Instant::now();
        let req = self
            .agent
            .create_xfer_req(XferOp::Read, &local, &far, &remote.agent, Some(&args))
            .map_err(sys("create READ request"))?;
        // The transfer's time runs from its post to its completion, as NIXL's own transfer
        // telemetry (`xferDuration`, which vLLM's `nixl_xfer_time_seconds` reports) counts it;
        // preparing the descriptor lists and the request comes before.
        let posted = Instant::now();
        let mut in_progress = self
            .agent
            .post_xfer_req(&req, None)
            .map_err(sys("post READ"))?;
        let post = posted.elapsed();
        let deadline = created + timeout;
        // Spin briefly (most READs here finish within microseconds), then back off so a slow
        // transfer does not hold a core.
        let mut polls = 0u32;
        while in_progress {
            match self
                .agent
                .get_xfer_status(&req)
                .map_err(sys("READ status"))?
            {
                XferStatus::Success => in_progress = false,
                XferStatus::InProgress => {
                    if Instant::now() >= deadline {
                        // Dropping the request releases it; the region it writes into is this
                        // agent's and outlives it.
                        return Err(NixlFailure::Timeout(timeout));
                    }
                    polls += 1;
                    if polls < 1024 {
                        std::thread::yield_now();
                    } else {
                        std::thread::sleep(Duration::from_micros(50));
                    }
                }
            }
        }
        Ok(ReadReport {
            bytes: descriptors * l.block_len as u64,
            descriptors,
            post,
            elapsed: posted.elapsed(),
        })
    }

    /// A notification to a loaded remote agent without a transfer (`send_notif`).
    pub fn notify(&self, remote_agent: &str, msg: &[u8]) -> Result<(), NixlFailure> {
        if !self.has_remote(remote_agent) {
            return Err(NixlFailure::UnknownRemote(remote_agent.to_string()));
        }
        self.agent
            .send_notification(remote_agent, msg, Some(&self.backend))
            .map_err(sys("send_notif"))
    }

    /// Notifications received since the last call, as (sender agent, message).
    pub fn take_notifs(&self) -> Result<Vec<(String, String)>, NixlFailure> {
        let mut map = NotificationMap::new().map_err(sys("notif map"))?;
        self.agent
            .get_notifications(&mut map, None)
            .map_err(sys("get_notifs"))?;
        let notifs = map.take_notifs().map_err(sys("take notifs"))?;
        Ok(notifs
            .into_iter()
            .flat_map(|(agent, msgs)| msgs.into_iter().map(move |m| (agent.clone(), m)))
            .collect())
    }
}
