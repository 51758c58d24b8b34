//! `tandem kv-probe`: checks a deployment's prefill → decode KV path before traffic finds it.
//!
//! Against one prefill and one decode engine (vLLM with NixlConnector, or `tandem sim`), or every
//! prefill × decode pair of a `tandem.toml`, it:
//! 1. runs a prefill leg with `do_remote_decode` and reads the returned `kv_transfer_params`;
//! 2. reaches the advertised side channel and does the decode side's handshake itself
//!    (vllm-pd-protocol.md §1.6), timing it;
//! 3. compares what vLLM compares between the two engines: the compatibility hash, block size,
//!    KV layout, TP layout and block lengths, the attention backend when reported; the decode
//!    engine's own handshake is had the same way (a prefill-style leg on it);
//! 4. with feature `nixl`, READs the blocks as a NIXL agent, measures the bandwidth, checks the
//!    bytes where they are a simulator's stand-ins, and notifies so the prefill frees them;
//!    without it, says the bytes were not checked;
//! 5. runs the real decode leg and reads the decode engine's `vllm:nixl_*` metrics to tell a pull
//!    from a recompute.
//!
//! Each failure is named with its likely cause; the exit status is non-zero when any check
//! failed, so a rollout can be gated on it.

#[cfg(feature = "nixl")]
#[path = "kv_probe/nixl_read.rs"]
mod nixl_read;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tandem_sim::side_channel::{RemoteAgent, SideChannelClient, SideChannelError};

/// A prompt of several blocks (block size 16 and up), fixed so runs compare.
const PROBE_PROMPT: &str = "kv-probe: checking the prefill to decode KV cache path. The prefill \
engine computes this prompt, pins its blocks and hands them to the decode engine, which reads \
them over NIXL and notifies the prefill engine so that it frees them again.";

/// The prompt of the leg that gets the decode engine's own handshake: different from the first
/// token on, so that it leaves nothing in the decode engine's prefix cache that the real decode
/// leg could hit instead of pulling.
const LAYOUT_PROMPT: &str = "Layout leg of kv-probe: the decode engine's own NIXL metadata.";

#[derive(Debug, clap::Args)]
pub struct KvProbeArgs {
    /// Base URL of the prefill engine, e.g. http://10.0.0.5:8000.
    #[arg(long, requires = "decode", conflicts_with = "config")]
    prefill: Option<String>,
    /// Base URL of the decode engine.
    #[arg(long, requires = "prefill", conflicts_with = "config")]
    decode: Option<String>,
    /// A tandem.toml: probe every prefill × decode pair of its HTTP pools (static endpoints, and
    /// the engines a pool's DNS name resolves to).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Model name to send (default: the prefill engine's first /v1/models entry).
    #[arg(long)]
    model: Option<String>,
    /// Seconds each step (HTTP leg, side-channel call, READ) may take; vLLM's handshake uses 5.
    #[arg(long, default_value_t = 5.0)]
    timeout: f64,
    /// With feature `nixl`: also measure NIXL READ bandwidth from the prefill engine's region
    /// for these sizes in MiB (e.g. 1,4,16,64,256). Each descriptor is one block of one layer,
    /// so the prefill engine's blocks should be 1 MiB per layer (`tandem sim --nixl-block-bytes
    /// 1048576`).
    #[arg(long, value_delimiter = ',')]
    bench_sizes: Vec<u64>,
    /// READs per size for `--bench-sizes`; the best and the median are reported.
    #[arg(long, default_value_t = 5)]
    bench_iters: u32,
}

/// How one check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Pass,
    Fail,
    Note,
}

#[derive(Debug)]
struct Report {
    lines: Vec<(Outcome, &'static str, String)>,
}

impl Report {
    fn push(&mut self, o: Outcome, what: &'static str, detail: impl Into<String>) {
        self.lines.push((o, what, detail.into()));
    }
    fn pass(&mut self, what: &'static str, detail: impl Into<String>) {
        self.push(Outcome::Pass, what, detail);
    }
    fn fail(&mut self, what: &'static str, detail: impl Into<String>) {
        self.push(Outcome::Fail, what, detail);
    }
    fn note(&mut self, what: &'static str, detail: impl Into<String>) {
        self.push(Outcome::Note, what, detail);
    }
    fn failures(&self) -> usize {
        self.lines
            .iter()
            .filter(|(o, _, _)| *o == Outcome::Fail)
            .count()
    }
    fn print(&self, pair: &str) {
        println!("kv-probe {pair}");
        for (o, what, detail) in &self.lines {
            let tag = match o {
                Outcome::Pass => "PASS",
                Outcome::Fail => "FAIL",
                Outcome::Note => "note",
            };
            println!("  {tag} {what}: {detail}");
        }
    }
}

/// A step that failed has been reported; the probe of this pair stops there.
struct Stop;

/// The engines one probe talks to.
struct Ctx {
    http: reqwest::Client,
    side: SideChannelClient,
    timeout: Duration,
    prefill: String,
    decode: String,
    model: String,
}

pub async fn run(args: KvProbeArgs) -> Result<(), Box<dyn std::error::Error>> {
    if !(args.timeout > 0.0 && args.timeout.is_finite()) {
        return Err(format!("--timeout must be positive, got {}", args.timeout).into());
    }
    let pairs = match (&args.config, &args.prefill, &args.decode) {
        (Some(path), _, _) => pairs_of(path).await?,
        (None, Some(p), Some(d)) => vec![(trim(p), trim(d))],
        _ => return Err("give --prefill and --decode URLs, or --config tandem.toml".into()),
    };
    if !args.bench_sizes.is_empty() && !tandem_nixl::ENABLED {
        return Err("--bench-sizes needs a build with feature `nixl`".into());
    }
    let timeout = Duration::from_secs_f64(args.timeout);
    let http = reqwest::Client::builder().timeout(timeout).build()?;
    let mut failed = 0;
    for (prefill, decode) in pairs {
        let mut report = Report { lines: Vec::new() };
        let model = match &args.model {
            Some(m) => Some(m.clone()),
            None => first_model(&http, &prefill, &mut report).await,
        };
        if let Some(model) = model {
            let ctx = Ctx {
                http: http.clone(),
                side: SideChannelClient::new(),
                timeout,
                prefill: prefill.clone(),
                decode: decode.clone(),
                model,
            };
            if let Ok(agent) = probe(&ctx, &mut report).await {
                if !args.bench_sizes.is_empty() {
                    bench(
                        &ctx,
                        &agent,
                        &args.bench_sizes,
                        args.bench_iters,
                        &mut report,
                    )
                    .await;
                }
            }
        }
        report.print(&format!("{prefill} -> {decode}"));
        failed += report.failures();
    }
    if failed > 0 {
        return Err(format!("kv-probe: {failed} check(s) failed").into());
    }
    println!("kv-probe: all checks passed");
    Ok(())
}

fn trim(url: &str) -> String {
    url.trim_end_matches('/').to_string()
}

/// Every prefill × decode pair of a configuration's HTTP pools: their static endpoints, and the
/// engines their DNS names resolve to now (one A/AAAA record per engine, as Tandem reads them).
async fn pairs_of(path: &std::path::Path) -> Result<Vec<(String, String)>, String> {
    let cfg = tandem_config::load(Some(path), None, &[])
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let ps = pool_urls("prefill", &cfg.pools.prefill).await?;
    let ds = pool_urls("decode", &cfg.pools.decode).await?;
    Ok(ps
        .iter()
        .flat_map(|p| ds.iter().map(move |d| (p.clone(), d.clone())))
        .collect())
}

async fn pool_urls(name: &str, pool: &tandem_config::PoolConfig) -> Result<Vec<String>, String> {
    if pool.protocol != tandem_config::Protocol::Http {
        return Err(format!(
            "the {name} pool speaks {:?}; kv-probe needs the engines' HTTP URLs (--prefill/--decode)",
            pool.protocol
        ));
    }
    let mut urls: Vec<String> = pool.endpoints.iter().map(|e| trim(&e.url)).collect();
    if let Some(dns) = &pool.dns {
        let addrs = tokio::net::lookup_host((dns.name.as_str(), dns.port))
            .await
            .map_err(|e| {
                format!(
                    "the {name} pool's DNS name {} does not resolve: {e}",
                    dns.name
                )
            })?;
        let mut found: Vec<String> = addrs.map(|a| format!("{}://{a}", dns.scheme)).collect();
        found.sort();
        found.dedup();
        urls.extend(found);
    }
    if urls.is_empty() {
        return Err(format!("the {name} pool has no engines"));
    }
    Ok(urls)
}

async fn first_model(http: &reqwest::Client, url: &str, r: &mut Report) -> Option<String> {
    let got = async {
        let v: Value = http
            .get(format!("{url}/v1/models"))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        Ok::<_, reqwest::Error>(v["data"][0]["id"].as_str().map(str::to_string))
    };
    match got.await {
        Ok(Some(m)) => Some(m),
        Ok(None) => {
            r.fail("prefill engine", format!("{url}/v1/models lists no model"));
            None
        }
        Err(e) => {
            r.fail("prefill engine", format!("{url} is unreachable: {e}"));
            None
        }
    }
}

/// A probe request id, unique per run, so the engines' logs show the probe.
fn request_id(leg: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("kv-probe-{}-{nanos:x}-{leg}", std::process::id())
}

/// POST a JSON body; the status and the body (JSON, or the text as a JSON string).
async fn post(ctx: &Ctx, url: &str, body: &Value, id: &str) -> Result<(u16, Value), String> {
    let resp = ctx
        .http
        .post(format!("{url}/v1/completions"))
        .header("X-Request-Id", id)
        .json(body)
        .send()
        .await
        .map_err(|e| format!("{url} is unreachable: {e}"))?;
    let status = resp.status().as_u16();
    let text = resp.text().await.map_err(|e| e.to_string())?;
    Ok((
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    ))
}

/// The prefill leg as vLLM's proxy sends it (§1.2); the returned `kv_transfer_params`.
async fn prefill_leg(
    ctx: &Ctx,
    url: &str,
    role: &'static str,
    r: &mut Report,
) -> Result<Value, Stop> {
    let prompt = if role == "decode engine" {
        LAYOUT_PROMPT
    } else {
        PROBE_PROMPT
    };
    let body = json!({
        "model": ctx.model, "prompt": prompt, "max_tokens": 1, "ignore_eos": true,
        "stream": false,
        "kv_transfer_params": {"do_remote_decode": true, "do_remote_prefill": false,
            "remote_engine_id": null, "remote_block_ids": null, "remote_host": null,
            "remote_port": null},
    });
    let (status, v) = match post(ctx, url, &body, &request_id(role)).await {
        Ok(x) => x,
        Err(e) => {
            r.fail(role, e);
            return Err(Stop);
        }
    };
    if status != 200 {
        r.fail(
            role,
            format!("prefill leg answered HTTP {status}: {}", short(&v)),
        );
        return Err(Stop);
    }
    let kv = v["kv_transfer_params"].clone();
    if kv.is_null() {
        r.fail(
            role,
            "a do_remote_decode request returned no kv_transfer_params: the engine has no \
             NixlConnector (--kv-transfer-config '{\"kv_connector\":\"NixlConnector\",\"kv_role\":\"kv_both\"}')",
        );
        return Err(Stop);
    }
    for key in [
        "remote_engine_id",
        "remote_request_id",
        "remote_host",
        "remote_port",
    ] {
        if kv.get(key).is_none_or(Value::is_null) {
            r.fail(role, format!("kv_transfer_params lack {key}: {kv}"));
            return Err(Stop);
        }
    }
    Ok(kv)
}

fn short(v: &Value) -> String {
    let s = match v {
        Value::String(s) => s.clone(),
        v => v.to_string(),
    };
    s.chars().take(300).collect()
}

/// Side-channel address of a set of params.
fn side_addr(kv: &Value) -> Option<(String, u16)> {
    let host = kv["remote_host"].as_str()?.to_string();
    let port = kv["remote_port"]
        .as_u64()
        .or_else(|| kv["remote_port"].as_f64().map(|f| f as u64))?;
    Some((host, u16::try_from(port).ok()?))
}

fn block_ids(kv: &Value) -> Vec<u32> {
    let ids = match &kv["remote_block_ids"] {
        Value::Array(a) if a.first().is_some_and(Value::is_array) => &a[0],
        v => v,
    };
    ids.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_u64().and_then(|n| u32::try_from(n).ok()))
                .collect()
        })
        .unwrap_or_default()
}

/// Reach the side channel over TCP first, so a closed port or a firewall is named as such
/// (the ZMQ client would retry a refused connection silently until its timeout).
async fn reach(
    ctx: &Ctx,
    role: &'static str,
    host: &str,
    port: u16,
    r: &mut Report,
) -> Result<(), Stop> {
    let h = if host == "localhost" {
        "127.0.0.1"
    } else {
        host
    };
    let hint = "check VLLM_NIXL_SIDE_CHANNEL_HOST/PORT on the prefill engine (it must be an address the decode pool can reach) and any firewall between the pools";
    match tokio::time::timeout(ctx.timeout, tokio::net::TcpStream::connect((h, port))).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => {
            r.fail(
                role,
                format!("side channel {host}:{port} is unreachable ({e}); {hint}"),
            );
            Err(Stop)
        }
        Err(_) => {
            r.fail(role, format!("side channel {host}:{port} did not accept a connection within {:?} (filtered?); {hint}", ctx.timeout));
            Err(Stop)
        }
    }
}

async fn handshake(
    ctx: &Ctx,
    role: &'static str,
    kv: &Value,
    r: &mut Report,
) -> Result<(RemoteAgent, Duration), Stop> {
    let Some((host, port)) = side_addr(kv) else {
        r.fail(
            role,
            format!("kv_transfer_params have no usable remote_host/remote_port: {kv}"),
        );
        return Err(Stop);
    };
    reach(ctx, role, &host, port, r).await?;
    let started = Instant::now();
    match ctx.side.handshake(&host, port, 0, ctx.timeout).await {
        Ok(a) => Ok((a, started.elapsed())),
        Err(SideChannelError::Timeout) => {
            r.fail(role, format!("NIXL handshake with {host}:{port} stalled: the side channel accepted the connection but sent no metadata within {:?} (engine overloaded or wedged?)", ctx.timeout));
            Err(Stop)
        }
        Err(e) => {
            r.fail(
                role,
                format!("NIXL handshake with {host}:{port} failed: {e}"),
            );
            Err(Stop)
        }
    }
}

async fn metrics_of(ctx: &Ctx, url: &str) -> Result<String, String> {
    let resp = ctx
        .http
        .get(format!("{url}/metrics"))
        .send()
        .await
        .map_err(|e| format!("{url}/metrics: {e}"))?;
    resp.text().await.map_err(|e| format!("{url}/metrics: {e}"))
}

/// Sum of the samples of `name` (any labels) in a Prometheus text exposition.
pub(crate) fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The labels of `vllm:cache_config_info` that are compatibility-hash factors.
const HASHED_CACHE_LABELS: [&str; 1] = ["cache_dtype"];

/// The labels of `vllm:cache_config_info`, to name which factor a hash mismatch comes from.
fn cache_config(text: &str) -> Vec<(String, String)> {
    let Some(line) = text
        .lines()
        .find(|l| l.starts_with("vllm:cache_config_info{"))
    else {
        return Vec::new();
    };
    let inner = line
        .split_once('{')
        .and_then(|(_, r)| r.rsplit_once('}'))
        .map(|(l, _)| l)
        .unwrap_or("");
    inner
        .split("\",")
        .filter_map(|kv| {
            let (k, v) = kv.split_once("=\"")?;
            Some((k.to_string(), v.trim_end_matches('"').to_string()))
        })
        .collect()
}

/// The probe of one pair; the prefill engine's handshake when every step passed.
async fn probe(ctx: &Ctx, r: &mut Report) -> Result<RemoteAgent, Stop> {
    // 1. The prefill leg.
    let kv = prefill_leg(ctx, &ctx.prefill, "prefill leg", r).await?;
    let blocks = block_ids(&kv);
    r.pass(
        "prefill leg",
        format!(
            "kv_transfer_params from engine {} ({} blocks, side channel {}:{})",
            kv["remote_engine_id"].as_str().unwrap_or("?"),
            blocks.len(),
            kv["remote_host"].as_str().unwrap_or("?"),
            kv["remote_port"]
        ),
    );
    // 2. The handshake, as the decode side does it.
    let (p_agent, latency) = handshake(ctx, "handshake", &kv, r).await?;
    if Some(p_agent.engine_id.as_str()) != kv["remote_engine_id"].as_str() {
        r.fail("handshake", format!("Remote NIXL agent engine ID mismatch: the params name {}, the side channel answers as {} (two engines share a side-channel port?)", kv["remote_engine_id"], p_agent.engine_id));
        return Err(Stop);
    }
    r.pass(
        "handshake",
        format!(
            "NixlAgentMetadata in {:.1} ms ({} regions, block size {}, layout {})",
            latency.as_secs_f64() * 1e3,
            p_agent.kv_caches_base_addr.len(),
            p_agent.block_size,
            p_agent.kv_cache_layout
        ),
    );
    // 3. What vLLM compares, against the decode engine's own handshake.
    compare(ctx, &kv, &p_agent, r).await;
    // 4. The bytes.
    let decode_kv = read_bytes(ctx, &kv, &p_agent, &blocks, r).await?;
    // 5. The real decode leg.
    decode_leg(ctx, &decode_kv, r).await?;
    Ok(p_agent)
}

/// The decode engine's handshake, had through a prefill-style leg on it; then its pinned
/// blocks are released again (on the side channel, which a tandem sim answers; a vLLM engine
/// holds them until its abort timeout).
async fn compare(ctx: &Ctx, p_kv: &Value, p: &RemoteAgent, r: &mut Report) {
    let mut scratch = Report { lines: Vec::new() };
    let Ok(d_kv) = prefill_leg(ctx, &ctx.decode, "decode engine", &mut scratch).await else {
        r.note("layout", "the decode engine returned no kv_transfer_params of its own, so its NIXL layout could not be compared (the decode leg below still tests the path)");
        return;
    };
    let Ok((d, _)) = handshake(ctx, "decode engine", &d_kv, &mut scratch).await else {
        r.note("layout", format!("the decode engine's own side channel did not answer ({}), so its layout could not be compared", scratch.lines.last().map(|l| l.2.as_str()).unwrap_or("?")));
        return;
    };
    if let Some((host, port)) = side_addr(&d_kv) {
        let id = d_kv["remote_request_id"].as_str().unwrap_or("");
        let quick = ctx.timeout.min(Duration::from_secs(1));
        if ctx.side.notify(&host, port, id, 1, quick).await.is_err() {
            r.note(
                "decode engine",
                "its probe blocks (one request) are released at its abort timeout",
            );
        }
    }
    let mut ok = true;
    if p.compatibility_hash != d.compatibility_hash {
        ok = false;
        let (pm, dm) = tokio::join!(metrics_of(ctx, &ctx.prefill), metrics_of(ctx, &ctx.decode));
        let (pc, dc) = (
            cache_config(&pm.unwrap_or_default()),
            cache_config(&dm.unwrap_or_default()),
        );
        // Only the labels that are hash factors: num_gpu_blocks and the like may differ freely.
        let mut differ: Vec<String> = pc
            .iter()
            .filter(|(k, _)| HASHED_CACHE_LABELS.contains(&k.as_str()))
            .filter_map(|(k, v)| {
                let other = dc.iter().find(|(k2, _)| k2 == k).map(|(_, v)| v.as_str())?;
                (other != v).then(|| format!("{k}: {v} vs {other}"))
            })
            .collect();
        let mut scratch = Report { lines: Vec::new() };
        if let Some(dm) = first_model(&ctx.http, &ctx.decode, &mut scratch).await {
            if dm != ctx.model {
                differ.push(format!("model: {} vs {dm}", ctx.model));
            }
        }
        let hint = if differ.is_empty() {
            "the pools differ in vLLM version, model, dtype, attention backend or KV cache dtype"
                .to_string()
        } else {
            format!("the engines differ in {}", differ.join(", "))
        };
        r.fail(
            "compatibility hash",
            format!(
                "NIXL compatibility hash mismatch: prefill {}, decode {}; {hint}",
                &p.compatibility_hash, &d.compatibility_hash
            ),
        );
    }
    if p.block_size != d.block_size {
        ok = false;
        r.fail(
            "block size",
            format!(
                "prefill {} tokens, decode {} (both need the same --block-size)",
                p.block_size, d.block_size
            ),
        );
    }
    if p.kv_cache_layout != d.kv_cache_layout {
        ok = false;
        r.fail(
            "KV layout",
            format!(
                "prefill {}, decode {}",
                p.kv_cache_layout, d.kv_cache_layout
            ),
        );
    }
    let (ptp, dtp) = (
        p_kv["tp_size"].as_u64().unwrap_or(1),
        d_kv["tp_size"].as_u64().unwrap_or(1),
    );
    let (ppp, dpp) = (
        p_kv["pp_size"].as_u64().unwrap_or(1),
        d_kv["pp_size"].as_u64().unwrap_or(1),
    );
    if ppp != dpp {
        ok = false;
        r.fail("PP layout", format!("prefill pp_size {ppp}, decode {dpp}"));
    }
    if ptp == dtp {
        if p.block_lens != d.block_lens
            || p.kv_caches_base_addr.len() != d.kv_caches_base_addr.len()
        {
            ok = false;
            r.fail("TP layout", format!("same tp_size {ptp} but different KV regions: prefill {} regions of {:?} bytes, decode {} of {:?}",
                p.kv_caches_base_addr.len(), p.block_lens.first(), d.kv_caches_base_addr.len(), d.block_lens.first()));
        }
    } else if ptp % dtp != 0 && dtp % ptp != 0 {
        ok = false;
        r.fail(
            "TP layout",
            format!("prefill tp_size {ptp} and decode {dtp}: neither divides the other"),
        );
    } else {
        r.note(
            "TP layout",
            format!("heterogeneous TP: prefill {ptp}, decode {dtp}"),
        );
    }
    match (&p.attn_backend_name, &d.attn_backend_name) {
        (Some(a), Some(b)) if a != b => {
            ok = false;
            r.fail("attention backend", format!("prefill {a}, decode {b}"));
        }
        (Some(a), Some(_)) => r.pass("attention backend", a.clone()),
        _ => {}
    }
    if ok {
        r.pass(
            "layout",
            format!(
                "compatibility hash, block size {}, layout {}, TP {ptp}/{dtp} agree",
                p.block_size, p.kv_cache_layout
            ),
        );
    }
}

/// With NIXL: READ the probe blocks and notify, then a second prefill leg for the decode leg
/// (the first one's blocks are freed by the notification). Without: the first leg's params go
/// to the decode leg as they are.
async fn read_bytes(
    ctx: &Ctx,
    kv: &Value,
    p: &RemoteAgent,
    blocks: &[u32],
    r: &mut Report,
) -> Result<Value, Stop> {
    #[cfg(feature = "nixl")]
    {
        let id = kv["remote_request_id"].as_str().unwrap_or("");
        match nixl_read::read_probe(p, blocks, id, ctx.timeout).await {
            Ok(o) => {
                let (what, detail) = o.describe();
                if o.failed() {
                    r.fail(what, detail);
                    return Err(Stop);
                }
                r.pass(what, detail);
                r.note(
                    "transport",
                    nixl_read::transport(kv["remote_host"].as_str().unwrap_or("")),
                );
            }
            Err(e) => {
                r.fail("NIXL READ", e);
                return Err(Stop);
            }
        }
        prefill_leg(ctx, &ctx.prefill, "prefill leg", r).await
    }
    #[cfg(not(feature = "nixl"))]
    {
        let _ = (ctx, p, blocks);
        r.note("bytes", "not checked: this tandem is built without feature `nixl`; the handshake and the decode leg were checked, a NIXL READ was not");
        Ok(kv.clone())
    }
}

async fn decode_leg(ctx: &Ctx, kv: &Value, r: &mut Report) -> Result<(), Stop> {
    let names = [
        "vllm:nixl_xfer_time_seconds_count",
        "vllm:nixl_num_failed_transfers_total",
        "vllm:nixl_bytes_transferred_sum",
    ];
    let before = match metrics_of(ctx, &ctx.decode).await {
        Ok(t) => names.map(|n| metric(&t, n)),
        Err(e) => {
            r.fail(
                "decode leg",
                format!("cannot read the decode engine's metrics: {e}"),
            );
            return Err(Stop);
        }
    };
    let body = json!({"model": ctx.model, "prompt": PROBE_PROMPT, "max_tokens": 2,
        "ignore_eos": true, "stream": false, "kv_transfer_params": kv});
    let answered = post(ctx, &ctx.decode, &body, &request_id("decode")).await;
    let after = metrics_of(ctx, &ctx.decode)
        .await
        .map(|t| names.map(|n| metric(&t, n)))
        .unwrap_or(before);
    let (pulls, failed, bytes) = (
        after[0] - before[0],
        after[1] - before[1],
        after[2] - before[2],
    );
    let status = match answered {
        Ok((200, _)) => None,
        Ok((s, v)) => Some(format!("HTTP {s}: {}", short(&v))),
        Err(e) => Some(e),
    };
    if failed > 0.0 {
        let how = status.as_deref().map_or(
            "and recomputed the prompt (kv_load_failure_policy recompute)".to_string(),
            |s| format!("and the request failed ({s})"),
        );
        r.fail("decode leg", format!("the decode engine's KV pull from the prefill engine failed (vllm:nixl_num_failed_transfers +{failed}: read refused, bytes corrupt, or handshake failed on its side) {how}"));
        return Err(Stop);
    }
    if let Some(s) = status {
        r.fail("decode leg", format!("the decode engine answered {s}"));
        return Err(Stop);
    }
    if pulls < 1.0 {
        r.fail("decode leg", "the decode engine recomputed the prompt instead of pulling its KV: vllm:nixl_xfer_time_seconds did not count a transfer (is it started with a NixlConnector kv-transfer-config?)");
        return Err(Stop);
    }
    r.pass("decode leg", format!("the decode engine pulled the KV ({pulls} transfer, {bytes} bytes by its metrics) and answered"));
    Ok(())
}

/// NIXL READ bandwidth from the prefill engine's region (module `nixl_read`).
async fn bench(ctx: &Ctx, agent: &RemoteAgent, sizes: &[u64], iters: u32, r: &mut Report) {
    #[cfg(feature = "nixl")]
    match nixl_read::bench(agent, sizes, iters, ctx.timeout).await {
        Ok(lines) => {
            for l in lines {
                r.note("bench", l);
            }
        }
        Err(e) => r.fail("bench", e),
    }
    #[cfg(not(feature = "nixl"))]
    {
        let _ = (ctx, agent, sizes, iters, r);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_cache_config_labels_and_sums_a_metric() {
        let text = "# HELP x\n\
            vllm:cache_config_info{block_size=\"16\",cache_dtype=\"fp8\"} 1.0\n\
            vllm:nixl_xfer_time_seconds_count{engine=\"0\"} 2\n\
            vllm:nixl_xfer_time_seconds_count_other 7\n";
        assert_eq!(
            cache_config(text),
            [
                ("block_size".to_string(), "16".to_string()),
                ("cache_dtype".to_string(), "fp8".to_string())
            ]
        );
        assert_eq!(metric(text, "vllm:nixl_xfer_time_seconds_count"), 2.0);
        assert!(cache_config("").is_empty());
    }

    #[test]
    fn reads_block_ids_and_the_side_channel_of_either_params_shape() {
        let v2 = json!({"remote_block_ids": [3, 4], "remote_host": "h", "remote_port": 5600});
        let hma = json!({"remote_block_ids": [[7, 8]], "remote_host": "h", "remote_port": 5600.0});
        assert_eq!(block_ids(&v2), [3, 4]);
        assert_eq!(block_ids(&hma), [7, 8]);
        assert_eq!(side_addr(&hma), Some(("h".to_string(), 5600)));
        assert_eq!(side_addr(&json!({"remote_host": "h"})), None);
    }
}
