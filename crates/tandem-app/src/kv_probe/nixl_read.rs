//! kv-probe as a NIXL agent (feature `nixl`): READ the prefill engine's blocks into host memory,
//! time it, check the bytes where they are a simulator's stand-ins, and notify; and the READ
//! bandwidth benchmark (`--bench-sizes`).

use std::time::Duration;

use tandem_nixl::{standin, Layout, NixlThread, RemoteLayout};
use tandem_sim::side_channel::RemoteAgent;

/// What the READ found in the blocks.
#[derive(Debug, PartialEq, Eq)]
pub enum Bytes {
    /// Every layer of every block is a whole `tandem sim` stand-in.
    Verified,
    /// None is: a real engine's KV tensors, which cannot be checked from outside.
    Opaque,
    /// Some blocks are stand-ins and block `index` is not: corrupted on the way or in place.
    Corrupt { index: usize },
    /// Everything read as zeros: the blocks were never written (or were recycled).
    Zeros,
}

#[derive(Debug)]
pub struct ReadOutcome {
    pub bytes: u64,
    pub elapsed: Duration,
    pub check: Bytes,
}

impl ReadOutcome {
    pub fn failed(&self) -> bool {
        matches!(self.check, Bytes::Corrupt { .. } | Bytes::Zeros)
    }

    pub fn describe(&self) -> (&'static str, String) {
        let rate = self.bytes as f64 / self.elapsed.as_secs_f64().max(1e-9) / 1e9;
        let moved = format!(
            "{} bytes in {:.2} ms ({rate:.2} GB/s)",
            self.bytes,
            self.elapsed.as_secs_f64() * 1e3
        );
        let detail = match self.check {
            Bytes::Verified => format!("{moved}; every byte matches the prefill's stand-ins"),
            Bytes::Opaque => format!("{moved}; the content is real KV and was not checked"),
            Bytes::Corrupt { index } => format!("{moved}; block {index} is corrupt while others are intact"),
            Bytes::Zeros => format!("{moved}; every block read as zeros: the prefill engine's blocks were not written or were recycled before the read"),
        };
        ("NIXL READ", detail)
    }
}

/// The UCX transport, as far as this process can tell: NIXL reports the backend (UCX) but not
/// the transport UCX picked per peer among those `UCX_TLS` allows. Same-host reads go through
/// shared memory (UCX picks `cma` for host-memory GETs, as `UCX_PROTO_INFO=y` shows); across
/// nodes RDMA (rc/dc/ud) where a device offers it, else TCP.
pub fn transport(side_host: &str) -> String {
    let local = matches!(side_host, "localhost" | "127.0.0.1" | "::1");
    let tls = std::env::var("UCX_TLS").ok();
    let only_tcp = tls
        .as_deref()
        .is_some_and(|t| t.split(',').all(|x| x.trim() == "tcp"));
    let allowed = tls
        .as_deref()
        .map_or("UCX_TLS unset: all".to_string(), |t| format!("UCX_TLS={t}"));
    if only_tcp {
        return format!("UCX over TCP only ({allowed}): no RDMA or shared memory");
    }
    if local {
        format!(
            "UCX, same host: shared memory (cma) ({allowed}; UCX_PROTO_INFO=y prints UCX's choice)"
        )
    } else {
        format!("UCX across hosts: RDMA (rc/dc/ud) if the nodes have it, else TCP ({allowed}; UCX_PROTO_INFO=y prints UCX's choice)")
    }
}

fn remote_layout(agent: &RemoteAgent, name: String) -> Result<RemoteLayout, String> {
    let block_len = *agent
        .block_lens
        .first()
        .ok_or("the handshake lists no block_lens")?;
    if agent.block_lens.iter().any(|&l| l != block_len) {
        return Err(format!("uneven block_lens {:?}", agent.block_lens));
    }
    Ok(RemoteLayout {
        agent: name,
        base_addrs: agent.kv_caches_base_addr.clone(),
        block_len,
    })
}

async fn agent_for(
    agent: &RemoteAgent,
    layers: u32,
    blocks: u32,
) -> Result<(NixlThread, RemoteLayout), String> {
    let block_len =
        usize::try_from(*agent.block_lens.first().unwrap_or(&0)).map_err(|e| e.to_string())?;
    let name = format!("tandem-kv-probe-{}", std::process::id());
    let me = NixlThread::start(
        &name,
        Layout {
            layers,
            num_blocks: blocks.max(1),
            block_len,
        },
        None,
    )
    .await
    .map_err(|e| e.to_string())?;
    let md = agent.agent_metadata.clone();
    let remote = me
        .call(move |a| a.load_remote(&md))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("cannot load the prefill engine's agent metadata: {e} (is it a NIXL agent of a compatible NIXL version?)"))?;
    Ok((me, remote_layout(agent, remote)?))
}

/// READ `blocks` of the prefill engine into a fresh agent's region, notifying
/// `"{remote_request_id}:1"` with it so the prefill engine frees them.
pub async fn read_probe(
    agent: &RemoteAgent,
    blocks: &[u32],
    remote_request_id: &str,
    timeout: Duration,
) -> Result<ReadOutcome, String> {
    let layers = u32::try_from(agent.kv_caches_base_addr.len()).map_err(|e| e.to_string())?;
    let n = u32::try_from(blocks.len()).map_err(|e| e.to_string())?;
    let (me, remote) = agent_for(agent, layers, n).await?;
    let remote_blocks = blocks.to_vec();
    let local: Vec<u32> = (0..n).collect();
    let notif = format!("{remote_request_id}:1").into_bytes();
    me.call(move |a| {
        let report = a
            .read(&remote, &remote_blocks, &local, Some(&notif), timeout)
            .map_err(|e| e.to_string())?;
        let mut whole = 0usize;
        let mut zeros = 0usize;
        let mut first_bad = None;
        for (index, &lb) in local.iter().enumerate() {
            let mut ok = true;
            let mut zero = true;
            for layer in 0..layers {
                let got = a.block(lb, layer).map_err(|e| e.to_string())?;
                zero &= got.iter().all(|&b| b == 0);
                ok &= standin::recover(layer, got).is_ok();
            }
            whole += usize::from(ok);
            zeros += usize::from(zero);
            if !ok && first_bad.is_none() {
                first_bad = Some(index);
            }
        }
        let check = match first_bad {
            None => Bytes::Verified,
            Some(_) if zeros == local.len() => Bytes::Zeros,
            Some(index) if whole > 0 => Bytes::Corrupt { index },
            Some(_) => Bytes::Opaque,
        };
        Ok(ReadOutcome {
            bytes: report.bytes,
            elapsed: report.elapsed,
            check,
        })
    })
    .await
    .map_err(|e| e.to_string())?
}

/// READ bandwidth for each size in MiB: `size` descriptors of one block of one layer each,
/// spread as `min(size, 16)` layers × the rest in blocks, `iters` times. Lines of a table.
pub async fn bench(
    agent: &RemoteAgent,
    sizes: &[u64],
    iters: u32,
    timeout: Duration,
) -> Result<Vec<String>, String> {
    let block_len = *agent.block_lens.first().unwrap_or(&0);
    let regions = agent.kv_caches_base_addr.len() as u64;
    let plan = |mib: u64| -> Result<(u32, u32), String> {
        let descs = (mib << 20).div_ceil(block_len.max(1));
        let layers = descs.min(16).min(regions).max(1);
        let blocks = descs.div_ceil(layers);
        if blocks > u64::from(agent.num_blocks) {
            return Err(format!("{mib} MiB needs {blocks} blocks of {block_len} bytes in {layers} layers; the prefill engine has {} (start it with larger --nixl-block-bytes)", agent.num_blocks));
        }
        Ok((layers as u32, blocks as u32))
    };
    let plans = sizes
        .iter()
        .map(|&s| plan(s).map(|p| (s, p)))
        .collect::<Result<Vec<_>, _>>()?;
    let max_layers = plans.iter().map(|(_, (l, _))| *l).max().unwrap_or(1);
    let max_blocks = plans.iter().map(|(_, (_, b))| *b).max().unwrap_or(1);
    let (me, remote) = agent_for(agent, max_layers, max_blocks).await?;
    let mut lines = vec![format!(
        "size_mib bytes best_gbps median_gbps ({iters} READs each, {block_len}-byte descriptors)"
    )];
    for (mib, (layers, blocks)) in plans {
        let mut r = remote.clone();
        r.base_addrs.truncate(layers as usize);
        let ids: Vec<u32> = (0..blocks).collect();
        let (bytes, mut rates) = me
            .call(move |a| {
                let mut rates = Vec::new();
                let mut bytes = 0;
                for _ in 0..iters.max(1) {
                    let rep = a
                        .read_layers(&r, &ids, &ids, layers, timeout)
                        .map_err(|e| e.to_string())?;
                    bytes = rep.bytes;
                    rates.push(rep.bytes as f64 / rep.elapsed.as_secs_f64().max(1e-9) / 1e9);
                }
                Ok::<_, String>((bytes, rates))
            })
            .await
            .map_err(|e| e.to_string())??;
        rates.sort_by(f64::total_cmp);
        let best = rates.last().copied().unwrap_or(0.0);
        let median = rates[rates.len() / 2];
        lines.push(format!("{mib} {bytes} {best:.2} {median:.2}"));
    }
    Ok(lines)
}
