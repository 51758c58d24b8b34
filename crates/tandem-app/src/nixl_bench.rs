//! `tandem bench nixl`: NIXL READ bandwidth between two `tandem sim` processes, over the real P/D
//! path they serve.
//!
//! The bench starts a prefill and a decode sim (`--kv-transport nixl`, each its own process with
//! its own NIXL agent and UCX backend over host memory) and, for each transfer size, runs the
//! handoff a P/D proxy runs: a prefill leg with `do_remote_decode` on the prefill sim, then the
//! decode leg with the returned `kv_transfer_params` on the decode sim, whose agent READs the
//! prompt's blocks out of the prefill's registered region (and frees them by the notification
//! attached to the READ). The decode sim times the real READ itself, wall clock from post to
//! completion, and reports it as vLLM reports NIXL's telemetry: `vllm:nixl_xfer_time_seconds`
//! beside `vllm:nixl_bytes_transferred`. The bench reads both from the decode sim's metrics
//! around each handoff, so what it reports is what the engine measured, and it checks that each
//! handoff was exactly one READ of exactly the size asked.
//!
//! Layout: llama-3.1-8b (32 layers, 8 KV heads × 128 × bf16, so K and V of one token in one layer
//! are 4096 bytes), `--block-size` tokens per block (8 by default), and `--nixl-block-bytes` set
//! to one full-size block of one layer (8 × 4096 = 32 KiB), so the real bytes equal the modeled
//! KV bytes and one block of all layers is 1 MiB. A size of S MiB is a prompt of S blocks: S × 8
//! tokens, READ as S × 32 descriptors of 32 KiB (one per block and layer, as vLLM describes its
//! per-layer regions).

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::harness::{pct, BoxError};
use crate::kv_probe::metric;

const MODEL: &str = "llama-3.1-8b";

#[derive(Debug, Args)]
pub struct NixlArgs {
    /// Transfer sizes in MiB (each a whole number of blocks of all layers).
    #[arg(long, value_delimiter = ',', default_values_t = [1u64, 4, 16, 64, 256])]
    sizes: Vec<u64>,
    /// Measured handoffs per size, after one warm-up handoff that is not counted.
    #[arg(long, default_value_t = 10)]
    iterations: usize,
    /// Tokens per KV block on both sims; a block of one layer is this many tokens' K and V.
    #[arg(long, default_value_t = 8)]
    block_size: u32,
    /// Seconds each leg, the side-channel calls and the READ may take.
    #[arg(long, default_value_t = 60.0)]
    timeout: f64,
    /// Write the figures as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// How one size is laid out on the sims.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Plan {
    mib: u64,
    bytes: u64,
    blocks: u64,
    prompt_tokens: u64,
    descriptors: u64,
}

/// The sims' KV geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Geometry {
    layers: u64,
    block_size: u64,
    /// `--nixl-block-bytes`: one full-size block of one layer.
    block_bytes: u64,
}

impl Geometry {
    fn new(block_size: u32) -> Result<Self, String> {
        let spec = tandem_sim::profile::ModelSpec::lookup(MODEL)
            .ok_or_else(|| format!("no model profile {MODEL}"))?;
        let layers = u64::from(spec.num_layers);
        let block_size = u64::from(block_size);
        if block_size == 0 {
            return Err("--block-size must be positive".into());
        }
        Ok(Geometry {
            layers,
            block_size,
            block_bytes: block_size * (spec.kv_bytes_per_token() / layers),
        })
    }

    fn plan(&self, mib: u64) -> Result<Plan, String> {
        let bytes = mib << 20;
        let per_block = self.block_bytes * self.layers;
        if mib == 0 || !bytes.is_multiple_of(per_block) {
            return Err(format!(
                "{mib} MiB is not a whole number of blocks of {per_block} bytes ({} layers × {} bytes; pick sizes that are, or another --block-size)",
                self.layers, self.block_bytes
            ));
        }
        let blocks = bytes / per_block;
        Ok(Plan {
            mib,
            bytes,
            blocks,
            prompt_tokens: blocks * self.block_size,
            descriptors: blocks * self.layers,
        })
    }
}

/// The prompt of handoff `k`, as token ids: its first two tokens spell `k`, so no two handoffs
/// share a first block and nothing can come from a prefix cache instead of the READ.
fn prompt(k: usize, tokens: u64) -> Vec<u32> {
    // Printable byte ids: the simulator's byte-level tokenizer has no special meaning for them.
    let id = |x: usize| 32 + (x % 95) as u32;
    (0..tokens as usize)
        .map(|i| match i {
            0 => id(k / 95),
            1 => id(k),
            i => id(i * 7 + 3),
        })
        .collect()
}

/// One handoff's figures, from the decode sim's metrics.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Moved {
    bytes: f64,
    descriptors: f64,
    xfer_s: f64,
    post_s: f64,
}

/// The NIXL transfer counters of a metrics scrape.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
struct Counters {
    transfers: f64,
    failed: f64,
    bytes: f64,
    descriptors: f64,
    xfer_s: f64,
    post_s: f64,
}

impl Counters {
    fn parse(text: &str) -> Self {
        Counters {
            transfers: metric(text, "vllm:nixl_xfer_time_seconds_count"),
            failed: metric(text, "vllm:nixl_num_failed_transfers_total"),
            bytes: metric(text, "vllm:nixl_bytes_transferred_sum"),
            descriptors: metric(text, "vllm:nixl_num_descriptors_sum"),
            xfer_s: metric(text, "vllm:nixl_xfer_time_seconds_sum"),
            post_s: metric(text, "vllm:nixl_post_time_seconds_sum"),
        }
    }

    /// What one handoff between `self` and `after` moved; an error unless it was exactly one
    /// successful transfer.
    fn one_read(&self, after: &Counters) -> Result<Moved, String> {
        let n = after.transfers - self.transfers;
        let failed = after.failed - self.failed;
        if n != 1.0 || failed != 0.0 {
            return Err(format!(
                "the decode sim counted {n} transfers and {failed} failed ones for one handoff (did it recompute instead of pulling?)"
            ));
        }
        Ok(Moved {
            bytes: after.bytes - self.bytes,
            descriptors: after.descriptors - self.descriptors,
            xfer_s: after.xfer_s - self.xfer_s,
            post_s: after.post_s - self.post_s,
        })
    }
}

/// A `tandem sim` child, killed on drop, with every line it printed but its ready line (its
/// stderr, where UCX's protocol tables go, included).
struct SimProc {
    _child: Child,
    url: String,
    model: String,
    output: Arc<Mutex<Vec<String>>>,
}

/// Starts `tandem sim` with `args`; lines before the JSON ready line (a library's chatter) are
/// kept with the rest of its output.
async fn start_sim(args: &[String], env: &[(&str, &str)]) -> Result<SimProc, BoxError> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(["sim", "--port", "0"])
        .args(args)
        .envs(env.iter().copied())
        .env("RUST_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn()?;
    let output = Arc::new(Mutex::new(Vec::new()));
    let mut out = BufReader::new(child.stdout.take().ok_or("no stdout")?).lines();
    let err = BufReader::new(child.stderr.take().ok_or("no stderr")?).lines();
    let keep = output.clone();
    tokio::spawn(async move {
        let mut err = err;
        while let Ok(Some(l)) = err.next_line().await {
            keep.lock().expect("output lock").push(l);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let ready = loop {
        let Ok(line) = tokio::time::timeout_at(deadline.into(), out.next_line()).await else {
            let said = output.lock().expect("output lock").join("\n");
            return Err(format!("tandem sim printed no ready line within 60 s:\n{said}").into());
        };
        let line = line?;
        let Some(line) = line else {
            let said = output.lock().expect("output lock").join("\n");
            return Err(format!("tandem sim exited before its ready line:\n{said}").into());
        };
        // A C library writing to the same stdout through its own buffer can put its text in
        // front of the ready line on the same line.
        let at = line.find("{\"ready\"").unwrap_or(0);
        match serde_json::from_str::<Value>(&line[at..]) {
            Ok(v) if v["ready"] == "tandem-sim" => break v,
            _ => output.lock().expect("output lock").push(line),
        }
    };
    if ready["kv_transport"] != "nixl" {
        return Err(format!("tandem sim did not start with NIXL: {ready}").into());
    }
    let keep = output.clone();
    tokio::spawn(async move {
        while let Ok(Some(l)) = out.next_line().await {
            keep.lock().expect("output lock").push(l);
        }
    });
    Ok(SimProc {
        _child: child,
        url: ready["http"].as_str().ok_or("no http address")?.to_string(),
        model: ready["model"].as_str().unwrap_or(MODEL).to_string(),
        output,
    })
}

/// The transports UCX's protocol selection names for remote-memory reads (`UCX_PROTO_INFO=y`
/// tables: a heading row `| <context> intra-node cfg#1 | remote memory read by ucp_get* from
/// host memory |`, then rows `| 0..inf | zero-copy | cma/memory |` whose last cell is
/// `transport/device`, or a split such as `66% on cma/memory and 34% on rc_mlx5/mlx5_0:1`); empty
/// when UCX printed none.
fn ucx_transports(lines: &[String]) -> Vec<String> {
    let mut found: Vec<String> = Vec::new();
    let mut in_get = false;
    for l in lines {
        let cells: Vec<&str> = l.split('|').map(str::trim).collect();
        if cells.len() < 3 {
            continue; // a border or another line
        }
        if let Some(op) = cells.iter().find(|c| c.contains(" by ucp_")) {
            in_get = op.contains("ucp_get");
            continue;
        }
        if !in_get {
            continue;
        }
        let last = cells.iter().rev().find(|c| !c.is_empty()).unwrap_or(&"");
        for tl in last.split_whitespace().filter_map(|w| w.split_once('/')) {
            let tl = tl.0;
            if !tl.is_empty()
                && tl.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !found.iter().any(|f| f == tl)
            {
                found.push(tl.to_string());
            }
        }
    }
    found
}

async fn post(
    http: &reqwest::Client,
    url: &str,
    body: &Value,
    id: &str,
) -> Result<Value, BoxError> {
    let resp = http
        .post(format!("{url}/v1/completions"))
        .header("X-Request-Id", id)
        .json(body)
        .send()
        .await?;
    let status = resp.status();
    let text = resp.text().await?;
    if !status.is_success() {
        return Err(format!("{url} answered HTTP {status}: {text}").into());
    }
    Ok(serde_json::from_str(&text)?)
}

async fn scrape(http: &reqwest::Client, url: &str) -> Result<String, BoxError> {
    Ok(http
        .get(format!("{url}/metrics"))
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?)
}

/// Waits until the prefill sim holds no KV blocks: the notification that rode on the READ freed
/// them (polled: the bench does not sleep for this, it only waits for it).
async fn until_freed(http: &reqwest::Client, url: &str, timeout: Duration) -> Result<(), BoxError> {
    let deadline = Instant::now() + timeout;
    loop {
        let text = scrape(http, url).await?;
        if metric(&text, "vllm:kv_cache_usage_perc") == 0.0 {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "the prefill sim still pins blocks {timeout:?} after the READ: its notification did not free them"
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// One P/D handoff of `plan`'s size with prompt `k`; what the decode sim measured.
async fn handoff(
    http: &reqwest::Client,
    p: &SimProc,
    d: &SimProc,
    plan: &Plan,
    k: usize,
    timeout: Duration,
) -> Result<Moved, BoxError> {
    let id = format!("bench-nixl-{}-{k}", std::process::id());
    let body = json!({
        "model": p.model, "prompt": prompt(k, plan.prompt_tokens), "max_tokens": 1,
        "ignore_eos": true, "stream": false,
    });
    let mut leg = body.clone();
    leg["kv_transfer_params"] = json!({
        "do_remote_decode": true, "do_remote_prefill": false, "remote_engine_id": null,
        "remote_block_ids": null, "remote_host": null, "remote_port": null,
    });
    let pr = post(http, &p.url, &leg, &id).await?;
    let kv = pr["kv_transfer_params"].clone();
    let ids = kv["remote_block_ids"].as_array().map_or(0, Vec::len) as u64;
    if ids != plan.blocks {
        return Err(format!(
            "the prefill sim handed off {ids} blocks for a {}-token prompt, not {}: {kv}",
            plan.prompt_tokens, plan.blocks
        )
        .into());
    }
    let before = Counters::parse(&scrape(http, &d.url).await?);
    let mut leg = body;
    leg["kv_transfer_params"] = kv;
    post(http, &d.url, &leg, &id).await?;
    let after = Counters::parse(&scrape(http, &d.url).await?);
    let moved = before.one_read(&after)?;
    if moved.bytes != plan.bytes as f64 || moved.descriptors != plan.descriptors as f64 {
        return Err(format!(
            "the decode sim READ {} bytes in {} descriptors; {} MiB is {} bytes in {}",
            moved.bytes, moved.descriptors, plan.mib, plan.bytes, plan.descriptors
        )
        .into());
    }
    until_freed(http, &p.url, timeout).await?;
    Ok(moved)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

pub async fn run(a: NixlArgs) -> Result<(), BoxError> {
    if !tandem_nixl::ENABLED {
        return Err("tandem bench nixl needs a build with feature `nixl` (cargo build --release --features nixl --bin tandem) and the NIXL libraries at run time (README: \"Real KV bytes over NIXL\")".into());
    }
    tandem_nixl::check_library()?;
    if !(a.timeout > 0.0 && a.timeout.is_finite()) {
        return Err(format!("--timeout must be positive, got {}", a.timeout).into());
    }
    if a.iterations == 0 {
        return Err("--iterations must be at least 1".into());
    }
    let timeout = Duration::from_secs_f64(a.timeout);
    let geo = Geometry::new(a.block_size)?;
    let plans = a
        .sizes
        .iter()
        .map(|&s| geo.plan(s))
        .collect::<Result<Vec<_>, _>>()?;
    let max_blocks = plans.iter().map(|p| p.blocks).max().unwrap_or(1);
    // Room for the largest prompt plus the block of its one generated token, on both sides.
    let num_blocks = (max_blocks + 2).to_string();
    let flags = |hash_seed: &str| -> Vec<String> {
        [
            "--model",
            MODEL,
            "--block-size",
            &a.block_size.to_string(),
            "--kv-transport",
            "nixl",
            "--nixl-block-bytes",
            &geo.block_bytes.to_string(),
            "--num-gpu-blocks-override",
            &num_blocks,
            "--nixl-handshake-timeout",
            &a.timeout.to_string(),
            "--seed",
            "1",
            "--hash-seed",
            hash_seed,
        ]
        .map(String::from)
        .to_vec()
    };
    let load_start = loadavg();
    let p = start_sim(&flags("prefill"), &[]).await?;
    // UCX prints its protocol choices, transport included, when asked; only the decode side's
    // agent initiates the READs. To stderr: UCX's stdout (and a log file) is block-buffered and
    // would hold the choice until the process exits, stderr is written at once.
    let d = start_sim(
        &flags("decode"),
        &[("UCX_PROTO_INFO", "y"), ("UCX_LOG_FILE", "stderr")],
    )
    .await?;
    let http = reqwest::Client::builder().timeout(timeout).build()?;
    println!(
        "NIXL READ, decode sim <- prefill sim (two processes, UCX over host memory): {MODEL}, {} layers, {}-token blocks, {}-byte descriptors (one block of one layer), {} READs per size after 1 warm-up",
        geo.layers, geo.block_size, geo.block_bytes, a.iterations
    );
    println!("size_mib bytes descriptors best_gbps median_gbps median_xfer_ms median_post_ms");
    let mut k = 0;
    let mut rows = Vec::new();
    for plan in &plans {
        let mut moved = Vec::with_capacity(a.iterations);
        for i in 0..=a.iterations {
            let m = handoff(&http, &p, &d, plan, k, timeout).await?;
            k += 1;
            if i > 0 {
                moved.push(m);
            }
        }
        let gbps: Vec<f64> = moved
            .iter()
            .map(|m| m.bytes / m.xfer_s.max(1e-9) / 1e9)
            .collect();
        let xfer: Vec<f64> = moved.iter().map(|m| m.xfer_s).collect();
        let post: Vec<f64> = moved.iter().map(|m| m.post_s).collect();
        let best = gbps.iter().copied().fold(0.0, f64::max);
        let median = pct(&mut gbps.clone(), 0.5).unwrap_or(0.0);
        let median_xfer = pct(&mut xfer.clone(), 0.5).unwrap_or(0.0);
        let median_post = pct(&mut post.clone(), 0.5).unwrap_or(0.0);
        println!(
            "{} {} {} {best:.2} {median:.2} {:.3} {:.3}",
            plan.mib,
            plan.bytes,
            plan.descriptors,
            median_xfer * 1e3,
            median_post * 1e3
        );
        rows.push(json!({
            "mib": plan.mib, "bytes": moved[0].bytes, "descriptors": moved[0].descriptors,
            "blocks": plan.blocks, "prompt_tokens": plan.prompt_tokens,
            "best_gbps": best, "median_gbps": median,
            "gbps": gbps, "xfer_s": xfer, "post_s": post,
        }));
    }
    let load_end = loadavg();
    let lines = d.output.lock().expect("output lock").clone();
    let transports = ucx_transports(&lines);
    let transport = if transports.is_empty() {
        "not reported (UCX printed no protocol selection)".to_string()
    } else {
        transports.join(", ")
    };
    println!("UCX transport of the READs (UCX_PROTO_INFO on the decode sim): {transport}");
    println!("load average (1, 5, 15 min): {load_start} at start, {load_end} at end");
    if let Some(path) = &a.json {
        let out = json!({
            "bench": "nixl", "model": MODEL, "layers": geo.layers, "block_size": geo.block_size,
            "descriptor_bytes": geo.block_bytes, "iterations": a.iterations, "warmup": 1,
            "ucx_transports": transports,
            "loadavg_start": load_start, "loadavg_end": load_end, "sizes": rows,
        });
        std::fs::write(path, serde_json::to_string_pretty(&out)?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_size_is_whole_blocks_of_every_layer_at_full_block_size() {
        let g = Geometry::new(8).unwrap();
        // llama-3.1-8b: 32 layers, K and V of a token in a layer 2 · 8 · 128 · 2 bytes.
        assert_eq!(
            g,
            Geometry {
                layers: 32,
                block_size: 8,
                block_bytes: 32768
            }
        );
        let p = g.plan(256).unwrap();
        assert_eq!(
            (p.bytes, p.blocks, p.prompt_tokens, p.descriptors),
            (256 << 20, 256, 2048, 8192)
        );
        assert_eq!(g.plan(1).unwrap().descriptors, 32);
        // With 16-token blocks one block of all layers is 2 MiB: 1 MiB cannot be laid out.
        let e = Geometry::new(16).unwrap().plan(1).unwrap_err();
        assert!(e.contains("2097152 bytes"), "{e}");
        assert_eq!(Geometry::new(16).unwrap().plan(4).unwrap().blocks, 2);
    }

    #[test]
    fn handoffs_differ_in_their_first_block() {
        let firsts: std::collections::HashSet<Vec<u32>> =
            (0..2000).map(|k| prompt(k, 8)[..2].to_vec()).collect();
        assert_eq!(firsts.len(), 2000);
        assert_eq!(prompt(3, 24).len(), 24);
        assert!(prompt(9000, 8).iter().all(|t| (32..127).contains(t)));
    }

    #[test]
    fn one_read_is_the_difference_of_two_scrapes() {
        let scrape = |n: u32, bytes: u64, xfer: f64| {
            format!(
                "# TYPE vllm:nixl_xfer_time_seconds histogram\n\
                 vllm:nixl_xfer_time_seconds_count{{engine=\"0\"}} {n}\n\
                 vllm:nixl_xfer_time_seconds_sum{{engine=\"0\"}} {xfer}\n\
                 vllm:nixl_post_time_seconds_sum{{engine=\"0\"}} 0.0001\n\
                 vllm:nixl_bytes_transferred_sum{{engine=\"0\"}} {bytes}\n\
                 vllm:nixl_num_descriptors_sum{{engine=\"0\"}} {}\n\
                 vllm:nixl_num_failed_transfers_total{{engine=\"0\"}} 0.0\n",
                n * 32
            )
        };
        let a = Counters::parse(&scrape(2, 2 << 20, 0.25));
        let b = Counters::parse(&scrape(3, 3 << 20, 0.5));
        let m = a.one_read(&b).unwrap();
        assert_eq!((m.bytes, m.descriptors, m.xfer_s), (1048576.0, 32.0, 0.25));
        // Two transfers (or none) for one handoff is not a measurement.
        assert!(a.one_read(&a).is_err());
        let c = Counters::parse(&scrape(4, 4 << 20, 0.75));
        assert!(a.one_read(&c).unwrap_err().contains("counted 2 transfers"));
    }

    #[test]
    fn ucx_transports_come_from_the_get_selections() {
        let p = "[1764660000.123456] [host:4242:0]   ";
        let lines: Vec<String> = [
            // As the nixl-cu12 1.5.1 wheel's UCX prints it for a DRAM-to-DRAM READ on one host.
            "+--------+-------------+-------------------------------------------+",
            "| 426d1ad8-8f9c-4363-a84c-b09a73c intra-node cfg#1                 |",
            "| remote memory read by ucp_get*(multi) into host memory from host |",
            "+--------+-------------+-------------------------------------------+",
            "| Range  | Description |                  Config                   |",
            "+--------+-------------+-------------------------------------------+",
            "| 0..inf | zero-copy   | cma/memory                                |",
            "+--------------------------------+--------------------------------+",
            "| ucp_context_0 intra-node cfg#1 | active message by ucp_am_send* from host memory |",
            "|                        0..8184 | short                      | tcp/lo     |",
            "| ucp_context_0 inter-node cfg#2 | remote memory read by ucp_get* from host memory |",
            "|                      9384..inf | zero-copy | 66% on cma/memory and 34% on rc_mlx5/mlx5_0:1 |",
            "not a table line",
        ]
        .map(|l| format!("{p}{l}"))
        .to_vec();
        assert_eq!(ucx_transports(&lines), ["cma", "rc_mlx5"]);
        assert!(ucx_transports(&[]).is_empty());
    }

    #[cfg(not(feature = "nixl"))]
    #[tokio::test]
    async fn without_the_feature_it_says_what_to_build() {
        let a = NixlArgs {
            sizes: vec![1],
            iterations: 1,
            block_size: 8,
            timeout: 1.0,
            json: None,
        };
        let e = run(a).await.unwrap_err().to_string();
        assert!(e.contains("--features nixl"), "{e}");
    }
}
